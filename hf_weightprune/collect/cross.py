"""The dense-to-pruned cross term of GPTAQ / QEP, gathered from a teacher and a student run on the same batch.

The asymmetric OBS objective `||W X - W_hat X~||^2` ([`prune.refit`]) needs, per Linear input, the pruned model's
Hessian `H~ = sum x~ x~^T` and the cross term `C = sum (x - x~) x~^T` over the same real tokens, where `x` is the
dense model's input of that Linear and `x~` the pruned model's. Under distillation both forwards run on every batch:
the teacher (dense) first, inside the student's forward pre-hook, then the student (pruned). [`CrossTermCollector`]
keeps the teacher's inputs of the tracked Linears until the student's Linear with the same name consumes them.

Memory: `H~` and `C`, two `[in, in]` float32 matrices per distinct input (q/k/v and gate/up share theirs), so one
`in^2` more than the `sparsegpt` statistic alone, plus the teacher's Linear inputs of one forward until the student
reaches them (`tokens x in` per distinct input, the size of that forward's activations). `max_in_features` skips the
largest inputs (e.g. down_proj's `intermediate^2`); those keep the plain objective.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .activations import in_backward_recompute, real_token_mask

__all__ = ["CrossTermCollector", "cross_sum"]


def cross_sum(x: Tensor, x_tilde: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """
    `sum over real tokens of (x - x~) x~^T`: one forward's increment of the dense-to-pruned cross term.

    Args:
        x (`torch.Tensor`): the dense model's Linear input, `[..., in]`.
        x_tilde (`torch.Tensor`): the pruned model's input of the same Linear for the same tokens, shaped like `x`.
        token_mask (`torch.BoolTensor`, *optional*): `x.shape[:-1]`, `True` = real token.

    Returns:
        `torch.Tensor`: `[in, in]` float32 on `x_tilde`'s device (rows: `x - x~`, columns: `x~`).

    Raises:
        `ValueError`: the shapes of `x` and `x_tilde` differ.
    """
    if x.shape != x_tilde.shape:
        raise ValueError(f"dense and pruned inputs must have the same shape (the same tokens), got {tuple(x.shape)} "
                         f"and {tuple(x_tilde.shape)}")
    xt = x_tilde.detach().float()
    d = x.detach().to(xt.device, torch.float32) - xt
    if token_mask is not None:
        keep = token_mask.to(xt.device)
        d, xt = d[keep], xt[keep]
    d, xt = d.reshape(-1, d.shape[-1]), xt.reshape(-1, xt.shape[-1])
    with torch.autocast(xt.device.type, enabled=False):
        return d.T @ xt


class CrossTermCollector:
    """Forward hooks on a teacher and a student sharing Linear names: `H~` and `C` per distinct student input.

    Lifecycle: `register()`, then for every batch the teacher's forward followed by the student's on the same inputs
    (what [`Distiller`] does), `pop()` at each sample, `remove()`. Only training forwards of the student count (not
    evaluation, not gradient checkpointing's recompute in backward); padding is left out through the student's
    `attention_mask`. A student Linear whose teacher input is missing (the teacher did not run) is skipped.

    Args:
        student (`nn.Module`): the model being pruned.
        teacher (`nn.Module`): the dense model, with the same module names for the tracked Linears.
        names (`Sequence[str]`): module names of the tracked Linears (`...q_proj`, not `.weight`).
        max_in_features (`int`, *optional*): skip Linears with more inputs (their `in^2` matrices are the largest).

    Raises:
        `ValueError`: a name that is not an `nn.Linear` of both models.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Sequence[str], *,
                 max_in_features: int | None = None):
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        bad = [n for n in names if not (isinstance(s_mods.get(n), nn.Linear) and isinstance(t_mods.get(n), nn.Linear))]
        if bad:
            raise ValueError(f"cross term: {bad[0]} is not an nn.Linear of both the student and the teacher")
        self.student, self.teacher = student, teacher
        self.names = [n for n in names if max_in_features is None or s_mods[n].in_features <= max_in_features]
        self.skipped = [n for n in names if n not in self.names]
        self._mods = (s_mods, t_mods)
        self._handles: list = []
        self._dense: dict[str, Tensor] = {}
        self._attention_mask: Tensor | None = None
        self._last: tuple[Tensor, str] | None = None  # the previous student input and the name it was credited to
        self.hessians: dict[str, Tensor] = {}
        self.cross: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.shared: dict[str, str] = {}  # name -> the name whose sums it shares (q/k/v -> q)

    def register(self) -> None:
        s_mods, t_mods = self._mods
        self._handles.append(self.student.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        for name in self.names:
            self._handles.append(t_mods[name].register_forward_pre_hook(self._teacher_hook(name)))
            self._handles.append(s_mods[name].register_forward_pre_hook(self._student_hook(name)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._dense = [], {}

    def pop(self) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, int]]:
        """`H~`, `C` and real tokens since the last `pop`, by module name (shared inputs give each name the sums)."""
        hs = {n: self.hessians[self.shared.get(n, n)] for n in self.names if self.shared.get(n, n) in self.hessians}
        cs = {n: self.cross[self.shared.get(n, n)] for n in hs}
        tokens = {n: self.tokens[self.shared.get(n, n)] for n in hs}
        self.hessians, self.cross, self.tokens = {}, {}, {}
        return hs, cs, tokens

    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._attention_mask = mask if isinstance(mask, Tensor) else None
        self._last = None

    def _teacher_hook(self, name: str):
        def hook(module, inputs):
            self._dense[name] = inputs[0].detach()
        return hook

    def _student_hook(self, name: str):
        def hook(module, inputs):
            dense = self._dense.pop(name, None)
            if dense is None or not module.training or in_backward_recompute():
                return
            x = inputs[0]
            if self._last is not None and self._last[0] is x:  # q/k/v: the same input, reduced once
                self.shared[name] = self._last[1]
                return
            self._last = (x, name)
            mask = real_token_mask(self._attention_mask, x)
            xt = x.detach().float() if mask is None else x.detach().float()[mask.to(x.device)]
            xt = xt.reshape(-1, xt.shape[-1])
            with torch.autocast(xt.device.type, enabled=False):
                h = xt.T @ xt
            c = cross_sum(dense, x, mask)
            if name in self.hessians:
                self.hessians[name].add_(h)
                self.cross[name].add_(c)
                self.tokens[name] += xt.shape[0]
            else:
                self.hessians[name], self.cross[name], self.tokens[name] = h, c, xt.shape[0]
        return hook
