"""`PruneSchedule`: prune gradually while the Trainer trains, or hold the masks of a pruned model (recovery).

Lifecycle, driven by [`ImportanceCallback`] (`schedule=`):
- `on_train_begin`: resolve `start`/`end` to steps, find the weights to prune; on resume take the masks stored in
  the checkpoint, in `"hold"` mode read them from the pruned checkpoint (`masks_from`); apply them.
- `on_optimizer_step`: re-apply the masks right after `optimizer.step()`, so pruned weights are exactly zero at every
  forward, at every weight sample of the importance, and in every checkpoint.
- `on_step_end` (after the importance sampled this step): at each mask update, compute the schedule's sparsity
  `s_t` from the importance so far, zero the optimizer state of newly pruned weights, and ask the Trainer to log.
- `state_dict` / `save_masks` / `load_state_dict`: counters go to `importance_config.json` ("schedule"), masks to
  `masks.safetensors` beside the importance, so a resumed run is identical to an uninterrupted one.

Masks only shrink: a pruned weight stays pruned (its score is taken as `-inf` at later updates), the usual
gradual-pruning behaviour (Zhu & Gupta 2017). That also makes every update prune exactly its target count.
Masks are held as `bool` tensors beside the weights (1 byte per pruned-tensor element on every rank).

Supported: single process, DDP (masks are computed from the importance, identical on every rank, at the same
steps), gradient accumulation, peft (masks on the frozen base weights). Not supported: DeepSpeed (the optimizer steps
inside `backward`, out of reach of callbacks) and FSDP (sharded parameters); both are refused.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import masks as M
from . import state as S
from .config import PruneConfig, _check_modules, _check_sparsity
from .matching import find_tracked_weights, module_matches

logger = logging.getLogger(__name__)

SCHEDULE_MODES = ("prune", "hold")
RAMPS = ("cubic", "linear")
# Fields that define the masks: a resumed run must agree on all of them.
_RESUME_KEYS = ("final_sparsity", "initial_sparsity", "start", "end", "every_n_steps", "ramp", "structure", "scope",
                "target_modules", "exclude_modules", "mode")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_point(name: str, value: Any) -> float | int:
    if _is_int(value) and value >= 0:
        return value
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return value
    raise ValueError(f"{name} must be a float in [0, 1] (fraction of max_steps) or an int step >= 0; got {value!r}")


def _to_step(value: float | int, max_steps: int) -> int:
    return value if _is_int(value) else round(value * max_steps)


def nm_capped_mask(score: Tensor, sparsity: float, n: int, m: int) -> Tensor:
    """Keep-mask pruning the `num_to_prune(numel, sparsity)` lowest scores, at most `m - n` in each group of `m`.

    At `sparsity = 1 - n/m` it is exactly the N:M mask; below, a gradual step towards it (lowest scores first,
    lower flat index first on ties).
    """
    keys = score.detach().float().reshape(-1, m)
    cand = torch.argsort(keys, dim=1, stable=True)[:, : m - n]  # the m - n lowest of each group
    cand_scores = torch.gather(keys, 1, cand).reshape(-1)
    k = min(M.num_to_prune(score.numel(), sparsity), cand_scores.numel())
    # Stable sort of (score, flat index) so ties go to the lower flat index, as in `masks`.
    flat = (cand + torch.arange(keys.shape[0], device=keys.device)[:, None] * m).reshape(-1)
    order = torch.argsort(flat)
    chosen = order[torch.argsort(cand_scores[order], stable=True)[:k]]
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    mask[flat[chosen]] = False
    return mask.reshape(score.shape)


@dataclass
class PruneSchedule:
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
            `"global"` (default for unstructured), `"layer"` or `"row"`, as in `PruneConfig`. N:M is per tensor.
        target_modules / exclude_modules (*optional*):
            Prune only part of the tracked weights (peft rules, as in `PruneConfig`).
        mode (`str`, *optional*, defaults to `"prune"`):
            `"prune"`, or `"hold"`: recovery fine-tuning of a pruned checkpoint, its masks re-applied after every
            step and nothing further pruned.
        masks_from (`str`, *optional*):
            `"hold"` only: the pruned checkpoint (written by `save_pruned`); the masks are the zeros of the weights
            its `sparsity.json` lists, read from its safetensors files.
    """

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

    def __post_init__(self):
        if self.mode not in SCHEDULE_MODES:
            raise ValueError(f"mode must be one of {SCHEDULE_MODES}; got {self.mode!r}")
        if self.mode == "hold":
            if not self.masks_from:
                raise ValueError("mode='hold' needs masks_from= (the pruned checkpoint written by save_pruned)")
            self.masks_from = os.fspath(self.masks_from)
        elif self.masks_from is not None:
            raise ValueError("masks_from is only used with mode='hold'")
        if self.structure in ("neurons", "heads"):
            raise ValueError(f"structure {self.structure!r} is not supported during training (it shrinks layers); "
                             "prune structurally after training with prune_(model, importance, PruneConfig(...))")
        sparsity = self.final_sparsity if self.mode == "prune" else None
        # PruneConfig validates structure / scope / modules with the same rules and messages.
        self._prune_config = PruneConfig(sparsity=sparsity, structure=self.structure, scope=self.scope,
                                         target_modules=self.target_modules, exclude_modules=self.exclude_modules)
        self.scope = self._prune_config.scope
        self.target_modules = _check_modules("target_modules", self.target_modules)
        self.exclude_modules = _check_modules("exclude_modules", self.exclude_modules)
        if self.mode == "prune":
            if self.final_sparsity is None and self._prune_config.nm is None:
                raise ValueError("final_sparsity is required for mode='prune' (a float in [0, 1))")
            self.final_sparsity = self._prune_config.sparsity
            self.initial_sparsity = _check_sparsity("initial_sparsity", self.initial_sparsity)
            if self.initial_sparsity > self.final_sparsity:
                raise ValueError(f"initial_sparsity ({self.initial_sparsity}) must not exceed final_sparsity "
                                 f"({self.final_sparsity}): masks only shrink")
        self.start = _check_point("start", self.start)
        self.end = _check_point("end", self.end)
        if not _is_int(self.every_n_steps) or self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1; got {self.every_n_steps!r}")
        if self.ramp not in RAMPS:
            raise ValueError(f"ramp must be one of {RAMPS}; got {self.ramp!r}")
        self._reset()

    def _reset(self) -> None:
        self._masks: dict[str, Tensor] = {}
        self._params: dict[str, torch.nn.Parameter] = {}
        self._optimizer = None
        self._restored: dict[str, Tensor] | None = None
        self._steps: tuple[int, int] | None = None
        self._update_set: set[int] = set()
        self.sparsity = 0.0  # achieved, over the pruned tensors
        self.target_sparsity = 0.0
        self.last_update_step: int | None = None
        self.num_updates = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------------------------------- the schedule
    def resolve_steps(self, max_steps: int) -> tuple[int, int]:
        """`(start_step, end_step)` for a run of `max_steps` optimizer steps."""
        t0, t1 = _to_step(self.start, max_steps), _to_step(self.end, max_steps)
        if not 0 <= t0 < t1 <= max_steps:
            raise ValueError(f"PruneSchedule: start={self.start!r} (step {t0}) and end={self.end!r} (step {t1}) must "
                             f"satisfy 0 <= start < end <= max_steps ({max_steps})")
        return t0, t1

    def target_at(self, step: int, max_steps: int) -> float:
        """Sparsity the schedule asks for at `step` (0 before `start`)."""
        t0, t1 = self.resolve_steps(max_steps)
        if step < t0:
            return 0.0
        p = min(1.0, (step - t0) / (t1 - t0))
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        if self.ramp == "linear":
            return s_i + (s_f - s_i) * p
        return s_f + (s_i - s_f) * (1.0 - p) ** 3

    def update_steps(self, max_steps: int) -> list[int]:
        """Steps at whose end the masks are recomputed."""
        t0, t1 = self.resolve_steps(max_steps)
        return [t for t in range(max(t0, 1), t1 + 1) if (t - t0) % self.every_n_steps == 0 or t == t1]

    @property
    def masks(self) -> dict[str, Tensor]:
        """Current keep-masks (`True` = keep) by canonical parameter name; empty before the first update."""
        return dict(self._masks)

    def report(self, model: torch.nn.Module, importance=None):
        """A [`PruningReport`] of the current masks, for `save_pruned(model, out, report=...)`."""
        from .pruner import PruningReport

        if not self._masks:
            raise ValueError("PruneSchedule has no masks yet (no update has happened)")
        tensors = {n: {"shape": list(m.shape), "numel": m.numel(), "sparsity": M.mask_sparsity(m)}
                   for n, m in self._masks.items()}
        zeros = sum(m.numel() - int(m.count_nonzero()) for m in self._masks.values())
        info = {}
        if importance is not None:
            info = {"path": importance.path, "step": importance.step, "num_samples": importance.num_samples,
                    "criterion": importance.criterion}
        return PruningReport(
            structure=self.structure, scope=self.scope, target_sparsity=self.target_sparsity,
            criterion=importance.criterion if importance is not None else "unknown", tensors=tensors,
            global_sparsity=self.sparsity, model_sparsity=zeros / sum(p.numel() for p in model.parameters()),
            importance=info)

    # ------------------------------------------------------------------------------------------ callback API
    def on_train_begin(self, cb, args, state, model, optimizer=None) -> None:
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise ValueError("PruneSchedule does not support DeepSpeed or FSDP (the optimizer state and weights are "
                             "sharded or stepped out of reach of callbacks); use DDP, or prune after training")
        restored, self._restored = self._restored, None
        if restored is None:  # a fresh run (or a second train() call): start from dense
            self._reset()
        self._optimizer = optimizer
        linear = {t.name: t.param for t in find_tracked_weights(model, ".*")}
        if self.mode == "prune":
            steps = self.resolve_steps(int(state.max_steps))
            if self._steps is not None and self._steps != steps:
                raise ValueError(f"PruneSchedule: the checkpoint's schedule ran over steps {self._steps}, now {steps} "
                                 "(max_steps changed?); resume with the same max_steps")
            self._steps = steps
            self._update_set = set(self.update_steps(int(state.max_steps)))
            names = [n for n in cb.tracked_names if self._selected(n)]
            if not names:
                raise ValueError("PruneSchedule: no tracked weight is selected: check target_modules/exclude_modules")
        else:
            from .export import load_sparsity

            names = list(load_sparsity(self.masks_from).get("tensors") or {})
            if not names:
                raise ValueError(f"{self.masks_from}/sparsity.json lists no pruned tensors: nothing to hold")
        missing = [n for n in names if n not in linear]
        if missing:
            raise ValueError(f"PruneSchedule: {len(missing)} weights to mask are not nn.Linear weights of this model "
                             f"(e.g. {missing[0]})")
        self._params = {n: linear[n] for n in names}
        if restored is not None:
            if restored and set(restored) != set(names):
                raise ValueError("PruneSchedule: the checkpoint's masks cover other weights than this model's")
            self._masks = {n: restored[n].to(self._params[n].device) for n in names}
        elif self.mode == "hold":
            from .export import load_masks

            self._masks = {n: m.to(self._params[n].device) for n, m in load_masks(self.masks_from).items()}
            self._record(None, state.global_step)
        self._check_shapes()
        self.apply_masks_()
        self._zero_optimizer_state()

    def on_optimizer_step(self, cb, args, state) -> None:
        self.apply_masks_()

    def on_step_end(self, cb, args, state, control=None) -> None:
        t = state.global_step
        if self.mode != "prune" or t not in self._update_set:
            return
        target = self.target_at(t, int(state.max_steps))
        imp = cb.importance()  # collective under DDP: every rank updates at the same steps
        self._masks = self._compute_masks(imp, target)
        self.apply_masks_()
        self._zero_optimizer_state()
        self._record(target, t)
        logger.info("PruneSchedule: step %d, sparsity %.4f (target %.4f)", t, self.sparsity, target)
        if control is not None:
            control.should_log = True  # report each update to the Trainer's loggers

    def log_values(self) -> dict[str, float]:
        return {"pruning/sparsity": self.sparsity, "pruning/target_sparsity": self.target_sparsity}

    def state_dict(self) -> dict[str, Any]:
        """JSON counters; the masks themselves are written by `save_masks`."""
        return {"config": self.to_dict(), "sparsity": self.sparsity, "target_sparsity": self.target_sparsity,
                "last_update_step": self.last_update_step, "num_updates": self.num_updates,
                "steps": list(self._steps) if self._steps else None, "has_masks": bool(self._masks)}

    def save_masks(self, directory: str) -> None:
        if self._masks:
            S.write_masks(directory, self._masks)

    def load_state_dict(self, state: dict[str, Any] | None, directory: str | None = None) -> None:
        if not state:
            raise ValueError("Cannot resume PruneSchedule: the checkpoint holds no schedule state (it was written "
                             "without a schedule); start a new run or resume without schedule=")
        saved = state.get("config", {})
        diff = {k: (saved.get(k), v) for k, v in self.to_dict().items() if k in _RESUME_KEYS and saved.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: checkpoint {a!r} -> now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"Cannot resume PruneSchedule: the schedule changed since the checkpoint: {shown}")
        self.sparsity, self.target_sparsity = float(state["sparsity"]), float(state["target_sparsity"])
        self.last_update_step, self.num_updates = state["last_update_step"], int(state["num_updates"])
        self._steps = tuple(state["steps"]) if state.get("steps") else None
        # An empty dict still marks the schedule as resumed (before its first update).
        self._restored = S.read_masks(directory) if state.get("has_masks") else {}

    # -------------------------------------------------------------------------------------------- internals
    def _selected(self, name: str) -> bool:
        module = name.rsplit(".", 1)[0]
        return ((self.target_modules is None or module_matches(module, self.target_modules))
                and not module_matches(module, self.exclude_modules))

    def _record(self, target: float | None, step: int) -> None:
        zeros = sum(m.numel() - int(m.count_nonzero()) for m in self._masks.values())
        numel = sum(m.numel() for m in self._masks.values())
        self.sparsity = zeros / max(numel, 1)
        self.target_sparsity = self.sparsity if target is None else target
        self.last_update_step = step
        self.num_updates += 1

    @torch.no_grad()
    def _compute_masks(self, imp, sparsity: float) -> dict[str, Tensor]:
        names = list(self._params)

        def score(name: str) -> Tensor:
            s = imp.score(name).float()
            old = self._masks.get(name)
            # Already pruned weights score -inf: they are pruned first, so masks only shrink.
            return s if old is None else s.masked_fill(~old.to(s.device), -math.inf)

        cfg = self._prune_config
        if cfg.nm is not None:
            return {n: nm_capped_mask(score(n), sparsity, *cfg.nm) for n in names}
        if cfg.scope == "global":
            thr = M.compute_global_threshold(lambda: ((n, score(n)) for n in names), sparsity)
            return {n: thr.mask(n, score(n)) for n in names}
        build = M.unstructured_mask if cfg.scope == "layer" else M.row_mask
        return {n: build(score(n), sparsity) for n in names}

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Zero the pruned weights (in place)."""
        for name, mask in self._masks.items():
            M.apply_mask_(self._params[name], mask)

    @torch.no_grad()
    def _zero_optimizer_state(self) -> None:
        """Zero Adam's moments (any per-element state) of pruned weights, so they hold no stale momentum."""
        opt = self._optimizer
        while hasattr(opt, "optimizer"):  # accelerate's AcceleratedOptimizer
            opt = opt.optimizer
        if opt is None:
            return
        for name, mask in self._masks.items():
            param = self._params[name]
            for value in opt.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value.masked_fill_(~mask, 0)

    def _check_shapes(self) -> None:
        for name, mask in self._masks.items():
            if tuple(mask.shape) != tuple(self._params[name].shape):
                raise ValueError(f"PruneSchedule: mask of {name} has shape {tuple(mask.shape)}, the model's weight "
                                 f"{tuple(self._params[name].shape)}: masks from another model?")
