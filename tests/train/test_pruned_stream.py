"""Pruned-stream Hessians (`PruneSchedule(pruned_stream=..., refit_at=...)`): the `sparsegpt` statistic restarts at
every mask change, and the re-fit of the kept weights at `refit_at` solves least squares on those Hessians."""

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.prune.refit import refit_masked_
from hf_weightprune.testing import TokenDataset, tiny_llama
from hf_weightprune.train.holder import MaskHolder
from hf_weightprune.train.schedule import PruneSchedule
from tests.helpers import training_args

MAX_STEPS = 12
END = 4  # updates at 1, 3 and 4; then 8 steps of the final masks' inputs


class Inputs(TrainerCallback):
    """Every forward's input of each tracked Linear, by the optimizer step it belongs to (brute force)."""

    def __init__(self, model, names):
        self.step, self.x = 0, {}
        modules = dict(model.named_modules())
        for name in names:
            modules[name.removesuffix(".weight")].register_forward_pre_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, args):
            if module.training:
                self.x.setdefault(self.step, {}).setdefault(name, []).append(args[0].detach().double().reshape(-1, args[0].shape[-1]))
        return hook

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1


class AtUpdates(TrainerCallback):
    """Listed before the `ImportanceCallback`: the Hessians each mask update (and the re-fit) is about to read, and
    the weights before it."""

    def __init__(self, cb):
        self.cb, self.hessians, self.tokens, self.weights = cb, {}, {}, {}

    def on_step_end(self, args, state, control, **kwargs):
        holder, t = self.cb.mask_holder, state.global_step
        if holder.is_update_step(t) or holder.is_refit_step(t):
            imp = self.cb.importance()
            self.hessians[t] = {n: imp.state(n).clone() for n in holder.params}
            self.tokens[t] = dict(imp.meta["tokens"])
            self.weights[t] = {n: p.detach().clone() for n, p in holder.params.items()}


def _schedule(**kw):
    return PruneSchedule(final_sparsity=0.6, initial_sparsity=0.2, start=1, end=END, every_n_steps=2, block_size=8,
                         **kw)


def _run(tmp_path, schedule, *, lr=1e-2, config=None, inputs=True):
    model = tiny_llama(seed=3)
    cb = ImportanceCallback(config or ImportanceConfig(criterion="sparsegpt"), schedule=schedule)
    at = AtUpdates(cb)
    callbacks = [at, cb]
    if inputs:
        rec = Inputs(model, [n for n, p in model.named_parameters() if n.endswith("proj.weight")])
        callbacks.insert(0, rec)
    args = training_args(tmp_path, max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=lr, seed=0,
                         save_strategy="no", logging_steps=1000)
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=48, seed=1), callbacks=callbacks).train()
    return model, cb, at, rec if inputs else None


def _brute(rec, name, steps):
    xs = [x for t in steps for x in rec.x.get(t, {}).get(name, [])]
    X = torch.cat(xs)
    return X.T @ X, X.shape[0]


def test_restarted_statistic_holds_only_the_tokens_since_the_last_mask_change(tmp_path):
    schedule = _schedule(pruned_stream=True)
    assert schedule.restarts_statistics
    _, cb, at, rec = _run(tmp_path, schedule)
    updates = schedule.update_steps(MAX_STEPS)
    assert updates == [1, 3, 4]
    final = cb.importance()
    names = list(cb.mask_holder.params)
    # Each update reads the steps after the previous one (the first: steps 1..1), the end of training steps 5..12.
    spans = {1: range(1, 2), 3: range(2, 4), 4: range(4, 5)}
    for name in names:
        for t, steps in spans.items():
            H, tokens = _brute(rec, name, steps)
            torch.testing.assert_close(at.hessians[t][name].double(), H, rtol=1e-5, atol=1e-4)
            assert at.tokens[t][name] == tokens
        H, tokens = _brute(rec, name, range(END + 1, MAX_STEPS + 1))
        torch.testing.assert_close(final.state(name).double(), H, rtol=1e-5, atol=1e-4)
        assert final.meta["tokens"][name] == tokens
        # Not the whole run's sum: the pre-change tokens are gone.
        H_all, _ = _brute(rec, name, range(1, MAX_STEPS + 1))
        assert not torch.allclose(final.state(name).double(), H_all, rtol=1e-3)
    assert final.meta["num_samples"] == MAX_STEPS - END


def test_default_schedule_keeps_every_token(tmp_path):
    schedule = _schedule()
    assert not schedule.restarts_statistics
    _, cb, _, rec = _run(tmp_path, schedule)
    name = next(iter(cb.mask_holder.params))
    H, _ = _brute(rec, name, range(1, MAX_STEPS + 1))
    torch.testing.assert_close(cb.importance().state(name).double(), H, rtol=1e-5, atol=1e-4)


def test_refit_is_least_squares_on_the_pruned_stream_keeps_zeros_and_lowers_the_dense_output_error(tmp_path):
    # lr=0: only the pruning edits move the weights, so the re-fit's target (weights with the edits undone) is the
    # dense model and the test can rebuild it.
    dense = tiny_llama(seed=3)
    refit_at = MAX_STEPS - 2
    schedule = _schedule(refit_at=refit_at)
    model, cb, at, rec = _run(tmp_path, schedule, lr=0.0)
    holder = cb.mask_holder
    assert holder.refitted_at == refit_at and holder.sparsity == pytest.approx(0.6, abs=1e-3)
    assert cb.pruning_report(model).refitted_at == refit_at  # the step it ran: what sparsity.json and the card state
    W = {n: p.detach() for n, p in dense.named_parameters()}
    held_out = range(refit_at + 1, MAX_STEPS + 1)  # the pruned model's inputs at steps the re-fit did not read
    gains = []
    for name, p in holder.params.items():
        mask = holder.masks[name]
        got = p.detach()
        assert bool((got[~mask] == 0).all())
        # Exactly refit_masked_ towards the dense weights, on the Hessian gathered since the last update.
        H, _ = _brute(rec, name, range(END + 1, refit_at + 1))
        torch.testing.assert_close(at.hessians[refit_at][name].double(), H, rtol=1e-5, atol=1e-4)
        want = W[name].clone()
        refit_masked_(want, mask, at.hessians[refit_at][name], percdamp=schedule.dampening)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.equal(got, at.weights[refit_at][name])
        # Held-out tokens: the layer output error against the dense weight, before (OBS) and after the re-fit. The
        # inputs after the re-fit come from re-fitted layers upstream; both errors are measured on them.
        X = torch.cat([x for t in held_out for x in rec.x[t][name]])
        err = {k: float((X @ (W[name].double() - w.double()).T).square().sum())
               for k, w in (("obs", at.weights[refit_at][name]), ("refit", got))}
        gains.append(err["refit"] / err["obs"])
    assert sum(gains) / len(gains) < 0.95, gains
    assert max(gains) < 1.0 + 1e-6, gains


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="must be after end"):
        _schedule(refit_at=END)
    # mode="hold" re-fits towards the teacher's weights (tests/train/test_hold_refit.py): refused without one.
    with pytest.raises(ValueError, match="distill=DistillConfig\\(teacher="):
        ImportanceCallback(ImportanceConfig(criterion="sparsegpt"),
                           schedule=PruneSchedule(mode="hold", masks_from=str(tmp_path), refit_at=5))
    with pytest.raises(ValueError, match="pruned_stream"):
        _schedule(refit_at=8, pruned_stream=False)
    with pytest.raises(ValueError, match="refit_at"):
        _schedule(refit_at=-1)
    with pytest.raises(ValueError, match="criterion='sparsegpt'"):
        MaskHolder(_schedule(refit_at=8), criterion="wanda")
    with pytest.raises(ValueError, match="criterion='sparsegpt'"):
        ImportanceCallback(ImportanceConfig(criterion="wanda"), schedule=_schedule(pruned_stream=True))
    with pytest.raises(ValueError, match="at most max_steps"):
        _schedule(refit_at=MAX_STEPS + 1).refit_step(MAX_STEPS)
    assert _schedule(refit_at=0.5).refit_step(MAX_STEPS) == 6
    # Sampled every 4 steps: the one update (4) reads steps 1..4, then nothing until the re-fit (6).
    one_update = PruneSchedule(final_sparsity=0.6, start=0, end=END, every_n_steps=4, block_size=8, refit_at=6)
    with pytest.raises(ValueError, match="no pruned-stream sample since the last mask update"):
        _run(tmp_path, one_update, config=ImportanceConfig(criterion="sparsegpt", every_n_steps=4), inputs=False)
