"""One plan for every mask: a [`PruneConfig`] and an [`Importance`] in, one builder per tensor out.

[`PruningPlan.build`] is the only place where the pruning target is interpreted, once, for one-shot pruning
(`prune_`), file-to-file pruning (`prune_checkpoint`) and gradual pruning (`MaskHolder`):

1. the scope is resolved (`PruneConfig.scope`, else the criterion's `Scorer.default_scope`);
2. the reconstruction rule is decided from the scorer (`Scorer.has_hessian`: SparseGPT's OBS sweep), and with
   `PruneConfig.cross_alpha` the weights whose dense-to-pruned cross term makes that sweep asymmetric;
3. N:M shapes and a gradual N:M step are checked;
4. the uniform, per-module dict, OWL or global targets become one per-tensor target;
5. a tensor that would lose every weight (layer collapse) is refused unless `allow_collapse`.

Then [`PruningPlan.mask`] builds one tensor's keep-mask, and [`PruningPlan.edit`] one tensor's edit (zero the masked
weights, or run the OBS sweep at that tensor's target). Values are validated where they enter (the config, the
`sparsity` and `previous` a schedule passes), once; nothing here checks them again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace

import torch

from ..collect.importance import Importance
from ..config import PruneConfig
from ..matching import check_sparsity_keys, decoder_layer, select_names
from ..moe import slice_expert
from ..scorers import SCORERS, criteria_where, default_scope
from ..validation import check_sparsity
from . import masks as M
from .global_threshold import Combine, GlobalThreshold, compute_global_threshold, layer_mask
from .obs import check_hessians, sparsegpt_prune_
from .owl import outlier_ratio, owl_sparsities
from .refit import asymmetric_sparsegpt_prune_, offline_cross_terms

__all__ = ["PruningPlan", "compute_masks", "owl_allocation", "refuse_unseen", "uses_obs"]

Edit = Callable[[torch.Tensor], torch.Tensor]


def uses_obs(criterion: str | None, config: PruneConfig) -> bool:
    """
    The reconstruction rule, from the criterion alone (so a schedule can check it before training).

    Args:
        criterion (`str`, *optional*): the importance's criterion.
        config ([`PruneConfig`]): its `reconstruct` (`None` = whenever the criterion's scorer `has_hessian`).

    Returns:
        `bool`: whether the kept weights are updated by the OBS sweep.

    Raises:
        `ValueError`: `reconstruct=True` with a criterion that keeps no input Hessians.
    """
    scorer = SCORERS.get(criterion) if criterion is not None else None
    has_hessian = scorer is not None and scorer.has_hessian
    if config.reconstruct and not has_hessian:
        hessians = criteria_where(lambda cls: cls.has_hessian)
        raise ValueError(f"reconstruct=True needs the input Hessians of criterion {hessians}; this importance is "
                         f"{criterion!r} (track ImportanceConfig(criterion={hessians.split(' or ')[0]}))")
    return has_hessian if config.reconstruct is None else config.reconstruct


def owl_allocation(importance: Importance, config: PruneConfig, names: list[str],
                   sparsity: float | None = None) -> dict[str, float]:
    """Per-tensor sparsities from OWL (Yin et al. 2023, arXiv 2310.05175): each decoder layer's outlier ratio
    (`|W_ij| * ||x_j|| > owl_m * mean` over the layer's weights) sets its sparsity, within `sparsity +- owl_lambda`,
    with the parameter-weighted mean exactly `sparsity`.

    Args:
        importance (`Importance`): importance with activation statistics (`Scorer.input_norms`), bound to weights.
        config (`PruneConfig`): `sparsity` (a float), `owl_m`, `owl_lambda`.
        names (`list[str]`): the weights to prune; grouped by decoder layer (`model.layers.N`); a weight outside
            any layer is its own group.
        sparsity (`float`, *optional*): the mean target when it overrides `config.sparsity` (a gradual step).

    Returns:
        `dict[str, float]`: sparsity per weight name (the same for every weight of a layer).

    Raises:
        ValueError: importance without activation statistics, or not bound to weights.
    """
    if importance.scorer.source != "activations":
        raise ValueError(f"allocation='owl' needs activation statistics (criterion "
                         f"{criteria_where(lambda cls: cls.source == 'activations')}); this importance is "
                         f"{importance.criterion!r}")
    if importance.weights is None:
        raise ValueError("allocation='owl' needs the weights: call importance.bind(model)")
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(decoder_layer(name) or name, []).append(name)
    ratios = {g: outlier_ratio([importance.weights[n].detach() for n in ns], [importance.input_norms(n) for n in ns],
                               M=config.owl_m) for g, ns in groups.items()}
    numels = {g: sum(importance.weights[n].numel() for n in ns) for g, ns in groups.items()}
    target = config.sparsity if sparsity is None else sparsity
    per_layer = owl_sparsities(ratios, numels, target, lamda=config.owl_lambda)
    return {n: per_layer[g] for g, ns in groups.items() for n in ns}


def _module_target(name: str, sparsity: float | dict[str, float]) -> float | None:
    """A per-module dict's target for weight `name` (first fullmatch of its module wins), or the float itself."""
    if not isinstance(sparsity, dict):
        return sparsity
    module = name.rsplit(".", 1)[0]
    for pattern, value in sparsity.items():
        if re.fullmatch(pattern, module):
            return value
    return None


def refuse_unseen(importance: Importance, names: list[str], *, can_exclude: bool = True) -> None:
    """
    Refuse, naming them, weights that an activation criterion saw no token of while others saw some: an expert the
    router never chose (over the training steps sampled, or the calibration windows). Its statistic is zero, so its
    scores are all zero and any mask of it would be arbitrary; a magnitude fallback would rank it on another scale
    than its neighbours (global scope, OWL) and give the OBS sweep no Hessian. When no weight saw a token at all, the
    scorer's own "seen no training tokens" error stands.

    Args:
        importance (`Importance`): an activation criterion's importance.
        names (`list[str]`): the weights about to be scored.
        can_exclude (`bool`, *optional*, defaults to `True`): the way out includes the `exclude_modules` regex that
            leaves exactly those weights dense (not for neurons inside experts: every expert loses the same number).

    Raises:
        `ValueError`: one line naming the first unseen experts (or weights) and the ways out.
    """
    tokens = importance.meta.get("tokens", {})
    unseen = [n for n in names if tokens.get(n, 0) <= 0]
    if not unseen or not any(tokens.get(n, 0) > 0 for n in importance.names):
        return
    experts = list(dict.fromkeys(slice_expert(n) or n.removesuffix(".weight") for n in unseen))
    shown = ", ".join(experts[:3]) + (f" and {len(experts) - 3} more" if len(experts) > 3 else "")
    kind = "expert(s) their router never chose" if all(slice_expert(n) for n in unseen) else "module(s) that saw no token"
    regex = "(?:" + "|".join(re.escape(e) for e in experts) + r")(?:\..*)?"  # fullmatches their module names
    dense = f"Leave them dense (PruneConfig(exclude_modules=r\"{regex}\")), prune" if can_exclude else "Prune"
    raise ValueError(
        f"{importance.criterion} has no input statistic for {len(experts)} {kind} ({shown}): their scores are all "
        f"zero, so their masks would be arbitrary. {dense} by magnitude, or gather the statistic over more tokens "
        "(more sampled steps or calibration windows)"
    )


@dataclass
class PruningPlan:
    """
    How each selected weight is pruned: one target per tensor and the builder that reaches it. Build it with
    [`PruningPlan.build`].

    Attributes:
        importance ([`Importance`]): the scores; bound to the weights when OWL or OBS read them.
        config ([`PruneConfig`]): unstructured or N:M, with `scope` resolved.
        names (`list[str]`): the weights to prune, in order.
        targets (`dict[str, float]`): per weight, the fraction to prune; a weight without one stays dense. Under a
            global scope it is the target the threshold was computed for (each tensor's share follows the threshold).
        reconstruct (`bool`): the edits run SparseGPT's OBS sweep, which also updates the kept weights.
        nm_step (`float`, *optional*): a gradual N:M target below `1 - n/m` (at most `m - n` pruned per group).
        previous (`dict[str, torch.BoolTensor]`): current keep-masks (gradual pruning); their pruned weights stay so.
        gradual (`bool`): planned for a gradual update (`previous` given, even empty): an OBS edit returns the
            sweep's keep-mask rather than the weight's measured nonzeros.
        cross (`dict[str, torch.Tensor]`): with `config.cross_alpha`, the cross term `C` of each weight whose OBS
            sweep solves the asymmetric objective (those whose `C` covers the tokens of their `H~`); the others are
            swept symmetrically.
    """

    importance: Importance
    config: PruneConfig
    names: list[str]
    targets: dict[str, float]
    reconstruct: bool
    nm_step: float | None = None
    previous: dict[str, torch.Tensor] = field(default_factory=dict)
    gradual: bool = False
    cross: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    thresholds: dict[str, GlobalThreshold] = field(default_factory=dict, repr=False)
    _scores: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # `combine`: this process's rankings
    _combine: Combine | None = field(default=None, repr=False)

    @property
    def scope(self) -> str:
        """`str`: the resolved scope, `"global"`, `"layer"` or `"row"`."""
        return self.config.scope

    @classmethod
    def build(cls, importance: Importance, config: PruneConfig, names: list[str] | None = None, *,
              sparsity: float | None = None, previous: Mapping[str, torch.Tensor] | None = None,
              reconstruct: bool | None = None, checked: Collection[str] | None = None,
              combine: Combine | None = None) -> PruningPlan:
        """
        The plan for pruning `names` with `config` from `importance`: scope, reconstruction rule and per-tensor
        targets, decided once, before any weight changes. Global thresholds are computed here (streaming over the
        importance); each tensor's builder then runs on demand, in whatever order the caller walks the weights.

        Among equal scores the lower flat index (for a global scope: the earlier name in `names`) is pruned first.
        With `previous`, weights already pruned score `-inf` so masks only shrink (gradual pruning, Zhu & Gupta 2017,
        arXiv 1710.01878); an N:M target below `1 - n/m` then prunes at most `m - n` per group, exactly the target
        count ([`~masks.nm_capped_mask`]).

        Args:
            importance ([`Importance`]):
                Scores to rank by (`importance.ranking`, which orders and ties exactly as `importance.score`).
            config ([`PruneConfig`]):
                Unstructured or N:M; `"neurons"`/`"heads"` are pruned by [`~surgery.prune_structured_`] instead.
            names (`list[str]`, *optional*):
                The weights to prune, in order; defaults to `select_names(importance.names, config.target_modules,
                config.exclude_modules)`.
            sparsity (`float`, *optional*):
                Overrides `config.sparsity` (a gradual schedule's current target), in `[0, 1)`; for N:M, at most
                `1 - n/m`.
            previous (`Mapping[str, torch.BoolTensor]`, *optional*):
                Current keep-masks by name (shaped like the weights).
            reconstruct (`bool`, *optional*):
                `False` plans masks only, whatever the criterion (the ranking of a criterion with Hessians is its
                OBS saliency); `None` follows [`uses_obs`].
            checked (`Collection[str]`, *optional*):
                With the OBS sweep, the weights whose Hessians are factorised here, before any edit (default: every
                weight the plan prunes). A caller that sweeps only some of them (one rank of a sharded update) checks
                its own, and makes a failure every rank's.
            combine (`Callable[[list[torch.Tensor]], None]`, *optional*):
                Under a global scope, sums the threshold's counts across the processes that share the update
                ([`~global_threshold.compute_global_threshold`]): this process reads the rankings of `checked` only
                (the statistics of the others may live elsewhere), here, and keeps them; the thresholds, the same on
                every process, come with [`share_thresholds_`], which every process calls once `build` succeeded on
                all of them (a failure here is this process's alone, before any collective).

        Returns:
            [`PruningPlan`].

        Raises:
            `ValueError`, before any weight changes: a structured config, a bad `sparsity`, a name the importance does
            not track, an N:M weight whose input dim is not a multiple of `m`, a bad `previous` mask, `reconstruct=True`
            without Hessians, `config.cross_alpha` without the OBS sweep or without a cross term in the importance, OWL
            without activation statistics, or (unless `config.allow_collapse`) a tensor that would be pruned to 100%,
            naming it.
        """
        if config.shrinks:
            raise ValueError(f"structure={config.structure!r} shrinks layers: prune it with prune_ (surgery), not "
                             "masks")
        names = select_names(importance.names, config.target_modules, config.exclude_modules) if names is None \
            else list(names)
        unknown = [n for n in names if n not in importance.shapes]
        if unknown:
            raise ValueError(f"{unknown[0]} is not tracked by the importance ({len(importance.shapes)} tracked "
                             "weights)")
        if sparsity is not None:
            sparsity = check_sparsity("sparsity", sparsity)
        if importance.scorer.source == "activations":
            base = config.sparsity if sparsity is None else sparsity
            refuse_unseen(importance, [n for n in names if config.nm is not None or _module_target(n, base) is not None])
        gradual, previous = previous is not None, dict(previous or {})
        for name, mask in previous.items():
            shape = importance.shapes.get(name)
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or shape is None \
                    or list(mask.shape) != list(shape):
                raise ValueError(f"previous[{name!r}] must be a bool mask of the weight's shape {shape}; got "
                                 f"{getattr(mask, 'dtype', type(mask).__name__)} {list(getattr(mask, 'shape', []))}")
        if config.scope is None:  # resolved once: the report, the targets and every builder agree on it
            config = replace(config, scope=config.resolve_scope(importance.criterion))
        if reconstruct is None:
            reconstruct = uses_obs(importance.criterion, config)
        nm_step = None
        if config.nm is not None:
            n, m = config.nm
            M.check_nm_shapes({name: importance.shapes[name] for name in names}, n, m)
            implied = 1.0 - n / m
            if sparsity is not None and sparsity > implied + 1e-9:
                raise ValueError(f"sparsity {sparsity} exceeds {implied}, the most structure {config.structure!r} "
                                 "prunes")
            target = implied if sparsity is None else sparsity
            nm_step = target if target < implied - 1e-9 else None
            targets = dict.fromkeys(names, target)
        elif config.allocation == "owl":
            targets = owl_allocation(importance, config, names, sparsity)
        else:
            base = config.sparsity if sparsity is None else sparsity
            targets = {n: s for n in names if (s := _module_target(n, base)) is not None}
        check_sparsity_keys(config.sparsity, names)
        cross = offline_cross_terms(importance, config.cross_alpha, reconstruct, targets)
        if reconstruct:  # every factorisation first: a failing one names its weight before any weight is edited
            checked = set(targets if checked is None else checked)
            check_hessians(((n, importance.state(n)) for n in targets if n in checked),
                           percdamp=config.dampening)
        plan = cls(importance, config, names, targets, reconstruct, nm_step, previous, gradual, cross)
        if config.nm is None and config.scope == "global" and combine is not None:
            local = set(targets if checked is None else checked)
            plan._scores, plan._combine = {n: plan.ranking(n) for n in names if n in local and n in targets}, combine
        elif config.nm is None and config.scope == "global":
            plan._compute_thresholds()
        elif config.nm is None and not config.allow_collapse:
            for name, s in targets.items():
                shape = importance.shapes[name]
                group = math.prod(shape) if config.scope == "layer" else math.prod(shape[1:])
                if group and M.num_to_prune(group, s) == group:
                    plan._refuse_collapse(name, s)
        return plan

    # ------------------------------------------------------------------------------------------------ builders
    def ranking(self, name: str) -> torch.Tensor:
        """The importance's ranking of `name`, with the weights `previous` pruned at `-inf` (they stay pruned)."""
        if name in self._scores:
            return self._scores[name]
        score = self.importance.ranking(name)
        old = self.previous.get(name)
        # Not in place: the ranking may be the importance's own state tensor.
        return score if old is None else score.masked_fill(~old.to(score.device), -math.inf)

    def mask(self, name: str) -> torch.Tensor | None:
        """
        The keep-mask of `name` from its ranking, at its target.

        Returns:
            `torch.BoolTensor` shaped like the weight (`True` = keep), or `None` for a weight the plan leaves dense.
        """
        target = self.targets.get(name)
        if target is None:
            return None
        if self.config.nm is not None:
            n, m = self.config.nm
            if self.nm_step is None:
                return M.nm_mask(self.ranking(name), n, m)
            return M.nm_capped_mask(self.ranking(name), target, n, m)
        if self.config.scope == "global":
            return self.thresholds[name].mask(name, self.ranking(name))
        build = layer_mask if self.config.scope == "layer" else M.row_mask
        return build(self.ranking(name), target)

    def edit(self, name: str) -> Edit | None:
        """
        How to prune `name`: `edit(weight)` prunes that weight in place and returns what it holds now as a keep-mask;
        `None` for a weight the plan leaves dense.

        Mask criteria zero the masked weights. With `reconstruct`, the OBS sweep (SparseGPT, arXiv 2301.00774) prunes
        the tensor's target (under a global scope: its share of the threshold) and updates the kept weights, for the
        asymmetric objective where the plan holds the weight's cross term ([`~refit.asymmetric_sparsegpt_prune_`]); with
        `previous` its keep-mask comes back (exactly the target count; a dead input column, `H_jj == 0`, is zero but
        not held), else the weight's nonzeros, measured.

        Raises:
            `ValueError`: with `reconstruct`, a global threshold that would prune the whole tensor.
        """
        if not self.reconstruct:
            mask = self.mask(name)
            return None if mask is None else _masked(mask)
        if name not in self.targets:
            return None
        if self.config.nm is not None:
            return self._obs(name, None)
        target = self.targets[name]
        if self.config.scope == "global":
            target = M.mask_sparsity(self.mask(name))
            if target >= 1.0:
                raise ValueError(f"{name} would be pruned entirely by the global threshold (layer collapse): OBS "
                                 "saliencies are not comparable enough across tensors; use scope='row' or 'layer'")
        return self._obs(name, target)

    def _obs(self, name: str, sparsity: float | None) -> Edit:
        config, gradual = self.config, self.gradual
        old, cross = self.previous.get(name), self.cross.get(name)

        def edit(weight: torch.Tensor) -> torch.Tensor:
            kwargs = dict(sparsity=sparsity, nm=config.nm, scope="row" if config.scope == "row" else "layer",
                          blocksize=config.block_size, percdamp=config.dampening,
                          previous=None if old is None else old.to(weight.device), nm_sparsity=self.nm_step)
            hessian = self.importance.state(name).to(weight.device)
            if cross is None:
                keep = sparsegpt_prune_(weight, hessian, **kwargs)
            else:  # the asymmetric objective: the sweep from the propagated target `W + alpha W C H~^-1`
                keep = asymmetric_sparsegpt_prune_(weight, hessian, cross.to(weight.device), alpha=config.cross_alpha,
                                                   **kwargs)
            return keep if gradual else weight.detach() != 0  # one-shot: measured (dead input columns too)

        return edit

    # ------------------------------------------------------------------------------------------------ global scope
    def share_thresholds_(self) -> None:
        """The global thresholds of a plan built with `combine`, from the rankings `build` kept (collective: every
        process calls it once `build` succeeded on every one). Raises `ValueError`: a collapse of this process's weights.
        """
        self._compute_thresholds(set(self._scores), self._combine)

    def _compute_thresholds(self, local: set[str] | None = None, combine: Combine | None = None) -> None:
        """One streaming threshold per distinct target (a per-module dict may hold several), and the collapse check, over
        the `local` weights with `combine` (their counts summed with the other processes': no rank needs every score)."""
        groups: dict[float, list[str]] = {}
        for name, s in self.targets.items():
            groups.setdefault(s, []).append(name)
        top_keys: dict[str, int] = {}  # order key of each tensor's highest score, recorded on the first pass

        def named(group: list[str]):
            for n in group:
                r = self.ranking(n)
                if n not in top_keys and r.numel():
                    top_keys[n] = int(M.order_key(r.max().reshape(1), n)[0])
                yield n, r

        for s, group in groups.items():
            mine = group if local is None else [n for n in group if n in local]
            threshold = compute_global_threshold(lambda g=mine: named(g), s, combine=combine, order=group,
                                                 sizes={n: math.prod(self.importance.shapes[n]) for n in group})
            self.thresholds.update(dict.fromkeys(group, threshold))
        if self.config.allow_collapse:
            return
        for name, threshold in self.thresholds.items():
            # A tensor keeps a weight iff its top score is above the threshold (or at it, past the pruned ties).
            top = top_keys.get(name)
            if top is None or top > threshold.key:
                continue
            if top < threshold.key or not bool(threshold.mask(name, self.ranking(name)).any()):
                self._refuse_collapse(name, self.targets[name])

    def _refuse_collapse(self, name: str, sparsity: float) -> None:
        criterion, scope = self.importance.criterion, self.config.scope
        fix = ("lower the sparsity" if scope != "global" else
               f"use scope={default_scope(criterion)!r} (the default for criterion {criterion!r}) or lower the "
               "sparsity")
        raise ValueError(f"{name} would be pruned to 100% (layer collapse) by scope={scope!r} at sparsity "
                         f"{sparsity:g} ({len(self.names)} tensors pruned): {fix}, or pass allow_collapse=True "
                         "(PruneConfig or PruneSchedule; --allow_collapse on the CLI) to allow it")


def _masked(mask: torch.Tensor) -> Edit:
    def edit(weight: torch.Tensor) -> torch.Tensor:
        M.apply_mask_(weight, mask.to(weight.device))
        return mask

    return edit


def compute_masks(importance: Importance, config: PruneConfig, names: list[str] | None = None, *,
                  sparsity: float | None = None, previous: Mapping[str, torch.Tensor] | None = None,
                  ) -> Callable[[str], torch.Tensor | None]:
    """
    Keep-masks only, from the ranking of any criterion (no OBS update): [`PruningPlan.build`] with
    `reconstruct=False`, then [`PruningPlan.mask`] per name.

    Args:
        importance, config, names, sparsity, previous: as for [`PruningPlan.build`].

    Returns:
        `Callable[[str], torch.BoolTensor | None]`: `name -> keep-mask` shaped like the weight (`True` = keep),
        callable in any order, or `None` for a name not in `names` or that no sparsity applies to (per-module dicts).

    Raises:
        `ValueError`: as [`PruningPlan.build`].
    """
    return PruningPlan.build(importance, config, names, sparsity=sparsity, previous=previous, reconstruct=False).mask
