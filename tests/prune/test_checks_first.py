"""Structured `prune_` checks every precondition of every axis and compensation before its first change: each refusal
is one line and leaves the model bit-identical (weights, buffers, module tree and config), also where a later axis or
the compensation of a later layer is what fails after an earlier axis would already have been removed."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, prune_
from hf_weightprune.prune.compensate import refit_columns, refit_mean
from hf_weightprune.testing import tiny_llama
from tests.helpers import train
from tests.test_architectures import build


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict(),
            [(n, type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False))) for n, m in model.named_modules()])


def _refused(model, imp, config, match):
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match) as e:
        prune_(model, imp, config, progress=False)
    assert "\n" not in str(e.value)
    state, cfg, tree = _snapshot(model)
    assert tree == before[2] and cfg == before[1]
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    return str(e.value)


def _sparsegpt(tmp_path, *, exclude=None, steps=4, batch=4, n=48, **model_kw):
    model = tiny_llama(seed=1, **{"num_hidden_layers": 4, **model_kw})
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", units=True, exclude_modules=exclude))
    train(model, [cb], tmp_path, max_steps=steps, batch=batch, n=n, lr=0.0)
    return model.eval(), cb.importance()


@pytest.mark.parametrize("structure", [("layers", "heads", "neurons"), ("heads", "neurons"), "neurons",
                                       ("neurons", "hidden"), ("layers", "heads", "neurons", "hidden")])
def test_refit_without_one_consumers_hessian_is_refused_before_layers_or_heads_go(structure, tmp_path):
    # The last layer's down_proj is not tracked: before, layers and KV groups were removed, then the refit raised.
    model, imp = _sparsegpt(tmp_path, exclude=r".*layers\.3\.mlp\.down_proj")
    budget = dict(target_params=0.7) if isinstance(structure, tuple) else dict(sparsity=0.5)
    config = PruneConfig(structure=structure, compensate="refit", **budget)
    message = _refused(model, imp, config, r"compensate='refit' needs the input Hessian of model\.layers\.3\.mlp\.")
    assert "ImportanceConfig(criterion='sparsegpt')" in message


def test_refit_of_a_layer_that_depth_pruning_removes_needs_no_hessian(tmp_path):
    # Only the consumers of the layers that stay are refit: a dropped layer's missing Hessian is no reason to refuse.
    model, imp = _sparsegpt(tmp_path, exclude=r".*layers\.3\.mlp\.down_proj")
    scores = imp.unit_scores()["layers"]
    weakest = int(torch.argmin(scores))
    model2, imp2 = _sparsegpt(tmp_path / "b", exclude=rf".*layers\.{weakest}\.mlp\.down_proj")
    report = prune_(model2, imp2, PruneConfig(structure=("layers", "neurons"), target_params=0.7, compensate="refit"),
                    progress=False)
    assert weakest in report.structured["axes"]["layers"]["removed"]


def test_refit_from_fewer_tokens_than_inputs_is_refused_and_says_how_many(tmp_path):
    # 1 step of 2 x 16 tokens: 32 tokens for down_proj's 64 inputs, a singular Hessian.
    model, imp = _sparsegpt(tmp_path, steps=1, batch=2, n=2)
    message = _refused(model, imp, PruneConfig(structure=("layers", "neurons"), target_params=0.7,
                                               compensate="refit"),
                       r"gathered over 32 tokens, fewer than its 64 inputs, so it is singular")
    assert "gather it over more tokens (at least 256 advised) or use compensate=None" in message


def test_refit_from_few_tokens_per_input_warns_once(tmp_path, caplog):
    model, imp = _sparsegpt(tmp_path, steps=2, batch=4, n=8)  # 128 tokens: 2 per down_proj input, 4 per o_proj input
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.prune.structured"):
        prune_(model, imp, PruneConfig(structure=("heads", "neurons"), target_params=0.7, compensate="refit"),
               progress=False)
    warned = [r.getMessage() for r in caplog.records if "tokens per input" in r.getMessage()]
    assert len(warned) == 1 and "over 128 tokens for 64 inputs" in warned[0] and "(and 3 more modules)" in warned[0]


def test_refit_from_few_tokens_per_input_in_two_modules_says_one_more_module(tmp_path, caplog):
    model, imp = _sparsegpt(tmp_path, steps=2, batch=4, n=8, num_hidden_layers=2)  # two down_proj, both flagged
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.prune.structured"):
        prune_(model, imp, PruneConfig(structure="neurons", sparsity=0.5, compensate="refit"), progress=False)
    warned = [r.getMessage() for r in caplog.records if "tokens per input" in r.getMessage()]
    assert len(warned) == 1 and warned[0].endswith("(and 1 more module)")


def test_depth_then_hidden_with_shared_embeddings_is_refused_before_the_layers_go(tmp_path):
    # hidden pruning's module checks run with its cost, before the budget, so before depth pruning too
    model, imp = _sparsegpt(tmp_path)
    model.extra = torch.nn.Embedding(128, 32)  # reads the embedding tensor too: hidden pruning would resize it
    model.extra.weight = model.model.embed_tokens.weight
    _refused(model, imp, PruneConfig(structure=("layers", "hidden"), sparsity=0.5), "shared with extra.weight")


def test_mean_compensation_adds_no_bias_before_a_depth_refusal(tmp_path):
    model = build("gemma3")
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda", units=True))
    train(model, [cb], tmp_path, max_steps=2)
    model.eval()
    # The config no longer describes the modules, so remove_layers_ refuses; before, attention_bias was already set
    # and zero o/q/k/v biases added.
    model.config.layer_types = ["full_attention"] * model.config.num_hidden_layers
    _refused(model, cb.importance(), PruneConfig(structure=("layers", "heads"), sparsity=0.5, compensate="mean"),
             "would reload as layer 0 with other attention kind")


@pytest.mark.parametrize("structure", ["layers", "hidden"])
def test_refit_for_a_structure_with_no_neuron_or_kv_group_is_refused_before_any_change(structure, tmp_path):
    # Refit serves the consumers of removed neurons / KV groups only: before, a layers- or hidden-only prune with it
    # ran, refitted nothing, and still wrote compensation "refit" into sparsity.json.
    model, imp = _sparsegpt(tmp_path)
    message = _refused(model, imp, PruneConfig(structure=structure, sparsity=0.25, compensate="refit"),
                       rf"compensate='refit' refits the consumers .* structure '{structure}' removes neither")
    assert message.endswith("use compensate=None")


def test_search_candidates_get_the_compensation_only_where_it_serves(tmp_path):
    # As round_to: one --compensate for every candidate, dropped for those it would be refused for (layers, hidden).
    from hf_weightprune.tools.cli import build_parser
    from hf_weightprune.tools.cli_args import search_candidates
    from hf_weightprune.tools.search import candidate_configs

    structures = ["layers", "hidden", "layers,neurons", "heads", "hidden,neurons"]
    base = PruneConfig(structure="neurons", target_params=0.8, compensate="refit")
    assert [c.compensate for c in candidate_configs(base, structures)] == [None, None, "refit", "refit", "refit"]
    calibration = tmp_path / "train.txt"
    calibration.write_text("In the beginning God created the heaven and the earth.\n")
    args = build_parser().parse_args(["prune", "m", "--importance", "m", "--target_params", "0.8", "--compensate",
                                      "refit", "--calibration", str(calibration), "--output_dir", "o",
                                      "--search_structures", *structures])
    _, candidates = search_candidates(args, PruneConfig)
    assert [c.compensate for c in candidates] == [None, None, "refit", "refit", "refit"]


@pytest.mark.parametrize("structure", ["neurons", "heads"])
def test_a_chosen_unit_statistic_the_importance_lacks_is_refused_before_any_change(structure, tmp_path):
    # Without unit statistics neurons and KV groups rank by their weights' scores: right for the default, but a
    # unit_statistic asked for by name was silently replaced by that ranking (and sparsity.json recorded none).
    model = tiny_llama(seed=1, num_hidden_layers=2)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    train(model, [cb], tmp_path, max_steps=2, lr=0.0)
    imp = cb.importance()
    for statistic in ("taylor", "activation_l2"):
        config = PruneConfig(structure=structure, sparsity=0.5, unit_statistic=statistic)
        message = _refused(model.eval(), imp, config, rf"unit_statistic='{statistic}' ranks by unit statistics")
        assert "ImportanceConfig(units=True)" in message
    report = prune_(model, imp, PruneConfig(structure=structure, sparsity=0.5), progress=False)  # the default ranks
    assert report.structured["num_parameters"]["after"] < report.structured["num_parameters"]["before"]


def test_hidden_channels_of_a_mixture_of_experts_model_are_refused_naming_the_axis(tmp_path):
    # The message named only the layout ("Unsupported architecture ...: layer 0 `mlp` has modules ['experts', ...]"),
    # not that the hidden axis is what the model cannot take (layers and heads of the same model work).
    from hf_weightprune.testing import tiny_moe

    model = tiny_moe("qwen3_moe", seed=0)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda", units=True))
    train(model, [cb], tmp_path, max_steps=1)
    for structure in ("hidden", "layers,hidden"):
        message = _refused(model.eval(), cb.importance(), PruneConfig(structure=structure, sparsity=0.25),
                           r"^structure 'hidden' is not possible for Qwen3MoeForCausalLM: Unsupported architecture")
        assert "['experts', 'gate']" in message


@pytest.mark.parametrize("structure, target", [  # budgets that cut hidden channels and the compensated axes
    (("neurons", "hidden"), 0.5), (("neurons", "hidden"), 0.7), (("heads", "neurons", "hidden"), 0.6),
    (("heads", "neurons", "hidden"), 0.7), (("heads", "hidden"), 0.5)])
@pytest.mark.parametrize("compensate", ["refit", "refit,mean"])
def test_refit_after_the_hidden_cut_reads_each_layers_own_hessian(structure, target, compensate, tmp_path):
    # A budget applies hidden channels before its filling axis (neurons). The consumers' Hessians were looked up by
    # module id from before the first cut, but the hidden cut replaces every Linear: a raw KeyError, or (an id
    # reused) another module's Hessian ("hessian has shape (32, 32), expected (64, 64)"), the model half cut.
    # The consumer's Hessian is over its inputs (neurons / KV groups), which the hidden cut leaves alone; the cut
    # removes output rows, and the refit solves each row on its own: the refit rows of the dense weight, sliced.
    model, imp = _sparsegpt(tmp_path, mlp_bias=True, attention_bias=True)
    dense = copy.deepcopy(model)
    axes = prune_(model, imp, PruneConfig(structure=structure, target_params=target, compensate=compensate),
                  progress=False).structured["axes"]
    assert axes["hidden"]["after"] < axes["hidden"]["before"]
    rows = torch.tensor(sorted(set(range(32)) - set(axes["hidden"]["removed"])))
    means = imp.unit_means()
    for axis, path in (("neurons", "mlp.down_proj"), ("heads", "self_attn.o_proj")):
        for j, removed in axes.get(axis, {}).get("removed", {}).items():
            if not removed:
                continue
            name = f"model.layers.{j}.{path}.weight"
            lin = dense.get_submodule(name[: -len(".weight")])
            width = 1 if axis == "neurons" else lin.in_features // axes["heads"]["before"]
            cols = torch.tensor([c for c in range(lin.in_features) if c // width not in removed])
            if compensate == "refit":
                want, shift = refit_columns(lin.weight, imp.state(name), cols), torch.zeros(lin.out_features)
            else:
                want, shift = refit_mean(lin.weight, imp.state(name), means[axis][j], imp.meta["tokens"][name], cols)
            got = model.get_submodule(name[: -len(".weight")])
            torch.testing.assert_close(got.weight, want[rows], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.bias, (lin.bias + shift)[rows], rtol=1e-5, atol=1e-6)


def test_a_split_that_cuts_no_compensated_axis_records_no_compensation(tmp_path, caplog):
    """A `target_params` split may give a compensated axis (here the KV groups) nothing to remove: the record must say
    what was compensated (nothing), not what was asked, and the log says why."""
    model, imp = _sparsegpt(tmp_path)
    config = PruneConfig(structure=("layers", "heads"), target_params=0.75, compensate="refit")
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):
        report = prune_(model, imp, config, progress=False)
    heads = report.structured["axes"]["heads"]
    assert heads["before"] == heads["after"]  # the split put the whole budget on layers
    assert report.structured["compensation"] is None
    assert "nothing was compensated" in caplog.text
