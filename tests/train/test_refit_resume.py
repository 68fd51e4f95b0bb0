"""`PruneSchedule(refit_at=...)` survives a SIGKILL between the last mask update and the re-fit: the checkpoint holds
the pruning edits the re-fit undoes (`refit_edits.safetensors`), so the resumed run re-fits towards exactly the target
of an uninterrupted run. A checkpoint without them (written before they were saved) resumes with a warning and no
re-fit.

The killed run is a real subprocess of `tests/scripts/ckpt_train.py --schedule refit` (OBS updates at steps 1, 3
and 5, the re-fit at 7), killed once checkpoint-6 is complete; the reference is the same script's uninterrupted run.
Under `torchrun --nproc_per_node 2` too (`multiproc`), where rank 0 alone writes the edits and every rank reads them.
"""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_weightprune import load_importance
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


@pytest.mark.multiproc
def test_ddp_two_ranks_sigkilled_between_the_last_update_and_the_refit_resume_to_the_uninterrupted_weights(tmp_path):
    """The same under `torchrun --nproc_per_node 2` (gloo): both ranks killed once checkpoint-6 is complete, whose
    edits rank 0 alone wrote; every rank reads them on the 2-rank resume (a rank without them refuses the re-fit).

    To float tolerance, not bit-identical: a checkpoint holds the Hessians summed over ranks and a resume restores
    that sum on rank 0 only (so that any world size can resume it), so the re-fit at step 7 all-reduces `(S6 + x0) +
    x1` where the uninterrupted run all-reduces `(s0 + x0) + (s1 + x1)`: the same tokens, grouped otherwise. Measured:
    H~ 2.6e-7 and the weights of checkpoint-8 4.1e-5 of their max apart; a resume that skips the re-fit (no edits)
    ends 0.47 of the max apart. Checkpoint-6, written before the kill, is the same bits in both runs.
    """
    from tests.test_distributed import ATOL_OF_MAX, RTOL, torchrun

    argv = ["--criterion", CRITERION, "--schedule", "refit"]
    (tmp_path / "killed").mkdir()
    killed = sigkill_at_hang(tmp_path / "killed", {"refit": [*argv, "--hang-after-save", "6"]}, nproc=2)
    out = workdir(killed, "refit", tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert load_refit_edits(out / "checkpoint-6" / F.IMPORTANCE_DIR)
    torchrun("tests.scripts.ckpt_train", str(out), *argv, "--resume")
    reference = tmp_path / "reference"
    torchrun("tests.scripts.ckpt_train", str(reference), *argv)
    for run_dir in (out, reference):
        config = json.loads((run_dir / "checkpoint-8" / F.IMPORTANCE_DIR / "importance_config.json").read_text())
        assert config["schedule"]["refitted_at"] == REFIT
        assert load_importance(run_dir / "checkpoint-8").meta["world_size"] == 2
        assert not (run_dir / "checkpoint-8" / F.IMPORTANCE_DIR / EDITS_NAME).exists()
    a, b = _weights(out / "checkpoint-6"), _weights(reference / "checkpoint-6")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert_same_importance(out / "checkpoint-6", reference / "checkpoint-6")
    a, b = _weights(out / "checkpoint-8"), _weights(reference / "checkpoint-8")
    assert a.keys() == b.keys()
    for k, want in b.items():
        torch.testing.assert_close(a[k], want, rtol=RTOL, atol=ATOL_OF_MAX * float(want.abs().max()), msg=k)
    got, want = load_importance(out / "checkpoint-8"), load_importance(reference / "checkpoint-8")
    assert (got.step, got.num_samples, got.names) == (want.step, want.num_samples, want.names)
    assert got.meta["tokens"] == want.meta["tokens"]
    for name in want.names:
        ref = want.state(name)
        torch.testing.assert_close(got.state(name), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()), msg=name)


@pytest.mark.multiproc
def test_ddp_two_ranks_sigkilled_in_a_hold_run_before_its_refit_resume_to_the_uninterrupted_weights(tmp_path):
    """`PruneSchedule(mode="hold", refit_at=7, cross_term=True)` under `torchrun --nproc_per_node 2`: a one-shot 50%
    prune's masks held, distilled from the dense model it came from (the re-fit's target), both ranks killed once
    checkpoint-6 is complete: the hold's `H~` and cross term have gathered steps 1-6 and the re-fit at 7 is pending.
    The 2-rank resume re-fits from the checkpoint's sums and ends at the uninterrupted 2-rank run's weights and masks.

    Masks and checkpoint-6 bit for bit; checkpoint-8's weights to float tolerance, for the reason given above (a
    resume restores the summed statistics on rank 0 only, so the re-fit's all-reduce groups the same tokens
    otherwise)."""
    import copy

    from hf_weightprune import PruneConfig, prune_, save_pruned
    from hf_weightprune.files import training_state as T
    from hf_weightprune.files.cross_files import CROSS_NAME
    from hf_weightprune.prune.oneshot import oneshot_importance
    from hf_weightprune.testing import tiny_llama
    from tests.test_distributed import ATOL_OF_MAX, RTOL, torchrun

    dense = tiny_llama(seed=11)  # the model ckpt_train trains
    dense.save_pretrained(tmp_path / "dense")
    pruned = copy.deepcopy(dense)
    report = prune_(pruned, oneshot_importance(pruned), PruneConfig(sparsity=0.5), progress=False)
    save_pruned(pruned, tmp_path / "pruned", report=report)
    argv = ["--criterion", CRITERION, "--schedule", "hold", "--masks-from", str(tmp_path / "pruned"), "--distill",
            "--teacher", str(tmp_path / "dense"), "--refit-at", str(REFIT), "--cross-term"]
    (tmp_path / "killed").mkdir()
    killed = sigkill_at_hang(tmp_path / "killed", {"hold": [*argv, "--hang-after-save", "6"]}, nproc=2)
    out = workdir(killed, "hold", tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    # Killed after the hold's statistics started and before the re-fit: checkpoint-6 holds H~ and C of steps 1-6.
    config = json.loads((out / "checkpoint-6" / F.IMPORTANCE_DIR / "importance_config.json").read_text())
    assert config["schedule"]["refitted_at"] is None
    pending = load_importance(out / "checkpoint-6")
    assert pending.num_samples == 6 and all(t > 0 for t in pending.meta["tokens"].values())
    assert pending.has_cross and (out / "checkpoint-6" / F.IMPORTANCE_DIR / CROSS_NAME).is_file()
    torchrun("tests.scripts.ckpt_train", str(out), *argv, "--resume")
    reference = tmp_path / "reference"
    torchrun("tests.scripts.ckpt_train", str(reference), *argv)
    for run_dir in (out, reference):
        config = json.loads((run_dir / "checkpoint-8" / F.IMPORTANCE_DIR / "importance_config.json").read_text())
        assert config["schedule"]["refitted_at"] == REFIT
        assert load_importance(run_dir / "checkpoint-8").meta["world_size"] == 2
    a, b = _weights(out / "checkpoint-6"), _weights(reference / "checkpoint-6")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert_same_importance(out / "checkpoint-6", reference / "checkpoint-6")
    held = load_file(tmp_path / "pruned" / "model.safetensors")
    ma, mb = (T.load_schedule_masks(d / "checkpoint-8" / F.IMPORTANCE_DIR) for d in (out, reference))
    assert ma.keys() == mb.keys() and mb and all(torch.equal(ma[n], mb[n]) for n in mb)
    assert all(torch.equal(mb[n], held[n] != 0) for n in mb)  # the held masks, unchanged by the re-fit
    a, b = _weights(out / "checkpoint-8"), _weights(reference / "checkpoint-8")
    assert a.keys() == b.keys()
    for k, want in b.items():
        torch.testing.assert_close(a[k], want, rtol=RTOL, atol=ATOL_OF_MAX * float(want.abs().max()), msg=k)
    assert all(not bool(b[n][~mb[n]].any()) for n in mb)  # pruned weights still exactly zero
