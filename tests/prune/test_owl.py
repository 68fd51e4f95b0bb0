"""OWL layer-wise sparsity: outlier ratios and their allocation (pure math)."""

import pytest
import torch

from hf_weightprune.prune.owl import outlier_ratio, owl_sparsities


def test_outlier_ratio_counts_scores_above_m_times_the_layer_mean(monkeypatch):
    import hf_weightprune.prune.owl as owl

    monkeypatch.setattr(owl, "_ROWS_NUMEL", 10)  # several row blocks per tensor
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 8, generator=g), torch.randn(4, 5, generator=g).to(torch.bfloat16)]
    norms = [torch.rand(8, generator=g) * 3, torch.rand(5, generator=g)]
    weights[0][2, 3] = 40.0  # a few clear outliers
    weights[1][1, 0] = -60.0
    scores = torch.cat([(w.float().abs() * n[None, :]).flatten() for w, n in zip(weights, norms)])
    for M in (1.0, 3.0, 5.0):
        expected = (scores > M * scores.mean()).sum().item() / scores.numel()
        assert outlier_ratio(weights, norms, M=M) == pytest.approx(expected, abs=1e-12)
    # The layer's weights count as one set: not the mean of the per-tensor ratios.
    separate = [outlier_ratio(w, n) for w, n in zip(weights, norms)]
    assert outlier_ratio(weights, norms) != pytest.approx(sum(separate) / 2)
    assert outlier_ratio(weights[0], norms[0]) == separate[0]


def test_outlier_ratio_errors():
    with pytest.raises(ValueError, match="one `act_norm` per weight"):
        outlier_ratio([torch.ones(2, 3)], [])
    with pytest.raises(ValueError, match=r"weight 0: `act_norm` must be \[in_features\]"):
        outlier_ratio(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="`M` must be a positive float"):
        outlier_ratio(torch.ones(2, 3), torch.ones(3), M=0)


def _pruned(s, numels):
    return sum(round(s[k] * numels[k]) for k in numels)


@pytest.mark.parametrize("target", [0.5, 0.7, 0.05, 0.95])
def test_weighted_mean_is_target_to_the_element(target):
    g = torch.Generator().manual_seed(1)
    ratios = {f"layer{i}": float(r) for i, r in enumerate(torch.rand(30, generator=g) * 0.05)}
    numels = {f"layer{i}": int(n) for i, n in enumerate(torch.randint(1000, 50000, (30,), generator=g))}
    s = owl_sparsities(ratios, numels, target)
    assert list(s) == list(ratios)
    assert _pruned(s, numels) == round(target * sum(numels.values()))
    for k in s:  # each sparsity is a whole count over its layer's size
        assert s[k] * numels[k] == pytest.approx(round(s[k] * numels[k]), abs=1e-6)


def test_more_outliers_get_less_sparsity_within_the_band():
    ratios = {"a": 0.010, "b": 0.030, "c": 0.020, "d": 0.012, "e": 0.028}  # scaled: 0, 1, .5, .1, .9
    numels = dict.fromkeys(ratios, 10_000)
    s = owl_sparsities(ratios, numels, 0.7)
    by_ratio = sorted(ratios, key=ratios.get)
    assert all(s[x] >= s[y] for x, y in zip(by_ratio, by_ratio[1:]))
    assert s["b"] < s["a"]
    # Equal sizes: the shift keeps the paper's affine map, 2 lamda between the extremes.
    assert s["a"] - s["b"] == pytest.approx(0.16, abs=2e-4)
    assert all(0.7 - 0.08 - 1e-4 <= v <= 0.7 + 0.08 + 1e-4 for v in s.values())
    assert _pruned(s, numels) == 35_000


def test_clipped_to_the_band():
    # One outlier-heavy layer: min-max scaling alone would put it at target - 2 lamda * (1 - 1/9).
    ratios = {f"l{i}": 0.01 for i in range(8)} | {"hot": 0.2}
    numels = dict.fromkeys(ratios, 1000)
    s = owl_sparsities(ratios, numels, 0.5, lamda=0.08)
    assert s["hot"] == pytest.approx(0.42, abs=1e-3)  # clipped at target - lamda
    assert all(v == pytest.approx(0.51, abs=1e-3) for k, v in s.items() if k != "hot")  # the rest make up for it
    assert _pruned(s, numels) == 4500


@pytest.mark.parametrize("numels", [dict(a=100, b=100, c=100), dict(a=101, b=37, c=1000)])
def test_all_ratios_equal_give_uniform_sparsity(numels):
    s = owl_sparsities(dict(a=0.02, b=0.02, c=0.02), numels, 0.6)
    assert all(abs(s[k] * numels[k] - 0.6 * numels[k]) <= 1 for k in numels)
    assert _pruned(s, numels) == round(0.6 * sum(numels.values()))
    assert owl_sparsities(dict(a=0.1, b=0.3), dict(a=10, b=10), 0.5, lamda=0.0) == dict(a=0.5, b=0.5)


@pytest.mark.parametrize(
    "args, match",
    [
        ((dict(a=0.1), dict(b=10), 0.5), "same non-empty keys"),
        ((dict(a=0.1), dict(a=0), 0.5), r"`numels\['a'\]` must be a positive int"),
        ((dict(a=float("nan")), dict(a=10), 0.5), "must be a finite number"),
        ((dict(a=0.1), dict(a=10), 1.0), "`target` must be"),
        ((dict(a=0.1), dict(a=10), 0.5, -0.1), "`lamda` must be"),
    ],
)
def test_owl_sparsities_errors(args, match):
    with pytest.raises(ValueError, match=match):
        owl_sparsities(*args)


def test_outlier_ratio_leaves_the_weights_untouched():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    before = w.clone()
    outlier_ratio(w, torch.rand(16), M=2.0)
    assert torch.equal(w, before)
