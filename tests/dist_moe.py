"""DDP through the Trainer on a tiny Mixtral: run under `torchrun --nproc_per_node N` (gloo, CPU) by
`test_moe_distributed.py`.

`python -m tests.dist_moe OUT CRITERION...` trains tiny Mixtral for 4 steps on padded batches with the same global
batch (4) whatever N is, and writes `OUT/<criterion>/importance/` (expert slices and the router statistics).
"""

from __future__ import annotations

import os
import sys

from transformers import Trainer, TrainingArguments

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.testing import tiny_moe
from tests.collect.test_moe_callback import PaddedTokens
from tests.helpers import end_process_group

GLOBAL_BATCH, STEPS = 4, 4


def run(criterion: str, output_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    args = TrainingArguments(output_dir, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world,
                             learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, save_strategy="no",
                             logging_steps=100, disable_tqdm=True, ddp_backend="gloo" if world > 1 else None)
    callback = ImportanceCallback(ImportanceConfig(criterion=criterion))
    Trainer(model=tiny_moe("mixtral", seed=1), args=args, train_dataset=PaddedTokens(n=32),
            callbacks=[callback]).train()


def main(out: str, criteria: list[str]) -> None:
    for criterion in criteria:
        run(criterion, os.path.join(out, criterion))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    end_process_group()
