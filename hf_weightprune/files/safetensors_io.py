"""The one raw reader of safetensors files and of the HF shard index, and what every file format here shares.

A safetensors file is an 8-byte little-endian header length `n`, `n` bytes of JSON
(`{tensor: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {...}}`), then the tensor data, the
offsets counted from the end of the header. `safetensors.safe_open` validates the header but not that the data is
all there, and gives no access to the raw bytes, which the masked shard copy needs. Everything here raises
`ValueError` (corrupt input) or `FileNotFoundError` with a one-line message naming the file; callers that have
their own error type (the importance reader) wrap it.

Shared by the formats of `files/` (importance folder, training state, pruned folder): the CRC32 of a tensor's bytes
recorded at write time ([`tensor_checksum`]), the JSON reader that turns a corrupt file into one line
([`read_json`]), and [`ImportanceFileError`], the error of the folders written during training.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "CHECKSUM_ALGORITHM",
    "CheckpointWeights",
    "INDEX_NAME",
    "ImportanceFileError",
    "SAFETENSORS_NAME",
    "check_complete",
    "checkpoint_weights",
    "copy_shard_masked",
    "cpu_tensors",
    "find_weights_file",
    "read_header",
    "read_index",
    "read_json",
    "tensor_checksum",
    "weight_map",
]

SAFETENSORS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# The safetensors library refuses headers over 100 MB; so do we, before allocating them.
MAX_HEADER_BYTES = 100 << 20

CHECKSUM_ALGORITHM = "crc32"

_FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
_COPY_CHUNK = 64 << 20


class ImportanceFileError(ValueError):
    """A folder written during training (importance, schedule masks, distillation teacher) is missing, incomplete,
    corrupt, or of an unsupported format version."""


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


def cpu_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies (what safetensors writes and [`tensor_checksum`] reads)."""
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def read_json(path: str | os.PathLike) -> dict:
    """Parse a JSON file of a folder written during training.

    Args:
        path (`str` or `os.PathLike`): the file.

    Returns:
        `dict`: its content.

    Raises:
        FileNotFoundError: the file does not exist.
        ImportanceFileError: it is not valid JSON (one line: corrupt or truncated).
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImportanceFileError(f"{os.fspath(path)} is not valid JSON ({e}); the file is corrupt or truncated") from None


def _read_raw_header(f: IO[bytes], path: str, size: int) -> tuple[bytes, bytes, dict[str, Any]]:
    """`(8-byte length prefix, header bytes, parsed header)` of the open file `f` positioned at 0."""
    prefix = f.read(8)
    header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 0 < header_len <= min(size - 8, MAX_HEADER_BYTES):
        raise ValueError(f"{path} is not a safetensors file (bad header length {header_len} for {size} bytes)")
    raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} has a corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    return prefix, raw, header


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read and parse the JSON header of a safetensors file, without reading its tensors.

    Args:
        path (`str` or `os.PathLike`): a `.safetensors` file.

    Returns:
        `dict[str, Any]`: `{tensor name: {"dtype": str, "shape": list[int], "data_offsets": [start, end]}}`, plus
        `"__metadata__"` when the file has one. Offsets are in bytes from the end of the header.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the length prefix is missing, zero, larger than the file or than 100 MB, or the header is not
            a JSON object.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as f:
        return _read_raw_header(f, path, os.fstat(f.fileno()).st_size)[2]


def _layout(header: dict[str, Any], path: str) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """Tensor entries sorted by offset, checked to follow each other without gaps; and the data size in bytes."""
    try:
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: list(kv[1]["data_offsets"]))
        position = 0
        for key, info in entries:
            start, end = (int(x) for x in info["data_offsets"])
            if start != position or end < start:
                raise ValueError(f"{path}: tensor {key} is not where the header layout says (offset {start})")
            position = end
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} has a corrupt safetensors header ({type(e).__name__}: {e})") from None
    return entries, position


def check_complete(path: str | os.PathLike) -> None:
    """Check that a safetensors file holds all the bytes its header describes.

    `safe_open` validates the header but not that the data is all there: a file cut short by a crash or a partial
    download opens fine and fails (or reads garbage) only when the last tensors are read.

    Args:
        path (`str` or `os.PathLike`): a `.safetensors` file.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the header is invalid (see [`read_header`]), its tensors overlap or leave gaps, or the file
            is shorter than the header says (`"... is corrupt or truncated: N bytes, header needs M"`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        _, raw, header = _read_raw_header(f, path, size)
    need = 8 + len(raw) + _layout(header, path)[1]
    if need > size:
        raise ValueError(f"{path} is corrupt or truncated: {size} bytes, header needs {need}")


def find_weights_file(model_dir: str | os.PathLike) -> str | None:
    """The path of `model.safetensors` or else `model.safetensors.index.json` (sharded) in `model_dir`, or `None`.

    Transformers' order: with both (a Hub repo the Trainer pushed twice keeps every upload's files), `from_pretrained`
    loads `model.safetensors`, so this library reads, prunes and binds that same file.

    Args:
        model_dir (`str` or `os.PathLike`): a local model folder.

    Returns:
        `str` or `None`: the single weights file when there is one, else the index, else `None`.
    """
    for name in (SAFETENSORS_NAME, INDEX_NAME):
        candidate = os.path.join(os.fspath(model_dir), name)
        if os.path.isfile(candidate):
            return candidate
    return None


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """Parse an HF shard index (`*.safetensors.index.json`): the one reader of that format, for the model, the
    distillation teacher and the importance (whose index adds `row_shards`).

    Args:
        path (`str` or `os.PathLike`): the index file.

    Returns:
        `dict[str, Any]`: the parsed index; its `"weight_map"` is a `{tensor name: file name}` dict of strings.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not JSON or has no valid `weight_map` object.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a valid safetensors index: {e}") from None
    mapping = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ValueError(f"{path} has no valid \"weight_map\" object {{tensor name: file name}}")
    return index


def weight_map(model_dir: str | os.PathLike) -> dict[str, str]:
    """Which file of a safetensors checkpoint holds each tensor (through [`read_index`] when it is sharded).

    Args:
        model_dir (`str` or `os.PathLike`): a local folder with `model.safetensors` or a sharded index.

    Returns:
        `dict[str, str]`: `{tensor name: file name relative to model_dir}`, in the index's (or header's) order.

    Raises:
        FileNotFoundError: the folder has neither `model.safetensors` nor `model.safetensors.index.json`.
        ValueError: the index is not JSON or has no `weight_map` object; the single file has a bad header.
    """
    model_dir = os.fspath(model_dir)
    found = find_weights_file(model_dir)
    if found is None:
        raise FileNotFoundError(f"{model_dir} has neither {SAFETENSORS_NAME} nor {INDEX_NAME} (only safetensors "
                                "checkpoints can be read file by file)")
    if found.endswith(SAFETENSORS_NAME):
        return {k: SAFETENSORS_NAME for k in read_header(found) if k != "__metadata__"}
    return dict(read_index(found)["weight_map"])


class CheckpointWeights(Mapping):
    """Read-only `{name: tensor}` view of a safetensors checkpoint that reads one tensor per access.

    Nothing is kept in memory between accesses (what `wanda` rankings multiply by when a checkpoint is pruned
    file to file).

    Args:
        model_dir (`str`): the checkpoint folder.
        weight_map (`dict[str, str]`): from [`weight_map`].
        names (`list[str]`): the tensors this view exposes.
    """

    def __init__(self, model_dir: str, weight_map: dict[str, str], names: list[str]):
        self._dir, self._map, self._names = model_dir, weight_map, list(names)
        self._known = set(self._names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        with safe_open(os.path.join(self._dir, self._map[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def checkpoint_weights(model_dir: str, shapes: dict[str, list[int]]) -> CheckpointWeights:
    """The weights `shapes` names in the safetensors checkpoint `model_dir`, checked for names and shapes (headers
    only): what an importance saved beside a checkpoint binds to lazily.

    Raises:
        ValueError: a weight is missing (a LoRA adapter checkpoint?) or has another shape.
    """
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


def _copy_bytes(fin: IO[bytes], fout: IO[bytes], nbytes: int, buffer: bytearray) -> bytearray:
    """Copy `nbytes` from `fin` to `fout` in chunks through `buffer` (grown if needed); return the buffer."""
    if len(buffer) < min(nbytes, _COPY_CHUNK):
        buffer = bytearray(min(nbytes, _COPY_CHUNK))
    view = memoryview(buffer)
    while nbytes:
        n = fin.readinto(view[: min(nbytes, len(buffer))])
        if not n:
            raise ValueError(f"{fin.name} ended early")
        fout.write(view[:n])
        nbytes -= n
    return buffer


def copy_shard_masked(src: str, dst: str, mask_of: Callable[[str, list[int]], Callable[[Tensor], None] | None],
                      buffer: bytearray) -> bytearray:
    """Copy safetensors file `src` to `dst` byte for byte, zeroing the pruned elements of tensors that have a mask.

    Same header, same offsets: masking changes no size. Read and written sequentially with `readinto` into one
    reused buffer, so nothing is memory-mapped and no fresh memory is faulted in per tensor (`safe_open` +
    `save_file` would hold a whole shard of new tensors). The header is checked for a layout that covers the file
    exactly before anything is written.

    Args:
        src (`str`): the source `.safetensors` file.
        dst (`str`): the file to write (created or truncated).
        mask_of (`Callable[[str, list[int]], Callable[[Tensor], None] | None]`): called with each tensor's name and
            stored shape; returns a callable that edits the tensor in place (given a tensor view of the buffer, in the
            stored dtype: it applies the mask, or runs the OBS sweep), or `None` to copy the tensor unchanged.
        buffer (`bytearray`): a reusable buffer (may be empty); grown to the largest masked tensor.

    Returns:
        `bytearray`: the (possibly grown) buffer, to pass to the next call.

    Raises:
        ValueError: `src` has a bad header, is truncated or has trailing bytes, or a masked tensor is not a float
            dtype (BF16, F16, F32, F64).
    """
    with open(src, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        prefix, raw, header = _read_raw_header(fin, src, size)
        entries, data_size = _layout(header, src)
        if 8 + len(raw) + data_size != size:
            raise ValueError(f"{src} is truncated or has trailing bytes ({size} bytes, header says "
                             f"{8 + len(raw) + data_size})")
        with open(dst, "wb") as fout:
            fout.write(prefix)
            fout.write(raw)
            for key, info in entries:
                start, end = info["data_offsets"]
                nbytes = end - start
                edit = mask_of(key, info["shape"])
                if edit is None:  # copied as is, in chunks
                    buffer = _copy_bytes(fin, fout, nbytes, buffer)
                    continue
                dtype = _FLOAT_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"{key}: cannot prune a tensor of dtype {info['dtype']}")
                if len(buffer) < nbytes:
                    buffer = bytearray(nbytes)
                view = memoryview(buffer)[:nbytes]
                if fin.readinto(view) != nbytes:
                    raise ValueError(f"{src} ended inside tensor {key}")
                edit(torch.frombuffer(view, dtype=dtype).view(info["shape"]))
                fout.write(view)
            fout.flush()
            os.fsync(fout.fileno())
    return buffer


def write_safetensors(tensors: Mapping[str, Tensor], path: str) -> None:
    """`safetensors.torch.save_file` with `{"format": "pt"}` metadata, except for an empty file: safetensors 0.4
    (the floor this package supports) cannot read back an empty file that carries metadata, and a rank that owns no
    tensor, or statistics restarted just before a save, write empty files.

    Raises:
        OSError, SafetensorError: the file could not be written.
    """
    save_file(dict(tensors), path, metadata={"format": "pt"} if tensors else None)


def save_sidecar(path: str, prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """Write statistics attached to an importance folder (`units.safetensors`, `cross.safetensors`) as one file.

    Args:
        path (`str`): the file to write, inside the importance folder being written (rank 0, before its config).
        prefix (`str`): put before every key (`"units."`), so the file's keys never clash with the importance's.
        tensors (`Mapping[str, Tensor]`): the tensors by key.

    Returns:
        `dict[str, int]`: the CRC32 of each stored tensor under its prefixed key, for `importance_config.json`.

    Raises:
        OSError, SafetensorError: the file could not be written.
    """
    stored = cpu_tensors({f"{prefix}{k}": v for k, v in tensors.items()})
    write_safetensors(stored, path)
    return {k: tensor_checksum(v) for k, v in stored.items()}


def load_sidecar(path: str, prefix: str, checksums: Mapping[str, int] | None, missing: str) -> dict[str, Tensor]:
    """The tensors [`save_sidecar`] stored (prefix removed), each checked against its CRC32 when one is recorded.

    Raises:
        ImportanceFileError: `missing` when the file does not exist; the file is corrupt, or a tensor does not match
            its checksum.
    """
    if not os.path.isfile(path):
        raise ImportanceFileError(missing)
    try:
        with safe_open(path, framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise ImportanceFileError(f"{path} is corrupt or truncated: {e}") from None
    expected = checksums or {}
    for k, v in stored.items():
        if k in expected and tensor_checksum(v) != int(expected[k]):
            raise ImportanceFileError(f"{path}: {k} does not match its {CHECKSUM_ALGORITHM} in the importance config "
                                      "(modified or names swapped); restore an intact copy")
    return {k[len(prefix):]: v for k, v in stored.items()}
