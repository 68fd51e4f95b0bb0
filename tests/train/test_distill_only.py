"""`ImportanceCallback(distill=...)` without a config: the recovery of a structurally pruned model distils and does
nothing else (no statistic hooks, no scoring, no importance files), with the same loss as a run that also tracks."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback

from hf_weightprune import DistillConfig, ImportanceCallback, ImportanceConfig, PruneSchedule
from hf_weightprune.prune.surgery import shrink_mlp_
from hf_weightprune.testing import tiny_llama
from tests.helpers import train


class _Hooks(TrainerCallback):
    """Counts, at each step's end, the forward hooks on the model and on every submodule."""

    def __init__(self, model):
        self.model, self.on_model, self.on_submodules = model, [], []

    def on_step_end(self, args, state, control, **kwargs):
        def count(m):
            return len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)

        self.on_model.append(count(self.model))
        self.on_submodules.append(sum(count(m) for m in self.model.modules() if m is not self.model))


def _student_and_teacher():
    """A dense teacher and a student with every other MLP neuron removed from it (the shapes differ)."""
    teacher = tiny_llama(seed=7)
    student = copy.deepcopy(teacher)
    keep = torch.arange(0, teacher.config.intermediate_size, 2)
    shrink_mlp_(student, dict.fromkeys(range(teacher.config.num_hidden_layers), keep))
    assert student.config.intermediate_size == len(keep)
    return student, teacher


def _distill(teacher):
    return DistillConfig(teacher=teacher, alpha=0.5, temperature=2.0, hidden_weight=0.0)


def test_distill_only_registers_no_statistic_hooks_scores_nothing_and_writes_no_importance(tmp_path):
    student, teacher = _student_and_teacher()
    cb = ImportanceCallback(distill=_distill(teacher))
    assert not cb.tracks_importance
    hooks = _Hooks(student)
    trainer = train(student, [cb, hooks], tmp_path / "run", max_steps=4, save_steps=2)
    # The distiller's pre-hook and hook on the model and the training counter's pre-hook (`training_record()`),
    # nothing on any module (the statistics hook the Linears, the decoder layers and the model).
    assert hooks.on_model == [3] * 4 and hooks.on_submodules == [0] * 4
    acc = cb.accumulator
    assert acc.tracked == [] and acc.states == {} and cb.state_bytes() == 0
    assert acc.collector is None and acc.units is None and acc.router is None and acc.cross is None
    assert acc.meta["num_samples"] == 0 and acc.meta["tokens"] == {}
    # Checkpoints and the output folder hold no importance (nor a staging folder of one).
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not [p for p in (tmp_path / "run").rglob("*") if "importance" in p.name]
    with pytest.raises(RuntimeError, match=r"tracks no importance \(a hold schedule or distill= without config\)"):
        cb.importance()
    # The distillation still reaches the loggers; no importance/* key does.
    logged = [h for h in trainer.state.log_history if "distill/kl" in h]
    assert len(logged) == 4 and all(h["distill/kl"] > 0 for h in logged)
    assert not any(k.startswith("importance/") for h in trainer.state.log_history for k in h)


def test_the_distillation_loss_is_that_of_a_run_that_also_tracks_importance(tmp_path):
    runs = {}
    for name, config in (("only", None), ("tracking", ImportanceConfig(criterion="sparsegpt", units=True))):
        student, teacher = _student_and_teacher()
        cb = ImportanceCallback(config, distill=_distill(teacher))
        trainer = train(student, [cb], tmp_path / name, max_steps=4)
        history = trainer.state.log_history
        logged = [(h["step"], h["loss"]) for h in history if "loss" in h]
        logged += [(h["step"], h["distill/kl"], h["distill/ce"]) for h in history if "distill/kl" in h]
        runs[name] = logged, {n: p.detach().clone() for n, p in student.named_parameters()}
        assert cb.tracks_importance is (config is not None)
    (only, w_only), (tracking, w_tracking) = runs["only"], runs["tracking"]
    assert len(only) == 8 and only == tracking  # loss, KL and CE of every step, bit for bit
    for n, p in w_only.items():
        torch.testing.assert_close(p, w_tracking[n], rtol=0, atol=0, msg=n)


def test_a_prune_schedule_or_a_config_still_tracks():
    assert ImportanceCallback(ImportanceConfig(), distill=DistillConfig()).tracks_importance
    assert ImportanceCallback(schedule=PruneSchedule(final_sparsity=0.5), distill=DistillConfig()).tracks_importance
    assert ImportanceCallback().tracks_importance
