"""A folder `save_pruned` wrote, pruned again: the loss measured "before pruning" is that folder's, which already
holds zeros. `prune --eval_data` recorded it as the dense loss and the card printed "| Dense (before pruning) |" and
"the dense model before pruning"; the structure search's card line said "dense model". They now record the input's
measured share of zeros (`input_sparsity`, as the sweep's reference row does) and name it "Input model (50.0%
sparse)"; a dense input's card is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from hf_weightprune import PruneConfig, load_importance, prune_, save_pruned
from hf_weightprune.files.pruned_files import load_sparsity, reference_name
from hf_weightprune.prune.report import measure_input
from hf_weightprune.testing import tiny_llama, train_tokenizer
from hf_weightprune.tools.cli import main
from hf_weightprune.tools.data import load_texts
from tests.helpers import linear_zero_share, wanda_units_run

KJV = Path(__file__).resolve().parents[2] / "data" / "kjv"
EVAL = ["--eval_data", str(KJV / "valid.txt"), "--max_windows", "2", "--seq_len", "32", "--batch_size", "2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """`run/` (a dense training output: model, tokenizer, wanda importance with unit statistics), `half/` (its 50%
    unstructured prune, written by `prune`, no evaluation) and `train.txt` (calibration text)."""
    root = tmp_path_factory.mktemp("prune-ref")
    texts = load_texts(KJV / "train.txt")[:40]
    tok = train_tokenizer(texts, vocab_size=320)
    model = tiny_llama(seed=4, num_hidden_layers=4, vocab_size=len(tok))
    wanda_units_run(root / "run", model, lr=1e-3)
    tok.save_pretrained(root / "run")
    (root / "train.txt").write_text("\n".join(texts))
    assert main(["prune", str(root / "run"), "--importance", str(root / "run"), "--sparsity", "0.5",
                 "--output_dir", str(root / "half")]) == 0
    return root


def _section(folder: Path, title: str) -> str:
    text = " ".join((folder / "README.md").read_text().split())
    return text.split(f"## {title}")[1].split("## ")[0]


def test_cli_eval_of_a_pruned_input_names_it_by_its_measured_share(folders, tmp_path):
    out = tmp_path / "more"
    assert main(["prune", str(folders / "half"), "--importance", str(folders / "run"), "--sparsity", "0.7", *EVAL,
                 "--output_dir", str(out)]) == 0
    zeros = linear_zero_share(folders / "half")
    assert zeros == pytest.approx(0.5, abs=0.01)
    record = json.loads((out / "sparsity.json").read_text())["eval"]
    assert record["input_sparsity"] == pytest.approx(zeros, abs=1e-9)
    assert record["dense_loss"] != record["pruned_loss"]  # the input's loss, kept under its old key
    section = _section(out, "Evaluation")
    assert ("tokens: the input model (50.0% sparse) before this prune and the pruned model, on the same windows."
            in section), section
    assert f"| Input model (50.0% sparse), before this prune | {record['dense_loss']:.4f} |" in section, section
    assert "dense" not in section.lower(), section
    assert linear_zero_share(out) == pytest.approx(0.7, abs=0.01)


def test_cli_eval_of_a_dense_input_keeps_its_dense_row(folders, tmp_path):
    out = tmp_path / "dense-half"
    assert main(["prune", str(folders / "run"), "--importance", str(folders / "run"), "--sparsity", "0.5", *EVAL,
                 "--output_dir", str(out)]) == 0
    record = load_sparsity(out)["eval"]
    assert record["input_sparsity"] == 0.0
    section = _section(out, "Evaluation")
    assert "the dense model before pruning and the pruned model, on the same windows." in section, section
    assert f"| Dense (before pruning) | {record['dense_loss']:.4f} |" in section and "Input model" not in section


def test_the_structure_search_of_a_pruned_input_names_it(folders, tmp_path, capsys):
    out = tmp_path / "searched"
    assert main(["prune", str(folders / "half"), "--importance", str(folders / "run"), "--target_params", "0.75",
                 "--search_structures", "neurons", "layers,neurons", "--calibration", str(folders / "train.txt"),
                 "--search_windows", "4", "--seq_len", "16", "--output_dir", str(out)]) == 0
    assert "windows (60 tokens; input model (50.0% sparse) " in capsys.readouterr().out
    search = load_sparsity(out)["search"]
    assert search["input_sparsity"] == pytest.approx(linear_zero_share(folders / "half"), abs=1e-9)
    line = next(s for s in (out / "README.md").read_text().splitlines() if s.startswith("- **Shape search**"))
    assert line.endswith(f"; input model (50.0% sparse) {search['dense_loss']:.4f}."), line
    assert "dense" not in line, line


def test_save_pruned_names_the_reference_from_the_callers_record_or_the_lineage(folders, tmp_path):
    """The Python path: `eval_results` are the caller's. With `input_sparsity` the card states the share; without
    it, a model pruned from a pruned folder (`earlier_prunes`) is "the input model", never "dense"."""
    model = AutoModelForCausalLM.from_pretrained(folders / "half")
    share = measure_input(model)
    assert share == pytest.approx(linear_zero_share(folders / "half"), abs=1e-9)
    report = prune_(model, load_importance(folders / "run"), PruneConfig(sparsity=0.7), progress=False)
    given = {"dense_loss": 3.0, "pruned_loss": 3.5, "dataset": "tiny", "tokens": 64, "step": 7}
    for name, extra, cell, words in (
            ("measured", {"input_sparsity": share}, "Input model (50.0% sparse), step 7",
             "input model (50.0% sparse) at step 7 vs pruned model at step 7"),
            ("unmeasured", {}, "Input model, step 7", "input model at step 7 vs pruned model at step 7")):
        save_pruned(model, tmp_path / name, report=report, eval_results={**given, **extra})
        section = _section(tmp_path / name, "Evaluation")
        assert f"| {cell} | 3.0000 |" in section and words in section, section
        assert "dense" not in section.lower(), section
    with pytest.raises(ValueError, match=r"eval_results\['input_sparsity'\] must be a share of zeros in \[0, 1\]"):
        save_pruned(model, tmp_path / "bad", report=report, eval_results={**given, "input_sparsity": 50})
    assert not (tmp_path / "bad").exists()


def test_a_card_of_a_dropped_comparison_names_the_input_too(folders, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folders / "half")
    report = prune_(model, load_importance(folders / "run"), PruneConfig(sparsity=0.7), progress=False)
    save_pruned(model, tmp_path / "out", report=report, eval_results={
        "dense_loss": 3.0, "pruned_loss": 3.5, "dataset": "tiny", "tokens": 64, "dense_tokens": 32,
        "input_sparsity": 0.5})
    section = _section(tmp_path / "out", "Evaluation")
    assert ("The loss of the input model (50.0% sparse) is not shown: it was not measured by the same evaluation "
            "(tokens 32 (input) vs 64 (pruned))") in section, section


@pytest.mark.parametrize("share, pruned, name", [
    (None, False, "Dense"), (0.0, True, "Dense"), (None, True, "Input model"), (0.5, False, "Input model (50.0% sparse)"),
    (0.0002, False, "Input model (0.02% sparse)")])
def test_reference_name(share, pruned, name):
    assert reference_name(share, pruned) == name
