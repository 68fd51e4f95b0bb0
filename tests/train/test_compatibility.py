"""Robustness matrix: the callback under real training configurations and faults.

One test (or parametrised group) per row of `docs/compatibility.md`; tiny seeded models, a real Trainer.
"""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, set_seed

from hf_weightprune import ImportanceCallback, ImportanceConfig, load_importance
from hf_weightprune.config import PruneConfig
from hf_weightprune.files.safetensors_io import ImportanceFileError
from hf_weightprune.prune.pruner import prune_
from hf_weightprune.testing import TokenDataset, tiny_llama
from tests.helpers import Recorder, reference, train, training_args

REPO = Path(__file__).resolve().parents[2]
RTOL, ATOL = 1e-5, 1e-7  # float32 state against a float64 reference


def scores(cb):
    imp = cb.importance()
    return {n: imp.scores[n].double() for n in imp.names}


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    assert list(actual) == list(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name].double(), rtol=rtol, atol=atol, msg=name)


def assert_similar(actual, expected, max_rel_err, min_agreement):
    """Runs that differ numerically (another precision): relative Frobenius error per tensor, and the share of
    weights on which the 50% masks of the two runs agree."""
    for name, b in expected.items():
        a = actual[name]
        rel = float((a - b).norm() / b.norm())
        k = b.numel() // 2
        keep_a, keep_b = torch.zeros(b.numel(), dtype=torch.bool), torch.zeros(b.numel(), dtype=torch.bool)
        keep_a[a.flatten().topk(k).indices] = True
        keep_b[b.flatten().topk(k).indices] = True
        agreement = float((keep_a == keep_b).float().mean())
        assert rel <= max_rel_err and agreement >= min_agreement, (name, rel, agreement)


# ------------------------------------------------------------------------------------ 1. non-finite values
class InfActivations(TrainerCallback):
    """At step `k`, a forward hook writes inf into one channel of layer 0's input norm: every Linear after it
    sees inf/NaN inputs, and the loss and all gradients are NaN, as after an overflow."""

    def __init__(self, model, k):
        self.k, self.armed = k, False
        model.model.layers[0].input_layernorm.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.armed and module.training:
            output = output.clone()
            output[..., 0] = float("inf")
            return output

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step + 1 == self.k


class SkipNonFiniteStep(TrainerCallback):
    """Runs after ImportanceCallback: drops non-finite gradients so AdamW skips the step (what a GradScaler
    does under fp16); otherwise the NaN would poison the weights and every later sample."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            for p in model.parameters():
                p.grad = None


@pytest.mark.parametrize("criterion", ["movement", "taylor", "fisher", "wanda"])
def test_nonfinite_sample_is_skipped(criterion, tmp_path):
    k, steps = 3, 5
    model = tiny_llama(seed=11)
    inject = InfActivations(model, k)
    rec = Recorder(model, record_acts=criterion == "wanda")
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
    trainer = train(model, [inject, rec, cb, SkipNonFiniteStep()], tmp_path, max_steps=steps)
    assert not torch.isfinite(rec.pre[k - 1]["model.layers.1.mlp.down_proj.weight"][1]).all()  # the fault hit
    imp = cb.importance()
    assert imp.num_samples == steps - 1 and imp.meta["skipped"] == 1
    logged = [h["importance/skipped"] for h in trainer.state.log_history if "importance/skipped" in h]
    assert logged == [0] * (k - 1) + [1] * (steps - k + 1)
    got = scores(cb)
    assert all(bool(torch.isfinite(v).all()) for v in got.values())
    assert_close(got, reference(criterion, rec, steps=[s for s in range(1, steps + 1) if s != k]))


# ------------------------------------------------------------------------------------ 2. mixed precision
@pytest.mark.parametrize("criterion", ["temporal_magnitude", "taylor", "wanda"])
def test_bf16_autocast_close_to_fp32(criterion, tmp_path):
    runs = {}
    for name, kw in [("fp32", {}), ("bf16", {"bf16": True})]:
        model = tiny_llama(seed=12)
        rec = Recorder(model, record_acts=criterion == "wanda")
        cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
        train(model, [rec, cb], tmp_path / name, max_steps=4, **kw)
        runs[name] = scores(cb)
        assert all(s.dtype == torch.float32 for s in cb.accumulator.states.values())
    # autocast: weights and gradients stay float32, so the state is exact for its own run ...
    assert_close(runs["bf16"], reference(criterion, rec))
    # ... and bf16 matmuls move the run itself a little away from the float32 one (Adam amplifies it on tiny
    # gradients): measured 5-9% relative error, 96-98% agreement of 50% masks.
    assert_similar(runs["bf16"], runs["fp32"], max_rel_err=0.12, min_agreement=0.95)


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("criterion", ["temporal_magnitude", "taylor"])
def test_bf16_model(criterion, state_dtype, tmp_path):
    model = tiny_llama(seed=13).to(torch.bfloat16)
    rec = Recorder(model)
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion, state_dtype=state_dtype))
    train(model, [rec, cb], tmp_path, max_steps=4)
    assert all(s.dtype == getattr(torch, state_dtype) for s in cb.accumulator.states.values())
    # |w| and w*g are computed in float32 from the bf16 values, so a float32 state matches the float64 reference;
    # a bf16 state adds (stochastic) rounding per sample.
    rtol = 1e-5 if state_dtype == "float32" else 2e-2
    assert_close(scores(cb), reference(criterion, rec), rtol=rtol, atol=1e-7 if state_dtype == "float32" else 1e-5)
    fp32 = ImportanceCallback(ImportanceConfig(criterion=criterion))
    train(tiny_llama(seed=13), [fp32], tmp_path / "fp32", max_steps=4)
    assert_similar(scores(cb), scores(fp32), max_rel_err=0.12, min_agreement=0.95)
    assert load_importance(tmp_path).state(cb.tracked_names[0]).dtype == getattr(torch, state_dtype)


def test_fp16_on_cpu_trains_in_float32(tmp_path):
    runs = {}
    for name, kw in [("fp32", {}), ("fp16", {"fp16": True})]:
        cb = ImportanceCallback(ImportanceConfig(criterion="fisher"))
        trainer = train(tiny_llama(seed=14), [cb], tmp_path / name, max_steps=3, **kw)
        runs[name] = scores(cb)
    # Trainer accepts fp16=True with use_cpu=True but applies neither autocast nor a GradScaler on CPU.
    assert trainer.accelerator.mixed_precision == "fp16" and trainer.accelerator.scaler is None
    assert_close(runs["fp16"], runs["fp32"], rtol=0, atol=0)


# ------------------------------------------------------------------------------- 3. gradient checkpointing
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing:FutureWarning")  # renamed activation_checkpointing in 5.x
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("criterion", ["wanda", "taylor"])
def test_gradient_checkpointing_counts_once(criterion, use_reentrant, tmp_path):
    runs = {}
    for name, kw in [("plain", {}), ("ckpt", {"gradient_checkpointing": True,
                                              "gradient_checkpointing_kwargs": {"use_reentrant": use_reentrant}})]:
        cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
        train(tiny_llama(seed=15), [cb], tmp_path / name, max_steps=3, **kw)
        runs[name] = (scores(cb), cb.importance().meta)
    assert runs["ckpt"][1]["tokens"] == runs["plain"][1]["tokens"]
    assert runs["ckpt"][1]["num_samples"] == runs["plain"][1]["num_samples"] == 3
    assert_close(runs["ckpt"][0], runs["plain"][0], rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------- 4. torch.compile
@pytest.mark.parametrize("how", ["torch_compile_arg", "compiled_module"])
def test_torch_compile(how, tmp_path):
    from torch._dynamo.utils import counters

    eager = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    train(tiny_llama(seed=16), [eager], tmp_path / "eager", max_steps=3)

    torch._dynamo.reset()
    counters.clear()
    model = tiny_llama(seed=16)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    # The "eager" backend runs dynamo's capture (where graph breaks happen) without inductor's C++ build.
    if how == "torch_compile_arg":
        train(model, [cb], tmp_path / "c", max_steps=3, torch_compile=True, torch_compile_backend="eager")
    else:
        # Trainer reads the forward signature of the wrapper (*args, **kwargs) and would drop every column
        train(torch.compile(model, backend="eager"), [cb], tmp_path / "c", max_steps=3, remove_unused_columns=False)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert cb.tracked_names == eager.tracked_names and not any("_orig_mod" in n for n in cb.tracked_names)
    assert load_importance(tmp_path / "c").names == eager.tracked_names
    # each training token counted once; compiled training itself drifts ~5e-6 from eager (op order), so the
    # activation sums agree to float32 rounding and the scores (which multiply by |W|) to that drift
    imp, ref = cb.importance(), eager.importance()
    assert imp.meta["tokens"] == ref.meta["tokens"]
    for name in ref.names:
        torch.testing.assert_close(imp.state(name), ref.state(name), rtol=1e-5, atol=0)
    assert_close(scores(cb), scores(eager), rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------ 5. tied weights
def test_tied_embeddings(tmp_path):
    model = tiny_llama(seed=17, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    default = ImportanceCallback()
    head = ImportanceCallback(ImportanceConfig(target_modules=["lm_head"], name="head"))  # its own folder
    train(model, [default, head], tmp_path, max_steps=2)
    assert not any("lm_head" in n or "embed" in n for n in default.tracked_names)
    assert head.tracked_names == ["lm_head.weight"]  # one buffer for the shared tensor

    imp = head.importance()
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to model.embed_tokens.weight.*Untie"):
        prune_(model, imp, PruneConfig(sparsity=0.5), progress=False)
    assert not (model.model.embed_tokens.weight == 0).any()

    # untied as the message says, pruning lm_head leaves the input embedding alone
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    prune_(model, imp, PruneConfig(sparsity=0.5), progress=False)
    assert (model.lm_head.weight == 0).float().mean() == 0.5
    assert not (model.model.embed_tokens.weight == 0).any()


# ------------------------------------------------------------------------------- 6. evaluation in training
@pytest.mark.parametrize("criterion", ["wanda", "taylor"])
def test_eval_forwards_do_not_count(criterion, tmp_path):
    runs = {}
    for name, kw in [("plain", {}), ("eval", {"eval_strategy": "steps", "eval_steps": 2})]:
        model = tiny_llama(seed=18)
        cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
        args = training_args(tmp_path / name, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="no", logging_steps=1, **kw)
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=32), callbacks=[cb],
                          eval_dataset=TokenDataset(n=8, seed=1) if kw else None)
        trainer.train()
        runs[name] = (scores(cb), cb.importance().meta)
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [2, 4]
    assert runs["eval"][1]["tokens"] == runs["plain"][1]["tokens"]
    assert runs["eval"][1]["num_samples"] == runs["plain"][1]["num_samples"] == 4
    assert_close(runs["eval"][0], runs["plain"][0], rtol=0, atol=0)


# --------------------------------------------------------------------------------- 7. several train() calls
def test_train_again_restarts_state(tmp_path, caplog):
    def fresh_run(state_dict, out):
        model = tiny_llama(seed=19)
        model.load_state_dict(state_dict)
        cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"))
        trainer = Trainer(model=model, args=make_args(out), train_dataset=TokenDataset(n=32), callbacks=[cb])
        set_seed(0)
        trainer.train()
        return scores(cb)

    def make_args(out):
        # SGD without momentum: the Trainer keeps its optimizer across train() calls, and Adam's moments
        # would make the continued run differ from a fresh one for reasons that have nothing to do with us.
        return training_args(out, max_steps=3, per_device_train_batch_size=4, learning_rate=0.1, optim="sgd",
                             save_strategy="no", logging_steps=1)

    model = tiny_llama(seed=19)
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"))
    trainer = Trainer(model=model, args=make_args(tmp_path / "a"), train_dataset=TokenDataset(n=32), callbacks=[cb])
    set_seed(0)
    trainer.train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="hf_weightprune"):
        set_seed(0)
        trainer.train()
    assert "train() called again; restarting importance (discarding 3 samples)" in caplog.text
    assert cb.importance().num_samples == 3
    second = scores(cb)
    assert_close(second, fresh_run(start, tmp_path / "fresh2"), rtol=1e-6, atol=0)

    # the same Trainer with a new callback: the new one starts empty, the old one keeps its result
    trainer.remove_callback(cb)
    cb2 = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"))
    trainer.add_callback(cb2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    set_seed(0)
    trainer.train()
    assert cb2.importance().num_samples == 3
    assert_close(scores(cb2), fresh_run(start, tmp_path / "fresh3"), rtol=1e-6, atol=0)
    assert_close(scores(cb), second, rtol=0, atol=0)


# --------------------------------------------------------------------------- 8. datasets, steps and epochs
class IterableTokens(torch.utils.data.IterableDataset):
    """The same windows as `TokenDataset`, in order, without `__len__`."""

    def __init__(self, n):
        self.ds = TokenDataset(n=n)

    def __iter__(self):
        return (self.ds[i] for i in range(len(self.ds)))


def _train_on(model, dataset, cbs, out, **kw):
    args = training_args(out, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no", logging_steps=1,
                         **kw)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=cbs).train()


@pytest.mark.parametrize("dataset", ["map", "iterable"])
@pytest.mark.parametrize("per_epoch", [False, True])
def test_max_steps_and_epochs(dataset, per_epoch, tmp_path):
    # 16 windows / batch 4 = 4 steps per pass; max_steps=10 stops in the middle of the third pass
    model = tiny_llama(seed=20)
    rec = Recorder(model)
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", per_epoch=per_epoch))
    _train_on(model, TokenDataset(n=16) if dataset == "map" else IterableTokens(16), [rec, cb], tmp_path, max_steps=10)
    imp = cb.importance()
    if per_epoch:
        # samples at the end of each pass, t = 1, 2, 3 (the partial last pass counts as epoch 3)
        assert imp.num_samples == 3 and imp.meta["epoch"] == 3
        for t in rec.tracked:
            expected = sum(e * rec.post[s - 1][t.name].abs() for e, s in [(1, 4), (2, 8), (3, 10)]) / 6
            torch.testing.assert_close(imp.scores[t.name].double(), expected, rtol=RTOL, atol=ATOL)
    else:
        assert imp.num_samples == 10
        assert_close(scores(cb), reference("temporal_magnitude", rec))


def test_per_epoch_window_needs_dataset_length(tmp_path):
    model = tiny_llama(seed=20)
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", per_epoch=True, window=2))
    with pytest.raises(ValueError, match="window with per_epoch=True needs the number of epochs.*IterableDataset"):
        _train_on(model, IterableTokens(16), [cb], tmp_path, max_steps=10)


def test_per_epoch_num_train_epochs_with_window(tmp_path):
    model = tiny_llama(seed=21)
    rec = Recorder(model)
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", per_epoch=True, window=2))
    train(model, [rec, cb], tmp_path, max_steps=-1, num_train_epochs=3, n=16)
    imp = cb.importance()
    assert imp.num_samples == 2  # epochs 2 and 3
    for t in rec.tracked:
        expected = (2 * rec.post[7][t.name].abs() + 3 * rec.post[11][t.name].abs()) / 5
        torch.testing.assert_close(imp.scores[t.name].double(), expected, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------- 9. hyperparameter_search
class Capture(TrainerCallback):
    """Keeps each trial's in-memory importance and trial number at its end (runs after ImportanceCallback)."""

    def __init__(self, cb):
        self.cb, self.trials = cb, []

    def on_train_end(self, args, state, control, **kwargs):
        self.trials.append({n: v.clone() for n, v in self.cb.importance().scores.items()})


@pytest.mark.parametrize("hp_name", [lambda trial: f"run-{trial.number}", lambda trial: f"trial-{trial.number}"])
def test_hyperparameter_search_trial_folders(hp_name, tmp_path, caplog):
    pytest.importorskip("optuna")
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"))
    capture = Capture(cb)
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
                         logging_steps=1)
    trainer = Trainer(model_init=lambda: tiny_llama(seed=22), args=args, train_dataset=TokenDataset(n=16),
                      eval_dataset=TokenDataset(n=4, seed=1), callbacks=[cb, capture])
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True)},
        backend="optuna", n_trials=2, direction="minimize", hp_name=hp_name)
    assert args.output_dir == str(tmp_path)  # Trainer does not change it per trial
    assert "trial folder not found" not in caplog.text
    assert not os.path.exists(tmp_path / "importance")
    names = [hp_name(type("Trial", (), {"number": i})) for i in range(2)]
    for name, expected in zip(names, capture.trials):
        for folder in (tmp_path / name / "importance", tmp_path / name / "checkpoint-2" / "importance"):
            imp = load_importance(folder)
            assert imp.step == 2 and imp.num_samples == 2
            for n, score in expected.items():
                torch.testing.assert_close(imp.scores[n], score, rtol=0, atol=0)
    assert not torch.equal(*(t["model.layers.0.mlp.up_proj.weight"] for t in capture.trials))


def test_hyperparameter_search_without_hp_name_is_refused(tmp_path):
    """Without hp_name the Trainer tells callbacks no trial folder (`state.trial_name` is None): refused up front."""
    pytest.importorskip("optuna")
    cb = ImportanceCallback()
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=4, save_strategy="no")
    trainer = Trainer(model_init=lambda: tiny_llama(seed=22), args=args, train_dataset=TokenDataset(n=16),
                      eval_dataset=TokenDataset(n=4, seed=1), callbacks=[cb])
    with pytest.raises(ValueError, match="hyperparameter_search needs hp_name="):
        trainer.hyperparameter_search(hp_space=lambda trial: {}, backend="optuna", n_trials=1, direction="minimize")
    assert not os.path.exists(tmp_path / "run-0" / "importance")


# ---------------------------------------------------------------------------------------- 10. failed saves
FAILED_SAVES = [(event, on_save_error) for event in ("save", "train_end") for on_save_error in ("raise", "warn")]


@pytest.fixture(scope="module")
def failed_saves(tmp_path_factory):
    """Each case in its own process (`tests/scripts/failed_save.py`), all at once: the file-size limit that makes
    the importance write fail is process-wide and would also fail pytest's own writes past it."""
    root = tmp_path_factory.mktemp("failed_save")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    procs = {case: subprocess.Popen([sys.executable, "-m", "tests.scripts.failed_save", str(root / "-".join(case)),
                                     *case], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for case in FAILED_SAVES}
    results = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{case} exited {proc.returncode}:\n{err[-3000:]}"
        results[case] = (root / "-".join(case), json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("event, on_save_error", FAILED_SAVES)
def test_failed_save(event, on_save_error, failed_saves):
    out, result = failed_saves[event, on_save_error]
    target = out / ("checkpoint-2" if event == "save" else "") / "importance"
    if on_save_error == "raise":
        assert result["error"].startswith("RuntimeError: ")
        assert re.search(r"could not write .*importance.*: .*File too large.*on_save_error='warn'", result["error"])
    else:
        assert result["error"] is None
        assert any("could not write" in m and "File too large" in m for m in result["warnings"]), result["warnings"]
    assert not target.exists() and not list(target.parent.glob(".importance.*.tmp"))
    assert not (out / "_importance-staging" / "importance_config.json").exists()  # nothing looks complete
    if event == "save" and on_save_error == "raise":
        assert not target.parent.exists()  # training stopped before the Trainer wrote checkpoint-2
    else:
        with pytest.raises(ImportanceFileError, match="No importance"):
            load_importance(target.parent)
    if event == "save" and on_save_error == "warn":
        assert (out / "checkpoint-2" / "model.safetensors").exists()  # the Trainer's own checkpoint is intact
        assert load_importance(out / "checkpoint-4").num_samples == 4  # training went on; later writes work again
        assert load_importance(out).num_samples == 4


# ----------------------------------------------------------------------------------------- 11. CPU offload
@pytest.mark.parametrize("criterion", ["temporal_magnitude", "fisher", "wanda"])
def test_offload_to_cpu_equals_default(criterion, tmp_path):
    runs = {}
    for offload in (False, True):
        cb = ImportanceCallback(ImportanceConfig(criterion=criterion), offload_to_cpu=offload)
        train(tiny_llama(seed=24), [cb], tmp_path / str(offload), max_steps=3)
        assert all(s.device.type == "cpu" for s in cb.accumulator.states.values())
        runs[offload] = scores(cb)
    assert_close(runs[True], runs[False], rtol=0, atol=0)


def test_torch_compile_wanda_after_another_compiled_run(tmp_path):
    # Dynamo reuses the first run's graph for a second model of the same class (module hooks are not guarded),
    # so the wanda hooks registered for the second run would never fire without a reset.
    train(tiny_llama(seed=16), [], tmp_path / "first", max_steps=2, torch_compile=True,
          torch_compile_backend="eager")
    eager = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    train(tiny_llama(seed=16), [eager], tmp_path / "eager", max_steps=3)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    train(tiny_llama(seed=16), [cb], tmp_path / "second", max_steps=3, torch_compile=True,
          torch_compile_backend="eager")
    assert cb.importance().meta["tokens"] == eager.importance().meta["tokens"]


def test_torch_compile_puts_the_hook_guard_setting_back_after_training(tmp_path):
    """The process-wide `skip_nnmodule_hook_guards` is flipped only while the wanda hooks are registered."""
    before = torch._dynamo.config.skip_nnmodule_hook_guards
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))

    class Probe(TrainerCallback):
        seen = []

        def on_step_end(self, args, state, control, **kw):
            self.seen.append(torch._dynamo.config.skip_nnmodule_hook_guards)

    train(tiny_llama(seed=16), [cb, Probe()], tmp_path, max_steps=2, torch_compile=True,
          torch_compile_backend="eager")
    assert Probe.seen == [False, False]  # guarded while training
    assert torch._dynamo.config.skip_nnmodule_hook_guards is before
    assert sum(cb.importance().meta["tokens"].values()) > 0


def test_wanda_hooks_that_never_fire_fail_at_the_first_sampled_step(tmp_path):
    from transformers import TrainerCallback

    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))

    class Unhook(TrainerCallback):  # stands for a forward that bypasses the modules' hooks
        def on_step_begin(self, args, state, control, **kw):
            cb.accumulator.collector.remove()

    with pytest.raises(RuntimeError, match="step 1 was sampled but none of the .* forward hooks"):
        train(tiny_llama(seed=16), [cb, Unhook()], tmp_path, max_steps=3)


def test_wanda_under_compile_keeps_other_compiled_functions(tmp_path):
    """Registering the hooks under torch.compile does not wipe the process's compile cache (no `_dynamo.reset`):
    another compiled function is not compiled again."""
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    f = torch.compile(lambda x: x * 2 + 1, backend=counting_backend)
    x = torch.ones(3)
    assert torch.equal(f(x), x * 3) and len(compiles) == 1
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    train(tiny_llama(seed=16), [cb], tmp_path, max_steps=2, torch_compile=True, torch_compile_backend="eager")
    assert sum(cb.importance().meta["tokens"].values()) > 0
    assert torch.equal(f(x), x * 3) and len(compiles) == 1
