"""Scores and mean inputs of structural units from a [`~collect.units.UnitCollector`]'s totals (its `state_dict()`,
or `units.safetensors` read back), without the model: the layout is read from the keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..config import UNIT_STATISTICS  # what `unit_scores` can rank by

__all__ = ["UNIT_STATISTICS", "unit_means", "unit_scores"]


def _layer_indices(state: Mapping[str, Tensor]) -> list[int]:
    return sorted(int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".influence"))


def unit_scores(state: Mapping[str, Tensor], statistic: str = "activation", *,
                kept_layers: Sequence[int] | None = None) -> dict:
    """Per-unit scores from a [`UnitCollector`]'s `state_dict()` (higher = more important), float32 on CPU.

    The layout is read from the keys, so a state loaded from a checkpoint is scored without the model.

    Args:
        state (`Mapping[str, Tensor]`): the totals, as `UnitCollector.state_dict()` returns them.
        statistic (`str`, *optional*, defaults to `"activation"`): one of `UNIT_STATISTICS`:
            - `"activation"`: neurons `mean |a_j|`; KV groups the sum over their query heads of `mean ||o_h||_2`;
              hidden channels the sum over layers of `mean |x_c|` (Minitron); layers the mean block influence;
            - `"activation_l2"`: the same with root-mean-squares (`sqrt(mean a_j^2)`; a group's
              `sqrt(mean ||o_group||^2)` over its heads' concatenated outputs); layers the mean block influence;
            - `"taylor"`: the mean over optimizer steps of `|sum g * w|` of each unit.
        kept_layers (`Sequence[int]`, *optional*): the decoder layers that stay when the same prune removes the
            others. Hidden channels are then scored over these layers only, so that a channel only removed layers
            used ranks low: the sum over them of `mean |x_c|` (or its root-mean-square); under `"taylor"` the sum
            over them, and over the weights outside the layers, of each one's mean `|sum g * w|` (the whole
            model's `|.|` of a step does not split by layer: this is the per-layer one, summed). `None` or every
            layer: the whole model, as above. The other entries are not affected.

    Returns:
        `dict`: `{"neurons": {layer: Tensor[I]}, "heads": {layer: Tensor[kv_groups]}, "hidden": Tensor[H],
        "layers": Tensor[L]}` (layers without such units are absent from `neurons` / `heads`).

    Raises:
        `ValueError`: an unknown statistic, nothing counted yet for it, a kept layer the statistics do not hold, or
            `"taylor"` with `kept_layers` from statistics saved without the per-layer sums (an older version).
    """
    if statistic not in UNIT_STATISTICS:
        raise ValueError(f"unit statistics: unknown statistic {statistic!r}; expected one of {UNIT_STATISTICS}")
    layers = _layer_indices(state)
    kept = layers if kept_layers is None else sorted({int(i) for i in kept_layers})
    unknown = sorted(set(kept) - set(layers))
    if unknown or not kept:
        raise ValueError(f"unit statistics: kept_layers {list(kept_layers)} are not some of the layers {layers}")
    if statistic in _GRADIENT_STATISTICS:
        return _taylor_scores(state, layers, kept)
    return _activation_scores(state, layers, kept, l2=statistic.endswith("_l2"))


# Unit statistics read from gradients (`update_taylor_`); the others from the forward hooks' activation sums.
_GRADIENT_STATISTICS = ("taylor",)


def _taylor_scores(s: Mapping[str, Tensor], layers: list[int], kept: list[int]) -> dict:
    steps = int(s["taylor.steps"])
    if steps == 0:
        raise ValueError("unit statistics: no optimizer step with gradients was counted (`update_taylor_`)")

    def mean(key: str) -> Tensor:
        return (s[key].double().cpu() / steps).float()

    if kept == layers:
        hidden = mean("taylor.hidden")
    elif "taylor.hidden.outside" not in s:
        raise ValueError("unit statistics: no per-layer Taylor sums of the hidden channels (saved by an older "
                         "hf-weightprune), so they cannot be ranked by the layers that stay: gather them again with "
                         "ImportanceConfig(units=True), or use unit_statistic='activation'")
    else:
        hidden = sum((mean(f"layers.{i}.taylor.hidden") for i in kept), mean("taylor.hidden.outside"))
    return {"neurons": {i: mean(f"layers.{i}.taylor.neurons") for i in layers if f"layers.{i}.taylor.neurons" in s},
            "heads": {i: mean(f"layers.{i}.taylor.heads") for i in layers if f"layers.{i}.taylor.heads" in s},
            "hidden": hidden,
            "layers": torch.stack([mean(f"layers.{i}.taylor") for i in layers])}


def _activation_scores(s: Mapping[str, Tensor], layers: list[int], kept: list[int], *, l2: bool) -> dict:
    if any(int(s[f"layers.{i}.tokens"]) == 0 for i in layers):
        raise ValueError("unit statistics: no training tokens were counted (were the hooks registered?)")

    def per_token(key: str, tokens: str) -> Tensor:
        return s[key].double().cpu() / max(int(s[tokens]), 1)

    neurons, heads = {}, {}
    hidden = torch.zeros(s["taylor.hidden"].numel(), dtype=torch.float64)
    for i in layers:
        p = f"layers.{i}"
        if f"{p}.neurons.abs" in s:
            v = per_token(f"{p}.neurons.{'sq' if l2 else 'abs'}", f"{p}.neurons.tokens")
            neurons[i] = (v.sqrt() if l2 else v).float()
        if f"{p}.heads.norm" in s:
            groups = s[f"{p}.taylor.heads"].numel()
            v = per_token(f"{p}.heads.{'sq' if l2 else 'norm'}", f"{p}.heads.tokens").reshape(groups, -1)
            heads[i] = (v.sum(1).sqrt() if l2 else v.sum(1)).float()
        if i in kept:  # what the layers that stay read
            v = per_token(f"{p}.hidden.{'sq' if l2 else 'abs'}", f"{p}.tokens")
            hidden += v.sqrt() if l2 else v
    influence = torch.stack([per_token(f"layers.{i}.influence", f"layers.{i}.tokens") for i in layers]).float()
    return {"neurons": neurons, "heads": heads, "hidden": hidden.float(), "layers": influence}


def unit_means(state: Mapping[str, Tensor]) -> dict:
    """The mean input of every `down_proj` and `o_proj` over the real tokens, from a [`UnitCollector`]'s
    `state_dict()`: what FLAP's mean compensation (`PruneConfig(compensate="mean")`) moves into the bias.

    Args:
        state (`Mapping[str, Tensor]`): the totals, as `UnitCollector.state_dict()` returns them.

    Returns:
        `dict`: `{"neurons": {layer: Tensor[I]}, "heads": {layer: Tensor[heads * head_dim]}}`, float64 on CPU: the
        signed means of `down_proj`'s input channels (one per neuron) and `o_proj`'s (query heads concatenated).

    Raises:
        `ValueError`: statistics without the signed sums (saved by an older version), or no tokens counted.
    """
    layers = _layer_indices(state)
    out: dict[str, dict[int, Tensor]] = {"neurons": {}, "heads": {}}
    for i in layers:
        for axis, reader in (("neurons", "abs"), ("heads", "norm")):
            p = f"layers.{i}.{axis}"
            if f"{p}.{reader}" not in state:
                continue  # a layer without such units (an MoE block has no neurons)
            if f"{p}.sum" not in state:
                raise ValueError("unit statistics: no signed input sums (saved by an older hf-weightprune); gather "
                                 "them again with ImportanceConfig(units=True)")
            tokens = int(state[f"{p}.tokens"])
            if tokens == 0:
                raise ValueError("unit statistics: no training tokens were counted (were the hooks registered?)")
            out[axis][i] = state[f"{p}.sum"].double().cpu() / tokens
    return out
