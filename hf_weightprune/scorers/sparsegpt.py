from __future__ import annotations

import torch
from torch import Tensor

from ..obs import obs_saliency
from . import register_scorer
from .base import Scorer, accumulate_


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


@register_scorer
class SparseGPT(Scorer):
    """
    SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774) from training statistics: OBS saliency
    `w_ij^2 / [H^-1]_jj^2` with `H = sum over real tokens of x x^T`.

    The state is the Hessian of each Linear input, `[in, in]` float32, accumulated by forward hooks during training
    (no calibration pass); q/k/v (and gate/up) share one input and so one state. Pruning with this importance runs
    the OBS sweep [`hf_weightprune.obs.sparsegpt_prune_`], which also updates the kept weights. [`score`] is the
    sweep's first-block criterion for consumers that only need one number per weight (global thresholds, plots):
    `[H^-1]_jj` there is the diagonal `U_jj` of the upper Cholesky factor of `(H/tokens + damp I)^-1`, with
    `damp = percdamp * mean(diag(H/tokens))` as in the sweep, i.e. `U_jj^2 = [((H/tokens + damp I)_{j:,j:})^-1]_jj`.
    `diag(H)` is wanda's state, so [`wanda_score`] gives wanda's score from the same buffer.

    Args:
        percdamp (`float`, *optional*, defaults to 0.01):
            Dampening of `diag(H)` as a fraction of its mean (the paper's 1%).
    """

    name = "sparsegpt"
    source = "activations"
    formula = "w_ij^2 / [H^-1]_jj^2, H = sum_tokens x x^T"
    paper = "arXiv:2301.00774"

    def __init__(self, percdamp: float = 0.01):
        self.percdamp = percdamp

    def state_shape(self, weight):
        return torch.Size([weight.shape[-1], weight.shape[-1]])

    def statistic(self, x: Tensor, token_mask: Tensor | None) -> Tensor:
        """One forward's contribution: `X^T X` over the real tokens, `[in, in]` float32."""
        return hessian_sum(x, token_mask)

    def update_(self, states, weights, grads, t, generator=None):
        # `weights` are one step's `hessian_sum`s here (the hooks collect them, as for wanda).
        states, sums = list(states), list(weights)
        if all(s.dtype == torch.float32 for s in states):
            torch._foreach_add_(states, sums)
        else:
            for state, h in zip(states, sums):
                accumulate_(state, h, generator=generator)

    def _check(self, weight, tokens):
        if weight is None:
            raise ValueError("sparsegpt scores need the weights: call `importance.bind(model)` or pass the model")
        if tokens <= 0:
            raise ValueError("sparsegpt importance has seen no training tokens yet")

    def score(self, state, *, weight=None, num_samples=0, weight_sum=0.0, tokens=0):
        """
        OBS saliency `w_ij^2 / U_jj^2` of each weight ([`hf_weightprune.obs.obs_saliency`]) with `H / tokens`.

        Returns:
            `torch.Tensor`: shaped like `weight`, float32 on its device, >= 0: the increase of the mean squared
            output error per token when `w_ij` alone is pruned and the later input columns compensate.

        Raises:
            `ValueError`: `weight` is missing (call `importance.bind(model)`), no tokens were seen, or the state
            is degenerate.
        """
        self._check(weight, tokens)
        # The saliency is linear in the scale of H (U_jj^2 scales as 1/c), so divide the result, not a copy of H.
        return obs_saliency(weight, state, percdamp=self.percdamp).div_(tokens)

    def wanda_score(self, state, *, weight=None, tokens=0, **_):
        """
        Wanda's `|W_ij| * ||x_j||_2` from the Hessian's diagonal (`||x_j||` as the root-mean over tokens, as wanda's
        scorer), for when the OBS sweep is not wanted or `H` is degenerate.

        Returns:
            `torch.Tensor`: shaped like `weight`, float32 on its device.

        Raises:
            `ValueError`: `weight` is missing or no tokens were seen.
        """
        self._check(weight, tokens)
        norm = (state.diagonal().float() / tokens).sqrt()
        return weight.detach().float().abs() * norm.to(weight.device)[None, :]
