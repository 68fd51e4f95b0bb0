"""The rows of `recovery.py`: their names, how each trains, and the training and saving helpers it shares with
`structured.py` (`_train`, `_load`, `_save`).

`run_row` runs one cell (a row at one sparsity and seed) from the pretrained model, caching its JSON under
`benchmarks/_cache/recovery/cells/`; `recovery.py` picks the cells, runs them and writes the report. The rows are
described in `recovery.py`'s docstring.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402  (the shared model, texts, windows and llm-compressor venv)

WORK = Q.CACHE / "recovery"
ROWS = {
    "dense": "dense fine-tune (no pruning)",
    "o": "(o) llm-compressor SparseGPT one-shot, no fine-tune",
    "a": "(a) llm-compressor SparseGPT one-shot, then fine-tune with the mask held (CE)",
    "b": "(b) llm-compressor SparseGPT one-shot, then mask held + distillation",
    "c": "(c) ours: gradual pruning (wanda) during the fine-tune (CE)",
    "d": "(d) ours: gradual pruning (wanda) + distillation",
    "e": "(e) ours: sparsegpt statistics (first 25% of steps), OBS one-shot, then mask held + distillation",
    "f": "(f) ours: gradual pruning (sparsegpt, OBS update at every mask update) + distillation",
    "g": "(g) as (e), plus SquareHead hidden-state distillation (hidden_weight 1.0)",
    "h0": "(h0) ours, one run: sparsegpt statistics, OBS one-shot at 25% of the steps, mask held + distillation",
    "h": "(h) (h0) + pruned stream: statistics restarted after the prune, re-fit of the kept weights at 60%",
    "i": "(i) (h) + dense-to-pruned cross term (cross_alpha 0.25) under distillation",
    "j": "(j) gradual sparsegpt with OBS, layers front to back (order=depth) + distillation",
    "k": "(k) (e) + re-fit at 60% of the held kept weights from the pruned-stream Hessians, towards their trained "
         "values with the one-shot prune's edits undone",
    "k0": "(k0) (k) as the package did it before 2026-12-07: the re-fit towards the dense teacher's weights "
          "(cached cells only)",
    "l": "(l) (k) + dense-to-pruned cross term (cross_alpha 0.25) under distillation",
    "m": "(m) (e) with OWL's per-layer sparsities (allocation='owl', lambda 0.08, M 5; unstructured points only)",
    "n": "(n) (m) + re-fit at 60% of the held kept weights with the dense-to-pruned cross term (cross_alpha 0.5, "
         "the package default before 2026-12-07; unstructured points only)",
    "p": "(p) (m) + the cross-term re-fit early in the held phase, after its first 16% of the steps (cross_alpha "
         "0.25), as cross_term_check.py measured it one-shot (unstructured points only)",
    "q": "(q) (m) with the prune after 16% of the steps instead of 25%: the statistics on as many tokens as "
         "llm-compressor's calibration (16,384), 84 held steps of recovery (unstructured points only)",
}
SHORT = {"dense": "dense", "a": "(a) llm-compressor SparseGPT + masked fine-tune",
         "b": "(b) llm-compressor SparseGPT + masked fine-tune + distillation", "c": "(c) gradual wanda",
         "d": "(d) gradual wanda + distillation", "e": "(e) sparsegpt statistics, OBS one-shot, hold + distillation",
         "f": "(f) gradual sparsegpt with OBS + distillation", "g": "(g) as (e) + SquareHead hidden states",
         "o": "(o) llm-compressor SparseGPT one-shot", "h0": "(h0) one-run OBS one-shot, hold + distillation",
         "h": "(h) (h0) + pruned stream + re-fit", "i": "(i) (h) + cross term", "j": "(j) gradual OBS by depth",
         "k": "(k) (e) + hold re-fit", "k0": "(k0) (e) + hold re-fit towards the teacher (old)",
         "l": "(l) (k) + cross term", "m": "(m) (e) + OWL allocation",
         "n": "(n) (m) + re-fit + cross term", "p": "(p) (m) + early cross-term re-fit",
         "q": "(q) (m), prune at 16% of the steps"}
SEEDLESS = {"o"}  # rows with nothing seeded: one cell per point
OWL_ROWS = {"m", "n", "p", "q"}  # OWL sets one sparsity per decoder layer: no cell at an N:M point, which has none to set
CACHE_ONLY = {"k0"}  # rows the package no longer runs: reported from their cached cells, never computed
DEFAULT_ROWS = ("dense", "a", "b", "c", "d", "e", "f", "g")  # the published commands' rows; issue 27's are named
LAYERS = 30  # SmolLM2-135M's decoder layers: (j) prunes them one step apart
ALPHA, TEMPERATURE, HIDDEN_WEIGHT = 0.5, 2.0, 1.0
REFIT_AT = 0.6  # (h), (i), (k), (l), (n): the re-fit at 60% of the steps
# (i) and (l): the package's default share since 2026-12-07 (QEP / GPTAQ's 0.25-0.5); 0.5, the share (n) measured,
# made the model worse at 50% and 70% (benchmarks section 11), so neither row spends a cell on it
CROSS_ALPHA, N_ALPHA = 0.25, 0.5
# (p): the re-fit after 16 held steps of 100 (16,384 tokens, cross_term_check.py's 64 windows), QEP's lower alpha
EARLY_REFIT, EARLY_ALPHA = 0.16, 0.25
# (q): the one-shot prune after 16% of the steps: 16 x 4 x 256 = 16,384 statistics tokens at --steps 100, the count of
# llm-compressor's 64 x 256 calibration windows, leaving 84 steps to recover instead of 75
EARLY_PRUNE = 0.16


def _log(msg: str) -> None:
    print(f"[recovery {time.strftime('%H:%M:%S', time.gmtime())}] {msg}", flush=True)


def _training_args(output: Path, steps: int, args, seed: int):
    from transformers import TrainingArguments

    return TrainingArguments(str(output), max_steps=steps, per_device_train_batch_size=args.batch_size,
                             learning_rate=args.lr, warmup_steps=max(1, steps // 10), logging_steps=10,
                             save_strategy="no", report_to=[], use_cpu=True, seed=seed, disable_tqdm=True)


def _train(model, train, steps: int, callbacks, args, tag: str, seed: int) -> dict:
    from transformers import Trainer

    out = WORK / "trainer" / tag
    trainer = Trainer(model=model, args=_training_args(out, steps, args, seed), train_dataset=train,
                      callbacks=callbacks)
    t = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return {"train_seconds": seconds, "train_loss": result.training_loss, "steps": steps}


def _load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _save(model, path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)
    model.save_pretrained(path)
    return path


def llmc_pruned_dir(point: str, calibration: Path, args) -> tuple[Path, dict]:
    """The pretrained model pruned by llm-compressor's SparseGPT at `point`, as a plain checkpoint folder."""
    from safetensors.torch import load_file

    out = WORK / "llmc" / f"sparsegpt-{Q._slug(point)}"
    folder = out / "model"
    if not (out / "run.json").is_file():
        python = Q.ensure_llmc_venv()
        sparsity, nm = Q._parse_point(point)
        cmd = [str(python), str(Q.ROOT / "benchmarks" / "_llmcompressor_run.py"), "--model", str(Q.base_model_dir()),
               "--calibration", str(calibration), "--method", "sparsegpt",
               "--sparsity", str(sparsity if nm is None else 0.5), "--mask-structure", nm or "0:0",
               "--threads", str(args.threads), "--output", str(out)]
        _log(f"llm-compressor SparseGPT {point} on the pretrained model")
        env = {k: v for k, v in Q.os.environ.items() if k != "PYTHONPATH"}
        Q.subprocess.run(cmd, check=True, env=env)
    if not (folder / "config.json").is_file():
        model = _load(Q.base_model_dir())
        _, unexpected = model.load_state_dict(load_file(out / "pruned.safetensors"), strict=False)
        if unexpected:
            raise RuntimeError(f"llm-compressor output has weights the model lacks: {unexpected[:3]}")
        _save(model, folder)
    return folder, json.loads((out / "run.json").read_text())


def _schedule(point: str, **kw):
    from hf_weightprune import PruneSchedule

    sparsity, nm = Q._parse_point(point)
    return PruneSchedule(final_sparsity=sparsity, structure=nm or "unstructured", **kw)


def cell_path(row: str, point: str, steps: int, seed: int = 0) -> Path:
    """One JSON per (row, sparsity, step count, seed): runs at another `--steps` never mix with these. Seed 0 keeps
    the name it had before `--seeds` existed, so the published cells are still found."""
    suffix = f"@s{seed}" if seed else ""
    return WORK / "cells" / f"{row}@{Q._slug(point)}@{steps}{suffix}.json"


def run_row(row: str, point: str, seed: int, train, valid, ood, calibration: Path, args) -> dict:
    path = cell_path(row, point, args.steps, seed)
    if path.is_file():
        return json.loads(path.read_text())
    if row in CACHE_ONLY:
        raise SystemExit(f"--rows {row}: {ROWS[row]}; no cached cell at {point}, seed {seed} ({path})")
    from hf_weightprune import (
        DistillConfig,
        ImportanceCallback,
        ImportanceConfig,
        PruneConfig,
        PruneSchedule,
        prune_,
        save_pruned,
    )

    base = Q.base_model_dir()
    distill = DistillConfig(alpha=ALPHA, temperature=TEMPERATURE)
    cell: dict = {"row": row, "point": point, "seed": seed, "calibration_tokens": 0,
                  "train_tokens": args.steps * args.batch_size * args.seq_len}
    # Seed 0 trains on the windows in their published order; another seed also reorders them, so that the rows
    # which split the windows into phases ((e), (g)) see other data in each phase, not only another batch order.
    if seed:
        train = train.shuffle(seed=seed)
    tag = f"{row}-{Q._slug(point)}" + (f"-s{seed}" if seed else "")
    sparsity, nm = Q._parse_point(point)
    _log(f"{row} @ {point}, seed {seed}: start")
    if row == "dense":
        model = _load(base)
        cell.update(_train(model, train, args.steps, [], args, tag, seed))
    elif row in ("a", "b", "o"):
        folder, info = llmc_pruned_dir(point, calibration, args)
        cell["calibration_tokens"] = info["calibration_tokens"]
        cell["prune_seconds"] = info["oneshot_seconds"]
        model = _load(folder)
        if row == "o":
            cell.update(train_seconds=0.0, train_loss=None, steps=0, train_tokens=0)
        else:
            d = DistillConfig(teacher=str(base), alpha=ALPHA, temperature=TEMPERATURE) if row == "b" else None
            cb = ImportanceCallback(schedule=PruneSchedule(mode="hold", masks_from=str(folder)), distill=d)
            cell.update(_train(model, train, args.steps, [cb], args, tag, seed))
    elif row in ("c", "d", "f", "j"):
        model = _load(base)
        schedule = _schedule(point, order="depth") if row == "j" else _schedule(point)
        cb = ImportanceCallback(ImportanceConfig(criterion="wanda" if row in ("c", "d") else "sparsegpt"),
                                schedule=schedule, distill=distill if row != "c" else None)
        cell.update(_train(model, train, args.steps, [cb], args, tag, seed))
    elif row in ("e", "g", "k", "l", "m", "n", "p", "q"):
        first = max(1, int(EARLY_PRUNE * args.steps)) if row == "q" else args.steps // 4
        model = _load(base)
        stats = ImportanceCallback(ImportanceConfig(criterion="sparsegpt"))
        phase1 = _train(model, train.select(range(first * args.batch_size)), first, [stats], args,
                        f"{row}1{tag[len(row):]}", seed)
        teacher = _save(model, WORK / row / f"dense{tag[len(row):]}")
        owl = {"allocation": "owl", "owl_m": Q.OWL_M, "owl_lambda": Q.OWL_LAMBDA} if row in OWL_ROWS else {}
        config = PruneConfig(structure=nm) if nm else PruneConfig(sparsity=sparsity, scope="row", **owl)
        t = time.perf_counter()
        report = prune_(model, stats.importance(), config, progress=False)
        cell["prune_seconds"] = time.perf_counter() - t
        pruned = WORK / row / f"pruned{tag[len(row):]}"
        save_pruned(model, str(pruned), report=report, overwrite=True, write_card=False)
        rest = train.select(range(first * args.batch_size, args.steps * args.batch_size))
        # (k), (l), (n): the re-fit at (h)'s overall step, counted in the held phase's own steps.
        refit = {"refit_at": int(REFIT_AT * args.steps) - first} if row in ("k", "l", "n") else {}
        if row in ("l", "n"):
            refit.update(cross_term=True, cross_alpha=CROSS_ALPHA if row == "l" else N_ALPHA)
        if row == "p":  # early: at the held phase's step 16 of 75 (--steps 100)
            refit = {"refit_at": max(1, int(EARLY_REFIT * args.steps)), "cross_term": True, "cross_alpha": EARLY_ALPHA}
        cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt") if refit else None,
                                schedule=PruneSchedule(mode="hold", masks_from=str(pruned), **refit),
                                distill=DistillConfig(teacher=str(teacher), alpha=ALPHA, temperature=TEMPERATURE,
                                                      hidden_weight=HIDDEN_WEIGHT if row == "g" else 0.0))
        phase2 = _train(model, rest, args.steps - first, [cb], args, f"{row}2{tag[len(row):]}", seed)
        if refit:  # a row whose re-fit did not run measures nothing
            if cb.mask_holder.refitted_at != refit["refit_at"]:
                raise RuntimeError(f"({row}): the re-fit planned at held step {refit['refit_at']} ran at "
                                   f"{cb.mask_holder.refitted_at}")
            cell.update(prune_step=first, refit_step=first + refit["refit_at"])
            if refit.get("cross_term"):  # the share, which the row's default has changed once
                cell["cross_alpha"] = refit["cross_alpha"]
        cell.update(train_seconds=phase1["train_seconds"] + phase2["train_seconds"], steps=args.steps,
                    train_loss=phase2["train_loss"], phase_steps=[first, args.steps - first])
    elif row in ("h0", "h", "i"):
        # One update, at the end of step `first` (the same step as (e)'s prune): every_n_steps past the run leaves
        # `end` as the schedule's only update step. A float `end` (an int 1 would read as "prune at step 1").
        first = args.steps // 4
        levers = {} if row == "h0" else {"pruned_stream": True, "refit_at": REFIT_AT}
        if row == "i":
            levers.update(cross_term=True, cross_alpha=CROSS_ALPHA)
        schedule = _schedule(point, start=0.0, end=first / args.steps, every_n_steps=args.steps,
                             scope=None if nm else "row", **levers)
        model = _load(base)
        cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt"), schedule=schedule, distill=distill)
        cell.update(_train(model, train, args.steps, [cb], args, tag, seed))
        # The step the re-fit ran at, as the callback recorded it (a row whose re-fit was skipped measures nothing).
        cell.update(prune_step=first, refit_step=cb.mask_holder.refitted_at)
        if schedule.cross_term:
            cell["cross_alpha"] = schedule.cross_alpha
        if row != "h0" and cell["refit_step"] != schedule.refit_step(args.steps):
            raise RuntimeError(f"({row}): the re-fit planned at step {schedule.refit_step(args.steps)} ran at "
                               f"{cell['refit_step']}")
    else:
        raise ValueError(row)
    cell.update(Q.evaluate_cell(model, valid, ood, args))
    path.parent.mkdir(parents=True, exist_ok=True)
    Q._write_json(path, cell)
    _log(f"{row} @ {point}, seed {seed}: ppl ood {cell['ppl_ood']:.2f}, valid {cell['ppl_valid']:.2f}, sparsity "
         f"{cell['sparsity']:.4f}, train {cell['train_seconds']:.0f} s")
    return cell
