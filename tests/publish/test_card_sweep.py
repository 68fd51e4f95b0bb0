"""The card's loss-vs-sparsity table says what it measured: read on a 2:4 SmolLM2-135M with an unstructured sweep in
its folder, the table showed `sparsegpt | layer | 50.0% | 3.5063` under a model whose own loss at 50% was 4.1492,
and a dense loss other than the evaluation's above, with nothing saying that the sweep pruned unstructured copies
on other windows. The table now has the structure of each row, and a sentence the tokens and data the sweep read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_weightprune import PruneConfig, oneshot_importance, prune_, save_pruned
from hf_weightprune.publish.card import write_model_card
from hf_weightprune.testing import tiny_llama, train_tokenizer
from hf_weightprune.tools.data import load_texts
from hf_weightprune.tools.sweep import sweep

KJV = Path(__file__).resolve().parents[2] / "data" / "kjv"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama with a tokenizer in `model/`, and its 2:4 magnitude prune in `pruned/`."""
    root = tmp_path_factory.mktemp("card-sweep")
    tok = train_tokenizer(load_texts(KJV / "train.txt")[:30], vocab_size=320)
    model = tiny_llama(seed=0, vocab_size=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    report = prune_(model, oneshot_importance(model, "magnitude"), PruneConfig(structure="2:4"), progress=False)
    save_pruned(model, root / "pruned", report=report, tokenizer=tok)
    return root


def _sweep_card(root: Path, structure: str) -> tuple[str, list[dict]]:
    rows = sweep(root / "model", None, KJV / "valid.txt", sparsities=[0.0, 0.5], structure=structure,
                 baselines=("magnitude",), seq_len=32, max_windows=2, batch_size=2, output_dir=root / "pruned",
                 progress=False)
    text = " ".join(write_model_card(root / "pruned").read_text().split())
    return text.split("## Loss vs. sparsity")[1].split("## What the sparsity buys")[0], rows


def test_an_unstructured_sweep_beside_a_2_4_model_says_so(folders):
    section, rows = _sweep_card(folders, "unstructured")
    tokens = rows[0]["tokens"]
    assert tokens > 0 and all(r["tokens"] == tokens and r["dataset"] == "valid.txt" for r in rows)
    assert str(KJV) not in json.dumps(rows)  # the data by its file name only: sweep.json goes to the Hub
    assert (f"Each row prunes a fresh copy of the dense model to that sparsity and evaluates it on {tokens:,} tokens "
            "of `valid.txt`.") in section
    assert ("The sweep pruned with the unstructured structure and this model is 2:4: its own loss is not a row of "
            "this table.") in section
    assert "| Criterion | Structure | Scope | Sparsity | Loss | Perplexity |" in section
    half = next(r for r in rows if r["sparsity"] == 0.5)
    assert f"| `oneshot-magnitude` | unstructured | layer | 50.0% | {half['loss']:.4f} |" in section
    assert f"| `dense` | - | - | 0.0% | {rows[0]['loss']:.4f} |" in section


def test_a_sweep_of_the_models_own_structure_needs_no_warning(folders):
    section, rows = _sweep_card(folders, "2:4")
    assert "| `oneshot-magnitude` | 2:4 | layer |" in section
    assert "its own loss is not a row of this table" not in section
