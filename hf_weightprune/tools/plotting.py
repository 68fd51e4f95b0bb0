"""PNG charts for `hf-weightprune inspect --plot` (per layer x module type), and the drawing helpers that
`sweep_plot.py` (the sweep's chart) shares.

matplotlib is an optional dependency (`pip install hf-weightprune[plot]`); it is imported only when a chart is drawn.
Figures are rendered by the non-interactive Agg canvas without pyplot, so this works on headless machines and leaves
the pyplot backend of a notebook alone. The statistics `inspect` draws are computed by `collect/summary.py`
(`layer_stats`); parameter names are split by `matching.parse_param_name`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io_utils import make_temp_file
from ..matching import parse_param_name


def _figure(width: float, height: float, layout: str | None = None):
    """A figure drawn by the Agg canvas directly: no pyplot global state, no GUI, whatever backend a caller set."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("Plotting needs matplotlib: `pip install hf-weightprune[plot]`.") from e
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def new_figure(width: float, height: float):
    """A figure with one axes, drawn by the Agg canvas (see `_figure`)."""
    fig = _figure(width, height)
    return fig, fig.add_subplot()


def save_png(fig, path: str | os.PathLike) -> Path:
    """Saves `fig` as PNG through a temporary file in the same folder, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(path.parent, path.name, suffix=".png")  # the umask's mode, not mkstemp's 0600
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def row_number(row: Mapping[str, Any], key: str, what: str) -> float:
    """`row[key]` as a float; a missing key or a non-number is a `ValueError` naming it (`what`: the kind of row)."""
    if key not in row:
        raise ValueError(f"Each {what} needs a {key!r} key, got keys {sorted(row)}.")
    try:
        value = float(row[key])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key!r} must be a number, got {row[key]!r}.") from e
    return value


# ------------------------------------------------------------------ per layer x module type

OTHER_ROW = "other"
# Known module types, in the order a block uses them; `<type>_proj` modules are shown as `<type>`.
_KNOWN_TYPES = ["q", "k", "v", "qkv", "kv", "o", "out", "in", "gate", "up", "gate_up", "fc1", "fc2", "down"]
_TYPE_ORDER = {t: i for i, t in enumerate(_KNOWN_TYPES)}

# What each statistic means, for colourbar labels; keys not listed are labelled with the key itself.
_STAT_LABELS = {
    "mean": "mean per tensor",
    "std": "spread (std) per tensor",
    "below_median": "values below the global median (%)",
    "sparsity": "zero weights (%)",
}
_PERCENT_STATS = {"below_median", "sparsity"}


def _short_type(path: str) -> str:
    last = path.rsplit(".", 1)[-1]
    # Only known prefixes: GPT-2's `c_proj` would otherwise become an unreadable `c`.
    return last.removesuffix("_proj") if last.removesuffix("_proj") in _TYPE_ORDER else last


def parse_layer_name(name: str) -> tuple[int | None, str]:
    """
    Splits a parameter name into its decoder-layer index and a short module type: [`~matching.parse_param_name`]
    (the package's one name parser) with the module shortened for chart labels.

    Args:
        name (`str`):
            A parameter name such as `model.layers.12.self_attn.q_proj.weight`. Any prefix before the layer index is
            accepted (`model.decoder.layers.3.fc1.weight`, `transformer.h.0.attn.c_attn.weight`).

    Returns:
        `tuple[int | None, str]`: the layer index (`None` for tensors outside the repeated blocks, such as `lm_head`)
        and the module type: the last module name, without the `_proj` suffix for the usual types (`q`, `k`, `v`,
        `o`, `gate`, `up`, `down` for Llama; `qkv`, `o`, `gate_up`, `down` for Phi-3; `out` for OPT/BART); other names
        as they are (`fc1`, `c_attn`, `c_proj`, `lm_head`).
    """
    parsed = parse_param_name(name)
    return parsed.index, _short_type(parsed.module)


@dataclass
class LayerGrid:
    """
    One statistic laid out per layer (rows) and module type (columns), as `inspect --plot` draws it.

    Attributes:
        rows (`list[str]`): row labels: the layer index (`"0"`, `"1"`, ...; prefixed by the block container when a
            model has several, e.g. `"decoder.layers 3"`), then `"other"` for tensors without a layer index.
        columns (`list[str]`): module types (see [`parse_layer_name`]) in the order a block uses them (`q`, `k`,
            `v`, `qkv`, `o`, `gate`, `up`, `gate_up`, `down`), then any others in order of first appearance; a type
            that would be ambiguous within a layer (`self_attn.q` and `encoder_attn.q`) keeps its module path.
        values (`numpy.ndarray`): float64 of shape `(len(rows), len(columns))`, NaN where a row has no such tensor;
            fractions (`below_median`, `sparsity`) in percent.
        names (`list[list[str | None]]`): the parameter name behind each cell.
    """

    rows: list[str]
    columns: list[str]
    values: Any
    names: list[list[str | None]]

    def __getitem__(self, key: tuple[int | str, str]) -> float:
        """`grid[12, "q"]` or `grid["other", "lm_head"]`: the value of one cell (NaN when empty)."""
        row, column = key
        row = str(row)
        if row not in self.rows or column not in self.columns:
            raise KeyError(f"No cell {key!r}; rows are {self.rows[:3]}... and columns {self.columns}.")
        return float(self.values[self.rows.index(row), self.columns.index(column)])


def layer_grid(stats: Sequence[Mapping[str, Any]], key: str = "mean") -> LayerGrid:
    """
    Places one statistic of each tensor into a (layer index x module type) grid.

    Args:
        stats (`Sequence[Mapping]`):
            One dict per tensor with `name` (parameter name) and `key`, as returned by [`~collect.summary.layer_stats`].
        key (`str`, *optional*, defaults to `"mean"`):
            Which statistic to place; rows with `key` missing or `None` leave their cell empty (NaN).

    Returns:
        [`LayerGrid`]: rows by layer index (layer 0 first, `"other"` last), columns as described there.

    Raises:
        `ValueError`: when `stats` is empty, a row has no `name`, or two rows have the same name.
    """
    import numpy as np

    if not stats:
        raise ValueError("stats is empty; there is nothing to plot.")
    parsed = []
    for row in stats:
        if "name" not in row:
            raise ValueError(f"Each layer stat needs a 'name' key, got keys {sorted(row)}.")
        name = parse_param_name(str(row["name"]))
        parsed.append((name.stack, name.index, name.module))
    # A short type is ambiguous when one layer holds two different module paths with it; those keep the path.
    seen: dict[tuple[str, int | None, str], str] = {}
    ambiguous = set()
    for stack, index, path in parsed:
        short = _short_type(path)
        if seen.setdefault((stack, index, short), path) != path:
            ambiguous.add(short)

    def column_of(path: str) -> str:
        short = _short_type(path)
        return path.rsplit(".", 1)[0] + "." + short if short in ambiguous and "." in path else short

    stacks = list(dict.fromkeys(stack for stack, index, _ in parsed if index is not None))
    common = os.path.commonprefix([s.split(".") for s in stacks]) if len(stacks) > 1 else []

    def row_of(stack: str, index: int | None) -> str:
        if index is None:
            return OTHER_ROW
        return f"{'.'.join(stack.split('.')[len(common):])} {index}" if len(stacks) > 1 else str(index)

    row_keys = sorted({(stacks.index(s), i) for s, i, _ in parsed if i is not None})
    rows = [row_of(stacks[s], i) for s, i in row_keys] + ([OTHER_ROW] if any(i is None for _, i, _ in parsed) else [])
    # Columns in the order a block computes them, whatever order the tensors come in (wanda's follows its hooks):
    # grouped by parent module (attention before MLP: the group of the earliest known type first, ties by first
    # appearance), then by known type; tensors outside the layers last.
    first: dict[str, tuple[bool, str, int]] = {}
    for n, (_, index, path) in enumerate(parsed):
        first.setdefault(column_of(path), (index is None, path.rsplit(".", 1)[0] if "." in path else "", n))
    group_rank: dict[tuple[bool, str], tuple[int, int]] = {}
    for column, (outside, parent, n) in first.items():
        rank = (_TYPE_ORDER.get(column.rsplit(".", 1)[-1], len(_TYPE_ORDER)), n)
        group_rank[outside, parent] = min(group_rank.get((outside, parent), rank), rank)
    columns = sorted(first, key=lambda c: (first[c][0], group_rank[first[c][:2]],
                                           _TYPE_ORDER.get(c.rsplit(".", 1)[-1], len(_TYPE_ORDER)), first[c][2]))
    values = np.full((len(rows), len(columns)), np.nan)
    names: list[list[str | None]] = [[None] * len(columns) for _ in rows]
    for row, (stack, index, path) in zip(stats, parsed):
        r, c = rows.index(row_of(stack, index)), columns.index(column_of(path))
        if names[r][c] is not None:
            raise ValueError(f"{names[r][c]!r} and {row['name']!r} fall in the same cell ({rows[r]}, {columns[c]}); "
                             "pass one stats row per weight.")
        names[r][c] = str(row["name"])
        if row.get(key) is not None:
            values[r, c] = 100.0 * row_number(row, key, "layer stat") if key in _PERCENT_STATS else row_number(
                row, key, "layer stat")
    return LayerGrid(rows=rows, columns=columns, values=values, names=names)


def _heatmap(fig, ax, grid: LayerGrid, label: str, *, percent: bool, centre: float | None, label_rows: bool):
    """Draws one grid with its colourbar (diverging around `centre` when given); empty cells grey."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize, TwoSlopeNorm

    values = np.ma.masked_invalid(grid.values)
    finite = grid.values[np.isfinite(grid.values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if centre is not None:
        # Centred on 50%: red = a global prune takes more than its share here, blue = less.
        cmap, norm = colormaps["RdBu_r"], TwoSlopeNorm(vcenter=centre, vmin=0.0, vmax=100.0)
    elif percent:
        cmap, norm = colormaps["viridis"], Normalize(vmin=0.0, vmax=100.0)
    elif low < 0 < high:
        # Signed scores (movement): white at zero, symmetric so that colour intensity compares both signs.
        bound = max(-low, high)
        cmap, norm = colormaps["RdBu_r"], Normalize(vmin=-bound, vmax=bound)
    elif low > 0 and high / low > 10:
        # Importance often spans orders of magnitude across module types; a log scale keeps small ones apart.
        cmap, norm = colormaps["viridis"], LogNorm(vmin=low, vmax=high)
        label += " (log scale)"
    else:
        cmap, norm = colormaps["viridis"], Normalize(vmin=low, vmax=high if high > low else low + 1.0)
    cmap = cmap.with_extremes(bad="0.85")
    image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(grid.columns)))
    long_labels = max(len(c) for c in grid.columns) > 7 or len(grid.columns) > 12
    ax.set_xticklabels(grid.columns, rotation=90 if long_labels else 0, fontsize=10)
    ax.set_xlabel("module type")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    # Every layer labelled up to ~40 rows; deeper models every 2nd/5th/10th so the labels never overlap.
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 10**9) if len(grid.rows) / s <= 40)
    ticks = [i for i in range(len(grid.rows)) if i % step == 0 or grid.rows[i] == OTHER_ROW]
    ax.set_yticks(ticks)
    ax.set_yticklabels([grid.rows[i] for i in ticks], fontsize=9)
    if label_rows:
        ax.set_ylabel("layer index (0 = nearest the embeddings)")
    else:
        ax.tick_params(labelleft=True)  # shared rows hide the labels of later panels; far right, they still help
    if len(grid.rows) > 24:
        # Deep models: the module types at the bottom too, so that the last layers are read without looking up.
        ax.tick_params(bottom=True, labelbottom=True)
    if OTHER_ROW in grid.rows and len(grid.rows) > 1:
        ax.axhline(len(grid.rows) - 1.5, color="white", linewidth=4)
    # Thin white lines between module types make columns easy to follow down a deep model.
    for x in range(1, len(grid.columns)):
        ax.axvline(x - 0.5, color="white", linewidth=1)
    bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03, aspect=max(20.0, 1.2 * len(grid.rows)))
    bar.set_label(label, fontsize=10)
    bar.ax.tick_params(labelsize=9)


def layer_stats_figure(
    stats: Sequence[Mapping[str, Any]],
    *,
    title: str | None = None,
    value_label: str | None = None,
    panels: Sequence[str] | None = None,
) -> Any:
    """
    Draws per-tensor statistics as heatmaps of layer index (rows) x module type (columns), one panel per statistic.

    Llama layers give the columns q/k/v/o/gate/up/down, Phi-3's fused layout qkv/o/gate_up/down; any other module is
    a column of its own, and tensors outside the repeated blocks (e.g. `lm_head`) form a separate `other` row. Empty
    cells are grey. The figure grows with the model (224 tensors of a 32-layer model stay readable) and is drawn
    without pyplot.

    Args:
        stats (`Sequence[Mapping]`):
            One dict per tensor with `name` and `mean`, as returned by [`~collect.summary.layer_stats`]; optionally `below_median`
            and `sparsity` (fractions in `[0, 1]`, drawn in %) and `std`. Other keys are ignored.
        title (`str`, *optional*):
            Figure title.
        value_label (`str`, *optional*):
            What the `mean`/`std` values are, with units, for the colourbars (e.g. `"temporal_magnitude score,
            sum_t t*|w(t)| / sum_t t"`). Defaults to `"importance"`.
        panels (`Sequence[str]`, *optional*):
            Statistics to draw, left to right. Defaults to `mean`, then `below_median` (else `std`), then `sparsity`,
            each when present in `stats`.

    Returns:
        `matplotlib.figure.Figure`: the figure, on an Agg canvas (display it in a notebook, or save it yourself);
        [`plot_layer_stats`] writes it as PNG.

    Raises:
        `ValueError`: when `stats` is empty, a row has no `name`, or a requested statistic is missing or not a number.
    """
    if not stats:
        raise ValueError("stats is empty; there is nothing to plot.")
    present = {k for row in stats for k, v in row.items() if v is not None}
    if panels is None:
        panels = ["mean"]
        if "below_median" in present:
            panels.append("below_median")
        elif "std" in present:
            panels.append("std")
        if "sparsity" in present:
            panels.append("sparsity")
    if not panels:
        raise ValueError("panels is empty; pass statistic names such as ['mean', 'below_median'].")
    for key in panels:
        if key not in present:
            for row in stats:
                row_number(row, key, "layer stat")  # raises naming the missing key
    grids = [layer_grid(stats, key) for key in panels]
    rows, columns = grids[0].rows, grids[0].columns

    label_len = max(len(c) for c in columns)
    column_width = 0.3 if label_len > 7 or len(columns) > 12 else max(0.5, 0.09 * label_len)
    panel_width = max(2.2, column_width * len(columns)) + 1.3  # + colourbar and its label
    width = min(0.8 + panel_width * len(panels), 60.0)
    height = min(max(3.5, 0.24 * len(rows) + 2.2), 40.0)
    fig = _figure(width, height, layout="constrained")  # colourbars and titles get their room, nothing overlaps
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    what = value_label or "importance"
    for i, (ax, key, grid) in enumerate(zip(axes, panels, grids)):
        if key == "mean":
            label = f"mean {what}"
        elif key == "std":
            label = f"std of {what}"
        elif key == "below_median":
            label = "values below the global median (%)\n≈ share a 50% global prune removes"
        else:
            label = _STAT_LABELS.get(key, key)
        _heatmap(fig, ax, grid, label, percent=key in _PERCENT_STATS, centre=50.0 if key == "below_median" else None,
                 label_rows=i == 0)
        ax.set_title(_STAT_LABELS.get(key, key), fontsize=11, pad=8 if len(columns) <= 12 else 4)
    n_tensors = sum(1 for r in grids[0].names for n in r if n is not None)
    n_layers = sum(1 for r in rows if r != OTHER_ROW)
    subtitle = f"{n_tensors} tensors: {n_layers} layers x {len(columns)} module types"
    if any(n is None for r in grids[0].names for n in r):
        subtitle += " (grey: no such tensor)"
    fig.suptitle(f"{title or 'Importance per layer and module type'}\n{subtitle}", fontsize=12)
    return fig


def plot_layer_stats(
    stats: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    value_label: str | None = None,
    panels: Sequence[str] | None = None,
) -> Path:
    """
    Writes [`layer_stats_figure`] as a PNG: what `hf-weightprune inspect --plot` draws.

    Args:
        stats (`Sequence[Mapping]`):
            One dict per tensor with `name` and `mean`, as returned by [`~collect.summary.layer_stats`] (see [`layer_stats_figure`]).
        path (`str` or `os.PathLike`):
            Where to write the PNG (written atomically; parent folders are created).
        title (`str`, *optional*), value_label (`str`, *optional*), panels (`Sequence[str]`, *optional*):
            As in [`layer_stats_figure`].

    Returns:
        `Path`: the PNG path.

    Raises:
        `ValueError`: as [`layer_stats_figure`].
    """
    return save_png(layer_stats_figure(stats, title=title, value_label=value_label, panels=panels), path)
