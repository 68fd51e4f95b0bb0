"""Whole-expert removal from the router statistics saved while training: `PruneConfig(structure="experts")` through
`prune_`, `save_pruned` and `hf-weightprune prune`, a smaller checkpoint stock transformers reloads, and refusals."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, load_importance, prune_, save_pruned
from hf_weightprune.moe import find_moe_blocks
from hf_weightprune.testing import tiny_moe
from hf_weightprune.tools.cli import main
from tests.collect.test_moe_callback import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A short fine-tune of each tiny MoE with the callback (its importance holds the router statistics)."""
    out = {}
    for arch in ("mixtral", "qwen3_moe"):
        folder = tmp_path_factory.mktemp(arch)
        model = tiny_moe(arch, seed=7)
        train(model, [ImportanceCallback(ImportanceConfig(criterion="magnitude"))], folder, max_steps=3)
        model.save_pretrained(folder / "model")
        out[arch] = folder
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_experts_with_the_fewest_routed_tokens_go_and_stock_transformers_reloads_the_model(arch, runs, tmp_path):
    run = runs[arch]
    imp = load_importance(run)
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    key = next(k for k in ("num_local_experts", "num_experts") if k in model.config.to_dict())  # as config.json
    tokens = {b: stats["tokens"] for b, stats in imp.sections["router"].items()}
    report = prune_(model, imp, PruneConfig(structure="experts", sparsity=0.5), progress=False)
    assert getattr(model.config, key) == 2 and all(b.num_experts == 2 for b in find_moe_blocks(model))
    for block, removed in report.structured["removed"].items():
        counts = tokens[block]
        kept = report.structured["kept"][block]
        assert sorted(removed + kept) == [0, 1, 2, 3]
        assert max(counts[e] for e in removed) <= min(counts[e] for e in kept), (block, counts)
    params = report.structured["num_parameters"]
    assert params["after"] == sum(p.numel() for p in model.parameters()) < params["before"]
    assert report.model_sparsity == pytest.approx(1 - params["after"] / params["before"])
    # in memory too: the load-balancing loss reads the model's own expert count
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(input_ids=ids, labels=ids, output_router_logits=True).aux_loss)
    save_pruned(model, tmp_path / "pruned", report=report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert getattr(reloaded.config, key) == 2
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)
    generated = reloaded.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 14)
    saved = json.loads((tmp_path / "pruned" / "sparsity.json").read_text())
    assert saved["structure"] == "experts"
    assert saved["structured"]["config"] == {"before": {key: 4}, "after": {key: 2}}
    assert saved["structured"]["num_parameters"] == params
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "whole-expert pruning" in card and f"{params['before']:,}" in card and f"{params['after']:,}" in card
    assert "| Experts per layer | 4 | 2 |" in card and "arXiv:2402.14800" in card
    assert "not used for whole experts, which are ranked by the tokens their router sent them during training" in card
    # the criterion chose nothing: its paper is not cited, and the target is a share of the experts
    assert "1506.02626" not in card and "**Target**: 50.00% of the experts;" in card
    # per module type, the expert tensors as the folder names them (Mixtral's files: block_sparse_moe.experts.N.w1),
    # grouped across experts, half of each removed
    rows = re.findall(r"^\| `([^`]*experts[^`]*)` \| \d+ \| [\d,]+ \| 50\.00% \|$", card, flags=re.M)
    assert len(rows) == 3 and not any(re.search(r"\.\d+\.", r) for r in rows), rows


@pytest.mark.parametrize("sparsity, message", [
    (0.75, r"^model\.layers\.0\.mlp\.gate: 1 expert left, fewer than top-k num_experts_per_tok=2$"),
    (0.99, r"^model\.layers\.0\.mlp\.gate: removing all 4 experts of the layer$"),
])
def test_too_many_experts_removed_is_one_line_and_nothing_changes(sparsity, message, runs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(runs["mixtral"] / "model")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        prune_(model, load_importance(runs["mixtral"]), PruneConfig(structure="experts", sparsity=sparsity))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert model.config.num_local_experts == 4


def test_all_experts_of_a_layer_is_refused_by_name():
    from hf_weightprune.prune.experts import remove_experts_

    model = tiny_moe("mixtral")
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.gate: removing all 4 experts of the layer$"):
        remove_experts_(model, {"model.layers.0.mlp": [0, 1, 2, 3], "model.layers.1.mlp": [0, 1, 2, 3]})


def test_importance_without_router_statistics_is_refused(runs):
    model = AutoModelForCausalLM.from_pretrained(runs["mixtral"] / "model")
    imp = load_importance(runs["mixtral"])
    imp.sections.pop("router")
    with pytest.raises(ValueError, match=r"^structure='experts' removes the experts the routers used least during "
                                         r"training, but this importance has no router statistics"):
        prune_(model, imp, PruneConfig(structure="experts", sparsity=0.5))
    assert model.config.num_local_experts == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"scope": "row"}, "structure 'experts' removes the same number of experts from every MoE layer: use scope='layer'"),
    ({"target_modules": ["experts"]}, "structure 'experts' removes whole experts from every MoE layer: target_modules"),
])
def test_config_refuses_what_does_not_apply_to_whole_experts(kwargs, message):
    with pytest.raises(ValueError, match="^" + message):
        PruneConfig(structure="experts", sparsity=0.5, **kwargs)


def test_cli_structure_experts_writes_a_smaller_checkpoint(runs, tmp_path):
    run = runs["qwen3_moe"]
    assert main(["prune", str(run / "model"), "--importance", str(run), "--structure", "experts", "--sparsity", "0.25",
                 "--output_dir", str(tmp_path / "out")]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_experts == reloaded.config.num_local_experts == 3
    assert json.loads((tmp_path / "out" / "sparsity.json").read_text())["structured"]["units_per_layer"] == {
        "before": 4, "after": 3}


def test_cli_refusal_is_one_line_and_writes_nothing(runs, tmp_path, capsys):
    run = runs["mixtral"]
    assert main(["prune", str(run / "model"), "--importance", str(run), "--structure", "experts", "--sparsity", "0.75",
                 "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.layers.0.mlp.gate: 1 expert left, fewer than top-k" in err[0], err
    assert not (tmp_path / "out").exists()


def test_inspect_shows_the_router_statistics(runs, capsys):
    run = runs["mixtral"]
    section = load_importance(run).sections["router"]
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "router statistics per MoE layer" in out
    stats = section["model.layers.1.mlp"]
    line = next(s for s in out.splitlines() if s.startswith("model.layers.1.mlp  seen"))
    share = 100 * stats["tokens"][3] / sum(stats["tokens"])
    assert line.startswith(f"model.layers.1.mlp  seen {stats['seen']}  0: {stats['tokens'][0]} (")
    assert f"3: {stats['tokens'][3]} ({share:.1f}%, {stats['gate_mass'][3]:.4g})" in line


# prune_checkpoint of an MoE (file to file; refused for experts stored fused): tests/publish/test_moe_checkpoint.py


def test_cli_unstructured_prune_of_an_moe_runs_in_memory_and_halves_every_expert(runs, tmp_path):
    run = runs["qwen3_moe"]
    assert main(["prune", str(run / "model"), "--importance", str(run), "--sparsity", "0.5",
                 "--output_dir", str(tmp_path / "out")]) == 0
    experts = AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers[1].mlp.experts
    for e in range(4):
        for w in (experts.gate_up_proj[e, :24], experts.gate_up_proj[e, 24:], experts.down_proj[e]):
            assert float((w == 0).float().mean()) == 0.5


def _grouped_deepseek(tmp_path):
    """A tiny DeepSeek-V3 whose router picks 2 of n_group=2 contiguous groups of 4 experts, trained a few steps."""
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                              n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=2,
                              first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                              v_head_dim=8, qk_nope_head_dim=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    cb = ImportanceCallback(ImportanceConfig(criterion="magnitude"))
    train(model, [cb], tmp_path / "run", max_steps=3)
    return model, cb.importance()


def test_a_grouped_router_loses_the_same_number_of_experts_in_each_group(tmp_path):
    """DeepSeek-V3 routes within `n_group` contiguous groups of experts: removing the least-routed experts of the whole
    layer could take three from one group and one from the other, and the smaller model's router would regroup the
    experts it kept (a model no dense one with experts masked equals). Each group loses the same number, its own
    least-routed ones; `remove_experts_` refuses an uneven removal in one line before any change."""
    from hf_weightprune.prune.experts import remove_experts_, router_scores

    model, imp = _grouped_deepseek(tmp_path)
    blocks = find_moe_blocks(model)
    scores = router_scores(imp, blocks)
    report = prune_(model, imp, PruneConfig(structure="experts", sparsity=0.5), progress=False)
    for name, removed in report.structured["removed"].items():
        assert [sum(1 for i in removed if i // 4 == g) for g in (0, 1)] == [2, 2]
        for g in (0, 1):  # inside each group, its two least-routed experts
            group = scores[name][4 * g:4 * g + 4]
            assert sorted(i - 4 * g for i in removed if i // 4 == g) == sorted(
                torch.argsort(group, stable=True)[:2].tolist())
    assert model.config.n_routed_experts == 4
    model2, _ = _grouped_deepseek(tmp_path / "b")
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    uneven = {b.name: [0, 4, 5, 6] for b in find_moe_blocks(model2)}
    with pytest.raises(ValueError, match=r"n_group=2 routes 4 contiguous experts per group; remove the same number "
                                         r"from each \(asked: \[1, 3\]\)") as e:
        remove_experts_(model2, uneven)
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model2.state_dict().items())
