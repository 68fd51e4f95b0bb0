"""The model card of a pruned checkpoint: rendered from its `sparsity.json` (and `sweep.json`), written atomically.

No network access: [`push_pruned_to_hub`] (hub.py) calls this module; this module never calls the Hub.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .._version import __version__
from ..files.pruned_files import SPARSITY_NAME, SWEEP_PNG, has_tokenizer, load_sparsity
from ..io_utils import atomic_write_text, check_arg_type, is_local_path, plural
from ..validation import parse_structure, structure_parts
from . import card_text as T
from .card_eval import eval_context, reference_phrase
from .card_lineage import achieved_units_text, lineage_context, statistics_source
from .card_measured import buys_context, measured_text
from .card_refs import references, tags
from .card_schedule import restarts_statistics, schedule_context

CARD_FILE = "README.md"
CARD_TEMPLATE = "pruned_model_card.md"
# The last line of every card this library renders: how `push_pruned_to_hub` tells its own card from a user's.
GENERATED_MARK = "Card written by hf-weightprune"

_STRUCTURES = {
    "unstructured": ("unstructured sparsity", "unstructured-sparsity", "any individual weight can be zeroed"),
    "neurons": ("structured pruning of MLP neurons", "structured-pruning", "whole MLP neurons are removed"),
    "heads": ("structured pruning of attention heads", "structured-pruning", "whole attention heads are removed"),
    "hidden": ("structured pruning of hidden channels", "structured-pruning",
               "whole channels of the residual stream are removed"),
    "layers": ("depth pruning", "structured-pruning", "whole decoder layers are removed"),
    "experts": ("whole-expert pruning", "expert-pruning",
                "whole experts of every MoE layer are removed, those the router sent the fewest tokens during training"),
}

_SCOPES = {
    "global": "one threshold for all prunable tensors",
    "layer": "the same sparsity in every tensor",
    "row": "the same sparsity in every row of every tensor",
}


def _scope_detail(sparsity: dict, scope: str) -> str:
    """What the scope kept equal. OWL and a per-module target give the tensors different sparsities: then say how
    (with OWL's range) rather than "the same sparsity in every tensor"."""
    values = [t["sparsity"] for t in (sparsity.get("tensors") or {}).values()]
    owl, per_module = sparsity.get("allocation") == "owl", isinstance(sparsity.get("target_sparsity"), dict)
    if scope not in ("layer", "row") or not values or not (owl or per_module):
        return _SCOPES.get(scope, "custom")
    rows = "the same sparsity in every row of a tensor; " if scope == "row" else ""
    if owl:
        return (f"{rows or 'the same sparsity in every tensor of a decoder layer; '}each layer's set by OWL (the tensors "
                f"from {100 * min(values):.2f}% to {100 * max(values):.2f}%)")
    return f"{rows}each tensor at the target of the pattern its name matches"


def _read_template() -> str:
    """The card template, shipped as package data (`hf_weightprune/model_cards/`)."""
    try:
        return resources.files("hf_weightprune").joinpath("model_cards", CARD_TEMPLATE).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"The model card template {CARD_TEMPLATE!r} is missing from the hf_weightprune "
                                "installation; reinstall the package") from None


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
    parts = structure_parts(structure)
    if parts:  # a combination, e.g. "layers,neurons"
        return (f"structured pruning of {' and '.join(T.structured_units(p) for p in parts)}", "structured-pruning",
                "whole units of each of these kinds are removed")
    try:
        kind, nm = parse_structure(structure)
    except ValueError:
        return structure, f"{structure}-sparsity", None
    if kind != "N:M" or nm is None:
        return structure, f"{structure}-sparsity", None
    n, m = nm  # N of every M weights are kept
    return (f"{n}:{m} semi-structured sparsity", f"{n}:{m}-sparsity",
            f"{m - n} of every {m} consecutive weights in a row are zero")


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
            License id. Defaults to `sparsity.json["license"]` (the base model's, recorded by `save_pruned`), then
            to the `license` of an existing README.md or of `config.json`, if any.
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
    config = T.read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    existing = _existing_card_data(folder)

    base_model = base_model or sparsity.get("base_model") or existing.get("base_model")
    if is_local_path(base_model):  # a local folder is no base model a Hub visitor can follow
        base_model = None
    license = license or sparsity.get("license") or existing.get("license") or config.get("license")
    datasets = sparsity.get("datasets") or existing.get("datasets")
    structure = sparsity["structure"]
    criterion = sparsity.get("criterion") or (sparsity.get("importance") or {}).get("criterion")
    if criterion == "unknown":  # what reports of earlier versions recorded for a missing source
        criterion = (sparsity.get("importance") or {}).get("criterion")
    repo_id = repo_id or folder.resolve().name
    model_name = repo_id.split("/")[-1]
    eval_ctx, eval_results = eval_context(sparsity.get("eval"), pruned_input=bool(sparsity.get("earlier_prunes")))

    card_data = ModelCardData(
        base_model=base_model,
        datasets=datasets,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=tags(sparsity, criterion, structure_info(structure)[1]),
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )
    return ModelCard.from_template(
        card_data, template_str=_read_template(), model_title=f"{model_name} ({_structure_words(sparsity)[0]})",
        repo_id=repo_id, **_body_context(folder, sparsity, criterion), eval=eval_ctx,
    )


def _how(sparsity: dict) -> tuple[str, str]:
    """`(intro verb phrase, kind)`: how the model was pruned, from the recorded schedule; kind is `"gradual"`,
    `"hold"` or `"one-shot"`."""
    schedule = sparsity.get("schedule")
    if isinstance(schedule, dict) and schedule.get("mode") == "hold":
        return "pruned once, then fine-tuned with its mask held", "hold"
    if isinstance(schedule, dict):
        return "pruned during fine-tuning", "gradual"
    if isinstance(sparsity.get("distillation"), dict):  # no schedule: the distillation trained the pruned model
        return "pruned in one shot, then fine-tuned with distillation", "one-shot"
    if isinstance(sparsity.get("training"), dict):
        return "pruned in one shot, then fine-tuned", "one-shot"
    return "pruned in one shot", "one-shot"


def _body_context(folder: Path, sparsity: dict, criterion: str | None) -> dict[str, Any]:
    """Template variables of the card body that come from `sparsity.json` and the folder's files."""
    structure = sparsity["structure"]
    label, detail = _structure_words(sparsity)
    detail = "; ".join(filter(None, [detail, T.round_to_text(sparsity.get("structured"))])) or None
    structured_rows = T.structured_rows(sparsity.get("structured"))
    formula, reference = T.criterion_text(criterion)
    if structure == "experts":
        formula = T.EXPERTS_CRITERION
    changed_axes = T.changed_axes(sparsity.get("structured"), structure)
    ranking = T.weight_ranking_text(sparsity.get("structured"), changed_axes)
    formula = T.unit_ranking_text(sparsity.get("structured"), changed_axes) or (f"{formula}; {ranking}" if ranking
                                                                                  else formula)
    try:
        nm = parse_structure(structure)[1]
    except ValueError:
        nm = None
    how, kind = _how(sparsity)
    importance = sparsity.get("importance") or {}
    structured = bool(sparsity.get("structured"))
    scope = sparsity.get("scope") or "layer"
    if structured:
        parts = structure.split(",")
        changed = T.changed_axes(sparsity.get("structured"), structure).split(",")
        # per-layer widths; hidden channels are one residual stream, the same channels gone from every layer
        width = ",".join(p for p in changed if p not in ("layers", "hidden"))
        scope_detail = "; ".join(filter(None, [
            f"the same number of {T.structured_units(width)} removed in every decoder layer" if width else None,
            "the same hidden channels removed from every layer" if "hidden" in changed else None,
            *(f"no {_UNIT_SINGULAR[p]} removed at this budget" for p in parts if p not in changed),
            "whole decoder layers removed" if "layers" in changed else None]))
        if (sparsity.get("structured") or {}).get("unit") == "expert_neuron":
            scope_detail = T.EXPERT_NEURON_SCOPE
    else:
        scope_detail = _scope_detail(sparsity, scope)
    return {
        "library_version": sparsity.get("library_version") or __version__,
        "format_version": sparsity.get("format_version", 1),
        "how": how,
        "kind": kind,
        "trained": bool(importance.get("step")),
        # the statistics were gathered while this very model trained, so it is not its base model as published: the
        # intro says so (a cross-term run trained a pruned copy; this model, its teacher, did not train)
        "trained_first": kind == "one-shot" and bool(importance.get("step")) and not T.offline_cross_context(sparsity)
                         and not sparsity.get("cross_term"),
        "structure": structure,
        "structure_label": label,
        "structure_detail": detail,
        "nm": {"kept": nm[0], "group": nm[1], "zeros": nm[1] - nm[0]} if nm else None,
        "structured": structured_rows,
        # what changed (a combination under a budget may leave an axis as it was: the table shows every row)
        "structured_summary": ", ".join(f"{_lower_first(r['name'])} {r['before']} -> {r['after']}"
                                        for r in structured_rows if r["before"] != r["after"]),
        # the units that were removed: a combination under a budget may leave an axis untouched
        "structure_units": T.structured_units(T.changed_axes(sparsity.get("structured"), structure)),
        "compensation": (sparsity.get("structured") or {}).get("compensation"),
        # the consumers a compensation changed: those of the removed neurons and KV groups only
        "consumers": " / ".join(f"`{c}`" for axis, c in (("neurons", "down_proj"), ("heads", "o_proj"))
                                if axis in changed) or "`down_proj` / `o_proj`" if structured else "",
        "bias_added": ", ".join(f"`{f}=True`" for f in (sparsity.get("structured") or {}).get("bias_added") or []),
        "scope": scope,
        "scope_detail": scope_detail,
        "reconstruction": sparsity.get("reconstruction"),
        "cross_term": T.offline_cross_context(sparsity),
        "allocation": sparsity.get("allocation") or "uniform",
        "lineage": lineage_context(sparsity),
        # appended to "gathered during training": an importance cut to a structured prune's kept units (the CLI's)
        "stats_of": f" of {statistics_source(sparsity)}" if statistics_source(sparsity) else "",
        "target_achieved": achieved_units_text(sparsity.get("structured"), sparsity.get("target_sparsity")),
        "target_sparsity_text": (T.structured_target_text(sparsity.get("structured"))
                                 or T.target_text(sparsity.get("target_sparsity"))
                                 # a structured sparsity is a share of units, not of weights
                                 + (f" of the {T.structured_units(structure)}" if structured else "")),
        "global_sparsity": float(sparsity.get("global_sparsity") or 0.0),
        "model_sparsity": float(sparsity.get("model_sparsity") or 0.0),
        "criterion": criterion,
        "criterion_formula": formula,
        "criterion_reference": reference,
        # a pruned-stream schedule restarted the statistics at every mask change: the counts are the last window's
        "importance_summary": ("the last mask update's, restarted at every mask change: " if kind == "gradual"
                               and restarts_statistics(sparsity) else "") + T.importance_summary(importance, criterion),
        "schedule": schedule_context(sparsity),
        "distillation": T.distillation_context(sparsity.get("distillation")),
        "training": training_context(sparsity.get("training"), kind),
        "module_table": (T.structured_module_table(folder, sparsity.get("structured"), structure) if structured
                         else T.module_table(sparsity["tensors"])),
        "routing": T.routing_rows(sparsity.get("routing")),
        "measured": measured_text(sparsity.get("measured"), structured, sparsity),
        "buys": buys_context(sparsity),
        "search": search_text(sparsity.get("search"), pruned_input=bool(sparsity.get("earlier_prunes"))),
        "references": references(criterion, sparsity),
        "sweep_rows": T.sweep_rows(folder, criterion),
        "sweep": T.sweep_context(T.sweep_rows(folder, criterion), structure, structured),
        "has_plot": (folder / SWEEP_PNG).is_file(),
        "has_tokenizer": has_tokenizer(folder),
        "generated_mark": GENERATED_MARK,
        "sparsity_file": SPARSITY_NAME,
    }


def _lower_first(name: str) -> str:
    """`"Decoder layers"` -> `"decoder layers"`; an acronym stays (`"MLP intermediate size"`)."""
    return name if name[1:2].isupper() else name[:1].lower() + name[1:]


_UNIT_SINGULAR = {"layers": "decoder layer", "neurons": "MLP neuron", "heads": "attention head",
                  "hidden": "hidden channel"}


def _structure_words(sparsity: dict) -> tuple[str, str | None]:
    """`(label, explanation)` of the structure, naming only the units that were removed: a combination under a
    `target_params` budget may leave an axis as it was (`"layers,neurons"` that removed no layer is a neuron prune)."""
    structure = sparsity["structure"]
    label, _, detail = structure_info(structure)
    changed = T.changed_axes(sparsity.get("structured"), structure)
    if "," not in structure or changed == structure:
        return label, detail
    kept = [p for p in structure.split(",") if p not in changed.split(",")]
    label, _, detail = structure_info(changed)
    return label, f"{detail} ({T.structured_units(','.join(kept))} could also be removed; none were at this budget)"


def training_context(training: Any, kind: str) -> dict[str, str] | None:
    """The card's line on how long the model trained, from the `training` entry of `sparsity.json` (`None` without
    one, as in files written before it existed).

    Args:
        training (`dict`, *optional*): `{"steps", "tokens"}`, as `ImportanceCallback.training_record()` counted them.
        kind (`str`): `"gradual"`, `"hold"` or `"one-shot"` (see `_how`): a gradual run's training pruned it, the
            others' recovered it.

    Returns:
        `dict[str, str]` or `None`: `label` (`"Training"` or `"Recovery"`) and `text`.
    """
    if not isinstance(training, dict) or not all(isinstance(training.get(k), int) for k in ("steps", "tokens")):
        return None
    steps, tokens = training["steps"], training["tokens"]
    text = (f"{plural(steps, 'optimizer step')}, {tokens:,} training tokens (padding excluded), "
            "counted while it trained")
    return {"label": "Training" if kind == "gradual" else "Recovery", "text": text}


def search_text(search: dict | None, pruned_input: bool = False) -> str | None:
    """One sentence from the `search` entry of `sparsity.json`: which candidate shape was chosen, by what loss, and
    the loss of the model searched from, named by [`~card_eval.reference_phrase`] ("the input model (50.0% sparse)")."""
    rows = (search or {}).get("candidates") or []
    chosen = search.get("chosen") if rows else None
    if not isinstance(chosen, int) or not 0 <= chosen < len(rows):
        return None
    varying = [k for k in ("unit_statistic", "compensate") if len({str(r["config"].get(k)) for r in rows}) > 1]

    def label(row):
        words = {"unit_statistic": "statistic", "compensate": "compensation"}  # no compensation: "none", not None
        extra = ", ".join(f"{words[k]} {row['config'].get(k) or 'none'}" for k in varying)
        return f"`{row['config']['structure']}`" + (f" ({extra})" if extra else "")

    def params(row):
        return f" at {row['num_parameters']:,} parameters" if isinstance(row.get("num_parameters"), int) else ""

    def other(row):
        if row.get("skipped") is not None:
            return f"{label(row)} skipped (the reason is in {SPARSITY_NAME})"
        if isinstance(row.get("same_as"), int) and 0 <= row["same_as"] < len(rows):  # scored once, as that one
            return f"{label(row)} the same pruned model as {label(rows[row['same_as']])}"
        return f"{label(row)} {_loss(row.get('loss'))}{params(row)}"

    others = [other(r) for i, r in enumerate(rows) if i != chosen]
    distinct = sum(1 for r in rows if r.get("skipped") is None and r.get("same_as") is None)
    ties = [r for i, r in enumerate(rows) if i != chosen and r.get("skipped") is None and r.get("same_as") is None
            and r.get("loss") == rows[chosen]["loss"]]
    lowest = "the lowest" if not ties else f"the lowest, tied with {', '.join(map(label, ties))} (the first given)"
    reference = reference_phrase(search.get("input_sparsity"), pruned_input)  # "the dense model", "the input model"
    distilled = f" distilled from {reference}" if search.get("distillation") else ""
    ran = [t for t in (r.get("training") for r in rows)
           if isinstance(t, dict) and all(isinstance(t.get(k), int) for k in ("steps", "tokens"))]
    if ran:  # measured: what each candidate's recovery Trainer ran
        how = f"after {_span(ran, 'steps')} optimizer steps of recovery{distilled} ({_span(ran, 'tokens')} training " \
              "tokens, padding excluded, counted while each recovered)"
    else:  # written before the recovery was measured: the steps asked for
        steps = search.get("recovery_steps") or 0
        how = f"after {plural(steps, 'step')} of recovery{distilled}" if steps else "one-shot"
    shapes = f" ({plural(distinct, 'distinct pruned model')})" if any(r.get("same_as") is not None for r in rows) else ""
    return (f"the shape was chosen by measured loss among {plural(len(rows), 'candidate')}{shapes} of the same budget, "
            f"each pruned and scored {how} by its mean loss on {plural(search.get('windows') or 0, 'window')} of "
            f"training text ({search.get('tokens'):,} tokens): {label(rows[chosen])} {_loss(rows[chosen].get('loss'))}"
            f"{params(rows[chosen])}, {lowest}" + (f" (others: {'; '.join(others)})" if others else "")
            + f"; {reference[4:]} {_loss(search.get('dense_loss'))}")


def _loss(value) -> str:
    """A recorded loss; `null` in `sparsity.json` is one that was no finite number (a diverged candidate)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) else "no finite loss (diverged)"


def _span(records: list[dict], key: str) -> str:
    """`"12,288"` when every record has that count, else `"12,000 to 12,288"`."""
    low, high = min(r[key] for r in records), max(r[key] for r in records)
    return f"{low:,}" if low == high else f"{low:,} to {high:,}"


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
