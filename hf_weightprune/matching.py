"""Which weights are tracked: peft's `target_modules` / `exclude_modules` rules, on canonical names.

Rules (copied from peft so its users need not learn new ones):
- a `str` is a regular expression that must *fullmatch* the module name;
- a `list` matches a module whose name equals an entry or ends with `"." + entry`;
- `"all-linear"` selects every `nn.Linear` except the output embedding (`lm_head`).
Names are canonical: wrapper prefixes from DDP, FSDP, `torch.compile` and peft are removed, so the
same names apply to the merged base model and to files written under any wrapper.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn

# Path segments that wrappers insert; removing them gives the base model's own names.
_WRAPPER_SEGMENTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "base_layer"}
_PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """
    The base model's own name of a module or parameter, whatever wraps it.

    Args:
        name (`str`):
            A name from `named_modules()` / `named_parameters()` of a possibly wrapped model.

    Returns:
        `str`: `name` without DDP's `module.`, peft's `base_model.model.`, and FSDP / compile / checkpoint / LoRA
        wrapper segments; peft's `modules_to_save.<adapter>` copy gets the name it has after `merge_and_unload`.
    """
    while name.startswith("module."):
        name = name[len("module.") :]
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    if "modules_to_save" in parts:  # peft's trained copy `X.modules_to_save.<adapter>` becomes `X` when merged
        i = parts.index("modules_to_save")
        parts = parts[:i] + parts[i + 2 :]
    name = ".".join(parts)
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name


def _is_adapter_module(name: str) -> bool:
    # peft's own layers (lora_A, lora_B, lora_dropout, lora_embedding_*) are not base weights; of a `modules_to_save`
    # module, the frozen `original_module` neither runs nor survives the merge: its trained copy is tracked instead
    # (huggingface/peft#322, #3114), and only the active adapter's copy.
    parts = name.split(".")
    return any(p.startswith("lora_") or p == "original_module" for p in parts)


def _inactive_copy(model: nn.Module, raw_name: str) -> bool:
    """A `modules_to_save` copy of an adapter that is not the active one (it does not run)."""
    parts = raw_name.split(".")
    if "modules_to_save" not in parts or parts.index("modules_to_save") + 1 >= len(parts):
        return False
    i = parts.index("modules_to_save")
    active = getattr(model.get_submodule(".".join(parts[:i])), "active_adapter", None)
    active = [active] if isinstance(active, str) else list(active or [])
    return bool(active) and parts[i + 1] not in active


def module_matches(name: str, pattern: str | list[str] | tuple[str, ...] | None) -> bool:
    """
    peft's matching rule for one module name.

    Args:
        name (`str`):
            Canonical module name.
        pattern (`str`, `list[str]` or `tuple[str, ...]`, *optional*):
            A regex that must fullmatch `name`, or names / `.`-suffixes; `None` matches nothing.

    Returns:
        `bool`: whether `name` matches.

    Raises:
        `re.error`: for an invalid regex.
    """
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def select_names(
    names: Iterable[str],
    target_modules: str | list[str] | tuple[str, ...] | None,
    exclude_modules: str | list[str] | tuple[str, ...] | None,
) -> list[str]:
    """
    Select the parameter names to prune among tracked ones, with peft's rules applied to their module part.

    Args:
        names (`Iterable[str]`):
            Canonical parameter names `<module>.weight`, e.g. `Importance.names`.
        target_modules (`str` or `list[str]`, *optional*):
            A regex that must fullmatch the module name, or a list of names / name suffixes; `None` selects all.
        exclude_modules (`str` or `list[str]`, *optional*):
            Same rules; matching modules are dropped (checked even when `target_modules` selects them).

    Returns:
        `list[str]`: the selected names, in the order of `names`.

    Raises:
        `ValueError`: when nothing is selected.
    """
    names = list(names)
    selected = [
        n
        for n in names
        if (target_modules is None or module_matches(_module_of(n), target_modules))
        and not module_matches(_module_of(n), exclude_modules)
    ]
    if not selected:
        raise ValueError(
            f"No tracked weight is selected for pruning (target_modules={target_modules!r}, exclude_modules="
            f"{exclude_modules!r}, {len(names)} tracked weights): check PruneConfig target/exclude_modules"
        )
    return selected


def check_sparsity_keys(sparsity: float | dict[str, float], names: Iterable[str]) -> None:
    """
    Refuse, before any work, a per-module sparsity whose key matches none of the weights to prune (a typo would
    otherwise leave the model dense and call it pruned).

    Args:
        sparsity (`float` or `dict[str, float]`):
            `PruneConfig.sparsity`; a float is always fine.
        names (`Iterable[str]`):
            The canonical names of the weights selected for pruning (`<module>.weight`).

    Raises:
        `ValueError`: one line naming the key, how many weights were searched and one module name to copy from.
    """
    if not isinstance(sparsity, dict):
        return
    modules = [_module_of(n) for n in names]
    for key in sparsity:
        if not any(re.fullmatch(key, m) for m in modules):
            example = modules[0] if modules else "model.layers.0.mlp.down_proj"
            raise ValueError(f"sparsity key {key!r} matches none of the {len(modules)} weights to prune (a regex that "
                             f"must fullmatch a module name such as {example!r}); fix the key, e.g. '.*mlp.*'")


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class TrackedWeight:
    """One tracked weight: `name` is the canonical parameter name (`<module>.weight`)."""

    name: str
    module_name: str
    module: nn.Module
    param: nn.Parameter

    def weight(self) -> Tensor:
        """The weight's data, `[out, in]`, without autograd history (the same contract as `moe.ExpertSlice.weight`)."""
        return self.param.detach()

    def grad(self) -> Tensor | None:
        """The weight's gradient, or `None` when it has none."""
        return self.param.grad


def _output_embedding_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None:
        return {"lm_head"}
    return {canonical_name(n) for n, m in model.named_modules() if m is out} | {"lm_head"}


def find_tracked_weights(
    model: nn.Module,
    target_modules: str | list[str] | None = "all-linear",
    exclude_modules: str | list[str] | None = None,
    *,
    required: bool = True,
) -> list[TrackedWeight]:
    """
    The tracked `nn.Linear` weights of `model` in module order, each parameter once (tied weights: the first name
    wins). peft's own adapter layers are never tracked.

    Args:
        model (`nn.Module`):
            The model, possibly wrapped (DDP, FSDP, `torch.compile`, peft).
        target_modules (`str` or `list[str]`, *optional*, defaults to `"all-linear"`):
            peft's rules; `"all-linear"` (or `None`) is every `nn.Linear` except the output embedding.
        exclude_modules (`str` or `list[str]`, *optional*):
            Same rules; matching modules are dropped.
        required (`bool`, *optional*, defaults to `True`):
            Raise when nothing matches (`False`: the caller also looks at expert slices, `moe.find_weights`).

    Returns:
        `list[TrackedWeight]`: canonical `<module>.weight` name, module name, module and parameter of each.

    Raises:
        `ValueError`: if nothing matches and `required`.
    """
    out_names = _output_embedding_names(model)
    seen: set[int] = set()
    tracked: list[TrackedWeight] = []
    for raw_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or _is_adapter_module(raw_name) or _inactive_copy(model, raw_name):
            continue
        name = canonical_name(raw_name)
        if target_modules in (None, "all-linear"):
            selected = name not in out_names and not any(name.endswith("." + o) for o in out_names)
        else:
            selected = module_matches(name, target_modules)
        if not selected or module_matches(name, exclude_modules):
            continue
        if id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        tracked.append(TrackedWeight(f"{name}.weight", name, module, module.weight))
    if not tracked and required:
        raise ValueError(
            f"No nn.Linear module matches target_modules={target_modules!r} (exclude_modules={exclude_modules!r}). "
            "A str is a regex that must fullmatch the module name; a list matches exact names or name suffixes."
        )
    return tracked


@dataclass(frozen=True)
class ParamName:
    """
    A parameter name split around its decoder layer, by [`parse_param_name`]: the one parser of the package (OWL's
    layer groups, the logged summary, `inspect --plot`, the model card's module table).

    Attributes:
        stack (`str`): the block container before the layer index (`model.layers`, `transformer.h`), `""` outside.
        index (`int`, *optional*): the layer index, `None` for a parameter outside the repeated blocks (`lm_head`).
        module (`str`): the module path inside the block (`self_attn.q_proj`), or the whole module path outside.
    """

    stack: str
    index: int | None
    module: str

    @property
    def layer(self) -> str | None:
        """`str`: the decoder layer (`model.layers.3`), or `None` outside the repeated blocks."""
        return None if self.index is None else f"{self.stack}.{self.index}"

    @property
    def module_name(self) -> str:
        """`str`: the last module name (`q_proj`), the usual "module type" of a Linear."""
        return self.module.rsplit(".", 1)[-1]


def parse_param_name(name: str) -> ParamName:
    """
    Split a parameter name into its block container, layer index and module path.

    The layer index is the first all-digit path component that has something before and after it, so any block
    container works (`model.layers.N`, `model.decoder.layers.N`, `transformer.h.N`, `encoder.block.N`). A trailing
    `weight` / `bias` is dropped.

    Args:
        name (`str`): e.g. `model.layers.12.self_attn.q_proj.weight`.

    Returns:
        [`ParamName`]: `("model.layers", 12, "self_attn.q_proj")`; `("", None, "lm_head")` for `lm_head.weight`.
    """
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit():
            return ParamName(".".join(parts[:i]), int(parts[i]), ".".join(parts[i + 1 :]))
    return ParamName("", None, ".".join(parts))


def decoder_layer(name: str) -> str | None:
    """The decoder layer a parameter belongs to (`model.layers.3` of `model.layers.3.mlp.up_proj.weight`), or `None`
    for a parameter outside any numbered layer: [`parse_param_name`]`(name).layer`."""
    return parse_param_name(name).layer
