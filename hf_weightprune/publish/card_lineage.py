"""The card's words for a model pruned from a pruned output (`sparsity.json`'s `earlier_prunes`): what its input was,
the shares of the input's and of the original dense model's parameters removed, and where its statistics came from.
"""

from __future__ import annotations

from typing import Any

from ..io_utils import is_local_path
from .card_text import structured_units


def _step_text(entry: dict[str, Any]) -> str:
    """One earlier prune in words: `"MLP neurons removed, 213,568 -> 167,360 parameters"`, or `"2:4, 50.00% of the
    prunable weights set to zero"`."""
    structure = entry.get("structure") or "unknown structure"
    count = entry.get("num_parameters") or {}
    before, after = count.get("before"), count.get("after")
    if isinstance(entry.get("config"), dict) or (isinstance(before, int) and isinstance(after, int) and after < before):
        units = structured_units(structure)
        return f"{units} removed" + (f", {before:,} -> {after:,} parameters" if before and after else "") \
            + _trained_text(entry)
    share = entry.get("global_sparsity")
    zeroed = f", {100 * float(share):.2f}% of the prunable weights set to zero" if share is not None else ""
    return f"`{structure}`{zeroed}{_trained_text(entry)}"


def _trained_text(entry: dict[str, Any]) -> str:
    """How that prune's weights were trained after or while it was pruned, in words (`""`: not trained, or a file
    written before it was recorded): `", then fine-tuned 4 optimizer steps (2,048 training tokens) with
    distillation"`."""
    mode, training = entry.get("schedule_mode"), entry.get("training") or {}
    steps, tokens = training.get("steps"), training.get("tokens")
    how = (f" {steps:,} optimizer steps" if isinstance(steps, int) else "") \
        + (f" ({tokens:,} training tokens)" if isinstance(tokens, int) and tokens else "")
    distilled = " with distillation" if entry.get("distilled") else ""
    if mode == "prune":
        return f", during fine-tuning{how and ' of' + how}{distilled}"
    if not (how or distilled or mode == "hold"):
        return ""
    held = " with its mask held" + (" and" if distilled else "") if mode == "hold" else ""
    return f", then fine-tuned{how}{held}{distilled}"


def lineage_context(sparsity: dict[str, Any]) -> dict[str, Any] | None:
    """What the card says of a model pruned from a pruned output.

    Args:
        sparsity (`dict`): the content of `sparsity.json`.

    Returns:
        `dict` or `None` (the input was not a pruned output, or a file written before the chain was recorded):
        `origin` (the base model as a Hub id in backticks, or words when it is not recorded), `steps` (the earlier
        prunes in words, oldest first), `kept` (after several, the input's count of the original dense model's, or
        `None`), `dense_params` (the original dense model's count, `None` when not recorded), and `dense_share` (the share of the original dense model's
        parameters this model no longer has, for a structured prune; `None` otherwise: zeros of an unstructured
        prune are counted in the input model's parameters only).
    """
    chain = [e for e in sparsity.get("earlier_prunes") or [] if isinstance(e, dict)]
    if not chain:
        return None
    base = next((e.get("base_model") for e in chain if e.get("base_model")), None) or sparsity.get("base_model")
    origin = f"`{base}`" if base and not is_local_path(base) else "a dense model whose name is not recorded"
    dense_params = (chain[0].get("num_parameters") or {}).get("before")
    input_params = (chain[-1].get("num_parameters") or {}).get("after")
    after = ((sparsity.get("structured") or {}).get("num_parameters") or {}).get("after")
    dense_share = 1 - after / dense_params if isinstance(after, int) and isinstance(dense_params, int) else None
    # after more than one earlier prune the steps do not say it at once
    kept = (f"it had {input_params:,} of the original dense model's {dense_params:,} parameters"
            if len(chain) > 1 and isinstance(input_params, int) and isinstance(dense_params, int)
            and input_params != dense_params else None)
    return {"origin": origin, "steps": "; then ".join(_step_text(e) for e in chain), "kept": kept,
            "dense_params": dense_params, "dense_share": dense_share}


def statistics_source(sparsity: dict[str, Any]) -> str | None:
    """Which model the statistics were gathered on, when it is not the model that was pruned: an importance cut to
    the units a structured prune kept (`Importance.select`) was gathered on the model before that prune.

    Args:
        sparsity (`dict`): the content of `sparsity.json`.

    Returns:
        `str` or `None`: e.g. `"the model the input was pruned from, cut to the weights and units the input kept"`.
    """
    if not (sparsity.get("importance") or {}).get("cut_to_kept_units"):
        return None
    return "the model the input was pruned from, cut to the weights and units the input kept"


def achieved_units_text(structured: dict | None, target: Any) -> str | None:
    """The share of units a `sparsity` target actually removed, when it differs from the target (`round_to`, or a
    count that cannot be met exactly): `"25.00% of them (112 -> 84 MLP neurons per layer)"`.

    Args:
        structured (`dict`, *optional*): the `structured` entry of `sparsity.json`.
        target (`float`, *optional*): the recorded `target_sparsity`.

    Returns:
        `str` or `None`: `None` without a per-layer unit count, for a `target_params` budget, or when equal to the
        target at two decimals.
    """
    units = (structured or {}).get("units_per_layer") or {}
    before, after = units.get("before"), units.get("after")
    if (structured or {}).get("target_params") or not isinstance(target, (int, float)) \
            or not isinstance(before, int) or not isinstance(after, int) or not before:
        return None
    achieved = 1 - after / before
    if f"{100 * achieved:.2f}" == f"{100 * float(target):.2f}":
        return None
    what = structured_units(structured.get("structure") or "")
    return f"{100 * achieved:.2f}% of them ({before} -> {after} {what} per layer)"
