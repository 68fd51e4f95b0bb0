"""The cross term under DDP: run by `tests/train/test_cross_wiring.py` with `torchrun --nproc_per_node 2` (gloo, CPU).

Two ranks of 2 windows per step against one process of 4 (`run(..., batch=4)`, in-process): each rank writes the
cross terms summed over ranks (a collective), their token counts, the final masks and the run's `training_record()`
(optimizer steps, real tokens summed over ranks: a collective) to `OUT/rank{r}.safetensors`.

`python -m tests.ddp_cross OUT --hold-refit PRUNED` (run by `tests/train/test_hold_refit.py`): the held phase's
re-fit (its edits: the teacher minus the held weights) instead (`run_hold_refit`), the masks of `PRUNED` held; the
re-fits each rank ran (`MaskHolder.solves`) go to `OUT/solves{r}.json`.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from hf_weightprune import DistillConfig, ImportanceCallback, ImportanceConfig
from hf_weightprune.testing import tiny_llama
from hf_weightprune.train.schedule import PruneSchedule
from tests.helpers import end_process_group, training_args
from tests.train.test_cross_wiring import Padded

HOLD_STEPS, REFIT = 6, 4  # the re-fit reads H~ and C of steps 1..4; steps 5 and 6 run on the re-fitted weights


def run(out: str, batch: int = 2) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    model = tiny_llama(seed=5)
    schedule = PruneSchedule(final_sparsity=0.5, start=1, end=3, every_n_steps=2, block_size=8, pruned_stream=True,
                             cross_term=True)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt"), schedule=schedule,
                            distill=DistillConfig(alpha=0.5, temperature=2.0))
    # lr=0: the weights move only by the OBS updates, so one process and two see the same models
    args = training_args(out, max_steps=6, per_device_train_batch_size=batch, learning_rate=0.0, seed=0,
                         save_strategy="no", logging_steps=100, include_num_input_tokens_seen="non_padding",
                         **({"ddp_backend": "gloo"} if batch == 2 else {}))
    trainer = Trainer(model=model, args=args, train_dataset=Padded(), callbacks=[cb])
    trainer.train()
    terms = cb._cross_terms()  # a collective: every rank calls it
    tensors = {f"cross.{n}": c.clone() for n, (c, _) in terms.items()}  # q/k/v alias one sum: one copy each
    tensors.update({f"tokens.{n}": torch.tensor(k) for n, (_, k) in terms.items()})
    tensors.update({f"mask.{n}": m.to(torch.uint8) for n, m in cb.mask_holder.masks.items()})
    tensors.update({f"training.{k}": torch.tensor(v) for k, v in cb.training_record().items()})
    tensors["trainer.tokens_seen"] = torch.tensor(trainer.state.num_input_tokens_seen)  # the Trainer's own count
    return tensors


class _AtRefit(TrainerCallback):
    """Listed before the `ImportanceCallback`: at the end of the re-fit step, what the re-fit reads (`H~` of every
    held weight, the cross terms summed over ranks: collectives, so every rank calls them)."""

    def __init__(self, cb):
        self.cb, self.tensors = cb, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == REFIT:
            imp = self.cb.importance()
            self.tensors.update({f"hessian.{n}": imp.state(n).clone() for n in self.cb.mask_holder.params})
            self.tensors.update({f"cross.{n}": c.clone() for n, (c, _) in self.cb._cross_terms().items()})


class _AfterRefit(TrainerCallback):
    """Listed after the `ImportanceCallback`: the held weights as the re-fit leaves them."""

    def __init__(self, cb):
        self.cb, self.tensors = cb, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == REFIT:
            self.tensors.update({f"refit.{n}": p.detach().clone() for n, p in self.cb.mask_holder.params.items()})


def run_hold_refit(out: str, pruned: str, batch: int = 2) -> dict[str, torch.Tensor]:
    """`PruneSchedule(mode="hold", refit_at=REFIT, cross_term=True)` of the pruned checkpoint `pruned` under
    distillation (the teacher: the dense `tiny_llama(seed=3)` it was pruned from), `HOLD_STEPS` steps of `batch`
    windows per rank. Returns `H~` and the cross terms the re-fit read, the weights it left (`refit.`), every weight
    at the end (`final.`), the masks and `refitted_at`."""
    torch.set_num_threads(1)
    student = AutoModelForCausalLM.from_pretrained(pruned)
    schedule = PruneSchedule(mode="hold", masks_from=pruned, refit_at=REFIT, cross_term=True, cross_alpha=1.0)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt"), schedule=schedule,
                            distill=DistillConfig(teacher=tiny_llama(seed=3), alpha=0.5, temperature=2.0))
    at, after = _AtRefit(cb), _AfterRefit(cb)
    # lr=0: the weights move only by the re-fit, so one process and two re-fit from the same H~ and C
    args = training_args(out, max_steps=HOLD_STEPS, per_device_train_batch_size=batch, learning_rate=0.0, seed=0,
                         save_strategy="no", logging_steps=100, **({"ddp_backend": "gloo"} if batch == 2 else {}))
    Trainer(model=student, args=args, train_dataset=Padded(), callbacks=[at, cb, after]).train()
    tensors = {**at.tensors, **after.tensors}
    tensors.update({f"final.{n}": p.detach().clone() for n, p in student.named_parameters()})
    tensors.update({f"mask.{n}": m.to(torch.uint8) for n, m in cb.mask_holder.masks.items()})
    tensors["refitted_at"] = torch.tensor(cb.mask_holder.refitted_at or -1)
    with open(os.path.join(out, f"solves{int(os.environ.get('RANK', 0))}.json"), "w") as f:
        json.dump(cb.mask_holder.solves, f)
    return tensors


if __name__ == "__main__":
    rank = int(os.environ.get("RANK", 0))
    if sys.argv[2:3] == ["--hold-refit"]:
        tensors = run_hold_refit(sys.argv[1], sys.argv[3])
    else:
        tensors = run(sys.argv[1])
    save_file(tensors, os.path.join(sys.argv[1], f"rank{rank}.safetensors"))
    end_process_group()
