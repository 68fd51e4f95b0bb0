"""Distillation through the one callback: `ImportanceCallback(cfg, schedule=..., distill=DistillConfig(...))`."""

import copy

import pytest
import torch

from hf_weightprune import (
    DistillConfig,
    ImportanceCallback,
    ImportanceConfig,
    PruneConfig,
    PruneSchedule,
    prune_,
    save_pruned,
)
from hf_weightprune.oneshot import oneshot_importance
from hf_weightprune.testing import tiny_llama

from .helpers import train


def _gradual(distill, tmp_path, seed=50):
    model = tiny_llama(seed=seed)
    schedule = PruneSchedule(final_sparsity=0.5, start=1, end=4, every_n_steps=1)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"), schedule=schedule, distill=distill)
    trainer = train(model, [cb], tmp_path, max_steps=6)
    return model, cb, trainer


def test_gradual_pruning_with_distillation_holds_masks_and_logs_kl(tmp_path):
    teacher = tiny_llama(seed=50)  # the dense model the run starts from
    frozen = {n: p.clone() for n, p in teacher.named_parameters()}
    model, cb, trainer = _gradual(DistillConfig(teacher=teacher, alpha=0.5, temperature=2.0), tmp_path)
    assert all(torch.equal(p, frozen[n]) for n, p in teacher.named_parameters())  # never updated
    params = dict(model.named_parameters())
    assert cb.mask_holder.sparsity == pytest.approx(0.5, abs=1e-3)
    for name, mask in cb.mask_holder.masks.items():
        assert not params[name].detach()[~mask].any(), name  # masks held under the distillation loss
    kl = [h["distill/kl"] for h in trainer.state.log_history if "distill/kl" in h]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # step 1: the student still equals its teacher
    assert len(kl) == 6 and all(v > 0 for v in kl[1:])  # then the pruned student drifts from it
    assert "forward" not in model.__dict__  # the wrapper is removed at train end


def test_alpha_zero_equals_the_run_without_distillation(tmp_path):
    plain, _, _ = _gradual(None, tmp_path / "plain")
    distilled, _, _ = _gradual(DistillConfig(alpha=0.0), tmp_path / "alpha0")
    for (n, p), (_, q) in zip(plain.named_parameters(), distilled.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=n)


def test_default_teacher_is_the_dense_model_at_train_begin(tmp_path):
    dense = tiny_llama(seed=50)
    model, cb, _ = _gradual(DistillConfig(alpha=0.5), tmp_path)
    assert cb._distiller.teacher is None  # dropped at train end
    # the same run with the dense model passed explicitly as the teacher gives the same weights
    explicit, _, _ = _gradual(DistillConfig(teacher=dense, alpha=0.5), tmp_path / "explicit")
    for (n, p), (_, q) in zip(model.named_parameters(), explicit.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)


def test_hold_recovery_with_a_dense_teacher(tmp_path):
    dense = tiny_llama(seed=51)
    pruned = copy.deepcopy(dense)
    report = prune_(pruned, oneshot_importance(pruned), PruneConfig(sparsity=0.5), progress=False)
    save_pruned(pruned, tmp_path / "pruned", report=report)
    hold = PruneSchedule(mode="hold", masks_from=str(tmp_path / "pruned"))
    with pytest.raises(ValueError, match="mode='hold'\\) needs DistillConfig\\(teacher=...\\)"):
        ImportanceCallback(schedule=hold, distill=DistillConfig())
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"), schedule=hold, distill=DistillConfig(teacher=dense))
    train(pruned, [cb], tmp_path / "recover", max_steps=4)
    zeros = {n: (p == 0) for n, p in pruned.named_parameters() if n in cb.mask_holder.masks}
    for name, mask in cb.mask_holder.masks.items():
        assert torch.equal(zeros[name], ~mask), name


def test_distill_argument_types_are_checked():
    with pytest.raises(TypeError, match="distill must be a DistillConfig"):
        ImportanceCallback(distill={"alpha": 0.5})
    with pytest.raises(TypeError, match="schedule must be a PruneSchedule"):
        ImportanceCallback(schedule={"final_sparsity": 0.5})
