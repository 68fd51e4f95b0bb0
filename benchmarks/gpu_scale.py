"""CUDA at Phi-3-mini size, one process, for a machine with a GPU (never run by CI).

1. bf16 training with the callback: a stock `Trainer` (`bf16=True`, AdamW) on a randomly initialised model shaped
   like Phi-3-mini (3.82B parameters, held in bfloat16 on the GPU), alternating steps with the callback active and
   inactive as `callback_overhead.py` does, with a CUDA synchronize at every step boundary so each step's kernels
   are charged to it. Per criterion: median step with / without the callback and their ratio (min-max over the
   ratio is of medians within the run), the mean step against a run with no callback just before (for
   `every_n_steps` > 1, where every step is active), the callback's state in bytes, and the run's peak GPU memory
   (`torch.cuda.max_memory_allocated`) beside the run with no callback.
2. OBS pruning at that size: the `sparsegpt` run's Hessians (accumulated during those steps), then `prune_` on the
   GPU at 50% unstructured (row scope, its default) and 2:4, and mask-only (`reconstruct=False`) at 50%: time with
   CUDA synchronized, and the peak GPU memory above what the model and the importance already hold.

    PYTHONPATH=. python benchmarks/gpu_scale.py --steps 16 --output $OUT

Random weights and random tokens: this measures time and memory, not quality (see `quality.py`).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Phi3Config, Phi3ForCausalLM, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from callback_overhead import Alternating  # noqa: E402

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, prune_  # noqa: E402
from hf_weightprune.io_utils import atomic_write_text  # noqa: E402
from hf_weightprune.testing import TokenDataset  # noqa: E402

SHAPES = {
    # microsoft/Phi-3-mini-4k-instruct's shape.
    "phi3-mini": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    # A dry run of the script on CPU.
    "tiny": dict(vocab_size=512, pad_token_id=0, eos_token_id=1, bos_token_id=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256),
}
GIB = 2**30


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class SyncedAlternating(Alternating):
    """`Alternating` with the device synchronized at both ends of every step (CUDA kernels run asynchronously)."""

    def on_step_begin(self, args, state, control, **kw):
        _sync()
        super().on_step_begin(args, state, control, **kw)

    def on_step_end(self, args, state, control, **kw):
        active = self._active(state, offset=0)
        if active:
            self._timed(self.inner.on_step_end, args, state, control, **kw)
        _sync()
        self.times[active].append(time.perf_counter() - self._t0)
        self.inside[active].append(self._in)


class StepTimer(TrainerCallback):
    """Every step's time, device synchronized at both ends (the run with no callback)."""

    def __init__(self):
        self.times, self._t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
        _sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        _sync()
        self.times.append(time.perf_counter() - self._t0)


def build(cfg: dict, device: str) -> Phi3ForCausalLM:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no float32 copy of 3.8B weights
    try:
        with torch.device(device):
            return Phi3ForCausalLM(Phi3Config(**cfg))
    finally:
        torch.set_default_dtype(default)


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train(model, criterion: str | None, steps: int, warmup: int, batch: int, seq: int, device: str):
    """One Trainer run; returns (row dict, callback or None)."""
    every = 1
    if criterion and ":" in criterion:
        criterion, every = criterion.split(":")[0], int(criterion.split(":")[1])
    inner = None
    timer = StepTimer()
    if criterion:
        inner = ImportanceCallback(ImportanceConfig(criterion=criterion, every_n_steps=every))
        timer = SyncedAlternating(inner, always=every > 1)
    args = TrainingArguments("/tmp/gpu_scale", max_steps=steps + warmup, per_device_train_batch_size=batch,
                             learning_rate=1e-5, report_to=[], save_strategy="no", disable_tqdm=True,
                             logging_strategy="no", bf16=device == "cuda", use_cpu=device == "cpu")
    ds = TokenDataset(n=(steps + warmup) * batch, seq_len=seq, vocab_size=model.config.vocab_size)
    reset_peak()
    t0 = time.perf_counter()
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[timer])
    trainer.train()
    _sync()
    if inner is not None and inner.accumulator.collector is not None:
        # The timer forwards step events only, not on_train_end (which would write the state to disk): remove the
        # hooks here, or this callback's hooks and state would stay on the model through the next runs.
        inner.accumulator.collector.remove()
    row = {"criterion": criterion or "none", "every_n_steps": every, "wall_s": time.perf_counter() - t0,
           "peak_gib": peak_gib()}
    if inner is None:
        times = timer.times[warmup:]
        row.update(step_median_s=statistics.median(times), step_mean_s=statistics.mean(times))
    else:
        skip = warmup if every > 1 else warmup // 2
        on, off = timer.times[True][skip:], timer.times[False][skip:]
        # every_n_steps > 1: every step is active and only some sample, so the mean over steps is what it costs
        row.update(step_median_s=statistics.median(on), step_mean_s=statistics.mean(on),
                   state_gib=inner.state_bytes() / GIB)
        if off:
            row["step_without_median_s"] = statistics.median(off)
            row["ratio_within_run"] = row["step_median_s"] / row["step_without_median_s"]
    del trainer
    reset_peak()
    return row, inner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16, help="measured steps per run (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=4, help="steps not measured (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--shape", choices=list(SHAPES), default="phi3-mini", help="model shape (default: %(default)s)")
    p.add_argument("--criteria", default="temporal_magnitude,wanda,sparsegpt:16,sparsegpt:4,sparsegpt",
                   help="criterion[:every_n_steps], comma-separated; sparsegpt last feeds part 2 "
                        "(default: %(default)s)")
    p.add_argument("--no-prune", action="store_true", help="skip part 2")
    p.add_argument("--output", default=None, help="folder for gpu_scale.json (default: none)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = SHAPES[args.shape]
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "config": cfg, "batch": args.batch, "seq": args.seq, "steps": args.steps, "training": []}
    model = build(cfg, device)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    print(f"{result['device']}, torch {torch.__version__}: {result['parameters'] / 1e9:.2f}B parameters, "
          f"{result['weights_gib']:.2f} GiB of bf16 weights; batch {args.batch}x{args.seq}", flush=True)

    inner = None
    for criterion in [None, *args.criteria.split(",")]:
        inner = None  # the previous run's state must not count in this run's peak (train() resets it after this)
        row, inner = train(model, criterion, args.steps, args.warmup, args.batch, args.seq, device)
        if criterion:  # against the run with no callback, the same model and data just before
            plain = result["training"][0]
            row["mean_ratio_to_plain"] = row["step_mean_s"] / plain["step_mean_s"]
            row["peak_above_plain_gib"] = row["peak_gib"] - plain["peak_gib"]
        result["training"].append(row)
        print(json.dumps(row), flush=True)

    if inner is not None and inner.config.criterion == "sparsegpt" and not args.no_prune:
        importance = inner.importance()
        del inner
        names = list(importance.names)
        params = dict(model.named_parameters())
        original = {n: params[n].detach().clone() for n in names}
        resident = torch.cuda.memory_allocated() / GIB if device == "cuda" else float("nan")
        result["pruning"] = {"resident_gib": resident, "tensors": len(names),
                             "pruned_weights": sum(t.numel() for t in original.values()), "runs": []}
        for label, config in (("50% row, OBS", PruneConfig(sparsity=0.5)),
                              ("2:4, OBS", PruneConfig(sparsity=0.5, structure="2:4")),
                              ("50% row, mask only", PruneConfig(sparsity=0.5, reconstruct=False))):
            with torch.no_grad():
                for n, w in original.items():
                    params[n].copy_(w)
            reset_peak()
            _sync()
            t0 = time.perf_counter()
            report = prune_(model, importance, config, progress=False)
            _sync()
            seconds = time.perf_counter() - t0
            row = {"run": label, "seconds": seconds, "peak_above_resident_gib": peak_gib() - resident,
                   "sparsity": report.global_sparsity}
            result["pruning"]["runs"].append(row)
            print(json.dumps(row), flush=True)
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.output) / "gpu_scale.json", json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
