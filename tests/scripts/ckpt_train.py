"""Train a tiny Llama with `ImportanceCallback` and optionally hang at a chosen point so a test can SIGKILL it.

`--schedule prune|hold` and `--distill` add gradual pruning (or held masks) and distillation (`--schedule
cross|depth|refit`: the pruned-stream variants; `--refit-at N` and `--cross-term` re-fit a hold run's kept weights
towards `--teacher` at step N, with the cross term), `--units` the unit statistics of structured pruning
(`make_callback`); `--arch mixtral|qwen3_moe` trains a tiny mixture of experts instead (expert slices and router
statistics).

Run as `python -m tests.scripts.ckpt_train OUTPUT_DIR [options]` (or under `torchrun --nproc_per_node N`: DDP on
gloo, the same global batch); `run()` is also called in-process by the tests so both sides train with exactly the
same arguments. A hang writes `OUTPUT_DIR/HANG` and sleeps. `--record` writes the callback's `training_record()` to
`OUTPUT_DIR/training_record.rank{RANK}.json` once training ends (every rank: it is a collective).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_weightprune import DistillConfig, ImportanceCallback, ImportanceConfig, PruneSchedule
from hf_weightprune.files import importance_files
from hf_weightprune.testing import TokenDataset, tiny_llama, tiny_moe
from hf_weightprune.train import checkpoint
from tests.helpers import end_process_group, training_args

MARKER = "HANG"
# 16 windows / batch 4 = 4 steps per epoch: max_steps=8 crosses an epoch boundary, so a resume at step 3 or 6
# must also skip batches mid-epoch and reproduce the second epoch's shuffle.
MAX_STEPS, SAVE_STEPS, N = 8, 3, 16


def hang(output_dir: str, pids: list[int] | None = None) -> None:
    """Write the marker (the pids to kill, `pids` or this process's; atomically: the test reads it at once) and sleep."""
    path = os.path.join(output_dir, MARKER)
    with open(path + ".tmp", "w") as f:
        f.write(" ".join(map(str, pids or [os.getpid()])))
    os.replace(path + ".tmp", path)
    time.sleep(600)


class HangAfterSave(TrainerCallback):
    """Hang once checkpoint-`step` (importance included) is complete; under torchrun, once every rank is past it."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            if not torch.distributed.is_initialized():
                hang(args.output_dir)
            # Once every rank saved, rank 0 writes the marker (the test's cue to SIGKILL) with every rank's pid:
            # torchrun starts each rank in a session of its own, out of the launcher's process group.
            pids = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(pids, os.getpid())
            if torch.distributed.get_rank() == 0:
                hang(args.output_dir, pids)
            time.sleep(600)


class SaveLate(TrainerCallback):
    """Ask for a save at `step` after `ImportanceCallback.on_step_end` ran: the importance is written in on_save."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True


# write_single hangs after writing the shards (a crash between file writes: no importance_config.json yet);
# publish hangs before the checkpoint module moves the complete staged folder into checkpoint-N (which then has no
# importance/).
HANG_AFTER = {"write_single": True, "publish": False}
# Where each hook lives: (module, attribute) replaced by a wrapper.
HANG_TARGETS = {"write_single": (importance_files, "write_single"), "publish": (checkpoint, "publish_folder")}


def hang_on_call(name: str, call: int, output_dir: str) -> None:
    """Make the `call`-th call of the function `HANG_TARGETS[name]` names hang."""
    module, attr = HANG_TARGETS[name]
    original, calls = getattr(module, attr), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call and not HANG_AFTER[name]:
            hang(output_dir)
        out = original(*args, **kwargs)
        if calls[0] == call:
            hang(output_dir)
        return out

    setattr(module, attr, wrapper)


def make_callback(criterion="temporal_magnitude", *, schedule=None, masks_from=None, distill=False, teacher=None,
                  teacher_dtype=None, units=False, refit_at=None, cross_term=False):
    """The callback of a run: `schedule` `"prune"` (50% over steps 1-6, a mask update every step: a resume at step 3
    or 6 lands inside the ramp or right after it), `"hold"` (the masks of `masks_from`), `"cross"` (OBS updates on the
    pruned stream with the cross term), `"depth"` (layers pruned front to back) or `"refit"` (OBS updates at 1, 3, 5 and
    a re-fit at 7: checkpoint-6 falls between the last update and the re-fit); `distill`: KL + SquareHead from
    `teacher` (`None`: the default frozen copy); `units`: `ImportanceConfig(units=True)`; `refit_at`, `cross_term`:
    `"hold"` only, its re-fit at that step, the one-shot prune's edits from the teacher (with the cross term)."""
    sched = None
    if schedule == "prune":
        sched = PruneSchedule(final_sparsity=0.5, start=1, end=6, every_n_steps=1)
    elif schedule == "cross":  # updates at 1, 5, 6: checkpoint-3 holds a cross term the update at 5 reads
        sched = PruneSchedule(final_sparsity=0.5, start=1, end=6, every_n_steps=4, pruned_stream=True,
                              cross_term=True, block_size=8)
    elif schedule == "depth":  # layer 0 at step 3, layer 1 at step 6
        sched = PruneSchedule(final_sparsity=0.5, start=0, end=6, order="depth", block_size=8)
    elif schedule == "refit":
        sched = PruneSchedule(final_sparsity=0.5, start=1, end=5, every_n_steps=2, refit_at=7, block_size=8)
    elif schedule == "hold":
        sched = PruneSchedule(mode="hold", masks_from=masks_from, refit_at=refit_at, cross_term=cross_term)
    cfg = DistillConfig(teacher=teacher, alpha=0.5, temperature=2.0, hidden_weight=0.5,
                        teacher_dtype=teacher_dtype) if distill else None
    return ImportanceCallback(ImportanceConfig(criterion=criterion, units=units), schedule=sched, distill=cfg)


def make_model(arch: str, resume=None, output_dir=None):
    """The run's seeded model: `"llama"` or a `tiny_moe` architecture. An MoE resumes from the checkpoint's weights:
    transformers 5's Trainer restores a checkpoint with `load_state_dict(strict=False)`, which skips the fused experts
    saved under their per-expert names (a warning), so the model is loaded from the checkpoint it resumes."""
    if arch == "llama":
        return tiny_llama(seed=11)
    if resume is None:
        return tiny_moe(arch, seed=11)
    folder = resume if isinstance(resume, (str, os.PathLike)) else get_last_checkpoint(str(output_dir))
    return AutoModelForCausalLM.from_pretrained(folder)


def run(output_dir, criterion="temporal_magnitude", *, resume=None, callbacks=(), importance_callback=None,
        max_steps=MAX_STEPS, save_steps=SAVE_STEPS, arch="llama", **kwargs):
    """Train; returns the trainer. `resume`: a checkpoint path, True, or None; `arch`: `"llama"` or a `tiny_moe`
    architecture (`"mixtral"`, `"qwen3_moe"`, ...). Under `torchrun` (gloo) the global batch stays 4 windows."""
    torch.set_num_threads(1)
    model = make_model(arch, resume, output_dir)
    vocab = model.config.vocab_size
    cb = importance_callback or ImportanceCallback(ImportanceConfig(criterion=criterion))
    world = int(os.environ.get("WORLD_SIZE", 1))  # the process group starts with TrainingArguments
    args = training_args(output_dir, max_steps=max_steps, per_device_train_batch_size=4 // world, learning_rate=1e-2,
                         seed=7, save_steps=save_steps, logging_steps=1, dataloader_num_workers=0,
                         **{"save_strategy": "steps", **({"ddp_backend": "gloo"} if world > 1 else {}), **kwargs})
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=N, vocab_size=vocab, seed=3),
                      callbacks=[cb, *callbacks])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--criterion", default="temporal_magnitude")
    parser.add_argument("--hang-after-save", type=int, help="hang once checkpoint-N is complete")
    parser.add_argument("--hang-in", choices=sorted(HANG_AFTER), help="hang inside this file-writing function")
    parser.add_argument("--hang-call", type=int, default=1, help="... at its n-th call")
    parser.add_argument("--save-late", type=int, help="a save at step N decided after ImportanceCallback's on_step_end")
    parser.add_argument("--schedule", choices=["prune", "hold", "cross", "depth", "refit"],
                        help="gradual pruning, or hold --masks-from's masks")
    parser.add_argument("--masks-from", help="hold: the pruned checkpoint folder")
    parser.add_argument("--distill", action="store_true", help="distil (teacher: --teacher, else the frozen copy)")
    parser.add_argument("--teacher", help="distill: the dense teacher's folder")
    parser.add_argument("--refit-at", type=int, help="hold: re-fit the kept weights towards --teacher at step N")
    parser.add_argument("--cross-term", action="store_true", help="hold --refit-at: with the cross term")
    parser.add_argument("--units", action="store_true", help="gather the unit statistics of structured pruning too")
    parser.add_argument("--arch", default="llama", help="llama, or a tiny_moe architecture (mixtral, qwen3_moe, ...)")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUTPUT_DIR")
    parser.add_argument("--record", action="store_true", help="write training_record() once training ends")
    a = parser.parse_args(argv)
    callbacks = []
    if a.hang_after_save:
        callbacks.append(HangAfterSave(a.hang_after_save))
    if a.save_late:
        callbacks.append(SaveLate(a.save_late))
    if a.hang_in:
        hang_on_call(a.hang_in, a.hang_call, a.output_dir)
    cb = make_callback(a.criterion, schedule=a.schedule, masks_from=a.masks_from, distill=a.distill, teacher=a.teacher,
                       units=a.units, refit_at=a.refit_at, cross_term=a.cross_term)
    run(a.output_dir, a.criterion, resume=a.resume or None, callbacks=callbacks, importance_callback=cb, arch=a.arch)
    if a.record:
        record = cb.training_record()  # a collective: every rank asks
        with open(os.path.join(a.output_dir, f"training_record.rank{os.environ.get('RANK', 0)}.json"), "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main()
    end_process_group()
