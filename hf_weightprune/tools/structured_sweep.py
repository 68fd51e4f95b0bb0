"""The structured part of `sweep`: loss and perplexity of the model made smaller by several structures, unit statistics
and compensations, at several sizes.

A size is the share of the model's parameters removed (all of them, embeddings included, a tied tensor once: the count
`PruneConfig.target_params` keeps, `1 - size` of the model's); each point is one `PruneConfig(structure=...,
target_params=1 - size, unit_statistic=..., compensate=...)`. The candidates of one size are measured by the structure
search's own loop ([`~tools.search.score_candidates`]: a copy pruned at a time, scored on the evaluation windows, a
candidate that prunes the very model an earlier one gave scored once), so a sweep at one size is the table
`search_structures` prints, without a winner. Rows record the parameters kept and the share removed as measured on the
pruned copy, beside the size asked for.

Checks first: every candidate is pruned once on a copy at the largest size before the dense model is evaluated, so a
structure the architecture cannot take, a statistic or compensation the importance lacks, or a size that empties a
layer is refused in one line before any evaluation or file.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from ..collect.importance import Importance
from ..config import COMPENSATED_AXES, COMPENSATIONS, PruneConfig
from ..files.pruned_files import is_sweep_reference, sweep_reference, sweep_reference_name
from ..perplexity import perplexity_text
from ..validation import parse_structure, structure_parts
from .log_once import warnings_once

DEFAULT_SIZES = (0.2, 0.35, 0.5)
FIELDS = ("criterion", "structure", "unit_statistic", "compensate", "size", "sparsity", "num_parameters", "loss",
          "perplexity", "skipped")
PER_WEIGHT = "per-weight scores"  # what ranks neurons / KV groups of an importance without unit statistics


def plan_sweep(a: Mapping[str, Any]) -> tuple[list[float], list[PruneConfig]] | None:
    """Whether [`~tools.sweep.sweep`]'s arguments ask for a structured sweep, and its sizes and candidate configs;
    every combination the sweep cannot run refused in one line, before anything is loaded.

    Args:
        a (`Mapping`): `sweep`'s arguments by name.

    Returns:
        `(sizes, candidates)`, sizes sorted without duplicates; `None` for an unstructured or N:M sweep.

    Raises:
        ValueError: `structures` beside a `structure`, `"experts"`, a structured argument (`sizes`,
            `unit_statistics`, `compensations`, `round_to`) with an unstructured or N:M structure, `sparsities` with a
            structured one, a size outside (0, 1), a candidate [`structured_candidates`] refuses.
    """
    kind = parse_structure(a["structure"])[0]
    if a["structures"] is not None and a["structure"] != "unstructured":
        raise ValueError("structures replaces structure: give the structures to compare in structures only")
    if kind == "experts":
        raise ValueError("sweep does not remove whole experts: prune each size with `hf-weightprune prune --structure "
                         "experts`")
    if a["structures"] is None and not structure_parts(a["structure"]):
        extra = [k for k in ("sizes", "unit_statistics", "compensations", "round_to") if a[k] is not None]
        if extra:
            raise ValueError(f"{extra[0]} applies to structured sweeps (neurons, heads, hidden, layers or a "
                             f"combination); structure {a['structure']!r} prunes at "
                             + ("the sparsity its pattern implies" if kind == "N:M" else "sparsities"))
        return None
    if a["sparsities"] is not None:
        raise ValueError("a structured sweep takes sizes (shares of the model's parameters removed), not sparsities")
    sizes = list(a["sizes"]) if a["sizes"] is not None else list(DEFAULT_SIZES)
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s < 1.0:
            raise ValueError(f"sizes must be shares of the parameters removed in (0, 1) (the dense model is always the "
                             f"first row); got {s!r}")
    if not sizes:
        raise ValueError("sizes is empty")
    return sorted({float(s) for s in sizes}), structured_candidates(
        a["structure"], a["structures"], a["unit_statistics"], a["compensations"], a["round_to"], a["scope"])


def check_output_kind(output_dir: str | os.PathLike, structured: bool) -> None:
    """A sweep written into a pruned model's folder is shown on its card: refuse one of the other kind (zeros beside
    a smaller model, or the reverse), which would say nothing about that model."""
    from ..files.pruned_files import SPARSITY_NAME, load_sparsity

    if not os.path.isfile(os.path.join(output_dir, SPARSITY_NAME)):
        return
    model = load_sparsity(output_dir).get("structure")
    shrinks = bool(structure_parts(model)) or model == "experts"
    if shrinks != structured:
        what = "a structured sweep (units removed)" if structured else "an unstructured / N:M sweep (zeros)"
        raise ValueError(f"output_dir {os.fspath(output_dir)} holds a {model!r} pruned model, whose card would show "
                         f"{what} as if it described it: write the sweep to another folder")


def refresh_card(output_dir: str | os.PathLike) -> None:
    """A sweep written into a pruned model's folder: its card, when this library generated it, is rendered again so
    that it shows the sweep now (not only at `push`); a card the user wrote is theirs and stays as it is."""
    from ..files.pruned_files import SPARSITY_NAME
    from ..publish.card import CARD_FILE, is_generated_card, write_model_card

    card = os.path.join(output_dir, CARD_FILE)
    if os.path.isfile(os.path.join(output_dir, SPARSITY_NAME)) and os.path.isfile(card) and is_generated_card(card):
        write_model_card(output_dir)


def parse_compensation(value: str | None) -> str | None:
    """`"none"` (the command line's spelling) -> `None`; other values as `PruneConfig.compensate` takes them."""
    return None if value is None or str(value).strip().lower() in ("none", "") else str(value).strip()


def structured_candidates(structure: str, structures: Sequence[str] | None, unit_statistics: Sequence[str] | None,
                          compensations: Sequence[str | None] | None, round_to: int | None,
                          scope: str | None) -> list[PruneConfig]:
    """The candidate configs of a structured sweep (budget left at a placeholder: each size sets `target_params`).

    Args:
        structure (`str`): the one structure when `structures` is `None`.
        structures / unit_statistics / compensations (`list`, *optional*): what to compare, every combination of the
            three (structures outer); `None`: `structure`, `"activation"`, `None`.
        round_to (`int`, *optional*), scope (`str`, *optional*): as in [`PruneConfig`], shared.

    Returns:
        `list[PruneConfig]`: `round_to` only on structures that cut a width and a compensation only on those that
        remove MLP neurons or KV groups (as [`~tools.search.candidate_configs`]), duplicates dropped.

    Raises:
        ValueError: one line: not a structure of neurons, heads, hidden or layers (N:M, unstructured and experts take
            `sparsities`), a statistic or compensation `PruneConfig` refuses, a compensation no structure serves.
    """
    from .search import candidate_configs

    named = list(structures) if structures is not None else [structure]
    for s in named:
        kind = parse_structure(s)[0]
        if not structure_parts(s):
            raise ValueError(f"sweep sizes are shares of parameters removed by a structured prune (neurons, heads, "
                             f"hidden, layers or a combination); structure {s!r} ({kind}) takes sparsities instead")
    comps = [parse_compensation(c) for c in (compensations or [None])]
    for c in comps:
        if c not in COMPENSATIONS:
            raise ValueError(f"compensations must be among {COMPENSATIONS[1:]} or None; got {c!r}")
        if c is not None and not any(set(structure_parts(s)) & set(COMPENSATED_AXES) for s in named):
            raise ValueError(f"compensate={c!r} makes up for removed MLP neurons / KV groups; none of the structures "
                             f"{named} removes them")
    out: list[PruneConfig] = []
    for s in named:
        for c in comps:
            base = PruneConfig(structure=s, target_params=0.5, scope=scope, compensate=c, round_to=round_to
                               if set(structure_parts(s)) & {"neurons", "hidden"} else None)
            for cand in candidate_configs(base, None, list(unit_statistics) if unit_statistics else None):
                if all(cand.to_dict() != o.to_dict() for o in out):
                    out.append(cand)
    return out


def _for_importance(candidates: list[PruneConfig], imp: Importance) -> list[PruneConfig]:
    """Without unit statistics only per-weight scores rank (neurons, heads): one candidate per structure and
    compensation, at the default statistic, which `prune_` accepts there."""
    if imp.has_units:
        return candidates
    out: list[PruneConfig] = []
    for c in candidates:
        c = dataclasses.replace(c, unit_statistic="activation")
        if all(c.to_dict() != o.to_dict() for o in out):
            out.append(c)
    return out


def _at(config: PruneConfig, size: float) -> PruneConfig:
    return dataclasses.replace(config, target_params=round(1.0 - size, 10))


_BUDGET = re.compile(r"\btarget_params[= ](?P<value>0?\.\d+)\b")
_SETTING = re.compile(r"\b(?P<name>structure|unit_statistic|compensate)=(?P<value>'[^']*'|None)")
_WORD = {"structure": "structure", "unit_statistic": "statistic", "compensate": "compensation"}


def in_sizes(message: str) -> str:
    """A pruning message in the words of the sweep the user ran: a point's `target_params=0.7` is its size
    (`size 0.3`, one of `sizes`), and a candidate's `structure='neurons'` / `unit_statistic=` / `compensate=` are
    named as settings (`structure 'neurons'`), not as the keywords of a `PruneConfig` the user never wrote (they
    gave `structures` / `unit_statistics` / `compensations`, or the flags of those names)."""
    message = _BUDGET.sub(lambda m: f"size {round(1.0 - float(m['value']), 10):g}", message)
    return _SETTING.sub(lambda m: f"{_WORD[m['name']]} {'none' if m['value'] == 'None' else m['value']}", message)


def candidate_label(label: str, config: PruneConfig, imp: Importance) -> str:
    """One line of the plot: `"wanda: layers,neurons (taylor, refit)"`; whole layers alone rank by block influence under
    either activation statistic (`prune/structured.py`), which the label says rather than the statistic's name."""
    stat = config.unit_statistic if imp.has_units else PER_WEIGHT
    if config.structure == "layers" and stat in ("activation", "activation_l2"):
        stat = "block influence"
    parts = [stat] + ([config.compensate] if config.compensate else [])
    return f"{label}: {config.structure} ({', '.join(parts)})"


def check_points(model: nn.Module, importances: Mapping[str, Importance], candidates: list[PruneConfig],
                 sizes: Sequence[float]) -> None:
    """Prune a copy with every candidate of every importance at the largest size; the first refusal is raised.

    Raises:
        ValueError: one line naming the importance, the candidate and the size, then `prune_`'s reason.
    """
    from ..prune.pruner import prune_

    size = max(sizes)
    for label, imp in importances.items():
        for config in _for_importance(candidates, imp):
            student = copy.deepcopy(model)
            try:
                with warnings_once(quiet=True):  # what these prunes would warn, the run warns (once)
                    prune_(student, copy.copy(imp), _at(config, size), progress=False)
            except ValueError as e:
                first = in_sizes((str(e).strip().splitlines() or [type(e).__name__])[0])
                lacks = "unit statistics" in first or "Hessians" in first  # what a one-shot importance never holds
                hint = (" (one-shot baselines have no unit statistics or Hessians: pass baselines=() / --criteria '')"
                        if label.startswith("oneshot-") and lacks else "")
                raise ValueError(f"sweep: {candidate_label(label, config, imp)} at {size:.0%} of the parameters "
                                 f"removed: {first}{hint}") from None
            finally:
                del student
                gc.collect()


def structured_rows(model: nn.Module, importances: Mapping[str, Importance], candidates: list[PruneConfig],
                    sizes: Sequence[float], windows, *, batch_size: int, dense_eval: dict, dataset: str,
                    on_point: Callable[[list[dict[str, Any]], str], None],
                    input_sparsity: float = 0.0) -> list[dict[str, Any]]:
    """The rows of a structured sweep, the reference row first (the model as given: `"dense"`, or `"input"` with its
    `input_sparsity`, the share of zeros measured in its prunable weights; its `size` and `sparsity`, parameters
    removed, are 0); `on_point(rows, what)` after every size of every importance (the caller rewrites its files and
    moves its progress bar).

    Returns:
        `list[dict]`: see [`~tools.sweep.sweep`].
    """
    from ..prune.budget import num_params
    from .search import score_candidates

    before = num_params(model)
    rows: list[dict[str, Any]] = [{**sweep_reference(input_sparsity), "size": 0.0, "sparsity": 0.0,
                                   "num_parameters": before, "loss": dense_eval["loss"],
                                   "perplexity": dense_eval["perplexity"], "tokens": dense_eval["tokens"],
                                   "dataset": dataset}]
    with warnings_once(in_sizes):  # each warning once per sweep, naming its sizes (the checks were quiet)
        for label, imp in importances.items():
            mine = _for_importance(candidates, imp)
            for size in sizes:
                configs = [_at(c, size) for c in mine]
                scored = score_candidates(model, imp, configs, windows, batch_size=batch_size,
                                          name=f"sweep {label} at size {size:g}")
                for config, got in zip(configs, scored):
                    kept = got["num_parameters"] if not got["skipped"] else None
                    same = got["same_as"]
                    rows.append({
                        "criterion": label, "candidate": candidate_label(label, config, imp),
                        "structure": config.structure,
                        "unit_statistic": config.unit_statistic if imp.has_units else PER_WEIGHT,
                        "compensate": config.compensate, "round_to": config.round_to, "size": size,
                        "target_params": round((1.0 - size) * before),
                        "sparsity": None if kept is None else 1.0 - kept / before, "num_parameters": kept,
                        "loss": got["loss"], "perplexity": got["perplexity"], "importance_criterion": imp.criterion,
                        "scope": config.scope, "tokens": None if got["loss"] is None else dense_eval["tokens"],
                        "dataset": dataset, "skipped": got["skipped"] and in_sizes(got["skipped"]),
                        "same_as": None if same is None else candidate_label(label, mine[same], imp),
                    })
                on_point(rows, f"{label} @ {size:.0%}")
    return rows


def format_structured_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of a structured sweep: one row per candidate, one column per size (perplexity, and the share
    of parameters removed as measured), then the reference row's line ("Dense perplexity: ...", or "Input model
    (50.0% sparse) perplexity: ..." for an input with zeros)."""
    dense = next((r for r in rows if is_sweep_reference(r)), None)
    points = [r for r in rows if not is_sweep_reference(r)]
    sizes = sorted({r["size"] for r in points})
    names = list(dict.fromkeys(r["candidate"] for r in points))
    cell = {(r["candidate"], r["size"]): r for r in points}

    def show(r):
        if r is None:
            return ""
        if r.get("skipped"):
            return "skipped"
        return f"{perplexity_text(r['loss'])} (-{100 * r['sparsity']:.1f}%)"

    lines = ["| candidate | " + " | ".join(f"{s:.0%}" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    lines += [f"| {n} | " + " | ".join(show(cell.get((n, s))) for s in sizes) + " |" for n in names]
    lines.append("\nColumns: share of the model's parameters removed (target); cells: perplexity (share removed).")
    if dense is not None:
        lines.append(f"{sweep_reference_name(dense)} perplexity: {perplexity_text(dense['loss'])} (loss {dense['loss']:.4f}), "
                     f"{dense['num_parameters']:,} parameters.")
    return "\n".join(lines)
