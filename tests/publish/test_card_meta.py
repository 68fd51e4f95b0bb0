"""The card's metadata the Hub reads: the model-index's `dataset.type` (a Hub dataset id or no result) and the tags
(what was done, nothing more), through each writer: `save_pruned`, `prune --eval_data`, `push`, a hand-written or
older `sparsity.json`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, oneshot_importance, prune_
from hf_weightprune.files.pruned_files import load_sparsity
from hf_weightprune.publish.card import render_model_card
from hf_weightprune.publish.export import save_pruned
from hf_weightprune.publish.hub import push_pruned_to_hub
from hf_weightprune.testing import tiny_llama
from tests.helpers import train

EVAL = {"dense_loss": 3.0, "pruned_loss": 3.25, "tokens": 512}


def _saved(folder: Path, dataset: str) -> ModelCard:
    model = tiny_llama(seed=0)
    report = prune_(model, oneshot_importance(model, "magnitude"), PruneConfig(sparsity=0.5), progress=False)
    save_pruned(model, folder, report=report, eval_results={**EVAL, "dataset": dataset})
    return ModelCard.load(folder / "README.md")


# --------------------------------------------------------------------------- model-index dataset.type


def test_a_hub_dataset_id_is_the_model_index_dataset(tmp_path):
    card = _saved(tmp_path / "out", "Salesforce/wikitext")
    results = card.data.eval_results
    assert {r.dataset_type for r in results} == {"Salesforce/wikitext"} == {r.dataset_name for r in results}
    metrics = {r.metric_type: r.metric_value for r in results}
    assert metrics == {"loss": 3.25, "perplexity": pytest.approx(math.exp(3.25))}  # this model's only, no dense loss
    assert "dataset_is_local" not in load_sparsity(tmp_path / "out")["eval"]


@pytest.mark.parametrize("kind", ["file", "folder one level down", "absolute folder"])
def test_local_evaluation_data_gives_no_model_index(tmp_path, monkeypatch, kind):
    # a saved dataset folder `data/evalset` reads like the Hub id `data/evalset`: only the disk tells them apart
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "evalset").mkdir(parents=True)
    (tmp_path / "eval.txt").write_text("In the beginning\n")
    dataset = {"file": "eval.txt", "folder one level down": "data/evalset",
               "absolute folder": str(tmp_path / "data" / "evalset")}[kind]
    card = _saved(tmp_path / "out", dataset)
    name = Path(dataset).name
    assert card.data.eval_results is None and "model-index" not in str(card)
    assert f"Evaluated on `{name}`, 512 tokens" in card.text  # the text still states the numbers
    record = load_sparsity(tmp_path / "out")["eval"]
    assert record["dataset"] == name and record["dataset_is_local"] is True


@pytest.mark.parametrize("dataset, dataset_type", [("data/evalset", None), ("Salesforce/wikitext", "Salesforce/wikitext")])
def test_push_keeps_the_rule(tmp_path, monkeypatch, hub_server, dataset, dataset_type):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "evalset").mkdir(parents=True)
    _saved(tmp_path / "out", dataset)
    (tmp_path / "out" / "README.md").unlink()  # the push renders the Hub's card from the Hub's sparsity.json
    monkeypatch.chdir(tmp_path / "data")  # another working folder: the recorded flag decides, not the disk
    push_pruned_to_hub(tmp_path / "out", repo_id="tester/meta", token=hub_server.token)
    results = ModelCard(hub_server.files("tester/meta")["README.md"].decode()).data.eval_results
    types = {r.dataset_type for r in results} if results else None
    assert types == ({dataset_type} if dataset_type else None)


@pytest.mark.parametrize("dataset", ["data/kjv/valid.txt", "/home/someone/evalset", "./evalset", "valid.txt",
                                     "not a repo id!"])
def test_an_older_record_names_no_local_data_as_a_hub_id(tmp_path, dataset):
    """A `sparsity.json` without the flag (earlier versions, or written by hand): what reads as a path, a data file or
    no valid repo id is no Hub id."""
    _saved(tmp_path / "out", "Salesforce/wikitext")
    sparsity = load_sparsity(tmp_path / "out")
    sparsity["eval"]["dataset"] = dataset
    assert render_model_card(tmp_path / "out", sparsity=sparsity).data.eval_results is None


# --------------------------------------------------------------------------- tags


def _structured(statistic: str, axes: dict) -> dict:
    return {"unit_statistic": statistic, "axes": {a: {"before": b, "after": c} for a, (b, c) in axes.items()}}


@pytest.mark.parametrize("structure, criterion, structured, expected", [
    ("unstructured", "wanda", None, ["sparsity", "unstructured-sparsity", "wanda"]),
    ("2:4", "sparsegpt", None, ["sparsity", "2:4-sparsity", "sparsegpt"]),
    # the criterion's per-weight scores ranked the units: it is named
    ("neurons", "wanda", _structured("per-weight scores", {"neurons": (64, 48)}),
     ["structured-pruning", "neuron-pruning", "wanda"]),
    # unit statistics ranked them: the criterion's statistic served a re-fit at most
    ("heads", "sparsegpt", _structured("activation", {"heads": (4, 2)}),
     ["structured-pruning", "attention-head-pruning", "activation"]),
    ("hidden", "sparsegpt", _structured("taylor", {"hidden": (32, 24)}),
     ["structured-pruning", "hidden-channel-pruning", "taylor"]),
    ("layers", "wanda", _structured("activation", {"layers": (2, 1)}),
     ["structured-pruning", "depth-pruning", "block-influence"]),
    ("layers", "wanda", _structured("taylor", {"layers": (2, 1)}), ["structured-pruning", "depth-pruning", "taylor"]),
    # a budget that removed no layer: no depth tag, no block influence
    ("layers,neurons", "sparsegpt", _structured("activation_l2", {"layers": (2, 2), "neurons": (64, 40)}),
     ["structured-pruning", "neuron-pruning", "activation-l2"]),
    ("layers,neurons", "sparsegpt", _structured("activation", {"layers": (2, 1), "neurons": (64, 40)}),
     ["structured-pruning", "depth-pruning", "neuron-pruning", "activation", "block-influence"]),
    ("experts", "wanda", {"unit": "expert"}, ["structured-pruning", "expert-pruning", "routing-frequency"]),
])
def test_tags_say_what_was_done(tmp_path, structure, criterion, structured, expected):
    _saved(tmp_path / "out", "Salesforce/wikitext")
    sparsity = {**load_sparsity(tmp_path / "out"), "structure": structure, "criterion": criterion,
                "structured": structured}
    assert render_model_card(tmp_path / "out", sparsity=sparsity).data.tags == ["pruned", "hf-weightprune", *expected]


def test_structured_refit_from_sparsegpt_statistics_is_not_tagged_sparsegpt(tmp_path):
    """The reported fault end to end: sparsegpt's Hessians only re-fit the consumers; activations ranked the neurons."""
    model = tiny_llama(seed=0)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", units=True))
    train(model, [cb], tmp_path / "run", max_steps=2, lr=1e-3)
    report = prune_(model.eval(), cb.importance(), PruneConfig(structure="neurons", sparsity=0.25, compensate="refit"),
                    progress=False)
    save_pruned(model, tmp_path / "out", report=report)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.tags == ["pruned", "hf-weightprune", "structured-pruning", "neuron-pruning", "activation"]
    assert "SlimGPT" in card.text and "2301.00774" not in card.text  # the re-fit is cited, SparseGPT is not


def test_counts_of_one_are_singular_in_messages_and_cards():
    """One plural rule (`io_utils.plural`) for what a message or a card counts: "1 expert left", "every step"."""
    from hf_weightprune.io_utils import plural
    from hf_weightprune.publish.card_schedule import schedule_context

    assert [plural(1, "expert"), plural(3, "expert"), plural(2, "forward pass"), plural(1_000, "token")] == [
        "1 expert", "3 experts", "2 forward passes", "1,000 tokens"]
    fixture = load_sparsity(Path(__file__).parents[1] / "fixtures" / "release-0.1" / "pruned")
    assert fixture["schedule"]["every_n_steps"] == 1
    text = schedule_context(fixture)["text"]
    assert "every step," in text and "every 1 steps" not in text
