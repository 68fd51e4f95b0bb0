"""Pure per-tensor mask builders: importance scores in, boolean keep-masks out.

Conventions:

- A mask is a `torch.bool` tensor shaped like the weight, `True` = keep.
- A score is an importance tensor, higher = more important. Any floating dtype is accepted and compared in float32;
  scores may be negative (movement pruning) but never NaN (`-inf` is allowed: it marks an already pruned weight).
  `-0.0` and `+0.0` count as equal.
- Weights of `nn.Linear` are `[out_features, in_features]`: rows are output units, the last dim is the input dim.
- Ties are broken deterministically: among equal scores the one with the lower flat index (for global masks: the
  earlier tensor, then the lower flat index) is pruned first.
- How many elements a sparsity prunes is decided in one place, [`num_to_prune`]; whether a sparsity is valid in one
  place, [`~validation.check_sparsity`].

Global masks over several tensors ([`compute_global_threshold`], [`global_masks`], [`GlobalThreshold`]) live in
[`global_threshold`], with [`~global_threshold.layer_mask`]: the same mask as [`unstructured_mask`] by that module's
histogram select, linear time (what `prune_` uses for layer scope).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..validation import check_nm, check_sparsity, parse_nm

__all__ = [
    "apply_mask_",
    "check_nm_shapes",
    "mask_sparsity",
    "nm_capped_mask",
    "nm_mask",
    "num_to_prune",
    "order_key",
    "order_key16",
    "parse_nm",
    "row_mask",
    "unstructured_mask",
]

# Blocks of `apply_mask_`'s bitwise AND, and the integer dtype of each float width it reinterprets weights as.
_MASK_BLOCK = 1 << 20
_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------------------------------------------------
# Validation and helpers
# --------------------------------------------------------------------------------------------------------------------


def num_to_prune(numel: int, sparsity: float) -> int:
    """
    Number of elements to prune out of `numel` at a given sparsity. The single rounding rule used by every mask builder.

    Args:
        numel (`int`):
            Number of elements in the comparison group (a tensor, a row, or all tensors together).
        sparsity (`float`):
            Fraction of elements to prune, in `[0.0, 1.0)`.

    Returns:
        `int`: `round(sparsity * numel)` (Python's `round`, i.e. halves go to the even neighbour), between 0 and
        `numel`.

    Raises:
        `ValueError`: if `sparsity` is not in `[0, 1)` or `numel` is not a non-negative int.
    """
    sparsity = check_sparsity("sparsity", sparsity)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"`numel` must be a non-negative int, got {numel!r}.")
    # Near-1 sparsities on tiny groups may round up to the whole group; that is what the rule says.
    return min(numel, round(sparsity * numel))


def order_key(score: torch.Tensor, name: str = "score") -> torch.Tensor:
    """
    Map a score tensor to int32 keys whose signed integer order is the float32 order of the scores.

    IEEE floats are sign-magnitude: the magnitude bits of a non-negative float already sort like the float, and a
    negative float sorts like minus its magnitude. `-0.0` maps to 0 like `+0.0`, matching `torch.sort`, which treats
    them as equal. No overflow: the largest magnitude (inf) is 0x7F800000.

    Args:
        score (`torch.Tensor`): any shape, floating dtype.
        name (`str`, *optional*, defaults to `"score"`): how the tensor is named in error messages.

    Returns:
        `torch.Tensor`: int32, shaped like `score`.

    Raises:
        `ValueError`: `score` is not a floating tensor, or holds NaN.
    """
    if not isinstance(score, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(score).__name__}.")
    if not score.is_floating_point():
        raise ValueError(
            f"`{name}` must have a floating dtype (float16, bfloat16, float32, float64), got {score.dtype}."
        )
    score = score.detach().to(torch.float32)
    bits = score.contiguous().view(torch.int32)
    sign = bits >> 31  # -1 for negative floats, 0 otherwise
    key = bits & 0x7FFFFFFF  # magnitude bits
    # NaNs are the only magnitudes above inf's 0x7F800000; a max is much cheaper than isnan().any().
    if key.numel() and int(key.max()) > 0x7F800000:
        raise ValueError(f"`{name}` contains NaN scores; importance scores must not be NaN.")
    # Negate where sign is -1, in place: -x == (x ^ -1) + 1.
    key ^= sign
    key -= sign
    return key


def order_key16(score: torch.Tensor, name: str = "score") -> torch.Tensor:
    """
    Order keys of bfloat16 scores at 16-bit resolution: exactly `order_key(score) >> 16`, built from the bf16 bits
    without widening to float32. Non-negative scores (the usual case) get the bits themselves, an int16 view with no
    copy and no arithmetic; scores with a sign bit get int32 keys.

    Args:
        score (`torch.Tensor`): bfloat16, any shape.
        name (`str`, *optional*, defaults to `"score"`): how the tensor is named in error messages.

    Returns:
        `torch.Tensor`: int16 (a view of `score`'s bits) or int32, shaped like `score`.

    Raises:
        `ValueError`: `score` holds NaN.
    """
    bits = score.detach().contiguous().view(torch.int16)
    if bits.numel() == 0:
        return bits
    lo, hi = (int(v) for v in torch.aminmax(bits))
    if lo >= 0:
        if hi > 0x7F80:  # magnitudes above inf's 0x7F80 are NaNs
            raise ValueError(f"`{name}` contains NaN scores; importance scores must not be NaN.")
        return bits
    key = bits.to(torch.int32)
    sign = key >> 31
    key &= 0x7FFF
    if int(key.max()) > 0x7F80:
        raise ValueError(f"`{name}` contains NaN scores; importance scores must not be NaN.")
    key ^= sign
    key -= sign
    return key


def _keys(score: torch.Tensor, name: str = "score") -> torch.Tensor:
    """Order keys for comparisons within one tensor: 16-bit ones for bfloat16 scores (cheaper), else float32's."""
    if isinstance(score, torch.Tensor) and score.dtype == torch.bfloat16:
        return order_key16(score, name)
    return order_key(score, name)


# Rows at least this long select by `kthvalue` (one partial selection per row); shorter ones (N:M groups) sort,
# which is cheaper there (crossover between 64 and 256 columns). Row-scope masks at Phi-3-mini shapes: 1.46x
# faster than the stable sort (benchmarks/mask_select.py, README section 2).
_SELECT_MIN_COLUMNS = 256


def _prune_lowest_along_last_dim(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the `k` lowest keys of every row of a 2D key tensor, lower column index first on ties."""
    if k <= 0:
        return torch.ones(keys.shape, dtype=torch.bool, device=keys.device)
    if keys.shape[-1] < _SELECT_MIN_COLUMNS:
        # A stable sort keeps equal keys in index order, so the first `k` are the ties with the lowest indices.
        mask = torch.ones(keys.shape, dtype=torch.bool, device=keys.device)
        mask.scatter_(-1, torch.argsort(keys, dim=-1, stable=True)[..., :k], False)
        return mask
    # Everything below the k-th smallest key goes, then as many of the keys equal to it as are still needed, in
    # column order: the same mask as the stable sort.
    kth = keys.kthvalue(k, dim=-1, keepdim=True).values
    prune = keys < kth
    tie = keys == kth
    prune |= tie & (tie.cumsum(-1) <= k - prune.sum(-1, keepdim=True))
    return prune.logical_not_()


# --------------------------------------------------------------------------------------------------------------------
# Per-tensor masks
# --------------------------------------------------------------------------------------------------------------------


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """
    Keep-mask pruning the `num_to_prune(score.numel(), sparsity)` lowest scores of one tensor.

    Args:
        score (`torch.Tensor`):
            Importance scores, any shape and floating dtype; higher = more important.
        sparsity (`float`):
            Fraction of elements to prune, in `[0.0, 1.0)`.

    Returns:
        `torch.BoolTensor`: mask shaped like `score`, `True` = keep. Among equal scores the lower flat index is
        pruned first.

    Raises:
        `ValueError`: for a bad `sparsity`, or a score that is not a floating tensor or holds NaN.
    """
    keys = _keys(score)
    k = num_to_prune(keys.numel(), sparsity)
    return _prune_lowest_along_last_dim(keys.reshape(1, -1), k).reshape(score.shape)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """
    Keep-mask pruning the same number of lowest scores in every output row (Wanda's comparison group).

    Args:
        score (`torch.Tensor`):
            Importance scores of a weight shaped `[out_features, in_features]` (extra trailing dims, e.g. conv
            kernels, are flattened into the row).
        sparsity (`float`):
            Fraction of each row to prune, in `[0.0, 1.0)`; each row prunes `num_to_prune(row_numel, sparsity)`.

    Returns:
        `torch.BoolTensor`: mask shaped like `score`, `True` = keep. Within a row the lower index is pruned first on
        ties.

    Raises:
        `ValueError`: for a bad `sparsity`, a score with fewer than 2 dims, not floating, or holding NaN.
    """
    if not isinstance(score, torch.Tensor) or score.dim() < 2:
        raise ValueError(
            f"`score` must be a tensor with at least 2 dims ([out_features, in_features]), got "
            f"{tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__}."
        )
    keys = _keys(score).reshape(score.shape[0], -1)
    k = num_to_prune(keys.shape[1], sparsity)
    return _prune_lowest_along_last_dim(keys, k).reshape(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """
    N:M keep-mask along the input (last) dimension: in every group of `m` consecutive input elements of a row, keep
    the `n` highest scores (e.g. 2:4 keeps 2 of every 4).

    Args:
        score (`torch.Tensor`):
            Importance scores of a weight shaped `[..., in_features]`; `in_features` must be divisible by `m`.
        n (`int`):
            Elements kept per group, `0 < n < m`.
        m (`int`):
            Group size.

    Returns:
        `torch.BoolTensor`: mask shaped like `score`, `True` = keep. Within a group the lower index is pruned first
        on ties.

    Raises:
        `ValueError`: for bad `n`/`m`, an input dim not divisible by `m`, or a score not floating or holding NaN.
    """
    check_nm(n, m)
    _check_groups(score, m)
    keys = _keys(score).reshape(-1, m)
    return _prune_lowest_along_last_dim(keys, m - n).reshape(score.shape)


def nm_capped_mask(score: torch.Tensor, sparsity: float, n: int, m: int) -> torch.Tensor:
    """
    Keep-mask pruning the `num_to_prune(score.numel(), sparsity)` lowest scores, at most `m - n` in each group of `m`
    consecutive input elements: a gradual step towards the N:M mask (Zhu & Gupta 2017, arXiv 1710.01878, applied to
    the N:M pattern of Mishra et al. 2021, arXiv 2104.08378).

    At `sparsity = 1 - n/m` (and a group count that rounds exactly) it equals [`nm_mask`]; below it, the lowest
    scores among the `m - n` lowest of every group are pruned, lower flat index first on ties. Scores may be `-inf`
    (weights pruned earlier rank lowest, so gradual masks only shrink).

    Args:
        score (`torch.Tensor`):
            Importance scores of a weight shaped `[..., in_features]`, any floating dtype; `in_features` must be a
            multiple of `m`.
        sparsity (`float`):
            Fraction of all elements to prune, in `[0.0, 1.0)`. Above `1 - n/m` the groups' caps bind: at most
            `numel * (m - n) / m` elements are pruned.
        n (`int`):
            Elements kept per group, `0 < n < m`.
        m (`int`):
            Group size.

    Returns:
        `torch.BoolTensor`: mask shaped like `score`, `True` = keep.

    Raises:
        `ValueError`: for a bad `sparsity`, `n`/`m`, a non-floating or NaN score, or an input dim not divisible by `m`.
    """
    check_nm(n, m)
    _check_groups(score, m)
    keys = _keys(score).reshape(-1, m)
    candidates = torch.argsort(keys, dim=1, stable=True)[:, : m - n]  # the m - n lowest of each group
    candidate_keys = torch.gather(keys, 1, candidates).reshape(-1)
    k = min(num_to_prune(score.numel(), sparsity), candidate_keys.numel())
    # Candidates in flat-index order, then a stable sort by key: ties go to the lower flat index, as everywhere here.
    flat = (candidates + torch.arange(keys.shape[0], device=keys.device)[:, None] * m).reshape(-1)
    order = torch.argsort(flat)
    chosen = order[torch.argsort(candidate_keys[order], stable=True)[:k]]
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    mask[flat[chosen]] = False
    return mask.reshape(score.shape)


def check_nm_shapes(shapes: Mapping[str, Sequence[int]], n: int, m: int) -> None:
    """
    Check, before any work, that every weight to prune with an N:M pattern has an input dim divisible by `m`.

    One check shared by every N:M path (one-shot `prune_`, `prune_checkpoint`, gradual pruning), so a weight that
    cannot hold the pattern is named the same way wherever it is met.

    Args:
        shapes (`Mapping[str, Sequence[int]]`):
            Weight name to its shape, `[out_features, in_features]` (the last dim is the input dim).
        n (`int`):
            Elements kept per group, `0 < n < m`.
        m (`int`):
            Group size.

    Raises:
        `ValueError`: one line naming the first weight whose input dim is not a multiple of `m` (or that has no
        dims), and the fix.
    """
    check_nm(n, m)
    for name, shape in shapes.items():
        shape = tuple(shape)
        in_features = shape[-1] if shape else None
        if in_features is None or in_features % m:
            what = f"in_features {in_features}" if shape else "a 0-dim weight"
            raise ValueError(
                f"{name}: {what} is not a multiple of {m} (structure '{n}:{m}' prunes groups of {m} consecutive input "
                "weights); exclude it (exclude_modules=[...]) or use unstructured pruning"
            )


def _check_groups(score: torch.Tensor, m: int) -> None:
    if not isinstance(score, torch.Tensor) or score.dim() < 1:
        raise ValueError("`score` must be a tensor with at least 1 dim for an N:M mask.")
    if score.shape[-1] % m != 0:
        raise ValueError(
            f"The last (input) dim of `score` must be divisible by m={m} for an N:M mask, got shape {tuple(score.shape)}."
        )


# --------------------------------------------------------------------------------------------------------------------
# Using masks
# --------------------------------------------------------------------------------------------------------------------


def mask_sparsity(mask: torch.Tensor) -> float:
    """
    Fraction of pruned (`False`) elements in a mask.

    Args:
        mask (`torch.BoolTensor`):
            Keep-mask, `True` = keep.

    Returns:
        `float`: pruned fraction in `[0.0, 1.0]`.

    Raises:
        `ValueError`: if `mask` is not a non-empty `torch.bool` tensor.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"`mask` must be a torch.bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}.")
    if mask.numel() == 0:
        raise ValueError("`mask` is empty; its sparsity is undefined.")
    return 1.0 - int(mask.count_nonzero()) / mask.numel()


def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """
    Zero the pruned elements of `weight` in place, in its own dtype and without recording autograd history.

    Args:
        weight (`torch.Tensor`):
            Weight or `nn.Parameter` to prune.
        mask (`torch.BoolTensor`):
            Keep-mask with the same shape as `weight`, `True` = keep.

    Returns:
        `torch.Tensor`: `weight`, modified in place.

    Raises:
        `ValueError`: if `mask` is not a `torch.bool` tensor of `weight`'s shape.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"`mask` must be a torch.bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}.")
    if mask.shape != weight.shape:
        raise ValueError(f"`mask` shape {tuple(mask.shape)} must equal `weight` shape {tuple(weight.shape)}.")
    mask = mask.to(weight.device)
    bits = _SAME_WIDTH_INT.get(weight.element_size()) if weight.is_floating_point() else None
    with torch.no_grad():
        if bits is None or not weight.is_contiguous():
            weight.masked_fill_(~mask, 0)
        else:
            # Clear every bit of a pruned element: an AND with 0 or -1 gives +0.0 (never NaN from inf * 0, nor -0.0
            # from a negative * 0) and has no branch on the mask: 0.9 ns per element vs 2.3 ns for masked_fill_
            # with a random half-pruned mask.
            # In 1M-element blocks through one reused buffer: a whole-tensor int copy of the mask is a fresh
            # allocation the kernel must fault in, which cost more than the AND itself.
            flat, keep = weight.detach().view(-1).view(bits), mask.reshape(-1).view(torch.int8)
            buf = torch.empty(min(flat.numel(), _MASK_BLOCK), dtype=bits, device=flat.device)
            for start in range(0, flat.numel(), _MASK_BLOCK):
                part = buf[: min(_MASK_BLOCK, flat.numel() - start)]
                part.copy_(keep[start : start + _MASK_BLOCK]).neg_()  # 1 -> -1 (all bits set), 0 -> 0
                flat[start : start + _MASK_BLOCK].bitwise_and_(part)
    return weight
