"""Step-time overhead of ImportanceCallback, measured side by side in one run.

For each criterion, one Trainer run alternates steps with the callback active and inactive (an inactive step
skips every callback event and, for `wanda`, has no forward hooks registered), so both halves see the same
machine noise. The ratio is median(active) / median(inactive) over the measured steps (warm-up excluded).
Every row is measured in `--repeats` runs, taken round-robin over the rows; reported as median [min-max] over
the runs. Also reports bytes of accumulator state per tracked weight.

    OMP_NUM_THREADS=2 python benchmarks/callback_overhead.py --model tiny --steps 40 --repeats 3
    OMP_NUM_THREADS=2 python benchmarks/callback_overhead.py --model 100m --steps 16 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.testing import TokenDataset

MODELS = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    # ~134M parameters, 85M of them in tracked Linear weights.
    "100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
}
CRITERIA = ["temporal_magnitude", "magnitude", "movement", "taylor", "fisher", "wanda"]


class Alternating(TrainerCallback):
    """Forwards step events to `inner` on odd steps only and times every step (end to end)."""

    def __init__(self, inner: ImportanceCallback):
        self.inner = inner
        self.times = {True: [], False: []}
        self._t0 = None

    def _active(self, state, offset=1):
        return (state.global_step + offset) % 2 == 1

    def on_train_begin(self, args, state, control, **kw):
        self.inner.on_train_begin(args, state, control, **kw)

    def on_step_begin(self, args, state, control, **kw):
        active = self._active(state)
        collector = self.inner.accumulator.collector  # activation criteria: no hooks on inactive steps
        if collector is not None:
            (collector.register if active else collector.remove)()
        if active:
            self.inner.on_step_begin(args, state, control, **kw)
        self._t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if self._active(state):
            self.inner.on_pre_optimizer_step(args, state, control, **kw)

    def on_step_end(self, args, state, control, **kw):
        active = self._active(state, offset=0)
        if active:
            self.inner.on_step_end(args, state, control, **kw)
        self.times[active].append(time.perf_counter() - self._t0)


def measure(cfg, criterion, steps, batch, seq, warmup=4, state_dtype="float32"):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, max_position_embeddings=seq))
    inner = ImportanceCallback(ImportanceConfig(criterion=criterion, state_dtype=state_dtype))
    timer = Alternating(inner)
    args = TrainingArguments("/tmp/overhead", max_steps=steps + warmup, per_device_train_batch_size=batch,
                             learning_rate=1e-4, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             logging_strategy="no")
    ds = TokenDataset(n=(steps + warmup) * batch, seq_len=seq, vocab_size=cfg["vocab_size"])
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[timer]).train()
    on, off = timer.times[True][warmup // 2:], timer.times[False][warmup // 2:]
    tracked = sum(t.param.numel() for t in inner.accumulator.tracked)
    return statistics.median(on), statistics.median(off), inner.state_bytes() / tracked, tracked


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="tiny")
    p.add_argument("--steps", type=int, default=40, help="measured steps (half with, half without the callback)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--repeats", type=int, default=3,
                   help="Trainer runs per row, interleaved across rows; the ratio moves by a few points between "
                        "runs (default: %(default)s)")
    args = p.parse_args()
    rows = [(c, "float32") for c in args.criteria.split(",")] + [("temporal_magnitude", "bfloat16")]
    runs = {row: [] for row in rows}
    tracked = 0
    for _ in range(args.repeats):  # round-robin: every row's runs are spread over the same stretch of time
        for criterion, dtype in rows:
            on, off, bpw, tracked = measure(MODELS[args.model], criterion, args.steps, args.batch, args.seq,
                                            state_dtype=dtype)
            runs[criterion, dtype].append((on, off, bpw))
    print(f"model={args.model} steps={args.steps} batch={args.batch}x{args.seq} torch threads={torch.get_num_threads()} "
          f"runs per row={args.repeats}: median [min-max] over the runs; ratio = median active / median inactive "
          "step within one run")
    print("| criterion | step with (s) | step without (s) | ratio | state bytes / tracked weight |")
    print("| --- | --- | --- | --- | --- |")
    for (criterion, dtype), r in runs.items():
        name = criterion if dtype == "float32" else f"{criterion}, {dtype} state"
        on, off, ratio = [x[0] for x in r], [x[1] for x in r], [x[0] / x[1] for x in r]
        print(f"| {name} | {statistics.median(on):.4f} | {statistics.median(off):.4f} | "
              f"{statistics.median(ratio):.3f}x [{min(ratio):.3f}-{max(ratio):.3f}] | {r[0][2]:.3f} |")
    print(f"(tracked weights: {tracked:,})")


if __name__ == "__main__":
    main()
