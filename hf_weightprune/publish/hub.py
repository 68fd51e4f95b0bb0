"""Hub publishing of pruned checkpoints: [`push_pruned_to_hub`] only.

A pruned output folder (written by `save_pruned` or `prune_checkpoint`) holds a standard Transformers checkpoint
plus `sparsity.json`. The model card is rendered by `card.py`; this module uploads the folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects, get_token

from .._version import __version__
from ..files.importance_files import IMPORTANCE_DIR
from ..files.pruned_files import SPARSITY_NAME, SWEEP_CSV, SWEEP_JSON, SWEEP_PNG, dump_sparsity, load_sparsity
from ..io_utils import TEMP_SUFFIX, check_arg_type, is_local_path, path_name
from .card import CARD_FILE, is_generated_card, render_model_card
from .card_eval import eval_record
from .provenance import card_facts, resolve_record

logger = logging.getLogger(__name__)

# The temporary files and folders of interrupted atomic writes (`io_utils`: hidden, `.<name>...tmp`) are never part
# of a checkpoint.
_TEMP_PATTERNS = [f".*{TEMP_SUFFIX}", f"*/.*{TEMP_SUFFIX}", f".*{TEMP_SUFFIX}/*", f"*/.*{TEMP_SUFFIX}/*"]

# Files of the repo a push replaces as a whole: the weights (a stale `model.safetensors` beside new shards is what
# `from_pretrained` would load) and the sweep files this library writes beside them; with the statistics uploaded,
# also `importance/` (stale rank files would be read with the new ones). Any of them the new push lacks is deleted in
# its commit. Other files of the repo are the user's and left alone: an earlier push's `importance/` when this one
# uploads none, a variant (`model.fp16.safetensors`), an adapter, anything in a subfolder.
_WEIGHTS = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)|(model\.safetensors|pytorch_model\.bin)"
                      r"\.index\.json")  # the names save_pretrained gives a full model's weights, no variant
_SWEEP_FILES = (SWEEP_CSV, SWEEP_JSON, SWEEP_PNG)


def _replaced(path: str, importance_uploaded: bool) -> bool:
    if importance_uploaded and path.startswith(f"{IMPORTANCE_DIR}/"):
        return True
    return _WEIGHTS.fullmatch(path) is not None or path in _SWEEP_FILES


def _stale_files(api: HfApi, repo_id: str, revision: str | None, added: set[str], importance_uploaded: bool,
                 ) -> tuple[list[CommitOperationDelete], str]:
    """The files of the branch's head that this push replaces but lacks, as deletions, and that head's sha (the
    commit's parent: were another push to land in between, the Hub refuses this commit instead of deleting files
    the listing did not see)."""
    head = api.repo_info(repo_id, revision=revision).sha
    remote = api.list_repo_files(repo_id, revision=head)
    return [CommitOperationDelete(path_in_repo=p) for p in remote
            if p not in added and _replaced(p, importance_uploaded)], head


def _importance_folder(folder: Path, sparsity: dict) -> Path:
    local = folder / IMPORTANCE_DIR
    if local.is_dir():
        return local
    recorded = resolve_record((sparsity.get("importance") or {}).get("path"), folder)
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    if recorded:
        raise FileNotFoundError(f"include_importance=True but no importance folder was found: neither {str(local)!r} "
                                f"nor {recorded!r} (recorded in sparsity.json) exists.")
    # an importance held in memory (`cb.importance()`, `oneshot_importance`) has no folder to record
    raise FileNotFoundError(f"include_importance=True but {str(local)!r} does not exist and sparsity.json records no "
                            "importance folder (the prune used an importance in memory): copy the importance folder "
                            "it came from to that path, or push without it.")


def _hub_sparsity(sparsity: dict, importance_uploaded: bool) -> dict:
    """The `sparsity.json` the Hub gets (and its card is rendered from): no local path of the uploader's disk.

    Local folders are recorded relative to the pruned folder (`../run/importance`, so `push --include_importance`
    works from any folder; absolute by earlier versions); on the Hub such a path means nothing (an absolute one names
    the uploader's disk: user name, folders). The importance `path` becomes
    `importance` (the repo's folder) when the statistics are uploaded, else `null`; a hold schedule's `masks_from`,
    the distillation teacher, the evaluation text and the folders of `earlier_prunes` keep only their file or folder
    name; a local `base_model` (also of an earlier prune) becomes `null`. Hub ids are
    kept as the user gave them.
    """
    hub = dict(sparsity)
    info = sparsity.get("importance")
    if isinstance(info, dict) and is_local_path(info.get("path")):
        hub["importance"] = {**info, "path": IMPORTANCE_DIR if importance_uploaded else None}
    schedule = sparsity.get("schedule")
    if isinstance(schedule, dict) and is_local_path(schedule.get("masks_from")):
        hub["schedule"] = {**schedule, "masks_from": path_name(schedule["masks_from"])}
    distillation = sparsity.get("distillation")
    if isinstance(distillation, dict) and is_local_path(distillation.get("teacher")):
        hub["distillation"] = {**distillation, "teacher": path_name(distillation["teacher"]), "teacher_is_local": True}
    evaluation = sparsity.get("eval")
    if isinstance(evaluation, dict):
        hub["eval"] = eval_record(evaluation)  # older versions recorded a local file's path
    if is_local_path(sparsity.get("base_model")):
        hub["base_model"] = None
    if isinstance(sparsity.get("earlier_prunes"), list):  # the folders a re-pruned model came from: names only
        hub["earlier_prunes"] = [
            {**e, "folder": path_name(e["folder"]) if is_local_path(e.get("folder")) else e.get("folder"),
             "base_model": None if is_local_path(e.get("base_model")) else e.get("base_model")}
            if isinstance(e, dict) else e for e in sparsity["earlier_prunes"]]
    return hub


def _base_model_facts(sparsity: dict, token: str | bool | None) -> dict:
    """`license` and `datasets` of the base model's card on the Hub, when `sparsity.json` lacks them: a pruned model
    carries its base model's licence. Read at push time (the push talks to the Hub anyway); a base model that is
    private, gone or has no card gives nothing, and the push goes on."""
    base_model = sparsity.get("base_model")
    if sparsity.get("license") or not isinstance(base_model, str) or is_local_path(base_model):
        return {}
    try:
        path = hf_hub_download(base_model, CARD_FILE, token=token)
    except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError) as e:  # not found, no access, no card, bad id
        logger.debug("No card of the base model %s: %s", base_model, e)
        return {}
    return card_facts(os.path.dirname(path))


def _statistics_inside(folder: Path, sparsity: dict) -> list[str]:
    """Folders of `folder` (relative, POSIX) holding its importance statistics: `importance/` and the folder
    `sparsity.json` records when it lies inside. They are uploaded only as `importance/`, only when asked for."""
    found = [IMPORTANCE_DIR]
    recorded = resolve_record((sparsity.get("importance") or {}).get("path"), folder)
    if isinstance(recorded, str) and Path(recorded).is_dir():
        with contextlib.suppress(ValueError):  # outside the folder
            found.append(Path(recorded).resolve().relative_to(folder.resolve()).as_posix())
    return [rel for rel in dict.fromkeys(found) if rel != "."]


def _add_folder(folder: Path, prefix: str, ignore_patterns: list[str]) -> list[CommitOperationAdd]:
    """One `CommitOperationAdd` per file of `folder` (recursively) not matched by `ignore_patterns`, as
    `upload_folder` would add them, so that the whole push is one commit."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = filter_repo_objects(files, ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, *ignore_patterns])
    return [CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=str(folder / name)) for name in kept]


def _is_offline() -> bool:
    check = getattr(constants, "is_offline_mode", None)  # huggingface_hub >= 1.0; before it, only the constant
    return bool(check() if check is not None else getattr(constants, "HF_HUB_OFFLINE", False))


def _is_network_error(error: BaseException) -> bool:
    """No answer from the Hub: a refused or dropped connection, DNS, a timeout (requests' errors are `OSError`s,
    httpx's are not, so they are recognised by their `TransportError` base)."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return any(c.__name__ == "TransportError" and c.__module__.startswith("httpx") for c in type(error).__mro__)


@contextlib.contextmanager
def _explain_auth_errors(repo_id: str, token: str | None):
    """Turn the Hub's refusals and network failures into one-line `PermissionError` / `ConnectionError`."""
    try:
        yield
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status not in (401, 403):
            raise
        if token is None and get_token() is None:
            hint = "no Hub token was found: pass `token=` or run `hf auth login`"
        else:
            hint = "check that the token is valid and has write access to this repo"
        message = f"The Hub refused access to {repo_id!r} (HTTP {status}): {hint}."
        # Paranoia: a server could echo the credential back in its error text
        if isinstance(token, str) and token:
            message = message.replace(token, "***")
        raise PermissionError(message) from None
    except Exception as error:
        if not _is_network_error(error):
            raise
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise ConnectionError(f"push_pruned_to_hub: cannot reach the Hub at {constants.ENDPOINT} to push {repo_id!r} "
                              f"({first}); check the network connection or HF_ENDPOINT") from None


def _check_push_args(output_dir, repo_id, private, token, revision, include_importance, commit_message) -> None:
    fn = "push_pruned_to_hub"
    check_arg_type(fn, "output_dir", output_dir, (str, os.PathLike), "a folder path (str or os.PathLike)")
    check_arg_type(fn, "repo_id", repo_id, str, "a Hub repo id such as 'username/model-pruned'")
    if not repo_id.strip():
        raise ValueError(f"{fn}: repo_id is empty; pass a Hub repo id such as 'username/model-pruned'")
    check_arg_type(fn, "private", private, (bool, type(None)), "a bool or None")
    check_arg_type(fn, "token", token, (str, bool, type(None)), "a str, a bool or None")
    check_arg_type(fn, "revision", revision, (str, type(None)), "a branch name (str) or None")
    check_arg_type(fn, "include_importance", include_importance, bool, "a bool")
    check_arg_type(fn, "commit_message", commit_message, (str, type(None)), "a str or None")


def push_pruned_to_hub(
    output_dir: str | os.PathLike,
    *,
    repo_id: str,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    include_importance: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload a pruned checkpoint folder to the Hugging Face Hub.

    Creates the repo if needed and uploads the folder in one commit, with a model card rendered for `repo_id` when
    the folder has no README.md or has one this library rendered (a user's own README.md is uploaded as is). The
    folder itself is never modified. The importance statistics are left out unless
    `include_importance=True`, in which case they go to `importance/`. Files of an earlier push to the same branch that
    this one replaces and lacks (a full model's weights or shards, sweep files, and `importance/` when statistics are
    uploaded) are deleted in the same commit; the repo's other files are left alone. Hidden `.*.tmp` files and folders (left by
    an interrupted write) are never uploaded, nor statistics inside the folder unless asked for. The uploaded
    `sparsity.json` and card name no local path: the importance `path` reads `"importance"` when the statistics
    are uploaded, else `null`; other absolute paths keep only their last part (the local file is unchanged).

    Args:
        output_dir (`str` or `os.PathLike`):
            Folder written by `save_pruned` (a Transformers checkpoint plus `sparsity.json`). The CLI's `FOLDER`.
        repo_id (`str`):
            Target repo, e.g. `"username/llama-pruned-50"`.
        private (`bool`, *optional*):
            Visibility of the repo when it is created. Ignored if the repo exists.
        token (`str` or `bool`, *optional*):
            Hub token with write access. Defaults to the saved token (`hf auth login`) or `HF_TOKEN`.
        revision (`str`, *optional*):
            Branch to push to, created from `main` if it does not exist. Defaults to `main`.
        include_importance (`bool`, *optional*, defaults to `False`):
            Also upload the importance folder (`output_dir/importance`, else the folder recorded in `sparsity.json`).
        commit_message (`str`, *optional*):
            Commit message. A summary of the pruning by default.

    Returns:
        `str`: the URL of the commit.

    Raises:
        TypeError: an argument has the wrong type (checked before any file is read or any request is made).
        FileNotFoundError: `output_dir` does not exist, or `include_importance=True` and no importance folder is
            found.
        ValueError: `output_dir` is not a pruned checkpoint (no or invalid `sparsity.json`).
        PermissionError: the Hub refused the token (HTTP 401/403); the message never contains the token.
        ConnectionError: `HF_HUB_OFFLINE=1` is set (checked before any request), or the Hub cannot be
            reached (refused connection, DNS, timeout).
    """
    _check_push_args(output_dir, repo_id, private, token, revision, include_importance, commit_message)
    folder = Path(output_dir)
    sparsity = load_sparsity(folder)
    importance = _importance_folder(folder, sparsity) if include_importance else None
    if _is_offline():
        raise ConnectionError("push_pruned_to_hub: HF_HUB_OFFLINE=1 is set, so the Hub cannot be reached; unset "
                              "HF_HUB_OFFLINE to push")
    hub_sparsity = _hub_sparsity(sparsity, importance_uploaded=importance is not None)
    hub_sparsity.update({k: v for k, v in _base_model_facts(hub_sparsity, token).items() if not hub_sparsity.get(k)})
    readme = folder / CARD_FILE
    card = None
    if not readme.is_file() or is_generated_card(readme):
        # A card this library wrote names the local folder; on the Hub it must name the repo. Rendered for the
        # upload only: the folder is the push's input and is never modified. A user's own README is uploaded as is.
        card = str(render_model_card(folder, repo_id=repo_id, sparsity=hub_sparsity)).encode("utf-8")

    if commit_message is None:
        commit_message = (
            f"Upload pruned model ({sparsity['structure']}, {100 * float(sparsity.get('global_sparsity') or 0):.1f}% "
            f"sparsity) with hf-weightprune"
        )

    # One commit for the folder, its sparsity.json and card as the Hub gets them and the importance (from wherever
    # it lies, a symlink followed): a reader of the repo never sees a checkpoint without them.
    ignore_patterns = [*_TEMP_PATTERNS, SPARSITY_NAME]
    for stats in _statistics_inside(folder, sparsity):
        ignore_patterns += [stats, f"{stats}/*"]
    if card is not None:
        ignore_patterns.append(CARD_FILE)
    operations = _add_folder(folder, "", ignore_patterns)
    if hub_sparsity == sparsity:  # nothing to rewrite: the file as it is, byte for byte
        operations.append(CommitOperationAdd(path_in_repo=SPARSITY_NAME, path_or_fileobj=str(folder / SPARSITY_NAME)))
    else:
        operations.append(CommitOperationAdd(path_in_repo=SPARSITY_NAME,
                                             path_or_fileobj=dump_sparsity(hub_sparsity).encode()))
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card))
    if importance is not None:
        operations += _add_folder(importance.resolve(), f"{IMPORTANCE_DIR}/", list(_TEMP_PATTERNS))

    api = HfApi(token=token, library_name="hf-weightprune", library_version=__version__)
    with _explain_auth_errors(repo_id, token):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        stale, head = _stale_files(api, repo_id, revision, {op.path_in_repo for op in operations},
                                   importance is not None)
        commit = api.create_commit(repo_id=repo_id, operations=operations + stale, commit_message=commit_message,
                                   revision=revision, parent_commit=head if stale else None)
    return commit.commit_url
