"""Per-layer scores of structured units (MLP neurons, attention KV groups) from per-weight importance scores.

A unit's score is the sum of its weights' scores, each tensor normalised first so no projection dominates by scale.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..layouts import attn_geometry, detect_layout

__all__ = ["check_layer_idx", "head_group_scores", "neuron_scores"]


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _normalised(scores: Mapping[str, torch.Tensor], name: str, param: torch.Tensor) -> torch.Tensor | None:
    if name not in scores:
        return None
    s = scores[name]
    if tuple(s.shape) != tuple(param.shape):
        raise ValueError(f"Score for {name} has shape {tuple(s.shape)}, but the parameter has {tuple(param.shape)}.")
    s = s.detach().float()
    scale = s.abs().mean()
    # An all-zero score tensor carries no ranking information; let it contribute nothing instead of NaN.
    return s / scale if scale > 0 else torch.zeros_like(s)


def _no_score_error(prefix: str, layer_idx: int, examples: list[str]) -> ValueError:
    return ValueError(
        f"No importance scores for any weight of {prefix} (layer {layer_idx}); expected at least one of "
        f"{examples}. Track this module's parameters or choose another structure."
    )


def check_layer_idx(layers: nn.ModuleList, layer_idx: int) -> None:
    if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(layers):
        raise ValueError(f"layer_idx must be an int in [0, {len(layers)}), got {layer_idx!r}.")


def _reduced_scores(
    scores: Mapping[str, torch.Tensor], prefix: str, block: nn.Module, parts: list[str], out_module: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """
    Normalised scores of the weights and biases of `block`'s modules `parts`, each summed to a 1-D vector along the
    unit axis: rows of the input projections, columns of `out_module` (whose bias belongs to no unit and is skipped).
    Unscored tensors are skipped.
    """
    for mod_name in parts:
        module = getattr(block, mod_name)
        for pname in ("weight", "bias"):
            param = getattr(module, pname, None)
            if param is None or (pname == "bias" and mod_name == out_module):
                continue
            s = _normalised(scores, f"{prefix}.{mod_name}.{pname}", param)
            if s is None:
                continue
            if pname == "weight":
                s = s.sum(dim=0) if mod_name == out_module else s.sum(dim=1)
            yield mod_name, s


def neuron_scores(model: nn.Module, scores: Mapping[str, torch.Tensor], layer_idx: int) -> torch.Tensor:
    """
    Aggregates element-wise importance into one score per MLP intermediate neuron of layer `layer_idx`.

    Each scored tensor is first divided by its own mean absolute score, so that gate/up/down (whose raw scores can
    differ in scale) contribute comparably; then, for neuron `j`, the normalised scores are summed over gate row `j`,
    up row `j` and down column `j` (Phi-3: rows `j` and `intermediate_size + j` of `gate_up_proj`), plus entry `j` of
    the gate/up biases when present and scored. Unscored tensors are skipped; `down_proj.bias` belongs to no neuron.

    Args:
        model (`PreTrainedModel`): Llama-style or Phi-3-style causal LM.
        scores (`Mapping[str, torch.Tensor]`): Parameter name (as in `model.named_parameters()`) to a tensor of the
            parameter's shape, higher = more important.
        layer_idx (`int`): Decoder layer index.

    Returns:
        `torch.Tensor` of shape `(intermediate_size,)`, float32.

    Raises:
        `ValueError`: for an unsupported layout, a bad `layer_idx`, a score of the wrong shape, or no score for any
        weight of the MLP.
    """
    layers, kind = detect_layout(model, "mlp")
    check_layer_idx(layers, layer_idx)
    mlp = layers[layer_idx].mlp
    prefix = _module_names(model)[id(mlp)]
    size = mlp.down_proj.in_features
    # (module name, how its rows/columns map to neurons)
    parts = ["gate_proj", "up_proj"] if kind == "split" else ["gate_up_proj"]
    parts.append("down_proj")
    total = None
    for mod_name, s in _reduced_scores(scores, prefix, mlp, parts, "down_proj"):
        if mod_name == "gate_up_proj":  # rows [gate; up]: neuron j owns rows j and size + j
            s = s.view(2, size).sum(dim=0)
        total = s if total is None else total + s.to(total.device)
    if total is None:
        raise _no_score_error(prefix, layer_idx, [f"{prefix}.{p}.weight" for p in parts])
    return total


def head_group_scores(model: nn.Module, scores: Mapping[str, torch.Tensor], layer_idx: int) -> torch.Tensor:
    """
    Aggregates element-wise importance into one score per attention KV group of layer `layer_idx`.

    A KV group is one key/value head plus the `num_attention_heads // num_key_value_heads` query heads that read it
    (query head `h` uses KV head `h // group_size`); with multi-head attention a group is a single head. Pruning
    whole groups keeps grouped-query attention valid. Each scored tensor is first divided by its own mean absolute
    score; then, for group `g`, the normalised scores are summed over its k and v rows, the q rows and o_proj columns
    of its query heads (Phi-3: the matching rows of the q, k and v blocks of `qkv_proj`), plus the matching q/k/v
    bias entries when present and scored. Unscored tensors are skipped; `o_proj.bias` belongs to no group.

    Args:
        model (`PreTrainedModel`): Llama-style or Phi-3-style causal LM.
        scores (`Mapping[str, torch.Tensor]`): Parameter name to a tensor of the parameter's shape, higher = more
            important.
        layer_idx (`int`): Decoder layer index.

    Returns:
        `torch.Tensor` of shape `(num_key_value_heads,)`, float32.

    Raises:
        `ValueError`: for an unsupported layout or head geometry, a bad `layer_idx`, a score of the wrong shape, or
        no score for any weight of the attention.
    """
    layers, kind = detect_layout(model, "attn")
    check_layer_idx(layers, layer_idx)
    attn = layers[layer_idx].self_attn
    prefix = _module_names(model)[id(attn)]
    n_heads, n_kv, d = attn_geometry(model, attn, kind)
    q_size, kv_size = n_heads * d, n_kv * d

    def per_group(flat: torch.Tensor) -> torch.Tensor:
        # Contiguous rows (or columns) of length n_groups * k map to groups in order.
        return flat.view(n_kv, -1).sum(dim=1)

    names = ["q_proj", "k_proj", "v_proj", "o_proj"] if kind == "split" else ["qkv_proj", "o_proj"]
    total, found = torch.zeros(n_kv), False
    for mod_name, s in _reduced_scores(scores, prefix, attn, names, "o_proj"):
        if mod_name == "qkv_proj":
            q, k, v = s.split([q_size, kv_size, kv_size])
            s = per_group(q) + per_group(k) + per_group(v)
        else:
            s = per_group(s)
        total = total.to(s.device) + s
        found = True
    if not found:
        raise _no_score_error(prefix, layer_idx, [f"{prefix}.{n}.weight" for n in names])
    return total
