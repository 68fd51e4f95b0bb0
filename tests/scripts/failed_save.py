"""Train a tiny Llama while writes of the importance fail with EFBIG (as writes to a full disk fail with ENOSPC).

Run as `python -m tests.scripts.failed_save OUTPUT_DIR {save,train_end} {raise,warn}` with stdout and stderr on
pipes: the file-size limit (RLIMIT_FSIZE) is process-wide, so in the test process it would also fail pytest's own
writes to a log or capture file past the limit. Prints one JSON line: the error `train()` raised (or null) and the
warnings the package logged.
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import sys

from transformers import Trainer, TrainerCallback

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.testing import TokenDataset, tiny_llama
from tests.helpers import training_args

LIMIT = 16 * 1024  # bytes; the tiny model's importance is ~300 KB


class FileSizeLimit(TrainerCallback):
    """While armed, writes past LIMIT bytes fail with EFBIG.

    The arming instance moves itself right before ImportanceCallback, so it arms just before the importance is
    written; a second instance placed after it disarms before the Trainer writes its own checkpoint files."""

    def __init__(self, trainer, importance_cb, event, arm):
        self.trainer, self.importance_cb, self.event, self.arm = trainer, importance_cb, event, arm

    def on_train_begin(self, args, state, control, **kwargs):
        if self.arm:
            cbs = self.trainer.callback_handler.callbacks
            cbs.remove(self)
            cbs.insert(cbs.index(self.importance_cb), self)

    def _act(self, state):
        if self.event == "save" and state.global_step != 2:
            return
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT if self.arm else hard, hard))

    def on_step_end(self, args, state, control, **kwargs):
        # A checkpoint's importance is written in on_step_end, before the Trainer's own checkpoint files.
        if self.event == "save":
            self._act(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.event == "train_end":
            self._act(state)


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main(output_dir: str, event: str, on_save_error: str) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    warnings = Warnings()
    logging.getLogger("hf_weightprune").addHandler(warnings)
    model = tiny_llama(seed=23, hidden_size=64, intermediate_size=128)
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"), on_save_error=on_save_error)
    args = training_args(output_dir, max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
                         logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=16), callbacks=[cb])
    trainer.add_callback(FileSizeLimit(trainer, cb, event, arm=True))
    trainer.add_callback(FileSizeLimit(trainer, cb, event, arm=False))
    error = None
    try:
        trainer.train()
    except Exception as e:  # reported to the test, which checks its type and message
        error = f"{type(e).__name__}: {e}"
    print(json.dumps({"error": error, "warnings": warnings.messages}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
