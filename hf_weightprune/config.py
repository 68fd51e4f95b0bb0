"""Configuration dataclasses: what to track (`ImportanceConfig`) and how to prune (`PruneConfig`).

The validators they share with the rest of the package live in `validation.py`. Of the package it imports only
`io_utils` and `validation` at import time (the criterion registry is looked up when an `ImportanceConfig` is built
and when `PruneConfig.resolve_scope` asks a criterion's default scope).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from .io_utils import JsonConfigMixin
from .validation import STRUCTURED_KINDS, check_modules, check_regex, check_sparsity, parse_structure, structure_parts

logger = logging.getLogger(__name__)

IMPORTANCE_CONFIG_NAME = "importance_config.json"
STATE_DTYPES = ("float32", "bfloat16")
WEIGHTINGS = ("uniform", "step")
# An `ImportanceConfig.name` becomes part of a folder name: no separators, no hidden or option-like names.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


@dataclass
class ImportanceConfig(JsonConfigMixin):
    """What the [`ImportanceCallback`] tracks and how.

    Args:
        criterion (`str`, *optional*, defaults to `"wanda"`):
            One of the registered criteria: `wanda`, `temporal_magnitude`, `magnitude`, `movement`, `taylor`,
            `fisher`, `sparsegpt` (see `hf_weightprune.scorers`). The default, Wanda (Sun et al. 2023, arXiv
            2306.11695), gave the best perplexity of the criteria whose state is small (`[in_features]` floats per
            Linear): perplexity 57.1 at 50% on SmolLM2-135M, against 325.1 for `temporal_magnitude` (the README's
            "which criterion when" table). It needs no weight gradient, so it also works under LoRA.
            The seed paper's time-weighted magnitude (arXiv 2502.17071) is `criterion="temporal_magnitude"`.
        target_modules (`str` or `list[str]`, *optional*, defaults to `"all-linear"`):
            peft's rules: a regex that must fullmatch a module name, or a list of names / name suffixes.
        exclude_modules (`str` or `list[str]`, *optional*):
            Same rules; matching modules are not tracked. `lm_head` and embeddings are never tracked by
            `"all-linear"`.
        every_n_steps (`int`, *optional*, defaults to 1):
            Take a sample every n optimizer steps.
        per_epoch (`bool`, *optional*, defaults to `False`):
            Take one sample at the end of each epoch instead, as arXiv 2502.17071 does (t = epoch number);
            `temporal_magnitude` only (the other criteria read gradients or activations during steps, or, for
            `magnitude`, only the final weights).
        window (`int`, *optional*):
            Only the last `window` samples of the planned run count (the paper's k); `None` keeps all.
        state_dtype (`str`, *optional*, defaults to `"float32"`):
            `"float32"` (4 bytes per tracked weight) or `"bfloat16"` (2 bytes, stochastic rounding).
        skip_nonfinite (`bool`, *optional*, defaults to `True`):
            Skip a sample whose gradients or activations hold NaN/Inf instead of poisoning the statistics.
        name (`str`, *optional*):
            Needed only for several `ImportanceCallback`s on one Trainer (e.g. one per criterion): each writes
            `importance-<name>/` (checkpoints and `output_dir`) instead of `importance/`, and
            `load_importance(path, name=...)` reads it. Letters, digits, `_`, `.`, `-`; `None` (default) keeps the
            single-callback layout `importance/`.
        weighting (`str`, *optional*, defaults to `"uniform"`):
            How the samples are summed: `"uniform"`, or `"step"`: the sample of step `t` is multiplied by `t`, as
            arXiv 2502.17071 weighs magnitudes (`criterion="sparsegpt"` only: `H = sum_t t * X_t^T X_t`, see
            [`~hf_weightprune.scorers.sparsegpt.SparseGPT`]). Other criteria refuse `"step"`.
        units (`bool`, *optional*, defaults to `False`):
            Also gather the unit statistics structured pruning ranks by (`collect/units.py`): per MLP neuron, KV
            group and hidden channel the activation magnitude over real tokens (Minitron) and first-order Taylor
            `|sum g * w|`, per decoder layer the block influence (ShortGPT). Sampled at the same steps as the
            criterion, written with every checkpoint (`units.safetensors`), read by `Importance.unit_scores`.
    """

    config_name = IMPORTANCE_CONFIG_NAME

    criterion: str = field(default="wanda", metadata={"help": "Importance criterion (registry key)."})
    target_modules: str | list[str] | None = field(default="all-linear", metadata={"help": "Modules to track."})
    exclude_modules: str | list[str] | None = field(default=None, metadata={"help": "Modules never tracked."})
    every_n_steps: int = field(default=1, metadata={"help": "Sample every n optimizer steps."})
    per_epoch: bool = field(default=False, metadata={"help": "Sample once per epoch instead of per step."})
    window: int | None = field(default=None, metadata={"help": "Only the last k samples count."})
    state_dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16 accumulator state."})
    skip_nonfinite: bool = field(default=True, metadata={"help": "Skip samples with NaN/Inf grads/activations."})
    name: str | None = field(default=None, metadata={"help": "Folder suffix: importance-<name>/ (several callbacks)."})
    weighting: str = field(default="uniform", metadata={"help": "uniform | step (sample of step t counts t times; "
                                                                "sparsegpt)."})
    units: bool = field(default=False, metadata={"help": "Also gather unit statistics (neurons, KV groups, hidden "
                                                         "channels, layers) for structured pruning."})

    def __post_init__(self):
        from .scorers import SCORERS

        if self.criterion not in SCORERS:
            raise ValueError(f"criterion must be one of {sorted(SCORERS)}; got {self.criterion!r}")
        self.target_modules = check_modules("target_modules", self.target_modules)
        self.exclude_modules = check_modules("exclude_modules", self.exclude_modules)
        if not isinstance(self.every_n_steps, int) or isinstance(self.every_n_steps, bool) or self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1; got {self.every_n_steps!r}")
        if self.window is not None and (
            not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1
        ):
            raise ValueError(f"window must be None or an int >= 1; got {self.window!r}")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {STATE_DTYPES}; got {self.state_dtype!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {self.weighting!r}")
        if self.weighting not in SCORERS[self.criterion].weightings:
            supported = sorted(c for c, s in SCORERS.items() if self.weighting in s.weightings)
            raise ValueError(f"weighting={self.weighting!r} is not supported by criterion {self.criterion!r}; use it "
                             f"with {supported} or leave weighting='uniform'")
        if not isinstance(self.per_epoch, bool):
            raise ValueError(f"per_epoch must be a bool; got {self.per_epoch!r}")
        if not isinstance(self.units, bool):
            raise ValueError(f"units must be a bool; got {self.units!r}")
        if self.units and self.per_epoch:
            raise ValueError("units=True gathers statistics during training steps; per_epoch=True samples only "
                             "weights at epoch ends: use every_n_steps")
        if self.name is not None and not (isinstance(self.name, str) and _NAME_RE.fullmatch(self.name)):
            raise ValueError(f"name must be None or letters, digits, '_', '.', '-' (it names the folder "
                             f"importance-<name>/), not starting with '.' or '-'; got {self.name!r}")

    # Fields that change what the state means: a resumed run must agree on all of them.
    RESUME_KEYS = ("criterion", "target_modules", "exclude_modules", "every_n_steps", "per_epoch", "window", "state_dtype",
                   "weighting", "units")

    def diff(self, other: ImportanceConfig) -> dict[str, tuple[Any, Any]]:
        """
        Fields of `RESUME_KEYS` (those that change what the accumulated state means) whose values differ.

        Args:
            other ([`ImportanceConfig`]):
                The config to compare with (e.g. the one a checkpoint was written with).

        Returns:
            `dict[str, tuple[Any, Any]]`: `{field: (self_value, other_value)}`, empty when a resume may proceed.
        """
        return {
            k: (getattr(self, k), getattr(other, k)) for k in self.RESUME_KEYS if getattr(self, k) != getattr(other, k)
        }


PRUNE_SCOPES = ("global", "layer", "row")
PRUNE_ALLOCATIONS = ("uniform", "owl")
COMPENSATIONS = (None, "refit", "mean", "refit,mean")
# What structured pruning can rank units by (`collect/units.py` computes them; defined here, the leaf both read).
UNIT_STATISTICS = ("activation", "activation_l2", "taylor")
# The structured axes whose size is a width (`round_to` rounds them); heads (KV groups) and layers are counts.
WIDTH_AXES = ("neurons", "hidden")
# The axes whose consumers (down_proj / o_proj) a compensation re-fits or shifts: hidden channels and layers have none.
COMPENSATED_AXES = ("neurons", "heads")

@dataclass
class PruneConfig(JsonConfigMixin):
    """How [`prune_`] turns importance into masks.

    Args:
        sparsity (`float` or `dict[str, float]`, *optional*, defaults to 0.5):
            Fraction of weights (or units) to remove, in [0, 1). A dict maps module-name regexes (fullmatch,
            first match wins) to per-module targets; modules matching no key are left dense. For N:M it is
            implied (`1 - N/M`) and may be left unset.
        structure (`str`, `tuple` or `list`, *optional*, defaults to `"unstructured"`):
            `"unstructured"`, `"N:M"` such as `"2:4"` (groups of M consecutive input weights keep N),
            `"neurons"` (MLP intermediate channels), `"heads"` (attention KV groups), `"hidden"` (residual-stream
            channels) or `"layers"` (whole decoder layers), or several of those four (`("layers", "neurons")`,
            stored as `"layers,neurons"`), or `"experts"` (whole experts of every MoE layer, fewest tokens routed
            first, from the router statistics the callback saved): these physically shrink the model.
        scope (`str`, *optional*):
            `"global"` (one threshold over all pruned weights), `"layer"` (the same sparsity in every tensor; the
            default and only choice for structured), or `"row"` (the same sparsity in every output row, as Wanda
            does). Not used by N:M. `None` (unstructured) is resolved at prune time from the importance's criterion:
            its scorer's `default_scope` ([`~scorers.default_scope`]: `"row"` for `wanda`, `taylor` and `fisher`,
            `"layer"` for the others), because no criterion's scores are comparable across tensors (a global
            threshold on them can prune whole layers).
        allow_collapse (`bool`, *optional*, defaults to `False`):
            Allow a tensor to be pruned to 100% (layer collapse). By default pruning refuses, before any weight is
            changed (or, during gradual pruning, at the mask update), naming the tensor.
        target_modules (`str` or `list[str]`, *optional*):
            Prune only these of the tracked weights (peft's rules, as in `ImportanceConfig`); `None` prunes all.
        exclude_modules (`str` or `list[str]`, *optional*):
            Never prune these (same rules).
        allocation (`str`, *optional*, defaults to `"uniform"`):
            `"uniform"`, or `"owl"`: per-decoder-layer sparsities from each layer's outlier ratio (OWL, Yin et al.
            2023, arXiv 2310.05175), mean exactly `sparsity`; needs activation statistics (`wanda`, `sparsegpt`).
            Within a layer the `scope` (`"row"` or `"layer"`) applies.
        owl_m (`float`, *optional*, defaults to 5.0):
            OWL's outlier threshold: `|W_ij| * ||x_j||` above `owl_m` times the layer's mean is an outlier.
        owl_lambda (`float`, *optional*, defaults to 0.08):
            OWL's band: layer sparsities stay within `sparsity +- owl_lambda`.
        reconstruct (`bool`, *optional*):
            Update the kept weights to compensate for the pruned ones (SparseGPT's OBS sweep, Frantar & Alistarh
            2023, arXiv 2301.00774). Needs `sparsegpt` importance (its Hessians); `None` = whenever it is available.
        dampening (`float`, *optional*, defaults to 0.01):
            OBS: fraction of the mean of `diag(H)` added to the diagonal.
        block_size (`int`, *optional*, defaults to 128):
            OBS: columns per mask-selection and lazy-update block.
        target_params (`int` or `float`, *optional*):
            Structured only, instead of `sparsity`: the parameters to keep, a count (`int`) or a fraction of the
            model's (`float` in (0, 1)); split between the axes of a combination (see `prune/structured.py`).
        unit_statistic (`str`, *optional*, defaults to `"activation"`):
            Structured: which unit statistic ranks the units (`"activation"`, `"activation_l2"`, `"taylor"`) when the
            importance has them (`ImportanceConfig(units=True)`); neurons/heads otherwise rank by per-weight scores.
        compensate (`str`, *optional*):
            Structured, what makes up for the removed MLP neurons and KV groups (hidden channels and layers are not
            compensated): `"refit"` refits the kept `down_proj` / `o_proj` columns by least squares from the input
            Hessians of `criterion="sparsegpt"` importance (structured OBS); `"mean"` (FLAP) adds the removed
            columns' mean contribution over the training tokens to the `down_proj` / `o_proj` bias, from the unit
            statistics (`units=True`), creating the bias through the config flag stock transformers reads
            (`mlp_bias` / `attention_bias`; refused where the architecture has none); `"refit,mean"` (also
            `("refit", "mean")`, any order, as structures combine) fits both together, least squares with an
            intercept: the refit on the centred input covariance, then the mean of what is left into the bias
            (needs both statistics, over the same tokens, and a bias as `"mean"` does); `None` slices only.
        cross_alpha (`float`, *optional*):
            Unstructured and N:M OBS pruning from an importance that holds the dense-to-pruned cross term
            (`PruneSchedule(cross_term=True)` under distillation, [`Importance.has_cross`]): the sweep solves the
            asymmetric objective `||W X - W_hat X~||^2` of GPTAQ / QEP for every weight with a cross term
            ([`~prune.refit.asymmetric_sparsegpt_prune_`]), with this share of the correction in [0, 1] (the schedule's
            `cross_alpha`: 0.25 by default there, the papers use 0.25 to 0.5; 1 is the exact asymmetric solution, 0 the
            symmetric sweep on `H~`). `None` (default): the symmetric sweep. The model to prune is that run's dense
            teacher, whose inputs `X` the cross term was measured against (a gradual run's default teacher: the model
            the run started from).
        round_to (`int`, *optional*):
            Structured: every width the prune cuts is kept at a multiple of `round_to`, so the result suits tensor
            cores and group-wise quantization kernels (GPTQ / AWQ / Marlin want `in_features` divisible by the group
            size, typically 128), as Torch-Pruning's `round_to` does: the MLP `intermediate_size` (`"neurons"`; MoE
            experts: a multiple of both `round_to` and 8, the alignment the experts kernel needs) and the
            `hidden_size` (`"hidden"`, also among the sizes its config accepts with the heads). KV groups, layers and
            experts are counts, not widths: a structure of those only (`"heads"`, `"layers"`, `"experts"`) refuses
            it, as unstructured and N:M do. With `sparsity` the kept width is rounded to the nearest multiple (never
            to 0); with `target_params` the budget is met within one step of `round_to` units per layer. `None`
            (default): any width the config accepts.

    Raises:
        `ValueError`: naming the field, for a bad structure, sparsity (or one an N:M pattern contradicts), a
        per-module sparsity dict with a structure other than unstructured, a bad scope, bad module patterns, or
        module patterns with `"neurons"`/`"heads"` (which shrink every layer), a non-bool `allow_collapse`, or a
        `round_to` that is not a positive int or is given for a structure that cuts no width.
    """

    config_name = "prune_config.json"
    section = "prune"

    sparsity: float | dict[str, float] | None = field(default=None, metadata={
        "help": "fraction to remove, in [0, 1), or JSON {regex: float} per module (None: 0.5; N:M sets its own)"})
    structure: str = field(default="unstructured", metadata={
        "help": "unstructured | N:M (e.g. 2:4) | neurons | heads | hidden | layers | a combination (layers,neurons) | experts"})
    scope: str | None = field(default=None, metadata={
        "help": "global | layer | row (None: the criterion's default: row for wanda, taylor, fisher; layer for the "
                "others)"})
    target_modules: str | list[str] | None = field(default=None, metadata={
        "help": "modules to prune: comma-separated name suffixes, or a regex (None: every tracked weight)"})
    exclude_modules: str | list[str] | None = field(default=None, metadata={
        "help": "modules to leave dense, as target_modules (None: none)"})
    allocation: str = field(default="uniform", metadata={
        "help": "uniform | owl (per-decoder-layer sparsity from outliers)"})
    owl_m: float = field(default=5.0, metadata={"help": "OWL outlier threshold, times the layer mean"})
    owl_lambda: float = field(default=0.08, metadata={"help": "OWL band around the target sparsity"})
    reconstruct: bool | None = field(default=None, metadata={
        "help": "OBS update of the kept weights (needs sparsegpt importance; None: whenever it is)"})
    dampening: float = field(default=0.01, metadata={"help": "OBS dampening, fraction of the mean of diag(H)"})
    block_size: int = field(default=128, metadata={"help": "OBS columns per block (a multiple of M for N:M)"})
    allow_collapse: bool = field(default=False, metadata={
        "help": "let a global threshold prune a whole tensor (refused otherwise)"})
    target_params: int | float | None = field(default=None, metadata={
        "help": "structured: parameters to keep, an int count or a float fraction of the model's (instead of "
                "sparsity)"})
    unit_statistic: str = field(default="activation", metadata={
        "help": "structured: unit statistic to rank by (activation | activation_l2 | taylor; needs units=True)"})
    compensate: str | None = field(default=None, metadata={
        "help": "structured: refit (least squares of down_proj / o_proj from sparsegpt Hessians), mean (FLAP: "
                "removed units' mean output into the bias, from units=True statistics), refit,mean (both fitted "
                "together: least squares with an intercept) or None"})
    cross_alpha: float | None = field(default=None, metadata={
        "help": "OBS from an importance with the dense-to-pruned cross term (PruneSchedule(cross_term=True) under "
                "distillation): solve the asymmetric objective with this share of the correction, in [0, 1] (0.5 as "
                "the schedule; None: the symmetric sweep). Prune that run's dense teacher (a gradual run's default: the model it started from)"})
    round_to: int | None = field(default=None, metadata={
        "help": "structured: keep every width it cuts (intermediate_size, hidden_size, an expert's) a multiple of this, e.g. 64 "
                "or 128 for tensor cores and group-wise quantization kernels (None: any width the config accepts)"})

    def __post_init__(self):
        kind, nm = parse_structure(self.structure)
        if kind == "combined":  # one canonical spelling, also in JSON: "layers,neurons"
            self.structure = ",".join(structure_parts(self.structure))
        # what the messages name: the user's combination ("heads,hidden"), not the internal kind "combined"
        named = self.structure if kind == "combined" else kind
        self._check_structured(kind)
        if kind == "N:M":
            implied = 1.0 - nm[0] / nm[1]
            if self.sparsity is not None and (
                not isinstance(self.sparsity, (int, float)) or abs(float(self.sparsity) - implied) > 1e-9
            ):
                raise ValueError(f"structure {self.structure!r} implies sparsity {implied}; got sparsity={self.sparsity!r}")
            self.sparsity = implied
        elif self.sparsity is None and self.target_params is None:
            self.sparsity = 0.5
        if isinstance(self.sparsity, dict):
            if not self.sparsity:
                raise ValueError("sparsity dict must map at least one module regex to a float")
            if kind != "unstructured":
                raise ValueError(f"per-module sparsity (a dict) is supported for unstructured pruning, not {named!r}")
            self.sparsity = {check_regex("sparsity key", str(k)): check_sparsity(f"sparsity[{k!r}]", v)
                             for k, v in self.sparsity.items()}
        elif self.sparsity is not None:
            self.sparsity = check_sparsity("sparsity", self.sparsity)
        if self.scope is None and kind != "unstructured":
            self.scope = "layer"
        if self.scope is not None and self.scope not in PRUNE_SCOPES:
            raise ValueError(f"scope must be one of {PRUNE_SCOPES}; got {self.scope!r}")
        if self.structures and self.scope != "layer":
            raise ValueError(f"structure {named!r} removes the same number of units in every layer: use scope='layer'")
        self.target_modules = check_modules("target_modules", self.target_modules)
        self.exclude_modules = check_modules("exclude_modules", self.exclude_modules)
        if self.structures and (self.target_modules is not None or self.exclude_modules is not None):
            # Surgery shrinks every layer's MLP / attention as a whole: a selection would be silently ignored.
            raise ValueError(f"structure {named!r} shrinks every decoder layer: target_modules/exclude_modules do not "
                             "apply; leave them unset (or use unstructured/N:M pruning to prune part of the model)")
        if kind == "experts":
            self._check_experts()
        if self.allocation not in PRUNE_ALLOCATIONS:
            raise ValueError(f"allocation must be one of {PRUNE_ALLOCATIONS}; got {self.allocation!r}")
        if self.allocation == "owl" and (kind != "unstructured" or isinstance(self.sparsity, dict)
                                         or self.scope == "global"):
            raise ValueError("allocation='owl' sets one sparsity per decoder layer: use it with a float sparsity, "
                             "unstructured pruning and scope 'row' or 'layer'")
        if isinstance(self.owl_m, bool) or not isinstance(self.owl_m, (int, float)) or self.owl_m <= 0:
            raise ValueError(f"owl_m must be a positive number; got {self.owl_m!r}")
        if isinstance(self.owl_lambda, bool) or not isinstance(self.owl_lambda, (int, float)) or not (
                0 <= self.owl_lambda < 1):
            raise ValueError(f"owl_lambda must be a float in [0, 1); got {self.owl_lambda!r}")
        if self.reconstruct is not None and not isinstance(self.reconstruct, bool):
            raise ValueError(f"reconstruct must be None, True or False; got {self.reconstruct!r}")
        if isinstance(self.dampening, bool) or not isinstance(self.dampening, (int, float)) or self.dampening < 0:
            raise ValueError(f"dampening must be a number >= 0; got {self.dampening!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int; got {self.block_size!r}")
        if nm is not None and self.block_size % nm[1]:
            # The OBS sweep picks each group of M inputs inside one block of columns: M must divide the block.
            fit = self.block_size // nm[1] * nm[1] or nm[1]
            raise ValueError(f"structure {self.structure!r}: M={nm[1]} must divide block_size={self.block_size} (the "
                             f"OBS sweep keeps each group of M inputs in one block); pass block_size={fit} or a "
                             f"pattern whose M divides {self.block_size}")
        if not isinstance(self.allow_collapse, bool):
            raise ValueError(f"allow_collapse must be a bool; got {self.allow_collapse!r}")
        self._check_cross(kind, named)
        self._check_round_to()

    def _check_round_to(self) -> None:
        if self.round_to is None:
            return
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be None or an int >= 1 (the multiple every kept width is rounded to); "
                             f"got {self.round_to!r}")
        if not set(self.structures) & set(WIDTH_AXES):
            raise ValueError(f"round_to rounds the widths a structured prune cuts ({', '.join(WIDTH_AXES)}); "
                             f"structure {self.structure!r} cuts none (KV groups, layers and experts are counts; "
                             "unstructured and N:M keep every shape): leave round_to None")

    def _check_cross(self, kind: str, named: str) -> None:
        if self.cross_alpha is None:
            return
        if isinstance(self.cross_alpha, bool) or not isinstance(self.cross_alpha, (int, float)) \
                or not 0.0 <= self.cross_alpha <= 1.0:
            raise ValueError(f"cross_alpha must be None or a float in [0, 1] (GPTAQ / QEP use 0.25 to 0.5); got "
                             f"{self.cross_alpha!r}")
        if kind not in ("unstructured", "N:M"):
            raise ValueError(f"cross_alpha corrects the OBS sweep of unstructured and N:M pruning; structure {named!r} "
                             "does not read the cross term (its compensate='refit' is symmetric): leave cross_alpha None")
        if self.reconstruct is False:
            raise ValueError("cross_alpha corrects the OBS sweep, which reconstruct=False turns off: leave reconstruct "
                             "None (or True), or leave cross_alpha None")
        self.cross_alpha = float(self.cross_alpha)

    def _check_structured(self, kind: str) -> None:
        structured = kind in STRUCTURED_KINDS or kind == "combined"
        if self.target_params is not None:
            t = self.target_params
            if not structured:
                raise ValueError(f"target_params is a budget for structured pruning ({', '.join(STRUCTURED_KINDS)} "
                                 f"or a combination); got structure {self.structure!r}, which takes a sparsity")
            if self.sparsity is not None:
                raise ValueError("give either sparsity (a fraction of the units) or target_params (the parameters "
                                 "to keep), not both")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or (isinstance(t, float) and not 0 < t < 1) \
                    or (isinstance(t, int) and t < 1):
                raise ValueError(f"target_params must be an int >= 1 (parameters to keep) or a float in (0, 1) (the "
                                 f"fraction of the model's parameters to keep); got {t!r}")
        if kind == "combined" and self.target_params is None and self.sparsity is None:
            raise ValueError(f"structure {self.structure!r} combines several axes: give target_params (the budget "
                             "is split between them), or a sparsity applied to each")
        if self.unit_statistic not in UNIT_STATISTICS:
            raise ValueError(f"unit_statistic must be one of {UNIT_STATISTICS}; got {self.unit_statistic!r}")
        parts = self.compensate.split(",") if isinstance(self.compensate, str) else self.compensate
        if isinstance(parts, (list, tuple)) and sorted(str(p).strip() for p in parts) == ["mean", "refit"]:
            self.compensate = "refit,mean"  # one spelling (in JSON and sparsity.json too), as structures combine
        if self.compensate not in COMPENSATIONS:
            raise ValueError(f"compensate must be one of {COMPENSATIONS}; got {self.compensate!r}")
        if self.compensate is not None and not structured:
            raise ValueError("compensate applies to structured pruning; unstructured pruning compensates with "
                             "reconstruct=True (OBS)")

    @property
    def structures(self) -> tuple[str, ...]:
        """`tuple[str, ...]`: the structured axes (`("layers", "neurons")`), empty for unstructured / N:M."""
        return structure_parts(self.structure) or ()

    @property
    def shrinks(self) -> bool:
        """`bool`: whether this structure physically shrinks the model (structured axes, or whole experts) rather
        than zeroing weights in place."""
        return bool(self.structures) or self.kind == "experts"

    def resolve_scope(self, criterion: str | None) -> str:
        """
        The scope pruning uses: `scope` when set, else the `default_scope` of `criterion`'s scorer.

        Args:
            criterion (`str`, *optional*):
                The importance's criterion; `None` (unknown) resolves to `"layer"`.

        Returns:
            `str`: `"global"`, `"layer"` or `"row"`.
        """
        if self.scope is not None:
            return self.scope
        from .scorers import default_scope  # lazily, as in ImportanceConfig: the registry imports torch

        return default_scope(criterion)

    def _check_experts(self) -> None:
        # A config holds one expert count, so every MoE layer loses the same number (what stock transformers loads).
        if self.scope != "layer":
            raise ValueError("structure 'experts' removes the same number of experts from every MoE layer: use "
                             "scope='layer'")
        if self.target_modules is not None or self.exclude_modules is not None:
            raise ValueError("structure 'experts' removes whole experts from every MoE layer: target_modules/"
                             "exclude_modules do not apply; leave them unset")

    @property
    def kind(self) -> str:
        """`str`: `"unstructured"`, `"N:M"`, `"neurons"`, `"heads"` or `"experts"`."""
        return parse_structure(self.structure)[0]

    @property
    def nm(self) -> tuple[int, int] | None:
        """`tuple[int, int]` or `None`: `(n, m)` of an N:M structure, else `None`."""
        return parse_structure(self.structure)[1]
