"""Structured neurons inside each expert: `structure="neurons"` on a mixture-of-experts model.

An expert's intermediate neuron `j` is row `j` of its `gate_proj` and `up_proj` slices and column `j` of its
`down_proj` slice (`moe.ExpertSlice`), stored in the fused `gate_up_proj` `[E, 2I, H]` / `down_proj` `[E, H, I]`
(transposed and interleaved layouts too). Neurons are ranked per expert as `unit_scores.neuron_scores` ranks a dense
MLP's: each slice's per-weight scores divided by their mean, summed over the neuron's row or column.

The same count is removed from every expert of every MoE layer, because the config holds one expert width
(`moe_intermediate_size` for Qwen2/3-MoE, `intermediate_size` for Mixtral, OLMoE and gpt-oss, the key whose value is
the experts' width); which neurons go differs per expert. The width kept is a multiple of 8 (`ALIGN`: stock
transformers' `grouped_mm` experts kernel needs it); with `PruneConfig(round_to=N)` it is rounded to the nearest
multiple of both `N` and 8 (`lcm(N, 8)`), the sizes both constraints accept. Shared experts (Qwen2-MoE's `shared_expert`, a dense MLP
sized by `shared_expert_intermediate_size`) and the dense MLPs of non-MoE layers keep theirs: only the routed experts
shrink. The result is a plain checkpoint stock transformers loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..collect.importance import Importance
from ..config import PruneConfig
from ..layouts import model_configs
from ..moe import MoeBlock, find_moe_blocks
from ..validation import check_sparsity
from .budget import aligned_removal
from .masks import num_to_prune
from .plan import refuse_unseen
from .surgery import config_error

__all__ = ["expert_neuron_scores", "has_experts", "prune_expert_neurons_", "remove_expert_neurons_"]

# Config keys of the routed experts' width, in the order they are looked for (Qwen-MoE's first: its
# `intermediate_size` is the width of its dense layers).
WIDTH_KEYS = ("moe_intermediate_size", "intermediate_size")
# Neurons kept per expert must be a multiple of this: `grouped_mm`, the experts kernel `from_pretrained` picks by
# default in transformers 5, refuses rows that are not a multiple of 16 bytes (8 neurons in bfloat16 / float16, which
# also covers float32); an unaligned width would load and then fail at the first forward.
ALIGN = 8
# The experts module's own copy of the width (`intermediate_dim`; gpt-oss: `intermediate_size`).
_MODULE_WIDTH_KEYS = ("intermediate_dim", "intermediate_size")


def has_experts(model: nn.Module) -> bool:
    """Whether `model` has mixture-of-experts layers (fused expert weights): `structure="neurons"` then shrinks the
    neurons inside each expert."""
    return bool(find_moe_blocks(model))


def expert_width(block: MoeBlock) -> int:
    """Intermediate neurons per expert of `block` (`I`)."""
    down = block.experts.down_proj
    return int(down.shape[1] if block.layout.transposed else down.shape[2])


def _width_key(model: nn.Module, width: int) -> tuple[str, list]:
    """The config key holding the experts' width, and the configs that hold it."""
    for key in WIDTH_KEYS:
        holders = [c for c in model_configs(model) if getattr(c, key, None) == width]
        if holders:
            return key, holders
    raise ValueError(f"config: no expert width ({' / '.join(WIDTH_KEYS)}) equal to the experts' {width} neurons to "
                     "record the smaller model in")


def expert_neuron_scores(scores: Mapping[str, Tensor], block: MoeBlock) -> Tensor:
    """
    One score per intermediate neuron of every expert of `block`, from per-weight scores of its slices.

    Args:
        scores (`Mapping[str, Tensor]`): slice name (`<experts>.<e>.<proj>.weight`) to `[out, in]` scores, higher =
            more important (`Importance.scores`).
        block (`MoeBlock`): the MoE layer.

    Returns:
        `Tensor`: `[E, I]` float32; for neuron `j` of expert `e`, the sum of row `j` of its gate/up slices and column
        `j` of its down slice, each slice's scores divided by their mean absolute value first (so no projection
        dominates by scale). Unscored slices add nothing.

    Raises:
        `ValueError`: one line naming the expert when none of its slices is scored, or a score of the wrong shape.
    """
    out = torch.zeros(block.num_experts, expert_width(block))
    by_name = {s.name: s for s in block.slices()}
    for s in by_name.values():
        score = scores.get(s.name)
        if score is None:
            continue
        if tuple(score.shape) != tuple(s.shape):
            raise ValueError(f"{s.name}: score of shape {tuple(score.shape)}, the slice is {tuple(s.shape)}")
        score = score.detach().float().cpu()
        scale = score.abs().mean()
        if scale > 0:  # an all-zero score carries no ranking: it adds nothing rather than NaN
            out[s.expert] += (score / scale).sum(dim=0 if s.proj == "down_proj" else 1)
    for e in range(block.num_experts):
        if not any(f"{block.experts_name}.{e}.{p}.weight" in scores for p in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"{block.experts_name}.{e}: no importance scores for any of its slices; track the expert "
                             "projections or choose another structure")
    return out


def _rows(block: MoeBlock, keep: Tensor, fused: int) -> Tensor:
    """Positions along the intermediate axis of a fused tensor of `fused` (I or 2I) entries that `keep` keeps."""
    width = expert_width(block)
    if fused == width:
        return keep
    if block.layout.concatenated:  # [gate; up]
        return torch.cat([keep, keep + width])
    return (2 * keep[:, None] + torch.arange(2)).flatten()  # gate and up rows alternate


def _intermediate_dim(block: MoeBlock, attr: str, t: Tensor) -> int:
    """The dimension of the experts module's tensor `attr` along the intermediate neurons."""
    transposed = block.layout.transposed
    if attr in ("gate_up_proj", "up_proj"):
        return 2 if transposed else 1
    if attr == "down_proj":
        return 1 if transposed else 2
    if attr in ("gate_up_proj_bias", "up_proj_bias"):
        return 1
    return -1  # down_proj_bias [E, H]: no neuron axis


def _check(model: nn.Module, blocks: list[MoeBlock], remove: Mapping[str, Sequence[Sequence[int]]]) -> tuple:
    """Every problem is found here, before any tensor changes. Returns `(width, count, key, configs)`."""
    if not blocks:
        raise ValueError("structure='neurons' per expert: the model has no mixture-of-experts layer")
    by_name = {b.name: b for b in blocks}
    unknown = sorted(set(remove) - set(by_name))
    if unknown:
        raise ValueError(f"{unknown[0]}: not an MoE block of this model (blocks: {', '.join(sorted(by_name))})")
    widths = {expert_width(b) for b in blocks}
    if len(widths) > 1:
        raise ValueError(f"MoE layers have different expert widths {sorted(widths)}; one config size needs one width")
    width = widths.pop()
    counts = set()
    for b in blocks:
        per_expert = remove.get(b.name) or [[]] * b.num_experts
        if len(per_expert) != b.num_experts:
            raise ValueError(f"{b.experts_name}: {len(per_expert)} lists of neurons for {b.num_experts} experts")
        for e, idx in enumerate(per_expert):
            idx = [int(i) for i in idx]
            where = f"{b.experts_name}.{e}"
            if len(set(idx)) != len(idx) or any(not 0 <= i < width for i in idx):
                raise ValueError(f"{where}: neuron indices must be distinct and in [0, {width}), got {idx}")
            if len(idx) == width:
                raise ValueError(f"{where}: removing all {width} intermediate neurons of the expert")
            counts.add(len(idx))
        for attr, _ in b.experts.named_parameters(recurse=False):
            if attr not in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias",
                            "down_proj_bias"):
                raise ValueError(f"{b.experts_name}.{attr}: an expert tensor this package cannot shrink by neuron")
    if len(counts) > 1:
        raise ValueError(f"config: one expert width for every expert; remove the same number of neurons from each "
                         f"expert of every MoE layer (asked: {sorted(counts)})")
    count = counts.pop()
    left = width - count
    if count and left % ALIGN:
        kept = list(range(ALIGN, width, ALIGN))
        # the sparsities that land on those widths, so the user need not invert the rounding
        fits = ", ".join(f"{(width - k) / width:.4g}" for k in reversed(kept))
        raise ValueError(f"{blocks[0].experts_name}.down_proj: {left} neurons per expert; keep a multiple of {ALIGN} "
                         f"(of {width}: {kept}): transformers' default experts kernel (grouped_mm) needs rows of a "
                         f"multiple of 16 bytes, and a checkpoint is often loaded in bfloat16; sparsity={fits} keeps "
                         f"{', '.join(map(str, reversed(kept)))} neurons")
    key, holders = _width_key(model, width)
    for c in holders:
        shared = getattr(c, "n_shared_experts", None)
        if count and key == "moe_intermediate_size" and isinstance(shared, int) and shared > 0:
            # DeepSeek-V2/V3, GLM-4-MoE: the shared experts are built `moe_intermediate_size * n_shared_experts` wide
            raise ValueError(f"config.{key}: {type(c).__name__} also sizes the shared experts ({key} * "
                             f"n_shared_experts = {width * shared}), which keep their neurons; a smaller {key} would "
                             "not reload with stock transformers (neurons inside experts are not supported here yet; "
                             "structure='experts' or unstructured pruning are)")
        error = config_error(c, {key: width - count})
        if error is not None:
            raise ValueError(f"config.{key}: {type(c).__name__} rejects {width - count} neurons per expert: {error}")
    return width, count, key, holders


def remove_expert_neurons_(model: nn.Module, remove: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, list]:
    """
    Remove intermediate neurons of every expert in place: gate/up rows and down columns of the fused tensors.

    Args:
        model (`nn.Module`): an MoE model (not wrapped by peft: merge adapters first).
        remove (`Mapping[str, Sequence[Sequence[int]]]`): block name (`MoeBlock.name`) to, for each expert in order,
            the neuron indices to remove. Every expert of every MoE layer must lose the same number (one config
            width); a block not listed loses none.

    Returns:
        `dict[str, list[list[int]]]`: block name to each expert's kept neurons (original indices, in order). The
        expert tensors are new `nn.Parameter`s (build an optimizer afterwards); earlier `MoeBlock` / `ExpertSlice`
        objects are stale.

    Raises:
        `ValueError`: one line naming the parameter, before any change: an unknown block, bad indices, all neurons
        of an expert, unequal counts, a width that is not a multiple of `ALIGN` or that the config rejects or cannot
        record, an expert tensor of unknown role.
    """
    blocks = find_moe_blocks(model)
    width, count, key, holders = _check(model, blocks, remove)
    kept = {}
    for b in blocks:
        per_expert = remove.get(b.name) or [[]] * b.num_experts
        keep = [torch.tensor(sorted(set(range(width)) - {int(i) for i in idx}), dtype=torch.long)
                for idx in per_expert]
        kept[b.name] = [k.tolist() for k in keep]
        if not count:
            continue
        for attr, t in list(b.experts.named_parameters(recurse=False)):
            dim = _intermediate_dim(b, attr, t)
            if dim < 0:
                continue
            with torch.no_grad():  # t[e] drops the expert dim: the neuron axis moves one down
                new = torch.stack([t[e].index_select(dim - 1, _rows(b, k, t.shape[dim]).to(t.device))
                                   for e, k in enumerate(keep)]).contiguous()
            setattr(b.experts, attr, nn.Parameter(new, requires_grad=t.requires_grad))
        for attr in _MODULE_WIDTH_KEYS:
            if getattr(b.experts, attr, None) == width:
                setattr(b.experts, attr, width - count)
    for c in holders:
        setattr(c, key, width - count)
    return kept


@torch.no_grad()
def prune_expert_neurons_(model: nn.Module, importance: Importance, config: PruneConfig) -> dict:
    """
    `prune_(model, importance, PruneConfig(structure="neurons", sparsity=s))` on an MoE model: in every expert, the
    `num_to_prune(I, s)` neurons of lowest [`expert_neuron_scores`] are removed (ties: the lower index first).

    Args:
        model (`nn.Module`): the MoE model the importance was computed for (validated by `prune_`).
        importance ([`Importance`]): per-weight scores of the expert slices.
        config ([`PruneConfig`]): `structure="neurons"` and `sparsity`, and `round_to` (the kept width is then the
            nearest multiple of `lcm(round_to, 8)`); combinations, `target_params` and `compensate` are refused on an
            MoE model.

    Returns:
        `dict`: what `PruningReport.structured` (and `sparsity.json`) holds, in the shape of
        `surgery.prune_structured_`'s: `structure`, `unit` (`"expert_neuron"`), `sparsity`, `units_per_layer`
        (neurons per expert), `config` (the width key, before / after), `kept` / `removed` (block name to one sorted
        list per expert), `num_parameters`, `unit_statistic` (`"per-weight scores"`), `shared_experts` (`"kept"`),
        `round_to` (`PruneConfig.round_to`).

    Raises:
        `ValueError`: one line, before any change: another structure beside neurons, a budget or compensation, a
        sparsity that removes every neuron, missing scores, or as [`remove_expert_neurons_`].
    """
    if config.structures != ("neurons",) or config.target_params is not None or config.compensate is not None:
        raise ValueError(f"structure={config.structure!r} on a mixture-of-experts model: only structure='neurons' "
                         "alone, with a sparsity (no target_params, no compensate), shrinks the experts")
    sparsity = check_sparsity("sparsity", config.sparsity)
    blocks = find_moe_blocks(model)
    if importance.scorer.source == "activations":  # an expert no token reached would lose arbitrary neurons
        refuse_unseen(importance, [s.name for b in blocks for s in b.slices() if s.name in importance.shapes],
                      can_exclude=False)
    scores = importance.scores
    ranked = {b.name: expert_neuron_scores(scores, b) for b in blocks}  # every block scored before any change
    width = expert_width(blocks[0])
    multiple = math.lcm(config.round_to, ALIGN) if config.round_to else None  # what both the kernel and the user want
    n_remove = aligned_removal(width, sparsity, multiple, "neurons per expert") if multiple \
        else num_to_prune(width, sparsity)
    if n_remove >= width:
        raise ValueError(f"sparsity={sparsity} would remove {n_remove} of {width} neurons of every expert; at least "
                         "one must remain")
    remove = {name: [sorted(torch.sort(row, stable=True).indices[:n_remove].tolist()) for row in s]
              for name, s in ranked.items()}
    key = _width_key(model, width)[0]
    before = sum(p.numel() for p in model.parameters())
    kept = remove_expert_neurons_(model, remove)
    return {"structure": "neurons", "unit": "expert_neuron", "sparsity": sparsity,
            "units_per_layer": {"before": width, "after": width - n_remove},
            "config": {"before": {key: width}, "after": {key: width - n_remove}},
            "kept": kept, "removed": remove,
            "num_parameters": {"before": before, "after": sum(p.numel() for p in model.parameters())},
            "unit_statistic": "per-weight scores", "shared_experts": "kept", "round_to": config.round_to}
