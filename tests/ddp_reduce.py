"""What a schedule's solves move between ranks: run by `tests/train/test_ddp_reduce.py` with `torchrun
--nproc_per_node 2` (gloo, CPU).

`python -m tests.ddp_reduce OUT CASE`: a gradual OBS schedule (`CASES[CASE]`: the statistic restarted at each mask
change or kept accumulating across updates, layer or global scope, a re-fit after the last update), 2 windows per rank;
`run(OUT, CASE, batch=4)` is the same in one process. Each rank writes its masks and every weight to
`OUT/rank{r}.safetensors` and, per update or re-fit step, the collectives it ran (`distributed.COLLECTIVES`, counted
from the step's begin to the end of the callback's `on_step_end`) with what the statistics weigh (every tracked
weight's buffer, and one per distinct input; the cross terms, one per distinct input; the scores) and what the old
read-outs (`cb.importance()`, `cb._cross_terms()`: every statistic all-reduced to every rank) and a checkpoint's
`accumulator.state_dict()` move, measured at the step after the last one, to `OUT/rank{r}.json`.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback

from hf_weightprune import DistillConfig, ImportanceCallback, ImportanceConfig
from hf_weightprune import distributed as D
from hf_weightprune.testing import tiny_llama
from hf_weightprune.train.schedule import PruneSchedule
from tests.helpers import end_process_group, training_args
from tests.train.test_cross_wiring import Padded

MAX_STEPS, REFIT = 7, 6
CASES = {
    # three updates (1, 3, 5) on the statistic gathered since step 1, re-fit at 6
    "accumulate": dict(final_sparsity=0.5, start=1, end=5, every_n_steps=2, scope="layer", refit_at=REFIT),
    # two updates, each on the pruned model's inputs since the last (restarted), a global threshold, re-fit at 6
    "stream": dict(final_sparsity=0.3, start=1, end=3, every_n_steps=2, scope="global", pruned_stream=True,
                   refit_at=REFIT),
    # the same under distillation, with the dense-to-pruned cross term (down_proj's 64 inputs skipped) in the sweeps
    # and the re-fit
    "cross": dict(final_sparsity=0.3, start=1, end=3, every_n_steps=2, scope="global", pruned_stream=True,
                  refit_at=REFIT, cross_term=True, cross_alpha=1.0, cross_max_in_features=32),
}


def _copy(counts):
    return {k: dict(v) for k, v in counts.items()}


class Counted(TrainerCallback):
    """The collectives of each update / re-fit step (listed after the `ImportanceCallback`, so its `on_step_end` is in)."""

    def __init__(self, cb):
        self.cb, self.steps, self.start, self.old, self.old_cross, self.save = cb, {}, None, None, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = _copy(D.COLLECTIVES)

    def on_step_end(self, args, state, control, **kwargs):
        t, holder = state.global_step, self.cb.mask_holder
        if t == holder.last_update_step or t == holder.refitted_at:
            self.steps[t] = {k: {kind: D.COLLECTIVES[k][kind] - self.start[k].get(kind, 0) for kind in D.COLLECTIVES[k]}
                             for k in D.COLLECTIVES}
        if t == MAX_STEPS:  # what reading every statistic on every rank moves (what every update did before)
            before = _copy(D.COLLECTIVES)
            self.cb.importance()
            self.old = {kind: D.COLLECTIVES["bytes"][kind] - before["bytes"].get(kind, 0) for kind in D.COLLECTIVES["bytes"]}
            before = _copy(D.COLLECTIVES)
            self.cb._cross_terms()  # every cross term on every rank, as every update and re-fit did before
            self.old_cross = D.COLLECTIVES["bytes"]["all_reduce"] - before["bytes"].get("all_reduce", 0)
            before = _copy(D.COLLECTIVES)
            self.cb.accumulator.state_dict()  # what a checkpoint sums (every rank calls it)
            self.save = {kind: D.COLLECTIVES["bytes"][kind] - before["bytes"].get(kind, 0) for kind in D.COLLECTIVES["bytes"]}


def run(out: str, case: str, batch: int = 2) -> tuple[dict[str, torch.Tensor], dict]:
    torch.set_num_threads(1)
    model = tiny_llama(seed=5)
    schedule = PruneSchedule(block_size=8, **CASES[case])
    distill = DistillConfig(alpha=0.5, temperature=2.0) if schedule.cross_term else None
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt"), schedule=schedule, distill=distill)
    counted = Counted(cb)
    # lr=0: the weights move only by the sweeps and the re-fit, so one process and two see the same models
    args = training_args(out, max_steps=MAX_STEPS, per_device_train_batch_size=batch, learning_rate=0.0, seed=0,
                         save_strategy="no", logging_steps=100, **({"ddp_backend": "gloo"} if batch == 2 else {}))
    Trainer(model=model, args=args, train_dataset=Padded(), callbacks=[cb, counted]).train()
    holder, states = cb.mask_holder, cb.accumulator.states
    tensors = {f"mask.{n}": m.to(torch.uint8) for n, m in holder.masks.items()}
    tensors.update({f"weight.{n}": p.detach().clone() for n, p in model.named_parameters()})
    distinct = {n for n in states if not n.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight"))}
    cross = cb.accumulator.cross.sums if cb.accumulator.cross is not None else {}  # by the first weight of an input
    return tensors, {"steps": counted.steps, "old": counted.old, "old_cross": counted.old_cross, "save": counted.save,
                     "cross_bytes": sum(c.numel() * c.element_size() for c in cross.values()),
                     "score_bytes": sum(4 * (p.numel() + p.numel() % 2) for p in holder.params.values()),
                     "solves": holder.solves,
                     "refitted_at": holder.refitted_at, "num_updates": holder.num_updates,
                     "state_bytes": sum(s.numel() * s.element_size() for s in states.values()),
                     "distinct_bytes": sum(states[n].numel() * states[n].element_size() for n in distinct)}


if __name__ == "__main__":
    rank = int(os.environ.get("RANK", 0))
    tensors, record = run(sys.argv[1], sys.argv[2])
    save_file(tensors, os.path.join(sys.argv[1], f"rank{rank}.safetensors"))
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    end_process_group()
