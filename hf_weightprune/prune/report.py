"""`PruningReport`: what a pruning did, written to `sparsity.json` by `save_pruned` and shown on the model card."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..collect.importance import Importance
from ..config import PruneConfig
from ..scorers import default_scope
from .masks import mask_sparsity

__all__ = ["PruningReport", "measure_input"]


def _importance_info(importance: Importance | None) -> dict[str, Any]:
    if importance is None:
        return {}
    return {
        "path": importance.path,
        "step": importance.step,
        "num_samples": importance.num_samples,
        "criterion": importance.criterion,
        "settings": {k: v for k, v in importance.config.to_dict().items() if k != "criterion"},
        # Activation criteria count the real tokens each Linear saw (the same for every Linear of a run, barring
        # skipped samples): the card says tokens, not "snapshots" (a forward is one sample of many tokens).
        "tokens": max(importance.meta.get("tokens", {}).values(), default=None),
        # gathered on the model before a structured prune, cut to the units it kept (`Importance.select`)
        **({"cut_to_kept_units": True} if importance.meta.get("cut_to_kept_units") else {}),
    }


def _routing_info(importance: Importance | None) -> dict[str, dict[str, Any]] | None:
    """Tokens routed per expert, per MoE layer, from the importance's router statistics (`None` without any): the
    compact summary `sparsity.json` keeps, since the card must not need the importance folder."""
    section = importance.sections.get("router") if importance is not None else None
    if not section:
        return None
    return {block: {"tokens": [int(n) for n in stats["tokens"]]} for block, stats in section.items()
            if stats.get("tokens") is not None}


@dataclass
class PruningReport:
    """
    What a pruning did: written to `sparsity.json` by `save_pruned` and shown on the model card.

    Build one with [`~PruningReport.for_config`] (then [`~PruningReport.add_mask`] per pruned tensor and
    [`~PruningReport.finalize`]) or, for masks that already exist (gradual pruning, a LoRA merge), with
    [`~PruningReport.from_masks`].

    Args:
        structure (`str`):
            `"unstructured"`, an N:M pattern such as `"2:4"`, `"neurons"` or `"heads"`.
        scope (`str`):
            `"global"`, `"layer"` or `"row"` (see [`PruneConfig`]).
        target_sparsity (`float` or `dict[str, float]`):
            The sparsity asked for (per module regex for a dict).
        criterion (`str`):
            Importance criterion, or `"unknown"`.
        tensors (`dict[str, dict]`):
            Per pruned weight, in model order: `{"shape": list[int], "numel": int, "sparsity": float}` (pruned
            fraction).
        global_sparsity (`float`):
            Zeros over the elements of the pruned tensors; for structured pruning, the fraction of parameters removed.
        model_sparsity (`float`):
            Zeros in the pruned tensors over all parameters of the model; for structured pruning, the fraction of
            the model's parameters removed.
        importance (`dict`):
            Where the importance came from: `path`, `step`, `num_samples`, `criterion`, `settings`.
        structured (`dict`, *optional*):
            For `"neurons"`/`"heads"`: the dict [`~surgery.prune_structured_`] returns, unchanged (its
            `num_parameters` is `{"before": int, "after": int}`). From [`~structured.prune_structures_`] it also
            records, per axis, the size before and the removed indices (the kept ones are their complement), what
            [`Importance.select`] reads to prune the smaller model again; `compensation` (`"refit"`, `"mean"` or
            `None`) and, when mean compensation had to create biases, `bias_added` (the config flags set).
        reconstruction (`str`, *optional*):
            `"OBS"` when the kept weights were updated to compensate for the pruned ones (SparseGPT's sweep).
        cross_term (`dict`, *optional*):
            With `PruneConfig(cross_alpha=...)`: `{"alpha": float, "weights": int}`, the share of the dense-to-pruned
            correction and how many pruned weights the OBS sweep solved the asymmetric objective for (the others,
            whose cross term was skipped or covers other tokens, the symmetric one).
        allocation (`str`, *optional*, defaults to `"uniform"`):
            `"owl"` when per-layer sparsities came from OWL.
        routing (`dict`, *optional*):
            For an importance with router statistics (an MoE model): per MoE block `{"tokens": list[int]}`, the
            tokens routed to each expert during training; after a whole-expert prune also `"removed"` (original
            expert indices) and `"removed_shares"` (each one's share of the layer's routed tokens), see
            [`~PruningReport.record_removed_experts`].
        search (`dict`, *optional*):
            When the structure was chosen by measured loss among candidates ([`~tools.search.search_structures`]):
            its `StructureSearch.to_dict()`, every candidate's loss and parameters and the one chosen.
        refitted_at (`int`, *optional*):
            The optimizer step at whose end a `PruneSchedule(refit_at=...)` re-fit of the kept weights ran
            (`MaskHolder.refitted_at`); `None` when none ran (no `refit_at`, or training stopped before it).
    """

    structure: str
    scope: str
    target_sparsity: float | dict[str, float]
    criterion: str
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    global_sparsity: float = 0.0  # zeros / elements over the pruned tensors
    model_sparsity: float = 0.0  # zeros in pruned tensors / all parameters of the model
    importance: dict[str, Any] = field(default_factory=dict)
    structured: dict[str, Any] | None = None
    reconstruction: str | None = None
    cross_term: dict[str, Any] | None = None
    allocation: str = "uniform"
    routing: dict[str, dict[str, Any]] | None = None
    search: dict[str, Any] | None = None
    refitted_at: int | None = None

    @classmethod
    def for_config(
        cls, importance: Importance | None, config: PruneConfig, *, sparsity: float | None = None
    ) -> PruningReport:
        """
        An empty report for pruning with `config` from `importance`.

        Args:
            importance ([`Importance`], *optional*):
                Where the scores come from; `None` records the criterion as `"unknown"`.
            config ([`PruneConfig`]):
                How the model is pruned.
            sparsity (`float`, *optional*):
                The target actually used when it overrides `config.sparsity` (a gradual schedule's current target).

        Returns:
            [`PruningReport`]: with no tensors yet.
        """
        return cls(
            structure=config.structure,
            scope=config.resolve_scope(importance.criterion if importance is not None else None),
            target_sparsity=config.sparsity if sparsity is None else sparsity,
            criterion=importance.criterion if importance is not None else "unknown",
            importance=_importance_info(importance),
            routing=_routing_info(importance),
        )

    @classmethod
    def from_masks(
        cls,
        masks: Mapping[str, torch.Tensor],
        model_numel: int,
        *,
        structure: str = "unstructured",
        scope: str | None = "layer",
        target_sparsity: float | dict[str, float] | None = None,
        importance: Importance | None = None,
    ) -> PruningReport:
        """
        The report of masks that already exist (gradual pruning's current masks, the zeros of merged weights).

        Args:
            masks (`Mapping[str, torch.BoolTensor]`):
                Keep-masks by canonical parameter name, `True` = keep; in the order the report should list them.
            model_numel (`int`):
                All parameters of the model, for `model_sparsity`.
            structure (`str`, *optional*, defaults to `"unstructured"`):
                As in [`PruneConfig`].
            scope (`str`, *optional*, defaults to `"layer"`):
                As in [`PruneConfig`]; `None` is resolved from the importance's criterion ([`~scorers.default_scope`]).
            target_sparsity (`float` or `dict[str, float]`, *optional*):
                The sparsity asked for; defaults to the achieved `global_sparsity`.
            importance ([`Importance`], *optional*):
                Where the scores came from, if any.

        Returns:
            [`PruningReport`]: finalized.

        Raises:
            `ValueError`: if `masks` is empty, or a mask is not a non-empty bool tensor.
        """
        if not masks:
            raise ValueError("masks is empty: there is nothing to report")
        if scope is None:
            scope = default_scope(importance.criterion if importance is not None else None)
        report = cls(structure=structure, scope=scope, target_sparsity=0.0,
                     criterion=importance.criterion if importance is not None else "unknown",
                     importance=_importance_info(importance), routing=_routing_info(importance))
        for name, mask in masks.items():
            report.add_mask(name, mask)
        report.finalize(model_numel)
        report.target_sparsity = report.global_sparsity if target_sparsity is None else target_sparsity
        return report

    def add_mask(self, name: str, mask: torch.Tensor) -> None:
        """
        Record one pruned tensor (in place).

        Args:
            name (`str`):
                Canonical parameter name.
            mask (`torch.BoolTensor`):
                Its keep-mask, `True` = keep.

        Raises:
            `ValueError`: if `mask` is not a non-empty bool tensor.
        """
        self.tensors[name] = {"shape": list(mask.shape), "numel": mask.numel(), "sparsity": mask_sparsity(mask)}

    def record_plan(self, plan: Any) -> None:
        """
        Record how a [`~plan.PruningPlan`] pruned (in place): its reconstruction, allocation and cross term.

        Args:
            plan ([`~plan.PruningPlan`]): the plan the recorded masks came from.
        """
        self.reconstruction = "OBS" if plan.reconstruct else None
        self.allocation = plan.config.allocation
        alpha = plan.config.cross_alpha
        self.cross_term = None if alpha is None else {"alpha": alpha, "weights": sum(n in plan.cross for n in self.tensors)}

    def record_removed_experts(self, removed: Mapping[str, list[int]]) -> None:
        """
        Record which experts a whole-expert prune removed, with the share of the layer's routed tokens each had
        received (in place, into `routing`).

        Args:
            removed (`Mapping[str, list[int]]`):
                MoE block name to the original indices of the removed experts (`structured["removed"]`).

        Raises:
            `ValueError`: a block the router statistics do not hold (they were recorded for another model).
        """
        for block, experts in removed.items():
            layer = (self.routing or {}).get(block)
            if layer is None:
                raise ValueError(f"{block}: removed experts of a layer without router statistics in this report")
            total = sum(layer["tokens"])
            layer["removed"] = sorted(int(e) for e in experts)
            # a layer no token reached (possible after a very short run) has no shares to state
            layer["removed_shares"] = [layer["tokens"][e] / total if total else None for e in layer["removed"]]

    def finalize(self, model_numel: int) -> PruningReport:
        """
        Compute `global_sparsity` and `model_sparsity` from the recorded tensors (in place).

        Args:
            model_numel (`int`):
                All parameters of the model (> 0).

        Returns:
            [`PruningReport`]: `self`.

        Raises:
            `ValueError`: if `model_numel` is not a positive int.
        """
        if isinstance(model_numel, bool) or not isinstance(model_numel, int) or model_numel <= 0:
            raise ValueError(f"model_numel must be a positive int (the model's parameter count); got {model_numel!r}")
        zeros = sum(round(v["sparsity"] * v["numel"]) for v in self.tensors.values())
        numel = sum(v["numel"] for v in self.tensors.values())
        self.global_sparsity = zeros / max(numel, 1)
        self.model_sparsity = zeros / model_numel
        return self

    def to_dict(self) -> dict[str, Any]:
        """
        Returns:
            `dict[str, Any]`: every field, JSON-serialisable (what `sparsity.json` is built from).
        """
        return asdict(self)

    def summary(self) -> str:
        """
        Returns:
            `str`: one line for logs and the CLI.
        """
        if self.structured:
            params = self.structured["num_parameters"]
            before, after = params["before"], params["after"]
            return f"{self.structure}: parameters {before:,} -> {after:,} ({1 - after / before:.1%} removed)"
        values = [v["sparsity"] for v in self.tensors.values()]
        # OWL sets one sparsity per layer: the line says so, with the range the tensors ended at
        owl = f", OWL: tensors {min(values):.2%} to {max(values):.2%}" if self.allocation == "owl" and values else ""
        return (f"{self.structure} ({self.scope}{owl}): {self.global_sparsity:.2%} of {len(self.tensors)} pruned "
                f"tensors, {self.model_sparsity:.2%} of all parameters")


def measure_input(model: torch.nn.Module) -> float:
    """The share of exact zeros in a model's prunable weights, measured as a pruned model's are
    ([`PruningReport.from_masks`] over `weight != 0`): what the model a prune, a sweep or a structure search starts
    from already holds, so that a loss measured on it is not called the dense model's when it is a pruned folder's.

    Args:
        model (`nn.Module`): the model as loaded, before it is pruned (any device, any dtype).

    Returns:
        `float`: zeros over the elements of every weight `moe.find_weights` selects (each `nn.Linear` but the output
        embedding, and expert slices), in [0, 1]; 0.0 for a dense model.

    Raises:
        ValueError: the model has no prunable weight (as `moe.find_weights`).
    """
    from ..moe import find_weights

    keep = {w.name: w.weight().detach() != 0 for w in find_weights(model)}
    return PruningReport.from_masks(keep, sum(p.numel() for p in model.parameters())).global_sparsity
