"""The card's statements of what was measured (`sparsity.json`'s `measured` section, written by `measure.py`): the
weight files and the speed beside the model it was pruned from, named as what it was: the dense model, or the input
model when that was itself a pruned output (`earlier_prunes`). Moved out of `measure.py` and `card.py`, which were at
their size limit."""

from __future__ import annotations

from typing import Any


def baseline_words(sparsity: dict | None) -> tuple[str, str]:
    """How the card names the model the figures compare against: `("dense", "the dense")` for a prune of a dense model;
    for a model pruned from a pruned folder (`earlier_prunes`), by the baseline's recorded parameter count:
    `("for the input model", "the input")` (also when no count is recorded: what `prune` and `prune_checkpoint`
    measure beside), `("for the original dense model", "the original dense")`, else `("for the baseline", "the
    baseline")`.

    Args:
        sparsity (`dict`, *optional*): the content of `sparsity.json`.

    Returns:
        `tuple[str, str]`: the word after a figure (`"0.67 MB dense"`) and the one before `checkpoint's` / `model's`.
    """
    chain = [e for e in (sparsity or {}).get("earlier_prunes") or [] if isinstance(e, dict)]
    if not chain:
        return "dense", "the dense"
    measured = sparsity.get("measured") or {}
    count = ((measured.get("dense_weight_files") or {}).get("num_parameters")
             or ((measured.get("speed") or {}).get("dense") or {}).get("num_parameters"))
    if count is None or count == (chain[-1].get("num_parameters") or {}).get("after"):
        return "for the input model", "the input"
    if count == (chain[0].get("num_parameters") or {}).get("before"):
        return "for the original dense model", "the original dense"
    return "for the baseline", "the baseline"


def within_spread(speed: dict, key: str) -> bool | None:
    """Whether the pruned and the baseline model's runs of one figure overlap: the lowest of each at most the highest
    of the other, so that the run-to-run spread of the machine covers the difference of their medians.

    Args:
        speed (`dict`): `sparsity.json`'s `measured.speed`, as `measure.measure_model` wrote it.
        key (`str`): a figure of both models (`"prefill_tokens_per_s"`, `"decode_tokens_per_s"`, a peak memory).

    Returns:
        `bool` or `None`: `None` for a figure recorded as one value (the peak memory: one process per model), or
        without a baseline.
    """
    pruned, base = (speed.get("pruned") or {}).get(key), (speed.get("dense") or {}).get(key)
    if not (isinstance(pruned, dict) and isinstance(base, dict)):
        return None
    return pruned["min"] <= base["max"] and base["min"] <= pruned["max"]


def ratio_words(speed: dict, key: str, of: str = "") -> str:
    """One figure's pruned / baseline ratio as the card states it: the ratio of the medians with the range the runs
    allow (`"2.69x the dense model's, 2.31x to 3.05x across the runs"`: slowest over fastest to fastest over slowest),
    or, when the runs overlap ([`within_spread`]), no ratio but that the difference is within the run-to-run spread;
    a figure of one value (the peak memory) by its ratio, said to come from one run each.

    Args:
        speed (`dict`): `sparsity.json`'s `measured.speed`, with a baseline (`ratios` recorded).
        key (`str`): the figure.
        of (`str`, *optional*): what the ratio is of (`"the dense model's"`), after the ratio or the spread.

    Returns:
        `str`: the words; the recorded figures are not changed.
    """
    ratio, of = speed["ratios"][key], f" {of}" if of else ""
    overlap = within_spread(speed, key)
    if overlap is None:
        return f"{ratio:.2f}x{of}, one run each"
    if overlap:
        return (f"within the run-to-run spread{' of' + of if of else ''}: the ranges of {speed['repeats']} runs "
                "overlap, no measured difference")
    pruned, base = speed["pruned"][key], speed["dense"][key]
    return f"{ratio:.2f}x{of}, {pruned['min'] / base['max']:.2f}x to {pruned['max'] / base['min']:.2f}x across the runs"


def measured_text(measured: dict | None, structured: bool, sparsity: dict | None = None) -> str | None:
    """The card's statement of `sparsity.json`'s `measured` section: the weight files (always recorded), the speed and
    memory beside the model it was pruned from when measured ([`baseline_words`]).

    Args:
        measured (`dict`, *optional*): the section, as `measure.measured_section` wrote it.
        structured (`bool`): a structured prune (equal file sizes are then not explained by stored zeros).
        sparsity (`dict`, *optional*): the whole `sparsity.json`, to name the baseline.

    Returns:
        `str` or `None`: one paragraph; `None` for a folder written before the section existed. Nothing is stated
        that the section does not record.
    """
    files = (measured or {}).get("weight_files")
    mb, tokens = (lambda n: f"{n / 1e6:,.2f} MB"), (lambda v: f"{v:,.0f} tokens/s")
    if not files:
        return None
    after, the = baseline_words(sparsity)
    dense, speed = measured.get("dense_weight_files"), measured.get("speed")
    weights = f"Weight files: {mb(files['bytes'])}"
    if dense and files["bytes"] == dense["bytes"]:
        weights += f", the same as {the} checkpoint's" + ("" if structured else " (the zeros are stored)")
    elif dense:
        weights += f" vs {mb(dense['bytes'])} {after} ({files['bytes'] / dense['bytes']:.2f}x)" + (
            f" (stored as {files['dtype']}, {the} checkpoint as {dense['dtype']})"
            if files.get("dtype") != dense.get("dtype") else "")
    if not speed:
        return weights + "."
    pruned, base, n = speed["pruned"], speed.get("dense"), speed["threads"]

    def figure(key: str, show) -> str:  # a speed by its median (the runs' range beside it), a peak as it is
        one = (lambda f: show(f[key]["median"]) + f" ({f[key]['min']:,.0f} to {f[key]['max']:,.0f})"  # noqa: E731
               if isinstance(f[key], dict) else show(f[key]))
        return one(pruned) + (f" vs {one(base)} {after} ({ratio_words(speed, key)})" if base else "")

    where = f"{speed['device_name']} " + (f"CPU, {n} thread{'s' * (n != 1)}" if speed["device"] == "cpu" else "GPU")
    parts = [f"prefill of 1 x {speed['seq_len']} tokens without cache {figure('prefill_tokens_per_s', tokens)}",
             f"greedy decode of {speed['new_tokens']} tokens with the KV cache {figure('decode_tokens_per_s', tokens)}"]
    memory = next((k for k in ("peak_rss_bytes", "peak_cuda_allocated_bytes") if k in pruned), None)
    if memory:  # none could be read on Windows
        what = "CUDA memory allocated" if memory == "peak_cuda_allocated_bytes" else "resident memory"
        parts.append(f"peak {what} ({speed['memory_measure']}) of a process that loads the model and runs the "
                     f"same prefill and decode {figure(memory, mb)}")
    alternating = f" alternating with {the} model" if base else ""
    return (f"Measured when it was saved, on one {where} (torch {speed['torch_version'].split('+')[0]}, "
            f"{speed['dtype']}, median (range) of {speed['repeats']} runs{alternating}): {'; '.join(parts)}. {weights}.")


def buys_context(sparsity: dict) -> dict[str, str | None]:
    """What "What the sparsity buys" may state beyond what the structure does, from recorded figures only.

    Args:
        sparsity (`dict`): the content of `sparsity.json`.

    Returns:
        `dict`: `size`, the parameters before and after (structured) and the weight files against the baseline
        checkpoint's when both were measured; `speed`, one sentence with the measured speed and memory ratios against
        the baseline model, or `None` when they were not measured (the card then claims no speed or memory gain). The
        baseline is the dense model, or the input model when that was itself pruned ([`baseline_words`]).
    """
    the = baseline_words(sparsity)[1]
    count = (sparsity.get("structured") or {}).get("num_parameters") or {}
    measured: dict[str, Any] = sparsity.get("measured") or {}
    files, dense = measured.get("weight_files"), measured.get("dense_weight_files")
    size = [f"{count['before']:,} -> {count['after']:,} parameters"] if count.get("before") and count.get("after") else []
    if files and dense and files.get("dtype") == dense.get("dtype"):
        size.append(f"weight files {files['bytes'] / dense['bytes']:.2f}x {the} checkpoint's")
    speed, ratios = measured.get("speed") or {}, (measured.get("speed") or {}).get("ratios") or {}
    of = f"{the} model's"
    figures = [f"{what} {ratio_words(speed, key, of)}" for key, what in (
        ("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s"),
        ("peak_rss_bytes", "peak resident memory"), ("peak_cuda_allocated_bytes", "peak CUDA memory"))
        if isinstance(ratios.get(key), (int, float))]
    # Ratios only: no "faster" or "less memory" that a measured slowdown would contradict; none at all where the
    # runs of the two models overlap (a shared machine moves a figure by more than the pruning did).
    text = (f"Measured on one {'CPU' if speed.get('device') == 'cpu' else 'GPU'} when it was saved (the figures "
            f"above): {'; '.join(figures)}; another runtime, batch or device can differ.") if figures else None
    return {"size": "; ".join(size) or None, "speed": text}
