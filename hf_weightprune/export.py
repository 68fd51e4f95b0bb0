"""`save_pruned`: a standard HF checkpoint plus `sparsity.json` and a model card, written atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from . import __version__
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
    if source and os.path.isdir(source) and _same_or_inside(output_dir, source):
        raise ValueError(f"Refusing to write into the input checkpoint {source}; choose another output_dir")
    imp_path = (report.importance or {}).get("path")
    if imp_path and _same_or_inside(output_dir, imp_path):
        raise ValueError(f"Refusing to write into the importance folder {imp_path}; choose another output_dir")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True to replace it")
    if base_model is None and source and not os.path.isdir(source):
        base_model = source

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(output_dir))}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        payload = sparsity_dict(report, base_model=base_model, schedule=schedule, eval_results=eval_results)
        with open(os.path.join(tmp, SPARSITY_NAME), "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        if write_card:
            from .hub import write_model_card

            write_model_card(tmp, base_model=base_model)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Saved pruned model to %s (%s)", output_dir, report.summary())
    return output_dir


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
