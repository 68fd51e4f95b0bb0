"""Where a pruned model comes from, for `sparsity.json` and its card: the base model's licence and training data, the
one-shot prune a hold recovery took its masks from, and local paths recorded relative to the pruned folder.

`save_pruned` and `prune_checkpoint` call [`complete_payload`] on the `sparsity.json` payload before writing it. No
network access: a Hub base model's own card is read by `push_pruned_to_hub` (hub.py), not here.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, try_to_load_from_cache

from ..files.pruned_files import SPARSITY_NAME, earlier_prunes
from ..io_utils import is_local_path, path_name
from .card_eval import eval_record

logger = logging.getLogger(__name__)

# What a hold recovery inherits from the sparsity.json of the folder its masks came from: the statistics and the
# settings that chose those masks (the hold itself chose none).
_HELD_FIELDS = ("criterion", "importance", "scope", "reconstruction", "cross_term", "allocation")


def read_front_matter(folder: str | os.PathLike) -> dict[str, Any]:
    """The YAML front matter of `folder/README.md` (a model card), or `{}` when there is none or it is broken.

    Args:
        folder (`str` or `os.PathLike`): a model folder.

    Returns:
        `dict[str, Any]`: e.g. `{"license": "apache-2.0", "base_model": "org/model", "datasets": [...]}`.
    """
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except (ValueError, yaml.YAMLError, OSError):  # no or broken front matter (UnicodeDecodeError is a ValueError)
        return {}


def _read_sparsity(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, SPARSITY_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def base_model_facts(source: str | None) -> dict[str, Any]:
    """`base_model`, `license` and `datasets` of the model a pruned model was made from, where they are known.

    A Hub id (the `_name_or_path` of a model loaded from the Hub) is the base model itself; a local folder says
    what it knows in its card's front matter (a Trainer's or the Hub's `README.md`) and, for a folder this library
    wrote, in its `sparsity.json`. A pruned model carries its base model's licence.

    Args:
        source (`str`, *optional*): a Hub id or a local model folder (`model.config._name_or_path`).

    Returns:
        `dict[str, Any]`: only the keys that are known.
    """
    if not source:
        return {}
    if not os.path.isdir(source):
        if is_local_path(source) or source.startswith("."):
            return {}
        return {"base_model": source, **card_facts(_cached_card_folder(source))}
    front = read_front_matter(source)
    facts = {key: front[key] for key in ("base_model", "license", "datasets") if front.get(key)}
    recorded = (_read_sparsity(source) or {}).get("base_model")
    if recorded and not facts.get("base_model"):
        facts["base_model"] = recorded
    if isinstance(facts.get("base_model"), list):  # a merge of several models: the card field takes one
        facts["base_model"] = facts["base_model"][0] if len(facts["base_model"]) == 1 else None
    if isinstance(facts.get("datasets"), str):
        facts["datasets"] = [facts["datasets"]]
    return {k: v for k, v in facts.items() if v}


def _cached_card_folder(repo_id: str) -> str | None:
    """The folder of a Hub model's `README.md` when the local Hub cache has it (no network), else `None`."""
    try:
        path = try_to_load_from_cache(repo_id, "README.md")
    except (ValueError, OSError):  # not a valid repo id
        return None
    return os.path.dirname(path) if isinstance(path, str) else None


def card_facts(folder: str | os.PathLike | None) -> dict[str, Any]:
    """`license` and `datasets` named by the card front matter of `folder/README.md` (a base model's), if any.

    Args:
        folder (`str` or `os.PathLike`, *optional*): a model folder or a Hub snapshot folder.

    Returns:
        `dict[str, Any]`: only the keys that are known; `datasets` as a list.
    """
    if folder is None:
        return {}
    front = read_front_matter(folder)
    facts = {key: front[key] for key in ("license", "datasets") if front.get(key)}
    if isinstance(facts.get("datasets"), str):
        facts["datasets"] = [facts["datasets"]]
    return facts


def _absolute(value: Any, folder: str) -> Any:
    """A path recorded relative to `folder` (`../x`) as an absolute path; anything else unchanged."""
    if isinstance(value, str) and is_relative_record(value):
        return os.path.normpath(os.path.join(folder, value))
    return value


def held_source(schedule: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `sparsity.json` of the folder a `mode="hold"` schedule took its masks from, with its recorded local paths
    made absolute, or `None` (not a hold schedule, or the folder was pruned by another tool).

    Args:
        schedule (`dict`, *optional*): `PruneSchedule.to_dict()`.

    Returns:
        `dict[str, Any]` or `None`.
    """
    if not isinstance(schedule, dict) or schedule.get("mode") != "hold" or not schedule.get("masks_from"):
        return None
    folder = os.path.abspath(schedule["masks_from"])
    source = _read_sparsity(folder)
    if source is None:
        return None
    info = source.get("importance")
    if isinstance(info, dict):
        source["importance"] = {**info, "path": _absolute(info.get("path"), folder)}
    return source


def is_relative_record(value: str) -> bool:
    """A local path recorded relative to the pruned folder: `../run/importance` or `./x` (never a Hub id, which
    starts with neither)."""
    return value.startswith(("./", "../", ".\\", "..\\")) or value in (".", "..")


def relative_record(path: str, output_dir: str) -> str:
    """`path` (an existing local folder) as `sparsity.json` records it: relative to the pruned folder, POSIX
    separators, always starting with `./` or `../`; only its name when no relative path exists (another drive).

    Args:
        path (`str`): a local path.
        output_dir (`str`): the pruned folder, as it will be published.

    Returns:
        `str`: e.g. `"../run/importance"`.
    """
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(output_dir))
    except ValueError:  # Windows: another drive
        return path_name(path)
    rel = rel.replace(os.sep, "/")
    return rel if rel.startswith("..") else posixpath.join(".", rel)


def resolve_record(value: Any, folder: str | os.PathLike) -> Any:
    """The local path a recorded value names: a `./` or `../` record resolved against the pruned `folder`
    (absolute paths of earlier versions and Hub ids unchanged).

    Args:
        value (`Any`): a recorded path, Hub id or `None`.
        folder (`str` or `os.PathLike`): the pruned folder whose `sparsity.json` holds `value`.

    Returns:
        `Any`: an absolute path for a relative record, else `value`.
    """
    return _absolute(value, os.fspath(folder))


def complete_payload(payload: dict[str, Any], output_dir: str, *, source: str | None = None) -> dict[str, Any]:
    """The `sparsity.json` payload as written: what it lacks filled in from where the model came from, and no
    absolute local path in it.

    - A hold recovery (`schedule["mode"] == "hold"`) records the criterion, importance, scope, reconstruction, cross
      term and allocation of the prune its masks came from (its own report knows none of them: statistics gathered during
      the recovery chose no mask), and that prune's base model.
    - `base_model` from the source model's folder (its card or `sparsity.json`) when not given; `license` and
      `datasets` likewise, or from a Hub base model's card when the local Hub cache holds it (also recorded in the
      card's front matter; `push_pruned_to_hub` reads the Hub's card when they are still missing).
    - Local importance, `masks_from` and teacher folders are recorded relative to `output_dir` (`../run/importance`):
      the pruned folder names no one's home directory, and `push --include_importance` still finds the statistics
      from it. A local evaluation file is recorded by its file name, marked local (`card_eval.eval_record`): the
      card's model-index names Hub dataset ids only.
    - A model pruned from a pruned folder records that folder's prunes, oldest first, as `earlier_prunes`
      (`files.pruned_files.earlier_prunes`), so its card can name its input and the original dense model's count.

    Args:
        payload (`dict`): what `sparsity_dict` returned.
        output_dir (`str`): the pruned folder, as it will be published.
        source (`str`, *optional*): the model's `_name_or_path` (a Hub id or a local folder).

    Returns:
        `dict[str, Any]`: a new dict.
    """
    out = dict(payload)
    held = held_source(out.get("schedule"))
    if held is not None:  # the hold chose no mask: statistics gathered during the recovery chose nothing either
        out.update({key: held.get(key) for key in _HELD_FIELDS if held.get(key) is not None})
        out["base_model"] = out.get("base_model") or held.get("base_model")
    facts = base_model_facts(source)
    out["base_model"] = out.get("base_model") or facts.get("base_model")
    if isinstance(out["base_model"], str) and out["base_model"] != facts.get("base_model"):  # given, or the held one's
        facts = {**card_facts(_cached_card_folder(out["base_model"])), **facts}
    for key in ("license", "datasets"):
        if out.get(key) is None and (facts.get(key) or (held or {}).get(key)):
            out[key] = facts.get(key) or held[key]
    info = out.get("importance")
    if isinstance(info, dict) and isinstance(info.get("path"), str) and os.path.isdir(info["path"]):
        out["importance"] = {**info, "path": relative_record(info["path"], output_dir)}
    schedule = out.get("schedule")
    if isinstance(schedule, dict) and isinstance(schedule.get("masks_from"), str) \
            and os.path.isdir(schedule["masks_from"]):
        out["schedule"] = {**schedule, "masks_from": relative_record(schedule["masks_from"], output_dir)}
    distillation = out.get("distillation")
    if isinstance(distillation, dict) and isinstance(distillation.get("teacher"), str) \
            and os.path.isdir(distillation["teacher"]):
        out["distillation"] = {**distillation, "teacher": relative_record(distillation["teacher"], output_dir),
                               "teacher_is_local": True}
    evaluation = out.get("eval")
    if isinstance(evaluation, dict):
        out["eval"] = eval_record(evaluation)
    chain = _chain(source, output_dir, held_from=(schedule or {}).get("masks_from") if held is not None else None)
    if chain:
        out["earlier_prunes"] = chain
    return out


def _chain(source: str | None, output_dir: str, held_from: str | None) -> list[dict[str, Any]] | None:
    """The prunes the model went through before this one (`files.pruned_files.earlier_prunes` of its source folder),
    each entry's local `folder` recorded relative to `output_dir`. A hold recovery of the folder its masks came from
    re-records that prune, not a new one: only the folder's own earlier prunes are earlier then."""
    if not source or not os.path.isdir(source):
        return None
    chain = earlier_prunes(source)
    if chain is None:
        return None
    # the source's own records are relative to it; this prune's input is the source itself
    inherited = [{**e, "folder": resolve_record(e.get("folder"), source)} for e in chain[:-1]]
    same = held_from is not None and os.path.realpath(held_from) == os.path.realpath(source)
    chain = inherited + ([] if same else [{**chain[-1], "folder": os.path.abspath(source)}])
    return [{**e, "folder": relative_record(e["folder"], output_dir)
             if isinstance(e.get("folder"), str) and os.path.isdir(e["folder"]) else e.get("folder")}
            for e in chain] or None


def trainer_output_around(output_dir: str | os.PathLike) -> str | None:
    """The Trainer `output_dir` that holds `output_dir`, if any: the nearest parent folder with the
    `training_args.bin` that `Trainer.save_model` and every checkpoint write.

    Args:
        output_dir (`str` or `os.PathLike`): where a pruned model is about to be written.

    Returns:
        `str` or `None`: the Trainer's folder.
    """
    folder = os.path.dirname(os.path.abspath(output_dir))
    while True:
        if os.path.isfile(os.path.join(folder, "training_args.bin")):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def warn_if_inside_trainer_output(output_dir: str | os.PathLike) -> None:
    """Warn (one line) when a pruned model is written inside a Trainer's `output_dir`: `trainer.push_to_hub()`
    uploads that whole folder, so the pruned copy would land in the dense model's repo. A warning, not a refusal:
    a Trainer that never pushes is not harmed, and `save_pruned` cannot know whether it will.

    Args:
        output_dir (`str` or `os.PathLike`): where the pruned model is written.
    """
    trainer_dir = trainer_output_around(output_dir)
    if trainer_dir is not None:
        logger.warning("%s is inside the Trainer output_dir %s: a later trainer.push_to_hub() uploads it into the dense "
                       "model's repo; write the pruned model beside it instead (e.g. %s-pruned)",
                       os.fspath(output_dir), trainer_dir, trainer_dir.rstrip(os.sep))
