"""The importance folder: the multi-rank write protocol and [`load_importance`], each parsing
`importance_config.json` once.

Layout of an importance folder (`checkpoint-N/importance/` or `output_dir/importance/`):
- `importance_config.json`: format version, the `ImportanceConfig`, accumulation scalars, world size, and
  the tracked parameter names with their shapes. Written last: a folder without it is incomplete.
- `importance.safetensors`, or `importance-0000k-of-0000N.safetensors` + `importance.safetensors.index.json`
  (the HF sharded layout). Keys are canonical parameter names; values are raw accumulator buffers.
- FSDP2 runs split a buffer by rows: every rank's file holds its rows under the same key, and the index's
  `row_shards` maps the name to `[[file, first_row], ...]`; reading concatenates them into the full buffer.
- Files a caller attaches (`write_importance(attach=...)`, e.g. the schedule's `masks.safetensors` of
  `training_state.py`, the unit statistics' `units.safetensors` of `unit_files.py`, the cross term's
  `cross.safetensors` of `cross_files.py`, a pending re-fit's `refit_edits.safetensors` of `refit_files.py`), whose
  checksums are recorded here. [`load_importance`] reads the unit statistics and the cross term on first use.

Folders are written under a temporary name (`io_utils.temp_sibling`) and renamed into place, so a crash never
leaves a folder that looks complete but is not.

Named importances (`ImportanceConfig(name=...)`, several callbacks on one Trainer) live in `importance-<name>/`
beside `importance/`, each with the same layout. `importance_config.json` records a CRC32 of every tensor's bytes
(`checksums`), checked when the tensor is read, so tensors whose names were swapped in a header fail to load.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .. import distributed as D
from .._version import __version__
from ..collect.importance import Importance
from ..config import IMPORTANCE_CONFIG_NAME, ImportanceConfig
from ..io_utils import atomic_write_json, publish_folder, remove_dead_temporaries, temp_sibling, temp_siblings
from ..validation import looks_like_local_path
from .cross_files import load_cross_state
from .hub_download import download_folder_files
from .safetensors_io import (
    CHECKSUM_ALGORITHM,
    ImportanceFileError,
    check_complete,
    checkpoint_weights,
    cpu_tensors,
    find_weights_file,
    read_index,
    read_json,
    tensor_checksum,
    write_safetensors,
)
from .unit_files import load_unit_state

# The version of this format (the teacher folder of `training_state.py` has its own).
IMPORTANCE_FORMAT_VERSION = 1
IMPORTANCE_DIR = "importance"
WEIGHTS_NAME = "importance.safetensors"
INDEX_NAME = "importance.safetensors.index.json"
FILENAME_PATTERN = "importance{suffix}.safetensors"


def importance_dir_name(name: str | None = None) -> str:
    """The folder of an importance inside a checkpoint or output dir: `importance` or `importance-<name>`."""
    return IMPORTANCE_DIR if name is None else f"{IMPORTANCE_DIR}-{name}"


def shard_name(rank: int, world_size: int) -> str:
    return f"importance-{rank + 1:05d}-of-{world_size:05d}.safetensors"


def write_shard(tmp_dir: str, tensors: Mapping[str, Tensor], *, rank: int, world_size: int) -> str:
    """Write one rank's buffers into the temporary folder (every rank calls this in parallel)."""
    os.makedirs(tmp_dir, exist_ok=True)
    path = os.path.join(tmp_dir, shard_name(rank, world_size))
    write_safetensors(cpu_tensors(tensors), path)
    return path


def write_single(tmp_dir: str, tensors: Mapping[str, Tensor], max_shard_size: int | str = "5GB") -> None:
    """Single process: huggingface_hub writes `importance.safetensors` or shards + index. It refuses a tensor that
    is part of a larger storage (a slice of one flat buffer), so such a tensor is copied first."""
    from huggingface_hub import save_torch_state_dict

    os.makedirs(tmp_dir, exist_ok=True)
    cpu = {k: v.detach().cpu() for k, v in tensors.items()}
    cpu = {k: v if v.untyped_storage().nbytes() == v.nbytes else v.clone() for k, v in cpu.items()}
    save_torch_state_dict(cpu, tmp_dir, filename_pattern=FILENAME_PATTERN,
                          max_shard_size=max_shard_size, metadata={"format": "pt"})


def finalize(tmp_dir: str, final_dir: str | None, *, config: ImportanceConfig, meta: dict[str, Any],
             shapes: dict[str, list[int]], owners: dict[str, int] | None = None, world_size: int = 1,
             extra: dict[str, Any] | None = None, row_shards: dict[str, list[int]] | None = None,
             checksums: dict[str, Any] | None = None) -> str:
    """Main process: write the index (multi-rank) and `importance_config.json`, then rename into place.

    With `final_dir=None` the complete folder stays at `tmp_dir` (staged) until `io_utils.publish_folder` moves it.
    `row_shards` maps a row-sharded (FSDP2) buffer to the first row held by each rank's file, indexed by rank.
    `checksums` (`{"tensors": {name: crc or {file: crc}}, "masks": {name: crc}}`) is recorded for the reader.
    """
    if owners is not None and world_size > 1:
        weight_map = {name: shard_name(owners[name], world_size) for name in shapes}
        index: dict[str, Any] = {"metadata": {"format": "pt"}, "weight_map": weight_map}
        if row_shards:
            index["row_shards"] = {n: [[shard_name(r, world_size), int(o)] for r, o in enumerate(offsets)]
                                   for n, offsets in row_shards.items()}
        atomic_write_json(os.path.join(tmp_dir, INDEX_NAME), index)
    payload = {
        "format_version": IMPORTANCE_FORMAT_VERSION,
        "library": "hf-weightprune",
        "library_version": __version__,
        "config": config.to_dict(),
        "state": {**meta, "world_size": world_size, "state_dtype": config.state_dtype},
        "tensors": {name: list(shape) for name, shape in shapes.items()},
        # Which layout this write used: a stale index of an earlier write (a Hub repo that uploads only add to, e.g.
        # a DDP run's push, then a single-process run's) must not be read beside the new importance.safetensors.
        "index": INDEX_NAME if os.path.isfile(os.path.join(tmp_dir, INDEX_NAME)) else None,
    }
    if extra:
        payload.update(extra)
    if checksums is not None:
        payload["checksums"] = {"algorithm": CHECKSUM_ALGORITHM, **checksums}
    # The config is written last: its presence marks the temporary folder as complete.
    atomic_write_json(os.path.join(tmp_dir, IMPORTANCE_CONFIG_NAME), payload)
    return publish_folder(tmp_dir, final_dir) if final_dir is not None else tmp_dir


def write_importance(final_dir: str, tensors: Mapping[str, Tensor], plan: D.OwnershipPlan, *, config: ImportanceConfig,
                     meta: dict[str, Any], shapes: dict[str, list[int]], extra: dict[str, Any] | None = None,
                     attach: Callable[[str], dict[str, Any]] | None = None, publish: bool = True,
                     ) -> BaseException | None:
    """Write an importance folder from every rank (collective: every rank calls it with its own `tensors`).

    Protocol: all ranks agree on one temporary name (rank 0's `io_utils.temp_sibling`), rank 0 removes what killed
    writers left; every rank writes the buffers it is the writer of (one process: `importance.safetensors` or HF
    shards; several: one shard file per rank); all ranks agree on whether every write succeeded; rank 0 writes the
    attached files, the index and `importance_config.json` (last: its presence marks the folder complete) and renames
    it into place. With `publish=False`, `final_dir` itself is written in place (a staging folder, complete once its
    config exists) for `io_utils.publish_folder` to move later.

    Args:
        final_dir (`str`): the importance folder to write.
        tensors (`Mapping[str, Tensor]`): this rank's buffers (only those `plan.writes` are written).
        plan (`OwnershipPlan`): who writes what.
        config, meta, shapes, extra: written into `importance_config.json` (see [`finalize`]).
        attach (`Callable[[str], dict]`, *optional*): called on rank 0 with the temporary folder before the config is
            written; writes its own files there (e.g. `training_state.save_schedule_masks`) and returns
            `{section: {name: crc}}`, recorded beside the tensors' checksums.
        publish (`bool`, *optional*, defaults to `True`): write to a temporary folder and rename into place.

    Returns:
        `None` on success (on every rank), else the error (`OSError`, `SafetensorError`, or a `RuntimeError` saying
        that another rank failed). Nothing half-written is left at `final_dir`.
    """
    tmp = final_dir
    if publish:  # one name for every rank: rank 0's pid and random part
        pid, token = D.all_gather_ints([os.getpid(), int.from_bytes(os.urandom(6), "little")])[0]
        tmp = temp_sibling(final_dir, pid=pid, token=token)
    error: BaseException | None = None
    # One CPU copy, written and checksummed (the checksum costs ~1/10 of the write, see `tensor_checksum`).
    mine = cpu_tensors({n: v for n, v in tensors.items() if plan.world == 1 or plan.writes(n)})
    try:
        if plan.rank == 0:
            if publish:
                remove_dead_temporaries(final_dir)
            shutil.rmtree(tmp, ignore_errors=True)
        D.barrier()
        if plan.world == 1:
            write_single(tmp, mine)
        else:
            write_shard(tmp, mine, rank=plan.rank, world_size=plan.world)
    except (OSError, SafetensorError) as e:
        error = e
    D.barrier()
    failed = D.any_rank(error is not None)
    row_shards = plan.row_table() if plan.world > 1 else None
    checksums = _gather_checksums(mine, list(shapes), plan)  # collective: every writer's CRCs reach rank 0
    if not failed and plan.rank == 0:
        try:
            checksums = {"tensors": checksums, **(attach(tmp) if attach is not None else {})}
            finalize(tmp, final_dir if publish else None, config=config, meta=meta, shapes=shapes,
                     owners=plan.file_owners(), world_size=plan.world, extra=extra, row_shards=row_shards,
                     checksums=checksums)
        except (OSError, SafetensorError) as e:
            error = e
    failed = D.any_rank(error is not None)
    if failed and plan.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return (error or RuntimeError("failed on another rank")) if failed else None


def _gather_checksums(mine: Mapping[str, Tensor], names: list[str], plan: D.OwnershipPlan) -> dict[str, Any]:
    """`{name: crc}` of every buffer (row-sharded ones: `{shard file: crc}`), complete on rank 0 (collective).

    Each rank checksums what it wrote; `D.all_gather_ints` brings every writer's values to every rank (-1: not
    written by that rank).
    """
    local = {n: tensor_checksum(t) for n, t in mine.items()}
    if plan.world == 1:
        return {n: local[n] for n in names if n in local}
    table = D.all_gather_ints([local.get(n, -1) for n in names])
    out: dict[str, Any] = {}
    for i, n in enumerate(names):
        writer = plan.writers.get(n, 0)
        if writer == D.ALL_RANKS:
            out[n] = {shard_name(r, plan.world): table[r][i] for r in range(plan.world)}
        else:
            out[n] = table[writer][i]
    return out


# ----------------------------------------------------------------------------------------------- reading


def named_importances(path: str) -> list[str]:
    """Names of the complete named importances (`importance-<name>/`) in a checkpoint or output dir."""
    prefix = f"{IMPORTANCE_DIR}-"
    try:
        entries = sorted(os.listdir(path))
    except OSError:
        return []
    return [e[len(prefix):] for e in entries
            if e.startswith(prefix) and os.path.isfile(os.path.join(path, e, IMPORTANCE_CONFIG_NAME))]


def resolve_importance_dir(path: str, name: str | None = None) -> str:
    """`path` itself, or its `importance/` (or `importance-<name>/`) subfolder (a checkpoint or an output dir)."""
    own = os.path.join(path, IMPORTANCE_CONFIG_NAME)
    if os.path.isfile(own) and (name is None or (read_json(own).get("config") or {}).get("name") == name):
        return path  # an importance folder itself (with `name`: the one of that name)
    sub = os.path.join(path, importance_dir_name(name))
    if os.path.isfile(os.path.join(sub, IMPORTANCE_CONFIG_NAME)):
        return sub
    if os.path.isdir(sub) or temp_siblings(sub):
        raise ImportanceFileError(f"{sub} is incomplete (no {IMPORTANCE_CONFIG_NAME}): the write did not finish")
    named = named_importances(path)
    if named and name is None:
        folder = importance_dir_name(named[0])
        raise ImportanceFileError(f"No unnamed importance in {path}; it holds the named importances {named}: "
                                  "pass load_importance(path, name=...) (on the command line: prune/inspect/sweep "
                                  f"--importance_name {named[0]}), or the folder itself ({shlex.quote(os.path.join(path, folder))})")
    if name is not None:
        raise ImportanceFileError(f"No importance named {name!r} in {path} (expected {importance_dir_name(name)}/"
                                  f"{IMPORTANCE_CONFIG_NAME}); named importances there: {named}")
    raise ImportanceFileError(f"No importance in {path}: expected {IMPORTANCE_CONFIG_NAME} there or in {IMPORTANCE_DIR}/ "
                              "(a checkpoint-N folder or a training output_dir)")


def load_meta(directory: str) -> dict:
    """The parsed `importance_config.json` of an importance folder, checked for format and sections.

    Raises:
        ImportanceFileError: corrupt JSON, a config-only file (`ImportanceConfig.save_pretrained`), an unsupported
            format version, or a missing section.
    """
    meta = read_json(os.path.join(directory, IMPORTANCE_CONFIG_NAME))
    version = meta.get("format_version")
    if version is None and set(meta) == {"config"}:
        raise ImportanceFileError(f"{directory}/{IMPORTANCE_CONFIG_NAME} holds only an ImportanceConfig (written by "
                                  "ImportanceConfig.save_pretrained), no importance: read it with "
                                  "ImportanceConfig.from_pretrained")
    if version != IMPORTANCE_FORMAT_VERSION:
        raise ImportanceFileError(f"{directory}: importance format_version {version!r} is not supported by hf-weightprune "
                                  f"{__version__} (reads version {IMPORTANCE_FORMAT_VERSION}); upgrade hf-weightprune")
    for key in ("config", "state", "tensors", "index"):
        if key not in meta:
            raise ImportanceFileError(f"{directory}/{IMPORTANCE_CONFIG_NAME} has no {key!r} section")
    return meta


def _file_map(directory: str, names: list[str], indexed: bool,
              ) -> tuple[dict[str, str], dict[str, list[tuple[str, int]]]]:
    """Which file holds each tensor, and for row-sharded (FSDP2) tensors every `(file, first_row)` piece.

    `indexed` is the layout `importance_config.json` says the write used: the other layout's file beside it would be
    an earlier write's (stale) statistics, never read.
    """
    recorded = INDEX_NAME if indexed else WEIGHTS_NAME
    if not os.path.isfile(os.path.join(directory, recorded)):
        raise ImportanceFileError(f"{directory}: {recorded}, which {IMPORTANCE_CONFIG_NAME} says this write used, is "
                                  "missing")
    if not indexed:
        return dict.fromkeys(names, WEIGHTS_NAME), {}
    try:
        index = read_index(os.path.join(directory, INDEX_NAME))
    except ValueError as e:
        raise ImportanceFileError(str(e)) from None
    files = index["weight_map"]
    missing = [n for n in names if n not in files]
    if missing:
        raise ImportanceFileError(f"{directory}: tensors missing from the index: {missing[:3]}")
    row_shards = {n: sorted(((f, int(o)) for f, o in pieces), key=lambda p: p[1])
                  for n, pieces in index.get("row_shards", {}).items()}
    return files, row_shards


def open_tensors(directory: str, shapes: dict[str, list[int]], state_shapes: dict[str, list[int]] | None = None,
                 checksums: Mapping[str, Any] | None = None, *, indexed: bool):
    """Check every shard's header against the metadata; return a lazy per-tensor reader.

    `checksums` (`{name: crc or {file: crc}}`, from `importance_config.json`) are checked as each tensor is read.
    `indexed`: whether the write used an index (`importance_config.json`'s `index`).
    """
    weight_map, row_shards = _file_map(directory, list(shapes), indexed)
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

    checksums = checksums or {}

    def read(fname: str, name: str) -> Tensor:
        with safe_open(os.path.join(directory, fname), framework="pt") as f:
            tensor = f.get_tensor(name)
        expected = checksums.get(name)
        if isinstance(expected, dict):
            expected = expected.get(fname)
        if expected is not None and tensor_checksum(tensor) != int(expected):
            raise ImportanceFileError(
                f"{directory}: tensor {name} in {fname} does not match its {CHECKSUM_ALGORITHM} in "
                f"{IMPORTANCE_CONFIG_NAME} (the file was modified or its tensor names swapped); restore the folder "
                "from an intact copy")
        return tensor

    def get(name: str) -> Tensor:
        if name in row_shards:
            return torch.cat([read(f, name) for f, _ in row_shards[name]])
        return read(weight_map[name], name)

    return get


def load_importance(path_or_repo_id: str | os.PathLike, *, subfolder: str = "", revision: str | None = None,
                    token: str | bool | None = None, model: torch.nn.Module | None = None, name: str | None = None,
                    ) -> Importance:
    """Load importance from a checkpoint folder, an `importance/` folder, or a Hub repo id.

    Tensors are read lazily (one `safe_open` per access); headers and sizes are checked up front so a
    truncated or missing shard fails here with a one-line reason. Pass `model` to validate and bind. Without it,
    an `importance/` folder that sits beside the weights it was computed for (`checkpoint-N/importance/` next to
    `checkpoint-N/model.safetensors`, or `output_dir/importance/` next to the saved model) binds to them lazily, so
    `load_importance("out/checkpoint-500").scores[name]` works for `wanda` and `sparsegpt`, reading one weight per
    score; elsewhere those scores raise, asking for `bind(model)`.

    Args:
        path_or_repo_id (`str` or `os.PathLike`): a local folder, or a Hub repo id (only `importance` files are
            downloaded).
        subfolder (`str`, *optional*): folder inside it, e.g. `"last-checkpoint"` or `"checkpoint-500"` for a
            checkpoint the Trainer pushed with `hub_strategy="checkpoint"` / `"all_checkpoints"`.
        revision, token: passed to `huggingface_hub.snapshot_download`.
        model (`torch.nn.Module`, *optional*): validate against this model and bind its weights.
        name (`str`, *optional*): the `ImportanceConfig.name` of one of several callbacks on one Trainer: reads
            `importance-<name>/`. Without it, a folder holding only named importances is refused with their names.

    Returns:
        `Importance`: lazy per-tensor access to the accumulator state, and, read on first use, the unit statistics
        (`unit_state`) and the dense-to-pruned cross term (`cross_terms`) when the folder holds them.

    Raises:
        ImportanceFileError: no (such) importance (a missing local folder is named, never looked up on the Hub:
            see [`~validation.looks_like_local_path`]), an incomplete or corrupt folder, or a tensor whose bytes do not
            match the CRC32 recorded at write time (e.g. two tensors' names swapped in a header).
        FileNotFoundError: a Hub-id-like string that is neither a local folder nor a reachable Hub repo (the
            message names it).
    """
    path = os.fspath(path_or_repo_id)
    if name is not None:
        ImportanceConfig(name=name)  # the same one-line check as the config, before any work
    if os.path.exists(path):
        directory = resolve_importance_dir(os.path.join(path, subfolder) if subfolder else path, name)
    elif looks_like_local_path(path):  # a mistyped folder, never sent to the Hub as a repo id
        raise ImportanceFileError(f"{path}: no such folder; pass a checkpoint, training output_dir or importance "
                                  "folder, or a Hub repo id ('namespace/name')")
    else:
        local = download_folder_files(path, [IMPORTANCE_DIR], subfolder=subfolder, revision=revision,
                                      token=token, what="importance")
        local = os.path.join(local, subfolder) if subfolder else local
        try:
            directory = resolve_importance_dir(local, name)
        except ImportanceFileError:
            where = f"{path}, subfolder {subfolder!r}" if subfolder else path
            named = named_importances(local)
            if named and name is None:
                raise ImportanceFileError(f"No unnamed importance in Hub repo {where}; it holds the named importances {named}: "
                                          "pass load_importance(repo_id, name=...) (on the command line: prune/inspect/"
                                          f"sweep --importance_name {named[0]})") from None
            raise ImportanceFileError(f"No importance in Hub repo {where}: expected {IMPORTANCE_DIR}/{IMPORTANCE_CONFIG_NAME} "
                                      "there (checkpoints pushed by the Trainer are under subfolder='last-checkpoint' or "
                                      "'checkpoint-N')") from None
    meta = load_meta(directory)
    config = ImportanceConfig.from_dict(meta["config"])
    shapes = {k: list(v) for k, v in meta["tensors"].items()}
    from ..scorers import get_scorer

    scorer = get_scorer(config.criterion)
    state_shapes = {k: list(scorer.state_shape(torch.empty(v, device="meta"))) for k, v in shapes.items()}
    get = open_tensors(directory, shapes, state_shapes, (meta.get("checksums") or {}).get("tensors"),
                       indexed=meta["index"] is not None)
    loader = None
    parent = os.path.dirname(os.path.abspath(directory))
    folder = os.path.basename(os.path.normpath(directory))
    if (folder == IMPORTANCE_DIR or folder.startswith(f"{IMPORTANCE_DIR}-")) and find_weights_file(parent) is not None:
        # checkpoint-N/importance[-name]/ beside checkpoint-N/model.safetensors (or output_dir/importance beside the
        # saved model): wanda / sparsegpt scores read W from there, one tensor per access, unless `bind` comes first.
        def loader():
            return checkpoint_weights(parent, shapes)
    sections = {k: v for k, v in meta.items() if k not in ("config", "state", "tensors")}
    unit_sums = (meta.get("checksums") or {}).get("units")
    units = (lambda: load_unit_state(directory, unit_sums)) if config.units else None  # read on first use
    cross_sums = (meta.get("checksums") or {}).get("cross")
    cross = (lambda: load_cross_state(directory, cross_sums)) if "cross" in meta else None
    imp = Importance(config, meta["state"], shapes, get, path=directory, weights_loader=loader, sections=sections,
                     units=units, cross=cross)
    if model is not None:
        imp.bind(model)
    return imp
