"""What a run logs: named callbacks keep their curves apart without transformers' duplicate-callback warning, and
under distillation the plain cross-entropy is logged beside the (mixed) `loss`."""

import copy
import logging
import os

import pytest
import torch
from transformers import Trainer

from hf_weightprune import DistillConfig, ImportanceCallback, ImportanceConfig, PruneSchedule
from hf_weightprune.testing import TokenDataset, tiny_llama
from tests.helpers import training_args


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _args(out, **kw):
    kw = {"max_steps": 4, "logging_steps": 2, **kw}
    return training_args(out, per_device_train_batch_size=4, save_strategy="no", seed=0, **kw)


def _duplicate_warnings(build):
    """Warnings of `transformers.trainer_callback` while `build()` makes a Trainer (its handler, not propagation:
    transformers' root logger may not propagate)."""
    handler, log = Captured(), logging.getLogger("transformers.trainer_callback")
    log.addHandler(handler)
    try:
        trainer = build()
    finally:
        log.removeHandler(handler)
    return trainer, [m for m in handler.messages if "there is already one" in m]


def test_named_callbacks_log_apart_and_add_without_the_duplicate_warning(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_llama(seed=3)
    data = TokenDataset(n=16, vocab_size=model.config.vocab_size)
    # The control: transformers warns for two callbacks of one class (two unnamed ones, refused later by us).
    _, control = _duplicate_warnings(lambda: Trainer(model=model, args=_args(tmp_path / "control", report_to=[]),
                                                     train_dataset=data,
                                                     callbacks=[ImportanceCallback(), ImportanceCallback()]))
    assert len(control) == 1

    tm = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", name="tm"),
                            schedule=PruneSchedule(final_sparsity=0.5, start=1, end=3, every_n_steps=1))
    wanda = ImportanceCallback(ImportanceConfig(criterion="wanda", name="wanda"), distill=DistillConfig(alpha=0.5))
    plain = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    trainer, warned = _duplicate_warnings(lambda: Trainer(
        model=model, args=_args(tmp_path / "run", report_to=["tensorboard"]), train_dataset=data,
        callbacks=[tm, wanda, plain]))
    assert warned == []
    assert isinstance(tm, ImportanceCallback) and type(tm).__name__ == "ImportanceCallback[tm]"
    assert "ImportanceCallback[wanda]" in trainer.callback_handler.callback_list
    for cb in (tm, wanda, plain):
        cb.attach(trainer)
    trainer.train()

    history = trainer.state.log_history
    last = {}
    for entry in history:
        last.update(entry)
    assert last["importance/tm/samples"] == 4 and last["importance/wanda/samples"] == 4
    assert last["importance/samples"] == 4  # an unnamed callback keeps today's keys
    assert last["pruning/tm/sparsity"] == pytest.approx(tm.mask_holder.sparsity)
    assert last["pruning/tm/target_sparsity"] == 0.5
    assert "distill/wanda/kl" in last and "distill/wanda/ce" in last
    named = [k for entry in history for k in entry if k.startswith(("importance/tm/", "importance/wanda/"))]
    assert {"importance/tm/down_proj/mean", "importance/wanda/down_proj/frac_below"} <= set(named)
    # No key of one callback is logged by another: the unnamed one's entries hold no name, the named ones no bare key.
    for entry in history:
        groups = {k.split("/")[1] in ("tm", "wanda") for k in entry if k.startswith(("importance/", "pruning/"))}
        assert len(groups) <= 1

    runs = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / "run") for f in files if "tfevents" in f]
    acc = EventAccumulator(os.path.dirname(runs[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/importance/tm/samples", "train/importance/wanda/samples", "train/importance/samples",
            "train/pruning/tm/sparsity", "train/distill/wanda/ce", "train/loss"} <= tags
    # tm's schedule asks for a log at each mask update (steps 1-3), so every step is logged, by every callback.
    for name in ("tm", "wanda"):
        assert [(e.step, e.value) for e in acc.Scalars(f"train/importance/{name}/samples")] == [
            (s, float(s)) for s in range(1, 5)]
    assert "train/pruning/sparsity" not in tags and "train/distill/kl" not in tags


def test_distillation_logs_the_plain_cross_entropy_beside_the_mixed_loss(tmp_path):
    """`loss` under distillation is `(1 - alpha) * CE + alpha * T^2 * KL`; `distill/ce` is the model's own loss."""
    model = tiny_llama(seed=4)
    initial = copy.deepcopy(model)
    data = TokenDataset(n=4, vocab_size=model.config.vocab_size)  # one batch of 4 equal-length rows per step
    cb = ImportanceCallback(ImportanceConfig(), distill=DistillConfig(alpha=0.25, temperature=2.0))
    trainer = Trainer(model=model, args=_args(tmp_path, report_to=[], logging_steps=1, max_steps=3),
                      train_dataset=data)
    cb.attach(trainer)
    trainer.train()
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    ces = {h["step"]: h["distill/ce"] for h in trainer.state.log_history if "distill/ce" in h}
    assert sorted(losses) == sorted(ces) == [1, 2, 3]  # every logging step
    with torch.no_grad():
        ids = torch.stack([data[i]["input_ids"] for i in range(len(data))])
        own = float(initial(input_ids=ids, labels=ids).loss)  # the model's loss, no teacher
    assert ces[1] == pytest.approx(own, rel=1e-5)
    # Step 1: the default teacher is the model itself (KL = 0), so the logged `loss` is (1 - alpha) * CE.
    assert losses[1] == pytest.approx(0.75 * own, rel=1e-3)
