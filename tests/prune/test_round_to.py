"""`PruneConfig(round_to=N)`: every width a structured prune cuts (MLP neurons, hidden channels, neurons inside
experts) is kept a multiple of N, the widths tensor cores and group-wise quantization kernels take. On Llama, Phi-3
(fused projections) and Qwen2 (biases) through the public `prune_`, compensation off: the kept widths are multiples
of N, the pruned model equals the dense model with the removed units zeroed, stock transformers reloads it and
generates; `target_params` is met within one aligned step; MoE experts; refusals change and write nothing; the CLI
flag, `sparsity.json` and the card."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, load_importance, prune_, save_pruned
from hf_weightprune.moe import find_moe_blocks
from hf_weightprune.testing import tiny_llama, tiny_moe
from hf_weightprune.tools.cli import main
from hf_weightprune.tools.search import candidate_configs
from tests.collect.test_moe_callback import train as train_moe
from tests.helpers import wanda_units_run

from .test_depth_hidden import zero_channels_
from .test_structure_matrix import (  # noqa: F401 (trained: a fixture)
    _dense,
    _greedy,
    _hidden_step,
    _logits,
    _unchanged,
    _unit_costs,
    _zeroed_reference,
    trained,
)

ARCHS = ["llama", "phi3", "qwen2"]  # split MLP; fused gate_up_proj / qkv_proj; q/k/v biases
WIDTHS = {"neurons": "intermediate_size", "hidden": "hidden_size"}


def _widths(model) -> dict[str, int]:
    return {a: getattr(model.config, key) for a, key in WIDTHS.items()}


# hidden 32, intermediate 48, 4 query heads in 2 KV groups, 4 layers (tests/prune/test_depth_hidden.py)
@pytest.mark.parametrize("structure, budget, n, kept", [
    # 48 - round(0.3 * 48) = 34 neurons: 32 is the nearest multiple of 16
    ("neurons", {"sparsity": 0.3}, 16, {"neurons": 32}),
    # 34 neurons -> 32, 32 - round(0.3 * 32) = 22 channels -> 24 (a multiple of 8, and of the 4 heads)
    ("hidden,neurons", {"sparsity": 0.3}, 8, {"neurons": 32, "hidden": 24}),
    ("layers,heads,neurons,hidden", {"target_params": 0.6}, 8, None),
])
@pytest.mark.parametrize("arch", ARCHS)
def test_kept_widths_are_multiples_and_the_model_is_the_zeroed_dense_one(trained, arch, structure, budget, n, kept,  # noqa: F811
                                                                        tmp_path):
    model, imp = trained(arch)
    dense_widths = _widths(model)
    config = PruneConfig(structure=structure, round_to=n, **budget)
    report = prune_(model, imp, config, progress=False).structured
    assert report["round_to"] == n
    for a, width in _widths(model).items():
        assert width % n == 0 or width == dense_widths[a], (a, width)
        if a in config.structures and kept:
            assert width == kept[a] == report["axes"][a]["after"]
    assert any(report["axes"][a]["after"] < report["axes"][a]["before"] for a in WIDTHS if a in config.structures)
    first = report["axes"]
    if first.get("hidden", {}).get("removed"):
        # hidden pruning is exact for channels that are zero along the residual stream (as the structure matrix)
        again, _ = trained(arch)
        zero_channels_(again, first["hidden"]["removed"])
        assert prune_(again, imp, config, progress=False).structured["axes"] == first
        model = again
    dense, _ = trained(arch)
    want = _logits(_zeroed_reference(dense, first))
    got = _logits(model)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert _widths(stock) == _widths(model)
    torch.testing.assert_close(_logits(stock), got, rtol=1e-5, atol=1e-6)
    tokens = _greedy(model, use_cache=True)
    assert torch.equal(_greedy(stock, use_cache=True), tokens) and torch.equal(_greedy(stock, use_cache=False), tokens)


@pytest.mark.parametrize("structure, target", [("neurons", 0.8), ("hidden", 0.8), ("heads,neurons,hidden", 0.7)])
@pytest.mark.parametrize("arch", ARCHS)
def test_target_params_is_met_within_one_aligned_step(trained, arch, structure, target):  # noqa: F811
    model, imp = trained(arch)
    n = 8
    costs, before = _unit_costs(model), sum(p.numel() for p in model.parameters())
    channels = math.lcm(n, _hidden_step(model.config, model.model.layers[0].self_attn.head_dim))
    step = {"neurons": n * costs["neurons"], "hidden": channels * costs["hidden"], "heads": costs["heads"]}
    config = PruneConfig(structure=structure, target_params=target, round_to=n)
    report = prune_(model, imp, config, progress=False).structured
    after, goal = sum(p.numel() for p in model.parameters()), round(target * before)
    assert report["target_params"] == goal and report["num_parameters"]["after"] == after
    # the rule: one step of the coarsest axis, a step of a width being n units per layer (hidden: also whole heads)
    assert report["target_tolerance"] == max(step[a] for a in config.structures)
    assert abs(after - goal) <= report["target_tolerance"], (after, goal)
    for a in WIDTHS:
        if a in config.structures:
            assert report["axes"][a]["after"] % n == 0 or report["axes"][a]["after"] == report["axes"][a]["before"]
    if structure == "neurons":  # one axis: the aligned width closest to the target, no other
        best = min(range(n, 49, n), key=lambda k: abs(before - (48 - k) * costs["neurons"] - goal))
        assert model.config.intermediate_size == best


# --------------------------------------------------------------------------------------------------- MoE experts


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe")
    model = tiny_moe("mixtral", seed=8, intermediate_size=32)
    train_moe(model, [ImportanceCallback(ImportanceConfig(criterion="wanda"))], folder, max_steps=2)
    model.save_pretrained(folder / "model")
    return folder


def test_expert_widths_are_multiples_of_round_to_and_of_the_kernels_8(moe_run, tmp_path):
    # round_to=4 with the experts kernel's 8: multiples of 8; 32 - round(0.2 * 32) = 26 neurons -> 24
    model = AutoModelForCausalLM.from_pretrained(moe_run / "model").eval()
    dense = AutoModelForCausalLM.from_pretrained(moe_run / "model").eval()
    report = prune_(model, load_importance(moe_run), PruneConfig(structure="neurons", sparsity=0.2, round_to=4),
                    progress=False)
    assert model.config.intermediate_size == 24 and report.structured["units_per_layer"] == {"before": 32, "after": 24}
    for b in find_moe_blocks(dense):  # the dense model with each expert's removed neurons zeroed
        for e, removed in enumerate(report.structured["removed"][b.name]):
            for s in (s for s in b.slices() if s.expert == e):
                w = s.weight()
                if s.proj == "down_proj":
                    w[:, removed] = 0
                else:
                    w[removed] = 0
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    save_pruned(model, tmp_path / "pruned", report=report)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert stock.config.intermediate_size == 24
    out = stock.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert json.loads((tmp_path / "pruned" / "sparsity.json").read_text())["structured"]["round_to"] == 4
    assert ("every width it cut was kept a multiple of 4 (`round_to`: expert intermediate size 24)"
            in (tmp_path / "pruned" / "README.md").read_text())


def test_the_card_states_the_achieved_share_beside_a_sparsity_target_round_to_moved(trained, tmp_path):  # noqa: F811
    """`sparsity=0.3` with `round_to=16` removes 16 of 48 neurons: the Target line says 30% was asked and what was
    removed (without round_to too: 34 of 48 neurons kept is 29.17%, the nearest whole count)."""
    for n, achieved in ((16, "achieved 33.33% of them (48 -> 32 MLP neurons per layer)"), (None, None)):
        model, imp = trained("llama")
        report = prune_(model, imp, PruneConfig(structure="neurons", sparsity=0.3, round_to=n), progress=False)
        save_pruned(model, tmp_path / str(n), report=report)
        target = next(line for line in (tmp_path / str(n) / "README.md").read_text().splitlines()
                      if line.startswith("- **Target**"))
        assert target.startswith("- **Target**: 30.00% of the MLP neurons"), target
        if achieved:
            assert f"30.00% of the MLP neurons, {achieved}; " in target
        else:  # 48 - round(0.3 * 48) = 34 kept: 29.17%, the nearest whole neuron count
            assert "achieved 29.17% of them (48 -> 34 MLP neurons per layer)" in target


# ------------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("kwargs, message", [
    ({"structure": "neurons", "round_to": 0}, r"^round_to must be None or an int >= 1 .*; got 0$"),
    ({"structure": "neurons", "round_to": True}, r"^round_to must be None or an int >= 1 .*; got True$"),
    ({"structure": "neurons", "round_to": 8.0}, r"^round_to must be None or an int >= 1 .*; got 8\.0$"),
    ({"structure": "unstructured", "round_to": 8}, r"^round_to rounds the widths .*structure 'unstructured' cuts none"),
    ({"structure": "2:4", "round_to": 8}, r"^round_to rounds the widths .*structure '2:4' cuts none"),
    ({"structure": "heads", "round_to": 8}, r"^round_to rounds the widths .*structure 'heads' cuts none \(KV groups"),
    ({"structure": "layers,heads", "target_params": 0.5, "round_to": 8}, r"structure 'layers,heads' cuts none"),
    ({"structure": "experts", "round_to": 8}, r"structure 'experts' cuts none"),
])
def test_a_bad_round_to_is_refused_by_the_config(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        PruneConfig(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch, structure, budget, n, message", [
    ("llama", "neurons", {"sparsity": 0.3}, 64,
     r"^round_to=64 is larger than the 48 neurons per layer: no multiple of it is a narrower width$"),
    # 48 - round(0.9 * 48) = 5 neurons: nearer 0 than 16
    ("llama", "neurons", {"sparsity": 0.9}, 16,
     r"^sparsity=0\.9 keeps 5 of 48 neurons per layer, which rounds to 0 as a multiple of 16 \(round_to\); the fewest "
     r"it keeps is 16 \(sparsity=0\.6667\)$"),
    # LlamaConfig wants hidden_size % 4 heads == 0: no multiple of 18 below 32 is one
    ("llama", "hidden,neurons", {"target_params": 0.7}, 18,
     r"^round_to=18: no hidden width below 32 is a multiple of 18 that LlamaConfig accepts$"),
    ("qwen2", "layers,neurons", {"target_params": 0.7}, 49, r"^round_to=49 is larger than the 48 neurons per layer"),
])
def test_a_round_to_no_width_satisfies_is_refused_before_any_change(trained, arch, structure, budget, n,  # noqa: F811
                                                                    message):
    model, imp = trained(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as e:
        prune_(model, imp, PruneConfig(structure=structure, round_to=n, **budget), progress=False)
    assert "\n" not in str(e.value)
    assert _unchanged(model, before) and model.config.num_hidden_layers == 4


def test_an_expert_width_round_to_cannot_reach_is_refused(moe_run):
    model = AutoModelForCausalLM.from_pretrained(moe_run / "model")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^round_to: a multiple of 40 is wider than the 32 neurons per expert"):
        prune_(model, load_importance(moe_run), PruneConfig(structure="neurons", sparsity=0.5, round_to=40))
    assert _unchanged(model, before)


def test_search_candidates_of_counts_only_get_no_round_to():
    base = PruneConfig(structure="neurons", target_params=0.7, round_to=64)
    got = candidate_configs(base, ["layers", "layers,neurons", "heads,hidden"])
    assert [c.round_to for c in got] == [None, 64, 64]


# ------------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A dense training output of a tiny Llama (hidden 32, intermediate 64) with unit statistics."""
    return wanda_units_run(tmp_path_factory.mktemp("roundto") / "run", tiny_llama(seed=2, num_hidden_layers=2))


def test_cli_round_to_end_to_end(run, tmp_path):
    out = tmp_path / "out"
    # 64 - round(0.3 * 64) = 45 neurons: 48 is the nearest multiple of 16
    assert main(["prune", str(run), "--importance", str(run), "--structure", "neurons", "--sparsity", "0.3",
                 "--round_to", "16", "--output_dir", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 48 and model.model.layers[0].mlp.down_proj.in_features == 48
    assert model.generate(torch.randint(3, 128, (1, 6)), max_new_tokens=3, do_sample=False,
                          pad_token_id=0).shape == (1, 9)
    structured = json.loads((out / "sparsity.json").read_text())["structured"]
    assert structured["round_to"] == 16 and structured["config"]["after"]["intermediate_size"] == 48
    card = (out / "README.md").read_text()
    structure_line = next(line for line in card.splitlines() if line.startswith("- **Structure**"))
    assert "every width it cut was kept a multiple of 16 (`round_to`: MLP intermediate size 48)" in structure_line


@pytest.mark.parametrize("argv, message", [
    (["--structure", "heads", "--sparsity", "0.5", "--round_to", "8"], "--round_to rounds the widths"),
    (["--structure", "neurons", "--sparsity", "0.3", "--round_to", "0"], "--round_to must be"),
    (["--structure", "hidden", "--sparsity", "0.3", "--round_to", "18"], "--round_to 18: no hidden width below 32"),
])
def test_cli_refusals_are_one_line_and_write_nothing(run, tmp_path, capsys, argv, message):
    capsys.readouterr()
    assert main(["prune", str(run), "--importance", str(run), *argv, "--output_dir", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_dense_widths_are_kept_by_the_default(trained):  # noqa: F811
    """`round_to=None` is today's behaviour: 48 - round(0.3 * 48) = 34 neurons, a width no multiple of 8 is."""
    model, imp = trained("llama")
    prune_(model, imp, PruneConfig(structure="neurons", sparsity=0.3), progress=False)
    assert model.config.intermediate_size == 34
    assert _dense("llama").config.intermediate_size == 48
