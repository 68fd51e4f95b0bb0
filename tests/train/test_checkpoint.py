"""Importance that lives with the checkpoints: SIGKILL + exact resume, crashes mid-write, rotation, Hub pushes,
bad inputs. Killed runs are real subprocesses (`tests/scripts/ckpt_train.py`); the rest are real Trainer runs."""

import json
import logging
import shutil
from pathlib import Path

import pytest
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_weightprune import ImportanceCallback, ImportanceConfig, load_importance
from hf_weightprune.files import importance_files as F
from hf_weightprune.files.safetensors_io import ImportanceFileError
from hf_weightprune.testing import save_importance_dir, tiny_llama
from hf_weightprune.train.callback import STAGING_DIR
from tests.helpers import assert_same_importance, leftovers, sigkill_at_hang, snapshot, workdir
from tests.scripts.ckpt_train import SaveLate, run

CONFIG = F.IMPORTANCE_CONFIG_NAME
IMP_CONFIG = f"{F.IMPORTANCE_DIR}/{CONFIG}"

# Each killed run: the criterion it trains and where it hangs until SIGKILL (saves at steps 3, 6, 8 of 8).
KILLED = {
    "after_save": ["--criterion", "temporal_magnitude", "--hang-after-save", "6"],
    # the 2nd importance write (step 6, staged before the Trainer saves) dies after its shards, before its config
    "in_write": ["--criterion", "taylor", "--hang-in", "write_single", "--hang-call", "2"],
    # checkpoint-6 is written by the Trainer, the complete staged importance is never moved into it (a resume moves
    # it there: tests/train/test_checkpoint_faults.py; here the staged folder is removed to test a checkpoint without importance)
    "before_publish": ["--criterion", "wanda", "--hang-in", "publish", "--hang-call", "2"],
    # a save decided after our on_step_end (step 5) is written in on_save, straight into checkpoint-5: dies mid-write
    "late_save": ["--criterion", "temporal_magnitude", "--save-late", "5", "--hang-in", "write_single",
                  "--hang-call", "2"],
}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Start every killed run at once (imports dominate), SIGKILL each as soon as it hangs; returns the root."""
    root = tmp_path_factory.mktemp("killed")
    return sigkill_at_hang(root, KILLED)


# ------------------------------------------------------------------------------------------- exact resume


def test_sigkill_after_save_then_resume_true_is_exact(killed, reference, tmp_path):
    out = workdir(killed, "after_save", tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6"]  # no on_train_end ran
    assert load_importance(out / "checkpoint-6").step == 6
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"))  # a fresh instance; restoring callback states must not replace it
    assert not isinstance(cb, ExportableState)
    trainer = run(out, resume=True, importance_callback=cb, restore_callback_states_from_checkpoint=True)
    assert any(c is cb for c in trainer.callback_handler.callbacks)
    saved = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert "ImportanceCallback" not in saved
    assert cb.importance().num_samples == 8
    assert_same_importance(out, reference("temporal_magnitude"))
    assert_same_importance(out / "checkpoint-8", reference("temporal_magnitude") / "checkpoint-8")
    assert not leftovers(out)


def test_crash_between_file_writes_leaves_no_checkpoint_and_resume_is_exact(killed, reference, tmp_path):
    out = workdir(killed, "in_write", tmp_path)
    # The importance is staged before the Trainer saves, so the crash happened before checkpoint-6 existed:
    # the last checkpoint is the complete checkpoint-3, and the staged folder is recognisably incomplete.
    assert sorted(p.name for p in out.iterdir()) == [STAGING_DIR, "checkpoint-3"]
    staged = out / STAGING_DIR
    assert (staged / F.WEIGHTS_NAME).is_file() and not (staged / CONFIG).exists()
    run(out, "taylor", resume=True)
    assert_same_importance(out, reference("taylor"))
    assert [load_importance(out / f"checkpoint-{n}").step for n in (3, 6, 8)] == [3, 6, 8]
    assert not leftovers(out)  # the stale staged folder did not break the next save


def test_checkpoint_without_importance_refuses_resume_or_restarts(killed, reference, tmp_path, caplog):
    out = workdir(killed, "before_publish", tmp_path)
    ckpt = out / "checkpoint-6"
    assert (ckpt / "trainer_state.json").is_file() and not (ckpt / F.IMPORTANCE_DIR).exists()
    shutil.rmtree(out / STAGING_DIR)  # with it, the resume would move the staged importance of step 6 into place
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"^Cannot resume importance: No importance in \S*checkpoint-6: .*resume from "
                                         r"another checkpoint, or pass .*on_resume_mismatch='restart'") as e:
        run(out, "wanda", resume=True)
    assert "\n" not in str(e.value)
    assert snapshot(out) == before

    restarted = tmp_path / "restarted"
    shutil.copytree(out, restarted)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"), on_resume_mismatch="restart")
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.train.callback"):
        run(restarted, resume=True, importance_callback=cb)
    assert "restarting importance from zero" in caplog.text
    assert load_importance(restarted).num_samples == 2  # steps 7 and 8 only

    run(out, "wanda", resume=str(out / "checkpoint-3"))  # an explicit path, an earlier checkpoint
    assert_same_importance(out, reference("wanda"))
    assert not leftovers(out)


def test_crash_inside_checkpoint_write_is_incomplete_and_not_resumed(killed, reference, tmp_path):
    out = workdir(killed, "late_save", tmp_path)
    ckpt = out / "checkpoint-5"
    assert (ckpt / "trainer_state.json").is_file() and not (ckpt / F.IMPORTANCE_DIR).exists()
    temporaries = list(ckpt.glob(".importance.*.tmp"))  # io_utils.temp_sibling: `.NAME.<pid>-<hex>.tmp`
    assert len(temporaries) == 1 and (temporaries[0] / F.WEIGHTS_NAME).is_file()
    with pytest.raises(ImportanceFileError, match=r"checkpoint-5/importance is incomplete .*did not finish"):
        load_importance(ckpt)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"checkpoint-5/importance is incomplete.*on_resume_mismatch='restart'"):
        run(out, resume=True)
    assert snapshot(out) == before
    # From checkpoint-3 the same run (the late save included) rewrites checkpoint-5 over the stale temporary folder.
    run(out, resume=str(out / "checkpoint-3"), callbacks=[SaveLate(5)])
    assert load_importance(ckpt).step == 5
    assert_same_importance(out, reference("temporal_magnitude"))
    assert not leftovers(out)


def test_per_epoch_resume_from_an_epoch_end_checkpoint_is_exact(tmp_path):
    # 4 steps per epoch, saves at steps 4, 8, 12: each checkpoint ends an epoch, whose sample it must hold
    # (a resume from it never replays that epoch's on_epoch_end).
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", per_epoch=True))
    kw = dict(max_steps=-1, num_train_epochs=3, save_steps=4)
    run(tmp_path / "full", importance_callback=cb, **kw)
    assert load_importance(tmp_path / "full" / "checkpoint-4").num_samples == 1
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-4", out / "checkpoint-4")
    run(out, resume=True, importance_callback=ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", per_epoch=True)), **kw)
    assert load_importance(out).num_samples == 3
    assert_same_importance(out, tmp_path / "full")


# ---------------------------------------------------------------------------------------- rotation, Hub


def test_save_total_limit_rotates_importance_with_checkpoints(tmp_path):
    run(tmp_path, max_steps=5, save_steps=1, save_total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-5", "importance"]
    assert [load_importance(tmp_path / f"checkpoint-{n}").step for n in (4, 5)] == [4, 5]
    assert not leftovers(tmp_path)


class SeenAtPush(TrainerCallback):
    """Runs after ImportanceCallback: records the step of checkpoint-N/importance when the Trainer starts a push."""

    def __init__(self):
        self.steps = {}

    def on_push_begin(self, args, state, control, **kwargs):
        path = Path(args.output_dir, f"checkpoint-{state.global_step}", IMP_CONFIG)
        self.steps[state.global_step] = json.loads(path.read_text())["state"]["global_step"] if path.exists() else None


@pytest.mark.parametrize("strategy", ["checkpoint", "every_save"])
def test_push_to_hub_includes_importance(strategy, hub_server, tmp_path):
    out, repo = tmp_path / "out", "tester/tiny-importance"
    seen = SeenAtPush()
    # hub_always_push: the step-4 push must not be skipped while the step-2 one is still uploading
    trainer = run(out, max_steps=4, save_steps=2, push_to_hub=True, hub_model_id=repo, hub_token=hub_server.token,
                  hub_strategy=strategy, hub_always_push=True, callbacks=[seen])
    # The Trainer uploads checkpoint-N in the background from right after on_push_begin, before on_save runs.
    assert seen.steps == {2: 2, 4: 4}
    files = hub_server.files(repo)
    if strategy == "checkpoint":
        pushes = {c.title: c.files for c in hub_server.get_repo(repo).commits.values() if c.title.endswith("checkpoint")}
        for n in (2, 4):
            config = json.loads(pushes[f"Training in progress, step {n}, checkpoint"][f"last-checkpoint/{IMP_CONFIG}"])
            assert config["state"]["global_step"] == n
        ckpt = out / "checkpoint-4" / F.IMPORTANCE_DIR
        assert files[f"last-checkpoint/importance/{F.WEIGHTS_NAME}"] == (ckpt / F.WEIGHTS_NAME).read_bytes()
        assert load_importance(repo, subfolder="last-checkpoint", token=hub_server.token).step == 4
    # output_dir/importance is written in on_train_end, while the last checkpoint push may still be uploading
    # output_dir: that push may or may not carry it, but never a half-written folder.
    if f"importance/{CONFIG}" in files:
        assert files[f"importance/{F.WEIGHTS_NAME}"] == (out / "importance" / F.WEIGHTS_NAME).read_bytes()
    assert not any(STAGING_DIR in f or ".tmp" in f for f in files)
    trainer.push_to_hub()
    files = hub_server.files(repo)
    assert files[f"importance/{CONFIG}"] == (out / "importance" / CONFIG).read_bytes()
    assert not any(STAGING_DIR in f or ".tmp" in f for f in files)
    assert_same_importance(load_importance(repo, token=hub_server.token).path, out / "importance")


# -------------------------------------------------------------------------------------------- bad inputs


def truncate(d):
    f = d / F.WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[:-16])


def shard_and_drop_one(d):
    imp = load_importance(d)
    tensors = imp.state_dict()  # read before the folder is replaced (tensors are loaded lazily)
    shutil.rmtree(d)
    meta = {k: v for k, v in imp.meta.items() if k not in ("world_size", "state_dtype")}
    save_importance_dir(str(d), tensors, config=imp.config, meta=meta, shapes=imp.shapes, max_shard_size=6000)
    shards = sorted(d.glob("importance-*.safetensors"))
    assert len(shards) > 2 and (d / F.INDEX_NAME).is_file()
    shards[1].unlink()


def edit_config(**changes):
    def edit(d):
        meta = json.loads((d / CONFIG).read_text())
        (d / CONFIG).write_text(json.dumps({**meta, **changes}))

    return edit


def cut_config(d):
    text = (d / CONFIG).read_text()
    (d / CONFIG).write_text(text[: len(text) // 2])


def drop_folder(d):
    shutil.rmtree(d)
    d.mkdir()


BAD_FILES = [
    ("truncated shard", truncate, r"importance\.safetensors is (corrupt or )?truncated"),
    ("missing shard", shard_and_drop_one, r"shard importance-00002-of-\d{5}\.safetensors named in the index is missing"),
    ("unknown format version", edit_config(format_version=99), r"format_version 99 is not supported .*upgrade"),
    ("corrupt JSON", cut_config, r"importance_config\.json is not valid JSON .*corrupt or truncated"),
    ("no importance", drop_folder, r"No importance in \S+: expected importance_config\.json"),
]


@pytest.mark.parametrize("case, corrupt, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files_fail_with_one_line_and_stay_untouched(case, corrupt, message, reference, tmp_path):
    d = tmp_path / "importance"
    shutil.copytree(reference("temporal_magnitude") / "importance", d)
    corrupt(d)
    before = snapshot(tmp_path)
    with pytest.raises(ImportanceFileError, match=message) as e:
        load_importance(d)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    assert snapshot(tmp_path) == before


def test_shape_mismatch_with_model(reference):
    path = reference("temporal_magnitude") / "importance"
    before = snapshot(path)
    with pytest.raises(ValueError, match=r"does not match this model: model\.layers\.0\.mlp\.gate_proj\.weight: "
                                         r"importance shape \[64, 32\] != model shape \[48, 32\]"):
        load_importance(path, model=tiny_llama(intermediate_size=48))
    assert snapshot(path) == before


@pytest.mark.parametrize("field, now, shown", [
    ("criterion", "magnitude", "criterion: checkpoint 'temporal_magnitude' -> now 'magnitude'"),
    ("window", 2, "window: checkpoint None -> now 2"),
    ("target_modules", ["q_proj", "v_proj"], "target_modules: checkpoint 'all-linear' -> now ['q_proj', 'v_proj']"),
])
def test_config_change_on_resume_names_field_and_values(field, now, shown, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference("temporal_magnitude"), out)
    before = snapshot(out)
    cb = ImportanceCallback(ImportanceConfig(**{field: now}))
    with pytest.raises(ValueError, match="importance config changed since") as e:
        run(out, resume=str(out / "checkpoint-3"), importance_callback=cb)
    assert shown in str(e.value) and "\n" not in str(e.value)
    assert snapshot(out) == before
