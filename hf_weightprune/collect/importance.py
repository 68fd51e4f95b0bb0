"""`Importance`: what `ImportanceCallback.importance()` and `load_importance()` return.

Raw accumulator state is stored; scores are derived on demand, one tensor at a time, so a loaded file of
billions of elements is never materialised whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ImportanceConfig
from ..matching import TrackedWeight
from ..moe import find_weights
from ..scorers import Scorer, get_scorer
from .selection import kept_units, slice_state
from .units import unit_means, unit_scores


class _Shape:
    """A stand-in weight with only a `.shape`, to ask a scorer how its state is laid out."""

    def __init__(self, *shape: int):
        self.shape = torch.Size(shape)


class _ScoreView(Mapping):
    """Lazy mapping parameter name -> float32 score tensor."""

    def __init__(self, importance: Importance):
        self._imp = importance

    def __getitem__(self, name: str) -> Tensor:
        return self._imp.score(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._imp.names)

    def __len__(self) -> int:
        return len(self._imp.names)


class Importance:
    """Per-parameter importance of one model.

    Attributes:
        config (`ImportanceConfig`): how it was accumulated.
        meta (`dict`): `global_step`, `num_samples`, `weight_sum`, `tokens`, `skipped`, `world_size`, ...
        shapes (`dict[str, list[int]]`): tracked parameter names (canonical) and their shapes, in model order.
        scores (`Mapping[str, Tensor]`): derived scores, computed lazily per tensor.
        path (`str` or `None`): the folder it was loaded from.
        sections (`Mapping[str, Any]`): the other sections of the `importance_config.json` it was read from, parsed
            once by the reader (`schedule`: a `PruneSchedule`'s saved state; `checksums`; `router`: an MoE model's
            router statistics per block; `cross`: the cross term's token counts and shared inputs); in memory,
            `router` only.
        has_units (`bool`): whether unit statistics for structured pruning are held ([`unit_scores`]).
        has_cross (`bool`): whether the dense-to-pruned cross term is held ([`cross_terms`]).
    """

    def __init__(
        self,
        config: ImportanceConfig,
        meta: dict[str, Any],
        shapes: dict[str, list[int]],
        get_state: Callable[[str], Tensor],
        *,
        path: str | None = None,
        weights: Mapping[str, Tensor] | None = None,
        weights_loader: Callable[[], Mapping[str, Tensor]] | None = None,
        sections: Mapping[str, Any] | None = None,
        units: Mapping[str, Tensor] | Callable[[], Mapping[str, Tensor]] | None = None,
        cross: Mapping[str, Tensor] | Callable[[], Mapping[str, Tensor]] | None = None,
    ):
        self.config = config
        self.meta = meta
        self.shapes = shapes
        self._get_state = get_state
        self.path = path
        self.sections = dict(sections or {})
        self._weights = dict(weights) if weights is not None else None
        # Called once, on the first score that needs the weights, unless `bind` came first (see `load_importance`).
        self._weights_loader = weights_loader
        self._scorer = get_scorer(config.criterion, weighting=config.weighting)
        self._units = units  # the unit statistics (`ImportanceConfig(units=True)`), or a reader of them
        self._cross = cross  # the cross term's sums (`PruneSchedule(cross_term=True)`), or a reader of them

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def step(self) -> int:
        return int(self.meta.get("global_step", 0))

    @property
    def num_samples(self) -> int:
        return int(self.meta.get("num_samples", 0))

    @property
    def criterion(self) -> str:
        return self.config.criterion

    @property
    def scorer(self) -> Scorer:
        """The criterion's [`~scorers.Scorer`]: what pruning asks about it (`default_scope`, `has_hessian`, ...)."""
        return self._scorer

    @property
    def weights(self) -> Mapping[str, Tensor] | None:
        """The bound model's tracked weights by name (after `bind`, or read lazily from the checkpoint the
        importance was saved in, see `load_importance`), else `None`."""
        if self._weights is None and self._weights_loader is not None:
            self._weights = self._weights_loader()  # raises (names, shapes) at every access until bound
            self._weights_loader = None
        return self._weights

    def state(self, name: str) -> Tensor:
        """The raw accumulator buffer of `name` (what resume needs)."""
        if name not in self.shapes:
            raise KeyError(f"{name!r} is not tracked in this importance ({len(self.shapes)} tracked weights)")
        return self._get_state(name)

    def _scalars(self, name: str) -> dict:
        """The per-tensor scalars a scorer divides by: `num_samples`, `weight_sum`, `tokens`."""
        return {"num_samples": self.num_samples, "weight_sum": float(self.meta.get("weight_sum", 0.0)),
                "tokens": int(self.meta.get("tokens", {}).get(name, 0))}

    def _score_kwargs(self, name: str) -> dict:
        # Only activation criteria (wanda, sparsegpt) always multiply by W: others never trigger the lazy binding.
        weights = self.weights if self._scorer.source == "activations" else self._weights
        return {"weight": weights.get(name) if weights is not None else None, **self._scalars(name)}

    def score(self, name: str) -> Tensor:
        return self._scorer.score(self.state(name), **self._score_kwargs(name))

    def input_norms(self, name: str) -> Tensor:
        """`||x_j||` of `name`'s input channels over the tokens seen, `[in]` float32 (activation criteria only; see
        [`~scorers.Scorer.input_norms`], which raises `ValueError` for the others)."""
        return self._scorer.input_norms(self.state(name), **self._scalars(name))

    def ranking(self, name: str) -> Tensor:
        """Orders the weights of `name` exactly as `score(name)`, as cheaply as the criterion allows (the raw
        bfloat16 state, say); what the pruner thresholds."""
        return self._scorer.ranking(self.state(name), **self._score_kwargs(name))

    @property
    def scores(self) -> Mapping[str, Tensor]:
        return _ScoreView(self)

    @property
    def has_units(self) -> bool:
        """Whether unit statistics were gathered (`ImportanceConfig(units=True)`)."""
        return self._units is not None

    def unit_state(self) -> dict[str, Tensor]:
        """The raw unit totals (`UnitCollector.state_dict()`, summed across ranks): what resume needs.

        Raises:
            `ValueError`: the importance holds no unit statistics.
        """
        if self._units is None:
            where = f" ({self.path})" if self.path else ""
            raise ValueError(f"this importance{where} holds no unit statistics: gather them with "
                             "ImportanceConfig(units=True)")
        if callable(self._units):  # read from the folder once, on first use
            self._units = self._units()
        return dict(self._units)

    @property
    def has_cross(self) -> bool:
        """Whether the dense-to-pruned cross term of `PruneSchedule(cross_term=True)` is held."""
        return self._cross is not None

    def cross_terms(self) -> dict[str, tuple[Tensor, int]]:
        """The dense-to-pruned cross term `C = sum (x - x~) x~^T` a `PruneSchedule(cross_term=True)` run gathered,
        beside this importance's `H~` (the `sparsegpt` statistic) over the same real tokens: what the run's OBS updates
        and re-fit read (`CrossTerm.terms()`), for [`prune.refit.propagate_target`] /
        [`prune.refit.asymmetric_sparsegpt_prune_`] offline. Held by an importance read from a saved folder
        ([`load_importance`]); the one a running callback returns (`cb.importance()`) does not carry it.

        Returns:
            `dict[str, tuple[Tensor, int]]`: `(C, real tokens)` by weight name, `C` float32 `[in, in]` summed across
            ranks; weights sharing an input (q/k/v, gate/up) share one tensor; weights skipped by
            `cross_max_in_features` are absent. Its tokens equal `meta["tokens"][name]` where the weight's `H~` covers
            the same forwards (training forwards without labels run no teacher).

        Raises:
            `ValueError`: the importance holds no cross term.
        """
        if self._cross is None:
            where = f" from {self.path}" if self.path else ""
            raise ValueError(f"this importance{where} holds no cross term: gather it with PruneSchedule(cross_term="
                             "True) under DistillConfig")
        if callable(self._cross):  # read from the folder once, on first use
            self._cross = self._cross()
        section = self.sections.get("cross") or {}
        tokens, shared = section.get("tokens", {}), section.get("shared", {})
        sums = dict(self._cross)
        names = {**{n: n for n in sums}, **{n: rep for n, rep in shared.items() if rep in sums}}
        return {n: (sums[rep], int(tokens.get(rep, 0))) for n, rep in names.items()}

    def unit_scores(self, statistic: str = "activation", *, kept_layers: Sequence[int] | None = None) -> dict:
        """Per-unit scores (higher = more important) for structured pruning; see [`~collect.units.unit_scores`].

        Args:
            statistic (`str`, *optional*, defaults to `"activation"`): `"activation"` (Minitron), `"activation_l2"`
                or `"taylor"`; layers are scored by block influence (ShortGPT) under the activation statistics.
            kept_layers (`Sequence[int]`, *optional*): the decoder layers a prune keeps while removing the others:
                hidden channels are scored over these only (`None`: all).

        Returns:
            `dict`: `{"neurons": {layer: Tensor[I]}, "heads": {layer: Tensor[kv_groups]}, "hidden": Tensor[H],
            "layers": Tensor[L]}`, float32 on CPU.

        Raises:
            `ValueError`: no unit statistics, an unknown statistic, or nothing counted for it.
        """
        return unit_scores(self.unit_state(), statistic, kept_layers=kept_layers)

    def unit_means(self) -> dict:
        """The mean input of every `down_proj` and `o_proj` over the training tokens (FLAP's bias compensation,
        `PruneConfig(compensate="mean")`); see [`~collect.units.unit_means`].

        Returns:
            `dict`: `{"neurons": {layer: Tensor[I]}, "heads": {layer: Tensor[heads * head_dim]}}`, float64 on CPU.

        Raises:
            `ValueError`: no unit statistics, or statistics saved without the signed sums.
        """
        return unit_means(self.unit_state())

    def select(self, report: Any) -> Importance:
        """This importance restricted to the units a structured prune kept, so the pruned model can be pruned again.

        Per-weight states are cut to the kept rows and columns of each weight (Hessians on both axes), the unit
        statistics to the kept neurons, KV groups and hidden channels, and the removed decoder layers are dropped,
        the others renumbered. Scores of the result equal this importance's scores at the kept positions. Once
        layers are removed, the hidden channels' Taylor statistic is the sum of the kept layers' own and the part
        outside the layers (statistics saved without those per-layer sums, by an older version, keep the whole
        model's, which still counts the removed layers). It is not bound: `prune_` binds it to the pruned model.

        Args:
            report ([`PruningReport`] or `dict`): the report of the structured prune (`prune_`'s return value), its
                `structured` dict, or the `sparsity.json` of the pruned checkpoint (its `structured` entry).

        Returns:
            [`Importance`]: a new importance over the pruned model's shapes (tensors are sliced when read), with this
            one's `path` and `meta["cut_to_kept_units"]` set (what `sparsity.json` records of it).

        Raises:
            `ValueError`: a report without a structured record, or without the per-axis removed units; statistics of
            another model than the one the prune started from (e.g. the second prune of a chain before the first);
            a criterion whose state is not laid out like the weight, `[in]` or `[in, in]`.
        """
        structured = getattr(report, "structured", None) if not isinstance(report, Mapping) else report
        if isinstance(structured, Mapping) and "axes" not in structured and "structured" in structured:
            structured = structured["structured"]  # a whole sparsity.json
        if not isinstance(structured, Mapping):
            raise ValueError("Importance.select needs the report of a structured prune (PruningReport.structured, "
                             "or sparsity.json); this one has none")
        kept = kept_units(structured)
        kept.check_shapes(self.shapes)
        probe = self._scorer.state_shape(_Shape(2, 3))  # how the state is laid out: like W, [in], or [in, in]
        kind = {(2, 3): "weight", (3,): "input", (3, 3): "hessian"}.get(tuple(probe))
        if kind is None:
            raise ValueError(f"Importance.select: criterion {self.criterion!r} keeps a state of shape {list(probe)} "
                             "for a [2, 3] weight, which it cannot cut to the kept units")
        index, shapes, tokens = {}, {}, {}
        for name, shape in self.shapes.items():
            j, new = kept.layer_of(name)
            if new is None:
                continue  # a removed layer
            rows, cols = kept.weight_index(new, j, list(shape))
            index[new] = (name, rows, cols)
            shapes[new] = [len(rows) if rows is not None else shape[0], len(cols) if cols is not None else shape[1],
                           *shape[2:]]
            if name in self.meta.get("tokens", {}):
                tokens[new] = self.meta["tokens"][name]

        def get_state(new: str) -> Tensor:
            name, rows, cols = index[new]
            return slice_state(self.state(name), kind, rows, cols)

        units = (lambda: kept.unit_state(self.unit_state())) if self.has_units else None
        # router statistics are per MoE block by name: stale once layers are renumbered
        # the cross term is not cut to the kept units: the selection drops it (and its section)
        sections = {k: v for k, v in self.sections.items()
                    if k != "cross" and (k != "router" or not kept.removed_layers)}
        # the same statistics, of the model before that prune: the path and a mark say so (`sparsity.json`, the card)
        return Importance(self.config, {**self.meta, "tokens": tokens, "cut_to_kept_units": True}, shapes, get_state,
                          path=self.path, sections=sections, units=units)

    def bind(self, model: nn.Module, weights: Mapping[str, Tensor] | None = None) -> Importance:
        """Validate against `model` and remember its weights (criteria such as `wanda` multiply by `|W|`).

        `weights` replaces the model's own tensors, e.g. a mapping that reads them lazily from a checkpoint when
        `model` is only a skeleton on the meta device. Binding replaces any lazy binding `load_importance` set up.
        """
        tracked = self._tracked(model)
        self._validate(tracked)
        if weights is None:
            # a Linear's own Parameter (its identity finds tied weights); an expert's view into its fused parameter
            weights = {t.name: t.param if isinstance(t, TrackedWeight) else t.weight()
                       for t in tracked if t.name in self.shapes}
        self._weights, self._weights_loader = weights, None
        return self

    def _tracked(self, model: nn.Module):
        return find_weights(model, self.config.target_modules, self.config.exclude_modules)

    def validate_against(self, model: nn.Module) -> None:
        """Refuse importance computed for another model: names and shapes must match the tracked weights."""
        self._validate(self._tracked(model))

    def _validate(self, tracked_weights) -> None:
        tracked = {t.name: list(t.weight().shape) for t in tracked_weights}
        problems = []
        for name, shape in self.shapes.items():
            if name not in tracked:
                problems.append(f"{name} (in importance, not a tracked weight of the model)")
            elif list(shape) != tracked[name]:
                problems.append(f"{name}: importance shape {list(shape)} != model shape {tracked[name]}")
        problems += [f"{n} (tracked in the model, missing from importance)" for n in tracked if n not in self.shapes]
        if problems:
            where = f" from {self.path}" if self.path else ""
            shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ValueError(f"Importance{where} does not match this model: {shown} (a model pruned structurally "
                             "since: pass importance.select(report))")

    def state_dict(self) -> dict[str, Tensor]:
        """All raw accumulator buffers in memory, by parameter name (small models and tests).

        Returns:
            `dict[str, Tensor]`: `state(name)` for every tracked name (shapes per criterion: the weight's shape, or
            `[in_features]` for `wanda`).
        """
        return {n: self.state(n) for n in self.names}

    def __repr__(self) -> str:
        return (
            f"Importance(criterion={self.criterion!r}, tracked={len(self.shapes)}, step={self.step}, "
            f"samples={self.num_samples}, path={self.path!r})"
        )

