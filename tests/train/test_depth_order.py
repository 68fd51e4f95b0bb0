"""`PruneSchedule(order="depth")`: decoder layers pruned front to back, each from statistics gathered after the
layers before it were pruned (the training-time counterpart of the sequential calibration pipeline)."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.files import importance_files as F
from hf_weightprune.files import training_state as T
from hf_weightprune.testing import TokenDataset, tiny_llama
from hf_weightprune.train.schedule import PruneSchedule
from hf_weightprune.train.stream import layer_groups
from tests.helpers import assert_same_importance, sigkill_at_hang, training_args, workdir
from tests.scripts.ckpt_train import make_callback, run

MAX_STEPS = 10


class Record(TrainerCallback):
    """Listed first: each step's Linear inputs (brute force), the statistic each update reads, the masks after each
    step."""

    def __init__(self, cb, model, names):
        self.cb, self.step, self.x, self.seen, self.after = cb, 0, {}, {}, {}
        modules = dict(model.named_modules())
        for name in names:
            modules[name.removesuffix(".weight")].register_forward_pre_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, args):
            if module.training:
                self.x.setdefault(self.step, {}).setdefault(name, []).append(args[0].detach().double().flatten(0, -2))
        return hook

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1
        if state.global_step:  # the masks as step global_step left them (its update included)
            self.after[state.global_step] = {n: m.clone() for n, m in self.cb.mask_holder.masks.items()}

    def on_step_end(self, args, state, control, **kwargs):
        if self.cb.mask_holder.is_update_step(state.global_step):  # before the update reads (and restarts) it
            imp = self.cb.importance()
            self.seen[state.global_step] = {n: imp.state(n).clone() for n in self.cb.mask_holder.params}


def test_layers_pruned_front_to_back_each_from_the_inputs_after_the_previous_mask(tmp_path):
    model = tiny_llama(seed=3)
    schedule = PruneSchedule(final_sparsity=0.6, start=0, end=6, order="depth", block_size=8)
    assert schedule.restarts_statistics
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt"), schedule=schedule)
    names = [n for n, p in model.named_parameters() if n.endswith("proj.weight")]
    rec = Record(cb, model, names)
    args = training_args(tmp_path, max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-2, seed=0,
                         save_strategy="no", logging_steps=1000)
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=48, seed=1), callbacks=[rec, cb]).train()
    holder = cb.mask_holder
    groups = layer_groups(names)
    assert [len(g) for g in groups] == [7, 7] and schedule.layer_steps(MAX_STEPS, 2) == [3, 6]
    steps = {3: groups[0], 6: groups[1]}
    assert sorted(rec.seen) == [3, 6]
    previous = 0
    for t in range(1, MAX_STEPS):
        done = [n for s, group in steps.items() if s <= t for n in group]
        for name in names:  # a layer is pruned at its step, to the target; a later one is untouched until its step
            pruned = 1 - float(rec.after[t][name].float().mean()) if name in rec.after[t] else 0.0
            assert pruned == (pytest.approx(0.6, abs=0.02) if name in done else 0.0), (t, name)
    for t, group in steps.items():
        for name in group:  # the statistic this layer's mask came from: only steps after the previous layer's mask
            X = torch.cat([x for s in range(previous + 1, t + 1) for x in rec.x[s][name]])
            torch.testing.assert_close(rec.seen[t][name].double(), X.T @ X, rtol=1e-5, atol=1e-4)
            X_all = torch.cat([x for s in range(1, t + 1) for x in rec.x[s][name]])
            assert t == 3 or not torch.allclose(rec.seen[t][name].double(), X_all.T @ X_all, rtol=1e-3)
        previous = t
    assert holder.sparsity == pytest.approx(0.6, abs=1e-3) and holder.target_sparsity == pytest.approx(0.6)
    assert all(not bool(p.detach()[~holder.masks[n]].any()) for n, p in holder.params.items())
    assert holder.reconstruction == "OBS"


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="order must be one of"):
        PruneSchedule(final_sparsity=0.5, order="width")
    with pytest.raises(ValueError, match="order='depth' restarts the statistics .* needs pruned_stream"):
        PruneSchedule(final_sparsity=0.5, order="depth", pruned_stream=False)
    with pytest.raises(ValueError, match="track an activation criterion .* not 'temporal_magnitude'"):
        ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"),
                           schedule=PruneSchedule(final_sparsity=0.5, order="depth"))
    with pytest.raises(ValueError, match="2 layer groups need at least 2 steps in start..end \\(steps 3..4\\)"):
        PruneSchedule(final_sparsity=0.5, start=3, end=4, order="depth").layer_steps(10, 2)


def test_sigkill_between_layers_resumes_exactly(tmp_path_factory, tmp_path):
    """Killed once checkpoint-3 (layer 0 pruned, layer 1 dense, the statistic restarted) is complete."""
    killed = sigkill_at_hang(tmp_path_factory.mktemp("killed"),
                             {"depth": ["--criterion", "sparsegpt", "--hang-after-save", "3", "--schedule", "depth"]})
    out = workdir(killed, "depth", tmp_path)
    masks = T.load_schedule_masks(out / "checkpoint-3" / F.IMPORTANCE_DIR)
    assert {n.split(".")[2] for n, m in masks.items() if not bool(m.all())} == {"0"}  # only layer 0 pruned
    run(out, "sparsegpt", resume=True, importance_callback=make_callback("sparsegpt", schedule="depth"))
    ref = tmp_path / "reference"
    cb = make_callback("sparsegpt", schedule="depth")
    run(ref, "sparsegpt", importance_callback=cb)
    assert cb.mask_holder.sparsity == pytest.approx(0.5, abs=1e-3)
    for step in (6, 8):
        a, b = (load_file(d / f"checkpoint-{step}" / "model.safetensors") for d in (out, ref))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), step
        ma, mb = (T.load_schedule_masks(d / f"checkpoint-{step}" / F.IMPORTANCE_DIR) for d in (out, ref))
        assert ma.keys() == mb.keys() and all(torch.equal(ma[n], mb[n]) for n in mb)
        assert_same_importance(out / f"checkpoint-{step}", ref / f"checkpoint-{step}")
