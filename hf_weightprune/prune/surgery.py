"""Structured pruning that physically shrinks a causal LM.

Whole MLP neurons or whole attention KV groups (a key/value head together with the query heads that share it) are
removed: the `nn.Linear` modules are replaced by smaller ones and `model.config` is updated, so the result is a plain,
smaller Hugging Face checkpoint that stock `AutoModelForCausalLM.from_pretrained` loads.

The layouts it understands are detected in `layouts.py` (Llama-style split and Phi-3-style fused projections); the
units to remove are ranked by `unit_scores.py`.

Example:

```python
>>> from hf_weightprune.prune.surgery import prune_structured_
>>> report = prune_structured_(model, scores, structure="neurons", sparsity=0.25)
>>> model.save_pretrained("pruned")
```
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from transformers import PretrainedConfig

from ..layouts import (
    attention_sizes,
    attn_geometry,
    check_structured_supported,
    decoder_layers,
    detect_layout,
    model_configs,
)
from ..validation import check_sparsity
from .masks import num_to_prune
from .unit_scores import head_group_scores, neuron_scores

__all__ = ["config_error", "prune_structured_", "shrink_attention_", "shrink_mlp_", "sliced_linear"]

try:  # huggingface_hub wraps a strict config validator's ValueError/TypeError in its own error class
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError
except ImportError:  # older huggingface_hub: validators raise plain ValueError/TypeError
    _CONFIG_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError)
else:
    _CONFIG_ERRORS = (ValueError, TypeError, _StrictDataclassError)



# ----------------------------------------------------------------------------------------------------------------------
# Surgery
# ----------------------------------------------------------------------------------------------------------------------


def _validate_keep(keep: Mapping[int, torch.Tensor], n_layers: int, size: int, what: str) -> dict[int, torch.Tensor]:
    if not isinstance(keep, Mapping):
        raise ValueError(f"keep must be a dict {{layer_idx: indices}}, got {type(keep).__name__}.")
    missing = sorted(set(range(n_layers)) - set(keep))
    extra = sorted(set(keep) - set(range(n_layers)), key=str)
    if missing or extra:
        raise ValueError(
            f"keep must give indices for every layer 0..{n_layers - 1} (config sizes are shared by all layers); "
            f"missing {missing}, unexpected {extra}."
        )
    out = {}
    for i in range(n_layers):
        idx = torch.as_tensor(keep[i])
        if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError(f"Layer {i}: kept {what} must be a non-empty 1-D integer tensor, got {keep[i]!r}.")
        idx = idx.long().cpu()
        # Sorting keeps surviving units in their original order; any order would be equivalent.
        idx = torch.sort(idx).values
        if idx[0] < 0 or idx[-1] >= size or bool((idx[1:] == idx[:-1]).any()):
            raise ValueError(f"Layer {i}: kept {what} must be unique indices in [0, {size}), got {idx.tolist()}.")
        out[i] = idx
    counts = {i: len(idx) for i, idx in out.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"Non-uniform keep: every layer must keep the same number of {what} (the config holds one size), "
            f"got {counts}."
        )
    return out


@torch.no_grad()
def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight, bias = linear.weight, linear.bias
    if rows is not None:
        rows = rows.to(weight.device)
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    # Build on "meta" so no throwaway init runs, then attach the sliced tensors (same dtype and device).
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight.detach().contiguous().clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().contiguous().clone(), requires_grad=linear.bias.requires_grad)
    new.train(linear.training)
    return new


def shrink_mlp_(model: nn.Module, keep: dict[int, torch.LongTensor]) -> None:
    """
    Removes MLP intermediate neurons in place, keeping `keep[layer_idx]` in every layer.

    gate/up rows and down_proj columns are sliced with the same indices (Phi-3: both halves of `gate_up_proj`), biases
    are kept, and `config.intermediate_size` is updated. Every layer must keep the same number of neurons. Rebuild
    any optimizer afterwards: the Linear modules and their parameters are new objects.

    Args:
        model (`PreTrainedModel`): Llama-style or Phi-3-style causal LM.
        keep (`dict[int, torch.LongTensor]`): For every layer index, the neuron indices to keep.

    Raises:
        `ValueError`, before the model is modified: for an unsupported layout, non-uniform sizes, a `keep` that does
        not give unique valid indices for every layer (the same count in each), or a size the config rejects.
    """
    layers, kind = detect_layout(model, "mlp")
    sizes = {layer.mlp.down_proj.in_features for layer in layers}
    if len(sizes) > 1:
        raise ValueError(f"Layers have different intermediate sizes {sorted(sizes)}; uniform pruning needs one.")
    size = sizes.pop()
    keep = _validate_keep(keep, len(layers), size, "neurons")
    new_size = len(keep[0])
    reason = config_error(model.config, {"intermediate_size": new_size})
    if reason is not None:
        raise ValueError(
            f"intermediate_size={new_size} gives a config that {type(model.config).__name__} rejects: {reason}"
        )
    for i, layer in enumerate(layers):
        mlp, idx = layer.mlp, keep[i]
        if kind == "split":
            mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=idx)
            mlp.up_proj = sliced_linear(mlp.up_proj, rows=idx)
        else:
            mlp.gate_up_proj = sliced_linear(mlp.gate_up_proj, rows=torch.cat([idx, idx + size]))
        mlp.down_proj = sliced_linear(mlp.down_proj, cols=idx)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = new_size
    for cfg in model_configs(model):
        cfg.intermediate_size = new_size


def config_error(config: PretrainedConfig, updates: dict, _baseline: bool = True) -> str | None:
    """Returns why `config` with `updates` applied would fail its own validation (and thus `save_pretrained`)."""
    # A config that already fails validation cannot tell us anything about the new sizes.
    if _baseline and config_error(config, {}, _baseline=False) is not None:
        return None
    candidate = copy.deepcopy(config)
    validate = getattr(candidate, "validate", None)  # strict config validation, transformers >= 5
    if validate is None:
        return None
    try:
        for key, value in updates.items():  # a strict dataclass may validate a field as it is set
            setattr(candidate, key, value)
        validate()
    except _CONFIG_ERRORS as e:
        # huggingface_hub wraps the validator's own error; its cause is the readable part.
        return str(e.__cause__ or e).strip()
    return None


def _attention_config_updates(n_kv: int, group: int, head_dim: int) -> dict:
    return {"num_attention_heads": n_kv * group, "num_key_value_heads": n_kv, "head_dim": head_dim}


def shrink_attention_(model: nn.Module, keep_groups: dict[int, torch.LongTensor], *,
                      together_with: Mapping | None = None) -> None:
    """
    Removes attention KV groups in place, keeping `keep_groups[layer_idx]` in every layer.

    For each kept group the k/v rows of its KV head and the q rows / o_proj columns of its query heads are kept
    (Phi-3: the matching rows of the q, k and v blocks of `qkv_proj`); biases are kept. `config.num_attention_heads`,
    `config.num_key_value_heads` and `config.head_dim` (set explicitly, since it would otherwise be re-derived from
    `hidden_size // num_attention_heads`) are updated, as are the sizes the attention modules cache. Every layer must
    keep the same number of groups. Rebuild any optimizer afterwards.

    Args:
        model (`PreTrainedModel`): Llama-style or Phi-3-style causal LM.
        keep_groups (`dict[int, torch.LongTensor]`): For every layer index, the KV group indices to keep.
        together_with (`dict`, *optional*):
            Config values another cut of the same prune sets (e.g. `{"hidden_size": 24}`): the head counts are checked
            with them, since some configs tie the two (`hidden_size % num_attention_heads`, Phi-3's longrope factors).

    Raises:
        `ValueError`, before the model is modified: for an unsupported layout or geometry, a `keep_groups` that does
        not give unique valid indices for every layer (the same count in each), or head counts the config rejects
        (the message lists the counts it accepts).
    """
    layers, kind = detect_layout(model, "attn")
    geoms = {attn_geometry(model, layer.self_attn, kind) for layer in layers}
    if len(geoms) > 1:
        raise ValueError(f"Layers have different attention shapes (heads, kv heads, head_dim) {sorted(geoms)}.")
    n_heads, n_kv, d = geoms.pop()
    group = n_heads // n_kv
    keep_groups = _validate_keep(keep_groups, len(layers), n_kv, "KV groups")
    new_kv = len(keep_groups[0])
    new_heads = new_kv * group
    updates = _attention_config_updates(new_kv, group, d)
    # Some configs reject sizes the modeling code handles (LlamaConfig wants hidden_size % num_attention_heads == 0,
    # Phi-3 longrope sizes its rope factors by hidden_size // num_attention_heads); refuse before touching the model
    # rather than produce a checkpoint that cannot be saved or loaded.
    together = dict(together_with or {})
    reason = config_error(model.config, {**together, **updates})
    if reason is not None:
        feasible = [
            k
            for k in range(1, n_kv + 1)
            if config_error(model.config, {**together, **_attention_config_updates(k, group, d)}) is None
        ]
        raise ValueError(
            f"Keeping {new_kv} of {n_kv} KV groups ({new_heads} attention heads) gives a config that "
            f"{type(model.config).__name__} rejects: {reason} KV-group counts it accepts: {feasible}."
        )
    offsets_q, offsets_d = torch.arange(group), torch.arange(d)
    for i, layer in enumerate(layers):
        attn, g = layer.self_attn, keep_groups[i]
        heads = (g[:, None] * group + offsets_q).flatten()
        q_rows = (heads[:, None] * d + offsets_d).flatten()
        kv_rows = (g[:, None] * d + offsets_d).flatten()
        if kind == "split":
            attn.q_proj = sliced_linear(attn.q_proj, rows=q_rows)
            attn.k_proj = sliced_linear(attn.k_proj, rows=kv_rows)
            attn.v_proj = sliced_linear(attn.v_proj, rows=kv_rows)
        else:
            q_size, kv_size = n_heads * d, n_kv * d
            rows = torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows])
            attn.qkv_proj = sliced_linear(attn.qkv_proj, rows=rows)
        attn.o_proj = sliced_linear(attn.o_proj, cols=q_rows)
        # Attention modules cache sizes at init (Phi3Attention slices qkv with them); keep them in sync.
        attn.head_dim = d
        attn.num_key_value_groups = group
        for name, value in (("num_key_value_heads", new_kv), ("num_heads", new_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)
    for cfg in model_configs(model):
        for key, value in updates.items():
            setattr(cfg, key, value)


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_structured_(
    model: nn.Module, scores: Mapping[str, torch.Tensor], *, structure: str, sparsity: float
) -> dict:
    """
    Removes the least important MLP neurons or attention KV groups, the same number in every layer, in place.

    In each layer `masks.num_to_prune(units, sparsity)` units (the package's one rounding rule: `round(sparsity *
    units)`, halves to even) with the lowest aggregated score (see [`neuron_scores`] and [`head_group_scores`]) are
    removed; among equal scores the lower index is removed first. At least one unit per layer must remain. Rebuild
    any optimizer afterwards.

    Args:
        model (`PreTrainedModel`):
            Llama-style or Phi-3-style causal LM.
        scores (`Mapping[str, torch.Tensor]`):
            Parameter name to element-wise importance of the parameter's shape, higher = more important.
        structure (`str`):
            `"neurons"` (MLP intermediate neurons) or `"heads"` (attention KV groups).
        sparsity (`float`):
            Fraction of units to remove per layer, in `[0, 1)`.

    Returns:
        `dict`: what `PruningReport.structured` holds, every before/after pair as `{"before": ..., "after": ...}`:
        `structure` (`str`), `unit` (`"mlp_neuron"` or `"kv_group"`), `sparsity` (`float`), `units_per_layer`
        (`int`s), `config` (dicts of the changed config sizes), `kept` / `removed` (`{layer_idx: list[int]}`, sorted)
        and `num_parameters` (`int`s, all parameters of the model).

    Raises:
        `ValueError`, before the model is modified: a bad `sparsity` or one that removes every unit, an unknown
        `structure`, an unsupported layout, missing or non-finite scores, or sizes the model's config rejects.
    """
    sparsity = check_sparsity("sparsity", sparsity)
    check_structured_supported(model, structure)
    layers = decoder_layers(model)
    score_fn = neuron_scores if structure == "neurons" else head_group_scores
    # Score every layer before touching the model, so an error leaves it intact.
    unit_scores = [score_fn(model, scores, i) for i in range(len(layers))]
    for i, s in enumerate(unit_scores):
        if not torch.isfinite(s).all():
            raise ValueError(f"Layer {i}: aggregated {structure} scores contain NaN or inf.")
    units = unit_scores[0].numel()
    n_remove = num_to_prune(units, sparsity)
    if n_remove >= units:
        raise ValueError(
            f"sparsity={sparsity} would remove {n_remove} of {units} {structure} per layer; at least one must remain."
        )
    kept, removed = {}, {}
    for i, s in enumerate(unit_scores):
        # Stable ascending sort: ties keep index order, so the lower index is removed first.
        order = torch.sort(s.cpu(), stable=True).indices
        removed[i] = sorted(order[:n_remove].tolist())
        kept[i] = sorted(order[n_remove:].tolist())

    cfg = model.config

    def config_sizes() -> dict:  # heads: as the config states or derives them (Phi-3 states no head_dim)
        return {"intermediate_size": cfg.intermediate_size} if structure == "neurons" else attention_sizes(cfg)

    config_before = config_sizes()
    params_before = _num_parameters(model)
    if n_remove:
        keep = {i: torch.tensor(k, dtype=torch.long) for i, k in kept.items()}
        (shrink_mlp_ if structure == "neurons" else shrink_attention_)(model, keep)
    return {
        "structure": structure,
        "unit": "mlp_neuron" if structure == "neurons" else "kv_group",
        "sparsity": sparsity,
        "units_per_layer": {"before": units, "after": units - n_remove},
        "config": {"before": config_before, "after": config_sizes()},
        "kept": kept,
        "removed": removed,
        "num_parameters": {"before": params_before, "after": _num_parameters(model)},
    }
