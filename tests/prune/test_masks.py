"""Mask builders against brute-force references (full stable sorts), plus error cases.

int64 safety: building a real input past 2**31 elements is too slow and too large for CI, so the counting helpers
(`_select_bin`, `_share_ties`, `num_to_prune`) are tested directly with synthetic counts past 2**31 and 2**32; the
streaming code only ever feeds them int64 histograms and Python ints.
"""

import math

import pytest
import torch
from torch import nn

from hf_weightprune.prune import global_threshold, masks
from hf_weightprune.prune.global_threshold import GlobalThreshold, compute_global_threshold, global_masks
from hf_weightprune.prune.masks import (
    apply_mask_,
    mask_sparsity,
    nm_mask,
    num_to_prune,
    parse_nm,
    row_mask,
    unstructured_mask,
)

SPARSITIES = [0.0, 0.3, 0.5, 0.999]


def make_score(kind: str, shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(shape, generator=gen)
    if kind == "ties":  # many equal scores: integers 0..3
        return torch.randint(0, 4, shape, generator=gen).float()
    if kind == "negative":
        return -torch.rand(shape, generator=gen) - 0.5
    if kind == "bf16":  # bf16 has 8 mantissa bits, so also plenty of ties
        return torch.randn(shape, generator=gen).to(torch.bfloat16)
    if kind == "bf16_nonneg":  # the usual importance state: its keys are the bf16 bits themselves
        x = torch.rand(shape, generator=gen).to(torch.bfloat16)
        return torch.where(torch.rand(shape, generator=gen) < 0.1, torch.zeros((), dtype=torch.bfloat16), x)
    if kind == "mixed":  # bf16 and float32 tensors together; float32 values on and between bf16 values
        if sum(shape) % 2:
            return torch.randn(shape, generator=gen).to(torch.bfloat16)
        x = torch.randn(shape, generator=gen).to(torch.bfloat16).float()
        return torch.where(torch.rand(shape, generator=gen) < 0.5, x, x * (1 + 2.0**-10))
    if kind == "fp16_signed_zeros":  # mixes -0.0 and +0.0, which must compare equal
        x = torch.randint(-2, 3, shape, generator=gen).to(torch.float16)
        return torch.where(torch.rand(shape, generator=gen) < 0.5, x, -x)
    if kind == "float64":
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    raise ValueError(kind)


KINDS = ["randn", "ties", "negative", "bf16", "bf16_nonneg", "mixed", "fp16_signed_zeros", "float64"]


def reference_prune_lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of a 1D tensor pruning the k lowest values (lower index first on ties) via a full stable sort."""
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat.float(), stable=True).indices[:k]] = False
    return keep


# ------------------------------------------------------------------------------------------------------------------
# num_to_prune and order keys
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [0, 1, 3, 5, 10, 1000, 2**31 + 7, 2**40 + 1])
@pytest.mark.parametrize("sparsity", SPARSITIES + [0.25, 0.9])
def test_num_to_prune_is_round(numel, sparsity):
    k = num_to_prune(numel, sparsity)
    assert isinstance(k, int)
    assert k == min(numel, round(sparsity * numel))
    assert 0 <= k <= numel


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), True, "0.5", None])
def test_num_to_prune_rejects_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        num_to_prune(10, sparsity)


def test_order_key_preserves_float32_order():
    finfo = torch.finfo(torch.float32)
    tiny = finfo.smallest_normal / 4  # a subnormal
    values = [
        -math.inf,
        finfo.min,
        -1.5,
        -1.0,
        -finfo.smallest_normal,
        -tiny,
        -0.0,
        0.0,
        tiny,
        1.0,
        finfo.max,
        math.inf,
    ]
    x = torch.tensor(values, dtype=torch.float32)
    keys = masks.order_key(x)
    assert keys.dtype == torch.int32
    # Strictly increasing except -0.0 == +0.0.
    diffs = keys[1:].long() - keys[:-1].long()
    zero_pair = 6  # diff between values[6] (-0.0) and values[7] (+0.0)
    assert diffs[zero_pair] == 0
    assert bool((torch.cat([diffs[:zero_pair], diffs[zero_pair + 1 :]]) > 0).all())
    for value, key in zip(values, keys.tolist()):
        assert global_threshold._key_to_value(key) == value


def test_order_key16_is_the_float32_key_shifted():
    finfo = torch.finfo(torch.bfloat16)
    values = [-math.inf, finfo.min, -1.5, -finfo.tiny, -finfo.tiny / 4, -0.0, 0.0, finfo.tiny / 4, 1.0, finfo.max,
              math.inf]
    for x in (torch.tensor(values, dtype=torch.bfloat16), torch.randn(5000).to(torch.bfloat16),
              torch.rand(5000).to(torch.bfloat16)):
        key16 = masks.order_key16(x)
        assert torch.equal(key16.to(torch.int32), masks.order_key(x) >> 16)
    # -0.0 and +0.0 share a key; non-negative scores are read in place (a view of the bits)
    assert masks.order_key16(torch.tensor([-0.0, 0.0], dtype=torch.bfloat16)).tolist() == [0, 0]
    nonneg = torch.rand(10).to(torch.bfloat16)
    assert masks.order_key16(nonneg).data_ptr() == nonneg.data_ptr()
    for bad in (float("nan"), -float("nan")):
        with pytest.raises(ValueError, match="w.*NaN"):
            masks.order_key16(torch.tensor([1.0, bad], dtype=torch.bfloat16), "w")


def test_order_key_random_matches_sort():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 1e3
    assert torch.equal(torch.argsort(masks.order_key(x), stable=True), torch.argsort(x, stable=True))


# ------------------------------------------------------------------------------------------------------------------
# Per-tensor masks
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", [(37,), (16, 24), (4, 3, 5)])
def test_unstructured_mask_matches_reference(kind, sparsity, shape):
    score = make_score(kind, shape, seed=10 * KINDS.index(kind) + len(shape))
    mask = unstructured_mask(score, sparsity)
    assert mask.dtype == torch.bool and mask.shape == score.shape
    k = num_to_prune(score.numel(), sparsity)
    assert torch.equal(mask.reshape(-1), reference_prune_lowest(score.reshape(-1), k))
    assert int((~mask).sum()) == k


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", [(8, 20), (5, 3, 4)])
def test_row_mask_matches_reference(kind, sparsity, shape):
    score = make_score(kind, shape, seed=7)
    mask = row_mask(score, sparsity)
    assert mask.shape == score.shape
    rows = score.reshape(shape[0], -1)
    k = num_to_prune(rows.shape[1], sparsity)
    expected = torch.stack([reference_prune_lowest(row, k) for row in rows])
    assert torch.equal(mask.reshape(shape[0], -1), expected)
    assert ((~mask).reshape(shape[0], -1).sum(dim=1) == k).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_long_row_mask_matches_reference(kind, sparsity):
    # Rows of >= 256 columns select by kthvalue + the tie rule instead of a stable sort: the same masks.
    shape = (5, 2, 160)
    score = make_score(kind, shape, seed=11)
    mask = row_mask(score, sparsity)
    rows = score.reshape(shape[0], -1)
    k = num_to_prune(rows.shape[1], sparsity)
    expected = torch.stack([reference_prune_lowest(row, k) for row in rows])
    assert torch.equal(mask.reshape(shape[0], -1), expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.97])
def test_layer_mask_matches_reference(kind, sparsity):
    # Tensors of >= 2**16 elements select by the global threshold's histograms: the same mask as a stable sort.
    score = make_score(kind, (300, 257), seed=3)
    mask = global_threshold.layer_mask(score, sparsity)
    assert mask.shape == score.shape
    k = num_to_prune(score.numel(), sparsity)
    assert torch.equal(mask.reshape(-1), reference_prune_lowest(score.reshape(-1), k))


@pytest.mark.parametrize("shape", [(4, 8), (256, 256)], ids=["sort", "histogram"])
def test_layer_mask_refuses_as_unstructured_mask(shape):
    # layer_mask (the sort for small tensors, histograms for large ones) refuses bad input with the same one-line
    # errors as unstructured_mask.
    def errors(fn):
        nan = torch.randn(shape)
        nan[1, 2] = float("nan")
        found = []
        for score, sparsity in [(nan, 0.5), (torch.ones(shape, dtype=torch.int64), 0.5), (torch.randn(shape), 1.0)]:
            with pytest.raises(ValueError) as info:
                fn(score, sparsity)
            found.append(str(info.value))
        return found

    expected = errors(unstructured_mask)
    assert "NaN" in expected[0] and "floating dtype" in expected[1] and "sparsity" in expected[2]
    assert errors(global_threshold.layer_mask) == expected


@pytest.mark.parametrize("columns", [255, 256, 1000])
@pytest.mark.parametrize("levels", [1, 3, 1000])
def test_selection_equals_stable_sort_on_ties(columns, levels):
    # Both selection paths of the mask helper against a stable sort, on integer keys with few distinct values
    # (every row is mostly ties), for every k from none to all.
    gen = torch.Generator().manual_seed(columns + levels)
    keys = torch.randint(0, levels, (7, columns), generator=gen).to(torch.int16)
    for k in sorted({0, 1, columns // 3, columns // 2, columns - 1, columns}):
        mask = masks._prune_lowest_along_last_dim(keys, k)
        expected = torch.ones_like(mask)
        expected.scatter_(-1, torch.sort(keys, dim=-1, stable=True).indices[:, :k], False)
        assert torch.equal(mask, expected), k


def test_row_mask_tie_rule_within_row():
    score = torch.zeros(2, 6)
    mask = row_mask(score, 0.5)
    assert mask.tolist() == [[False] * 3 + [True] * 3] * 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 2), (3, 4)])
def test_nm_mask_matches_reference(kind, n, m):
    shape = (6, 4 * m)
    score = make_score(kind, shape, seed=n * 10 + m)
    mask = nm_mask(score, n, m)
    assert mask.shape == score.shape
    # Groups run along the input (last) dim: consecutive elements of one row.
    groups = mask.reshape(shape[0], shape[1] // m, m)
    assert (groups.sum(dim=-1) == n).all()
    expected = torch.stack([reference_prune_lowest(g, m - n) for g in score.reshape(-1, m)])
    assert torch.equal(mask.reshape(-1, m), expected)


def test_nm_mask_groups_are_along_input_dim():
    # Each row increases along the input dim, so 2:4 keeps the last 2 of every 4 columns in every row.
    score = torch.arange(8.0).repeat(3, 1)
    mask = nm_mask(score, 2, 4)
    assert mask.tolist() == [[False, False, True, True] * 2] * 3


@pytest.mark.parametrize("spec,expected", [("2:4", (2, 4)), (" 4:8 ", (4, 8)), ("1:2", (1, 2)), ("15:16", (15, 16))])
def test_parse_nm(spec, expected):
    assert parse_nm(spec) == expected


@pytest.mark.parametrize("spec", ["2-4", "2:4:8", "4:2", "0:4", "4:4", "a:4", "-1:4", "2.0:4", "", ":", 24])
def test_parse_nm_rejects(spec):
    with pytest.raises(ValueError, match="N:M|n < m"):
        parse_nm(spec)


@pytest.mark.parametrize("n,m", [(0, 4), (4, 4), (5, 4), (-1, 4), (2.0, 4), (True, 4)])
def test_nm_mask_rejects_bad_nm(n, m):
    with pytest.raises(ValueError, match="`n`|`m`|n < m"):
        nm_mask(torch.randn(4, 8), n, m)


def test_nm_mask_rejects_non_divisible_input_dim():
    with pytest.raises(ValueError, match="divisible by m=4"):
        nm_mask(torch.randn(8, 6), 2, 4)


@pytest.mark.parametrize(
    "fn", [lambda s: unstructured_mask(s, 0.5), lambda s: row_mask(s, 0.5), lambda s: nm_mask(s, 2, 4)]
)
def test_per_tensor_masks_reject_nan_and_int(fn):
    score = torch.randn(4, 8)
    score[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(score)
    score[1, 2] = -float("nan")  # sign bit set
    with pytest.raises(ValueError, match="NaN"):
        fn(score)
    with pytest.raises(ValueError, match="floating dtype"):
        fn(torch.ones(4, 8, dtype=torch.int64))


def test_row_mask_rejects_1d():
    with pytest.raises(ValueError, match="at least 2 dims"):
        row_mask(torch.randn(8), 0.5)


# ------------------------------------------------------------------------------------------------------------------
# Global threshold
# ------------------------------------------------------------------------------------------------------------------


GLOBAL_SHAPES = [(7,), (16, 32), (3, 5, 4), (1,), (0, 4), (33, 9)]


def make_named_scores(kind: str, shapes=GLOBAL_SHAPES, seed: int = 0):
    """A lazy `named_scores`: every call regenerates the tensors, and counts how often it was called."""
    calls = []

    def named_scores():
        calls.append(1)
        for i, shape in enumerate(shapes):
            yield f"layer{i}.weight", make_score(kind, shape, seed + i)

    return named_scores, calls


def reference_global(named_scores, sparsity):
    items = list(named_scores())
    flat = torch.cat([s.reshape(-1).float() for _, s in items])
    keep = reference_prune_lowest(flat, num_to_prune(flat.numel(), sparsity))
    out, start = {}, 0
    for name, score in items:
        out[name] = keep[start : start + score.numel()].reshape(score.shape)
        start += score.numel()
    return out, flat


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparsity", SPARSITIES + [0.07])
def test_global_threshold_matches_reference(kind, sparsity):
    named_scores, calls = make_named_scores(kind, seed=len(kind))
    expected, flat = reference_global(named_scores, sparsity)
    calls.clear()

    threshold = compute_global_threshold(named_scores, sparsity)
    assert len(calls) <= 3
    assert isinstance(threshold, GlobalThreshold)
    assert threshold.total == flat.numel()
    assert threshold.num_pruned == num_to_prune(flat.numel(), sparsity)
    assert set(threshold.ties_to_prune) == set(expected)
    if threshold.num_pruned:
        # The threshold is the score of the last pruned element.
        assert threshold.value == torch.sort(flat).values[threshold.num_pruned - 1].item()
        assert sum(threshold.ties_to_prune.values()) == threshold.num_pruned - int((flat < threshold.value).sum())
    else:
        assert sum(threshold.ties_to_prune.values()) == 0

    pruned = 0
    for name, score in named_scores():
        mask = threshold.mask(name, score)
        assert mask.dtype == torch.bool and mask.shape == score.shape
        assert torch.equal(mask, expected[name]), name
        pruned += int((~mask).sum())
    assert pruned == threshold.num_pruned

    calls.clear()
    streamed = dict(global_masks(named_scores, sparsity))
    # bf16 keys are exact after the first histogram pass: its second pass is skipped
    assert len(calls) == (2 if kind.startswith("bf16") else 3)
    assert list(streamed) == list(expected)
    for name, mask in streamed.items():
        assert torch.equal(mask, expected[name]), name


def test_global_sparsity_zero_keeps_all_in_two_passes():
    named_scores, calls = make_named_scores("ties")
    threshold = compute_global_threshold(named_scores, 0.0)
    assert len(calls) == 2  # no tie pass when nothing is pruned
    assert threshold.num_pruned == 0 and set(threshold.ties_to_prune.values()) == {0}
    assert all(bool(mask.all()) for _, mask in global_masks(named_scores, 0.0))


def test_global_ties_span_tensors_in_order():
    # All scores equal: pruning must fill the first tensors first, lowest flat indices first.
    shapes = [(3,), (4,), (5,)]

    def named_scores():
        return [(f"t{i}", torch.full(shape, 2.5)) for i, shape in enumerate(shapes)]

    threshold = compute_global_threshold(named_scores, 0.5)  # round(6.0) = 6 pruned
    assert threshold.ties_to_prune == {"t0": 3, "t1": 3, "t2": 0}
    assert threshold.value == 2.5
    result = dict(global_masks(named_scores, 0.5))
    assert result["t0"].tolist() == [False] * 3
    assert result["t1"].tolist() == [False] * 3 + [True]
    assert result["t2"].tolist() == [True] * 5


def test_global_with_infinities_and_signed_zeros():
    scores = {"a": torch.tensor([math.inf, -0.0, 1.0, -math.inf]), "b": torch.tensor([0.0, -math.inf, -0.0, 3.0])}

    def named_scores():
        return scores.items()

    for sparsity in [0.2, 0.5, 0.7]:
        expected, _ = reference_global(named_scores, sparsity)
        got = dict(global_masks(named_scores, sparsity))
        for name in scores:
            assert torch.equal(got[name], expected[name]), (sparsity, name)


def test_global_single_tensor_equals_unstructured():
    score = make_score("ties", (64, 48), seed=3)
    for sparsity in SPARSITIES:
        ((_, mask),) = global_masks(lambda: [("w", score)], sparsity)
        assert torch.equal(mask, unstructured_mask(score, sparsity))


def test_global_selects_across_high_bins():
    # Values far apart (different high 16 bits of the key) and close together (same high bits, different low bits).
    base = torch.tensor([1.0, 1.0000001, 1.0000002, -1e30, 1e30, -1.0000001, -1.0])

    def named_scores():
        yield "x", base
        yield "y", base.flip(0) * 3

    for sparsity in [0.1, 0.3, 0.5, 0.6, 0.9]:
        expected, _ = reference_global(named_scores, sparsity)
        assert dict(global_masks(named_scores, sparsity)).keys() == expected.keys()
        for name, mask in global_masks(named_scores, sparsity):
            assert torch.equal(mask, expected[name]), (sparsity, name)


@pytest.mark.parametrize("sparsity", [-0.5, 1.0, 2, float("nan")])
def test_global_rejects_bad_sparsity(sparsity):
    named_scores, _ = make_named_scores("randn")
    with pytest.raises(ValueError, match="sparsity"):
        compute_global_threshold(named_scores, sparsity)


def test_global_rejects_nan_naming_the_tensor():
    def named_scores():
        yield "good", torch.randn(4)
        yield "bad.weight", torch.tensor([1.0, float("nan")])

    with pytest.raises(ValueError, match="bad.weight.*NaN"):
        compute_global_threshold(named_scores, 0.5)


@pytest.mark.parametrize(
    "named_scores,match",
    [
        (lambda: [], "no score elements"),
        (lambda: [("empty", torch.zeros(0))], "no score elements"),
        (lambda: [("a", torch.ones(2)), ("a", torch.ones(2))], "twice"),
        (lambda: [(0, torch.ones(2))], "strings"),
        ([("a", torch.ones(2))], "callable"),
    ],
)
def test_global_rejects_bad_input(named_scores, match):
    with pytest.raises(ValueError, match=match):
        compute_global_threshold(named_scores, 0.5)


def test_global_rejects_generator_object():
    gen = (item for item in [("a", torch.ones(2))])
    with pytest.raises(ValueError, match="callable"):
        compute_global_threshold(gen, 0.5)


def test_global_rejects_non_replayable_callable():
    # Returns the same generator every call: the second pass sees nothing.
    gen = (item for item in [("a", torch.randn(8)), ("b", torch.randn(8))])
    with pytest.raises(ValueError, match="fewer tensors|same names"):
        compute_global_threshold(lambda: gen, 0.5)


def test_global_rejects_changing_sizes():
    sizes = iter([8, 9, 9])
    with pytest.raises(ValueError, match="same names and tensor sizes"):
        compute_global_threshold(lambda: [("a", torch.randn(next(sizes)))], 0.5)


def test_threshold_mask_rejects_unknown_name_and_wrong_size():
    threshold = compute_global_threshold(lambda: [("a", torch.arange(10.0))], 0.5)
    with pytest.raises(ValueError, match="Unknown tensor name 'b'"):
        threshold.mask("b", torch.arange(10.0))
    with pytest.raises(ValueError, match="11 elements"):
        threshold.mask("a", torch.arange(11.0))


# ------------------------------------------------------------------------------------------------------------------
# int64 safety of the counting helpers (synthetic counts, no 2**31-element tensors)
# ------------------------------------------------------------------------------------------------------------------


def reference_select_bin(counts, rank):
    below = 0
    for i, c in enumerate(counts):
        if below + c >= rank:
            return i, below
        below += c
    raise AssertionError


@pytest.mark.parametrize(
    "counts,rank",
    [
        ([2**40, 3, 2**33], 2**40 + 2),
        ([2**40, 3, 2**33], 2**40 + 3),
        ([2**40, 3, 2**33], 2**40 + 4),
        ([0, 2**31 - 1, 0, 2, 2**32], 2**31 + 1),
        ([0, 2**31 - 1, 0, 2, 2**32], 2**31 + 2),
        ([2**62], 2**61 + 12345),
        ([0] * 100 + [5], 5),
    ],
)
def test_select_bin_large_counts(counts, rank):
    hist = torch.zeros(global_threshold._NUM_BINS, dtype=torch.int64)
    hist[: len(counts)] = torch.tensor(counts, dtype=torch.int64)
    assert global_threshold._select_bin(hist, rank) == reference_select_bin(counts, rank)


def test_select_bin_rejects_bad_rank_and_dtype():
    hist = torch.zeros(global_threshold._NUM_BINS, dtype=torch.int64)
    hist[3] = 2**33
    with pytest.raises(ValueError, match="rank"):
        global_threshold._select_bin(hist, 2**33 + 1)
    with pytest.raises(ValueError, match="rank"):
        global_threshold._select_bin(hist, 0)
    with pytest.raises(ValueError, match="int64"):
        global_threshold._select_bin(hist.to(torch.int32), 1)


def test_share_ties_large_counts():
    counts = [("a", 2**31 + 5), ("b", 0), ("c", 2**33), ("d", 7)]
    shares = global_threshold._share_ties(counts, 2**32)
    assert shares == {"a": 2**31 + 5, "b": 0, "c": 2**32 - (2**31 + 5), "d": 0}
    with pytest.raises(ValueError, match="ties"):
        global_threshold._share_ties([("a", 2**31)], 2**31 + 1)


def test_key_composition_for_every_high_bin_sign():
    # key = high * 65536 + low must invert (key >> 16, key & 0xFFFF) for negative and positive keys.
    keys = torch.tensor([-0x7F800000, -65537, -65536, -1, 0, 1, 65535, 65536, 0x7F800000], dtype=torch.int32)
    high, low = (keys >> 16).long(), (keys & 0xFFFF).long()
    assert torch.equal(high * global_threshold._NUM_BINS + low, keys.long())
    assert int((high + global_threshold._HIGH_OFFSET).min()) >= 0 and int((high + global_threshold._HIGH_OFFSET).max()) < global_threshold._NUM_BINS


# ------------------------------------------------------------------------------------------------------------------
# Using masks
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_mask_sparsity(sparsity):
    mask = unstructured_mask(torch.randn(10, 10, generator=torch.Generator().manual_seed(1)), sparsity)
    assert mask_sparsity(mask) == pytest.approx(num_to_prune(100, sparsity) / 100)


def test_mask_sparsity_rejects():
    with pytest.raises(ValueError, match="torch.bool"):
        mask_sparsity(torch.ones(3))
    with pytest.raises(ValueError, match="empty"):
        mask_sparsity(torch.ones(0, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_apply_mask_in_place_on_parameter(dtype):
    layer = nn.Linear(8, 4).to(dtype)
    layer.weight.data[0, 0] = float("inf")
    original = layer.weight.detach().clone()
    mask = unstructured_mask(original.abs(), 0.5)
    mask[0, 0] = False  # a pruned inf must become 0, not NaN
    out = apply_mask_(layer.weight, mask)
    assert out is layer.weight
    assert layer.weight.dtype == dtype and layer.weight.grad_fn is None and layer.weight.requires_grad
    assert torch.equal(layer.weight.detach(), torch.where(mask, original, torch.zeros((), dtype=dtype)))
    assert not torch.signbit(layer.weight.detach()[~mask]).any()


def test_apply_mask_on_a_non_contiguous_weight():
    weight = torch.randn(6, 5).t()  # a transposed view: the masked_fill_ path
    original = weight.clone()
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    apply_mask_(weight, mask)
    assert torch.equal(weight, torch.where(mask, original, torch.zeros(())))


def test_apply_mask_rejects():
    with pytest.raises(ValueError, match="shape"):
        apply_mask_(torch.ones(2, 3), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.bool"):
        apply_mask_(torch.ones(2, 3), torch.ones(2, 3))


def test_index_of_nth_true_across_blocks():
    flags = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.3
    where = torch.nonzero(flags).flatten().tolist()
    for n in (1, 2, len(where) // 2, len(where)):
        for block in (7, 64, 1 << 24):
            assert global_threshold._index_of_nth_true(flags, n, block=block) == where[n - 1]
    with pytest.raises(ValueError):
        global_threshold._index_of_nth_true(flags, len(where) + 1, block=64)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_bincount_in_blocks_matches_torch(monkeypatch, dtype):
    keys = torch.randint(0, 3000, (10_007,), generator=torch.Generator().manual_seed(0)).to(dtype)
    monkeypatch.setattr(global_threshold, "_BINCOUNT_BLOCK", 1000)
    for minlength in (0, 40_000):
        got = global_threshold._bincount(keys, minlength)
        want = torch.bincount(keys.long(), minlength=minlength)
        assert torch.equal(got[: want.numel()], want) and not got[want.numel() :].any()
