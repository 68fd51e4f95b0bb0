"""The files of a pruned folder: their names and the one reader of `sparsity.json`.

A pruned folder (written by `export.save_pruned` / `export.prune_checkpoint`) is a standard HF checkpoint plus
`sparsity.json` (what was pruned, measured from the weights written), a `README.md` model card, and, when a sweep ran,
`sweep.csv` / `sweep.json` / `sweep.png`. `export` writes them, `card` renders from them, `hub` uploads them; this
module holds what all three must agree on, so none of them imports another for a file name.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..io_utils import check_arg_type

SPARSITY_NAME = "sparsity.json"
SPARSITY_FORMAT_VERSION = 1
SWEEP_CSV = "sweep.csv"
SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"


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
