"""`units.safetensors`: the unit statistics of `ImportanceConfig(units=True)`, inside an importance folder.

The totals of a `collect.units.UnitCollector` (float64 sums, int64 counts), summed across ranks, are written by rank 0
beside the importance buffers as an attached file (`importance_files.write_importance(attach=...)`): keys are the
collector's state keys prefixed `units.` (`units.layers.0.neurons.abs`, ...), and the CRC32 of each is recorded under
`checksums.units` of `importance_config.json`, checked when read. Files written before the per-layer hidden Taylor
sums (`layers.{i}.taylor.hidden`, `taylor.hidden.outside`) load and score as before; only ranking hidden channels by
Taylor over the layers a prune keeps needs them (refused in one line), and a resume from them is refused (missing entry).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor

from .safetensors_io import load_sidecar, save_sidecar

__all__ = ["UNITS_NAME", "load_unit_state", "save_unit_state"]

UNITS_NAME = "units.safetensors"
UNITS_PREFIX = "units."


def save_unit_state(directory: str, state: Mapping[str, Tensor]) -> dict[str, int]:
    """Write the unit statistics (`UnitCollector.state_dict()`, summed across ranks) as `units.safetensors`.

    Keys are the collector's, prefixed `units.` (`units.layers.0.neurons.abs`, ...).

    Args:
        directory (`str`): the importance folder being written (rank 0, before its config).
        state (`Mapping[str, Tensor]`): the unit totals.

    Returns:
        `dict[str, int]`: the CRC32 of each stored tensor, recorded under `checksums.units`.

    Raises:
        OSError, SafetensorError: the file could not be written.
    """
    return save_sidecar(os.path.join(directory, UNITS_NAME), UNITS_PREFIX, state)


def load_unit_state(directory: str, checksums: Mapping[str, int] | None = None) -> dict[str, Tensor]:
    """The unit statistics stored by [`save_unit_state`] (prefix removed), each checked against its CRC32.

    Raises:
        ImportanceFileError: the file is missing, corrupt, or a tensor does not match its checksum.
    """
    return load_sidecar(os.path.join(directory, UNITS_NAME), UNITS_PREFIX, checksums,
                        f"{directory} has no {UNITS_NAME}: its unit statistics were not saved")
