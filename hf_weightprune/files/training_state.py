"""What a resume needs besides the importance: the schedule's keep-masks and the distillation teacher.

- `masks.safetensors` (inside `checkpoint-N/importance[-<name>]/`, attached to the importance write so that both
  are published together): a `PruneSchedule`'s keep-masks, `bool` stored as `uint8`; their CRC32s are recorded in
  the importance's `importance_config.json` (`checksums.masks`), which the reader hands over (it is parsed once).
- `output_dir/_distill-teacher[-<name>]/`: the default distillation teacher (a frozen copy of the model as the run
  began), written once at the run's first checkpoint so that a resume distils from the same teacher. A
  `save_pretrained`-style folder (`model.safetensors` or HF shards + index) with `teacher_config.json` written last.
  The leading `_` keeps it out of the Trainer's Hub pushes and `checkpoint-*` globs (rotation never deletes it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .._version import __version__
from ..io_utils import atomic_folder, atomic_write_json
from .safetensors_io import (
    CHECKSUM_ALGORITHM,
    ImportanceFileError,
    check_complete,
    cpu_tensors,
    read_json,
    tensor_checksum,
    weight_map,
    write_safetensors,
)

MASKS_NAME = "masks.safetensors"
# The version of the teacher folder's format (the importance folder has its own, `IMPORTANCE_FORMAT_VERSION`).
TEACHER_FORMAT_VERSION = 1
TEACHER_DIR = "_distill-teacher"
TEACHER_CONFIG_NAME = "teacher_config.json"
TEACHER_WEIGHTS_NAME = "model.safetensors"
TEACHER_INDEX_NAME = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------------- schedule masks


def save_schedule_masks(directory: str, masks: Mapping[str, Tensor]) -> tuple[str, dict[str, int]]:
    """Write `PruneSchedule` keep-masks (`bool`, stored as `uint8`) into `directory`.

    Args:
        directory (`str`): an existing folder (the importance folder being written).
        masks (`Mapping[str, Tensor]`): keep-masks by canonical parameter name.

    Returns:
        `tuple[str, dict[str, int]]`: the file's path and the CRC32 of each stored mask (for `importance_config.json`).

    Raises:
        OSError, SafetensorError: the file could not be written.
    """
    path = os.path.join(directory, MASKS_NAME)
    stored = {k: v.detach().to("cpu", torch.uint8).contiguous() for k, v in masks.items()}
    write_safetensors(stored, path)
    return path, {k: tensor_checksum(v) for k, v in stored.items()}


def load_schedule_masks(directory: str, checksums: Mapping[str, int] | None = None) -> dict[str, Tensor]:
    """The keep-masks stored by [`save_schedule_masks`], each checked against its recorded CRC32.

    Args:
        directory (`str`): the importance folder holding `masks.safetensors`.
        checksums (`Mapping[str, int]`, *optional*): `{name: crc}` as recorded at write time (the importance's
            `sections["checksums"]["masks"]`); masks without one are read unchecked.

    Returns:
        `dict[str, Tensor]`: `bool` keep-masks by name.

    Raises:
        ImportanceFileError: the file is missing, corrupt, or a mask does not match its checksum.
    """
    path = os.path.join(directory, MASKS_NAME)
    if not os.path.isfile(path):
        raise ImportanceFileError(f"{directory} has no {MASKS_NAME}: the pruning schedule's masks were not saved")
    expected = checksums or {}
    try:
        with safe_open(path, framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise ImportanceFileError(f"{path} is corrupt or truncated: {e}") from None
    for k, v in stored.items():
        if k in expected and tensor_checksum(v) != int(expected[k]):
            raise ImportanceFileError(f"{path}: mask {k} does not match its {CHECKSUM_ALGORITHM} in the importance "
                                      "config (modified or names swapped); restore an intact copy")
    return {k: v.bool() for k, v in stored.items()}


# ------------------------------------------------------------------------------------- distillation teacher


def teacher_dir_name(name: str | None = None) -> str:
    """Folder (under `output_dir`) of the default distillation teacher of a callback: `_distill-teacher[-<name>]`."""
    return TEACHER_DIR if name is None else f"{TEACHER_DIR}-{name}"


def save_teacher_state(final_dir: str, tensors: Mapping[str, Tensor], *, meta: dict[str, Any] | None = None) -> int:
    """Write a distillation teacher's weights into `final_dir` atomically (single process: call it on rank 0).

    Layout, as a `save_pretrained` folder: `model.safetensors` (or HF shards of at most 5 GB + index) and
    `teacher_config.json` (format version, `meta`, every tensor's shape and dtype, their CRC32s), written last; the
    folder is written under a unique temporary name beside `final_dir` (`io_utils.atomic_folder`) and renamed into
    place, replacing an older one.

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
    from huggingface_hub import save_torch_state_dict

    cpu = cpu_tensors(tensors)
    with atomic_folder(final_dir, overwrite=True) as tmp:
        save_torch_state_dict(cpu, tmp, max_shard_size="5GB", metadata={"format": "pt"})
        payload = {
            "format_version": TEACHER_FORMAT_VERSION,
            "library": "hf-weightprune",
            "library_version": __version__,
            "kind": "distill-teacher",
            "state": dict(meta or {}),
            "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in cpu.items()},
            "checksums": {"algorithm": CHECKSUM_ALGORITHM, "tensors": {n: tensor_checksum(t) for n, t in cpu.items()}},
        }
        atomic_write_json(os.path.join(tmp, TEACHER_CONFIG_NAME), payload)  # last: marks the folder complete
    return sum(t.numel() * t.element_size() for t in cpu.values())


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
    meta = read_json(config)
    if meta.get("format_version") != TEACHER_FORMAT_VERSION or meta.get("kind") != "distill-teacher":
        raise ImportanceFileError(f"{config}: not a distillation teacher of format_version {TEACHER_FORMAT_VERSION} "
                                  f"(got {meta.get('kind')!r}, version {meta.get('format_version')!r}); upgrade hf-weightprune")
    expected = meta.get("tensors") or {}
    sums = (meta.get("checksums") or {}).get("tensors") or {}
    try:
        files = weight_map(directory)  # the one reader of the HF shard index (model.safetensors first, as transformers)
    except (FileNotFoundError, ValueError) as e:
        raise ImportanceFileError(f"{directory}: {e}") from None
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
