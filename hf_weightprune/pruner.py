"""`prune_`: importance -> masks -> zeros (unstructured, N:M) or a smaller model (neurons, heads).

Pure orchestration over `masks` (mask builders, streaming global threshold) and `surgery` (structured
shrinking). Scores are computed one tensor at a time from the (possibly lazily loaded) importance, so the
extra memory is about one tensor plus small histograms whatever the model size.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import masks as M
from .config import PruneConfig
from .importance import Importance
from .matching import canonical_name, module_matches


@dataclass
class PruningReport:
    """What `prune_` did. `tensors` maps each pruned weight to its shape, numel and achieved sparsity."""

    structure: str
    scope: str
    target_sparsity: float | dict[str, float]
    criterion: str
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    global_sparsity: float = 0.0  # zeros / elements over the pruned tensors
    model_sparsity: float = 0.0  # zeros in pruned tensors / all parameters of the model
    importance: dict[str, Any] = field(default_factory=dict)
    structured: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def for_masks(cls, masks, model, importance=None, *, structure, scope, target):
        tensors = {n: {"shape": list(m.shape), "numel": m.numel(), "sparsity": M.mask_sparsity(m)}
                   for n, m in masks.items()}
        zeros = sum(m.numel() - int(m.count_nonzero()) for m in masks.values())
        info = {}
        if importance is not None:
            info = {"path": importance.path, "step": importance.step, "num_samples": importance.num_samples,
                    "criterion": importance.criterion}
        return cls(structure=structure, scope=scope, target_sparsity=target,
                   criterion=importance.criterion if importance is not None else "unknown", tensors=tensors,
                   global_sparsity=zeros / max(sum(m.numel() for m in masks.values()), 1),
                   model_sparsity=zeros / sum(p.numel() for p in model.parameters()), importance=info)

    def summary(self) -> str:
        if self.structured:
            before, after = self.structured["num_parameters"]
            return f"{self.structure}: parameters {before:,} -> {after:,} ({1 - after / before:.1%} removed)"
        return (f"{self.structure} ({self.scope}): {self.global_sparsity:.2%} of {len(self.tensors)} pruned tensors, "
                f"{self.model_sparsity:.2%} of all parameters")


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


def _selected(imp: Importance, config: PruneConfig) -> list[str]:
    names = [n for n in imp.names
             if (config.target_modules is None or module_matches(_module_of(n), config.target_modules))
             and not module_matches(_module_of(n), config.exclude_modules)]
    if not names:
        raise ValueError("No tracked weight is selected for pruning: check PruneConfig target/exclude_modules")
    return names


def _refuse_tied(model: nn.Module, params: dict[str, nn.Parameter], names: list[str]) -> None:
    """Refuse to zero a weight that another parameter shares (`tie_word_embeddings`: lm_head = input embedding)."""
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


def _sparsity_of(name: str, sparsity: float | dict[str, float]) -> float | None:
    if not isinstance(sparsity, dict):
        return sparsity
    module = _module_of(name)
    for pattern, value in sparsity.items():
        if re.fullmatch(pattern, module):
            return value
    return None


def new_report(importance: Importance, config: PruneConfig) -> PruningReport:
    return PruningReport(
        structure=config.structure, scope=config.scope, target_sparsity=config.sparsity,
        criterion=importance.criterion,
        importance={"path": importance.path, "step": importance.step, "num_samples": importance.num_samples,
                    "criterion": importance.criterion,
                    "settings": {k: v for k, v in importance.config.to_dict().items() if k != "criterion"}},
    )


def mask_builder(importance: Importance, config: PruneConfig, names: list[str]) -> Callable[[str], torch.Tensor | None]:
    """`name -> keep-mask` (or `None` for a name no sparsity applies to), callable in any order.

    Global thresholds are computed here, up front (streaming over the importance); each mask is then built on
    demand from one tensor's ranking, so a caller can walk the weights in its own order (checkpoint shards).
    """
    if config.kind == "N:M":
        n, m = config.nm
        return lambda name: M.nm_mask(importance.ranking(name), n, m)
    if config.scope == "global":
        thresholds: dict[str, M.GlobalThreshold] = {}
        groups: dict[float, list[str]] = {}
        for name in names:
            s = _sparsity_of(name, config.sparsity)
            if s is not None:
                groups.setdefault(s, []).append(name)
        for s, group in groups.items():
            thr = M.compute_global_threshold(lambda g=group: ((n, importance.ranking(n)) for n in g), s)
            thresholds.update(dict.fromkeys(group, thr))
        return lambda name: thresholds[name].mask(name, importance.ranking(name)) if name in thresholds else None
    build = M.unstructured_mask if config.scope == "layer" else M.row_mask

    def one(name: str) -> torch.Tensor | None:
        s = _sparsity_of(name, config.sparsity)
        return None if s is None else build(importance.ranking(name), s)

    return one


def record(report: PruningReport, name: str, mask: torch.Tensor) -> None:
    report.tensors[name] = {"shape": list(mask.shape), "numel": mask.numel(), "sparsity": M.mask_sparsity(mask)}


def finish_report(report: PruningReport, model_numel: int) -> PruningReport:
    zeros = sum(round(v["sparsity"] * v["numel"]) for v in report.tensors.values())
    numel = sum(v["numel"] for v in report.tensors.values())
    report.global_sparsity = zeros / max(numel, 1)
    report.model_sparsity = zeros / model_numel
    return report


@torch.no_grad()
def prune_(model: nn.Module, importance: Importance, config: PruneConfig | None = None, *,
           progress: bool = True) -> PruningReport:
    """Prune `model` in place from `importance` and return a [`PruningReport`].

    Args:
        model (`nn.Module`): the model the importance was computed for (validated: names and shapes).
        importance (`Importance`): from `ImportanceCallback.importance()` or `load_importance()`.
        config (`PruneConfig`, *optional*): defaults to 50% unstructured, global threshold.
        progress (`bool`, *optional*, defaults to `True`): show tqdm bars.
    """
    config = config or PruneConfig()
    importance.bind(model)
    params = dict(importance.weights)
    report = new_report(importance, config)
    if config.kind in ("neurons", "heads"):
        from .surgery import prune_structured_

        before = sum(p.numel() for p in model.parameters())
        info = prune_structured_(model, importance.scores, structure=config.kind, sparsity=config.sparsity)
        after = sum(p.numel() for p in model.parameters())
        report.structured = {**info, "num_parameters": [before, after]}
        report.global_sparsity = 1 - after / before
        return report

    names = _selected(importance, config)
    _refuse_tied(model, params, names)
    masks = mask_builder(importance, config, names)
    for name in tqdm(names, desc=f"pruning ({config.structure}, {config.scope})", disable=not progress):
        mask = masks(name)
        if mask is not None:
            M.apply_mask_(params[name], mask.to(params[name].device))
            record(report, name, mask)
    return finish_report(report, sum(p.numel() for p in model.parameters()))


refuse_tied = _refuse_tied


def compute_masks(importance, config, names=None, *, sparsity=None, previous=None):
    import math

    names = list(importance.names) if names is None else names
    sparsity = config.sparsity if sparsity is None else sparsity
    previous = previous or {}

    def score(name):
        s = importance.score(name).float()
        old = previous.get(name)
        return s if old is None else s.masked_fill(~old.to(s.device), -math.inf)

    if config.nm is not None:
        return lambda n: M.nm_capped_mask(score(n), sparsity, *config.nm)
    if config.scope == "global":
        thr = M.compute_global_threshold(lambda: ((n, score(n)) for n in names), sparsity)
        return lambda n: thr.mask(n, score(n))
    build = M.unstructured_mask if config.scope == "layer" else M.row_mask
    return lambda n: build(score(n), sparsity)
