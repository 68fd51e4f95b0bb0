"""Step time with and without `ImportanceCallback(offload_to_cpu=True)` on a ~134M-parameter Llama.

On a CPU-only machine the weights and the state are both in CPU memory, so this measures only the cost of the
chunked copy path, not a device-to-host transfer.

One Trainer run rotates its steps over three configurations (no callback, the default callback, the offloaded
one; `Rotating` forwards a step's events only to that step's callback), so all three see the same machine load.
Reported: median [min-max] step time per configuration over `--steps` measured steps each (one warm-up round
excluded), its ratio to the steps without a callback, and one sampling call of each callback alone, the two
alternating.

    OMP_NUM_THREADS=1 python benchmarks/offload_overhead.py [--steps 4] [--sample-repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.testing import TokenDataset

CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=12, max_position_embeddings=128)


class Rotating(TrainerCallback):
    """Step k forwards its step events to `inners[k % len(inners)]` (None: no callback) and times the step."""

    def __init__(self, inners: list[ImportanceCallback | None]):
        self.inners = inners
        self.times: list[list[float]] = [[] for _ in inners]
        self._t0 = 0.0

    def _inner(self, step: int) -> ImportanceCallback | None:
        return self.inners[step % len(self.inners)]

    def on_train_begin(self, args, state, control, **kw):
        for cb in self.inners:
            if cb is not None:
                cb.on_train_begin(args, state, control, **kw)

    def on_step_begin(self, args, state, control, **kw):
        if (cb := self._inner(state.global_step + 1)) is not None:
            cb.on_step_begin(args, state, control, **kw)
        self._t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if (cb := self._inner(state.global_step + 1)) is not None:
            cb.on_pre_optimizer_step(args, state, control, **kw)

    def on_optimizer_step(self, args, state, control, **kw):
        if (cb := self._inner(state.global_step + 1)) is not None:
            cb.on_optimizer_step(args, state, control, **kw)

    def on_step_end(self, args, state, control, **kw):
        # global_step was already incremented: this is the step that just ran
        if (cb := self._inner(state.global_step)) is not None:
            cb.on_step_end(args, state, control, **kw)
        self.times[state.global_step % len(self.inners)].append(time.perf_counter() - self._t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="measured steps per configuration (default: %(default)s)")
    p.add_argument("--sample-repeats", type=int, default=5, help="sampling calls per callback (default: %(default)s)")
    a = p.parse_args()
    names = ["no callback", "default", "offload_to_cpu"]
    # temporal_magnitude: a weight-shaped state, what offloading moves; distinct names: two callbacks on one Trainer
    # may not share an importance folder
    inners = [None, ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", name="default")),
              ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", name="offload"), offload_to_cpu=True)]
    rotating = Rotating(inners)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    steps = (a.steps + 1) * len(inners)  # + one warm-up round
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=1, report_to=[], use_cpu=True,
                                 save_strategy="no", disable_tqdm=True, logging_steps=10**6)
        Trainer(model=model, args=args, train_dataset=TokenDataset(n=steps, seq_len=64, vocab_size=32000),
                callbacks=[rotating]).train()
    sample = {1: [], 2: []}
    for t in range(1, a.sample_repeats + 1):  # alternate, so both see the same load
        for i in (1, 2):
            t0 = time.perf_counter()
            inners[i].accumulator.sample(t, t, use_grads=False)
            sample[i].append(time.perf_counter() - t0)
    # times[k] holds the steps with global_step % 3 == k (configuration k); steps 1..3 are the warm-up round
    by_config = {i: rotating.times[i][1:] for i in range(3)}
    off = statistics.median(by_config[0])
    tracked = sum(t.param.numel() for t in inners[1].accumulator.tracked)
    print(f"Llama {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params ({tracked / 1e6:.1f}M tracked), "
          f"batch 1x64, {a.steps} measured steps per configuration, torch threads {torch.get_num_threads()}")
    for i, name in enumerate(names):
        ts = by_config[i]
        line = (f"{name:15s} step {statistics.median(ts):.2f} s [{min(ts):.2f}-{max(ts):.2f}], "
                f"{statistics.median(ts) / off:.3f}x the steps without")
        if i:
            s = sample[i]
            line += f"; one sampling call {statistics.median(s) * 1e3:.0f} ms [{min(s) * 1e3:.0f}-{max(s) * 1e3:.0f}]"
        print(line)


if __name__ == "__main__":
    main()
