"""Where the structural units of a decoder live, and their first-order Taylor sums from weights and gradients.

A *unit* is what structured pruning removes whole: an MLP neuron (a row of `gate_proj`/`up_proj`, a column of
`down_proj`), a KV group (a key/value head with the query heads that share it: their `q/k/v` rows and `o_proj`
columns), a hidden channel (a column of every Linear reading the residual stream, a row of every one writing it, the
channel of each norm and of the embeddings), a decoder layer (all its parameters).

Layouts are read from module names and shapes, not from the class name:
- attention `self_attn.{q,k,v,o}_proj` ("split": Llama, Mistral, Qwen2 with biases, Qwen3 with q/k norms, Gemma with
  `head_dim != hidden / heads`) or `self_attn.{qkv,o}_proj` ("fused": Phi-3, rows `[q; k; v]`);
- MLP `mlp.{gate,up,down}_proj` ("split") or `mlp.{gate_up,down}_proj` ("fused": Phi-3, rows `[gate; up]`).
A layer of another layout (an MoE block, multi-head latent attention) has no neuron (or head) units; its layer and
hidden-channel statistics still count.

The layout tables and the decoder-layer lookup are the leaf `layouts.py`, shared with the surgery in `prune/`; the head
count and head size are read from the modules' shapes and `head_dim`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layouts import ATTN_LAYOUTS, MLP_LAYOUTS, block_layout, decoder_layers

__all__ = ["LayerUnits", "find_layer_units", "hidden_taylor_", "layer_taylor"]



@dataclass(frozen=True)
class LayerUnits:
    """The units of one decoder layer.

    Attributes:
        index (`int`): the layer's position in the decoder.
        layer (`nn.Module`): the decoder layer.
        attn (`str`, *optional*): `"split"`, `"fused"`, or `None` (no KV-group units).
        mlp (`str`, *optional*): `"split"`, `"fused"`, or `None` (no neuron units).
        num_heads / num_kv_heads / head_dim (`int`): attention geometry (0 without `attn`).
        intermediate (`int`): MLP neurons (0 without `mlp`).
    """

    index: int
    layer: nn.Module
    attn: str | None
    mlp: str | None
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    intermediate: int = 0

    @property
    def self_attn(self) -> nn.Module:
        return self.layer.self_attn

    @property
    def block(self) -> nn.Module:
        return self.layer.mlp


def _head_dim(model: nn.Module, attn: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    d = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
    if not d and cfg is not None:
        d = cfg.hidden_size // cfg.num_attention_heads
    return int(d)


def find_layer_units(model: nn.Module) -> list[LayerUnits]:
    """The units of every decoder layer of `model`.

    Args:
        model (`nn.Module`): a causal LM (or its decoder).

    Returns:
        `list[LayerUnits]`: one entry per decoder layer, in order.

    Raises:
        `ValueError`: no decoder layers, or attention shapes that are not whole heads in whole KV groups.
    """
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        attn_kind = block_layout(getattr(layer, "self_attn", None), ATTN_LAYOUTS)
        mlp_kind = block_layout(getattr(layer, "mlp", None), MLP_LAYOUTS)
        geo = {}
        if attn_kind is not None:
            attn = layer.self_attn
            d, q_out = _head_dim(model, attn), attn.o_proj.in_features
            kv_out = attn.k_proj.out_features if attn_kind == "split" else (attn.qkv_proj.out_features - q_out) // 2
            if d <= 0 or q_out % d or kv_out % d or kv_out == 0 or (q_out // d) % (kv_out // d):
                raise ValueError(f"unit statistics: layer {i} attention is not whole KV groups of heads (o_proj input "
                                 f"{q_out}, key/value width {kv_out}, head_dim {d})")
            geo.update(num_heads=q_out // d, num_kv_heads=kv_out // d, head_dim=d)
        if mlp_kind is not None:
            geo["intermediate"] = layer.mlp.down_proj.in_features
        out.append(LayerUnits(i, layer, attn_kind, mlp_kind, **geo))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# First-order Taylor: signed sums of g * w per unit (the caller takes |.| per step, then accumulates)
# ----------------------------------------------------------------------------------------------------------------------


def _gw(param: Tensor | None) -> Tensor | None:
    """`grad * weight` in float32, or `None` for a parameter without a gradient (frozen, or unused this step)."""
    if param is None or param.grad is None:
        return None
    if callable(getattr(param, "to_local", None)):  # an FSDP2 shard: its rows are not whole units
        raise ValueError("unit statistics: first-order Taylor per unit needs whole weights; FSDP shards them "
                         "(use DDP or one process, or the activation statistics)")
    return param.grad.detach().float() * param.detach().float()


def layer_taylor(u: LayerUnits, hidden_size: int) -> dict[str, Tensor] | None:
    """Signed `sum(g * w)` of one layer's units, from the gradients present now.

    Args:
        u (`LayerUnits`): the layer.
        hidden_size (`int`): width of the residual stream.

    Returns:
        `dict[str, Tensor]` or `None` (no parameter of the layer has a gradient): `"layer"` (scalar, every parameter),
        `"hidden"` `[hidden_size]` (the columns of `q/k/v/gate/up`, the rows and bias of `o/down`, the layer's own
        norms), and where the layout has them `"neurons"` `[intermediate]` (gate/up rows and biases, down columns)
        and `"heads"` `[num_kv_heads]` (the group's q/k/v rows and biases, its `o_proj` columns). float32.

    Raises:
        `ValueError`: a parameter is an FSDP2 shard (`DTensor`).
    """
    params = [(n, p) for n, p in u.layer.named_parameters() if p.grad is not None]
    if not params:
        return None
    dev = params[0][1].device
    out = {"layer": torch.zeros((), device=dev), "hidden": torch.zeros(hidden_size, device=dev)}
    gw = {}
    for name, p in params:
        gw[name] = _gw(p)
        out["layer"] += gw[name].sum().to(dev)
    if u.mlp is not None:
        out["neurons"] = _mlp_taylor(u, gw, out["hidden"])
    if u.attn is not None:
        out["heads"] = _attn_taylor(u, gw, out["hidden"])
    for name, _child in u.layer.named_children():  # the layer's own norms act on the residual stream's channels
        w = gw.get(f"{name}.weight")
        if name not in ("self_attn", "mlp") and w is not None and tuple(w.shape) == (hidden_size,):
            out["hidden"] += w.to(dev)
    return out


def _add_in(hidden: Tensor, p: Tensor | None) -> None:  # a reader of the residual stream: [out, hidden]
    if p is not None:
        hidden += p.sum(0).to(hidden.device)


def _add_out(hidden: Tensor, p: Tensor | None, bias: Tensor | None) -> None:  # a writer: [hidden, in] and bias [hidden]
    if p is not None:
        hidden += p.sum(1).to(hidden.device)
    if bias is not None:
        hidden += bias.to(hidden.device)


def _rows(p: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """Per output row: `sum` over the row of `g * w`, plus its bias term."""
    if p is None and bias is None:
        return None
    rows = p.sum(1) if p is not None else 0
    return rows + bias if bias is not None else rows


def _mlp_taylor(u: LayerUnits, gw: dict[str, Tensor], hidden: Tensor) -> Tensor:
    n = torch.zeros(u.intermediate, device=hidden.device)
    pre = ("mlp.gate_proj", "mlp.up_proj") if u.mlp == "split" else ("mlp.gate_up_proj",)
    for name in pre:
        p, rows = gw.get(f"{name}.weight"), _rows(gw.get(f"{name}.weight"), gw.get(f"{name}.bias"))
        _add_in(hidden, p)
        if rows is not None:
            n += rows.reshape(-1, u.intermediate).sum(0).to(n.device)  # fused: [gate; up] rows of the same neuron
    down = gw.get("mlp.down_proj.weight")
    if down is not None:
        n += down.sum(0).to(n.device)
    _add_out(hidden, down, gw.get("mlp.down_proj.bias"))
    return n


def _attn_taylor(u: LayerUnits, gw: dict[str, Tensor], hidden: Tensor) -> Tensor:
    kv, d = u.num_kv_heads, u.head_dim
    g = torch.zeros(kv, device=hidden.device)

    def by_group(rows: Tensor | None) -> None:  # [kv * m] rows, group-major (HF's repeat_kv order)
        if rows is not None:
            g.add_(rows.reshape(kv, -1).sum(1).to(g.device))

    names = ("q_proj", "k_proj", "v_proj") if u.attn == "split" else ("qkv_proj",)
    for name in names:
        p = gw.get(f"self_attn.{name}.weight")
        _add_in(hidden, p)
        rows = _rows(p, gw.get(f"self_attn.{name}.bias"))
        if rows is None:
            continue
        if u.attn == "split":
            by_group(rows)
        else:  # [q; k; v] rows: each part group-major
            q = u.num_heads * d
            for part in rows.split([q, kv * d, kv * d]):
                by_group(part)
    o = gw.get("self_attn.o_proj.weight")
    if o is not None:
        by_group(o.sum(0))
    _add_out(hidden, o, gw.get("self_attn.o_proj.bias"))
    return g


def hidden_taylor_(model: nn.Module, hidden: Tensor) -> None:
    """Add the signed `sum(g * w)` per hidden channel of the parameters outside the decoder layers: input and output
    embeddings (`[vocab, hidden]`, counted once when tied) and the final norm (`get_decoder().norm`)."""
    seen: set[int] = set()
    pairs = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        pairs.append((getattr(module, "weight", None), True))
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    pairs.append((getattr(getattr(decoder, "norm", None), "weight", None), False))
    for param, is_matrix in pairs:
        if not isinstance(param, Tensor) or id(param) in seen:
            continue
        seen.add(id(param))
        p = _gw(param)
        if p is not None and p.shape[-1] == hidden.shape[0]:
            hidden += (p.sum(0) if is_matrix else p).to(hidden.device)
