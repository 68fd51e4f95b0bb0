"""Depth pruning: whole decoder layers removed, giving a shallower checkpoint that stock transformers loads as it is.

Layers are chosen from one score per layer, lower = less important; ShortGPT's block influence (Men et al. 2024,
arXiv 2403.03853) is `BI_l = 1 - E[cos(x_l, x_{l+1})]` over the residual stream entering and leaving layer `l`: a layer
that barely turns the hidden state is the cheapest to drop. Removal edits, in place:

- the decoder's `nn.ModuleList` (the same object, so references to it stay valid);
- every per-layer config entry: `num_hidden_layers`, the lists indexed by layer (`layer_types`, which carries Gemma 2/3's
  sliding/full alternation and Qwen2/3's sliding layers, `mlp_layer_types`, `no_rope_layers`), Qwen2/3's
  `max_window_layers` (first sliding layer, renumbered) and `mlp_only_layers` (layer indices, renumbered). Sizes indexed
  by head dimension (rope parameters, Phi-3 longrope factors) are left as they are;
- the `layer_idx` of each kept layer and its attention, renumbered `0..L'-1`, because the KV cache stores one entry per
  position in the `ModuleList` (built from `config.layer_types`) and each attention reads its own by `layer_idx`.

Before any edit the new config is validated and a model of the same class is built from it on the meta device; every
kept layer must come out with the same parameter shapes and the same attention kind (`layer_type`, `sliding_window`,
`is_sliding`, ...) as it has now, so that `from_pretrained` rebuilds exactly the model that was pruned.

Example:

```python
>>> from hf_weightprune.prune.depth import choose_layers, remove_layers_
>>> drop = choose_layers(block_influence, 4)  # a [num_hidden_layers] tensor, lower = less important
>>> kept = remove_layers_(model, drop)
>>> model.save_pretrained("shallower")
```
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..io_utils import plural
from ..layouts import decoder_layers, model_configs
from .surgery import config_error

__all__ = ["choose_layers", "remove_layers_"]

# Config lists with one entry per decoder layer, and config lists of decoder-layer indices.
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers")
LAYER_INDEX_LISTS = ("mlp_only_layers",)
# Attributes that say which kind of attention/MLP a layer was built as; a rebuilt layer must agree on each.
_KIND_ATTRS = ("layer_type", "attention_type", "is_sliding", "sliding_window", "use_rope", "is_causal")


def choose_layers(scores: Tensor, n: int) -> list[int]:
    """
    The `n` decoder layers with the lowest scores (ShortGPT: lowest block influence first).

    Args:
        scores (`torch.Tensor`):
            `[num_hidden_layers]` float score per layer, lower = less important, e.g. block influence
            `1 - cos(input, output)` of the residual stream averaged over real tokens (arXiv 2403.03853).
        n (`int`):
            How many layers to drop, in `[0, num_hidden_layers)`.

    Returns:
        `list[int]`: the sorted layer indices to drop. Ties go to the lower index first, as in every mask builder.

    Raises:
        `ValueError`: a score that is not a 1-D floating tensor free of NaN, or `n` outside `[0, num_hidden_layers)`
        (at least one layer must remain).
    """
    if not isinstance(scores, Tensor) or scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"choose_layers: scores must be a 1-D float tensor [num_hidden_layers], got {scores!r}")
    if torch.isnan(scores).any():
        raise ValueError("choose_layers: scores contain NaN")
    n_layers = scores.numel()
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < n_layers:
        raise ValueError(f"choose_layers: n must be an int in [0, {n_layers}) (one layer must remain), got {n!r}")
    order = torch.argsort(scores.detach().float().cpu(), stable=True)
    return sorted(order[:n].tolist())


def _check_drop(drop: Iterable[int], n_layers: int) -> list[int]:
    drop = list(drop)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in drop):
        raise ValueError(f"remove_layers_: layer indices must be ints, got {drop!r}")
    if len(set(drop)) != len(drop):
        raise ValueError(f"remove_layers_: duplicate layer indices in {drop}")
    bad = [i for i in drop if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"remove_layers_: layer indices {bad} out of range [0, {n_layers})")
    if len(drop) == n_layers:
        raise ValueError(f"remove_layers_: dropping all {n_layers} decoder layers leaves no model")
    return sorted(drop)


def _config_updates(config, keep: list[int], n_layers: int) -> dict:
    """The per-layer config entries after keeping layers `keep` (original indices, ascending) of `n_layers`."""
    updates: dict = {"num_hidden_layers": len(keep)}
    for key in PER_LAYER_LISTS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            if len(value) != n_layers:
                raise ValueError(f"config.{key}: {len(value)} {'entry' if len(value) == 1 else 'entries'} for {plural(n_layers, 'layer')}; "
                                 "cannot tell which to keep")
            updates[key] = type(value)(value[i] for i in keep)
    for key in LAYER_INDEX_LISTS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            new_index = {old: new for new, old in enumerate(keep)}
            updates[key] = type(value)(new_index[i] for i in value if i in new_index)
    window = getattr(config, "max_window_layers", None)
    # Qwen2/3: layers `i >= max_window_layers` slide. The kept layers stay in order, so the first sliding one is the
    # number of kept layers below the old bound; a bound past the last layer (no sliding layer) is left alone.
    if isinstance(window, int) and not isinstance(window, bool) and window < n_layers:
        updates["max_window_layers"] = sum(i < window for i in keep)
    return updates


def _kind(module: nn.Module) -> dict[str, object]:
    return {
        f"{name}.{attr}".lstrip("."): getattr(m, attr)
        for name, m in module.named_modules()
        for attr in _KIND_ATTRS
        if hasattr(m, attr) and isinstance(getattr(m, attr), (int, str, bool, type(None)))
    }


def _check_rebuild(model: nn.Module, layers: nn.ModuleList, config, keep: list[int]) -> None:
    """Builds `type(model)` from `config` on meta and compares each kept layer with its rebuilt counterpart."""
    try:
        with torch.device("meta"):
            rebuilt = type(model)(config)
    except Exception as e:  # noqa: BLE001 -- any failure here means stock from_pretrained would fail too
        raise ValueError(
            f"remove_layers_: {type(model).__name__} cannot be built from the shallower config: {e}".splitlines()[0]
        ) from e
    new_layers = decoder_layers(rebuilt)
    for new_idx, old_idx in enumerate(keep):
        old, new = layers[old_idx], new_layers[new_idx]
        old_shapes = {k: tuple(v.shape) for k, v in old.state_dict().items()}
        new_shapes = {k: tuple(v.shape) for k, v in new.state_dict().items()}
        old_kind, new_kind = _kind(old), _kind(new)
        for what, a, b in (("parameters", old_shapes, new_shapes), ("attention kind", old_kind, new_kind)):
            if a != b:
                diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                raise ValueError(
                    f"remove_layers_: after dropping, layer {old_idx} would reload as layer {new_idx} with other "
                    f"{what} ({diff[0]}: {a.get(diff[0])!r} -> {b.get(diff[0])!r}); the config of "
                    f"{type(model).__name__} holds a per-layer pattern this module does not renumber"
                )


def remove_layers_(model: nn.Module, drop: Iterable[int]) -> list[int]:
    """
    Removes whole decoder layers in place and keeps the config and the KV cache consistent.

    The remaining layers keep their order and weights, so the result computes exactly what the original model computes
    with the dropped layers replaced by the identity on the residual stream. See the module docstring for the config
    entries that change.

    Args:
        model (`PreTrainedModel`):
            A decoder-only causal LM whose layers sit in `model.get_decoder().layers` (Llama, Mistral, Qwen2/3,
            Gemma 2/3, Phi-3, ...). Merge adapters first: a peft wrapper keeps its own references to the layers.
        drop (`Iterable[int]`):
            Indices of the layers to remove, e.g. from [`choose_layers`].

    Returns:
        `list[int]`: the original indices of the layers kept, in order (new layer `j` was layer `kept[j]`).

    Raises:
        `ValueError`: one line, before any change: an index that is not an int, out of range or repeated, dropping
        every layer, or a shallower config the model class rejects or would rebuild differently.
    """
    layers = decoder_layers(model)
    n_layers = len(layers)
    dropped = _check_drop(drop, n_layers)
    keep = [i for i in range(n_layers) if i not in set(dropped)]
    configs = [c for c in model_configs(model) if getattr(c, "num_hidden_layers", None) == n_layers]
    if not configs:
        raise ValueError(f"remove_layers_: no config holds num_hidden_layers={n_layers} to record the change in")
    updates = [_config_updates(c, keep, n_layers) for c in configs]
    reason = config_error(model.config, updates[0]) if model.config is configs[0] else None
    if reason is not None:
        raise ValueError(f"remove_layers_: the config after dropping {dropped} is invalid: {reason}".splitlines()[0])
    new_config = copy.deepcopy(model.config)
    for key, value in updates[0].items():
        setattr(new_config, key, value)
    if dropped and model.config is configs[0]:
        _check_rebuild(model, layers, new_config, keep)

    for i in reversed(dropped):
        del layers[i]  # ModuleList renumbers its keys, so state_dict names follow the new positions
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    for config, update in zip(configs, updates):
        for key, value in update.items():
            setattr(config, key, value)
    return keep
