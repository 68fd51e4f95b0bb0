"""The only module that writes and reads importance files.

Layout of an importance folder (`checkpoint-N/importance/` or `output_dir/importance/`):
- `importance_config.json`: format version, the `ImportanceConfig`, accumulation scalars, world size, and
  the tracked parameter names with their shapes. Written last: a folder without it is incomplete.
- `importance.safetensors`, or `importance-0000k-of-0000N.safetensors` + `importance.safetensors.index.json`
  (the HF sharded layout). Keys are canonical parameter names; values are raw accumulator buffers.
- FSDP2 runs split a buffer by rows: every rank's file holds its rows under the same key, and the index's
  `row_shards` maps the name to `[[file, first_row], ...]`; reading concatenates them into the full buffer.

Folders are written under a temporary name and renamed into place, so a crash never leaves a folder that
looks complete but is not.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from . import distributed as D
from ._version import __version__
from .config import IMPORTANCE_CONFIG_NAME, ImportanceConfig
from .importance import Importance
from .io_utils import atomic_write_json
from .safetensors_io import check_complete

FORMAT_VERSION = 1
IMPORTANCE_DIR = "importance"
WEIGHTS_NAME = "importance.safetensors"
INDEX_NAME = "importance.safetensors.index.json"
FILENAME_PATTERN = "importance{suffix}.safetensors"


class ImportanceFileError(ValueError):
    """An importance folder is missing, incomplete, corrupt, or from an unsupported version."""


def shard_name(rank: int, world_size: int) -> str:
    return f"importance-{rank + 1:05d}-of-{world_size:05d}.safetensors"


def tmp_dir_for(final_dir: str) -> str:
    parent, base = os.path.split(os.path.abspath(final_dir))
    return os.path.join(parent, f".{base}.tmp")


def write_shard(tmp_dir: str, tensors: Mapping[str, Tensor], *, rank: int, world_size: int) -> str:
    """Write one rank's buffers into the temporary folder (every rank calls this in parallel)."""
    os.makedirs(tmp_dir, exist_ok=True)
    path = os.path.join(tmp_dir, shard_name(rank, world_size))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    return path


def write_single(tmp_dir: str, tensors: Mapping[str, Tensor], max_shard_size: int | str = "5GB") -> None:
    """Single process: huggingface_hub writes `importance.safetensors` or shards + index."""
    from huggingface_hub import save_torch_state_dict

    os.makedirs(tmp_dir, exist_ok=True)
    save_torch_state_dict(
        {k: v.detach().cpu() for k, v in tensors.items()},
        tmp_dir,
        filename_pattern=FILENAME_PATTERN,
        max_shard_size=max_shard_size,
        metadata={"format": "pt"},
    )


def finalize(
    tmp_dir: str,
    final_dir: str | None,
    *,
    config: ImportanceConfig,
    meta: dict[str, Any],
    shapes: dict[str, list[int]],
    owners: dict[str, int] | None = None,
    world_size: int = 1,
    extra: dict[str, Any] | None = None,
    row_shards: dict[str, list[int]] | None = None,
) -> str:
    """Main process: write the index (multi-rank) and `importance_config.json`, then rename into place.

    With `final_dir=None` the complete folder stays at `tmp_dir` (staged) until [`publish`] moves it.
    `row_shards` maps a row-sharded (FSDP2) buffer to the first row held by each rank's file, indexed by rank.
    """
    if owners is not None and world_size > 1:
        weight_map = {name: shard_name(owners[name], world_size) for name in shapes}
        index: dict[str, Any] = {"metadata": {"format": "pt"}, "weight_map": weight_map}
        if row_shards:
            index["row_shards"] = {n: [[shard_name(r, world_size), int(o)] for r, o in enumerate(offsets)]
                                   for n, offsets in row_shards.items()}
        atomic_write_json(os.path.join(tmp_dir, INDEX_NAME), index)
    payload = {
        "format_version": FORMAT_VERSION,
        "library": "hf-weightprune",
        "library_version": __version__,
        "config": config.to_dict(),
        "state": {**meta, "world_size": world_size, "state_dtype": config.state_dtype},
        "tensors": {name: list(shape) for name, shape in shapes.items()},
    }
    if extra:
        payload.update(extra)
    # The config is written last: its presence marks the temporary folder as complete.
    atomic_write_json(os.path.join(tmp_dir, IMPORTANCE_CONFIG_NAME), payload)
    return publish(tmp_dir, final_dir) if final_dir is not None else tmp_dir


def publish(tmp_dir: str, final_dir: str) -> str:
    """Rename a complete folder into place, replacing an older one at `final_dir`."""
    old = None
    if os.path.exists(final_dir):
        old = f"{tmp_dir}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return final_dir


def write_importance(
    final_dir: str,
    tensors: Mapping[str, Tensor],
    plan: D.OwnershipPlan,
    *,
    config: ImportanceConfig,
    meta: dict[str, Any],
    shapes: dict[str, list[int]],
    extra: dict[str, Any] | None = None,
    masks: Mapping[str, Tensor] | None = None,
    publish: bool = True,
) -> BaseException | None:
    """Write an importance folder from every rank (collective: every rank calls it with its own `tensors`).

    Protocol: rank 0 clears the temporary folder; every rank writes the buffers it is the writer of (one process:
    `importance.safetensors` or HF shards; several: one shard file per rank); all ranks agree on whether every write
    succeeded; rank 0 writes the masks, the index and `importance_config.json` (last: its presence marks the folder
    complete) and renames it into place. With `publish=False`, `final_dir` itself is written in place (a staging
    folder, complete once its config exists) for [`publish`] to move later.

    Args:
        final_dir (`str`): the importance folder to write.
        tensors (`Mapping[str, Tensor]`): this rank's buffers (only those `plan.writes` are written).
        plan (`OwnershipPlan`): who writes what.
        config, meta, shapes, extra: written into `importance_config.json` (see [`finalize`]).
        masks (`Mapping[str, Tensor]`, *optional*): `PruneSchedule` keep-masks, written as `masks.safetensors`.
        publish (`bool`, *optional*, defaults to `True`): write to a temporary folder and rename into place.

    Returns:
        `None` on success (on every rank), else the error (`OSError`, `SafetensorError`, or a `RuntimeError` saying
        that another rank failed). Nothing half-written is left at `final_dir`.
    """
    tmp = tmp_dir_for(final_dir) if publish else final_dir
    error: BaseException | None = None
    try:
        if plan.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        D.barrier()
        if plan.world == 1:
            write_single(tmp, tensors)
        else:
            write_shard(tmp, {n: v for n, v in tensors.items() if plan.writes(n)}, rank=plan.rank,
                        world_size=plan.world)
    except (OSError, SafetensorError) as e:
        error = e
    D.barrier()
    failed = D.any_rank(error is not None)
    row_shards = plan.row_table() if plan.world > 1 else None
    if not failed and plan.rank == 0:
        try:
            if masks:
                save_schedule_masks(tmp, masks)
            finalize(tmp, final_dir if publish else None, config=config, meta=meta, shapes=shapes,
                     owners=plan.file_owners(), world_size=plan.world, extra=extra, row_shards=row_shards)
        except (OSError, SafetensorError) as e:
            error = e
    failed = D.any_rank(error is not None)
    if failed and plan.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return (error or RuntimeError("failed on another rank")) if failed else None


def save_importance_dir(final_dir: str, tensors: Mapping[str, Tensor], **kwargs) -> str:
    """Single-process convenience: write tensors + config atomically into `final_dir`."""
    tmp = tmp_dir_for(final_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    write_single(tmp, tensors, max_shard_size=kwargs.pop("max_shard_size", "5GB"))
    return finalize(tmp, final_dir, **kwargs)


# ----------------------------------------------------------------------------------------------- reading


def resolve_importance_dir(path: str) -> str:
    """`path` itself, or its `importance/` subfolder (a checkpoint or an output dir)."""
    if os.path.isfile(os.path.join(path, IMPORTANCE_CONFIG_NAME)):
        return path
    sub = os.path.join(path, IMPORTANCE_DIR)
    if os.path.isfile(os.path.join(sub, IMPORTANCE_CONFIG_NAME)):
        return sub
    if os.path.isdir(sub) or os.path.isdir(tmp_dir_for(sub)):
        raise ImportanceFileError(f"{sub} is incomplete (no {IMPORTANCE_CONFIG_NAME}): the write did not finish")
    raise ImportanceFileError(
        f"No importance in {path}: expected {IMPORTANCE_CONFIG_NAME} there or in {IMPORTANCE_DIR}/ "
        "(a checkpoint-N folder or a training output_dir)"
    )


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ImportanceFileError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from None


def load_meta(directory: str) -> dict:
    """The parsed `importance_config.json` of an importance folder, checked for format and sections.

    Raises:
        ImportanceFileError: corrupt JSON, a config-only file (`ImportanceConfig.save_pretrained`), an unsupported
            format version, or a missing section.
    """
    meta = _read_json(os.path.join(directory, IMPORTANCE_CONFIG_NAME))
    version = meta.get("format_version")
    if version is None and set(meta) == {"config"}:
        raise ImportanceFileError(
            f"{directory}/{IMPORTANCE_CONFIG_NAME} holds only an ImportanceConfig (written by "
            "ImportanceConfig.save_pretrained), no importance: read it with ImportanceConfig.from_pretrained"
        )
    if version != FORMAT_VERSION:
        raise ImportanceFileError(
            f"{directory}: importance format_version {version!r} is not supported by hf-weightprune {__version__} "
            f"(reads version {FORMAT_VERSION}); upgrade hf-weightprune"
        )
    for key in ("config", "state", "tensors"):
        if key not in meta:
            raise ImportanceFileError(f"{directory}/{IMPORTANCE_CONFIG_NAME} has no {key!r} section")
    return meta


def _weight_map(directory: str, names: list[str]) -> tuple[dict[str, str], dict[str, list[tuple[str, int]]]]:
    """Which file holds each tensor, and for row-sharded (FSDP2) tensors every `(file, first_row)` piece."""
    index = os.path.join(directory, INDEX_NAME)
    row_shards = {}
    if os.path.isfile(index):
        data = _read_json(index)
        weight_map = data.get("weight_map", {})
        row_shards = {n: sorted(((f, int(o)) for f, o in pieces), key=lambda p: p[1])
                      for n, pieces in data.get("row_shards", {}).items()}
    elif os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        weight_map = dict.fromkeys(names, WEIGHTS_NAME)
    else:
        raise ImportanceFileError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    missing = [n for n in names if n not in weight_map]
    if missing:
        raise ImportanceFileError(f"{directory}: tensors missing from the index: {missing[:3]}")
    return weight_map, row_shards


def open_tensors(directory: str, shapes: dict[str, list[int]], state_shapes: dict[str, list[int]] | None = None):
    """Check every shard's header against the metadata; return a lazy per-tensor reader."""
    weight_map, row_shards = _weight_map(directory, list(shapes))
    files = {weight_map[n] for n in shapes} | {f for pieces in row_shards.values() for f, _ in pieces}
    headers: dict[str, dict[str, list[int]]] = {}
    for fname in sorted(files):
        fpath = os.path.join(directory, fname)
        if not os.path.isfile(fpath):
            raise ImportanceFileError(f"{directory}: shard {fname} named in the index is missing")
        try:
            with safe_open(fpath, framework="pt") as f:
                headers[fname] = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as e:
            raise ImportanceFileError(f"{fpath} is corrupt or truncated: {e}") from None
        # safetensors checks the header, not that the data is all there.
        try:
            check_complete(fpath)
        except ValueError as e:
            raise ImportanceFileError(str(e)) from None
    for name in shapes:
        pieces = row_shards.get(name, [(weight_map[name], 0)])
        shape = None
        for fname, first_row in pieces:
            if name not in headers[fname]:
                raise ImportanceFileError(f"{directory}: {name} is not in {fname}")
            part = headers[fname][name]
            if shape is None:
                shape = list(part)
            elif first_row != shape[0] or part[1:] != shape[1:]:
                raise ImportanceFileError(f"{directory}: the row shards of {name} do not tile it ({fname} at row "
                                          f"{first_row}, shape {part}, after {shape[0]} rows)")
            else:
                shape[0] += part[0]
        if state_shapes is not None and shape != list(state_shapes[name]):
            raise ImportanceFileError(f"{directory}: {name} has shape {shape} on disk, expected {state_shapes[name]}")

    def read(fname: str, name: str) -> Tensor:
        with safe_open(os.path.join(directory, fname), framework="pt") as f:
            return f.get_tensor(name)

    def get(name: str) -> Tensor:
        if name in row_shards:
            return torch.cat([read(f, name) for f, _ in row_shards[name]])
        return read(weight_map[name], name)

    return get


def load_importance(
    path_or_repo_id: str | os.PathLike,
    *,
    subfolder: str = "",
    revision: str | None = None,
    token: str | bool | None = None,
    model: torch.nn.Module | None = None,
) -> Importance:
    """Load importance from a checkpoint folder, an `importance/` folder, or a Hub repo id.

    Tensors are read lazily (one `safe_open` per access); headers and sizes are checked up front so a
    truncated or missing shard fails here with a one-line reason. Pass `model` to validate and bind.

    Args:
        path_or_repo_id (`str` or `os.PathLike`): a local folder, or a Hub repo id (only `importance` files are
            downloaded).
        subfolder (`str`, *optional*): folder inside it, e.g. `"last-checkpoint"` or `"checkpoint-500"` for a
            checkpoint the Trainer pushed with `hub_strategy="checkpoint"` / `"all_checkpoints"`.
        revision, token: passed to `huggingface_hub.snapshot_download`.
        model (`torch.nn.Module`, *optional*): validate against this model and bind its weights.
    """
    path = os.fspath(path_or_repo_id)
    if os.path.exists(path):
        directory = resolve_importance_dir(os.path.join(path, subfolder) if subfolder else path)
    else:
        local = _download(path, subfolder=subfolder, revision=revision, token=token)
        local = os.path.join(local, subfolder) if subfolder else local
        try:
            directory = resolve_importance_dir(local)
        except ImportanceFileError:
            where = f"{path}, subfolder {subfolder!r}" if subfolder else path
            raise ImportanceFileError(
                f"No importance in Hub repo {where}: expected {IMPORTANCE_DIR}/{IMPORTANCE_CONFIG_NAME} there "
                "(checkpoints pushed by the Trainer are under subfolder='last-checkpoint' or 'checkpoint-N')"
            ) from None
    meta = load_meta(directory)
    config = ImportanceConfig.from_dict(meta["config"])
    shapes = {k: list(v) for k, v in meta["tensors"].items()}
    from .scorers import get_scorer

    scorer = get_scorer(config.criterion)
    state_shapes = {k: list(scorer.state_shape(torch.empty(v, device="meta"))) for k, v in shapes.items()}
    get = open_tensors(directory, shapes, state_shapes)
    imp = Importance(config, meta["state"], shapes, get, path=directory)
    if model is not None:
        imp.bind(model)
    return imp


def _download(repo_id: str, *, subfolder: str, revision, token) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        local = snapshot_download(
            repo_id, revision=revision, token=token,
            allow_patterns=[f"{prefix}{IMPORTANCE_DIR}/*", f"{prefix}importance*"],
        )
    except HFValidationError:
        raise FileNotFoundError(f"{repo_id} is neither a local path nor a valid Hub repo id") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        raise FileNotFoundError(f"Could not download importance from Hub repo {repo_id} (HTTP {status})") from None
    return local


def state_dict_bytes(tensors: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())



# ------------------------------------------------------------------------------------------------- masks

MASKS_NAME = "masks.safetensors"


def save_schedule_masks(directory: str, masks: Mapping[str, Tensor]) -> str:
    """Write `PruneSchedule` keep-masks (`bool`, stored as `uint8`) beside the importance."""
    path = os.path.join(directory, MASKS_NAME)
    save_file({k: v.detach().to("cpu", torch.uint8).contiguous() for k, v in masks.items()}, path,
              metadata={"format": "pt"})
    return path


def load_schedule_masks(directory: str) -> dict[str, Tensor]:
    """The `PruneSchedule` keep-masks stored beside an importance (`masks.safetensors`)."""
    path = os.path.join(directory, MASKS_NAME)
    if not os.path.isfile(path):
        raise ImportanceFileError(f"{directory} has no {MASKS_NAME}: the pruning schedule's masks were not saved")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k).bool() for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise ImportanceFileError(f"{path} is corrupt or truncated: {e}") from None
