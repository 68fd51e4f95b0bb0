"""The cross term under DDP: run by `tests/train/test_cross_wiring.py` with `torchrun --nproc_per_node 2` (gloo, CPU).

Two ranks of 2 windows per step against one process of 4 (`run(..., batch=4)`, in-process): each rank writes the
cross terms summed over ranks (a collective), their token counts and the final masks to `OUT/rank{r}.safetensors`.
"""

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Trainer

from hf_weightprune import DistillConfig, ImportanceCallback, ImportanceConfig
from hf_weightprune.testing import tiny_llama
from hf_weightprune.train.schedule import PruneSchedule
from tests.helpers import training_args
from tests.train.test_cross_wiring import Padded


def run(out: str, batch: int = 2) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    model = tiny_llama(seed=5)
    schedule = PruneSchedule(final_sparsity=0.5, start=1, end=3, every_n_steps=2, block_size=8, pruned_stream=True,
                             cross_term=True)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt"), schedule=schedule,
                            distill=DistillConfig(alpha=0.5, temperature=2.0))
    # lr=0: the weights move only by the OBS updates, so one process and two see the same models
    args = training_args(out, max_steps=6, per_device_train_batch_size=batch, learning_rate=0.0, seed=0,
                         save_strategy="no", logging_steps=100, **({"ddp_backend": "gloo"} if batch == 2 else {}))
    Trainer(model=model, args=args, train_dataset=Padded(), callbacks=[cb]).train()
    terms = cb._cross_terms()  # a collective: every rank calls it
    tensors = {f"cross.{n}": c.clone() for n, (c, _) in terms.items()}  # q/k/v alias one sum: one copy each
    tensors.update({f"tokens.{n}": torch.tensor(k) for n, (_, k) in terms.items()})
    tensors.update({f"mask.{n}": m.to(torch.uint8) for n, m in cb.mask_holder.masks.items()})
    return tensors


if __name__ == "__main__":
    rank = int(os.environ.get("RANK", 0))
    save_file(run(sys.argv[1]), os.path.join(sys.argv[1], f"rank{rank}.safetensors"))
