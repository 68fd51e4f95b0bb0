"""Mixture-of-experts blocks: where they are, and each expert's slice of the fused parameters as a weight of its own.

In transformers 5 the experts of an MoE layer are not `nn.Linear` modules but fused 3-D parameters of one experts
module (`mlp.experts.gate_up_proj` `[E, 2I, H]`, `mlp.experts.down_proj` `[E, H, I]`), called as
`experts(hidden_states, top_k_index, top_k_weights)` next to a router module (`mlp.gate` or `mlp.router`) whose
`weight` is `[E, H]`. This module finds such blocks in any model by that shape, not by class name (Mixtral,
Qwen2/3-MoE, OLMoE, gpt-oss and others share it), and names every expert's slice like the `nn.Linear` weight it
stands for:

    model.layers.0.mlp.experts.3.gate_proj.weight   rows [0, I) of gate_up_proj[3]   (interleaved layouts: even rows)
    model.layers.0.mlp.experts.3.up_proj.weight     rows [I, 2I) of gate_up_proj[3]  (interleaved layouts: odd rows)
    model.layers.0.mlp.experts.3.down_proj.weight   down_proj[3]

so the peft-style rules users already write for dense MLPs (`target_modules=["gate_proj", "up_proj", "down_proj"]`,
or a regex) select experts too, and the gate and up halves are pruned, scored and shrunk like the dense `gate_proj`
and `up_proj` (a gated neuron is row j of both and column j of `down_proj`). A slice is always `[out, in]` like an
`nn.Linear` weight, whatever the storage (`is_transposed` layouts such as gpt-oss store `[E, in, out]`), and always a
view of the fused tensor: masks applied to it write into the parameter, and the same view of `param.grad` is the
slice's gradient.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .matching import TrackedWeight, canonical_name, find_tracked_weights, module_matches

__all__ = ["ExpertLayout", "ExpertSlice", "MoeBlock", "find_expert_slices", "find_moe_blocks", "find_weights",
           "experts_stored_fused", "slice_expert", "stored_slice_name", "EXPERT_COUNT_KEYS"]

# Config keys that hold the number of routed experts per MoE layer (Mixtral / OLMoE / gpt-oss, Qwen-MoE, DeepSeek).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_topk")
# Checkpoint files of Mixtral (and models converted like it) keep the original per-expert names, which transformers
# renames and fuses on load: `<layer>.block_sparse_moe.experts.<e>.w1|w3|w2.weight` for gate / up / down.
_SLICE_NAME = re.compile(r"(.*)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_LEGACY_PROJ = {"gate": "w1", "up": "w3", "down": "w2"}
_ANY_SLICE = re.compile(r"(.*\.experts\.\d+)\.(?:gate|up|down)_proj\.weight")


@dataclass(frozen=True)
class ExpertLayout:
    """How an experts module stores its fused weights (transformers' `use_experts_implementation` flags).

    Args:
        transposed (`bool`): `[E, in, out]` storage (`x @ W`) instead of `[E, out, in]` (`F.linear`).
        concatenated (`bool`): `gate_up_proj` holds `[gate; up]`; otherwise gate and up rows alternate.
        has_gate (`bool`): a gated MLP (`gate_up_proj`); otherwise only `up_proj` and `down_proj`.
    """

    transposed: bool = False
    concatenated: bool = True
    has_gate: bool = True


@dataclass(frozen=True, eq=False)
class ExpertSlice:
    """One expert's projection inside a fused parameter, tracked like an `nn.Linear` weight.

    `name` is `<experts module>.<expert>.<proj>.weight` (canonical), `module_name` the same without `.weight`,
    `param_name` the canonical name of the fused parameter, `proj` one of `gate_proj`, `up_proj`, `down_proj`.
    """

    name: str
    module_name: str
    param_name: str
    param: nn.Parameter
    expert: int
    proj: str
    layout: ExpertLayout

    def view(self, full: Tensor) -> Tensor:
        """
        This slice of a tensor shaped like the fused parameter (the parameter, its gradient, a mask, a score).

        Args:
            full (`torch.Tensor`): shaped like `param`, `[E, out, in]` (or `[E, in, out]` when transposed).

        Returns:
            `torch.Tensor`: a view (no copy), `[out, in]`; writes into it write into `full`.

        Raises:
            `ValueError`: if `full` is not shaped like the fused parameter.
        """
        if tuple(full.shape) != tuple(self.param.shape):
            raise ValueError(f"{self.name}: expected a tensor shaped {tuple(self.param.shape)}, got {tuple(full.shape)}")
        t = full[self.expert]
        if self.proj != "down_proj" and self.layout.has_gate:
            half = t.shape[-1 if self.layout.transposed else 0] // 2
            first = self.proj == "gate_proj"
            if self.layout.concatenated:
                rows = slice(0, half) if first else slice(half, 2 * half)
            else:
                rows = slice(0, None, 2) if first else slice(1, None, 2)
            t = t[:, rows] if self.layout.transposed else t[rows]
        return t.T if self.layout.transposed else t

    def weight(self) -> Tensor:
        """The slice of the parameter's data, `[out, in]`: a view without autograd history (in-place edits reach the
        model, as `apply_mask_` does to a Linear's weight)."""
        return self.view(self.param.detach())

    def grad(self) -> Tensor | None:
        """The slice of the parameter's gradient, `[out, in]` (a view), or `None` when it has none."""
        return None if self.param.grad is None else self.view(self.param.grad)

    @property
    def shape(self) -> torch.Size:
        """`[out_features, in_features]` of this expert projection."""
        return self.weight().shape


@dataclass(frozen=True, eq=False)
class MoeBlock:
    """One MoE layer: its router and its fused experts module.

    `name` is the canonical name of the block holding both (e.g. `model.layers.0.mlp`), `experts_name` and
    `router_name` those of the two modules. `router_params` are the router's per-expert tensors by attribute name
    (`weight`, and `bias` / `e_score_correction_bias` where the architecture has them).
    """

    name: str
    experts_name: str
    experts: nn.Module
    router_name: str
    router: nn.Module
    num_experts: int
    top_k: int
    layout: ExpertLayout

    @property
    def fused_params(self) -> dict[str, nn.Parameter]:
        """The experts module's own parameters by attribute name; every one is indexed by expert on dim 0."""
        return dict(self.experts.named_parameters(recurse=False))

    def slices(self) -> list[ExpertSlice]:
        """Every expert's projections, expert by expert (`gate_proj`, `up_proj`, `down_proj` for a gated MLP)."""
        fused = self.fused_params
        projs = (("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj")) if self.layout.has_gate else (
            ("up_proj", "up_proj"),)
        projs += (("down_proj", "down_proj"),)
        out = []
        for e in range(self.num_experts):
            for proj, attr in projs:
                module_name = f"{self.experts_name}.{e}.{proj}"
                out.append(ExpertSlice(f"{module_name}.weight", module_name, f"{self.experts_name}.{attr}",
                                       fused[attr], e, proj, self.layout))
        return out


def _fused_experts(module: nn.Module) -> tuple[int, ExpertLayout] | None:
    """`(E, layout)` of a module holding fused 3-D expert weights (`down_proj` and `gate_up_proj` or `up_proj`)."""
    params = dict(module.named_parameters(recurse=False))
    down = params.get("down_proj")
    gate_up = params.get("gate_up_proj")
    up = gate_up if gate_up is not None else params.get("up_proj")
    if down is None or up is None or down.dim() != 3 or up.dim() != 3 or down.shape[0] != up.shape[0]:
        return None
    has_gate = gate_up is not None
    transposed = getattr(module, "is_transposed", None)
    if transposed is None:
        # [E, out, in] storage: the up projection's input width is down_proj's output width (H)
        transposed = up.shape[2] != down.shape[1] and up.shape[1] == down.shape[2]
    layout = ExpertLayout(bool(transposed), bool(getattr(module, "is_concatenated", True)), has_gate)
    return int(down.shape[0]), layout


def _hidden_size(experts: nn.Module, layout: ExpertLayout) -> int:
    down = experts.down_proj
    return int(down.shape[2] if layout.transposed else down.shape[1])


def _router_of(parent: nn.Module, experts_child: str, num_experts: int, hidden: int) -> tuple[str, nn.Module] | None:
    """The sibling of the experts module (`parent`'s child `experts_child`, the module or its peft wrapper) whose own
    `weight` is `[E, H]`: the router (`gate` or `router`)."""
    found = []
    for child_name, child in parent.named_children():
        w = getattr(child, "weight", None)
        if child_name != experts_child and isinstance(w, Tensor) and tuple(w.shape) == (num_experts, hidden):
            found.append((child_name, child))
    if len(found) == 1:
        return found[0]
    preferred = [f for f in found if f[0] in ("gate", "router")]
    return preferred[0] if len(preferred) == 1 else None


def _top_k(router: nn.Module, block: nn.Module, config) -> int | None:
    for owner in (router, block):
        k = getattr(owner, "top_k", None)
        if isinstance(k, int):
            return k
    for key in _TOP_K_KEYS:
        k = getattr(config, key, None)
        if isinstance(k, int):
            return k
    return None


def find_moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """
    The MoE layers of `model`, in module order: every module with fused 3-D expert weights and its router.

    Found by shape, not class: an experts module holds 3-D `down_proj` and `gate_up_proj` (or `up_proj`) parameters
    with the expert on dim 0; its router is the sibling module whose `weight` is `[E, hidden]`. Storage flags set by
    transformers' `use_experts_implementation` (`is_transposed`, `is_concatenated`) are read when present.

    Args:
        model (`nn.Module`): the model, possibly wrapped (DDP, `torch.compile`, peft); names are canonical.

    Returns:
        `list[MoeBlock]`: empty for a dense model.

    Raises:
        `ValueError`: one line naming an experts module with no router beside it or no top-k, which this package
        cannot track or remove experts from (refused rather than skipped in silence).
    """
    config = getattr(model, "config", None)
    modules = dict(model.named_modules())
    blocks: list[MoeBlock] = []
    for raw_name, module in modules.items():
        found = _fused_experts(module)
        if found is None or "." not in raw_name:
            continue
        num_experts, layout = found
        parent_raw, _, child = raw_name.rpartition(".")
        # peft's `LoraConfig(target_parameters=[...])` wraps the experts module in one `ParamWrapper` per targeted
        # parameter (`experts.base_layer.base_layer`): the router is a sibling of the outermost wrapper
        while child == "base_layer" and "." in parent_raw:
            parent_raw, _, child = parent_raw.rpartition(".")
        parent = modules[parent_raw]
        experts_name, block_name = canonical_name(raw_name), canonical_name(parent_raw)
        router = _router_of(parent, child, num_experts, _hidden_size(module, layout))
        if router is None:
            raise ValueError(f"{experts_name}: fused expert weights without a router module beside them (a child of "
                             f"{block_name} with a [{num_experts}, hidden] weight); this MoE layout is not supported")
        top_k = _top_k(router[1], parent, config)
        if top_k is None:
            raise ValueError(f"{experts_name}: no top-k found (router.top_k or config.num_experts_per_tok)")
        blocks.append(MoeBlock(block_name, experts_name, module, f"{block_name}.{router[0]}", router[1], num_experts,
                               top_k, layout))
    return blocks


def find_expert_slices(
    model: nn.Module,
    target_modules: str | list[str] | tuple[str, ...] | None = "all-linear",
    exclude_modules: str | list[str] | tuple[str, ...] | None = None,
    blocks: list[MoeBlock] | None = None,
) -> list[ExpertSlice]:
    """
    The expert slices selected by peft-style rules, in module order (the counterpart of `find_tracked_weights`).

    A slice's module name is `<experts>.<e>.<proj>` (e.g. `model.layers.0.mlp.experts.3.down_proj`). peft's rules
    apply to it, and also to the experts module's own name, so `["down_proj"]`, `["experts.3.down_proj"]`,
    `r".*\\.experts\\.\\d+\\.(gate|up)_proj"` select slices and `exclude_modules=["experts"]` drops every expert.
    `"all-linear"` (or `None`) selects every slice: each is a linear map, and they hold most of an MoE's weights.
    Routers are not selected (tiny, and pruning them changes which experts run, not what they compute).

    Args:
        model (`nn.Module`): the model, possibly wrapped.
        target_modules (`str` or `list[str]`, *optional*, defaults to `"all-linear"`): peft's rules.
        exclude_modules (`str` or `list[str]`, *optional*): same rules; matching slices are dropped.
        blocks (`list[MoeBlock]`, *optional*): `find_moe_blocks(model)` when already known.

    Returns:
        `list[ExpertSlice]`: empty for a dense model or when nothing matches (the caller decides whether that is an
        error: the Linears may be matched instead).

    Raises:
        `ValueError`: as `find_moe_blocks`.
    """
    def hit(s: ExpertSlice, experts_name: str, pattern) -> bool:
        return module_matches(s.module_name, pattern) or module_matches(experts_name, pattern)

    out = []
    for block in find_moe_blocks(model) if blocks is None else blocks:
        for s in block.slices():
            selected = target_modules in (None, "all-linear") or hit(s, block.experts_name, target_modules)
            if selected and not hit(s, block.experts_name, exclude_modules):
                out.append(s)
    return out


def find_weights(
    model: nn.Module,
    target_modules: str | list[str] | tuple[str, ...] | None = "all-linear",
    exclude_modules: str | list[str] | tuple[str, ...] | None = None,
) -> list[TrackedWeight | ExpertSlice]:
    """
    Every weight the package tracks and prunes: the selected `nn.Linear` weights and expert slices, in module order.

    Both kinds answer `name`, `module_name`, `param` (the parameter holding the data: for a slice, the fused one),
    `weight()` (`[out, in]`, no autograd history, in-place edits reach the model) and `grad()`; only a
    `TrackedWeight` has a `module` to hook (an expert's inputs come from `collect.router.RouterCollector`).

    Args:
        model (`nn.Module`): the model, possibly wrapped (DDP, `torch.compile`, peft).
        target_modules (`str` or `list[str]`, *optional*, defaults to `"all-linear"`): peft's rules.
        exclude_modules (`str` or `list[str]`, *optional*): same rules; matching modules are dropped.

    Returns:
        `list[TrackedWeight | ExpertSlice]`: Linears and slices, ordered as their modules are in `model`.

    Raises:
        `ValueError`: if nothing matches (neither a Linear nor an expert slice), or as `find_moe_blocks`.
    """
    linear = find_tracked_weights(model, target_modules, exclude_modules, required=False)
    slices = find_expert_slices(model, target_modules, exclude_modules)
    if not slices:
        return linear if linear else find_tracked_weights(model, target_modules, exclude_modules)  # its error
    order = {canonical_name(n): i for i, (n, _) in enumerate(model.named_modules())}

    def position(w: TrackedWeight | ExpertSlice) -> int:
        # a slice sits where its experts module is; sorted() is stable, so slices keep their expert-by-expert order
        module = w.param_name.rsplit(".", 1)[0] if isinstance(w, ExpertSlice) else w.module_name
        return order.get(module, 0)

    return sorted([*linear, *slices], key=position)


def slice_expert(name: str) -> str | None:
    """
    The expert an expert slice belongs to, from its name alone (no model needed: works on an importance's names).

    Args:
        name (`str`): canonical weight name, e.g. `model.layers.0.mlp.experts.3.up_proj.weight`.

    Returns:
        `str | None`: `<experts module>.<expert>` (`model.layers.0.mlp.experts.3`), or `None` for a weight that is not
        an expert slice.
    """
    m = _ANY_SLICE.fullmatch(name)
    return m[1] if m else None


def stored_slice_name(name: str, stored: Container[str]) -> str | None:
    """
    The name under which a checkpoint file stores a weight the package tracks, when it stores it as a tensor of its
    own: the name itself (Linears; expert slices of Qwen2/3-MoE and OLMoE files, `mlp.experts.3.up_proj.weight`), or
    Mixtral's original per-expert name (`block_sparse_moe.experts.3.w3.weight`).

    Args:
        name (`str`): canonical weight or expert slice name.
        stored (`Container[str]`): the tensor names of the checkpoint (its weight map).

    Returns:
        `str | None`: the stored name, or `None` when the file holds no such tensor (a slice stored inside a fused
        tensor, as gpt-oss files do; or another model's file).
    """
    if name in stored:
        return name
    m = _SLICE_NAME.fullmatch(name)
    if m:
        legacy = f"{m[1]}.block_sparse_moe.experts.{m[2]}.{_LEGACY_PROJ[m[3]]}.weight"
        if legacy in stored:
            return legacy
    return None


def experts_stored_fused(names: Iterable[str], stored: Container[str]) -> bool:
    """
    Whether a checkpoint stores some of these expert slices inside fused tensors (gpt-oss's `experts.gate_up_proj`),
    rather than each expert's projections as tensors of their own (Mixtral, Qwen2/3-MoE, OLMoE): such a file cannot be
    pruned file to file (`prune_checkpoint` refuses it), only in memory.

    Args:
        names (`Iterable[str]`): canonical tracked weight names (an importance's `names`).
        stored (`Container[str]`): the tensor names of the checkpoint (its weight map).

    Returns:
        `bool`: `True` when some expert slice among `names` has no tensor of its own in `stored`.
    """
    return any(slice_expert(n) is not None and stored_slice_name(n, stored) is None for n in names)
