"""PNG charts for the sparsity sweep and for `hf-weightprune inspect --plot`.

matplotlib is an optional dependency (`pip install hf-weightprune[plot]`); it is imported only when a chart is drawn.
Figures are rendered by the non-interactive Agg canvas without pyplot, so this works on headless machines and leaves
the pyplot backend of a notebook alone.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _new_figure(width: float, height: float):
    """A figure drawn by the Agg canvas directly: no pyplot global state, no GUI, whatever backend a caller set."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("Plotting needs matplotlib: `pip install hf-weightprune[plot]`.") from e
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: str | os.PathLike) -> Path:
    """Saves `fig` as PNG through a temporary file in the same folder, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _number(row: Mapping[str, Any], key: str, what: str) -> float:
    if key not in row:
        raise ValueError(f"Each {what} needs a {key!r} key, got keys {sorted(row)}.")
    try:
        value = float(row[key])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key!r} must be a number, got {row[key]!r}.") from e
    return value


def plot_sweep(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    dense_loss: float | None = None,
    title: str | None = None,
) -> Path:
    """
    Plots evaluation loss against sparsity, one line per pruning criterion.

    Args:
        rows (`Sequence[Mapping]`):
            Sweep results, each with `criterion` (`str`), `sparsity` (fraction in `[0, 1]`), `loss` and
            `perplexity`. Points of a criterion are drawn in order of sparsity.
        path (`str` or `os.PathLike`):
            Where to write the PNG (written atomically; parent folders are created).
        dense_loss (`float`, *optional*):
            Loss of the unpruned model, drawn as a dashed horizontal line.
        title (`str`, *optional*):
            Chart title.

    Returns:
        `Path`: the PNG path.
    """
    if not rows:
        raise ValueError("rows is empty; there is nothing to plot.")
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if "criterion" not in row:
            raise ValueError(f"Each sweep row needs a 'criterion' key, got keys {sorted(row)}.")
        sparsity = _number(row, "sparsity", "sweep row")
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be a fraction in [0, 1], got {sparsity}.")
        _number(row, "perplexity", "sweep row")
        series.setdefault(str(row["criterion"]), []).append((100.0 * sparsity, _number(row, "loss", "sweep row")))

    fig, ax = _new_figure(7, 4.5)
    for criterion, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=criterion)
    if dense_loss is not None:
        ax.axhline(float(dense_loss), color="black", linestyle="--", linewidth=1, label=f"dense ({dense_loss:.3f})")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("eval loss")
    ax.set_title(title or "Loss vs sparsity")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_layer_stats(stats: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """
    Plots the mean importance of every tracked tensor, in model order, with its sparsity when known.

    Args:
        stats (`Sequence[Mapping]`):
            One dict per tracked tensor with `name` and `mean` (mean importance), and optionally `sparsity`
            (fraction of zero weights in `[0, 1]`). Other keys are ignored.
        path (`str` or `os.PathLike`):
            Where to write the PNG (written atomically; parent folders are created).
        title (`str`, *optional*):
            Chart title.

    Returns:
        `Path`: the PNG path.
    """
    if not stats:
        raise ValueError("stats is empty; there is nothing to plot.")
    names = []
    means = []
    sparsities = []
    for row in stats:
        if "name" not in row:
            raise ValueError(f"Each layer stat needs a 'name' key, got keys {sorted(row)}.")
        names.append(str(row["name"]))
        means.append(_number(row, "mean", "layer stat"))
        sparsities.append(_number(row, "sparsity", "layer stat") if row.get("sparsity") is not None else math.nan)
    has_sparsity = any(not math.isnan(s) for s in sparsities)

    # Grow with the number of tensors so that the names stay readable, within what a PNG viewer copes with.
    width = min(max(6.0, 0.25 * len(names) + 2.0), 40.0)
    fig, ax = _new_figure(width, 4.5)
    xs = list(range(len(names)))
    ax.bar(xs, means, color="tab:blue", label="mean importance")
    ax.set_ylabel("mean importance")
    # Importance spans orders of magnitude across layers; a log axis keeps small layers visible.
    if all(m > 0 for m in means) and max(means) / min(means) > 100:
        ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)
    handles, labels = ax.get_legend_handles_labels()
    if has_sparsity:
        ax2 = ax.twinx()
        ax2.plot(xs, [100.0 * s for s in sparsities], color="tab:red", marker=".", label="sparsity (%)")
        ax2.set_ylabel("sparsity (%)")
        ax2.set_ylim(0, 100)
        more_handles, more_labels = ax2.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    # Above the axes: with tensors sorted by depth, any corner inside the plot may hide bars.
    ax.legend(handles, labels, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False, fontsize=8)
    ax.set_title(title or "Importance per tensor", loc="left")
    return _save(fig, path)
