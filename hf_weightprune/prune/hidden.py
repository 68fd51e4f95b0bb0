"""Hidden-size pruning: channels of the residual stream removed everywhere, giving a narrower stock checkpoint.

One set of channels is kept for the whole model (every layer reads and writes the same residual stream): embedding
columns, the input columns of every q/k/v/gate/up projection (Phi-3: `qkv_proj`, `gate_up_proj`), the output rows and
biases of every `o_proj` / `down_proj`, every norm over the hidden size (per-layer and final; weight and bias), and the
input columns of `lm_head`. A tied `lm_head` stays tied to the one sliced embedding tensor. `config.hidden_size` is
updated and `config.head_dim` written explicitly, because Llama-style configs derive it from
`hidden_size // num_attention_heads` when it is absent: the attention geometry must not change.

Unlike neurons and KV groups, the result is in general NOT the dense model with those channels zeroed: an RMSNorm
averages over fewer channels. Two things are kept exact where they can be:

- `rescale_norms=True` (default) multiplies every hidden-size RMSNorm gain by `sqrt(D / D')`. When the removed channels
  are zero throughout the residual stream, `mean(x^2)` over the kept channels is exactly `D / D'` times the mean over
  all of them, so the pruned model then equals the dense one (up to `rms_norm_eps`, which is not rescaled because the
  config shares it with q/k norms over the head dimension). When they are small rather than zero, it still undoes most
  of the shift. LayerNorm also subtracts the mean, so no gain is exact there; its weight and bias are only sliced.
- Gemma-style embeddings multiply by `sqrt(hidden_size)`, which the reloaded model recomputes from the new size; the
  ratio is folded into the embedding weights (and, if tied, taken back out of the final norm) so the embedding output
  of the kept channels does not change.

Minitron (arXiv 2407.14679) recovers the remaining difference with distillation; this module does not train.

Example:

```python
>>> from hf_weightprune.prune.hidden import shrink_hidden_
>>> keep = torch.topk(channel_importance, k=768).indices.sort().values
>>> report = shrink_hidden_(model, keep)
>>> model.save_pretrained("narrower")
```
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..layouts import attn_geometry, detect_layout, model_configs
from .surgery import config_error, sliced_linear

__all__ = ["hidden_channel_cost", "hidden_channel_costs", "shrink_hidden_"]

_IN = {"split": ("q_proj", "k_proj", "v_proj"), "fused": ("qkv_proj",)}
_MLP_IN = {"split": ("gate_proj", "up_proj"), "fused": ("gate_up_proj",)}


@dataclass
class _Plan:
    """Everything `shrink_hidden_` will touch, found and checked before any change."""

    hidden: int
    head_dim: int
    embed: nn.Embedding
    head: nn.Linear | None
    tied: bool
    embed_ratio: float  # old / new embedding scale (1.0 when the scale does not depend on hidden_size)
    final_norm: nn.Module | None
    norms: dict[nn.Module, str] = field(default_factory=dict)  # module -> "gain" | "offset" | "layernorm"
    columns: list[tuple[nn.Module, str]] = field(default_factory=list)  # (parent, attr): input columns sliced
    rows: list[tuple[nn.Module, str]] = field(default_factory=list)  # (parent, attr): output rows sliced


def _norm_kind(module: nn.Module, hidden: int, where: str) -> str:
    """Tells `x / rms(x) * w` ("gain") from Gemma's `x / rms(x) * (1 + w)` ("offset") by running the norm on ones."""
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    weight = module.weight
    probe = torch.ones(1, hidden, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        out = module(probe).float().flatten()
    w = weight.detach().float()
    # rms(ones) = 1, so the output is the effective gain (up to 1/sqrt(1 + eps)).
    tol = dict(rtol=1e-2, atol=1e-3) if weight.element_size() < 4 else dict(rtol=1e-4, atol=1e-5)
    if torch.allclose(out, w, **tol):
        return "gain"
    if torch.allclose(out, 1 + w, **tol):
        return "offset"
    raise ValueError(f"shrink_hidden_: {where} ({type(module).__name__}) is neither x/rms(x)*w nor x/rms(x)*(1+w)")


def _embed_ratio(embed: nn.Module, hidden: int, new_hidden: int, where: str) -> float:
    scale = getattr(embed, "embed_scale", None)
    if scale is None:
        return 1.0
    scale = float(scale)
    if math.isclose(scale, 1.0, rel_tol=1e-3):
        return 1.0
    if math.isclose(scale, math.sqrt(hidden), rel_tol=1e-3):
        return scale / math.sqrt(new_hidden)
    raise ValueError(f"shrink_hidden_: {where}.embed_scale={scale:g} is neither 1 nor sqrt(hidden_size={hidden})")


def _name_of(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _plan(model: nn.Module, new_hidden: int) -> _Plan:
    attn_layers, attn_kind = detect_layout(model, "attn")
    _, mlp_kind = detect_layout(model, "mlp")
    hidden = model.config.hidden_size
    names = _name_of(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embed, nn.Embedding) or embed.weight.shape[1] != hidden:
        raise ValueError(f"shrink_hidden_: input embeddings {type(embed).__name__} are not an nn.Embedding of width "
                         f"hidden_size={hidden}")
    if head is not None and (type(head) is not nn.Linear or head.in_features != hidden):
        raise ValueError(f"shrink_hidden_: lm_head {type(head).__name__} is not a plain nn.Linear from hidden_size")
    tied = head is not None and head.weight is embed.weight
    embed_name = names[id(embed)]
    sharing = [n for n, p in model.named_parameters(remove_duplicate=False) if p is embed.weight]
    allowed = {f"{embed_name}.weight"} | ({f"{names[id(head)]}.weight"} if tied else set())
    if set(sharing) - allowed:
        raise ValueError(f"shrink_hidden_: {embed_name}.weight is shared with {sorted(set(sharing) - allowed)[0]} "
                         "beyond the lm_head tie; hidden pruning would resize that module too")
    geoms = {attn_geometry(model, layer.self_attn, attn_kind) for layer in attn_layers}
    if len(geoms) > 1:
        raise ValueError(f"shrink_hidden_: layers have different attention shapes {sorted(geoms)}")
    head_dim = geoms.pop()[2]

    ratio = _embed_ratio(embed, hidden, new_hidden, embed_name)
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    final_norm = getattr(decoder, "norm", None)
    plan = _Plan(hidden, head_dim, embed, head, tied, ratio, final_norm if isinstance(final_norm, nn.Module) else None)
    if tied and ratio != 1.0 and plan.final_norm is None:
        raise ValueError("shrink_hidden_: tied embeddings with a hidden-size embedding scale need a final norm "
                         "(`model.get_decoder().norm`) to absorb the rescale")
    inner: set[int] = set()
    for layer in attn_layers:
        attn, mlp = layer.self_attn, layer.mlp
        inner |= {id(m) for m in (*attn.modules(), *mlp.modules())}
        plan.columns += [(attn, p) for p in _IN[attn_kind]] + [(mlp, p) for p in _MLP_IN[mlp_kind]]
        plan.rows += [(attn, "o_proj"), (mlp, "down_proj")]
    # Norms over the hidden size: modules other than Linear/Embedding owning a [hidden] weight, outside attention/MLP
    # (q/k norms there run over head_dim, which does not change).
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (id(module) in inner or isinstance(module, (nn.Linear, nn.Embedding)) or not isinstance(weight, Tensor)
                or tuple(weight.shape) != (hidden,)):
            continue
        plan.norms[module] = _norm_kind(module, hidden, name)

    handled = {id(embed.weight)} | ({id(head.weight)} if head is not None else set())
    for parent, attr in plan.columns + plan.rows:
        handled |= {id(p) for p in getattr(parent, attr).parameters()}
    for module in plan.norms:
        handled |= {id(p) for p in module.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if id(p) not in handled and hidden in p.shape:
            raise ValueError(f"shrink_hidden_: {name} {tuple(p.shape)} has a hidden_size={hidden} dimension this "
                             "module does not know how to slice")
    return plan


def _check_keep(keep: Tensor, hidden: int) -> Tensor:
    if not isinstance(keep, Tensor) or keep.dim() != 1 or keep.is_floating_point() or keep.dtype == torch.bool:
        raise ValueError(f"shrink_hidden_: keep must be a 1-D integer tensor of channel indices, got {keep!r}")
    if keep.numel() == 0:
        raise ValueError("shrink_hidden_: keep is empty; at least one hidden channel must remain")
    keep = keep.long().cpu()
    if bool((keep[1:] <= keep[:-1]).any()):
        raise ValueError("shrink_hidden_: keep must be sorted and unique (strictly increasing channel indices)")
    if keep[0] < 0 or keep[-1] >= hidden:
        raise ValueError(f"shrink_hidden_: keep has indices outside [0, {hidden}): {keep[0]}..{keep[-1]}")
    return keep


def _param(t: Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().contiguous().clone(), requires_grad=like.requires_grad)


@torch.no_grad()
def _shrink_norm_(module: nn.Module, kind: str, keep: Tensor, gain: float) -> None:
    w = module.weight.index_select(0, keep.to(module.weight.device))
    if kind == "gain":
        w = w * gain
    elif kind == "offset":  # Gemma: the effective gain is (1 + w)
        w = (1 + w.float()) * gain - 1
    module.weight = _param(w.to(module.weight.dtype), module.weight)
    if isinstance(getattr(module, "bias", None), nn.Parameter):
        module.bias = _param(module.bias.index_select(0, keep.to(module.bias.device)), module.bias)
    if isinstance(module, nn.LayerNorm):
        module.normalized_shape = (len(keep),)


def hidden_channel_cost(model: nn.Module) -> int:
    """
    Parameters one hidden channel costs: what [`shrink_hidden_`] removes per channel dropped (a tied head once).

    Raises:
        `ValueError`: as [`shrink_hidden_`] would, before any change (unsupported layout, shared embeddings, ...).
    """
    outside, per_layer = hidden_channel_costs(model)
    return outside + sum(per_layer)


def hidden_channel_costs(model: nn.Module) -> tuple[int, list[int]]:
    """
    [`hidden_channel_cost`] split into the part outside the decoder layers (embeddings, lm_head, final norm) and each
    decoder layer's part, so that a budget can price a hidden channel after some layers are removed.

    Returns:
        `tuple[int, list[int]]`: `(outside the layers, [one entry per decoder layer])`.

    Raises:
        `ValueError`: as [`shrink_hidden_`] would, before any change.
    """
    plan = _plan(model, model.config.hidden_size)
    layers, _ = detect_layout(model, "attn")
    owner = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    per_layer = [0] * len(layers)
    outside = plan.embed.num_embeddings + (plan.head.out_features if plan.head is not None and not plan.tied else 0)
    for parent, attr in plan.columns:  # input columns: one per output row
        per_layer[owner[id(parent)]] += getattr(parent, attr).out_features
    for parent, attr in plan.rows:  # output rows: their inputs and bias
        m = getattr(parent, attr)
        per_layer[owner[id(parent)]] += m.in_features + (m.bias is not None)
    for m in plan.norms:
        cost = 1 + (getattr(m, "bias", None) is not None)
        if id(m) in owner:
            per_layer[owner[id(m)]] += cost
        else:
            outside += cost
    return outside, per_layer


def shrink_hidden_(model: nn.Module, keep: Tensor, *, rescale_norms: bool = True,
                   together_with: Mapping | None = None) -> dict:
    """
    Removes hidden channels (the residual stream's width) in place, keeping `keep` everywhere.

    See the module docstring for what is sliced and what stays exact. Rebuild any optimizer afterwards: the sliced
    Linear modules and every touched parameter are new objects.

    Args:
        model (`PreTrainedModel`):
            Llama-style or Phi-3-style causal LM (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, ...) with plain
            `nn.Linear` projections (merge adapters and load unquantized first).
        keep (`torch.LongTensor`):
            Sorted, unique indices of the hidden channels to keep, the same for every layer.
        rescale_norms (`bool`, *optional*, defaults to `True`):
            Multiply each RMSNorm gain over the hidden size by `sqrt(hidden_size / len(keep))`, so that channels whose
            residual is zero can be removed without changing the output (up to `rms_norm_eps`).
        together_with (`dict`, *optional*):
            Config values another cut of the same prune sets (e.g. `{"num_attention_heads": 2, ...}`): the new
            `hidden_size` is checked with them, since some configs tie the two (`hidden_size % num_attention_heads`).

    Returns:
        `dict`: `hidden_size` and `num_parameters` as `{"before": ..., "after": ...}`, `kept` / `removed` (sorted
        `list[int]`), `head_dim` (written to the config), `norm_gain` and `embed_scale_ratio` (the factors applied).

    Raises:
        `ValueError`: one line, before any change: a `keep` that is not a non-empty sorted unique 1-D integer tensor in
        range, embeddings shared beyond the lm_head tie, a parameter of hidden size this module does not know, an
        unsupported layout or norm, or a `hidden_size` the config rejects (e.g. not a multiple of the head count).
    """
    hidden = model.config.hidden_size
    keep = _check_keep(keep, hidden)
    new_hidden = len(keep)
    plan = _plan(model, new_hidden)
    updates = {"hidden_size": new_hidden, "head_dim": plan.head_dim}
    reason = config_error(model.config, {**(together_with or {}), **updates})
    if reason is not None:
        raise ValueError(f"shrink_hidden_: hidden_size={new_hidden} gives a config that {type(model.config).__name__} "
                         f"rejects: {reason}".splitlines()[0])
    params_before = sum(p.numel() for p in model.parameters())
    gain = math.sqrt(hidden / new_hidden) if rescale_norms else 1.0

    with torch.no_grad():
        for parent, attr in plan.columns:
            setattr(parent, attr, sliced_linear(getattr(parent, attr), cols=keep))
        for parent, attr in plan.rows:
            setattr(parent, attr, sliced_linear(getattr(parent, attr), rows=keep))
        for module, kind in plan.norms.items():
            # A tied lm_head reads the embedding tensor scaled by `embed_ratio`; the final norm takes it back out.
            factor = gain / plan.embed_ratio if (module is plan.final_norm and plan.tied) else gain
            _shrink_norm_(module, kind, keep, factor if kind != "layernorm" else 1.0)
        embed = plan.embed
        weight = embed.weight.index_select(1, keep.to(embed.weight.device)) * plan.embed_ratio
        embed.weight = _param(weight.to(embed.weight.dtype), embed.weight)
        embed.embedding_dim = new_hidden
        if plan.embed_ratio != 1.0:  # the scale stock transformers computes from the new config: sqrt(hidden_size)
            embed.embed_scale.fill_(math.sqrt(new_hidden))
            if hasattr(embed, "scalar_embed_scale"):
                embed.scalar_embed_scale = math.sqrt(new_hidden)
        if plan.head is not None:
            if plan.tied:
                plan.head.weight = embed.weight
            else:
                plan.head.weight = _param(plan.head.weight.index_select(1, keep.to(plan.head.weight.device)),
                                          plan.head.weight)
            plan.head.in_features = new_hidden
    for module in model.modules():
        if getattr(module, "hidden_size", None) == hidden and not isinstance(module.hidden_size, bool):
            module.hidden_size = new_hidden
    for config in model_configs(model):
        if getattr(config, "hidden_size", None) == hidden:
            for key, value in updates.items():
                setattr(config, key, value)
    return {
        "hidden_size": {"before": hidden, "after": new_hidden},
        "kept": keep.tolist(),
        "removed": sorted(set(range(hidden)) - set(keep.tolist())),
        "head_dim": plan.head_dim,
        "norm_gain": gain,
        "embed_scale_ratio": plan.embed_ratio,
        "num_parameters": {"before": params_before, "after": sum(p.numel() for p in model.parameters())},
    }
