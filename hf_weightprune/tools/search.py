"""Choosing the shape of a structured prune by measured loss: Minitron's candidate search.

`prune/structured.py` splits a `target_params` budget between the axes of a combination by a rule read from the unit
statistics. [`search_structures`] measures instead: each candidate `PruneConfig` (same budget, another structure or
unit statistic) prunes a copy of the model, optionally recovers for a few steps with the real `Trainer` (distilled
from the dense model when asked), and is scored by its mean loss on token windows of the training data; the lowest
loss wins (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation", arXiv
2407.14679: the search over candidate shapes ranked after a "lightweight retraining").

It lives in `tools/` beside `sweep.py`, not in `prune/`: it composes pruning (`prune_`), training (the `Trainer`
with `ImportanceCallback`'s distillation) and evaluation (`data.evaluate_loss`), all stages below this one.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import TrainerCallback

from ..collect.importance import Importance
from ..config import COMPENSATED_AXES, WIDTH_AXES, PruneConfig
from ..files.pruned_files import reference_name
from ..io_utils import check_arg_type
from ..perplexity import perplexity_text
from ..prune.pruner import prune_
from ..prune.report import PruningReport, measure_input
from ..train.callback import ImportanceCallback
from ..train.distill import DistillConfig
from ..train.recovery import TrainingCounter
from ..validation import structure_parts
from .data import evaluate_loss
from .log_once import warnings_once

__all__ = ["StructureSearch", "candidate_configs", "candidate_name", "score_candidates", "search_for_cli",
           "search_structures"]

logger = logging.getLogger(__name__)

MINITRON = "arXiv:2407.14679"
_SET_BY_SEARCH = ("max_steps", "save_strategy")  # TrainingArguments fields the search owns


@dataclass
class StructureSearch:
    """What [`search_structures`] measured, and the winner.

    Args:
        candidates (`list[dict]`): one row per candidate, in the order given: `config` (`PruneConfig.to_dict()`),
            `loss` and `perplexity` on the windows (`None` when skipped; the perplexity also where it overflows a
            float, `hf_weightprune.perplexity`), `num_parameters` (after pruning),
            `skipped` (the one-line reason a candidate could not be pruned, or kept a count off the budget by more
            than one step of its coarsest axis, else `None`), `training` (its recovery as it ran, counted by the
            recovery `Trainer`: `{"steps", "tokens"}`, optimizer steps and real input tokens, padding excluded;
            `None` when it was not recovered) and `same_as` (the index of an earlier candidate that pruned the very
            same model: same sizes, same units removed, same compensation, e.g. `"hidden,neurons"` that removed no
            hidden channel and `"neurons"`; its loss is that candidate's, scored once, and it is never `best`; else
            `None`).
        best (`PruneConfig`): the candidate of lowest loss (the first of equal ones).
        best_index (`int`): its position in `candidates`.
        dense_loss (`float`): the input model's loss on the same windows, before any candidate pruned it.
        windows (`int`), tokens (`int`): how many windows scored each candidate, and their predicted tokens.
        recovery_steps (`int`): optimizer steps of recovery asked for each candidate (0: one-shot); what each one
            ran is its row's `training`.
        distillation (`dict`, *optional*): `DistillConfig.to_dict()` of that recovery, `None` without.
        model (`nn.Module`, *optional*): a copy of the input model pruned with `best`, one-shot (see
            [`search_structures`]); `None` with `return_model=False`.
        report ([`PruningReport`], *optional*): its report; `report.search` holds [`to_dict`], so `save_pruned`
            writes the search into `sparsity.json` and the card.
        input_sparsity (`float`): the input's share of zeros (`prune.report.measure_input`): 0.0 for a dense one.
    """

    candidates: list[dict[str, Any]]
    best: PruneConfig
    best_index: int
    dense_loss: float
    windows: int
    tokens: int
    recovery_steps: int = 0
    distillation: dict[str, Any] | None = None
    model: nn.Module | None = field(default=None, repr=False)
    report: PruningReport | None = field(default=None, repr=False)
    input_sparsity: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The `search` section of `sparsity.json` (schema in docs/file_formats.md).

        Returns:
            `dict[str, Any]`: `method`, `reference`, `windows`, `tokens`, `recovery_steps`, `distillation`,
            `dense_loss`, `input_sparsity`, `chosen` (index into `candidates`) and `candidates` (the rows above). JSON-ready.
        """
        return {"method": "lowest mean loss on training windows", "reference": MINITRON, "windows": self.windows,
                "tokens": self.tokens, "recovery_steps": self.recovery_steps, "distillation": self.distillation,
                "dense_loss": self.dense_loss, "input_sparsity": self.input_sparsity, "chosen": self.best_index,
                "candidates": copy.deepcopy(self.candidates)}

    def table(self) -> str:
        """The candidates as a plain-text table (structure, unit statistic, compensation, parameters, loss, perplexity).

        Returns:
            `str`: one header line and one line per candidate, the chosen one marked with `*`; `none` in the
            compensation column for a candidate without one.
        """
        lines = [f"  {'structure':<24} {'statistic':<12} {'compensation':<12} {'parameters':>12} {'loss':>8} {'ppl':>9}"]
        for i, row in enumerate(self.candidates):
            c = row["config"]
            mark = "*" if i == self.best_index else " "
            if row["skipped"]:
                tail = f"skipped: {row['skipped']}"
            else:
                tail = f"{row['num_parameters']:>12,} {row['loss']:>8.4f} {perplexity_text(row['loss'], '.3f'):>9}"
                if row.get("same_as") is not None:
                    tail += f"  same model as {candidate_name(self.candidates[row['same_as']]['config'])}"
            lines.append(f"{mark} {c['structure']:<24} {c['unit_statistic']:<12} {c.get('compensate') or 'none':<12} "
                         f"{tail}")
        return "\n".join(lines)


def candidate_name(config: dict[str, Any]) -> str:
    """A candidate in a message or a table: `"neurons (activation, refit)"`, its structure, unit statistic and
    compensation (`"none"` without one), from `PruneConfig.to_dict()`."""
    return f"{config['structure']} ({config['unit_statistic']}, {config.get('compensate') or 'none'})"


def candidate_configs(base: PruneConfig, structures: Sequence[str | Sequence[str]] | None = None,
                      unit_statistics: Sequence[str] | None = None) -> list[PruneConfig]:
    """Candidates that differ from `base` only in their structure and/or unit statistic (every pair of both).

    Args:
        base ([`PruneConfig`]): the budget (`target_params`) and everything else the candidates share.
        structures (`list`, *optional*): structures such as `"layers,neurons"` or `("hidden", "neurons")`;
            `None`: `base.structure` only.
        unit_statistics (`list[str]`, *optional*): values of `PruneConfig.unit_statistic`; `None`: `base`'s only.

    Returns:
        `list[PruneConfig]`: structures outer, statistics inner. `base.round_to` goes to every candidate that cuts a
        width (neurons, hidden); one of counts only (`"layers"`, `"heads"`) has nothing to round and gets `None`.
        `base.compensate` likewise goes only to those that remove MLP neurons or KV groups (`"layers"` and
        `"hidden"` alone get `None`: nothing of theirs is compensated).

    Raises:
        ValueError: a structure or statistic `PruneConfig` refuses (its one-line message).
    """
    check_arg_type("candidate_configs", "base", base, PruneConfig, "a PruneConfig")
    def round_to(structure) -> int | None:  # PruneConfig refuses round_to for a structure with no width to round
        return base.round_to if set(structure_parts(structure) or ()) & set(WIDTH_AXES) else None

    def compensate(structure) -> str | None:  # prune_ refuses a compensation with no neuron or KV group to serve
        return base.compensate if set(structure_parts(structure) or ()) & set(COMPENSATED_AXES) else None

    return [dataclasses.replace(base, structure=s, unit_statistic=u, round_to=round_to(s), compensate=compensate(s))
            for s in (structures or [base.structure]) for u in (unit_statistics or [base.unit_statistic])]


def _check(candidates, recovery_steps, train_dataset, training_args, distill) -> list[PruneConfig]:
    candidates = list(candidates) if isinstance(candidates, Sequence) else candidates
    check_arg_type("search_structures", "candidates", candidates, list, "a list of PruneConfig")
    if not candidates or not all(isinstance(c, PruneConfig) for c in candidates):
        raise ValueError("search_structures: candidates must be a non-empty list of PruneConfig")
    flat = [c.structure for c in candidates if not c.structures]
    if flat:
        raise ValueError(f"search_structures compares structured prunes (neurons, heads, hidden, layers or a "
                         f"combination); got structure {flat[0]!r}")
    budgets = {c.target_params if c.target_params is not None else f"sparsity {c.sparsity} of {c.structure}"
               for c in candidates}
    if len(budgets) > 1:
        raise ValueError(f"search_structures compares candidates of one budget: give every candidate the same "
                         f"target_params (got {sorted(map(str, budgets))})")
    if isinstance(recovery_steps, bool) or not isinstance(recovery_steps, int) or recovery_steps < 0:
        raise ValueError(f"recovery_steps must be an int >= 0; got {recovery_steps!r}")
    if recovery_steps and train_dataset is None:
        raise ValueError("recovery_steps > 0 trains each candidate: pass train_dataset (the training data)")
    if not recovery_steps and (distill is not None or training_args):
        raise ValueError("distill and training_args set the recovery: give recovery_steps > 0 (0 scores one-shot)")
    check_arg_type("search_structures", "training_args", training_args, (dict, type(None)),
                   "a dict of TrainingArguments keyword arguments")
    owned = [k for k in _SET_BY_SEARCH if k in (training_args or {})]
    if owned:
        raise ValueError(f"training_args sets {owned[0]!r}, which the search sets (max_steps=recovery_steps, no "
                         "checkpoints): leave it out")
    check_arg_type("search_structures", "distill", distill, (DistillConfig, type(None)), "a DistillConfig or None")
    if distill is not None and distill.teacher is None and (distill.teacher_dtype or distill.teacher_device):
        raise ValueError("distill with teacher=None distils from the input model itself, which the search does not "
                         "convert: leave teacher_dtype / teacher_device unset, or pass teacher= (a path or a copy)")
    return candidates


class _Counted(TrainerCallback):
    """The optimizer steps and real tokens one recovery ran ([`TrainingCounter`], under a key of its own), whatever
    the caller's `training_args` or callbacks (an early stop) made of `max_steps`."""

    def __init__(self):
        self.counter = TrainingCounter(name="search")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.counter.start(model, state, kwargs.get("processing_class"))

    def on_step_end(self, args, state, control, **kwargs):
        self.counter.step_end(state, control)

    def on_train_end(self, args, state, control, **kwargs):
        self.counter.stop(state)


def _recover(student: nn.Module, dense: nn.Module, steps: int, train_dataset, training_args: dict | None,
             distill: DistillConfig | None, callbacks: list | None) -> dict[str, int]:
    """`steps` optimizer steps of `student` with the real `Trainer`; with `distill`, from the dense model. Returns
    what ran: `{"steps", "tokens"}`."""
    from transformers import Trainer, TrainingArguments

    if distill is None:
        counted = _Counted()
    else:  # distillation only (no config: nothing gathered), whose callback counts what ran
        teacher = distill.teacher if distill.teacher is not None else dense
        counted = ImportanceCallback(distill=dataclasses.replace(distill, teacher=teacher))
    with tempfile.TemporaryDirectory(prefix="hf-weightprune-search-") as tmp:
        kwargs = {"output_dir": tmp, "report_to": [], **(training_args or {})}
        args = TrainingArguments(**kwargs, max_steps=steps, save_strategy="no")
        trainer = Trainer(model=student, args=args, train_dataset=train_dataset, callbacks=callbacks)
        if distill is None:
            trainer.add_callback(counted)
        else:
            counted.attach(trainer)
        trainer.train()
        del trainer
    return counted.counter.record()


def score_candidates(model: nn.Module, importance: Importance, candidates: Sequence[PruneConfig], windows, *,
                     recovery_steps: int = 0, train_dataset=None, training_args: dict[str, Any] | None = None,
                     distill: DistillConfig | None = None, callbacks: list | None = None, batch_size: int = 8,
                     max_batches: int | None = None, name: str = "structure search") -> list[dict[str, Any]]:
    """
    The measuring part of [`search_structures`], also what `sweep` runs at each size of a structured sweep: each
    candidate prunes a `copy.deepcopy(model)` (a shallow copy of `importance`), recovers `recovery_steps` when asked,
    and is scored by `evaluate_loss` on `windows`; one copy at a time. No winner, no dense loss, no argument checks
    (the callers check first).

    Args:
        model, importance, candidates, windows, recovery_steps, train_dataset, training_args, distill, callbacks,
        batch_size, max_batches: as in [`search_structures`].
        name (`str`, *optional*, defaults to `"structure search"`): what the log messages name the run (a sweep names
            its size).

    Returns:
        `list[dict]`: one row per candidate, as [`StructureSearch`]`.candidates` describes them (`config`, `loss`,
        `perplexity`, `num_parameters`, `skipped`, `training`, `same_as`); a candidate `prune_` refuses or that misses
        its budget by more than one step of its coarsest axis is `skipped` with the reason, never raised.
    """
    rows, shapes = [], {}
    for config in candidates:
        row = {"config": config.to_dict(), "loss": None, "perplexity": None, "num_parameters": None, "skipped": None,
               "training": None, "same_as": None}
        rows.append(row)
        student = copy.deepcopy(model)
        try:  # a shallow copy of the importance: prune_ binds it to the candidate, the caller's stays as it was
            report = prune_(student, copy.copy(importance), config, progress=False)
        except ValueError as e:  # a budget or size this structure cannot take: recorded, the others still run
            row["skipped"] = (str(e).strip().splitlines() or [type(e).__name__])[0]
        else:
            row["num_parameters"] = report.structured["num_parameters"]["after"]
            row["skipped"] = _missed_budget(report.structured)
        shape = None if row["skipped"] else _pruned_shape(report.structured)
        if row["skipped"]:
            logger.info("%s: %s skipped: %s", name, candidate_name(row["config"]), row["skipped"])
        elif shape in shapes:  # the very same pruned model: scored once, under the first candidate that gave it
            first = rows[shapes[shape]]
            row.update(same_as=shapes[shape], loss=first["loss"], perplexity=first["perplexity"])
            logger.warning("%s: %s prunes the same model as %s (the same sizes and units removed): scored once", name,
                           candidate_name(row["config"]), candidate_name(first["config"]))
        else:
            shapes[shape] = len(rows) - 1
            if recovery_steps:
                row["training"] = _recover_keeping(student, model, recovery_steps, train_dataset, training_args,
                                                   distill, callbacks)
            scored = evaluate_loss(student, windows, batch_size=batch_size, max_batches=max_batches)
            row["loss"], row["perplexity"] = scored["loss"], scored["perplexity"]
            logger.info("%s: %s: %d parameters, loss %.4f", name, candidate_name(row["config"]),
                        row["num_parameters"], row["loss"])
        del student
        gc.collect()
    return rows


def search_structures(
    model: nn.Module,
    importance: Importance,
    candidates: Sequence[PruneConfig],
    windows,
    *,
    recovery_steps: int = 0,
    train_dataset=None,
    training_args: dict[str, Any] | None = None,
    distill: DistillConfig | None = None,
    callbacks: list | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    return_model: bool = True,
) -> StructureSearch:
    """
    Prune a copy of `model` with each candidate config, score each by its mean loss on `windows`, keep the lowest.

    Minitron (Muralidharan et al. 2024, arXiv 2407.14679) searches a few candidate shapes of one parameter budget
    (depth against width, which width axes) and ranks them after a "lightweight retraining", because the loss right
    after pruning can rank them differently from the loss once they have recovered; `recovery_steps` is that
    retraining (Minitron: a few hundred steps), 0 ranks them one-shot. Candidates are tried one at a time:
    `copy.deepcopy(model)`, `prune_`, `recovery_steps` of the `Trainer` when asked, `evaluate_loss` on `windows`,
    then the copy is freed. Peak memory is the input model plus one pruned copy (plus, while recovering, the
    Trainer's gradients and optimizer state of that copy, and the teacher: the input model itself unless
    `distill.teacher` names another).

    The winner is returned pruned one-shot, not recovered: with `return_model=True` a fresh copy is pruned with
    `best` (one more `prune_`, cheap next to any recovery, and exactly what `prune_(model, importance, best)` gives),
    so memory never holds two candidates and the real recovery (Minitron's full distillation) starts from the
    pruned model as after any prune. The short recoveries only rank the candidates; their weights are discarded.

    Args:
        model (`PreTrainedModel`): the dense model `importance` describes. Not modified: each candidate prunes a
            copy (while it serves as the teacher it is put in eval mode with `requires_grad=False`; both are
            restored after each candidate).
        importance ([`Importance`]): its statistics (unit statistics for hidden / layers); its binding is kept.
        candidates (`list[PruneConfig]`): structured configs of the same `target_params` (see
            [`candidate_configs`]).
        windows (`datasets.Dataset`): token windows (`input_ids`, optional `labels`) as `data.make_windows` gives,
            taken from the **training** data (a part the recovery does not train on, ideally), never from the
            evaluation set: the search fits a choice to them, so a loss reported on them afterwards is biased.
        recovery_steps (`int`, *optional*, defaults to 0): optimizer steps of recovery per candidate before scoring.
        train_dataset (`Dataset`, *optional*): what the recovery trains on; required when `recovery_steps > 0`.
        training_args (`dict`, *optional*): keyword arguments of `TrainingArguments` for the recovery (learning
            rate, batch size, ...); `max_steps` and `save_strategy` are set by the search (no checkpoints), and
            `output_dir` defaults to a temporary folder. Every candidate recovers with the same seed and data order.
        distill ([`DistillConfig`], *optional*): distil the recovery from a teacher; `teacher=None` means the
            input (dense) model. The shapes differ, so leave `hidden_weight=0` unless a candidate keeps the
            layers and hidden size.
        callbacks (`list[TrainerCallback]`, *optional*): added to every recovery `Trainer` (logging, counting).
        batch_size (`int`, *optional*, defaults to 8), max_batches (`int`, *optional*): as in `evaluate_loss`.
        return_model (`bool`, *optional*, defaults to `True`): prune a copy with the winner (`result.model`,
            `result.report`); `False` returns the table and `best` only.

    Returns:
        [`StructureSearch`]: every candidate's loss, parameters and config, `best`, and the winner's pruned model.

    Raises:
        ValueError: one line, before any copy: candidates that are not structured configs of one budget, recovery
            settings without `recovery_steps` (or the reverse), windows `evaluate_loss` refuses; after the
            search, when no candidate could be pruned (each one's reason, in the same line).
    """
    check_arg_type("search_structures", "model", model, nn.Module, "the dense model (torch.nn.Module)")
    check_arg_type("search_structures", "importance", importance, Importance, "an Importance")
    candidates = _check(candidates, recovery_steps, train_dataset, training_args, distill)
    dense = evaluate_loss(model, windows, batch_size=batch_size, max_batches=max_batches)
    with warnings_once():  # pruning the winner again below says nothing its scoring did not
        rows = score_candidates(model, importance, candidates, windows, recovery_steps=recovery_steps,
                                train_dataset=train_dataset, training_args=training_args, distill=distill,
                                callbacks=callbacks, batch_size=batch_size, max_batches=max_batches)
        scored_rows = [i for i, r in enumerate(rows) if r["loss"] is not None and r["same_as"] is None]
        if not scored_rows:
            reasons = "; ".join(f"{candidate_name(r['config'])}: {r['skipped']}" for r in rows)
            raise ValueError(f"search_structures: no candidate could be pruned ({reasons})")
        # nan (a diverged recovery) never wins: it sorts after every finite loss
        best = min(scored_rows, key=lambda i: (math.isnan(rows[i]["loss"]), rows[i]["loss"]))
        n_windows = len(windows) if max_batches is None else min(len(windows), max_batches * batch_size)
        result = StructureSearch(rows, candidates[best], best, dense["loss"], n_windows, dense["tokens"],
                                 recovery_steps, _teacher_named(distill, model), input_sparsity=measure_input(model))
        if return_model:
            result.model = copy.deepcopy(model)
            result.report = prune_(result.model, copy.copy(importance), result.best, progress=False)
            result.report.search = result.to_dict()
        return result


def _pruned_shape(structured: dict) -> str:
    """What identifies a candidate's pruned model: the config sizes after, the units removed on every axis that lost
    some (an axis of the combination left whole is no difference), and the compensation."""
    removed = {a: v.get("removed") for a, v in (structured.get("axes") or {}).items()
               if v.get("before") != v.get("after")}
    return json.dumps([(structured.get("config") or {}).get("after"), removed, structured.get("compensation")],
                      sort_keys=True, default=str)


def _missed_budget(structured: dict) -> str | None:
    """Why a pruned candidate cannot be compared with the others, or `None`: ranked by loss alone, a candidate that
    kept more parameters than the budget would win by its size, so one off the target by more than one step of its
    coarsest axis (the rule `prune/budget.py` meets) is skipped."""
    target, tolerance = structured.get("target_params"), structured.get("target_tolerance")
    kept = structured["num_parameters"]["after"]
    if target is None or tolerance is None or abs(kept - target) <= tolerance:
        return None
    return (f"kept {kept:,} parameters for target_params {target:,}, more than one step of its coarsest axis "
            f"({tolerance:,}) off: not comparable at equal size")


def _teacher_named(distill: DistillConfig | None, model: nn.Module) -> dict[str, Any] | None:
    """The recovery's `DistillConfig.to_dict()`, its default teacher named: the input model, not a copy of the student."""
    if distill is None:
        return None
    out = dataclasses.replace(distill, teacher=model if distill.teacher is None else distill.teacher).to_dict()
    if isinstance(out["teacher"], str) and os.path.isdir(out["teacher"]):  # no local path of this machine in files
        out["teacher"] = os.path.basename(os.path.normpath(out["teacher"]))
    return out


def _recover_keeping(student, model, steps, train_dataset, training_args, distill, callbacks) -> dict[str, int]:
    """[`_recover`], then the input model's mode, `requires_grad` flags and device as they were (it may have
    served as the teacher, which the distiller freezes and moves to the student's device)."""
    mode, grads = model.training, [p.requires_grad for p in model.parameters()]
    device = next(model.parameters()).device
    try:
        return _recover(student, model, steps, train_dataset, training_args, distill, callbacks)
    finally:
        model.train(mode)
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        if next(model.parameters()).device != device:
            model.to(device)


def search_for_cli(args, model: nn.Module, tokenizer, importance: Importance, candidates: list[PruneConfig] | None,
                   config: PruneConfig) -> tuple[PruneConfig, dict[str, Any] | None]:
    """`prune --search_structures`: the search on `--calibration` windows, its table printed; the loaded model is
    left dense for `cmd_prune` to prune in place with the winner (no second copy).

    Returns:
        `tuple`: `(the config to prune with, the sparsity.json search section)`; `(config, None)` without candidates.
    """
    from .data import load_texts, make_windows

    if not candidates:
        return config, None
    if tokenizer is None:
        raise ValueError(f"--search_structures needs a tokenizer in {args.model_dir} to cut --calibration into windows")
    windows = make_windows(tokenizer, load_texts(args.calibration), seq_len=args.seq_len,
                           max_windows=args.search_windows)
    result = search_structures(model, importance, candidates, windows, batch_size=args.batch_size,
                               return_model=False)
    print(f"Structure search, mean loss on {result.windows} --calibration windows ({result.tokens:,} tokens; "
          f"{reference_name(result.input_sparsity).lower()} {result.dense_loss:.4f}):\n{result.table()}")
    return result.best, result.to_dict()

