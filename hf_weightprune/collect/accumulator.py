"""`ImportanceAccumulator`: the statistics an [`ImportanceCallback`] gathers, apart from the Trainer events.

It owns the tracked weights, the per-rank buffers (`distributed.OwnershipPlan` decides which rank holds what), the
scalars kept beside them (`meta`: samples, step weights, tokens, skipped samples, epochs), the sampling rules
(`every_n_steps`, `window`, `per_epoch`), the activation hooks (`activations.ActivationCollector`) and the read-out
as an [`Importance`]. The callback decides *when* (Trainer events) and *where* (checkpoint folders); this decides
*what*. It reads no files and writes none.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import has_length

from .. import distributed as D
from ..config import ImportanceConfig
from ..coverage import refuse_conv1d, warn_if_uncovered
from ..matching import TrackedWeight
from ..moe import ExpertSlice, find_moe_blocks, find_weights
from ..scorers import get_scorer
from ..scorers.base import chunks, first_nonfinite_index
from .activations import ActivationCollector, shared_input_candidates
from .importance import Importance
from .router import RouterCollector
from .summary import draw_indices, sampled_scores, type_summary
from .units import UnitCollector

logger = logging.getLogger(__name__)

_RESTORED_META = ("num_samples", "weight_sum", "last_step", "skipped", "epoch", "epoch_step")


class ImportanceAccumulator:
    """Per-parameter importance statistics of one model, accumulated sample by sample.

    Args:
        config (`ImportanceConfig`): what to track and how.
        offload_to_cpu (`bool`, *optional*, defaults to `False`): keep the buffers in CPU memory.

    Attributes:
        tracked (`list[TrackedWeight | ExpertSlice]`): the tracked weights (Linears and expert slices), in model order.
        states (`dict[str, Tensor]`): the buffers this rank holds, by canonical parameter name.
        plan (`OwnershipPlan`): which rank holds and writes each buffer.
        units (`UnitCollector` or `None`): the unit statistics, with `ImportanceConfig(units=True)`.
        router (`RouterCollector`, *optional*): an MoE model's router statistics, and its experts' input statistics
            for activation criteria.
        cross (`CrossTerm`, *optional*): the dense-to-pruned cross term beside the `sparsegpt` statistic (set after
            [`setup`] by the callback: `CrossTerm.from_tracked`); folded, restarted and saved with it.
        meta (`dict`): `global_step`, `num_samples`, `weight_sum`, `last_step`, `skipped`, `tokens`, `max_steps`,
            `window_start`, `epoch`, `epoch_step`.
    """

    def __init__(self, config: ImportanceConfig, *, offload_to_cpu: bool = False):
        self.config = config
        self.scorer = get_scorer(config.criterion, weighting=config.weighting)
        self.offload_to_cpu = offload_to_cpu
        self.tracked: list[TrackedWeight | ExpertSlice] = []
        self.collector: ActivationCollector | None = None
        self.units: UnitCollector | None = None
        self.router: RouterCollector | None = None
        self.reset()

    def reset(self) -> None:
        self.remove_hooks()
        self.collector = self.router = self.units = self.cross = None
        self.tracked, self.states, self.plan = [], {}, D.OwnershipPlan()
        self.meta: dict[str, Any] = {"global_step": 0, "num_samples": 0, "weight_sum": 0.0, "last_step": 0,
                                     "skipped": 0, "tokens": {}, "max_steps": None, "window_start": None,
                                     "epoch": 0, "epoch_step": None}
        self.seed, self._log_index = 0, None  # _log_index: the logged summary's sampled positions, drawn once per run

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tracked]

    def shapes(self) -> dict[str, list[int]]:
        return {t.name: list(t.weight().shape) for t in self.tracked}

    def state_bytes(self) -> int:
        """Bytes of buffers held by this rank."""
        return sum(t.numel() * t.element_size() for t in self.states.values())

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self, model: nn.Module, args, state, *, track: bool = True) -> None:
        """Find the tracked weights, plan the buffers, allocate them, register activation hooks (train begin).

        Raises:
            ValueError: a gradient criterion on frozen weights, an unsupported backend (`distributed.check_supported`),
                or `window` with `per_epoch` on a dataset without length.
        """
        if self.tracked:
            # A second train() restarts global_step at 0: continuing would mix two time axes.
            logger.warning("ImportanceCallback: train() called again; restarting importance (discarding %d samples)",
                           self.meta["num_samples"])
        self.reset()
        self.seed = int(getattr(args, "seed", 0))
        self.meta["max_steps"] = int(state.max_steps)
        if not track:  # a hold schedule only: no weights tracked, no state, no hooks
            return
        refuse_conv1d(model)
        self.tracked = find_weights(model, self.config.target_modules, self.config.exclude_modules)
        warn_if_uncovered(model, self.tracked, "ImportanceCallback")
        if self.scorer.needs_grad:
            frozen = [t.name for t in self.tracked if not t.param.requires_grad]
            if frozen:
                raise ValueError(
                    f"criterion {self.config.criterion!r} needs weight gradients, but {len(frozen)} tracked weights are "
                    f"frozen (e.g. {frozen[0]}; LoRA freezes base weights): use criterion='wanda' or 'temporal_magnitude'"
                )
        D.check_supported(model, args, needs_grad=self.scorer.needs_grad, criterion=self.config.criterion)
        slices = [t for t in self.tracked if isinstance(t, ExpertSlice)]
        if slices and D.backend(model, args) == "fsdp2":
            # FSDP2 shards a fused [E, ...] parameter on dim 0: a slice view would need this rank's expert offset
            raise ValueError(f"FSDP2 with mixture-of-experts weights ({slices[0].param_name}) is not supported yet; use "
                             "DDP, or exclude_modules=['experts'] to track the other weights only")
        per_rank = self.scorer.source != "activations"
        self.plan = D.OwnershipPlan.build({t.name: t.weight() for t in self.tracked}, per_rank=per_rank)
        dtype = torch.float32 if not per_rank else getattr(torch, self.config.state_dtype)
        for t in self.tracked:
            if self.plan.holds(t.name):
                device = "cpu" if self.offload_to_cpu else t.param.device
                shape = self.scorer.state_shape(D.local_tensor(t.weight()) if per_rank else t.weight())
                self.states[t.name] = torch.zeros(shape, dtype=dtype, device=device)
        self.meta["epoch"] = int(state.epoch or 0)  # epochs completed (resumed runs start past 0)
        self.meta["window_start"] = self._window_start(state)
        if not per_rank:
            # Compiled: dynamo guards on the hooks while they are registered (see `HookGuards`); the process's setting
            # comes back when they are removed (train end, or the next `setup` / `reset`).
            compiled = bool(getattr(args, "torch_compile", False) or hasattr(model, "_orig_mod"))
            linear = [t for t in self.tracked if not isinstance(t, ExpertSlice)]
            self.collector = ActivationCollector(model, linear, self.scorer.statistic,
                                                 device=lambda name: self.states[name].device, guard_hooks=compiled)
            self.collector.register()
        if self.config.units:
            self._setup_units(model, args)
        self._setup_router(model, slices if not per_rank else [])

    def _setup_router(self, model: nn.Module, slices: list[ExpertSlice]) -> None:
        """Router statistics of an MoE model, for every criterion; the inputs routed to each tracked expert slice
        (`slices`, activation criteria) like the Linears' inputs."""
        blocks = find_moe_blocks(model)
        if not blocks:
            return
        self.router = RouterCollector(model, blocks, slices=slices, statistic=self.scorer.statistic if slices else None,
                                      device=lambda name: self.states[name].device)
        self.router.register()

    def set_sampling(self, active: bool) -> None:
        """Whether the coming forwards count: the sampled steps (`every_n_steps`, `window`) of the activation, router
        and unit statistics."""
        for c in (self.collector, self.router, self.units):
            if c is not None:
                c.active = active
        if self.cross is not None:
            self.cross.set_active(active)

    def remove_hooks(self) -> None:
        """Remove the activation, router and unit hooks (train end, reset); the statistics stay readable."""
        for c in (getattr(self, "collector", None), getattr(self, "router", None), getattr(self, "units", None),
                  getattr(self, "cross", None)):
            if c is not None:
                c.remove()

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

    # ---------------------------------------------------------------------------------------------- sampling
    def samples_at(self, t: int) -> bool:
        start = self.meta["window_start"]
        return t % self.config.every_n_steps == 0 and (start is None or t >= start)

    def first_sample_step(self, after: int) -> int | None:
        """The first step after `after` whose sample this run plans to take (`every_n_steps`, `window`), or `None`
        when none is planned up to `max_steps`. Undefined with `per_epoch` (epoch ends depend on the data): `None`."""
        if self.config.per_epoch or not self.tracked:
            return None
        n, lo = self.config.every_n_steps, max(after + 1, self.meta["window_start"] or 1)
        first = -(-lo // n) * n  # the first multiple of n from lo
        return first if first <= self.meta["max_steps"] else None

    def samples_step(self, t: int) -> bool:
        # Resumed from checkpoint-max_steps, the Trainer still runs one more step (max_steps + 1): not a sample.
        return bool(self.tracked) and t <= self.meta["max_steps"] and self.samples_at(t)

    def _record_sample(self, t: int, step: int) -> None:
        self.meta["num_samples"] += 1
        self.meta["weight_sum"] += float(t)
        self.meta["last_step"] = step

    def _owned(self) -> list[TrackedWeight]:
        return [t for t in self.tracked if t.name in self.states]

    def commit_activations(self, t: int) -> None:
        """Fold the activation sums of step `t`'s forwards into the buffers (activation criteria)."""
        sums, tokens = self.collector.pop()
        cross = self.cross.pop() if self.cross is not None else {}
        if self.router is not None:  # expert slices: disjoint names from the Linears'
            expert_sums, expert_tokens = self.router.pop()
            sums, tokens = {**sums, **expert_sums}, {**tokens, **expert_tokens}
        if not self.collector.active:
            return
        if not sums:  # fail at the first such step rather than at the end ("no training tokens")
            raise RuntimeError(
                f"ImportanceCallback({self.config.criterion!r}): step {t} was sampled but none of the "
                f"{len(self.tracked)} forward hooks on the tracked modules fired. Was the forward run outside "
                "the modules (a compiled graph cached before the hooks were added, a replaced forward)?"
            )
        names = list(sums)
        bad = self.config.skip_nonfinite and first_nonfinite_index([sums[n] for n in names]) is not None
        if D.any_rank(bad):  # every rank skips the same samples, so their counts stay equal
            self.meta["skipped"] += 1
            logger.warning("ImportanceCallback: non-finite activations at step %d; sample skipped", t)
            return
        with torch.no_grad():
            self.scorer.update_([self.states[n] for n in names], [sums[n] for n in names], None, t)
        for n in names:
            self.meta["tokens"][n] = self.meta["tokens"].get(n, 0) + tokens[n]
        if cross:  # the same kept sample as H~, with the same step weighting
            self.cross.fold_(cross, self.scorer, t, device=lambda name: self.states[name].device)
        self._record_sample(t, t)

    def sample(self, t: int, step: int, use_grads: bool) -> None:
        """Fold the current weights (or gradients) into the buffers as the sample of step (or epoch) `t`."""
        owned = self._owned()
        grads = None
        if use_grads:
            owned = [tw for tw in owned if tw.grad() is not None]
            grads = [D.local_tensor(tw.grad().detach()) for tw in owned]
        weights = [D.local_tensor(tw.weight()) for tw in owned]
        # The sample reads gradients or weights: either going NaN/Inf (a diverged step) would poison every later score.
        bad = _first_nonfinite(owned, grads if use_grads else weights)
        if D.any_rank(bad is not None):
            what = "gradient" if use_grads else "weight"
            where = f" ({bad})" if bad else " (on another rank)"
            if self.config.skip_nonfinite:
                self.meta["skipped"] += 1
                logger.warning("ImportanceCallback: non-finite %s at step %d%s; sample skipped", what, step, where)
                return
            logger.warning("ImportanceCallback: non-finite %s at step %d%s; kept (skip_nonfinite=False)", what, step,
                           where)
        states = [self.states[tw.name] for tw in owned]
        gen = None
        if states and states[0].dtype == torch.bfloat16:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(t))  # CPU: offsets only, no sync
        with torch.no_grad():
            if self.offload_to_cpu:  # chunk by chunk, so only one chunk of weights is copied at a time
                for sl in chunks(weights):
                    w = [x.to("cpu", non_blocking=True) for x in weights[sl]]
                    g = [x.to("cpu", non_blocking=True) for x in grads[sl]] if grads is not None else None
                    self.scorer.update_(states[sl], w, g, t, gen)
            else:
                self.scorer.update_(states, weights, grads, t, gen)
        self._record_sample(t, step)

    def step_end(self, state, dataloader) -> None:
        """Weight criteria: the sample of this step (or, with `per_epoch`, of the epoch whose last step it is)."""
        self.meta["global_step"] = t = state.global_step
        if self.scorer.source != "weights":
            return
        if not self.config.per_epoch and self.samples_step(t):
            self.sample(t, t, use_grads=False)
        elif self.config.per_epoch and _is_epoch_end(state, dataloader):
            # The last step of an epoch: sample now, so a checkpoint saved at this step holds the sample (a resume
            # from it never replays this epoch's on_epoch_end).
            self.sample_epoch(state)

    def sample_epoch(self, state) -> None:
        """One sample per epoch end, t = epochs completed (a map-style epoch is sampled at its last step)."""
        if not self.config.per_epoch or self.meta["epoch_step"] == state.global_step:
            return
        self.meta["epoch"] += 1
        self.meta["epoch_step"] = state.global_step
        if self.samples_at(self.meta["epoch"]):
            self.sample(self.meta["epoch"], state.global_step, use_grads=False)

    def restart(self) -> None:
        """Drop every sample so far (buffers zeroed, sample counts and tokens cleared), keeping the hooks: a
        `PruneSchedule(pruned_stream=...)` calls it at each mask change, so the statistic holds only the pruned
        model's inputs from the next step on. Every rank calls it at the same steps (the sums are per rank)."""
        with torch.no_grad():
            for buf in self.states.values():
                buf.zero_()
        self.meta.update(num_samples=0, weight_sum=0.0, tokens={})
        if self.cross is not None:
            self.cross.restart()

    # ------------------------------------------------------------------------------------------- unit statistics
    def _setup_units(self, model: nn.Module, args) -> None:
        """`ImportanceConfig(units=True)`: the [`UnitCollector`]'s hooks, counting the steps the criterion samples."""
        self.units = UnitCollector(model, guard_hooks=bool(getattr(args, "torch_compile", False)
                                                           or hasattr(model, "_orig_mod")))
        self.units.register()

    def commit_units(self, t: int, model: nn.Module | None) -> None:
        """Fold step `t`'s unit sums into the totals (before the optimizer step); Taylor on rank 0 only (the gradients
        are DDP-averaged), forward sums per rank until [`unit_state`] adds them up."""
        if self.units is not None and not self.units.commit_(model, taylor=self.plan.rank == 0,
                                                             skip_nonfinite=self.config.skip_nonfinite) \
                and self.units.active:
            logger.warning("ImportanceCallback: non-finite unit statistics at step %d; step skipped for them", t)

    def unit_state(self) -> dict[str, torch.Tensor] | None:
        """The unit totals summed across ranks (collective under DDP), or `None` without `units=True`."""
        return None if self.units is None else self.units.reduced_state()

    # ------------------------------------------------------------------------------------------ read and resume
    def full_meta(self) -> dict[str, Any]:
        """The scalars, with activation token counts added across ranks (collective under DDP)."""
        meta = dict(self.meta, tokens=dict(self.meta["tokens"]))
        if self.scorer.source == "activations" and D.is_distributed():
            names = self.names
            meta["tokens"] = dict(zip(names, D.all_reduce_int([meta["tokens"].get(n, 0) for n in names])))
        if self.scorer.source == "final":
            meta["num_samples"], meta["last_step"] = 1, meta["global_step"]
        return meta

    def export_tensors(self, *, writers_only: bool = False) -> dict[str, torch.Tensor]:
        """This rank's buffers: its own for per-rank criteria; for activations, the cross-rank sums (collective), of
        every buffer, or with `writers_only` of those this rank writes only, each summed onto its writer."""
        if self.scorer.source == "final":
            owned = self._owned()
            with torch.no_grad():
                weights = [D.local_tensor(t.weight()) for t in owned]
                self.scorer.update_([self.states[t.name] for t in owned], weights, None, 0)
        if not self.plan.per_rank:
            return D.reduce_to_owners(self.states, self.plan.writers) if writers_only else self.plan.summed(self.states)
        return dict(self.states)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores of this rank (collective under DDP / FSDP2: every rank calls it): `tensors` (the
        buffers this rank writes, [`export_tensors`] with `writers_only`), `meta` (the scalars, [`full_meta`]), `shapes`
        (every tracked weight's shape, in model order), `units` (the cross-rank [`unit_state`], or `None`), `router` (an
        MoE model's router statistics summed over ranks, [`router_section`]; `None` for a dense model) and `cross`
        ([`CrossTerm.state_dict`], or `None`)."""
        return {"tensors": self.export_tensors(writers_only=True), "meta": self.full_meta(), "shapes": self.shapes(),
                "units": self.unit_state(), "router": self.router_section(),
                "cross": self.cross.state_dict() if self.cross is not None else None}

    def router_section(self) -> dict[str, dict[str, Any]] | None:
        """An MoE model's router statistics over all ranks (collective; `RouterCollector.section`), else `None`."""
        return None if self.router is None else self.router.section()

    def load_state_dict(self, imp: Importance, global_step: int) -> None:
        """Take the buffers and scalars of a checkpoint's importance (already validated against this run).

        Args:
            imp (`Importance`): what [`state_dict`] became on disk, read back lazily by `load_importance`.
            global_step (`int`): the step being resumed.
        """
        keep_sums = self.plan.per_rank or self.plan.rank == 0  # activation sums: restore once, on rank 0
        for name, buf in self.states.items():
            if keep_sums:
                saved = imp.state(name)
                if name in self.plan.rows:  # FSDP2: only this rank's rows, whatever layout wrote the file
                    offset, rows = self.plan.rows[name]
                    saved = saved[offset : offset + rows]
                buf.copy_(saved.to(buf.device))
        if self.units is not None and self.plan.rank == 0:  # sums across ranks: restored once, on rank 0
            self.units.load_state_dict(imp.unit_state())
        section = imp.sections.get("router")
        if self.router is not None and section:
            self.router.load_section(section, keep=self.plan.rank == 0)
        meta = {k: imp.meta[k] for k in _RESTORED_META if k in imp.meta}
        meta["tokens"] = dict(imp.meta.get("tokens", {})) if keep_sums else {}
        self.meta.update(meta, global_step=global_step)

    def _sampled_scores(self, sample_size: int) -> dict[str, torch.Tensor]:
        """Flat float32 scores of a seeded sample of each tracked weight (every element when the model is small)."""
        weights = {t.name: D.local_tensor(t.weight()) for t in self.tracked if t.name in self.states}
        numels = {n: w.numel() for n, w in weights.items()}
        if self._log_index is None or self._log_index[0] != sum(numels.values()):  # the same weights across steps
            self._log_index = (sum(numels.values()), draw_indices(numels, sample_size, self.seed))
        return sampled_scores(self.scorer, self.states, weights, self.meta, self._log_index[1])

    def summary(self, target: float, sample_size: int = 1 << 16) -> dict[str, float]:
        """Per module type (this rank's weights), `importance/<type>/mean` and `importance/<type>/frac_below` (under the
        one threshold pruning `target` of all weights), from a seeded sample of `sample_size` scores (drawn once)."""
        scores = self._sampled_scores(sample_size)
        numels = {t.name: D.local_tensor(t.weight()).numel() for t in self.tracked if t.name in scores}
        return type_summary(scores, numels, target)

    def importance(self, owners: dict[str, int] | None = None, shared: dict[str, str] | None = None) -> Importance:
        """Full buffers on every rank (collective under DDP / FSDP2), bound to the model's weights; with `owners`
        ([`solve_statistics`]), activation statistics of those weights only, each summed onto its owner."""
        meta = self.full_meta()
        params = {t.name: t.weight() for t in self.tracked}

        def empty(name: str) -> torch.Tensor:
            return torch.empty(self.scorer.state_shape(params[name]), dtype=getattr(torch, self.config.state_dtype))

        if owners is None or self.plan.per_rank:
            get = self.plan.assemble(self.export_tensors(), self.shapes(), empty).__getitem__
        else:  # each distinct statistic (q/k/v share one) summed once, onto the rank that solves its weights
            reps = {n: (shared or {}).get(n, n) for n in owners}
            get = _owned_only(D.reduce_to_owners({r: self.states[r] for r in dict.fromkeys(reps.values())}, owners),
                              reps, owners)
        router = self.router_section()
        return Importance(self.config, meta, self.shapes(), get, weights=params,
                          sections={"router": router} if router else None, units=self.unit_state())

    def solve_statistics(self, costs: dict[str, float], *, everywhere: bool = False) -> tuple[Importance, dict[str, int]]:
        """The importance for solves shared across ranks (a schedule's OBS sweeps, its re-fit) and the rank solving each
        weight of `costs` (collective): greedy by cost ([`distributed.partition`]), the weights of one statistic (q/k/v,
        gate/up: equal buffers on every rank) together; each activation statistic is summed onto that rank only, once
        (one `reduce` per rank), not onto every rank. `everywhere`: every statistic on every rank (OWL reads them)."""
        shared = {} if self.plan.per_rank or everywhere else D.shared_tensors(
            self.states, shared_input_candidates({n: self.states[n].shape for n in costs}))
        owners = D.partition(costs, D.rank_and_world()[1], together=shared)
        return self.importance(None if everywhere else owners, shared), owners

def _owned_only(sums: dict[str, torch.Tensor], reps: dict[str, str], owners: dict[str, int]):
    """`Importance`'s reader of the statistics summed onto this rank (`sums`, by the weight whose buffer was summed)."""
    def get(name: str) -> torch.Tensor:
        if reps.get(name, name) not in sums:
            raise ValueError(f"the statistic of {name} was summed onto rank {owners.get(name)} only, not here")
        return sums[reps.get(name, name)]
    return get


def _first_nonfinite(owned: list[TrackedWeight | ExpertSlice], tensors: list[torch.Tensor]) -> str | None:
    """Name of the first tensor holding NaN/Inf, else `None`."""
    i = first_nonfinite_index(tensors) if tensors else None
    return None if i is None else owned[i].name


def _is_epoch_end(state, dataloader) -> bool:
    # Only a dataset with a length has whole-number epochs at its epoch ends.
    return dataloader is not None and has_length(dataloader) and state.epoch == int(state.epoch or 0) > 0
