"""`prune_`: importance -> masks -> zeros (unstructured, N:M) or a smaller model (neurons, heads).

Orchestration only: [`~plan.PruningPlan`] decides every tensor's target and builder (scope, N:M, per-module dict,
OWL, global threshold, OBS), [`~surgery.prune_structured_`] shrinks layers, [`~report.PruningReport`] records the
result. Scores are read one tensor at a time from the (possibly lazily loaded) importance, so the extra memory is
about one tensor plus small histograms whatever the model size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as D
from ..collect.importance import Importance
from ..config import PruneConfig
from ..coverage import warn_if_uncovered
from ..io_utils import check_arg_type
from ..matching import canonical_name, select_names
from ..moe import find_weights
from .expert_neurons import has_experts
from .experts import remove_experts_by_routing_
from .plan import PruningPlan
from .report import PruningReport

__all__ = ["PruningReport", "prune_", "refuse_tied"]

logger = logging.getLogger(__name__)


def refuse_tied(model: nn.Module, params: Mapping[str, torch.Tensor], names: list[str]) -> None:
    """
    Refuse to zero a weight that another parameter shares (`tie_word_embeddings`: lm_head = input embedding).

    Args:
        model (`nn.Module`):
            The model (or its meta-device skeleton) whose parameters may alias each other.
        params (`Mapping[str, torch.Tensor]`):
            Canonical parameter name to the parameter object of `model`.
        names (`list[str]`):
            The names about to be pruned.

    Raises:
        `ValueError`: naming the first weight to prune that is tied to another parameter, and the fix.
    """
    aliases: dict[int, list[str]] = {}
    for raw, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(canonical_name(raw))
    for name in names:
        other = [a for a in aliases.get(id(params[name]), []) if a != name]
        if other:
            raise ValueError(
                f"{name} is tied to {other[0]} (tie_word_embeddings): pruning it would zero that weight too. Untie "
                "first (model.config.tie_word_embeddings = False; give lm_head its own copy: "
                "model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone())) or exclude it from pruning"
            )


@torch.no_grad()
def prune_(model: nn.Module, importance: Importance, config: PruneConfig | None = None, *,
           progress: bool = True) -> PruningReport:
    """
    Prune `model` in place from `importance`: zero weights (unstructured, N:M, also of each expert of an MoE model), or
    remove MLP neurons, KV groups, hidden channels, decoder layers (`"neurons"`, `"heads"`, `"hidden"`, `"layers"` or a
    combination, with `sparsity` or a `target_params` budget, see `prune/structured.py`) or whole experts
    (`"experts"`: by the tokens the routers sent them during training, the fewest first, the same number in every MoE
    layer), which physically shrink the model; rebuild any optimizer afterwards.

    Args:
        model (`nn.Module`):
            The model the importance was computed for (validated: names and shapes).
        importance ([`Importance`]):
            From `ImportanceCallback.importance()` or `load_importance()`.
        config ([`PruneConfig`], *optional*):
            Defaults to `PruneConfig()`: 50% unstructured, in the criterion's default scope (`"row"` for wanda, see
            [`~scorers.default_scope`]); a tensor is never pruned to 100% unless `allow_collapse=True`.
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm bar.

    Returns:
        [`PruningReport`]: per pruned tensor its shape, numel and achieved sparsity, plus global and model
        sparsity; for structured pruning, `structured` holds what [`~surgery.prune_structured_`] returned.

    Raises:
        `ValueError`, before the model is modified: importance from another model, nothing selected, a weight tied to
        another one, an N:M weight whose input dim is not a multiple of `m`, an unsupported structured layout, or a
        tensor that would be pruned to 100% (unless `config.allow_collapse`).
    """
    check_arg_type("prune_", "importance", importance, Importance,
                   "an Importance from load_importance(path) or ImportanceCallback.importance()")
    check_arg_type("prune_", "config", config, (PruneConfig, type(None)), "a PruneConfig or None")
    config = config or PruneConfig()
    importance.bind(model)
    params = dict(importance.weights)
    report = PruningReport.for_config(importance, config)
    if config.kind == "experts":
        report.structured = remove_experts_by_routing_(model, importance, config.sparsity)
        report.record_removed_experts(report.structured["removed"])
        params_count = report.structured["num_parameters"]
        report.global_sparsity = report.model_sparsity = 1 - params_count["after"] / params_count["before"]
        return report
    if config.structures and (importance.has_units or config.kind not in ("neurons", "heads")
                              or config.target_params is not None or config.compensate is not None
                              or config.unit_statistic != "activation"  # a chosen statistic: refused there if missing
                              or (config.kind == "neurons" and has_experts(model))):
        return _prune_structures(model, importance, config, report)
    if config.kind in ("neurons", "heads"):
        from .surgery import prune_structured_

        report.structured = prune_structured_(model, importance.scores, structure=config.kind,
                                              sparsity=config.sparsity)
        _warn_one_unit_left(config, report.structured)
        params_count = report.structured["num_parameters"]
        report.global_sparsity = 1 - params_count["after"] / params_count["before"]
        report.model_sparsity = report.global_sparsity  # removed parameters over all of the model's, before
        return report

    names = select_names(importance.names, config.target_modules, config.exclude_modules)
    refuse_tied(model, params, names)
    _warn_coverage(model, importance, names)
    plan = PruningPlan.build(importance, config, names)  # every other check, before any weight changes
    obs = ", OBS" if plan.reconstruct else ""
    for name in tqdm(names, desc=f"pruning ({config.structure}, {plan.scope}{obs})", disable=not D.show_progress(progress)):
        edit = plan.edit(name)
        if edit is not None:
            report.add_mask(name, edit(params[name]))
    report.record_plan(plan)
    return report.finalize(sum(p.numel() for p in model.parameters()))


def _prune_structures(model: nn.Module, importance: Importance, config: PruneConfig,
                      report: PruningReport) -> PruningReport:
    """Hidden channels, layers, combinations, budgets, compensation, unit statistics: `structured.py`."""
    from .structured import prune_structures_

    report.structured = prune_structures_(model, importance, config)
    _warn_one_unit_left(config, report.structured)
    params_count = report.structured["num_parameters"]
    report.global_sparsity = 1 - params_count["after"] / params_count["before"]
    report.model_sparsity = report.global_sparsity  # removed parameters over all of the model's, before
    if report.target_sparsity is None:  # a target_params budget: the share of parameters it removed
        report.target_sparsity = report.global_sparsity
    return report


def _warn_one_unit_left(config: PruneConfig, structured: dict) -> None:
    """Warn when a structured prune keeps a single MLP neuron or KV group per decoder layer: in range, so not refused
    (a sweep may go there), but the model is unlikely to be useful. The same warning with or without unit statistics
    (`_prune_structures` records per-axis counts, the per-weight path one `units_per_layer`)."""
    axes = structured.get("axes") or {}
    counts = {a: (axes[a].get("before"), axes[a].get("after")) for a in ("neurons", "heads") if a in axes}
    if not counts and structured.get("units_per_layer"):
        counts = {config.kind: (structured["units_per_layer"]["before"], structured["units_per_layer"]["after"])}
    for axis, (before, after) in counts.items():
        if isinstance(before, int) and after == 1 < before:
            budget = (f"at sparsity {config.sparsity:g}" if config.target_params is None
                      else f"at target_params {config.target_params:g}")
            logger.warning("structure=%r %s keeps 1 of %d units per decoder layer (%s): the model is unlikely to be "
                           "useful; lower the %s", config.structure, budget, before,
                           "KV groups" if axis == "heads" else "MLP neurons",
                           "sparsity" if config.target_params is None else "budget")


def _warn_coverage(model: nn.Module, importance: Importance, names: list[str]) -> None:
    """Warn when the weights about to be pruned are a small share of the model's prunable parameters (the report's
    `model_sparsity` then says how little of the model was pruned)."""
    selected = set(names)
    weights = [w for w in find_weights(model, importance.config.target_modules, importance.config.exclude_modules)
               if w.name in selected]
    warn_if_uncovered(model, weights, "prune_")
