"""`ActivationCollector`: forward hooks that sum a statistic of tracked Linears' inputs over training forwards.

Shared by the callback (activation criteria such as `wanda`, summed over the training forwards of sampled steps)
and by `oneshot_importance` (calibration forwards). Only the inputs of real tokens count:
- padding: the model's `attention_mask` (captured by a pre-hook on the top-level model) selects the real tokens of
  every Linear input whose leading dims match it (`[batch, seq]`); other shapes count every token;
- gradient checkpointing: the recomputation of a checkpointed forward inside backward is not counted again;
- eval forwards (`module.training` false) are not counted unless the collector is built with `training_only=False`.

q/k/v (and gate/up) receive the same input tensor: it is reduced and accumulated once per forward, and the sum is
credited to each of them.
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
    `tests/train/test_compatibility.py::test_gradient_checkpointing_counts_once` for torch >= 2.4.
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


def shared_input_candidates(shapes: dict[str, Sequence[int]]) -> dict[str, str]:
    """Weights that may hold one input statistic, from names and statistic shapes alone: `name -> rep`, the first of a
    run of consecutive weights of one module and one shape (`...self_attn.{q,k,v}_proj.weight` -> `q_proj`'s). Only
    candidates: the statistics themselves tell (`distributed.shared_tensors`), so a resumed run finds them too."""
    names, candidates = list(shapes), {}
    for a, b in zip(names, names[1:]):
        if a.rsplit(".", 2)[0] == b.rsplit(".", 2)[0] and tuple(shapes[a]) == tuple(shapes[b]):
            candidates[b] = candidates.get(a, a)
    return candidates


def _drop_unguarded_graphs(model: nn.Module) -> None:
    # Graphs compiled while hook guards were skipped (an earlier compiled run in this process) would be reused for a
    # model of the same classes with the new hooks never run: the setting is read only when a graph is built, and
    # graph breaks cache frames per code object (each module class's `forward`). Drop the compiled entries of
    # `nn.Module`'s call path and of this model's module classes only (private, but narrow: `_dynamo.reset()` would
    # drop every compiled function of the process); they recompile once, now guarding on hooks.
    from torch._dynamo.eval_frame import reset_code  # private: no public API drops one code object's cache

    codes = {nn.Module._wrapped_call_impl.__code__, nn.Module._call_impl.__code__}
    codes |= {type(m).forward.__code__ for m in model.modules() if hasattr(type(m).forward, "__code__")}
    for code in codes:
        reset_code(code)


class HookGuards:
    """Compiled graphs guard on module hooks while at least one `HookGuards` is held; the setting then goes back.

    Dynamo skips module-hook guards by default (`torch._dynamo.config.skip_nnmodule_hook_guards`), so a graph compiled
    for a model class before hooks were added (an earlier compiled run in the process) would be reused without them,
    and one compiled with them would keep running them after they are removed. While held, dynamo guards on hooks:
    only graphs whose hooks changed recompile (no `_dynamo.reset()`, which would drop every other compiled function).
    Holders are counted (the activation hooks and the distiller hold it at once, and release in any order): the
    first saves the process's setting, the last puts it back.
    """

    _holders = 0
    _saved: bool | None = None

    def __init__(self):
        self.held = False

    def acquire(self, model: nn.Module) -> None:
        """Guard on hooks (the first holder saves the setting); drops `model`'s graphs compiled without guards."""
        if self.held:
            return
        cls = type(self)
        if cls._holders == 0:
            cls._saved = torch._dynamo.config.skip_nnmodule_hook_guards
            torch._dynamo.config.skip_nnmodule_hook_guards = False
            if cls._saved:
                _drop_unguarded_graphs(model)
        cls._holders += 1
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        cls = type(self)
        self.held = False
        cls._holders -= 1
        if cls._holders == 0:
            torch._dynamo.config.skip_nnmodule_hook_guards = cls._saved


class ForwardMask:
    """The `attention_mask` of the model's forward in progress, for hooks on modules inside it (which see only hidden
    states): `_capture_mask` is a forward pre-hook (`with_kwargs=True`) on the model, `_release_mask` a forward hook
    on it. `_rows` caches the real-token rows of this forward, per input shape."""

    _attention_mask: Tensor | None = None

    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._attention_mask = mask if isinstance(mask, Tensor) else None
        self._rows = {}

    def _release_mask(self, module, args, output):
        self._attention_mask, self._rows = None, {}


class ActivationCollector(ForwardMask):
    """Per-step sums of `statistic` over the inputs of the tracked Linears, from forward hooks.

    Linears that receive the same input object in one forward (q/k/v, gate/up: consecutive hooks, compared by
    identity) form a group: its input is reduced once, accumulated once, and the sum is credited to every weight of
    the group. So a forward costs one reduction (and one accumulation) per distinct input, not one per weight.

    Args:
        model (`nn.Module`): the model whose forward is called (its `attention_mask` argument marks padding).
        tracked (`list[TrackedWeight]`): the Linears whose inputs are summed.
        statistic (`Callable[[Tensor, Tensor | None], Tensor]`): `(x, token_mask) -> sum over the real tokens`.
        device (`Callable[[str], torch.device]`, *optional*): where the sums of a weight live (default: the input's).
        training_only (`bool`, *optional*, defaults to `True`): count only forwards in training mode.
        guard_hooks (`bool`, *optional*, defaults to `False`): the model runs compiled: hold [`HookGuards`] while the
            hooks are registered, so that a graph compiled without them is not reused.

    Use: `register()`, set `active` for the forwards that count, `pop()` the sums after each step, `remove()`.
    """

    def __init__(self, model: nn.Module, tracked: Sequence[TrackedWeight], statistic: Statistic, *,
                 device: Callable[[str], torch.device] | None = None, training_only: bool = True,
                 guard_hooks: bool = False):
        self.model, self.tracked, self.statistic = model, list(tracked), statistic
        self._device = device
        self.training_only = training_only
        self.active = False
        self._hooks: list = []
        self._guards = HookGuards() if guard_hooks else None
        # Sums and real-token counts by group (the names of the weights that saw one input, in call order).
        self._sums: dict[tuple[str, ...], Tensor] = {}
        self._tokens: dict[tuple[str, ...], int] = {}
        self._attention_mask: Tensor | None = None
        self._open: tuple[Tensor, Tensor, int, list[str]] | None = None  # (input, its statistic, tokens, names)
        # The real-token rows of the current forward, by input shape: found once per forward, not once per Linear
        # (each costs a host synchronisation, which stalls an accelerator's queue).
        self._rows: dict[tuple[tuple[int, ...], torch.device], tuple[Tensor | None, int]] = {}

    def register(self) -> None:
        self.remove()
        self._hooks.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._release_mask))
        for t in self.tracked:
            self._hooks.append(t.module.register_forward_hook(self._make_hook(t.name)))
        if self._guards is not None:
            self._guards.acquire(self.model)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._guards is not None:
            self._guards.release()
        self._attention_mask, self._open, self._rows = None, None, {}

    def pop(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        """The sums and real-token counts collected since the last `pop`, by weight name; resets them.

        The weights of one group share one sum tensor: read it, do not modify it in place.
        """
        self._close()
        sums: dict[str, Tensor] = {}
        tokens: dict[str, int] = {}
        for group, total in self._sums.items():
            for name in group:
                # A weight is in two groups only if its input was shared in some forwards and not in others.
                sums[name] = sums[name] + total.to(sums[name].device) if name in sums else total
                tokens[name] = tokens.get(name, 0) + self._tokens[group]
        self._sums, self._tokens = {}, {}
        return sums, tokens

    def _release_mask(self, module, args, output):
        self._close()
        super()._release_mask(module, args, output)

    def _real_rows(self, x: Tensor) -> tuple[Tensor | None, int]:
        key = (tuple(x.shape[:-1]), x.device)
        found = self._rows.get(key)
        if found is None:
            found = self._rows[key] = real_token_rows(self._attention_mask, x)
        return found

    def _reduce(self, x: Tensor) -> tuple[Tensor, int]:
        """The statistic of one input over its real tokens, and their number: the one reduction of a group."""
        if torch.compiler.is_compiling():  # a boolean mask, as the graph cannot hold the data-dependent rows
            mask = real_token_mask(self._attention_mask, x)
            return self.statistic(x, mask), count_tokens(x, mask)
        rows, tokens = self._real_rows(x)
        if rows is not None:  # the real tokens only, as `[tokens, in]`
            x = x.reshape(-1, x.shape[-1]).index_select(0, rows)
        return self.statistic(x, None), tokens

    def _add(self, group: tuple[str, ...], stat: Tensor, tokens: int) -> None:
        if group in self._sums:
            self._sums[group].add_(stat.to(self._sums[group].device))
        else:  # `stat` is this group's own result: kept without a copy unless it lives elsewhere
            self._sums[group] = stat if self._device is None else stat.to(self._device(group[0]))
        self._tokens[group] = self._tokens.get(group, 0) + tokens

    def _close(self) -> None:
        """Fold the open group (the last distinct input seen) into the sums."""
        if self._open is not None:
            _, stat, tokens, names = self._open
            self._open = None
            self._add(tuple(names), stat, tokens)

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not self.active or (self.training_only and not module.training) or in_backward_recompute():
                return
            source = inputs[0]  # q/k/v (gate/up) receive this same object: compared by identity, not `.detach()`
            if torch.compiler.is_compiling():
                # Traced into the graph as is: one statistic per Linear, folded at once (no state across hooks).
                self._add((name,), *self._reduce(source.detach()))
                return
            if self._open is not None and self._open[0] is source:
                self._open[3].append(name)  # the same input as the open group: credited, not reduced again
                return
            self._close()
            stat, tokens = self._reduce(source.detach())
            self._open = (source, stat, tokens, [name])

        return hook
