import copy
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from hf_weightprune import ImportanceCallback, ImportanceConfig
from hf_weightprune.config import PruneConfig
from hf_weightprune.files.pruned_files import load_masks
from hf_weightprune.prune.lora import merge_and_unload_sparse
from hf_weightprune.prune.masks import num_to_prune
from hf_weightprune.prune.oneshot import oneshot_importance
from hf_weightprune.prune.pruner import prune_
from hf_weightprune.publish.export import save_pruned
from hf_weightprune.testing import TokenDataset, tiny_llama, tiny_phi3
from hf_weightprune.train.schedule import PruneSchedule
from tests.helpers import attach_all, training_args


def _train(model, callbacks, out, *, max_steps=10, batch=4, ga=1, save_steps=None, resume=None, logging_steps=1000):
    args = training_args(out, max_steps=max_steps, per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
                         learning_rate=1e-2, seed=0, save_strategy="steps" if save_steps else "no",
                         save_steps=save_steps or 500, logging_steps=logging_steps)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=48, vocab_size=model.config.vocab_size),
                      callbacks=callbacks)
    attach_all(trainer, callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


class Probe(TrainerCallback):
    """After every step (our callback has run): the masks, and the zeros of the weights at every training forward."""

    def __init__(self, holder, model):
        self.holder, self.masks, self.bad_forwards, self.forwards = holder, {}, 0, 0
        model.register_forward_pre_hook(self._check)

    def _check(self, module, args):
        if module.training:
            self.forwards += 1
            self.bad_forwards += any(bool(self.holder.params[n][~m].any()) for n, m in self.holder.masks.items())

    def on_step_end(self, args, state, control, **kwargs):
        self.masks[state.global_step] = {n: m.clone() for n, m in self.holder.masks.items()}
        for n, m in self.holder.masks.items():
            assert not self.holder.params[n][~m].any(), f"pruned weights of {n} not zero after step"


@pytest.mark.parametrize("kwargs", [
    {"final_sparsity": 0.1, "initial_sparsity": 0.2},
    {"final_sparsity": 1.0},
    {"final_sparsity": 0.5, "ramp": "exp"},
    {"final_sparsity": 0.5, "structure": "neurons"},
    {"final_sparsity": 0.5, "every_n_steps": 0},
    {"final_sparsity": 0.5, "start": 1.5},
    {"final_sparsity": 0.5, "scope": "block"},
    {"mode": "hold"},
    {"mode": "prune"},
    {"final_sparsity": 0.3, "structure": "2:4"},
])
def test_validation(kwargs):
    with pytest.raises(ValueError):
        PruneSchedule(**kwargs)


def test_schedule_formula():
    s = PruneSchedule(final_sparsity=0.8, initial_sparsity=0.1, start=0.2, end=0.6, every_n_steps=3)
    assert s.resolve_steps(50) == (10, 30)
    assert s.update_steps(50) == [10, 13, 16, 19, 22, 25, 28, 30]
    for t in (0, 9):
        assert s.target_at(t, 50) == 0.0
    for t in (10, 17, 30, 45):
        p = min(1.0, (t - 10) / 20)
        assert s.target_at(t, 50) == pytest.approx(0.8 + (0.1 - 0.8) * (1 - p) ** 3)
    lin = PruneSchedule(final_sparsity=0.5, start=0, end=10, ramp="linear")
    assert lin.update_steps(20) == [10] and lin.target_at(5, 20) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="max_steps"):
        PruneSchedule(final_sparsity=0.5, start=5, end=30).resolve_steps(20)
    assert PruneSchedule(structure="2:4").final_sparsity == 0.5


@pytest.mark.parametrize("structure,scope,ramp,ga", [
    ("unstructured", "global", "cubic", 1),
    ("unstructured", "layer", "linear", 2),
    ("unstructured", "row", "cubic", 1),
    ("2:4", None, "cubic", 1),
])
def test_sparsity_follows_schedule(structure, scope, ramp, ga, tmp_path):
    model = tiny_llama(seed=1)
    schedule = PruneSchedule(final_sparsity=0.75 if structure == "unstructured" else None, initial_sparsity=0.1,
                             start=2, end=8, every_n_steps=2, ramp=ramp, structure=structure, scope=scope,
                             exclude_modules=["layers.1.mlp.down_proj"])
    # temporal_magnitude: a global threshold over wanda scores would prune a whole o_proj (refused, see test_defaults)
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"), schedule=schedule)
    probe = Probe(cb.mask_holder, model)
    trainer = _train(model, [cb, probe], tmp_path, max_steps=10, ga=ga,
                     batch=4 // ga)
    assert probe.forwards == 10 * ga and probe.bad_forwards == 0  # zeros at every forward, micro-batches included
    params = cb.mask_holder.params
    assert "model.layers.1.mlp.down_proj.weight" not in params and len(params) == 13
    updates = schedule.update_steps(10)
    assert updates == [2, 4, 6, 8]
    for t in range(1, 11):
        masks = probe.masks[t]
        if t < 2:
            assert masks == {}
            continue
        target = schedule.target_at(max(u for u in updates if u <= t), 10)
        for n, m in masks.items():  # masks only shrink
            prev = probe.masks[t - 1].get(n)
            assert prev is None or not (m & ~prev).any()
        if scope == "global":
            total = sum(m.numel() for m in masks.values())
            assert sum(int((~m).sum()) for m in masks.values()) == num_to_prune(total, target)
        elif scope == "row":
            for m in masks.values():
                assert ((~m).sum(1) == num_to_prune(m.shape[1], target)).all()
        else:
            for m in masks.values():
                assert int((~m).sum()) == num_to_prune(m.numel(), target)
    final = probe.masks[10]
    if structure == "2:4":
        for m in final.values():
            assert ((~m).reshape(-1, 4).sum(1) == 2).all()
    # the weights themselves: exactly the masked zeros at the end
    for n, m in final.items():
        assert torch.equal(params[n] != 0, m)
    # each update is reported to the loggers even though logging_steps=1000
    logged = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert logged == updates
    pruning_logs = [h for h in trainer.state.log_history if "pruning/target_sparsity" in h]
    assert [h["step"] for h in pruning_logs] == updates + [10]  # and at the train summary
    assert pruning_logs[-1]["pruning/target_sparsity"] == pytest.approx(schedule.final_sparsity)


def test_optimizer_state_zeroed_at_updates(tmp_path):
    model = tiny_llama(seed=2)
    schedule = PruneSchedule(final_sparsity=0.5, start=3, end=4, every_n_steps=1)
    holder = (cb := ImportanceCallback(schedule=schedule)).mask_holder
    trainer = _train(model, [cb], tmp_path, max_steps=4)
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    for n, m in holder.masks.items():
        st = opt.state[holder.params[n]]
        assert not st["exp_avg"][~m].any() and not st["exp_avg_sq"][~m].any()
        assert st["exp_avg"][m].any()


def test_resume_mid_schedule_equals_uninterrupted(tmp_path):
    def run(out, **kw):
        model = tiny_llama(seed=3)
        schedule = PruneSchedule(final_sparsity=0.6, start=2, end=9, every_n_steps=3)
        cb = ImportanceCallback(schedule=schedule)
        _train(model, [cb], out, max_steps=12, save_steps=6, **kw)
        return model, cb.mask_holder

    full, s_full = run(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-6"
    saved = json.loads((ckpt / "importance" / "importance_config.json").read_text())["schedule"]
    assert saved["last_update_step"] == 5 and saved["has_masks"]  # mid-schedule: updates at 2, 5 | 8, 9
    resumed, s_res = run(tmp_path / "a", resume=str(ckpt))
    assert s_res.num_updates == s_full.num_updates == 4
    for n, m in s_full.masks.items():
        assert torch.equal(m, s_res.masks[n])
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="schedule changed"):
        model = tiny_llama(seed=3)
        other = PruneSchedule(final_sparsity=0.7, start=2, end=9, every_n_steps=3)
        _train(model, [ImportanceCallback(schedule=other)], tmp_path / "a", max_steps=12, resume=str(ckpt))


def test_recovery_finetune_holds_mask(tmp_path):
    model = tiny_phi3(seed=4)
    cb = ImportanceCallback(ImportanceConfig(criterion="magnitude"))
    _train(model, [cb], tmp_path / "train", max_steps=3)
    report = prune_(model, cb.importance(), PruneConfig(sparsity=0.5), progress=False)
    save_pruned(model, tmp_path / "pruned", report=report, write_card=False)
    masks = load_masks(tmp_path / "pruned")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    before = {n: p.detach().clone() for n, p in pruned.named_parameters()}
    schedule = PruneSchedule(mode="hold", masks_from=str(tmp_path / "pruned"))
    holder = (cb := ImportanceCallback(schedule=schedule)).mask_holder
    _train(pruned, [cb], tmp_path / "recover", max_steps=6)
    after = dict(pruned.named_parameters())
    assert holder.sparsity == pytest.approx(0.5, abs=1e-3) and set(masks) == set(holder.masks)
    for n, m in masks.items():
        assert torch.equal(before[n] != 0, m) and torch.equal(after[n] != 0, m), n
        assert not torch.equal(before[n], after[n])  # it did train


def test_a_hold_schedule_records_only_the_fields_it_uses_and_resumes_checkpoints_that_hold_them_all(tmp_path):
    """A hold's dict (sparsity.json, its checkpoints) has no ramp it never ran; a checkpoint of an earlier version,
    whose dict holds every field, still resumes, and a change of a field the hold reads is still refused."""
    import dataclasses

    from hf_weightprune.train.holder import MaskHolder

    hold = PruneSchedule(mode="hold", masks_from=str(tmp_path), refit_at=3, cross_term=True)
    recorded = hold.to_dict()
    for gradual in ("final_sparsity", "initial_sparsity", "start", "end", "every_n_steps", "ramp", "reconstruct",
                    "block_size", "pruned_stream", "order", "allow_collapse"):
        assert gradual not in recorded, gradual
    assert recorded == {"mode": "hold", "masks_from": str(tmp_path), "structure": "unstructured", "scope": None,
                        "target_modules": None, "exclude_modules": None, "dampening": 0.01, "refit_at": 3,
                        "cross_term": True, "cross_alpha": 0.25, "cross_max_in_features": None}
    assert PruneSchedule.from_dict(recorded) == hold  # the defaults fill in what is not recorded
    assert "end" in PruneSchedule(final_sparsity=0.5).to_dict()  # a gradual schedule records everything
    old = dataclasses.asdict(hold)  # what earlier versions wrote: every field
    assert hold.diff(recorded) == hold.diff(old) == {}
    assert PruneSchedule(mode="hold", masks_from=str(tmp_path), refit_at=4, cross_term=True).diff(old) == {
        "refit_at": (3, 4)}
    assert PruneSchedule(final_sparsity=0.5).diff(recorded)["mode"] == ("hold", "prune")
    state = {"config": old, "sparsity": 0.5, "target_sparsity": 0.5, "last_update_step": 0, "num_updates": 1,
             "steps": None, "has_masks": True, "reconstruction": None, "pending_step": None, "refitted_at": None}
    MaskHolder(hold).load_state_dict(state, {})  # an earlier version's hold checkpoint: accepted
    with pytest.raises(ValueError, match=r"schedule changed since the checkpoint: refit_at: checkpoint 3 -> now 4"):
        MaskHolder(PruneSchedule(mode="hold", masks_from=str(tmp_path), refit_at=4, cross_term=True)).load_state_dict(
            state, {})
    # cross_alpha's default moved from 0.5 to 0.25: a run checkpointed with the old default, resumed with the new one,
    # is refused in one line naming both shares, not silently re-fitted with another
    before = {**state, "config": {**old, "cross_alpha": 0.5}}
    with pytest.raises(ValueError, match=r"schedule changed since the checkpoint: cross_alpha: checkpoint 0.5 -> now 0.25"):
        MaskHolder(hold).load_state_dict(before, {})
    MaskHolder(PruneSchedule(mode="hold", masks_from=str(tmp_path), refit_at=3, cross_term=True,
                             cross_alpha=0.5)).load_state_dict(before, {})


def test_hold_on_the_dense_model_warns_that_it_is_a_mask_only_prune(tmp_path, caplog):
    dense = tiny_phi3(seed=4)
    pruned = copy.deepcopy(dense)
    report = prune_(pruned, oneshot_importance(pruned), PruneConfig(sparsity=0.5), progress=False)
    save_pruned(pruned, tmp_path / "pruned", report=report, write_card=False)
    masks = load_masks(tmp_path / "pruned")
    nonzero = sum(int(dense.get_parameter(n).detach()[~m].count_nonzero()) for n, m in masks.items())
    pruned_weights = sum(int((~m).sum()) for m in masks.values())
    for name, model in (("pruned", pruned), ("dense", dense)):
        caplog.clear()
        schedule = PruneSchedule(mode="hold", masks_from=str(tmp_path / "pruned"))
        with caplog.at_level(logging.WARNING, logger="hf_weightprune.train.holder"):
            _train(model, [ImportanceCallback(schedule=schedule)], tmp_path / name, max_steps=1)
        warned = "zeroing them now is a mask-only prune" in caplog.text
        assert warned == (name == "dense"), (name, caplog.text)
    assert nonzero > 0 and f"{nonzero} of the {pruned_weights} weights" in caplog.text
    assert f"from_pretrained('{tmp_path / 'pruned'}')" in caplog.text


def test_lora_merge_keeps_mask(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_phi3(seed=6)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    schedule = PruneSchedule(final_sparsity=0.5, start=1, end=4, every_n_steps=1)
    holder = (cb := ImportanceCallback(ImportanceConfig(criterion="wanda"), schedule=schedule)).mask_holder
    _train(model, [cb], tmp_path, max_steps=6)
    assert holder.sparsity == pytest.approx(0.5, abs=1e-4)
    masks = holder.masks
    reference = copy.deepcopy(model).merge_and_unload()  # peft's own (dense) merge
    merged, report = merge_and_unload_sparse(model, return_report=True)
    assert type(merged).__name__ == "Phi3ForCausalLM"
    ref = dict(reference.named_parameters())
    for n, p in merged.named_parameters():
        if n in masks:
            assert torch.equal(p != 0, masks[n]), n
            assert torch.equal(p[masks[n]], ref[n][masks[n]]), n
            assert (ref[n][~masks[n]] != 0).all()  # the plain merge fills the zeros back in
        else:
            assert torch.equal(p, ref[n]), n
    assert report.global_sparsity == pytest.approx(0.5, abs=1e-4)
    assert report.tensors.keys() == masks.keys()
    with pytest.raises(ValueError, match="peft LoRA model"):
        merge_and_unload_sparse(merged)


@pytest.mark.multiproc
def test_ddp_masks_identical_on_ranks(tmp_path):
    with socket.socket() as sock:  # torchrun's static rendezvous needs a concrete free port
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", port, "tests/ddp_schedule.py", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and any(k.startswith("mask.") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0]["world_size"] == 2 and info[0]["zeros"] == info[1]["zeros"]
    schedule = PruneSchedule(final_sparsity=0.7, start=1, end=7, every_n_steps=2, scope="global")
    expected = {str(t): num_to_prune(info[0]["numel"], schedule.target_at(t, 8)) for t in schedule.update_steps(8)}
    assert info[0]["zeros"] == expected
