"""`PruneSchedule`: the configuration of gradual pruning during training, or of masks held during a recovery fine-tune.

A pure configuration with the pure schedule math (`resolve_steps`, `target_at`, `update_steps`); it does no I/O
(peft's rule for configs). Pass it to [`ImportanceCallback`] (`schedule=`); the runtime side (masks on the weights,
optimizer state, resume, the report) is [`MaskHolder`] in `holder.py`, which the callback drives and exposes as
`callback.mask_holder` (`callback.pruning_report(model)`).

Supported: single process, DDP (masks are computed from the importance, identical on every rank, at the same
steps), gradient accumulation, peft (masks on the frozen base weights). Not supported: DeepSpeed (the optimizer steps
inside `backward`, out of reach of callbacks) and FSDP (sharded parameters); both are refused at train begin.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import PruneConfig
from ..io_utils import JsonConfigMixin
from ..validation import check_modules, check_sparsity, structure_parts

SCHEDULE_MODES = ("prune", "hold")
RAMPS = ("cubic", "linear")
ORDERS = ("all", "depth")
# Fields that define the masks: a resumed run must agree on all of them.
_RESUME_KEYS = ("final_sparsity", "initial_sparsity", "start", "end", "every_n_steps", "ramp", "structure", "scope",
                "target_modules", "exclude_modules", "mode", "reconstruct", "dampening", "block_size",
                "pruned_stream", "refit_at", "cross_term", "cross_alpha", "cross_max_in_features", "order")
# Of those, the ones a 0.1 checkpoint does not record (tests/fixtures/release-0.1 resumes with their defaults).
_ADDED_AFTER_0_1 = ("pruned_stream", "refit_at", "cross_term", "cross_alpha", "cross_max_in_features", "order")
# What only the gradual mode reads (the ramp, the OBS updates, the statistics restarts): not recorded for a hold.
_PRUNE_ONLY = ("final_sparsity", "initial_sparsity", "start", "end", "every_n_steps", "ramp", "allow_collapse",
               "reconstruct", "block_size", "pruned_stream", "order")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_point(name: str, value: Any) -> float | int:
    if _is_int(value) and value >= 0:
        return value
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return value
    raise ValueError(f"{name} must be a float in [0, 1] (fraction of max_steps) or an int step >= 0; got {value!r}")


def _check_masks_from(path: str) -> None:
    """One-line refusal of a `masks_from` that cannot hold masks (at train begin, before any step)."""
    from ..files.safetensors_io import find_weights_file

    if not os.path.isdir(path):
        raise ValueError(f"masks_from={path!r} is not a folder: pass the pruned checkpoint's local folder "
                         "(download a Hub checkpoint first, e.g. huggingface_hub.snapshot_download)")
    if find_weights_file(path) is None:
        raise ValueError(f"masks_from={path!r} holds no model.safetensors (or model.safetensors.index.json): the masks "
                         "are read from a safetensors checkpoint; re-save it with save_pretrained(safe_serialization=True)")


def _to_step(value: float | int, max_steps: int) -> int:
    return value if _is_int(value) else round(value * max_steps)


@dataclass
class PruneSchedule(JsonConfigMixin):
    """Gradual pruning during training (or masks held during a recovery fine-tune), run by [`ImportanceCallback`].

    The target sparsity follows Zhu & Gupta 2017 (arXiv 1710.01878), with `p = (t - start) / (end - start)`:
    `s_t = s_f + (s_i - s_f) * (1 - p)^3` (`ramp="cubic"`) or `s_i + (s_f - s_i) * p` (`"linear"`). Masks are
    recomputed from the importance so far at `start`, every `every_n_steps` after it, and at `end`; they are held
    (re-applied after every optimizer step) until the end of training.

    Args:
        final_sparsity (`float`, *optional*):
            Target at `end`, in [0, 1). Required for `mode="prune"`; implied by an N:M `structure`.
        initial_sparsity (`float`, *optional*, defaults to 0.0):
            Target at `start`.
        start / end (`float` or `int`, *optional*, default to 0.0 / 0.75):
            Floats are fractions of `state.max_steps`, ints are step numbers. Step 0 has no importance yet: the first
            update happens at the first update step >= 1. Leave steps after `end` for the network to recover.
        every_n_steps (`int`, *optional*, defaults to 10):
            Optimizer steps between two mask updates.
        ramp (`str`, *optional*, defaults to `"cubic"`):
            `"cubic"` (prunes fast while many redundant weights remain) or `"linear"`.
        structure (`str`, *optional*, defaults to `"unstructured"`):
            `"unstructured"` or an N:M pattern such as `"2:4"` (at most `M-N` per group are pruned along the way,
            exactly N:M at `end`). `"neurons"`/`"heads"` are refused: shrinking layers mid-training would invalidate
            the optimizer and DDP buckets; prune structurally after training with `prune_`.
        scope (`str`, *optional*):
            `"global"`, `"layer"` or `"row"`, as in `PruneConfig`; `None` resolves from the importance's criterion
            (`"row"` for wanda) at every mask update. N:M is per tensor.
        target_modules / exclude_modules (*optional*):
            Prune only part of the tracked weights (peft rules, as in `PruneConfig`).
        mode (`str`, *optional*, defaults to `"prune"`):
            `"prune"`, or `"hold"`: recovery fine-tuning of a pruned checkpoint, its masks re-applied after every
            step and nothing further pruned (optionally with a re-fit of the kept weights, see `refit_at`).
        masks_from (`str`, *optional*):
            `"hold"` only: a pruned safetensors checkpoint folder, checked when training begins, before any step (it
            exists and holds `model.safetensors` or its index). Written by `save_pruned`: the masks are the zeros of the weights its
            `sparsity.json` lists. Pruned by another tool (no `sparsity.json`, e.g. llm-compressor): the masks are the
            zeros of the targeted weights (`target_modules` / `exclude_modules`, default every `nn.Linear` weight
            but `lm_head`), and the sparsity found is logged. Read from its safetensors files at train begin.
        allow_collapse (`bool`, *optional*, defaults to `False`):
            As in `PruneConfig`: by default a mask update that would prune a tensor to 100% stops training with an
            error naming the tensor.
        reconstruct (`bool`, *optional*):
            As in `PruneConfig`, with the same rule as `prune_`: `None` = whenever the importance is `sparsegpt`.
            Then every mask update runs SparseGPT's OBS sweep (Frantar & Alistarh 2023, arXiv 2301.00774) on the
            current weights with the input Hessians accumulated so far: the new masks come from the OBS saliency
            (weights pruned at earlier updates stay pruned and count towards the target) and the kept weights are
            updated to compensate. The Adam moments of the updated kept weights are kept (they are gradient
            statistics); those of pruned weights are zeroed (see [`MaskHolder`]). `True` without `sparsegpt`
            importance is refused when the callback is built; `False` gives mask-only updates. `"prune"` mode only.
        dampening (`float`, *optional*, defaults to 0.01) / block_size (`int`, *optional*, defaults to 128):
            The OBS sweep's, as in `PruneConfig`.
        pruned_stream (`bool`, *optional*):
            Restart the `sparsegpt` statistic at every mask change, so each later update (and the re-fit) reads only
            Hessians of the pruned model's inputs gathered since the previous mask change, the statistics a sequential
            calibration pass would compute. The importance the callback saves then also covers only those steps.
            `None` (the default): on exactly when `refit_at` is set. `"prune"` mode and `sparsegpt` importance only
            (a `"hold"` run's statistic is the pruned stream from its first step: there is nothing to restart).
        refit_at (`float` or `int`, *optional*):
            A step (int) or fraction of `max_steps` (float) after `end` at which the kept weights are re-fitted by
            least squares on their fixed support ([`prune.refit.refit_masked_`]) from the pruned-stream Hessians:
            the target is the current weights with every pruning edit undone (the pruned values and the OBS
            compensations, recorded at each update: one float32 copy of the masked weights). No mask changes; pruned
            weights stay zero. Needs `sparsegpt` importance sampled at some step after the last update (refused at train
            begin when the sampling plan takes none between them).

            With `mode="hold"` every training forward is already one of the pruned model, so the `sparsegpt`
            statistic gathered from the first step is the pruned-stream Hessian `H~`, and `refit_at` is any step >= 1
            (a fraction resolving to step 0 is refused at train begin). The edits are then the one-shot prune's,
            `W_dense - W_start`, the dense teacher's weight of the same Linear minus the held weight, taken at train
            begin: needs `ImportanceCallback(ImportanceConfig(criterion="sparsegpt"),
            distill=DistillConfig(teacher=<the dense model>))` (refused when the callback is built without them, and
            at train begin when a teacher's Linear has another shape than the student's, e.g. a structurally pruned
            student). The re-fit solves `argmin ||(W + W_dense - W_start) X~ - W_hat X~||^2` on each row's support:
            the prune's compensation redone from the pruned model's own inputs, what the kept weights learned since
            train begin kept (targeting `W_dense` alone would discard it). `H~` sums every sampled step since training
            began, so it mixes the inputs of the student as it fine-tuned; the steps after `refit_at` fine-tune the
            re-fitted weights as usual. A teacher in `teacher_dtype="bfloat16"` gives
            a bfloat16-rounded target.
        cross_term (`bool`, *optional*, defaults to `False`):
            Under distillation (`ImportanceCallback(distill=DistillConfig(...))`, refused without it): also gather
            the dense-to-pruned cross term `C = sum (x - x~) x~^T` from the teacher's and the student's forwards of
            the same batches (real tokens, the steps the `sparsegpt` statistic samples, restarted with it at every
            mask change, summed across ranks, checkpointed), and make the OBS updates and the re-fit solve the
            asymmetric objective `||W X - W_hat X~||^2` of GPTAQ (arXiv 2504.02692) / QEP (arXiv 2504.09629): the dense
            layer's output on the dense inputs, matched from the pruned inputs ([`prune.refit.propagate_target`]).
            Needs the pruned stream (`pruned_stream=True`, `refit_at` or `order="depth"`); with `mode="hold"`, where
            the re-fit is its only reader, `refit_at` (`W` is then the re-fit's target). Memory: one more `[in, in]` float32 matrix
            per distinct Linear input (q/k/v and gate/up share theirs), as much again as the `sparsegpt` statistic,
            plus the teacher's Linear inputs of one forward until the student consumes them.
        cross_alpha (`float`, *optional*, defaults to 0.25):
            Share of the correction applied, in [0, 1]: QEP's propagation strength (0.25 to 0.5 in the papers; 1.0 is
            the exact asymmetric solution, 0 the plain objective on `H~`). A training run corrects every layer at once
            from inputs taken before any correction, where the papers correct one layer at a time: on SmolLM2-135M
            at 70%, 0.5 raised the re-fitted model's perplexity 2.3x where 0.25 lowered it (`benchmarks/README.md`
            section 11), hence the papers' lower end.
        cross_max_in_features (`int`, *optional*):
            Skip the cross term of Linears with more inputs (e.g. Llama's `down_proj`, whose `intermediate^2` matrix is
            the largest): they keep the plain objective.
        order (`str`, *optional*, defaults to `"all"`):
            `"all"`: every targeted weight follows the ramp at every update. `"depth"`: decoder layers are pruned front
            to back, each once to `final_sparsity` at its own step, evenly spread over `start..end` (the last at `end`;
            weights outside numbered layers with the last), and every activation statistic restarts after each layer's
            mask, so layer `i`'s mask comes from inputs that went through layers `0..i-1` already pruned: the
            training-time counterpart of SparseGPT's sequential calibration pipeline. Needs an activation criterion
            (`sparsegpt` or `wanda`) sampled between consecutive layer steps, and `end - start` at least the number of
            layers; `every_n_steps`, `ramp` and `initial_sparsity` are not used.

    Raises:
        ValueError: an invalid field.
    """

    config_name = "prune_schedule.json"
    section = "schedule"

    final_sparsity: float | None = field(default=None, metadata={"help": "Sparsity reached at `end`."})
    initial_sparsity: float = field(default=0.0, metadata={"help": "Sparsity at `start`."})
    start: float | int = field(default=0.0, metadata={"help": "First update: fraction of max_steps or step."})
    end: float | int = field(default=0.75, metadata={"help": "Last update: fraction of max_steps or step."})
    every_n_steps: int = field(default=10, metadata={"help": "Steps between mask updates."})
    ramp: str = field(default="cubic", metadata={"help": "cubic | linear"})
    structure: str = field(default="unstructured", metadata={"help": "unstructured | N:M"})
    scope: str | None = field(default=None, metadata={"help": "global | layer | row"})
    target_modules: str | list[str] | None = field(default=None, metadata={"help": "Modules to prune."})
    exclude_modules: str | list[str] | None = field(default=None, metadata={"help": "Modules never pruned."})
    mode: str = field(default="prune", metadata={"help": "prune | hold"})
    masks_from: str | None = field(default=None, metadata={"help": "hold: pruned checkpoint holding the masks."})
    allow_collapse: bool = field(default=False, metadata={"help": "Allow a tensor to be pruned to 100%."})
    reconstruct: bool | None = field(default=None, metadata={"help": "OBS update of kept weights (sparsegpt)."})
    dampening: float = field(default=0.01, metadata={"help": "OBS dampening, fraction of mean diag(H)."})
    block_size: int = field(default=128, metadata={"help": "OBS block of columns."})
    pruned_stream: bool | None = field(default=None, metadata={"help": "Restart the Hessians at mask changes."})
    refit_at: float | int | None = field(default=None, metadata={"help": "Re-fit step (or fraction) after end."})
    cross_term: bool = field(default=False, metadata={"help": "Asymmetric OBS objective from the teacher's inputs."})
    cross_alpha: float = field(default=0.25, metadata={"help": "Share of the dense-to-pruned correction, [0, 1]."})
    cross_max_in_features: int | None = field(default=None, metadata={"help": "No cross term above this input."})
    order: str = field(default="all", metadata={"help": "all | depth (layers pruned front to back)"})

    def __post_init__(self):
        if self.mode not in SCHEDULE_MODES:
            raise ValueError(f"mode must be one of {SCHEDULE_MODES}; got {self.mode!r}")
        if self.mode == "hold" and self.reconstruct:
            raise ValueError("reconstruct=True needs mode='prune': mode='hold' only re-applies the masks of masks_from")
        if self.mode == "hold":
            if not self.masks_from:
                raise ValueError("mode='hold' needs masks_from= (the pruned checkpoint written by save_pruned)")
            self.masks_from = os.fspath(self.masks_from)
        elif self.masks_from is not None:
            raise ValueError("masks_from is only used with mode='hold'")
        if structure_parts(self.structure) or self.structure == "experts":
            raise ValueError(f"structure {self.structure!r} is not supported during training (it shrinks layers); "
                             "prune structurally after training with prune_(model, importance, PruneConfig(...))")
        sparsity = self.final_sparsity if self.mode == "prune" else None
        # PruneConfig validates structure / scope / modules with the same rules and messages.
        self._prune_config = PruneConfig(sparsity=sparsity, structure=self.structure, scope=self.scope,
                                         target_modules=self.target_modules, exclude_modules=self.exclude_modules,
                                         allow_collapse=self.allow_collapse, reconstruct=self.reconstruct,
                                         dampening=self.dampening, block_size=self.block_size)
        self.scope = self._prune_config.scope
        self.target_modules = check_modules("target_modules", self.target_modules)
        self.exclude_modules = check_modules("exclude_modules", self.exclude_modules)
        if self.mode == "prune":
            if self.final_sparsity is None and self._prune_config.nm is None:
                raise ValueError("final_sparsity is required for mode='prune' (a float in [0, 1))")
            self.final_sparsity = self._prune_config.sparsity
            self.initial_sparsity = check_sparsity("initial_sparsity", self.initial_sparsity)
            if self.initial_sparsity > self.final_sparsity:
                raise ValueError(f"initial_sparsity ({self.initial_sparsity}) must not exceed final_sparsity "
                                 f"({self.final_sparsity}): masks only shrink")
        self.start = _check_point("start", self.start)
        self.end = _check_point("end", self.end)
        if _is_int(self.end) and self.end == 1:
            # `end=1` reads as "the end of training" but an int is a step: every weight would be pruned at step 1.
            raise ValueError("end=1 is ambiguous: an int is a step (prune everything at step 1), a float a fraction of "
                             "max_steps; pass end=1.0 for the end of training, or a later step such as end=100")
        if _is_int(self.start) == _is_int(self.end) and self.start >= self.end:
            unit = "steps" if _is_int(self.start) else "fractions of max_steps"
            raise ValueError(f"start={self.start!r} must be before end={self.end!r} (both {unit}): the ramp runs from "
                             "start to end; swap them")
        if not _is_int(self.every_n_steps) or self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1; got {self.every_n_steps!r}")
        if self.ramp not in RAMPS:
            raise ValueError(f"ramp must be one of {RAMPS}; got {self.ramp!r}")
        self._check_stream()

    def _check_stream(self) -> None:
        if self.pruned_stream is not None and not isinstance(self.pruned_stream, bool):
            raise ValueError(f"pruned_stream must be a bool or None; got {self.pruned_stream!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}; got {self.order!r}")
        if self.order == "depth" and self.mode != "prune":
            raise ValueError("order='depth' needs mode='prune': a hold run prunes nothing")
        if self.order == "depth" and self.pruned_stream is False:
            raise ValueError("order='depth' restarts the statistics after each layer's mask: it needs pruned_stream "
                             "(True or None)")
        if self.refit_at is not None:
            self.refit_at = _check_point("refit_at", self.refit_at)
        self._check_cross()
        if self.refit_at is None:
            return
        if self.pruned_stream is False:
            raise ValueError("refit_at re-fits from the pruned model's Hessians: it needs pruned_stream (True or None)")
        if self.mode == "hold":
            if self.refit_at == 0:  # 0 or 0.0: nothing has been gathered at step 0
                raise ValueError("refit_at=0: at step 0 no pruned-stream sample exists yet; re-fit at a step >= 1 (an "
                                 "int) or a fraction of max_steps (a float), after the Hessians have been gathered")
            return
        if _is_int(self.refit_at) == _is_int(self.end) and self.refit_at <= self.end:
            raise ValueError(f"refit_at={self.refit_at!r} must be after end={self.end!r}: the Hessians of the final "
                             "masks are gathered after the last mask update")

    def _check_cross(self) -> None:
        if not isinstance(self.cross_term, bool):
            raise ValueError(f"cross_term must be a bool; got {self.cross_term!r}")
        if isinstance(self.cross_alpha, bool) or not isinstance(self.cross_alpha, (int, float)) \
                or not 0.0 <= self.cross_alpha <= 1.0:
            raise ValueError(f"cross_alpha must be a float in [0, 1] (GPTAQ / QEP use 0.25 to 0.5); got {self.cross_alpha!r}")
        if self.cross_max_in_features is not None and (not _is_int(self.cross_max_in_features)
                                                       or self.cross_max_in_features < 1):
            raise ValueError(f"cross_max_in_features must be an int >= 1 or None; got {self.cross_max_in_features!r}")
        if self.cross_term and self.mode == "hold":
            if self.refit_at is None:  # a hold run has no mask update: the re-fit is the cross term's only reader
                raise ValueError("cross_term with mode='hold' feeds the re-fit only: pass refit_at=... too")
        elif self.cross_term and not self.restarts_statistics:
            raise ValueError("cross_term needs the pruned stream (pruned_stream=True, refit_at=... or order='depth'): "
                             "the cross term pairs the pruned model's inputs since the last mask change with the teacher's")

    @property
    def restarts_statistics(self) -> bool:
        """Whether the statistics restart at every mask change (`pruned_stream`, or implied by `refit_at` or
        `order="depth"`)."""
        implied = self.refit_at is not None or self.order == "depth"
        return self.mode == "prune" and (self.pruned_stream or (self.pruned_stream is None and implied))

    def layer_steps(self, max_steps: int, num_groups: int) -> list[int]:
        """`order="depth"`: the step at whose end each of `num_groups` layer groups is pruned, front to back.

        Evenly spread over `max(start, 1)..end`, the last at `end`: group `i` at `t0 + ceil((i + 1) * span / n)`.

        Raises:
            ValueError: fewer steps in `start..end` than groups (two layers would share a step).
        """
        t0, t1 = self.resolve_steps(max_steps)
        span = t1 - t0
        if span < num_groups:
            raise ValueError(f"PruneSchedule(order='depth'): {num_groups} layer groups need at least {num_groups} steps "
                             f"in start..end (steps {t0}..{t1}); widen start..end or raise max_steps")
        return [t0 + -(-(i + 1) * span // num_groups) for i in range(num_groups)]

    def refit_step(self, max_steps: int) -> int | None:
        """The step at whose end the kept weights are re-fitted, or `None` without `refit_at`.

        Raises:
            ValueError: the step is past `max_steps`, or not after the last mask update (`"prune"`), or step 0
                (`"hold"`).
        """
        if self.refit_at is None:
            return None
        step = _to_step(self.refit_at, max_steps)
        if self.mode == "hold":
            if not 1 <= step <= max_steps:
                raise ValueError(f"PruneSchedule(mode='hold'): refit_at={self.refit_at!r} is step {step}, which must be "
                                 f"in 1..max_steps ({max_steps}): step 0 has no pruned-stream sample yet")
            return step
        end = self.resolve_steps(max_steps)[1]
        if not end < step <= max_steps:
            raise ValueError(f"PruneSchedule: refit_at={self.refit_at!r} (step {step}) must be after the last mask update "
                             f"(end, step {end}) and at most max_steps ({max_steps}): no pruned-stream sample before it")
        return step

    @property
    def prune_config(self) -> PruneConfig:
        """The [`PruneConfig`] of the final masks (structure, scope, modules), as `prune_` would use."""
        return self._prune_config

    @property
    def nm(self) -> tuple[int, int] | None:
        return self._prune_config.nm

    def check_masks_from(self) -> None:
        """Refuse, in one line, a `"hold"` schedule's `masks_from` that is not a folder holding safetensors weights
        (called by the callback when training begins, before any step; nothing to check in `"prune"` mode).

        Raises:
            ValueError: `masks_from` is missing, not a folder, or holds no `model.safetensors` (or its index).
        """
        if self.mode == "hold":
            _check_masks_from(self.masks_from)

    def to_dict(self) -> dict[str, Any]:
        """
        Returns:
            `dict[str, Any]`: the fields this mode uses, JSON-serialisable; a `"hold"` schedule leaves out the
            gradual-only ones (`final_sparsity`, `start`, `end`, `every_n_steps`, `ramp`, ...), which it never reads.
        """
        fields = super().to_dict()
        return {k: v for k, v in fields.items() if k not in _PRUNE_ONLY} if self.mode == "hold" else fields

    def diff(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Fields that define the masks and differ from a saved `to_dict()`: `{name: (saved, now)}`.

        A field added after release 0.1 that the saved dict lacks counts as its default (what 0.1 did); a missing
        field that 0.1 already wrote means the dict predates it, a change. Only the fields this mode records are
        compared: a `"hold"` checkpoint of an earlier version also holds the gradual-only ones, which it never read.
        """
        now = self.to_dict()
        keys = [k for k in _RESUME_KEYS if k in now]
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in _ADDED_AFTER_0_1}
        old = {k: saved.get(k, defaults.get(k)) for k in keys}
        return {k: (old[k], now[k]) for k in keys if old[k] != now[k]}

    # ------------------------------------------------------------------------------------------- the schedule
    def resolve_steps(self, max_steps: int) -> tuple[int, int]:
        """The steps the ramp runs between, for a run of `max_steps` optimizer steps.

        Args:
            max_steps (`int`): the run's optimizer steps (`TrainerState.max_steps`).

        Returns:
            `tuple[int, int]`: `(start_step, end_step)`; a fraction `start`/`end` is rounded to a step.

        Raises:
            ValueError: not `0 <= start_step < end_step <= max_steps` (one line with both steps).
        """
        t0, t1 = _to_step(self.start, max_steps), _to_step(self.end, max_steps)
        if not 0 <= t0 < t1 <= max_steps:
            raise ValueError(f"PruneSchedule: start={self.start!r} (step {t0}) and end={self.end!r} (step {t1}) must "
                             f"satisfy 0 <= start < end <= max_steps ({max_steps})")
        return t0, t1

    def target_at(self, step: int, max_steps: int) -> float:
        """The sparsity the schedule asks for at `step`.

        Args:
            step (`int`): an optimizer step of the run, 0-based count of completed steps.
            max_steps (`int`): the run's optimizer steps.

        Returns:
            `float`: the target sparsity in [0, 1]: 0 before `start`, then the `ramp` from `initial_sparsity` to
            `final_sparsity`, which it holds from `end` on.

        Raises:
            ValueError: as [`resolve_steps`].
        """
        t0, t1 = self.resolve_steps(max_steps)
        if step < t0:
            return 0.0
        p = min(1.0, (step - t0) / (t1 - t0))
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        if self.ramp == "linear":
            return s_i + (s_f - s_i) * p
        return s_f + (s_i - s_f) * (1.0 - p) ** 3

    def update_steps(self, max_steps: int) -> list[int]:
        """The steps at whose end the masks are recomputed.

        Args:
            max_steps (`int`): the run's optimizer steps.

        Returns:
            `list[int]`: increasing steps in `[max(start_step, 1), end_step]`, every `every_n_steps` from `start_step`
            and always `end_step`.

        Raises:
            ValueError: as [`resolve_steps`].
        """
        t0, t1 = self.resolve_steps(max_steps)
        return [t for t in range(max(t0, 1), t1 + 1) if (t - t0) % self.every_n_steps == 0 or t == t1]
