"""The pure accumulation math, without any Trainer."""

import pytest
import torch

from hf_weightprune.scorers import SCORERS, base, get_scorer, register_scorer
from hf_weightprune.scorers.base import Scorer, accumulate_, blocks, chunks, stochastic_round_to_bf16_


def _samples(steps=4, shapes=((8, 6), (3, 5)), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [([torch.randn(s, generator=g) for s in shapes], [torch.randn(s, generator=g) for s in shapes])
            for _ in range(steps)]


@pytest.mark.parametrize(
    "criterion, ref",
    [
        ("temporal_magnitude", lambda ws, gs, ts: sum(t * w.abs() for w, t in zip(ws, ts)) / sum(ts)),
        ("movement", lambda ws, gs, ts: -sum(w * g for w, g in zip(ws, gs)) / len(ts)),
        ("taylor", lambda ws, gs, ts: sum((w * g).abs() for w, g in zip(ws, gs)) / len(ts)),
        ("fisher", lambda ws, gs, ts: sum(g * g for g in gs) / len(ts)),
    ],
)
@pytest.mark.parametrize("block", [base.BLOCK_NUMEL, 7])  # 7: blocks that split tensors mid-row
def test_update_and_score(criterion, ref, block, monkeypatch):
    monkeypatch.setattr(base, "BLOCK_NUMEL", block)
    monkeypatch.setattr(base.blocks, "__defaults__", (block,))
    scorer = get_scorer(criterion)
    data = _samples()
    states = [torch.zeros(w.shape) for w in data[0][0]]
    ts = [3, 6, 9, 12]
    for t, (ws, gs) in zip(ts, data):
        scorer.update_(states, ws, gs, t)
    for i, state in enumerate(states):
        got = scorer.score(state, weight=None, num_samples=len(ts), weight_sum=sum(ts), tokens=0)
        expected = ref([d[0][i] for d in data], [d[1][i] for d in data], ts)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_wanda_score_from_activation_sums():
    scorer = get_scorer("wanda")
    w = torch.randn(4, 6)
    xs = [torch.randn(2, 5, 6) for _ in range(3)]
    from hf_weightprune.scorers.wanda import activation_sq_sum

    state = torch.zeros(6)
    for x in xs:
        scorer.update_([state], [activation_sq_sum(x)], None, 0)
    tokens = 30
    x_all = torch.cat([x.reshape(-1, 6) for x in xs])
    expected = w.abs() * (x_all.pow(2).sum(0) / tokens).sqrt()
    torch.testing.assert_close(scorer.score(state, weight=w, num_samples=3, weight_sum=0, tokens=tokens), expected)
    with pytest.raises(ValueError, match="need the weights"):
        scorer.score(state, weight=None, num_samples=3, weight_sum=0, tokens=tokens)


def test_temporal_magnitude_is_invariant_to_time_scale():
    scorer = get_scorer("temporal_magnitude")
    data = _samples(3)
    out = []
    for scale in (1, 10):
        states = [torch.zeros(w.shape) for w in data[0][0]]
        ts = [scale * t for t in (1, 2, 3)]
        for t, (ws, _) in zip(ts, data):
            scorer.update_(states, ws, None, t)
        out.append(scorer.score(states[0], weight=None, num_samples=3, weight_sum=sum(ts), tokens=0))
    torch.testing.assert_close(out[0], out[1])


def test_blocks_are_aligned_views_of_the_state():
    states = [torch.zeros(3, 4), torch.zeros(5)]
    others = [torch.arange(12.0).view(3, 4).t().contiguous().t(), torch.arange(5.0)]  # a non-contiguous input
    seen = list(blocks(states, others, size=5))
    assert [b[0].numel() for b in seen] == [5, 5, 2, 5]
    for s, o in seen:
        s.add_(o)
    assert torch.equal(states[0], others[0]) and torch.equal(states[1], others[1])


def test_chunks_bound_the_batch():
    ts = [torch.empty(n) for n in (5, 5, 5, 20, 1)]
    slices = list(chunks(ts, max_numel=10))
    assert [(s.start, s.stop) for s in slices] == [(0, 2), (2, 3), (3, 4), (4, 5)]


def test_stochastic_rounding_is_unbiased():
    # 1 + 1e-3 is not representable in bf16 (ulp 2^-7); round-to-nearest would always give 1.0.
    value = torch.full((200_000,), 1.0 + 1e-3)
    dst = torch.empty(200_000, dtype=torch.bfloat16)
    stochastic_round_to_bf16_(dst, value, torch.Generator().manual_seed(0))
    assert set(dst.float().unique().tolist()) == {1.0, 1.0078125}
    assert abs(dst.float().mean().item() - (1.0 + 1e-3)) < 1e-4


def test_bf16_running_sum_keeps_growing():
    # 2000 increments of 1 onto a sum of ~1000: each increment is below half a bf16 ulp (4 at 1024).
    state = [torch.full((10_000,), 1000.0, dtype=torch.bfloat16)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        accumulate_(state[0], torch.ones(10_000), generator=gen)
    assert abs(state[0].float().mean().item() - 3000.0) < 5.0


def test_stochastic_rounding_is_unbiased_for_every_element_across_calls():
    # The noise comes from a fixed pool read at a fresh offset per call: no element may be stuck rounding one way.
    # 1.5 MiB elements span two pool segments; values just above 1, 2 and -4 (mixed signs, residues 0.1-0.9 ulp).
    n = base.NOISE_NUMEL + base.NOISE_NUMEL // 2
    frac = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    scale = torch.tensor([1.0, 2.0, -4.0]).repeat(n // 3 + 1)[:n]
    value = scale * (1 + frac * 2.0**-7)  # frac of one bf16 ulp above a power of two
    gen = torch.Generator().manual_seed(0)
    mean = torch.zeros(n, dtype=torch.float64)
    calls = 64
    for _ in range(calls):
        dst = torch.empty(n, dtype=torch.bfloat16)
        stochastic_round_to_bf16_(dst, value.clone(), gen)
        mean += dst.double()
    mean /= calls
    err = (mean - value.double()) / (scale.abs().double() * 2.0**-7)  # in ulps
    assert abs(err.mean().item()) < 2e-3  # no bias overall
    # each element rounds up with probability frac: over 64 calls the std of its mean is <= 1/16 ulp
    assert err.abs().max().item() < 0.45
    assert (err.abs() > 0.25).float().mean().item() < 1e-3


def test_stochastic_rounding_keeps_non_finite_values():
    nan_payload = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)  # noise would carry into the sign
    value = torch.cat([torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0]), nan_payload])
    dst = torch.empty(5, dtype=torch.bfloat16)
    stochastic_round_to_bf16_(dst, value.clone(), torch.Generator().manual_seed(0))
    assert dst[0].isnan() and dst[4].isnan()
    assert dst[1].item() == float("inf") and dst[2].item() == -float("inf") and dst[3].item() == 1.0


def test_registry_refuses_duplicates():
    assert set(SCORERS) == {"temporal_magnitude", "magnitude", "movement", "taylor", "fisher", "wanda", "sparsegpt"}
    with pytest.raises(ValueError, match="already registered"):

        @register_scorer
        class Again(Scorer):
            name = "taylor"

    with pytest.raises(ValueError, match="Unknown criterion"):
        get_scorer("nope")
