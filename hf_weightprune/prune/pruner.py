"""`prune_`: importance -> masks -> zeros (unstructured, N:M) or a smaller model (neurons, heads).

Pure orchestration over `masks` (per-tensor mask builders), `global_threshold` (the streaming global threshold) and
`surgery` (structured shrinking). [`compute_masks`] is the one dispatch from a [`PruneConfig`] to mask builders, used
by one-shot pruning, checkpoint-to-checkpoint pruning and gradual pruning alike. Scores are computed one tensor at a
time from the (possibly lazily loaded) importance, so the extra memory is about one tensor plus small histograms
whatever the model size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..collect.importance import Importance
from ..config import PruneConfig, default_scope
from ..matching import canonical_name, decoder_layer, select_names
from ..validation import check_sparsity
from . import masks as M
from .global_threshold import GlobalThreshold, compute_global_threshold, layer_mask
from .masks import _order_key, num_to_prune
from .obs import sparsegpt_prune_

__all__ = ["PruningReport", "check_nm_shapes", "compute_masks", "prune_", "refuse_tied"]

check_nm_shapes = M.check_nm_shapes

def _importance_info(importance: Importance | None) -> dict[str, Any]:
    if importance is None:
        return {}
    return {
        "path": importance.path,
        "step": importance.step,
        "num_samples": importance.num_samples,
        "criterion": importance.criterion,
        "settings": {k: v for k, v in importance.config.to_dict().items() if k != "criterion"},
        # Activation criteria count the real tokens each Linear saw (the same for every Linear of a run, barring
        # skipped samples): the card says tokens, not "snapshots" (a forward is one sample of many tokens).
        "tokens": max(importance.meta.get("tokens", {}).values(), default=None),
    }


@dataclass
class PruningReport:
    """
    What a pruning did: written to `sparsity.json` by `save_pruned` and shown on the model card.

    Build one with [`~PruningReport.for_config`] (then [`~PruningReport.add_mask`] per pruned tensor and
    [`~PruningReport.finalize`]) or, for masks that already exist (gradual pruning, a LoRA merge), with
    [`~PruningReport.from_masks`].

    Args:
        structure (`str`):
            `"unstructured"`, an N:M pattern such as `"2:4"`, `"neurons"` or `"heads"`.
        scope (`str`):
            `"global"`, `"layer"` or `"row"` (see [`PruneConfig`]).
        target_sparsity (`float` or `dict[str, float]`):
            The sparsity asked for (per module regex for a dict).
        criterion (`str`):
            Importance criterion, or `"unknown"`.
        tensors (`dict[str, dict]`):
            Per pruned weight, in model order: `{"shape": list[int], "numel": int, "sparsity": float}` (pruned
            fraction).
        global_sparsity (`float`):
            Zeros over the elements of the pruned tensors; for structured pruning, the fraction of parameters removed.
        model_sparsity (`float`):
            Zeros in the pruned tensors over all parameters of the model; for structured pruning, the fraction of
            the model's parameters removed.
        importance (`dict`):
            Where the importance came from: `path`, `step`, `num_samples`, `criterion`, `settings`.
        structured (`dict`, *optional*):
            For `"neurons"`/`"heads"`: the dict [`~surgery.prune_structured_`] returns, unchanged (its
            `num_parameters` is `{"before": int, "after": int}`).
        reconstruction (`str`, *optional*):
            `"OBS"` when the kept weights were updated to compensate for the pruned ones (SparseGPT's sweep).
        allocation (`str`, *optional*, defaults to `"uniform"`):
            `"owl"` when per-layer sparsities came from OWL.
    """

    structure: str
    scope: str
    target_sparsity: float | dict[str, float]
    criterion: str
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    global_sparsity: float = 0.0  # zeros / elements over the pruned tensors
    model_sparsity: float = 0.0  # zeros in pruned tensors / all parameters of the model
    importance: dict[str, Any] = field(default_factory=dict)
    structured: dict[str, Any] | None = None
    reconstruction: str | None = None
    allocation: str = "uniform"

    @classmethod
    def for_config(
        cls, importance: Importance | None, config: PruneConfig, *, sparsity: float | None = None
    ) -> PruningReport:
        """
        An empty report for pruning with `config` from `importance`.

        Args:
            importance ([`Importance`], *optional*):
                Where the scores come from; `None` records the criterion as `"unknown"`.
            config ([`PruneConfig`]):
                How the model is pruned.
            sparsity (`float`, *optional*):
                The target actually used when it overrides `config.sparsity` (a gradual schedule's current target).

        Returns:
            [`PruningReport`]: with no tensors yet.
        """
        return cls(
            structure=config.structure,
            scope=config.resolve_scope(importance.criterion if importance is not None else None),
            target_sparsity=config.sparsity if sparsity is None else sparsity,
            criterion=importance.criterion if importance is not None else "unknown",
            importance=_importance_info(importance),
        )

    @classmethod
    def from_masks(
        cls,
        masks: Mapping[str, torch.Tensor],
        model_numel: int,
        *,
        structure: str = "unstructured",
        scope: str | None = "layer",
        target_sparsity: float | dict[str, float] | None = None,
        importance: Importance | None = None,
    ) -> PruningReport:
        """
        The report of masks that already exist (gradual pruning's current masks, the zeros of merged weights).

        Args:
            masks (`Mapping[str, torch.BoolTensor]`):
                Keep-masks by canonical parameter name, `True` = keep; in the order the report should list them.
            model_numel (`int`):
                All parameters of the model, for `model_sparsity`.
            structure (`str`, *optional*, defaults to `"unstructured"`):
                As in [`PruneConfig`].
            scope (`str`, *optional*, defaults to `"layer"`):
                As in [`PruneConfig`]; `None` is resolved from the importance's criterion ([`default_scope`]).
            target_sparsity (`float` or `dict[str, float]`, *optional*):
                The sparsity asked for; defaults to the achieved `global_sparsity`.
            importance ([`Importance`], *optional*):
                Where the scores came from, if any.

        Returns:
            [`PruningReport`]: finalized.

        Raises:
            `ValueError`: if `masks` is empty, or a mask is not a non-empty bool tensor.
        """
        if not masks:
            raise ValueError("masks is empty: there is nothing to report")
        if scope is None:
            scope = default_scope(importance.criterion if importance is not None else None)
        report = cls(structure=structure, scope=scope, target_sparsity=0.0,
                     criterion=importance.criterion if importance is not None else "unknown",
                     importance=_importance_info(importance))
        for name, mask in masks.items():
            report.add_mask(name, mask)
        report.finalize(model_numel)
        report.target_sparsity = report.global_sparsity if target_sparsity is None else target_sparsity
        return report

    def add_mask(self, name: str, mask: torch.Tensor) -> None:
        """
        Record one pruned tensor (in place).

        Args:
            name (`str`):
                Canonical parameter name.
            mask (`torch.BoolTensor`):
                Its keep-mask, `True` = keep.

        Raises:
            `ValueError`: if `mask` is not a non-empty bool tensor.
        """
        self.tensors[name] = {"shape": list(mask.shape), "numel": mask.numel(), "sparsity": M.mask_sparsity(mask)}

    def finalize(self, model_numel: int) -> PruningReport:
        """
        Compute `global_sparsity` and `model_sparsity` from the recorded tensors (in place).

        Args:
            model_numel (`int`):
                All parameters of the model (> 0).

        Returns:
            [`PruningReport`]: `self`.

        Raises:
            `ValueError`: if `model_numel` is not a positive int.
        """
        if isinstance(model_numel, bool) or not isinstance(model_numel, int) or model_numel <= 0:
            raise ValueError(f"model_numel must be a positive int (the model's parameter count); got {model_numel!r}")
        zeros = sum(round(v["sparsity"] * v["numel"]) for v in self.tensors.values())
        numel = sum(v["numel"] for v in self.tensors.values())
        self.global_sparsity = zeros / max(numel, 1)
        self.model_sparsity = zeros / model_numel
        return self

    def to_dict(self) -> dict[str, Any]:
        """
        Returns:
            `dict[str, Any]`: every field, JSON-serialisable (what `sparsity.json` is built from).
        """
        return asdict(self)

    def summary(self) -> str:
        """
        Returns:
            `str`: one line for logs and the CLI.
        """
        if self.structured:
            params = self.structured["num_parameters"]
            before, after = params["before"], params["after"]
            return f"{self.structure}: parameters {before:,} -> {after:,} ({1 - after / before:.1%} removed)"
        return (f"{self.structure} ({self.scope}): {self.global_sparsity:.2%} of {len(self.tensors)} pruned tensors, "
                f"{self.model_sparsity:.2%} of all parameters")


def refuse_tied(model: nn.Module, params: Mapping[str, torch.Tensor], names: list[str]) -> None:
    """
    Refuse to zero a weight that another parameter shares (`tie_word_embeddings`: lm_head = input embedding).

    Args:
        model (`nn.Module`):
            The model (or its meta-device skeleton) whose parameters may alias each other.
        params (`Mapping[str, torch.Tensor]`):
            Canonical parameter name to the parameter object of `model`.
        names (`list[str]`):
            The names about to be pruned.

    Raises:
        `ValueError`: naming the first weight to prune that is tied to another parameter, and the fix.
    """
    aliases: dict[int, list[str]] = {}
    for raw, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(canonical_name(raw))
    for name in names:
        other = [a for a in aliases.get(id(params[name]), []) if a != name]
        if other:
            raise ValueError(
                f"{name} is tied to {other[0]} (tie_word_embeddings): pruning it would zero that weight too. Untie "
                "first (model.config.tie_word_embeddings = False; give lm_head its own copy: "
                "model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone())) or exclude it from pruning"
            )


def _sparsity_of(name: str, sparsity: float | dict[str, float]) -> float | None:
    if not isinstance(sparsity, dict):
        return sparsity
    module = name.rsplit(".", 1)[0]
    for pattern, value in sparsity.items():
        if re.fullmatch(pattern, module):
            return value
    return None


def compute_masks(
    importance: Importance,
    config: PruneConfig,
    names: list[str] | None = None,
    *,
    sparsity: float | None = None,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> Callable[[str], torch.Tensor | None]:
    """
    The one mask dispatch: `config` (structure, scope, per-module sparsity) to the mask builders of `masks` and
    `global_threshold`. Global thresholds are computed here, up front (streaming over the importance); each mask is
    then built on demand from one tensor's ranking, so a caller can walk the weights in its own order (checkpoint
    shards).

    `config.scope=None` resolves from the importance's criterion ([`~config.default_scope`]: `"row"` for wanda, as
    its paper prunes). A tensor that would lose every weight (layer collapse, e.g. a global threshold over scores that
    are not comparable across tensors) is refused unless `config.allow_collapse`.

    Among equal scores the lower flat index (for a global scope: the earlier name in `names`) is pruned first. With
    `previous`, weights already pruned score `-inf` so masks only shrink (gradual pruning, Zhu & Gupta 2017, arXiv
    1710.01878); an N:M config below its implied sparsity `1 - n/m` then uses [`~masks.nm_capped_mask`] (at most
    `m - n` pruned per group, exactly the target count), and at `1 - n/m` it is the [`~masks.nm_mask`].

    Args:
        importance ([`Importance`]):
            Scores to rank by (through `importance.ranking`, which orders and ties exactly as `importance.score`).
        config ([`PruneConfig`]):
            Unstructured or N:M; `"neurons"`/`"heads"` are pruned by [`~surgery.prune_structured_`] instead.
        names (`list[str]`, *optional*):
            The weights to prune, in order; defaults to `select_names(importance.names, config.target_modules,
            config.exclude_modules)`.
        sparsity (`float`, *optional*):
            Overrides `config.sparsity` (a gradual schedule's current target), in `[0, 1)`; for N:M, at most
            `1 - n/m`.
        previous (`Mapping[str, torch.BoolTensor]`, *optional*):
            Current keep-masks by name (shaped like the weights); their pruned weights stay pruned.

    Returns:
        `Callable[[str], torch.BoolTensor | None]`: `name -> keep-mask` shaped like the weight (`True` = keep),
        callable in any order, or `None` for a name not in `names` or that no sparsity applies to (per-module dicts).

    Raises:
        `ValueError`, before any score is read: for a structured config, a bad `sparsity`, a name the importance does
        not track, an N:M weight whose input dim is not a multiple of `m` ([`check_nm_shapes`]), a `previous` mask of
        the wrong shape or dtype, when nothing is selected, or (unless `config.allow_collapse`) when a tensor would
        be pruned to 100%, naming it (for a global scope this costs one `max` per tensor on the threshold's first
        pass).
    """
    if config.kind in ("neurons", "heads"):
        raise ValueError(f"structure={config.structure!r} shrinks layers: prune it with prune_ (surgery), not masks")
    names = select_names(importance.names, config.target_modules, config.exclude_modules) if names is None else names
    unknown = [n for n in names if n not in importance.shapes]
    if unknown:
        raise ValueError(f"{unknown[0]} is not tracked by the importance ({len(importance.shapes)} tracked weights)")
    target = config.sparsity if sparsity is None else check_sparsity("sparsity", sparsity)
    previous = dict(previous or {})
    for name, mask in previous.items():
        shape = importance.shapes.get(name)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or shape is None \
                or list(mask.shape) != list(shape):
            raise ValueError(f"previous[{name!r}] must be a bool mask of the weight's shape {shape}; got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {list(getattr(mask, 'shape', []))}")
    selected = set(names)

    def ranking(name: str) -> torch.Tensor:
        score = importance.ranking(name)
        old = previous.get(name)
        # Not in place: the ranking may be the importance's own state tensor.
        return score if old is None else score.masked_fill(~old.to(score.device), -math.inf)

    if config.kind == "N:M":
        n, m = config.nm
        check_nm_shapes({name: importance.shapes[name] for name in names}, n, m)
        implied = 1.0 - n / m
        if target > implied + 1e-9:
            raise ValueError(f"sparsity {target} exceeds {implied}, the most structure {config.structure!r} prunes")
        if target >= implied - 1e-9:
            return lambda name: M.nm_mask(ranking(name), n, m) if name in selected else None
        return lambda name: M.nm_capped_mask(ranking(name), target, n, m) if name in selected else None

    scope = config.resolve_scope(importance.criterion)
    if scope == "global":
        thresholds: dict[str, GlobalThreshold] = {}
        groups: dict[float, list[str]] = {}
        for name in names:
            s = _sparsity_of(name, target)
            if s is not None:
                groups.setdefault(s, []).append(name)
        top_keys: dict[str, int] = {}  # order key of each tensor's highest score, recorded on the first pass

        def named(group: list[str]):
            for n in group:
                r = ranking(n)
                if n not in top_keys and r.numel():
                    top_keys[n] = int(_order_key(r.max().reshape(1), n)[0])
                yield n, r

        for s, group in groups.items():
            threshold = compute_global_threshold(lambda g=group: named(g), s)
            thresholds.update(dict.fromkeys(group, threshold))
        if not config.allow_collapse:
            for name, threshold in thresholds.items():
                # A tensor keeps a weight iff its top score is above the threshold (or at it, past the pruned ties).
                top = top_keys.get(name)
                if top is None or top > threshold.key:
                    continue
                if top < threshold.key or not bool(threshold.mask(name, ranking(name)).any()):
                    _refuse_collapse(name, importance.criterion, scope, _sparsity_of(name, target), names)
        return lambda name: thresholds[name].mask(name, ranking(name)) if name in thresholds else None

    build = layer_mask if scope == "layer" else M.row_mask
    if not config.allow_collapse:
        for name in names:
            s, shape = _sparsity_of(name, target), importance.shapes[name]
            group = math.prod(shape) if scope == "layer" else math.prod(shape[1:])
            if s is not None and group and num_to_prune(group, s) == group:
                _refuse_collapse(name, importance.criterion, scope, s, names)

    def one(name: str) -> torch.Tensor | None:
        s = _sparsity_of(name, target) if name in selected else None
        return None if s is None else build(ranking(name), s)

    return one


def _refuse_collapse(name: str, criterion: str, scope: str, sparsity: float, names: list[str]) -> None:
    fix = ("lower the sparsity" if scope != "global" else
           f"use scope={default_scope(criterion)!r} (the default for criterion {criterion!r}) or lower the sparsity")
    raise ValueError(f"{name} would be pruned to 100% (layer collapse) by scope={scope!r} at sparsity {sparsity:g} "
                     f"({len(names)} tensors pruned): {fix}, or pass allow_collapse=True (PruneConfig or PruneSchedule; --allow_collapse on the CLI) to allow it")


@torch.no_grad()
def prune_(model: nn.Module, importance: Importance, config: PruneConfig | None = None, *,
           progress: bool = True) -> PruningReport:
    """
    Prune `model` in place from `importance`: zero weights (unstructured, N:M) or remove MLP neurons / KV groups
    (`"neurons"`, `"heads"`, which physically shrink the model; rebuild any optimizer afterwards).

    Args:
        model (`nn.Module`):
            The model the importance was computed for (validated: names and shapes).
        importance ([`Importance`]):
            From `ImportanceCallback.importance()` or `load_importance()`.
        config ([`PruneConfig`], *optional*):
            Defaults to `PruneConfig()`: 50% unstructured, in the criterion's default scope (`"row"` for wanda, see
            [`~config.default_scope`]); a tensor is never pruned to 100% unless `allow_collapse=True`.
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm bar.

    Returns:
        [`PruningReport`]: per pruned tensor its shape, numel and achieved sparsity, plus global and model
        sparsity; for structured pruning, `structured` holds what [`~surgery.prune_structured_`] returned.

    Raises:
        `ValueError`, before the model is modified: importance from another model, nothing selected, a weight tied to
        another one, an N:M weight whose input dim is not a multiple of `m`, an unsupported structured layout, or a
        tensor that would be pruned to 100% (unless `config.allow_collapse`).
    """
    config = config or PruneConfig()
    if config.scope is None:  # resolved here once, so the report, the masks and every branch below agree on it
        config = replace(config, scope=config.resolve_scope(importance.criterion))
    importance.bind(model)
    params = dict(importance.weights)
    report = PruningReport.for_config(importance, config)
    if config.kind in ("neurons", "heads"):
        from .surgery import prune_structured_

        report.structured = prune_structured_(model, importance.scores, structure=config.kind,
                                              sparsity=config.sparsity)
        params_count = report.structured["num_parameters"]
        report.global_sparsity = 1 - params_count["after"] / params_count["before"]
        report.model_sparsity = report.global_sparsity  # removed parameters over all of the model's, before
        return report

    names = select_names(importance.names, config.target_modules, config.exclude_modules)
    if config.kind == "N:M":
        check_nm_shapes({name: importance.shapes[name] for name in names}, *config.nm)
    refuse_tied(model, params, names)
    edit = pruning_edits(importance, config, names)
    desc = f"pruning ({config.structure}, {config.scope}{', OBS' if report_obs(importance, config) else ''})"
    for name in tqdm(names, desc=desc, disable=not progress):
        edit_ = edit(name)
        if edit_ is not None:
            report.add_mask(name, edit_(params[name]))
    report.reconstruction = "OBS" if report_obs(importance, config) else None
    report.allocation = config.allocation
    return report.finalize(sum(p.numel() for p in model.parameters()))


def report_obs(importance: Importance, config: PruneConfig) -> bool:
    return config.kind in ("unstructured", "N:M") and _uses_obs(importance, config)


def pruning_edits(importance: Importance, config: PruneConfig, names: list[str], *, sparsity: float | None = None,
                  previous: Mapping[str, torch.Tensor] | None = None,
                  ) -> Callable[[str], Callable[[torch.Tensor], torch.Tensor] | None]:
    """The one plan shared by `prune_`, `prune_checkpoint` and gradual pruning (`MaskHolder`): `name -> edit` (or
    `None` to leave it dense), where `edit(weight)` prunes that weight in place and returns what it holds now as a
    keep-mask (`weight != 0` measured).

    Mask criteria zero the masked weights; `sparsegpt` importance runs the OBS sweep (SparseGPT, arXiv 2301.00774),
    which also updates the kept weights, at each tensor's sparsity: its share of a global threshold, its layer's OWL
    sparsity, or the uniform target. Global thresholds and OWL ratios are computed here, up front.

    Args:
        importance (`Importance`): bound to the weights (OWL and `sparsegpt` read them).
        config (`PruneConfig`): unstructured or N:M.
        names (`list[str]`): the selected weights.
        sparsity (`float`, *optional*): overrides `config.sparsity` (a gradual schedule's current target; for N:M
            below `1 - n/m`, a capped step towards it, see [`compute_masks`]).
        previous (`Mapping[str, torch.BoolTensor]`, *optional*): current keep-masks (gradual pruning): their pruned
            weights stay pruned and count towards the target. With `previous`, an OBS edit returns the sweep's
            keep-mask (exactly the target count; a dead input column, `H_jj == 0`, is zero but not held).

    Returns:
        `Callable[[str], Callable[[Tensor], BoolTensor] | None]`.

    Raises:
        ValueError: `reconstruct=True` without `sparsegpt` importance, or OWL without activation statistics.
    """
    if config.scope is None:  # prune_checkpoint passes the user's config: the criterion's default scope
        config = replace(config, scope=config.resolve_scope(importance.criterion))
    reconstruct = _uses_obs(importance, config)
    if sparsity is not None:
        sparsity = check_sparsity("sparsity", sparsity)
        if config.nm is None:
            config = replace(config, sparsity=sparsity)
    if config.allocation == "owl":
        per_tensor = owl_allocation(importance, config, names)
        config = replace(config, allocation="uniform",
                         sparsity={re.escape(n.rsplit(".", 1)[0]): s for n, s in per_tensor.items()})
    nm_step = None  # an N:M target below 1 - n/m: the sweep prunes that fraction, at most m - n per group
    if config.nm is not None and sparsity is not None:
        implied = 1.0 - config.nm[0] / config.nm[1]
        if sparsity > implied + 1e-9:
            raise ValueError(f"sparsity {sparsity} exceeds {implied}, the most structure {config.structure!r} prunes")
        nm_step = sparsity if sparsity < implied - 1e-9 else None
    gradual, previous = previous is not None, dict(previous or {})
    masks = None
    if not reconstruct or config.scope == "global":
        masks = compute_masks(importance, config, names, sparsity=sparsity if config.nm else None,
                              previous=previous)

    def masked(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def edit(weight: torch.Tensor) -> torch.Tensor:
            M.apply_mask_(weight, mask.to(weight.device))
            return mask

        return edit

    def obs(name: str, sparsity: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
        def edit(weight: torch.Tensor) -> torch.Tensor:
            old = previous.get(name)
            keep = sparsegpt_prune_(weight, importance.state(name).to(weight.device), sparsity=sparsity, nm=config.nm,
                                    scope="row" if config.scope == "row" else "layer", blocksize=config.block_size,
                                    percdamp=config.dampening, previous=None if old is None else old.to(weight.device),
                                    nm_sparsity=nm_step)
            return keep if gradual else weight.detach() != 0  # one-shot: measured (dead input columns too)

        return edit

    def one(name: str):
        if not reconstruct:
            mask = masks(name)
            return None if mask is None else masked(mask)
        if config.nm is not None:
            return obs(name, None)
        sparsity = M.mask_sparsity(masks(name)) if masks is not None else _sparsity_of(name, config.sparsity)
        if sparsity is not None and sparsity >= 1.0:
            raise ValueError(f"{name} would be pruned entirely by the global threshold (layer collapse): OBS saliencies "
                             "are not comparable enough across tensors; use scope='row' or 'layer'")
        return None if sparsity is None else obs(name, sparsity)

    return one


def _uses_obs(importance: Importance, config: PruneConfig) -> bool:
    """Whether `prune_` reconstructs kept weights (SparseGPT's OBS sweep): it needs the Hessians of `sparsegpt`."""
    return uses_obs(importance.criterion, config)


def uses_obs(criterion: str | None, config: PruneConfig) -> bool:
    """
    The reconstruction rule of `prune_`, from the criterion alone (so a schedule can check it before training).

    Args:
        criterion (`str`, *optional*): the importance's criterion.
        config ([`PruneConfig`]): its `reconstruct` (`None` = whenever the criterion is `sparsegpt`).

    Returns:
        `bool`: whether the kept weights are updated by the OBS sweep.

    Raises:
        `ValueError`: `reconstruct=True` with a criterion other than `sparsegpt`.
    """
    has_hessians = criterion == "sparsegpt"
    if config.reconstruct and not has_hessians:
        raise ValueError(f"reconstruct=True needs the input Hessians of criterion 'sparsegpt'; this importance is "
                         f"{criterion!r} (track ImportanceConfig(criterion='sparsegpt'))")
    return has_hessians if config.reconstruct is None else config.reconstruct


def _activation_norms(importance: Importance, name: str) -> torch.Tensor:
    """`||x_j||` over the tokens seen, `[in]` float32, from wanda's sums of squares or sparsegpt's `diag(H)`."""
    state = importance.state(name)
    if importance.criterion == "sparsegpt":
        state = state.diagonal()
    elif importance.criterion != "wanda":
        raise ValueError(f"allocation='owl' needs activation statistics (criterion 'wanda' or 'sparsegpt'); this "
                         f"importance is {importance.criterion!r}")
    tokens = max(int(importance.meta.get("tokens", {}).get(name, 0)), 1)
    return (state.float() / tokens).sqrt()


def owl_allocation(importance: Importance, config: PruneConfig, names: list[str]) -> dict[str, float]:
    """Per-tensor sparsities from OWL (Yin et al. 2023, arXiv 2310.05175): each decoder layer's outlier ratio
    (`|W_ij| * ||x_j|| > owl_m * mean` over the layer's weights) sets its sparsity, within `sparsity +- owl_lambda`,
    with the parameter-weighted mean exactly `config.sparsity`.

    Args:
        importance (`Importance`): `wanda` or `sparsegpt` importance, bound to the weights.
        config (`PruneConfig`): `sparsity` (a float), `owl_m`, `owl_lambda`.
        names (`list[str]`): the weights to prune; grouped by decoder layer (`model.layers.N`); a weight outside
            any layer is its own group.

    Returns:
        `dict[str, float]`: sparsity per weight name (the same for every weight of a layer).

    Raises:
        ValueError: importance without activation statistics, or not bound to weights.
    """
    from .owl import outlier_ratio, owl_sparsities

    if importance.weights is None:
        raise ValueError("allocation='owl' needs the weights: call importance.bind(model)")
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(decoder_layer(name) or name, []).append(name)
    ratios = {g: outlier_ratio([importance.weights[n].detach() for n in ns], [_activation_norms(importance, n) for n in ns],
                               M=config.owl_m) for g, ns in groups.items()}
    numels = {g: sum(importance.weights[n].numel() for n in ns) for g, ns in groups.items()}
    per_layer = owl_sparsities(ratios, numels, config.sparsity, lamda=config.owl_lambda)
    return {n: per_layer[g] for g, ns in groups.items() for n in ns}

