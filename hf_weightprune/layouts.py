"""Which decoder-layer layouts structured pruning understands, read from module names (not class names).

- Llama-style: `self_attn.{q,k,v,o}_proj` (optional biases) and `mlp.{gate,up,down}_proj` (Llama, Mistral, Qwen2, ...);
- Phi-3-style: fused `self_attn.qkv_proj` = [q; k; v] rows and `self_attn.o_proj`, fused `mlp.gate_up_proj` =
  [gate; up] rows and `mlp.down_proj`.

A leaf: the unit statistics gathered while training (`collect/units.py`), the unit scores and the surgery
(`prune/`) must agree on the layout, so they read it here.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

__all__ = ["ATTN_LAYOUTS", "IN_LAYER_STRUCTURES", "MLP_LAYOUTS", "attention_sizes", "attn_geometry", "block_layout",
           "check_structured_supported", "config_head_dim", "decoder_layers", "detect_layout", "model_configs"]

# The structures whose units sit inside every decoder layer's modules, the ones whose layout this module checks
# ([`check_structured_supported`]). Hidden channels and whole layers are checked where they are removed:
# `prune/hidden.py` (`shrink_hidden_`) and `prune/depth.py` (`remove_layers_`).
IN_LAYER_STRUCTURES = ("neurons", "heads")

_SUPPORTED_LAYOUTS = (
    "Llama-style decoder layers (self_attn.q_proj/k_proj/v_proj/o_proj and mlp.gate_proj/up_proj/down_proj, "
    "e.g. Llama, Mistral, Qwen2) and Phi-3-style layers (self_attn.qkv_proj/o_proj and mlp.gate_up_proj/down_proj)"
)
ATTN_LAYOUTS = {"split": ("q_proj", "k_proj", "v_proj", "o_proj"), "fused": ("qkv_proj", "o_proj")}
MLP_LAYOUTS = {"split": ("gate_proj", "up_proj", "down_proj"), "fused": ("gate_up_proj", "down_proj")}


def config_head_dim(config: PretrainedConfig) -> int | None:
    """The head size a config states (`head_dim`, e.g. Gemma's, not always `hidden_size // num_attention_heads`), or
    derives as Llama-style configs without one do; `None` for a config without attention sizes."""
    d = getattr(config, "head_dim", None)
    if isinstance(d, int) and d > 0:
        return d
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None


def attention_sizes(config: PretrainedConfig) -> dict[str, int | None]:
    """`num_attention_heads`, `num_key_value_heads` and `head_dim` as the config states them or derives them (no
    `num_key_value_heads`: one per query head; no `head_dim`: [`config_head_dim`]). What a structured prune's record
    states of the attention (`structured["config"]`), so that `Importance.select` can tell the KV-group counts of two
    models a heads prune left with the same query/KV ratio apart (`collect.selection.shape_sizes`)."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None)
    return {"num_attention_heads": heads, "num_key_value_heads": kv if kv is not None else heads,
            "head_dim": config_head_dim(config)}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = None
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):  # transformers' own lookup (CausalLM -> base model, multimodal -> language model)
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, ValueError):  # models without a rule of their own
            decoder = None
        layers = getattr(decoder, "layers", None) if isinstance(decoder, nn.Module) else None
    if layers is None:  # plain nn.Module wrappers: `model.model.layers`, then `model.layers`
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None) if isinstance(base, nn.Module) else None
    if layers is None:
        layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"Structured pruning cannot find decoder layers (`model.get_decoder().layers`) in {type(model).__name__}. "
            f"Supported: {_SUPPORTED_LAYOUTS}."
        )
    return layers


def block_layout(block: nn.Module | None, layouts: dict[str, tuple[str, ...]]) -> str | None:
    """The key of `layouts` whose module names `block` has all of (`"split"` / `"fused"`), else `None`."""
    if not isinstance(block, nn.Module):
        return None
    for name, parts in layouts.items():
        if all(isinstance(getattr(block, p, None), nn.Module) for p in parts):
            return name
    return None


def detect_layout(model: nn.Module, part: str) -> tuple[nn.ModuleList, str]:
    """Returns the decoder layers and the layout ("split" or "fused") of `part` ("attn" or "mlp") in every layer."""
    layers = decoder_layers(model)
    attr, layouts = ("self_attn", ATTN_LAYOUTS) if part == "attn" else ("mlp", MLP_LAYOUTS)
    found = set()
    for i, layer in enumerate(layers):
        kind = block_layout(getattr(layer, attr, None), layouts)
        if kind is None:
            block = getattr(layer, attr, None)
            children = sorted(n for n, _ in block.named_children()) if isinstance(block, nn.Module) else []
            raise ValueError(
                f"Unsupported architecture {type(model).__name__}: layer {i} `{attr}` has modules {children}. "
                f"Supported: {_SUPPORTED_LAYOUTS}."
            )
        found.add(kind)
        for p in layouts[kind]:
            module = getattr(layer, attr).get_submodule(p)
            # PEFT LoRA layers and quantized linears subclass or wrap nn.Linear; slicing them would be wrong.
            if type(module) is not nn.Linear:
                raise ValueError(
                    f"Layer {i} `{attr}.{p}` is a {type(module).__name__}, not a plain torch.nn.Linear. Merge adapters "
                    "(`merge_and_unload()`) and load the model unquantized before structured pruning."
                )
    if len(found) > 1:
        raise ValueError(f"Layers of {type(model).__name__} mix {attr} layouts {sorted(found)}; not supported.")
    return layers, found.pop()


def attn_geometry(model: nn.Module, attn: nn.Module, kind: str) -> tuple[int, int, int]:
    """Returns (num_heads, num_kv_heads, head_dim) read from the module shapes, checked for consistency."""
    d = getattr(attn, "head_dim", None) or config_head_dim(model.config)
    o_in = attn.o_proj.in_features
    if kind == "split":
        q_out, kv_out = attn.q_proj.out_features, attn.k_proj.out_features
        ok = attn.v_proj.out_features == kv_out
    else:
        q_out = o_in
        kv2 = attn.qkv_proj.out_features - q_out
        kv_out, ok = kv2 // 2, kv2 > 0 and kv2 % 2 == 0
    n_heads, n_kv = q_out // d, kv_out // d
    if not ok or q_out != o_in or q_out % d or kv_out % d or n_kv == 0 or n_heads % n_kv:
        raise ValueError(
            f"Attention projections of {type(attn).__name__} do not match head_dim={d} with grouped heads "
            f"(q out {q_out}, k/v out {kv_out}, o in {o_in})."
        )
    return n_heads, n_kv, d


def model_configs(model: nn.Module) -> list[PretrainedConfig]:
    # Submodules usually share `model.config`, but not always (e.g. after deep copies); update every distinct one.
    seen = {id(model.config): model.config}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, PretrainedConfig):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def check_structured_supported(model: nn.Module, structure: str) -> None:
    """
    Checks that `model`'s decoder layers can lose units of `structure`, one of the in-layer structures
    ([`IN_LAYER_STRUCTURES`]: MLP neurons and attention KV groups), raising a `ValueError` that says why not.
    `"hidden"` and `"layers"` are not checked here: `prune/hidden.py` and `prune/depth.py` check them as they remove
    hidden channels and decoder layers.

    Args:
        model (`PreTrainedModel`): A Llama-style or Phi-3-style causal LM (see module docstring).
        structure (`str`): `"neurons"` (MLP intermediate neurons) or `"heads"` (attention KV groups).

    Raises:
        `ValueError`: for a structure that is not an in-layer one (`"hidden"`/`"layers"` named as checked elsewhere),
        no decoder layers, an unsupported or mixed layout, non-plain `nn.Linear` projections (LoRA, quantized),
        non-uniform layer sizes, or a single unit per layer.
    """
    if structure in ("hidden", "layers"):
        raise ValueError(f"check_structured_supported checks the in-layer structures {list(IN_LAYER_STRUCTURES)}; "
                         f"{structure!r} is checked by prune/{'hidden' if structure == 'hidden' else 'depth'}.py")
    if structure not in IN_LAYER_STRUCTURES:
        raise ValueError(f"Unknown structure {structure!r}; expected one of {list(IN_LAYER_STRUCTURES)}.")
    if structure == "neurons":
        layers, _ = detect_layout(model, "mlp")
        sizes = {layer.mlp.down_proj.in_features for layer in layers}
        if len(sizes) > 1:
            raise ValueError(f"Layers have different intermediate sizes {sorted(sizes)}; uniform pruning needs one.")
        if sizes.pop() < 2:
            raise ValueError("Nothing to prune: the MLP has a single intermediate neuron.")
    else:
        layers, kind = detect_layout(model, "attn")
        geoms = {attn_geometry(model, layer.self_attn, kind) for layer in layers}
        if len(geoms) > 1:
            raise ValueError(f"Layers have different attention shapes (heads, kv heads, head_dim) {sorted(geoms)}.")
        n_heads, n_kv, _ = geoms.pop()
        if n_kv < 2:
            raise ValueError(
                f"Nothing to prune: each layer has a single KV group (num_key_value_heads=1, {n_heads} query heads). "
                "Heads are pruned as whole KV groups so grouped-query attention stays valid."
            )
