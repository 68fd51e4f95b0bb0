"""How a pruned model was trained, as `sparsity.json` records it: `save_pruned`'s `schedule`, `distillation` and
`training` arguments turned into the dicts of that file, each refused in one line before any work when unusable."""

from __future__ import annotations

import os
from typing import Any

from ..io_utils import check_arg_type

# What the model card prints of a gradual schedule; a dict without them (e.g. `MaskHolder.state_dict()`) is refused.
_SCHEDULE_KEYS = ("initial_sparsity", "final_sparsity", "start", "end", "every_n_steps", "ramp")


def schedule_dict(schedule: Any) -> dict | None:
    """`save_pruned`'s `schedule` as the dict `sparsity.json` records; refused before any work when unusable."""
    from ..train.schedule import PruneSchedule

    if schedule is None:
        return None
    if isinstance(schedule, PruneSchedule):
        return schedule.to_dict()
    check_arg_type("save_pruned", "schedule", schedule, dict, "a PruneSchedule, its to_dict() or None")
    if "config" in schedule and "num_updates" in schedule:
        raise ValueError("save_pruned: schedule is a MaskHolder.state_dict() (runtime counters); pass the "
                         "PruneSchedule itself or schedule.to_dict()")
    # a hold schedule records no ramp (`PruneSchedule.to_dict` leaves out what that mode does not read)
    missing = [k for k in _SCHEDULE_KEYS if k not in schedule] if schedule.get("mode") != "hold" else []
    if missing:
        raise ValueError(f"save_pruned: schedule lacks {missing}; pass the PruneSchedule itself or schedule.to_dict()")
    return dict(schedule)


def distillation_dict(distillation: Any) -> dict | None:
    """`save_pruned`'s `distillation` as the dict `sparsity.json` records (the device where it ran is not kept)."""
    from ..train.distill import DistillConfig

    if distillation is None:
        return None
    check_arg_type("save_pruned", "distillation", distillation, (DistillConfig, dict), "a DistillConfig, its to_dict() or None")
    info = distillation.to_dict() if isinstance(distillation, DistillConfig) else DistillConfig(**{
        k: v for k, v in distillation.items() if k in ("teacher", "alpha", "temperature", "hidden_weight",
                                                         "teacher_dtype")}).to_dict()
    info.pop("teacher_device", None)
    if isinstance(info["teacher"], str) and os.path.isdir(info["teacher"]):
        info["teacher"] = os.path.abspath(info["teacher"])  # as the importance path: local, whatever the cwd later
    return info


def training_dict(record: Any, fn: str = "save_pruned") -> dict[str, int] | None:
    """`save_pruned`'s `training` (`ImportanceCallback.training_record()`) as `sparsity.json` records it, checked.

    Args:
        record (`dict`, *optional*): `{"steps": int, "tokens": int}`, or `None`.
        fn (`str`, *optional*, defaults to `"save_pruned"`): the caller, for the message.

    Returns:
        `dict[str, int]` or `None`: a copy with exactly those two keys (`None` for `None`).

    Raises:
        TypeError: `record` is not a dict.
        ValueError: other keys, or a value that is not an integer >= 1.
    """
    if record is None:
        return None
    if not isinstance(record, dict):
        raise TypeError(f"{fn}: training must be ImportanceCallback.training_record() (a dict) or None; got "
                        f"{type(record).__name__}")
    if set(record) != {"steps", "tokens"}:
        raise ValueError(f"{fn}: training must have exactly the keys 'steps' and 'tokens' "
                         f"(ImportanceCallback.training_record()); got {sorted(record)}")
    for key in ("steps", "tokens"):
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{fn}: training[{key!r}] must be an integer >= 1; got {value!r}")
    return {"steps": record["steps"], "tokens": record["tokens"]}
