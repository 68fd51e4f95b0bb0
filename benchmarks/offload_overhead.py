"""Step time with and without `ImportanceCallback(offload_to_cpu=True)` on a ~134M-parameter Llama.

On a CPU-only machine the weights and the state are both in CPU memory, so this measures only the cost of the
chunked copy path (`_update_offloaded`), not a device-to-host transfer.

    OMP_NUM_THREADS=1 python benchmarks/offload_overhead.py
"""

import statistics
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_weightprune import ImportanceCallback
from hf_weightprune.testing import TokenDataset

CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=12, max_position_embeddings=128)
STEPS, WARMUP = 4, 1


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t)


def run(callback):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=STEPS, per_device_train_batch_size=1, report_to=[], use_cpu=True,
                                 save_strategy="no", disable_tqdm=True, logging_steps=100)
        # the timer is last, so its on_step_end includes our sampling (on_step_end, after the optimizer step)
        callbacks = ([callback] if callback else []) + [timer]
        Trainer(model=model, args=args, train_dataset=TokenDataset(n=8, seq_len=64, vocab_size=32000),
                callbacks=callbacks).train()
    sample = None
    if callback is not None:  # the sampling call alone, repeated
        t0 = time.perf_counter()
        for t in range(1, 6):
            callback._sample(t, t, use_grads=False)
        sample = (time.perf_counter() - t0) / 5
    return model, statistics.median(timer.times[WARMUP:]), sample


if __name__ == "__main__":
    for name, cb in [("no callback", None), ("default", ImportanceCallback()),
                     ("offload_to_cpu", ImportanceCallback(offload_to_cpu=True))]:
        model, step, sample = run(cb)
        tracked = sum(t.param.numel() for t in cb.accumulator.tracked) if cb else 0
        extra = f", sample {sample * 1e3:.0f} ms ({tracked / 1e6:.1f}M tracked)" if cb else ""
        print(f"{name:15s} params {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M: "
              f"median step {step:.2f} s{extra}")
