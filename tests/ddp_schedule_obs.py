"""Gradual pruning with OBS updates under DDP: run by `tests/train/test_schedule_obs.py` with `torchrun --nproc_per_node 2`
(gloo, CPU).

Each rank writes its final masks and weights to `OUT/rank{r}.safetensors`, and its report's reconstruction and the
tokens behind the Hessians to `OUT/rank{r}.json`.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Trainer

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.testing import TokenDataset, tiny_llama
from hf_weightprune.train.schedule import PruneSchedule
from tests.helpers import end_process_group, training_args


def main(out: str) -> None:
    torch.set_num_threads(1)
    model = tiny_llama(seed=5)
    schedule = PruneSchedule(final_sparsity=0.6, start=1, end=7, every_n_steps=2, block_size=8)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt"), schedule=schedule)
    args = training_args(out, max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2, seed=0,
                         save_strategy="no", logging_steps=100, ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=64, seed=1), callbacks=[cb])
    trainer.train()
    rank = trainer.args.process_index
    imp = cb.importance()  # a collective: every rank calls it
    name = next(iter(cb.mask_holder.masks))
    tensors = {f"mask.{n}": m.to(torch.uint8) for n, m in cb.mask_holder.masks.items()}
    tensors.update({f"weight.{n}": p.detach().clone() for n, p in model.named_parameters()})
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": trainer.args.world_size, "reconstruction": cb.pruning_report(model).reconstruction,
                   "tokens": int(imp.meta["tokens"][name])}, f)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()
