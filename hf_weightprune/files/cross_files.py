"""`cross.safetensors`: the dense-to-pruned cross term of `PruneSchedule(cross_term=True)`, inside an importance folder.

The sums of a `collect.cross.CrossTerm` (float32 `[in, in]`, one per distinct Linear input, summed across ranks) are
written by rank 0 beside the importance buffers as an attached file (`importance_files.write_importance(attach=...)`):
keys are the weight names prefixed `cross.` (`cross.model.layers.0.self_attn.q_proj.weight`), and the CRC32 of each is
recorded under `checksums.cross` of `importance_config.json`, checked when read. Its token counts and which weights
share an input are the importance's `cross` JSON section.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor

from .safetensors_io import load_sidecar, save_sidecar

__all__ = ["CROSS_NAME", "load_cross_state", "save_cross_state"]

CROSS_NAME = "cross.safetensors"
CROSS_PREFIX = "cross."


def save_cross_state(directory: str, sums: Mapping[str, Tensor]) -> dict[str, int]:
    """Write the cross-term sums (`CrossTerm.state_dict()["tensors"]`) as `cross.safetensors`.

    Args:
        directory (`str`): the importance folder being written (rank 0, before its config).
        sums (`Mapping[str, Tensor]`): `[in, in]` sums by weight name.

    Returns:
        `dict[str, int]`: the CRC32 of each stored tensor, recorded under `checksums.cross`.

    Raises:
        OSError, SafetensorError: the file could not be written.
    """
    return save_sidecar(os.path.join(directory, CROSS_NAME), CROSS_PREFIX, sums)


def load_cross_state(directory: str, checksums: Mapping[str, int] | None = None) -> dict[str, Tensor]:
    """The sums stored by [`save_cross_state`] (prefix removed), each checked against its CRC32.

    Raises:
        ImportanceFileError: the file is missing, corrupt, or a tensor does not match its checksum.
    """
    return load_sidecar(os.path.join(directory, CROSS_NAME), CROSS_PREFIX, checksums,
                        f"{directory} has no {CROSS_NAME}: its cross term was not saved")
