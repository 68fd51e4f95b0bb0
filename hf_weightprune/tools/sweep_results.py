"""The results of `sweep`: its reference row (the input model as given, named by what is measured in it), its rows
written as `sweep.csv` / `sweep.json`, drawn as `sweep.png`, and printed as a markdown table. Split from `sweep.py`,
which prunes and evaluates; this module states what it measured.

The reference row is `"dense"` only when the input's prunable weights hold no exact zero. A folder `save_pruned`
wrote (or any model with zeros) is `"input"`, its measured share of zeros in `sparsity` and `input_sparsity`, and the
table, chart and card call it "Input model (50.0% sparse)".
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files.pruned_files import SWEEP_CSV, SWEEP_JSON, is_sweep_reference, sweep_reference_name
from ..io_utils import atomic_write_text
from ..perplexity import perplexity, perplexity_text

FIELDS = ("criterion", "structure", "sparsity", "loss", "perplexity")
_SAME = 1e-4  # a point within this of the input's share of zeros is at it, not below it (counts round)


def points_above(points: Sequence[float], input_sparsity: float) -> list[float]:
    """The sparsities of an unstructured sweep that prune the input further: those below its share of zeros would
    keep weights it has already removed, so they are skipped, with a one-line warning.

    Args:
        points (`Sequence[float]`): the sweep's sparsities, sorted.
        input_sparsity (`float`): [`~prune.report.measure_input`] of the model.

    Returns:
        `list[float]`: the points at or above `input_sparsity`.

    Raises:
        ValueError: every point is below it (nothing left to sweep), before anything is evaluated or written.
    """
    below = [s for s in points if s < input_sparsity - _SAME]
    if not below:
        return list(points)
    name = sweep_reference_name({"criterion": "input", "input_sparsity": input_sparsity})
    shown = ", ".join(f"{s:g}" for s in below)
    if len(below) == len(points):
        raise ValueError(f"sweep: every sparsity ({shown}) is below the share of zeros the model already holds: "
                         f"{name}; give sparsities of at least {input_sparsity:.4g}")
    logging.getLogger(__name__).warning("sweep: %s: skipping the sparsities below it (%s), which would prune nothing "
                                        "it has not already zeroed", name, shown)
    return [s for s in points if s not in below]


def write_results(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike,
                  fields: Sequence[str] = FIELDS) -> None:
    """Write `sweep.csv` and `sweep.json` (a list of rows, the reference row first), each atomically.

    Args:
        rows (`Sequence[Mapping[str, Any]]`): rows as [`sweep`] returns them.
        output_dir (`str` or `os.PathLike`): created if missing.
        fields (`Sequence[str]`, *optional*): the CSV's columns (a structured sweep's are `structured_sweep.FIELDS`).

    Returns:
        `None`. A perplexity that overflows is `None` in the rows (`hf_weightprune.perplexity`): an empty cell in the
        CSV, `null` in the JSON, its loss kept. Other non-finite values (a loss of a collapsed model) stay `inf`/`nan`
        in the CSV and become `null` in the JSON (which has neither).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / SWEEP_CSV, buf.getvalue())
    # Non-finite values (a collapsed model) are written as null: JSON has no inf/nan.
    clean = [{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in r.items()} for r in rows]
    atomic_write_text(out / SWEEP_JSON, json.dumps(clean, indent=2) + "\n")


def plot_results(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str,
                 structured: bool = False) -> Any:
    """Draw `sweep.png` from the rows: one line per criterion (or candidate), the reference row a dashed line named
    by [`~files.pruned_files.sweep_reference_name`] (`"dense"`, `"input model (50.0% sparse)"`).

    Returns:
        `matplotlib.figure.Figure` or `None`: the chart written at `path`; `None` (nothing written) when no point has
        a finite perplexity.
    """
    from .plotting import save_png
    from .sweep_plot import sweep_figure

    # a point where exp(loss) overflows has no height on the chart: left out, as every one may be (no chart then)
    points = [r for r in rows if not is_sweep_reference(r) and perplexity(r["loss"]) is not None]
    reference = next((r for r in rows if is_sweep_reference(r)), None)
    if not points:
        return None
    fig = sweep_figure(points, dense_loss=None if reference is None else reference["loss"], title=title,
                       structured=structured, reference=sweep_reference_name(reference).lower() if reference else "dense")
    save_png(fig, path)
    return fig


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of perplexity: one row per criterion, one column per sparsity.

    Args:
        rows (`Sequence[Mapping[str, Any]]`): rows as [`sweep`] returns them.

    Returns:
        `str`: the table, then the reference row's perplexity and loss on a line of their own when it is present
        ("Dense perplexity: ...", or "Input model (50.0% sparse) perplexity: ..." for an input with zeros). A
        perplexity is stated from the row's loss by `perplexity_text` ("overflow (> 1e308)" past a loss of ~709.78).
        A structured sweep's rows: one row per candidate, one column per size (`structured_sweep`'s table).
    """
    if any("size" in r for r in rows):
        from .structured_sweep import format_structured_table

        return format_structured_table(rows)
    reference = next((r for r in rows if is_sweep_reference(r)), None)
    points = [r for r in rows if not is_sweep_reference(r)]
    columns = sorted({(r["structure"], r["sparsity"]) for r in points}, key=lambda c: (c[0] != "unstructured", c))
    names = list(dict.fromkeys(r["criterion"] for r in points))
    cell = {(r["criterion"], r["structure"], r["sparsity"]): r["loss"] for r in points}  # stated by perplexity_text

    def head(c):
        return f"{c[1]:.0%}" if c[0] == "unstructured" else c[0]

    lines = ["| criterion | " + " | ".join(head(c) for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in names:
        values = [cell.get((name, *c)) for c in columns]
        lines.append(f"| {name} | " + " | ".join("" if v is None else perplexity_text(v) for v in values) + " |")
    if reference is not None:
        lines.append(f"\n{sweep_reference_name(reference)} perplexity: {perplexity_text(reference['loss'])} "
                     f"(loss {reference['loss']:.4f}).")
    return "\n".join(lines)
