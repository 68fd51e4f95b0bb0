"""`prune_`: importance -> masks -> zeros (unstructured, N:M) or a smaller model (neurons, heads).

Pure orchestration over `masks` (mask builders, streaming global threshold) and `surgery` (structured
shrinking). Scores are computed one tensor at a time from the (possibly lazily loaded) importance, so the
extra memory is about one tensor plus small histograms whatever the model size.
"""

from __future__ import annotations

import re
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
    report = PruningReport(
        structure=config.structure, scope=config.scope, target_sparsity=config.sparsity,
        criterion=importance.criterion,
        importance={"path": importance.path, "step": importance.step, "num_samples": importance.num_samples,
                    "criterion": importance.criterion,
                    "settings": {k: v for k, v in importance.config.to_dict().items() if k != "criterion"}},
    )
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
    bar = tqdm(total=len(names), desc=f"pruning ({config.structure}, {config.scope})", disable=not progress)

    def finish(name: str, mask: torch.Tensor) -> None:
        M.apply_mask_(params[name], mask.to(params[name].device))
        report.tensors[name] = {"shape": list(mask.shape), "numel": mask.numel(), "sparsity": M.mask_sparsity(mask)}
        bar.update()

    if config.kind == "N:M":
        n, m = config.nm
        for name in names:
            finish(name, M.nm_mask(importance.ranking(name), n, m))
    elif config.scope == "global":
        groups: dict[float, list[str]] = {}
        for name in names:
            s = _sparsity_of(name, config.sparsity)
            if s is not None:
                groups.setdefault(s, []).append(name)
        for s, group in groups.items():
            thr = M.compute_global_threshold(lambda g=group: ((n, importance.ranking(n)) for n in g), s)
            for name in group:
                finish(name, thr.mask(name, importance.ranking(name)))
    else:
        build = M.unstructured_mask if config.scope == "layer" else M.row_mask
        for name in names:
            s = _sparsity_of(name, config.sparsity)
            if s is not None:
                finish(name, build(importance.ranking(name), s))
    bar.close()
    zeros = sum(round(v["sparsity"] * v["numel"]) for v in report.tensors.values())
    numel = sum(v["numel"] for v in report.tensors.values())
    report.global_sparsity = zeros / max(numel, 1)
    report.model_sparsity = zeros / sum(p.numel() for p in model.parameters())
    return report
