"""What the tracked weights leave out of a model, and why: no weight is skipped in silence.

The package scores and prunes `nn.Linear` weights and mixture-of-experts slices (`moe.find_weights`). A model whose
weights are mostly something else (GPT-2's `Conv1D`, a custom layer, experts excluded by a rule) would otherwise be
"pruned to 50%" with most of its weights untouched. [`weight_coverage`] measures the share of the parameters that
could be pruned (matrices outside the embeddings; norms and biases are 1-D) that the tracked weights cover, and names
what is left out; [`warn_if_uncovered`] says it when that share is under [`MIN_COVERAGE`]; [`refuse_conv1d`] refuses
by name the layer type this package knows it cannot handle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from .matching import canonical_name
from .moe import find_moe_blocks

__all__ = ["MIN_COVERAGE", "Coverage", "refuse_conv1d", "warn_if_uncovered", "weight_coverage"]

logger = logging.getLogger(__name__)

MIN_COVERAGE = 0.5  # below this share of the prunable parameters, the tracked weights are not "the model"


@dataclass
class Coverage:
    """The parameters the tracked weights cover.

    Attributes:
        covered (`int`): parameters in the tracked weights.
        total (`int`): parameters of every matrix (2-D or more) of the model outside its embeddings.
        left_out (`dict[str, str]`): each uncovered matrix (canonical parameter name) and why it is left out.
    """

    covered: int
    total: int
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """`covered / total` (1.0 for a model with no matrix outside its embeddings)."""
        return self.covered / self.total if self.total else 1.0

    def describe(self, limit: int = 4) -> str:
        """One line: the share and the first `limit` modules left out, with their reason."""
        shown = "; ".join(f"{name} ({why})" for name, why in list(self.left_out.items())[:limit])
        more = f"; ... {len(self.left_out) - limit} more" if len(self.left_out) > limit else ""
        return (f"the tracked weights cover {self.fraction:.1%} of the model's parameters outside embeddings and "
                f"norms ({self.covered:,} of {self.total:,}); left out: {shown}{more}")


def _embedding_ids(model: nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, get, None)
        module = fn() if callable(fn) else None
        if isinstance(getattr(module, "weight", None), nn.Parameter):
            ids.add(id(module.weight))
    return ids


def _why(module: nn.Module, attr: str, experts: set[int], routers: set[int]) -> str:
    kind = type(module).__name__
    if isinstance(module, nn.Linear) and id(module) not in routers:
        return "nn.Linear not selected by target_modules / exclude_modules"
    if id(module) in experts:
        return "expert slices not selected by target_modules / exclude_modules"
    if id(module) in routers:
        return "MoE router, removed with whole experts only"
    if kind == "Conv1D":
        return "transformers Conv1D, not supported"
    return f"{kind}.{attr}: not an nn.Linear or a fused expert weight"


def weight_coverage(model: nn.Module, tracked: Iterable) -> Coverage:
    """
    The share of `model`'s prunable parameters that `tracked` covers, and what it leaves out.

    Args:
        model (`nn.Module`): the model, possibly wrapped.
        tracked (`Iterable`): `TrackedWeight`s / `ExpertSlice`s (`moe.find_weights`); only `param` and `weight()`
            are read.

    Returns:
        [`Coverage`]: covered and total parameter counts; the uncovered matrices with the reason, in model order.

    Raises:
        `ValueError`: as `moe.find_moe_blocks` (fused experts this package cannot read, refused by name).
    """
    tracked = list(tracked)
    skip = _embedding_ids(model)
    covered_params = {id(t.param) for t in tracked}
    # a rule may track an untied lm_head, which the total leaves out with the embeddings
    covered = sum(t.weight().numel() for t in tracked if id(t.param) not in skip)
    blocks = find_moe_blocks(model)
    experts, routers = {id(b.experts) for b in blocks}, {id(b.router) for b in blocks}
    total, left_out, seen = 0, {}, set()
    for module_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in seen or id(p) in skip or p.dim() < 2:
                continue
            seen.add(id(p))
            total += p.numel()
            if id(p) not in covered_params:
                left_out[canonical_name(f"{module_name}.{attr}" if module_name else attr)] = _why(module, attr, experts, routers)
    return Coverage(covered, total, left_out)


def warn_if_uncovered(model: nn.Module, tracked: Iterable, where: str,
                      minimum: float = MIN_COVERAGE) -> Coverage:
    """
    Warn (one line) when `tracked` covers less than `minimum` of `model`'s prunable parameters.

    Args:
        model (`nn.Module`): the model.
        tracked (`Iterable`): the weights that will be scored or pruned.
        where (`str`): who asks (`"ImportanceCallback"`, `"prune_"`), the start of the message.
        minimum (`float`, *optional*, defaults to [`MIN_COVERAGE`]): the share under which to warn.

    Returns:
        [`Coverage`]: what [`weight_coverage`] measured.
    """
    cov = weight_coverage(model, tracked)
    if cov.fraction < minimum:
        logger.warning("%s: %s. Sparsity is reported over the tracked weights and over the whole model",
                       where, cov.describe())
    return cov


def refuse_conv1d(model: nn.Module) -> None:
    """
    Refuse a model built on transformers' `Conv1D` (GPT-2 style `[in, out]` weights), by module name.

    Raises:
        `ValueError`: one line naming the first `Conv1D` module.
    """
    for name, module in model.named_modules():
        if type(module).__name__ == "Conv1D":
            raise ValueError(f"{canonical_name(name)} is a transformers Conv1D (GPT-2 style, weight stored [in, out]), "
                             "which this package does not track or prune; use a model built on nn.Linear")
