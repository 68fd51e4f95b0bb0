"""Least-squares re-fit of kept weights on a fixed support, and the asymmetric (dense-to-pruned) OBS objective.

SparseGPT ([`obs.sparsegpt_prune_`]) minimises `||W X - W_hat X||^2` on the *dense* model's inputs `X`. Once masks are
applied, a layer actually sees the pruned model's inputs `X~`, whose Hessian `H~ = X~ X~^T` the training forwards
gather at no extra cost. Two corrections use it:

- **Re-fit** ([`refit_masked_`]): with the mask fixed, the kept weights of each row are the least-squares solution
  `argmin_{W_hat on the support} ||R X~ - W_hat X~||^2 + damp ||R - W_hat||^2` for a reference `R` (the weights before
  the pruning edits): per row `w_S = ((H~ + damp I)_SS)^-1 [R (H~ + damp I)]_S`. Pruned weights stay exactly zero,
  and a reference already supported on the mask is returned unchanged (the dampening is a ridge towards `R`).
- **Asymmetric objective** (GPTAQ, arXiv 2504.02692; QEP, arXiv 2504.09629): `||R X - W_hat X~||^2`, the dense
  layer's output on dense inputs matched from the pruned inputs. Its normal equations read `W_hat H~ = R (H~ + C)` with
  the cross term `C = (X - X~) X~^T`, so it is the symmetric objective on `H~` with the propagated target
  `R' = R + R C H~^-1` ([`propagate_target`]); QEP scales the correction, `R' = R + alpha R C H~^-1`, and reports
  `alpha` in [0.25, 0.5] as robust (1.0 is the exact asymmetric solution, 0 the symmetric one on `H~`).

Both run during training (a [`MaskHolder`]'s updates and re-fit, from the live cross term) and offline: a saved
importance folder keeps `C`, and `PruneConfig(cross_alpha=...)` makes the plan's OBS sweep asymmetric
([`offline_cross_terms`]); [`usable_cross`] decides, for both, which weights' `C` covers the tokens of their `H~`.

Cost and memory: a re-fit of an `[out, in]` weight holds its float32 copy and the dampened `[in, in]` Hessian. The
exact solve factorises one `[k, k]` system per row (`k`: the row's kept inputs), chunked to 64 MiB (`row_chunk`):
`sum k^3 / 3` flops, affordable at SmolLM2 size but not at Phi-3-mini's (70 TFLOP for one `down_proj` at 50%), where
`solver="auto"` switches to SparseGPT's sweep with the mask fixed (one `[in, in]` factorisation per weight).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from numbers import Real

import torch
from torch import Tensor

from ..scorers import criteria_where
from ..scorers.sparsegpt import check_pair, dampened_hessian
from .obs import sparsegpt_prune_

__all__ = ["asymmetric_sparsegpt_prune_", "cross_warnings_once", "dampened", "offline_cross_terms", "propagate_target",
           "refit_masked_", "refit_solver", "sweep_flops", "usable_cross"]

# The cross-term warnings already logged inside `cross_warnings_once` (None outside: every prune logs its own).
_LOGGED: ContextVar[set[str] | None] = ContextVar("cross_warnings_logged", default=None)


@contextlib.contextmanager
def cross_warnings_once() -> Iterator[None]:
    """Inside the block, each cross-term warning of this module is logged at most once: `sweep` and
    `search_structures` prune one importance once per point or candidate, and the run needs the advice once."""
    token = _LOGGED.set(set())
    try:
        yield
    finally:
        _LOGGED.reset(token)


def _warn(key: str, message: str, *args) -> None:
    logged = _LOGGED.get()
    if logged is not None:
        if key in logged:
            return
        logged.add(key)
    logger.warning(message, *args)

logger = logging.getLogger(__name__)
_CHUNK_BYTES = 64 << 20
# Above this many floating-point operations for one weight's per-row solves (sum of k^3 / 3 over its rows, `k` the
# kept inputs of a row: about a minute of one CPU core, a fraction of a second on a GPU), `solver="auto"` sweeps.
_EXACT_FLOPS = 2.5e11


def _solve_on_supports(H: Tensor, B: Tensor, keep: Tensor, counts: Tensor, row_chunk: int | None,
                       percdamp: float) -> Tensor:
    """Row `i`'s `k_i x k_i` system `H_SS w_S = B_S` on its kept inputs `S`, by batched Cholesky: rows sorted by `k`,
    a chunk padded to its largest `k` with identity rows (padding costs nothing but its share of the batch)."""
    rows, cols = keep.shape
    out = torch.zeros(rows, cols, dtype=torch.float32, device=H.device)
    order = torch.argsort(counts, stable=True)
    supports = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # each row's kept inputs first, in order
    k_all = int(counts.max()) if rows else 0
    if row_chunk is None:
        row_chunk = max(1, _CHUNK_BYTES // (4 * max(k_all, 1) ** 2))
    for a in range(0, rows, row_chunk):
        idx = order[a : a + row_chunk]
        k = int(counts[idx].max())
        if k == 0:
            continue
        cols_ = supports[idx, :k]  # [chunk, k]; a row with fewer kept inputs ends with pruned ones (padding)
        valid = (torch.arange(k, device=H.device)[None, :] < counts[idx, None]).to(torch.float32)
        A = H[cols_[:, :, None], cols_[:, None, :]] * valid[:, :, None] * valid[:, None, :]
        A.diagonal(dim1=1, dim2=2).add_(1.0 - valid)
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):
            bad = int(idx[int((info != 0).nonzero()[0])])
            raise ValueError(f"row {bad}'s Hessian on its kept inputs is not positive definite with percdamp="
                             f"{percdamp:g}; raise it. No weight was changed.")
        w = torch.cholesky_solve((B[idx].gather(1, cols_) * valid).unsqueeze(-1), L).squeeze(-1) * valid
        out[idx] = out[idx].scatter_(1, cols_, w)
    return out


def _check_damp(percdamp) -> float:
    if isinstance(percdamp, bool) or not isinstance(percdamp, Real) or not 0.0 <= float(percdamp) <= 1.0:
        raise ValueError(f"`percdamp` must be a float in [0.0, 1.0] (SparseGPT uses 0.01), got {percdamp!r}.")
    return float(percdamp)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"`alpha` must be a float in [0.0, 1.0] (GPTAQ / QEP use 0.25 to 0.5), got {alpha!r}.")
    return float(alpha)


def dampened(hessian: Tensor, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """SparseGPT's dampened Hessian ([`~scorers.sparsegpt.dampened_hessian`]), as the OBS sweep factorises it.

    Raises:
        `ValueError`: `percdamp` out of range, or `hessian` not finite or all zero on its diagonal.
    """
    return dampened_hessian(hessian, percdamp=_check_damp(percdamp))


def _check_cross(cross: Tensor | None, hessian: Tensor) -> None:
    if cross is not None and (not isinstance(cross, Tensor) or cross.shape != hessian.shape
                              or not cross.is_floating_point()):
        raise ValueError(f"`cross` must be a floating [in, in] tensor like `hessian` {tuple(hessian.shape)}, got "
                         f"{tuple(cross.shape) if isinstance(cross, Tensor) else type(cross).__name__}.")


def usable_cross(cross: dict[str, tuple[Tensor, int]] | None, tokens: dict[str, int],
                 names: Iterable[str]) -> dict[str, Tensor]:
    """
    The cross terms of `names` that cover exactly the tokens of their `H~`: the weights the asymmetric objective
    applies to, during training (a [`MaskHolder`] update or re-fit) and offline (`PruneConfig(cross_alpha=...)`).

    A weight whose cross term counts other tokens (forwards without a teacher run: no labels) or none (skipped by
    `PruneSchedule(cross_max_in_features=...)`) keeps the symmetric objective; a count mismatch is logged once per
    call.

    Args:
        cross (`dict[str, tuple[torch.Tensor, int]]`, *optional*): `(C, real tokens)` by weight name
            (`CrossTerm.terms()`, [`Importance.cross_terms`]).
        tokens (`dict[str, int]`): the real tokens of each weight's `H~` (the importance's `meta["tokens"]`).
        names (`Iterable[str]`): the weights about to be swept or re-fitted.

    Returns:
        `dict[str, torch.Tensor]`: `C` by weight name, for the weights of `names` whose cross term is usable.
    """
    if not cross:
        return {}
    out, off = {}, []
    for n in names:
        if n in cross and cross[n][1] == tokens.get(n) and cross[n][1] > 0:
            out[n] = cross[n][0]
        elif n in cross:
            off.append(n)
    if off:
        _warn("tokens", "The cross term of %d weights (e.g. %s) covers other tokens than their Hessian (training "
              "forwards without labels run no teacher): the symmetric objective for those", len(off), off[0])
    return out


def offline_cross_terms(importance, cross_alpha: float | None, reconstruct: bool,
                        names: Iterable[str]) -> dict[str, Tensor]:
    """
    `PruneConfig(cross_alpha=...)`: the cross terms of the weights `names` whose OBS sweep solves the asymmetric
    objective, from a saved importance ([`Importance.cross_terms`]), checked before any weight changes.

    Args:
        importance ([`Importance`]): the importance the plan prunes from.
        cross_alpha (`float`, *optional*): `PruneConfig.cross_alpha`; `None`: the symmetric sweep (logged when the
            importance holds a cross term that is then left unused).
        reconstruct (`bool`): whether the plan runs the OBS sweep.
        names (`Iterable[str]`): the weights the plan prunes.

    Returns:
        `dict[str, torch.Tensor]`: `C` by weight name ([`usable_cross`]); `{}` without `cross_alpha`.

    Raises:
        `ValueError`: one line, `cross_alpha` without the OBS sweep (a criterion without Hessians, or
        `reconstruct=False`) or from an importance without a cross term, saying how to get one.
    """
    if cross_alpha is None:
        if reconstruct and importance.has_cross:
            # The keyword's words; the command line's log handler names the flag (`--cross_alpha 0.25`).
            _warn("unused", "This importance holds the dense-to-pruned cross term of a PruneSchedule(cross_term=True) "
                  "run, which the OBS sweep leaves unused: it solves the symmetric objective on H~. Pass "
                  "cross_alpha=0.25 for the asymmetric one")
        return {}
    if not reconstruct:
        hessians = criteria_where(lambda cls: cls.has_hessian)
        raise ValueError(f"cross_alpha={cross_alpha:g} corrects the OBS sweep, which needs the input Hessians of "
                         f"criterion {hessians}; this importance is {importance.criterion!r}: no weight was changed")
    if not importance.has_cross:
        where = f" from {importance.path}" if importance.path else ""
        raise ValueError(f"cross_alpha={cross_alpha:g} needs the dense-to-pruned cross term, and this importance{where} "
                         "holds none: gather it during training with PruneSchedule(cross_term=True, ...) under "
                         "ImportanceCallback(ImportanceConfig(criterion='sparsegpt'), distill=DistillConfig(...)), "
                         "then prune that run's dense teacher with its importance folder (or leave "
                         "cross_alpha None); no weight was changed")
    return usable_cross(importance.cross_terms(), importance.meta.get("tokens", {}), names)


@torch.no_grad()
def sweep_flops(out_features: int, in_features: int) -> float:
    """Floating-point operations of one OBS sweep ([`obs.sparsegpt_prune_`]) of an `[out, in]` weight, about
    `in^3 + out * in^2`: factorising the `[in, in]` Hessian, then updating the weights after each pruned column."""
    return float(in_features) ** 3 + float(out_features) * float(in_features) ** 2


def refit_solver(counts: Tensor, *, in_features: int) -> tuple[str, float]:
    """The solver `refit_masked_(solver="auto")` picks for one weight and its cost in floating-point operations.

    Args:
        counts (`torch.Tensor`): `[out]` kept inputs of each row (`mask.sum(1)`).
        in_features (`int`): the weight's input dim.

    Returns:
        `tuple[str, float]`: `"exact"` (`sum k^3 / 3` over the rows, up to 2.5e11) or `"sweep"` ([`sweep_flops`]).
    """
    exact = float(counts.double().pow(3).sum()) / 3
    if exact <= _EXACT_FLOPS:
        return "exact", exact
    return "sweep", sweep_flops(counts.numel(), in_features)


def propagate_target(reference: Tensor, hessian: Tensor, cross: Tensor, *, alpha: float = 0.25,
                     percdamp: float = 0.01) -> Tensor:
    """
    The target weight whose symmetric objective on `H~` is the asymmetric one: `R + alpha R C (H~ + damp I)^-1`.

    With `alpha=1` (and no dampening), `||R' X~ - W_hat X~||^2` differs from `||R X - W_hat X~||^2` by a constant
    that does not depend on `W_hat`, so any solver of the symmetric objective on `H~` (the OBS sweep, [`refit_masked_`])
    solves the asymmetric one from `R'` (QEP, arXiv 2504.09629, eq. 6, with its propagation strength `alpha`).

    Args:
        reference (`torch.Tensor`): `[out, in]` weights `R` whose outputs on the dense inputs are the target.
        hessian (`torch.Tensor`): `[in, in]` `H~ = sum x~ x~^T` over the pruned model's inputs.
        cross (`torch.Tensor`): `[in, in]` `C = sum (x - x~) x~^T` over the same tokens (`x`: the dense model's input).
        alpha (`float`, *optional*, defaults to 0.25): share of the correction applied, in [0, 1].
        percdamp (`float`, *optional*, defaults to 0.01): dampening of `H~`, as in the sweep.

    Returns:
        `torch.Tensor`: `[out, in]` float32 on `reference`'s device; `R` itself (as float32) when `C = 0`.

    Raises:
        `ValueError`: shapes disagree, `alpha` out of [0, 1], or `H~` is degenerate.
    """
    check_pair(reference, hessian)
    _check_cross(cross, hessian)
    alpha = _check_alpha(alpha)
    R = reference.detach().to(torch.float32, copy=True)
    H, _ = dampened(hessian.to(R.device), percdamp)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(f"`hessian` is not positive definite after dampening with percdamp={percdamp}; raise it.")
    RC = R @ cross.detach().to(R.device, torch.float32)
    # R C H^-1 = (H^-1 C^T R^T)^T, H symmetric: one Cholesky solve with out right-hand sides.
    correction = torch.cholesky_solve(RC.T.contiguous(), L).T
    return R.add_(correction, alpha=alpha)


@torch.no_grad()
def refit_masked_(weight: Tensor, mask: Tensor, hessian: Tensor, *, reference: Tensor | None = None,
                  cross: Tensor | None = None, alpha: float = 0.25, percdamp: float = 0.01,
                  row_chunk: int | None = None, solver: str = "auto") -> Tensor:
    """
    Re-fit the kept weights of each row, in place, by least squares on their fixed support; no mask changes.

    Per row `i` with kept inputs `S`, `w_S = ((H + damp I)_SS)^-1 [r (H + damp I + alpha C)]_S` and `w = 0` off `S`:
    the minimiser of `||r X - w X||^2 + damp ||r - w||^2` over `w` supported on `S` (with `cross`, of the asymmetric
    `||r X - w X~||^2`, see [`propagate_target`]). The dampening is a ridge towards the reference, so a reference
    already supported on the mask is returned unchanged.

    Args:
        weight (`torch.Tensor`):
            `[out, in]` weight (or `nn.Parameter`), any floating dtype; overwritten, exactly `+0.0` where `mask` is
            `False`.
        mask (`torch.BoolTensor`):
            `[out, in]` keep-mask, `True` = keep.
        hessian (`torch.Tensor`):
            `[in, in]` sum of `x x^T` over the inputs the re-fit is for (the pruned model's inputs, `H~`).
        reference (`torch.Tensor`, *optional*):
            `[out, in]` weights whose outputs are the target (e.g. the weights with the pruning edits undone);
            defaults to `weight` as it is (its values where `mask` is `False` are then the pruned weights' values).
        cross (`torch.Tensor`, *optional*):
            `[in, in]` `sum (x - x~) x~^T` of the dense and pruned inputs of the same tokens: the asymmetric objective.
        alpha (`float`, *optional*, defaults to 0.25):
            With `cross`: share of the dense-to-pruned correction, in [0, 1] (GPTAQ / QEP use 0.25 to 0.5).
        percdamp (`float`, *optional*, defaults to 0.01):
            Dampening as a fraction of `mean(diag(H))`, as the OBS sweep.
        row_chunk (`int`, *optional*):
            Rows solved per batched Cholesky; default: as many as fit in 64 MiB of `[k, k]` float32 systems (`k`:
            the most kept inputs of a row).
        solver (`str`, *optional*, defaults to `"auto"`):
            `"exact"` solves each row's `k x k` system on its support (`sum k^3 / 3` flops over the rows: 87 GFLOP
            for SmolLM2's `down_proj` at 50%, 70 TFLOP for Phi-3-mini's); `"sweep"` runs SparseGPT's OBS sweep with
            the mask fixed ([`obs.sparsegpt_prune_`] with `mask`; `in^3 + out * in^2` flops), which spreads each pruned
            weight's error over the kept weights after it only, so it fits less closely than the exact solve.
            `"auto"` is exact up to 2.5e11 flops per weight, the sweep above.

    Returns:
        `torch.Tensor`: `weight`.

    Raises:
        `ValueError`: shapes or arguments are wrong, the reference or Hessian is not finite, or a row's system is not
        positive definite; raised before `weight` is touched.
    """
    check_pair(weight, hessian)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"`mask` must be a bool keep-mask of the weight's shape {tuple(weight.shape)}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}.")
    if reference is not None and (not isinstance(reference, Tensor) or reference.shape != weight.shape):
        raise ValueError(f"`reference` must have the weight's shape {tuple(weight.shape)}, got "
                         f"{tuple(getattr(reference, 'shape', ()))}.")
    _check_cross(cross, hessian)
    alpha = _check_alpha(alpha)
    if solver not in ("auto", "exact", "sweep"):
        raise ValueError(f"`solver` must be 'auto', 'exact' or 'sweep', got {solver!r}.")
    if row_chunk is not None and (isinstance(row_chunk, bool) or not isinstance(row_chunk, int) or row_chunk < 1):
        raise ValueError(f"`row_chunk` must be a positive int, got {row_chunk!r}.")
    device = weight.device
    R = (weight if reference is None else reference).detach().to(device, torch.float32, copy=True)
    if not bool(torch.isfinite(R).all()):
        raise ValueError("The reference weights contain NaN or Inf; refusing to re-fit from them.")
    H, dead = dampened(hessian.to(device), percdamp)
    keep = mask.to(device) & ~dead[None, :]  # dead inputs carry no signal: their weights are zeroed, as the sweep does
    counts = keep.sum(1)
    if solver == "auto":
        solver = refit_solver(counts, in_features=keep.shape[1])[0]
    if solver == "sweep":
        out = R if cross is None or not alpha else propagate_target(R, hessian, cross, alpha=alpha, percdamp=percdamp)
        sparsegpt_prune_(out, hessian.to(device), mask=keep, percdamp=percdamp)
    else:
        B = R @ H  # right-hand sides, [rows, in]
        if cross is not None and alpha:
            B.addmm_(R, cross.detach().to(device, torch.float32), alpha=alpha)
        out = _solve_on_supports(H, B, keep, counts, row_chunk, percdamp)
    out.masked_fill_(~keep, 0.0)  # exact +0.0 after the cast back
    weight.detach().copy_(out)
    return weight


@torch.no_grad()
def asymmetric_sparsegpt_prune_(weight: Tensor, hessian: Tensor, cross: Tensor | None = None, *, alpha: float = 0.25,
                                percdamp: float = 0.01, **kwargs) -> Tensor:
    """
    SparseGPT's OBS sweep on the pruned model's Hessian `H~` for the asymmetric objective `||W X - W_hat X~||^2`
    (GPTAQ, arXiv 2504.02692; QEP, arXiv 2504.09629): the weight is first moved to the propagated target
    [`propagate_target`], then swept with `H~` ([`obs.sparsegpt_prune_`]). Without `cross` (or with `C = 0`, dense and
    pruned inputs equal) it is exactly the plain sweep.

    Args:
        weight (`torch.Tensor`): `[out, in]` weight; overwritten.
        hessian (`torch.Tensor`): `[in, in]` `H~`.
        cross (`torch.Tensor`, *optional*): `[in, in]` `sum (x - x~) x~^T`.
        alpha (`float`, *optional*, defaults to 0.25): share of the correction, in [0, 1].
        percdamp (`float`, *optional*, defaults to 0.01): the sweep's dampening.
        **kwargs: the sweep's mask arguments (`sparsity`, `nm`, `scope`, `blocksize`, `previous`, `nm_sparsity`).

    Returns:
        `torch.BoolTensor`: the keep-mask, as [`obs.sparsegpt_prune_`].

    Raises:
        `ValueError`: as [`propagate_target`] and [`obs.sparsegpt_prune_`]; before `weight` is touched.
    """
    if cross is None:
        return sparsegpt_prune_(weight, hessian, percdamp=percdamp, **kwargs)
    target = propagate_target(weight, hessian, cross, alpha=alpha, percdamp=percdamp)
    # Sweep a copy, so a refusal of the mask arguments leaves `weight` untouched.
    keep = sparsegpt_prune_(target, hessian, percdamp=percdamp, **kwargs)
    weight.detach().copy_(target)
    return keep
