"""DDP through the Trainer: run under `torchrun --nproc_per_node N` (gloo, CPU) by `test_distributed.py`.

`python -m tests.dist_ddp OUT [--zero STAGE] [--units] CRITERION...` (any world size, 1 included) trains tiny Phi-3
for 6 steps with the same global batch (4) whatever N is (under DeepSpeed ZeRO-STAGE with `--zero`; gathering the
unit statistics of structured pruning too with `--units`), and writes for each criterion:
- `OUT/<criterion>-full/`: an uninterrupted run, checkpoints at steps 3 and 6, `importance/` at the end;
- `OUT/<criterion>-resume/`: resumed from the `checkpoint-3` copied there beforehand (if any), so a run of
  another world size can be continued here;
- `OUT/<criterion>-masks-rank<r>.safetensors`: `prune_` masks (sparsity 0.5) each rank derives from
  `cb.importance()`;
- `OUT/state_bytes.json`: accumulator bytes per rank per criterion.

With `--zero`, a DeepSpeed checkpoint only resumes under DeepSpeed, so the resume continues this launch's own
`checkpoint-3`; a criterion that DeepSpeed cannot serve records its error in `OUT/<criterion>-error.txt`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import Trainer

from hf_weightprune import ImportanceCallback, ImportanceConfig, load_importance
from hf_weightprune.config import PruneConfig
from hf_weightprune.distributed import rank_and_world
from hf_weightprune.prune.pruner import prune_
from hf_weightprune.testing import TokenDataset, tiny_phi3
from tests.helpers import end_process_group, training_args

GLOBAL_BATCH, STEPS = 4, 6


def deepspeed_config(stage: int) -> dict:
    # No "optimizer" block: the Trainer's torch AdamW is wrapped by ZeRO (DeepSpeed's own CPU Adam is a C++
    # extension that would be compiled on first use).
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def run(criterion: str, output_dir: str, resume: bool = False, zero: int | None = None, units: bool = False):
    world = int(os.environ.get("WORLD_SIZE", 1))  # the process group starts with TrainingArguments
    model = tiny_phi3(seed=1)
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion, units=units))
    args = training_args(output_dir, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world,
                         learning_rate=1e-2, seed=0, save_strategy="steps", save_steps=3, logging_steps=1,
                         ddp_backend="gloo" if world > 1 else None,
                         deepspeed=deepspeed_config(zero) if zero is not None else None)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=48, vocab_size=128, seed=0), callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume or None)
    return model, cb


def masks_of(model, imp) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    # OBS saliencies (sparsegpt) are compared per tensor, not across tensors
    scope = "row" if imp.criterion == "sparsegpt" else None
    prune_(model, imp, PruneConfig(sparsity=0.5, scope=scope), progress=False)
    return {n: (p != 0).to(torch.uint8) for n, p in model.named_parameters() if n in imp.shapes}


def main(out: str, criteria: list[str], zero: int | None = None, units: bool = False) -> None:
    state_bytes = {}
    for criterion in criteria:
        try:
            model, cb = run(criterion, os.path.join(out, f"{criterion}-full"), zero=zero, units=units)
        except ValueError as e:  # a refusal must come before any step or file
            if zero is None:
                raise
            rank, _ = rank_and_world()
            with open(os.path.join(out, f"{criterion}-error-rank{rank}.txt"), "w") as f:
                f.write(str(e))
            continue
        rank, world = rank_and_world()  # the Trainer sets up the process group
        state_bytes[criterion] = cb.state_bytes()
        imp = cb.importance()
        # Every rank sees the full importance, equal to what was written at the end of training.
        saved = load_importance(os.path.join(out, f"{criterion}-full"), model=model)
        for name in imp.names:
            torch.testing.assert_close(imp.scores[name], saved.scores[name], rtol=0, atol=0, msg=name)
        if units:  # the unit statistics too: every rank holds the all-reduced sums that were written
            mine, written = imp.unit_state(), saved.unit_state()
            assert mine.keys() == written.keys()
            for key in written:
                torch.testing.assert_close(mine[key].cpu(), written[key], rtol=0, atol=0, msg=key)
        save_file(masks_of(model, imp), os.path.join(out, f"{criterion}-masks-rank{rank}.safetensors"))
        resume_dir = os.path.join(out, f"{criterion}-resume")
        if zero is not None:
            if rank == 0:
                shutil.copytree(os.path.join(out, f"{criterion}-full", "checkpoint-3"),
                                os.path.join(resume_dir, "checkpoint-3"))
            torch.distributed.barrier()
        if os.path.isdir(os.path.join(resume_dir, "checkpoint-3")):
            run(criterion, resume_dir, resume=True, zero=zero, units=units)
    path = os.path.join(out, f"state_bytes-rank{rank}-of-{world}.json")
    with open(path, "w") as f:
        json.dump(state_bytes, f)


if __name__ == "__main__":
    argv = sys.argv[1:]
    stage = None
    if "--zero" in argv:
        i = argv.index("--zero")
        stage = int(argv[i + 1])
        del argv[i:i + 2]
    units = "--units" in argv
    argv = [a for a in argv if a != "--units"]
    main(argv[0], argv[1:], zero=stage, units=units)
    end_process_group()
