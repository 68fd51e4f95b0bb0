"""`save_pruned`: a standard HF checkpoint plus `sparsity.json` and a model card, written atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .config import PruneConfig
from .importance import Importance
from .pruner import PruningReport

logger = logging.getLogger(__name__)

SPARSITY_NAME = "sparsity.json"
SPARSITY_FORMAT_VERSION = 1


def _same_or_inside(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b + os.sep)


def sparsity_dict(report: PruningReport, *, base_model: str | None = None, schedule: dict | None = None,
                  eval_results: dict | None = None) -> dict[str, Any]:
    """The `sparsity.json` payload (schema documented in docs/file_formats.md)."""
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
        "importance": report.importance,
        "base_model": base_model,
        "tensors": report.tensors,
        "structured": report.structured,
        "schedule": schedule,
        "eval": eval_results,
    }


def _check_output(output_dir: str, *, input_dir: str | None, importance_dir: str | None, overwrite: bool) -> None:
    """Refuse to write into the input checkpoint or the importance folder, or over a non-empty folder."""
    if input_dir and os.path.isdir(input_dir) and _same_or_inside(output_dir, input_dir):
        raise ValueError(f"Refusing to write into the input checkpoint {input_dir}; choose another output_dir")
    if importance_dir and _same_or_inside(output_dir, importance_dir):
        raise ValueError(f"Refusing to write into the importance folder {importance_dir}; choose another output_dir")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True to replace it")


@contextmanager
def _atomic_folder(output_dir: str):
    """Yield a temporary sibling folder; on success it replaces `output_dir`, on error it is removed."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(output_dir))}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_sparsity_and_card(folder: str, payload: dict[str, Any], base_model: str | None, write_card: bool) -> None:
    with open(os.path.join(folder, SPARSITY_NAME), "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    if write_card:
        from .hub import write_model_card

        write_model_card(folder, base_model=base_model)


def save_pruned(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    report: PruningReport,
    tokenizer=None,
    base_model: str | None = None,
    eval_results: dict | None = None,
    schedule: dict | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    write_card: bool = True,
) -> str:
    """Save a pruned model as a standard HF checkpoint with `sparsity.json` and a `README.md` model card.

    Args:
        model (`nn.Module`): the pruned model (`prune_` already applied).
        output_dir (`str`): a new or empty folder. The input checkpoint and the importance folder are refused.
        report (`PruningReport`): what `prune_` returned.
        tokenizer (*optional*): saved beside the model.
        base_model (`str`, *optional*): Hub id or path of the dense model (card front matter); defaults to
            `model.config._name_or_path` when that looks like a Hub id.
        eval_results (`dict`, *optional*): `{"dense_loss", "pruned_loss", "dataset"}` for the card.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `output_dir`.
    """
    output_dir = os.fspath(output_dir)
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    _check_output(output_dir, input_dir=source, importance_dir=(report.importance or {}).get("path"),
                  overwrite=overwrite)
    if base_model is None and source and not os.path.isdir(source):
        base_model = source

    with _atomic_folder(output_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        payload = sparsity_dict(report, base_model=base_model, schedule=schedule, eval_results=eval_results)
        _write_sparsity_and_card(tmp, payload, base_model, write_card)
    logger.info("Saved pruned model to %s (%s)", output_dir, report.summary())
    return output_dir


# Files of a model folder that a pruned copy keeps (config, shard index, tokenizer, custom code); not weights, not
# README.md, not a Trainer checkpoint's optimizer or state.
_KEEP_FILES = ("config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
               "vocab.*", "merges.txt", "*.model", "*.tiktoken", "chat_template.*", "preprocessor_config.json",
               "*.py")


def _weight_files(model_dir: str) -> dict[str, str]:
    """`{tensor key: shard file}` of a safetensors checkpoint (single file or HF sharded index)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json "
                                "(only safetensors checkpoints can be pruned file to file)")
    try:
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), "model.safetensors")
    except SafetensorError as e:
        raise ValueError(f"{single} is corrupt or truncated: {e}") from None


class _CheckpointWeights(Mapping):
    """Tensors of a checkpoint read one at a time on access (what `wanda` rankings multiply by)."""

    def __init__(self, model_dir: str, weight_map: dict[str, str], names: list[str]):
        self._dir, self._map, self._names = model_dir, weight_map, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        with safe_open(os.path.join(self._dir, self._map[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_SAFETENSORS_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
_COPY_CHUNK = 64 << 20


def _copy_shard_masked(src: str, dst: str, mask_of: Callable[[str, list[int]], torch.Tensor | None],
                       buffer: bytearray) -> bytearray:
    """Copy safetensors file `src` to `dst` byte for byte, except that tensors with a mask get their pruned
    elements zeroed. Returns the (possibly grown) reusable buffer.

    Same header, same offsets: masking changes no size. Read and written sequentially with `readinto` into one
    reused buffer, so nothing is memory-mapped and no fresh memory is faulted in per tensor (`safe_open` +
    `save_file` would hold a whole shard of new tensors). The header is the format's JSON, checked for a layout
    that covers the file exactly before anything is written.
    """
    from . import masks as M

    with open(src, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        head = fin.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < header_len <= min(size - 8, 100 << 20):
            raise ValueError(f"{src} is not a safetensors file (bad header length)")
        header_bytes = fin.read(header_len)
        try:
            header = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{src} has a corrupt safetensors header: {e}") from None
        try:
            entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                             key=lambda kv: list(kv[1]["data_offsets"]))
            position = 0
            for key, info in entries:
                start, end = (int(x) for x in info["data_offsets"])
                if start != position or end < start:
                    raise ValueError(f"{src}: tensor {key} is not where the header layout says (offset {start})")
                position = end
        except (AttributeError, KeyError, TypeError) as e:
            raise ValueError(f"{src} has a corrupt safetensors header ({type(e).__name__}: {e})") from None
        if 8 + header_len + position != size:
            raise ValueError(f"{src} is truncated or has trailing bytes ({size} bytes, header says "
                             f"{8 + header_len + position})")
        with open(dst, "wb") as fout:
            fout.write(head)
            fout.write(header_bytes)
            for key, info in entries:
                start, end = info["data_offsets"]
                nbytes = end - start
                mask = mask_of(key, info["shape"])
                if mask is None:  # copied as is, in chunks
                    if len(buffer) < min(nbytes, _COPY_CHUNK):
                        buffer = bytearray(min(nbytes, _COPY_CHUNK))
                    view = memoryview(buffer)
                    while nbytes:
                        n = fin.readinto(view[: min(nbytes, len(buffer))])
                        fout.write(view[:n])
                        nbytes -= n
                    continue
                dtype = _SAFETENSORS_FLOATS.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"{key}: cannot prune a tensor of dtype {info['dtype']}")
                if len(buffer) < nbytes:
                    buffer = bytearray(nbytes)
                view = memoryview(buffer)[:nbytes]
                if fin.readinto(view) != nbytes:
                    raise ValueError(f"{src} ended inside tensor {key}")
                tensor = torch.frombuffer(view, dtype=dtype).view(info["shape"])
                M.apply_mask_(tensor, mask)
                fout.write(view)
            fout.flush()
            os.fsync(fout.fileno())
    return buffer


@torch.no_grad()
def prune_checkpoint(
    model_dir: str | os.PathLike,
    importance: Importance,
    output_dir: str | os.PathLike,
    config: PruneConfig | None = None,
    *,
    base_model: str | None = None,
    overwrite: bool = False,
    write_card: bool = True,
    progress: bool = True,
) -> PruningReport:
    """Prune a safetensors checkpoint file to file: the same result as `from_pretrained` + `prune_` + `save_pruned`,
    without building the model.

    Unstructured and N:M only (structured pruning changes shapes: load the model and use `prune_`). The model is
    built on the meta device (no memory) to validate the importance and find tied weights; global thresholds
    stream over the importance; then each shard is copied with its pruned tensors masked on the way (same file
    names, header and index), through one reused buffer the size of the largest tensor. Config, tokenizer and
    custom-code files are copied; `sparsity.json` and a model card are added. Written to a temporary folder, then
    renamed.

    Args:
        model_dir (`str`): a local folder with `config.json` and safetensors weights. Never modified.
        importance (`Importance`): from `load_importance()`.
        output_dir (`str`): a new or empty folder (not inside `model_dir` or the importance folder).
        config (`PruneConfig`, *optional*): defaults to 50% unstructured, global threshold.
    """
    from fnmatch import fnmatch

    from transformers import AutoConfig, AutoModelForCausalLM

    from .pruner import _refuse_tied, _selected, finish_report, mask_builder, new_report, record

    config = config or PruneConfig()
    if config.kind in ("neurons", "heads"):
        raise ValueError(f"structure={config.structure!r} changes tensor shapes and cannot be applied file to "
                         "file: load the model, call prune_ and save_pruned")
    model_dir, output_dir = os.fspath(model_dir), os.fspath(output_dir)
    _check_output(output_dir, input_dir=model_dir, importance_dir=importance.path, overwrite=overwrite)

    weight_map = _weight_files(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    importance.bind(skeleton, weights=_CheckpointWeights(model_dir, weight_map, importance.names))
    names = _selected(importance, config)
    missing = [n for n in importance.names if n not in weight_map]
    if missing:
        tied = " (tied to the input embedding: tie_word_embeddings)" if missing[0].endswith("lm_head.weight") else ""
        raise ValueError(f"{missing[0]}{tied} is tracked by the importance but not stored in {model_dir}")
    _refuse_tied(skeleton, dict(skeleton.named_parameters()), names)
    report = new_report(importance, config)
    masks = mask_builder(importance, config, names)
    selected = set(names)

    def mask_of(key: str, shape: list[int]) -> torch.Tensor | None:
        mask = masks(key) if key in selected else None
        if mask is not None:
            if list(mask.shape) != list(shape):
                raise ValueError(f"{key}: mask shape {list(mask.shape)} != stored shape {shape}")
            record(report, key, mask)
        return mask

    with _atomic_folder(output_dir) as tmp:
        shards = sorted(set(weight_map.values()))
        buffer = bytearray()  # one buffer reused for every pruned tensor: no fresh memory to fault in
        for shard in tqdm(shards, desc=f"pruning {len(shards)} shard(s)", disable=not progress):
            buffer = _copy_shard_masked(os.path.join(model_dir, shard), os.path.join(tmp, shard), mask_of, buffer)
        for entry in os.listdir(model_dir):
            src = os.path.join(model_dir, entry)
            if os.path.isfile(src) and any(fnmatch(entry, pattern) for pattern in _KEEP_FILES):
                shutil.copy2(src, os.path.join(tmp, entry))
        report.tensors = {n: report.tensors[n] for n in names if n in report.tensors}  # model order, as prune_
        finish_report(report, sum(p.numel() for p in skeleton.parameters()))
        if base_model is None:
            source = getattr(skeleton.config, "_name_or_path", "") or ""
            base_model = source if source and not os.path.isdir(source) and source != model_dir else None
        _write_sparsity_and_card(tmp, sparsity_dict(report, base_model=base_model), base_model, write_card)
    logger.info("Saved pruned checkpoint to %s (%s)", output_dir, report.summary())
    return report


def load_sparsity(path: str | os.PathLike) -> dict[str, Any]:
    """Read `sparsity.json` from a pruned checkpoint folder."""
    file = os.path.join(os.fspath(path), SPARSITY_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a pruned checkpoint (no {SPARSITY_NAME})")
    with open(file) as f:
        return json.load(f)


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Keep-masks of a pruned checkpoint: `weight != 0` for every tensor its `sparsity.json` lists.

    Read from the checkpoint's safetensors files (one tensor at a time), not from a model in memory.
    """
    path = os.fspath(path)
    names = list(load_sparsity(path).get("tensors") or {})
    if not names:
        raise ValueError(f"{path}/{SPARSITY_NAME} lists no pruned tensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        weight_map = {}
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    missing = [n for n in names if weight_map and n not in weight_map]
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensors of {SPARSITY_NAME} are not in the checkpoint (e.g. {missing[0]})")
    out = {}
    for name in names:
        with safe_open(os.path.join(path, weight_map.get(name, "model.safetensors")), framework="pt") as f:
            if name not in f.keys():  # noqa: SIM118
                raise ValueError(f"{path}: {name} (listed in {SPARSITY_NAME}) is not in the checkpoint")
            out[name] = f.get_tensor(name) != 0
    return out
