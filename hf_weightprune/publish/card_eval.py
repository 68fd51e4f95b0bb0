"""The Evaluation of a pruned model's card and its `model-index`, from the `eval` entry of `sparsity.json`.

The Hub reads a model-index result's `dataset.type` as a dataset id and links it to `hf.co/datasets/<type>`
(`huggingface_hub.EvalResult`). The card lists results there only for a Hub dataset id its writer was given; a local
file or folder (what `prune --eval_data` and `sweep` read) is named in the card's text only, as transformers'
`TrainingSummary` leaves out the local `csv` / `json` / `text` builders: no Hub id is claimed that was not given.
"""

from __future__ import annotations

import math
import os
from typing import Any

from huggingface_hub import EvalResult
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..files.pruned_files import reference_name, reference_words
from ..io_utils import is_local_path, path_name
from ..perplexity import perplexity, perplexity_text

_EVAL_KEYS = ("dataset", "tokens", "step")
# The keys of the `eval` entry that name evaluation data: the shared one and the per-side overrides.
_DATA_KEYS = ("dataset", "dense_dataset", "pruned_dataset")
# Files `--eval_data` and `load_texts` read: a value ending so is a local file, whatever its folders.
_DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet", ".arrow", ".md")


def eval_metadata(report: dict, prefix: str) -> dict[str, Any]:
    """`{dataset, tokens, step}` of one side of the `eval` entry; `dense_step` (etc.) override the shared keys."""
    return {key: report.get(f"{prefix}{key}", report.get(key)) for key in _EVAL_KEYS}


def _looks_local(text: str) -> bool:
    """An absolute or `./`-relative path, one with more than one folder, or a text/data file name: no Hub id."""
    return is_local_path(text) or text.replace("\\", "/").count("/") > 1 or text.lower().endswith(_DATA_SUFFIXES)


def dataset_name(value: Any) -> str:
    """The evaluation data as the card names it: a Hub dataset id (`org/name`) as given, a local file or folder by its
    name only (an absolute or `./`-relative path, one with more than one folder, or a text/data file name)."""
    if not value:
        return "unknown"
    text = str(value)
    return path_name(text) if _looks_local(text) else text


def eval_record(evaluation: dict) -> dict:
    """The `eval` entry as `sparsity.json` records it: local evaluation data by its file or folder name with
    `<key>_is_local: true` beside it (the name alone could read as a Hub id), a Hub dataset id as given.

    Args:
        evaluation (`dict`): the `eval_results` given to `save_pruned` (or an older `sparsity.json`'s `eval`).

    Returns:
        `dict`: a new dict; data that exists on this machine, or that reads as a path or a data file, is local.
    """
    out = dict(evaluation)
    for key in _DATA_KEYS:
        value = evaluation.get(key)
        if isinstance(value, str) and value and (os.path.exists(value) or _looks_local(value)):
            out[key], out[f"{key}_is_local"] = path_name(value), True
    return out


def hub_dataset_id(report: dict) -> str | None:
    """The Hub dataset id the pruned model was evaluated on, or `None`: data recorded as local, a name that reads as
    a path or a data file, or no valid repo id.

    Args:
        report (`dict`): the `eval` entry of `sparsity.json`.

    Returns:
        `str` or `None`: the id, for the model-index's `dataset.type`.
    """
    key = "pruned_dataset" if report.get("pruned_dataset") is not None else "dataset"
    value = report.get(key)
    if not isinstance(value, str) or report.get(f"{key}_is_local") or _looks_local(value):
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def reference_phrase(input_sparsity: float | None, pruned_input: bool = False) -> str:
    """[`~files.pruned_files.reference_name`] inside a sentence: "the dense model", "the input model (50.0% sparse)",
    "the input model" (a pruned input whose share of zeros was not recorded)."""
    return reference_words(reference_name(input_sparsity, pruned_input))


def eval_context(report: dict | None, pruned_input: bool = False) -> tuple[dict | None, list[EvalResult] | None]:
    """
    `(template context, model-index results)` of the `eval` entry of `sparsity.json`, or `(None, None)`.

    The dense loss is compared with the pruned loss only when both come from the same evaluation: the same
    `dataset` and number of `tokens`, both stated, and the same training `step` when either states one (a dense model
    evaluated at the step pruning started is not the same model as the pruned one at the end of training; a one-shot
    prune, as `prune --eval_data`, evaluates both on the same windows with no training in between and states no
    step). Otherwise the dense numbers are dropped from the card, which says why. The model-index lists only the
    pruned model's results: they are this model's; the dense loss belongs to another model. It lists them only when
    the data is a Hub dataset id ([`hub_dataset_id`]): its `dataset.type` must be one.

    The `dense_loss` is the loss of the model this one was pruned from, named by what it held
    ([`~files.pruned_files.reference_name`]): "Dense" when the `input_sparsity` recorded beside it is 0 (or when none
    is recorded and the input was no pruned folder), else "Input model (50.0% sparse)", or "Input model" for a
    pruned input whose share was not recorded (a file of an earlier version, or a caller's `eval_results`).

    Args:
        report (`dict`, *optional*): the `eval` entry of `sparsity.json`.
        pruned_input (`bool`, *optional*, defaults to `False`): the model was pruned from a pruned folder
            (`sparsity.json`'s `earlier_prunes`).

    Returns:
        `tuple`: the template's `eval` context (or `None` without a pruned loss; `reference` names the model
        `dense_loss` was measured on, `reference_model` as a sentence does: "input model (50.0% sparse)") and the `EvalResult`s of the model-index (`None`
        without a pruned loss or without a Hub dataset id).
    """
    if not report or report.get("pruned_loss") is None:
        return None, None
    pruned_meta, dense_meta = eval_metadata(report, "pruned_"), eval_metadata(report, "dense_")
    dataset = dataset_name(pruned_meta["dataset"])
    dense_loss, pruned_loss = report.get("dense_loss"), report["pruned_loss"]
    name = reference_name(report.get("input_sparsity"), pruned_input)  # "Dense", "Input model (50.0% sparse)"
    side = "dense" if name == "Dense" else "input"
    dropped = None
    if dense_loss is not None:
        unstated = [k for k in ("dataset", "tokens") if pruned_meta[k] is None or dense_meta[k] is None]
        differ = [f"{k} {dense_meta[k]!r} ({side}) vs {pruned_meta[k]!r} (pruned)" for k in _EVAL_KEYS
                  if k not in unstated and dense_meta[k] != pruned_meta[k]]
        if unstated or differ:
            dropped = ("; ".join(differ) if differ else
                       f"the evaluation does not state its {' and '.join(unstated)}")
            dense_loss = None
    context = {"dataset": dataset, "tokens": pruned_meta["tokens"], "step": pruned_meta["step"],
               "dense_loss": dense_loss, "pruned_loss": pruned_loss, "dense_dropped": dropped,
               "reference": name, "reference_model": reference_words(name).removeprefix("the "),
               "dense_perplexity": perplexity(dense_loss), "pruned_perplexity": perplexity(pruned_loss),
               # the table's text: "overflow (> 1e308)" where exp(loss) is no float (`hf_weightprune.perplexity`)
               "dense_perplexity_text": perplexity_text(dense_loss), "pruned_perplexity_text": perplexity_text(pruned_loss)}
    dataset_id = hub_dataset_id(report)
    if dataset_id is None:
        return context, None
    metrics = [("loss", pruned_loss, "Eval loss"), ("perplexity", context["pruned_perplexity"], "Perplexity")]
    # The Hub's YAML has no honest inf / nan: a perplexity that overflows (or a loss that is no number) is left out
    results = [EvalResult(task_type="text-generation", dataset_type=dataset_id, dataset_name=dataset_id,
                          metric_type=kind, metric_value=value, metric_name=label) for kind, value, label in metrics
               if value is not None and math.isfinite(value)]
    return context, results or None


