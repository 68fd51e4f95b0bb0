"""Whole-expert removal: an MoE model with fewer experts per layer that stock transformers loads as it is.

Experts are chosen from per-expert scores (e.g. `RouterCollector`'s tokens routed, higher = more important; Lu et al.
2024, arXiv 2402.14800) and removed in place: the router's rows (`weight` and any per-expert `bias` /
`e_score_correction_bias`), every expert-indexed fused parameter of the experts module, the modules' `num_experts`
and the config's expert count (`num_local_experts` / `num_experts` / `n_routed_experts`).

The count is the same in every MoE layer: a config holds one expert count, so stock `from_pretrained` can only build
layers of equal size (the same rule as structured pruning's uniform shapes). Which experts go is chosen per layer.
A global budget that let layers lose different numbers of experts would give a checkpoint stock transformers cannot
load; a "global" fraction of all experts therefore means the same count in every layer, which this module expresses
directly as a per-layer fraction or count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..collect.importance import Importance
from ..io_utils import plural
from ..moe import EXPERT_COUNT_KEYS, MoeBlock, find_moe_blocks
from ..validation import check_sparsity
from .masks import num_to_prune, unstructured_mask

__all__ = ["choose_experts", "remove_experts_", "remove_experts_by_routing_"]


def _configs(model: nn.Module) -> list:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def choose_experts(
    scores: Mapping[str, Tensor], *, sparsity: float | None = None, count: int | None = None, groups: int = 1
) -> dict[str, list[int]]:
    """
    The lowest-scored experts of every MoE layer, the same number in each.

    Args:
        scores (`Mapping[str, Tensor]`):
            Block name (`MoeBlock.name`, e.g. `model.layers.0.mlp`) to a `[E]` float score per expert, higher = more
            important (tokens routed, gate-weight mass, ...). Every layer must have the same `E`.
        sparsity (`float`, *optional*):
            Fraction of each layer's experts to remove, in `[0, 1)`; the count is `num_to_prune(E, sparsity)`, the
            rounding rule of every mask.
        count (`int`, *optional*):
            Experts to remove per layer (instead of `sparsity`).
        groups (`int`, *optional*, defaults to 1):
            Contiguous expert groups of a grouped router (DeepSeek-V3's `n_group`: the router first picks groups, then
            experts inside them): the same number is removed from each group, the lowest-scored of that group, so the
            smaller model's groups are the dense model's groups less their removed experts.

    Returns:
        `dict[str, list[int]]`: block name to the sorted indices to remove. Ties go to the lower index first, as in
        every mask builder.

    Raises:
        `ValueError`: neither or both of `sparsity` / `count`, a bad value, layers of different expert counts, or a
        score that is not a 1-D floating tensor free of NaN.
    """
    if (sparsity is None) == (count is None):
        raise ValueError("choose_experts: give exactly one of `sparsity` (fraction per layer) or `count`")
    sizes = {name: s.numel() for name, s in scores.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"choose_experts: layers have different expert counts {sorted(set(sizes.values()))}")
    out: dict[str, list[int]] = {}
    for name, score in scores.items():
        if not isinstance(score, Tensor) or score.dim() != 1:
            raise ValueError(f"{name}: expert scores must be a 1-D tensor [num_experts]")
        if count is not None:
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= score.numel():
                raise ValueError(f"choose_experts: count must be an int in [0, {score.numel()}], got {count!r}")
            frac = count / score.numel()
            k = count
        else:
            frac = check_sparsity("sparsity", sparsity)
            k = num_to_prune(score.numel(), frac)
        if k == score.numel():  # unstructured_mask refuses sparsity 1; remove_experts_ names the layer
            out[name] = list(range(k))
            continue
        if groups > 1:
            if score.numel() % groups or k % groups:
                raise ValueError(f"{name}: {plural(k, 'expert')} to remove from {score.numel()} routed in n_group="
                                 f"{groups} groups: the groups must lose the same number; give a count that "
                                 f"{groups} divides")
            size = score.numel() // groups
            out[name] = sorted(g * size + int(i) for g in range(groups)
                               for i in torch.nonzero(~_keep_lowest(score[g * size:(g + 1) * size], k // groups)).flatten())
            continue
        keep = unstructured_mask(score.float(), frac) if count is None else _keep_lowest(score, k)
        out[name] = torch.nonzero(~keep).flatten().tolist()
    return out


def _keep_lowest(score: Tensor, k: int) -> Tensor:
    # The `k` lowest by a stable sort: ties go to the lower index, as in `unstructured_mask`.
    keep = torch.ones(score.numel(), dtype=torch.bool)
    keep[torch.argsort(score.detach().float().cpu(), stable=True)[:k]] = False
    return keep


def _per_expert_tensors(module: nn.Module, num_experts: int, where: str) -> dict[str, Tensor]:
    """A module's own parameters and buffers; each must be indexed by expert on dim 0, or nothing can be removed."""
    out = {}
    for attr, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if t.dim() == 0 or t.shape[0] != num_experts:
            raise ValueError(f"{where}.{attr}: shape {tuple(t.shape)} is not indexed by expert on dim 0 "
                             f"({num_experts} experts); removing experts from this layout is not supported")
        out[attr] = t
    return out


def _check(model: nn.Module, blocks: list[MoeBlock], remove: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Every problem is found here, before any tensor changes."""
    if not blocks:
        raise ValueError("remove_experts_: the model has no mixture-of-experts layer")
    by_name = {b.name: b for b in blocks}
    unknown = sorted(set(remove) - set(by_name))
    if unknown:
        raise ValueError(f"{unknown[0]}: not an MoE block of this model (blocks: {', '.join(sorted(by_name))})")
    keys = [k for c in _configs(model) for k in EXPERT_COUNT_KEYS if isinstance(getattr(c, k, None), int)]
    if not keys:
        raise ValueError(f"config: no expert count ({' / '.join(EXPERT_COUNT_KEYS)}) to record the smaller model in")
    key = keys[0]
    counts = {}
    for b in blocks:
        idx = [int(i) for i in remove.get(b.name, ())]
        if len(set(idx)) != len(idx) or any(not 0 <= i < b.num_experts for i in idx):
            raise ValueError(f"{b.name}: expert indices must be distinct and in [0, {b.num_experts}), got {idx}")
        left = b.num_experts - len(idx)
        if left == 0:
            raise ValueError(f"{b.router_name}: removing all {b.num_experts} experts of the layer")
        if left < b.top_k:
            raise ValueError(f"{b.router_name}: {plural(left, 'expert')} left, fewer than top-k num_experts_per_tok={b.top_k}")
        for c in _configs(model):
            n_group = getattr(c, "n_group", None)
            if isinstance(n_group, int) and n_group > 1 and left % n_group:
                raise ValueError(f"config.n_group: {plural(left, 'expert')} left per layer is not a multiple of n_group={n_group}")
            if isinstance(n_group, int) and n_group > 1 and b.num_experts % n_group == 0:
                # a grouped router routes contiguous groups: each must lose as many, or the kept experts regroup
                lost = [sum(1 for i in idx if i // (b.num_experts // n_group) == g) for g in range(n_group)]
                if len(set(lost)) > 1:
                    raise ValueError(f"{b.router_name}: config.n_group={n_group} routes {b.num_experts // n_group} "
                                     f"contiguous experts per group; remove the same number from each (asked: {lost})")
        _per_expert_tensors(b.experts, b.num_experts, b.experts_name)
        _per_expert_tensors(b.router, b.num_experts, b.router_name)
        counts[b.name] = sorted(idx)
    if len({b.num_experts - len(counts[b.name]) for b in blocks}) > 1:
        raise ValueError(f"config.{key}: one expert count for every layer; remove the same number of experts from "
                         f"each MoE layer (asked: {dict((n, len(v)) for n, v in counts.items())})")
    return counts


def _select_(module: nn.Module, attr: str, t: Tensor, keep: Tensor) -> None:
    with torch.no_grad():
        new = t.index_select(0, keep.to(t.device)).contiguous()
    if isinstance(t, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        module.register_buffer(attr, new, persistent=attr not in module._non_persistent_buffers_set)


def remove_experts_(model: nn.Module, remove: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """
    Remove whole experts in place: router rows, expert slices of every fused parameter, and the expert counts.

    Args:
        model (`nn.Module`):
            An MoE model (not wrapped by peft: merge adapters first, so the removed rows are not in a LoRA).
        remove (`Mapping[str, Sequence[int]]`):
            Block name (`MoeBlock.name`) to the expert indices to remove, e.g. from [`choose_experts`]. Every MoE
            layer must lose the same number (a layer not listed loses none).

    Returns:
        `dict[str, list[int]]`: block name to the original indices of the experts kept, in order. The expert tensors
        are new `nn.Parameter`s (build an optimizer afterwards) and earlier `MoeBlock` / `ExpertSlice` objects are
        stale (call `find_moe_blocks` again).

    Raises:
        `ValueError`: one line naming the parameter, before any change: an unknown block, bad indices, all experts of
        a layer or fewer than top-k left, unequal counts per layer, an expert count the config cannot hold, or a
        per-expert tensor not indexed on dim 0.
    """
    blocks = find_moe_blocks(model)
    removed = _check(model, blocks, remove)
    kept = {}
    for b in blocks:
        drop = set(removed[b.name])
        keep = torch.tensor([e for e in range(b.num_experts) if e not in drop], dtype=torch.long)
        kept[b.name] = keep.tolist()
        if not drop:
            continue
        for module, where in ((b.experts, b.experts_name), (b.router, b.router_name)):
            for attr, t in _per_expert_tensors(module, b.num_experts, where).items():
                _select_(module, attr, t, keep)
    old = blocks[0].num_experts
    new = len(next(iter(kept.values())))
    # Every module's own copy of the count (the experts, routers and MoE blocks; MixtralForCausalLM's for its
    # load-balancing loss; DeepSeek-V3's block `n_routed_experts`, which its grouped top-k reads), under each name
    # the configs use. Every MoE layer loses the same number (checked), so `old` is one count.
    for module in model.modules():
        for key in EXPERT_COUNT_KEYS:
            if getattr(module, key, None) == old and not isinstance(getattr(module, key), bool):
                setattr(module, key, new)
    for c in _configs(model):
        for key in EXPERT_COUNT_KEYS:
            if getattr(c, key, None) == old:
                setattr(c, key, new)
    return kept


def router_scores(importance: Importance, blocks: Sequence[MoeBlock]) -> dict[str, Tensor]:
    """
    Tokens routed to each expert over training, per MoE block, from the importance's `router` section.

    Args:
        importance ([`Importance`]): from the callback or `load_importance` of an MoE model's run.
        blocks (`Sequence[MoeBlock]`): the model's MoE blocks.

    Returns:
        `dict[str, Tensor]`: block name to `[E]` float64 token counts.

    Raises:
        `ValueError`: one line when the importance has no router statistics, or none of the right size for a block.
    """
    section = importance.sections.get("router")
    if not section:
        raise ValueError("structure='experts' removes the experts the routers used least during training, but this "
                         "importance has no router statistics (a dense model's, or one written before they were saved)")
    out = {}
    for b in blocks:
        tokens = (section.get(b.name) or {}).get("tokens")
        if tokens is None or len(tokens) != b.num_experts:
            raise ValueError(f"{b.router_name}: the importance's router statistics have "
                             f"{'no entry' if tokens is None else f'{len(tokens)} experts'} for this layer of "
                             f"{b.num_experts} experts (another model, or experts already removed?)")
        out[b.name] = torch.tensor(tokens, dtype=torch.float64)
    return out


def remove_experts_by_routing_(model: nn.Module, importance: Importance, sparsity: float) -> dict:
    """
    Remove, in every MoE layer, the fraction `sparsity` of its experts that the router sent the fewest tokens to
    during training (Lu et al. 2024, arXiv 2402.14800): `prune_`'s `structure="experts"`.

    Args:
        model (`nn.Module`): the MoE model the importance was computed for.
        importance ([`Importance`]): with router statistics (see [`router_scores`]).
        sparsity (`float`): fraction of each layer's experts to remove, in `[0, 1)`.

    Returns:
        `dict`: what `sparsity.json` records, in the shape of `surgery.prune_structured_`'s result: `structure`,
        `unit` (`"expert"`), `sparsity`, `units_per_layer` and `config` (expert count, before / after), `removed`
        and `kept` (original indices per block), `num_parameters` (before / after).

    Raises:
        `ValueError`: before any change, as [`router_scores`] and [`remove_experts_`] (all experts of a layer, fewer
        than top-k left), in one line naming the parameter.
    """
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError("structure='experts': the model has no mixture-of-experts layer")
    n_group = next((g for c in _configs(model) if isinstance(g := getattr(c, "n_group", None), int) and g > 1), 1)
    scores = router_scores(importance, blocks)
    if n_group > 1:  # a whole number per group (DeepSeek-V3's grouped routing), by the same rounding rule
        remove = choose_experts(scores, count=num_to_prune(blocks[0].num_experts // n_group, sparsity) * n_group,
                                groups=n_group)
    else:
        remove = choose_experts(scores, sparsity=sparsity)
    before = sum(p.numel() for p in model.parameters())
    # the expert-count key config.json holds (configs answer aliases too: Mixtral's `num_experts`)
    key = next(k for c in _configs(model) for k in EXPERT_COUNT_KEYS if k in c.to_dict())
    count_before = blocks[0].num_experts
    kept = remove_experts_(model, remove)
    count_after = len(next(iter(kept.values())))
    config = {"before": {key: count_before}, "after": {key: count_after}}
    return {"structure": "experts", "unit": "expert", "sparsity": sparsity,
            "units_per_layer": {"before": count_before, "after": count_after}, "config": config,
            "removed": remove, "kept": kept,
            "num_parameters": {"before": before, "after": sum(p.numel() for p in model.parameters())}}
