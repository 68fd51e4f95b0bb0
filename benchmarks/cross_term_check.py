"""The dense-to-pruned cross term (GPTAQ / QEP, issue 27 item 3) on SmolLM2-135M at 70% (and, with `--row k`, at 50%
or 2:4): does the asymmetric re-fit lower the error it targets, and what does it do to perplexity? No training: the
re-fit alone, on the state row (m) (or (k)) of `recovery.py` holds when its held phase begins.

Inputs: row (m)'s seed-0 teacher (the model after the 25 statistics steps) and its OWL one-shot prune at 70%
(`benchmarks/_cache/recovery/m/{dense,pruned}-70`; run `recovery.py --steps 100 --rows m --points 70%` first), or
with `--row`, `--point` and `--seed-suffix` another cached state (`k/{dense,pruned}-50-s1`: (k)'s seed 1 at 50%). Both
run on the same `--fit-windows` training windows of the held phase (seed 0's order, from window 100 on), hooks on
every decoder Linear gather the student's `H~ = sum x~ x~^T` and `C = sum (x - x~) x~^T` (`x`: the teacher's input of
that Linear, `x~` the student's), as `PruneSchedule(cross_term=True)` does during training. Then every masked weight
is re-fitted on its support with `refit_masked_` towards the teacher's weight `R` (what the hold re-fit targets right
after the prune: the weights with the prune's edits undone), at each `--alphas` value (0: the symmetric re-fit on
`H~`, the cross term unused; `cross_alpha` otherwise), and the student is evaluated.

Columns: perplexity on both held-out sets (section 6's), and, on the in-domain held-out windows' inputs (the teacher's
and the un-refitted student's), each Linear's relative output errors `||R X - W X~||^2 / ||R X||^2` (asymmetric: the
dense layer's output on dense inputs, what the cross term targets) and `||R X~ - W X~||^2 / ||R X~||^2` (symmetric),
averaged over the 210 Linears, with the first, middle and last ten layers apart.

    OMP_NUM_THREADS=1 python benchmarks/cross_term_check.py --alphas 0,0.25,0.5,1
    OMP_NUM_THREADS=1 python benchmarks/cross_term_check.py --row k --point 50% --seed-suffix=-s1 \
        --output benchmarks/results/cross_term_check_50.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402  (the shared model, texts and windows)

RECOVERY = Q.CACHE / "recovery"
SHARED = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # Linears that share one input


def _input_key(name: str) -> str:
    head, _, leaf = name.rpartition(".")
    return f"{head}.{SHARED.get(leaf, leaf)}"


def _linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


@torch.no_grad()
def gather(teacher, student, windows, *, dense_gram: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Per distinct input: `H~`, `C` (and the teacher's `G = sum x x^T` with `dense_gram`), float32 sums over the
    windows' tokens (every window is full: no padding)."""
    keys = sorted({_input_key(n) for n in _linears(student)})
    seen: dict[str, torch.Tensor] = {}
    sums: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []

    def keep_teacher(key):
        def hook(_module, args):
            seen[key] = args[0].reshape(-1, args[0].shape[-1]).float()
        return hook

    def fold_student(key):
        def hook(_module, args):
            xt = args[0].reshape(-1, args[0].shape[-1]).float()
            x = seen.pop(key)
            s = sums.setdefault(key, {})
            for k, v in (("H", xt.T @ xt), ("C", (x - xt).T @ xt)) + ((("G", x.T @ x),) if dense_gram else ()):
                s[k] = s[k].add_(v) if k in s else v
        return hook

    for model, make in ((teacher, keep_teacher), (student, fold_student)):
        mods = _linears(model)
        hooks += [mods[k].register_forward_pre_hook(make(k)) for k in keys]
    try:
        for i in range(0, len(windows), 4):
            ids = torch.tensor(windows[i:i + 4]["input_ids"])
            teacher(input_ids=ids)
            student(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return sums


def layer_errors(student, reference: dict[str, torch.Tensor], held: dict[str, dict[str, torch.Tensor]]):
    """Per Linear `(asymmetric, symmetric)` relative output errors on the held-out inputs (see the module docstring),
    from their second moments: `||R X - W X~||^2 = tr(R G R^T) - 2 tr(W (C + H~)^T R^T) + tr(W H~ W^T)`."""
    out = {}
    for name, mod in _linears(student).items():
        s, W, R = held[_input_key(name)], mod.weight.detach().double(), reference[name].double()
        H, C, G = s["H"].double(), s["C"].double(), s["G"].double()
        rgr, whw = (R @ G * R).sum(), (W @ H * W).sum()
        asym = (rgr - 2 * (W @ (C + H).T * R).sum() + whw) / rgr
        D = W - R
        sym = (D @ H * D).sum() / (R @ H * R).sum()
        out[name] = (float(asym), float(sym))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--alphas", default="0,0.25,0.5,1", help="cross_alpha values; 0 = the symmetric re-fit on H~")
    p.add_argument("--fit-windows", type=int, default=64, help="held-phase training windows the statistics see")
    p.add_argument("--row", default="m", choices=("m", "k"), help="the recovery.py row whose cached state to use: "
                   "(m) OWL at 70%%, or (k) uniform per-row (its cache holds seeds 1 and 2 only)")
    p.add_argument("--point", default="70%", help="the sparsity of that state: 70%% for (m); 50%% or 2:4 for (k)")
    p.add_argument("--seed-suffix", default="", help="'-s1', '-s2': another seed's cached teacher and prune")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=str(Q.ROOT / "benchmarks" / "results" / "cross_term_check.json"))
    args = p.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    if any(not 0 <= a <= 1 for a in alphas):
        p.error("--alphas: each in [0, 1]")
    state = f"{Q._slug(args.point)}{args.seed_suffix}"
    teacher_dir, pruned_dir = (RECOVERY / args.row / f"{kind}-{state}" for kind in ("dense", "pruned"))
    if not (teacher_dir / "config.json").is_file() or not (pruned_dir / "config.json").is_file():
        seeds = f" --first-seed {args.seed_suffix[2:]} --seeds {int(args.seed_suffix[2:]) + 1}" if args.seed_suffix else ""
        p.error(f"no cached row ({args.row}) state {teacher_dir}: run recovery.py --steps 100 --rows {args.row} "
                f"--points {args.point}{seeds} first")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_weightprune.prune.refit import refit_masked_

    wargs = argparse.Namespace(steps=100, batch_size=4, seq_len=256, calibration_windows=64, valid_windows=12,
                               ood_windows=99, eval_batch_size=4)
    train, _, valid, ood = Q._windows_cached(AutoTokenizer.from_pretrained(Q.base_model_dir()), wargs)
    if args.seed_suffix:
        train = train.shuffle(seed=int(args.seed_suffix[2:]))
    fit = train.select(range(100, 100 + args.fit_windows))  # the held phase's first windows (after 25 x 4)

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    teacher, student = load(teacher_dir), load(pruned_dir)
    reference = {n: m.weight.detach().clone() for n, m in _linears(teacher).items()}
    t = time.perf_counter()
    stats = gather(teacher, student, fit)
    held = gather(teacher, student, valid, dense_gram=True)
    print(f"statistics: {args.fit_windows} + {len(valid)} windows, {time.perf_counter() - t:.0f} s", flush=True)
    results = []
    for alpha in [None, *alphas]:
        model = load(pruned_dir)
        t = time.perf_counter()
        if alpha is not None:
            for name, mod in _linears(model).items():
                s = stats[_input_key(name)]
                refit_masked_(mod.weight, mod.weight != 0, s["H"], reference=reference[name],
                              cross=s["C"] if alpha > 0 else None, alpha=alpha if alpha > 0 else 0.5)
        refit_s = time.perf_counter() - t
        errs = layer_errors(model, reference, held)
        row = {"alpha": alpha, "refit_seconds": refit_s, **Q.evaluate_cell(model, valid, ood, wargs)}
        for label, lo, hi in (("all", 0, 30), ("layers 0-9", 0, 10), ("layers 10-19", 10, 20), ("layers 20-29", 20, 30)):
            sel = [v for n, v in errs.items() if lo <= int(n.split(".layers.")[1].split(".")[0]) < hi]
            row[label] = [sum(v[0] for v in sel) / len(sel), sum(v[1] for v in sel) / len(sel)]
        results.append(row)
        name = "pruned, no re-fit" if alpha is None else ("symmetric re-fit" if alpha == 0 else f"cross_alpha {alpha}")
        print(f"{name}: ppl {row['ppl_ood']:.2f} / {row['ppl_valid']:.2f}; asym / sym error "
              + "; ".join(f"{k} {row[k][0]:.4f} / {row[k][1]:.4f}" for k in ("all", "layers 0-9", "layers 10-19",
                                                                             "layers 20-29"))
              + f"; re-fit {refit_s:.0f} s", flush=True)
        Q._write_json(Path(args.output), {"row": args.row, "point": args.point, "fit_windows": args.fit_windows,
                                          "seed_suffix": args.seed_suffix, "rows": results})


if __name__ == "__main__":
    main()
