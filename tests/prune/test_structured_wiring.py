"""Structured `prune_` from unit statistics: neurons, heads, hidden, layers and their combination; `target_params`
budgets; least-squares refit; one-line refusals that change nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, prune_
from hf_weightprune.layouts import decoder_layers
from hf_weightprune.testing import tiny_llama
from tests.helpers import train


def _spread(model):
    with torch.no_grad():  # stock init gives near-identity layers; spread the weights so every statistic varies
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-layer tiny Llama trained 4 steps with unit statistics and sparsegpt Hessians; its importance."""
    model = _spread(tiny_llama(seed=1, num_hidden_layers=4))
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", units=True))
    train(model, [cb], tmp_path_factory.mktemp("run"), max_steps=4, lr=1e-3)
    return model, cb.importance()


def _copy(trained):
    model, imp = trained
    clone = tiny_llama(seed=1, num_hidden_layers=4)
    clone.load_state_dict(model.state_dict())
    return clone.eval(), imp


IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_neurons_rank_by_unit_statistics_and_equal_the_zeroed_dense_model(trained):
    model, imp = _copy(trained)
    dense = _copy(trained)[0]
    report = prune_(model, imp, PruneConfig(structure="neurons", sparsity=0.25))
    scores = imp.unit_scores("activation")["neurons"]
    for i, removed in report.structured["removed"].items():
        assert removed == sorted(torch.sort(scores[i], stable=True).indices[:16].tolist())  # the 16 lowest
        dense.model.layers[i].mlp.down_proj.weight.data[:, removed] = 0
    assert model.config.intermediate_size == 48
    torch.testing.assert_close(_logits(model), _logits(dense), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("structure", ["heads", "hidden", "layers"])
def test_each_structure_prunes_and_reloads(trained, structure, tmp_path):
    model, imp = _copy(trained)
    report = prune_(model, imp, PruneConfig(structure=structure, sparsity=0.5))
    axis = report.structured["axes"][structure]
    assert axis["after"] == axis["before"] // 2
    if structure == "layers":  # the two layers of lowest block influence
        assert axis["removed"] == sorted(torch.argsort(imp.unit_scores()["layers"])[:2].tolist())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model))
    for cache in (True, False):
        out = loaded.generate(IDS[:1], max_new_tokens=4, do_sample=False, use_cache=cache, pad_token_id=0)
        assert out.shape == (1, 16)


@pytest.mark.parametrize("target", [0.7, 0.5])
def test_combination_meets_target_params_within_one_unit_per_layer(trained, target):
    model, imp = _copy(trained)
    before = sum(p.numel() for p in model.parameters())
    report = prune_(model, imp, PruneConfig(structure=("layers", "heads", "neurons"), target_params=target))
    s = report.structured
    assert s["structure"] == "layers,heads,neurons"
    after = sum(p.numel() for p in model.parameters())
    assert s["num_parameters"] == {"before": before, "after": after}
    n_layers = len(decoder_layers(model))
    neuron_cost = n_layers * (3 * model.config.hidden_size)  # gate row + up row + down column, every layer
    assert abs(after - round(target * before)) <= neuron_cost
    assert s["config"]["after"]["num_hidden_layers"] == n_layers
    assert report.global_sparsity == pytest.approx(1 - after / before)


def test_refit_lowers_the_loss_on_held_out_tokens(trained):
    held_out = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(7))

    def loss(m):
        with torch.no_grad():
            return float(m(input_ids=held_out, labels=held_out).loss)

    plain, imp = _copy(trained)
    refit = _copy(trained)[0]
    with torch.no_grad():
        dense = _copy(trained)[0](input_ids=held_out).logits
    prune_(plain, imp, PruneConfig(structure="neurons", sparsity=0.5))
    r = prune_(refit, imp, PruneConfig(structure="neurons", sparsity=0.5, compensate="refit"))
    assert r.structured["compensation"] == "refit"
    assert loss(refit) < loss(plain)
    with torch.no_grad():  # and the refit model stays closer to the dense one
        err = [float((m(input_ids=held_out).logits - dense).square().mean()) for m in (refit, plain)]
    assert err[0] < err[1]


def _unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("config, match", [
    (dict(structure="layers", target_params=1000), "cannot be met"),
    (dict(structure="neurons", target_params=10**9), "not fewer than the model"),
    (dict(structure="neurons", compensate="refit", sparsity=0.5, unit_statistic="taylor"), None),
])
def test_bad_budgets_refused_in_one_line_and_nothing_changes(trained, config, match):
    model, imp = _copy(trained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if match is None:  # a valid config for contrast: it does prune
        prune_(model, imp, PruneConfig(**config))
        assert not _unchanged(model, before)
        return
    with pytest.raises(ValueError, match=match) as e:
        prune_(model, imp, PruneConfig(**config))
    assert "\n" not in str(e.value)
    assert _unchanged(model, before)


def test_without_unit_statistics_hidden_and_layers_say_how_to_get_them(tmp_path):
    model = tiny_llama()
    cb = ImportanceCallback(ImportanceConfig())
    train(model, [cb], tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"structure 'layers' ranks by unit statistics.*units=True"):
        prune_(model, cb.importance(), PruneConfig(structure="layers,neurons", target_params=0.8))


def test_hidden_with_embeddings_shared_beyond_the_head_is_refused(trained):
    model, imp = _copy(trained)
    model.extra = torch.nn.Embedding(128, 32)  # not tracked (all-linear), but reads the embedding tensor too
    model.extra.weight = model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="shared with"):
        prune_(model, imp, PruneConfig(structure="hidden", sparsity=0.25))


def test_config_validation():
    with pytest.raises(ValueError, match="either sparsity"):
        PruneConfig(structure="neurons", sparsity=0.3, target_params=0.5)
    with pytest.raises(ValueError, match="target_params is a budget"):
        PruneConfig(target_params=0.5)
    with pytest.raises(ValueError, match="target_params must be"):
        PruneConfig(structure="layers", target_params=1.5)
    with pytest.raises(ValueError, match="structure must be"):
        PruneConfig(structure="layers,layers", target_params=0.5)
    c = PruneConfig(structure=["neurons", "layers"], target_params=100)
    assert c.structure == "neurons,layers" and c.structures == ("neurons", "layers") and c.kind == "combined"
    assert PruneConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("structure", [("hidden", "neurons"), ("heads", "hidden")])
def test_refit_after_hidden_channels_are_removed_uses_each_consumers_own_hessian(trained, structure):
    # Under a budget the filling axis is cut last, after hidden channels, whose removal replaces every Linear; its
    # refit must still find the dense consumer's Hessian (was a KeyError on id(module), or with a reused id another
    # module's Hessian).
    from hf_weightprune.prune.compensate import refit_columns

    model, imp = _copy(trained)
    dense = _copy(trained)[0]
    axis = "neurons" if "neurons" in structure else "heads"
    report = prune_(model, imp, PruneConfig(structure=structure, target_params=0.6, compensate="refit"))
    axes = report.structured["axes"]
    kept_hidden = sorted(set(range(32)) - set(axes["hidden"]["removed"]))
    assert len(kept_hidden) < 32 and axes[axis]["after"] < axes[axis]["before"]
    for i, removed in axes[axis]["removed"].items():
        if axis == "neurons":
            name, w = "mlp.down_proj", dense.model.layers[i].mlp.down_proj.weight
            cols = sorted(set(range(64)) - set(removed))
        else:  # a KV group's 2 query heads of 8 channels are 16 consecutive o_proj input columns
            name, w = "self_attn.o_proj", dense.model.layers[i].self_attn.o_proj.weight
            cols = [g * 16 + c for g in sorted(set(range(2)) - set(removed)) for c in range(16)]
        want = refit_columns(w.detach(), imp.state(f"model.layers.{i}.{name}.weight"), torch.tensor(cols))
        got = model.model.layers[i].get_submodule(name).weight
        torch.testing.assert_close(got, want[kept_hidden], rtol=1e-5, atol=1e-6)
