"""Distillation through the one callback: `ImportanceCallback(cfg, schedule=..., distill=DistillConfig(...))`."""

import copy
import math

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
from hf_weightprune.prune.oneshot import oneshot_importance
from hf_weightprune.testing import tiny_llama
from tests.helpers import train


def _gradual(distill, tmp_path, seed=50, **train_kw):
    model = tiny_llama(seed=seed)
    schedule = PruneSchedule(final_sparsity=0.5, start=1, end=4, every_n_steps=1)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"), schedule=schedule, distill=distill)
    trainer = train(model, [cb], tmp_path, max_steps=6, **train_kw)
    return model, cb, trainer


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


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


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing:FutureWarning")  # renamed activation_checkpointing in 5.x
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_trains_like_the_plain_run(use_reentrant, tmp_path):
    """Recomputed student activations must give the same KL, SquareHead and weights; the teacher is never recomputed."""
    def distill():
        return DistillConfig(alpha=0.5, temperature=2.0, hidden_weight=1.0)

    plain, _, t_plain = _gradual(distill(), tmp_path / "plain")
    ckpt, cb, t_ckpt = _gradual(distill(), tmp_path / "ckpt", gradient_checkpointing=True,
                                gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    for key in ("distill/kl", "distill/hidden"):
        assert len(_logged(t_ckpt, key)) == 6
        torch.testing.assert_close(_logged(t_ckpt, key), _logged(t_plain, key), rtol=1e-4, atol=1e-6)
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
    params = dict(ckpt.named_parameters())
    for name, mask in cb.mask_holder.masks.items():
        assert not params[name].detach()[~mask].any(), name


def test_bf16_mixed_precision_training_with_distillation(tmp_path):
    """`bf16=True` (CPU autocast on the student): the float32 teacher runs outside it; masks and teacher hold."""
    teacher = tiny_llama(seed=50)
    frozen = {n: p.clone() for n, p in teacher.named_parameters()}
    model, cb, trainer = _gradual(DistillConfig(teacher=teacher, alpha=0.5, hidden_weight=1.0), tmp_path, bf16=True)
    kl, hidden = _logged(trainer, "distill/kl"), _logged(trainer, "distill/hidden")
    assert len(kl) == len(hidden) == 6 and all(map(math.isfinite, kl + hidden))
    # step 1: the same weights, apart only by the student's bf16 rounding; then the pruned student drifts away
    assert kl[0] < 1e-3 * max(kl) and hidden[0] < 1e-3 * max(hidden)
    assert all(torch.equal(p, frozen[n]) for n, p in teacher.named_parameters())
    params = dict(model.named_parameters())
    assert cb.mask_holder.sparsity == pytest.approx(0.5, abs=1e-3)
    for name, mask in cb.mask_holder.masks.items():
        assert not params[name].detach()[~mask].any(), name


def test_torch_compile_distils_like_eager_after_a_compiled_run_with_other_hooks(tmp_path):
    """The hooks are traced into the compiled forward; the graph of an earlier compiled run of the class (wanda hooks
    only, compiled while hooks were guarded) is not reused, and the guard setting is back afterwards."""
    before = torch._dynamo.config.skip_nnmodule_hook_guards
    compiled = dict(torch_compile=True, torch_compile_backend="eager")
    _gradual(None, tmp_path / "other-hooks", **compiled)

    def distill():
        return DistillConfig(teacher=tiny_llama(seed=50), alpha=0.5, hidden_weight=1.0)

    eager, _, t_eager = _gradual(distill(), tmp_path / "eager")
    model, cb, t_compiled = _gradual(distill(), tmp_path / "compiled", **compiled)
    for key in ("distill/kl", "distill/hidden", "loss"):
        assert len(_logged(t_compiled, key)) == 6
        torch.testing.assert_close(_logged(t_compiled, key), _logged(t_eager, key), rtol=1e-3, atol=1e-6)
    for (n, p), (_, q) in zip(eager.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5, msg=n)
    assert torch._dynamo.config.skip_nnmodule_hook_guards is before
    assert not model._forward_hooks and not model._forward_pre_hooks  # removed at train end


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


def test_example_fine_tunes_phi3_with_pruning_and_distillation(tmp_path, capsys):
    """The headline example, as a user runs it with `--distill`: a pruned checkpoint whose zeros match its card."""
    import importlib.util
    from pathlib import Path

    from hf_weightprune.files.pruned_files import load_sparsity

    path = Path(__file__).resolve().parents[2] / "examples" / "finetune_phi3_with_pruning.py"
    spec = importlib.util.spec_from_file_location("finetune_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--recipe", "gradual", "--distill", "--distill_hidden_weight", "1.0", "--max_steps", "12",
                  "--no_dense_control", "--eval_windows", "4", "--output_dir", str(tmp_path)])
    from safetensors.torch import load_file

    info = load_sparsity(tmp_path / "pruned")
    weights = load_file(tmp_path / "pruned" / "model.safetensors")
    zeros = sum(int((weights[n] == 0).sum()) for n in info["tensors"])
    numel = sum(v["numel"] for v in info["tensors"].values())
    assert info["global_sparsity"] == pytest.approx(zeros / numel) == pytest.approx(0.5, abs=1e-3)
    assert info["distillation"]["alpha"] == 0.5 and info["distillation"]["hidden_weight"] == 1.0
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "**Distillation**: trained against a frozen copy of the model as training began" in card
    out = capsys.readouterr().out
    assert "saved to" in out and "distill/kl" in out and "distill/hidden" in out  # both terms reached the logs


def test_example_default_recipe_is_oneshot_obs_then_hold_with_distillation(tmp_path, capsys):
    """The example's default is the recipe benchmarks section 11 measured best: sparsegpt statistics from the first
    quarter of the steps, a one-shot OBS prune, then held masks distilled from the model as it was at pruning."""
    import importlib.util
    from pathlib import Path

    from safetensors.torch import load_file

    from hf_weightprune.files.pruned_files import load_sparsity

    path = Path(__file__).resolve().parents[2] / "examples" / "finetune_phi3_with_pruning.py"
    spec = importlib.util.spec_from_file_location("finetune_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--max_steps", "8", "--no_dense_control", "--eval_windows", "2", "--output_dir", str(tmp_path)])
    info = load_sparsity(tmp_path / "pruned")
    weights = load_file(tmp_path / "pruned" / "model.safetensors")
    zeros = sum(int((weights[n] == 0).sum()) for n in info["tensors"])
    numel = sum(v["numel"] for v in info["tensors"].values())
    assert info["global_sparsity"] == pytest.approx(zeros / numel) == pytest.approx(0.5, abs=1e-3)
    assert info["criterion"] == "sparsegpt" and info["reconstruction"] == "OBS" and info["scope"] == "row"
    assert info["schedule"]["mode"] == "hold" and info["distillation"]["alpha"] == 0.5
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "pruned once, then fine-tuned with its mask held" in card and "dense-at-pruning" in card
    assert "one-shot OBS prune after 2 steps" in capsys.readouterr().out


def test_distill_config_saves_and_loads_like_the_other_configs(tmp_path):
    config = DistillConfig(teacher="org/dense", alpha=0.3, temperature=4.0, hidden_weight=1.0, teacher_dtype="bfloat16")
    path = config.save_pretrained(tmp_path)
    assert path.endswith("distill_config.json")
    loaded = DistillConfig.from_pretrained(tmp_path)
    assert loaded == config and loaded.to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="alpha must be a float in"):
        DistillConfig.from_dict({**config.to_dict(), "alpha": 2.0})
