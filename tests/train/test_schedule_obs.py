"""Gradual pruning with `sparsegpt` importance: SparseGPT's OBS sweep at every mask update of a `PruneSchedule`."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.matching import find_tracked_weights
from hf_weightprune.prune.masks import num_to_prune
from hf_weightprune.prune.obs import sparsegpt_prune_
from hf_weightprune.publish.export import save_pruned
from hf_weightprune.testing import TokenDataset, tiny_llama
from hf_weightprune.train.holder import MaskHolder
from hf_weightprune.train.schedule import PruneSchedule
from tests.helpers import training_args

MAX_STEPS = 8
BLOCK = 8  # several blocks per weight (in = 32 or 64): the forced prunes cross block boundaries


class Snap(TrainerCallback):
    """At every mask update step: weights, masks and Adam moments; `cb` set: also the importance's Hessians.

    Listed before the `ImportanceCallback` it sees the state the update starts from, after it the result.
    """

    def __init__(self, holder, cb=None):
        self.holder, self.cb, self.at = holder, cb, {}

    def on_step_end(self, args, state, control, **kwargs):
        holder = self.holder
        t = state.global_step
        if not holder.is_update_step(t):
            return
        opt = holder.optimizer
        snap = {"weights": {n: p.detach().clone() for n, p in holder.params.items()},
                "masks": {n: m.clone() for n, m in holder.masks.items()},
                "moments": {n: {k: v.clone() for k, v in opt.state[p].items() if k in ("exp_avg", "exp_avg_sq")}
                            for n, p in holder.params.items()},
                "target": holder.target_sparsity}
        if self.cb is not None:
            imp = self.cb.importance()
            snap["H"] = {n: imp.state(n).clone() for n in holder.params}
        self.at[t] = snap


class After(Snap):
    """A second class: the Trainer warns when one callback class is added twice."""


def _run(tmp_path, schedule, *, criterion="sparsegpt", lr=1e-2, seed=5):
    model = tiny_llama(seed=seed)
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion), schedule=schedule)
    before, after = Snap(cb.mask_holder), After(cb.mask_holder, cb)
    args = training_args(tmp_path, max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=lr, seed=0,
                         save_strategy="no", logging_steps=1000)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=48, seed=1),
                      callbacks=[before, cb, after])
    trainer.train()
    return model, cb, before.at, after.at


def _schedule(structure="unstructured", scope=None, block_size=BLOCK, **kw):
    final = None if ":" in structure else 0.6
    return PruneSchedule(final_sparsity=final, initial_sparsity=0.1, start=1, end=6, every_n_steps=2,
                         structure=structure, scope=scope, block_size=block_size, **kw)


CASES = [("unstructured", None), ("unstructured", "row"), ("2:4", None)]


@pytest.mark.parametrize("structure, scope", CASES)
def test_update_is_the_one_shot_sweep_with_earlier_masks_forced(tmp_path, structure, scope):
    schedule = _schedule(structure, scope)
    _, _, before, after = _run(tmp_path, schedule)
    assert sorted(after) == schedule.update_steps(MAX_STEPS) == [1, 3, 5, 6]
    for t in sorted(after):
        target = after[t]["target"]
        assert target == pytest.approx(schedule.target_at(t, MAX_STEPS))
        for name, pre in before[t]["weights"].items():
            prev = before[t]["masks"].get(name)
            w = pre.clone()
            if structure == "2:4":
                kw = dict(nm="2:4", nm_sparsity=None if target >= 0.5 - 1e-9 else target)
            else:
                kw = dict(sparsity=target, scope=scope or "layer")
            keep = sparsegpt_prune_(w, after[t]["H"][name], blocksize=BLOCK, percdamp=0.01, previous=prev, **kw)
            got_w, got_m = after[t]["weights"][name], after[t]["masks"][name]
            assert torch.equal(got_m, keep), (t, name)
            torch.testing.assert_close(got_w, w, rtol=1e-5, atol=1e-6)
            # the kept weights were reconstructed, not just masked (when the update pruned more: a count that
            # rounds the same at two targets prunes nothing new, and then nothing moves)
            if prev is None or not torch.equal(got_m, prev):
                assert not torch.allclose(got_w, pre * got_m), (t, name, target)
            else:
                assert torch.equal(got_w, pre), (t, name)
            # masks only shrink, and the count is exactly the target
            if prev is not None:
                assert not bool((got_m & ~prev).any()), (t, name)
            pruned = ~got_m
            rows, cols = pruned.shape
            if scope == "row":
                assert pruned.sum(1).tolist() == [num_to_prune(cols, target)] * rows
            else:
                assert int(pruned.sum()) == num_to_prune(pruned.numel(), target), (t, name)
            if structure == "2:4":
                per_group = pruned.reshape(-1, 4).sum(1)
                assert int(per_group.max()) <= 2
                if t == 6:  # end: exactly 2:4
                    assert bool((per_group == 2).all())


def test_adam_moments_of_kept_weights_are_kept_and_of_pruned_zeroed(tmp_path):
    schedule = _schedule()
    _, _, before, after = _run(tmp_path, schedule)
    moved = 0
    for t in after:
        for name, moments in after[t]["moments"].items():
            keep = after[t]["masks"][name]
            for key in ("exp_avg", "exp_avg_sq"):
                old, new = before[t]["moments"][name][key], moments[key]
                assert torch.equal(new[keep], old[keep]), (t, name, key)  # kept weights: unchanged moments
                assert not bool(new[~keep].any()), (t, name, key)  # pruned weights: zero
                assert bool(old[~keep].any()) or t == 1  # a real reset (the moments were not zero already)
            w0, w1 = before[t]["weights"][name], after[t]["weights"][name]
            moved += int((w0[keep] != w1[keep]).sum())
    assert moved > 0  # the OBS update did move kept weights whose moments were kept


def _linear_inputs(model):
    """`{name: X}`, `[tokens, in]` float64 inputs of every tracked Linear on the training data (the dense model)."""
    acts, hooks = {}, []
    for t in find_tracked_weights(model):
        def hook(module, inputs, output, name=t.name):
            acts.setdefault(name, []).append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double())
        hooks.append(t.module.register_forward_hook(hook))
    data = TokenDataset(n=48, seed=1)
    with torch.no_grad():
        model(input_ids=data.ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(x) for n, x in acts.items()}


def test_obs_gives_a_smaller_layer_output_error_than_masks_only(tmp_path):
    # lr=0: the weights change only by pruning, so `W` is the dense weight and the error is pruning's alone. The
    # tiny random model's Linear inputs are nearly uncorrelated, where OBS gains least (7.5% here).
    dense = tiny_llama(seed=5)
    X = _linear_inputs(dense)
    W = {n: p.detach().double() for n, p in dense.named_parameters()}
    errors = {}
    for reconstruct in (None, False):
        schedule = _schedule(reconstruct=reconstruct)
        model, cb, _, _ = _run(tmp_path / str(reconstruct), schedule, lr=0.0)
        assert cb.mask_holder.sparsity == pytest.approx(0.6, abs=1e-3)
        errors[reconstruct] = sum(
            float((X[n] @ (W[n] - p.detach().double()).T).square().sum()) for n, p in cb.mask_holder.params.items())
    assert errors[None] < 0.95 * errors[False], errors


def test_report_and_sparsity_json_say_obs(tmp_path):
    schedule = _schedule()
    model, cb, _, _ = _run(tmp_path / "run", schedule)
    report = cb.pruning_report(model, cb.importance())
    assert report.reconstruction == "OBS" and report.criterion == "sparsegpt"
    assert cb.mask_holder.state_dict()["reconstruction"] == "OBS"
    resumed = MaskHolder(_schedule())  # a resume restores it with the masks
    resumed.load_state_dict(cb.mask_holder.state_dict(), cb.mask_holder.masks)
    assert resumed.reconstruction == "OBS"
    save_pruned(model, tmp_path / "pruned", report=report, schedule=schedule, write_card=False)
    with open(tmp_path / "pruned" / "sparsity.json") as f:
        saved = json.load(f)
    assert saved["reconstruction"] == "OBS" and saved["schedule"]["reconstruct"] is None

    masks_only = _schedule(reconstruct=False)
    model, cb, before, after = _run(tmp_path / "masks", masks_only)
    assert cb.pruning_report(model).reconstruction is None
    for t in after:  # mask-only: the kept weights are untouched by the update
        for name, w in after[t]["weights"].items():
            assert torch.equal(w, before[t]["weights"][name] * after[t]["masks"][name])


def test_refusals_before_training(tmp_path):
    msg = "reconstruct=True needs the input Hessians of criterion 'sparsegpt'"
    with pytest.raises(ValueError, match=msg):
        ImportanceCallback(ImportanceConfig(criterion="wanda"), schedule=_schedule(reconstruct=True))
    with pytest.raises(ValueError, match="reconstruct=True needs mode='prune'"):
        PruneSchedule(mode="hold", masks_from=str(tmp_path), reconstruct=True)
    with pytest.raises(ValueError, match=r"structure '2:4': M=4 must divide block_size=6 .* pass block_size=4"):
        _schedule("2:4", block_size=6)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        _schedule("2:4", block_size=0)
    # a resumed run must agree on the OBS settings; every checkpoint since 0.1.0 records them, so a saved config
    # without them (written before that release) is a change, not a default
    saved = _schedule().to_dict()
    assert _schedule().diff(saved) == {}
    assert set(_schedule(dampening=0.1).diff(saved)) == {"dampening"}
    old = {k: v for k, v in saved.items() if k not in ("reconstruct", "dampening", "block_size")}
    assert set(PruneSchedule(**{**old, "block_size": 128}).diff(old)) == {"dampening", "block_size"}


def _layer(rows=16, cols=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, cols, generator=g) * torch.linspace(0.2, 2.0, cols)
    return torch.randn(rows, cols, generator=g), X.T @ X


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_sweep_forced_prunes_stay_pruned_with_exact_counts(scope):
    W, H = _layer()
    # forced prunes crowd the last block: the earlier blocks must leave room for them
    previous = torch.ones_like(W, dtype=torch.bool)
    previous[:, 24:] = torch.rand(W.shape[0], 8, generator=torch.Generator().manual_seed(1)) > 0.6
    previous[:, 24:27] = False  # >= 3 per row
    w = W.clone()
    keep = sparsegpt_prune_(w, H, sparsity=0.5, scope=scope, blocksize=8, previous=previous)
    assert not bool((keep & ~previous).any())
    if scope == "row":
        assert (~keep).sum(1).tolist() == [16] * 16
    else:
        assert int((~keep).sum()) == 256
    assert not bool(w[~keep].any())
    # an all-keep `previous` is no constraint: the one-shot result, bit for bit
    a, b = W.clone(), W.clone()
    assert torch.equal(sparsegpt_prune_(a, H, sparsity=0.5, scope=scope, blocksize=8),
                       sparsegpt_prune_(b, H, sparsity=0.5, scope=scope, blocksize=8,
                                        previous=torch.ones_like(W, dtype=torch.bool)))
    assert torch.equal(a, b)


def test_sweep_refuses_a_previous_mask_beyond_the_target_before_any_work():
    W, H = _layer()
    before = W.clone()
    previous = torch.ones_like(W, dtype=torch.bool)
    previous[0, :10] = False
    with pytest.raises(ValueError, match="more than the 8 this `sparsity` prunes"):
        sparsegpt_prune_(W, H, sparsity=0.25, scope="row", previous=previous)
    previous[0, :10] = True
    previous[0, :3] = False
    with pytest.raises(ValueError, match="more than 2 of some group of 4"):
        sparsegpt_prune_(W, H, nm="2:4", previous=previous)
    with pytest.raises(ValueError, match="`previous` must be a bool keep-mask"):
        sparsegpt_prune_(W, H, sparsity=0.5, previous=previous.float())
    with pytest.raises(ValueError, match="`nm_sparsity` must be a float in"):
        sparsegpt_prune_(W, H, nm="2:4", nm_sparsity=0.6)
    assert torch.equal(W, before)


@pytest.mark.multiproc
def test_ddp_obs_updates_identical_on_ranks(tmp_path):
    with socket.socket() as sock:  # torchrun's static rendezvous needs a concrete free port
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", port, "tests/ddp_schedule_obs.py", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and any(k.startswith("mask.") for k in r0)
    for k in r0:  # OBS moves weights outside the gradient: only the same Hessian on both ranks keeps them equal
        assert torch.equal(r0[k], r1[k]), k
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0] == info[1]
    assert info[0]["world_size"] == 2 and info[0]["reconstruction"] == "OBS"
    # the Hessians the updates used are the sum over both ranks' tokens: 8 steps x 2 ranks x 2 windows x 16 tokens
    assert info[0]["tokens"] == 8 * 2 * 2 * 16


def test_global_scope_prunes_the_global_count_with_obs(tmp_path):
    # Across all projections the OBS saliencies do not compare (o_proj would be emptied): refused as prune_ does.
    with pytest.raises(ValueError, match="o_proj.weight would be pruned to 100% .* use scope='layer'"):
        _run(tmp_path / "all", _schedule(scope="global"))
    schedule = _schedule(scope="global", target_modules=["gate_proj", "up_proj"])
    _, _, before, after = _run(tmp_path / "mlp", schedule)
    numel = sum(m.numel() for m in after[1]["masks"].values())
    for t in after:
        pruned = {n: int((~m).sum()) for n, m in after[t]["masks"].items()}
        assert sum(pruned.values()) == num_to_prune(numel, after[t]["target"]), t
        assert len(set(pruned.values())) > 1  # per-tensor shares of one threshold, not a uniform sparsity
        for name, m in after[t]["masks"].items():
            prev = before[t]["masks"].get(name)
            assert prev is None or not bool((m & ~prev).any())
