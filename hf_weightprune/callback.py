"""`ImportanceCallback`: Trainer events -> scorer updates -> importance files next to every checkpoint.

Lifecycle (one sitting to read):
- `on_train_begin`: find the tracked weights, plan which rank owns which buffer (`distributed.OwnershipPlan`),
  restore the state from the checkpoint being resumed (found from `state.global_step`), register the activation
  hooks (`activations.ActivationCollector`) for activation criteria, set up the `PruneSchedule`'s `MaskHolder`.
- `on_pre_optimizer_step`: gradient criteria read gradients here (accumulated, unscaled, clipped, reduced);
  activation criteria commit the sums of the step's forwards.
- `on_optimizer_step`: the holder re-applies the masks.
- `on_step_end`: weight criteria (`temporal_magnitude`) read the weights the optimizer just wrote; the holder
  updates the masks at the schedule's steps.
- `on_epoch_end`: the per-epoch sample of the paper (`per_epoch=True`).
- saving: `on_step_end` / `on_epoch_end` with `control.should_save` write the importance to a staging folder before
  the Trainer saves (its Hub push of `checkpoint-N` starts before `on_save`); `on_push_begin` / `on_save` move it
  into `checkpoint-N/importance/`. Saves decided later (`save_strategy="best"`) are written in `on_save`.
- `on_log`: importance scalars go to the Trainer's loggers through `trainer.log` (pass `trainer=` or `attach`).
- `on_train_end`: write `output_dir/importance/`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import has_length

from . import distributed as D
from . import state as S
from .activations import ActivationCollector
from .config import ImportanceConfig
from .distill import DistillConfig, Distiller
from .holder import MaskHolder
from .importance import Importance
from .matching import TrackedWeight, find_tracked_weights
from .schedule import PruneSchedule
from .scorers import get_scorer
from .scorers.base import chunks

logger = logging.getLogger(__name__)

SAVE_ERROR_CHOICES = ("raise", "warn")
RESUME_MISMATCH_CHOICES = ("raise", "restart")
# Under `output_dir`: the leading "_" keeps it out of the Trainer's Hub pushes (`ignore_patterns=["_*", ...]`)
# and out of its `checkpoint-*` globs (resume, rotation). Pinned by tests/test_checkpoint.py.
STAGING_DIR = "_importance-staging"


class ImportanceCallback(TrainerCallback):
    """Accumulate per-parameter importance while a `transformers.Trainer` trains.

    Args:
        config (`ImportanceConfig` or `dict`, *optional*): what to track; defaults to `ImportanceConfig()`.
        schedule (`PruneSchedule`, *optional*): prune gradually during training (masks held after each step).
        distill (`DistillConfig`, *optional*): distil from a dense teacher while training (default teacher: a frozen
            copy of the model as training begins), so quality recovers while the schedule prunes (SquareHead, Kurtic
            et al. 2023, arXiv 2310.06927). With `PruneSchedule(mode="hold")` pass the dense model as `teacher`.
        trainer (`transformers.Trainer`, *optional*): the Trainer, so that importance metrics reach its loggers
            (TensorBoard, W&B, `log_history`) through `trainer.log`; or call `attach(trainer)`.
        on_save_error (`str`, *optional*, defaults to `"raise"`): `"raise"` stops training when the importance
            cannot be written (disk full, read-only folder); `"warn"` logs and goes on.
        on_resume_mismatch (`str`, *optional*, defaults to `"raise"`): what to do when the resumed checkpoint
            holds importance written with another config (or none): `"raise"`, or `"restart"` from zero.
        resume_from (`str`, *optional*): folder to restore from when resuming from a checkpoint outside
            `args.output_dir` (the Trainer does not tell callbacks which folder it resumed from).
        offload_to_cpu (`bool`, *optional*, defaults to `False`): keep the state in CPU memory (weights are
            copied over chunk by chunk at each sample), for models whose state would not fit beside them.

    Raises:
        ValueError: an invalid choice, or `per_epoch=True` with a criterion that does not read weights.
        TypeError: `config` or `schedule` of the wrong type.
    """

    def __init__(
        self,
        config: ImportanceConfig | dict | None = None,
        *,
        schedule: PruneSchedule | None = None,
        distill: DistillConfig | None = None,
        trainer=None,
        on_save_error: str = "raise",
        on_resume_mismatch: str = "raise",
        resume_from: str | None = None,
        offload_to_cpu: bool = False,
    ):
        if isinstance(config, dict):
            config = ImportanceConfig(**config)
        if config is not None and not isinstance(config, ImportanceConfig):
            raise TypeError(f"config must be an ImportanceConfig or a dict; got {type(config).__name__}")
        self.config = config if config is not None else ImportanceConfig()
        self.scorer = get_scorer(self.config.criterion)
        if self.config.per_epoch and self.scorer.source != "weights":
            raise ValueError(
                f"per_epoch=True samples the weights at each epoch end; criterion {self.config.criterion!r} "
                "reads gradients or activations during steps: use every_n_steps instead"
            )
        if on_save_error not in SAVE_ERROR_CHOICES:
            raise ValueError(f"on_save_error must be one of {SAVE_ERROR_CHOICES}; got {on_save_error!r}")
        if on_resume_mismatch not in RESUME_MISMATCH_CHOICES:
            raise ValueError(f"on_resume_mismatch must be one of {RESUME_MISMATCH_CHOICES}; got {on_resume_mismatch!r}")
        if schedule is not None and not isinstance(schedule, PruneSchedule):
            raise TypeError(f"schedule must be a PruneSchedule; got {type(schedule).__name__}")
        if distill is not None and not isinstance(distill, DistillConfig):
            raise TypeError(f"distill must be a DistillConfig; got {type(distill).__name__}")
        if distill is not None and distill.teacher is None and schedule is not None and schedule.mode == "hold":
            raise ValueError("distill with PruneSchedule(mode='hold') needs DistillConfig(teacher=...): the model being "
                             "trained is already pruned, so pass the dense model (or its path) as the teacher")
        self.schedule = schedule
        self.distill = distill
        self._distiller = Distiller(distill) if distill is not None else None
        self.mask_holder = MaskHolder(schedule) if schedule is not None else None
        self.on_save_error = on_save_error
        self.on_resume_mismatch = on_resume_mismatch
        self.resume_from = resume_from
        self.offload_to_cpu = offload_to_cpu
        self.trainer = None
        if trainer is not None:
            self.attach(trainer)
        self._tracked: list[TrackedWeight] = []
        self._collector: ActivationCollector | None = None
        self._staged_step: int | None = None
        self._stage_attempt: int | None = None  # the step whose importance was (tried to be) staged
        self._logging = False
        self._logged_step: int | None = None
        self._reset_state()

    def attach(self, trainer) -> ImportanceCallback:
        """Add this callback to `trainer` (once) and log importance metrics through `trainer.log`; returns self."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # ------------------------------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self._states: dict[str, torch.Tensor] = {}  # buffers this rank holds
        self._plan = D.OwnershipPlan()
        self._meta: dict[str, Any] = {"global_step": 0, "num_samples": 0, "weight_sum": 0.0, "last_step": 0,
                                      "skipped": 0, "tokens": {}, "max_steps": None, "window_start": None,
                                      "epoch": 0, "epoch_step": None}
        self._seed = 0

    @property
    def tracked_names(self) -> list[str]:
        return [t.name for t in self._tracked]

    def state_bytes(self) -> int:
        """Bytes of accumulator state held by this rank."""
        return S.state_dict_bytes(self._states)

    def _setup(self, args, state, model) -> None:
        if self._tracked:
            n = self._meta["num_samples"]
            # A second train() restarts global_step at 0: continuing would mix two time axes.
            logger.warning("ImportanceCallback: train() called again; restarting importance (discarding %d samples)", n)
        if self._collector is not None:
            self._collector.remove()
        self._reset_state()
        self._seed = int(getattr(args, "seed", 0))
        self._tracked = find_tracked_weights(model, self.config.target_modules, self.config.exclude_modules)
        if self.scorer.needs_grad:
            frozen = [t.name for t in self._tracked if not t.param.requires_grad]
            if frozen:
                raise ValueError(
                    f"criterion {self.config.criterion!r} needs weight gradients, but {len(frozen)} tracked weights are "
                    f"frozen (e.g. {frozen[0]}; LoRA freezes base weights): use criterion='wanda' or 'temporal_magnitude'"
                )
        D.check_supported(model, args, needs_grad=self.scorer.needs_grad, criterion=self.config.criterion)
        per_rank = self.scorer.source != "activations"
        self._plan = D.OwnershipPlan.build({t.name: t.param for t in self._tracked}, per_rank=per_rank)
        dtype = torch.float32 if not per_rank else getattr(torch, self.config.state_dtype)
        for t in self._tracked:
            if self._plan.holds(t.name):
                device = "cpu" if self.offload_to_cpu else t.param.device
                shape = self.scorer.state_shape(D.local_tensor(t.param) if per_rank else t.param)
                self._states[t.name] = torch.zeros(shape, dtype=dtype, device=device)
        self._meta["max_steps"] = int(state.max_steps)
        self._meta["epoch"] = int(state.epoch or 0)  # epochs completed (resumed runs start past 0)
        self._meta["window_start"] = self._window_start(state)
        if not per_rank:
            if getattr(args, "torch_compile", False) or hasattr(model, "_orig_mod"):
                # Dynamo skips module-hook guards by default, so a graph compiled (for this model class) before the hooks
                # existed would be reused without them. Guarding on hooks recompiles only graphs whose hooks changed.
                torch._dynamo.config.skip_nnmodule_hook_guards = False
            self._collector = ActivationCollector(model, self._tracked, self.scorer.statistic,
                                                  device=lambda name: self._states[name].device)
            self._collector.register()

    def _window_start(self, state) -> int | None:
        """First step (or epoch) whose sample counts: only the last `window` samples of the planned run do.

        Because the end of training is known (`state.max_steps`), samples before the window are simply not
        taken: the window costs no memory beyond the one buffer.
        """
        k = self.config.window
        if k is None:
            return None
        if self.config.per_epoch:
            if state.num_train_epochs >= sys.maxsize:  # Trainer's value for a dataset without __len__
                raise ValueError(
                    "window with per_epoch=True needs the number of epochs, but the train dataset has no length "
                    "(IterableDataset): use every_n_steps with window, or per_epoch without window"
                )
            return max(1, int(state.num_train_epochs) - k + 1)
        n = self.config.every_n_steps
        last = (int(state.max_steps) // n) * n
        return max(n, last - (k - 1) * n)

    def _samples_at(self, t: int) -> bool:
        start = self._meta["window_start"]
        return t % self.config.every_n_steps == 0 and (start is None or t >= start)

    def _samples_step(self, t: int) -> bool:
        # Resumed from checkpoint-max_steps, the Trainer still runs one more step (max_steps + 1): not a sample.
        return t <= self._meta["max_steps"] and self._samples_at(t)

    # --------------------------------------------------------------------------------------- sampling
    def _record_sample(self, t: int, step: int) -> None:
        self._meta["num_samples"] += 1
        self._meta["weight_sum"] += float(t)
        self._meta["last_step"] = step

    def _owned(self) -> list[TrackedWeight]:
        return [t for t in self._tracked if t.name in self._states]

    def _commit_activations(self, t: int) -> None:
        sums, tokens = self._collector.pop()
        if not self._collector.active:
            return
        if not sums:  # fail at the first such step rather than at the end ("no training tokens")
            raise RuntimeError(
                f"ImportanceCallback({self.config.criterion!r}): step {t} was sampled but none of the "
                f"{len(self._tracked)} forward hooks on the tracked modules fired. Was the forward run outside "
                "the modules (a compiled graph cached before the hooks were added, a replaced forward)?"
            )
        names = list(sums)
        bad = self.config.skip_nonfinite and not all(bool(torch.isfinite(sums[n]).all()) for n in names)
        if D.any_rank(bad):  # every rank skips the same samples, so their counts stay equal
            self._meta["skipped"] += 1
            logger.warning("ImportanceCallback: non-finite activations at step %d; sample skipped", t)
            return
        with torch.no_grad():
            self.scorer.update_([self._states[n] for n in names], [sums[n] for n in names], None, t)
        for n in names:
            self._meta["tokens"][n] = self._meta["tokens"].get(n, 0) + tokens[n]
        self._record_sample(t, t)

    def _sample(self, t: int, step: int, use_grads: bool) -> None:
        owned = self._owned()
        grads = None
        if use_grads:
            owned = [tw for tw in owned if tw.param.grad is not None]
            grads = [D.local_tensor(tw.param.grad.detach()) for tw in owned]
        weights = [D.local_tensor(tw.param.detach()) for tw in owned]
        # The sample reads gradients or weights: either going NaN/Inf (a diverged step) would poison every later score.
        bad = self._first_nonfinite(owned, grads if use_grads else weights)
        if D.any_rank(bad is not None):
            what = "gradient" if use_grads else "weight"
            where = f" ({bad})" if bad else " (on another rank)"
            if self.config.skip_nonfinite:
                self._meta["skipped"] += 1
                logger.warning("ImportanceCallback: non-finite %s at step %d%s; sample skipped", what, step, where)
                return
            logger.warning("ImportanceCallback: non-finite %s at step %d%s; kept (skip_nonfinite=False)", what, step,
                           where)
        states = [self._states[tw.name] for tw in owned]
        gen = None
        if states and states[0].dtype == torch.bfloat16:
            gen = torch.Generator().manual_seed(self._seed * 1_000_003 + int(t))  # CPU: offsets only, no sync
        with torch.no_grad():
            if self.offload_to_cpu:  # chunk by chunk, so only one chunk of weights is copied at a time
                for sl in chunks(weights):
                    w = [x.to("cpu", non_blocking=True) for x in weights[sl]]
                    g = [x.to("cpu", non_blocking=True) for x in grads[sl]] if grads is not None else None
                    self.scorer.update_(states[sl], w, g, t, gen)
            else:
                self.scorer.update_(states, weights, grads, t, gen)
        self._record_sample(t, step)

    @staticmethod
    def _first_nonfinite(owned: list[TrackedWeight], tensors: list[torch.Tensor]) -> str | None:
        """Name of the first tensor holding NaN/Inf (one fused norm per tensor, one host sync), else `None`."""
        if not tensors:
            return None
        finite = torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(tensors)])).cpu()
        return None if bool(finite.all()) else owned[int((~finite).nonzero()[0])].name

    # ------------------------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_hyper_param_search and state.trial_name is None:
            raise ValueError("ImportanceCallback under hyperparameter_search needs hp_name= so that each trial's "
                             "importance goes to its folder (e.g. hp_name=lambda trial: f'run-{trial.number}')")
        self._setup(args, state, model)
        if state.global_step > 0:
            self._restore(args, state)
        if self._distiller is not None:  # before the holder applies restored masks: the teacher is the dense model
            if state.global_step > 0 and self.distill.teacher is None:
                logger.warning("ImportanceCallback: resuming with distill and no DistillConfig(teacher=...): the teacher "
                               "is a copy of the resumed model, not of the model the run started from")
            prunes_base = self.schedule is not None or any(t.param.requires_grad for t in self._tracked)
            self._distiller.setup(model, prunes_base=prunes_base)
            self._distiller.install(model)
        if self.mask_holder is not None:
            if getattr(args, "load_best_model_at_end", False) and self.schedule.mode == "prune":
                logger.warning("ImportanceCallback: load_best_model_at_end with gradual pruning picks the lowest eval "
                               "loss, usually a checkpoint early in the ramp; the final masks are applied again to "
                               "whatever the Trainer loads at the end")
            self.mask_holder.setup(model, args, tracked_names=self.tracked_names, max_steps=int(state.max_steps),
                                   optimizer=kwargs.get("optimizer"))

    def on_step_begin(self, args, state, control, **kwargs):
        if self._collector is not None:
            self._collector.active = self._samples_step(state.global_step + 1)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = state.global_step + 1
        if self._collector is not None:
            self._commit_activations(t)
        elif self.scorer.source == "grads" and self._samples_step(t):
            self._sample(t, t, use_grads=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.mask_holder is not None:
            self.mask_holder.apply_masks_()  # pruned weights back to zero before anything reads them

    def on_step_end(self, args, state, control, **kwargs):
        t = state.global_step
        self._meta["global_step"] = t
        if self.scorer.source == "weights":
            if not self.config.per_epoch and self._samples_step(t):
                self._sample(t, t, use_grads=False)
            elif self.config.per_epoch and self._is_epoch_end(state, kwargs.get("train_dataloader")):
                # The last step of an epoch: sample now, so a checkpoint saved at this step holds the sample (a
                # resume from it never replays this epoch's on_epoch_end).
                self._sample_epoch(state)
        if self.mask_holder is not None and self.mask_holder.is_update_step(t):
            # `importance()` is a collective under DDP: every rank updates at the same steps.
            self.mask_holder.update_(self.importance(), t, int(state.max_steps))
            control.should_log = True  # report each update to the Trainer's loggers
        if control.should_save:
            self._stage(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.config.per_epoch:
            self._sample_epoch(state)
        if control.should_save:
            self._stage(args, state)

    @staticmethod
    def _is_epoch_end(state, dataloader) -> bool:
        # Only a dataset with a length has whole-number epochs at its epoch ends.
        return dataloader is not None and has_length(dataloader) and state.epoch == int(state.epoch or 0) > 0

    def _sample_epoch(self, state) -> None:
        """One sample per epoch end, t = epochs completed (a map-style epoch is sampled at its last step)."""
        if self._meta["epoch_step"] == state.global_step:
            return
        self._meta["epoch"] += 1
        self._meta["epoch_step"] = state.global_step
        if self._samples_at(self._meta["epoch"]):
            self._sample(self._meta["epoch"], state.global_step, use_grads=False)

    def log_values(self) -> dict[str, float]:
        """The scalars logged at each Trainer log step."""
        values = {"importance/samples": self._meta["num_samples"], "importance/skipped": self._meta["skipped"],
                  "importance/tracked_params": sum(t.param.numel() for t in self._tracked)}
        if self.mask_holder is not None:
            values.update(self.mask_holder.log_values())
        if self._distiller is not None:
            values.update(self._distiller.pop_logs())
        return values

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._logging or not self._tracked or self._logged_step == state.global_step:
            return
        if self.trainer is None:
            if self._logged_step is None:
                logger.info("ImportanceCallback: pass trainer= (or call .attach(trainer)) to send importance metrics "
                            "to the Trainer's loggers")
            self._logged_step = state.global_step
            return
        self._logged_step, self._logging = state.global_step, True
        try:  # our own log entry: every reporter (TensorBoard, W&B, log_history) sees it, in any callback order
            self.trainer.log(self.log_values())
        finally:
            self._logging = False

    def on_push_begin(self, args, state, control, **kwargs):
        # Called on the main process only, after checkpoint-N is written and before it is uploaded.
        self._publish_staged(args, state)

    def on_save(self, args, state, control, **kwargs):
        if self._stage_attempt == state.global_step:
            # Staged before the checkpoint (or that write already failed and was reported): never write twice.
            self._publish_staged(args, state)
            D.barrier()
            return
        folder = self._checkpoint_dir(args, state)
        if folder is None:
            logger.warning("ImportanceCallback: checkpoint-%d not found under %s", state.global_step,
                           self._output_dir(args, state))
            return
        self._save(os.path.join(folder, S.IMPORTANCE_DIR), state)

    def on_train_end(self, args, state, control, **kwargs):
        self._meta["global_step"] = state.global_step
        holder = self.mask_holder
        if holder is not None and holder.masks and not holder.weights_hold_masks():
            # `load_best_model_at_end` loaded a checkpoint from before the last mask update (usually early in the
            # ramp, where the loss is lowest): the model would be denser than the schedule says. Re-apply the masks.
            logger.warning("ImportanceCallback: the Trainer replaced the weights at the end of training (best checkpoint "
                           "%s); they do not hold the final masks (sparsity %.4f): the masks are applied again",
                           state.best_model_checkpoint, holder.sparsity)
            holder.apply_masks_()
        # Through the staging folder too: the Trainer's last checkpoint push may still be uploading output_dir,
        # and it skips "_*" but would pick up a half-written ".importance.tmp".
        out = self._output_dir(args, state)
        staging = os.path.join(out, STAGING_DIR)
        if self._save(staging, state, publish=False) and self._plan.rank == 0:
            S.publish(staging, os.path.join(out, S.IMPORTANCE_DIR))
        D.barrier()  # no rank reads output_dir/importance before rank 0 has renamed it into place
        self._staged_step = None
        if self._collector is not None:
            self._collector.remove()
        if self._distiller is not None:
            self._distiller.remove()

    # ------------------------------------------------------------------------------------------- output
    def _stage(self, args, state) -> None:
        """Write the importance of this step before the Trainer saves checkpoint-N (see `on_push_begin`)."""
        self._staged_step = None
        self._stage_attempt = state.global_step
        if self._save(os.path.join(self._output_dir(args, state), STAGING_DIR), state, publish=False):
            self._staged_step = state.global_step

    def _publish_staged(self, args, state) -> None:
        staged = os.path.join(self._output_dir(args, state), STAGING_DIR)
        if self._staged_step != state.global_step or self._plan.rank != 0 or not os.path.isdir(staged):
            return
        folder = self._checkpoint_dir(args, state)
        if folder is None:
            logger.warning("ImportanceCallback: checkpoint-%d not found under %s", state.global_step, args.output_dir)
            return
        S.publish(staged, os.path.join(folder, S.IMPORTANCE_DIR))

    @staticmethod
    def _output_dir(args, state) -> str:
        # A hyperparameter_search trial writes under output_dir/<hp_name(trial)> (`state.trial_name`).
        return os.path.join(args.output_dir, state.trial_name) if state.trial_name else args.output_dir

    def _checkpoint_dir(self, args, state) -> str | None:
        folder = os.path.join(self._output_dir(args, state), f"checkpoint-{state.global_step}")
        return folder if os.path.isdir(folder) else None

    def _full_meta(self) -> dict[str, Any]:
        meta = dict(self._meta, tokens=dict(self._meta["tokens"]))
        if self.scorer.source == "activations" and D.is_distributed():
            names = self.tracked_names
            meta["tokens"] = dict(zip(names, D.all_reduce_int([meta["tokens"].get(n, 0) for n in names])))
        if self.scorer.source == "final":
            meta["num_samples"], meta["last_step"] = 1, meta["global_step"]
        return meta

    def _export_tensors(self) -> dict[str, torch.Tensor]:
        """The buffers this rank writes: its own for per-rank criteria; for activations, the cross-rank sums."""
        if self.scorer.source == "final":
            owned = self._owned()
            with torch.no_grad():
                weights = [D.local_tensor(t.param.detach()) for t in owned]
                self.scorer.update_([self._states[t.name] for t in owned], weights, None, 0)
        if not self._plan.per_rank:
            return self._plan.summed(self._states)
        return dict(self._states)

    def _save(self, final_dir: str, state, publish: bool = True) -> bool:
        """Write the importance into `final_dir` (every rank takes part); returns whether it was written."""
        if not self._tracked:
            return False
        extra, masks = {}, None
        if self.mask_holder is not None:
            extra, masks = {"schedule": self.mask_holder.state_dict()}, self.mask_holder.masks
        error = S.write_importance(final_dir, self._export_tensors(), self._plan, config=self.config,
                                   meta=self._full_meta(), shapes=self._shapes(), extra=extra, masks=masks,
                                   publish=publish)
        if error is not None:
            what = final_dir if publish else f"the importance of checkpoint-{state.global_step} (staged in {final_dir})"
            msg = f"ImportanceCallback could not write {what}: {error}"
            if self.on_save_error == "raise":
                raise RuntimeError(msg + " (pass on_save_error='warn' to keep training)") from error
            logger.warning(msg)
        return error is None

    def _shapes(self) -> dict[str, list[int]]:
        return {t.name: list(t.param.shape) for t in self._tracked}

    # ------------------------------------------------------------------------------------------ resume
    def _restore(self, args, state) -> None:
        folder = self.resume_from or self._checkpoint_dir(args, state)
        try:
            if folder is None:
                raise S.ImportanceFileError(
                    f"resuming at step {state.global_step} but no checkpoint-{state.global_step} folder was found "
                    f"under {self._output_dir(args, state)}; pass ImportanceCallback(resume_from=...)"
                )
            imp = S.load_importance(folder)
            diff = self.config.diff(imp.config)
            if imp.meta.get("max_steps") != self._meta["max_steps"] and self.config.window is not None:
                diff["max_steps (sets the window)"] = (self._meta["max_steps"], imp.meta.get("max_steps"))
            if diff:
                shown = ", ".join(f"{k}: checkpoint {b!r} -> now {a!r}" for k, (a, b) in diff.items())
                raise S.ImportanceFileError(f"the importance config changed since {imp.path}: {shown}")
            if imp.shapes != self._shapes():
                raise S.ImportanceFileError(f"{imp.path} tracks other weights than this model ({len(imp.shapes)} vs "
                                            f"{len(self._tracked)}): was the model or target_modules changed?")
        except S.ImportanceFileError as e:
            if self.on_resume_mismatch == "restart":
                logger.warning("ImportanceCallback: %s; restarting importance from zero (on_resume_mismatch='restart')", e)
                return
            raise ValueError(
                f"Cannot resume importance: {e} (resume from another checkpoint, or pass "
                "ImportanceCallback(on_resume_mismatch='restart') to restart the importance from zero)"
            ) from None
        keep_sums = self._plan.per_rank or self._plan.rank == 0  # activation sums: restore once, on rank 0
        for name, buf in self._states.items():
            if keep_sums:
                saved = imp.state(name)
                if name in self._plan.rows:  # FSDP2: only this rank's rows, whatever layout wrote the file
                    offset, rows = self._plan.rows[name]
                    saved = saved[offset : offset + rows]
                buf.copy_(saved.to(buf.device))
        meta = {k: imp.meta[k] for k in ("num_samples", "weight_sum", "last_step", "skipped", "epoch", "epoch_step")
                if k in imp.meta}
        meta["tokens"] = dict(imp.meta.get("tokens", {})) if keep_sums else {}
        self._meta.update(meta, global_step=state.global_step)
        if self.mask_holder is not None:
            saved = S.load_meta(imp.path).get("schedule")
            masks = S.load_schedule_masks(imp.path) if saved and saved.get("has_masks") else {}
            self.mask_holder.load_state_dict(saved, masks)
        logger.info("ImportanceCallback: restored %d samples from %s", self._meta["num_samples"], imp.path)

    # ------------------------------------------------------------------------------------------ results
    def importance(self) -> Importance:
        """The importance so far, in memory, bound to the model's weights (collective under DDP / FSDP2).

        Returns:
            `Importance`: full (not sharded) buffers on every rank, the same type `load_importance` returns.

        Raises:
            RuntimeError: before `trainer.train()` has started.
        """
        if not self._tracked:
            raise RuntimeError("ImportanceCallback has not seen training yet (call trainer.train() first)")
        meta = self._full_meta()

        params = {t.name: t.param for t in self._tracked}

        def empty(name: str) -> torch.Tensor:
            return torch.empty(self.scorer.state_shape(params[name]), dtype=getattr(torch, self.config.state_dtype))

        tensors = self._plan.assemble(self._export_tensors(), self._shapes(), empty)
        weights = {t.name: t.param.detach() for t in self._tracked}
        return Importance(self.config, meta, self._shapes(), tensors.__getitem__, weights=weights)
