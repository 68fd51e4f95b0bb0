"""The text of a pruned model's card, from its `sparsity.json`: every statement is a pure function of what was
recorded (and of the folder's weights), so that the card says what was done and nothing else. `card.py` renders it.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..files import safetensors_io as sio
from ..files.pruned_files import SWEEP_JSON, is_sweep_reference, reference_words, sweep_reference_name
from ..io_utils import is_local_path, path_name, plural
from ..matching import parse_param_name
from ..perplexity import perplexity, perplexity_text
from .card_eval import dataset_name

EXPERTS_CRITERION = ("not used for whole experts, which are ranked by the tokens their router sent them during training "
                     "(the router statistics saved with the importance)")
# The scope of neurons removed inside each expert (`prune/expert_neurons.py`), in the card's words.
EXPERT_NEURON_SCOPE = ("the same number of neurons removed in every expert of every MoE layer (which ones differs per "
                       "expert; shared experts keep theirs)")

# What ranks the units of a structured prune from unit statistics (`ImportanceConfig(units=True)`), in the card's words:
# per statistic, what it is and, per axis, what it reads (`collect/unit_scoring.py`); only the removed axes are named.
_UNIT_STATISTICS = {
    "activation": ("mean activation magnitude over the training tokens", "Minitron",
                   {"neurons": "MLP neurons by `|a|`", "heads": "KV groups by their heads' output norms",
                    "hidden": "hidden channels by `|x|` of the residual stream"}),
    "activation_l2": ("root-mean-square activation over the training tokens", None,
                      {"neurons": "MLP neurons by `sqrt(mean a^2)`",
                       "heads": "KV groups by the root-mean-square of their heads' outputs",
                       "hidden": "hidden channels by `sqrt(mean x^2)` of the residual stream"}),
    # One text for every axis (no per-axis wording): it scores each unit's own weights.
    "taylor": ("first-order Taylor `|sum g * w|` over each unit's weights, averaged over the optimizer steps", None,
               None),
}
_BLOCK_INFLUENCE = "block influence `1 - cos(input, output)`"


def unit_ranking_text(structured: dict | None, axes: str | None = None) -> str | None:
    """How a structured prune ranked its units when unit statistics did it (the importance's criterion did not).

    Args:
        structured (`dict`, *optional*): the `structured` entry of `sparsity.json`.
        axes (`str`, *optional*): the axes whose units were removed (`"neurons"`, `"layers,neurons"`); the text names
            what ranked those only. Defaults to the recorded structure.

    Returns:
        `str` or `None`: `None` when no unit statistic ranked the units.
    """
    statistic = (structured or {}).get("unit_statistic")
    if statistic not in _UNIT_STATISTICS:
        return None
    what, paper, per_axis = _UNIT_STATISTICS[statistic]
    if per_axis is None:
        return f"not used for the units, which are ranked by {what}"
    parts = [p.strip() for p in (axes or (structured or {}).get("structure") or "").split(",") if p.strip()]
    named = [per_axis[p] for p in parts if p in per_axis]
    if not named and "layers" in parts:  # depth alone: the activations rank nothing
        return f"not used for the layers, which are ranked by {_BLOCK_INFLUENCE} over the training tokens (ShortGPT)"
    named += [f"decoder layers by {_BLOCK_INFLUENCE}, ShortGPT"] if "layers" in parts else []
    detail = "; ".join(named)
    if named and paper:
        detail = f"{paper}: {detail}"
    return f"not used for the units, which are ranked by {what}" + (f" ({detail})" if detail else "")


# What a unit sums without unit statistics (`prune/unit_scores.py`), in the card's words, per axis.
_WEIGHT_SUMS = {"neurons": "MLP neurons over their gate and up rows and `down_proj` column",
                "heads": "KV groups over their heads' q, k and v rows and `o_proj` columns"}


def weight_ranking_text(structured: dict | None, axes: str) -> str | None:
    """How a structured prune ranked its neurons or KV groups without unit statistics: by their weights' summed
    scores under the criterion (the line beside the criterion's formula; [`unit_ranking_text`] words the other case).

    Args:
        structured (`dict`, *optional*): the `structured` entry of `sparsity.json`.
        axes (`str`): the axes whose units were removed (`"neurons"`, `"neurons,heads"`).

    Returns:
        `str` or `None`: `None` when unit statistics ranked the units, or no neuron or KV group was removed.
    """
    if not structured or structured.get("unit_statistic") in _UNIT_STATISTICS \
            or structured.get("unit") in ("expert", "expert_neuron"):  # experts: ranked by routing or per expert
        return None
    named = [_WEIGHT_SUMS[p] for p in axes.split(",") if p in _WEIGHT_SUMS]
    if not named:
        return None
    return ("the units are ranked by their weights' scores under it, summed per unit (each tensor's scores divided by "
            f"their mean first): {'; '.join(named)}")


def unit_rankers(structured: dict | None, axes: str | None = None) -> list[str]:
    """The names of what ranked the removed units when unit statistics did (the card's Hub tags): the statistic for
    the widths, block influence for the layers of an activation statistic (as [`unit_ranking_text`] words it).

    Args:
        structured (`dict`, *optional*): the `structured` entry of `sparsity.json`.
        axes (`str`, *optional*): the axes whose units were removed; defaults to the recorded structure.

    Returns:
        `list[str]`: e.g. `["activation", "block-influence"]`; `[]` when no unit statistic ranked the units (the
        criterion's per-weight scores did).
    """
    statistic = (structured or {}).get("unit_statistic")
    if statistic not in _UNIT_STATISTICS:
        return []
    name = statistic.replace("_", "-")
    if _UNIT_STATISTICS[statistic][2] is None:  # one statistic for every axis, layers included (taylor)
        return [name]
    parts = [p.strip() for p in (axes or (structured or {}).get("structure") or "").split(",") if p.strip()]
    return ([name] if any(p != "layers" for p in parts) else []) + (["block-influence"] if "layers" in parts else [])


def structured_target_text(structured: dict | None) -> str | None:
    """A `target_params` budget in words (`None` without one)."""
    budget, count = (structured or {}).get("target_params"), (structured or {}).get("num_parameters") or {}
    if not budget or not count.get("before"):
        return None
    return f"keep {budget:,} of {count['before']:,} parameters ({100 * budget / count['before']:.2f}%)"


_STRUCTURED_ROWS = {
    "num_hidden_layers": "Decoder layers",
    "hidden_size": "Hidden size",
    "intermediate_size": "MLP intermediate size",
    "moe_intermediate_size": "Expert intermediate size",
    "num_attention_heads": "Attention heads",
    "num_key_value_heads": "Key/value heads",
    "num_local_experts": "Experts per layer",
    "num_experts": "Experts per layer",
    "n_routed_experts": "Routed experts per layer",
    "num_parameters": "Parameters",
}

_STRUCTURED_UNITS = {"neurons": ("MLP neurons", ".mlp."), "heads": ("attention heads (key/value groups)", ".self_attn."),
                     "hidden": ("hidden channels", ".layers."), "layers": ("decoder layers", ".layers."),
                     "experts": ("experts", ".experts.")}


def read_json(path: Path) -> Any:
    """The JSON content of `path`; invalid JSON is a one-line `ValueError` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def module_table(tensors: dict[str, dict]) -> list[dict]:
    """Rows `{module, tensors, numel, sparsity}` of the pruned tensors grouped by module type, from `sparsity.json`."""
    groups: OrderedDict[str, dict] = OrderedDict()
    for name, info in tensors.items():
        numel = int(info.get("numel") or math.prod(info.get("shape") or [0]))
        module = parse_param_name(name).module  # `mlp.down_proj` of `model.layers.0.mlp.down_proj.weight`
        row = groups.setdefault(module, {"module": module, "tensors": 0, "numel": 0, "zeros": 0.0})
        row["tensors"] += 1
        row["numel"] += numel
        row["zeros"] += float(info.get("sparsity", 0.0)) * numel
    rows = []
    for row in groups.values():
        row["sparsity"] = row.pop("zeros") / row["numel"] if row["numel"] else 0.0
        rows.append(row)
    return sorted(rows, key=lambda r: r["module"])


def structured_rows(structured: dict | None) -> list[dict]:
    """Before/after rows from what `surgery.prune_structured_` returns: config sizes and the parameter count."""
    if not structured:
        return []
    config = structured.get("config") or {}
    pairs = {key: (config.get("before", {}).get(key), config.get("after", {}).get(key)) for key in _STRUCTURED_ROWS}
    count = structured.get("num_parameters") or {}
    pairs["num_parameters"] = (count.get("before"), count.get("after"))
    rows = []
    for key, label in _STRUCTURED_ROWS.items():
        before, after = pairs[key]
        if before is None or after is None:
            continue
        if key == "intermediate_size" and structured.get("unit") == "expert_neuron":
            label = _STRUCTURED_ROWS["moe_intermediate_size"]  # Mixtral / OLMoE: the experts' width
        if key == "num_parameters":
            before, after = f"{before:,}", f"{after:,}"
        rows.append({"name": label, "before": before, "after": after})
    return rows


def round_to_text(structured: dict | None) -> str | None:
    """The Structure line's note on `PruneConfig(round_to=N)`: the widths cut are multiples of N, with their sizes."""
    n = (structured or {}).get("round_to")
    if not n:
        return None
    widths = [f"{r['name'] if r['name'][1:2].isupper() else r['name'].lower()} {r['after']}"  # MLP stays upper case
              for r in structured_rows(structured) if r["name"] in _WIDTH_ROWS and r["before"] != r["after"]]
    return f"every width it cut was kept a multiple of {n} (`round_to`{': ' if widths else ''}{', '.join(widths)})"


_WIDTH_ROWS = (_STRUCTURED_ROWS["hidden_size"], _STRUCTURED_ROWS["intermediate_size"],
               _STRUCTURED_ROWS["moe_intermediate_size"])


def target_text(target) -> str:
    """A float target, or per-module targets (`{regex: float}`) as a short list."""
    if isinstance(target, dict):
        return "per module: " + ", ".join(f"`{k}` {100 * float(v):.2f}%" for k, v in target.items())
    return f"{100 * float(target or 0.0):.2f}%"


def sweep_rows(folder: Path, criterion: str | None) -> list[dict]:
    """Rows of `sweep.json` (written by [`sweep`]) that have a loss, for the card's loss-vs-sparsity table: `criterion`,
    `structure` (`None` for the reference row: the model the sweep was given, `"dense"` or `"input"`), `scope`,
    `sparsity`, `loss`, `perplexity` (`None` where it overflows)
    and `perplexity_text` (`hf_weightprune.perplexity`), and `tokens` and `dataset` where the sweep recorded them; a
    structured sweep's rows also `candidate`, `unit_statistic`, `compensate`, `size` (asked) and `num_parameters`
    (kept); the reference row also `reference`, its name in words (`"Dense"`, `"Input model (50.0% sparse)"`)."""
    if not (folder / SWEEP_JSON).is_file():
        return []
    rows = []
    for row in read_json(folder / SWEEP_JSON) or []:
        if isinstance(row, dict) and row.get("loss") is not None and row.get("sparsity") is not None:
            loss = float(row["loss"])  # the perplexity from it (a stored one may be an older sweep's inf)
            reference = is_sweep_reference(row)
            rows.append({"criterion": row.get("criterion", criterion), "scope": row.get("scope"),
                         "structure": None if reference else row.get("structure"),
                         "reference": sweep_reference_name(row) if reference else None,
                         "sparsity": float(row["sparsity"]), "loss": loss, "perplexity": perplexity(loss),
                         "perplexity_text": perplexity_text(loss),
                         "tokens": row.get("tokens"), "dataset": row.get("dataset"), "size": row.get("size"),
                         "candidate": row.get("candidate"), "unit_statistic": row.get("unit_statistic"),
                         "compensate": row.get("compensate"), "num_parameters": row.get("num_parameters")})
    return rows


def sweep_context(rows: list[dict], structure: str, shrinks: bool = False) -> dict | None:
    """What the card says above the sweep's table: the tokens each point was evaluated on and the data (when every
    row states the same), whether the sweep pruned with another structure than this model's, and whether it is a
    sweep of the other kind (zeros beside a smaller model, or units removed beside zeros), which says nothing of it.

    Args:
        rows (`list[dict]`): what [`sweep_rows`] returned.
        structure (`str`): this model's structure, from `sparsity.json`.
        shrinks (`bool`, *optional*): this model is smaller (structured or experts), not zeros.

    Returns:
        `dict` or `None`: `{"tokens", "dataset", "structures", "other_structure", "structured", "other_kind",
        "model"}` (`structured`: the sweep removed units, its rows are sizes; `model`: what its rows pruned copies of,
        `"the dense model"` or `"the input model (50.0% sparse)"` when that model already held zeros); `None` without
        rows.
    """
    if not rows:
        return None
    structured = any(r.get("size") is not None and r["structure"] for r in rows)
    tokens = {r["tokens"] for r in rows}
    datasets = {r["dataset"] for r in rows}
    structures = sorted({r["structure"] for r in rows if r["structure"]})
    reference = next((r["reference"] for r in rows if r.get("reference")), "Dense")
    return {"tokens": tokens.pop() if len(tokens) == 1 and None not in tokens else None,
            "dataset": dataset_name(datasets.pop()) if len(datasets) == 1 and None not in datasets else None,
            "structures": ", ".join(structures),
            "other_structure": any(s != structure for s in structures),
            "structured": structured, "other_kind": structured != shrinks,
            "model": reference_words(reference)}


def _teacher_text(teacher: Any, is_local: bool = False) -> str:
    """The teacher as the card names it: a Hub id as given; a local folder (recorded relative to the pruned folder,
    or absolute by earlier versions) by its name only, no machine path. `is_local`: the Hub copy of `sparsity.json`
    already cut the path to its name."""
    if not teacher:
        return "a frozen copy of the model as training began"
    if is_local or is_local_path(teacher):
        return f"the local checkpoint `{path_name(teacher)}`"
    return f"`{teacher}`"


def distillation_context(info: Any) -> dict | None:
    """The distillation recorded in `sparsity.json`, for the card's training line."""
    if not isinstance(info, dict) or info.get("alpha") is None or info.get("temperature") is None:
        return None
    hidden = float(info.get("hidden_weight") or 0.0)
    return {"teacher": _teacher_text(info.get("teacher"), bool(info.get("teacher_is_local"))), "alpha": float(info["alpha"]),
            "temperature": float(info["temperature"]), "hidden_weight": hidden}


def scorer_of(criterion: str | None):
    """The registered scorer class of `criterion`, or `None` (a custom or unrecorded criterion)."""
    from ..scorers import SCORERS

    return SCORERS.get(criterion) if criterion else None


def criterion_text(criterion: str | None) -> tuple[str, str | None]:
    """`(formula in markdown, paper or None)` of the criterion the masks were chosen with."""
    cls = scorer_of(criterion)
    if cls is None:
        return (f"custom criterion `{criterion}`" if criterion else "not recorded"), None
    return (f"`{cls.formula}`" if cls.formula else "no formula recorded"), (cls.paper or None)


def importance_summary(importance: dict | None, criterion: str | None) -> str:
    """What the statistics were gathered over: tokens for activation criteria, training steps sampled for the others,
    and the settings that change what was summed. A training sample sums every forward of its optimizer step
    (accumulated micro-batches, every rank), so it is counted in steps; a calibration sample is one forward."""
    if not importance:
        return "statistics not recorded"
    cls = scorer_of(criterion)
    settings = importance.get("settings") or {}
    bits = []
    samples, tokens, step = importance.get("num_samples"), importance.get("tokens"), importance.get("step")
    if cls is not None and cls.source == "final":
        bits.append("from the weights as they were when pruned, no statistics over steps")
    elif cls is not None and cls.source == "activations" and tokens:
        unit = "sampled training step" if step else "forward pass"
        bits.append(f"inputs of every pruned layer summed over {int(tokens):,} tokens"
                    + (f" in {plural(samples, unit)}" if samples else ""))
    elif samples is not None:
        bits.append(plural(samples, "sampled training step"))
    if step:
        bits.append(f"up to step {step}")
    elif step == 0 and (cls is None or cls.source != "final"):
        bits.append("on calibration data, without training")
    if settings.get("every_n_steps") and settings["every_n_steps"] != 1:
        bits.append(f"every {settings['every_n_steps']} steps")
    if settings.get("window"):
        bits.append(f"window of {plural(settings['window'], 'step')}")
    if settings.get("weighting") == "step":
        bits.append("each sample weighted by its step t")
    return ", ".join(bits) or "statistics not recorded"



def changed_axes(structured: dict | None, structure: str) -> str:
    """The axes of a structured prune whose size changed (`"neurons"` of `"layers,neurons"` when no layer went).

    Args:
        structured (`dict`, *optional*): the `structured` entry of `sparsity.json`.
        structure (`str`): the recorded structure (`"layers,neurons"`).

    Returns:
        `str`: the changed axes in the recorded order, comma-separated; `structure` itself when none is recorded.
    """
    axes = (structured or {}).get("axes") or {}
    changed = [a for a in structure.split(",") if a not in axes or axes[a].get("before") != axes[a].get("after")]
    return ",".join(changed) or structure


def structured_module_table(folder: Path, structured: dict | None, structure: str) -> list[dict]:
    """Per module type of a structured prune: its parameters now (read from the folder's safetensors headers) and
    the share removed, from the units each layer had before and has after (a unit's rows and columns scale every
    projection of the block it belongs to)."""
    units = (structured or {}).get("units_per_layer") or {}
    before, after = units.get("before"), units.get("after")
    if structure not in _STRUCTURED_UNITS or not before or not after:
        return []
    block = _STRUCTURED_UNITS[structure][1]
    # neurons inside experts: only the routed experts' tensors narrow (router, shared experts and biases of the
    # outputs keep their size); the files may name the block `mlp` or Mixtral's `block_sparse_moe`
    experts = structure == "experts" or structured.get("unit") == "expert_neuron"
    if experts:
        block = ".experts."
    try:
        weight_map = sio.weight_map(folder)
    except (FileNotFoundError, ValueError):
        return []
    shapes = {}
    for shard in sorted(set(weight_map.values())):
        header = sio.read_header(folder / shard)
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    groups: OrderedDict[str, dict] = OrderedDict()
    for name, shape in shapes.items():
        # experts: the fused 3-D tensors (`mlp.experts.gate_up_proj`), or per-expert 2-D ones grouped across experts;
        # an expert's neurons leave `down_proj`'s bias (per output) whole
        matrix = len(shape) in (2, 3) if experts else len(shape) == 2 and name.endswith(".weight")
        if structure != "experts" and name.endswith("down_proj_bias"):
            continue
        if block not in name or not matrix:
            continue
        module = parse_param_name(name).module
        if experts:
            module = re.sub(r"\.experts\.\d+\.", ".experts.", module)
        row = groups.setdefault(module, {"module": module, "tensors": 0, "numel": 0})
        row["tensors"] += 1
        row["numel"] += math.prod(shape)
    for row in groups.values():
        row["sparsity"] = 1 - after / before  # removed: the table's "Sparsity" column reads "removed" here
    return sorted(groups.values(), key=lambda r: r["module"])


def routing_rows(routing: dict | None) -> list[dict]:
    """Per MoE layer, from the `routing` entry of `sparsity.json`: the least and the most used expert with their share
    of the layer's routed tokens, and for a whole-expert prune the removed experts with their combined share. Every
    share is computed here from the recorded token counts (a token counts once for each expert it was sent to).

    Args:
        routing (`dict`, *optional*): `{block: {"tokens": list[int], "removed": list[int] (optional)}}`.

    Returns:
        `list[dict]`: rows `{layer, experts, tokens, least, least_share, most, most_share, removed, removed_share}`
        in the recorded order; `removed` is `None` when nothing was removed. Layers no token reached are left out
        (there is no share to state).
    """
    rows = []
    for block, stats in (routing or {}).items():
        tokens = [int(n) for n in (stats or {}).get("tokens") or []]
        total = sum(tokens)
        if not total:
            continue
        # ties go to the lower index, as in the expert choice itself
        least = min(range(len(tokens)), key=lambda e: (tokens[e], e))
        most = max(range(len(tokens)), key=lambda e: (tokens[e], -e))
        removed = stats.get("removed")
        rows.append({"layer": block, "experts": len(tokens), "tokens": total,
                     "least": least, "least_share": tokens[least] / total,
                     "most": most, "most_share": tokens[most] / total,
                     "removed": list(removed) if removed is not None else None,
                     "removed_share": sum(tokens[e] for e in removed) / total if removed is not None else None})
    return rows


def structured_units(structure: str) -> str:
    """What a structured prune removes, in words (`"MLP neurons"`; a combination: `"decoder layers and MLP neurons"`)."""
    parts = structure.split(",") if isinstance(structure, str) else [structure]
    return " and ".join(_STRUCTURED_UNITS.get(p.strip(), (p.strip(), ""))[0] for p in parts)


def offline_cross_context(sparsity: dict) -> dict | None:
    """`PruneConfig(cross_alpha=...)`'s record (`sparsity["cross_term"]`) for the card's OBS line: `alpha`, `weights`
    (pruned tensors swept with the cross term) and `tensors` (all pruned tensors); `None` when it did not run (or ran
    with `alpha` 0, which is the symmetric sweep)."""
    cross = sparsity.get("cross_term")
    if (sparsity.get("reconstruction") != "OBS" or not isinstance(cross, dict) or not cross.get("weights")
            or not cross.get("alpha")):
        return None
    return {"alpha": cross.get("alpha"), "weights": int(cross["weights"]),
            "tensors": max(int(cross["weights"]), len(sparsity.get("tensors") or {}))}
