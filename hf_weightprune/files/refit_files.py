"""`refit_edits.safetensors`: what a pending `PruneSchedule(refit_at=...)` re-fit undoes, inside an importance folder.

The re-fit's target is each masked weight with every pruning edit undone, `W + E`, where `E` is the float32 sum of
the edits (`before - after`) of every mask update so far (`MaskHolder`). `W` is in the checkpoint's model weights;
`E` exists only in memory, so a checkpoint written between the first mask update and the re-fit step stores it here,
beside the schedule's `masks.safetensors`, and a resume re-fits towards exactly the target of an uninterrupted run.
Written by rank 0 as an attached file (`importance_files.write_importance(attach=...)`): a schedule runs on one
process or under DDP, where every rank holds the same weights and edits. Keys are the weight names prefixed `edits.`;
the CRC32 of each is recorded under `checksums.edits` of `importance_config.json`, checked when read.

Disk: 4 bytes per element of the masked weights (one float32 copy of them) in every checkpoint saved while the
re-fit is pending, none before the first update or after the re-fit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor

from .safetensors_io import load_sidecar, save_sidecar

__all__ = ["EDITS_NAME", "load_refit_edits", "save_refit_edits"]

EDITS_NAME = "refit_edits.safetensors"
EDITS_PREFIX = "edits."


def save_refit_edits(directory: str, edits: Mapping[str, Tensor]) -> dict[str, int]:
    """Write the summed pruning edits of a pending re-fit (`MaskHolder.refit_edits()`) as `refit_edits.safetensors`.

    Args:
        directory (`str`): the importance folder being written (rank 0, before its config).
        edits (`Mapping[str, Tensor]`): float32 edits, shaped as their weights, by weight name.

    Returns:
        `dict[str, int]`: the CRC32 of each stored tensor, recorded under `checksums.edits`.

    Raises:
        OSError, SafetensorError: the file could not be written.
    """
    return save_sidecar(os.path.join(directory, EDITS_NAME), EDITS_PREFIX, edits)


def load_refit_edits(directory: str, checksums: Mapping[str, int] | None = None) -> dict[str, Tensor]:
    """The edits stored by [`save_refit_edits`] (prefix removed, on CPU), each checked against its CRC32.

    Args:
        directory (`str`): the importance folder holding `refit_edits.safetensors`.
        checksums (`Mapping[str, int]`, *optional*): as recorded at write time (`checksums.edits`).

    Returns:
        `dict[str, Tensor]`: float32 edits by weight name.

    Raises:
        ImportanceFileError: the file is missing, corrupt, or a tensor does not match its checksum.
    """
    return load_sidecar(os.path.join(directory, EDITS_NAME), EDITS_PREFIX, checksums,
                        f"{directory} has no {EDITS_NAME}: the pruning edits of its pending re-fit were not saved")
