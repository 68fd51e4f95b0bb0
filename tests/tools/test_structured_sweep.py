"""The structured sweep: `sweep(..., structure="neurons", sizes=[...])` and `hf-weightprune sweep --structures ...
--sizes ...` compare structures x unit statistics x compensations at shares of the parameters removed. Each row's
parameters and loss are the pruned model's (pruned again here), the plot is written, and every combination the sweep
cannot run is refused in one line before any evaluation, writing nothing; the card of a structured model shows a
structured sweep and labels a sweep of the other kind as not describing it."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig, OPTForCausalLM

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, oneshot_importance, prune_, save_pruned
from hf_weightprune.files.importance_files import load_importance
from hf_weightprune.publish.card import write_model_card
from hf_weightprune.testing import tiny_llama, tiny_phi3, train_tokenizer
from hf_weightprune.tools.cli import main
from hf_weightprune.tools.data import evaluate_loss, load_texts, make_windows
from hf_weightprune.tools.sweep import format_table, sweep, write_results
from tests.helpers import train

KJV = Path(__file__).resolve().parents[2] / "data" / "kjv"
SEQ, WINDOWS, BATCH = 32, 4, 2
EVAL = dict(seq_len=SEQ, max_windows=WINDOWS, batch_size=BATCH, progress=False)


def _run(root: Path, build) -> Path:
    """`build(vocab)` trained 3 steps with sparsegpt + unit statistics, saved with a tokenizer and its importance."""
    tok = train_tokenizer(load_texts(KJV / "train.txt")[:30], vocab_size=320)
    model = build(len(tok))
    trainer = train(model, [ImportanceCallback(ImportanceConfig(criterion="sparsegpt", units=True))], root,
                    max_steps=3, lr=1e-3)
    trainer.save_model(str(root))
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("llama"), lambda v: tiny_llama(seed=1, vocab_size=v, num_hidden_layers=4))


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("phi3"), lambda v: tiny_phi3(seed=2, vocab_size=v, num_hidden_layers=4))


def _check_rows_are_the_pruned_models(run: Path, rows: list[dict]):
    """Every scored row pruned again from scratch: same parameter count, same loss."""
    model = AutoModelForCausalLM.from_pretrained(run)
    windows = make_windows(AutoTokenizer.from_pretrained(run), load_texts(KJV / "valid.txt"), seq_len=SEQ,
                           max_windows=WINDOWS)
    before = sum(p.numel() for p in model.parameters())
    assert rows[0]["criterion"] == "dense" and rows[0]["num_parameters"] == before
    imps = {"sparsegpt": load_importance(run), "oneshot-magnitude": oneshot_importance(model, "magnitude")}
    for row in rows[1:]:
        assert row["skipped"] is None, row
        again = copy.deepcopy(model)
        config = PruneConfig(structure=row["structure"], target_params=round(1 - row["size"], 10),
                             unit_statistic=row["unit_statistic"] if row["unit_statistic"] != "per-weight scores"
                             else "activation", compensate=row["compensate"])
        prune_(again, imps[row["criterion"]], config, progress=False)
        kept = sum(p.numel() for p in again.parameters())
        assert row["num_parameters"] == kept and row["sparsity"] == pytest.approx(1 - kept / before)
        assert abs(row["sparsity"] - row["size"]) < 0.1  # the budget is met within a step of the coarsest axis
        assert row["loss"] == pytest.approx(evaluate_loss(again, windows, batch_size=BATCH)["loss"], rel=1e-5)


def test_llama_structures_statistics_and_compensations_at_sizes(llama, tmp_path):
    out = tmp_path / "sweep"
    rows = sweep(llama, llama, KJV / "valid.txt", structures=["neurons", "layers,neurons"], sizes=[0.3, 0.15],
                 unit_statistics=["activation", "taylor"], compensations=[None, "refit"], baselines=(),
                 output_dir=out, **EVAL)
    points = rows[1:]
    assert [r["size"] for r in points[:8]] == [0.15] * 8  # sizes sorted; 2 structures x 2 statistics x 2 compensations
    assert len(points) == 16
    assert {(r["structure"], r["unit_statistic"], r["compensate"]) for r in points} == {
        (s, u, c) for s in ("neurons", "layers,neurons") for u in ("activation", "taylor") for c in (None, "refit")}
    _check_rows_are_the_pruned_models(llama, rows)
    assert json.loads((out / "sweep.json").read_text()) == json.loads(json.dumps(rows))
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["criterion", "structure", "unit_statistic", "compensate", "size", "sparsity",
                              "num_parameters", "loss", "perplexity", "skipped"]
    from matplotlib.image import imread

    image = imread(out / "sweep.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert "| sparsegpt: layers,neurons (taylor, refit) |" in format_table(rows)


def test_phi3_fused_through_the_cli_with_a_one_shot_baseline(phi3, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", str(phi3), "--importance", str(phi3), "--data", str(KJV / "valid.txt"), "--structures",
                 "neurons", "heads,neurons", "--sizes", "0.1,0.25", "--criteria", "magnitude", "--seq_len", str(SEQ),
                 "--max_windows", str(WINDOWS), "--batch_size", str(BATCH), "--output_dir", str(out), "-q"]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert {r["criterion"] for r in rows} == {"dense", "sparsegpt", "oneshot-magnitude"}
    assert {r["unit_statistic"] for r in rows if r["criterion"] == "oneshot-magnitude"} == {"per-weight scores"}
    assert len(rows) == 1 + 2 * 2 * 2
    _check_rows_are_the_pruned_models(phi3, rows)
    assert (out / "sweep.png").stat().st_size > 1000
    assert "| sparsegpt: heads,neurons (activation) |" in capsys.readouterr().out


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    """A tiny OPT (fc1/fc2 MLP, no gate): a layout structured pruning does not take; saved with a tokenizer."""
    root = tmp_path_factory.mktemp("opt")
    tok = train_tokenizer(load_texts(KJV / "train.txt")[:30], vocab_size=320)
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=32)).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.mark.parametrize("kwargs, message", [
    (dict(structure="2:4", sizes=[0.2]), "sizes applies to structured sweeps"),
    (dict(structure="neurons", sparsities=[0.5]), "a structured sweep takes sizes"),
    (dict(structure="neurons", sizes=[0.0, 0.2]), "sizes must be shares of the parameters removed in (0, 1)"),
    (dict(structure="experts", sizes=[0.2]), "sweep does not remove whole experts"),
    (dict(structure="neurons", structures=["heads"]), "structures replaces structure"),
    (dict(structures=["layers"], compensations=["refit"]), "none of the structures ['layers'] removes them"),
    (dict(structures=["neurons"], unit_statistics=["bogus"]), "unit_statistic must be one of"),
    (dict(structures=["layers"], sizes=[0.95]), "sweep: llama: layers (block influence) at 95% of the parameters removed"),
    (dict(structures=["layers"], sizes=[0.15], baselines=("magnitude",)), "one-shot baselines have no unit statistics or Hessians"),
    (dict(structures=["neurons"], sizes=[0.2], compensations=["refit"], baselines=("magnitude",)),
     "sweep: oneshot-magnitude: neurons (per-weight scores, refit) at 20% of the parameters removed"),
])
def test_refusals_are_one_line_and_write_nothing(llama, tmp_path, kwargs, message):
    out = tmp_path / "sweep"
    kwargs = {"baselines": (), **kwargs}
    with pytest.raises(ValueError) as e:
        sweep(llama, {"llama": load_importance(llama)}, KJV / "valid.txt", output_dir=out, **EVAL, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_a_layout_structured_pruning_cannot_take_is_refused_before_any_evaluation(opt, tmp_path):
    out = tmp_path / "sweep"
    with pytest.raises(ValueError, match=r"oneshot-magnitude: neurons .* not possible for OPTForCausalLM") as e:
        sweep(opt, None, KJV / "valid.txt", structure="neurons", sizes=[0.2], output_dir=out, **EVAL)
    assert "\n" not in str(e.value) and not out.exists()
    assert main(["sweep", str(opt), "--data", str(KJV / "valid.txt"), "--structure", "neurons", "--output_dir",
                 str(out), "-q"]) == 2
    assert not out.exists()


@pytest.mark.parametrize("structure", ["neurons,hidden", "heads,neurons,hidden"])
def test_the_check_stage_runs_a_refit_beside_hidden_channels(llama, structure):
    # The check stage catches ValueError only (a refusal). Under a budget hidden channels are cut before the
    # neurons that fill it, and the refit then escaped it as a raw KeyError (the model copy already half cut).
    from hf_weightprune.tools.structured_sweep import check_points

    model, imp = AutoModelForCausalLM.from_pretrained(llama), load_importance(llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    candidates = [PruneConfig(structure=structure, target_params=0.5, compensate=c) for c in ("refit", "refit,mean")]
    check_points(model, {"sparsegpt": imp}, candidates, [0.3, 0.5])  # prunes a copy with each at 50% removed
    pruned = prune_(copy.deepcopy(model), imp, candidates[0], progress=False).structured["axes"]
    assert pruned["hidden"]["after"] < pruned["hidden"]["before"] and pruned["neurons"]["removed"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _pruned(run: Path, dest: Path, config: PruneConfig) -> Path:
    model = AutoModelForCausalLM.from_pretrained(run)
    report = prune_(model, load_importance(run), config, progress=False)
    save_pruned(model, dest, report=report, tokenizer=AutoTokenizer.from_pretrained(run))
    return dest


def test_a_sweep_of_the_other_kind_is_refused_in_a_pruned_folder_and_labelled_on_the_card(llama, tmp_path):
    smaller = _pruned(llama, tmp_path / "smaller", PruneConfig(structure="neurons", target_params=0.8))
    zeros = _pruned(llama, tmp_path / "zeros", PruneConfig(structure="2:4"))
    for folder, kwargs in ((smaller, dict(sparsities=[0.5])), (zeros, dict(structure="neurons", sizes=[0.2]))):
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(ValueError, match="whose card would show .* as if it described it"):
            sweep(llama, None, KJV / "valid.txt", output_dir=folder, **EVAL, **kwargs)
        assert sorted(p.name for p in folder.iterdir()) == before

    # the structured model's own structured sweep: the card's section is about parameters removed
    rows = sweep(llama, None, KJV / "valid.txt", structure="neurons", sizes=[0.2], output_dir=smaller, **EVAL)
    text = " ".join(write_model_card(smaller).read_text().split())
    section = text.split("## Loss vs. parameters removed")[1].split("## What the sparsity buys")[0]
    assert "![Eval loss vs. parameters removed](sweep.png)" in section and "Not this model" not in section
    assert "| Importance | Structure | Unit ranking | Compensation | Removed | Parameters | Loss | Perplexity |" in section
    row = rows[1]
    assert (f"| `oneshot-magnitude` | neurons | per-weight scores | - | {100 * row['sparsity']:.1f}% | "
            f"{row['num_parameters']:,} | {row['loss']:.4f} |") in section
    assert "This model is neurons with " in section

    # sweep files of the other kind (an older version, or copied by hand) are labelled, never shown as the model's
    write_results(sweep(llama, None, KJV / "valid.txt", sparsities=[0.5], **EVAL), smaller)
    text = " ".join(write_model_card(smaller).read_text().split())
    assert ("**Not this model.** This sweep zeroed weights of copies of the dense model (unstructured) and this model "
            "is smaller (neurons): no row or line below describes it.") in text


def test_a_sweep_written_into_a_pruned_folder_shows_on_its_card_at_once(llama, tmp_path, capsys):
    """The README says the sweep "becomes that model's card section": the folder's generated README.md is
    re-rendered (it kept the card save_pruned wrote until push or write_model_card); a card the user wrote is kept."""
    from hf_weightprune.publish.card import CARD_FILE

    smaller = _pruned(llama, tmp_path / "smaller", PruneConfig(structure="neurons", target_params=0.8))
    assert "## Loss vs." not in (smaller / CARD_FILE).read_text()
    assert main(["sweep", str(llama), "--data", str(KJV / "valid.txt"), "--structure", "neurons", "--sizes", "0.2",
                 "--seq_len", str(SEQ), "--max_windows", str(WINDOWS), "--output_dir", str(smaller), "-q"]) == 0
    card = (smaller / CARD_FILE).read_text()
    assert "## Loss vs. parameters removed" in card and card == write_model_card(smaller).read_text()

    zeros = _pruned(llama, tmp_path / "zeros", PruneConfig(structure="2:4"))
    (zeros / CARD_FILE).write_text("# My own card\n")
    sweep(llama, None, KJV / "valid.txt", sparsities=[0.5], output_dir=zeros, **EVAL)
    assert (zeros / CARD_FILE).read_text() == "# My own card\n" and (zeros / "sweep.json").is_file()


def _warnings(records) -> list[str]:
    import logging

    return [r.getMessage() for r in records if r.name.startswith("hf_weightprune") and r.levelno == logging.WARNING]


def test_sweep_warnings_name_the_sizes_given_and_are_said_once(llama, tmp_path, caplog, capsys):
    """A sweep prunes each candidate once in its checks and again in the run, and one importance at every size and
    compensation: each warning once, naming the size the user gave (not the target_params each point prunes with)."""
    import logging

    kwargs = dict(structures=["neurons", "heads,neurons"], sizes=[0.3, 0.15], compensations=[None, "refit"],
                  baselines=(), **EVAL)
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):
        sweep(llama, llama, KJV / "valid.txt", output_dir=tmp_path / "py", **kwargs)
    said = _warnings(caplog.records)
    assert len(said) == len(set(said)), said  # each once
    assert not any("target_params" in m or "structure=" in m or "compensate=" in m for m in said), said
    # the sparsegpt Hessians are too small for a refit: said once for the sweep, not per candidate, size and check
    assert sum("the refit can do worse than no compensation" in m for m in said) == 1, said
    assert sum(m.startswith("compensation 'refit': the Hessian of") for m in said) == 1, said
    # a candidate that keeps one KV group per layer at the largest size: once (the checks prune it too)
    assert [m for m in said if "keeps 1 of 2 units" in m] == [
        "structure 'heads,neurons' at size 0.3 keeps 1 of 2 units per decoder layer (KV groups): the model is "
        "unlikely to be useful; lower the budget"]
    # the same model given by two candidates: named with their statistic and compensation, at the sweep's size
    assert ("sweep sparsegpt at size 0.15: heads,neurons (activation, refit) prunes the same model as neurons "
            "(activation, refit) (the same sizes and units removed): scored once") in said

    # the command line: the same, in the flags' words (no --target_params, which the user did not give)
    assert main(["sweep", str(llama), "--importance", str(llama), "--data", str(KJV / "valid.txt"), "--structures",
                 "neurons", "heads,neurons", "--sizes", "0.15,0.3", "--compensations", "none", "refit",
                 "--criteria", "", "--seq_len", str(SEQ), "--max_windows", str(WINDOWS), "--batch_size", str(BATCH),
                 "--output_dir", str(tmp_path / "cli")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING hf_weightprune")]
    assert err and len(err) == len(set(err)) and not any("target_params" in line for line in err), err
    assert sum("keeps 1 of 2 units" in line and "at size 0.3" in line for line in err) == 1, err


def test_a_search_says_each_warning_once_though_it_prunes_the_winner_again(llama, caplog):
    import logging

    from hf_weightprune import search_structures

    model = AutoModelForCausalLM.from_pretrained(llama)
    windows = make_windows(AutoTokenizer.from_pretrained(llama), load_texts(KJV / "valid.txt"), seq_len=SEQ,
                           max_windows=WINDOWS)
    cands = [PruneConfig(structure="heads,neurons", target_params=0.7, compensate="refit")]
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):
        result = search_structures(model, load_importance(llama), cands, windows, batch_size=BATCH)
    said = _warnings(caplog.records)
    assert result.model is not None and len(said) == len(set(said)), said
    assert sum("keeps 1 of 2 units" in m for m in said) == 1 and sum("the Hessian of" in m for m in said) == 1, said
    assert any("target_params 0.7" in m for m in said)  # a search's budget is the target_params the user gave
