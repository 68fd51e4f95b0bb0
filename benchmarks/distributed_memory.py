"""Per-rank importance state vs world size, and the callback's step-time cost under DDP (CPU, gloo).

    OMP_NUM_THREADS=1 python benchmarks/distributed_memory.py [--steps 12]

Launches `torchrun --nproc_per_node N` for N = 1 and 2 on a ~15M-parameter Llama (Trainer, real DDP) and
prints each rank's accumulator bytes for `temporal_magnitude` (a buffer per tracked weight, partitioned across
ranks) and `wanda` (`[in_features]` sums on every rank), the ratio to one process, and at world 2 the median
step time with and without the callback.
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
import time

CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=128)


def worker(out: str, steps: int) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_weightprune import ImportanceCallback, ImportanceConfig
    from hf_weightprune import distributed as D
    from hf_weightprune.testing import TokenDataset, tiny_llama

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t)

    world = int(os.environ.get("WORLD_SIZE", 1))
    result = {"world_size": world}
    for criterion in ("temporal_magnitude", "wanda", None):
        model = tiny_llama(seed=0, **CONFIG)
        timer = StepTimer()
        callbacks = [timer] + ([ImportanceCallback(ImportanceConfig(criterion=criterion))] if criterion else [])
        args = TrainingArguments(os.path.join(out, str(criterion)), max_steps=steps, per_device_train_batch_size=8 // world,
                                 report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                 disable_tqdm=True, ddp_backend="gloo" if world > 1 else None)
        data = TokenDataset(n=8 * steps, seq_len=128, vocab_size=CONFIG["vocab_size"])
        Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
        key = criterion or "no_callback"
        result[key] = {"step_s": statistics.median(timer.times[2:])}  # the first steps warm up
        if criterion:
            cb = callbacks[1]
            result[key]["state_bytes"] = [row[0] for row in D.all_gather_ints([cb.state_bytes()])]
            result["tracked_params"] = sum(t.param.numel() for t in cb._tracked)
        result["model_params"] = sum(p.numel() for p in model.parameters())
    if D.rank_and_world()[0] == 0:
        with open(os.path.join(out, f"world{world}.json"), "w") as f:
            json.dump(result, f)


def launch(nproc: int, out: str, steps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", __file__, "--worker", out, "--steps", str(steps)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, f"world{nproc}.json")) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        return worker(a.worker, a.steps)
    with tempfile.TemporaryDirectory() as out:
        runs = {n: launch(n, out, a.steps) for n in (1, 2)}
    one, two = runs[1], runs[2]
    print(f"Llama {one['model_params'] / 1e6:.1f}M parameters, {one['tracked_params'] / 1e6:.1f}M tracked, "
          f"global batch 8 x 128 tokens, {a.steps} steps")
    for crit in ("temporal_magnitude", "wanda"):
        total = one[crit]["state_bytes"][0]
        ranks = two[crit]["state_bytes"]
        print(f"{crit:>18}: world 1 {total / 2**20:7.2f} MiB | world 2 per rank "
              + ", ".join(f"{b / 2**20:.2f} MiB ({b / total:.3f}x)" for b in ranks))
    base = two["no_callback"]["step_s"]
    for crit in ("temporal_magnitude", "wanda"):
        s = two[crit]["step_s"]
        print(f"world 2 median step: {crit} {s * 1e3:.0f} ms vs no callback {base * 1e3:.0f} ms ({s / base - 1:+.1%})")


if __name__ == "__main__":
    main()
