"""`PruneSchedule(refit_at=...)` survives a SIGKILL between the last mask update and the re-fit: the checkpoint holds
the pruning edits the re-fit undoes (`refit_edits.safetensors`), so the resumed run re-fits towards exactly the target
of an uninterrupted run. A checkpoint without them (written before they were saved) resumes with a warning and no
re-fit.

The killed run is a real subprocess of `tests/scripts/ckpt_train.py --schedule refit` (OBS updates at steps 1, 3
and 5, the re-fit at 7), killed once checkpoint-6 is complete; the reference is the same script's uninterrupted run.
"""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_weightprune.files import importance_files as F
from hf_weightprune.files.refit_files import EDITS_NAME, load_refit_edits
from hf_weightprune.files.safetensors_io import ImportanceFileError
from tests.helpers import assert_same_importance, sigkill_at_hang, workdir
from tests.scripts.ckpt_train import make_callback, run

CRITERION, REFIT = "sparsegpt", 7


def _weights(folder):
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the killed run's root, the uninterrupted reference run and its callback)."""
    killed = sigkill_at_hang(tmp_path_factory.mktemp("killed"),
                             {"refit": ["--criterion", CRITERION, "--hang-after-save", "6", "--schedule", "refit"]})
    reference = tmp_path_factory.mktemp("reference") / "run"
    cb = make_callback(CRITERION, schedule="refit")
    run(reference, CRITERION, importance_callback=cb)
    assert cb.mask_holder.refitted_at == REFIT
    return killed, reference


def test_sigkill_between_the_last_update_and_the_refit_then_resume_gives_the_uninterrupted_weights(runs, tmp_path):
    killed, reference = runs
    out = workdir(killed, "refit", tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    edits = load_refit_edits(out / "checkpoint-6" / F.IMPORTANCE_DIR)
    # One float32 edit per masked weight, never zero: every update pruned some of each and compensated the rest.
    weights = _weights(out / "checkpoint-6")
    assert edits and all(e.dtype == torch.float32 and e.shape == weights[n].shape and bool(e.abs().max() > 0)
                         for n, e in edits.items())
    cb = make_callback(CRITERION, schedule="refit")
    run(out, CRITERION, resume=True, importance_callback=cb)
    assert cb.mask_holder.refitted_at == REFIT
    a, b = _weights(out / "checkpoint-8"), _weights(reference / "checkpoint-8")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert_same_importance(out / "checkpoint-8", reference / "checkpoint-8")
    # Re-fitted: nothing pending, so no edits are written after the re-fit, in either run.
    assert not (out / "checkpoint-8" / F.IMPORTANCE_DIR / EDITS_NAME).exists()
    assert not (reference / "checkpoint-8" / F.IMPORTANCE_DIR / EDITS_NAME).exists()
    assert json.loads((out / "checkpoint-8" / F.IMPORTANCE_DIR / "importance_config.json").read_text())[
        "schedule"]["refitted_at"] == REFIT


def test_a_checkpoint_without_the_edits_resumes_with_a_warning_and_no_refit(runs, tmp_path, caplog):
    # As a checkpoint written before the edits were saved: no file, no checksums.edits.
    killed, reference = runs
    out = workdir(killed, "refit", tmp_path)
    importance = out / "checkpoint-6" / F.IMPORTANCE_DIR
    (importance / EDITS_NAME).unlink()
    config = json.loads((importance / "importance_config.json").read_text())
    del config["checksums"]["edits"]
    (importance / "importance_config.json").write_text(json.dumps(config))
    cb = make_callback(CRITERION, schedule="refit")
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.train.holder"):
        run(out, CRITERION, resume=True, importance_callback=cb)
    assert "written by an older hf-weightprune that did not save the pruning edits the re-fit at step 7" in caplog.text
    assert cb.mask_holder.refitted_at is None
    a, b = _weights(out / "checkpoint-8"), _weights(reference / "checkpoint-8")
    assert any(not torch.equal(a[k], b[k]) for k in b)  # what the saved edits make exact


def test_a_corrupt_edits_file_is_refused_in_one_line(runs, tmp_path):
    killed, _ = runs
    out = workdir(killed, "refit", tmp_path)
    path = out / "checkpoint-6" / F.IMPORTANCE_DIR / EDITS_NAME
    tensors = load_file(path)
    key = next(iter(tensors))  # "edits.<weight name>"
    save_file({**tensors, key: tensors[key] + 1}, path)
    with pytest.raises(ImportanceFileError, match=f"{EDITS_NAME}: {key} does not match its crc32"):
        run(out, CRITERION, resume=True, importance_callback=make_callback(CRITERION, schedule="refit"))
