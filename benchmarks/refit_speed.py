"""Speed and fit of the least-squares re-fit of kept weights (`prune.refit.refit_masked_`, issue 27) on SmolLM2-135M's
real weights and training Hessians: three solvers side by side in one run.

- `v0.1 full systems`: the formulation before 2026-12-07, each row's full `[in, in]` system with the identity on its
  pruned inputs (`rows * in^3 / 3` flops whatever the sparsity), reproduced here as the baseline;
- `exact on supports`: `refit_masked_(solver="exact")`, each row's `[k, k]` system on its `k` kept inputs
  (`sum k^3 / 3`); the same least-squares solution, so its weights must equal the baseline's to float tolerance;
- `sweep, mask fixed`: `refit_masked_(solver="sweep")`, SparseGPT's OBS sweep with the mask given (`in^3 + rows * in^2`),
  what `solver="auto"` runs above 2.5e11 flops per weight (Phi-3-mini's layers).

Inputs (no forward here): the weights and the `sparsegpt` statistic (input Hessians over 25 training steps, 25,600
tokens) that `structured.py`'s `ours` row cached after its 25 statistics steps (`benchmarks/_cache/structured/stats-100`;
run `structured.py --sizes 20% --rows ours --oneshot-only` first if it is missing). At each point the mask is SparseGPT's
own (an OBS prune of the weight on the same Hessian, row scope), and the re-fit targets the weight before that prune,
as the hold re-fit does right after the prune. Fit: `tr((W - R) H (W - R)^T) / tr(R H R^T)`, the relative squared
output error on the Hessian's tokens (in sample: the exact solve is its optimum, up to the 1% dampening).

    OMP_NUM_THREADS=1 python benchmarks/refit_speed.py --layers 15 --repeats 3
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from safetensors import safe_open

from hf_weightprune.prune.obs import sparsegpt_prune_
from hf_weightprune.prune.refit import dampened, refit_masked_

STATS = Path(__file__).resolve().parent / "_cache" / "structured" / "stats-100"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@torch.no_grad()
def v01_full_systems(weight, mask, hessian, reference, percdamp=0.01, chunk_bytes=64 << 20):
    """The re-fit as the package solved it before 2026-12-07: per row, the full `[in, in]` system, identity on the
    pruned inputs."""
    H, dead = dampened(hessian, percdamp)
    rows, cols = weight.shape
    R = reference.float()
    B = R @ H
    keep = mask & ~dead[None, :]
    out = torch.zeros(rows, cols)
    eye = torch.eye(cols)
    chunk = max(1, chunk_bytes // (4 * cols * cols))
    for a in range(0, rows, chunk):
        k = keep[a : a + chunk].float()
        A = H[None] * k[:, :, None] * k[:, None, :] + eye * (1.0 - k)[:, None, :]
        L, _ = torch.linalg.cholesky_ex(A)
        out[a : a + chunk] = torch.cholesky_solve((B[a : a + chunk] * k).unsqueeze(-1), L).squeeze(-1) * k
    weight.copy_(out.masked_fill_(~keep, 0.0))
    return weight


def rel_error(w, reference, hessian):
    d = (w.double() - reference.double())
    H = hessian.double()
    return float(torch.einsum("ij,jk,ik->", d, H, d) / torch.einsum("ij,jk,ik->", reference.double(), H,
                                                                    reference.double()))


def solve(solver, pruned, mask, hessian, dense):
    if solver.startswith("v0.1"):
        return v01_full_systems(pruned.clone(), mask, hessian, dense)
    return refit_masked_(pruned.clone(), mask, hessian, reference=dense, solver=solver.split()[0].rstrip(","))


def timed(fn, fn_args, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*fn_args)
        times.append(time.perf_counter() - t0)
    return out, times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="15", help="comma-separated decoder layers")
    p.add_argument("--points", default="50%,2:4,70%")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not (STATS / "importance" / "importance.safetensors").exists():
        raise SystemExit(f"{STATS} is missing: run `python benchmarks/structured.py --sizes 20% --rows ours "
                         "--oneshot-only` first.")
    hess = safe_open(str(STATS / "importance" / "importance.safetensors"), "pt")
    model = safe_open(str(STATS / "model" / "model.safetensors"), "pt")
    print(f"# refit_speed: {args.threads} thread(s), torch {torch.__version__}, layers {args.layers}, "
          f"repeats {args.repeats}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    solvers = ("v0.1 full systems", "exact on supports", "sweep, mask fixed")
    totals = {(pt, s): [0.0] * args.repeats for pt in args.points.split(",") for s in solvers}
    print("| layer.weight | point | " + " | ".join(f"{s} s" for s in solvers) + " | error: pruned / v0.1 / exact / "
          "sweep | max abs diff v0.1 vs exact |")
    print("|---|---|" + "---:|" * (len(solvers) + 2))
    for layer in (int(x) for x in args.layers.split(",")):
        for lin in LINEARS:
            name = f"model.layers.{layer}.{lin}.weight"
            dense, H = model.get_tensor(name).float(), hess.get_tensor(name).float()
            for point in args.points.split(","):
                pruned = dense.clone()
                nm = point if ":" in point else None
                mask = sparsegpt_prune_(pruned, H, sparsity=None if nm else float(point.rstrip("%")) / 100, nm=nm)
                results, cells = {}, []
                for s in solvers:
                    results[s], times = timed(solve, (s, pruned, mask, H, dense), args.repeats)
                    for i, t in enumerate(times):
                        totals[(point, s)][i] += t
                    cells.append(f"{statistics.median(times):.3f} [{min(times):.3f}-{max(times):.3f}]")
                errs = [rel_error(w, dense, H) for w in (pruned, *results.values())]
                diff = float((results[solvers[0]] - results[solvers[1]]).abs().max())
                print(f"| {layer}.{lin.split('.')[1]} | {point} | " + " | ".join(cells) + " | "
                      + " / ".join(f"{e:.4f}" for e in errs) + f" | {diff:.2e} |", flush=True)
    print("\nPer point, the layers' seven weights summed (median [min-max] over the repeats, seconds), and the ratio "
          "to the baseline:")
    for point in args.points.split(","):
        base = statistics.median(totals[(point, solvers[0])])
        parts = []
        for s in solvers:
            t = totals[(point, s)]
            parts.append(f"{s} {statistics.median(t):.2f} [{min(t):.2f}-{max(t):.2f}] ({base / statistics.median(t):.1f}x)")
        print(f"- {point}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
