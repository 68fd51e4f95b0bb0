"""Step-time overhead of ImportanceCallback, measured side by side in one run.

For each criterion, one Trainer run alternates steps with the callback active and inactive (an inactive step
skips every callback event, has no training-token counter hook and, for activation criteria, no forward hooks
registered), so both halves see the same machine noise. The ratio is median(active) / median(inactive) over the measured steps (warm-up excluded).
Differences of step medians move by several percent between runs on these machines, so each row also reports the
time spent inside the callback's events and its forward hooks' statistic, as a share of the active steps' time,
measured in the same run (it does not depend on the inactive steps).

Rows `criterion:N` sample every N steps (`every_n_steps=N`): the callback is active on every step (alternating
would skip the sampled steps), so only the share inside the callback is reported, averaged over all steps.
Every row is measured in `--repeats` runs, taken round-robin over the rows; reported as median [min-max] over
the runs. Also reports bytes of accumulator state per tracked weight.

    OMP_NUM_THREADS=2 python benchmarks/callback_overhead.py --model tiny --steps 40 --repeats 3
    OMP_NUM_THREADS=2 python benchmarks/callback_overhead.py --model 100m --steps 16 --repeats 3
    OMP_NUM_THREADS=2 python benchmarks/callback_overhead.py --model 100m --steps 16 --repeats 2 \
        --criteria sparsegpt,sparsegpt:4,sparsegpt:16
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
CRITERIA = ["temporal_magnitude", "magnitude", "movement", "taylor", "fisher", "wanda", "sparsegpt"]


class Alternating(TrainerCallback):
    """Forwards step events to `inner` on odd steps only (every step with `always=True`) and times every step end
    to end, and the time spent inside `inner`'s events and its collector's statistic."""

    def __init__(self, inner: ImportanceCallback, always: bool = False):
        self.inner, self.always = inner, always
        self.times = {True: [], False: []}
        self.inside = {True: [], False: []}  # seconds inside the callback, per step
        self._t0 = None
        self._in = 0.0

    def _active(self, state, offset=1):
        return self.always or (state.global_step + offset) % 2 == 1

    def _timed(self, fn, *args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            self._in += time.perf_counter() - t0

    def on_train_begin(self, args, state, control, **kw):
        self.inner.on_train_begin(args, state, control, **kw)
        collector = self.inner.accumulator.collector
        if collector is not None:  # the forward hooks' work is the statistic of each input
            statistic = collector.statistic
            collector.statistic = lambda x, mask: self._timed(statistic, x, mask)
        counter = self.inner.counter  # its hook is timed too (registered again, timed, on the active steps)
        count = counter._count
        counter.remove()
        counter._count = lambda module, a, kwargs: self._timed(count, module, a, kwargs)

    def on_step_begin(self, args, state, control, **kw):
        active = self._active(state)
        collector = self.inner.accumulator.collector  # activation criteria: no hooks on inactive steps
        if collector is not None:
            (collector.register if active else collector.remove)()
        counter = self.inner.counter  # the training-token counter's forward pre-hook: off on inactive steps too
        if not active:
            counter.remove()
        elif counter._handle is None:
            counter._handle = kw["model"].register_forward_pre_hook(counter._count, with_kwargs=True)
        self._t0, self._in = time.perf_counter(), 0.0
        if active:
            self._timed(self.inner.on_step_begin, args, state, control, **kw)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if self._active(state):
            self._timed(self.inner.on_pre_optimizer_step, args, state, control, **kw)

    def on_step_end(self, args, state, control, **kw):
        active = self._active(state, offset=0)
        if active:
            self._timed(self.inner.on_step_end, args, state, control, **kw)
        self.times[active].append(time.perf_counter() - self._t0)
        self.inside[active].append(self._in)

    def on_train_end(self, args, state, control, **kw):
        # Not forwarded (it would write the importance, which no measurement reads); only the hooks are removed, so a
        # model reused after `measure` runs without them.
        collector = self.inner.accumulator.collector
        if collector is not None:
            collector.remove()
        self.inner.counter.remove()


def measure(cfg, criterion, steps, batch, seq, warmup=4, state_dtype="float32", every_n_steps=1):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, max_position_embeddings=seq))
    inner = ImportanceCallback(ImportanceConfig(criterion=criterion, state_dtype=state_dtype,
                                                every_n_steps=every_n_steps))
    timer = Alternating(inner, always=every_n_steps > 1)
    args = TrainingArguments("/tmp/overhead", max_steps=steps + warmup, per_device_train_batch_size=batch,
                             learning_rate=1e-4, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             logging_strategy="no")
    ds = TokenDataset(n=(steps + warmup) * batch, seq_len=seq, vocab_size=cfg["vocab_size"])
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[timer]).train()
    skip = warmup if every_n_steps > 1 else warmup // 2
    on, off = timer.times[True][skip:], timer.times[False][skip:]
    share = sum(timer.inside[True][skip:]) / sum(on)
    tracked = sum(t.param.numel() for t in inner.accumulator.tracked)
    off_median = statistics.median(off) if off else float("nan")
    return statistics.median(on), off_median, inner.state_bytes() / tracked, tracked, share


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
    rows = [(c, "float32") for c in args.criteria.split(",")]
    if "temporal_magnitude" in args.criteria.split(","):
        rows.append(("temporal_magnitude", "bfloat16"))
    runs = {row: [] for row in rows}
    tracked = 0
    for _ in range(args.repeats):  # round-robin: every row's runs are spread over the same stretch of time
        for criterion, dtype in rows:
            name, _, every = criterion.partition(":")
            on, off, bpw, tracked, share = measure(MODELS[args.model], name, args.steps, args.batch, args.seq,
                                                   state_dtype=dtype, every_n_steps=int(every or 1))
            runs[criterion, dtype].append((on, off, bpw, share))
    print(f"model={args.model} steps={args.steps} batch={args.batch}x{args.seq} torch threads={torch.get_num_threads()} "
          f"runs per row={args.repeats}: median [min-max] over the runs; ratio = median active / median inactive "
          "step within one run")
    print("| criterion | step with (s) | step without (s) | ratio | inside the callback (share of step) "
          "| state bytes / tracked weight |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (criterion, dtype), r in runs.items():
        name = criterion if dtype == "float32" else f"{criterion}, {dtype} state"
        name = name.replace(":", ", every_n_steps=")
        on, off, shares = [x[0] for x in r], [x[1] for x in r], [x[3] for x in r]
        ratio = [x[0] / x[1] for x in r if x[1] == x[1]]  # NaN when every step is active
        ratio_text = f"{statistics.median(ratio):.3f}x [{min(ratio):.3f}-{max(ratio):.3f}]" if ratio else "-"
        off_text = f"{statistics.median(off):.4f}" if ratio else "-"
        print(f"| {name} | {statistics.median(on):.4f} | {off_text} | {ratio_text} | "
              f"{100 * statistics.median(shares):.1f}% [{100 * min(shares):.1f}-{100 * max(shares):.1f}] | "
              f"{r[0][2]:.3f} |")
    print(f"(tracked weights: {tracked:,})")


if __name__ == "__main__":
    main()
