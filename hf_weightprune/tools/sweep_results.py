"""The results of `sweep`: its rows written as `sweep.csv` / `sweep.json`, drawn as `sweep.png`, and printed as a
markdown table. Split from `sweep.py`, which prunes and evaluates; this module states what it measured.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files.pruned_files import SWEEP_CSV, SWEEP_JSON
from ..io_utils import atomic_write_text
from ..perplexity import perplexity, perplexity_text

FIELDS = ("criterion", "structure", "sparsity", "loss", "perplexity")


def write_results(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike,
                  fields: Sequence[str] = FIELDS) -> None:
    """Write `sweep.csv` and `sweep.json` (a list of rows, the dense reference first), each atomically.

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



def plot_results(rows: list[dict[str, Any]], path: Path, title: str, structured: bool = False) -> None:
    from .sweep_plot import plot_sweep

    # a point where exp(loss) overflows has no height on the chart: left out, as every one may be (no chart then)
    points = [r for r in rows if r["criterion"] != "dense" and perplexity(r["loss"]) is not None]
    if points:
        plot_sweep(points, path, dense_loss=rows[0]["loss"], title=title, structured=structured)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of perplexity: one row per criterion, one column per sparsity.

    Args:
        rows (`Sequence[Mapping[str, Any]]`): rows as [`sweep`] returns them.

    Returns:
        `str`: the table, then the dense perplexity and loss on a line of their own when a dense row is present. A
        perplexity is stated from the row's loss by `perplexity_text` ("overflow (> 1e308)" past a loss of ~709.78).
        A structured sweep's rows: one row per candidate, one column per size (`structured_sweep`'s table).
    """
    if any("size" in r for r in rows):
        from .structured_sweep import format_structured_table

        return format_structured_table(rows)
    dense = next((r for r in rows if r["criterion"] == "dense"), None)
    points = [r for r in rows if r["criterion"] != "dense"]
    columns = sorted({(r["structure"], r["sparsity"]) for r in points}, key=lambda c: (c[0] != "unstructured", c))
    names = list(dict.fromkeys(r["criterion"] for r in points))
    cell = {(r["criterion"], r["structure"], r["sparsity"]): r["loss"] for r in points}  # stated by perplexity_text

    def head(c):
        return f"{c[1]:.0%}" if c[0] == "unstructured" else c[0]

    lines = ["| criterion | " + " | ".join(head(c) for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in names:
        values = [cell.get((name, *c)) for c in columns]
        lines.append(f"| {name} | " + " | ".join("" if v is None else perplexity_text(v) for v in values) + " |")
    if dense is not None:
        lines.append(f"\nDense perplexity: {perplexity_text(dense['loss'])} (loss {dense['loss']:.4f}).")
    return "\n".join(lines)
