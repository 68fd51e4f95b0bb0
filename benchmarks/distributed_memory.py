"""Per-rank importance state vs world size, and the callback's step-time cost under DDP (CPU, gloo).

    OMP_NUM_THREADS=1 python benchmarks/distributed_memory.py [--steps 24] [--zero 2] [--repeats 3]

Launches `torchrun --nproc_per_node N` for N = 1 and 2 on a ~15M-parameter Llama (Trainer, real DDP) and
prints each rank's accumulator bytes for `temporal_magnitude` (a buffer per tracked weight, partitioned across
ranks) and `wanda` (`[in_features]` sums on every rank), the ratio to one process, and the step time with and
without the callback, measured side by side: one Trainer run per criterion alternates steps with the callback
active and inactive (`callback_overhead.Alternating`), and the ratio is median(active) / median(inactive).
`--zero STAGE` adds a world-2 run under DeepSpeed ZeRO-STAGE (the Trainer's AdamW wrapped by ZeRO), whose
tracked weights follow the same partition plan.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=128)


def worker(out: str, steps: int, zero: int | None = None) -> None:
    from callback_overhead import Alternating  # same folder: steps alternate callback on/off in one run
    from transformers import Trainer, TrainingArguments

    from hf_weightprune import ImportanceCallback, ImportanceConfig
    from hf_weightprune import distributed as D
    from hf_weightprune.testing import TokenDataset, tiny_llama

    world = int(os.environ.get("WORLD_SIZE", 1))
    result = {"world_size": world}
    for criterion in ("temporal_magnitude", "wanda"):
        model = tiny_llama(seed=0, **CONFIG)
        cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
        timer = Alternating(cb)  # alternation is by global step, so every rank toggles on the same steps
        args = TrainingArguments(os.path.join(out, criterion), max_steps=steps, per_device_train_batch_size=8 // world,
                                 report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                 disable_tqdm=True, ddp_backend="gloo" if world > 1 else None,
                                 deepspeed={"zero_optimization": {"stage": zero}, "train_micro_batch_size_per_gpu": "auto",
                                            "gradient_accumulation_steps": "auto"} if zero else None)
        data = TokenDataset(n=8 * steps, seq_len=128, vocab_size=CONFIG["vocab_size"])
        Trainer(model=model, args=args, train_dataset=data, callbacks=[timer]).train()
        # the first two steps of each kind warm up
        on, off = statistics.median(timer.times[True][2:]), statistics.median(timer.times[False][2:])
        result[criterion] = {"step_on_s": on, "step_off_s": off,
                             "state_bytes": [row[0] for row in D.all_gather_ints([cb.state_bytes()])]}
        result["tracked_params"] = sum(t.param.numel() for t in cb.accumulator.tracked)
        result["model_params"] = sum(p.numel() for p in model.parameters())
    if D.rank_and_world()[0] == 0:
        from hf_weightprune.io_utils import atomic_write_json

        atomic_write_json(os.path.join(out, f"world{world}{'-zero' + str(zero) if zero else ''}.json"), result)


def launch(nproc: int, out: str, steps: int, zero: int | None = None) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", __file__, "--worker", out, "--steps", str(steps)] + (["--zero", str(zero)] if zero else [])
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, f"world{nproc}{'-zero' + str(zero) if zero else ''}.json")) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--zero", type=int, choices=(1, 2), help="also run world 2 under DeepSpeed ZeRO-1/2")
    parser.add_argument("--repeats", type=int, default=3,
                        help="launches of every world size, round-robin; step-time ratios move by a few points "
                             "between launches (default: %(default)s)")
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        return worker(a.worker, a.steps, a.zero)
    configs = [(1, None), (2, None)] + ([(2, a.zero)] if a.zero else [])
    runs: dict = {1: [], 2: [], "zero": []}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(a.repeats):  # round-robin, so every world size sees the same stretch of machine load
            for nproc, zero in configs:
                runs["zero" if zero else nproc].append(launch(nproc, out, a.steps, zero))
    runs = {k: v for k, v in runs.items() if v}
    one, two = runs[1][0], runs[2][0]
    print(f"Llama {one['model_params'] / 1e6:.1f}M parameters, {one['tracked_params'] / 1e6:.1f}M tracked, "
          f"global batch 8 x 128 tokens, {a.steps} steps, {a.repeats} launches per world size")
    for crit in ("temporal_magnitude", "wanda"):
        total = one[crit]["state_bytes"][0]
        ranks = two[crit]["state_bytes"]
        print(f"{crit:>18}: world 1 {total / 2**20:7.2f} MiB | world 2 per rank "
              + ", ".join(f"{b / 2**20:.2f} MiB ({b / total:.3f}x)" for b in ranks))
    print("step times: median over the launches; ratio = median step with / without the callback within one launch, "
          "median [min-max] over the launches")
    for world, rs in runs.items():
        label = f"ZeRO-{a.zero} world 2" if world == "zero" else f"world {world}"
        for crit in ("temporal_magnitude", "wanda"):
            extra = ""
            if world == "zero":
                extra = "state per rank " + ", ".join(
                    f"{b / 2**20:.2f} MiB ({b / one[crit]['state_bytes'][0]:.3f}x)" for b in rs[0][crit]["state_bytes"]
                ) + "; "
            on = statistics.median(r[crit]["step_on_s"] for r in rs)
            off = statistics.median(r[crit]["step_off_s"] for r in rs)
            ratios = [r[crit]["step_on_s"] / r[crit]["step_off_s"] for r in rs]
            print(f"{label:>18} {crit}: {extra}median step {on * 1e3:.0f} ms with vs {off * 1e3:.0f} ms without "
                  f"({statistics.median(ratios):.3f}x [{min(ratios):.3f}-{max(ratios):.3f}])")


if __name__ == "__main__":
    main()
