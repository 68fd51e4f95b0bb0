"""Structured neurons inside each expert: `PruneConfig(structure="neurons")` on a mixture-of-experts model through
`prune_`, `save_pruned` and `hf-weightprune prune`. Each expert loses the same number of neurons (one config width),
which ones differs per expert; the fused tensors shrink; stock transformers reloads and generates; refusals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, load_importance, prune_, save_pruned
from hf_weightprune.moe import find_moe_blocks
from hf_weightprune.prune.expert_neurons import remove_expert_neurons_
from hf_weightprune.testing import tiny_moe
from hf_weightprune.tools.cli import main
from tests.collect.test_moe_callback import train

# config key of the routed experts' width; every tiny model here has 32 neurons per expert (kept widths must be
# multiples of 8: 24 at sparsity 0.25, 16 at 0.5)
WIDTH = {"mixtral": ("intermediate_size", 32), "qwen3_moe": ("moe_intermediate_size", 32),
         "gpt_oss": ("intermediate_size", 32), "qwen2_moe": ("moe_intermediate_size", 32)}


# wanda: the inputs routed to each expert; taylor where two steps leave an expert without any routed token
CRITERION = {"mixtral": "wanda", "qwen3_moe": "wanda", "gpt_oss": "taylor", "qwen2_moe": "taylor"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A short fine-tune of each tiny MoE with the callback, and the trained model."""
    out = {}
    for arch in WIDTH:
        folder = tmp_path_factory.mktemp(arch)
        model = tiny_moe(arch, seed=8, **{WIDTH[arch][0]: 32})
        train(model, [ImportanceCallback(ImportanceConfig(criterion=CRITERION[arch]))], folder, max_steps=2)
        model.save_pretrained(folder / "model")
        out[arch] = folder
    return out


def _ids(n=2, length=9):
    return torch.randint(3, 64, (n, length), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _brute_force_removed(slices, scores, n_remove):
    """Per expert, the `n_remove` neurons of lowest summed normalised score (gate row + up row + down column)."""
    total = None
    for s in slices:
        score = scores[s.name].double()
        score = score / score.abs().mean()
        per_neuron = score.sum(0) if s.proj == "down_proj" else score.sum(1)
        total = per_neuron if total is None else total + per_neuron
    return sorted(torch.sort(total, stable=True).indices[:n_remove].tolist())


@pytest.mark.parametrize("arch", sorted(WIDTH))
def test_pruned_model_equals_the_dense_model_with_those_neurons_zeroed(arch, runs, tmp_path):
    run, (key, width) = runs[arch], WIDTH[arch]
    imp = load_importance(run)
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    dense = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    imp.bind(model)
    scores = {n: s.clone() for n, s in imp.scores.items()}
    other_width = {k: getattr(model.config, k, None) for k in ("intermediate_size", "shared_expert_intermediate_size")
                   if k != key}
    report = prune_(model, imp, PruneConfig(structure="neurons", sparsity=0.25), progress=False)
    n_remove = width // 4
    structured = report.structured
    assert structured["unit"] == "expert_neuron" and structured["units_per_layer"] == {"before": width,
                                                                                       "after": width - n_remove}
    assert getattr(model.config, key) == width - n_remove
    assert {k: getattr(model.config, k, None) for k in other_width} == other_width  # dense / shared widths kept
    blocks = find_moe_blocks(dense)
    for b in blocks:
        removed = structured["removed"][b.name]
        assert len(removed) == 4 and all(len(r) == n_remove for r in removed)
        assert len({tuple(r) for r in removed}) > 1  # which neurons go differs per expert
        for e, r in enumerate(removed):
            slices = [s for s in b.slices() if s.expert == e]
            assert r == _brute_force_removed(slices, scores, n_remove), (b.name, e)
            assert sorted(r + structured["kept"][b.name][e]) == list(range(width))
            for s in slices:  # zero neuron j of expert e in the dense model: gate/up row j, down column j
                w = s.weight()
                if s.proj == "down_proj":
                    w[:, r] = 0
                else:
                    w[r] = 0
                    bias = getattr(b.experts, "gate_up_proj_bias", None)
                    if bias is not None:  # gpt-oss: the neuron's gate/up biases go with it (interleaved rows)
                        offset = 0 if s.proj == "gate_proj" else 1
                        bias.data[e, [2 * j + offset for j in r]] = 0
    params = structured["num_parameters"]
    assert params["after"] == sum(p.numel() for p in model.parameters()) < params["before"]
    assert report.model_sparsity == pytest.approx(1 - params["after"] / params["before"])
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(dense, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_stock_reload_gives_equal_logits_and_generates(arch, runs, tmp_path):
    run, (key, width) = runs[arch], WIDTH[arch]
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    report = prune_(model, load_importance(run), PruneConfig(structure="neurons", sparsity=0.5), progress=False)
    save_pruned(model, tmp_path / "pruned", report=report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert getattr(reloaded.config, key) == width // 2
    ids = _ids()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)
    outs = [reloaded.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=cache)
            for cache in (True, False)]
    assert outs[0].shape == (1, 15) and torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0))
    saved = json.loads((tmp_path / "pruned" / "sparsity.json").read_text())
    assert saved["structure"] == "neurons" and saved["structured"]["unit"] == "expert_neuron"
    assert saved["structured"]["config"] == {"before": {key: width}, "after": {key: width // 2}}
    assert saved["structured"]["removed"] == report.structured["removed"]
    card = (tmp_path / "pruned" / "README.md").read_text()
    params = report.structured["num_parameters"]
    assert f"| Expert intermediate size | {width} | {width // 2} |" in card
    assert f"{params['before']:,}" in card and f"{params['after']:,}" in card
    assert "the same number of neurons removed in every expert of every MoE layer (which ones differs per expert" in card


def _state(model):
    return {n: p.clone() for n, p in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_all_neurons_of_an_expert_is_refused_by_name_and_nothing_changes():
    model = tiny_moe("mixtral", seed=9)
    before = _state(model)
    remove = {"model.layers.0.mlp": [[0], list(range(48)), [1], [2]], "model.layers.1.mlp": [[0]] * 4}
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.experts\.1: removing all 48 intermediate neurons "
                                         r"of the expert$"):
        remove_expert_neurons_(model, remove)
    assert _unchanged(model, before) and model.config.intermediate_size == 48


@pytest.mark.parametrize("remove, message", [
    ({"model.layers.0.mlp": [[0, 1], [0], [0], [0]], "model.layers.1.mlp": [[0]] * 4},
     r"^config: one expert width for every expert; remove the same number of neurons from each expert of every MoE "
     r"layer \(asked: \[1, 2\]\)$"),
    ({"model.layers.0.mlp": [[0]] * 4}, r"^config: one expert width .* \(asked: \[0, 1\]\)$"),
    ({"model.layers.0.mlp": [[48]] * 4, "model.layers.1.mlp": [[0]] * 4},
     r"^model\.layers\.0\.mlp\.experts\.0: neuron indices must be distinct and in \[0, 48\), got \[48\]$"),
    ({"model.layers.7.mlp": [[0]] * 4}, r"^model\.layers\.7\.mlp: not an MoE block of this model"),
])
def test_bad_neuron_lists_are_one_line_and_nothing_changes(remove, message):
    model = tiny_moe("mixtral", seed=9)
    before = _state(model)
    with pytest.raises(ValueError, match=message) as e:
        remove_expert_neurons_(model, remove)
    assert "\n" not in str(e.value) and _unchanged(model, before)


def test_a_width_the_config_cannot_hold_is_refused(runs):
    """No config key holds the experts' width (here, a config edited by hand): nothing to record the new width in."""
    model = AutoModelForCausalLM.from_pretrained(runs["mixtral"] / "model")
    imp = load_importance(runs["mixtral"])
    model.config.intermediate_size = 40
    before = _state(model)
    with pytest.raises(ValueError, match=r"^config: no expert width \(moe_intermediate_size / intermediate_size\) "
                                         r"equal to the experts' 32 neurons to record the smaller model in$"):
        prune_(model, imp, PruneConfig(structure="neurons", sparsity=0.25))
    assert _unchanged(model, before)


@pytest.mark.parametrize("config, message", [
    (PruneConfig(structure="neurons", sparsity=0.99),
     r"^sparsity=0\.99 would remove 32 of 32 neurons of every expert; at least one must remain$"),
    (PruneConfig(structure="neurons", sparsity=0.1),  # 29 kept: transformers' grouped_mm kernel would fail on them
     r"^model\.layers\.0\.mlp\.experts\.down_proj: 29 neurons per expert; keep a multiple of 8 \(of 32: \[8, 16, 24\]\): "
     r"transformers' default experts kernel \(grouped_mm\) needs rows of a multiple of 16 bytes"),
    (PruneConfig(structure="neurons,heads", sparsity=0.25),
     r"^structure='neurons,heads' on a mixture-of-experts model: only structure='neurons' alone"),
    (PruneConfig(structure="neurons", target_params=0.8),
     r"^structure='neurons' on a mixture-of-experts model: only structure='neurons' alone, with a sparsity"),
])
def test_prune_refusals_are_one_line_and_nothing_changes(config, message, runs):
    model = AutoModelForCausalLM.from_pretrained(runs["mixtral"] / "model")
    before = _state(model)
    with pytest.raises(ValueError, match=message) as e:
        prune_(model, load_importance(runs["mixtral"]), config)
    assert "\n" not in str(e.value) and _unchanged(model, before)


def test_cli_structure_neurons_on_an_moe_writes_a_smaller_checkpoint(runs, tmp_path):
    run = runs["qwen3_moe"]
    assert main(["prune", str(run / "model"), "--importance", str(run), "--structure", "neurons", "--sparsity", "0.25",
                 "--output_dir", str(tmp_path / "out")]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.moe_intermediate_size == 24 and reloaded.config.intermediate_size == 48
    experts = reloaded.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (4, 48, 32) and tuple(experts.down_proj.shape) == (4, 32, 24)
    assert json.loads((tmp_path / "out" / "sparsity.json").read_text())["structured"]["units_per_layer"] == {
        "before": 32, "after": 24}


def _shared_from_moe_width(arch):
    """A tiny DeepSeek-V3 or GLM-4-MoE: their shared experts are `moe_intermediate_size * n_shared_experts` wide, so
    the key that holds the routed experts' width also sizes the shared experts."""
    from transformers import DeepseekV3Config, Glm4MoeConfig

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
                  num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1)
    if arch == "deepseek_v3":
        config = DeepseekV3Config(**common, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8,
                                  qk_nope_head_dim=8)
    else:
        config = Glm4MoeConfig(**common, head_dim=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe"])
def test_shared_experts_sized_by_the_expert_width_are_refused_before_any_change(arch, tmp_path):
    """Shrinking `moe_intermediate_size` would shrink the shared experts as stock transformers rebuilds them, which the
    prune keeps whole: the saved checkpoint would not reload (size mismatch). Refused in one line, nothing changed."""
    model = _shared_from_moe_width(arch)
    assert find_moe_blocks(model)
    before = _state(model)
    remove = {b.name: [list(range(8))] * b.num_experts for b in find_moe_blocks(model)}
    with pytest.raises(ValueError, match=r"^config\.moe_intermediate_size: \w+Config also sizes the shared experts "
                                         r"\(moe_intermediate_size \* n_shared_experts = 32\)") as e:
        remove_expert_neurons_(model, remove)
    assert "\n" not in str(e.value) and _unchanged(model, before) and model.config.moe_intermediate_size == 32
