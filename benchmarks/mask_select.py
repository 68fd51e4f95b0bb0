"""Per-tensor masks at Phi-3-mini shapes: the package's selection vs the stable sort it replaced.

Layer-scope unstructured masks (`PruneConfig(sparsity=...)`'s default scope), row-scope masks (Wanda's group,
`row_mask`) and N:M masks (`nm_mask`) all prune "the k lowest scores of each row, lower index first on ties". Until
2026-11-30 each sorted every row (a stable `argsort` of the order keys). Now `prune_` builds a layer-scope mask with
`global_threshold.layer_mask`: the global threshold's radix select (65,536-bin histograms of the keys) over that
one tensor when it has >= 2**16 elements; rows of >= 256 columns (`row_mask`, and `masks.unstructured_mask`'s one
row) take the k-th smallest key with `kthvalue`, ties settled by a cumulative sum; N:M groups still sort.
The masks are the same (checked here on every input). The scores are random (`--dtype`; bfloat16 has many ties, as
real bf16 importance has) for the four Linear shapes of one Phi-3-mini decoder layer (qkv_proj [9216, 3072],
o_proj [3072, 3072], gate_up_proj [16384, 3072], down_proj [3072, 8192]: 113M weights; the model has 32 such
layers). Both sides start from the scores (order keys included). Each round times the package and the stable-sort
reference on the same scores, alternating which goes first; reported: median [min-max] seconds per layer over the
rounds, and the ratio of the medians.

    PYTHONPATH=. python benchmarks/mask_select.py --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"qkv_proj": (9216, 3072), "o_proj": (3072, 3072), "gate_up_proj": (16384, 3072), "down_proj": (3072, 8192)}


def stable_sort_select(keys, k: int):
    """The selection before 2026-11-30: keep-mask pruning the k lowest keys of every row by a stable sort."""
    import torch

    mask = torch.ones(keys.shape, dtype=torch.bool, device=keys.device)
    if k > 0:
        mask.scatter_(-1, torch.argsort(keys, dim=-1, stable=True)[..., :k], False)
    return mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()

    import torch

    from hf_weightprune.prune import global_threshold, masks

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    scores = {name: torch.rand(shape, generator=gen).to(dtype) for name, shape in SHAPES.items()}
    sp = args.sparsity
    cases = {
        # label: (the package's mask, the stable-sort reference from the same score)
        "layer scope, `layer_mask`": (
            lambda s: global_threshold.layer_mask(s, sp),
            lambda s: stable_sort_select(masks._keys(s).reshape(1, -1), masks.num_to_prune(s.numel(), sp)).reshape(
                s.shape)),
        "row scope, `row_mask`": (
            lambda s: masks.row_mask(s, sp),
            lambda s: stable_sort_select(masks._keys(s), masks.num_to_prune(s.shape[1], sp))),
        "2:4, `nm_mask` (sorts in both)": (
            lambda s: masks.nm_mask(s, 2, 4),
            lambda s: stable_sort_select(masks._keys(s).reshape(-1, 4), 2).reshape(s.shape)),
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds, {args.dtype} scores, "
          f"load average at start {os.getloadavg()[0]:.2f}; one Phi-3-mini layer: "
          f"{sum(s.numel() for s in scores.values()) / 1e6:.0f}M scores\n")
    print("| mask | stable sort (s/layer) | package (s/layer) | speed-up |")
    print("|---|---:|---:|---:|")
    for label, (package, reference) in cases.items():
        times = {"sort": [], "package": []}
        for r in range(args.rounds):
            order = [("sort", reference), ("package", package)]
            got = {}
            for name, fn in order if r % 2 == 0 else order[::-1]:
                total, got[name] = 0.0, []
                for s in scores.values():
                    t = time.perf_counter()
                    got[name].append(fn(s))
                    total += time.perf_counter() - t
                times[name].append(total)
            if not all(torch.equal(a, b) for a, b in zip(got["sort"], got["package"])):
                raise SystemExit(f"{label}: the package's masks differ from the stable sort's")
        s, n = (statistics.median(times[x]) for x in ("sort", "package"))
        print(f"| {label} | {s:.2f} [{min(times['sort']):.2f}-{max(times['sort']):.2f}] | "
              f"{n:.2f} [{min(times['package']):.2f}-{max(times['package']):.2f}] | {s / n:.2f}x |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
