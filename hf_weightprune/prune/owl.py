"""OWL: outlier-weighed layer-wise sparsity (Yin et al. 2023, arXiv 2310.05175).

Uniform sparsity hurts layers that hold many activation outliers. OWL measures, per decoder layer, the fraction of
weights whose Wanda score `|W_ij| * ||x_j||` exceeds `M` times the layer's mean score ([`outlier_ratio`]), then
gives layers with more outliers less sparsity ([`owl_sparsities`]): the ratios are min-max scaled to `[0, 2 lamda]`
and subtracted from the target, so sparsities spread over a band of width `2 lamda` around it. The paper's defaults
(its LLaMA runs) are `M = 5` and `lamda = 0.08`.

Two choices here go past the reference code, both to honour what the paper states: sparsities are clipped to
`[target - lamda, target + lamda]` (with min-max scaling alone a single outlier layer can fall to `target - 2 lamda`),
and the parameter-weighted mean is exactly `target` (the reference centres the plain mean, which is the same only when
every layer has the same size), down to whole elements: the pruned counts sum to `round(target * total)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real

import torch
from torch import Tensor

__all__ = ["outlier_ratio", "owl_sparsities"]

_ROWS_NUMEL = 1 << 22  # elements of |W| * ||x|| materialised at once (16 MiB in float32)


def _row_blocks(weights: Sequence[Tensor], norms: Sequence[Tensor]):
    for w, n in zip(weights, norms):
        rows = max(1, _ROWS_NUMEL // max(w.shape[1], 1))
        n = n.detach().to(w.device, torch.float32)[None, :]
        for block in w.detach().split(rows):
            yield block.abs().float() * n  # out of place: `.float()` of a float32 block is the weight itself


def outlier_ratio(weight: Tensor | Sequence[Tensor], act_norm: Tensor | Sequence[Tensor], M: float = 5.0) -> float:
    """
    OWL's layer outlier ratio: the fraction of Wanda scores `|W_ij| * ||x_j||` above `M` times their mean.

    Pass all the Linears of one decoder layer together: the paper computes the mean and the count over the layer's
    weights as one set.

    Args:
        weight (`torch.Tensor` or sequence of `torch.Tensor`):
            `[out, in]` weights, any floating dtype.
        act_norm (`torch.Tensor` or sequence of `torch.Tensor`):
            `[in]` input norm `||x_j||` of each weight, in the same order; all must be measured over the same tokens
            (e.g. `sqrt` of wanda's state, or of `diag(H)` of sparsegpt's), since a scale shared by all cancels but a
            scale of one tensor does not.
        M (`float`, *optional*, defaults to 5.0):
            Outlier threshold as a multiple of the mean score (the paper's `M`, 5 in its main results).

    Returns:
        `float`: outlier fraction in `[0, 1]` (the paper reports it in percent).

    Raises:
        `ValueError`: lengths or shapes disagree, `M` is not positive, or there are no weights.
    """
    weights = [weight] if isinstance(weight, Tensor) else list(weight)
    norms = [act_norm] if isinstance(act_norm, Tensor) else list(act_norm)
    if isinstance(M, bool) or not isinstance(M, Real) or not float(M) > 0:
        raise ValueError(f"`M` must be a positive float (the paper uses 5), got {M!r}.")
    if len(weights) != len(norms) or not weights:
        raise ValueError(f"Pass one `act_norm` per weight; got {len(weights)} weights and {len(norms)} norms.")
    for i, (w, n) in enumerate(zip(weights, norms)):
        if not isinstance(w, Tensor) or w.dim() != 2 or not isinstance(n, Tensor) or n.shape != (w.shape[1],):
            raise ValueError(
                f"weight {i}: `act_norm` must be [in_features] for a [out, in] weight, got weight "
                f"{tuple(getattr(w, 'shape', ()))} and act_norm {tuple(getattr(n, 'shape', ()))}."
            )
    total = sum(w.numel() for w in weights)
    if total == 0:
        raise ValueError("`weight` has no elements; an outlier ratio is undefined.")
    # Two streaming passes (mean, then count) so no layer-sized score tensor is ever built.
    mean = sum(float(s.sum(dtype=torch.float64)) for s in _row_blocks(weights, norms)) / total
    threshold = float(M) * mean
    count = sum(int((s > threshold).sum()) for s in _row_blocks(weights, norms))
    return count / total


def owl_sparsities(
    ratios: Mapping[str, float], numels: Mapping[str, int], target: float, lamda: float = 0.08
) -> dict[str, float]:
    """
    Per-layer sparsities from outlier ratios, OWL's allocation: more outliers, less sparsity.

    With `r` the outlier ratios, the raw offsets are `a_l = 2 lamda (r_l - min r) / (max r - min r)` (the paper's
    min-max scaling) and the sparsities `s_l = clip(c - a_l, target - lamda, target + lamda)` (also within `[0, 1]`),
    with the one constant `c` for which the parameter-weighted mean of `s_l` is `target`. The counts `s_l * n_l` are
    then rounded (largest remainders) so they sum to exactly `round(target * sum n_l)`; each returned `s_l` is
    `count_l / n_l`, so `round(s_l * n_l)` gives the count back.

    Args:
        ratios (`Mapping[str, float]`):
            Layer name -> outlier ratio ([`outlier_ratio`]), finite.
        numels (`Mapping[str, int]`):
            Layer name -> number of prunable weights in the layer; same keys as `ratios`.
        target (`float`):
            Mean sparsity over all the layers' weights, in `[0.0, 1.0)`.
        lamda (`float`, *optional*, defaults to 0.08):
            Half-width of the sparsity band around `target` (the paper's lambda, 0.08 in its main results); 0 gives
            uniform sparsity.

    Returns:
        `dict[str, float]`: layer name -> sparsity in `[target - lamda, target + lamda]` (up to one element of
        rounding), in the order of `ratios`. If every ratio is equal, every layer gets `target` (up to rounding).
        Applied per tensor inside a layer, each tensor rounds its own count, so the model total may then differ
        from `round(target * total)` by up to one element per tensor.

    Raises:
        `ValueError`: keys differ, a ratio is not finite, a numel is not a positive int, or `target`/`lamda` are out
        of range.
    """
    if set(ratios) != set(numels) or not ratios:
        raise ValueError(
            f"`ratios` and `numels` must have the same non-empty keys; only in ratios: "
            f"{sorted(set(ratios) - set(numels))}, only in numels: {sorted(set(numels) - set(ratios))}."
        )
    if isinstance(target, bool) or not isinstance(target, Real) or not 0.0 <= float(target) < 1.0:
        raise ValueError(f"`target` must be a float in [0.0, 1.0), got {target!r}.")
    if isinstance(lamda, bool) or not isinstance(lamda, Real) or not 0.0 <= float(lamda) <= 1.0:
        raise ValueError(f"`lamda` must be a float in [0.0, 1.0] (the paper uses 0.08), got {lamda!r}.")
    names = list(ratios)
    for name in names:
        if isinstance(ratios[name], bool) or not isinstance(ratios[name], Real) or not math.isfinite(ratios[name]):
            raise ValueError(f"Outlier ratio of layer {name!r} must be a finite number, got {ratios[name]!r}.")
        n = numels[name]
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"`numels[{name!r}]` must be a positive int, got {n!r}.")
    target, lamda = float(target), float(lamda)
    r = [float(ratios[name]) for name in names]
    n = [numels[name] for name in names]
    total = sum(n)
    lo, hi = max(0.0, target - lamda), min(1.0, target + lamda)
    spread = max(r) - min(r)
    a = [2 * lamda * (x - min(r)) / spread if spread > 0 else 0.0 for x in r]

    def mean_at(c: float) -> float:
        return sum(min(hi, max(lo, c - ai)) * ni for ai, ni in zip(a, n)) / total

    # The weighted mean grows monotonically with c, from lo (c = lo) to hi (c = hi + 2 lamda): bisect for target.
    left, right = lo, hi + 2 * lamda
    for _ in range(200):
        mid = (left + right) / 2
        if mean_at(mid) < target:
            left = mid
        else:
            right = mid
    s = [min(hi, max(lo, right - ai)) for ai in a]

    # Whole counts summing to round(target * total): floors, then the largest remainders (ties: earlier layer).
    exact = [si * ni for si, ni in zip(s, n)]
    counts = [min(ni, math.floor(x)) for x, ni in zip(exact, n)]
    missing = round(target * total) - sum(counts)
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
    if missing < 0:  # only from float error in the bisection: take back from the smallest remainders
        order = [i for i in reversed(order) if counts[i] > 0]
    else:
        order = [i for i in order if counts[i] < n[i]]
    for i in order[: abs(missing)]:
        counts[i] += 1 if missing > 0 else -1
    return {name: c / ni for name, c, ni in zip(names, counts, n)}
