"""`UnitCollector`: how much each structural unit of a decoder mattered over training (structured pruning's input).

Units (see `collect/unit_layout.py`): MLP neurons, KV groups (with their query heads), hidden channels, decoder
layers. Statistics, summed over the real tokens of every counted training forward and over steps:

- neurons: `sum |a_j|` and `sum a_j^2` of the input of `down_proj` (`act(gate) * up`): Minitron's activation
  importance (arXiv 2407.14679) and its L2 variant;
- heads: per query head, `sum ||o_h||_2` and `sum ||o_h||^2` of the attention output (the input of `o_proj` viewed
  as `[tokens, heads, head_dim]`); a KV group's score sums its query heads;
- signed sums `sum a_j` of every `down_proj` input channel and `sum o_c` of every `o_proj` input channel: the mean
  input that FLAP's bias compensation (arXiv 2312.11983) folds into the consumer's bias ([`unit_means`]);
- hidden channels: `sum |x_c|` and `sum x_c^2` of the residual stream entering each decoder layer, kept per layer;
- layers: block influence (ShortGPT, arXiv 2403.03853), `sum (1 - cos(x_in, x_out))` of the layer's residual stream;
- first-order Taylor (LLM-Pruner, arXiv 2305.11627) per neuron, KV group, hidden channel and layer:
  `|sum over the unit's weights of g * w|` once per optimizer step (`update_taylor_`), summed over steps; a hidden
  channel's also per decoder layer and for the weights outside the layers, so that a prune removing layers can rank
  the channels by the layers that stay (the whole model's `|.|` of a step does not split by layer).

Only real tokens count, by `collect/activations.py`'s rules: the model's `[batch, seq]` `attention_mask` (captured by
a pre-hook on the model) selects the rows; other mask shapes count every token; a gradient-checkpoint recompute inside
backward is not counted again; eval forwards are not counted unless `training_only=False`.

Every statistic is a sum with its token (or step) count, so partial results merge by addition: across ranks (sum the
`state_dict()`s; under DDP call `update_taylor_` on one rank only, the gradients being already averaged) and across a
resume (`load_state_dict()`). Per step, the hooks add into pending sums: `pop()` returns and clears them (check them,
e.g. for non-finite values), `add_()` folds them into the totals that `state_dict()` and `scores()` read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as D
from .activations import ForwardMask, HookGuards, in_backward_recompute, real_token_rows
from .unit_layout import LayerUnits, find_layer_units, hidden_taylor_, layer_taylor
from .unit_scoring import UNIT_STATISTICS, unit_means, unit_scores  # re-exported: the collector's public names

# The per-layer hidden Taylor sums (and the part outside the layers), kept since a prune removing layers ranks the
# channels by the layers that stay; an older version's checkpoint lacks them.
_PER_LAYER_TAYLOR = re.compile(r"layers\.\d+\.taylor\.hidden|taylor\.hidden\.outside")

__all__ = ["UNIT_STATISTICS", "UnitCollector", "unit_means", "unit_scores"]



class UnitCollector(ForwardMask):
    """Per-unit activation magnitudes, block influence and first-order Taylor sums of a decoder's training run.

    Args:
        model (`nn.Module`): the causal LM whose forward is called (its `attention_mask` argument marks padding).
        training_only (`bool`, *optional*, defaults to `True`): count only forwards in training mode.
        guard_hooks (`bool`, *optional*, defaults to `False`): the model runs compiled: hold `HookGuards` while the
            hooks are registered, so that a graph compiled without them is not reused.

    Forwards count while registered and `active` (default `True`). Use: `register()`; after each step `add_(pop())`
    (and `update_taylor_(model)` before it, where gradients are present); `state_dict()` for checkpoints; `scores()`.

    Raises:
        `ValueError`: no decoder layers, or attention that is not whole KV groups (see `find_layer_units`).

    State keys (float64 sums on the layer's device, int64 counts on CPU), for layer `i`:
    `layers.{i}.tokens`, `layers.{i}.influence`, `layers.{i}.hidden.{abs,sq}` `[H]`; with an MLP
    `layers.{i}.neurons.{abs,sq,sum}` `[I]`, `layers.{i}.neurons.tokens`, `layers.{i}.taylor.neurons` `[I]`; with
    attention `layers.{i}.heads.{norm,sq}` `[heads]`, `layers.{i}.heads.sum` `[heads * head_dim]`,
    `layers.{i}.heads.tokens`, `layers.{i}.taylor.heads` `[kv_heads]`; `layers.{i}.taylor`, `layers.{i}.taylor.hidden`
    `[H]` (the layer's own `|sum g * w|` per channel); and `taylor.hidden` `[H]` (over the whole model),
    `taylor.hidden.outside` `[H]` (embeddings, lm_head, final norm), `taylor.steps`.
    """

    def __init__(self, model: nn.Module, *, training_only: bool = True, guard_hooks: bool = False):
        self.model, self.training_only = model, training_only
        self._guards = HookGuards() if guard_hooks else None  # compiled: graphs must see these hooks
        self.units = find_layer_units(model)
        self.hidden_size = int(model.get_input_embeddings().weight.shape[-1])
        self.active = True
        self._totals = self._zeros()
        self._pending: dict[str, Tensor] = {}
        self._pending_counts: dict[str, int] = {}
        self._without: set[str] = set()  # per-layer Taylor keys an older checkpoint lacked (`load_state_dict`)
        self._hooks: list = []
        self._attention_mask: Tensor | None = None
        # real-token rows of the current forward by leading shape: one host synchronisation per forward, not per hook
        self._rows: dict[tuple[tuple[int, ...], torch.device], tuple[Tensor | None, int]] = {}

    def _zeros(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        f64, i64, h = torch.float64, torch.int64, self.hidden_size
        for u in self.units:
            dev, p = next(u.layer.parameters()).device, f"layers.{u.index}"
            out[f"{p}.tokens"] = torch.zeros((), dtype=i64)
            out[f"{p}.influence"] = torch.zeros((), dtype=f64, device=dev)
            out[f"{p}.hidden.abs"] = torch.zeros(h, dtype=f64, device=dev)
            out[f"{p}.hidden.sq"] = torch.zeros(h, dtype=f64, device=dev)
            if u.mlp is not None:
                out[f"{p}.neurons.abs"] = torch.zeros(u.intermediate, dtype=f64, device=dev)
                out[f"{p}.neurons.sq"] = torch.zeros(u.intermediate, dtype=f64, device=dev)
                out[f"{p}.neurons.sum"] = torch.zeros(u.intermediate, dtype=f64, device=dev)
                out[f"{p}.neurons.tokens"] = torch.zeros((), dtype=i64)
                out[f"{p}.taylor.neurons"] = torch.zeros(u.intermediate, dtype=f64, device=dev)
            if u.attn is not None:
                out[f"{p}.heads.norm"] = torch.zeros(u.num_heads, dtype=f64, device=dev)
                out[f"{p}.heads.sq"] = torch.zeros(u.num_heads, dtype=f64, device=dev)
                out[f"{p}.heads.sum"] = torch.zeros(u.num_heads * u.head_dim, dtype=f64, device=dev)
                out[f"{p}.heads.tokens"] = torch.zeros((), dtype=i64)
                out[f"{p}.taylor.heads"] = torch.zeros(u.num_kv_heads, dtype=f64, device=dev)
            out[f"{p}.taylor"] = torch.zeros((), dtype=f64, device=dev)
            out[f"{p}.taylor.hidden"] = torch.zeros(h, dtype=f64, device=dev)
        embed_dev = self.model.get_input_embeddings().weight.device
        out["taylor.hidden"] = torch.zeros(h, dtype=f64, device=embed_dev)
        out["taylor.hidden.outside"] = torch.zeros(h, dtype=f64, device=embed_dev)
        out["taylor.steps"] = torch.zeros((), dtype=i64)
        return out

    # ---------------------------------------------------------------------------------------------------------------
    # Life cycle
    # ---------------------------------------------------------------------------------------------------------------

    def register(self) -> None:
        self.remove()
        self._hooks.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._release_mask))
        if self._guards is not None:
            self._guards.acquire(self.model)
        for u in self.units:
            self._hooks.append(u.layer.register_forward_hook(self._layer_hook(u), with_kwargs=True))
            if u.mlp is not None:
                self._hooks.append(u.block.down_proj.register_forward_hook(self._neuron_hook(u)))
            if u.attn is not None:
                self._hooks.append(u.self_attn.o_proj.register_forward_hook(self._head_hook(u)))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._attention_mask, self._rows = [], None, {}
        if self._guards is not None:
            self._guards.release()

    def pop(self) -> dict[str, Tensor]:
        """The sums and counts gathered since the last `pop` (only the keys touched), by state key; resets them."""
        out = dict(self._pending)
        out.update({k: torch.tensor(v, dtype=torch.int64) for k, v in self._pending_counts.items()})
        self._pending, self._pending_counts = {}, {}
        return out

    def add_(self, sums: dict[str, Tensor]) -> None:
        """Fold sums (a `pop()`, or another rank's `state_dict()`) into the totals.

        Raises:
            `ValueError`: a key or shape that is not this model's (nothing is added then).
        """
        self._check(sums, complete=False)
        for k, v in sums.items():
            self._totals[k].add_(v.to(self._totals[k].device, self._totals[k].dtype))

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of the totals (flat `{key: tensor}`): what a checkpoint stores; pending sums are not included."""
        return {k: v.clone() for k, v in self._totals.items()}

    def commit_(self, model: nn.Module | None, *, taylor: bool, skip_nonfinite: bool = True) -> bool:
        """End of an optimizer step's forwards (before the optimizer step): fold the step's sums into the totals.

        Args:
            model (`nn.Module`, *optional*): for Taylor, whose `.grad` are present (DDP-averaged).
            taylor (`bool`): read Taylor from the gradients (one rank only: averaged gradients are the same everywhere).
            skip_nonfinite (`bool`, *optional*, defaults to `True`): a non-finite sum on any rank drops the step on
                every rank (collective under DDP), as for the other statistics.

        Returns:
            `bool`: whether the step was added (`False` for a step that did not count, or was dropped).
        """
        if self.active and taylor:
            self.update_taylor_(model)
        sums = self.pop()
        if not self.active:
            return False
        bad = skip_nonfinite and any(v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in sums.values())
        if D.any_rank(bad):
            return False
        self.add_(sums)
        return True

    def reduced_state(self) -> dict[str, Tensor]:
        """The totals summed across ranks, exactly (collective under DDP: every rank calls it)."""
        state = self.state_dict()
        D.all_reduce_exact_(state.values())
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace the totals by a `state_dict()` (resume; pending sums are dropped).

        A state from before the per-layer hidden Taylor sums (an older version's checkpoint) resumes without them: they
        are no longer kept (sums of part of the run would rank wrongly), so a Taylor ranking of the hidden channels over
        the layers that stay is refused, as for that version's files; every other statistic continues exactly.

        Raises:
            `ValueError`: one line naming the first missing, unexpected or misshapen entry (another model's state).
        """
        older = [k for k in set(self._totals) - set(state) if _PER_LAYER_TAYLOR.fullmatch(k)]
        for k in older:
            del self._totals[k]
        self._without.update(older)
        self._check(state, complete=True)
        for k, v in self._totals.items():
            v.copy_(state[k])
        self._pending, self._pending_counts = {}, {}

    def _check(self, state: dict[str, Tensor], *, complete: bool) -> None:
        extra = sorted(set(state) - set(self._totals))
        if extra:
            raise ValueError(f"unit statistics: unexpected entry {extra[0]} (from another model?)")
        missing = sorted(set(self._totals) - set(state)) if complete else []
        if missing:
            raise ValueError(f"unit statistics: missing entry {missing[0]}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(self._totals[k].shape):
                raise ValueError(f"unit statistics: {k} is {tuple(v.shape)}, expected {tuple(self._totals[k].shape)}")

    # ---------------------------------------------------------------------------------------------------------------
    # Taylor (called where gradients are present: the callback's `on_pre_optimizer_step`)
    # ---------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_taylor_(self, model: nn.Module | None = None) -> bool:
        """Add this step's `|sum g * w|` of every unit to the pending sums, from the parameters' `.grad`.

        Args:
            model (`nn.Module`, *optional*): the model holding the gradients (defaults to the collector's; pass the one
                the callback receives). Its decoder must have the collector's layers.

        Returns:
            `bool`: whether any gradient was found (a step without one, e.g. a frozen base under LoRA, counts nothing).

        Raises:
            `ValueError`: `model`'s decoder layers differ from the collector's, or its weights are FSDP2 shards.
        """
        units = self.units
        if model is not None and model is not self.model:
            found = find_layer_units(model)
            if [u.layer for u in found] != [u.layer for u in units]:
                raise ValueError("UnitCollector.update_taylor_: this model's decoder layers are not the collector's")
        hidden = torch.zeros(self.hidden_size, device=self._totals["taylor.hidden"].device)
        seen = False
        for u in units:
            t = layer_taylor(u, self.hidden_size)
            if t is None:
                continue
            seen, p = True, f"layers.{u.index}"
            self._add(f"{p}.taylor", t["layer"].abs())
            if "neurons" in t:
                self._add(f"{p}.taylor.neurons", t["neurons"].abs())
            if "heads" in t:
                self._add(f"{p}.taylor.heads", t["heads"].abs())
            # Also per layer: a prune that removes layers ranks the channels by the layers that stay (`unit_scores`)
            self._add(f"{p}.taylor.hidden", t["hidden"].abs())
            hidden += t["hidden"].to(hidden.device)
        outside = torch.zeros_like(hidden)
        hidden_taylor_(model if model is not None else self.model, outside)
        hidden += outside
        if seen:  # a channel's sum runs over the whole model before its |.|
            self._add("taylor.hidden", hidden.abs())
            self._add("taylor.hidden.outside", outside.abs())
            self._count("taylor.steps", 1)
        return seen

    # ---------------------------------------------------------------------------------------------------------------
    # Scores
    # ---------------------------------------------------------------------------------------------------------------

    def scores(self, statistic: str = "activation", *, kept_layers: Sequence[int] | None = None) -> dict:
        """Per-unit scores from the totals (higher = more important), float32 on CPU: [`unit_scores`] of
        `state_dict()` (`kept_layers`: hidden channels over those layers only).

        Raises:
            `ValueError`: an unknown statistic, or nothing counted yet for it.
        """
        return unit_scores(self._totals, statistic, kept_layers=kept_layers)

    # ---------------------------------------------------------------------------------------------------------------
    # Hooks
    # ---------------------------------------------------------------------------------------------------------------

    def _counts(self, module: nn.Module) -> bool:
        return self.active and (module.training or not self.training_only) and not in_backward_recompute()

    def _real(self, x: Tensor) -> tuple[Tensor, int]:
        """`x` `[..., d]` as float32 `[real tokens, d]`, and their number."""
        key = (tuple(x.shape[:-1]), x.device)
        if key not in self._rows:
            self._rows[key] = real_token_rows(self._attention_mask, x)
        rows, n = self._rows[key]
        x = x.detach().reshape(-1, x.shape[-1])
        if rows is not None:
            x = x.index_select(0, rows)
        return x.float(), n

    def _add(self, key: str, value: Tensor) -> None:
        if key in self._without:  # not kept since an older checkpoint's resume (`load_state_dict`)
            return
        if key in self._pending:
            self._pending[key].add_(value.to(self._pending[key].device, torch.float64))
        else:
            self._pending[key] = value.to(self._totals[key].device, torch.float64, copy=True)

    def _count(self, key: str, n: int) -> None:
        self._pending_counts[key] = self._pending_counts.get(key, 0) + n

    def _layer_hook(self, u: LayerUnits):
        p = f"layers.{u.index}"

        def hook(module, args, kwargs, output):
            if not self._counts(module):
                return
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            x, n = self._real(x)
            y, _ = self._real(y)
            self._add(f"{p}.hidden.abs", x.abs().sum(0))
            self._add(f"{p}.hidden.sq", x.square().sum(0))
            self._add(f"{p}.influence", (1 - F.cosine_similarity(x, y, dim=-1)).sum())
            self._count(f"{p}.tokens", n)

        return hook

    def _neuron_hook(self, u: LayerUnits):
        p = f"layers.{u.index}"

        def hook(module, inputs, output):
            if not self._counts(module):
                return
            a, n = self._real(inputs[0])
            self._add(f"{p}.neurons.abs", a.abs().sum(0))
            self._add(f"{p}.neurons.sq", a.square().sum(0))
            self._add(f"{p}.neurons.sum", a.sum(0))
            self._count(f"{p}.neurons.tokens", n)

        return hook

    def _head_hook(self, u: LayerUnits):
        p = f"layers.{u.index}"

        def hook(module, inputs, output):
            if not self._counts(module):
                return
            o, n = self._real(inputs[0])
            sq = o.reshape(o.shape[0], u.num_heads, u.head_dim).square().sum(-1)  # [tokens, heads]: ||o_h||^2
            self._add(f"{p}.heads.norm", sq.sqrt().sum(0))
            self._add(f"{p}.heads.sq", sq.sum(0))
            self._add(f"{p}.heads.sum", o.sum(0))
            self._count(f"{p}.heads.tokens", n)

        return hook
