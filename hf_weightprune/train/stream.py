"""The solves and the pruned-stream side of a [`MaskHolder`]: the OBS sweep of a mask update, the asymmetric objective
from the cross term, the re-fit, and the layer groups of `PruneSchedule(order="depth")`.

The holder owns the masks and the weights; these functions read its state and the statistics the callback hands
over (the importance's `H~`, the accumulator's cross term `C`), so the holder's update stays one code path.
Under DDP each weight's solve (its sweep, or its re-fit) runs on one rank only, its owner (the accumulator's
`solve_statistics`: greedy by the solve's estimated flops, so that the ranks' shares take about the same time; weights
sharing one input statistic, q/k/v and gate/up, on one rank together), which alone receives the statistic, summed
onto it by one `reduce` per rank, and its result is broadcast from there, every weight and mask of one owner in one
buffer: the solve time shrinks with the world size, the collectives per update are O(ranks), not O(weights), and the
replicas stay identical bit for bit. On one process every weight is its own process's, in order, with no collective.
In `"hold"` mode every forward is one of the pruned model, so its `sparsegpt` statistic is `H~` from the start; the
re-fit's edits are what the one-shot prune changed, the dense teacher's weights ([`teacher_weights`]) minus the held
weights at train begin ([`hold_edits`]).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..matching import TrackedWeight
from ..moe import find_weights
from ..prune.refit import propagate_target, refit_masked_, refit_solver, sweep_flops, usable_cross

logger = logging.getLogger(__name__)

# `CrossTerm.terms`: `(C, real tokens)` of the weights this rank solves (owners: weight -> rank), summed onto it
CrossTerms = Callable[[dict[str, int]], "dict[str, tuple[Tensor, int]] | None"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_groups(names: Iterable[str]) -> list[list[str]]:
    """The weights of each numbered decoder layer (`...layers.<i>....`), front to back; weights outside a numbered
    layer (e.g. a tracked `lm_head`) join the last group, so they are pruned with the last layer."""
    groups: dict[int, list[str]] = {}
    rest = []
    for name in names:
        m = _LAYER.search(name)
        (groups.setdefault(int(m.group(1)), []) if m else rest).append(name)
    ordered = [groups[i] for i in sorted(groups)]
    if not ordered:
        return [rest] if rest else []
    ordered[-1].extend(rest)
    return ordered


@torch.no_grad()
def propagate_(params: dict[str, Tensor], hessian: Callable[[str], Tensor], cross: dict[str, Tensor], *,
               alpha: float, percdamp: float) -> None:
    """Move each weight with a cross term to its propagated target `W + alpha W C H~^-1` in place, so that the OBS
    sweep on `H~` that follows solves the asymmetric objective ([`prune.refit.asymmetric_sparsegpt_prune_`])."""
    for n, c in cross.items():
        p = params[n]
        p.detach().copy_(propagate_target(p, hessian(n).to(p.device), c, alpha=alpha, percdamp=percdamp))


def teacher_weights(params: dict[str, Tensor], teacher: nn.Module,
                    tracked: Iterable[str] | None = None) -> dict[str, Tensor]:
    """`PruneSchedule(mode="hold", refit_at=...)`: the dense teacher's weight of each masked weight (same name; an
    expert slice's view for MoE experts), from which [`hold_edits`] takes the one-shot prune's edits. References to
    the teacher's own tensors, no copy.

    Args:
        params (`dict[str, Tensor]`): the masked weights of the student ([`MaskHolder.params`]).
        teacher (`nn.Module`): the dense teacher ([`Distiller.teacher`]).
        tracked (`Iterable[str]`, *optional*): the weights the importance tracks; each masked weight must be one (its
            Hessian drives the re-fit).

    Returns:
        `dict[str, Tensor]`: the teacher's weight by name, of the student weight's shape (any dtype and device).

    Raises:
        ValueError: a masked weight that `tracked` lacks, or that the teacher lacks or holds in another shape (e.g. a
            structurally pruned student).
    """
    if tracked is not None:
        tracked = set(tracked)
        untracked = [n for n in params if n not in tracked]
        if untracked:  # the held masks come from masks_from, not from what the importance config tracks
            raise ValueError(f"PruneSchedule(mode='hold', refit_at=...) re-fits every held weight from its Hessian, but "
                             f"ImportanceConfig does not track {len(untracked)} of them (e.g. {untracked[0]}): widen "
                             "its target_modules / exclude_modules")
    weights = {t.name: t.param if isinstance(t, TrackedWeight) else t.weight() for t in find_weights(teacher, ".*")}
    for name, param in params.items():
        w = weights.get(name)
        if w is None or w.shape != param.shape:
            has = "has no such nn.Linear weight" if w is None else f"has shape {tuple(w.shape)}"
            raise ValueError(f"PruneSchedule(mode='hold', refit_at=...) re-fits {name} {tuple(param.shape)} from the "
                             f"teacher's weight of the same Linear, but the teacher {has}: pass the dense model this "
                             "student was pruned from as DistillConfig(teacher=...) (a structurally pruned student "
                             "cannot be re-fitted)")
    return {name: weights[name] for name in params}


@torch.no_grad()
def hold_edits(params: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, Tensor]:
    """`PruneSchedule(mode="hold", refit_at=...)`, train begin of a fresh run: what the one-shot prune changed in each
    held weight, `E = W_dense - W_start` (the removed values and the OBS compensations), in float32.

    The re-fit's target is then `W + E` as in `"prune"` mode: the dense function with the pruning undone, and what
    the kept weights learned since train begin kept (targeting `W_dense` alone would discard it).

    Args:
        params (`dict[str, Tensor]`): the held weights, masks applied ([`MaskHolder.params`]).
        reference (`dict[str, Tensor]`): the dense teacher's weight of each ([`teacher_weights`]).

    Returns:
        `dict[str, Tensor]`: float32 `[out, in]` edits on each weight's device: one more copy of the held weights,
        kept until the re-fit and written with every checkpoint before it.
    """
    # not in place: `.to` returns the teacher's own tensor when device and dtype already match
    return {n: reference[n].to(p.device, torch.float32) - p.detach().float() for n, p in params.items()}


def own_weights(owners: dict[str, int]) -> list[str]:
    """The weights this rank solves, in `owners`' order (all of them on one process)."""
    rank = D.rank_and_world()[0]
    return [n for n, owner in owners.items() if owner == rank]


def _solved(holder, step: int, what: str, costs: dict[str, float], mine: list[str]) -> None:
    for n in mine:
        holder.solves[n] = holder.solves.get(n, 0) + 1
    if D.is_distributed():
        share = sum(costs[n] for n in mine) / max(sum(costs.values()), 1.0)
        logger.info("PruneSchedule: step %d, rank %d %s %d of %d weights (%.0f%% of the estimated flops)", step,
                    D.rank_and_world()[0], what, len(mine), len(costs), 100 * share)


def sweep_costs(holder, names: list[str]) -> dict[str, float]:
    """Each weight's OBS sweep cost ([`prune.refit.sweep_flops`]), by which the ranks share a mask update."""
    return {n: sweep_flops(*holder.params[n].shape) for n in names}


@torch.no_grad()
def sweep_(holder, plan, owners: dict[str, int], mine: list[str], hessian: Callable[[str], Tensor],
           cross: dict[str, Tensor], step: int) -> None:
    """[`MaskHolder.update_`] with OBS edits: this rank's weights (`mine`) move to their propagated targets where a
    cross term is usable ([`propagate_`]) and are swept ([`PruningPlan.edit`]); then every weight and mask is
    broadcast from its owner (`owners`), one buffer per owner. A failure on one rank is raised on every rank."""
    params, masks, own = holder.params, holder.masks, set(mine)
    with D.same_error_on_every_rank():
        propagate_(params, hessian, {n: c for n, c in cross.items() if n in own}, alpha=holder.schedule.cross_alpha,
                   percdamp=holder.schedule.dampening)
        for n in mine:
            edit_ = plan.edit(n)
            mask = edit_(params[n]) if edit_ is not None else masks.get(n, torch.ones_like(params[n], dtype=torch.bool))
            masks[n] = mask.to(params[n].device)
    _solved(holder, step, "swept", sweep_costs(holder, list(owners)), mine)
    if not D.is_distributed():
        return
    masks.update({n: torch.empty_like(params[n], dtype=torch.bool) for n in owners if n not in own})
    D.broadcast_owned_([(t, owner) for n, owner in owners.items() for t in (params[n].detach(), masks[n])])


@torch.no_grad()
def refit_(holder, statistics, step: int, cross: CrossTerms | None = None) -> None:
    """[`MaskHolder.refit_`]: re-fit every masked weight on its support, from the pruned-stream `H~` of the importance
    `statistics(costs)` returns with each weight's owner, and, where usable, the cross term `cross(owners)` summed onto
    that owner (asymmetric objective, `cross_alpha`), towards `W + E`: its current value with its edits undone (`"prune"`: the summed mask updates;
    `"hold"`: [`hold_edits`])."""
    hold = holder.schedule.mode == "hold"
    if not holder._edits:
        raise ValueError(f"PruneSchedule: refit at step {step} but " + (
            "the hold's edits were never taken (ImportanceCallback(distill=DistillConfig(teacher=...)) takes them at "
            "train begin)" if hold else "no mask update happened before it"))
    schedule, params = holder.schedule, holder.params
    costs = {n: refit_solver(holder.masks[n].sum(1), in_features=p.shape[1])[1] for n, p in params.items()}
    importance, owners = statistics(costs)
    tokens = importance.meta.get("tokens", {})
    empty = [n for n in holder.params if not tokens.get(n)]
    if empty:
        since = "since training began" if hold else f"since the last mask update (step {holder.last_update_step})"
        raise ValueError(f"PruneSchedule: refit at step {step}: no pruned-stream sample {since} for {len(empty)} "
                         f"weights (e.g. {empty[0]}); sample the importance at some step between them "
                         "(ImportanceConfig.every_n_steps / window)")
    own = own_weights(owners)
    terms = usable_cross(cross(owners) if cross is not None else None, tokens, own)  # collective: C onto its solver
    with D.same_error_on_every_rank():
        for n in own:
            param = params[n]
            target = holder._edits[n].add_(param.detach().float())
            refit_masked_(param, holder.masks[n], importance.state(n).to(param.device), reference=target,
                          cross=terms.get(n), alpha=schedule.cross_alpha, percdamp=schedule.dampening)
            holder._edits[n] = target.sub_(param.detach().float())  # the edit the re-fit leaves in place
    _solved(holder, step, "re-fitted", costs, own)
    if D.is_distributed():
        # another rank's weight: its edit too is `W + E` minus the re-fitted weight, here from the broadcast one
        targets = {n: holder._edits[n].add_(params[n].detach().float()) for n in owners if n not in own}
        D.broadcast_owned_([(params[n].detach(), owner) for n, owner in owners.items()])
        for n, target in targets.items():
            holder._edits[n] = target.sub_(params[n].detach().float())
    holder.apply_masks_()
    holder.refitted_at = step
    logger.info("PruneSchedule: step %d, kept weights re-fitted on the pruned-stream Hessians%s", step,
                f" (asymmetric objective on {len(terms)} weights of this rank)" if terms else "")


def pending_edits(holder) -> dict[str, Tensor]:
    """What a checkpoint must hold for a pending re-fit to resume exactly: the holder's summed pruning edits `E`
    (float32, shaped as the masked weights), the re-fit's target being `W + E` with `W` the checkpoint's weights.

    Empty when no re-fit is pending (no `refit_at`, no mask update yet, or already re-fitted), so only checkpoints
    between the first update and the re-fit pay for it: 4 bytes per masked-weight element on disk
    (`files/refit_files.py`) and a transient CPU copy on rank 0 while it is written; in memory the holder keeps that
    float32 copy from the first update on anyway.
    """
    pending = holder._refit_step is not None and holder.refitted_at is None
    return dict(holder._edits) if pending else {}


def check_refit_sample(schedule, max_steps: int, first_sample_step: Callable[[int], int | None], *,
                       per_epoch: bool = False) -> None:
    """Train begin: refuse, in one line, a `refit_at` step that the sampling plan reaches with no pruned-stream
    sample since the last mask update (`first_sample_step(after)`: the accumulator's next planned sample, `None`
    when none is planned; with `per_epoch` sampling the plan is unknown before the data is seen, so nothing is
    refused).

    Raises:
        ValueError: the first sample after `end` (`"hold"`: after step 0) comes after the re-fit step, or no
            sample is planned after it at all.
    """
    refit = schedule.refit_step(max_steps)
    if refit is None:
        return
    # A hold run's pruned stream starts with training; a prune run's after its last mask update.
    end = 0 if schedule.mode == "hold" else schedule.resolve_steps(max_steps)[1]
    first = first_sample_step(end)
    # `None` without per_epoch: no sample planned up to max_steps, so the re-fit would find no Hessian at all.
    if (first is None and not per_epoch) or (first is not None and first > refit):
        since = "since training began" if schedule.mode == "hold" else f"since the last mask update (step {end})"
        when = f"samples first at step {first}" if first is not None else f"plans no sample after step {end}"
        raise ValueError(f"PruneSchedule(refit_at={schedule.refit_at!r}) would re-fit at step {refit} with no pruned-"
                         f"stream sample {since}: the importance {when}; sample sooner "
                         "(ImportanceConfig.every_n_steps) or re-fit later")


def warn_if_not_pruned(params: dict[str, Tensor], masks: dict[str, Tensor], source: str) -> None:
    """`"hold"` on weights the masks do not match yet (the dense model rather than the pruned checkpoint): applying the
    masks is then a mask-only prune, and the checkpoint's reconstructed (OBS) weights are not used (a warning)."""
    nonzero = sum(int(params[n].detach()[~m].count_nonzero()) for n, m in masks.items())
    if nonzero:
        pruned = sum(int((~m).sum()) for m in masks.values())
        logger.warning("PruneSchedule(mode='hold'): %d of the %d weights %s prunes are nonzero in this model; "
                       "zeroing them now is a mask-only prune of it. To recover that checkpoint (with its "
                       "reconstructed weights) train it: from_pretrained(%r)", nonzero, pruned, source, source)


def held_masks(model: nn.Module, schedule) -> tuple[dict[str, Tensor], dict]:
    """`PruneSchedule(mode="hold")`: the masks of `schedule.masks_from` and its `sparsity.json` (what chose them:
    criterion, scope, reconstruction, ...; `{}` without one). A folder without `sparsity.json` (another tool pruned
    it) gives the zeros of the targeted `nn.Linear` weights.

    Returns:
        `tuple[dict[str, Tensor], dict]`: `{name: bool keep-mask}` and the source's `sparsity.json` payload.
    """
    from ..files.pruned_files import SPARSITY_NAME, load_masks, load_sparsity

    folder = schedule.masks_from
    if os.path.isfile(os.path.join(folder, SPARSITY_NAME)):
        return load_masks(folder), load_sparsity(folder)
    names = [t.name for t in find_weights(model, schedule.target_modules, schedule.exclude_modules)]
    held = load_masks(folder, names)
    zeros = sum(m.numel() - int(m.count_nonzero()) for m in held.values())
    numel = sum(m.numel() for m in held.values())
    logger.info("PruneSchedule: %s has no %s (pruned by another tool?): holding the zeros of %d targeted weights, "
                "sparsity %.4f over them", folder, SPARSITY_NAME, len(held), zeros / max(numel, 1))
    return held, {}
