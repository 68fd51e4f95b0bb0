"""The budget of a structured prune: how many units each axis loses, and what one unit of each axis costs.

`prune/structured.py` asks two things of this module: the sizes each width axis may take (the config class decides:
transformers 5's `LlamaConfig` wants `hidden_size % num_attention_heads == 0`, so a hidden "unit" is that many channels;
KV groups keep a count that divides the heads), and for a `target_params` budget the count of every axis.

Sizes are read jointly ([`SizeRule`]): where the config ties two axes (Llama, Gemma 2/3: `hidden_size %
num_attention_heads`; Phi-3 with longrope: `hidden_size // num_attention_heads` sizes the rope factors), a hidden size
is accepted or refused for the head count the same prune leaves, not for the dense one: after a KV-group cut a Llama
takes hidden sizes the dense heads forbid, and a longrope Phi-3 can cut its heads only together with its hidden size.
With `PruneConfig(round_to=N)` the rule accepts, of those, only multiples of `N` for the widths (neurons, hidden; the
dense size, nothing cut, stays accepted), so the budget search, a combination and `search_structures`' candidates all
step through aligned sizes; KV groups are a count and keep theirs. With `sparsity` the kept width is rounded to the
nearest multiple instead ([`aligned_removal`]).

Exact count. [`ParamCount`] gives the parameters left by any counts without touching the model: depth removes its
layers' parameters, a KV group or neuron costs its rows and columns in every kept layer at the dense hidden size, and
a hidden channel costs its embedding/head columns and norms plus, in every kept layer, one entry per row or column of
hidden size that is left after the other axes (the count is multilinear in the sizes, so this is exact).

Split rule. Every axis' steps (a layer; for width, from one accepted size to the next smaller one, in every layer)
are ranked by their units' score relative to that axis' mean score (the `k`-th unit of a width axis scores the mean
over layers of each layer's `k`-th lowest unit; a combined prune passes the scores of the layers the split keeps,
hidden channels too: `prune/structured.py` plans again on them), and taken from the lowest up until the budget is reached; a step of
an axis that would overshoot the budget closes that axis. The *filling* axis is the width axis whose step costs least
(neurons when present): it is never closed, and at the end its count is re-chosen to bring the kept count as close to
the target as its sizes allow; every other axis is also tried one step back and one step further (all together), the
filler re-chosen each time, and the closest wins (ties: the split's own counts). So a coarse axis (hidden: whole multiples of the head count) never rounds the budget away: what
it cannot take goes to the finer axis.

The rule. The kept count must be within one step of the coarsest axis of the structure (one layer for depth; one
accepted step in every layer for width, which with `round_to=N` is `N` units or the largest gap between two aligned
sizes the config accepts) of the target. A budget that cannot be met within it, or only by emptying a
layer or the model, is refused in one line before any change; an axis of the structure that takes nothing because its
smallest step alone overshoots the budget is warned about (it was asked for by name).
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..io_utils import plural
from ..layouts import attn_geometry, config_head_dim, decoder_layers, detect_layout
from .hidden import hidden_channel_costs
from .masks import num_to_prune
from .surgery import _CONFIG_ERRORS, _attention_config_updates, config_error

__all__ = ["ORDER", "Budget", "ParamCount", "SizeRule", "accepted_keeps", "aligned_removal", "axis_sizes", "num_params",
           "plan_budget", "size_updates", "width_costs"]

logger = logging.getLogger(__name__)

ORDER = ("layers", "heads", "neurons", "hidden")  # depth first, then width
_WHAT = {"layers": "decoder layers", "heads": "KV groups per layer", "neurons": "neurons per layer",
         "hidden": "hidden channels"}
_UNIT = {"layers": "decoder layer", "heads": "KV group", "neurons": "neuron", "hidden": "hidden channel"}


def _units(axis: str, n: int) -> str:
    """`"1 KV group"`, `"4 hidden channels"`."""
    return plural(n, _UNIT[axis])


def num_params(model: nn.Module) -> int:
    """All parameters of `model`, a tied tensor once."""
    return sum(p.numel() for p in model.parameters())


def axis_sizes(model: nn.Module, axes: tuple[str, ...]) -> dict[str, int]:
    """Units per layer of each width axis (hidden: of the model) and the depth."""
    layers = decoder_layers(model)
    sizes = {"layers": len(layers), "hidden": model.config.hidden_size}
    if "neurons" in axes:
        sizes["neurons"] = layers[0].mlp.down_proj.in_features
    if "heads" in axes:
        sizes["heads"] = attn_geometry(model, layers[0].self_attn, detect_layout(model, "attn")[1])[1]
    return sizes


def width_costs(model: nn.Module, axes: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """`(parameters, entries of hidden size)` of one KV group / neuron in one layer, from the module shapes."""
    layers = decoder_layers(model)
    costs = {}
    if "neurons" in axes:
        mlp = layers[0].mlp
        rows = [mlp.gate_proj, mlp.up_proj] if detect_layout(model, "mlp")[1] == "split" else [mlp.gate_up_proj] * 2
        costs["neurons"] = (sum(m.in_features + (m.bias is not None) for m in rows) + mlp.down_proj.out_features,
                            len(rows) + 1)
    if "heads" in axes:
        _, kind = detect_layout(model, "attn")
        attn = layers[0].self_attn
        n_heads, n_kv, d = attn_geometry(model, attn, kind)
        q = n_heads // n_kv * d
        proj = attn.q_proj if kind == "split" else attn.qkv_proj
        costs["heads"] = ((q + 2 * d) * (proj.in_features + (proj.bias is not None)) + q * attn.o_proj.out_features,
                          2 * q + 2 * d)
    return costs


def size_updates(model: nn.Module, axis: str):
    """`keep -> the config updates` of keeping `keep` units of a width axis."""
    cfg = model.config
    if axis == "heads":
        n_heads, n_kv, d = attn_geometry(model, decoder_layers(model)[0].self_attn, detect_layout(model, "attn")[1])
        return lambda k: _attention_config_updates(k, n_heads // n_kv, d)
    if axis == "neurons":
        return lambda k: {"intermediate_size": k}
    head_dim = config_head_dim(cfg)
    return lambda k: {"hidden_size": k, "head_dim": head_dim}


def accepted_keeps(model: nn.Module, axis: str, size: int, round_to: int | None = None) -> list[int]:
    """The sizes `1..size` of a width axis that the config class accepts (with `round_to`: `size` and the multiples
    of it), largest first."""
    updates = size_updates(model, axis)
    return [k for k in range(size, 0, -1) if (not round_to or k == size or k % round_to == 0)
            and config_error(model.config, updates(k)) is None]


def aligned_removal(size: int, sparsity: float, multiple: int, what: str) -> int:
    """
    Units to remove so that the kept count, `size - num_to_prune(size, sparsity)`, is rounded to the nearest
    multiple of `multiple` (ties: the larger; `size` itself, nothing removed, is also a candidate).

    Args:
        size (`int`): the dense width.
        sparsity (`float`): the share of units to remove.
        multiple (`int`): the kept width's multiple (`PruneConfig.round_to`).
        what (`str`): the units, for messages (`"neurons per layer"`).

    Returns:
        `int`: the units to remove.

    Raises:
        `ValueError`: one line: `multiple` is larger than `size`, or the rounding would keep none.
    """
    if multiple > size:
        raise ValueError(f"round_to: a multiple of {multiple} is wider than the {size} {what}; give a smaller round_to")
    kept = size - num_to_prune(size, sparsity)
    if 2 * kept < multiple:
        raise ValueError(f"sparsity={sparsity} keeps {kept} of {size} {what}, which rounds to 0 as a multiple of "
                         f"{multiple} (round_to); the fewest it keeps is {multiple} (sparsity={1 - multiple / size:.4g})")
    rounded = min([size, *range(multiple, size + 1, multiple)], key=lambda k: (abs(k - kept), -k))
    return size - rounded


class SizeRule:
    """
    The sizes of the width axes that the config class accepts, read together. Heads and hidden are coupled (some
    configs validate `hidden_size` against `num_attention_heads`), so each is read at the other's size in the same
    prune; neurons are read at the dense sizes of the others (no stock config ties `intermediate_size` to them, and
    the final check of all sizes together would refuse one that did). Checks run on one private copy of the config,
    every one setting the same keys, so no check sees another's values.

    Args:
        model (`PreTrainedModel`): the dense model.
        axes (`tuple[str, ...]`): the structure's axes (`"layers"` is ignored).
        sizes (`dict[str, int]`): [`axis_sizes`].
        round_to (`int`, *optional*): `PruneConfig.round_to`: a cut width (neurons, hidden) must be a multiple of it.
    """

    def __init__(self, model: nn.Module, axes: tuple[str, ...], sizes: dict[str, int], round_to: int | None = None):
        self.sizes = sizes
        self.round_to = round_to
        self._name = type(model.config).__name__
        self.axes = tuple(a for a in ORDER if a in axes and a != "layers")
        self._updates = {a: size_updates(model, a) for a in self.axes}
        self._config = copy.deepcopy(model.config)
        # A config without strict validation, or one that already fails it, cannot rule on sizes (as config_error).
        self._blind = not callable(getattr(self._config, "validate", None)) or \
            config_error(model.config, {}, _baseline=False) is not None
        self._checked: dict[tuple, bool] = {}
        self._keeps: dict[tuple, list[int]] = {}

    def partner(self, axis: str) -> str | None:
        """The axis whose size decides which sizes of `axis` the config accepts (heads <-> hidden), if both are cut."""
        coupled = ("heads", "hidden")
        if axis in coupled and all(a in self.axes for a in coupled):
            return coupled[1 - coupled.index(axis)]
        return None

    def updates(self, kept: dict[str, int]) -> dict:
        """The config values of keeping `kept[a]` units of each width axis (the dense size where absent)."""
        out: dict = {}
        for a in self.axes:
            out.update(self._updates[a](kept.get(a, self.sizes[a])))
        return out

    def aligned(self, axis: str, keep: int) -> bool:
        """Whether `keep` units of `axis` suit `round_to`: KV groups are a count, and a width left dense is not cut."""
        return not self.round_to or axis == "heads" or keep == self.sizes[axis] or keep % self.round_to == 0

    def check_round_to(self) -> None:
        """Refuses, in one line, a `round_to` that leaves a width axis no narrower size (before any work)."""
        for a in (a for a in self.axes if self.round_to and a != "heads"):
            if self.round_to > self.sizes[a]:
                raise ValueError(f"round_to={self.round_to} is larger than the {self.sizes[a]} {_WHAT[a]}: no "
                                 f"multiple of it is a narrower width")
            if len(self.ladder(a)) < 2:
                raise ValueError(f"round_to={self.round_to}: no {a} width below {self.sizes[a]} is a multiple of "
                                 f"{self.round_to} that {self._name} accepts")

    def accepts(self, kept: dict[str, int]) -> bool:
        """Whether the config accepts these kept sizes together (and they suit `round_to`)."""
        if not all(self.aligned(a, k) for a, k in kept.items() if a in self.axes):
            return False
        if self._blind:
            return True
        key = tuple(kept.get(a, self.sizes[a]) for a in self.axes)
        if key not in self._checked:
            try:
                for k, v in self.updates(kept).items():  # the same keys every time: nothing to restore
                    setattr(self._config, k, v)
                self._config.validate()
                self._checked[key] = True
            except _CONFIG_ERRORS:
                self._checked[key] = False
        return self._checked[key]

    def keeps(self, axis: str, kept: dict[str, int] | None = None) -> list[int]:
        """The sizes `1..size` of `axis` accepted with its coupled axis at `kept[partner]` (dense if absent), largest
        first."""
        partner = self.partner(axis)
        at = {partner: (kept or {}).get(partner, self.sizes[partner])} if partner else {}
        key = (axis, *at.values())
        if key not in self._keeps:
            self._keeps[key] = [k for k in range(self.sizes[axis], 0, -1) if self.accepts({**at, axis: k})]
        return self._keeps[key]

    def ladder(self, axis: str) -> list[int]:
        """Every size of `axis` accepted with some size of its coupled axis, largest first: the sizes a plan may step
        through (the combination is checked with [`accepts`])."""
        partner = self.partner(axis)
        if partner is None:
            return self.keeps(axis)
        if axis == "hidden":
            return sorted({h for g in range(1, self.sizes["heads"] + 1) for h in self.keeps("hidden", {"heads": g})},
                          reverse=True)
        return [g for g in range(self.sizes["heads"], 0, -1) if self.keeps("hidden", {"heads": g})]


@dataclass
class ParamCount:
    """The parameters left by any counts of removed units, computed from the dense module shapes (see the module
    docstring): `after({"heads": 1, "hidden": 8}, dropped=[2])`."""

    before: int
    layer_cost: list[int]
    unit: dict[str, int]  # parameters of one KV group / neuron in one layer
    slope: dict[str, int]  # of those, entries of hidden size (what a removed hidden channel no longer pays for them)
    hidden_outside: int = 0
    hidden_layer: tuple[int, ...] = ()

    @classmethod
    def of(cls, model: nn.Module, axes: tuple[str, ...]) -> ParamCount:
        costs = width_costs(model, axes)
        outside, per_layer = hidden_channel_costs(model) if "hidden" in axes else (0, [])
        return cls(num_params(model), [num_params(layer) for layer in decoder_layers(model)],
                   {a: c for a, (c, _) in costs.items()}, {a: s for a, (_, s) in costs.items()}, outside,
                   tuple(per_layer))

    def after(self, counts: dict[str, int], dropped: list[int]) -> int:
        gone = set(dropped)
        kept = [i for i in range(len(self.layer_cost)) if i not in gone]
        removed = sum(self.layer_cost[i] for i in dropped)
        removed += len(kept) * sum(counts.get(a, 0) * self.unit[a] for a in self.unit)
        if counts.get("hidden"):  # a channel after the other axes: fewer rows/columns of hidden size to pay for
            per_channel = self.hidden_outside + sum(self.hidden_layer[i] for i in kept)
            per_channel -= len(kept) * sum(counts.get(a, 0) * self.slope[a] for a in self.slope)
            removed += counts["hidden"] * per_channel
        return self.before - removed


@dataclass
class Budget:
    """What [`plan_budget`] chose: `counts` (units removed per axis; layers: how many), `dropped` (layer indices),
    `filler` (the width axis that meets the budget, or `None`), `predicted` (parameters left), `tolerance` and
    `warnings` (an axis asked for by name that removes nothing: said by [`Budget.warn`], once per prune, as a
    combined prune may plan several times before it keeps one plan)."""

    counts: dict[str, int]
    dropped: list[int]
    filler: str | None
    predicted: int
    tolerance: int
    warnings: list[str] = field(default_factory=list)

    def warn(self) -> None:
        """Log this plan's warnings (call it on the plan that is applied only)."""
        for message in self.warnings:
            logger.warning(message)


def _ladders(scores: dict, axes: tuple[str, ...], sizes: dict[str, int], keeps: dict[str, list[int]]):
    """`(relative score, axis order, axis, count after the step)` of every step an axis can take."""
    steps = []
    for a in axes:
        s = scores[a]
        if a in ("neurons", "heads"):
            per_layer = torch.stack([torch.sort(v.float()).values for v in s.values()])  # [L, units]
            ladder, mean = per_layer.mean(0), per_layer.mean()
        else:
            ladder, mean = torch.sort(s.float()).values, s.float().mean()
        rel = (ladder / mean.clamp_min(1e-30)).tolist()
        counts = list(range(1, sizes[a])) if a == "layers" else [sizes[a] - k for k in keeps[a][1:]]
        start = 0
        for c in counts:  # a step's score: the mean of the units it removes
            steps.append((sum(rel[start:c]) / (c - start), ORDER.index(a), a, c))
            start = c
    return sorted(steps)


def _coupled_neighbours(rule: SizeRule, option: dict[str, int], sizes: dict[str, int], filler: str | None):
    """`option` and, when hidden is coupled to heads and not the filler, the option with the hidden counts nearest to
    its own that the option's head count accepts (one each side, and one further): a hidden count from the ladder of
    all head counts may not suit this one."""
    if "hidden" not in option or filler == "hidden" or rule.partner("hidden") is None:
        return [option]
    counts = [sizes["hidden"] - k for k in reversed(rule.keeps("hidden", {"heads": sizes["heads"] - option["heads"]}))]
    below = [c for c in counts if c <= option["hidden"]][-2:]
    above = [c for c in counts if c > option["hidden"]][:2]
    near = sorted(below + above, key=lambda c: (c != option["hidden"], abs(c - option["hidden"])))
    return [{**option, "hidden": c} for c in near]


def plan_budget(model: nn.Module, scores: dict, axes: tuple[str, ...], sizes: dict[str, int], target: int,
                spec, rule: SizeRule | None = None) -> Budget:
    """
    Splits the parameters to remove, `num_params(model) - target`, between `axes` (see the module docstring).

    Args:
        model (`PreTrainedModel`): the dense model.
        scores (`dict`): every axis' unit scores (`{"neurons": {layer: T}, "hidden": T, "layers": T, ...}`).
        axes (`tuple[str, ...]`): the structure's axes, in `ORDER`.
        sizes (`dict[str, int]`): [`axis_sizes`].
        target (`int`): the parameters to keep.
        spec: the user's `target_params`, for messages.
        rule ([`SizeRule`], *optional*): the sizes the config accepts (built from `model` when not given).

    Returns:
        [`Budget`]: its `warnings` are not logged here; the caller logs those of the plan it applies
        ([`Budget.warn`]).

    Raises:
        `ValueError`: one line: the budget empties a layer or the model, or cannot be met within the rule.
    """
    count = ParamCount.of(model, axes)
    rule = rule or SizeRule(model, axes, sizes)
    keeps = {a: rule.ladder(a) for a in axes if a != "layers"}  # with the coupled axis at any of its sizes
    by_influence = torch.argsort(scores["layers"].float(), stable=True).tolist() if "layers" in axes else []

    def step(a: str) -> int | None:  # units of one step at the others' dense sizes; where those allow none, at any
        sizes_at_dense = rule.keeps(a)
        ks = sizes_at_dense if len(sizes_at_dense) > 1 else keeps[a]
        if len(ks) < 2:
            return None
        # aligned sizes: from an unaligned dense width the first step is shorter than the others
        return max(x - y for x, y in zip(ks, ks[1:])) if rule.round_to and a != "heads" else sizes[a] - ks[1]

    step_cost = {a: count.before - count.after({a: u}, []) for a in keeps if (u := step(a)) is not None}
    if "layers" in axes:
        step_cost["layers"] = max(count.layer_cost)
    width = [a for a in axes if a in step_cost and a != "layers"]
    filler = min(width, key=lambda a: step_cost[a]) if width else None
    maximum = {a: sizes[a] - keeps[a][-1] for a in keeps} | ({"layers": sizes["layers"] - 1} if "layers" in axes else {})

    def after(c: dict[str, int]) -> int:
        return count.after(c, by_influence[: c.get("layers", 0)])

    def kept(c: dict[str, int]) -> dict[str, int]:
        return {a: sizes[a] - c.get(a, 0) for a in rule.axes}

    def refill(c: dict[str, int]) -> dict[str, int] | None:  # the filler's count closest to the target, given the others
        if filler is None:
            return c
        accepted = rule.keeps(filler, kept(c))
        if not accepted:
            return None
        base = after({**c, filler: 0})
        per_unit = base - after({**c, filler: 1})  # the count is linear in the filler's units, the others fixed
        keep = min(accepted, key=lambda k: abs(base - (sizes[filler] - k) * per_unit - target))  # ties: keeps more
        return {**c, filler: sizes[filler] - keep}

    counts = dict.fromkeys(axes, 0)
    closed: list[str] = []
    for _, _, a, c in _ladders(scores, axes, sizes, keeps):
        if after(counts) <= target:
            break
        if a in closed:
            continue
        trial = {**counts, a: c}
        if a != filler and after(trial) < target:
            if filler is None and abs(after(trial) - target) < abs(after(counts) - target):
                counts = trial  # depth alone: the count closest to the budget
            closed.append(a)
            continue
        counts = trial
    # Sizes are coarse: each other axis one step back or further, the filler re-chosen, may come closer.
    ladder = {a: [0] + [c for _, _, b, c in _ladders(scores, (a,), sizes, keeps)] for a in axes if a != filler}
    around = []
    for a in ladder:
        i = ladder[a].index(counts[a])
        around.append([counts[a]] + [ladder[a][j] for j in (i - 1, i + 1) if 0 <= j < len(ladder[a])])
    options = []
    for c in itertools.product(*around):
        option = {**counts, **dict(zip(ladder, c))}
        for o in _coupled_neighbours(rule, option, sizes, filler):
            o = refill(o)
            if o is not None and rule.accepts(kept(o)):  # heads with hidden: only the pairs the config takes
                options.append(o)
    if not options:
        raise ValueError(f"target_params={spec!r} cannot be met with {'+'.join(axes)}: no sizes near the split "
                         f"{counts} give a config that {type(model.config).__name__} accepts")
    best = min(options, key=lambda o: abs(after(o) - target))  # ties: the first, the split's own counts
    left = after(best)
    tolerance = max(step_cost.values(), default=0)
    spent = "+".join(axes)
    if left > target and all(best[a] >= maximum.get(a, 0) for a in axes):
        raise ValueError(f"target_params={spec!r} cannot be met with {spent}: it would empty a layer or the model "
                         f"(removing all but one unit of each leaves {left:,} of {count.before:,} parameters)")
    if abs(left - target) > tolerance:
        raise ValueError(f"target_params={spec!r} cannot be met with {spent} within one step of its coarsest axis "
                         f"({tolerance:,} parameters): the nearest count it reaches is {left:,} for {target:,}")
    if not any(best.values()):  # else a copy of the dense model would be saved and reported as pruned to the budget
        raise ValueError(f"target_params={spec!r} keeps {target:,} of {count.before:,} parameters, nearer the dense model "
                         f"than any prune with {spent} comes: nothing would be removed; give a smaller target_params")
    # What took it: the axes that did remove units (the filler may have ended at its dense size, a layer taking all).
    took = " and ".join(f"{_UNIT[b]}s" for b in axes if best[b])
    warnings = [f"target_params={spec!r}: structure axis {a!r} removes nothing: its smallest step ("
                f"{_units(a, 1 if a == 'layers' else sizes[a] - keeps[a][1])}, {step_cost[a]:,} parameters) would meet "
                f"the budget less closely; {took} take it" for a in closed if best[a] == 0 and filler]
    for a in axes:
        if best[a] >= sizes[a]:
            raise ValueError(f"structure {a!r} would remove {best[a]} of {sizes[a]} {_WHAT[a]}; at least one must "
                             "remain")
    return Budget(best, sorted(by_influence[: best.get("layers", 0)]), filler, left, tolerance, warnings)
