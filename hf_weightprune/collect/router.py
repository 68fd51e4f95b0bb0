"""`RouterCollector`: what the routers of an MoE model did over training, and the inputs each expert received.

Forward hooks on every MoE block's experts module (`experts(hidden_states, top_k_index, top_k_weights)`) and router:

- router statistics, accumulated for the whole run (`state_dict()` / `load_state_dict()` for resume): per layer and
  expert the tokens routed (a token counts once for each expert it was sent to), the gate-weight mass (the sum of the
  routing weights the expert's outputs were scaled by) and, optionally, the router's soft probability mass
  (`softmax(router_logits)` summed over tokens: what the load-balancing loss uses); plus the real tokens the layer saw;
- per-expert input statistics for activation criteria, the same contract as `ActivationCollector` (`active`, `pop()`):
  `statistic(x, None)` over the inputs of the tokens routed to that expert, `gate_proj` / `up_proj` from the block's
  input, `down_proj` from the expert's gated intermediate (recomputed under `no_grad`: nothing exposes it).

Only real tokens count, by `collect/activations.py`'s rules: the model's `[batch, seq]` `attention_mask` (captured
by a pre-hook on the model) selects the rows of the flattened `[batch * seq, hidden]` input; other mask shapes count
every token; a gradient-checkpoint recompute inside backward is not counted again; eval forwards are not counted
unless `training_only=False`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as D
from ..moe import ExpertSlice, MoeBlock, find_moe_blocks
from .activations import ForwardMask, Statistic, in_backward_recompute, real_token_rows

__all__ = ["RouterCollector", "ROUTER_STATS"]

ROUTER_STATS = ("tokens", "gate_mass", "prob_mass", "seen")  # state_dict keys: f"{block name}.{stat}"


def _routing_args(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """`(hidden_states, top_k_index, top_k_weights)` of an experts call, whatever the architecture names them: the
    first tensor is the input, the integer one the expert indices, the floating one beside it the weights."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    if len(tensors) < 3:
        raise ValueError(f"an experts module was called with {len(tensors)} tensors; expected (hidden_states, "
                         "top_k_index, top_k_weights)")
    hidden, rest = tensors[0], tensors[1:]
    index = next((t for t in rest if not t.is_floating_point()), None)
    weights = next((t for t in rest if index is not None and t.is_floating_point() and t.shape == index.shape), None)
    if index is None or weights is None:
        raise ValueError("an experts module was called without an integer top-k index and float weights of its shape; "
                         "this MoE call convention is not supported")
    return hidden, index, weights


class RouterCollector(ForwardMask):
    """
    Router statistics (accumulated) and per-expert input statistics (per step) of an MoE model's training forwards.

    Args:
        model (`nn.Module`): the model whose forward is called (its `attention_mask` argument marks padding).
        blocks (`list[MoeBlock]`, *optional*): the MoE blocks to watch (default: `find_moe_blocks(model)`).
        slices (`Sequence[ExpertSlice]`, *optional*): the tracked expert slices whose input statistic is summed.
        statistic (`Callable[[Tensor, Tensor | None], Tensor]`, *optional*): `(x [tokens, in], None) -> sum`, e.g. a
            scorer's `statistic` (wanda: `[in]` sum of squares; sparsegpt: `[in, in]` sum of `x x^T`). Needed with
            `slices`.
        soft_probs (`bool`, *optional*, defaults to `False`): also sum the router's softmax probabilities.
        training_only (`bool`, *optional*, defaults to `True`): count only forwards in training mode.
        device (`Callable[[str], torch.device]`, *optional*): where the sums of a slice live (default: the input's).

    Router statistics are counted on every counted forward while registered; input statistics only while `active`
    is set (the sampled steps), like `ActivationCollector`. Use: `register()`, `pop()` after each step, `remove()`.

    Raises:
        `ValueError`: `slices` without `statistic`, or a slice of no watched block.
    """

    def __init__(self, model: nn.Module, blocks: list[MoeBlock] | None = None, *,
                 slices: Sequence[ExpertSlice] = (), statistic: Statistic | None = None, soft_probs: bool = False,
                 training_only: bool = True, device: Callable[[str], torch.device] | None = None):
        self.model = model
        self.blocks = find_moe_blocks(model) if blocks is None else list(blocks)
        if slices and statistic is None:
            raise ValueError("RouterCollector: `statistic` is needed to sum the inputs of tracked expert slices")
        self.statistic, self.soft_probs, self.training_only = statistic, soft_probs, training_only
        self._device = device
        self.active = False
        # tracked slices by block, then expert: [(slice, proj)]
        self._tracked: dict[str, dict[int, list[ExpertSlice]]] = {b.name: {} for b in self.blocks}
        by_experts = {b.experts_name: b.name for b in self.blocks}
        for s in slices:
            block = by_experts.get(s.module_name.rsplit(".", 2)[0])
            if block is None:
                raise ValueError(f"{s.name}: not a slice of any watched MoE block")
            self._tracked[block].setdefault(s.expert, []).append(s)
        self._stats = {b.name: self._zeros(b) for b in self.blocks}
        self._hooks: list = []
        self._sums: dict[str, Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._attention_mask: Tensor | None = None
        # real-token rows of the current forward by row count: one host synchronisation per forward, not per block
        self._rows: dict[tuple[int, torch.device], tuple[Tensor | None, int]] = {}

    @staticmethod
    def _zeros(block: MoeBlock) -> dict[str, Tensor]:
        dev = block.router.weight.device
        return {"tokens": torch.zeros(block.num_experts, dtype=torch.int64, device=dev),
                # float64: masses summed over a whole fine-tune (millions of tokens) keep their low digits
                "gate_mass": torch.zeros(block.num_experts, dtype=torch.float64, device=dev),
                "prob_mass": torch.zeros(block.num_experts, dtype=torch.float64, device=dev),
                "seen": torch.zeros((), dtype=torch.int64, device=dev)}

    # ---------------------------------------------------------------------------------------------------------------
    # Life cycle and results
    # ---------------------------------------------------------------------------------------------------------------

    def register(self) -> None:
        self.remove()
        self._hooks.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._release_mask))
        for b in self.blocks:
            self._hooks.append(b.experts.register_forward_hook(self._experts_hook(b), with_kwargs=True))
            if self.soft_probs:
                self._hooks.append(b.router.register_forward_hook(self._router_hook(b), with_kwargs=True))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._attention_mask, self._rows = [], None, {}

    def pop(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        """The input-statistic sums and routed real-token counts since the last `pop`, by slice name; resets them."""
        out = self._sums, self._tokens
        self._sums, self._tokens = {}, {}
        return out

    def stats(self, block_name: str) -> dict[str, Tensor]:
        """Router statistics of one block so far: `tokens` `[E]` int64, `gate_mass` / `prob_mass` `[E]` float64
        (`prob_mass` zero unless `soft_probs`), `seen` (real tokens through the layer)."""
        return self._stats[block_name]

    def state_dict(self) -> dict[str, Tensor]:
        """Flat `{f"{block}.{stat}": tensor}` (copies) of the router statistics: what a checkpoint stores."""
        return {f"{name}.{k}": v.clone() for name, stats in self._stats.items() for k, v in stats.items()}

    def section(self) -> dict[str, dict[str, Any]]:
        """The router statistics over all ranks (collective under DDP: every rank calls it), as the importance's
        `router` section: `{block: {"tokens": [int] * E, "gate_mass": [float] * E, "prob_mass": [float] * E, "seen":
        int}}`. JSON holds int64 counts and float64 masses exactly, so a resume continues from the same totals."""
        state = self.state_dict()
        D.all_reduce_exact_(state.values())
        out: dict[str, dict[str, Any]] = {}
        for key, value in state.items():
            block, _, stat = key.rpartition(".")
            out.setdefault(block, {})[stat] = value.tolist()
        return out

    def load_section(self, section: dict[str, dict[str, Any]], *, keep: bool) -> None:
        """Resume from a saved [`section`] (totals summed over ranks at save): one rank takes them (`keep`), the
        others count from zero, so the next [`section`] sums them once. Float64 holds the int64 counts exactly."""
        scale = 1.0 if keep else 0.0
        self.load_state_dict({f"{block}.{stat}": scale * torch.tensor(v, dtype=torch.float64)
                              for block, stats in section.items() for stat, v in stats.items()})

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """
        Restore router statistics written by `state_dict()` (resume).

        Raises:
            `ValueError`: one line naming the first missing, unexpected or misshapen entry (another model's state).
        """
        expected = self.state_dict()
        extra = sorted(set(state) - set(expected))
        if extra:
            raise ValueError(f"router statistics: unexpected entry {extra[0]} (from another model?)")
        for key, ref in expected.items():
            if key not in state:
                raise ValueError(f"router statistics: missing entry {key}")
            if tuple(state[key].shape) != tuple(ref.shape):
                raise ValueError(f"router statistics: {key} is {tuple(state[key].shape)}, expected {tuple(ref.shape)}")
        for name, stats in self._stats.items():
            for k, v in stats.items():
                v.copy_(state[f"{name}.{k}"])

    # ---------------------------------------------------------------------------------------------------------------
    # Hooks
    # ---------------------------------------------------------------------------------------------------------------

    def _counts(self, module: nn.Module) -> bool:
        return (module.training or not self.training_only) and not in_backward_recompute()

    def _real_rows(self, x: Tensor) -> tuple[Tensor | None, int]:
        """Real-token rows of a block input flattened to `[tokens, hidden]` (`None` when all count)."""
        flat = x.reshape(-1, x.shape[-1])
        key = (flat.shape[0], flat.device)
        if key not in self._rows:
            mask = self._attention_mask
            if mask is not None and mask.dim() == 2 and mask.numel() == flat.shape[0]:
                # MoE blocks flatten `[batch, seq, hidden]` row-major: the `[batch, seq]` mask flattens the same way
                self._rows[key] = real_token_rows(mask.reshape(1, -1), flat.unsqueeze(0))
            else:
                self._rows[key] = real_token_rows(None, flat)
        return self._rows[key]

    def _router_hook(self, block: MoeBlock):
        def hook(module, args, kwargs, output):
            if not self._counts(module):
                return
            logits = output[0] if isinstance(output, tuple) else output
            logits = logits.detach().reshape(-1, block.num_experts)
            rows, _ = self._real_rows(logits)
            if rows is not None:
                logits = logits.index_select(0, rows)
            probs = torch.softmax(logits.float(), dim=-1).sum(0)
            self._stats[block.name]["prob_mass"].add_(probs.to(torch.float64))

        return hook

    def _experts_hook(self, block: MoeBlock):
        def hook(module, args, kwargs, output):
            if not self._counts(module):
                return
            hidden, index, weights = _routing_args(args, kwargs)
            x = hidden.detach().reshape(-1, hidden.shape[-1])
            index, weights = index.reshape(x.shape[0], -1), weights.detach().reshape(x.shape[0], -1)
            rows, real = self._real_rows(x)
            if rows is not None:
                x, index, weights = x.index_select(0, rows), index.index_select(0, rows), weights.index_select(0, rows)
            # indices outside [0, E) are placeholders (expert parallelism's "not on this rank"): never counted
            valid = (index >= 0) & (index < block.num_experts)
            stats = self._stats[block.name]
            stats["seen"] += real
            stats["tokens"] += torch.bincount(index[valid], minlength=block.num_experts).to(stats["tokens"].device)
            stats["gate_mass"].scatter_add_(0, index[valid].to(stats["gate_mass"].device),
                                            weights[valid].to(stats["gate_mass"].device, torch.float64))
            if self.active and self._tracked[block.name]:
                self._expert_inputs(block, x, index)

        return hook

    def _expert_inputs(self, block: MoeBlock, x: Tensor, index: Tensor) -> None:
        """Add each tracked expert's input statistic over the real tokens routed to it."""
        for e, tracked in self._tracked[block.name].items():
            picked = (index == e).any(dim=-1).nonzero().squeeze(1)  # once per token even if listed twice
            if picked.numel() == 0:
                continue
            x_e = x.index_select(0, picked)
            stat_in = stat_mid = None
            for s in tracked:
                if s.proj == "down_proj":
                    if stat_mid is None:
                        stat_mid = self.statistic(_intermediate(block, e, x_e), None)
                    stat = stat_mid
                else:
                    if stat_in is None:
                        stat_in = self.statistic(x_e, None)
                    stat = stat_in
                self._add(s.name, stat, picked.numel())

    def _add(self, name: str, stat: Tensor, tokens: int) -> None:
        if name in self._sums:
            self._sums[name].add_(stat.to(self._sums[name].device))
        else:
            device = self._device(name) if self._device is not None else stat.device
            self._sums[name] = stat.to(device, copy=True)  # shared by gate/up: never alias it
        self._tokens[name] = self._tokens.get(name, 0) + tokens


@torch.no_grad()
def _intermediate(block: MoeBlock, expert: int, x: Tensor) -> Tensor:
    """The input of expert `expert`'s `down_proj` for rows `x`: its gated intermediate, recomputed (no module holds
    it), with the architecture's own gate (`_apply_gate`, e.g. gpt-oss's clamped SwiGLU) and biases."""
    experts, layout = block.experts, block.layout
    name = "gate_up_proj" if layout.has_gate else "up_proj"
    w = getattr(experts, name)[expert]
    x = x.to(w.dtype)
    h = x @ w if layout.transposed else F.linear(x, w)
    bias = getattr(experts, f"{name}_bias", None)
    if isinstance(bias, Tensor):
        h = h + bias[expert]
    if not layout.has_gate:
        return experts.act_fn(h)
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(h)
    gate, up = h.chunk(2, dim=-1)
    return experts.act_fn(gate) * up
