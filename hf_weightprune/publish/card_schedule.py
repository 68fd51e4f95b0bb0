"""The card's Schedule line, from `sparsity.json`: a gradual prune (its ramp or depth order, and the pruned-stream
options it ran with) or a recovery with the mask held, and the step its re-fit ran at (`refitted_at`), if it did."""

from __future__ import annotations

from typing import Any

from ..io_utils import plural


def schedule_context(sparsity: dict) -> dict | None:
    """The schedule recorded in `sparsity.json` as `{"text": ...}` for the card, when it has everything the card says:
    a recovery with the mask held (`mode="hold"`), or the gradual ramp with its steps (or fractions of training).
    `cross_term` is whether the text names GPTAQ / QEP (whose papers the references then list).

    Args:
        sparsity (`dict`): the `sparsity.json` payload; its `schedule` (`PruneSchedule.to_dict()`) and `refitted_at`.

    Returns:
        `dict` or `None`: `{"text": str, "cross_term": bool}`; `None` without a usable schedule.
    """
    schedule = sparsity.get("schedule")
    if not isinstance(schedule, dict):
        return None
    refit = _refit_point(sparsity, schedule)
    if schedule.get("mode") == "hold":
        cross = refit is not None and bool(schedule.get("cross_term"))  # a hold's cross term feeds its re-fit only
        return {"text": "pruned once, then fine-tuned with that mask held (a recovery fine-tune)"
                        + "".join(_hold_refit_text(schedule, refit, cross, legacy="refitted_at" not in sparsity)),
                "cross_term": cross}
    needed = ("initial_sparsity", "final_sparsity", "start", "end", "every_n_steps", "ramp")
    if not all(schedule.get(k) is not None for k in needed):
        return None
    start, end = schedule["start"], schedule["end"]
    if isinstance(start, int) and isinstance(end, int):
        span = f"between steps {start} and {end}"
    elif isinstance(start, float) and isinstance(end, float):  # fractions of the run's max_steps
        span = f"from {100 * start:g}% to {100 * end:g}% of training"
    else:  # one of each, e.g. the default start=0.0 with end=500
        span = f"from {_at(start)} to {_at(end)}"
    if schedule.get("order") == "depth":  # no ramp: each layer group pruned once, front to back
        text = (f"decoder layers pruned front to back {span}, each once to {100 * schedule['final_sparsity']:.1f}% "
                "sparsity from statistics gathered after the layers before it were pruned")
    else:
        text = (f"gradual pruning from {100 * schedule['initial_sparsity']:.1f}% to "
                f"{100 * schedule['final_sparsity']:.1f}% sparsity {span}, every {_every(schedule['every_n_steps'])}, "
                f"{schedule['ramp']} ramp")
    # `cross_term`: the sentence names GPTAQ / QEP, whose papers the references then list
    return {"text": text + "".join(_pruned_stream_text(schedule, refit)), "cross_term": _names_cross_term(schedule)}


def _refit_point(sparsity: dict, schedule: dict) -> str | None:
    """When the kept weights were re-fitted, in the card's words (`"step 6"`), or `None` when no re-fit ran.

    `refitted_at` is the step the run re-fitted at (null: it never did, e.g. training stopped first). Files written
    before it was recorded lack the key: for them the configured `refit_at` is stated, as their cards did."""
    if "refitted_at" not in sparsity:
        return None if schedule.get("refit_at") is None else _at(schedule["refit_at"])
    step = sparsity["refitted_at"]
    return f"step {step}" if isinstance(step, int) and not isinstance(step, bool) else None


def restarts_statistics(sparsity: dict) -> bool:
    """Whether a gradual schedule restarted its activation statistics at every mask change (`pruned_stream`, implied
    by `refit_at` and `order="depth"`): the recorded importance then covers only the steps since the last change."""
    schedule = sparsity.get("schedule")
    return isinstance(schedule, dict) and schedule.get("mode") != "hold" and _pruned_stream(schedule)


def _pruned_stream(schedule: dict) -> bool:
    implied = schedule.get("refit_at") is not None or schedule.get("order") == "depth"
    return bool(schedule.get("pruned_stream") or (schedule.get("pruned_stream") is None and implied))


def _names_cross_term(schedule: dict) -> bool:
    return _pruned_stream(schedule) and bool(schedule.get("cross_term"))


def _pruned_stream_text(schedule: dict, refit: str | None) -> list[str]:
    """The pruned-stream options a schedule ran with (issue 27), as clauses appended to its sentence."""
    if not _pruned_stream(schedule):
        return []
    parts = ["; the input Hessians restarted at every mask change, so each update read the pruned model's own inputs"]
    if _names_cross_term(schedule):
        parts.append("; the updates solved the asymmetric objective `||W X - W_hat X~||^2` with the dense-to-pruned "
                     f"cross term from the teacher's forwards {_cross_detail(schedule)}")
    if refit is not None:
        parts.append(f"; the kept weights were re-fitted at {refit} by least squares on their fixed support")
    return parts


def _hold_refit_text(schedule: dict, refit: str | None, cross: bool, *, legacy: bool = False) -> list[str]:
    """A hold run's re-fit and its cross term, as clauses appended to the hold sentence: the kept weights were
    re-fitted towards their trained values with the one-shot prune's edits undone, from the pruned model's own input
    Hessians. `legacy`: a file from before `refitted_at` was recorded, whose re-fit targeted the teacher's weights."""
    if refit is None:
        return []
    target = ("the dense teacher's weights (each layer's dense output on the pruned model's inputs)" if legacy else
              "their trained values with the one-shot prune's edits undone (trained weights + teacher's weights - "
              "held weights at the start)")
    parts = [f"; the kept weights were re-fitted at {refit} by least squares on their fixed support towards {target}, "
             "from the input Hessians of the pruned model's own forwards since training began"]
    if cross:
        what = "the teacher's weight" if legacy else "that target"
        parts.append(f"; the re-fit solved the asymmetric objective `||W X - W_hat X~||^2` (`W` {what}) "
                     f"with the dense-to-pruned cross term from the teacher's forwards {_cross_detail(schedule)}")
    return parts


def _cross_detail(schedule: dict) -> str:
    """`(GPTAQ / QEP, alpha 0.25)`, with the Linears `cross_max_in_features` left on the plain objective."""
    limit = schedule.get("cross_max_in_features")
    skipped = f"; Linears of more than {limit:,} inputs kept the plain objective" if isinstance(limit, int) else ""
    return f"(GPTAQ / QEP, alpha {schedule.get('cross_alpha')}{skipped})"


def _at(point: Any) -> str:
    """A schedule's step (int) or fraction of training (float), in the card's words."""
    return f"step {point}" if isinstance(point, int) else f"{100 * point:g}% of training"


def _every(n: int) -> str:
    """`"step"` for 1 (every step), else `"10 steps"`."""
    return "step" if n == 1 else plural(n, "step")
