from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

from .base import Scorer, accumulate_, register_scorer


def hessian_sum(x: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """
    `X^T X` over the real tokens of a Linear's input: the per-step increment of SparseGPT's Hessian.

    Args:
        x (`torch.Tensor`):
            Input of the Linear, `[..., in_features]`, any floating dtype (bfloat16 is summed in float32).
        token_mask (`torch.BoolTensor`, *optional*, defaults to `None`):
            `x.shape[:-1]`, `True` = real token; padded tokens are left out. `None` counts every token.

    Returns:
        `torch.Tensor`: `[in_features, in_features]` float32 on `x`'s device, `sum_t x_t x_t^T`. Its diagonal is
        wanda's per-channel sum of squares. Cost: `2 * tokens * in^2` FLOPs, about a forward pass through a square
        `in x in` Linear.

    Raises:
        `ValueError`: `x` is not a floating tensor with an input dim, or `token_mask` is not a bool tensor shaped
        `x.shape[:-1]`.
    """
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"`x` must be a floating [..., in_features] tensor, got {getattr(x, 'shape', type(x))}.")
    x = x.detach()
    if token_mask is not None:
        if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool or token_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"`token_mask` must be a bool tensor shaped like `x` without its last dim {tuple(x.shape[:-1])}, got "
                f"{getattr(token_mask, 'dtype', type(token_mask).__name__)} {tuple(getattr(token_mask, 'shape', ()))}."
            )
        x = x[token_mask.to(x.device)]  # the real rows only: padding costs neither FLOPs nor a multiply by zero
    x = x.reshape(-1, x.shape[-1])
    n = x.shape[1]
    with torch.autocast(x.device.type, enabled=False):
        if x.dtype == torch.float32:
            return torch.mm(x.T, x)
        if x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16):
            # 16-bit inputs straight into a float32-accumulating product: each product of two 16-bit values is exact
            # in float32, so this equals the float32 product of the upcast inputs up to summation order, at tensor-
            # core speed (the float32 path ran ~10x slower per step at Phi-3-mini size on an H200).
            try:
                return torch.mm(x.T, x, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):  # torch without `mm(..., out_dtype=)`
                pass
        # Other dtypes: float32 copies of row blocks through one reused buffer, accumulated in place, so neither a
        # full float32 copy of `x` nor a low-precision sum is ever made.
        out = torch.zeros(n, n, dtype=torch.float32, device=x.device)
        # Small blocks stay in a CPU's cache; an accelerator wants few, large matmuls instead.
        rows = max(1, (_BLOCK if x.device.type == "cpu" else _DEVICE_BLOCK) // max(n, 1))
        buf = torch.empty(min(rows, x.shape[0]), n, dtype=torch.float32, device=x.device)
        for block in x.split(rows):
            b = buf[: block.shape[0]].copy_(block)
            out.addmm_(b.T, b)
        return out


_BLOCK = 1 << 20  # elements per float32 row block on CPU: a 4 MiB buffer
_DEVICE_BLOCK = 1 << 24  # on an accelerator: 64 MiB


def check_pair(weight: Tensor, hessian: Tensor) -> None:
    """
    Check a weight and its input Hessian before an OBS computation (saliency, sweep, reconstruction error).

    Args:
        weight (`torch.Tensor`): `[out_features, in_features]`, floating.
        hessian (`torch.Tensor`): `[in_features, in_features]`, floating.

    Raises:
        `ValueError`: naming the argument whose type or shape is wrong.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"`weight` must be a floating [out_features, in_features] tensor, got "
            f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}."
        )
    cols = weight.shape[1]
    if not isinstance(hessian, Tensor) or tuple(hessian.shape) != (cols, cols) or not hessian.is_floating_point():
        raise ValueError(
            f"`hessian` must be a floating [in_features, in_features] = [{cols}, {cols}] tensor for a weight of shape "
            f"{tuple(weight.shape)}, got "
            f"{tuple(hessian.shape) if isinstance(hessian, Tensor) else type(hessian).__name__}."
        )


def _check_percdamp(percdamp) -> float:
    if isinstance(percdamp, bool) or not isinstance(percdamp, Real) or not 0.0 <= float(percdamp) <= 1.0:
        raise ValueError(f"`percdamp` must be a float in [0.0, 1.0] (the paper uses 0.01), got {percdamp!r}.")
    return float(percdamp)


def dampened_hessian(hessian: Tensor, *, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """
    `H + percdamp * mean(diag(H)) I` in float32, with `H_jj = 1` on inputs that never fired: what the OBS sweep and
    the re-fit factorise (SparseGPT's dampening, arXiv 2301.00774).

    Args:
        hessian (`torch.Tensor`): `[in, in]` sum of `x x^T` over tokens, any floating dtype; not modified.
        percdamp (`float`, *optional*, defaults to 0.01): dampening as a fraction of the mean diagonal.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the dampened `[in, in]` float32 copy, and `dead` (`[in]` bool, `True`
        where `H_jj == 0`).

    Raises:
        `ValueError`: `percdamp` out of range, or `hessian` not finite or all zero on its diagonal.
    """
    percdamp = _check_percdamp(percdamp)
    H = hessian.detach().to(torch.float32, copy=True)
    if not bool(torch.isfinite(H).all()):
        raise ValueError("`hessian` contains NaN or Inf; accumulate it from finite activations.")
    diag = H.diagonal()
    dead = diag == 0
    if bool(dead.all()):
        raise ValueError("`hessian` is all zero on its diagonal: no tokens reached this Linear; train on some first.")
    diag[dead] = 1.0
    diag.add_(percdamp * diag.mean())
    return H, dead


def inverse_hessian_cholesky(hessian: Tensor, *, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """
    Upper Cholesky factor of the dampened inverse Hessian, as SparseGPT's sweep uses it.

    Inputs that never fired (`H_jj == 0`) get `H_jj = 1`, so the matrix stays invertible; the caller zeroes their
    weight columns. Then `percdamp * mean(diag(H))` is added to the diagonal (dampening, the paper's 1%), and
    `U = cholesky((H + damp I)^-1, upper=True)`.

    Args:
        hessian (`torch.Tensor`):
            `[in, in]` sum of `x x^T` over tokens, any floating dtype; not modified.
        percdamp (`float`, *optional*, defaults to 0.01):
            Dampening as a fraction of the mean diagonal.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `U`, `[in, in]` float32 upper triangular on `hessian`'s device, with
        `U_jj^2 = [((H + damp I)_{j:, j:})^-1]_jj`; and `dead`, `[in]` bool, `True` where `H_jj == 0`.

    Raises:
        `ValueError`: `hessian` is not square, not finite, all zero, or not positive definite after dampening.
    """
    percdamp = _check_percdamp(percdamp)
    if not isinstance(hessian, Tensor) or hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"`hessian` must be a square [in, in] tensor, got {getattr(hessian, 'shape', hessian)!r}.")
    H, dead = dampened_hessian(hessian, percdamp=percdamp)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(
            f"`hessian` is not positive definite after dampening with percdamp={percdamp}; raise `percdamp`."
        )
    H = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(H, upper=True)
    if int(info) != 0:
        raise ValueError(f"The inverse of `hessian` is not positive definite with percdamp={percdamp}; raise it.")
    return U, dead


def obs_saliency(weight: Tensor, hessian: Tensor, *, percdamp: float = 0.01) -> Tensor:
    """
    SparseGPT's pruning score `w_ij^2 / U_jj^2`, the OBS saliency of each weight before any update.

    `U` is the upper Cholesky factor of the dampened `H^-1` ([`inverse_hessian_cholesky`]), which the paper writes
    `[H^-1]_jj`: `U_jj^2 = [((H + damp I)_{j:, j:})^-1]_jj`, so the score is the OBS error `w^2 / [H_F^-1]_jj` of
    removing `w_ij` alone while the columns `F = j..in-1` compensate. It is exactly what [`sparsegpt_prune_`]
    compares in its first block; later blocks use the same `U_jj` with the updated weights.

    Args:
        weight (`torch.Tensor`):
            `[out, in]` weight, any floating dtype.
        hessian (`torch.Tensor`):
            `[in, in]` sum (or mean) of `x x^T` over tokens; a common scale of `H` scales every score alike.
        percdamp (`float`, *optional*, defaults to 0.01):
            Dampening as a fraction of the mean diagonal, as in the sweep.

    Returns:
        `torch.Tensor`: `[out, in]` float32 on `weight`'s device, >= 0; 0 on dead inputs (`H_jj == 0`).

    Raises:
        `ValueError`: shapes disagree, or `hessian` is invalid (see [`inverse_hessian_cholesky`]).
    """
    check_pair(weight, hessian)
    U, dead = inverse_hessian_cholesky(hessian.to(weight.device), percdamp=percdamp)
    d = U.diagonal()
    score = weight.detach().to(torch.float32, copy=True).square_().div_(d.square()[None, :])
    score[:, dead] = 0.0
    return score



@register_scorer
class SparseGPT(Scorer):
    """
    SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774) from training statistics: OBS saliency
    `w_ij^2 / [H^-1]_jj^2` with `H = sum over real tokens of x x^T`.

    The state is the Hessian of each Linear input, `[in, in]` float32, accumulated by forward hooks during training
    (no calibration pass); q/k/v (and gate/up) share one input, whose `X^T X` is computed once per forward and
    added to each of their states. Pruning with this importance runs
    the OBS sweep [`hf_weightprune.obs.sparsegpt_prune_`], which also updates the kept weights. [`score`] is the
    sweep's first-block criterion for consumers that only need one number per weight (global thresholds, plots):
    `[H^-1]_jj` there is the diagonal `U_jj` of the upper Cholesky factor of `(H/tokens + damp I)^-1`, with
    `damp = percdamp * mean(diag(H/tokens))` as in the sweep, i.e. `U_jj^2 = [((H/tokens + damp I)_{j:,j:})^-1]_jj`.
    `diag(H)` is wanda's state, so [`wanda_score`] gives wanda's score from the same buffer.

    With `weighting="step"` (`ImportanceConfig(criterion="sparsegpt", weighting="step")`) the sample of step `t`
    (all the forwards of that optimizer step, gradient accumulation included) is multiplied by `t`, as arXiv
    2502.17071 weighs magnitudes (`sum_t t*|w(t)| / sum_t t`, criterion `temporal_magnitude`): the state is
    `H = sum_t t * X_t^T X_t`, so the later activations, those of the weights being pruned, count more. `t` is the
    global step of the sample (the one `temporal_magnitude` uses, also with `every_n_steps` and `window`), so a
    resumed run continues the same sum. The OBS sweep is invariant to a common scale of `H` (its dampening
    `percdamp * mean(diag(H))` scales with it; only the `H_jj = 1` put on never-fired inputs does not), so it prunes
    with the `t`-weighted mean of `x x^T`. `meta["tokens"]` still counts real tokens, unweighted; the scores divide
    by `tokens * weight_sum / num_samples` (tokens times the mean `t`, [`token_scale`]) instead of `tokens`, the
    weighted mean per token exactly when every sample has the same number of real tokens. Under DDP every rank
    weighs its sums by the same `t`, so their sum is `sum_t t * X_t^T X_t` over all ranks' tokens.

    Args:
        percdamp (`float`, *optional*, defaults to 0.01):
            Dampening of `diag(H)` as a fraction of its mean (the paper's 1%).
        weighting (`str`, *optional*, defaults to `"uniform"`):
            `"uniform"` (`H = sum x x^T`, the paper's) or `"step"` (`H = sum_t t X_t^T X_t`).

    Raises:
        `ValueError`: `weighting` is neither `"uniform"` nor `"step"`.
    """

    name = "sparsegpt"
    source = "activations"
    formula = "w_ij^2 / [H^-1]_jj^2, H = sum_tokens x x^T"
    paper = "arXiv:2301.00774"
    weightings = ("uniform", "step")
    default_scope = "layer"  # the OBS sweep prunes a fixed fraction of each layer
    has_hessian = True
    raw_label = "input Hessian entries"

    def __init__(self, percdamp: float = 0.01, *, weighting: str = "uniform"):
        super().__init__(weighting=weighting)
        self.percdamp = percdamp

    def state_shape(self, weight):
        return torch.Size([weight.shape[-1], weight.shape[-1]])

    def statistic(self, x: Tensor, token_mask: Tensor | None) -> Tensor:
        """One forward's contribution: `X^T X` over the real tokens, `[in, in]` float32."""
        return hessian_sum(x, token_mask)

    def update_(self, states, weights, grads, t, generator=None):
        # `weights` are one step's `hessian_sum`s here (the hooks collect them, as for wanda).
        states, sums = list(states), list(weights)
        alpha = float(t) if self.weighting == "step" else 1.0
        if all(s.dtype == torch.float32 for s in states):
            if alpha == 1.0:
                torch._foreach_add_(states, sums)
            else:
                torch._foreach_add_(states, sums, alpha=alpha)
        else:
            for state, h in zip(states, sums):
                accumulate_(state, h, alpha, generator=generator)

    def _check(self, weight, tokens):
        if weight is None:
            raise ValueError("sparsegpt scores need the weights: call `importance.bind(model)` or pass the model")
        if tokens <= 0:
            raise ValueError("sparsegpt importance has seen no training tokens yet")

    def score(self, state, *, weight=None, num_samples=0, weight_sum=0.0, tokens=0):
        """
        OBS saliency `w_ij^2 / U_jj^2` of each weight ([`hf_weightprune.obs.obs_saliency`]) with `H / tokens`
        (`H / (tokens * mean t)` with `weighting="step"`, see [`token_scale`]).

        Returns:
            `torch.Tensor`: shaped like `weight`, float32 on its device, >= 0: the increase of the mean squared
            output error per token when `w_ij` alone is pruned and the later input columns compensate.

        Raises:
            `ValueError`: `weight` is missing (call `importance.bind(model)`), no tokens were seen, or the state
            is degenerate.
        """
        self._check(weight, tokens)
        scale = self.token_scale(tokens=tokens, num_samples=num_samples, weight_sum=weight_sum)
        # The saliency is linear in the scale of H (U_jj^2 scales as 1/c), so divide the result, not a copy of H.
        return obs_saliency(weight, state, percdamp=self.percdamp).div_(scale)

    def wanda_score(self, state, *, weight=None, tokens=0, num_samples=0, weight_sum=0.0, **_):
        """
        Wanda's `|W_ij| * ||x_j||_2` from the Hessian's diagonal (`||x_j||` as the root-mean over tokens, as wanda's
        scorer), for when the OBS sweep is not wanted or `H` is degenerate.

        Returns:
            `torch.Tensor`: shaped like `weight`, float32 on its device.

        Raises:
            `ValueError`: `weight` is missing or no tokens were seen.
        """
        self._check(weight, tokens)
        norm = self.input_norms(state, tokens=tokens, num_samples=num_samples, weight_sum=weight_sum)
        return weight.detach().float().abs() * norm.to(weight.device)[None, :]

    def input_norms(self, state, *, tokens, num_samples=0, weight_sum=0.0):
        """`||x_j||` from `diag(H)`, wanda's sums of squares, over `token_scale` (tokens times the mean `t` with
        `weighting="step"`, so a step-weighted `H` gives the same per-token norms)."""
        return self._root_mean(state.diagonal(), tokens=tokens, num_samples=num_samples, weight_sum=weight_sum)
