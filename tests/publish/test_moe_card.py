"""The card of a pruned MoE model states how its routers used the experts during training (issue 26): per layer the
least and most used expert's share of the routed tokens and, for a whole-expert prune, the removed experts' share;
every number is recomputed here from the importance's router statistics. A dense model's card has no such section."""

from __future__ import annotations

import json
import math
import re

import pytest

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, load_importance, prune_, save_pruned
from hf_weightprune.testing import tiny_llama, tiny_moe
from tests.collect.test_moe_callback import train

SECTION = "## Expert routing during training"
# | `layer` | experts | tokens | least (share%) | most (share%) | [removed | share% |]
ROW = re.compile(r"^\| `([^`]+)` \| (\d+) \| ([\d,]+) \| (\d+) \(([\d.]+)%\) \| (\d+) \(([\d.]+)%\) \|"
                 r"(?: ([\d, ]+) \| ([\d.]+)% \|)?$", flags=re.M)


@pytest.fixture(scope="module")
def mixtral_run(tmp_path_factory):
    """A tiny Mixtral fine-tuned 3 steps with the callback: its importance holds the router statistics."""
    folder = tmp_path_factory.mktemp("mixtral")
    model = tiny_moe("mixtral", seed=7)
    train(model, [ImportanceCallback(ImportanceConfig(criterion="magnitude"))], folder, max_steps=3)
    model.save_pretrained(folder / "model")
    return folder


def _expected(router: dict, removed: dict | None = None) -> dict[str, tuple]:
    """Per layer, what the card must say: measured from `Importance.sections["router"]` alone."""
    out = {}
    for block, stats in router.items():
        tokens = stats["tokens"]
        total = sum(tokens)
        least = min(range(len(tokens)), key=lambda e: (tokens[e], e))
        most = max(range(len(tokens)), key=lambda e: (tokens[e], -e))
        row = (len(tokens), total, least, f"{100 * tokens[least] / total:.2f}", most, f"{100 * tokens[most] / total:.2f}")
        if removed is not None:
            gone = sorted(removed[block])
            row += (", ".join(map(str, gone)), f"{100 * sum(tokens[e] for e in gone) / total:.2f}")
        out[block] = row
    return out


def _card_rows(card: str) -> dict[str, tuple]:
    section = card.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for m in ROW.finditer(section):
        layer, experts, tokens, least, least_share, most, most_share, gone, gone_share = m.groups()
        row = (int(experts), int(tokens.replace(",", "")), int(least), least_share, int(most), most_share)
        rows[layer] = row + ((gone, gone_share) if gone is not None else ())
    return rows


def test_expert_prune_card_states_the_routing_shares_measured_from_the_router_statistics(mixtral_run, tmp_path):
    from transformers import AutoModelForCausalLM

    imp = load_importance(mixtral_run)
    router = imp.sections["router"]
    model = AutoModelForCausalLM.from_pretrained(mixtral_run / "model")
    report = prune_(model, imp, PruneConfig(structure="experts", sparsity=0.5), progress=False)
    save_pruned(model, tmp_path / "pruned", report=report)

    # sparsity.json: the tokens as recorded, the removed experts and each one's share of its layer's tokens
    saved = json.loads((tmp_path / "pruned" / "sparsity.json").read_text())["routing"]
    assert list(saved) == list(router) and len(saved) == 2
    for block, layer in saved.items():
        tokens = router[block]["tokens"]
        assert layer["tokens"] == tokens and sum(tokens) > 0
        assert layer["removed"] == sorted(report.structured["removed"][block]) and len(layer["removed"]) == 2
        assert layer["removed_shares"] == pytest.approx([tokens[e] / sum(tokens) for e in layer["removed"]])

    card = (tmp_path / "pruned" / "README.md").read_text()
    assert card.count(SECTION) == 1 and "the removed experts are those that received the fewest" in card
    expected = _expected(router, report.structured["removed"])
    assert _card_rows(card) == expected
    # the removed experts are the least used ones, so their share is at most half of a layer's tokens (2 of 4)
    assert all(float(row[-1]) <= 50.0 for row in expected.values())


def test_unstructured_prune_of_an_moe_states_the_routing_without_removed_experts(mixtral_run, tmp_path):
    from transformers import AutoModelForCausalLM

    imp = load_importance(mixtral_run)
    model = AutoModelForCausalLM.from_pretrained(mixtral_run / "model")
    report = prune_(model, imp, PruneConfig(sparsity=0.5), progress=False)
    save_pruned(model, tmp_path / "pruned", report=report)
    saved = json.loads((tmp_path / "pruned" / "sparsity.json").read_text())["routing"]
    assert all(set(layer) == {"tokens"} for layer in saved.values())
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert card.count(SECTION) == 1 and "Removed experts" not in card
    assert _card_rows(card) == _expected(imp.sections["router"])


def test_dense_model_card_has_no_routing_section(tmp_path):
    model = tiny_llama(seed=0)
    cb = ImportanceCallback(ImportanceConfig(criterion="magnitude"))
    train(model, [cb], tmp_path / "run", max_steps=2)
    imp = cb.importance()
    assert "router" not in imp.sections
    report = prune_(model, imp, PruneConfig(sparsity=0.5), progress=False)
    assert report.routing is None
    save_pruned(model, tmp_path / "pruned", report=report)
    assert json.loads((tmp_path / "pruned" / "sparsity.json").read_text())["routing"] is None
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "Expert routing" not in card and "routed tokens" not in card


# `| `module` | tensors | parameters | removed% |` rows of the card's "Sparsity per module type" table
MODULE_ROW = re.compile(r"^\| `([^`]+)` \| (\d+) \| ([\d,]+) \| ([\d.]+)% \|$", flags=re.M)


def _module_numel(folder, module: str) -> int:
    """Elements of the tensors in `folder`'s weight files that belong to the card's `module` row (the name inside the
    decoder layer; a row without an expert index groups every expert's tensor)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                inner = re.sub(r"\.weight$", "", re.sub(r"^model\.layers\.\d+\.", "", name))
                if not re.search(r"\.experts\.\d+\.", module):
                    inner = re.sub(r"\.experts\.\d+\.", ".experts.", inner)
                if inner == module:
                    total += math.prod(f.get_slice(name).get_shape())
    return total


@pytest.mark.parametrize("arch, structure, sparsity", [
    ("mixtral", "neurons", 1 / 3), ("qwen2_moe", "neurons", 1 / 3), ("qwen2_moe", "experts", 0.5)])
def test_structured_module_table_states_what_each_module_lost_in_the_files(arch, structure, sparsity, tmp_path):
    """Every row of the card's per-module table is true of the folder: its parameters are those the files hold and
    its removed share is measured against the dense model's files. Neurons inside experts leave the router and the
    shared expert whole, so no row may say they lost a third; Mixtral (files with `block_sparse_moe.experts.N.w1`
    names) gets the table too."""
    from transformers import AutoModelForCausalLM

    model = tiny_moe(arch, seed=7)
    cb = ImportanceCallback(ImportanceConfig(criterion="magnitude"))
    train(model, [cb], tmp_path / "run", max_steps=2)
    model.save_pretrained(tmp_path / "dense")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    report = prune_(pruned, cb.importance(), PruneConfig(structure=structure, sparsity=sparsity), progress=False)
    save_pruned(pruned, tmp_path / "pruned", report=report)
    card = (tmp_path / "pruned" / "README.md").read_text()
    table = card.split("## Sparsity per module type", 1)[1].split("\n## ", 1)[0]
    rows = MODULE_ROW.findall(table)
    assert any(".experts." in module for module, *_ in rows)
    for module, _, params, removed in rows:
        before, after = _module_numel(tmp_path / "dense", module), _module_numel(tmp_path / "pruned", module)
        assert after == int(params.replace(",", "")), module
        assert float(removed) == pytest.approx(100 * (1 - after / before), abs=0.006), module
