"""Pruning at Phi-3-mini scale (3.82B parameters, bf16) on CPU, timed against plain load + save.

Builds once (cached under benchmarks/_cache/, ~15 GB): a random Phi-3-mini-sized model (meta-device init, then
filled) and a bf16 importance folder for it. Then, each in a fresh child process so peak RSS is per task:
  A. load model + save_pretrained
  B. load model + load_importance + global 50% unstructured prune_ + save_pruned
  C. load_importance + prune_checkpoint (file to file, what `hf-weightprune prune` does without --eval-data)
and prints the time ratios B/A and C/A and peak RSS / model bytes. A, B and C alternate over --repeats.

Also: a structured 30% neuron prune of a ~100M Llama config, with parameters and greedy decode tokens/s
before/after (median of repeats, measured in one process).

    python benchmarks/prune_scale.py            # both parts
    python benchmarks/prune_scale.py --part structured
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "_cache", "phi3-mini-random")
PHI3_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def build():
    from transformers import Phi3Config, Phi3ForCausalLM

    from hf_weightprune import ImportanceConfig
    from hf_weightprune.matching import find_tracked_weights
    from hf_weightprune.state import save_importance_dir

    model_dir, imp_dir = os.path.join(CACHE, "model"), os.path.join(CACHE, "importance")
    if os.path.isfile(os.path.join(imp_dir, "importance_config.json")):
        return model_dir, imp_dir
    config = Phi3Config(**PHI3_MINI, dtype="bfloat16")
    t = time.time()
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    model = model.to(torch.bfloat16)
    print(f"built {model.num_parameters() / 1e9:.2f}B params in {time.time() - t:.0f}s", flush=True)
    model.save_pretrained(model_dir)
    shapes = {t.name: list(t.param.shape) for t in find_tracked_weights(model)}
    del model
    tensors = {n: torch.rand(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}
    cfg = ImportanceConfig(state_dtype="bfloat16")
    meta = {"global_step": 1, "num_samples": 1, "weight_sum": 1.0, "last_step": 1, "skipped": 0, "tokens": {}}
    save_importance_dir(imp_dir, tensors, config=cfg, meta=meta, shapes=shapes)
    print(f"cache ready in {time.time() - t:.0f}s", flush=True)
    return model_dir, imp_dir


def task(kind: str, model_dir: str, imp_dir: str, out: str) -> None:
    """One timed task, run in a child process."""
    from transformers import AutoModelForCausalLM

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    if kind == "stream":  # what `hf-weightprune prune` does without --eval-data: file to file, no model
        from hf_weightprune import PruneConfig, load_importance, prune_checkpoint

        report = prune_checkpoint(model_dir, load_importance(imp_dir), PruneConfig(sparsity=0.5), out, progress=False)
        print(f"# {report.summary()}", file=sys.stderr)
        print(time.perf_counter() - t)
        return
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    if kind == "baseline":
        model.save_pretrained(out)
    else:
        from hf_weightprune import PruneConfig, load_importance, prune_, save_pruned

        report = prune_(model, load_importance(imp_dir), PruneConfig(sparsity=0.5), progress=False)
        save_pruned(model, out, report=report)
        print(f"# {report.summary()}", file=sys.stderr)
    print(time.perf_counter() - t)


def run_child(kind, model_dir, imp_dir, out):
    proc = subprocess.Popen([sys.executable, __file__, "--task", kind, model_dir, imp_dir, out],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = float(proc.stdout.read().strip().splitlines()[-1])
    if status != 0:
        raise RuntimeError(f"{kind} failed")
    return seconds, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def part_scale(repeats: int):
    model_dir, imp_dir = build()
    model_bytes = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                      if f.endswith(".safetensors"))
    results = {"baseline": [], "prune": [], "stream": []}
    for _ in range(repeats):
        for kind in ("baseline", "prune", "stream"):
            results[kind].append(run_child(kind, model_dir, imp_dir, os.path.join(CACHE, f"out-{kind}")))
    for kind in results:
        shutil.rmtree(os.path.join(CACHE, f"out-{kind}"), ignore_errors=True)
    tb, tp, ts = (statistics.median(s for s, _ in results[k]) for k in ("baseline", "prune", "stream"))
    rb, rp, rs = (max(r for _, r in results[k]) for k in ("baseline", "prune", "stream"))
    print(f"model bytes {model_bytes / 2**30:.2f} GiB, repeats {repeats}")
    print("| task | time (s, median) | peak RSS (GiB) | peak RSS / model bytes |")
    print("| --- | --- | --- | --- |")
    print(f"| load + save_pretrained | {tb:.1f} | {rb / 2**30:.2f} | {rb / model_bytes:.2f} |")
    print(f"| load + load_importance + global 50% prune_ + save_pruned | {tp:.1f} | {rp / 2**30:.2f} | "
          f"{rp / model_bytes:.2f} |")
    print(f"| load_importance + `prune_checkpoint` (file to file, the CLI's path) | {ts:.1f} | {rs / 2**30:.2f} | "
          f"{rs / model_bytes:.2f} |")
    print(f"time ratio prune_checkpoint/baseline: {ts / tb:.2f}x (target <= 1.5x); peak RSS {rs / model_bytes:.2f}x")
    print(f"time ratio prune/baseline: {tp / tb:.2f}x (target <= 1.5x); peak RSS {rp / model_bytes:.2f}x model "
          "bytes (target <= 1.3x)")


def part_structured(repeats: int, new_tokens: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_weightprune import PruneConfig, prune_
    from hf_weightprune.oneshot import oneshot_importance

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12)).eval()
    ids = torch.randint(0, 32000, (1, 16))

    def tokens_per_s(m):
        m.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return new_tokens / (time.perf_counter() - t)

    import copy

    pruned = copy.deepcopy(model)
    prune_(pruned, oneshot_importance(pruned, "magnitude"), PruneConfig(structure="neurons", sparsity=0.3),
           progress=False)
    dense_tps, pruned_tps = [], []
    for _ in range(repeats):  # alternate so both see the same machine load
        dense_tps.append(tokens_per_s(model))
        pruned_tps.append(tokens_per_s(pruned))
    d, p = statistics.median(dense_tps), statistics.median(pruned_tps)
    print("| model | parameters | decode tokens/s (median) |")
    print("| --- | --- | --- |")
    print(f"| dense ~100M Llama | {model.num_parameters():,} | {d:.1f} |")
    print(f"| 30% MLP neurons removed | {pruned.num_parameters():,} | {p:.1f} |")
    print(f"decode speedup {p / d:.2f}x (target >= 1.3x), threads={torch.get_num_threads()}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--task":
        task(*sys.argv[2:6])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "scale", "structured"], default="all")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.part in ("all", "structured"):
        part_structured(max(args.repeats, 3))
    if args.part in ("all", "scale"):
        part_scale(args.repeats)


if __name__ == "__main__":
    main()
