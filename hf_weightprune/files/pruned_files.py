"""The files of a pruned folder: their names, and `sparsity.json` both ways (its payload, writer, reader, version).

A pruned folder (written by `export.save_pruned` / `export.prune_checkpoint`) is a standard HF checkpoint plus
`sparsity.json` (what was pruned, measured from the weights written), a `README.md` model card, and, when a sweep ran,
`sweep.csv` / `sweep.json` / `sweep.png`. `export` writes them, `card` renders from them, `hub` uploads them; this
module holds what all three must agree on, so none of them imports another for a file name. The keep-masks of a
pruned folder ([`load_masks`], what `PruneSchedule(mode="hold")` holds) are read here too.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from .._version import __version__
from ..io_utils import check_arg_type, plural
from . import safetensors_io as sio

if TYPE_CHECKING:
    from ..prune.report import PruningReport

SPARSITY_NAME = "sparsity.json"
SPARSITY_FORMAT_VERSION = 1
SWEEP_CSV = "sweep.csv"
SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"
# The first row of `sweep.json`: the model the sweep was given, evaluated as it is. `"dense"` (criterion and
# structure) when none of its prunable weights is zero, else `"input"`, with the share of zeros measured in
# `input_sparsity` (and, in an unstructured / N:M sweep, in `sparsity`: its place on the sparsity axis).
SWEEP_REFERENCES = ("dense", "input")
# The files a tokenizer's vocabulary is read from (the `vocab_files_names` of transformers' tokenizer classes). A
# folder without any holds no tokenizer, whatever else it has: `AutoTokenizer` builds an empty, 1-token
# `Qwen2Tokenizer` for a Qwen2/Qwen3 folder without one (even with tokenizer_config.json) instead of raising.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                         "sentencepiece.bpe.model", "sentencepiece.model", "spm.model")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether a model folder holds a tokenizer: one of [`TOKENIZER_VOCAB_FILES`] (tokenizer_config.json alone is no
    tokenizer)."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_VOCAB_FILES)


class NotAPrunedCheckpointError(FileNotFoundError, ValueError):
    """A folder has no `sparsity.json`. Both a `FileNotFoundError` and a `ValueError`, as callers caught either."""


def load_sparsity(path: str | os.PathLike) -> dict[str, Any]:
    """Read `sparsity.json` from a pruned checkpoint folder: the one reader of that file.

    Args:
        path (`str` or `os.PathLike`): a folder written by `save_pruned` or `prune_checkpoint`.

    Returns:
        `dict[str, Any]`: the payload (schema in docs/file_formats.md); it has at least `"structure"` and
        `"tensors"` (`{name: {"shape", "numel", "sparsity"}}`, sparsity a fraction in [0, 1]).

    Raises:
        TypeError: `path` is not a str or os.PathLike.
        FileNotFoundError: the folder does not exist.
        NotAPrunedCheckpointError: the folder has no `sparsity.json` (a `FileNotFoundError` and a `ValueError`).
        ValueError: `sparsity.json` is not valid JSON or lacks `"structure"` / `"tensors"`.
    """
    check_arg_type("load_sparsity", "path", path, (str, os.PathLike), "a folder path (str or os.PathLike)")
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Pruned model folder {folder!r} does not exist")
    file = os.path.join(folder, SPARSITY_NAME)
    if not os.path.isfile(file):
        raise NotAPrunedCheckpointError(f"{folder!r} is not a pruned checkpoint: it has no {SPARSITY_NAME}")
    try:
        with open(file, encoding="utf-8") as f:
            payload = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(payload, dict) or "structure" not in payload or "tensors" not in payload:
        raise ValueError(f"{file} is not a valid hf-weightprune sparsity report (no \"structure\"/\"tensors\")")
    return payload


def sweep_reference(input_sparsity: float) -> dict[str, Any]:
    """The naming fields of a sweep's reference row: `{"criterion": "dense", "structure": "dense"}` for an input
    without zeros, else `{"criterion": "input", "structure": "input", "input_sparsity": input_sparsity}`.

    Args:
        input_sparsity (`float`): the share of exact zeros measured in the input model's prunable weights, in [0, 1].

    Returns:
        `dict[str, Any]`: the fields to start the row with (the caller adds its sparsity, loss, ...).
    """
    if not input_sparsity:
        return {"criterion": "dense", "structure": "dense"}
    return {"criterion": "input", "structure": "input", "input_sparsity": float(input_sparsity)}


def is_sweep_reference(row: Any) -> bool:
    """Whether a row of `sweep.json` is its reference row (the input model as given, [`sweep_reference`])."""
    return isinstance(row, dict) and row.get("criterion") in SWEEP_REFERENCES and row.get("structure") in SWEEP_REFERENCES


def sweep_reference_name(row: Any) -> str:
    """What the reference row is, in words: `"Dense"`, or `"Input model (50.0% sparse)"` for an input that already
    held zeros ([`reference_name`])."""
    if not isinstance(row, dict) or row.get("criterion") != "input":
        return "Dense"
    return reference_name(row.get("input_sparsity"), pruned_input=True)


def reference_name(input_sparsity: float | None, pruned_input: bool = False) -> str:
    """The model a loss "before pruning" was measured on, named by what it held: a sweep's reference row, the `eval`
    entry's `dense_loss` (`prune --eval_data`), a structure search's `dense_loss`.

    Args:
        input_sparsity (`float`, *optional*): the share of exact zeros measured in its prunable weights
            (`prune.report.measure_input`); `None` when not measured (a file written before it was recorded).
        pruned_input (`bool`, *optional*, defaults to `False`): the input is known to be a pruned model (a folder
            with `earlier_prunes`, an `"input"` row) though its share was not measured.

    Returns:
        `str`: `"Dense"` (no zero measured, or nothing measured of an input not known to be pruned),
        `"Input model (50.0% sparse)"` (a share under 0.05% keeps two significant digits, so it never reads as
        0.0%), or `"Input model"` (pruned, not measured).
    """
    if input_sparsity is None:
        return "Input model" if pruned_input else "Dense"
    if not input_sparsity:
        return "Dense"
    share = float(input_sparsity)
    percent = f"{100 * share:.1f}" if share >= 0.0005 else f"{100 * share:.2g}"
    return f"Input model ({percent}% sparse)"


def reference_words(name: str) -> str:
    """[`reference_name`] inside a sentence: `"the dense model"`, `"the input model (50.0% sparse)"`."""
    return "the dense model" if name == "Dense" else f"the {name[0].lower()}{name[1:]}"


def stored_num_parameters(folder: str | os.PathLike) -> int | None:
    """The parameters a checkpoint folder stores, from its safetensors headers (no tensor is read; a tied weight is
    stored, and counted, once); `None` when the folder holds no readable safetensors weights."""
    try:
        weight_map = sio.weight_map(folder)
        headers = [sio.read_header(os.path.join(folder, shard)) for shard in sorted(set(weight_map.values()))]
    except (FileNotFoundError, ValueError, OSError):
        return None
    return sum(math.prod(v["shape"]) for h in headers for k, v in h.items() if k != "__metadata__")


def _training_of(payload: dict[str, Any]) -> dict[str, Any]:
    """How the pruned folder's weights were trained after (or while) it was pruned: what its input model is beyond the
    units removed. `training` (`steps`, `tokens`, or `None`), `distilled`, `schedule_mode` (`"prune"`: pruned during
    fine-tuning; `"hold"`: fine-tuned with its mask held; `None`: no schedule)."""
    schedule = payload.get("schedule") if isinstance(payload.get("schedule"), dict) else {}
    training = payload.get("training") if isinstance(payload.get("training"), dict) else None
    return {"training": training, "distilled": isinstance(payload.get("distillation"), dict),
            "schedule_mode": schedule.get("mode")}


def earlier_prunes(folder: str | os.PathLike) -> list[dict[str, Any]] | None:
    """The prunes a pruned folder went through, oldest first, as the `earlier_prunes` of a model pruned from it.

    Each entry says what one prune removed: `structure`, `criterion`, `target_sparsity`, `global_sparsity` /
    `model_sparsity` (shares of the model it pruned), `base_model`, `num_parameters` `{"before", "after"}` (equal for
    an unstructured or N:M prune, which zeroes weights and removes none), `config` (the sizes before and after a
    structured prune, else `None`), and how its weights were trained after or while it was pruned (`training`,
    `distilled`, `schedule_mode`: a recovery changes the model the next prune starts from). The folder's own `earlier_prunes` come first (a chain of any length).

    Args:
        folder (`str` or `os.PathLike`): the model folder about to be pruned.

    Returns:
        `list[dict]` or `None`: `None` when the folder is not a pruned checkpoint (no or invalid `sparsity.json`).
    """
    try:
        payload = load_sparsity(folder)
    except (FileNotFoundError, ValueError):
        return None
    structured = payload.get("structured") if isinstance(payload.get("structured"), dict) else {}
    count = structured.get("num_parameters") or {}
    if not (isinstance(count.get("before"), int) and isinstance(count.get("after"), int)):
        stored = stored_num_parameters(folder)  # zeroed in place: the folder stores as many as it was given
        count = {"before": stored, "after": stored}
    entry = {key: payload.get(key) for key in ("structure", "criterion", "target_sparsity", "global_sparsity",
                                               "model_sparsity", "base_model")}
    entry.update(num_parameters={"before": count["before"], "after": count["after"]},
                 config=structured.get("config"), **_training_of(payload))
    earlier = [e for e in payload.get("earlier_prunes") or [] if isinstance(e, dict)]
    return [*earlier, entry]


def _absolute_importance(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """`report.importance` with a local `path` made absolute: relative to the folder `prune` ran in, it broke
    `push --include_importance` from any other folder. Hub ids and missing paths are kept as given."""
    if not info or not isinstance(info.get("path"), str) or not os.path.isdir(info["path"]):
        return info
    return {**info, "path": os.path.abspath(info["path"])}


def sparsity_dict(report: PruningReport, *, base_model: str | None = None, schedule: dict | None = None,
                  distillation: dict | None = None, training: dict | None = None,
                  eval_results: dict | None = None, measured: dict | None = None) -> dict[str, Any]:
    """The `sparsity.json` payload (schema documented in docs/file_formats.md).

    Args:
        report (`PruningReport`): what `prune_` or `prune_checkpoint` returned.
        base_model (`str`, *optional*): Hub id of the dense model.
        schedule (`dict`, *optional*): `PruneSchedule.to_dict()` of a gradual run (or of a recovery with the mask
            held, `mode="hold"`).
        distillation (`dict`, *optional*): `DistillConfig.to_dict()` of the run's distillation.
        training (`dict`, *optional*): `{"steps", "tokens"}` of the training after (or while) pruning, as the callback
            counted it (`ImportanceCallback.training_record()`).
        eval_results (`dict`, *optional*): `{"dense_loss", "pruned_loss", "dataset"}`, and `input_sparsity` (the
            share of zeros measured in the model `dense_loss` was measured on) when given.
        measured (`dict`, *optional*): what was measured of the written folder (`publish/measure.py`):
            `{"weight_files": {"bytes", "dtype"}, "dense_weight_files": ... or None, "speed": ... or None}`.

    Returns:
        `dict[str, Any]`: a JSON-serialisable dict (sparsities are fractions in [0, 1]).
    """
    return {
        "format_version": SPARSITY_FORMAT_VERSION,
        "library": "hf-weightprune",
        "library_version": __version__,
        "structure": report.structure,
        "scope": report.scope,
        "target_sparsity": report.target_sparsity,
        "global_sparsity": report.global_sparsity,
        "model_sparsity": report.model_sparsity,
        "criterion": report.criterion,
        "importance": _absolute_importance(report.importance),
        "base_model": base_model,
        "tensors": report.tensors,
        "reconstruction": report.reconstruction,
        "cross_term": report.cross_term,
        "allocation": report.allocation,
        "structured": report.structured,
        "routing": report.routing,
        "schedule": schedule,
        "distillation": distillation,
        "training": training,
        "eval": eval_results,
        "measured": measured,
        "search": report.search,
        "refitted_at": report.refitted_at,
        # filled in by `publish.provenance.complete_payload` when the model was pruned from a pruned folder
        "earlier_prunes": None,
    }


def dump_sparsity(payload: dict[str, Any]) -> str:
    """`sparsity.json`'s text for `payload`: the one serialisation, for the folder and for the Hub's copy. Strict
    JSON: a number that is not finite (a search candidate's loss after a diverged recovery, a perplexity that
    overflowed in a caller's `eval_results`) is written as `null`, as `sweep.json` does; JSON has no inf / nan."""
    return json.dumps(_finite(payload), indent=2, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_sparsity(folder: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write `payload` (from [`sparsity_dict`]) as `folder/sparsity.json` (a folder being written atomically)."""
    with open(os.path.join(folder, SPARSITY_NAME), "w", encoding="utf-8") as f:
        f.write(dump_sparsity(payload))


def load_masks(path: str | os.PathLike, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks of a pruned checkpoint: `weight != 0` for every tensor its `sparsity.json` lists.

    Read from the checkpoint's safetensors files (one tensor at a time), not from a model in memory. A checkpoint
    pruned by another tool has no `sparsity.json`: pass `names` (the weights to mask) and the masks are their zeros.
    With a `sparsity.json`, each weight must have at least as many zeros as it records as pruned (a cheap check that
    catches tensors swapped between names, unless they have the same sparsity).

    Args:
        path (`str` or `os.PathLike`): a folder written by `save_pruned` or `prune_checkpoint`, or any safetensors
            checkpoint (with `names`).
        names (`list[str]`, *optional*): the weights to read when the folder has no `sparsity.json`; ignored when
            it has one (its list is used).

    Returns:
        `dict[str, torch.Tensor]`: `{name: bool tensor shaped like the weight}`, `True` where the weight is kept.

    Raises:
        FileNotFoundError: no safetensors weights in the folder, or no `sparsity.json` and no `names`.
        ValueError: no tensors to mask, tensors the checkpoint does not hold, or a weight with fewer zeros than
            `sparsity.json` records.
    """
    path = os.fspath(path)
    recorded: dict[str, Any] = {}
    if os.path.isfile(os.path.join(path, SPARSITY_NAME)) or names is None:
        recorded = load_sparsity(path).get("tensors") or {}
        names = list(recorded)
        if not names:
            raise ValueError(f"{path}/{SPARSITY_NAME} lists no pruned tensors")
    elif not names:
        raise ValueError(f"load_masks: names is empty and {path} has no {SPARSITY_NAME}: pass the weights to mask")
    where = SPARSITY_NAME if recorded else "names"
    weight_map = sio.weight_map(path)
    missing = [n for n in names if n not in weight_map]
    if missing:
        raise ValueError(f"{path}: {plural(len(missing), 'tensor')} of {where} {'is' if len(missing) == 1 else 'are'} not in the checkpoint (e.g. {missing[0]})")
    out = {}
    for name in names:
        with safe_open(os.path.join(path, weight_map[name]), framework="pt") as f:
            out[name] = f.get_tensor(name) != 0
        info = recorded.get(name)
        if isinstance(info, dict) and "sparsity" in info and "numel" in info:
            zeros, pruned = out[name].numel() - int(out[name].count_nonzero()), round(info["sparsity"] * info["numel"])
            if zeros < pruned:
                raise ValueError(f"{path}: weight {name} has {zeros} zeros, {SPARSITY_NAME} records {pruned} pruned: "
                                 "the weights were modified or their names swapped; re-export the pruned checkpoint")
    return out
