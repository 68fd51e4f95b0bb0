"""`TrainingCheckpoint`: the only code that touches `checkpoint-N/` and `output_dir/_*` for an [`ImportanceCallback`].

It writes and reads the state of the three runtime objects of a callback, each of which exposes `state_dict()` /
`load_state_dict()`: the accumulator (the importance folder, `files/importance_files.py`), the `MaskHolder` (its JSON
counters as the importance's `schedule` section, its masks as `masks.safetensors` beside the tensors,
`files/training_state.py`, and the edits of a pending re-fit as `refit_edits.safetensors`, `files/refit_files.py`)
and the `Distiller` (the default teacher in `output_dir/_distill-teacher[-<name>]/`).

- **Claims**: the importance folders claimed by the callbacks of each running `train()` (process-global `_CLAIMS`,
  keyed by its `TrainerState`): two callbacks writing the same folder are refused at train begin.
- **Staging**: a checkpoint's importance is written to `output_dir/_importance-staging[-<name>]/` before the Trainer
  saves (its Hub push of `checkpoint-N` starts before `on_save`), then **published** (one rename,
  `io_utils.publish_folder`) into `checkpoint-N/importance/` once that folder exists. Saves decided later are written
  in place through a temporary folder.
- **Recover**: a crash between the Trainer's checkpoint write and that rename leaves the complete importance of step
  N staged beside a complete `checkpoint-N` without one; the resume moves it into place.
- **Restore**: resuming reads the importance once, checks it against this run and hands each object its state.
"""

from __future__ import annotations

import logging
import os
import weakref

from safetensors import SafetensorError

from .. import distributed as D
from ..config import IMPORTANCE_CONFIG_NAME
from ..files import importance_files as F
from ..files import training_state as T
from ..files.cross_files import load_cross_state, save_cross_state
from ..files.refit_files import load_refit_edits, save_refit_edits
from ..files.safetensors_io import ImportanceFileError
from ..files.unit_files import save_unit_state
from ..io_utils import publish_folder
from .stream import pending_edits

logger = logging.getLogger(__name__)

# Under `output_dir`: the leading "_" keeps it out of the Trainer's Hub pushes (`ignore_patterns=["_*", ...]`)
# and out of its `checkpoint-*` globs (resume, rotation). Pinned by tests/train/test_checkpoint.py.
STAGING_DIR = "_importance-staging"
# The importance folders claimed by the callbacks of each running `train()` (keyed by its `TrainerState`, shared by
# every callback of one Trainer): two callbacks writing the same folder are refused at train begin.
_CLAIMS: dict[int, tuple[weakref.ref, dict[str, weakref.ref]]] = {}


def output_dir(args, state) -> str:
    """The run's folder: `args.output_dir`, or a hyperparameter_search trial's `output_dir/<hp_name(trial)>`."""
    return os.path.join(args.output_dir, state.trial_name) if state.trial_name else args.output_dir


def checkpoint_dir(args, state) -> str | None:
    """`checkpoint-<global_step>` of the run, when it exists."""
    folder = os.path.join(output_dir(args, state), f"checkpoint-{state.global_step}")
    return folder if os.path.isdir(folder) else None


def staged_step(staging_dir: str) -> int | None:
    """The `global_step` of a complete staged importance folder (its config exists and parses), else `None`."""
    if not os.path.isfile(os.path.join(staging_dir, IMPORTANCE_CONFIG_NAME)):
        return None
    try:
        step = F.load_meta(staging_dir)["state"].get("global_step")
    except ImportanceFileError:
        return None
    return int(step) if isinstance(step, int) else None


class TrainingCheckpoint:
    """The files of one [`ImportanceCallback`]: what it writes beside every checkpoint and reads back on resume.

    Args:
        config (`ImportanceConfig`): the callback's (its `name` names the folders).
        accumulator (`ImportanceAccumulator`): its `state_dict()` is the importance folder.
        holder (`MaskHolder`, *optional*): its `state_dict()` and masks ride along in the importance folder.
        distiller (`Distiller`, *optional*): its `state_dict()` (the default teacher) goes to `_distill-teacher/`.
        on_save_error, on_resume_mismatch, resume_from: as in [`ImportanceCallback`].
    """

    def __init__(self, config, accumulator, holder=None, distiller=None, *, on_save_error: str = "raise",
                 on_resume_mismatch: str = "raise", resume_from: str | None = None):
        self.config, self.accumulator, self.holder, self.distiller = config, accumulator, holder, distiller
        self.on_save_error, self.on_resume_mismatch, self.resume_from = on_save_error, on_resume_mismatch, resume_from
        self.staged_step: int | None = None
        self.stage_attempt: int | None = None  # the step whose importance was (tried to be) staged
        self.teacher_saved = False

    # ------------------------------------------------------------------------------------------------ names
    @property
    def importance_dir(self) -> str:
        return F.importance_dir_name(self.config.name)

    @property
    def staging_dir(self) -> str:
        name = self.config.name
        return STAGING_DIR if name is None else f"{STAGING_DIR}-{name}"

    @property
    def teacher_dir(self) -> str:
        return T.teacher_dir_name(self.config.name)

    def claim(self, state, cb) -> None:
        """Refuse a second callback of this `train()` writing the same importance folder (before any work).

        Raises:
            ValueError: another callback `cb` of the same Trainer claimed this importance folder.
        """
        for key in [k for k, (ref, _) in _CLAIMS.items() if ref() is None]:
            del _CLAIMS[key]
        entry = _CLAIMS.get(id(state))
        if entry is None or entry[0]() is not state:
            entry = _CLAIMS[id(state)] = (weakref.ref(state), {})
        # Weak references both ways: a claim must not keep a finished run's callback (and its state, gigabytes
        # for sparsegpt) alive after the Trainer is gone.
        claimed = entry[1].get(self.importance_dir)
        owner = claimed() if claimed is not None else None
        if owner is None:
            entry[1][self.importance_dir], owner = weakref.ref(cb), cb
        if owner is not cb:
            raise ValueError(
                f"Two ImportanceCallbacks on this Trainer write the same folder {self.importance_dir}/ (criteria "
                f"{owner.config.criterion!r} and {cb.config.criterion!r}): give each ImportanceConfig(name=...) a "
                "distinct name")

    # ----------------------------------------------------------------------------------------------- saving
    def stage(self, args, state) -> None:
        """Write the importance of this step before the Trainer saves checkpoint-N (published by [`publish_staged`])."""
        self.staged_step = None
        self.stage_attempt = state.global_step
        if self.save(os.path.join(output_dir(args, state), self.staging_dir), state, publish=False):
            self.staged_step = state.global_step

    def publish_staged(self, args, state) -> None:
        """Move the staged importance of this step into `checkpoint-N/` once the Trainer wrote it (rank 0)."""
        staged = os.path.join(output_dir(args, state), self.staging_dir)
        if self.staged_step != state.global_step or self.accumulator.plan.rank != 0 or not os.path.isdir(staged):
            return
        folder = checkpoint_dir(args, state)
        if folder is None:
            logger.warning("ImportanceCallback: checkpoint-%d not found under %s", state.global_step, args.output_dir)
            return
        publish_folder(staged, os.path.join(folder, self.importance_dir))

    def on_save(self, args, state) -> None:
        """The Trainer wrote `checkpoint-N`: publish what was staged for it, or write it now (a save decided late)."""
        self.save_teacher(args, state)  # a save decided after on_step_end: the checkpoint is already written
        if self.stage_attempt == state.global_step:
            # Staged before the checkpoint (or that write already failed and was reported): never write twice.
            self.publish_staged(args, state)
            D.barrier()
            return
        folder = checkpoint_dir(args, state)
        if folder is None:
            logger.warning("ImportanceCallback: checkpoint-%d not found under %s", state.global_step,
                           output_dir(args, state))
            return
        self.save(os.path.join(folder, self.importance_dir), state)

    def save_final(self, args, state) -> None:
        """`output_dir/importance/` at train end, through the staging folder: the Trainer's last checkpoint push may
        still be uploading output_dir, and it skips "_*" but not a half-written temporary folder."""
        out = output_dir(args, state)
        staging = os.path.join(out, self.staging_dir)
        if self.save(staging, state, publish=False) and self.accumulator.plan.rank == 0:
            publish_folder(staging, os.path.join(out, self.importance_dir))
        D.barrier()  # no rank reads output_dir/importance before rank 0 has renamed it into place
        self.staged_step = None

    def save(self, final_dir: str, state, publish: bool = True) -> bool:
        """Write the importance (and the holder's state) into `final_dir` (every rank takes part); returns whether it
        was written."""
        acc = self.accumulator
        if not acc.tracked:
            return False
        saved = acc.state_dict()  # collective
        extra, masks, edits, units, cross = {}, None, {}, saved.get("units"), saved.get("cross")
        if saved.get("router"):  # an MoE model's router statistics, summed over ranks
            extra["router"] = saved["router"]
        if self.holder is not None:
            extra["schedule"] = self.holder.state_dict()
            masks, edits = self.holder.masks, pending_edits(self.holder)

        def attach(tmp: str) -> dict:
            out = {"masks": T.save_schedule_masks(tmp, masks)[1]} if masks else {}
            if edits:  # PruneSchedule(refit_at=...) between the first mask update and the re-fit
                out["edits"] = save_refit_edits(tmp, edits)
            if units is not None:  # ImportanceConfig(units=True): summed across ranks by `state_dict()`
                out["units"] = save_unit_state(tmp, units)
            if cross is not None:  # PruneSchedule(cross_term=True): summed across ranks by `state_dict()`
                out["cross"] = save_cross_state(tmp, cross["tensors"])
            return out
        if cross is not None:
            extra["cross"] = {"tokens": cross["tokens"], "shared": cross["shared"]}
        error = F.write_importance(final_dir, saved["tensors"], acc.plan, config=self.config, meta=saved["meta"],
                                   shapes=saved["shapes"], extra=extra, attach=attach, publish=publish)
        if error is not None:
            what = final_dir if publish else f"the importance of checkpoint-{state.global_step} (staged in {final_dir})"
            self._report(f"ImportanceCallback could not write {what}: {error}", error)
        return error is None

    def _report(self, msg: str, error: BaseException | None) -> None:
        if self.on_save_error == "raise":
            raise RuntimeError(msg + " (pass on_save_error='warn' to keep training)") from error
        logger.warning(msg)

    # ------------------------------------------------------------------------------------- distillation
    def save_teacher(self, args, state) -> None:
        """Before the run's first checkpoint: write the default teacher (a frozen copy that exists only in memory)."""
        distiller = self.distiller
        if distiller is None or self.teacher_saved or not distiller.teacher_is_copy:
            return
        self.teacher_saved = True  # once per run, even if it fails: the error is reported once
        error = None
        if D.rank_and_world()[0] == 0:
            path = os.path.join(output_dir(args, state), self.teacher_dir)
            try:
                size = T.save_teacher_state(path, distiller.state_dict(), meta={"global_step": 0})
                logger.info("ImportanceCallback: saved the distillation teacher for resuming (%d bytes) to %s", size, path)
            except (OSError, SafetensorError) as e:
                error = e
        if D.any_rank(error is not None):
            self._report(f"ImportanceCallback could not save the distillation teacher to {self.teacher_dir}/ "
                         f"({error or 'failed on rank 0'}): the run cannot be resumed with DistillConfig(teacher=None)",
                         error)

    def restore_teacher(self, args, state) -> None:
        """Resuming with the default teacher: give the distiller the dense copy the run saved at its first checkpoint."""
        # The teacher folder sits beside the checkpoints of the run: in output_dir, or beside `resume_from`.
        folder = self.resume_from or checkpoint_dir(args, state) or os.path.join(
            output_dir(args, state), f"checkpoint-{state.global_step}")
        path = os.path.join(os.path.dirname(os.path.abspath(folder)), self.teacher_dir)
        try:
            tensors = T.load_teacher_state(path)[0]
        except ImportanceFileError as e:
            raise ValueError(f"Cannot resume distillation with DistillConfig(teacher=None): the dense teacher saved at "
                             f"the run's first checkpoint is unusable ({e}); pass DistillConfig(teacher=...) with the "
                             "model the run started from (a path or module)") from None
        self.distiller.load_state_dict(tensors)
        self.teacher_saved = True

    # ------------------------------------------------------------------------------------------ resume
    def restore(self, args, state) -> None:
        """Resuming at `state.global_step`: recover a staged importance, read it once, check it against this run,
        and hand the accumulator and the holder their state.

        Raises:
            ValueError: no usable importance for this run (unless `on_resume_mismatch="restart"`), or a schedule
                that differs from the checkpoint's.
        """
        acc = self.accumulator
        folder = self.resume_from or checkpoint_dir(args, state)
        try:
            if folder is None:
                raise ImportanceFileError(
                    f"resuming at step {state.global_step} but no checkpoint-{state.global_step} folder was found "
                    f"under {output_dir(args, state)}; pass ImportanceCallback(resume_from=...)"
                )
            self.recover_staged(folder, state)
            imp = F.load_importance(folder, name=self.config.name)
            diff = self.config.diff(imp.config)
            max_steps = acc.meta["max_steps"]
            if imp.meta.get("max_steps") != max_steps and self.config.window is not None:
                diff["max_steps (sets the window)"] = (max_steps, imp.meta.get("max_steps"))
            if diff:
                shown = ", ".join(f"{k}: checkpoint {b!r} -> now {a!r}" for k, (a, b) in diff.items())
                raise ImportanceFileError(f"the importance config changed since {imp.path}: {shown}")
            if imp.shapes != acc.shapes():
                raise ImportanceFileError(f"{imp.path} tracks other weights than this model ({len(imp.shapes)} vs "
                                          f"{len(acc.tracked)}): was the model or target_modules changed?")
        except ImportanceFileError as e:
            if self.on_resume_mismatch == "restart":
                logger.warning("ImportanceCallback: %s; restarting importance from zero (on_resume_mismatch='restart')", e)
                return
            raise ValueError(
                f"Cannot resume importance: {e} (resume from another checkpoint, or pass "
                "ImportanceCallback(on_resume_mismatch='restart') to restart the importance from zero)"
            ) from None
        acc.load_state_dict(imp, state.global_step)
        self._restore_cross(imp)
        if self.holder is not None:
            saved = imp.sections.get("schedule")  # parsed once, by load_importance
            sums = (imp.sections.get("checksums") or {}).get("masks")
            masks = T.load_schedule_masks(imp.path, sums) if saved and saved.get("has_masks") else {}
            edit_sums = (imp.sections.get("checksums") or {}).get("edits")  # recorded iff the file was written
            edits = load_refit_edits(imp.path, edit_sums) if edit_sums else {}
            self.holder.load_state_dict(saved, masks, edits)
        logger.info("ImportanceCallback: restored %d samples from %s", acc.meta["num_samples"], imp.path)

    def _restore_cross(self, imp) -> None:
        """The cross term's sums (`cross.safetensors`, checked against their CRC32s) back into `accumulator.cross`."""
        acc = self.accumulator
        section = imp.sections.get("cross")
        if acc.cross is None or not section:
            return
        tensors = load_cross_state(imp.path, (imp.sections.get("checksums") or {}).get("cross"))
        acc.cross.load_state_dict(tensors, section, keep=acc.plan.rank == 0, device=lambda n: acc.states[n].device)

    def recover_staged(self, folder: str, state) -> None:
        """A crash between the Trainer's checkpoint write and the move of the staged importance into it leaves a
        complete `checkpoint-N` without importance, and the complete importance of step N in the staging folder
        beside it: move it into the checkpoint (atomically, rank 0), so the resume goes on as if nothing happened.

        Only a staged folder whose config says step N (== the resumed step) is taken, and only into a checkpoint the
        Trainer finished (`trainer_state.json`, its last file, exists) that has no importance yet.
        """
        final = os.path.join(folder, self.importance_dir)
        staged = os.path.join(os.path.dirname(os.path.abspath(folder)), self.staging_dir)
        usable = (not os.path.exists(final) and os.path.isfile(os.path.join(folder, "trainer_state.json"))
                  and staged_step(staged) == state.global_step)
        D.barrier()  # every rank has looked before rank 0 moves anything
        if D.any_rank(usable) and self.accumulator.plan.rank == 0 and usable:
            publish_folder(staged, final)
            logger.warning("ImportanceCallback: %s had no importance (the run stopped before it was moved there); "
                           "used the complete importance of step %d staged in %s", folder, state.global_step, staged)
        D.barrier()
