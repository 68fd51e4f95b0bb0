"""A loss above ~709.78 nats (a diverged prune) has no float perplexity: every path that computes or writes one
(`evaluate_loss`, the sweep's CSV / JSON / chart / table, the CLI, the search's table and its `sparsity.json`
section, the card's tables and model-index) states it by `hf_weightprune.perplexity`'s one rule, and every file the
Hub parses stays strict JSON / YAML without inf or NaN. The huge loss is real: a tiny Llama whose `lm_head` is scaled
up evaluates at a loss of thousands of nats."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from hf_weightprune import PruneConfig, oneshot_importance, prune_
from hf_weightprune.files.pruned_files import dump_sparsity
from hf_weightprune.perplexity import MAX_LOSS, OVERFLOW_TEXT, perplexity, perplexity_text
from hf_weightprune.publish.card import write_model_card
from hf_weightprune.publish.export import save_pruned
from hf_weightprune.testing import tiny_llama, train_tokenizer
from hf_weightprune.tools.cli import main
from hf_weightprune.tools.data import evaluate_loss, load_texts, make_windows
from hf_weightprune.tools.search import StructureSearch
from hf_weightprune.tools.sweep import format_table, sweep, write_results

KJV = Path(__file__).resolve().parents[1] / "data" / "kjv"


def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"non-finite number {name} in JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    """A tiny Llama with its tokenizer whose loss on KJV text is far above 709 nats, saved to a folder."""
    root = tmp_path_factory.mktemp("huge")
    texts = load_texts(KJV / "valid.txt")[:30]
    tok = train_tokenizer(texts, vocab_size=300)
    model = tiny_llama(seed=0, vocab_size=len(tok))
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", model, make_windows(tok, texts, seq_len=16, max_windows=4)


def test_the_rule():
    assert perplexity(3.0) == pytest.approx(math.exp(3.0)) and perplexity_text(3.0) == f"{math.exp(3.0):.2f}"
    assert perplexity(MAX_LOSS) is not None and math.isfinite(perplexity(MAX_LOSS))
    for loss in (710.0, 1e6, math.inf):
        assert perplexity(loss) is None and perplexity_text(loss) == OVERFLOW_TEXT == "overflow (> 1e308)"
    assert perplexity(math.nan) is None and perplexity_text(math.nan) == "n/a" and perplexity(None) is None


def test_evaluate_loss_keeps_the_loss_and_states_no_perplexity(huge):
    _, model, windows = huge
    result = evaluate_loss(model, windows, batch_size=2)
    assert result["loss"] > 709.78 and math.isfinite(result["loss"])
    assert result["perplexity"] is None  # was math.inf


def test_sweep_files_table_and_cli(huge, tmp_path, capsys):
    folder, _, _ = huge
    out = tmp_path / "sweep"
    rows = sweep(folder, None, KJV / "valid.txt", sparsities=[0.5], baselines=("magnitude",), seq_len=16,
                 max_windows=4, batch_size=2, output_dir=out, progress=False)
    assert all(r["loss"] > 709.78 and r["perplexity"] is None for r in rows)
    data = _strict_json((out / "sweep.json").read_text())
    assert all(r["perplexity"] is None and r["loss"] > 709.78 for r in data)
    with open(out / "sweep.csv", newline="") as f:
        cells = list(csv.DictReader(f))
    assert all(c["perplexity"] == "" and float(c["loss"]) > 709.78 for c in cells)  # no "inf" in the CSV either
    assert not (out / "sweep.png").exists()  # no point has a height: no chart, and no crash at the end
    table = format_table(rows)
    assert f"| oneshot-magnitude | {OVERFLOW_TEXT} |" in table and f"Dense perplexity: {OVERFLOW_TEXT} (loss" in table

    capsys.readouterr()
    assert main(["sweep", str(folder), "--data", str(KJV / "valid.txt"), "--sparsities", "0.5", "--seq_len", "16",
                 "--max_windows", "4", "--output_dir", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert OVERFLOW_TEXT in printed and "Wrote sweep.csv, sweep.json to" in printed


def test_card_model_index_and_sparsity_json(huge, tmp_path):
    """The card states the overflow in its tables, the model-index keeps the loss only, `sparsity.json` (with a
    search section whose candidate diverged) is strict JSON."""
    folder, model, _ = huge
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    report = prune_(model, oneshot_importance(model, "magnitude"), PruneConfig(sparsity=0.5), progress=False)
    report.search = StructureSearch(
        [{"config": PruneConfig(structure="neurons", sparsity=0.5).to_dict(), "loss": 900.0, "perplexity": None,
          "num_parameters": 10, "skipped": None, "same_as": None},
         {"config": PruneConfig(structure="heads", sparsity=0.5).to_dict(), "loss": math.nan, "perplexity": math.nan,
          "num_parameters": 10, "skipped": None, "same_as": None}],
        PruneConfig(structure="neurons", sparsity=0.5), 0, 800.0, 4, 60).to_dict()
    pruned = tmp_path / "pruned"
    save_pruned(model, pruned, report=report,
                eval_results={"dataset": "org/evalset", "dense_loss": 800.0, "pruned_loss": 900.0, "tokens": 60})
    write_results([{"criterion": "dense", "structure": "dense", "sparsity": 0.0, "loss": 800.0, "perplexity": None},
                   {"criterion": "magnitude", "structure": "unstructured", "sparsity": 0.5, "loss": 900.0,
                    "perplexity": math.inf}], pruned)  # an older sweep's inf is read back by the rule too
    write_model_card(pruned)
    record = _strict_json((pruned / "sparsity.json").read_text())
    assert record["eval"]["pruned_loss"] == 900.0
    assert [c["loss"] for c in record["search"]["candidates"]] == [900.0, None]  # the NaN loss: null
    text = (pruned / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    metrics = [m for entry in front["model-index"] for r in entry["results"] for m in r["metrics"]]
    assert [(m["type"], m["value"]) for m in metrics] == [("loss", 900.0)]  # no perplexity metric, no .inf
    assert "inf" not in text.split("---")[1].lower().replace("info", "")
    assert f"| Pruned (this model) | 900.0000 | {OVERFLOW_TEXT} |" in text
    assert f"| 50.0% | 900.0000 | {OVERFLOW_TEXT} |" in text  # the sweep's table
    assert "| inf |" not in text and "nan" not in text.lower().split("## evaluation")[-1][:2000]


def test_search_table_states_the_overflow():
    search = StructureSearch(
        [{"config": PruneConfig(structure="neurons", sparsity=0.5).to_dict(), "loss": 900.0, "perplexity": None,
          "num_parameters": 1234, "skipped": None, "same_as": None}],
        PruneConfig(structure="neurons", sparsity=0.5), 0, 3.0, 4, 60)
    assert OVERFLOW_TEXT in search.table() and "900.0000" in search.table()
    assert _strict_json(dump_sparsity({"search": search.to_dict(), "x": [math.inf, -math.nan]})) == {
        "search": {**search.to_dict()}, "x": [None, None]}
