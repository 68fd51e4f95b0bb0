"""`TrainingCounter`: how long an [`ImportanceCallback`]'s training ran, counted while it ran, for `sparsity.json`.

A pruned model's card should say how much training recovered it (10 steps or 10,000): the optimizer steps and the
real training tokens (padding excluded) of the run, measured here rather than typed by the user.

- **Tokens**: a forward pre-hook on the model counts, for each forward in train mode (the `Trainer`'s training
  forwards; evaluation runs in eval mode, the distillation teacher is another module or runs the student's `forward`
  directly), the real tokens of its input as `include_num_input_tokens_seen="non_padding"` counts them:
  `attention_mask != 0` for a 2-D `[batch, seq]` mask; without one, the `input_ids` that are not the Trainer's
  `processing_class.pad_token_id` (when it has one), else every token of `input_ids` / `inputs_embeds` (packed,
  padding-free batches). The count stays on the device (no host synchronisation per forward).
- **Steps**: one per optimizer step (`on_step_end`).
- **Resume**: the counts (summed over ranks) ride in the `Trainer`'s own `trainer_state.json`, under
  `stateful_callbacks[<key>]`, folded in before every save: at a step's end when the Trainer will save, and after an
  evaluation (which may decide a `save_strategy="best"` save). A save decided later (by a callback listed after this
  one) finds stale counts in the state the Trainer wrote: `saved` then folds and writes them into that checkpoint's
  `trainer_state.json`. A resumed run reads them back from the checkpoint's state, so its counts are those of the
  whole run. The Trainer restores only `ExportableState` callbacks from that
  field: with `restore_callback_states_from_checkpoint=True` it logs that it ignores this entry, and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn

from .. import distributed as D
from ..io_utils import atomic_write_json
from .checkpoint import checkpoint_dir

logger = logging.getLogger(__name__)

STATE_KEY = "hf_weightprune.training"  # `TrainerState.stateful_callbacks` key; `[<name>]` for a named callback


def real_tokens(kwargs: dict[str, Any], args: tuple, pad_token_id: int | None = None) -> torch.Tensor | int:
    """Real tokens of one forward's input, as the Trainer's `include_num_input_tokens_seen="non_padding"` counts them:
    `attention_mask != 0` for a 2-D mask, else the `input_ids` other than `pad_token_id` (the Trainer's
    `processing_class`'s, when it has one), else every input token."""
    mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids", args[0] if args else None)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return (mask != 0).sum()
    if isinstance(ids, torch.Tensor):
        return (ids != pad_token_id).sum() if pad_token_id is not None else ids.numel()
    embeds = kwargs.get("inputs_embeds")
    return embeds.numel() // embeds.shape[-1] if isinstance(embeds, torch.Tensor) else 0


class TrainingCounter:
    """Optimizer steps and real training tokens of a `Trainer` run, exact across resumes (see the module docstring).

    Lifecycle, driven by the callback: `start(model, state)` on train begin, `step_end(state, control)` at each
    optimizer step's end, `fold(state)` after an evaluation, `stop(state)` on train end; `record()` any time after.

    Args:
        name (`str`, *optional*): the callback's `ImportanceConfig(name=...)`: each named callback keeps its own entry.
    """

    def __init__(self, name: str | None = None):
        self.key = STATE_KEY if name is None else f"{STATE_KEY}[{name}]"
        self.steps, self.tokens = 0, 0  # folded: `tokens` summed over the ranks, the same on each
        self._local: torch.Tensor | int = 0  # this rank's tokens since the last fold
        self._unknown: str | None = None  # why the counts do not cover the whole run
        self._handle = None
        self._pad_token_id: int | None = None

    def start(self, model: nn.Module, state, processing_class=None) -> None:
        """Count from zero, or from the counts the resumed checkpoint's `trainer_state.json` holds; hook `model`.
        `processing_class`: the Trainer's (the callback event's), whose `pad_token_id` marks padding in batches
        without an attention mask, as in the Trainer's own count."""
        self.steps, self.tokens, self._local, self._unknown = 0, 0, 0, None
        self._pad_token_id = getattr(processing_class, "pad_token_id", None)
        saved = (state.stateful_callbacks or {}).get(self.key) if state.global_step > 0 else None
        if isinstance(saved, dict) and saved.get("global_step") == state.global_step:
            self.steps, self.tokens = int(saved["steps"]), int(saved["tokens"])
        elif isinstance(saved, dict):  # written before `saved` existed, by a save decided after `step_end`
            self._unknown = (f"the run resumed at step {state.global_step} from a checkpoint that holds the training "
                             f"counts of step {saved.get('global_step')} only")
        elif state.global_step > 0:
            self._unknown = (f"the run resumed at step {state.global_step} from a checkpoint that holds no training "
                             "counts (written by an earlier hf-weightprune or without this callback)")
            logger.warning("ImportanceCallback: %s; training_record() will refuse to state the run's length",
                           self._unknown)
        self.remove()
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: nn.Module, args, kwargs) -> None:
        if module.training:
            self._local = self._local + real_tokens(kwargs, args, self._pad_token_id)

    def step_end(self, state, control) -> None:
        """One optimizer step ran; fold the counts into `state` when the Trainer is about to save it."""
        self.steps += 1
        if control.should_save:
            self.fold(state)

    def fold(self, state=None) -> None:
        """Add the tokens counted since the last fold, summed over the ranks (collective), and write the counts
        into `state` (rank 0's is the one the Trainer saves)."""
        local, self._local = int(self._local), 0
        self.tokens += D.all_reduce_int([local])[0]
        if state is not None and self._unknown is None:
            if state.stateful_callbacks is None:
                state.stateful_callbacks = {}
            state.stateful_callbacks[self.key] = {"global_step": state.global_step, "steps": self.steps,
                                                  "tokens": self.tokens}

    def saved(self, args, state) -> None:
        """The Trainer wrote `checkpoint-<global_step>`. A save decided after `step_end` (by a later callback) wrote
        the counts of an earlier fold: fold now (collective: the same decision on every rank) and put them into
        that checkpoint's `trainer_state.json` (rank 0, which wrote it), so that a resume from it knows the length."""
        entry = (state.stateful_callbacks or {}).get(self.key)
        if self._unknown is not None or (isinstance(entry, dict) and entry.get("global_step") == state.global_step):
            return
        self.fold(state)
        folder = checkpoint_dir(args, state)
        path = os.path.join(folder, "trainer_state.json") if folder is not None else None
        if path is not None and D.rank_and_world()[0] == 0 and os.path.isfile(path):
            with open(path) as f:
                written = json.load(f)
            written.setdefault("stateful_callbacks", {})[self.key] = state.stateful_callbacks[self.key]
            atomic_write_json(path, written)

    def stop(self, state) -> None:
        """Train end: fold the last steps' tokens and remove the hook."""
        self.fold(state)
        self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def record(self) -> dict[str, int]:
        """`{"steps", "tokens"}` of the whole run (collective under DDP).

        Raises:
            RuntimeError: no optimizer step has run yet.
            ValueError: the run resumed from a checkpoint without counts (its length is not known).
        """
        self.fold()  # every rank takes part, before any refusal
        if self._unknown is not None:
            raise ValueError(f"ImportanceCallback.training_record(): {self._unknown}; pass no training= to save_pruned")
        if not self.steps:
            raise RuntimeError("ImportanceCallback.training_record(): no optimizer step has run (call trainer.train() "
                               "first)")
        return {"steps": self.steps, "tokens": self.tokens}
