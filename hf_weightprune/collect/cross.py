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

[`CrossTerm`] is the running statistic a training run keeps (`PruneSchedule(cross_term=True)` under `DistillConfig`):
the collector's per-forward sums folded at each sampled step, beside the `sparsegpt` statistic that is `H~` (the
collector then computes `C` only), summed across ranks, restarted with it, and checkpointed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..matching import TrackedWeight
from .activations import in_backward_recompute, real_token_mask

__all__ = ["CrossTerm", "CrossTermCollector", "cross_sum"]


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
        with_hessian (`bool`, *optional*, defaults to `True`): also sum `H~`; `False` when another statistic
            already holds it (the `sparsegpt` importance), so `pop` returns empty Hessians.

    Raises:
        `ValueError`: a name that is not an `nn.Linear` of both models.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Sequence[str], *,
                 max_in_features: int | None = None, with_hessian: bool = True):
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
        self.with_hessian = with_hessian
        self.active = True  # the sampled steps only (set by the accumulator, as for its own hooks)

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
        names = [n for n in self.names if self.shared.get(n, n) in self.cross]
        hs = {n: self.hessians[self.shared.get(n, n)] for n in names if self.shared.get(n, n) in self.hessians}
        cs = {n: self.cross[self.shared.get(n, n)] for n in names}
        tokens = {n: self.tokens[self.shared.get(n, n)] for n in names}
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
            if dense is None or not self.active or not module.training or in_backward_recompute():
                return
            x = inputs[0]
            if self._last is not None and self._last[0] is x:  # q/k/v: the same input, reduced once
                self.shared[name] = self._last[1]
                return
            self._last = (x, name)
            mask = real_token_mask(self._attention_mask, x)
            c = cross_sum(dense, x, mask)
            tokens = x[..., 0].numel() if mask is None else int(mask.sum())
            if self.with_hessian:
                xt = x.detach().float() if mask is None else x.detach().float()[mask.to(x.device)]
                xt = xt.reshape(-1, xt.shape[-1])
                with torch.autocast(xt.device.type, enabled=False):
                    h = xt.T @ xt
                self.hessians[name] = self.hessians[name].add_(h) if name in self.hessians else h
            if name in self.cross:
                self.cross[name].add_(c)
                self.tokens[name] += tokens
            else:
                self.cross[name], self.tokens[name] = c, tokens
        return hook


class CrossTerm:
    """The running cross term `C` of a training run, kept beside the `sparsegpt` statistic (which is its `H~`).

    Lifecycle, driven by the [`ImportanceAccumulator`]: built at train begin with the tracked Linears; [`attach`] once
    the distillation teacher exists (a [`CrossTermCollector`] summing `C` only); at each step's commit [`pop`], then
    [`fold_`] when the `sparsegpt` statistic keeps that sample (so `C` and `H~` cover the same tokens, with the same
    step weighting); [`restart`] with it; [`state_dict`] / [`load_state_dict`] for checkpoints; [`remove`].

    Sums are per rank until [`terms`] / [`state_dict`] add them across ranks (collectives: every rank calls them;
    `terms(owners)` onto the ranks that solve each weight only).
    Memory: one `[in, in]` float32 matrix per distinct input (q/k/v and gate/up share theirs), on the device of the
    Hessian it goes with.

    Args:
        modules (`dict[str, str]`): tracked weight name (`...q_proj.weight`) -> its module's name in the model.
        max_in_features (`int`, *optional*): Linears with more inputs get no cross term (plain objective).
    """

    def __init__(self, modules: dict[str, str], *, max_in_features: int | None = None):
        self.modules = dict(modules)
        self.max_in_features = max_in_features
        self.collector: CrossTermCollector | None = None
        self.sums: dict[str, Tensor] = {}  # by the weight name whose input it is (the first of a shared input)
        self.tokens: dict[str, int] = {}
        self.shared: dict[str, str] = {}  # weight name -> the weight name whose sum it shares

    @classmethod
    def from_tracked(cls, tracked, *, max_in_features: int | None = None) -> CrossTerm:
        """For the tracked `nn.Linear` weights of an accumulator (expert slices have no Linear of their own)."""
        return cls({t.name: t.module_name for t in tracked if isinstance(t, TrackedWeight)},
                   max_in_features=max_in_features)

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        """Register the hooks on `student` and `teacher` (the same module names)."""
        self.remove()
        self.collector = CrossTermCollector(student, teacher, list(self.modules.values()),
                                            max_in_features=self.max_in_features, with_hessian=False)
        self.collector.register()

    def remove(self) -> None:
        if self.collector is not None:
            self.collector.remove()
        self.collector = None

    def set_active(self, active: bool) -> None:
        if self.collector is not None:
            self.collector.active = active

    def pop(self) -> dict[str, tuple[Tensor, int]]:
        """This step's `(C, real tokens)` by weight name (one entry per distinct input); records which share it."""
        if self.collector is None:
            return {}
        weight_of = {m: w for w, m in self.modules.items()}
        c = self.collector
        out = {weight_of[m]: (c.cross[m], c.tokens[m]) for m in c.cross}
        self.shared.update({weight_of[m]: weight_of[rep] for m, rep in c.shared.items()})
        c.hessians, c.cross, c.tokens = {}, {}, {}
        return out

    def fold_(self, sums: dict[str, tuple[Tensor, int]], scorer, t: int, device) -> None:
        """Add a kept sample's sums with the statistic's own update (its `weighting` of step `t` included)."""
        with torch.no_grad():
            for name, (c, n) in sums.items():
                if name not in self.sums:
                    self.sums[name] = torch.zeros(c.shape, dtype=torch.float32, device=device(name))
                scorer.update_([self.sums[name]], [c.to(self.sums[name].device)], None, t)
                self.tokens[name] = self.tokens.get(name, 0) + n

    def restart(self) -> None:
        """Drop every sample (at a mask change, with the `sparsegpt` statistic); the sharing map stays."""
        self.sums, self.tokens = {}, {}

    def _reduced(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        names = sorted(self.sums)  # every rank folds the same samples of the same Linears: the same names
        tensors = [self.sums[n].clone() for n in names]
        D.all_reduce_sum_(tensors)
        return dict(zip(names, tensors)), dict(zip(names, D.all_reduce_int([self.tokens[n] for n in names])))

    def _aliases(self, sums) -> dict[str, str]:
        """Weight name -> the weight name whose sum it reads (itself, or the first of a shared input)."""
        return {**{n: n for n in sums}, **{n: rep for n, rep in self.shared.items() if rep in sums}}

    def terms(self, owners: dict[str, int] | None = None) -> dict[str, tuple[Tensor, int]]:
        """`(C, real tokens)` summed across ranks, for every weight with one (shared inputs alias one sum).

        With `owners` (weight name -> the rank that solves it, the Hessians' owners of
        [`ImportanceAccumulator.solve_statistics`]), each sum goes only to the rank that solves a weight of its input
        (`distributed.reduce_to_owners`: one `reduce` per rank; q/k/v solved together get one sum), and the terms
        returned are those of this rank's weights in `owners`; the token counts are summed on every rank (integers).
        Either way this rank's own sums stay as they are and keep accumulating (the reduction sums a copy).

        Collective under DDP."""
        if owners is None:
            sums, tokens = self._reduced()
            return {n: (sums[rep], tokens[rep]) for n, rep in self._aliases(sums).items()}
        reps = sorted(self.sums)  # the same names on every rank
        tokens = dict(zip(reps, D.all_reduce_int([self.tokens[n] for n in reps])))
        aliases, rank = self._aliases(self.sums), D.rank_and_world()[0]
        # (sum, solving rank) pairs: one per sum, unless weights of one input are solved by two ranks
        need = sorted({(rep, owners[n]) for n, rep in aliases.items() if n in owners})
        got = D.reduce_to_owners({key: self.sums[key[0]] for key in need}, {key: key[1] for key in need})
        return {n: (got[rep, rank], tokens[rep]) for n, rep in aliases.items() if owners.get(n) == rank}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores: `tensors` (the sums across ranks, by weight name, summed onto rank 0 only: the rank
        that writes them; `{}` on the others), `tokens` (on every rank) and `shared`.

        Collective under DDP."""
        names = sorted(self.sums)  # the same names on every rank
        sums = D.reduce_to_owners({n: self.sums[n] for n in names}, dict.fromkeys(names, 0))
        tokens = dict(zip(names, D.all_reduce_int([self.tokens[n] for n in names])))
        return {"tensors": sums, "tokens": tokens, "shared": dict(self.shared)}

    def load_state_dict(self, tensors: dict[str, Tensor], section: dict[str, Any], *, keep: bool, device) -> None:
        """Take a checkpoint's sums: kept on one rank only (`keep`), zeros elsewhere, so a later sum across ranks
        counts them once; every rank holds the same names."""
        self.shared = dict(section.get("shared", {}))
        tokens = section.get("tokens", {})
        self.sums = {n: (t.to(device(n), torch.float32) if keep else torch.zeros(t.shape, device=device(n)))
                     for n, t in tensors.items()}
        self.tokens = {n: int(tokens.get(n, 0)) if keep else 0 for n in tensors}
