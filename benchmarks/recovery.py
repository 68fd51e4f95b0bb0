"""Fine-tuning with pruning that recovers, at equal training tokens: our recipes vs llm-compressor + masked fine-tune.

The real SmolLM2-135M-Instruct and the same texts, windows and held-out sets as `quality.py` (Python docs, Linux
kernel docs and KJV books for training; The Debian Administrator's Handbook out of domain and the training sources'
held-out documents in domain). Every row starts from the pretrained model and trains `--steps` steps of
`--batch-size` x `--seq-len` tokens (the same windows, the same order, the same learning-rate schedule):

- dense: plain fine-tune, no pruning (the reference for "within 1.15x of dense");
- (a) llm-compressor `SparseGPTModifier` one-shot on the pretrained model (64 x 256 calibration tokens from the
  training documents, its own venv), then fine-tune with the mask held (`PruneSchedule(mode="hold")`), plain CE;
- (b) the same with distillation from the dense pretrained model (`DistillConfig(teacher=<pretrained>)`);
- (c) ours: gradual pruning during the fine-tune (`wanda` importance, cubic ramp, default `PruneSchedule` steps), CE;
- (d) (c) with distillation from the dense model as training begins (`DistillConfig()`, the documented recipe);
- (f) (d) with the `sparsegpt` statistic: every mask update of the schedule is SparseGPT's OBS sweep with the
  Hessians accumulated so far (the kept weights are reconstructed), with distillation;
- (e) ours: the first quarter of the steps dense with the `sparsegpt` statistic (no calibration pass), one-shot OBS
  pruning from it (`prune_`), then the remaining steps with the mask held and distillation from the dense weights of
  that first quarter;
- (g) (e) with SquareHead's hidden-state loss added (`hidden_weight` 1.0).

Issue 27's rows (statistics of the pruned model itself, gathered while it trains), and their references:
- (o) (a)'s llm-compressor SparseGPT one-shot checkpoint of the pretrained model, evaluated with no fine-tune (0
  training tokens: the one-shot reference; one cell per point whatever `--seeds`, as nothing in it is seeded);
- (h0) (e) as one Trainer run: the `sparsegpt` statistic from step 0, one OBS mask update at 25% of the steps from the
  Hessians so far (`PruneSchedule` with a single update, row scope as (e)), the mask held after it, distillation from
  the dense pretrained model throughout (`DistillConfig()`). It differs from (e) in the teacher (the pretrained model,
  not the weights after the first quarter), in distilling during the dense quarter, and in one optimizer and
  learning-rate schedule instead of two; it is the baseline that isolates (h)'s levers;
- (h) (h0) with the pruned stream: the statistic restarts after the one-shot prune, so it holds only the pruned
  model's inputs (`pruned_stream=True`), and at 60% of the steps the kept weights are re-fitted by least squares on
  their fixed support from that pruned-stream Hessian (`refit_at=0.6`), towards the weights with the pruning edits
  undone;
- (i) (h) with the dense-to-pruned cross term under distillation (`cross_term=True`, `cross_alpha=0.25`): the re-fit
  solves `||W X - W^ X~||^2` from the teacher's inputs X and the student's X~ of the same batches (GPTAQ / QEP);
- (k) (e) with a re-fit in its held phase: (e)'s second phase also gathers the `sparsegpt` statistic (in a hold run
  every forward is the pruned model's, so it is the pruned-stream Hessian from the prune on) and, at the same overall
  step as (h)'s (60% of the steps), re-fits the kept weights on their support towards their trained values with the
  one-shot prune's OBS edits undone (`PruneSchedule(mode="hold", refit_at=...)`; (k0), cached cells only, was the
  re-fit towards the teacher's weights, as the package did it before 2026-12-07);
- (l) (k) with the dense-to-pruned cross term (`cross_term=True`, `cross_alpha=0.25`), as (i) is to (h);
- (m) (e) with OWL's per-decoder-layer sparsities (`allocation="owl"`, lambda 0.08, M 5, as section 6's one-shot
  rows; percentages only, no cell at an N:M point);
- (n) (m) with the re-fit at 60% and the dense-to-pruned cross term at `cross_alpha=0.5` (the package default
  before 2026-12-07), on OWL's mask (percentages only);
- (p) (m) with the cross-term re-fit early, after the held phase's first 16% of the steps (`cross_alpha` 0.25): where
  `cross_term_check.py` found it lowers the freshly pruned model's perplexity (percentages only);
- (q) (m) with the one-shot prune after 16% of the steps instead of 25%: statistics on as many tokens as
  llm-compressor's calibration (16,384 at the defaults) and 84 held steps of recovery instead of 75 (percentages only);
- (j) (f) with `order="depth"`: the decoder layers pruned front to back, each once to the target, at steps spread
  evenly over the first 75% (SmolLM2's 30 layers need `--steps` >= 40), each from the `sparsegpt` statistic gathered
  after the layers before it were pruned (the training-time counterpart of the sequential calibration pipeline);
  + distillation.

Distillation: `alpha` 0.5, temperature 2.0 (the README's recipe). Each row is evaluated on both held-out sets; its
training time (the Trainer's `train()`), the teacher's extra cost per step ((d) - (c)) and the achieved sparsity of
the decoder Linears are recorded. One JSON per cell under `benchmarks/_cache/recovery/`, so an interrupted run goes
on where it stopped; writes benchmarks/results/recovery.md and recovery.json.

`--seeds N` runs every cell for seeds 0..N-1: the seed is the Trainer's (`TrainingArguments(seed=...)`, which draws
the batch order) and, for seeds > 0, a shuffle of the training windows before the rows split them ((e) and (g) train
their two phases on the first quarter and the rest). The llm-compressor rows (a) and (b) take the same seeds for
their masked fine-tune; their one-shot prune is deterministic and shared (same calibration windows). Seed 0 is the
run of the published tables (its cells keep their cache names); the report gives each cell's mean and range over
the seeds and lists the per-seed figures.

    python benchmarks/recovery.py                       # 100 steps, 50% and 2:4 (many hours on 2 CPU cores)
    python benchmarks/recovery.py --points 50% --steps 30 --deadline 16:40
    python benchmarks/recovery.py --rows dense,a,b,h,i --points 50%,2:4,70% --seeds 3 --report-name recovery_27
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402  (the shared model, texts, windows and llm-compressor venv)
from _recovery_rows import (  # noqa: E402  (the rows; _train, _load and _save are structured.py's too: R._train)
    ALPHA,
    DEFAULT_ROWS,
    LAYERS,
    OWL_ROWS,
    ROWS,
    SEEDLESS,
    SHORT,
    TEMPERATURE,
    WORK,
    _load,  # noqa: F401
    _log,
    _save,  # noqa: F401
    _schedule,
    _train,  # noqa: F401
    cell_path,
    run_row,
)

# ----------------------------------------------------------------------------------------------- report


def _mean(cells: list[dict], key: str) -> float:
    return sum(c[key] for c in cells) / len(cells)


def _spread(cells: list[dict], key: str) -> str:
    """The value of one seed, or the mean over the seeds with its range: `43.46 [43.10-43.90]`."""
    vals = [c[key] for c in cells]
    text = f"{sum(vals) / len(vals):.2f}"
    return text if len(vals) == 1 else f"{text} [{min(vals):.2f}-{max(vals):.2f}]"


def _per_step(cells: list[dict]) -> str:
    trained = [c for c in cells if c["steps"]]
    return f"{sum(c['train_seconds'] / c['steps'] for c in trained) / len(trained):.1f}" if trained else "-"


def write_report(cells: list[dict], wanted: list[tuple[str, str, int]], args, out: Path) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in sorted(cells, key=lambda c: c.get("seed", 0)):  # cells written before --seeds are seed 0's
        groups.setdefault((c["row"], c["point"]), []).append(c)
    by = {k: cs[0] for k, cs in groups.items() if cs[0].get("seed", 0) == 0}  # seed 0: costs, knees
    points = list(dict.fromkeys(p for r, p, _ in wanted if r != "dense"))
    dense = groups.get(("dense", "-"))
    lines = [f"Every row: {args.steps} steps x {args.batch_size} x {args.seq_len} = "
             f"{args.steps * args.batch_size * args.seq_len:,} training tokens from the pretrained SmolLM2-135M-Instruct; "
             f"lr {args.lr}; distillation alpha {ALPHA}, temperature {TEMPERATURE}. Cells: perplexity out of domain "
             "(Debian handbook) / in domain (held-out documents of the training sources); a cell run with several "
             "seeds gives the mean over them [min-max] and the seed count.", ""]
    if dense:
        lines.append(f"Dense fine-tune: {_spread(dense, 'ppl_ood')} / {_spread(dense, 'ppl_valid')} "
                     f"({_per_step(dense)} s/step" + (f", {len(dense)} seeds)." if len(dense) > 1 else ")."))
        lines.append("")
    lines.append("| row | " + " | ".join(points) + " | calibration tokens | train s/step |")
    lines.append("|---|" + "---:|" * len(points) + "---:|---:|")
    for row, label in ROWS.items():
        if row == "dense":
            continue
        got = [groups.get((row, p)) for p in points]
        if not any(got):
            continue
        cellstr = []
        for point, cs in zip(points, got):
            if cs is None:  # OWL_ROWS: no cell at an N:M point (OWL sets per-layer sparsities)
                cellstr.append("n/a" if row in OWL_ROWS and ":" in point else "not run")
            else:
                ratio = f" ({_mean(cs, 'ppl_ood') / _mean(dense, 'ppl_ood'):.2f}x)" if dense else ""
                seeds = f", {len(cs)} seeds" if len(cs) > 1 else ""
                cellstr.append(f"{_spread(cs, 'ppl_ood')} / {_spread(cs, 'ppl_valid')}{ratio}{seeds}")
        first = next(cs[0] for cs in got if cs)
        lines.append(f"| {label} | " + " | ".join(cellstr) + f" | {first['calibration_tokens']:,} | "
                     + " / ".join(_per_step(cs) for cs in got if cs) + " |")
    for p in points:
        # the same row without and with the teacher, its hidden-state term or its cross term (seed 0)
        for plain, taught, what in (("a", "b", "Teacher's"), ("c", "d", "Teacher's"), ("e", "g", "SquareHead's"),
                                    ("h", "i", "The cross term's")):
            x, y = by.get((plain, p)), by.get((taught, p))
            if x and y:
                lines.append("")
                lines.append(f"{what} extra cost at {p}, ({taught}) - ({plain}): "
                             f"{(y['train_seconds'] - x['train_seconds']) / x['steps']:.2f} s/step "
                             f"({y['train_seconds'] / x['train_seconds']:.2f}x the step of ({plain})); times are wall "
                             "times of whole rows, so other jobs on the machine inflate them.")
    several = [(k, cs) for k, cs in groups.items() if len(cs) > 1]
    if several:
        lines += ["", "Per seed, perplexity out of domain / in domain:"]
        lines += [f"- {r}@{p}: " + ", ".join(f"seed {c.get('seed', 0)} {c['ppl_ood']:.2f} / {c['ppl_valid']:.2f}"
                                            for c in cs) for (r, p), cs in several]
    lines.append("")
    lines.append("Achieved sparsity of the decoder Linears (seed 0): " + ", ".join(
        f"{c['row']}@{c['point']} {c['sparsity']:.4f}" for c in by.values() if c["row"] != "dense") + ".")
    dense0 = by.get(("dense", "-"))
    knees = knee_lines(by, dense0)
    if knees:
        lines += ["", *knees]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    from hf_weightprune.io_utils import atomic_write_text

    atomic_write_text(out / f"{args.report_name}.md", text)
    Q._write_json(out / f"{args.report_name}.json", {"args": vars(args), "cells": cells})
    if knees:
        plot_knee(by, dense0, args, out / f"{args.report_name}.png")
    return text


KNEE = 1.05  # the seed paper's knee: the sparsity at which perplexity rises more than 5% over the dense model


def _sweeps(by: dict, dense: dict | None) -> dict[str, list[dict]]:
    """Rows with at least three unstructured sparsities (and the dense cell): their cells by sparsity."""
    if dense is None:
        return {}
    out = {}
    for row in ROWS:
        got = sorted((c for (r, p), c in by.items() if r == row and Q._parse_point(p)[1] is None),
                     key=lambda c: c["sparsity"])
        if len(got) >= 3:
            out[row] = got
    return out


def knee_lines(by: dict, dense: dict | None) -> list[str]:
    """Per swept row: perplexity / dense at each sparsity and the first sparsity past `KNEE`, per evaluation set."""
    lines = []
    for row, got in _sweeps(by, dense).items():
        lines.append(f"Knee of {ROWS[row]} (perplexity over the dense fine-tune; the knee is the first swept sparsity "
                     f"more than {100 * (KNEE - 1):.0f}% above it):")
        for key, label in (("ppl_ood", "out of domain"), ("ppl_valid", "in domain")):
            ratios = [(c["point"], c[key] / dense[key]) for c in got]
            first_past = next((i for i, (_, r) in enumerate(ratios) if r > KNEE), None)
            past = None if first_past is None else ratios[first_past][0]
            held = [p for p, _ in ratios[:first_past]]
            if past is None:
                verdict = f"no knee up to {ratios[-1][0]}"
            elif held:
                verdict = f"knee at {past} (within 5% up to {held[-1]})"
            else:
                verdict = f"more than 5% above dense already at {past}, the lowest swept sparsity: the knee is below it"
            lines.append(f"- {label}: " + ", ".join(f"{p} {r:.2f}x" for p, r in ratios) + f": {verdict}.")
    return lines


def plot_knee(by: dict, dense: dict, args, path: Path) -> None:
    """Perplexity against sparsity for each swept row, both evaluation sets, with the dense and the +5% lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    sets = (("ppl_ood", "Out of domain: Debian handbook"), ("ppl_valid", "In domain: held-out training sources"))
    for ax, (key, title) in zip(axes, sets):
        for row, got in _sweeps(by, dense).items():
            xs = [100 * c["sparsity"] for c in got]
            ax.plot(xs, [c[key] for c in got], marker="o", label=SHORT[row])
        ax.axhline(dense[key], color="black", linewidth=1, label=f"dense fine-tune ({dense[key]:.1f})")
        ax.axhline(KNEE * dense[key], color="black", linestyle="--", linewidth=1,
                   label=f"dense +{100 * (KNEE - 1):.0f}% (knee)")
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 30, 60, 100 rather than 3x10^1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("sparsity of the decoder Linear weights (%)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"SmolLM2-135M, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens per run", fontsize=11)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.png")  # unique: two runs never share a temp file
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--points", default="50%,2:4", help="comma-separated sparsities: 50%%, 60%%, 70%%, ..., 2:4")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help=f"comma-separated rows of {list(ROWS)} (default: those of issue 17, {', '.join(DEFAULT_ROWS)})")
    p.add_argument("--calibration-windows", type=int, default=64, help="llm-compressor's calibration windows")
    p.add_argument("--valid-windows", type=int, default=12)
    p.add_argument("--ood-windows", type=int, default=99)
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, default=1,
                   help="every cell for seeds 0..N-1 (Trainer seed and data order); seed 0's cells are the published "
                        "ones, computed once")
    p.add_argument("--first-seed", type=int, default=0,
                   help="run only seeds >= this one (the report still shows every cached seed below --seeds): two "
                        "processes can then run seeds 1 and 2 of a cell side by side")
    p.add_argument("--deadline", default=None, help="HH:MM (UTC): start no new cell after it")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--output", default=str(Q.ROOT / "benchmarks" / "results"))
    p.add_argument("--report-name", default="recovery",
                   help="stem of the report files in --output (a knee sweep: recovery_knee); with three or more "
                        "unstructured sparsities a row also gets its knee and a plot, <stem>.png")
    args = p.parse_args()
    try:
        deadline = Q.deadline_at(args.deadline)  # now: a deadline passed during the setup below must still stop it
    except ValueError as e:
        p.error(str(e))
    rows = args.rows.split(",")
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"--rows: unknown {unknown}; rows are {list(ROWS)}")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if not 0 <= args.first_seed < args.seeds:
        p.error(f"--first-seed must be in 0..{args.seeds - 1} (below --seeds {args.seeds})")
    if "j" in rows:
        try:  # refused here rather than when training begins, hours into a grid
            _schedule("50%", order="depth").layer_steps(args.steps, LAYERS)
        except ValueError as e:
            p.error(f"--rows j: {e}")
    points = args.points.split(",")
    for point in points:
        if not re.fullmatch(r"[1-9][0-9]?%|[1-9]:[1-9][0-9]?", point):
            p.error(f"--points: {point!r} is neither a percentage such as 70% nor an N:M pattern such as 2:4")
    # Seed by seed, so every cell has its seed-0 figure before any second seed starts.
    wanted = []
    for seed in range(args.seeds):
        wanted += [("dense", "-", seed)] if "dense" in rows else []
        wanted += [(r, pt, seed) for pt in points for r in rows if r != "dense" and not (seed and r in SEEDLESS)
                   and not (r in OWL_ROWS and ":" in pt)]
    out = Path(args.output)

    def cached():
        found = []
        for r, pt, seed in wanted:
            path = cell_path(r, pt, args.steps, seed)
            if path.is_file():
                found.append(json.loads(path.read_text()))
        return found

    if args.report_only:
        print(write_report(cached(), wanted, args, out))
        return
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    base = Q.base_model_dir()
    tok = AutoTokenizer.from_pretrained(base)
    Q.WORK.mkdir(parents=True, exist_ok=True)  # texts and windows are shared with quality.py
    train, calibration, valid, ood = Q._windows_cached(tok, args)
    calib_path = WORK / "calibration.json"
    if not calib_path.is_file():
        Q._write_json(calib_path, {"input_ids": calibration.to_dict()["input_ids"]})
    _log(f"windows: train {len(train)} x {args.seq_len}, valid {len(valid)}, ood {len(ood)}")
    for row, point, seed in wanted:
        if seed < args.first_seed:
            continue
        if deadline is not None and time.time() >= deadline:
            _log(f"deadline {args.deadline} UTC reached: {row} @ {point}, seed {seed} and later cells not run")
            break
        run_row(row, point, seed, train, valid, ood, calib_path, args)
        write_report(cached(), wanted, args, out)
    print(write_report(cached(), wanted, args, out))


if __name__ == "__main__":
    main()
