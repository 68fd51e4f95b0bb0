"""SparseGPT's Optimal Brain Surgeon column sweep, fed by a Hessian accumulated during training.

SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774) prunes a Linear `y = W x` one layer at a time so that the
output on the layer's inputs changes as little as possible: it minimises `||W X - W_hat X||_F^2`, whose Hessian in
each row of `W` is `H = X^T X` (`X`: the `[tokens, in]` inputs). The paper gathers `H` in a calibration pass; here the
training loop already sees the inputs, so `H = sum over real tokens of x x^T` is accumulated during fine-tuning
([`hf_weightprune.scorers.sparsegpt.hessian_sum`]) and no calibration pass is needed.

The sweep ([`sparsegpt_prune_`]) walks the input columns left to right. When column `j` is pruned, the OBS update
spreads its error over the columns not yet visited, using the inverse Hessian of those columns; the upper Cholesky
factor `U` of `H^-1` holds exactly those rows (`U_jj^2 = [(H_{j:, j:})^-1]_jj`), so one factorisation serves the
whole sweep. Columns are processed in blocks of `blocksize`: the mask of a block is chosen from `w^2 / U_jj^2` when
the sweep reaches it (the paper's adaptive mask selection), and the updates of later blocks are batched into one
matrix product per block (the paper's lazy batch updates).

Memory. `H` is `[in, in]` float32, `4 * in^2` bytes, kept per tracked weight: q/k/v (and gate/up) share one input,
whose `X^T X` is computed once per forward, but each keeps its own copy. A Llama decoder layer holds six `hidden^2`
Hessians (q, k, v, o, gate, up) and one `intermediate^2` (down); Phi-3's fused `qkv_proj` / `gate_up_proj` make it
three and one:

| Model | hidden | intermediate | layers | per layer | whole model |
|---|---|---|---|---|---|
| SmolLM2-135M (Llama) | 576 | 1536 | 30 | 6 x 1.27 MiB + 9.0 MiB = 16.6 MiB | 498 MiB (1.0x its float32 weights) |
| Phi-3-mini (3.8B) | 3072 | 8192 | 32 | 3 x 36 MiB + 256 MiB = 364 MiB | 11.4 GiB (1.5x its bfloat16 weights) |

The sweep of one Linear needs about three more `[in, in]` float32 matrices (the dampened copy, its Cholesky factor and
inverse) and a float32 copy of the weight: 0.8 GiB for Phi-3-mini's down_proj.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real

import torch
from torch import Tensor

# The saliency and the factorisation are the `sparsegpt` criterion's math (its score); the sweep builds on them.
from ..scorers.sparsegpt import check_pair, inverse_hessian_cholesky, obs_saliency
from ..validation import parse_nm
from .masks import num_to_prune

__all__ = ["check_hessians", "inverse_hessian_cholesky", "obs_saliency",
           "sparsegpt_prune_"]


def check_hessians(hessians: Iterable[tuple[str, Tensor]], *, percdamp: float = 0.01,
                   device: torch.device | str | None = None) -> None:
    """
    Factorise every Hessian an OBS prune is about to use, before any weight is edited: a Hessian that cannot be
    factorised (too few or too similar tokens, llm-compressor#1069, AutoGPTQ#572) then stops the prune with the
    weight's name, and no tensor before it is left pruned or updated.

    Costs one extra factorisation per weight (the sweep's own cost is `O(in^2 * out)`); only one Hessian is held at a
    time.

    Args:
        hessians (`Iterable[tuple[str, torch.Tensor]]`):
            `(weight name, [in, in] Hessian)` pairs; an iterator keeps one in memory at a time.
        percdamp (`float`, *optional*, defaults to 0.01):
            The dampening the sweep will use (`PruneConfig.dampening`).
        device (`torch.device` or `str`, *optional*):
            Where to factorise (the weights' device); `None`: where each Hessian is.

    Raises:
        `ValueError`: one line naming the first weight whose Hessian is not finite, all zero or not positive definite
        after dampening, with the fix (more dampening, more tokens, or leaving that weight out).
    """
    for name, hessian in hessians:
        try:
            inverse_hessian_cholesky(hessian if device is None else hessian.to(device), percdamp=percdamp)
        except ValueError as e:
            reason = str(e).split(";")[0].replace("`hessian`", "its input Hessian").rstrip(".")
            raise ValueError(f"{name}: {reason}; no weight was changed. Fix: raise dampening (PruneConfig / PruneSchedule "
                             f"dampening, now {percdamp:g}; --dampening), accumulate the Hessian over more tokens, or "
                             "exclude this weight (exclude_modules)") from None


def _lowest_k(scores: Tensor, k: int | Tensor) -> Tensor:
    """Keep-mask pruning the `k` lowest entries of every row of a 2D tensor, lower index first on ties; `k` is an int
    or a `[rows]` int tensor (a count per row)."""
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if isinstance(k, Tensor):
        order = torch.argsort(scores, dim=1, stable=True)
        pruned = torch.arange(scores.shape[1], device=scores.device)[None, :] < k.to(scores.device)[:, None]
        keep.scatter_(1, order, ~pruned)
    elif k > 0:
        keep.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], False)
    return keep


def _check_prune_args(weight, sparsity, nm, scope, blocksize, nm_sparsity=None):
    if (sparsity is None) == (nm is None):
        raise ValueError("Pass exactly one of `sparsity` (unstructured) and `nm` (e.g. '2:4').")
    if nm_sparsity is not None and nm is None:
        raise ValueError("`nm_sparsity` is a gradual step towards an N:M pattern: pass it with `nm`, not `sparsity`.")
    if nm is not None:
        if isinstance(nm, str):
            n, m = parse_nm(nm)
        elif isinstance(nm, (tuple, list)) and len(nm) == 2 and all(type(v) is int for v in nm):
            n, m = parse_nm(f"{nm[0]}:{nm[1]}")
        else:
            raise ValueError(f"`nm` must be a string like '2:4' or a pair (n, m), got {nm!r}.")
        if weight.shape[1] % m:
            raise ValueError(f"N:M needs in_features divisible by m={m}, got weight shape {tuple(weight.shape)}.")
        if blocksize % m:
            raise ValueError(f"`blocksize` must be a multiple of m={m} so no N:M group straddles two blocks.")
        if nm_sparsity is not None and (isinstance(nm_sparsity, bool) or not isinstance(nm_sparsity, Real)
                                        or not 0.0 <= float(nm_sparsity) <= 1.0 - n / m + 1e-9):
            raise ValueError(f"`nm_sparsity` must be a float in [0.0, {1.0 - n / m:g}] (at most what {n}:{m} prunes), "
                             f"got {nm_sparsity!r}.")
        return None, (n, m)
    if isinstance(sparsity, bool) or not isinstance(sparsity, Real) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"`sparsity` must be a float in [0.0, 1.0), got {sparsity!r}.")
    if scope not in ("row", "layer"):
        raise ValueError(f"`scope` must be 'row' or 'layer', got {scope!r}.")
    return float(sparsity), None


def _check_previous(previous, weight, total, scope, nm) -> Tensor | None:
    """The forced prunes (`~previous`, `[out, in]` bool on the weight's device), checked against the target counts."""
    if previous is None:
        return None
    if not isinstance(previous, Tensor) or previous.dtype != torch.bool or previous.shape != weight.shape:
        raise ValueError(f"`previous` must be a bool keep-mask of the weight's shape {tuple(weight.shape)}, got "
                         f"{getattr(previous, 'dtype', type(previous).__name__)} {tuple(getattr(previous, 'shape', ()))}.")
    forced = ~previous.to(weight.device)
    if nm is not None and int(forced.reshape(-1, nm[1]).sum(1).max()) > nm[1] - nm[0]:
        raise ValueError(f"`previous` prunes more than {nm[1] - nm[0]} of some group of {nm[1]}: it is not a step "
                         f"towards N:M {nm[0]}:{nm[1]}.")
    if total is not None:
        count = int(forced.sum(1).max()) if scope == "row" else int(forced.sum())
        if count > total:
            raise ValueError(f"`previous` already prunes {count} weights {'in a row' if scope == 'row' else ''}, more "
                             f"than the {total} this `sparsity` prunes: masks only shrink, raise the sparsity.")
    return forced


@torch.no_grad()
def sparsegpt_prune_(
    weight: Tensor,
    hessian: Tensor,
    *,
    sparsity: float | None = None,
    nm: str | tuple[int, int] | None = None,
    scope: str = "row",
    blocksize: int = 128,
    percdamp: float = 0.01,
    previous: Tensor | None = None,
    nm_sparsity: float | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """
    Prune a Linear weight in place with SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): choose the mask
    block by block from `w^2 / U_jj^2` and update the kept weights so the layer's output on the inputs summarised by
    `hessian` changes as little as possible (OBS reconstruction).

    Unstructured pruning prunes an exact count: `round(sparsity * in)` per row (`scope="row"`) or
    `round(sparsity * out * in)` in the tensor (`scope="layer"`), spread over the blocks in proportion to their width
    (the paper's per-block threshold, with exact integer counts: block `[a, b)` prunes `k*b//in - k*a//in`). Within a
    block, `"layer"` compares the whole block and `"row"` each row's part of it. N:M keeps the `n` largest scores of
    each group of `m` consecutive inputs, chosen when the sweep reaches the group. Ties prune the lower index first.

    Gradual pruning (a [`PruneSchedule`] mask update) passes `previous`: the weights it prunes are pruned again here
    (they rank lowest, so masks only shrink) and count towards the target; a block then prunes at least its forced
    weights and never so many that the forced weights of later blocks would exceed the total, so the count stays
    exact. With `nm_sparsity`, a step towards N:M prunes `round(nm_sparsity * out * in)` weights of the tensor, at
    most `m - n` per group (the lowest of each group's `m - n` lowest scores, per block), as
    [`~masks.nm_capped_mask`] does without reconstruction.

    With `mask` instead of a target, the mask is fixed and the sweep only reconstructs: each pruned weight's error is
    spread over the kept weights of the columns after it (the large-layer solver of [`~refit.refit_masked_`]).

    Args:
        weight (`torch.Tensor`):
            `[out, in]` weight (or `nn.Parameter`), any floating dtype, on CPU or an accelerator; overwritten.
        hessian (`torch.Tensor`):
            `[in, in]` sum of `x x^T` over the layer's real input tokens (its scale does not matter); not modified.
        sparsity (`float`, *optional*):
            Fraction to prune, in `[0.0, 1.0)`, for unstructured pruning. Exactly one of `sparsity` and `nm`.
        nm (`str` or `tuple[int, int]`, *optional*):
            N:M pattern, `"2:4"` or `(2, 4)`: keep `n` of every `m` consecutive inputs.
        scope (`str`, *optional*, defaults to `"row"`):
            Comparison group of unstructured pruning: `"row"` (same count per output row) or `"layer"`.
        blocksize (`int`, *optional*, defaults to 128):
            Columns per mask-selection and lazy-update block; a multiple of `m` for N:M.
        percdamp (`float`, *optional*, defaults to 0.01):
            Dampening added to `diag(H)`, as a fraction of its mean.
        previous (`torch.BoolTensor`, *optional*):
            Keep-mask shaped like `weight` (`True` = keep) of an earlier pruning: its `False` weights are pruned
            whatever their saliency. It must prune no more than the target (per row for `scope="row"`, at most
            `m - n` per N:M group).
        nm_sparsity (`float`, *optional*):
            With `nm` only: prune this fraction of the tensor, in `[0, 1 - n/m]`, at most `m - n` per group,
            instead of exactly N:M.
        mask (`torch.BoolTensor`, *optional*):
            A fixed keep-mask shaped like `weight` (`True` = keep), instead of `sparsity` / `nm`: no mask selection.

    Returns:
        `torch.BoolTensor`: keep-mask shaped like `weight`, on its device, `True` = keep. `weight` is exactly `+0.0`
        where the mask is `False`; weight columns of dead inputs (`H_jj == 0`) are zero as in the paper (but kept in
        the mask, which prunes exactly the target count).

    Raises:
        `ValueError`: bad shapes or arguments, a `previous` that prunes more than the target, or a non-finite or
        degenerate `hessian`; raised before `weight` is touched.

    The sweep runs in float32 whatever the weight dtype (the result is rounded back once at the end).
    """
    check_pair(weight, hessian)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"`blocksize` must be a positive int, got {blocksize!r}.")
    if mask is not None:
        if sparsity is not None or nm is not None or previous is not None:
            raise ValueError("`mask` fixes the mask: pass it without `sparsity`, `nm` or `previous`.")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
            raise ValueError(f"`mask` must be a bool keep-mask of the weight's shape {tuple(weight.shape)}, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}.")
        fixed = mask.to(weight.device)
    else:
        fixed = None
        sparsity, nm = _check_prune_args(weight, sparsity, nm, scope, blocksize, nm_sparsity)
    rows, cols = weight.shape
    total = None  # prune count per row ("row") or in the whole tensor ("layer", capped N:M)
    if sparsity is not None:
        total = num_to_prune(cols if scope == "row" else rows * cols, sparsity)
    elif nm_sparsity is not None:
        scope = "layer"
        total = min(num_to_prune(rows * cols, float(nm_sparsity)), rows * cols // nm[1] * (nm[1] - nm[0]))
    forced = _check_previous(previous, weight, total, scope, nm)
    W = weight.detach().to(torch.float32, copy=True)
    if not bool(torch.isfinite(W).all()):
        raise ValueError("`weight` contains NaN or Inf; refusing to prune it.")
    U, dead = inverse_hessian_cholesky(hessian.to(W.device), percdamp=percdamp)
    W[:, dead] = 0.0
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device) if fixed is None else fixed.clone()
    if total is not None:
        # Counts per row ([rows]) or for the tensor ([1]): pruned so far, and forced prunes in blocks not yet reached.
        done = torch.zeros(rows if scope == "row" else 1, dtype=torch.long, device=W.device)
        later = torch.zeros_like(done)
        if forced is not None:
            later += forced.sum(1) if scope == "row" else forced.sum()
    for a in range(0, cols, blocksize):
        b = min(a + blocksize, cols)
        # Contiguous copies: the column loop reads and writes them `b - a` times.
        W1, U1, keep1 = W[:, a:b].clone(), U[a:b, a:b], keep[:, a:b].clone()
        forced1 = forced[:, a:b] if forced is not None else None
        d = U1.diagonal()
        if total is not None:
            scores = W1.square() / d.square()
            own = torch.zeros_like(done)
            if forced1 is not None:
                scores.masked_fill_(forced1, -math.inf)
                own += forced1.sum(1) if scope == "row" else forced1.sum()
                later -= own
            if nm is not None:  # a step towards N:M: only the m - n lowest of each group are candidates
                grouped = scores.view(rows, -1, nm[1])
                rank = torch.argsort(torch.argsort(grouped, dim=2, stable=True), dim=2)
                scores = grouped.masked_fill(rank >= nm[1] - nm[0], math.inf).view(rows, b - a)
            # The block's share of the total (k*b//cols cumulated), but at least its forced prunes and at most what
            # leaves room for the forced prunes of later blocks: the count stays exact.
            k = torch.maximum(own, torch.minimum(total * b // cols - done, total - done - later))
            done += k
            if scope == "row":
                keep1.copy_(_lowest_k(scores, k))
            else:
                keep1.copy_(_lowest_k(scores.reshape(1, -1), k).view(rows, b - a))
        err = torch.zeros(rows, b - a, dtype=torch.float32, device=W.device)
        for i in range(b - a):
            if nm is not None and total is None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                scores = W1[:, group].square() / d[group].square()
                if forced1 is not None:
                    scores.masked_fill_(forced1[:, group], -math.inf)
                keep1[:, group] = _lowest_k(scores, nm[1] - nm[0])
            w = W1[:, i]
            q = w.masked_fill(~keep1[:, i], 0.0)
            e = (w - q).div_(d[i])
            err[:, i] = e
            # OBS update of this block's remaining columns; the column itself becomes exactly q.
            W1[:, i:].addr_(e, U1[i, i:], alpha=-1.0)
            W1[:, i] = q
        W[:, a:b] = W1
        keep[:, a:b] = keep1
        if b < cols:
            W[:, b:].addmm_(err, U[a:b, b:], alpha=-1.0)  # lazy batch update of all later blocks
    W.masked_fill_(~keep, 0.0)  # exact +0.0, even after the cast back
    weight.detach().copy_(W)
    return keep
