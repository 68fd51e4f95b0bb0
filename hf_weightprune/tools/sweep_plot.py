"""The sweep's chart, `sweep.png`: perplexity against sparsity on a log axis, one line per criterion (a structured
sweep: against the share of the model's parameters removed, one line per candidate).

matplotlib is optional (`pip install hf-weightprune[plot]`), imported only when a chart is drawn, through the Agg
canvas of `plotting.py` (no pyplot state).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..perplexity import perplexity, perplexity_text
from .plotting import new_figure, row_number, save_png

STRUCTURED_XLABEL = "parameters removed (% of the whole model's, embeddings included)"
# Each line: colour `i % 10` (the 10 of matplotlib's default cycle) and marker `i % 7`, both changing at every line:
# 70 lines before a pair repeats, every line solid, and no block of lines sharing a style that would read as a group.
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def sweep_figure(rows: Sequence[Mapping[str, Any]], *, dense_loss: float | None = None, title: str | None = None,
                 structured: bool = False, reference: str = "dense") -> Any:
    """
    Draws perplexity against sparsity, one line per criterion, on a log axis whatever the range, the loss (nats) on
    the right. Every line is solid with a colour and a marker of its own (`MARKERS`: distinct up to 70 lines). Perplexity is `exp(loss)` and runs from ~30 to ~300 and beyond on a real model: on a linear axis every
    point before the knee lies flat at the bottom; the log axis is the loss axis relabelled, the same for every sweep
    (charts compare), with plain-number ticks (`50`, `100`, `200`).

    Args:
        rows (`Sequence[Mapping]`): sweep results, each with `criterion` (`str`), `sparsity` (fraction in `[0, 1]`),
            `loss` (the perplexity is `exp(loss)`, `hf_weightprune.perplexity`: a row's own `perplexity` is not read);
            drawn in order of sparsity. A perplexity that overflows a float (a diverged prune) is left out. A row's
            `candidate`, when it has one (a structured sweep's), names its line instead of `criterion`.
        dense_loss (`float`, *optional*): loss of the sweep's reference, the model as given, a dashed line at its
            perplexity (none where it overflows).
        title (`str`, *optional*): chart title.
        structured (`bool`, *optional*, defaults to `False`): `sparsity` is the share of the model's parameters a
            structured prune removed (all of them, embeddings included): the x axis says so, and each line starts at
            the reference model (0%, `dense_loss`).
        reference (`str`, *optional*, defaults to `"dense"`): what the dashed line is, in its legend: `"dense"`, or
            `"input model (50.0% sparse)"` for a sweep of a model that already held zeros
            (`files.pruned_files.sweep_reference_name`).

    Returns:
        `matplotlib.figure.Figure`: on an Agg canvas; [`plot_sweep`] writes it as PNG.

    Raises:
        `ValueError`: `rows` is empty, a row lacks a key or has a sparsity outside `[0, 1]`, or no point is finite.
    """
    if not rows:
        raise ValueError("rows is empty; there is nothing to plot.")
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if "criterion" not in row:
            raise ValueError(f"Each sweep row needs a 'criterion' key, got keys {sorted(row)}.")
        sparsity = row_number(row, "sparsity", "sweep row")
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be a fraction in [0, 1], got {sparsity}.")
        ppl = perplexity(row_number(row, "loss", "sweep row"))  # the one rule: None where exp(loss) overflows
        if ppl is not None and ppl > 0:
            series.setdefault(str(row.get("candidate") or row["criterion"]), []).append((100.0 * sparsity, ppl))
    if not series:
        raise ValueError("no sweep row has a finite perplexity; there is nothing to plot.")
    many = len(series) > 4  # the legend goes below the chart, where it hides no line
    fig, ax = new_figure(7, 4.5 + (0.22 * ((len(series) + 2) // 2) if many else 0))  # the install hint without matplotlib
    import numpy as np

    start = [(0.0, perplexity(dense_loss))] if structured and perplexity(dense_loss) else []
    for i, (criterion, points) in enumerate(series.items()):  # a colour and a marker of its own per line
        ax.plot(*zip(*sorted(start + points)), marker=MARKERS[i % len(MARKERS)], color=f"C{i % 10}", linestyle="-",
                label=criterion)
    values = [y for points in series.values() for _, y in points]
    if perplexity(dense_loss):  # no line where exp(loss) overflows
        values.append(perplexity(dense_loss))
        ax.axhline(values[-1], color="black", linestyle="--", linewidth=1,
                   label=f"{reference} (perplexity {perplexity_text(dense_loss)}, loss {float(dense_loss):.3f})")
    ax.set_yscale("log")
    bottom, top = min(values) / 1.08, max(values) * 1.08
    ax.set_ylim(bottom, top)
    _plain_ticks(ax.yaxis, _log_ticks(bottom, top))
    loss_axis = ax.secondary_yaxis("right", functions=(np.log, np.exp))  # loss = ln(perplexity), exactly
    loss_axis.set_yscale("linear")  # nats are linear at these heights: no `4 x 10^0` labels
    _plain_ticks(loss_axis.yaxis, _round_ticks(math.log(bottom), math.log(top), (1, 2, 5), 6))
    loss_axis.set_ylabel("eval loss (nats)")
    ax.set_xlabel(STRUCTURED_XLABEL if structured else "sparsity (%)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title or ("Perplexity vs parameters removed" if structured else "Perplexity vs sparsity"))
    ax.grid(True, which="major", alpha=0.3)
    if many:
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    else:
        ax.legend()
    return fig


def _log_ticks(bottom: float, top: float) -> list[float]:
    """1-2-3-5 steps per decade (or sparser, at most 9 ticks); round numbers where a narrow range has under 3."""
    # Our own rule, as `_round_ticks`: `LogLocator` falls back to linear ticks on narrow ranges in some matplotlib
    # versions (3.8), not in others.
    decades = range(math.floor(math.log10(bottom)), math.ceil(math.log10(top)) + 1)
    for subs in ((1, 2, 3, 5), (1, 2, 5), (1,)):
        ticks = [float(s * 10**k) if k >= 0 else s / 10**-k for k in decades for s in subs]
        ticks = [t for t in ticks if bottom <= t <= top]
        if len(ticks) <= 9:
            break
    return ticks if len(ticks) >= 3 else _round_ticks(bottom, top, (1, 2, 2.5, 5), 4)


def _round_ticks(bottom: float, top: float, steps: tuple[float, ...], max_ticks: int) -> list[float]:
    """The multiples of the finest step `s * 10**k` (`s` in `steps`) that put at most `max_ticks` ticks in
    [`bottom`, `top`]. Our own rule rather than `MaxNLocator`, whose choice differs between matplotlib versions."""
    k = math.floor(math.log10(top - bottom)) - 2
    while True:
        for s in steps:
            step = s * 10.0**k
            first, last = math.ceil(bottom / step), math.floor(top / step)
            if last - first + 1 <= max_ticks:
                return [round(i * step, 10) for i in range(first, last + 1)]
        k += 1


def _plain_ticks(axis, ticks: list[float]) -> None:
    """`ticks` labelled as plain numbers (`2,000`, `4.5`), minor ticks unlabelled."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.10g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, dense_loss: float | None = None,
               title: str | None = None, structured: bool = False, reference: str = "dense") -> Path:
    """
    Writes [`sweep_figure`] (perplexity on a log axis against sparsity, one line per criterion) as a PNG at `path`,
    atomically, parent folders created: `sweep.png` of `sweep`. Arguments and errors as [`sweep_figure`].

    Returns:
        `Path`: the PNG path.
    """
    return save_png(sweep_figure(rows, dense_loss=dense_loss, title=title, structured=structured, reference=reference),
                    path)
