"""A schedule's mask update before the importance has any sample (IntelLabs/distiller#123): refused at train begin
when the sampling plan makes it certain, otherwise the update waits for the first sample and says why."""

import logging

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.testing import TokenDataset, tiny_llama
from hf_weightprune.train.schedule import PruneSchedule
from tests.helpers import training_args


class Steps(TrainerCallback):
    """Counts the optimizer steps begun; records the holder's update count and target after each step."""

    def __init__(self, holder=None):
        self.begun, self.holder, self.updates = 0, holder, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.begun += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.holder is not None:
            self.updates[state.global_step] = (self.holder.num_updates, self.holder.target_sparsity)


def _trainer(model, callbacks, out, max_steps=10):
    args = training_args(out, max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3, seed=0,
                         save_strategy="no", logging_steps=1000)
    return Trainer(model=model, args=args, train_dataset=TokenDataset(n=48, vocab_size=model.config.vocab_size),
                   callbacks=callbacks)


SCHEDULE = {"final_sparsity": 0.5, "start": 1, "end": 8, "every_n_steps": 2}


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt", "fisher"])
@pytest.mark.parametrize("sampling, first, fix", [
    ({"every_n_steps": 5}, "takes its first sample at step 5",
     r"start the schedule at that sample \(PruneSchedule\(start=5\)\) or sample by step 1 "
     r"\(ImportanceConfig\(every_n_steps=1\)\)$"),
    ({"window": 2}, "takes its first sample at step 9", r"sample by step 1 \(ImportanceConfig\(window=None\)\)$"),
    ({"every_n_steps": 20}, "takes no sample in the run's 10 steps",
     r"sample by step 1 \(ImportanceConfig\(every_n_steps=1\)\)$"),
])
def test_update_before_the_first_sample_is_refused_at_train_begin(criterion, sampling, first, fix, tmp_path):
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion, **sampling), schedule=PruneSchedule(**SCHEDULE))
    steps = Steps()
    trainer = _trainer(tiny_llama(), [cb, steps], tmp_path)
    every = sampling.get("every_n_steps", 1)
    settings = rf"criterion='{criterion}', every_n_steps={every}" + (", window=2" if "window" in sampling else "")
    with pytest.raises(ValueError, match=rf"^PruneSchedule\(start=1, every_n_steps=2\) updates the masks first at step "
                                         rf"1, but ImportanceConfig\({settings}\) {first}: {criterion} masks need at "
                                         rf"least one sample; {fix}"):
        trainer.train()
    assert steps.begun == 0  # before any step
    assert not list(tmp_path.iterdir())  # and before anything was written


@pytest.mark.parametrize("criterion", ["temporal_magnitude", "magnitude"])
def test_weight_criteria_need_no_sample(criterion, tmp_path, caplog):
    """temporal_magnitude ranks by |w| until its first sample (said once); magnitude reads the weights at the update."""
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion, every_n_steps=5), schedule=PruneSchedule(**SCHEDULE))
    steps = Steps(cb.mask_holder)
    with caplog.at_level(logging.INFO, logger="hf_weightprune.train.holder"):
        _trainer(tiny_llama(), [cb, steps], tmp_path).train()
    assert steps.updates[1][0] == 1 and cb.mask_holder.sparsity == pytest.approx(0.5, abs=1e-3)
    falls_back = [r for r in caplog.records if "comes before the first importance sample" in r.getMessage()]
    assert len(falls_back) == (1 if criterion == "temporal_magnitude" else 0)


def test_hold_needs_no_sample(tmp_path):
    """mode="hold" updates nothing: an importance tracked beside it may sample late (window) without a refusal."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :8] = 0
    model.save_pretrained(tmp_path / "pruned")
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda", window=2),
                            schedule=PruneSchedule(mode="hold", masks_from=str(tmp_path / "pruned")))
    _trainer(model, [cb], tmp_path / "run").train()
    assert cb.importance().num_samples == 2
    assert not model.model.layers[0].mlp.down_proj.weight[:, :8].any()


class Poison(TrainerCallback):
    """Makes one gradient non-finite for the callbacks between `poison` and `heal` at the given steps only, so the
    importance skips those samples while the optimizer steps on the true gradient (training is unharmed)."""

    def __init__(self, model, steps):
        self.param, self.steps, self.saved = model.model.layers[0].mlp.up_proj.weight, steps, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 in self.steps:
            self.saved = self.param.grad.clone()
            self.param.grad[0, 0] = float("nan")

    def heal(self):
        poison = self

        class Heal(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                if poison.saved is not None:
                    poison.param.grad.copy_(poison.saved)
                    poison.saved = None

        return Heal()


def test_update_without_a_sample_waits_for_the_first_one(tmp_path, caplog):
    """Data-dependent: the planned samples of steps 1-2 are skipped as non-finite; the update due at step 1 waits,
    logs why, and runs at step 3 (the first sample) with the schedule's target there."""
    model = tiny_llama()
    schedule = PruneSchedule(final_sparsity=0.5, start=1, end=8, every_n_steps=2, ramp="linear")
    cb = ImportanceCallback(ImportanceConfig(criterion="fisher"), schedule=schedule)
    poison = Poison(model, steps={1, 2})
    steps = Steps(cb.mask_holder)
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.train.holder"):
        _trainer(model, [poison, cb, poison.heal(), steps], tmp_path).train()
    assert cb.accumulator.meta["skipped"] == 2 and cb.accumulator.meta["num_samples"] == 8
    waits = [r.getMessage() for r in caplog.records if "waits" in r.getMessage()]
    assert waits == ["PruneSchedule: the mask update due at step 1 waits for the first fisher sample (1 sample(s) "
                     "skipped as non-finite so far): its masks are computed at the step that takes it"]
    assert steps.updates[1] == (0, 0.0) and steps.updates[2] == (0, 0.0)
    assert steps.updates[3][0] == 1
    assert steps.updates[3][1] == pytest.approx(schedule.target_at(3, 10))  # the ramp at step 3, not at 1
    assert cb.mask_holder.pending_step is None and cb.mask_holder.sparsity == pytest.approx(0.5, abs=1e-3)
    assert torch.isfinite(model.model.layers[0].mlp.up_proj.weight).all()
