"""`MaskHolder`: the runtime side of a [`PruneSchedule`], driven by [`ImportanceCallback`].

Lifecycle:
- `setup` (train begin): resolve the schedule's steps, find the weights to prune (or, in `"hold"` mode, read the
  masks of the pruned checkpoint), take the masks restored from a resumed checkpoint, apply them.
- `apply_masks_` (right after every `optimizer.step()`): pruned weights are exactly zero at every forward, at every
  weight sample of the importance, and in every checkpoint.
- `update_` (end of an update step, after the importance sampled it): masks for the schedule's current target from
  the importance so far, through the one plan (`plan.PruningPlan`); the optimizer's per-element state (Adam moments)
  of newly pruned weights is zeroed. With `sparsegpt` importance and the reconstruction rule of `prune_`
  (`PruneConfig.reconstruct`, `None` = whenever the Hessians exist), the update is the plan's OBS edits instead
  (`PruningPlan.edit`): SparseGPT's OBS sweep (`obs.sparsegpt_prune_`) on the current weights with the Hessians so
  far, the earlier masks forced, so the new masks come from the OBS saliency and the kept weights are updated.
- `refit_` (end of the `refit_at` step): least-squares re-fit of the kept weights on their fixed support from the
  pruned-stream Hessians (`prune.refit.refit_masked_`), towards the current weights with every pruning edit undone.
  The edits (pruned values and OBS compensations, `before - after` of each update) are summed per weight from the
  first update on, only when `refit_at` is set: one float32 copy of the masked weights (`stream.pending_edits`).
  In `"hold"` mode the edits are the one-shot prune's, dense teacher minus held weights, taken by the callback at
  train begin (`stream.hold_edits`).
- `state_dict` / `load_state_dict`: JSON counters, masks and pending edits, beside every checkpoint's importance.

Masks only shrink: a pruned weight stays pruned (it ranks lowest at later updates), the usual gradual-pruning
behaviour (Zhu & Gupta 2017), which also makes every update prune exactly its target count. Masks are `bool` tensors
beside the weights (1 byte per pruned-tensor element on every rank).

Optimizer state after an OBS update: the Adam moments of pruned weights are zeroed, those of the kept weights the
sweep moved are kept unchanged. They are running gradient statistics, still about the right scale after a small
weight correction; zeroing them while Adam's step count (and so its bias correction) stays would make the next
steps of those weights about `(1 - beta1) / sqrt(1 - beta2)` times the learning rate (3.2 for the defaults), where a
settled Adam step is at most about one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..io_utils import plural
from ..matching import TrackedWeight, select_names
from ..moe import ExpertSlice, find_weights
from ..prune.masks import apply_mask_, check_nm_shapes
from ..prune.plan import PruningPlan, uses_obs
from ..prune.pruner import refuse_tied
from ..prune.refit import usable_cross
from ..prune.report import PruningReport
from ..scorers import SCORERS, get_scorer
from .schedule import PruneSchedule
from .stream import CrossTerms, held_masks, hold_edits, layer_groups, own_weights, sweep_, sweep_costs, teacher_weights
from .stream import refit_ as stream_refit_
from .stream import warn_if_not_pruned as warn_unpruned

logger = logging.getLogger(__name__)


class MaskHolder:
    """Keep-masks held on a model's weights while it trains, following a [`PruneSchedule`].

    Args:
        schedule (`PruneSchedule`): the configuration (pure; this object holds the runtime state).
        criterion (`str`, *optional*): the importance criterion that will drive the updates, when known; a schedule
            that asks for `reconstruct=True` without `sparsegpt` is then refused here, before training. Criteria that
            read gradients or activations have no score before their first sample: a mask update due before it is
            refused at train begin when the sampling plan says so ([`check_first_sample`]), and otherwise (the
            samples so far were skipped as non-finite) waits for the first sample ([`due`]).

    Raises:
        ValueError: `reconstruct=True` with a `criterion` other than `sparsegpt`.

    Attributes:
        masks (`dict[str, Tensor]`): current keep-masks (`True` = keep) by canonical parameter name.
        params (`dict[str, nn.Parameter]`): the masked weights.
        sparsity (`float`): achieved sparsity over the masked weights; `target_sparsity` what the schedule asked.
        reconstruction (`str` or `None`): `"OBS"` once an update has reconstructed the kept weights.
        solves (`dict[str, int]`): the OBS sweeps and re-fits this process ran, by weight; under DDP each weight's
            are its owner's only (logged per rank at each update and re-fit).
    """

    def __init__(self, schedule: PruneSchedule, *, criterion: str | None = None):
        if not isinstance(schedule, PruneSchedule):
            raise TypeError(f"schedule must be a PruneSchedule; got {type(schedule).__name__}")
        if criterion is not None and schedule.mode == "prune":
            uses_obs(criterion, schedule.prune_config)  # the one-line refusal of prune_, before the first step
        scorer = get_scorer(criterion) if criterion is not None else None
        if scorer is not None and schedule.order == "depth" and scorer.source != "activations":
            raise ValueError(f"PruneSchedule(order='depth') restarts the pruned model's input statistics after each "
                             f"layer: track an activation criterion ('sparsegpt' or 'wanda'), not {criterion!r}")
        needs_h = schedule.cross_term or schedule.refit_at is not None or (
            schedule.restarts_statistics and schedule.order != "depth")
        if scorer is not None and needs_h and not scorer.has_hessian:
            what = "cross_term" if schedule.cross_term else "refit_at" if schedule.refit_at is not None else "pruned_stream"
            raise ValueError(f"PruneSchedule({what}=...) needs the input Hessians of the pruned model: track "
                             f"ImportanceConfig(criterion='sparsegpt'), not {criterion!r}")
        self.schedule = schedule
        self.criterion = criterion  # the callback's, for `report` when no update ran in this process (a resume)
        # Gradient and activation statistics have nothing to score before their first sample; weight criteria fall
        # back to |w| (temporal_magnitude) or read the weights only at the end (magnitude).
        source = SCORERS[criterion].source if criterion in SCORERS else None
        self.needs_sample = source in ("grads", "activations")
        self._falls_back = source == "weights"
        self._reset()

    def _reset(self) -> None:
        self.masks: dict[str, Tensor] = {}
        self.params: dict[str, nn.Parameter] = {}
        self._slices: dict[str, ExpertSlice] = {}
        self.optimizer = None
        self.sparsity = self.target_sparsity = 0.0
        self.last_update_step: int | None = None
        self.scope: str | None = None  # resolved at the first update (a None scope follows the criterion)
        # The importance that chose the current masks (the last update's): what `report` records as their source.
        self.source: Any = None
        self.held_record: dict[str, Any] = {}  # `"hold"`: the sparsity.json of the prune that chose the held masks
        self.num_updates = 0
        self.reconstruction: str | None = None
        self._steps: tuple[int, int] | None = None
        self._update_set: set[int] = set()
        self.pending_step: int | None = None  # an update step that found no sample: the update waits for one
        self._restored: dict[str, Tensor] | None = None  # masks of a resumed checkpoint, until `setup` takes them
        # `refit_at`: the sum of every update's edits (weights before minus after), float32 per masked weight.
        self._edits: dict[str, Tensor] = {}
        self._refit_step: int | None = None
        self.refitted_at: int | None = None  # the step the re-fit ran at (checkpointed: a resume does not repeat it)
        self._groups: dict[int, list[str]] = {}  # order="depth": the weights pruned at each layer step
        self.solves: dict[str, int] = {}  # OBS sweeps and re-fits this process ran, by weight (its owner's, under DDP)

    # ---------------------------------------------------------------------------------------------- lifecycle
    def setup(self, model: nn.Module, args, *, tracked_names: list[str], max_steps: int, optimizer=None) -> None:
        """Train begin: find the weights to mask, take restored or `masks_from` masks, apply them.

        Raises:
            ValueError: a backend whose weights or optimizer the callbacks cannot reach (DeepSpeed, FSDP), no weight
                selected, weights that are not `nn.Linear` of this model, tied weights, or masks of another model.
        """
        if D.backend(model, args) not in ("single", "ddp"):
            raise ValueError("PruneSchedule does not support DeepSpeed or FSDP (the optimizer state and weights are "
                             "sharded or stepped out of reach of callbacks); use DDP, or prune after training")
        restored, self._restored = self._restored, None
        if restored is None:  # a fresh run (or a second train() call): start from dense
            self._reset()
        self.optimizer = optimizer
        cfg = self.schedule
        weights = find_weights(model, ".*")
        # a Linear's own Parameter (the optimizer's key); an expert slice's view, its fused parameter kept in _slices
        linear = {t.name: t.param if isinstance(t, TrackedWeight) else t.weight() for t in weights}
        self._slices = {t.name: t for t in weights if isinstance(t, ExpertSlice)}
        self._refit_step = cfg.refit_step(max_steps)
        if cfg.mode == "prune":
            steps = cfg.resolve_steps(max_steps)
            if self._steps is not None and self._steps != steps:
                raise ValueError(f"PruneSchedule: the checkpoint's schedule ran over steps {self._steps}, now {steps} "
                                 "(max_steps changed?); resume with the same max_steps")
            self._steps = steps
            self._update_set = set(cfg.update_steps(max_steps))
            if cfg.order == "depth":
                groups = layer_groups(select_names(tracked_names, cfg.target_modules, cfg.exclude_modules))
                self._groups = dict(zip(cfg.layer_steps(max_steps, len(groups)), groups))
                self._update_set = set(self._groups)
            if len(self._update_set) == 1 and cfg.initial_sparsity < cfg.final_sparsity and cfg.order == "all":
                logger.warning("PruneSchedule: one mask update (step %d of %d, start..end = steps %d..%d, every_n_steps="
                               "%d): this is one-shot pruning, not gradual; lower every_n_steps or widen start..end",
                               min(self._update_set), max_steps, *steps, cfg.every_n_steps)
            names = select_names(tracked_names, cfg.target_modules, cfg.exclude_modules)
        else:
            held, self.held_record = held_masks(model, cfg)  # and what chose them, for `report`
            names = list(held)
        missing = [n for n in names if n not in linear]
        if missing:
            raise ValueError(f"PruneSchedule: {plural(len(missing), 'weight')} to mask "
                             f"{'is not an nn.Linear weight or expert slice' if len(missing) == 1 else 'are not nn.Linear weights or expert slices'} "
                             f"of this model (e.g. {missing[0]})")
        self.params = {n: linear[n] for n in names}
        refuse_tied(model, self.params, names)
        if cfg.nm is not None:  # the same one-line refusal as prune_, before the first step
            check_nm_shapes({n: list(p.shape) for n, p in self.params.items()}, *cfg.nm)
        if restored is not None:
            if restored and set(restored) != set(names):
                raise ValueError("PruneSchedule: the checkpoint's masks cover other weights than this model's")
            self.masks = {n: restored[n].to(self.params[n].device) for n in restored}
            self._edits = {n: e.to(self.params[n].device, torch.float32) for n, e in self._edits.items()}
        elif cfg.mode == "hold":
            self.masks = {n: m.to(self.params[n].device) for n, m in held.items()}
            warn_unpruned(self.params, self.masks, cfg.masks_from)
            self._record(None, 0)
        for name, mask in self.masks.items():
            if tuple(mask.shape) != tuple(self.params[name].shape):
                raise ValueError(f"PruneSchedule: mask of {name} has shape {tuple(mask.shape)}, the model's weight "
                                 f"{tuple(self.params[name].shape)}: masks from another model?")
        self.apply_masks_()
        self.zero_optimizer_state_()
        if restored and self._refit_step is not None and not (self.refitted_at or self._edits):
            logger.warning("PruneSchedule: the checkpoint was written by an older hf-weightprune that did not save the "
                           "pruning edits the re-fit at step %d undoes: that re-fit is skipped", self._refit_step)
            self._refit_step = None

    def is_update_step(self, step: int) -> bool:
        return self.schedule.mode == "prune" and step in self._update_set

    def check_first_sample(self, config, *, step: int, samples: int, first_sample: int | None, max_steps: int) -> None:
        """Train begin: refuse, in one line, a schedule whose next mask update comes before the importance's first
        sample, when the sampling plan (`every_n_steps`, `window`, a resumed count) makes that certain.

        Args:
            config (`ImportanceConfig`): the importance's settings, named in the message.
            step (`int`): the step training begins at (`state.global_step`; > 0 on resume).
            samples (`int`): samples the importance holds now (restored ones on resume).
            first_sample (`int` or `None`): the first step after `step` the importance plans to sample, `None` if none.
            max_steps (`int`): the run's optimizer steps.

        Raises:
            ValueError: the criterion needs a sample, none is held, and the next update is before `first_sample`.
        """
        waiting = step > 0 and self.pending_step is not None  # restored: an update already waits for the data
        # order="depth": its layer steps need the model's layers (known at `setup`); an update waits for a sample.
        if self.schedule.mode != "prune" or self.schedule.order == "depth" or not self.needs_sample or samples or waiting:
            return
        updates = [t for t in self.schedule.update_steps(max_steps) if t > step]
        if not updates or (first_sample is not None and first_sample <= updates[0]):
            return
        first_update, end_step = updates[0], self.schedule.resolve_steps(max_steps)[1]
        s = self.schedule
        sampling = f"every_n_steps={config.every_n_steps}" + (f", window={config.window}" if config.window else "")
        when = (f"takes its first sample at step {first_sample}" if first_sample is not None
                else f"takes no sample in the run's {max_steps} steps")
        fixes = []
        if first_sample is not None and first_sample < end_step:
            fixes.append(f"start the schedule at that sample (PruneSchedule(start={first_sample}))")
        sooner = ([f"every_n_steps={first_update}"] if config.every_n_steps > first_update else []) + (
            ["window=None"] if config.window else [])
        if sooner:
            fixes.append(f"sample by step {first_update} (ImportanceConfig({', '.join(sooner)}))")
        resumed = f" (resumed at step {step} with no sample)" if step else ""
        raise ValueError(
            f"PruneSchedule(start={s.start!r}, every_n_steps={s.every_n_steps}) updates the masks first at step "
            f"{first_update}{resumed}, but ImportanceConfig(criterion={config.criterion!r}, {sampling}) {when}: "
            f"{config.criterion} masks need at least one sample; {' or '.join(fixes) or 'change either setting'}")

    def due(self, step: int, *, samples: int, skipped: int = 0) -> bool:
        """Whether to update the masks at the end of `step` ([`update_`]): an update step, or a later step once an
        update that found no sample has one. An update step without a sample (the samples so far were skipped as
        non-finite) logs why and waits.

        Args:
            step (`int`): the optimizer step that just ended.
            samples (`int`): samples the importance holds (`meta["num_samples"]`, equal on every rank).
            skipped (`int`, *optional*, defaults to 0): samples skipped as non-finite, for the message.
        """
        if not (self.is_update_step(step) or self.pending_step is not None):
            return False
        if samples > 0 or not self.needs_sample:
            if samples == 0 and self._falls_back and self.num_updates == 0:
                logger.info("PruneSchedule: the update at step %d comes before the first importance sample: "
                            "%s ranks by the current |w|", step, self.criterion)
            self.pending_step = None
            return True
        if self.pending_step is None:
            self.pending_step = step
            logger.warning("PruneSchedule: the mask update due at step %d waits for the first %s sample (%d sample(s) "
                           "skipped as non-finite so far): its masks are computed at the step that takes it", step,
                           self.criterion, skipped)
        return False

    @torch.no_grad()
    def update_(self, statistics, step: int, max_steps: int, cross: CrossTerms | None = None) -> float:
        """Recompute the masks for the schedule's target at `step` from the importance so far; returns the target.

        `statistics(costs, everywhere=...)` (`ImportanceAccumulator.solve_statistics`, collective) returns it with the
        rank that solves each weight: OBS updates read each `H` on its owner only (OWL's allocation and masks-only
        updates read every statistic on every rank), a global threshold from every rank's scores of its own weights.

        `order="depth"`: only the next layer group is pruned, at once to `final_sparsity` (the others all-`True` until
        their step); the target is `final_sparsity` times the share of weights pruned so far. `cross(owners)`
        (`CrossTerm.terms`, collective): the cross terms of the weights this rank solves, summed onto it; before the
        OBS sweep a weight whose cross term covers the tokens of its `H~` moves to its propagated target, so the sweep
        solves the asymmetric objective.

        With `sparsegpt` importance (and `reconstruct` not `False`) the OBS sweep also updates the kept weights, from
        the Hessians (under DDP the sum over ranks, on the rank that sweeps the weight). Under DDP each weight is swept
        by one rank, its owner (by the sweep's cost), and its weights and mask are broadcast from there
        ([`stream.sweep_`]), so the replicas stay identical bit for bit.

        Raises:
            ValueError: `reconstruct=True` without `sparsegpt` importance, or a tensor pruned to 100%.
        """
        cfg, names = self.schedule, list(self.params)
        target = sparsity = cfg.target_at(step, max_steps)
        if self._groups:
            if not self.masks:
                self.masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
            groups = [self._groups[t] for t in sorted(self._groups)]
            names, sparsity = groups[self.num_updates], cfg.final_sparsity
            done = [n for group in groups[: self.num_updates + 1] for n in group]
            target = sparsity * sum(self.params[n].numel() for n in done) / sum(p.numel() for p in self.params.values())
        previous = {n: self.masks[n] for n in names if n in self.masks}
        # Each rank reads the statistics of the weights it sweeps only, unless every rank reads them all (OWL, masks)
        sharded = self.criterion is not None and uses_obs(self.criterion, cfg.prune_config) \
            and cfg.prune_config.allocation != "owl"
        importance, owners = statistics(sweep_costs(self, names), everywhere=not sharded)
        self.source, mine, combine = importance, own_weights(owners), D.all_reduce_exact_ if sharded else None
        with D.same_error_on_every_rank():  # a Hessian only this rank factorises may fail here alone
            plan = PruningPlan.build(importance, cfg.prune_config, names, sparsity=sparsity, previous=previous,
                                     checked=mine, combine=combine)
        if combine is not None and plan.scope == "global":
            with D.same_error_on_every_rank():  # collective: the histograms of every rank's own scores, summed
                plan.share_thresholds_()
        self.scope = plan.scope
        before = {n: self.params[n].detach().to(torch.float32, copy=True) for n in names} if self._refit_step is not None else None
        if plan.reconstruct:
            # Each weight swept by its owner, then broadcast from it: the replicas stay identical bit for bit (DDP
            # syncs gradients, not weights), and the solve time shrinks with the world size.
            terms = cross(owners) if cross is not None else None  # collective: each C onto its solver only
            sweep_(self, plan, owners, mine, importance.state,
                   usable_cross(terms, importance.meta.get("tokens", {}), mine), step)
            self.reconstruction = "OBS"
        else:
            self.masks.update({n: plan.mask(n).to(self.params[n].device) for n in names})
        self.apply_masks_()
        self.zero_optimizer_state_()  # pruned weights only: the moments of kept weights an OBS update moved are kept
        if before is not None:
            for n in names:
                edit = before[n].sub_(self.params[n].detach().float())
                self._edits[n] = self._edits[n].add_(edit) if n in self._edits else edit
        self._record(target, step)
        logger.info("PruneSchedule: step %d, sparsity %.4f (target %.4f%s)", step, self.sparsity, target,
                    ", OBS" if self.reconstruction else "")
        return target

    def is_refit_step(self, step: int) -> bool:
        return step == self._refit_step and self.refitted_at is None

    @torch.no_grad()
    def refit_(self, statistics, step: int, cross: CrossTerms | None = None) -> None:
        """Re-fit the kept weights on their fixed support from the pruned-stream Hessians, each on the rank that
        re-fits it (`statistics` as for [`update_`]; [`stream.refit_`]).

        Each weight's target is `W + E`, its current value plus its pruning edits (`"prune"`: the summed edits of
        every mask update; `"hold"`: the one-shot prune's, [`stream.hold_edits`]): the network's function with the
        pruning undone, training since kept. `cross` (as for [`update_`]): the asymmetric objective where a
        cross term covers the tokens of `H~`. Masks do not change; Adam moments are kept. Under DDP each weight is re-fitted
        by its owner (by the solve's cost) and broadcast from it.

        Raises:
            ValueError: no edits yet (no mask update, or a hold whose edits were not taken), or a degenerate Hessian
                or one with no token since the last mask change (importance sampled at no step after it).
        """
        stream_refit_(self, statistics, step, cross)

    def take_hold_edits_(self, teacher: nn.Module, tracked_names: list[str]) -> None:
        """Train begin of a fresh `"hold"` run with a re-fit ahead: the one-shot prune's edits ([`stream.hold_edits`]);
        a resumed run restored them. Raises `ValueError` as [`stream.teacher_weights`] (untracked, other shapes)."""
        if self.schedule.mode == "hold" and self._refit_step is not None and self.refitted_at is None \
                and not self._edits:
            self._edits = hold_edits(self.params, teacher_weights(self.params, teacher, tracked=tracked_names))

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Zero the pruned weights (in place)."""
        for name, mask in self.masks.items():
            apply_mask_(self.params[name], mask)

    @torch.no_grad()
    def zero_optimizer_state_(self) -> None:
        """Zero the optimizer's per-element state (Adam's moments) of pruned weights: no stale momentum revives them.

        `optimizer.state` is the inner optimizer's (accelerate's `AcceleratedOptimizer` forwards it).
        """
        if self.optimizer is None:
            return
        for name, mask in self.masks.items():
            param, expert = self.params[name], self._slices.get(name)
            key = param if expert is None else expert.param  # an expert's moments are its slice of the fused ones
            for value in self.optimizer.state.get(key, {}).values():
                if isinstance(value, Tensor) and value.shape == key.shape:
                    (value if expert is None else expert.view(value)).masked_fill_(~mask, 0)

    def _record(self, target: float | None, step: int) -> None:
        zeros = sum(m.numel() - int(m.count_nonzero()) for m in self.masks.values())
        numel = sum(m.numel() for m in self.masks.values())
        self.sparsity = zeros / max(numel, 1)
        self.target_sparsity = self.sparsity if target is None else target
        self.last_update_step = step
        self.num_updates += 1

    # ----------------------------------------------------------------------------------------------- results
    def log_values(self) -> dict[str, float]:
        return {"pruning/sparsity": self.sparsity, "pruning/target_sparsity": self.target_sparsity}

    def weights_hold_masks(self) -> bool:
        """Whether every pruned weight is zero in the model now (the Trainer may have loaded other weights)."""
        return all(not bool(self.params[n].detach()[~m].any()) for n, m in self.masks.items())

    def report(self, model: nn.Module, importance=None) -> PruningReport:
        """A [`PruningReport`] of the masked weights, measured from the weights themselves (`weight != 0`), so it
        states what `save_pruned` writes even when the Trainer replaced the weights (`load_best_model_at_end`).

        Raises:
            ValueError: no masks yet.
        """
        if not self.masks:
            raise ValueError("PruneSchedule has no masks yet (no update has happened)")
        zeros_of = {n: self.params[n].detach() != 0 for n in self.masks}
        # a hold chose no mask: the prune its masks came from states criterion, scope, ... (as save_pruned records it)
        held = {k: v for k, v in self.held_record.items() if v is not None} if self.schedule.mode == "hold" else {}
        report = PruningReport.from_masks(zeros_of, sum(p.numel() for p in model.parameters()),
                                          structure=self.schedule.structure,
                                          scope=held.get("scope") or self.scope or self.schedule.prune_config.scope,
                                          target_sparsity=self.target_sparsity,
                                          importance=importance if importance is not None else self.source)
        if report.criterion == "unknown" and self.criterion is not None and self.schedule.mode == "prune":
            report.criterion = self.criterion
        report.allocation = self.schedule.prune_config.allocation
        report.reconstruction = self.reconstruction  # "OBS" as prune_ writes it, when an update reconstructed
        for key in ("criterion", "reconstruction", "cross_term", "allocation"):
            setattr(report, key, held.get(key, getattr(report, key)))
        report.refitted_at = self.refitted_at  # the step it ran, not the configured `refit_at` (it may never have run)
        return report

    def state_dict(self) -> dict[str, Any]:
        """JSON counters (the masks and `stream.pending_edits` are saved beside them by the callback)."""
        return {"config": self.schedule.to_dict(), "sparsity": self.sparsity, "target_sparsity": self.target_sparsity,
                "last_update_step": self.last_update_step, "num_updates": self.num_updates,
                "steps": list(self._steps) if self._steps else None, "has_masks": bool(self.masks),
                "reconstruction": self.reconstruction, "pending_step": self.pending_step,
                "refitted_at": self.refitted_at}

    def load_state_dict(self, state: dict[str, Any] | None, masks: dict[str, Tensor] | None, edits=None) -> None:
        """Restore counters, masks and a pending re-fit's edits from a checkpoint (applied at the next `setup`).

        Raises:
            ValueError: the checkpoint has no schedule state, or its schedule differs in a field that defines masks.
        """
        if not state:
            raise ValueError("Cannot resume PruneSchedule: the checkpoint holds no schedule state (it was written "
                             "without a schedule); start a new run or resume without schedule=")
        diff = self.schedule.diff(state.get("config", {}))
        if diff:
            shown = ", ".join(f"{k}: checkpoint {a!r} -> now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"Cannot resume PruneSchedule: the schedule changed since the checkpoint: {shown}")
        self.sparsity, self.target_sparsity = float(state["sparsity"]), float(state["target_sparsity"])
        self.last_update_step, self.num_updates = state["last_update_step"], int(state["num_updates"])
        self._steps = tuple(state["steps"]) if state.get("steps") else None
        self.reconstruction, self.pending_step = state.get("reconstruction"), state.get("pending_step")
        self.refitted_at, self._edits = state.get("refitted_at"), dict(edits or {})  # edits: to their devices at setup
        self._restored = dict(masks or {})  # an empty dict still marks a resume (before the first update)

