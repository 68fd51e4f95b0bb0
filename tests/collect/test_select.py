"""`Importance.select(report)`: the importance of a structurally pruned model, so that it can be pruned again.

The oracle is the surgery itself: a float64 copy of the dense model whose every tracked weight holds the code
`id * 2**32 + row * in + col` goes through the same structured prune, and each pruned weight then says which dense
weight, row and column it holds. The selected importance must hold the dense states at exactly those positions.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, GemmaForCausalLM

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, prune_, save_pruned
from hf_weightprune.moe import find_weights
from hf_weightprune.testing import TINY, tiny_llama, tiny_phi3
from tests.helpers import train

BUILD = {"llama": tiny_llama, "phi3": tiny_phi3}
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Per (layout, criterion): a tiny 4-layer model trained 3 steps with unit statistics, and its importance."""
    cache = {}

    def get(arch, criterion):
        if (arch, criterion) not in cache:
            model = BUILD[arch](seed=1, num_hidden_layers=4)
            cb = ImportanceCallback(ImportanceConfig(criterion=criterion, units=True))
            train(model, [cb], tmp_path_factory.mktemp(f"{arch}-{criterion}"), max_steps=3, lr=1e-3)
            cache[arch, criterion] = (model.eval(), cb.importance())
        return copy.deepcopy(cache[arch, criterion][0]), cache[arch, criterion][1]

    return get


def _coded(model, names):
    """A float64 copy whose tracked weights hold their own (name id, row, col) codes."""
    coded = copy.deepcopy(model).double()
    with torch.no_grad():
        for t in find_weights(coded):
            w = t.weight()
            out_f, in_f = w.shape
            code = torch.arange(out_f, dtype=torch.float64)[:, None] * in_f + torch.arange(in_f, dtype=torch.float64)
            w.copy_(names.index(t.name) * 2.0**32 + code)
    return coded


def _decode(w, names, shapes):
    """`(dense name, rows, cols)` a pruned coded weight came from."""
    ident = int(w[0, 0].item() // 2**32)
    name = names[ident]
    in_f = shapes[name][1]
    code = (w - ident * 2.0**32).long()
    return name, code[:, 0] // in_f, code[0] % in_f


@pytest.mark.parametrize("criterion", ["wanda", "taylor", "sparsegpt"])
@pytest.mark.parametrize("arch, configs", [
    ("llama", [PruneConfig(structure="neurons", sparsity=0.25), PruneConfig(structure="heads", sparsity=0.5)]),
    ("phi3", [PruneConfig(structure="heads", sparsity=0.5), PruneConfig(structure="neurons", sparsity=0.25)]),
    ("llama", [PruneConfig(structure="layers", sparsity=0.5)]),
    ("llama", [PruneConfig(structure=("layers", "heads", "neurons"), target_params=0.6)]),
    ("llama", [PruneConfig(structure="hidden", sparsity=0.25), PruneConfig(structure="neurons", sparsity=0.25)]),
    ("phi3", [PruneConfig(structure=("heads", "hidden"), target_params=0.7)]),
])
def test_selected_importance_holds_the_dense_statistics_at_the_kept_positions(trained, arch, configs, criterion):
    model, imp = trained(arch, criterion)
    names, shapes = imp.names, imp.shapes
    coded = _coded(model, names)
    dense_unit = imp.unit_state()
    selected, coded_imp = imp, imp
    for config in configs:  # the same prunes on the real model and on the coded copy
        report = prune_(model, selected, config)
        coded_report = prune_(coded, coded_imp, config)
        assert coded_report.structured["axes"] == report.structured["axes"]  # the same units: ranked by statistics
        selected, coded_imp = selected.select(report), coded_imp.select(coded_report)
    selected.validate_against(model)
    tracked = {t.name: t.weight() for t in find_weights(coded)}
    assert sorted(selected.names) == sorted(tracked)
    selected.bind(model)
    imp.bind(trained(arch, criterion)[0])  # the dense weights, for the scores that multiply by |W|
    for name in selected.names:
        dense_name, rows, cols = _decode(tracked[name], names, shapes)
        state = imp.state(dense_name)
        if criterion == "taylor":  # shaped like the weight
            expected = state[rows][:, cols]
        elif criterion == "wanda":  # [in]
            expected = state[cols]
        else:  # sparsegpt: the input Hessian, cut on both axes
            expected = state[cols][:, cols]
        assert torch.equal(selected.state(name), expected), name
        if criterion != "sparsegpt":  # the scores too (a Hessian's inverse is not the inverse's slice)
            torch.testing.assert_close(selected.score(name), imp.score(dense_name)[rows][:, cols], msg=name)
    # unit statistics: every kept layer's entries are the dense layer's at the kept units
    sel_unit = selected.unit_state()
    n_dense = max(int(k.split(".")[1]) for k in dense_unit if k.startswith("layers.")) + 1
    n_now = max(int(k.split(".")[1]) for k in sel_unit if k.startswith("layers.")) + 1
    assert n_now == model.config.num_hidden_layers <= n_dense
    kept_layers = []
    for j in range(n_now):
        down = tracked[f"model.layers.{j}.mlp.down_proj.weight"]
        dense_name, _, kept_neurons = _decode(down, names, shapes)
        i = int(dense_name.split(".")[2])
        kept_layers.append(i)
        o = tracked[f"model.layers.{j}.self_attn.o_proj.weight"]
        _, kept_hidden, kept_cols = _decode(o, names, shapes)  # o_proj rows: the hidden channels kept
        assert torch.equal(sel_unit[f"layers.{j}.hidden.abs"], dense_unit[f"layers.{i}.hidden.abs"][kept_hidden])
        assert torch.equal(sel_unit[f"layers.{j}.neurons.abs"], dense_unit[f"layers.{i}.neurons.abs"][kept_neurons])
        assert torch.equal(sel_unit[f"layers.{j}.heads.sum"], dense_unit[f"layers.{i}.heads.sum"][kept_cols])
        assert torch.equal(sel_unit[f"layers.{j}.influence"], dense_unit[f"layers.{i}.influence"])
        head_dim = shapes[dense_name.replace("mlp.down_proj", "self_attn.o_proj")][1] // 4
        heads = kept_cols[::head_dim] // head_dim
        assert torch.equal(sel_unit[f"layers.{j}.heads.norm"], dense_unit[f"layers.{i}.heads.norm"][heads])
    # the hidden channels' Taylor sum: the whole model's while every layer stays; once layers go, by hand from the
    # per-layer sums of the layers kept and the part outside them (the whole model's counts the removed layers)
    outside = dense_unit["taylor.hidden.outside"]
    if n_now == n_dense:
        want = dense_unit["taylor.hidden"]
    else:
        want = outside.clone()
        for i in kept_layers:
            want += dense_unit[f"layers.{i}.taylor.hidden"]
        assert not torch.allclose(want[kept_hidden], dense_unit["taylor.hidden"][kept_hidden])  # it makes a difference
    torch.testing.assert_close(sel_unit["taylor.hidden"], want[kept_hidden], rtol=1e-12, atol=0)
    assert torch.equal(sel_unit["taylor.hidden.outside"], outside[kept_hidden])
    torch.testing.assert_close(selected.unit_scores("taylor")["hidden"],
                               imp.unit_scores("taylor", kept_layers=kept_layers)["hidden"][kept_hidden])


def _loads(model, out):
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    return reloaded


@pytest.mark.parametrize("first", [PruneConfig(structure="neurons", sparsity=0.25),
                                   PruneConfig(structure="layers", sparsity=0.5),
                                   PruneConfig(structure=("layers", "heads"), target_params=0.7)])
def test_a_2_4_prune_and_a_neurons_prune_follow_a_structured_one(trained, first, tmp_path):
    model, imp = trained("llama", "wanda")
    report = prune_(model, imp, first)
    with pytest.raises(ValueError, match=r"does not match this model: .* importance\.select\(report\)"):
        prune_(copy.deepcopy(model), imp, PruneConfig(structure="2:4"))
    sparse = copy.deepcopy(model)
    nm = prune_(sparse, imp.select(report), PruneConfig(structure="2:4"))
    assert nm.global_sparsity == pytest.approx(0.5)
    save_pruned(sparse, tmp_path / "nm", report=nm)
    _loads(sparse, tmp_path / "nm")
    before = model.config.intermediate_size
    again = prune_(model, imp.select(report), PruneConfig(structure="neurons", sparsity=0.5))
    assert model.config.intermediate_size == before // 2 == again.structured["axes"]["neurons"]["after"]
    save_pruned(model, tmp_path / "again", report=again)
    reloaded = _loads(model, tmp_path / "again")
    assert reloaded.generate(IDS[:1], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 15)


def test_select_reads_sparsity_json(trained, tmp_path):
    model, imp = trained("llama", "wanda")
    report = prune_(model, imp, PruneConfig(structure=("layers", "neurons"), target_params=0.7))
    save_pruned(model, tmp_path, report=report)
    on_disk = json.loads((tmp_path / "sparsity.json").read_text())
    a, b = imp.select(on_disk), imp.select(report)
    assert a.names == b.names
    assert all(torch.equal(a.state(n), b.state(n)) for n in a.names)
    with pytest.raises(ValueError, match="needs the report of a structured prune"):
        imp.select(prune_(copy.deepcopy(model), imp.select(report), PruneConfig(sparsity=0.5)))


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("first, refusal", [
    (PruneConfig(structure="neurons", sparsity=0.25),
     r"^Importance\.select: this importance has intermediate_size 64 \(the prune's model: 48\): it describes another "
     r"model .* importance\.select\(first\)\.select\(second\)\)$"),
    (PruneConfig(structure="layers", sparsity=0.5),
     r"^Importance\.select: this importance has num_hidden_layers 4 \(the prune's model: 2\): it describes "),
])
def test_select_refuses_the_second_prune_of_a_chain_before_the_first(trained, arch, first, refusal):
    """Cutting the dense importance with the second prune's report would slice it by the in-between model's unit
    indices, silently: refused in one line; in order (first, then second) it is accepted."""
    model, imp = trained(arch, "wanda")
    first = prune_(model, imp, first)
    second = prune_(model, imp.select(first), PruneConfig(structure="neurons", sparsity=0.5))
    with pytest.raises(ValueError, match=refusal):
        imp.select(second)
    chained = imp.select(first).select(second)
    params = dict(model.named_parameters())
    downs = [n for n in chained.names if n.endswith("down_proj.weight")]
    assert downs and all(list(chained.state(n).shape) == [params[n].shape[1]] for n in downs)


def _eight_heads(arch):
    """8 query heads in 4 KV groups (two heads prunes can follow each other): Llama (head size derived from the
    hidden size), Gemma (a stated head size of 16, not hidden / heads = 4) and Phi-3 (fused qkv_proj)."""
    sizes = dict(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)
    if arch == "gemma":
        torch.manual_seed(3)
        return GemmaForCausalLM(GemmaConfig(**{**TINY, **sizes, "head_dim": 16}))
    return BUILD[arch](seed=3, **sizes)


@pytest.mark.parametrize("arch", ["llama", "gemma", "phi3"])
def test_select_refuses_a_heads_prune_after_a_heads_prune_with_the_first_models_statistics(arch, tmp_path):
    """Two heads prunes keep the query/KV ratio and every other size: only the KV-head count the record states (with
    the head size) tells the dense statistics from the in-between model's. Cut by the second report alone they are
    refused in one line, before any work; in order they are accepted, and the result fits the twice-pruned model."""
    model = _eight_heads(arch)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda", units=True))
    train(model, [cb], tmp_path / "run", max_steps=2)
    imp = cb.importance()
    first = prune_(model, imp, PruneConfig(structure="heads", sparsity=0.5))
    head_dim = 16 if arch == "gemma" else 4
    assert first.structured["config"]["before"]["head_dim"] == first.structured["config"]["after"]["head_dim"] \
        == head_dim
    assert first.structured["config"]["after"]["num_key_value_heads"] == 2
    second = prune_(model, imp.select(first), PruneConfig(structure="heads", sparsity=0.5))
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    with pytest.raises(ValueError, match=r"^Importance\.select: this importance has num_key_value_heads 4 \(the "
                                         r"prune's model: 2\), num_attention_heads 8 \(the prune's model: 4\): it "
                                         r"describes another model .*\)$"):
        imp.select(second)
    with pytest.raises(ValueError, match=r"^Importance\.select: this importance has num_key_value_heads 4 "):
        imp.select(json.loads(json.dumps(second.structured)))  # as sparsity.json holds it
    chained = imp.select(first).select(second)
    chained.validate_against(model)
    report = prune_(model, chained, PruneConfig(structure="2:4"))
    assert report.global_sparsity == pytest.approx(0.5, abs=0.01)


def test_select_accepts_a_record_without_the_head_size(trained):
    """A record written before the head size was stated (no `head_dim`): the sizes both state are compared, the KV
    groups are not; the selection is the same as with the full record."""
    model, imp = trained("llama", "wanda")
    report = prune_(model, imp, PruneConfig(structure="heads", sparsity=0.5))
    old = json.loads(json.dumps(report.structured))
    for side in ("before", "after"):
        del old["config"][side]["head_dim"]
    a, b = imp.select(old), imp.select(report)
    assert a.names == b.names and all(torch.equal(a.state(n), b.state(n)) for n in a.names)
    a.validate_against(model)
