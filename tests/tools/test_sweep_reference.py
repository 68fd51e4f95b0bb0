"""A sweep of a folder `save_pruned` wrote: its first row is the model as given, which is not dense. The row, the
files, the printed table, the chart's legend and the card of a folder showing the sweep said "dense" for a 50%-sparse
input; they now name it by its share of zeros, measured, and the sparsities below that share are skipped (they would
prune nothing new)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from hf_weightprune import PruneConfig, oneshot_importance, prune_, save_pruned
from hf_weightprune.publish.card import write_model_card
from hf_weightprune.testing import tiny_llama, train_tokenizer
from hf_weightprune.tools.cli import main
from hf_weightprune.tools.data import load_texts
from hf_weightprune.tools.sweep import format_table, sweep
from hf_weightprune.tools.sweep_results import plot_results
from tests.helpers import linear_zero_share

KJV = Path(__file__).resolve().parents[2] / "data" / "kjv"
EVAL = dict(seq_len=32, max_windows=2, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """`model/` (dense, with a tokenizer), `half/` (its 50% magnitude prune) and `more/` (`half` pruned to 70%)."""
    root = tmp_path_factory.mktemp("sweep-ref")
    tok = train_tokenizer(load_texts(KJV / "train.txt")[:30], vocab_size=320)
    model = tiny_llama(seed=0, vocab_size=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for name, sparsity in (("half", 0.5), ("more", 0.7)):
        report = prune_(model, oneshot_importance(model, "magnitude"), PruneConfig(sparsity=sparsity), progress=False)
        save_pruned(model, root / name, report=report, tokenizer=tok)
    return root


def test_a_pruned_input_is_named_by_its_measured_sparsity_and_lower_points_are_skipped(folders, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):
        rows = sweep(folders / "half", None, KJV / "valid.txt", sparsities=[0.0, 0.3, 0.5, 0.7], output_dir=out,
                     **EVAL)
    zeros = linear_zero_share(folders / "half")
    assert zeros == pytest.approx(0.5, abs=0.01)
    first = rows[0]
    assert (first["criterion"], first["structure"]) == ("input", "input")
    assert first["sparsity"] == first["input_sparsity"] == pytest.approx(zeros, abs=1e-9)
    # the points below the input's share are skipped, with one warning naming them and the share
    assert [r["sparsity"] for r in rows[1:]] == [0.5, 0.7]
    skipped = [r.getMessage() for r in caplog.records if "skipping the sparsities below it" in r.getMessage()]
    assert len(skipped) == 1 and "Input model (50.0% sparse)" in skipped[0] and "(0, 0.3)" in skipped[0], skipped
    # a magnitude prune at the input's own share removes exactly its zeros: the very model, the very loss
    assert rows[1]["loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert rows[2]["loss"] != first["loss"]  # 70%: pruned further (a random tiny model: the loss moves, not up)

    assert json.loads((out / "sweep.json").read_text()) == rows
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert table[0]["criterion"] == "input" and float(table[0]["sparsity"]) == pytest.approx(zeros)
    text = format_table(rows)
    assert "Input model (50.0% sparse) perplexity:" in text and "dense" not in text.lower(), text

    fig = plot_results(rows, tmp_path / "again.png", "t")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any(label.startswith("input model (50.0% sparse) (perplexity") for label in labels), labels
    assert not any("dense" in label for label in labels), labels


def test_the_card_of_a_folder_showing_a_sweep_of_a_pruned_input_does_not_call_it_dense(folders):
    rows = sweep(folders / "half", None, KJV / "valid.txt", sparsities=[0.5, 0.8], output_dir=folders / "more", **EVAL)
    text = " ".join(write_model_card(folders / "more").read_text().split())
    section = text.split("## Loss vs. sparsity")[1].split("## What the sparsity buys")[0]
    assert "Each row prunes a fresh copy of the input model (50.0% sparse) to that sparsity" in section, section
    assert "dense" not in section.lower(), section
    assert f"| Input model (50.0% sparse) | - | - | 50.0% | {rows[0]['loss']:.4f} |" in section, section


def test_a_dense_input_keeps_its_dense_row(folders, tmp_path):
    rows = sweep(folders / "model", None, KJV / "valid.txt", sparsities=[0.0, 0.5], output_dir=tmp_path, **EVAL)
    assert rows[0] == {"criterion": "dense", "structure": "dense", "sparsity": 0.0, "loss": rows[0]["loss"],
                       "perplexity": rows[0]["perplexity"], "tokens": rows[0]["tokens"], "dataset": "valid.txt"}
    assert [r["sparsity"] for r in rows[1:]] == [0.0, 0.5]
    assert "\nDense perplexity:" in format_table(rows)


def test_refusals_before_any_evaluation_or_file(folders, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"every sparsity \(0.1, 0.3\) is below the share of zeros the model already "
                                         r"holds: Input model \(50.0% sparse\)"):
        sweep(folders / "half", None, KJV / "valid.txt", sparsities=[0.1, 0.3], output_dir=out, **EVAL)
    assert not out.exists()
    imp = oneshot_importance(AutoModelForCausalLM.from_pretrained(folders / "model"), "magnitude")
    for label in ("dense", "input"):
        with pytest.raises(ValueError, match=f"importance label '{label}' names the sweep's reference row"):
            sweep(folders / "model", {label: imp}, KJV / "valid.txt", output_dir=out, **EVAL)
    assert not out.exists()


def test_cli_prints_the_input_model_not_dense(folders, tmp_path, capsys):
    assert main(["sweep", str(folders / "half"), "--data", str(KJV / "valid.txt"), "--sparsities", "0.2,0.6",
                 "--seq_len", "32", "--max_windows", "2", "--batch_size", "2", "--output_dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Input model (50.0% sparse) perplexity:" in captured.out and "Dense" not in captured.out
    assert "skipping the sparsities below it (0.2)" in captured.err, captured.err


def test_a_structured_sweep_of_a_pruned_input_names_it_too(folders, tmp_path):
    rows = sweep(folders / "half", None, KJV / "valid.txt", structure="neurons", sizes=[0.2], output_dir=tmp_path,
                 **EVAL)
    assert rows[0]["criterion"] == "input" and rows[0]["input_sparsity"] == pytest.approx(linear_zero_share(folders / "half"))
    assert rows[0]["sparsity"] == 0.0 and rows[0]["size"] == 0.0  # the structured axis: parameters removed
    text = format_table(rows)
    assert "Input model (50.0% sparse) perplexity:" in text and "Dense" not in text, text
