"""Pruning at Phi-3-mini scale (3.82B parameters, bf16) on CPU, timed against plain load + save.

Builds once, in its own subprocess, under benchmarks/_cache/ (~15 GB at `--scale phi3-mini`): a random
Phi-3-sized model (meta-device init, then filled) and a bf16 importance folder for it. Then runs these tasks,
each in a fresh child process spawned by this small parent (which never imports torch):
  idle      import what the tasks import, do nothing (its peak is the import cost every task pays)
  baseline  load model + save_pretrained
  prune     load model + load_importance + global 50% unstructured prune_ + save_pruned
  stream    load_importance + prune_checkpoint (file to file, what `hf-weightprune prune` does without --eval-data)
over `--repeats` rounds (the order rotates each round). Before every task the previous outputs are deleted,
dirty pages are synced, and the page cache is put in the same state: `--page-cache warm` reads every file of
the checkpoint and the importance folder once; `--page-cache drop` writes `/proc/sys/vm/drop_caches` (root only;
it slows every other process on the machine).

Each child measures itself: wall time and CPU time of the work (imports excluded) and its peak resident
memory, `VmHWM` from /proc/self/status read at its end. Not `ru_maxrss` (from `getrusage` in the child or
`os.wait4` in the parent): on Linux it keeps the high-water mark of the memory the process had before `exec`,
i.e. the parent's at spawn. Reported: median [min-max] over the rounds of time, CPU time, peak RSS and peak RSS
minus the idle child's median peak; time ratios against the baseline of the same run (ratio of the medians, and
min-max of the per-round ratios); peak RSS / model bytes; the load average (other work on the machine).

Also: a structured 30% neuron prune of a ~100M Llama config, with parameters and greedy decode tokens/s
before/after (median of repeats, alternating, measured in one child process).

    python benchmarks/prune_scale.py --part scale --scale phi3-mini --repeats 3   # the full run, ~15 GB of disk
    python benchmarks/prune_scale.py --part scale --scale 0.3b                    # a quick check, ~1.2 GB
    python benchmarks/prune_scale.py --part structured
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCALES = {  # Phi3Config overrides; vocab and head layout as Phi-3-mini
    "phi3-mini": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    # ~0.27B: the same code paths at 1/14 of the bytes, for checking the benchmark itself
    "0.3b": dict(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096),
}
KINDS = ("idle", "baseline", "prune", "stream")
RESULT = "#result "  # prefix of the child's one JSON line on stdout


def cache_dir(scale: str) -> str:
    return os.path.join(HERE, "_cache", "phi3-mini-random" if scale == "phi3-mini" else f"phi3-{scale}-random")


def build(scale: str) -> None:
    """Write the random model and its importance folder (run in a child process: its memory dies with it)."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from hf_weightprune import ImportanceConfig
    from hf_weightprune.matching import find_tracked_weights
    from hf_weightprune.testing import save_importance_dir

    model_dir, imp_dir = os.path.join(cache_dir(scale), "model"), os.path.join(cache_dir(scale), "importance")
    config = Phi3Config(**SCALES[scale], dtype="bfloat16")
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
    cfg = ImportanceConfig(criterion="temporal_magnitude", state_dtype="bfloat16")  # [out, in] scores
    meta = {"global_step": 1, "num_samples": 1, "weight_sum": 1.0, "last_step": 1, "skipped": 0, "tokens": {}}
    save_importance_dir(imp_dir, tensors, config=cfg, meta=meta, shapes=shapes)
    print(f"cache ready in {time.time() - t:.0f}s", flush=True)


def peak_rss_bytes() -> int:
    """This process's peak resident set since its `exec` (`VmHWM`), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
    raise RuntimeError("no VmHWM in /proc/self/status: this benchmark needs Linux")


def task(kind: str, model_dir: str, imp_dir: str, out: str) -> None:
    """One timed task, run in a child process; prints one `#result {json}` line on stdout."""
    t = time.perf_counter()
    # Every kind imports the same modules, so the idle child's peak is the import cost all of them pay.
    import torch
    from transformers import AutoModelForCausalLM

    from hf_weightprune import PruneConfig, load_importance, prune_, prune_checkpoint, save_pruned

    import_s = time.perf_counter() - t
    cpu = resource.getrusage(resource.RUSAGE_SELF)  # CPU time is not inherited across exec, unlike ru_maxrss
    t = time.perf_counter()
    if kind == "stream":
        report = prune_checkpoint(model_dir, load_importance(imp_dir), config=PruneConfig(sparsity=0.5, scope="global"), output_dir=out,
                                  progress=False)  # keywords: the positional order changed after 0.1
        print(f"# {report.summary()}", file=sys.stderr)
    elif kind in ("baseline", "prune"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        if kind == "baseline":
            model.save_pretrained(out)
        else:
            report = prune_(model, load_importance(imp_dir), PruneConfig(sparsity=0.5, scope="global"), progress=False)
            save_pruned(model, out, report=report)
            print(f"# {report.summary()}", file=sys.stderr)
    elif kind != "idle":
        raise ValueError(f"task kind {kind!r}: use one of {', '.join(KINDS)}")
    seconds = time.perf_counter() - t
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = end.ru_utime + end.ru_stime - cpu.ru_utime - cpu.ru_stime
    print(RESULT + json.dumps({"seconds": seconds, "cpu_s": cpu_s, "import_s": import_s, "peak_rss": peak_rss_bytes()}),
          flush=True)


def files_under(*folders: str) -> list[str]:
    return sorted(os.path.join(d, f) for folder in folders for d, _, fs in os.walk(folder) for f in fs)


def set_page_cache(mode: str, inputs: list[str]) -> None:
    """Put the page cache in the same state before every task: sync dirty pages, then warm or drop."""
    os.sync()  # the previous task's writes must not be flushed during this one
    if mode == "drop":
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return
    buf = bytearray(16 << 20)
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def run_child(kind: str, model_dir: str, imp_dir: str, out: str, threads: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--task", kind, model_dir, imp_dir, out], stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"task {kind} failed (exit {proc.returncode}); its stderr is above")
    return json.loads(lines[-1][len(RESULT):])


def spread(values: list[float], fmt: str) -> str:
    """`median [min-max]` of `values`, each formatted with `fmt`."""
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def part_scale(scale: str, repeats: int, page_cache: str, threads: int) -> None:
    if page_cache == "drop" and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        sys.exit("--page-cache drop: /proc/sys/vm/drop_caches is not writable here (needs root); use --page-cache warm")
    root = cache_dir(scale)
    model_dir, imp_dir = os.path.join(root, "model"), os.path.join(root, "importance")
    if not os.path.isfile(os.path.join(imp_dir, "importance_config.json")):
        # A separate process, so nothing the build allocated or mapped is left in this one or its children.
        subprocess.run([sys.executable, __file__, "--build", scale], check=True)
    inputs = files_under(model_dir, imp_dir)
    model_bytes = sum(os.path.getsize(p) for p in inputs if p.startswith(model_dir) and p.endswith(".safetensors"))
    results: dict[str, list[dict]] = {k: [] for k in KINDS}
    load_before = os.getloadavg()[0]
    for r in range(repeats):
        order = KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]  # rotate: no task always runs first or last
        for kind in order:
            out = os.path.join(root, f"out-{kind}")
            shutil.rmtree(out, ignore_errors=True)
            set_page_cache(page_cache, inputs)
            results[kind].append(run_child(kind, model_dir, imp_dir, out, threads))
            print(f"round {r + 1}/{repeats} {kind}: {results[kind][-1]['seconds']:.2f} s, peak RSS "
                  f"{results[kind][-1]['peak_rss'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    for kind in KINDS:
        shutil.rmtree(os.path.join(root, f"out-{kind}"), ignore_errors=True)

    gib = 2**30
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} CPUs"
    idle = statistics.median(x["peak_rss"] for x in results["idle"])
    base = results["baseline"]
    print(f"scale {scale}: model bytes {model_bytes / gib:.2f} GiB; {repeats} rounds; page cache {page_cache} before "
          f"every task; OMP_NUM_THREADS={threads}; idle child (imports only) peak RSS "
          f"{spread([x['peak_rss'] / gib for x in results['idle']], '.2f')} GiB, imports "
          f"{spread([x['import_s'] for x in results['idle']], '.1f')} s; {load}")
    print("Values: median [min-max] over the rounds. Time excludes imports. Ratios: against the baseline of this run.")
    print()
    print("| task | time (s) | time / baseline | CPU time (s) | peak RSS (GiB) | peak RSS - idle (GiB) | "
          "peak RSS / model bytes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    labels = {"baseline": "load + `save_pretrained`",
              "prune": "load + `load_importance` + global 50% unstructured `prune_` + `save_pruned`",
              "stream": "`load_importance` + `prune_checkpoint` (file to file; the CLI's `prune`)"}
    tb = statistics.median(x["seconds"] for x in base)
    for kind, label in labels.items():
        rows = results[kind]
        secs = [x["seconds"] for x in rows]
        per_round = [x["seconds"] / b["seconds"] for x, b in zip(rows, base)]
        ratio = f"{statistics.median(secs) / tb:.2f}x [{min(per_round):.2f}-{max(per_round):.2f}]"
        print(f"| {label} | {spread(secs, '.1f')} | {ratio} | {spread([x['cpu_s'] for x in rows], '.1f')} | "
              f"{spread([x['peak_rss'] / gib for x in rows], '.2f')} | "
              f"{spread([(x['peak_rss'] - idle) / gib for x in rows], '.2f')} | "
              f"{spread([x['peak_rss'] / model_bytes for x in rows], '.2f')} |")
    print()
    print("time / baseline: ratio of the medians [min-max of the ratio within each round]. CPU time: user + system "
          "of the task's process (all threads), imports excluded. Targets: time <= 1.5x, peak RSS <= 1.3x model bytes.")


def part_structured(repeats: int, new_tokens: int = 32) -> None:
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_weightprune import PruneConfig, prune_
    from hf_weightprune.prune.oneshot import oneshot_importance

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12)).eval()
    ids = torch.randint(0, 32000, (1, 16))

    def tokens_per_s(m):
        m.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return new_tokens / (time.perf_counter() - t)

    pruned = copy.deepcopy(model)
    prune_(pruned, oneshot_importance(pruned, "magnitude"), PruneConfig(structure="neurons", sparsity=0.3),
           progress=False)
    dense_tps, pruned_tps = [], []
    for _ in range(repeats):  # alternate so both see the same machine load
        dense_tps.append(tokens_per_s(model))
        pruned_tps.append(tokens_per_s(pruned))
    d, p = statistics.median(dense_tps), statistics.median(pruned_tps)
    speedups = [b / a for a, b in zip(dense_tps, pruned_tps)]
    print("| model | parameters | decode tokens/s, median [min-max] |")
    print("| --- | --- | --- |")
    print(f"| dense ~100M Llama | {model.num_parameters():,} | {spread(dense_tps, '.1f')} |")
    print(f"| 30% MLP neurons removed | {pruned.num_parameters():,} | {spread(pruned_tps, '.1f')} |")
    print(f"decode speedup {p / d:.2f}x [{min(speedups):.2f}-{max(speedups):.2f} within each round] "
          f"(target >= 1.3x), {repeats} rounds, threads={torch.get_num_threads()}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--task":
        task(*sys.argv[2:6])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        build(sys.argv[2])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--structured":
        part_structured(int(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "scale", "structured"], default="all")
    p.add_argument("--scale", choices=list(SCALES), default="phi3-mini", help="model size (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of every task (default: %(default)s)")
    p.add_argument("--page-cache", choices=["warm", "drop"], default="warm",
                   help="state of the page cache before every task (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the tasks (default: %(default)s)")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: give at least 1")
    if args.part in ("all", "structured"):  # in a child too: this parent stays small and torch-free
        subprocess.run([sys.executable, __file__, "--structured", str(max(args.repeats, 3))], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if args.part in ("all", "scale"):
        part_scale(args.scale, args.repeats, args.page_cache, args.threads)


if __name__ == "__main__":
    main()
