"""Sparsity sweep: loss and perplexity of one model pruned at several sparsities by several criteria, or made smaller
at several sizes by several structures (the structured part lives in `structured_sweep.py`).

Memory: the model is loaded once. Unstructured and N:M: a CPU copy of its weights as loaded is kept and loaded back
into the same model before every point, so the cost is about one copy plus the working (pruned) model, whatever the
number of points. Structured: each point prunes a copy of the model (one at a time). Results go to `sweep.csv`,
`sweep.json` (the rows the model card reads) and `sweep.png` (`sweep_results.py`).

The input may be a model that already holds zeros (a folder `save_pruned` wrote): its first row then says so
(`"input"`, its share of zeros measured, not `"dense"`), and the sparsities below that share are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import distributed as D
from ..collect.importance import Importance
from ..config import PruneConfig
from ..files.pruned_files import SWEEP_CSV, SWEEP_JSON, SWEEP_PNG, SWEEP_REFERENCES, sweep_reference
from ..io_utils import check_arg_type, path_name
from ..prune.oneshot import ONESHOT_CRITERIA, oneshot_importance
from ..prune.report import measure_input
from ..scorers import SCORERS, default_scope
from ..validation import parse_structure
from .structured_sweep import check_output_kind, plan_sweep, refresh_card
from .sweep_results import FIELDS, format_table, plot_results, points_above, write_results

# The names this module has always offered (benchmarks and tests import them from here).
__all__ = ["DEFAULT_SPARSITIES", "FIELDS", "SWEEP_CSV", "SWEEP_JSON", "SWEEP_PNG", "format_table", "parse_sparsities",
           "sweep", "write_results"]

DEFAULT_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def parse_sparsities(text: str) -> list[float]:
    """`"0,0.1,...,0.9"` -> `[0.0, 0.1, ..., 0.9]`: a comma list where `...` continues the step of the two values
    before it up to the value after it.

    Args:
        text (`str`): comma-separated fractions, with `...` allowed between an increasing pair and a last value.

    Returns:
        `list[float]`: the sparsities, sorted, without duplicates, each in [0, 1).

    Raises:
        ValueError: a value is not a float or not in [0, 1), `...` is misplaced, or the list is empty.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    values: list[float] = []
    for i, part in enumerate(parts):
        if part == "...":
            if len(values) < 2 or i + 1 >= len(parts):
                raise ValueError(f"sparsities {text!r}: '...' needs two values before it and one after")
            step, stop = values[-1] - values[-2], float(parts[i + 1])
            if step <= 0:
                raise ValueError(f"sparsities {text!r}: the values before '...' must increase")
            n = round((stop - values[-1]) / step)
            values += [round(values[-1] + k * step, 10) for k in range(1, n)]
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"sparsities must be comma-separated floats in [0, 1) (e.g. 0,0.1,...,0.9); got {part!r}") from None
    if not values:
        raise ValueError("sparsities is empty")
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if bad:
        raise ValueError(f"sparsities must lie in [0, 1); got {bad}")
    return sorted(set(values))


def _label_importances(importance: Mapping[str, Any] | Sequence[Any] | None,
                       name: str | None = None) -> dict[str, Any]:
    """`{label: folder or Importance}` as given; a list is labelled by criterion (`"label=folder"` overrides)."""
    if importance is None:
        return {}
    if isinstance(importance, Mapping):
        return dict(importance)
    if isinstance(importance, (str, os.PathLike, Importance)):
        importance = [importance]
    from ..files.importance_files import load_importance

    labelled: dict[str, Any] = {}
    for item in importance:
        if isinstance(item, str) and "=" in item and not os.path.exists(item):
            label, item = item.split("=", 1)
        else:
            if not isinstance(item, Importance):
                item = load_importance(item, name=name)
            label, k = item.criterion, 2
            while label in labelled:  # two folders of the same criterion
                label, k = f"{item.criterion}-{k}", k + 1
        if label in labelled:
            raise ValueError(f"importance label {label!r} is given twice")
        labelled[label] = item
    return labelled


def _importance_dirs(importances: Mapping[str, Any], name: str | None = None) -> list[str]:
    """The local importance folders among `{label: folder or Importance}` (for the output rule)."""
    from ..files.importance_files import resolve_importance_dir
    from ..files.safetensors_io import ImportanceFileError

    dirs = []
    for item in importances.values():
        path = item.path if isinstance(item, Importance) else os.fspath(item)
        if path and os.path.isdir(path):
            try:
                dirs.append(resolve_importance_dir(path, None if isinstance(item, Importance) else name))
            except ImportanceFileError:  # refused with a better message when it is loaded
                continue
    return dirs


def _windows(tokenizer, path: str | os.PathLike, seq_len: int, max_windows: int | None):
    from .data import load_texts, make_windows

    return make_windows(tokenizer, load_texts(path), seq_len=seq_len, max_windows=max_windows)


def _check_sweep_args(args: dict[str, Any]) -> None:
    path, opt_path, opt_list = (str, os.PathLike), (str, os.PathLike, type(None)), (list, tuple, type(None))
    checks = [
        ("model_dir", path, "a model folder (str or os.PathLike)"),
        ("importance", (Mapping, list, tuple, str, os.PathLike, Importance, type(None)),
         "a dict {label: folder or Importance}, a list of them, one of them, or None"),
        ("data", path, "a text/JSON file or dataset folder (str or os.PathLike)"),
        ("sparsities", (list, tuple, range, type(None)), "a list of floats in [0, 1) or None"),
        ("structure", str, 'a str such as "unstructured", "2:4" or "layers,neurons"'),
        ("sizes", opt_list, "a list of floats in (0, 1) or None"),
        ("structures", opt_list, 'a list of structures such as ["neurons", "layers,neurons"] or None'),
        ("unit_statistics", opt_list, 'a list such as ["activation", "taylor"] or None'),
        ("compensations", opt_list, 'a list such as [None, "refit"] or None'),
        ("round_to", (int, type(None)), "an int or None"),
        ("scope", (str, type(None)), '"global", "layer", "row" or None'),
        ("baselines", (list, tuple), 'a list of one-shot criteria such as ["magnitude"]'),
        ("calibration_data", opt_path, "a file path or None"),
        ("calibration_windows", int, "an int"),
        ("seq_len", int, "an int"),
        ("max_windows", (int, type(None)), "an int or None"),
        ("batch_size", int, "an int"),
        ("output_dir", opt_path, "a folder path or None"),
        ("dtype", str, 'a str such as "auto" or "bfloat16"'),
        ("device", (str, type(None)), 'a str such as "cuda" or None'),
        ("title", (str, type(None)), "a str or None"),
        ("progress", bool, "a bool"),
        ("importance_name", (str, type(None)), "a str or None"),
    ]
    for name, types, expected in checks:
        check_arg_type("sweep", name, args[name], types, expected)
    for name in ("calibration_windows", "seq_len", "batch_size"):
        if isinstance(args[name], bool):
            raise TypeError(f"sweep: {name} must be an int; got bool {args[name]!r}")


def sweep(
    model_dir: str | os.PathLike,
    importance: Mapping[str, Any] | Sequence[Any] | None,
    data: str | os.PathLike,
    *,
    sparsities: Sequence[float] | None = None,
    structure: str = "unstructured",
    sizes: Sequence[float] | None = None,
    structures: Sequence[str] | None = None,
    unit_statistics: Sequence[str] | None = None,
    compensations: Sequence[str | None] | None = None,
    round_to: int | None = None,
    scope: str | None = None,
    baselines: Sequence[str] = ("magnitude",),
    calibration_data: str | os.PathLike | None = None,
    calibration_windows: int = 16,
    seq_len: int = 256,
    max_windows: int | None = 64,
    batch_size: int = 8,
    output_dir: str | os.PathLike | None = None,
    dtype: str = "auto",
    device: str | None = None,
    title: str | None = None,
    progress: bool = True,
    importance_name: str | None = None,
) -> list[dict[str, Any]]:
    """Prune a fresh copy of the model at every sparsity (or size) with every criterion and measure loss and perplexity.

    Args:
        model_dir (`str` or `os.PathLike`): the trained model (and its tokenizer), as `from_pretrained` reads: dense,
            or one that already holds zeros (a folder `save_pruned` wrote), whose share of zeros is measured: its row
            is then `"input"`, and an unstructured sweep skips the sparsities below that share (one warning).
        importance (`dict`, `list` or `None`): trained importance to compare: `{label: folder or Importance}`, or a
            list of folders / `Importance` objects / `"label=folder"` strings (labelled by criterion).
        data (`str` or `os.PathLike`): evaluation text (`.txt`, `.json`, `.jsonl` or a saved dataset folder).
        sparsities (`Sequence[float]`, *optional*): fractions in [0, 1); `None`: 0, 0.1, ..., 0.9. Unstructured only:
            N:M's sparsity is implied (one point per criterion), a structured sweep takes `sizes`.
        structure (`str`, *optional*, defaults to `"unstructured"`): `"unstructured"`, an N:M pattern (`"2:4"`), or
            one structure that shrinks the model (`"neurons"`, `"heads"`, `"hidden"`, `"layers"`, `"layers,neurons"`):
            a structured sweep.
        sizes (`Sequence[float]`, *optional*): structured: the shares of the model's parameters to remove, in (0, 1)
            (all parameters, embeddings included, a tied tensor once: each point prunes with `target_params=1 -
            size`); `None`: 0.2, 0.35, 0.5.
        structures (`Sequence[str]`, *optional*): several structures to compare instead of `structure` (a
            combination is one string, `"layers,neurons"`).
        unit_statistics (`Sequence[str]`, *optional*): the `PruneConfig.unit_statistic` values to compare (importance
            with unit statistics; one without them ranks neurons / KV groups by per-weight scores, one row per
            structure). `None`: `"activation"`.
        compensations (`Sequence`, *optional*): the `PruneConfig.compensate` values to compare (`None` or `"none"`
            for none), each given only to the structures that remove MLP neurons or KV groups.
        round_to (`int`, *optional*): `PruneConfig.round_to` of every structure that cuts a width.
        scope (`str`, *optional*): `"global"`, `"layer"` or `"row"`, as in [`PruneConfig`]; the same for every
            criterion (structured: `"layer"` only).
        baselines (`Sequence[str]`, *optional*, defaults to `("magnitude",)`): one-shot criteria computed from the
            dense model itself (`"magnitude"`, `"wanda"`), labelled `oneshot-<name>`; they have no unit statistics,
            so a structured sweep of hidden channels or layers, or with `compensate="mean"`, refuses them.
        calibration_data (*optional*): text for one-shot wanda's calibration pass; defaults to `data`.
        calibration_windows (`int`, *optional*, defaults to 16): windows of `seq_len` tokens forwarded for wanda.
        seq_len / max_windows / batch_size: evaluation windows (the first `max_windows` of `data`) and batch size.
        output_dir (`str` or `os.PathLike`, *optional*): where to write `sweep.csv`, `sweep.json` (rewritten after
            every point) and `sweep.png`, e.g. `out/sweep` or the pruned model's folder (its card then shows the
            sweep). Checked before any work by `export.check_output_dir`: never the model folder itself, an
            importance folder, a `checkpoint-N`, nor a pruned model of the other kind (a structured sweep beside
            zeros, or the reverse); other files in it are left alone.
        dtype (`str`, *optional*, defaults to `"auto"`): model dtype (`"auto"`, `"float32"`, `"bfloat16"`, ...).
        device (`str`, *optional*): defaults to CUDA when available, else CPU.
        title (`str`, *optional*): title of the plot; defaults to the model folder, structure and window count.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar over the points.
        importance_name (`str`, *optional*): read `importance-<name>/` (the `ImportanceConfig(name=...)` of one of
            several callbacks) from every folder or Hub repo of `importance`, as `load_importance(path, name=...)`;
            `Importance` objects are used as given.

    Returns:
        `list[dict]`: rows `{"criterion", "structure", "sparsity", "loss", "perplexity", "tokens", "dataset"}`
        (`tokens` evaluated, `dataset` the data's file or folder name; a pruned row also has `scope` and
        `importance_criterion`), the model as given first: criterion and structure `"dense"` when its prunable
        weights hold no zero, else `"input"` with `input_sparsity` (and, unstructured or N:M, `sparsity`) the share of
        zeros measured in them. Loss is the mean cross-entropy in nats per token, perplexity `exp(loss)`. A sparsity
        of 0 prunes nothing, so its rows repeat the dense loss.
        A structured row also has `candidate` (its line in the plot), `unit_statistic` (`"per-weight scores"` for an
        importance without unit statistics), `compensate`, `round_to`, `size` (asked), `target_params`,
        `num_parameters` (kept, as counted on the pruned copy) and `sparsity` (the share of the model's parameters
        it removed, measured), `skipped` (why a point could not be pruned, its loss `None`) and `same_as` (the
        candidate that pruned the very same model, scored once); the reference row has `num_parameters`.

    Raises:
        TypeError: an argument has the wrong type (checked before anything is loaded).
        ValueError: bad sparsities, sizes, structure, scope or baselines, sizes with an unstructured or N:M sweep (or
            sparsities with a structured one); nothing to compare; unusable data or tokenizer; importance that does
            not match the model; structured: a candidate that cannot prune the model at the largest size (architecture,
            statistics, a size that empties a layer), checked before the dense model is evaluated; `output_dir`
            refused by the output rule; a `model_dir` without config.json or weights; an importance labelled `"dense"`
            or `"input"` (the reference row's names); every sparsity below the share of zeros the model already holds
            (after it is loaded, before any evaluation).
        FileNotFoundError: `model_dir` is not a folder, or `data` does not exist.
    """
    _check_sweep_args(locals())  # first statement: locals() holds exactly the arguments
    from transformers import AutoModelForCausalLM

    from .data import evaluate_loss
    from .model_io import check_model_dir, load_tokenizer
    structured = plan_sweep(locals())
    kind, nm = parse_structure(structure)
    if structured is not None:
        kind, (points, candidates) = "structured", structured
    elif kind == "N:M":  # its sparsity is implied: one point per criterion, `sparsities` ignored
        points, candidates = [1.0 - nm[0] / nm[1]], None
    else:
        points, candidates = parse_sparsities(",".join(map(str, DEFAULT_SPARSITIES if sparsities is None
                                                           else sparsities))), None
    if candidates is None:  # validate early
        PruneConfig(sparsity=None if kind == "N:M" else points[-1], structure=structure, scope=scope)
    bad = [b for b in baselines if b not in ONESHOT_CRITERIA]
    if bad:
        raise ValueError(f"baselines must be among {ONESHOT_CRITERIA}; got {bad}")
    importances = _label_importances(importance, importance_name)
    reserved = [label for label in importances if label in SWEEP_REFERENCES]
    if reserved:
        raise ValueError(f"importance label {reserved[0]!r} names the sweep's reference row (the model as given): "
                         "choose another")
    if not importances and not baselines:
        raise ValueError("nothing to compare: give importance folders and/or one-shot baselines")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir} is not a model folder")
    check_model_dir(model_dir, "model_dir")  # a folder without config.json or weights
    if output_dir is not None:
        from ..publish.export import check_output_dir

        # The library's one output rule; a non-empty folder is fine (e.g. the pruned model's, whose card then
        # shows the sweep): only sweep.csv, sweep.json and sweep.png are replaced there.
        check_output_dir(output_dir, input_dirs=[model_dir], importance_dirs=_importance_dirs(importances, importance_name),
                         require_empty=False)
        check_output_kind(output_dir, candidates is not None)

    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"{model_dir} has no usable tokenizer (the sweep tokenizes the data with it): {e}") from None
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer (the sweep tokenizes the data with it)")
    windows = _windows(tokenizer, data, seq_len, max_windows)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device)
    input_sparsity = measure_input(model)  # a pruned folder is not "dense": its reference row says what it holds
    if candidates is None and kind != "N:M":  # an N:M pattern prunes further whatever the share (groups, not a count)
        points = points_above(points, input_sparsity)

    for label, imp in list(importances.items()):
        if not isinstance(imp, Importance):
            from ..files.importance_files import load_importance

            importances[label] = imp = load_importance(imp, name=importance_name)
        imp.validate_against(model)  # fail before any evaluation, not halfway through
    for name in baselines:
        calib = None
        if SCORERS[name].source == "activations":  # the baseline reads calibration activations
            calib = _windows(tokenizer, calibration_data or data, seq_len, calibration_windows)
        importances[f"oneshot-{name}"] = oneshot_importance(model, name, calib, batch_size=batch_size)
    if candidates is not None:
        from .structured_sweep import check_points

        check_points(model, importances, candidates, points)  # every refusal before the first evaluation
    shown = "; ".join(dict.fromkeys(c.structure for c in candidates)) if candidates is not None else structure
    title = title or f"{Path(model_dir).name}: {shown}, {windows.num_rows} windows x {seq_len} tokens"
    dense_eval = evaluate_loss(model, windows, batch_size=batch_size)
    # The data by its file or folder name only: sweep.json is published with a pruned model's card.
    dataset = path_name(os.fspath(data))
    n = len(importances) * len(points)
    bar = tqdm(total=n, desc="sweep", disable=not D.show_progress(progress))
    if candidates is not None:
        from .structured_sweep import FIELDS as STRUCTURED_FIELDS
        from .structured_sweep import structured_rows

        def on_point(rows: list[dict[str, Any]], what: str) -> None:
            if output_dir is not None:
                write_results(rows, output_dir, STRUCTURED_FIELDS)
            bar.set_postfix_str(what)
            bar.update()

        rows = structured_rows(model, importances, candidates, points, windows, batch_size=batch_size,
                               dense_eval=dense_eval, dataset=dataset, on_point=on_point,
                               input_sparsity=input_sparsity)
    else:
        rows = _unstructured_rows(model, importances, points, kind, structure, scope, windows, batch_size, dense_eval,
                                  dataset, output_dir, bar, input_sparsity)
    bar.close()
    if output_dir is not None:
        write_results(rows, output_dir, FIELDS if candidates is None else STRUCTURED_FIELDS)
        plot_results(rows, Path(output_dir) / SWEEP_PNG, title, structured=candidates is not None)
        refresh_card(output_dir)  # a pruned model's folder: its generated card shows the sweep at once
    return rows


def _unstructured_rows(model, importances, points, kind, structure, scope, windows, batch_size, dense_eval, dataset,
                       output_dir, bar, input_sparsity) -> list[dict[str, Any]]:
    """Every importance at every sparsity on the one model, its weights as loaded put back before each point."""
    from ..prune.pruner import prune_
    from ..prune.refit import cross_warnings_once
    from .data import evaluate_loss

    # One CPU copy of the weights as loaded, put back before each point (tied tensors are copied once).
    loaded: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr not in copies:
            copies[ptr] = tensor.detach().to("cpu", copy=True)
        loaded[key] = copies[ptr]
    del copies

    rows: list[dict[str, Any]] = [{**sweep_reference(input_sparsity), "sparsity": input_sparsity,
                                   "loss": dense_eval["loss"], "perplexity": dense_eval["perplexity"],
                                   "tokens": dense_eval["tokens"], "dataset": dataset}]
    with cross_warnings_once():  # one importance pruned at every point: its cross-term advice once per sweep
        for label, imp in importances.items():
            for s in points:
                bar.set_postfix_str(f"{label} @ {s:.0%}")
                if s == 0.0:
                    result = dense_eval
                else:
                    model.load_state_dict(loaded)
                    config = PruneConfig(sparsity=None if kind == "N:M" else s, structure=structure, scope=scope)
                    prune_(model, imp, config, progress=False)
                    result = evaluate_loss(model, windows, batch_size=batch_size)
                # What chose the masks, beside the label: the criterion and the scope it resolved to (scope=None
                # follows each criterion, so two rows of one sweep may differ), and the tokens evaluated.
                rows.append({"criterion": label, "structure": structure, "sparsity": s, "loss": result["loss"],
                             "perplexity": result["perplexity"], "importance_criterion": imp.criterion,
                             "scope": scope or default_scope(imp.criterion), "tokens": result["tokens"],
                             "dataset": dataset})
                if output_dir is not None:
                    write_results(rows, output_dir)
                bar.update()
    model.load_state_dict(loaded)
    return rows
