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
  into `checkpoint-N/importance/`. Saves decided later (`save_strategy="best"`) are written in `on_save`. Every file
  is written and read by `checkpoint.TrainingCheckpoint` (`self.checkpoint`).
- `on_log`: importance scalars go to the Trainer's loggers through `trainer.log` (pass `trainer=` or `attach`).
- `on_train_end`: write `output_dir/importance/`.
- throughout: `recovery.TrainingCounter` counts the optimizer steps and real tokens of the run (`training_record()`).
"""

from __future__ import annotations

import functools
import logging

import torch
from transformers import TrainerCallback

from ..collect.accumulator import ImportanceAccumulator
from ..collect.cross import CrossTerm
from ..collect.importance import Importance
from ..config import ImportanceConfig
from ..moe import find_weights
from .checkpoint import STAGING_DIR, TrainingCheckpoint
from .distill import DistillConfig
from .distiller import Distiller
from .holder import MaskHolder
from .recovery import TrainingCounter
from .schedule import PruneSchedule
from .stream import check_refit_sample

logger = logging.getLogger(__name__)

SAVE_ERROR_CHOICES = ("raise", "warn")
RESUME_MISMATCH_CHOICES = ("raise", "restart")
__all__ = ["STAGING_DIR", "ImportanceCallback"]  # STAGING_DIR: the folder name, defined by `checkpoint`


class ImportanceCallback(TrainerCallback):
    """Accumulate per-parameter importance while a `transformers.Trainer` trains.

    Args:
        config (`ImportanceConfig` or `dict`, *optional*): what to track; defaults to `ImportanceConfig()`.
        schedule (`PruneSchedule`, *optional*): prune gradually during training (masks held after each step).
        distill (`DistillConfig`, *optional*): distil from a dense teacher while training (default teacher: a frozen
            copy of the model as training begins), so quality recovers while the schedule prunes (logits KL, plus
            SquareHead's hidden-state loss with `hidden_weight > 0`: Kurtic et al. 2023, arXiv 2310.06927). With
            `PruneSchedule(mode="hold")` pass the dense model as `teacher`. The default copy is written once before
            the first checkpoint to `output_dir/_distill-teacher[-<name>]/` (the teacher's parameter bytes) so that
            `resume_from_checkpoint` distils from the same teacher; see [`DistillConfig`]. Logged per step (through
            `attach`): `distill/kl`, `distill/ce` and, with `hidden_weight > 0`, `distill/hidden` (rank 0's values).
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

    Several callbacks on one Trainer (e.g. one per criterion) need distinct `ImportanceConfig(name=...)`: each writes
    `importance-<name>/`; two callbacks writing the same folder are refused at train begin. Without a `config`,
    importance is tracked only when there is nothing else to do: with `schedule=PruneSchedule(mode="hold", ...)` the
    callback only holds the masks, and with `distill=` alone (`ImportanceCallback(distill=...)`: the recovery of a
    structurally pruned model) it only distils. Then no statistic is gathered (no hooks but the teacher's, no
    per-step scoring, no state, no importance files; `importance()` raises). Pass a `config` to also track importance
    while holding or distilling.

    Raises:
        ValueError: an invalid choice, `per_epoch=True` with a criterion that does not read weights, `distill`
            without a `teacher` beside `PruneSchedule(mode="hold")`, or `PruneSchedule(mode="hold", refit_at=...)`
            without a `sparsegpt` `config` and `distill` (its re-fit targets the teacher's weights; a teacher whose
            Linears have other shapes is refused at train begin).
        TypeError: `config`, `schedule` or `distill` of the wrong type.
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
        if schedule is not None and not isinstance(schedule, PruneSchedule):
            raise TypeError(f"schedule must be a PruneSchedule; got {type(schedule).__name__}")
        if distill is not None and not isinstance(distill, DistillConfig):
            raise TypeError(f"distill must be a DistillConfig; got {type(distill).__name__}")
        # Holding another run's masks, or distilling into an already pruned model, needs no importance: unless a config
        # asks for it, nothing is tracked.
        only_holds = schedule is not None and schedule.mode == "hold"
        only_distils = schedule is None and distill is not None
        self.tracks_importance = config is not None or not (only_holds or only_distils)
        self.config = config if config is not None else ImportanceConfig()
        self.accumulator = ImportanceAccumulator(self.config, offload_to_cpu=offload_to_cpu)
        if self.config.per_epoch and self.scorer.source != "weights":
            reads = ("only the weights at the end of training (nothing to sample per epoch)"
                     if self.scorer.source == "final" else f"{self.scorer.source} during steps")
            raise ValueError(f"per_epoch=True samples the weights at each epoch end (temporal_magnitude); criterion "
                             f"{self.config.criterion!r} reads {reads}: use every_n_steps instead")
        if on_save_error not in SAVE_ERROR_CHOICES:
            raise ValueError(f"on_save_error must be one of {SAVE_ERROR_CHOICES}; got {on_save_error!r}")
        if on_resume_mismatch not in RESUME_MISMATCH_CHOICES:
            raise ValueError(f"on_resume_mismatch must be one of {RESUME_MISMATCH_CHOICES}; got {on_resume_mismatch!r}")
        if distill is not None and distill.teacher is None and schedule is not None and schedule.mode == "hold":
            raise ValueError("distill with PruneSchedule(mode='hold') needs DistillConfig(teacher=...): the model being "
                             "trained is already pruned, so pass the dense model (or its path) as the teacher")
        if schedule is not None and schedule.mode == "hold" and schedule.refit_at is not None and (
                config is None or distill is None):
            raise ValueError("PruneSchedule(mode='hold', refit_at=...) re-fits the kept weights from the Hessians of "
                             "the pruned model towards the dense model's: pass ImportanceCallback(ImportanceConfig("
                             "criterion='sparsegpt'), distill=DistillConfig(teacher=<the dense model or its path>))")
        if schedule is not None and schedule.cross_term and distill is None:
            raise ValueError("PruneSchedule(cross_term=True) pairs the teacher's and the student's inputs of each batch: "
                             "pass ImportanceCallback(distill=DistillConfig(...))")
        self.schedule = schedule
        self.distill = distill
        self._distiller = Distiller(distill) if distill is not None else None
        self.mask_holder = MaskHolder(schedule, criterion=self.config.criterion) if schedule is not None else None
        self.on_save_error = on_save_error
        self.on_resume_mismatch = on_resume_mismatch
        self.resume_from = resume_from
        self.offload_to_cpu = offload_to_cpu
        self.counter = TrainingCounter(self.config.name)
        self.checkpoint = TrainingCheckpoint(self.config, self.accumulator, self.mask_holder, self._distiller,
                                             on_save_error=on_save_error, on_resume_mismatch=on_resume_mismatch,
                                             resume_from=resume_from)
        if self.config.name and not getattr(type(self), "_callback_name", None):
            # transformers' `CallbackHandler.add_callback` warns about a duplicate when a callback's class is already
            # on the Trainer (it compares `__class__`, not instances): each name gets its own subclass, so one
            # callback per criterion (the documented setup) adds distinct classes. Two callbacks of one name still
            # share a class: that warning then comes with the refusal at train begin.
            self.__class__ = _named_class(type(self), self.config.name)
        self.trainer = None
        if trainer is not None:
            self.attach(trainer)
        self._logging = False
        self._logged_step: int | None = None

    def attach(self, trainer) -> ImportanceCallback:
        """Add this callback to `trainer` (once) and log importance metrics through `trainer.log`; returns self."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # ------------------------------------------------------------------------------------------ state
    @property
    def scorer(self):
        return self.accumulator.scorer

    @property
    def tracked_names(self) -> list[str]:
        return self.accumulator.names

    def state_bytes(self) -> int:
        """Bytes of accumulator state held by this rank."""
        return self.accumulator.state_bytes()

    @property
    def importance_dir(self) -> str:
        """Folder name of this callback's importance in checkpoints and `output_dir` (`importance[-<name>]`)."""
        return self.checkpoint.importance_dir

    @property
    def staging_dir(self) -> str:
        """Folder name (under `output_dir`) where a checkpoint's importance is staged before the Trainer saves."""
        return self.checkpoint.staging_dir

    @property
    def teacher_dir(self) -> str:
        """Folder name (under `output_dir`) of the default distillation teacher saved for resuming."""
        return self.checkpoint.teacher_dir

    # ------------------------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_hyper_param_search and state.trial_name is None:
            raise ValueError("ImportanceCallback under hyperparameter_search needs hp_name= so that each trial's "
                             "importance goes to its folder (e.g. hp_name=lambda trial: f'run-{trial.number}')")
        if self.tracks_importance:
            self.checkpoint.claim(state, self)
        if self.schedule is not None:  # configs do no I/O: the hold schedule's folder is checked here, before any step
            self.schedule.check_masks_from()
        self.accumulator.setup(model, args, state, track=self.tracks_importance)
        self.counter.start(model, state, kwargs.get("processing_class"))
        if self.schedule is not None and self.schedule.cross_term:  # before the restore, which fills it
            self.accumulator.cross = CrossTerm.from_tracked(self.accumulator.tracked,
                                                            max_in_features=self.schedule.cross_max_in_features)
        if state.global_step > 0 and self.tracks_importance:
            self.checkpoint.restore(args, state)
        if self.mask_holder is not None and self.tracks_importance:  # a mask update before any sample: refused now
            self.mask_holder.check_first_sample(
                self.config, step=state.global_step, samples=self.accumulator.meta["num_samples"],
                first_sample=self.accumulator.first_sample_step(state.global_step), max_steps=int(state.max_steps))
            check_refit_sample(self.schedule, int(state.max_steps), self.accumulator.first_sample_step,
                               per_epoch=self.config.per_epoch)
        if self._distiller is not None:  # before the holder applies restored masks: the teacher is the dense model
            # Whether the base weights change: those the importance would track (found here when it tracks none).
            linears = self.accumulator.tracked if self.tracks_importance else find_weights(model)
            prunes_base = self.schedule is not None or any(t.param.requires_grad for t in linears)
            self.checkpoint.teacher_saved = False
            if state.global_step > 0 and self._distiller.copies_model(model, prunes_base):
                # The Trainer loaded the checkpoint's (pruned) weights before this event: a copy now would be another
                # teacher. Distil from the dense copy the run saved at its first checkpoint instead.
                self.checkpoint.restore_teacher(args, state)
            self._distiller.setup(model, prunes_base=prunes_base)
            self._distiller.install(model)
            if self.accumulator.cross is not None:  # after install: the teacher runs before these hooks read it
                self.accumulator.cross.attach(model, self._distiller.teacher)
        if self.mask_holder is not None:
            if getattr(args, "load_best_model_at_end", False) and self.schedule.mode == "prune":
                logger.warning("ImportanceCallback: load_best_model_at_end with gradual pruning picks the lowest eval "
                               "loss, usually a checkpoint early in the ramp; the final masks are applied again to "
                               "whatever the Trainer loads at the end")
            self.mask_holder.setup(model, args, tracked_names=self.tracked_names, max_steps=int(state.max_steps),
                                   optimizer=kwargs.get("optimizer"))
            if self._distiller is not None:  # a hold re-fit's edits; a teacher of other shapes is refused here
                self.mask_holder.take_hold_edits_(self._distiller.teacher, self.tracked_names)

    def on_step_begin(self, args, state, control, **kwargs):
        self.accumulator.set_sampling(self.accumulator.samples_step(state.global_step + 1))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = state.global_step + 1
        if self.accumulator.collector is not None:
            self.accumulator.commit_activations(t)
        elif self.scorer.source == "grads" and self.accumulator.samples_step(t):
            self.accumulator.sample(t, t, use_grads=True)
        self.accumulator.commit_units(t, kwargs.get("model"))  # ImportanceConfig(units=True); gradients present

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.mask_holder is not None:
            self.mask_holder.apply_masks_()  # pruned weights back to zero before anything reads them

    def on_step_end(self, args, state, control, **kwargs):
        t = state.global_step
        self.accumulator.step_end(state, kwargs.get("train_dataloader"))
        self.counter.step_end(state, control)  # before the Trainer saves its state
        meta = self.accumulator.meta
        if self.mask_holder is not None and self.mask_holder.due(t, samples=meta["num_samples"], skipped=meta["skipped"]):
            # `solve_statistics` is a collective under DDP: every rank updates at the same steps.
            self.mask_holder.update_(self.accumulator.solve_statistics, t, int(state.max_steps), self._cross_terms)
            if self.schedule.restarts_statistics:  # later updates read only the pruned model's inputs
                self.accumulator.restart()
            control.should_log = True  # report each update to the Trainer's loggers
        if self.mask_holder is not None and self.mask_holder.is_refit_step(t):
            self.mask_holder.refit_(self.accumulator.solve_statistics, t, self._cross_terms)
        if control.should_save:
            self.checkpoint.save_teacher(args, state)
            self.checkpoint.stage(args, state)

    def _cross_terms(self, owners: dict[str, int] | None = None):
        """`PruneSchedule(cross_term=True)`: the cross terms summed across ranks (collective; with `owners`, onto the
        rank that solves each weight only, [`CrossTerm.terms`]: what the holder's solves read), else `None`."""
        return self.accumulator.cross.terms(owners) if self.accumulator.cross is not None else None

    def on_epoch_end(self, args, state, control, **kwargs):
        self.accumulator.sample_epoch(state)
        if control.should_save:
            self.checkpoint.save_teacher(args, state)
            self.checkpoint.stage(args, state)

    # Score elements sampled per log step over all tracked weights (each tensor in proportion to its size); a model
    # with fewer tracked weights is summarised exactly. 2**16 samples put a fraction within +-0.4% (2 sigma); measured
    # 11-36 ms (median) per log step on the 134M benchmark model (wanda, temporal_magnitude, sparsegpt; CPU, one
    # thread, a shared 2-core box; 2**18 took 140-470 ms). Nothing is computed between log steps.
    log_sample_size = 1 << 16

    def log_values(self) -> dict[str, float]:
        """
        The scalars logged at each Trainer log step (computed only then, from a sample of the scores).

        Returns:
            `dict[str, float]`: when it tracks importance, `importance/samples` and `importance/skipped` (samples
            taken and skipped as non-finite), then per module type (`q_proj`, `o_proj`, `down_proj`, ...: the last component of the
            module name) `importance/<type>/mean` (mean score) and `importance/<type>/frac_below` (fraction of its
            weights under the one threshold that would prune the fraction `s` of all tracked weights; `s` is the
            schedule's current target, else 0.5). A `frac_below` far from `s` means that type's scores do not compare
            with the others' (1.0: a global threshold would prune it whole). With a [`PruneSchedule`]:
            `pruning/target_sparsity` and `pruning/sparsity` (achieved); with `distill=`, the distillation losses.
            2 + 2 * types (+ 2) scalars: 16 (18) for Llama's 7 projection types, 10 (12) for Phi-3's 4.
            Multi-process: the summary covers the weights this rank holds. With `ImportanceConfig(name=...)` every
            key carries the name after its first part (`importance/<name>/samples`, `pruning/<name>/sparsity`,
            `distill/<name>/ce`), so the curves of several callbacks stay apart in TensorBoard and W&B.
        """
        meta, values = self.accumulator.meta, {}
        if self.tracks_importance:
            values.update({"importance/samples": meta["num_samples"], "importance/skipped": meta["skipped"]})
            target = 0.5
            if self.mask_holder is not None and self.mask_holder.target_sparsity > 0:
                target = self.mask_holder.target_sparsity
            with torch.no_grad():
                values.update(self.accumulator.summary(target, self.log_sample_size))
        if self.mask_holder is not None:
            values.update(self.mask_holder.log_values())
        if self._distiller is not None:
            values.update(self._distiller.pop_logs())
        return self._named(values)

    def _named(self, values: dict[str, float]) -> dict[str, float]:
        """A named callback's keys carry its name after their first part (`importance/<name>/samples`,
        `pruning/<name>/sparsity`, `distill/<name>/kl`): several callbacks on one Trainer draw separate curves."""
        name = self.config.name
        if not name:
            return values
        named = {}
        for key, value in values.items():
            head, _, tail = key.partition("/")
            named[f"{head}/{name}/{tail}"] = value
        return named

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._logging or self._logged_step == state.global_step or not (
                self.accumulator.tracked or self.mask_holder is not None or self._distiller is not None):
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

    def on_evaluate(self, args, state, control, **kwargs):
        self.counter.fold(state)  # a save_strategy="best" save is decided after this, before the state is written

    def on_push_begin(self, args, state, control, **kwargs):
        # Called on the main process only, after checkpoint-N is written and before it is uploaded.
        self.checkpoint.publish_staged(args, state)

    def on_save(self, args, state, control, **kwargs):
        self.checkpoint.on_save(args, state)
        self.counter.saved(args, state)  # a save decided after on_step_end: the counts are written now

    def on_train_end(self, args, state, control, **kwargs):
        self.accumulator.meta["global_step"] = state.global_step
        holder = self.mask_holder
        if holder is not None and holder.pending_step is not None:
            logger.warning("ImportanceCallback: the mask update due at step %d never ran: the importance took no "
                           "sample by the end of training (every sample skipped as non-finite?)", holder.pending_step)
        if holder is not None and holder.masks and not holder.weights_hold_masks():
            # `load_best_model_at_end` loaded a checkpoint from before the last mask update (usually early in the
            # ramp, where the loss is lowest): the model would be denser than the schedule says. Re-apply the masks.
            logger.warning("ImportanceCallback: the Trainer replaced the weights at the end of training (best checkpoint "
                           "%s); they do not hold the final masks (sparsity %.4f): the masks are applied again",
                           state.best_model_checkpoint, holder.sparsity)
            holder.apply_masks_()
        self.checkpoint.save_final(args, state)
        self.accumulator.remove_hooks()
        self.counter.stop(state)
        if self._distiller is not None:
            self._distiller.remove()

    # ------------------------------------------------------------------------------------------ results
    def pruning_report(self, model, importance: Importance | None = None):
        """A [`PruningReport`] of the schedule's current masks, for `save_pruned(model, out, report=...)`.

        Args:
            model (`nn.Module`): the trained model; the report is measured from its weights (`weight != 0`).
            importance ([`Importance`], *optional*): recorded as the report's `importance` source (e.g.
                `callback.importance()`).

        Returns:
            [`PruningReport`]: per masked weight its shape and sparsity, and the global figures.

        Raises:
            ValueError: this callback has no `schedule`, or no mask update has happened yet.
        """
        if self.mask_holder is None:
            raise ValueError("This ImportanceCallback has no schedule: pass ImportanceCallback(schedule=PruneSchedule(...))")
        return self.mask_holder.report(model, importance)

    def training_record(self) -> dict[str, int]:
        """How long the training ran, measured while it ran, for `save_pruned(..., training=...)` (collective under DDP).

        Returns:
            `dict[str, int]`: `steps` (optimizer steps) and `tokens` (real input tokens of the training forwards, summed
            over processes, as `include_num_input_tokens_seen="non_padding"` counts them, see `recovery.real_tokens`),
            of the whole run across `resume_from_checkpoint` (the counts ride in each checkpoint's `trainer_state.json`).

        Raises:
            RuntimeError: no optimizer step has run yet.
            ValueError: the run resumed from a checkpoint that holds no counts (written without them).
        """
        return self.counter.record()

    def importance(self) -> Importance:
        """The importance so far, in memory, bound to the model's weights (collective under DDP / FSDP2).

        Returns:
            `Importance`: full (not sharded) buffers on every rank, the same type `load_importance` returns.

        Raises:
            RuntimeError: before `trainer.train()` has started.
        """
        if not self.tracks_importance:
            raise RuntimeError("This ImportanceCallback tracks no importance (a hold schedule or distill= without "
                               "config); pass ImportanceCallback(config, ...) to track it while holding or distilling")
        if not self.accumulator.tracked:
            raise RuntimeError("ImportanceCallback has not seen training yet (call trainer.train() first)")
        return self.accumulator.importance()


@functools.cache
def _named_class(base: type, name: str) -> type:
    """`base` (an `ImportanceCallback` class) for callbacks of `ImportanceConfig(name=name)`: a subclass adding
    nothing but its name (shown in the Trainer's callback list as `ImportanceCallback[name]`)."""
    return type(base)(f"{base.__name__}[{name}]", (base,), {
        "__module__": base.__module__, "__qualname__": f"{base.__qualname__}[{name}]", "_callback_name": name,
        "__doc__": base.__doc__, "__reduce_ex__": _reduce_named})


def _reduce_named(self, protocol):
    # Pickled by reference the generated class would not be found: rebuild it from its base and name.
    base = type(self).__mro__[1]
    return _new_named, (base, type(self)._callback_name), self.__dict__


def _new_named(base: type, name: str):
    return object.__new__(_named_class(base, name))
