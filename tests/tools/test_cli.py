"""The command line a new user meets first: names, help, version, quiet, one-line errors, the output rule."""

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

import hf_weightprune
from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, load_importance, prune_, save_pruned
from hf_weightprune.publish.export import check_output_dir
from hf_weightprune.testing import tiny_llama
from hf_weightprune.tools.cli import build_parser, main
from hf_weightprune.tools.sweep import sweep
from tests.helpers import train

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training output_dir as the Trainer leaves it: the model at the top, importance/ and checkpoint-N/."""
    out = tmp_path_factory.mktemp("cli") / "out"
    trainer = train(tiny_llama(seed=3), [ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"))],
                    out, max_steps=4, save_steps=2)
    trainer.save_model(str(out))
    assert (out / "importance" / "importance_config.json").is_file() and (out / "checkpoint-2").is_dir()
    return out


def _snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Hash of every file below `folder` (but the `skip` top-level entries): what 'never modified' compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in skip}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---- item 1: one rule for where outputs go ------------------------------------------------------------------------


def test_readme_prune_line_writes_a_subfolder_of_the_run(run, capsys):
    """`hf-weightprune prune out --importance out --sparsity 0.5 --output_dir out/pruned` (the README's line) works,
    twice with the same result; nothing of the input changes."""
    before = _snapshot(run, skip=("pruned", "pruned-old-flag"))
    assert main(["prune", str(run), "--importance", str(run), "--sparsity", "0.5",
                 "--output_dir", str(run / "pruned")]) == 0
    assert main(["prune", str(run), "--importance", str(run), "--sparsity", "0.5",
                 "--output_dir", str(run / "pruned-old-flag")]) == 0
    assert _snapshot(run, skip=("pruned", "pruned-old-flag")) == before
    meta = json.loads((run / "pruned" / "sparsity.json").read_text())
    assert meta["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    # item 5: the importance path stays valid from any folder: recorded relative to the pruned folder (no absolute
    # path of this machine in a folder meant to be published)
    assert meta["importance"]["path"] == "../importance"
    assert (run / "pruned" / meta["importance"]["path"]).resolve() == (run / "importance").resolve()
    assert (run / "pruned-old-flag" / "model.safetensors").read_bytes() == (
        run / "pruned" / "model.safetensors").read_bytes()
    assert capsys.readouterr().out.count(f"Saved to {run / 'pruned'}\n") == 1


def test_prune_measure_speed_measures_beside_the_input(run, tmp_path, capsys):
    """`prune --measure_speed`: the input checkpoint is the baseline (its files, its parameters); without the flag a
    file-to-file prune still records both folders' weight files, and no speed."""
    from hf_weightprune.files.safetensors_io import read_header

    args = ["prune", str(run), "--importance", str(run), "--output_dir"]
    assert main([*args, str(tmp_path / "m"), "--structure", "neurons", "--sparsity", "0.5", "--measure_speed"]) == 0
    measured = json.loads((tmp_path / "m" / "sparsity.json").read_text())["measured"]
    header = read_header(run / "model.safetensors")
    assert measured["speed"]["dense"]["num_parameters"] == sum(
        math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    assert measured["dense_weight_files"]["bytes"] == (run / "model.safetensors").stat().st_size
    assert measured["weight_files"]["bytes"] == (tmp_path / "m" / "model.safetensors").stat().st_size
    assert "Measured when it was saved" in (tmp_path / "m" / "README.md").read_text()
    assert main([*args, str(tmp_path / "u"), "--sparsity", "0.5"]) == 0  # file to file
    measured = json.loads((tmp_path / "u" / "sparsity.json").read_text())["measured"]
    assert measured["speed"] is None
    assert measured["weight_files"]["bytes"] == measured["dense_weight_files"]["bytes"] == (
        run / "model.safetensors").stat().st_size
    capsys.readouterr()
    assert main(["prune", "org/model", "--importance", str(run), "--output_dir", str(tmp_path / "h"),
                 "--measure_speed"]) == 2
    assert "--measure_speed measures beside the input checkpoint" in _one_line(capsys)
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize(
    ("where", "extra", "expected"),
    [
        ("RUN", [], "Refusing to write into the input checkpoint RUN: --output_dir is that folder; choose a new "
                    "folder such as RUN/pruned"),
        # the input is refused before "not empty": --overwrite is never suggested, nor does it help
        ("RUN", ["--overwrite"], "Refusing to write into the input checkpoint RUN: --output_dir is that folder; "
                                 "choose a new folder such as RUN/pruned"),
        ("RUN/importance", ["--overwrite"], "Refusing to write into the importance folder RUN/importance: "
                                            "--output_dir RUN/importance is inside it; choose a folder outside it"),
        ("RUN/importance/new", [], "Refusing to write into the importance folder RUN/importance: --output_dir "
                                   "RUN/importance/new is inside it; choose a folder outside it"),
        ("RUN/checkpoint-2", ["--overwrite"], "Refusing to write into the Trainer checkpoint RUN/checkpoint-2 "
                                              "(--output_dir RUN/checkpoint-2): the Trainer rotates and resumes from "
                                              "checkpoint-N folders; choose a folder outside it"),
        ("RUN/checkpoint-2/pruned", [], "Refusing to write into the Trainer checkpoint RUN/checkpoint-2 (--output_dir "
                                        "RUN/checkpoint-2/pruned): the Trainer rotates and resumes from checkpoint-N "
                                        "folders; choose a folder outside it"),
        ("PARENT", ["--overwrite"], "Refusing to write into PARENT: it holds the input RUN, which --output_dir would "
                                    "replace; choose a new folder"),
        ("BUSY", [], "--output_dir BUSY exists and is not empty; pass --overwrite to replace it, or choose a new "
                     "folder"),
    ],
)
def test_cli_output_rule_refusals_are_one_line_and_write_nothing(run, tmp_path, capsys, where, extra, expected):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    names = {"RUN": str(run), "PARENT": str(run.parent), "BUSY": str(busy)}
    output = where.replace("RUN", names["RUN"]).replace("PARENT", names["PARENT"]).replace("BUSY", names["BUSY"])
    before = _snapshot(run.parent)
    assert main(["prune", str(run), "--importance", str(run), "--output_dir", output, *extra]) == 2
    line = expected.replace("RUN", names["RUN"]).replace("PARENT", names["PARENT"]).replace("BUSY", names["BUSY"])
    assert _one_line(capsys) == f"hf-weightprune prune: error: {line}"
    assert _snapshot(run.parent) == before and (busy / "keep.txt").read_text() == "mine"
    assert not (run / "checkpoint-2" / "pruned").exists() and not (run / "importance" / "new").exists()


def test_library_output_rule_names_arguments(run, tmp_path):
    imp = load_importance(run)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run)
    report = prune_(model, imp, PruneConfig(sparsity=0.3), progress=False)
    with pytest.raises(ValueError) as err:
        save_pruned(model, run, report=report, overwrite=True)
    assert str(err.value) == (f"Refusing to write into the input checkpoint {run}: output_dir is that folder; choose "
                              f"a new folder such as {run / 'pruned'}")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError) as err:
        save_pruned(model, tmp_path / "busy", report=report)
    assert str(err.value) == (f"output_dir {tmp_path / 'busy'} exists and is not empty; pass overwrite=True to "
                              "replace it, or choose a new folder")
    # a fresh subfolder of the run is accepted by the same rule (sweep's: a non-empty folder too)
    check_output_dir(run / "sweep", input_dirs=[run], importance_dirs=[run / "importance"])
    check_output_dir(tmp_path / "busy", input_dirs=[run], require_empty=False)
    check_output_dir(run.parent, input_dirs=[run], require_empty=False)  # sweep files beside the run: no folder replaced
    with pytest.raises(ValueError, match="it holds the input"):
        check_output_dir(run.parent, input_dirs=[run], overwrite=True)


def test_sweep_output_rule(run, tmp_path, capsys):
    """`sweep --output_dir` follows the same rule: the model folder itself is refused before anything is loaded."""
    data = ROOT / "data" / "kjv" / "valid.txt"
    assert main(["sweep", str(run), "--data", str(data), "--output_dir", str(run)]) == 2
    assert _one_line(capsys) == (f"hf-weightprune sweep: error: Refusing to write into the input checkpoint {run}: "
                                 f"--output_dir is that folder; choose a new folder such as {run / 'pruned'}")
    with pytest.raises(ValueError, match="Refusing to write into the importance folder"):
        sweep(run, [str(run)], data, output_dir=run / "importance" / "sweep")
    assert not (run / "sweep.csv").exists() and not (run / "importance" / "sweep").exists()


# ---- item 2: --version, --quiet, --log_level, help, lazy import ----------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"hf-weightprune {hf_weightprune.__version__}\n"


def test_every_option_has_help_with_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    assert set(subparsers) == {"prune", "inspect", "push", "sweep"}
    for name, sub in [("hf-weightprune", parser), *subparsers.items()]:
        text = " ".join(sub.format_help().split())
        optional = [a for a in sub._actions if a.option_strings and a.dest not in ("help", "version")]
        for action in sub._actions:
            if action.dest not in ("help", "version", "command"):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        # every optional option but the required ones (no default) prints its default
        assert text.count("(default: ") == sum(1 for a in optional if not a.required), name


@pytest.mark.parametrize("old", ["--push-to-hub", "--eval-data", "--target-modules", "--max-windows", "--log-level"])
def test_hyphenated_spellings_are_gone(old, capsys):
    """0.x kept `--a-b` beside `--a_b`; one spelling now (the CHANGELOG says so), refused in one line."""
    with pytest.raises(SystemExit) as e:
        main(["prune", "m", "--importance", "i", "--output_dir", "o", old, "x"])
    assert e.value.code == 2
    line = _one_line(capsys)
    assert line.startswith("hf-weightprune: error: unrecognized arguments:") and old in line
    push = build_parser().parse_args(["push", "folder", "--repo_id", "me/x", "--include_importance",
                                      "--commit_message", "m"])
    assert (push.folder, push.repo_id, push.include_importance, push.commit_message) == ("folder", "me/x", True, "m")


def test_config_flags_come_from_the_dataclass_fields():
    """Every PruneConfig field is a `prune` flag with the field's help (or the flag's own, `FLAG_HELP`) and default,
    parsed into the field's type."""
    import dataclasses

    from hf_weightprune.tools.cli_args import FLAG_HELP

    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    flags = {a.dest: a for a in prune._actions}
    for f in dataclasses.fields(PruneConfig):
        assert flags[f.name].help == FLAG_HELP.get(f.name, f.metadata["help"]), f.name
        assert flags[f.name].default == f.default, f.name
    args = build_parser().parse_args(["prune", "m", "--importance", "i", "--output_dir", "o", "--sparsity",
                                      '{"mlp.*": 0.6}', "--target_modules", "q_proj,v_proj", "--reconstruct", "false",
                                      "--block_size", "64", "--allow_collapse"])
    config = PruneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PruneConfig)})
    assert (config.sparsity, config.target_modules, config.reconstruct, config.block_size, config.allow_collapse) == (
        {"mlp.*": 0.6}, ["q_proj", "v_proj"], False, 64, True)


@pytest.mark.parametrize("dest, says", [
    ("cross_alpha", ("a float in [0, 1]", "leave it out for the symmetric sweep")),
    ("reconstruct", ("auto (whenever it has one), true or false",)),
    ("compensate", ("refit,mean", "leave it out for no compensation")),
])
def test_flag_help_states_what_the_command_line_accepts(dest, says):
    """The field's help names `None` (the Python API's off or automatic choice), which no flag value gives: each
    subcommand's flag says what to type instead."""
    subparsers = build_parser()._subparsers._group_actions[0].choices
    helps = {name: a.help for name, sub in subparsers.items() for a in sub._actions if a.dest == dest}
    assert "prune" in helps
    for name, text in helps.items():
        assert "None" not in text and all(s in text for s in says), (name, text)


def test_sweep_help_lists_the_oneshot_criteria():
    from hf_weightprune.prune.oneshot import ONESHOT_CRITERIA
    from hf_weightprune.tools.cli import _ONESHOT_CRITERIA

    assert _ONESHOT_CRITERIA == ONESHOT_CRITERIA  # cli keeps a copy so that --help does not import torch


def test_quiet_and_log_level_before_or_after_the_command():
    parse = build_parser().parse_args
    base = ["push", "f", "--repo_id", "me/x"]
    assert (parse(base).quiet, parse(base).log_level) == (False, "warning")
    assert parse(["-q", *base]).quiet and parse([*base, "--quiet"]).quiet
    assert parse(["--log_level", "debug", *base]).log_level == "debug"
    assert parse([*base, "--log_level", "error"]).log_level == "error"
    assert parse(["-q", "--log_level", "info", *base, "--log_level", "debug"]).log_level == "debug"


def test_quiet_turns_progress_bars_off(run, tmp_path, capsys, monkeypatch):
    """On a terminal `prune` shows its shard bar; `-q` hides it (and a pipe or file hides it too)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["prune", str(run), "--importance", str(run), "--output_dir", str(tmp_path / "a")]) == 0
    assert "pruning 1 shard(s)" in capsys.readouterr().err
    assert main(["-q", "prune", str(run), "--importance", str(run), "--output_dir", str(tmp_path / "b")]) == 0
    assert "pruning" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert main(["prune", str(run), "--importance", str(run), "--output_dir", str(tmp_path / "c")]) == 0
    assert "pruning" not in capsys.readouterr().err


def test_progress_bars_follow_the_hf_switches_and_rank_0(run, tmp_path, capsys, monkeypatch):
    """`TQDM_DISABLE`, `HF_HUB_DISABLE_PROGRESS_BARS` / `disable_progress_bars()`, transformers'
    `disable_progress_bar()`, and any rank but 0 each turn the library's own bars off."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as tf_logging

    from hf_weightprune.distributed import show_progress

    assert show_progress(True) and not show_progress(False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not show_progress(True)
    assert main(["prune", str(run), "--importance", str(run), "--output_dir", str(tmp_path / "a")]) == 0
    assert "pruning" not in capsys.readouterr().err
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setenv("RANK", "1")
    assert not show_progress(True)
    monkeypatch.delenv("RANK")
    for off, on in ((disable_progress_bars, enable_progress_bars),
                    (tf_logging.disable_progress_bar, tf_logging.enable_progress_bar)):
        off()
        try:
            assert not show_progress(True)
        finally:
            on()
    assert show_progress(True)


def test_log_level_shows_the_library_log_for_one_command(run, tmp_path, capsys):
    import logging

    level = logging.getLogger("hf_weightprune").level
    assert main(["prune", str(run), "--importance", str(run), "--output_dir", str(tmp_path / "a")]) == 0
    assert "INFO" not in capsys.readouterr().err
    assert main(["prune", str(run), "--importance", str(run), "--output_dir", str(tmp_path / "b"),
                 "--log_level", "info"]) == 0
    err = capsys.readouterr().err.splitlines()
    # scope: temporal_magnitude's default (layer) since PruneConfig(scope=None) follows the criterion
    assert err == [f"INFO hf_weightprune.publish.export: Saved pruned checkpoint to {tmp_path / 'b'} (unstructured (layer): "
                   "50.00% of 14 pruned tensors, 34.41% of all parameters)"]
    assert logging.getLogger("hf_weightprune").level == level and not logging.getLogger("hf_weightprune").handlers


def test_help_and_import_do_not_import_torch():
    code = ("import sys\nfrom hf_weightprune.tools.cli import main\n"
            "for argv in (['--help'], ['prune', '--help'], ['sweep', '--help'], ['--version']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
            "import hf_weightprune\n"
            "print(sorted(m for m in ('torch', 'transformers', 'hf_weightprune.train.callback') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "usage: hf-weightprune" in done.stdout


def test_every_public_name_imports_lazily():
    from hf_weightprune import _LAZY_IMPORTS

    assert hf_weightprune.__all__ == sorted(_LAZY_IMPORTS)
    import importlib

    for name in hf_weightprune.__all__:
        ns: dict = {}
        exec(f"from hf_weightprune import {name}", ns)
        assert ns[name] is getattr(importlib.import_module(f"hf_weightprune.{_LAZY_IMPORTS[name]}"), name), name
    importlib.import_module("hf_weightprune.tools.sweep")  # binds the submodule to the package attribute of that name

    assert hf_weightprune.sweep is sweep and callable(hf_weightprune.sweep)  # the function, not the module
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        hf_weightprune.nope  # noqa: B018


# ---- item 3: one-line errors --------------------------------------------------------------------------------------


def test_missing_model_folder_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-model"
    assert main(["prune", str(missing), "--importance", str(tmp_path), "--output_dir", str(tmp_path / "o")]) == 2
    assert _one_line(capsys) == (f"hf-weightprune prune: error: model_dir {missing}: no such folder; pass a model "
                                 "folder (config.json and weights) or a Hub repo id")
    assert main(["inspect", str(tmp_path), "--model", str(missing)]) == 2
    assert _one_line(capsys) == (f"hf-weightprune inspect: error: --model {missing}: no such folder; pass a model "
                                 "folder (config.json and weights) or a Hub repo id")
    assert main(["inspect", str(tmp_path / "no-importance")]) == 2
    assert _one_line(capsys) == (f"hf-weightprune inspect: error: importance_dir {tmp_path / 'no-importance'}: no "
                                 "such folder; pass an importance, checkpoint or training output folder or a Hub "
                                 "repo id")
    assert not (tmp_path / "o").exists()


def test_missing_model_folder_subprocess(tmp_path):
    """The installed entry point's way: exit status 2 and exactly one line on stderr, no traceback."""
    done = subprocess.run([sys.executable, "-m", "hf_weightprune.tools.cli", "prune", "./no-such-model", "--importance",
                           "out", "--output_dir", "out/pruned"], capture_output=True, text=True, env=ENV,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["hf-weightprune prune: error: model_dir ./no-such-model: no such "
                                                "folder; pass a model folder (config.json and weights) or a Hub repo "
                                                "id"]


@pytest.fixture
def pruned(run, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", str(run), "--importance", str(run), "--sparsity", "0.5", "--output_dir", str(out)]) == 0
    return out


def test_push_offline_is_one_line_and_changes_nothing(pruned, hub_server, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import time
    capsys.readouterr()
    before = _snapshot(pruned)
    assert main(["push", str(pruned), "--repo_id", "tester/offline"]) == 1
    assert _one_line(capsys) == ("hf-weightprune push: error: push_pruned_to_hub: HF_HUB_OFFLINE=1 is set, so the "
                                 "Hub cannot be reached; unset HF_HUB_OFFLINE to push")
    assert _snapshot(pruned) == before and hub_server.requests_log == []


def test_push_without_network_is_one_line(pruned, hub_server, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on: connection refused, as with no network
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    capsys.readouterr()
    assert main(["push", str(pruned), "--repo_id", "tester/nonet"]) == 1
    line = _one_line(capsys)
    prefix = f"hf-weightprune push: error: push_pruned_to_hub: cannot reach the Hub at {dead} to push 'tester/nonet' ("
    assert line.startswith(prefix) and line.endswith("); check the network connection or HF_ENDPOINT"), line
    assert "refused" in line.lower()


def test_push_include_importance_without_importance_names_the_flag(pruned, tmp_path, capsys):
    (pruned / "sparsity.json").write_text(json.dumps({**json.loads((pruned / "sparsity.json").read_text()),
                                                      "importance": {"path": str(tmp_path / "gone")}}))
    capsys.readouterr()
    assert main(["push", str(pruned), "--repo_id", "tester/x", "--include_importance"]) == 2
    assert _one_line(capsys) == (f"hf-weightprune push: error: --include_importance but no importance folder was "
                                 f"found: neither {str(pruned / 'importance')!r} nor {str(tmp_path / 'gone')!r} "
                                 "(recorded in sparsity.json) exists.")


def test_push_bad_token_is_one_line(pruned, hub_server, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_token")
    capsys.readouterr()
    assert main(["push", str(pruned), "--repo_id", "tester/denied"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "hf-weightprune push: error: The Hub refused access to 'tester/denied' (HTTP 401): check that the token is "
        "valid and has write access to this repo."]
    assert "hf_not_the_right_token" not in captured.out + captured.err


# ---- item 5: push --include_importance from another working directory ---------------------------------------------


def test_push_include_importance_from_another_folder(run, tmp_path, hub_server, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    monkeypatch.chdir(run.parent)  # prune with paths relative to here, as users type them
    rel = f"{run.name}/pruned-rel"
    assert main(["prune", run.name, "--importance", run.name, "--sparsity", "0.4", "--output_dir", rel]) == 0
    assert json.loads((run / "pruned-rel" / "sparsity.json").read_text())["importance"]["path"] == "../importance"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["push", str(run / "pruned-rel"), "--repo_id", "tester/with-importance", "--include_importance"]) == 0
    files = hub_server.files("tester/with-importance")
    assert files["importance/importance_config.json"] == (run / "importance" / "importance_config.json").read_bytes()
    assert "sparsity.json" in files


def test_allow_collapse_flag_reaches_the_pruner(tmp_path):
    """A global threshold that would empty a tensor is refused on the CLI too, and `--allow_collapse` lets it pass."""
    from hf_weightprune import ImportanceCallback, ImportanceConfig
    from hf_weightprune.testing import tiny_llama
    from tests.helpers import train

    model = tiny_llama(seed=60)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    train(model, [cb], tmp_path / "run", max_steps=2)
    model.save_pretrained(tmp_path / "run")
    base = ["prune", str(tmp_path / "run"), "--importance", str(tmp_path / "run"), "--sparsity", "0.95",
            "--scope", "global", "-q"]
    assert main([*base, "--output_dir", str(tmp_path / "run" / "refused")]) == 2  # a whole tensor would go
    assert not (tmp_path / "run" / "refused").exists()
    assert main([*base, "--allow_collapse", "--output_dir", str(tmp_path / "run" / "allowed")]) == 0


def test_prune_of_a_run_with_only_named_importances_names_the_folder_to_pass(tmp_path, capsys):
    """A run with `ImportanceConfig(name=...)` callbacks has no `importance/`: the CLI's one-line refusal names the
    folder to pass instead (`--importance OUT/importance-<name>`), and that folder then works."""
    out = tmp_path / "out"
    trainer = train(tiny_llama(seed=4), [ImportanceCallback(ImportanceConfig(criterion="magnitude", name="mag"))],
                    out, max_steps=2, save_steps=2)
    trainer.save_model(str(out))
    before = _snapshot(out)
    capsys.readouterr()  # the Trainer's own progress output
    assert main(["prune", str(out), "--importance", str(out), "--sparsity", "0.5",
                 "--output_dir", str(tmp_path / "pruned")]) != 0
    line = _one_line(capsys)
    assert "holds the named importances ['mag']" in line and f"{out / 'importance-mag'}" in line, line
    assert not (tmp_path / "pruned").exists() and _snapshot(out) == before
    assert "--importance_name mag" in line
    for i, how in enumerate((["--importance", str(out / "importance-mag")],
                             ["--importance", str(out), "--importance_name", "mag"])):
        assert main(["prune", str(out), *how, "--sparsity", "0.5", "--output_dir", str(tmp_path / f"pruned{i}")]) == 0
        assert json.loads((tmp_path / f"pruned{i}" / "sparsity.json").read_text())["criterion"] == "magnitude"
    assert (tmp_path / "pruned0" / "model.safetensors").read_bytes() == (
        tmp_path / "pruned1" / "model.safetensors").read_bytes()
    # inspect: the same refusal, and the same flag picks the named importance
    capsys.readouterr()
    assert main(["inspect", str(out)]) != 0
    assert "prune/inspect/sweep --importance_name mag" in _one_line(capsys)
    assert main(["inspect", str(out), "--importance_name", "mag"]) == 0
    by_flag = capsys.readouterr().out
    assert main(["inspect", str(out / "importance-mag")]) == 0
    assert "magnitude" in by_flag and capsys.readouterr().out == by_flag
    assert _snapshot(out) == before


def test_named_importance_from_a_hub_repo(hub_server, tmp_path, monkeypatch, capsys):
    """A Hub repo holding only `importance-<name>/`: the refusal lists the names and the flag; `name=` (Python) and
    `--importance_name` (CLI) read it."""
    from huggingface_hub import HfApi

    from hf_weightprune.files.safetensors_io import ImportanceFileError

    out = tmp_path / "out"
    trainer = train(tiny_llama(seed=5), [ImportanceCallback(ImportanceConfig(criterion="magnitude", name="mag"))],
                    out, max_steps=2, save_steps=2)
    trainer.save_model(str(out))
    HfApi(token=hub_server.token).create_repo("tester/named")
    HfApi(token=hub_server.token).upload_folder(repo_id="tester/named", folder_path=out / "importance-mag",
                                                path_in_repo="importance-mag")
    with pytest.raises(ImportanceFileError, match=r"No unnamed importance in Hub repo tester/named; it holds the named "
                                                  r"importances \['mag'\]: .*--importance_name mag"):
        load_importance("tester/named", token=hub_server.token)
    assert load_importance("tester/named", name="mag", token=hub_server.token).criterion == "magnitude"
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    capsys.readouterr()
    assert main(["prune", str(out), "--importance", "tester/named", "--importance_name", "mag", "--sparsity", "0.5",
                 "--output_dir", str(tmp_path / "pruned")]) == 0
    assert main(["prune", str(out), "--importance", str(out), "--importance_name", "mag", "--sparsity", "0.5",
                 "--output_dir", str(tmp_path / "local")]) == 0
    assert (tmp_path / "pruned" / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors"
                                                                        ).read_bytes()
