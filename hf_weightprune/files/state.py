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

Named importances (`ImportanceConfig(name=...)`, several callbacks on one Trainer) live in `importance-<name>/`
beside `importance/`, each with the same layout. `importance_config.json` records a CRC32 of every tensor's bytes
(`checksums`), checked when the tensor is read, so tensors whose names were swapped in a header fail to load.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .. import distributed as D
from .._version import __version__
from ..collect.importance import Importance
from ..config import IMPORTANCE_CONFIG_NAME, ImportanceConfig
from ..io_utils import atomic_write_json
from ..validation import looks_like_local_path
from .safetensors_io import CheckpointWeights, check_complete, find_weights_file, read_header, weight_map

FORMAT_VERSION = 1
IMPORTANCE_DIR = "importance"
WEIGHTS_NAME = "importance.safetensors"
INDEX_NAME = "importance.safetensors.index.json"
FILENAME_PATTERN = "importance{suffix}.safetensors"
CHECKSUM_ALGORITHM = "crc32"


class ImportanceFileError(ValueError):
    """An importance folder is missing, incomplete, corrupt, or from an unsupported version."""


def importance_dir_name(name: str | None = None) -> str:
    """The folder of an importance inside a checkpoint or output dir: `importance` or `importance-<name>`."""
    return IMPORTANCE_DIR if name is None else f"{IMPORTANCE_DIR}-{name}"


def tensor_checksum(tensor: Tensor) -> int:
    """CRC32 of a tensor's bytes, as stored in safetensors (C-contiguous, little-endian).

    About 1 GB/s on one CPU core, ~10x the rate at which the same bytes are written to disk, and only computed on
    saves and loads (never per step). Detects bit rot, truncation the header misses, and swapped tensor names.

    Args:
        tensor (`Tensor`): any dtype; moved to CPU if needed.

    Returns:
        `int`: the unsigned CRC32 (`zlib.crc32`) of the raw bytes.
    """
    t = tensor.detach().contiguous().cpu()
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())


def _cpu_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def shard_name(rank: int, world_size: int) -> str:
    return f"importance-{rank + 1:05d}-of-{world_size:05d}.safetensors"


def tmp_dir_for(final_dir: str) -> str:
    parent, base = os.path.split(os.path.abspath(final_dir))
    return os.path.join(parent, f".{base}.tmp")


def write_shard(tmp_dir: str, tensors: Mapping[str, Tensor], *, rank: int, world_size: int) -> str:
    """Write one rank's buffers into the temporary folder (every rank calls this in parallel)."""
    os.makedirs(tmp_dir, exist_ok=True)
    path = os.path.join(tmp_dir, shard_name(rank, world_size))
    save_file(_cpu_tensors(tensors), path, metadata={"format": "pt"})
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
    checksums: dict[str, Any] | None = None,
) -> str:
    """Main process: write the index (multi-rank) and `importance_config.json`, then rename into place.

    With `final_dir=None` the complete folder stays at `tmp_dir` (staged) until [`publish`] moves it.
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
        "format_version": FORMAT_VERSION,
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
    # One CPU copy, written and checksummed (the checksum costs ~1/10 of the write, see `tensor_checksum`).
    mine = _cpu_tensors({n: v for n, v in tensors.items() if plan.world == 1 or plan.writes(n)})
    try:
        if plan.rank == 0:
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
            mask_sums = save_schedule_masks(tmp, masks)[1] if masks else None
            checksums = {"tensors": checksums, **({"masks": mask_sums} if mask_sums else {})}
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


def save_importance_dir(final_dir: str, tensors: Mapping[str, Tensor], **kwargs) -> str:
    """Single-process convenience: write tensors + config (with checksums) atomically into `final_dir`."""
    tmp = tmp_dir_for(final_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    cpu = _cpu_tensors(tensors)
    write_single(tmp, cpu, max_shard_size=kwargs.pop("max_shard_size", "5GB"))
    kwargs.setdefault("checksums", {"tensors": {n: tensor_checksum(t) for n, t in cpu.items()}})
    return finalize(tmp, final_dir, **kwargs)


def staged_step(staging_dir: str) -> int | None:
    """The `global_step` of a complete staged importance folder (its config exists and parses), else `None`."""
    if not os.path.isfile(os.path.join(staging_dir, IMPORTANCE_CONFIG_NAME)):
        return None
    try:
        step = load_meta(staging_dir)["state"].get("global_step")
    except ImportanceFileError:
        return None
    return int(step) if isinstance(step, int) else None


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
    if os.path.isfile(own) and (name is None or (_read_json(own).get("config") or {}).get("name") == name):
        return path  # an importance folder itself (with `name`: the one of that name)
    sub = os.path.join(path, importance_dir_name(name))
    if os.path.isfile(os.path.join(sub, IMPORTANCE_CONFIG_NAME)):
        return sub
    if os.path.isdir(sub) or os.path.isdir(tmp_dir_for(sub)):
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


def _weight_map(directory: str, names: list[str], indexed: bool | None = None,
                ) -> tuple[dict[str, str], dict[str, list[tuple[str, int]]]]:
    """Which file holds each tensor, and for row-sharded (FSDP2) tensors every `(file, first_row)` piece.

    `indexed` is what `importance_config.json` says the write used; `None` (folders of earlier versions): the index
    when there is one.
    """
    index = os.path.join(directory, INDEX_NAME)
    row_shards = {}
    recorded = {True: INDEX_NAME, False: WEIGHTS_NAME}.get(indexed)
    if recorded is not None and not os.path.isfile(os.path.join(directory, recorded)):
        # Not the other layout instead: beside this config it would be an earlier write's (stale) statistics
        raise ImportanceFileError(f"{directory}: {recorded}, which {IMPORTANCE_CONFIG_NAME} says this write used, is "
                                  "missing")
    if indexed is False:
        weight_map = dict.fromkeys(names, WEIGHTS_NAME)
    elif os.path.isfile(index):
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


def open_tensors(directory: str, shapes: dict[str, list[int]], state_shapes: dict[str, list[int]] | None = None,
                 checksums: Mapping[str, Any] | None = None, indexed: bool | None = None):
    """Check every shard's header against the metadata; return a lazy per-tensor reader.

    `checksums` (`{name: crc or {file: crc}}`, from `importance_config.json`) are checked as each tensor is read;
    files written before checksums were recorded (`None`) are read unchecked. `indexed`: whether the write used an
    index (`importance_config.json`'s `index`), `None` when it does not say.
    """
    weight_map, row_shards = _weight_map(directory, list(shapes), indexed)
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


def load_importance(
    path_or_repo_id: str | os.PathLike,
    *,
    subfolder: str = "",
    revision: str | None = None,
    token: str | bool | None = None,
    model: torch.nn.Module | None = None,
    name: str | None = None,
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
        `Importance`: lazy per-tensor access to the accumulator state.

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
        local = _download(path, subfolder=subfolder, revision=revision, token=token)
        local = os.path.join(local, subfolder) if subfolder else local
        try:
            directory = resolve_importance_dir(local, name)
        except ImportanceFileError:
            where = f"{path}, subfolder {subfolder!r}" if subfolder else path
            named = named_importances(local)
            if named and name is None:
                raise ImportanceFileError(
                    f"No unnamed importance in Hub repo {where}; it holds the named importances {named}: pass "
                    f"load_importance(repo_id, name=...) (on the command line: prune/inspect/sweep --importance_name {named[0]})"
                ) from None
            raise ImportanceFileError(
                f"No importance in Hub repo {where}: expected {IMPORTANCE_DIR}/{IMPORTANCE_CONFIG_NAME} there "
                "(checkpoints pushed by the Trainer are under subfolder='last-checkpoint' or 'checkpoint-N')"
            ) from None
    meta = load_meta(directory)
    config = ImportanceConfig.from_dict(meta["config"])
    shapes = {k: list(v) for k, v in meta["tensors"].items()}
    from ..scorers import get_scorer

    scorer = get_scorer(config.criterion)
    state_shapes = {k: list(scorer.state_shape(torch.empty(v, device="meta"))) for k, v in shapes.items()}
    indexed = None if "index" not in meta else meta["index"] is not None
    get = open_tensors(directory, shapes, state_shapes, (meta.get("checksums") or {}).get("tensors"), indexed)
    loader = None
    parent = os.path.dirname(os.path.abspath(directory))
    folder = os.path.basename(os.path.normpath(directory))
    if (folder == IMPORTANCE_DIR or folder.startswith(f"{IMPORTANCE_DIR}-")) and find_weights_file(parent) is not None:
        # checkpoint-N/importance[-name]/ beside checkpoint-N/model.safetensors (or output_dir/importance beside the
        # saved model): wanda / sparsegpt scores read W from there, one tensor per access, unless `bind` comes first.
        def loader():
            return _checkpoint_weights(parent, shapes)
    imp = Importance(config, meta["state"], shapes, get, path=directory, weights_loader=loader)
    if model is not None:
        imp.bind(model)
    return imp


def _checkpoint_weights(model_dir: str, shapes: dict[str, list[int]]) -> CheckpointWeights:
    """The tracked weights of the safetensors checkpoint `model_dir`, checked for names and shapes (headers only)."""
    mapping = weight_map(model_dir)
    missing = [n for n in shapes if n not in mapping]
    if missing:
        raise ValueError(f"The checkpoint {model_dir} beside the importance has no weight {missing[0]} ({len(missing)} "
                         "missing; a LoRA adapter checkpoint?): call importance.bind(model) with the model instead")
    headers = {f: read_header(os.path.join(model_dir, f)) for f in sorted({mapping[n] for n in shapes})}
    for name, shape in shapes.items():
        found = headers[mapping[name]].get(name, {}).get("shape")
        if found is not None and list(found) != list(shape):
            raise ValueError(f"{name} in {model_dir} has shape {list(found)}, the importance {list(shape)}: call "
                             "importance.bind(model) with the model the importance was computed for")
    return CheckpointWeights(model_dir, mapping, list(shapes))


def _download(repo_id: str, *, subfolder: str, revision, token) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        local = snapshot_download(
            repo_id, revision=revision, token=token,
            allow_patterns=[f"{prefix}{IMPORTANCE_DIR}/*", f"{prefix}importance*"],
        )
    except HFValidationError:
        raise FileNotFoundError(f"{repo_id}: no such folder, and not a valid Hub repo id") from None
    except LocalEntryNotFoundError:  # offline, or no network: say that the local folder is missing too
        raise FileNotFoundError(f"{repo_id}: no such local folder, and Hub repo {repo_id} is not in the local cache "
                                "(offline: HF_HUB_OFFLINE=1 or no network); check the path") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        raise FileNotFoundError(f"{repo_id}: no such local folder, and no importance could be downloaded from Hub repo "
                                f"{repo_id} (HTTP {status})") from None
    return local


def state_dict_bytes(tensors: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())



# ------------------------------------------------------------------------------------------------- masks

MASKS_NAME = "masks.safetensors"


def save_schedule_masks(directory: str, masks: Mapping[str, Tensor]) -> tuple[str, dict[str, int]]:
    """Write `PruneSchedule` keep-masks (`bool`, stored as `uint8`) beside the importance.

    Returns:
        `tuple[str, dict[str, int]]`: the file's path and the CRC32 of each stored mask (for `importance_config.json`).
    """
    path = os.path.join(directory, MASKS_NAME)
    stored = {k: v.detach().to("cpu", torch.uint8).contiguous() for k, v in masks.items()}
    save_file(stored, path, metadata={"format": "pt"})
    return path, {k: tensor_checksum(v) for k, v in stored.items()}


def load_schedule_masks(directory: str) -> dict[str, Tensor]:
    """The `PruneSchedule` keep-masks stored beside an importance (`masks.safetensors`), checked against the CRC32s
    recorded in `importance_config.json` (when the folder has them).

    Raises:
        ImportanceFileError: the file is missing, corrupt, or a mask does not match its checksum.
    """
    path = os.path.join(directory, MASKS_NAME)
    if not os.path.isfile(path):
        raise ImportanceFileError(f"{directory} has no {MASKS_NAME}: the pruning schedule's masks were not saved")
    config = os.path.join(directory, IMPORTANCE_CONFIG_NAME)
    expected = (_read_json(config).get("checksums") or {}).get("masks", {}) if os.path.isfile(config) else {}
    try:
        with safe_open(path, framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise ImportanceFileError(f"{path} is corrupt or truncated: {e}") from None
    for k, v in stored.items():
        if k in expected and tensor_checksum(v) != int(expected[k]):
            raise ImportanceFileError(f"{path}: mask {k} does not match its {CHECKSUM_ALGORITHM} in "
                                      f"{IMPORTANCE_CONFIG_NAME} (modified or names swapped); restore an intact copy")
    return {k: v.bool() for k, v in stored.items()}


# -------------------------------------------------------------------------------------- distillation teacher

# `output_dir/_distill-teacher/`: the default distillation teacher (a frozen copy of the model as the run began),
# written once at the run's first checkpoint so that a resume distils from the same teacher. The leading "_" keeps it
# out of the Trainer's Hub pushes and `checkpoint-*` globs (rotation never deletes it).
TEACHER_DIR = "_distill-teacher"
TEACHER_CONFIG_NAME = "teacher_config.json"
TEACHER_WEIGHTS_NAME = "model.safetensors"
TEACHER_INDEX_NAME = "model.safetensors.index.json"


def teacher_dir_name(name: str | None = None) -> str:
    """Folder (under `output_dir`) of the default distillation teacher of a callback: `_distill-teacher[-<name>]`."""
    return TEACHER_DIR if name is None else f"{TEACHER_DIR}-{name}"


def save_teacher_state(final_dir: str, tensors: Mapping[str, Tensor], *, meta: dict[str, Any] | None = None) -> int:
    """Write a distillation teacher's weights into `final_dir` atomically (single process: call it on rank 0).

    Layout, as a `save_pretrained` folder: `model.safetensors` (or HF shards of at most 5 GB + index) and
    `teacher_config.json` (format version, `meta`, every tensor's shape and dtype, their CRC32s), written last; the
    folder is written under a unique temporary name beside `final_dir` and renamed into place, replacing an older one.

    Args:
        final_dir (`str`): the folder to write (`output_dir/_distill-teacher`).
        tensors (`Mapping[str, Tensor]`): the teacher's state, without aliases (tied weights once); stored in their
            dtype (bfloat16 stays bfloat16).
        meta (`dict`, *optional*): JSON-ready facts recorded under `"state"` (e.g. the step the copy was taken at).

    Returns:
        `int`: bytes of tensor data written (`sum(numel * element_size)`).

    Raises:
        OSError: the folder could not be written (nothing is left at `final_dir` or under a temporary name).
        SafetensorError: safetensors refused the tensors.
    """
    import uuid

    from huggingface_hub import save_torch_state_dict

    parent, base = os.path.split(os.path.abspath(final_dir))
    _remove_dead_temporaries(parent, base)
    # Unique (two writers never share it), and made like any folder (umask), unlike mkdtemp's private 0700.
    tmp = os.path.join(parent, f".{base}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    os.makedirs(tmp)
    try:
        cpu = _cpu_tensors(tensors)
        save_torch_state_dict(cpu, tmp, max_shard_size="5GB", metadata={"format": "pt"})
        payload = {
            "format_version": FORMAT_VERSION,
            "library": "hf-weightprune",
            "library_version": __version__,
            "kind": "distill-teacher",
            "state": dict(meta or {}),
            "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in cpu.items()},
            "checksums": {"algorithm": CHECKSUM_ALGORITHM, "tensors": {n: tensor_checksum(t) for n, t in cpu.items()}},
        }
        atomic_write_json(os.path.join(tmp, TEACHER_CONFIG_NAME), payload)  # last: marks the folder complete
        publish(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return state_dict_bytes(cpu)


def _remove_dead_temporaries(parent: str, base: str) -> None:
    """Remove `.<base>.<pid>-<id>.tmp` folders a killed writer left (a full model each); a live writer's stay."""
    prefix = f".{base}."
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        pid = entry[len(prefix):].split("-", 1)[0] if entry.startswith(prefix) and entry.endswith(".tmp") else ""
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        except OSError:  # alive, another user's
            continue


def load_teacher_state(directory: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a teacher written by [`save_teacher_state`], every tensor checked against its recorded shape and CRC32.

    Args:
        directory (`str`): the `_distill-teacher` folder.

    Returns:
        `tuple[dict[str, Tensor], dict]`: the CPU tensors by name, and the parsed `teacher_config.json`.

    Raises:
        ImportanceFileError: the folder is missing, incomplete (no `teacher_config.json`), of another format version,
            or a file is truncated, corrupt or does not match its checksum (one line naming the file).
    """
    config = os.path.join(directory, TEACHER_CONFIG_NAME)
    if not os.path.isfile(config):
        what = "is incomplete" if os.path.isdir(directory) else "does not exist"
        raise ImportanceFileError(f"{directory} {what} (no {TEACHER_CONFIG_NAME})")
    meta = _read_json(config)
    if meta.get("format_version") != FORMAT_VERSION or meta.get("kind") != "distill-teacher":
        raise ImportanceFileError(f"{config}: not a distillation teacher of format_version {FORMAT_VERSION} "
                                  f"(got {meta.get('kind')!r}, version {meta.get('format_version')!r}); upgrade hf-weightprune")
    expected = meta.get("tensors") or {}
    sums = (meta.get("checksums") or {}).get("tensors") or {}
    index = os.path.join(directory, TEACHER_INDEX_NAME)
    if os.path.isfile(index):
        files = dict(_read_json(index).get("weight_map", {}))
    else:
        files = dict.fromkeys(expected, TEACHER_WEIGHTS_NAME)
    if set(files) != set(expected):
        raise ImportanceFileError(f"{directory}: the weight files hold other tensors than {TEACHER_CONFIG_NAME} lists")
    tensors: dict[str, Tensor] = {}
    for fname in sorted(set(files.values())):
        path = os.path.join(directory, fname)
        try:
            check_complete(path)
            with safe_open(path, framework="pt") as f:
                for name in [n for n, f_ in files.items() if f_ == fname]:
                    tensors[name] = f.get_tensor(name)
        except (FileNotFoundError, ValueError, SafetensorError, OSError) as e:
            raise ImportanceFileError(f"{path} is missing, corrupt or truncated: {e}") from None
    for name, t in tensors.items():
        want = expected[name]
        if list(t.shape) != list(want["shape"]) or str(t.dtype).removeprefix("torch.") != want["dtype"] or (
                name in sums and tensor_checksum(t) != int(sums[name])):
            raise ImportanceFileError(f"{directory}: tensor {name} does not match its shape, dtype or "
                                      f"{CHECKSUM_ALGORITHM} in {TEACHER_CONFIG_NAME}; the folder was modified or is corrupt")
    return tensors, meta
