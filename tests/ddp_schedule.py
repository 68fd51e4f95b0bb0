"""Gradual pruning under DDP: run by `tests/train/test_schedule.py` with `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank writes its final masks and weights to `OUT/rank{r}.safetensors` and the sparsity log to `OUT/rank{r}.json`.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.testing import TokenDataset, tiny_llama
from hf_weightprune.train.schedule import PruneSchedule
from tests.helpers import end_process_group, training_args


class ZerosAtUpdates(TrainerCallback):
    """Pruned elements per update step, counted on the weights themselves."""

    def __init__(self, holder):
        self.holder, self.zeros = holder, {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.holder.last_update_step == state.global_step:
            self.zeros[state.global_step] = sum(int((p == 0).sum()) for p in self.holder.params.values())


def main(out: str) -> None:
    torch.set_num_threads(1)
    model = tiny_llama(seed=5)
    # One global threshold (asked for explicitly: the default follows the criterion) so the test can count zeros.
    schedule = PruneSchedule(final_sparsity=0.7, start=1, end=7, every_n_steps=2, scope="global")
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"), schedule=schedule)
    probe = ZerosAtUpdates(cb.mask_holder)
    args = training_args(out, max_steps=8, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         learning_rate=1e-2, seed=0, save_strategy="no", logging_steps=100, ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=64, seed=1),
                      callbacks=[cb, probe])
    trainer.train()
    rank = trainer.args.process_index
    tensors = {f"mask.{n}": m.to(torch.uint8) for n, m in cb.mask_holder.masks.items()}
    tensors.update({f"weight.{n}": p.detach().clone() for n, p in model.named_parameters()})
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": trainer.args.world_size, "zeros": probe.zeros,
                   "numel": sum(p.numel() for p in cb.mask_holder.params.values())}, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()
