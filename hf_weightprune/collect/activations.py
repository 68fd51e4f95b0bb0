"""`ActivationCollector`: forward hooks that sum a statistic of tracked Linears' inputs over training forwards.

Shared by the callback (activation criteria such as `wanda`, summed over the training forwards of sampled steps)
and by `oneshot_importance` (calibration forwards). Only the inputs of real tokens count:
- padding: the model's `attention_mask` (captured by a pre-hook on the top-level model) selects the real tokens of
  every Linear input whose leading dims match it (`[batch, seq]`); other shapes count every token;
- gradient checkpointing: the recomputation of a checkpointed forward inside backward is not counted again;
- eval forwards (`module.training` false) are not counted unless the collector is built with `training_only=False`.

q/k/v (and gate/up) receive the same input tensor: its statistic is computed once per forward and shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..matching import TrackedWeight

# statistic(x [..., in], token_mask bool [...] or None) -> per-input sum over the real tokens (e.g. [in] or [in, in])
Statistic = Callable[[Tensor, "Tensor | None"], Tensor]


def in_backward_recompute() -> bool:
    """True inside autograd's backward pass, where gradient checkpointing re-runs forwards.

    Grad mode cannot tell (reentrant checkpointing runs the first forward under `no_grad`); the current graph
    task is what autograd's engine sets while it executes backward. A compiled forward is never such a recompute
    (and the private call would break its graph), so it answers False under compilation. Covered by
    `tests/test_robustness.py::test_gradient_checkpointing_counts_once` for torch >= 2.4.
    """
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _selects_rows(attention_mask: Tensor | None, x: Tensor) -> bool:
    """A 2-D `[batch, seq]` mask shaped like `x.shape[:-1]`; anything else (none, packed, 4-D) counts every token."""
    return attention_mask is not None and attention_mask.dim() == 2 and tuple(attention_mask.shape) == tuple(x.shape[:-1])


def real_token_mask(attention_mask: Tensor | None, x: Tensor) -> Tensor | None:
    """Boolean `[...]` mask of the real tokens of a Linear input `x` `[..., in]`, or `None` when all count.

    `attention_mask` is the model's `[batch, seq]` mask (1 = real token, 0 = padding). A 2-D mask whose shape equals
    `x.shape[:-1]` selects rows; anything else (no mask, packed sequences, 4-D masks) counts every token.
    """
    if not _selects_rows(attention_mask, x):
        return None
    mask = attention_mask.to(device=x.device) != 0
    return None if bool(mask.all()) else mask


def count_tokens(x: Tensor, mask: Tensor | None) -> int:
    return int(mask.sum()) if mask is not None else x.numel() // x.shape[-1]


def real_token_rows(attention_mask: Tensor | None, x: Tensor) -> tuple[Tensor | None, int]:
    """Row indices of the real tokens of `x` flattened to `[tokens, in]` (`None` when all count) and their number.

    The same rule as `real_token_mask`, found with one host synchronisation, so a forward's hooks can share it.
    """
    total = x.numel() // max(x.shape[-1], 1)
    if not _selects_rows(attention_mask, x):
        return None, total
    rows = (attention_mask.to(device=x.device) != 0).reshape(-1).nonzero().squeeze(1)
    return (None, total) if rows.numel() == total else (rows, rows.numel())


class ActivationCollector:
    """Per-step sums of `statistic` over the inputs of the tracked Linears, from forward hooks.

    Args:
        model (`nn.Module`): the model whose forward is called (its `attention_mask` argument marks padding).
        tracked (`list[TrackedWeight]`): the Linears whose inputs are summed.
        statistic (`Callable[[Tensor, Tensor | None], Tensor]`): `(x, token_mask) -> sum over the real tokens`.
        device (`Callable[[str], torch.device]`, *optional*): where the sums of a weight live (default: the input's).
        training_only (`bool`, *optional*, defaults to `True`): count only forwards in training mode.

    Use: `register()`, set `active` for the forwards that count, `pop()` the sums after each step, `remove()`.
    """

    def __init__(self, model: nn.Module, tracked: Sequence[TrackedWeight], statistic: Statistic, *,
                 device: Callable[[str], torch.device] | None = None, training_only: bool = True):
        self.model, self.tracked, self.statistic = model, list(tracked), statistic
        self._device = device
        self.training_only = training_only
        self.active = False
        self._hooks: list = []
        self._sums: dict[str, Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._attention_mask: Tensor | None = None
        self._last: tuple[Tensor, Tensor, int] | None = None  # (input, its statistic, tokens): shared by q/k/v
        # The real-token rows of the current forward, by input shape: found once per forward, not once per Linear
        # (each costs a host synchronisation, which stalls an accelerator's queue).
        self._rows: dict[tuple[tuple[int, ...], torch.device], tuple[Tensor | None, int]] = {}

    def register(self) -> None:
        self.remove()
        self._hooks.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._release_mask))
        for t in self.tracked:
            self._hooks.append(t.module.register_forward_hook(self._make_hook(t.name)))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._attention_mask, self._last, self._rows = None, None, {}

    def pop(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        """The sums and real-token counts collected since the last `pop`, by weight name; resets them."""
        out = self._sums, self._tokens
        self._sums, self._tokens, self._last = {}, {}, None
        return out

    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._attention_mask = mask if isinstance(mask, Tensor) else None
        self._rows = {}

    def _release_mask(self, module, args, output):
        self._attention_mask, self._last, self._rows = None, None, {}

    def _real_rows(self, x: Tensor) -> tuple[Tensor | None, int]:
        key = (tuple(x.shape[:-1]), x.device)
        found = self._rows.get(key)
        if found is None:
            found = self._rows[key] = real_token_rows(self._attention_mask, x)
        return found

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not self.active or (self.training_only and not module.training) or in_backward_recompute():
                return
            source = inputs[0]  # q/k/v (gate/up) receive this same object: compared by identity, not `.detach()`
            x = source.detach()
            compiling = torch.compiler.is_compiling()
            last = None if compiling else self._last
            if last is not None and last[0] is source:
                stat, tokens = last[1], last[2]
            elif compiling:
                mask = real_token_mask(self._attention_mask, x)
                stat, tokens = self.statistic(x, mask), count_tokens(x, mask)
            else:
                rows, tokens = self._real_rows(x)
                if rows is not None:  # the real tokens only, as `[tokens, in]`
                    x = x.reshape(-1, x.shape[-1]).index_select(0, rows)
                stat = self.statistic(x, None)
                self._last = (source, stat, tokens)
            if name in self._sums:
                self._sums[name].add_(stat.to(self._sums[name].device))
            else:
                device = self._device(name) if self._device is not None else stat.device
                self._sums[name] = stat.to(device, copy=True)  # `stat` may be shared with q/k/v: never alias it
            self._tokens[name] = self._tokens.get(name, 0) + tokens

        return hook
