"""Issue 28, "Bad input": each of the five families refused in one line naming the argument and a fix, before any
work and with the inputs untouched, through the Python API and the CLI; and the replayed Cholesky fault
(llm-compressor#1069, AutoGPTQ#572) on every path that runs the OBS sweep."""

import hashlib
import logging
import os
import re
from pathlib import Path

import pytest
import torch

from hf_weightprune import (
    ImportanceCallback,
    ImportanceConfig,
    PruneConfig,
    PruneSchedule,
    load_importance,
    prune_,
    prune_checkpoint,
    save_pruned,
    sweep,
)
from hf_weightprune.files.safetensors_io import ImportanceFileError
from hf_weightprune.testing import tiny_llama
from hf_weightprune.tools.cli import main
from tests.helpers import train

DOWN = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training output_dir (model + `sparsegpt` importance) whose Hessians hold 48 tokens: full rank for the 32-wide
    inputs, rank-deficient for down_proj's 64 inputs (it factorises only with dampening)."""
    out = tmp_path_factory.mktemp("bad") / "out"
    trainer = train(tiny_llama(seed=3), [ImportanceCallback(ImportanceConfig(criterion="sparsegpt"))], out,
                    max_steps=1, batch=3, n=3)
    trainer.save_model(str(out))
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr, which is returned."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, captured.err)
    assert "Traceback" not in captured.err and ".tmp" not in lines[0]
    return lines[0]


def _prune_argv(run: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(run), "--importance", str(run), "--output_dir", str(out), *extra]


def _fresh(run: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- family 1: regular expressions compiled when given ------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "named"),
    [(lambda: PruneConfig(sparsity={"[": 0.5}), "sparsity key '['"),
     (lambda: PruneConfig(exclude_modules="mlp.(up"), "exclude_modules 'mlp.(up'"),
     (lambda: ImportanceConfig(target_modules="("), "target_modules '('"),
     (lambda: ImportanceConfig(exclude_modules="a[b"), "exclude_modules 'a[b'"),
     (lambda: PruneSchedule(final_sparsity=0.5, target_modules="(q|k"), "target_modules '(q|k'")],
)
def test_regex_refused_when_the_config_is_built(make, named):
    with pytest.raises(ValueError) as e:
        make()
    text = str(e.value)
    assert text.startswith(named) and "not a valid regular expression" in text and "backslash" in text
    assert "\n" not in text


@pytest.mark.parametrize(("flag", "value"), [("--sparsity", '{"[": 0.5}'), ("--target_modules", "("),
                                             ("--exclude_modules", "mlp.[0")])
def test_regex_refused_by_the_cli(run, tmp_path, capsys, flag, value):
    before = _snapshot(run)
    line = _refused(_prune_argv(run, tmp_path / "o", flag, value), capsys)
    assert f"argument {flag}:" in line and "not a valid regular expression" in line
    assert not (tmp_path / "o").exists() and _snapshot(run) == before


# ---- family 2: a selection that matches nothing ------------------------------------------------------------------


def test_sparsity_key_matching_nothing_is_refused_before_any_weight_changes(run, tmp_path):
    model, before = _fresh(run)
    imp = load_importance(run)
    config = PruneConfig(sparsity={"nomatch": 0.5, ".*mlp.*": 0.5})
    with pytest.raises(ValueError, match=r"^sparsity key 'nomatch' matches none of the 14 weights to prune"):
        prune_(model, imp, config, progress=False)
    assert _unchanged(model, before)
    with pytest.raises(ValueError, match="sparsity key 'nomatch'"):
        prune_checkpoint(str(run), imp, config, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("argv", "expected"),
                         [(["--sparsity", '{"nomatch": 0.5}'], "sparsity key 'nomatch' matches none"),
                          (["--target_modules", "nomatch"], "No tracked weight is selected")])
def test_cli_selection_matching_nothing_writes_nothing(run, tmp_path, capsys, argv, expected):
    assert expected in _refused(_prune_argv(run, tmp_path / "o", *argv), capsys)
    assert not (tmp_path / "o").exists()


def test_structured_prune_keeping_one_unit_warns(run, caplog):
    """In range, so not refused (a sweep may go there), but never silent."""
    model, _ = _fresh(run)
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):
        report = prune_(model, load_importance(run, model=model), PruneConfig(structure="neurons", sparsity=0.98),
                        progress=False)
    assert model.config.intermediate_size == 1 and report.structured["units_per_layer"]["after"] == 1
    assert "keeps 1 of 64 units per decoder layer" in caplog.text


@pytest.mark.parametrize("units", [False, True])
def test_keeping_one_kv_group_warns_with_or_without_unit_statistics(units, tmp_path, caplog):
    """`heads` at 0.5 of 2 KV groups: the warning came only from the per-weight path (no unit statistics)."""
    from hf_weightprune import ImportanceCallback, ImportanceConfig

    model = tiny_llama(seed=3, num_key_value_heads=2)
    callback = ImportanceCallback(ImportanceConfig(criterion="wanda", units=units))
    train(model, [callback], tmp_path, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):
        prune_(model, callback.importance(), PruneConfig(structure="heads", sparsity=0.5), progress=False)
    assert model.config.num_key_value_heads == 1
    assert caplog.text.count("keeps 1 of 2 units per decoder layer (KV groups)") == 1


# ---- family 3: a mistyped local path is never a Hub id -----------------------------------------------------------


def test_load_importance_names_a_missing_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "nosuch"), "./nosuch", "out/a/b", "~/nosuch"):
        with pytest.raises(ImportanceFileError, match=f"^{path}: no such folder"):
            load_importance(path)
    (tmp_path / "out").mkdir()
    with pytest.raises(ImportanceFileError, match="^out/imp: no such folder"):  # a typo below a local folder
        load_importance("out/imp")
    # a valid-looking repo id still goes to the Hub (offline here), and the message says the folder is missing too
    with pytest.raises(FileNotFoundError, match="^nosuch: no such local folder, and Hub repo nosuch"):
        load_importance("nosuch")


def test_cli_missing_local_paths(run, tmp_path, capsys):
    missing = str(tmp_path / "nosuch")
    out = str(tmp_path / "o")
    assert _refused(["prune", missing, "--importance", str(run), "--output_dir", out], capsys).endswith(
        f"model_dir {missing}: no such folder; pass a model folder (config.json and weights) or a Hub repo id")
    assert f"--importance {missing}: no such folder" in _refused(
        ["prune", str(run), "--importance", missing, "--output_dir", out], capsys)
    assert f"importance_dir {missing}: no such folder" in _refused(["inspect", missing], capsys)
    assert f"FOLDER {missing}: no such folder" in _refused(["push", missing, "--repo_id", "me/x"], capsys)
    assert f"--importance {missing}: no such folder" in _refused(
        ["sweep", str(run), "--importance", f"a={missing}", "--data", str(run / "config.json"), "--output_dir", out],
        capsys)
    assert not os.path.exists(out)


@pytest.mark.parametrize("files, says", [
    ({"notes.txt": "x"}, "is not a model folder: it has no config.json"),
    ({"config.json": None}, "has a config.json but no weights (model.safetensors"),
])
def test_cli_folder_that_is_not_a_model(run, tmp_path, capsys, files, says):
    """A folder that exists but holds no model is refused in one line, exit 2, by every command that reads one (not
    transformers' "Should have a `model_type` key in its config.json" for a folder without one, nor exit 1)."""
    folder = tmp_path / "notmodel"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text((run / name).read_text() if text is None else text)
    out = tmp_path / "o"
    for argv in (["prune", str(folder), "--importance", str(run), "--output_dir", str(out)],
                 ["prune", str(folder), "--importance", str(run), "--output_dir", str(out), "--dtype", "float32"],
                 ["inspect", str(run), "--model", str(folder)],
                 ["sweep", str(folder), "--importance", str(run), "--data", str(run / "config.json"),
                  "--output_dir", str(out)]):
        assert says in _refused(argv, capsys), argv
    with pytest.raises(ValueError, match=re.escape(says)):  # the library's sweep, which the CLI's calls
        sweep(str(folder), str(run), str(run / "config.json"), output_dir=str(out))
    assert not out.exists() and sorted(p.name for p in folder.iterdir()) == sorted(files)


# ---- family 4: OS errors checked before the work -----------------------------------------------------------------


def test_output_dir_that_is_a_file(run, tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("x")
    assert f"--output_dir {file} is a file" in _refused(_prune_argv(run, file), capsys)
    assert f"--output_dir {file / 'sub'}: {file} is a file" in _refused(_prune_argv(run, file / "sub"), capsys)
    model, _ = _fresh(run)
    report = prune_(model, load_importance(run), PruneConfig(), progress=False)
    with pytest.raises(NotADirectoryError, match=f"^output_dir {file} is a file"):
        save_pruned(model, str(file), report=report)
    with pytest.raises(NotADirectoryError, match=f"^output_dir {file} is a file"):
        prune_checkpoint(str(run), load_importance(run), PruneConfig(), str(file))
    assert file.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_parent(run, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        line = _refused(_prune_argv(run, parent / "pruned"), capsys)
        assert f"--output_dir {parent / 'pruned'}: cannot write in {parent}" in line
    finally:
        parent.chmod(0o755)


# ---- family 5: types and ranges checked at construction ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(start=0.8, end=0.2), r"^start=0.8 must be before end=0.2 \(both fractions of max_steps\)"),
     (dict(start=10, end=5), r"^start=10 must be before end=5 \(both steps\)"),
     (dict(end=1), r"^end=1 is ambiguous: .* pass end=1.0 for the end of training")],
)
def test_schedule_points_checked_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneSchedule(final_sparsity=0.5, **kwargs)
    PruneSchedule(final_sparsity=0.5, start=0, end=0.5)  # a step and a fraction: compared at train begin


def test_prune_argument_types(run):
    model, before = _fresh(run)
    with pytest.raises(TypeError, match=r"^prune_: importance must be an Importance from load_importance\(path\) or "
                                        r"ImportanceCallback.importance\(\); got str 'out'$"):
        prune_(model, "out", PruneConfig())
    with pytest.raises(TypeError, match="^prune_: config must be a PruneConfig or None; got float 0.5"):
        prune_(model, load_importance(run), 0.5)
    assert _unchanged(model, before)


def test_nm_block_size_rule(run, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^structure '2:3': M=3 must divide block_size=128 .* pass block_size=126"):
        PruneConfig(structure="2:3")
    assert PruneConfig(structure="2:3", block_size=126).nm == (2, 3)
    line = _refused(_prune_argv(run, tmp_path / "o", "--structure", "2:3"), capsys)
    assert "M=3 must divide --block_size 128" in line and "pass --block_size 126" in line


@pytest.mark.parametrize(("extra", "says"), [
    (["--structure", "neurons", "--cross_alpha", "0.5"], ["--cross_alpha corrects", "--structure 'neurons'",
                                                          "its --compensate refit", "omit --cross_alpha"]),
    (["--cross_alpha", "0.5", "--reconstruct", "false"], ["--reconstruct false turns off", "leave --reconstruct auto",
                                                          "omit --cross_alpha"]),
    (["--cross_alpha", "1.5"], ["--cross_alpha must be omitted or a float in [0, 1]"]),
    (["--target_params", "0.5"], ["--target_params is a budget for structured pruning", "got --structure"]),
    (["--structure", "neurons", "--target_params", "0.5", "--sparsity", "0.3"], ["give either --sparsity",
                                                                                "or --target_params"]),
    (["--compensate", "refit"], ["--compensate applies to structured", "--reconstruct true"]),
    (["--target_params", "0.5", "--search_structures", "neurons", "2:4", "--calibration", "CALIBRATION"],
     ["--target_params is a budget", "got --search_structures '2:4'"]),
])
def test_config_refusals_name_the_flags_typed(run, tmp_path, capsys, extra, says):
    """`PruneConfig` names its fields in Python (`cross_alpha=None`, `reconstruct=False`); on the command line each
    refusal names the flags the user typed instead, before any work."""
    extra = [str(run / "config.json") if a == "CALIBRATION" else a for a in extra]
    line = _refused(_prune_argv(run, tmp_path / "o", *extra), capsys)
    assert all(s in line for s in says), line
    assert "None" not in line and "True" not in line and "False" not in line and not re.search(r"\b[a-z_]+=", line)
    assert not (tmp_path / "o").exists()


def test_sweep_config_refusals_name_the_flags_typed(run, tmp_path, capsys):
    line = _refused(["sweep", str(run), "--importance", str(run), "--data", str(run / "config.json"), "--structure",
                     "2:4", "--scope", "sideways", "--output_dir", str(tmp_path / "o")], capsys)
    assert "--scope must be one of" in line and "got 'sideways'" in line and "scope=" not in line
    assert not (tmp_path / "o").exists()


def test_schedule_with_one_update_warns(tmp_path, caplog):
    schedule = PruneSchedule(final_sparsity=0.5, every_n_steps=10, end=1.0)
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):
        train(tiny_llama(seed=2), [ImportanceCallback(ImportanceConfig(criterion="magnitude"), schedule=schedule)],
              tmp_path, max_steps=4)
    assert "one mask update (step 4 of 4" in caplog.text and "not gradual" in caplog.text


# ---- replayed fault: a Hessian that cannot be factorised ---------------------------------------------------------

NO_DAMP = PruneConfig(sparsity=0.5, dampening=0.0)


def test_cholesky_failure_names_the_weight_and_changes_nothing(run, tmp_path):
    model, before = _fresh(run)
    imp = load_importance(run)
    with pytest.raises(ValueError) as e:
        prune_(model, imp, NO_DAMP, progress=False)
    text = str(e.value)
    # six weights come before down_proj: without the up-front check they were already pruned and updated
    assert text.startswith(f"{DOWN}: its input Hessian is not positive definite") and "raise dampening" in text
    assert "\n" not in text and _unchanged(model, before)
    with pytest.raises(ValueError, match=f"^{DOWN}: its input Hessian"):
        prune_checkpoint(str(run), imp, NO_DAMP, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    prune_(model, imp, PruneConfig(sparsity=0.5), progress=False)  # the default dampening factorises it


def test_cholesky_failure_on_the_cli(run, tmp_path, capsys):
    before = _snapshot(run)
    line = _refused(_prune_argv(run, tmp_path / "o", "--dampening", "0"), capsys)
    assert f"{DOWN}: its input Hessian is not positive definite" in line and "--dampening" in line
    assert not (tmp_path / "o").exists() and _snapshot(run) == before


def test_cholesky_failure_at_a_schedule_update(tmp_path):
    schedule = PruneSchedule(final_sparsity=0.5, start=1, end=2, every_n_steps=1, dampening=0.0)
    model = tiny_llama(seed=3)
    with pytest.raises(ValueError, match=f"^{DOWN}: its input Hessian is not positive definite"):
        train(model, [ImportanceCallback(ImportanceConfig(criterion="sparsegpt"), schedule=schedule)], tmp_path,
              max_steps=2, batch=3, n=6)
    for name, p in model.named_parameters():  # the failed update pruned nothing
        if name.endswith("proj.weight"):
            assert bool((p != 0).all()), name
