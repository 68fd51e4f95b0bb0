"""`target_params` with hidden channels in the structure (issue 25): the kept count is as close to the target as the
units' sizes allow, never more than one step of the coarsest axis off; the exact count `prune/budget.py` plans with
equals the parameters of the stock model class built with the pruned sizes; the newcomer's case, pinned."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, prune_
from hf_weightprune.layouts import decoder_layers
from hf_weightprune.prune.budget import ParamCount
from hf_weightprune.testing import tiny_llama
from tests.helpers import train

from .test_depth_hidden import ARCHS, COMMON
from .test_structure_matrix import _dense, _hidden_step, _unit_costs, trained  # noqa: F401 (a fixture)

WITH_HIDDEN = ["hidden", "layers,hidden", "heads,hidden", "neurons,hidden", "layers,heads,hidden",
               "layers,neurons,hidden", "heads,neurons,hidden", "layers,heads,neurons,hidden"]


def _head_dim(arch: str) -> int:
    return ARCHS[arch][2].get("head_dim", COMMON["hidden_size"] // COMMON["num_attention_heads"])


def _stock_count(arch: str, layers: int, hidden: int, neurons: int, groups: int) -> int:
    """Parameters of the stock model class with these sizes, built on the meta device: the reference, not the code's
    own arithmetic. 4 query heads in 2 KV groups, as the dense models here."""
    model_cls, config_cls, extra = ARCHS[arch]
    sizes = dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=neurons, num_key_value_heads=groups,
                 num_attention_heads=2 * groups, head_dim=_head_dim(arch))
    kwargs = {**COMMON, **extra, **sizes}
    if arch == "qwen3":
        kwargs["max_window_layers"] = min(kwargs["max_window_layers"], layers)
    with torch.device("meta"):
        model = model_cls(config_cls(**kwargs))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "llama_tied_bias", "qwen3", "gemma2", "gemma3"])
def test_the_planned_count_is_the_stock_model_of_those_sizes(arch):
    dense = _dense(arch)
    count = ParamCount.of(dense, ("layers", "heads", "neurons", "hidden"))
    assert count.after({}, []) == _stock_count(arch, 4, 32, 48, 2) == sum(p.numel() for p in dense.parameters())
    for dropped, heads, neurons, hidden in [([1], 0, 0, 0), ([], 1, 0, 0), ([], 0, 7, 0), ([], 0, 0, 8),
                                            ([0, 3], 1, 20, 12), ([2], 0, 47, 28)]:
        got = count.after({"heads": heads, "neurons": neurons, "hidden": hidden}, dropped)
        assert got == _stock_count(arch, 4 - len(dropped), 32 - hidden, 48 - neurons, 2 - heads), (dropped, heads)


def _closest(arch: str, target: int, axes: tuple[str, ...], dense) -> int:
    """The smallest |kept - target| any sizes the dense config accepts reach (neurons: every size; hidden: multiples
    of the head count), by brute force over the stock model class."""
    step = _hidden_step(dense.config, _head_dim(arch))
    layer_opts = range(1, 5) if "layers" in axes else [4]
    group_opts = [1, 2] if "heads" in axes else [2]
    hidden_opts = range(step, 33, step) if "hidden" in axes else [32]
    neuron_opts = range(1, 49) if "neurons" in axes else [48]
    best = None
    for layers, groups, hidden in itertools.product(layer_opts, group_opts, hidden_opts):
        base, per = _stock_count(arch, layers, hidden, 48, groups), None
        if len(neuron_opts) > 1:  # the count is linear in the neurons: two points give every size
            per = base - _stock_count(arch, layers, hidden, 47, groups)
        for n in neuron_opts:
            kept = base - (48 - n) * per if per else base
            best = abs(kept - target) if best is None else min(best, abs(kept - target))
    return best


@pytest.mark.parametrize("structure", WITH_HIDDEN)
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_budget_with_hidden_channels_is_met_as_closely_as_the_sizes_allow(trained, arch, structure):  # noqa: F811
    model, imp = trained(arch)
    dense_config = model.config
    before = sum(p.numel() for p in model.parameters())
    costs = _unit_costs(model)
    axes = PruneConfig(structure=structure, target_params=0.75).structures
    report = prune_(model, imp, PruneConfig(structure=structure, target_params=0.75), progress=False).structured
    after, target = sum(p.numel() for p in model.parameters()), round(0.75 * before)
    assert report["num_parameters"]["after"] == after and report["target_params"] == target
    # the rule: one step of the coarsest axis of the structure (a hidden step is a head count of channels)
    steps = {a: costs[a] * (_hidden_step(dense_config, _head_dim(arch)) if a == "hidden" else 1) for a in axes}
    assert abs(after - target) <= max(steps.values()) == report["target_tolerance"], (after, target, steps)
    # as close as the sizes allow: the count itself is what the stock class of the pruned sizes holds
    cfg = model.config
    assert after == _stock_count(arch, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                                 cfg.num_key_value_heads)
    if "neurons" in axes:  # the filling axis: within half a neuron (in every layer) of the target
        neuron = 3 * cfg.hidden_size * cfg.num_hidden_layers
        assert abs(after - target) <= neuron / 2, (after, target, neuron)
    else:  # coarse axes only: no sizes reach closer
        assert abs(after - target) == _closest(arch, target, axes, _dense(arch))


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    """The newcomer's model: a 4-layer tiny Llama of 57,632 parameters, 3 Trainer steps with unit statistics."""
    model = tiny_llama(vocab_size=320, num_hidden_layers=4)
    cb = ImportanceCallback(ImportanceConfig(units=True))
    train(model, [cb], tmp_path_factory.mktemp("newcomer"), max_steps=3)
    return model.eval(), cb.importance()


@pytest.mark.parametrize("structure, kept, sizes", [
    # hidden's smallest step (4 channels) costs 7,204 parameters: the neurons meet the budget, as neurons alone do
    ("hidden,neurons", 46_112, {"neurons": 34, "hidden": 32}),
    ("neurons", 46_112, {"neurons": 34}),
    ("hidden", 43_224, {"hidden": 24}),  # 24 channels is 2,882 under, 28 would be 4,322 over
    ("layers,hidden,neurons", 46_112, {"layers": 4, "neurons": 34, "hidden": 32}),
])
def test_the_newcomers_budget(newcomer, caplog, structure, kept, sizes):
    dense, imp = newcomer
    model = copy.deepcopy(dense)
    assert sum(p.numel() for p in model.parameters()) == 57_632
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.prune.budget"):
        report = prune_(model, imp, PruneConfig(structure=structure, target_params=0.8), progress=False).structured
    assert report["target_params"] == 46_106
    assert report["num_parameters"]["after"] == sum(p.numel() for p in model.parameters()) == kept
    assert {a: v["after"] for a, v in report["axes"].items()} == sizes
    warned = [r.getMessage() for r in caplog.records if "removes nothing" in r.getMessage()]
    expected = [f"target_params=0.8: structure axis {a!r} removes nothing: its smallest step ({step}) would meet "
                "the budget less closely; neurons take it"
                for a, step in (("layers", "1 decoder layer, 9,280 parameters"),
                                ("hidden", "4 hidden channels, 7,204 parameters"))
                if "," in structure and a in structure]  # asked for by name, left uncut: said so, once each
    assert warned == expected


@pytest.mark.parametrize("structure, target, axis, step, filler", [
    ("layers,heads,neurons", 0.65, "heads", "1 KV group, 6,144 parameters", "decoder layers and neurons"),
    # the filler (KV groups) ends at its dense count: the layer took the budget, and the warning says so
    ("layers,heads,hidden", 0.85, "hidden", "2 hidden channels, 7,204 parameters", "decoder layers"),
    ("layers,heads,hidden", 0.75, "hidden", "2 hidden channels, 7,204 parameters", "decoder layers and KV groups"),
])
def test_an_axis_that_removes_nothing_is_warned_about_once_in_its_own_number(newcomer, caplog, structure, target,
                                                                              axis, step, filler):
    # These splits remove a layer, so the budget is planned again on the layers kept; each plan left `axis` uncut,
    # which was said once per plan, and a step of one KV group read "1 KV groups".
    dense, imp = newcomer
    model = copy.deepcopy(dense)
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.prune.budget"):
        report = prune_(model, imp, PruneConfig(structure=structure, target_params=target), progress=False).structured
    assert report["axes"]["layers"]["after"] == 3 and report["axes"][axis]["after"] == report["axes"][axis]["before"]
    warned = [r.getMessage() for r in caplog.records if "removes nothing" in r.getMessage()]
    assert warned == [f"target_params={target}: structure axis {axis!r} removes nothing: its smallest step ({step}) "
                      f"would meet the budget less closely; {filler} take it"]


def test_a_budget_beyond_the_finest_axis_is_refused_before_any_change(newcomer):
    dense, imp = newcomer
    model = copy.deepcopy(dense)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^target_params=0\.05 cannot be met with neurons\+hidden: it would empty") as e:
        prune_(model, imp, PruneConfig(structure="hidden,neurons", target_params=0.05), progress=False)
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert len(decoder_layers(model)) == 4


@pytest.mark.parametrize("structure, target", [("layers", 0.95), ("neurons", 0.9999), ("layers,hidden,neurons", 0.9999)])
def test_a_budget_nearer_the_dense_model_than_any_prune_is_refused_before_any_change(newcomer, structure, target):
    # Such a budget was met by removing nothing: a copy of the dense model, saved and reported as pruned to it.
    dense, imp = newcomer
    model = copy.deepcopy(dense)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^target_params={target} keeps .* nothing would be removed") as e:
        prune_(model, imp, PruneConfig(structure=structure, target_params=target), progress=False)
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.config.to_dict() == dense.config.to_dict()
    # one neuron per layer less is the smallest prune: a budget just below it still prunes
    one = 57_632 - 4 * 3 * 32
    report = prune_(copy.deepcopy(dense), imp, PruneConfig(structure="neurons", target_params=one), progress=False)
    assert report.structured["num_parameters"]["after"] == one
