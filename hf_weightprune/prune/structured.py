"""Structured pruning from an importance: neurons, KV groups, hidden channels, decoder layers, or a combination.

[`prune_structures_`] is what `prune_` calls for `PruneConfig(structure=...)` with any of `"neurons"`, `"heads"`,
`"hidden"`, `"layers"` or several of them. It decides how many units each axis loses, checks every size against the
model's config, then applies the surgery: depth first (`depth.remove_layers_`), then width (`surgery.shrink_attention_`,
`surgery.shrink_mlp_`, `hidden.shrink_hidden_`). Width is one size for all layers (stock configs hold one), the units
removed differ per layer; depth is free per layer.

Ranking. With unit statistics (`ImportanceConfig(units=True)`) every axis ranks by `Importance.unit_scores(
config.unit_statistic)`: neurons and KV groups per layer, hidden channels summed over the layers that stay (with
`"layers"`, depth is chosen first: a channel only the removed layers used ranks low; `"taylor"` then sums each kept
layer's own `|sum g*w|`, see `collect.units.unit_scores`), layers by block influence (ShortGPT) under the
activation statistics or by Taylor. Without them neurons and KV groups rank by the
per-weight scores (`unit_scores.py`); hidden channels and layers need the unit statistics.

Budget. `sparsity` removes that fraction of the units of each axis (`masks.num_to_prune`). `target_params` (an int
count, or a float fraction of the model's parameters, to keep) is split between the axes by `prune/budget.py`: steps
of the sizes each config accepts (hidden: multiples of the head count that the same prune leaves), ranked by how weak each axis' weakest units are
against its average, counted exactly before any change; the finest width axis (neurons when present) fills what a
coarse one cannot take and is applied last. The kept count is as close to the target as the sizes allow and never more
than one step of the structure's coarsest axis off (else refused; an axis left uncut by its granularity is warned
about). `round_to=N` keeps the widths cut (neurons, hidden) multiples of N: the size rule offers only those, a
`sparsity` rounds the kept width to the nearest one (`budget.aligned_removal`), and a `round_to` no width below the
dense one satisfies is refused first. A split that removes layers is planned again on the scores of the layers it keeps (`_plan`). To choose between candidate shapes by measured loss instead of this rule, `search_structures`
(`tools/search.py`) prunes a copy with each one and keeps the lowest loss (Minitron's search).

Compensation of removed neurons (`down_proj` input columns) and KV groups (`o_proj` input columns), layer by layer:
`compensate="refit"` refits the kept columns by least squares from their input Hessians (`compensate.refit_columns`,
`W_K + W_R H_RK H_KK^-1`; `criterion="sparsegpt"` importance accumulates them; a Hessian of fewer tokens than inputs is
refused, fewer than four per input warned about); `compensate="mean"` (FLAP) adds the removed columns' mean
contribution over the training tokens, `W[:, removed] @ mean(x[removed])`, to the consumer's bias
(`compensate.mean_shift`, means from the unit statistics), creating the bias through the config flag that stock
transformers reads (`compensate.bias_plan`); `compensate="refit,mean"` fits both together, least squares with an
intercept (`compensate.refit_mean`: the refit on the centred covariance `H/n - mu mu^T`, the rest of the mean into
the bias), which needs the Hessian and the unit means counted over the same tokens (equal token counts, uniform step
weighting; refused otherwise). Hidden channels and layers are not compensated (`config.COMPENSATED_AXES`). With
hidden channels cut in the same prune the refit needs no Hessian cut to the kept channels: a consumer's Hessian is
over its inputs (the neurons' or KV groups' columns), which the hidden cut leaves alone; the hidden cut removes the
consumer's output rows, and the refit and the mean shift treat each output row on its own, so the dense layer's
statistics compensate the kept rows whichever cut comes first (a budget applies its filling axis last). Each
consumer's Hessian is found by its dense layer's name, read before any change (the cuts replace the modules).

Checks first. Every precondition of every axis and of the compensation (sizes alone and together, hidden
pruning's module checks in `hidden_channel_cost`, each compensated consumer's Hessian and token count or mean
input, the bias flags) is checked before the first change, so a refusal is one line and leaves the model as it was.

Pruning again. The importance describes the dense shapes, so passing it again for the pruned model is refused
("Importance does not match this model"). `Importance.select(report)` restricts it to the units this prune kept
(from the report's removed units, or the checkpoint's `sparsity.json`): a 2:4 or another structured prune then runs
on the pruned model, ranked by the dense run's statistics of the units that remain.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..collect.importance import Importance
from ..config import COMPENSATED_AXES, PruneConfig
from ..layouts import attention_sizes, attn_geometry, check_structured_supported, decoder_layers, detect_layout
from ..matching import canonical_name
from .budget import (
    ORDER,
    Budget,
    SizeRule,
    accepted_keeps,
    aligned_removal,
    axis_sizes,
    num_params,
    plan_budget,
    size_updates,
    width_costs,
)
from .compensate import add_biases_, bias_plan, check_hessian, mean_shift, refit_columns, refit_mean
from .depth import remove_layers_
from .expert_neurons import has_experts, prune_expert_neurons_
from .hidden import hidden_channel_cost, shrink_hidden_
from .masks import num_to_prune
from .surgery import config_error, shrink_attention_, shrink_mlp_
from .unit_scores import head_group_scores, neuron_scores

__all__ = ["prune_structures_"]

logger = logging.getLogger(__name__)

_CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size")
_REFITS, _MEANS = ("refit", "refit,mean"), ("mean", "refit,mean")  # the compensations that refit / shift a bias


def _config_sizes(config) -> dict:
    """The sizes a structured record states of a config (`structured["config"]["before"/"after"]`): the depth and
    widths, and the attention's head counts and head size as the config states or derives them (the head size and
    KV-head count let `Importance.select` refuse statistics of the model before an earlier heads prune)."""
    return {**{k: getattr(config, k, None) for k in _CONFIG_KEYS}, **attention_sizes(config)}


def _scores(model: nn.Module, importance: Importance, config: PruneConfig, axes: tuple[str, ...]) -> dict:
    """Every axis' unit scores, read before any change: `{"neurons": {layer: T}, "heads": ..., "hidden": T, ...}`."""
    if importance.has_units:
        found = importance.unit_scores(config.unit_statistic)
        return {a: found[a] for a in axes}
    missing = [a for a in axes if a in ("hidden", "layers")]
    if missing:
        raise ValueError(f"structure {missing[0]!r} ranks by unit statistics, which this importance does not hold: "
                         "gather them with ImportanceConfig(units=True)")
    if config.unit_statistic != "activation":  # the default falls back to per-weight scores; a chosen one must not
        raise ValueError(f"unit_statistic={config.unit_statistic!r} ranks by unit statistics, which this importance "
                         "does not hold: gather them with ImportanceConfig(units=True), or rank neurons and KV groups "
                         "by their weights' scores with the default unit_statistic='activation'")
    n = len(decoder_layers(model))
    fn = {"neurons": neuron_scores, "heads": head_group_scores}
    return {a: {i: fn[a](model, importance.scores, i) for i in range(n)} for a in axes}


def _on_kept(scores: dict, importance: Importance, config: PruneConfig, dropped: list[int]) -> dict:
    """`scores` for a prune that removes the layers `dropped`: hidden channels ranked by the layers that stay (a
    channel only removed layers used is no longer important), neurons and KV groups of those layers only."""
    if not dropped:
        return scores
    kept = [i for i in range(len(scores["layers"])) if i not in set(dropped)]
    out = {a: ({i: v for i, v in s.items() if i in kept} if isinstance(s, dict) else s) for a, s in scores.items()}
    if "hidden" in out:  # hidden channels rank by the unit statistics only (checked by _scores)
        out["hidden"] = importance.unit_scores(config.unit_statistic, kept_layers=kept)["hidden"]
    return out


def _plan(model: nn.Module, importance: Importance, config: PruneConfig, scores: dict, axes: tuple[str, ...],
          sizes: dict[str, int], target: int, rule: SizeRule) -> Budget:
    """`plan_budget` on the scores of the layers the split keeps: a split that removes layers is planned again on
    the scores of the layers it keeps, until the removed layers repeat (at most three plans; the surgery then ranks
    by the layers actually kept). The warnings of the last plan only are logged, once."""
    budget = plan_budget(model, scores, axes, sizes, target, config.target_params, rule)
    planned_on: list[list[int]] = [[]]
    while budget.dropped not in planned_on and len(planned_on) < 3 and len(axes) > 1:
        planned_on.append(budget.dropped)
        budget = plan_budget(model, _on_kept(scores, importance, config, budget.dropped), axes, sizes, target,
                             config.target_params, rule)
    budget.warn()
    return budget


def _refill(model: nn.Module, axis: str, size: int, n_layers: int, target: int, rule: SizeRule,
            kept: dict[str, int]) -> int:
    """Units of the filling axis to remove so that the model, as it is now, keeps the count closest to `target`."""
    per_unit = hidden_channel_cost(model) if axis == "hidden" else width_costs(model, (axis,))[axis][0] * n_layers
    now = num_params(model)  # the other axes are already applied
    # Heads and hidden: the sizes the dense config takes with the other's final size (the current config may be
    # between the two cuts, which a tied config rejects); neurons: the current config's.
    accepted = rule.keeps(axis, kept) if rule.partner(axis) else accepted_keeps(model, axis, size, rule.round_to)
    return size - min(accepted, key=lambda k: abs(now - (size - k) * per_unit - target))


def _check_sizes(model: nn.Module, rule: SizeRule, counts: dict[str, int], sizes: dict[str, int]) -> None:
    """`sparsity`: every width size, each with the others' sizes of the same prune, accepted by the config."""
    kept = {a: sizes[a] - counts[a] for a in rule.axes}
    for a in rule.axes:
        accepted = rule.keeps(a, kept)
        if kept[a] not in accepted:
            partner = rule.partner(a)
            at = f" with {partner} at {kept[partner]}" if partner else ""
            raise ValueError(f"structure {a!r}: keeping {kept[a]} of {sizes[a]} gives a config that "
                             f"{type(model.config).__name__} rejects{at}; sizes it accepts{at}: {accepted[::-1]}")


def _keep(scores: Tensor, n_remove: int) -> Tensor:
    order = torch.sort(scores.float().cpu(), stable=True).indices  # ties: the lower index goes first
    return order[n_remove:].sort().values


def _consumer_names(model: nn.Module, axes: tuple[str, ...]) -> dict[tuple[str, int], str]:
    """The weight name of every layer's consumer of each compensated axis, by `(axis, dense layer index)`: the names
    the importance keys its Hessians by, read before any change. (The surgery replaces modules, hidden pruning every
    Linear, and Python reuses a freed object's id: a map from module ids read before the first cut names nothing, or
    the wrong module, after it.)"""
    names = {id(m): canonical_name(n) + ".weight" for n, m in model.named_modules()}
    none = torch.zeros(0, dtype=torch.long)
    return {(a, i): names[id(_consumer(model, layer, a, none)[0])]
            for a in axes if a in COMPENSATED_AXES for i, layer in enumerate(decoder_layers(model))}


def _check_before_change(model: nn.Module, importance: Importance, config: PruneConfig, counts: dict[str, int],
                         sizes: dict[str, int], kept_layers: list[int], names: dict[tuple[str, int], str],
                         means: dict | None) -> None:
    """Every precondition of the surgery and the compensation that a later step would otherwise check after an
    earlier one has changed the model: the sizes of all axes together, and for each consumer that will be
    compensated its Hessian (present, sound, enough tokens) or its mean input. (Hidden pruning's module checks ran
    with `hidden_channel_cost`; depth pruning's run in `remove_layers_`, the first change.)"""
    width = [a for a in ORDER if a in config.structures and a != "layers"]
    combined: dict = {}
    for a in width:  # each size alone was checked by _feasible; together (heads with hidden, say) here
        combined.update(size_updates(model, a)(sizes[a] - counts[a]))
    reason = config_error(model.config, combined) if len(width) > 1 else None
    if reason is not None:
        raise ValueError(f"structure {config.structure!r}: the sizes {combined} together give a config that "
                         f"{type(model.config).__name__} rejects: {reason}".splitlines()[0])
    if config.compensate is None:
        return
    layers, comp = decoder_layers(model), config.compensate
    warnings = []
    for a in (a for a in width if a in COMPENSATED_AXES):
        for i in kept_layers:
            consumer = _consumer(model, layers[i], a, torch.zeros(0, dtype=torch.long))[0]
            name = names[a, i]
            tokens = int(importance.meta.get("tokens", {}).get(name, 0))
            if comp in _REFITS:
                hessian = importance.state(name) if name in importance.names else None
                warnings.append(check_hessian(name, hessian, consumer.in_features, tokens, compensate=comp))
            if comp in _MEANS:
                mean = means.get(a, {}).get(i)
                if mean is None or tuple(mean.shape) != (consumer.in_features,):
                    raise ValueError(f"compensate={comp!r}: the unit statistics hold no mean input of {name} of "
                                     f"{consumer.in_features} channels; gather them with ImportanceConfig(units=True)")
            if comp == "refit,mean" and tokens != means["tokens"][a][i]:
                # H/n - mu mu^T is a covariance only over one set of tokens (a restart by PruneSchedule(
                # pruned_stream=...), or a step skipped by one statistic only, makes them differ).
                raise ValueError(f"compensate='refit,mean': the Hessian of {name} counts {tokens:,} tokens and its "
                                 f"mean input {means['tokens'][a][i]:,}; both must be gathered over the same tokens "
                                 "(use compensate='refit' or 'mean')")
    warnings = [w for w in warnings if w]
    if warnings:
        more = len(warnings) - 1
        logger.warning("%s%s", warnings[0], f" (and {more} more module{'s' if more > 1 else ''})" if more else "")


def _consumer(model: nn.Module, layer: nn.Module, axis: str, idx: Tensor) -> tuple[nn.Linear, Tensor]:
    """The Linear that reads the units of `axis` and its input columns that belong to the units `idx`."""
    if axis == "neurons":
        return layer.mlp.down_proj, idx
    n_heads, n_kv, d = attn_geometry(model, layer.self_attn, detect_layout(model, "attn")[1])
    q = n_heads // n_kv * d  # a KV group's query heads are consecutive o_proj input columns
    return layer.self_attn.o_proj, (idx[:, None] * q + torch.arange(q)).flatten()


def _apply_width(model: nn.Module, importance: Importance, axis: str, scores: dict, kept_layers: list[int],
                 n_remove: int, names: dict[tuple[str, int], str], compensate: str | None, means: dict | None,
                 together_with: dict) -> dict:
    layers = decoder_layers(model)
    if axis == "hidden":
        keep = _keep(scores, n_remove)
        out = shrink_hidden_(model, keep, together_with=together_with)
        return {"kept": out["kept"], "removed": out["removed"]}
    keep = {j: _keep(scores[orig], n_remove) for j, orig in enumerate(kept_layers)}
    refits, shifts = {}, {}
    for j, idx in keep.items():  # from the dense weights, before they are sliced
        consumer, cols = _consumer(model, layers[j], axis, idx)
        w = consumer.weight.detach()
        if compensate in _REFITS:
            # The Hessian of the dense layer kept_layers[j] (checked by _check_before_change): over the consumer's
            # inputs, the units of `axis`, which no other axis cuts; a hidden cut removes the consumer's output rows
            # only, and the refit solves each row on its own, so cutting rows before or after it gives the same.
            h = importance.state(names[axis, kept_layers[j]]).to(w.device)
        if compensate == "refit":
            refits[j] = refit_columns(w, h, cols)
        elif compensate == "refit,mean":
            tokens = means["tokens"][axis][kept_layers[j]]  # equal to the Hessian's: checked by _check_before_change
            refits[j], shifts[j] = refit_mean(w, h, means[axis][kept_layers[j]], tokens, cols)
        elif compensate == "mean":
            shifts[j] = mean_shift(w, means[axis][kept_layers[j]], cols)
    if axis == "neurons":
        shrink_mlp_(model, keep)
    else:
        shrink_attention_(model, keep, together_with=together_with)
    for j in keep:
        consumer = layers[j].mlp.down_proj if axis == "neurons" else layers[j].self_attn.o_proj
        if j in refits:
            consumer.weight.data.copy_(refits[j])
        if j in shifts:
            consumer.bias.data.add_(shifts[j].to(consumer.bias.device, consumer.bias.dtype))
    return {"kept": {j: k.tolist() for j, k in keep.items()},
            "removed": {j: sorted(set(range(len(scores[kept_layers[j]]))) - set(k.tolist())) for j, k in keep.items()}}


def _mean_inputs(model: nn.Module, importance: Importance, config: PruneConfig,
                 axes: tuple[str, ...]) -> tuple[dict, list[str]]:
    """`compensate="mean"` / `"refit,mean"`: the consumers' mean inputs (and, under `"tokens"`, the tokens each was
    counted over) and the consumers to give a bias, checked before any change."""
    comp = config.compensate
    served = [a for a in axes if a in COMPENSATED_AXES]
    if not served:
        raise ValueError(f"compensate={comp!r} moves the mean output of removed MLP neurons / KV groups into a bias; "
                         f"structure {config.structure!r} removes neither: use compensate=None")
    if not importance.has_units:
        raise ValueError(f"compensate={comp!r} needs the mean input of down_proj / o_proj from the unit statistics: "
                         "gather them with ImportanceConfig(units=True)")
    if comp == "refit,mean" and importance.scorer.weighting != "uniform":
        # The Hessian then weighs step t's tokens by t, the unit sums do not: H/n - mu mu^T is no covariance.
        raise ValueError(f"compensate='refit,mean' needs the Hessian and the mean input over the same tokens, and "
                         f"ImportanceConfig(weighting={importance.scorer.weighting!r}) weighs the Hessian's steps: "
                         "gather it with weighting='uniform', or use compensate='refit' or 'mean'")
    consumers = ["down_proj" if a == "neurons" else "o_proj" for a in served]
    for c in consumers:  # refuses a consumer no config flag gives a bias; applied after depth pruning
        bias_plan(model, c, compensate=comp)
    means, state = importance.unit_means(), importance.unit_state()
    means["tokens"] = {a: {i: int(state[f"layers.{i}.{a}.tokens"]) for i in means[a]} for a in ("neurons", "heads")}
    return means, consumers


@torch.no_grad()
def prune_structures_(model: nn.Module, importance: Importance, config: PruneConfig) -> dict:
    """
    Removes units along `config.structures` in place (see the module docstring for the ranking and the budget).

    Args:
        model (`PreTrainedModel`): the dense model the importance was computed for (already validated by `prune_`).
        importance ([`Importance`]): its unit statistics (or, for neurons/heads, per-weight scores).
        config ([`PruneConfig`]): `structure`, `sparsity` or `target_params`, `unit_statistic`, `compensate`.

    Returns:
        `dict`: what `PruningReport.structured` holds: `structure`, `axes` (`{axis: {"before", "after", "removed"}}`:
        units per layer, or layers / hidden channels, and the removed indices), `config` and `num_parameters`
        (`{"before": ..., "after": ...}`), `target_params` (the count aimed at, or `None`), `compensation`; for a
        single neurons/heads axis also `unit`, `sparsity` and `units_per_layer` as `surgery.prune_structured_` gives.

    Raises:
        `ValueError`, one line, before the model is modified: an architecture that cannot take a structure (named),
        missing unit statistics or Hessians, a budget that empties a layer or the model, a size the config rejects
        (KV groups: the counts it accepts), hidden pruning with embeddings shared beyond the lm_head tie.
    """
    axes = tuple(a for a in ORDER if a in config.structures)
    if "neurons" in axes and has_experts(model):  # the neurons inside each expert: prune/expert_neurons.py
        return prune_expert_neurons_(model, importance, config)
    for a in axes:
        if a in ("neurons", "heads"):
            try:
                check_structured_supported(model, a)
            except ValueError as e:
                raise ValueError(f"structure {a!r} is not possible for {type(model).__name__}: {e}") from None
    sizes = axis_sizes(model, axes)
    rule = SizeRule(model, axes, sizes, config.round_to)  # heads and hidden sizes read together: the config may tie them
    rule.check_round_to()
    scores = _scores(model, importance, config, axes)
    if "hidden" in axes:  # hidden pruning's module checks, before any other work
        try:
            hidden_channel_cost(model)
        except ValueError as e:  # name the axis, as for neurons and heads (its message alone names a layout)
            raise ValueError(f"structure 'hidden' is not possible for {type(model).__name__}: {e}") from None
    if config.compensate == "refit" and not set(COMPENSATED_AXES) & set(axes):  # "mean" is refused in _mean_inputs
        # Else it would be recorded in sparsity.json and the card although nothing was refitted.
        raise ValueError(f"compensate='refit' refits the consumers (down_proj / o_proj) of removed MLP neurons / KV "
                         f"groups; structure {config.structure!r} removes neither: use compensate=None")
    if config.compensate in _REFITS and not importance.scorer.has_hessian:
        raise ValueError(f"compensate={config.compensate!r} needs input Hessians: importance from ImportanceConfig("
                         f"criterion='sparsegpt'), not {importance.criterion!r}")
    means, bias_for = _mean_inputs(model, importance, config, axes) if config.compensate in _MEANS else (None, [])
    before = num_params(model)
    t = config.target_params
    target = None if t is None else (t if isinstance(t, int) else round(t * before))
    if target is not None and target >= before:
        raise ValueError(f"target_params={t!r} keeps {target:,} parameters, not fewer than the model's {before:,}")
    width = [a for a in axes if a != "layers"]
    if target is None:
        counts = {a: num_to_prune(sizes[a], config.sparsity) for a in axes}
        for a in (a for a in width if config.round_to and a != "heads"):  # the kept width: the nearest multiple
            what = "hidden channels" if a == "hidden" else "neurons per layer"
            counts[a] = aligned_removal(sizes[a], config.sparsity, config.round_to, what)
        for a in axes:
            if counts[a] >= sizes[a]:
                what = "decoder layers" if a == "layers" else f"{a} per layer" if a != "hidden" else "hidden channels"
                raise ValueError(f"structure {a!r} would remove {counts[a]} of {sizes[a]} {what}; at least one must "
                                 "remain")
        _check_sizes(model, rule, counts, sizes)  # every size checked against the config before any change
        drop = torch.argsort(scores["layers"].float(), stable=True)[: counts["layers"]].sort().values.tolist() \
            if "layers" in axes else []
        filler, tolerance = None, None
    else:
        budget = _plan(model, importance, config, scores, axes, sizes, target, rule)
        counts, drop, filler, tolerance = budget.counts, budget.dropped, budget.filler, budget.tolerance
        width = sorted(width, key=lambda a: a == filler)  # the filling axis goes last: it meets the budget
    scores = _on_kept(scores, importance, config, drop)
    names = _consumer_names(model, axes) if config.compensate is not None else {}
    _check_before_change(model, importance, config, counts, sizes, [i for i in range(sizes["layers"]) if i not in drop],
                         names, means)
    # The model changes from here on; remove_layers_ (the first change) checks its own input before it.
    config_before = _config_sizes(model.config)
    out_axes: dict[str, dict] = {}
    kept_layers = list(range(sizes["layers"]))
    if "layers" in axes:
        kept_layers = remove_layers_(model, drop)
        out_axes["layers"] = {"before": sizes["layers"], "after": len(kept_layers), "removed": drop}
    # Zero biases (the model computes what it did), planned on the layers that remain; the consumers' take the shifts.
    bias_plans = [p for p in (bias_plan(model, c) for c in bias_for) if p is not None]
    for plan in bias_plans:
        add_biases_(model, plan)
    for a in width:
        if a == filler and bias_plans:  # the added biases were not in the plan: the filler absorbs them
            kept = {b: sizes[b] - counts[b] for b in rule.axes}
            counts[a] = _refill(model, a, sizes[a], len(kept_layers), target, rule, kept)
        if counts[a]:
            # The final sizes of every width axis: a tied config (hidden_size % num_attention_heads) is checked on
            # them together, not on the state between two cuts.
            together = rule.updates({b: sizes[b] - counts[b] for b in rule.axes})
            done = _apply_width(model, importance, a, scores[a], kept_layers, counts[a], names, config.compensate,
                                means, together)
        else:
            done = {"removed": {}}
        out_axes[a] = {"before": sizes[a], "after": sizes[a] - counts[a], "removed": done["removed"]}
    out_axes = {a: out_axes[a] for a in axes}  # the report in depth-then-width order, whatever the filler
    after = num_params(model)
    if target is not None and abs(after - target) > tolerance:  # only the biases of compensate="mean" can do this
        logger.warning("target_params=%r: kept %s parameters for %s, more than one step of the coarsest axis (%s) "
                       "off", t, f"{after:,}", f"{target:,}", f"{tolerance:,}")
    # What was compensated, not what was asked: a budget's split can leave every compensated axis uncut.
    compensation = config.compensate if any(counts.get(a) for a in width if a in COMPENSATED_AXES) else None
    if config.compensate is not None and compensation is None:
        logger.warning("compensate=%r: the split removed no MLP neuron or KV group, so nothing was compensated",
                       config.compensate)
    report = {
        "structure": config.structure,
        "axes": out_axes,
        "config": {"before": config_before, "after": _config_sizes(model.config)},
        "num_parameters": {"before": before, "after": after},
        "target_params": target,
        "target_tolerance": tolerance,
        "unit_statistic": config.unit_statistic if importance.has_units else "per-weight scores",
        "compensation": compensation,
        "round_to": config.round_to,
    }
    if bias_plans:
        report["bias_added"] = sorted(flag for flag, _ in bias_plans)  # config flags set for mean compensation
    if axes in (("neurons",), ("heads",)):
        a = axes[0]
        report.update(unit="mlp_neuron" if a == "neurons" else "kv_group", sparsity=counts[a] / sizes[a],
                      units_per_layer={"before": sizes[a], "after": sizes[a] - counts[a]},
                      removed=out_axes[a]["removed"])
    return report
