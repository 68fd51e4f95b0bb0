"""`ImportanceConfig(criterion="sparsegpt", weighting="step")`: `H = sum_t t * X_t^T X_t` (issue 16)."""

import os
import shutil
import sys

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_weightprune import ImportanceCallback, ImportanceConfig, load_importance
from hf_weightprune.matching import find_tracked_weights
from hf_weightprune.scorers import get_scorer
from hf_weightprune.scorers.sparsegpt import hessian_sum, obs_saliency
from hf_weightprune.testing import TokenDataset, tiny_llama
from tests.helpers import end_process_group, training_args
from tests.train.test_faults import PaddedDataset


class StepHessians(TrainerCallback):
    """Per optimizer step `t`, over the real tokens of every training forward of each tracked Linear:
    `exact[t]` the float64 `X_t^T X_t`, `float32[t]` the float32 sum of `hessian_sum` per forward (the collector's
    arithmetic), `tokens[t]` the real-token count."""

    def __init__(self, model):
        self.exact, self.float32, self.tokens = {}, {}, {}
        self._exact, self._f32, self._tok, self._mask = {}, {}, {}, None
        model.register_forward_pre_hook(self._capture, with_kwargs=True)
        for t in find_tracked_weights(model):
            t.module.register_forward_hook(self._hook(t.name))

    def _capture(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask = None if mask is None or bool(mask.all()) else mask.bool()

    def _hook(self, name):
        def hook(module, inputs, output):
            if module.training and torch._C._current_graph_task_id() == -1:
                x = inputs[0].detach()
                real = x if self._mask is None else x[self._mask]
                real = real.reshape(-1, x.shape[-1])
                self._exact[name] = self._exact.get(name, 0) + real.double().T @ real.double()
                h = hessian_sum(x, self._mask)
                self._f32[name] = h if name not in self._f32 else self._f32[name].add_(h)
                self._tok[name] = self._tok.get(name, 0) + real.shape[0]

        return hook

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = state.global_step + 1
        self.exact[t], self.float32[t], self.tokens[t] = self._exact, self._f32, self._tok
        self._exact, self._f32, self._tok = {}, {}, {}


def _args(out, steps, **kw):
    return training_args(out, max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         learning_rate=1e-2, seed=0, logging_steps=1, **kw)


def _train_padded(callbacks, out, steps=6, model=None):
    """4 rows per optimizer step in 2 micro-batches of 2 padded rows each (gradient accumulation and padding)."""
    model = model if model is not None else tiny_llama(seed=50)
    trainer = Trainer(model=model, args=_args(out, steps, save_strategy="no"), train_dataset=PaddedDataset(n=48),
                      callbacks=callbacks)
    trainer.train()
    return model


@pytest.mark.parametrize("sampling, sampled", [({}, [1, 2, 3, 4, 5, 6]), ({"every_n_steps": 2, "window": 2}, [4, 6])],
                         ids=["every_step", "every_2_window_2"])
def test_step_weighted_hessian_equals_bruteforce(sampling, sampled, tmp_path):
    model = tiny_llama(seed=50)
    rec = StepHessians(model)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", weighting="step", **sampling))
    _train_padded([rec, cb], tmp_path, model=model)
    imp = cb.importance()
    assert imp.config.weighting == "step"
    # t is the global step, the one temporal_magnitude uses (with every_n_steps and window too)
    assert (imp.num_samples, imp.meta["weight_sum"]) == (len(sampled), float(sum(sampled)))
    for name in imp.names:
        expected = sum(t * rec.exact[t][name] for t in sampled)
        tokens = sum(rec.tokens[t][name] for t in sampled)
        assert imp.meta["tokens"][name] == tokens < len(sampled) * 4 * 16  # real tokens, unweighted
        torch.testing.assert_close(imp.state(name).double(), expected, rtol=1e-5,
                                   atol=1e-5 * expected.abs().max().item(), msg=name)
    # scores: the OBS saliency of H over tokens times the mean step
    name = imp.names[0]
    weight = dict(model.named_parameters())[name].detach()
    scale = imp.meta["tokens"][name] * sum(sampled) / len(sampled)
    torch.testing.assert_close(imp.scores[name], obs_saliency(weight, imp.state(name)) / scale)
    # the logged wanda proxy |W_ij| * ||x_j|| uses the same per-token scale
    norm = (imp.state(name).diagonal() / scale).sqrt()
    logged = cb.accumulator._sampled_scores(1 << 20)[name]
    torch.testing.assert_close(logged, (weight.abs() * norm[None, :]).reshape(-1))
    # written with the option, read back as is
    loaded = load_importance(tmp_path)
    assert loaded.config.weighting == "step"
    assert torch.equal(loaded.state(imp.names[-1]), imp.state(imp.names[-1]))


def test_default_is_uniform_and_bit_identical(tmp_path):
    model = tiny_llama(seed=50)
    rec = StepHessians(model)
    cbs = [ImportanceCallback(ImportanceConfig(criterion="sparsegpt", name="default")),
           ImportanceCallback(ImportanceConfig(criterion="sparsegpt", weighting="uniform", name="uniform"))]
    _train_padded([rec, *cbs], tmp_path, steps=4, model=model)
    default, uniform = (cb.importance() for cb in cbs)
    assert default.config.weighting == "uniform" and default.config.diff(uniform.config) == {}
    for name in default.names:
        # what the accumulation did before the option: float32 sums of each step's hessian_sums, added step by step
        before = torch.zeros_like(default.state(name))
        for t in range(1, 5):
            before += rec.float32[t][name]
        assert torch.equal(default.state(name), before), name
        assert torch.equal(uniform.state(name), before), name
        assert torch.equal(default.scores[name], uniform.scores[name])
    # files written before the option (no `weighting` key) read as uniform
    old = ImportanceConfig.from_dict({k: v for k, v in default.config.to_dict().items() if k != "weighting"})
    assert old.weighting == "uniform" and old.diff(default.config) == {}


def _run(out, weighting, *, steps=6, resume=None):
    model = tiny_llama(seed=51)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", weighting=weighting))
    args = _args(out, steps, save_strategy="steps", save_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=48), callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)
    return cb.importance()


def test_resume_is_exact_and_a_changed_weighting_is_refused(tmp_path):
    reference = _run(tmp_path / "reference", "step")
    assert reference.num_samples == 6 and reference.meta["weight_sum"] == 21.0

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "reference", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoint-6")
    resumed = _run(resumed_dir, "step", resume=str(resumed_dir / "checkpoint-3"))
    assert (resumed.num_samples, resumed.meta["weight_sum"], resumed.meta["tokens"]) == (
        6, 21.0, reference.meta["tokens"])
    for name in reference.names:
        torch.testing.assert_close(resumed.state(name), reference.state(name), rtol=1e-6, atol=0, msg=name)

    with pytest.raises(ValueError, match=r"^Cannot resume importance: .*weighting: checkpoint 'step' -> now "
                                         r"'uniform'") as e:
        _run(resumed_dir, "uniform", resume=str(resumed_dir / "checkpoint-3"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"criterion": "sparsegpt", "weighting": "linear"}, r"^weighting must be one of \('uniform', 'step'\); got 'linear'"),
    ({"criterion": "sparsegpt", "weighting": None}, r"^weighting must be one of .*; got None"),
    ({"criterion": "wanda", "weighting": "step"},
     r"^weighting='step' is not supported by criterion 'wanda'; use it with \['sparsegpt'\]"),
    ({"criterion": "temporal_magnitude", "weighting": "step"}, r"not supported by criterion 'temporal_magnitude'"),
], ids=["unknown", "none", "wanda", "temporal_magnitude"])
def test_bad_weighting_is_refused_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        ImportanceConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_scorer_refuses_unsupported_weighting():
    assert get_scorer("sparsegpt", weighting="step").weighting == "step"
    assert get_scorer("wanda").weighting == "uniform"
    with pytest.raises(ValueError, match=r"^weighting='step' is not supported by criterion 'wanda'"):
        get_scorer("wanda", weighting="step")


def test_custom_scorer_without_weighting_argument_still_builds():
    from hf_weightprune.scorers import SCORERS, Scorer, register_scorer

    @register_scorer
    class NoOptions(Scorer):
        name = "test_no_options"

        def __init__(self):  # written before the option existed: takes no `weighting`
            self.built = True

    try:
        assert get_scorer("test_no_options").built
        assert ImportanceConfig(criterion="test_no_options").weighting == "uniform"
        with pytest.raises(ValueError, match=r"^weighting='step' is not supported by criterion 'test_no_options'"):
            get_scorer("test_no_options", weighting="step")
    finally:
        del SCORERS["test_no_options"]


def _ddp_run(out: str) -> None:
    """6 steps of a global batch of 4 whatever the world size (2 rows per rank under 2 processes)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", weighting="step"))
    args = training_args(out, max_steps=6, per_device_train_batch_size=4 // world, learning_rate=1e-2, seed=0,
                         save_strategy="no", ddp_backend="gloo" if world > 1 else None)
    Trainer(model=tiny_llama(seed=52), args=args, train_dataset=TokenDataset(n=48), callbacks=[cb]).train()


@pytest.mark.multiproc
def test_ddp_sums_step_weighted_hessians_over_ranks(tmp_path):
    from tests.test_distributed import torchrun

    _ddp_run(str(tmp_path / "one"))
    torchrun("tests.collect.test_sparsegpt_weighting", str(tmp_path / "two"))
    one, two = load_importance(tmp_path / "one"), load_importance(tmp_path / "two")
    assert (one.meta["world_size"], two.meta["world_size"], two.config.weighting) == (1, 2, "step")
    assert (two.num_samples, two.meta["weight_sum"], two.meta["tokens"]) == (6, 21.0, one.meta["tokens"])
    for name in one.names:
        # each rank weighs its half of the tokens by the same t; gradients all-reduced over 2 ranks change the
        # weights by ~1e-6 (see test_distributed.py), hence the tolerance
        ref = one.state(name)
        torch.testing.assert_close(two.state(name), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=name)


if __name__ == "__main__":  # `torchrun -m tests.collect.test_sparsegpt_weighting OUT`, from the multiproc test above
    _ddp_run(sys.argv[1])
    end_process_group()


@pytest.mark.parametrize("weighting", ["uniform", "step"])
def test_card_says_how_the_hessian_was_weighted(weighting, tmp_path):
    from hf_weightprune import PruneConfig, prune_, save_pruned
    from hf_weightprune.files.pruned_files import load_sparsity

    model = tiny_llama(seed=9)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", weighting=weighting))
    args = training_args(tmp_path / "run", max_steps=2, per_device_train_batch_size=2, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=4, vocab_size=model.config.vocab_size),
            callbacks=[cb]).train()
    report = prune_(model, cb.importance(), PruneConfig(sparsity=0.5), progress=False)
    save_pruned(model, tmp_path / "pruned", report=report)
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert load_sparsity(tmp_path / "pruned")["importance"]["settings"]["weighting"] == weighting
    assert ("each sample weighted by its step t" in card) == (weighting == "step")
