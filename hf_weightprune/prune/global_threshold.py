"""Exact streaming global threshold: one pruning threshold over many score tensors, never all in memory.

[`compute_global_threshold`] and [`global_masks`] never concatenate or sort all scores. Scores are mapped to
order-preserving int32 keys ([`masks`]' order keys), a radix select over two passes of 16-bit histograms finds the
exact k-th smallest key, and a last pass shares the ties at that key among tensors in iteration order (earlier tensor
first, then lower flat index), the tie rule of every mask builder in [`masks`]. Extra memory is about one tensor's
worth of keys plus two 65536-bin int64 histograms; every count is an int64 (or a Python int), so totals and single
tensors past 2**31 elements are fine. bfloat16 scores (the usual importance state) skip float32 altogether: their keys
are the bf16 bits, which are the first pass's bins.

Timing (measured on the dev box, CPU, 2 cores, torch 2.13): `compute_global_threshold` on 100M float32 elements split
in 100 tensors of 1M, already in memory, takes about 0.8 s (1 or 2 threads, idle machine; 2-5 s while the cores are
shared with other jobs), against about 20 s for `torch.cat(...).sort()`. `global_masks` costs about the same.

[`layer_mask`] is the same select over one tensor: layer scope's per-tensor mask in linear time.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..validation import check_sparsity
from .masks import num_to_prune, order_key, order_key16, unstructured_mask

__all__ = ["GlobalThreshold", "NamedScores", "compute_global_threshold", "global_masks", "layer_mask"]

NamedScores = Callable[[], Iterable[tuple[str, torch.Tensor]]]
# Sums int64 count tensors in place over the processes that each score a share of the tensors (a no-op on one).
Combine = Callable[[list[torch.Tensor]], None]

_NUM_BINS = 1 << 16
# Keys lie in [-0x7F800000, 0x7F800000] (+-inf), so `key >> 16` lies in [-32640, 32640]: shift it to a bin index.
_HIGH_OFFSET = 1 << 15
_BINCOUNT_BLOCK = 1 << 20


def _key_to_value(key: int) -> float:
    """Inverse of [`order_key`] for one key: the float32 value it stands for."""
    bits = key if key >= 0 else (-key) | 0x80000000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _threshold_keys(score: torch.Tensor, key: int, name: str) -> tuple[torch.Tensor, int, bool]:
    """
    `(keys, k, exact)`: order keys of `score` and the float32-scale threshold `key` on their scale. A bfloat16 score
    gets 16-bit keys; when `key` falls between two bf16 values (`exact` False) no element can equal it, and an
    element is above it exactly when its key is `>= k`.
    """
    if score.dtype == torch.bfloat16:
        high, low = divmod(key, _NUM_BINS)
        return order_key16(score, name), (high if low == 0 else high + 1), low == 0
    return order_key(score, name), key, True


def _select_bin(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """
    Find the histogram bin holding the `rank`-th smallest element (1-based).

    Args:
        hist (`torch.Tensor`):
            1D int64 counts per bin, bins in ascending key order.
        rank (`int`):
            1-based rank, `1 <= rank <= hist.sum()`.

    Returns:
        `tuple[int, int]`: `(bin, below)`, where `below` is the number of elements in lower bins.
    """
    if hist.dtype != torch.int64:
        raise ValueError(f"`hist` must hold int64 counts, got {hist.dtype}.")
    cumulative = torch.cumsum(hist, dim=0)
    total = int(cumulative[-1])
    if not 1 <= rank <= total:
        raise ValueError(f"`rank` must be in [1, {total}], got {rank}.")
    # First bin whose cumulative count reaches `rank`.
    bin_index = int(torch.searchsorted(cumulative, torch.tensor([rank], dtype=torch.int64))[0])
    below = int(cumulative[bin_index - 1]) if bin_index > 0 else 0
    return bin_index, below


def _share_ties(tie_counts: Iterable[tuple[str, int]], ties_to_prune: int) -> dict[str, int]:
    """
    Share `ties_to_prune` pruned ties among tensors in iteration order: earlier tensors prune all their ties first.

    Args:
        tie_counts (`Iterable[tuple[str, int]]`):
            `(name, number of elements equal to the threshold)` per tensor, in iteration order.
        ties_to_prune (`int`):
            Ties to prune in total.

    Returns:
        `dict[str, int]`: ties pruned per tensor (0 for tensors past the last one that prunes ties).
    """
    remaining = ties_to_prune
    shares = {}
    for name, count in tie_counts:
        take = min(int(count), remaining)
        shares[name] = take
        remaining -= take
    if remaining:
        raise ValueError(
            f"Only {ties_to_prune - remaining} ties found, {ties_to_prune} needed: scores changed between passes."
        )
    return shares


@dataclass(frozen=True)
class GlobalThreshold:
    """
    Exact global pruning threshold over several score tensors, from [`compute_global_threshold`].

    Args:
        key (`int`):
            Order-preserving int32 key of the threshold score: elements with a lower key are pruned, elements with a
            higher key are kept.
        value (`float`):
            The threshold score as a float32 value.
        ties_to_prune (`dict[str, int]`):
            Per tensor name, how many elements whose score equals the threshold are pruned (lowest flat indices
            first). Has an entry for every tensor.
        num_pruned (`int`):
            Elements pruned across all tensors, `num_to_prune(total, sparsity)`.
        total (`int`):
            Elements across all tensors.
        numels (`dict[str, int]`, *optional*):
            Elements per tensor seen while computing the threshold, used by [`~GlobalThreshold.mask`] to reject a
            tensor of the wrong size.
    """

    key: int
    value: float
    ties_to_prune: dict[str, int]
    num_pruned: int
    total: int
    # Shapes seen in the first pass, to catch a mask asked for a tensor that is not the one that was scored.
    numels: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def mask(self, name: str, score: torch.Tensor) -> torch.BoolTensor:
        """
        Keep-mask of one tensor under this threshold.

        Args:
            name (`str`):
                Name of the tensor, as yielded by `named_scores`.
            score (`torch.Tensor`):
                The same scores that were used to compute the threshold.

        Returns:
            `torch.BoolTensor`: mask shaped like `score`, `True` = keep.

        Raises:
            `ValueError`: for a name or a size that was not scored, or scores that changed since.
        """
        if name not in self.ties_to_prune:
            raise ValueError(f"Unknown tensor name {name!r}: it was not among the scores of this threshold.")
        if name in self.numels and score.numel() != self.numels[name]:
            raise ValueError(f"`{name}` has {score.numel()} elements, but {self.numels[name]} were scored.")
        keys, key, exact = _threshold_keys(score, self.key, name)
        ties = self.ties_to_prune[name]
        if ties and not exact:
            raise ValueError(f"`{name}` cannot hold scores equal to the threshold it must prune: scores changed.")
        return _threshold_mask(keys, key, ties, name).reshape(score.shape)


def _threshold_mask(keys: torch.Tensor, key: int, ties: int, name: str) -> torch.Tensor:
    """Keep keys above `key`, prune keys below it, and prune the first `ties` keys equal to it in flat order."""
    if ties == 0:
        return keys >= key
    keys = keys.reshape(-1)
    tie = keys == key
    count = int(torch.count_nonzero(tie))
    if count < ties:
        raise ValueError(f"`{name}` has fewer scores equal to the threshold than it must prune: scores changed.")
    keep = keys > key
    if count > ties:  # only the tensor where the shared ties run out keeps some: those after the `ties`-th one
        last = _index_of_nth_true(tie, ties)
        keep[last + 1 :] |= tie[last + 1 :]
    return keep


def _index_of_nth_true(flags: torch.Tensor, n: int, block: int = 1 << 24) -> int:
    """Flat index of the `n`-th (1-based) `True` of a 1D bool tensor, counting block by block (no int64 cumsum
    over the whole tensor)."""
    for start in range(0, flags.numel(), block):
        part = flags[start : start + block]
        count = int(torch.count_nonzero(part))
        if count >= n:
            return start + int(torch.searchsorted(torch.cumsum(part, 0, dtype=torch.int32), n))
        n -= count
    raise ValueError("fewer True values than asked for")

def _bincount(keys: torch.Tensor, minlength: int = 0) -> torch.Tensor:
    """`torch.bincount` of non-negative int keys, as CPU int64 counts.

    `torch.bincount` wants int32/int64 input. Widening a large int16 tensor in one go costs more than the count
    itself (a fresh 4-byte-per-element allocation that the kernel must fault in: 2.7 ns per element, measured on a
    25M-element bf16 score); widening 1M-element blocks into one reused buffer costs 0.9 ns. Threads did not help.
    """
    flat = keys.reshape(-1)
    if flat.dtype != torch.int16 or flat.numel() <= _BINCOUNT_BLOCK:
        return torch.bincount(flat, minlength=minlength).cpu()
    total = torch.zeros(max(minlength, 1 << 15), dtype=torch.int64)  # int16 keys are below 2**15
    buf = torch.empty(_BINCOUNT_BLOCK, dtype=torch.int32, device=flat.device)
    for start in range(0, flat.numel(), _BINCOUNT_BLOCK):
        part = flat[start : start + _BINCOUNT_BLOCK]
        block = buf[: part.numel()]
        block.copy_(part)
        counts = torch.bincount(block).cpu()
        total[: counts.numel()] += counts
    return total


def _iterate(named_scores: NamedScores, numels: dict[str, int] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Iterate one pass of `named_scores`, checking it replays the names and sizes of the first pass."""
    if numels is None:
        for name, score in named_scores():
            yield name, score
        return
    expected = iter(numels.items())
    for name, score in named_scores():
        if next(expected, (None, None)) != (name, score.numel()):
            raise ValueError(
                "`named_scores` must yield the same names and tensor sizes, in the same order, every call."
            )
        yield name, score
    if next(expected, None) is not None:
        raise ValueError("`named_scores` yielded fewer tensors than on its first call.")


def _locate_threshold(named_scores: NamedScores, sparsity: float,
                      combine: Combine | None = None) -> tuple[int, int, int, int, dict[str, int]]:
    """
    Passes 1 and 2 of the radix select; with `combine`, over every process's share (its histograms summed).

    Returns:
        `tuple`: `(key, ties_to_prune, num_pruned, total, numels)`, where `key` is the key of the element of rank
        `max(num_pruned, 1)` and `ties_to_prune` the number of elements equal to it that must be pruned.
    """
    sparsity = check_sparsity("sparsity", sparsity)
    if not callable(named_scores):
        raise ValueError(
            "`named_scores` must be a zero-argument callable returning a fresh iterable of (name, score) pairs, "
            f"got {type(named_scores).__name__}."
        )

    # Pass 1: histogram of the high 16 bits of the keys.
    numels: dict[str, int] = {}
    high_hist = torch.zeros(_NUM_BINS, dtype=torch.int64)
    # bfloat16 is the top half of float32: keys of bf16 scores have zero low 16 bits, so pass 1 is already exact.
    all_bf16 = True
    for name, score in _iterate(named_scores):
        all_bf16 = all_bf16 and score.dtype == torch.bfloat16
        if not isinstance(name, str):
            raise ValueError(f"Tensor names from `named_scores` must be strings, got {type(name).__name__}.")
        if name in numels:
            raise ValueError(f"`named_scores` yielded the name {name!r} twice; names must be unique.")
        if score.dtype == torch.bfloat16:  # 16-bit keys are the high bins themselves
            keys = order_key16(score, name).reshape(-1)
            numels[name] = keys.numel()
            if keys.dtype == torch.int16:  # non-negative: bins from _HIGH_OFFSET up
                counts = _bincount(keys)
                high_hist[_HIGH_OFFSET : _HIGH_OFFSET + counts.numel()] += counts
            else:
                high_hist += _bincount(keys + _HIGH_OFFSET, minlength=_NUM_BINS)
            continue
        keys = order_key(score, name).reshape(-1)
        numels[name] = keys.numel()
        high = keys >> 16
        high += _HIGH_OFFSET
        high_hist += _bincount(high, minlength=_NUM_BINS)
    total = sum(numels.values())
    if combine is not None:  # the histograms are sums over elements: summed over processes, they are the whole's
        counts = torch.tensor([total, int(not all_bf16)], dtype=torch.int64)
        combine([high_hist, counts])
        total, all_bf16 = int(counts[0]), not int(counts[1])
    if total == 0:
        raise ValueError("`named_scores` yielded no score elements; cannot compute a global threshold.")
    num_pruned = num_to_prune(total, sparsity)
    # With nothing to prune, the rank-1 (smallest) element still gives a well-defined threshold with 0 ties pruned.
    rank = max(num_pruned, 1)
    high_bin, below_high = _select_bin(high_hist, rank)
    high = high_bin - _HIGH_OFFSET
    if all_bf16:  # every key in the selected bin equals high << 16: they are all ties, no second pass needed
        return high * _NUM_BINS, num_pruned - below_high, num_pruned, total, numels

    # Pass 2: histogram of the low 16 bits among keys in the selected high bin.
    low_hist = torch.zeros(_NUM_BINS, dtype=torch.int64)
    for name, score in _iterate(named_scores, numels):
        if score.dtype == torch.bfloat16:  # its keys in the bin all have low bits 0
            low_hist[0] += int(torch.count_nonzero(order_key16(score, name) == high))
            continue
        # Clamp instead of boolean indexing (no gather): keys below the bin land in bin 0, keys above it in the
        # last bin, the bin's own keys in 1..65536.
        base = high * _NUM_BINS
        low = order_key(score, name).reshape(-1).clamp_(base - 1, base + _NUM_BINS)
        low -= base - 1
        low_hist += _bincount(low, minlength=_NUM_BINS + 2)[1:-1]
    if combine is not None:
        combine([low_hist])
    low_bin, below_low = _select_bin(low_hist, rank - below_high)
    key = high * _NUM_BINS + low_bin
    return key, num_pruned - (below_high + below_low), num_pruned, total, numels


def compute_global_threshold(named_scores: NamedScores, sparsity: float, *, combine: Combine | None = None,
                             order: Sequence[str] | None = None, sizes: Mapping[str, int] | None = None,
                             ) -> GlobalThreshold:
    """
    Exact global threshold pruning `num_to_prune(total, sparsity)` of the lowest scores across several tensors,
    streaming: three passes over `named_scores`, one tensor in memory at a time.

    Shared between processes (`combine`): each process scores only its share of the tensors and the threshold is
    still the one of all of them, identical on every process: its two histograms (2 x 65,536 int64) and the tie counts
    per tensor are summed across processes. Fewer scores than that weigh less than one histogram (`sizes` given, at
    most 131,072 in all, `_EXCHANGE_MAX_NUMEL`): they are exchanged instead, in one collective, and every process then
    computes the threshold of one process over all of them.

    Args:
        named_scores (`Callable[[], Iterable[tuple[str, torch.Tensor]]]`):
            Zero-argument callable returning a fresh iterable of `(name, score)` pairs on every call, same names,
            sizes and order each time (scores may be loaded lazily from disk). Names must be unique.
        sparsity (`float`):
            Fraction of all elements to prune, in `[0.0, 1.0)`.
        combine (`Callable[[list[torch.Tensor]], None]`, *optional*):
            Sums int64 count tensors in place across the processes (every process calls it at the same points);
            `named_scores` then yields this process's share of the tensors.
        order (`Sequence[str]`, *optional*):
            With `combine`: every process's tensor names, in the order ties are shared (the share yielded here is a
            subset of it).
        sizes (`Mapping[str, int]`, *optional*): with `combine`, the elements of each tensor of `order` (the exchange).

    Returns:
        [`GlobalThreshold`]: ties at the threshold are pruned in iteration order of tensors, then by flat index.

    Raises:
        `ValueError`: for a bad `sparsity`, a `named_scores` that is not callable, yields duplicate or non-str names,
        no elements, or other names/sizes on a later pass, or scores that are not floating or hold NaN.
    """
    if combine is not None and sizes is not None and sum(sizes[n] + sizes[n] % 2 for n in order) <= _EXCHANGE_MAX_NUMEL:
        scores = _exchange(named_scores, order, sizes, combine)  # fewer bytes than the histograms: the scores
        return compute_global_threshold(lambda: scores.items(), sparsity)
    key, ties, num_pruned, total, numels = _locate_threshold(named_scores, sparsity, combine)
    if combine is not None:  # pass 3 over this share, the counts summed, then shared in the common order
        counts = torch.zeros(len(order), dtype=torch.int64)
        index = {n: i for i, n in enumerate(order)}
        for name, score in (_iterate(named_scores, numels) if ties else ()):
            keys, k, exact = _threshold_keys(score, key, name)
            counts[index[name]] = int(torch.count_nonzero(keys == k)) if exact else 0
        combine([counts])
        shares = _share_ties(((n, c) for n, c in zip(order, counts.tolist()) if c), ties)
        return GlobalThreshold(key=key, value=_key_to_value(key), ties_to_prune={n: shares.get(n, 0) for n in order},
                               num_pruned=num_pruned, total=total, numels=numels)

    # Pass 3: count ties per tensor, in order; stop once all ties are placed (later tensors prune none).
    def tie_counts():
        remaining = ties
        if remaining == 0:  # don't even start a pass (it may load a tensor from disk)
            return
        for name, score in _iterate(named_scores, numels):
            if remaining == 0:
                break
            keys, k, exact = _threshold_keys(score, key, name)
            count = int(torch.count_nonzero(keys == k)) if exact else 0
            remaining -= min(count, remaining)
            yield name, count

    ties_to_prune = dict.fromkeys(numels, 0)
    ties_to_prune.update(_share_ties(tie_counts(), ties))
    return GlobalThreshold(key=key, value=_key_to_value(key), ties_to_prune=ties_to_prune, num_pruned=num_pruned,
                           total=total, numels=numels)


_EXCHANGE_MAX_NUMEL = _NUM_BINS * 8 // 4  # this many float32 scores (what order keys read) weigh one int64 histogram


def _exchange(named_scores: NamedScores, order: Sequence[str], sizes: Mapping[str, int],
              combine: Combine) -> dict[str, torch.Tensor]:
    """Every process's scores, float32 in `order`, from this process's share: each tensor's bits in its own slots of
    one buffer (zeros elsewhere, 8-byte aligned), summed as int64 words across processes by `combine`: one process's
    bits plus zeros, exact."""
    ends = list(itertools.accumulate(sizes[n] + sizes[n] % 2 for n in order))
    offsets, flat = dict(zip(order, [0, *ends])), torch.zeros(ends[-1] if ends else 0, dtype=torch.float32)
    seen: set[str] = set()
    for name, score in named_scores():
        if name not in offsets or name in seen or score.numel() != sizes[name]:
            raise ValueError(f"`named_scores` yielded {name!r} ({score.numel()} elements) not once as in `sizes`")
        seen.add(name)
        flat[offsets[name] : offsets[name] + sizes[name]] = score.detach().reshape(-1).float()
    combine([flat.view(torch.int64)])
    return {n: flat[offsets[n] : offsets[n] + sizes[n]] for n in order}


def global_masks(named_scores: NamedScores, sparsity: float) -> Iterator[tuple[str, torch.BoolTensor]]:
    """
    Yield `(name, mask)` per tensor for an exact global prune, like [`compute_global_threshold`] followed by
    [`GlobalThreshold.mask`], but sharing ties while building the masks (three passes instead of four).

    Args:
        named_scores (`Callable[[], Iterable[tuple[str, torch.Tensor]]]`):
            Zero-argument callable returning a fresh iterable of `(name, score)` pairs on every call.
        sparsity (`float`):
            Fraction of all elements to prune, in `[0.0, 1.0)`.

    Yields:
        `tuple[str, torch.BoolTensor]`: name and keep-mask shaped like its score, in iteration order.

    Raises:
        `ValueError`: as [`compute_global_threshold`], and if the scores changed between passes.
    """
    key, remaining, _, _, numels = _locate_threshold(named_scores, sparsity)
    for name, score in _iterate(named_scores, numels):
        keys, k, exact = _threshold_keys(score, key, name)
        ties = min(int(torch.count_nonzero(keys == k)), remaining) if remaining and exact else 0
        remaining -= ties
        yield name, _threshold_mask(keys, k, ties, name).reshape(score.shape)
    if remaining:
        raise ValueError("Fewer ties found than needed for the global threshold: scores changed between passes.")


# Below this size the sort of `masks.unstructured_mask` is cheaper than two 65,536-bin histograms.
_HISTOGRAM_MIN_NUMEL = 1 << 16


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.BoolTensor:
    """
    Keep-mask pruning the `num_to_prune(score.numel(), sparsity)` lowest scores of one tensor: the same mask as
    [`~masks.unstructured_mask`] (ties: lower flat index first), by this module's radix select over that one tensor
    for tensors of >= 2**16 elements. Linear time: 12x faster than a stable sort at a bfloat16 Phi-3-mini layer,
    4.6x for float32 (benchmarks/mask_select.py). `prune_` builds layer-scope masks with it.

    Args:
        score (`torch.Tensor`):
            Importance scores, any shape and floating dtype; higher = more important.
        sparsity (`float`):
            Fraction of elements to prune, in `[0.0, 1.0)`.

    Returns:
        `torch.BoolTensor`: mask shaped like `score`, `True` = keep.

    Raises:
        `ValueError`: for a bad `sparsity`, or a score that is not a floating tensor or holds NaN (the messages of
            `unstructured_mask`).
    """
    if not isinstance(score, torch.Tensor) or score.numel() < _HISTOGRAM_MIN_NUMEL:
        return unstructured_mask(score, sparsity)
    return next(iter(global_masks(lambda: (("score", score),), sparsity)))[1]
