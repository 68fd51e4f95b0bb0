"""Checkpoint faults of the callback and the schedule (issue 14, items 6, 10, 11).

- 6: a SIGKILL between the Trainer's checkpoint write and the move of the staged importance into it; the resume
  publishes the staged importance of the same step and is exact.
- 10: several callbacks on one Trainer write `importance-<name>/` each; collisions are refused at train begin.
- 11: `PruneSchedule(mode="hold", masks_from=...)` on a checkpoint another tool pruned (no `sparsity.json`).

Real Trainer runs, real safetensors files, a real SIGKILLed subprocess (`tests/scripts/ckpt_train.py`). The checksums
of item 9 are in `tests/files/test_checksums.py`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer

from hf_weightprune import ImportanceCallback, ImportanceConfig, load_importance
from hf_weightprune.files import importance_files as F
from hf_weightprune.files.safetensors_io import ImportanceFileError
from hf_weightprune.testing import TokenDataset, tiny_llama
from hf_weightprune.train.callback import STAGING_DIR
from hf_weightprune.train.schedule import PruneSchedule
from hf_weightprune.train.stream import held_masks
from tests.helpers import assert_same_importance, leftovers, sigkill_at_hang, snapshot, training_args
from tests.scripts.ckpt_train import MARKER, run

CONFIG = F.IMPORTANCE_CONFIG_NAME

# ------------------------------------------------------------------- 6: SIGKILL between checkpoint and publish


@pytest.fixture(scope="module")
def killed_before_publish(tmp_path_factory):
    """A wanda run SIGKILLed after the Trainer wrote checkpoint-6, before the staged importance was moved into it."""
    argv = ["--criterion", "wanda", "--hang-in", "publish", "--hang-call", "2"]  # 2nd publish: step 6
    out = sigkill_at_hang(tmp_path_factory.mktemp("killed"), {"run": argv}) / "run"
    (out / MARKER).unlink()
    return out


def test_sigkill_before_publish_resumes_from_the_staged_importance_exactly(killed_before_publish, reference,
                                                                           tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(killed_before_publish, out)
    ckpt, staged = out / "checkpoint-6", out / STAGING_DIR
    assert (ckpt / "trainer_state.json").is_file() and not (ckpt / F.IMPORTANCE_DIR).exists()
    assert json.loads((staged / CONFIG).read_text())["state"]["global_step"] == 6
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.train.callback"):
        run(out, "wanda", resume=True)
    assert "used the complete importance of step 6 staged in" in caplog.text
    ref = reference("wanda")
    # checkpoint-6 got the staged importance (moved, not rewritten), and the resumed run ends where the reference does
    assert_same_importance(load_importance(ckpt), load_importance(ref / "checkpoint-6"))
    assert_same_importance(load_importance(out), load_importance(ref))
    assert_same_importance(load_importance(out / "checkpoint-8"), load_importance(ref / "checkpoint-8"))
    assert not leftovers(out)


def test_staged_importance_of_another_step_is_not_used(killed_before_publish, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed_before_publish, out)
    config = out / STAGING_DIR / CONFIG
    meta = json.loads(config.read_text())
    meta["state"]["global_step"] = 5
    config.write_text(json.dumps(meta))
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"^Cannot resume importance: No importance in \S*checkpoint-6: ") as e:
        run(out, "wanda", resume=True)
    assert "\n" not in str(e.value)
    assert snapshot(out) == before


# ------------------------------------------------------------------------------ 10: two callbacks, one Trainer


def two_callbacks():
    return (ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", name="tm")),
            ImportanceCallback(ImportanceConfig(criterion="wanda", name="wanda")))


def test_two_named_callbacks_each_equal_a_separate_run_and_resume(reference, tmp_path):
    out = tmp_path / "both"
    tm, wanda = two_callbacks()
    run(out, importance_callback=tm, callbacks=[wanda])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6", "checkpoint-8",
                                                     "importance-tm", "importance-wanda"]
    assert sorted(p.name for p in (out / "checkpoint-6").iterdir() if p.name.startswith("importance")) == [
        "importance-tm", "importance-wanda"]
    for name, criterion in (("tm", "temporal_magnitude"), ("wanda", "wanda")):
        for sub in ("", "checkpoint-3", "checkpoint-8"):
            got = load_importance(out / sub if sub else out, name=name)
            assert got.config.name == name and got.criterion == criterion
            assert_same_importance(got, load_importance(reference(criterion) / sub if sub else reference(criterion)))
    assert load_importance(out / "importance-wanda", name="wanda").criterion == "wanda"  # the folder itself
    assert not leftovers(out)
    with pytest.raises(ImportanceFileError, match=r"No unnamed importance in \S+; it holds the named importances "
                                                  r"\['tm', 'wanda'\]: pass load_importance\(path, name=\.\.\.\) \(on the command "
                                                  r"line: prune/inspect/sweep --importance_name tm\), or the folder itself "
                                                  r"\(\S+importance-tm\)"):
        load_importance(out)
    with pytest.raises(ImportanceFileError, match=r"No importance named 'taylor' .*\['tm', 'wanda'\]"):
        load_importance(out / "checkpoint-3", name="taylor")

    # Resume from checkpoint-6: both callbacks restore their own importance.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-6", resumed / "checkpoint-6")
    tm2, wanda2 = two_callbacks()
    run(resumed, resume=True, importance_callback=tm2, callbacks=[wanda2])
    assert tm2.importance().num_samples == 8
    for name in ("tm", "wanda"):
        assert_same_importance(load_importance(resumed, name=name), load_importance(out, name=name))
    assert not leftovers(resumed)


@pytest.mark.parametrize("names", [(None, None), ("a", "a")])
def test_two_callbacks_writing_one_folder_are_refused_at_train_begin(names, tmp_path):
    first = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", name=names[0]))
    second = ImportanceCallback(ImportanceConfig(criterion="wanda", name=names[1]))
    folder = F.importance_dir_name(names[0])
    with pytest.raises(ValueError, match=rf"^Two ImportanceCallbacks on this Trainer write the same folder {folder}/ "
                                         r"\(criteria 'temporal_magnitude' and 'wanda'\): give each "
                                         r"ImportanceConfig\(name=\.\.\.\) a distinct name$"):
        run(tmp_path, importance_callback=first, callbacks=[second])
    assert not list(tmp_path.glob("checkpoint-*")) and second.accumulator.tracked == []  # refused before any work


@pytest.mark.parametrize("bad", ["", "a/b", "../x", ".hidden", "-x", 3])
def test_bad_importance_name_is_refused(bad):
    with pytest.raises(ValueError, match=r"^name must be None or letters, digits"):
        ImportanceConfig(name=bad)


# ------------------------------------------------------------------ 11: masks from another tool's checkpoint


def foreign_pruned_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """What another tool (llm-compressor) leaves: zeros in the Linear weights, no sparsity.json. Returns the masks."""
    model = tiny_llama(seed=5)
    masks = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                keep = torch.rand(module.weight.shape, generator=g) >= 0.6
                module.weight.mul_(keep)
                masks[f"{name}.weight"] = keep
    model.save_pretrained(path)
    assert not (path / "sparsity.json").exists()
    return masks


def test_hold_masks_from_a_checkpoint_without_sparsity_json(tmp_path, caplog):
    src = tmp_path / "foreign"
    masks = foreign_pruned_checkpoint(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    schedule = PruneSchedule(mode="hold", masks_from=str(src))
    cb = ImportanceCallback(schedule=schedule)
    assert not cb.tracks_importance
    args = training_args(tmp_path / "out", max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                         save_strategy="steps", save_steps=2, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=16, vocab_size=128), callbacks=[cb])
    cb.attach(trainer)
    with caplog.at_level(logging.INFO, logger="hf_weightprune.train.stream"):
        trainer.train()
    zeros = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert f"has no sparsity.json (pruned by another tool?): holding the zeros of {len(masks)} targeted weights, " \
           f"sparsity {zeros:.4f} over them" in caplog.text
    assert set(cb.mask_holder.masks) == set(masks) and "lm_head.weight" not in cb.mask_holder.masks
    after = dict(model.named_parameters())
    for n, m in masks.items():
        assert torch.equal(cb.mask_holder.masks[n], m), n
        assert torch.equal(after[n] != 0, m) and not torch.equal(before[n], after[n]), n  # held, and it trained
    # nothing tracked: no state, no hooks, no importance files
    assert cb.state_bytes() == 0 and cb.accumulator.states == {} and cb.accumulator.tracked == [] and cb.accumulator.collector is None
    assert cb.accumulator.meta["num_samples"] == 0
    logged = [e["pruning/sparsity"] for e in trainer.state.log_history if "pruning/sparsity" in e]
    assert len(logged) == 4 and logged[-1] == pytest.approx(zeros)  # the held sparsity still reaches the loggers
    assert not list((tmp_path / "out").rglob(CONFIG))
    with pytest.raises(RuntimeError, match="tracks no importance"):
        cb.importance()

    # the schedule's target_modules / exclude_modules choose the weights
    sub = PruneSchedule(mode="hold", masks_from=str(src), exclude_modules=["mlp.down_proj"])
    assert set(held_masks(model, sub)[0]) == {n for n in masks if "down_proj" not in n}


def test_masks_from_is_checked_at_train_begin_before_any_step(tmp_path):
    missing = PruneSchedule(mode="hold", masks_from=str(tmp_path / "missing"))  # a config does no I/O when built
    with pytest.raises(ValueError, match=r"^masks_from='\S*missing' is not a folder"):
        missing.check_masks_from()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"^masks_from='\S*empty' holds no model\.safetensors"):
        PruneSchedule(mode="hold", masks_from=str(tmp_path / "empty")).check_masks_from()
    args = training_args(tmp_path / "out", max_steps=2, per_device_train_batch_size=4, save_strategy="no")
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(n=8, vocab_size=128),
                      callbacks=[ImportanceCallback(schedule=missing)])
    with pytest.raises(ValueError, match=r"^masks_from='\S*missing' is not a folder"):
        trainer.train()
    assert trainer.state.global_step == 0  # refused in on_train_begin, before the first step
