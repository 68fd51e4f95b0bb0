"""The model card of a pruned checkpoint: rendered from its `sparsity.json` (and `sweep.json`), written atomically.

No network access: [`push_pruned_to_hub`] (hub.py) calls this module; this module never calls the Hub.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .._version import __version__
from ..files.pruned_files import SPARSITY_NAME, SWEEP_JSON, SWEEP_PNG, load_sparsity
from ..io_utils import atomic_write_text, check_arg_type, is_local_path, path_name
from ..matching import parse_param_name
from ..validation import parse_structure

CARD_FILE = "README.md"
CARD_TEMPLATE = "pruned_model_card.md"
# The last line of every card this library renders: how `push_pruned_to_hub` tells its own card from a user's.
GENERATED_MARK = "Card written by hf-weightprune"

_STRUCTURES = {
    "unstructured": ("unstructured sparsity", "unstructured-sparsity", "any individual weight can be zeroed"),
    "neurons": ("structured pruning of MLP neurons", "structured-pruning", "whole MLP neurons are removed"),
    "heads": ("structured pruning of attention heads", "structured-pruning", "whole attention heads are removed"),
}

_SCOPES = {
    "global": "one threshold for all prunable tensors",
    "layer": "the same sparsity in every tensor",
    "row": "the same sparsity in every row of every tensor",
}

_STRUCTURED_ROWS = {
    "intermediate_size": "MLP intermediate size",
    "num_attention_heads": "Attention heads",
    "num_key_value_heads": "Key/value heads",
    "num_parameters": "Parameters",
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _read_template() -> str:
    """The card template, shipped as package data (`hf_weightprune/model_cards/`)."""
    try:
        return resources.files("hf_weightprune").joinpath("model_cards", CARD_TEMPLATE).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"The model card template {CARD_TEMPLATE!r} is missing from the hf_weightprune "
                                "installation; reinstall the package") from None


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _existing_card_data(folder: Path) -> dict:
    """Front matter of an existing README.md (e.g. copied from the base model), or `{}`."""
    readme = folder / CARD_FILE
    if not readme.is_file():
        return {}
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except (ValueError, yaml.YAMLError):  # no or broken front matter (UnicodeDecodeError is a ValueError)
        return {}


def structure_info(structure: str) -> tuple[str, str, str | None]:
    """`(label, Hub tag, one-line explanation)` of a pruning structure, for any N:M pattern too.

    Args:
        structure (`str`): `"unstructured"`, `"neurons"`, `"heads"` or an N:M pattern such as `"4:8"`.

    Returns:
        `tuple[str, str, str | None]`: e.g. `("4:8 semi-structured sparsity", "4:8-sparsity", "4 of every 8 ...")`;
        an unknown structure gets its own name as label and `"<structure>-sparsity"` as tag.
    """
    if structure in _STRUCTURES:
        return _STRUCTURES[structure]
    try:
        kind, nm = parse_structure(structure)
    except ValueError:
        return structure, f"{structure}-sparsity", None
    if kind != "N:M" or nm is None:
        return structure, f"{structure}-sparsity", None
    n, m = nm  # N of every M weights are kept
    return (f"{n}:{m} semi-structured sparsity", f"{n}:{m}-sparsity",
            f"{m - n} of every {m} consecutive weights in a row are zero")


def _module_table(tensors: dict[str, dict]) -> list[dict]:
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


def _structured_rows(structured: dict | None) -> list[dict]:
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
        if key == "num_parameters":
            before, after = f"{before:,}", f"{after:,}"
        rows.append({"name": label, "before": before, "after": after})
    return rows


def _perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    # exp overflows past ~709; an infinite perplexity is the honest value there
    return math.exp(loss) if loss < 709 else float("inf")


def _importance_summary(importance: dict | None) -> str:
    if not importance:
        return "importance settings not recorded"
    bits = []
    if importance.get("num_samples") is not None:
        bits.append(f"{importance['num_samples']} snapshots")
    if importance.get("step") is not None:
        bits.append(f"up to step {importance['step']}")
    settings = importance.get("settings") or {}
    if settings.get("every_n_steps"):
        every = settings["every_n_steps"]
        bits.append("every step" if every == 1 else f"every {every} steps")
    if settings.get("window"):
        bits.append(f"window of {settings['window']} steps")
    if settings.get("weighting") == "step":
        bits.append("each sample weighted by its step t (sum_t t * X_t^T X_t)")
    return ", ".join(bits) or "importance settings not recorded"


def _target_text(target) -> str:
    """A float target, or per-module targets (`{regex: float}`) as a short list."""
    if isinstance(target, dict):
        return "per module: " + ", ".join(f"`{k}` {100 * float(v):.2f}%" for k, v in target.items())
    return f"{100 * float(target or 0.0):.2f}%"


def _tags(structure: str, criterion: str | None) -> list[str]:
    tags = ["pruned", "sparsity", "hf-weightprune", structure_info(structure)[1]]
    if criterion:
        tags.append(criterion.replace("_", "-"))
    return tags


def _criteria() -> list[tuple[str, str, str]]:
    """`(name, formula, paper)` of every registered criterion: the scorer classes are the only source."""
    from ..scorers import SCORERS

    return [(name, cls.formula, cls.paper) for name, cls in SCORERS.items()]


def _criterion_text(criterion: str | None) -> tuple[str, str | None]:
    """`(formula in markdown, paper or None)` of the criterion the checkpoint was pruned with."""
    for name, formula, paper in _criteria():
        if name == criterion:
            return (f"`{formula}`" if formula else "no formula recorded"), (paper or None)
    return f"custom criterion `{criterion}`", None


_EVAL_KEYS = ("dataset", "tokens", "step")


def _eval_metadata(report: dict, prefix: str) -> dict[str, Any]:
    """`{dataset, tokens, step}` of one side of the `eval` entry; `dense_step` (etc.) override the shared keys."""
    return {key: report.get(f"{prefix}{key}", report.get(key)) for key in _EVAL_KEYS}


def _eval_context(report: dict | None) -> tuple[dict | None, list[EvalResult] | None]:
    """
    `(template context, model-index results)` of the `eval` entry of `sparsity.json`, or `(None, None)`.

    The dense loss is compared with the pruned loss only when both come from the same evaluation: the same
    `dataset` and number of `tokens`, at the same training `step`, all stated (a dense model evaluated at the step
    pruning started is not the same model as the pruned one at the end of training). Otherwise the dense numbers are
    dropped from the card, which says why.
    """
    if not report or report.get("pruned_loss") is None:
        return None, None
    pruned_meta, dense_meta = _eval_metadata(report, "pruned_"), _eval_metadata(report, "dense_")
    dataset = str(pruned_meta["dataset"] or "unknown")
    dense_loss, pruned_loss = report.get("dense_loss"), report["pruned_loss"]
    dropped = None
    if dense_loss is not None:
        unstated = [k for k in _EVAL_KEYS if pruned_meta[k] is None or dense_meta[k] is None]
        differ = [f"{k} {dense_meta[k]!r} (dense) vs {pruned_meta[k]!r} (pruned)" for k in _EVAL_KEYS
                  if k not in unstated and dense_meta[k] != pruned_meta[k]]
        if unstated or differ:
            dropped = ("; ".join(differ) if differ else
                       f"the evaluation does not state its {' and '.join(unstated)}")
            dense_loss = None
    context = {"dataset": dataset, "tokens": pruned_meta["tokens"], "step": pruned_meta["step"],
               "dense_loss": dense_loss, "pruned_loss": pruned_loss, "dense_dropped": dropped,
               "dense_perplexity": _perplexity(dense_loss), "pruned_perplexity": _perplexity(pruned_loss)}
    metrics = [("loss", pruned_loss, "Eval loss (pruned)"),
               ("perplexity", context["pruned_perplexity"], "Perplexity (pruned)")]
    if dense_loss is not None:
        metrics += [("dense_loss", dense_loss, "Eval loss (dense)"),
                    ("dense_perplexity", context["dense_perplexity"], "Perplexity (dense)")]
    results = [EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset,
                          metric_type=kind, metric_value=value, metric_name=label) for kind, value, label in metrics]
    return context, results


def _sweep_rows(folder: Path, criterion: str | None) -> list[dict]:
    """Rows of `sweep.json` (written by [`sweep`]) that have a loss, for the card's loss-vs-sparsity table."""
    if not (folder / SWEEP_JSON).is_file():
        return []
    rows = []
    for row in _read_json(folder / SWEEP_JSON) or []:
        if isinstance(row, dict) and row.get("loss") is not None and row.get("sparsity") is not None:
            loss, perplexity = float(row["loss"]), row.get("perplexity")
            rows.append({"criterion": row.get("criterion", criterion), "sparsity": float(row["sparsity"]),
                         "loss": loss, "perplexity": float(perplexity) if perplexity is not None else _perplexity(loss)})
    return rows


def _schedule_context(schedule: Any) -> dict | None:
    """The schedule recorded in `sparsity.json` as `{"text": ...}` for the card, when it has everything the card says:
    a recovery with the mask held (`mode="hold"`), or the gradual ramp with its steps (or fractions of training)."""
    if not isinstance(schedule, dict):
        return None
    if schedule.get("mode") == "hold":
        return {"text": "pruned once, then fine-tuned with that mask held (a recovery fine-tune)"}
    needed = ("initial_sparsity", "final_sparsity", "start", "end", "every_n_steps", "ramp")
    if not all(schedule.get(k) is not None for k in needed):
        return None
    start, end = schedule["start"], schedule["end"]
    if isinstance(start, int) and isinstance(end, int):
        span = f"between steps {start} and {end}"
    elif isinstance(start, float) and isinstance(end, float):  # fractions of the run's max_steps
        span = f"from {100 * start:g}% to {100 * end:g}% of training"
    else:  # one of each, e.g. the default start=0.0 with end=500
        def at(v):
            return f"step {v}" if isinstance(v, int) else f"{100 * v:g}% of training"
        span = f"from {at(start)} to {at(end)}"
    return {"text": f"gradual pruning from {100 * schedule['initial_sparsity']:.1f}% to "
                    f"{100 * schedule['final_sparsity']:.1f}% sparsity {span}, every {schedule['every_n_steps']} "
                    f"steps, {schedule['ramp']} ramp"}


def _teacher_text(teacher: Any, is_local: bool = False) -> str:
    """The teacher as the card names it: a Hub id as given; a local folder (recorded absolute by `save_pruned`) by its
    name only, no machine path. `is_local`: the Hub copy of `sparsity.json` already cut the path to its name."""
    if not teacher:
        return "a frozen copy of the model as training began"
    if is_local or is_local_path(teacher):
        return f"the local checkpoint `{path_name(teacher)}`"
    return f"`{teacher}`"


def _distillation_context(info: Any) -> dict | None:
    """The distillation recorded in `sparsity.json`, for the card's training line."""
    if not isinstance(info, dict) or info.get("alpha") is None or info.get("temperature") is None:
        return None
    hidden = float(info.get("hidden_weight") or 0.0)
    return {"teacher": _teacher_text(info.get("teacher"), bool(info.get("teacher_is_local"))), "alpha": float(info["alpha"]),
            "temperature": float(info["temperature"]), "hidden_weight": hidden}


_CARD_ARGS = ("base_model", "license", "repo_id", "sparsity")


def _check_card_args(fn: str, output_dir, base_model=None, license=None, repo_id=None, sparsity=None) -> None:
    check_arg_type(fn, "output_dir", output_dir, (str, os.PathLike), "a folder path (str or os.PathLike)")
    for name, value in (("base_model", base_model), ("license", license), ("repo_id", repo_id)):
        check_arg_type(fn, name, value, (str, type(None)), "a str or None")
    check_arg_type(fn, "sparsity", sparsity, (dict, type(None)), "the dict of sparsity.json or None")


def render_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    sparsity: dict | None = None,
) -> ModelCard:
    """Render the model card of a pruned checkpoint.

    Reads `sparsity.json` (unless given), `config.json`, an existing `README.md`'s front matter, and `sweep.json` /
    `sweep.png` when a sweep wrote them. Writes nothing.

    Args:
        output_dir (`str` or `os.PathLike`):
            Folder written by `save_pruned` or `prune_checkpoint`.
        base_model (`str`, *optional*):
            Hub id of the dense model. Defaults to `sparsity.json["base_model"]`, then to an existing README's.
        license (`str`, *optional*):
            License id. Defaults to the `license` of an existing README.md or of `config.json`, if any.
        repo_id (`str`, *optional*):
            Hub id (or local folder name) the card is written for: the title, the model-index name and the
            `from_pretrained(...)` snippet. Defaults to the name of `output_dir`.
        sparsity (`dict`, *optional*):
            The content of `sparsity.json`, when the caller has already read it.

    Returns:
        [`huggingface_hub.ModelCard`]: the rendered card (YAML front matter plus markdown body).

    Raises:
        TypeError: an argument has the wrong type.
        FileNotFoundError: `output_dir` does not exist, or the card template is missing from the installation.
        ValueError: `output_dir` is not a pruned checkpoint (no or invalid `sparsity.json`), or `config.json` /
            `sweep.json` is not valid JSON.
    """
    _check_card_args("render_model_card", output_dir, base_model, license, repo_id, sparsity)
    folder = Path(output_dir)
    if sparsity is None:
        sparsity = load_sparsity(folder)
    elif not folder.is_dir():
        raise FileNotFoundError(f"Pruned model folder {str(folder)!r} does not exist")
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    existing = _existing_card_data(folder)

    base_model = base_model or sparsity.get("base_model") or existing.get("base_model")
    license = license or existing.get("license") or config.get("license")
    structure = sparsity["structure"]
    criterion = sparsity.get("criterion") or (sparsity.get("importance") or {}).get("criterion")
    repo_id = repo_id or folder.resolve().name
    model_name = repo_id.split("/")[-1]
    eval_ctx, eval_results = _eval_context(sparsity.get("eval"))

    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=_tags(structure, criterion),
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )
    return ModelCard.from_template(
        card_data, template_str=_read_template(), model_title=f"{model_name} ({structure_info(structure)[0]})",
        repo_id=repo_id, **_body_context(folder, sparsity, criterion), eval=eval_ctx,
    )


def _body_context(folder: Path, sparsity: dict, criterion: str | None) -> dict[str, Any]:
    """Template variables of the card body that come from `sparsity.json` and the folder's files."""
    structure = sparsity["structure"]
    label, _, detail = structure_info(structure)
    structured_rows = _structured_rows(sparsity.get("structured"))
    formula, reference = _criterion_text(criterion)
    try:
        nm = parse_structure(structure)[1]
    except ValueError:
        nm = None
    return {
        "library_version": sparsity.get("library_version") or __version__,
        "format_version": sparsity.get("format_version", 1),
        "structure": structure,
        "structure_label": label,
        "structure_detail": detail,
        "nm": {"kept": nm[0], "group": nm[1], "zeros": nm[1] - nm[0]} if nm else None,
        "structured": structured_rows,
        "structured_summary": ", ".join(f"{r['name'].lower()} {r['before']} -> {r['after']}" for r in structured_rows),
        "scope": sparsity.get("scope", "global"),
        "scope_detail": _SCOPES.get(sparsity.get("scope"), "custom"),
        "reconstruction": sparsity.get("reconstruction"),
        "allocation": sparsity.get("allocation") or "uniform",
        "target_sparsity_text": _target_text(sparsity.get("target_sparsity")),
        "global_sparsity": float(sparsity.get("global_sparsity") or 0.0),
        "model_sparsity": float(sparsity.get("model_sparsity") or 0.0),
        "criterion": criterion,
        "criterion_formula": formula,
        "criterion_reference": reference,
        "criteria": _criteria(),
        "importance_summary": _importance_summary(sparsity.get("importance")),
        "schedule": _schedule_context(sparsity.get("schedule")),
        "distillation": _distillation_context(sparsity.get("distillation")),
        "module_table": _module_table(sparsity["tensors"]),
        "sweep_rows": _sweep_rows(folder, criterion),
        "has_plot": (folder / SWEEP_PNG).is_file(),
        "has_tokenizer": any((folder / name).is_file() for name in _TOKENIZER_FILES),
        "generated_mark": GENERATED_MARK,
        "sparsity_file": SPARSITY_NAME,
    }


def write_model_card(output_dir: str | os.PathLike, **card_args: Any) -> Path:
    """Render the model card (see [`render_model_card`]) and write it atomically to `output_dir/README.md`.

    Args:
        output_dir (`str` or `os.PathLike`): folder written by `save_pruned` or `prune_checkpoint`.
        **card_args: the keyword arguments of [`render_model_card`]: `base_model` (`str`), `license` (`str`),
            `repo_id` (`str`, the Hub id or local name the card is written for; defaults to the folder name) and
            `sparsity` (`dict`, the content of `sparsity.json` when already read), each *optional*.

    Returns:
        `Path`: the path of the written README.md (replaced if it existed).

    Raises:
        TypeError: an unknown keyword argument, or an argument of the wrong type.
        FileNotFoundError, ValueError: as [`render_model_card`]; nothing is written then.
    """
    unknown = sorted(set(card_args) - set(_CARD_ARGS))
    if unknown:
        raise TypeError(f"write_model_card: unknown argument(s) {unknown}; it takes {', '.join(_CARD_ARGS)}")
    _check_card_args("write_model_card", output_dir, **card_args)
    card = render_model_card(output_dir, **card_args)
    path = Path(output_dir) / CARD_FILE
    atomic_write_text(path, str(card))
    return path


def is_generated_card(path: str | os.PathLike) -> bool:
    """Whether the file at `path` is a model card this library rendered: its last non-empty line carries the
    generated mark. A card a user wrote more under is theirs (`push` uploads it as it is).

    Args:
        path (`str` or `os.PathLike`): a README.md.

    Returns:
        `bool`: `False` also when the file is missing or not UTF-8 text.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").rstrip().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return bool(lines) and GENERATED_MARK in lines[-1]
