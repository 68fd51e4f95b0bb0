"""The schedule's solves shared across ranks: run by `tests/train/test_sharded_solves.py` with
`torchrun --nproc_per_node 2` (gloo, CPU).

`python -m tests.ddp_solves OUT`: a gradual OBS schedule with the cross term (so each update also propagates the
weights) and a re-fit after it (`run`), 2 windows per rank; `run(OUT, batch=4)` is the same in one process. Each rank
writes its masks and every weight to `OUT/rank{r}.safetensors` and the solves it ran (`MaskHolder.solves`) with
`refitted_at` to `OUT/rank{r}.json`.

`python -m tests.ddp_solves OUT --collectives` (`collectives`): what every rank raises when only rank 1 fails inside
`distributed.same_error_on_every_rank`, a `ValueError` and then another kind, and what rank 1's broadcast of a strided
view (an expert slice of an interleaved fused parameter) leaves in rank 0's, to `OUT/collectives{r}.json`.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import Trainer

from hf_weightprune import DistillConfig, ImportanceCallback, ImportanceConfig
from hf_weightprune import distributed as D
from hf_weightprune.testing import tiny_llama
from hf_weightprune.train.schedule import PruneSchedule
from tests.helpers import end_process_group, training_args
from tests.train.test_cross_wiring import Padded

UPDATES, REFIT = (1, 3), 5  # mask updates (OBS sweeps) at steps 1 and 3, the re-fit at step 5, of 6 steps


def run(out: str, batch: int = 2) -> tuple[dict[str, torch.Tensor], dict]:
    torch.set_num_threads(1)
    model = tiny_llama(seed=5)
    schedule = PruneSchedule(final_sparsity=0.5, start=UPDATES[0], end=UPDATES[1], every_n_steps=2, block_size=8,
                             refit_at=REFIT, cross_term=True)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt"), schedule=schedule,
                            distill=DistillConfig(alpha=0.5, temperature=2.0))
    # lr=0: the weights move only by the sweeps and the re-fit, so one process and two see the same models
    args = training_args(out, max_steps=6, per_device_train_batch_size=batch, learning_rate=0.0, seed=0,
                         save_strategy="no", logging_steps=100, **({"ddp_backend": "gloo"} if batch == 2 else {}))
    Trainer(model=model, args=args, train_dataset=Padded(), callbacks=[cb]).train()
    holder = cb.mask_holder
    tensors = {f"mask.{n}": m.to(torch.uint8) for n, m in holder.masks.items()}
    tensors.update({f"weight.{n}": p.detach().clone() for n, p in model.named_parameters()})
    return tensors, {"solves": holder.solves, "refitted_at": holder.refitted_at, "reconstruction": holder.reconstruction}


def collectives(out: str) -> None:
    """Rank 1 alone fails in the block; every rank records what it raised (the other rank must not hang)."""
    dist.init_process_group("gloo")
    rank, caught = dist.get_rank(), []
    for kind in (ValueError, KeyError):
        try:
            with D.same_error_on_every_rank():
                if rank == 1:
                    raise kind("w1: its input Hessian is not positive definite")
        except Exception as e:
            caught.append([type(e).__name__, str(e)])
    with D.same_error_on_every_rank():  # no failure: nothing raised, and the collectives after it still line up
        pass
    caught.append(D.all_reduce_int([1])[0])
    fused = torch.full((2, 6, 3), float(rank))
    # every other row of expert 1 (through a contiguous copy, as NCCL needs): rank 1's values land in that view only
    D.broadcast_(fused[1, 1::2], 1)
    caught.append(fused.sum(dim=(1, 2)).tolist())
    with open(os.path.join(out, f"collectives{rank}.json"), "w") as f:
        json.dump(caught, f)


if __name__ == "__main__":
    rank = int(os.environ.get("RANK", 0))
    if sys.argv[2:3] == ["--collectives"]:
        collectives(sys.argv[1])
    else:
        tensors, record = run(sys.argv[1])
        save_file(tensors, os.path.join(sys.argv[1], f"rank{rank}.safetensors"))
        with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    end_process_group()
