"""What of an importance survives a structured prune: the kept rows and columns of every tracked weight, the kept
entries of the unit statistics, the decoder layers renumbered. `Importance.select` builds the smaller importance
from these, so that a structurally pruned model can be pruned again (2:4, or another structured axis).

The kept units are read from `PruningReport.structured` (or `sparsity.json`'s `structured`): each axis' `before`
size and `removed` indices (`neurons` / `heads`: per decoder layer, numbered after depth pruning; `hidden`: one list;
`layers`: the original indices). The layout is read from the tracked names (`q_proj`, `qkv_proj`, `gate_up_proj`,
...), the geometry from the sizes before pruning (`structured["config"]["before"]`) and the tracked shapes. Those
sizes also tell statistics of another model of a chain apart ([`shape_sizes`]): the depth and widths, and the
query and KV head counts in units of the recorded `head_dim` (two heads prunes change nothing else).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["KeptUnits", "kept_units", "shape_sizes", "sizes_fit", "slice_state"]

_LAYER = re.compile(r"^(.*?\blayers\.)(\d+)(\..*)$")
_CHAIN = ("it describes another model (after a chain of prunes, cut it with each prune's report in turn, oldest "
          "first: importance.select(first).select(second))")


class KeptUnits:
    """The units a structured prune kept, in the dense model's numbering, and how to map names and tensors.

    Attributes:
        layers (`list[int]`): the original indices of the decoder layers kept, in order (new index = position).
        removed_layers (`list[int]`): the original indices of the decoder layers removed.
        neurons, heads (`dict[int, Tensor]`): per new layer index, the kept MLP neurons / KV groups (absent: all).
        hidden (`Tensor` or `None`): the kept hidden channels (`None`: all).
        num_heads, num_kv_heads, intermediate (`int`): the dense sizes.
    """

    def __init__(self, structured: Mapping):
        axes = structured.get("axes")
        before = (structured.get("config") or {}).get("before") or {}
        if not isinstance(axes, Mapping) or not before:
            raise ValueError("this pruning report has no per-axis record of the removed units (`structured['axes']`, "
                             "written since hf-weightprune 0.2): Importance.select cannot tell what was kept")
        n_layers = int(before["num_hidden_layers"])
        self.before = before
        self.num_heads, self.num_kv_heads = before.get("num_attention_heads"), before.get("num_key_value_heads")
        self.intermediate = before.get("intermediate_size")
        removed_layers = set((axes.get("layers") or {}).get("removed") or [])
        self.layers = [i for i in range(n_layers) if i not in removed_layers]
        self.removed_layers = sorted(removed_layers)
        self.neurons = self._per_layer(axes.get("neurons"))
        self.heads = self._per_layer(axes.get("heads"))
        hidden = axes.get("hidden")
        self.hidden = _complement(hidden["before"], hidden["removed"]) if hidden and hidden.get("removed") else None

    @staticmethod
    def _per_layer(axis: Mapping | None) -> dict[int, Tensor]:
        if not axis:
            return {}
        # keys are ints in memory, strings once the report went through JSON (sparsity.json)
        return {int(j): _complement(axis["before"], removed) for j, removed in (axis.get("removed") or {}).items()}

    def check_shapes(self, shapes: Mapping[str, list[int]]) -> None:
        """Refuse statistics of another model than the one the prune started from: an importance cut with the
        second prune of a chain before the first would otherwise be sliced by indices of other units, silently.

        Raises:
            `ValueError`: one line naming the sizes ([`shape_sizes`]) that disagree with the record's `before`.
        """
        sizes = shape_sizes(shapes, self.before)
        if not sizes_fit(sizes, self.before):
            differ = ", ".join(f"{k} {v} (the prune's model: {self.before[k]})" for k, v in sizes.items()
                               if isinstance(self.before.get(k), int) and self.before[k] != v)
            raise ValueError(f"Importance.select: this importance has {differ}: {_CHAIN}")

    def layer_of(self, name: str) -> tuple[int | None, str | None]:
        """`(new layer index, new name)` of a name under the decoder layers; `(None, None)` for a removed layer,
        `(None, name)` for a name outside them."""
        m = _LAYER.match(name)
        if m is None:
            return None, name
        orig = int(m.group(2))
        if orig not in self.layers:
            return None, None
        j = self.layers.index(orig)
        return j, f"{m.group(1)}{j}{m.group(3)}"

    def query_heads(self, j: int) -> Tensor | None:
        """The kept query heads of new layer `j` (every query head of a kept KV group), or `None` for all."""
        if j not in self.heads:
            return None
        rep = self.num_heads // self.num_kv_heads
        return (self.heads[j][:, None] * rep + torch.arange(rep)).flatten()

    def weight_index(self, name: str, j: int | None, shape: list[int]) -> tuple[Tensor | None, Tensor | None]:
        """`(rows, cols)` of a tracked weight (new name, new layer `j`) to keep; `None` keeps that whole axis."""
        parts = name.split(".")
        leaf, parent = (parts[-2], parts[-3]) if len(parts) >= 3 else (parts[0], "")
        rows = cols = None
        hidden = self.hidden
        if leaf in ("embed_tokens", "lm_head"):  # [vocab, hidden] both
            return None, hidden
        if j is None:
            return None, None
        neurons = self.neurons.get(j) if parent == "mlp" else None
        q_heads = self.query_heads(j) if parent == "self_attn" else None
        if leaf in ("gate_proj", "up_proj"):
            rows, cols = neurons, hidden
        elif leaf == "gate_up_proj":
            rows = None if neurons is None else torch.cat([neurons, neurons + shape[0] // 2])
            cols = hidden
        elif leaf == "down_proj":
            rows, cols = hidden, neurons
        elif leaf in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj") and parent == "self_attn":
            d = self._head_dim(leaf, shape)
            q_cols = None if q_heads is None else _expand(q_heads, d)
            kv = None if q_heads is None else _expand(self.heads[j], d)
            if leaf == "q_proj":
                rows, cols = q_cols, hidden
            elif leaf in ("k_proj", "v_proj"):
                rows, cols = kv, hidden
            elif leaf == "qkv_proj":
                q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
                rows = None if q_heads is None else torch.cat([q_cols, q_size + kv, q_size + kv_size + kv])
                cols = hidden
            else:
                rows, cols = hidden, q_cols
        return rows, cols

    def _head_dim(self, leaf: str, shape: list[int]) -> int:
        if leaf == "o_proj":
            return shape[1] // self.num_heads
        if leaf == "q_proj":
            return shape[0] // self.num_heads
        if leaf == "qkv_proj":
            return shape[0] // (self.num_heads + 2 * self.num_kv_heads)
        return shape[0] // self.num_kv_heads  # k_proj / v_proj

    def unit_state(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The unit statistics (`UnitCollector.state_dict()` keys) of the kept units, layers renumbered.

        After a prune that removed layers, `taylor.hidden` is the sum of the kept layers' `layers.{i}.taylor.hidden`
        and `taylor.hidden.outside` (what `unit_scores(..., kept_layers=...)` ranks by): the whole model's counts the
        removed layers, and a step's `|.|` does not split by layer. Statistics saved without the per-layer sums (an
        older version) keep the whole model's, removed layers included."""
        out = {}
        for key, value in state.items():
            if key in ("taylor.hidden", "taylor.hidden.outside"):
                if key == "taylor.hidden" and self.removed_layers and "taylor.hidden.outside" in state:
                    value = sum((state[f"layers.{i}.taylor.hidden"] for i in self.layers),
                                state["taylor.hidden.outside"])
                out[key] = _take(value, self.hidden)
                continue
            m = re.match(r"^layers\.(\d+)\.(.*)$", key)
            if m is None:
                out[key] = value
                continue
            orig, rest = int(m.group(1)), m.group(2)
            if orig not in self.layers:
                continue
            j = self.layers.index(orig)
            q_heads = self.query_heads(j)
            index = {"neurons.abs": self.neurons.get(j), "neurons.sq": self.neurons.get(j),
                     "neurons.sum": self.neurons.get(j), "taylor.neurons": self.neurons.get(j),
                     "heads.norm": q_heads, "heads.sq": q_heads, "taylor.heads": self.heads.get(j),
                     "hidden.abs": self.hidden, "hidden.sq": self.hidden, "taylor.hidden": self.hidden}.get(rest)
            if rest == "heads.sum" and q_heads is not None:
                index = _expand(q_heads, value.numel() // self.num_heads)
            out[f"layers.{j}.{rest}"] = _take(value, index)
        return out


def kept_units(structured: Mapping) -> KeptUnits:
    """[`KeptUnits`] of a `PruningReport.structured` record (in memory or read from `sparsity.json`).

    Raises:
        `ValueError`: a record without the per-axis removed units.
    """
    return KeptUnits(structured)


def _complement(size: int, removed) -> Tensor:
    gone = {int(i) for i in removed}
    return torch.tensor([i for i in range(int(size)) if i not in gone], dtype=torch.long)


def _expand(units: Tensor, width: int) -> Tensor:
    """The consecutive channels of each unit of `width` channels."""
    return (units[:, None] * width + torch.arange(width)).flatten()


def _take(t: Tensor, index: Tensor | None, dim: int = 0) -> Tensor:
    return t if index is None else t.index_select(dim, index.to(t.device))


def slice_state(state: Tensor, kind: str, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """A per-weight accumulator state cut to the kept rows and columns of its weight.

    Args:
        state (`Tensor`): the raw state.
        kind (`str`): `"weight"` (shaped like the weight), `"input"` (`[in]`, e.g. wanda) or `"hessian"` (`[in, in]`).
        rows, cols (`Tensor` or `None`): the weight's kept output rows / input columns (`None`: all).
    """
    if kind == "weight":
        return _take(_take(state, rows, 0), cols, 1)
    if kind == "input":
        return _take(state, cols, 0)
    return _take(_take(state, cols, 0), cols, 1)


def shape_sizes(shapes: Mapping[str, list[int]], before: Mapping | None = None) -> dict[str, int | float]:
    """The config sizes an importance's tracked shapes show: `num_hidden_layers`, `intermediate_size` and
    `hidden_size` from the dense MLP's `down_proj`, and, when `before` (a structured record's `config["before"]`)
    states the head size `head_dim`, the attention's `num_key_value_heads` (`k_proj` / `v_proj` rows) and
    `num_attention_heads` (`q_proj` rows, `o_proj` columns) in units of it. A fused `qkv_proj` (Phi-3) holds
    `(heads + 2 * kv) * head_dim` rows, split by the query heads `o_proj` shows or else by the record's query/KV
    ratio. A heads prune keeps that ratio, so without the head size (a record written before it was stated) no shape
    tells the KV groups of two models of a chain apart: then they are not read. A count the head size does not
    divide is given as a float (it equals no record's)."""
    out: dict[str, int | float] = {}
    layers = {int(m.group(2)) for name in shapes if (m := _LAYER.match(name))}
    if layers:
        out["num_hidden_layers"] = max(layers) + 1
    for name, shape in shapes.items():
        if name.endswith("mlp.down_proj.weight") and ".experts." not in name:  # an expert has a width of its own
            out.setdefault("hidden_size", int(shape[0]))
            out.setdefault("intermediate_size", int(shape[1]))
    d = (before or {}).get("head_dim")
    if isinstance(d, int) and d > 0:
        out.update(_head_counts(shapes, d, before))
    return out


def _head_counts(shapes: Mapping[str, list[int]], d: int, before: Mapping) -> dict[str, int | float]:
    """`num_key_value_heads` / `num_attention_heads` the attention projections show for head size `d`."""
    out: dict[str, int | float] = {}
    fused = None
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(parts) < 3 or parts[-3] != "self_attn" or parts[-1] != "weight":
            continue
        leaf = parts[-2]
        if leaf in ("k_proj", "v_proj"):
            out.setdefault("num_key_value_heads", _per(shape[0], d))
        elif leaf in ("q_proj", "o_proj"):
            out.setdefault("num_attention_heads", _per(shape[0 if leaf == "q_proj" else 1], d))
        elif leaf == "qkv_proj" and fused is None:
            fused = _per(shape[0], d)  # heads + 2 * kv
    if fused is not None and "num_key_value_heads" not in out:
        heads, kv = before.get("num_attention_heads"), before.get("num_key_value_heads")
        if "num_attention_heads" in out:  # o_proj shows the query heads
            out["num_key_value_heads"] = _per(fused - out["num_attention_heads"], 2)
        elif isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv == 0:  # the ratio a prune keeps
            out["num_key_value_heads"] = n_kv = _per(fused, heads // kv + 2)
            out["num_attention_heads"] = n_kv * (heads // kv)
    return {k: out[k] for k in ("num_key_value_heads", "num_attention_heads") if k in out}  # a stable message


def _per(width: int | float, unit: int) -> int | float:
    """`width / unit`: an `int` when `unit` divides it, else a float (which equals no config size)."""
    return int(width) // unit if float(width).is_integer() and int(width) % unit == 0 else width / unit


def sizes_fit(sizes: Mapping[str, int | float], before: Mapping) -> bool:
    """Whether an importance of these [`shape_sizes`] describes the model a prune with these `before` config sizes
    (`structured["config"]["before"]`) was given: every size both state is equal, and they share at least one."""
    shared = [k for k in sizes if isinstance(before.get(k), int)]
    return bool(shared) and all(sizes[k] == before[k] for k in shared)
