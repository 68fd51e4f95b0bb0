import argparse
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import Trainer

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.matching import find_tracked_weights
from hf_weightprune.prune.oneshot import oneshot_importance
from hf_weightprune.testing import tiny_llama, train_tokenizer
from hf_weightprune.tools.cli import add_sweep_parser
from hf_weightprune.tools.data import load_texts, make_windows
from hf_weightprune.tools.sweep import format_table, parse_sparsities, sweep
from tests.helpers import train, training_args

KJV = Path(__file__).resolve().parents[2] / "data" / "kjv"
SEQ, WINDOWS, BATCH = 32, 6, 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama trained briefly on KJV text, saved with its tokenizer, plus in-memory importance."""
    root = tmp_path_factory.mktemp("sweep")
    texts = load_texts(KJV / "train.txt")[:30]
    tok = train_tokenizer(texts, vocab_size=320)
    model = tiny_llama(vocab_size=len(tok))
    cbs = [ImportanceCallback(ImportanceConfig(criterion=c, name=c)) for c in ("temporal_magnitude", "taylor")]
    args = training_args(root / "run", max_steps=40, per_device_train_batch_size=8, learning_rate=1e-2,
                         save_strategy="no", seed=0)
    Trainer(model=model, args=args, train_dataset=make_windows(tok, texts, seq_len=SEQ, max_windows=128),
            callbacks=cbs).train()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root, {cb.config.criterion: cb.importance() for cb in cbs}


def test_sweep_csv_json_png_and_dense_row_equals_trainer_evaluate(trained, tmp_path):
    root, imps = trained
    out = tmp_path / "out"
    rows = sweep(root / "model", imps, KJV / "valid.txt", sparsities=[0.0, 0.5, 0.9], baselines=("magnitude", "wanda"),
                 calibration_data=KJV / "train.txt", calibration_windows=4, seq_len=SEQ, max_windows=WINDOWS,
                 batch_size=BATCH, output_dir=out, progress=False)

    # Independent reference: Trainer.evaluate on the same windows, from the saved model.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "model")
    windows = make_windows(tok, load_texts(KJV / "valid.txt"), seq_len=SEQ, max_windows=WINDOWS)
    args = training_args(tmp_path / "eval", per_device_eval_batch_size=BATCH)
    ref = Trainer(model=AutoModelForCausalLM.from_pretrained(root / "model"), args=args).evaluate(windows)["eval_loss"]

    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert table[0]["criterion"] == "dense"
    assert float(table[0]["loss"]) == pytest.approx(ref, rel=1e-5)
    assert len(table) == 1 + 4 * 3
    assert json.loads((out / "sweep.json").read_text()) == rows
    assert {r["criterion"] for r in rows} == {"dense", "temporal_magnitude", "taylor", "oneshot-magnitude",
                                              "oneshot-wanda"}

    from matplotlib.image import imread

    image = imread(out / "sweep.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    by = {(r["criterion"], r["sparsity"]): r for r in rows}
    for label in imps.keys() | {"oneshot-magnitude", "oneshot-wanda"}:
        assert by[label, 0.0]["loss"] == rows[0]["loss"]
        assert by[label, 0.9]["loss"] > by[label, 0.0]["loss"] + 0.1, label
        assert by[label, 0.9]["perplexity"] == pytest.approx(math.exp(by[label, 0.9]["loss"]))
    assert "| temporal_magnitude |" in format_table(rows)


def test_sweep_nm_one_point_per_criterion(trained, tmp_path):
    root, imps = trained
    rows = sweep(root / "model", [imps["temporal_magnitude"]], KJV / "valid.txt", structure="2:4",
                 sparsities=[0.1, 0.9], seq_len=SEQ, max_windows=2, batch_size=BATCH, output_dir=tmp_path,
                 progress=False)
    assert [(r["criterion"], r["structure"], r["sparsity"]) for r in rows[1:]] == [
        ("temporal_magnitude", "2:4", 0.5), ("oneshot-magnitude", "2:4", 0.5)]
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_sweep_reads_named_importances_from_folders_and_hub_repos(trained, tmp_path, hub_server, monkeypatch, capsys):
    """The run's two named callbacks wrote `run/importance-<name>/`: `importance_name=` (CLI `--importance_name`)
    reads one from a local run folder and from a Hub repo holding only that folder, as the in-memory importance."""
    from huggingface_hub import HfApi

    from hf_weightprune.tools.cli import main

    root, imps = trained
    kw = dict(sparsities=[0.5], baselines=(), seq_len=SEQ, max_windows=2, batch_size=BATCH, progress=False)
    expected = sweep(root / "model", {"t": imps["taylor"]}, KJV / "valid.txt", **kw)
    local = sweep(root / "model", [f"t={root / 'run'}"], KJV / "valid.txt", importance_name="taylor", **kw)
    assert local == expected and expected[1]["loss"] > expected[0]["loss"]
    HfApi(token=hub_server.token).create_repo("tester/named-run")
    HfApi(token=hub_server.token).upload_folder(repo_id="tester/named-run", folder_path=root / "run" / "importance-taylor",
                                                path_in_repo="importance-taylor")
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    assert main(["sweep", str(root / "model"), "--importance", "t=tester/named-run", "--importance_name", "taylor",
                 "--criteria", "", "--data", str(KJV / "valid.txt"), "--sparsities", "0.5", "--seq_len", str(SEQ),
                 "--max_windows", "2", "--batch_size", str(BATCH), "--output_dir", str(tmp_path / "hub"), "-q"]) == 0
    assert json.loads((tmp_path / "hub" / "sweep.json").read_text()) == expected
    with pytest.raises(ValueError, match=r"No importance named 'nope'"):
        sweep(root / "model", [str(root / "run")], KJV / "valid.txt", importance_name="nope", **kw)


def test_oneshot_wanda_equals_brute_force_reference():
    model = tiny_llama(seed=3)
    ids = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    tracked = find_tracked_weights(model)
    recorded = {t.name: [] for t in tracked}
    hooks = [t.module.register_forward_hook(lambda m, i, o, n=t.name: recorded[n].append(i[0].detach().double()))
             for t in tracked]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()

    imp = oneshot_importance(model, "wanda", ids, batch_size=2)  # 3 batches of a different size than the reference
    assert imp.criterion == "wanda" and imp.names == [t.name for t in tracked]
    for t in tracked:
        x = torch.cat([a.reshape(-1, a.shape[-1]) for a in recorded[t.name]])
        ref = t.param.detach().double().abs() * x.pow(2).mean(0).sqrt()[None, :]
        torch.testing.assert_close(imp.scores[t.name].double(), ref, rtol=1e-5, atol=1e-7)

    mag = oneshot_importance(model, "magnitude")
    torch.testing.assert_close(mag.scores[tracked[0].name], tracked[0].param.detach().abs())
    with pytest.raises(ValueError, match="needs calibration"):
        oneshot_importance(model, "wanda")
    with pytest.raises(ValueError, match="one-shot criterion must be one of"):
        oneshot_importance(model, "taylor")


def test_several_callbacks_on_one_trainer_match_separate_runs(tmp_path):
    both = [ImportanceCallback(ImportanceConfig(criterion=c, name=c)) for c in ("temporal_magnitude", "fisher")]
    train(tiny_llama(), both, tmp_path / "both", max_steps=4)
    for cb in both:
        alone = ImportanceCallback(ImportanceConfig(criterion=cb.config.criterion))
        train(tiny_llama(), [alone], tmp_path / cb.config.criterion, max_steps=4)
        a, b = cb.importance(), alone.importance()
        assert a.num_samples == b.num_samples == 4
        for name in a.names:
            torch.testing.assert_close(a.scores[name], b.scores[name])


def _cli(argv):
    parser = argparse.ArgumentParser(prog="hf-weightprune")
    add_sweep_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "  \n", "is empty"),
        ("data.csv", "a,b\n1,2\n", "Unknown file type '.csv'"),
        ("bad.jsonl", '{"title": "no text field"}\n', "has no 'text' field"),
        ("short.txt", "In the beginning.\n", "fewer than seq_len"),
    ],
)
def test_bad_data_gives_clear_error(trained, tmp_path, name, content, message):
    root, _ = trained
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        _cli(["sweep", str(root / "model"), "--data", str(path), "--seq_len", str(SEQ), "--output_dir", str(tmp_path)])
    assert not (tmp_path / "sweep.csv").exists()


def test_cli_rejects_bad_arguments_and_mismatched_importance(trained, tmp_path):
    root, imps = trained
    base = ["sweep", str(root / "model"), "--data", str(KJV / "valid.txt"), "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="sparsities must lie in"):
        _cli([*base, "--sparsities", "0,0.5,1.0"])
    with pytest.raises(ValueError, match="baselines must be among"):
        _cli([*base, "--criteria", "taylor"])
    with pytest.raises(ValueError, match="sizes applies to structured sweeps"):  # tests/tools/test_structured_sweep.py
        _cli([*base, "--structure", "2:4", "--sizes", "0.2"])
    # Importance of a differently shaped model is refused before any evaluation.
    from hf_weightprune.testing import save_importance_dir

    other = tiny_llama(hidden_size=16)
    mag = oneshot_importance(other, "magnitude")
    save_importance_dir(str(tmp_path / "imp"), mag.state_dict(), config=mag.config, meta=mag.meta, shapes=mag.shapes)
    with pytest.raises(ValueError, match="does not match this model"):
        _cli([*base, "--importance", str(tmp_path / "imp"), "--seq_len", str(SEQ)])


def test_parse_sparsities():
    assert parse_sparsities("0,0.1,...,0.9") == pytest.approx([i / 10 for i in range(10)])
    assert parse_sparsities("0.7, 0.5,0.5") == [0.5, 0.7]
    with pytest.raises(ValueError, match="comma-separated floats"):
        parse_sparsities("0,half")
    with pytest.raises(ValueError, match="needs two values before it"):
        parse_sparsities("0,...,0.9")
