"""FSDP2 (`fully_shard`) without the Trainer: run under `torchrun --nproc_per_node 2` (gloo, CPU).

`python -m tests.dist_fsdp OUT CRITERION...`: every rank trains the same batches, so FSDP2's averaged
gradients equal one process's and an unsharded copy trained beside it (recorded by `tests.helpers.Recorder`)
gives a brute-force reference. The callback's events are driven by hand, as a raw training loop would.
Tiny Phi-3 with 4 KV heads has a fused `qkv_proj` of 96 rows (q 0-31, k 32-63, v 64-95): the shard boundary
at row 48 falls inside k. Writes `OUT/<criterion>/` (checkpoint-2 and the final importance) and checks, on
every rank: sharded accumulation == reference, `importance()` == the loaded file, resume restores the
rank's rows. (FSDP1 cannot be built on CPU: its refusal is tested in `test_distributed.py`.)
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import TrainerControl, TrainerState

from hf_weightprune import ImportanceCallback, ImportanceConfig, load_importance
from hf_weightprune.testing import tiny_phi3
from tests.helpers import Recorder, end_process_group, reference, training_args

STEPS, SAVE_AT = 4, 2
RTOL, ATOL = 1e-5, 1e-7  # float32 accumulation against a float64 reference, as in test_callback.py


def model_and_reference():
    model = tiny_phi3(seed=1, num_key_value_heads=4)
    ref = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, ref


def train(criterion: str, out: str):
    model, ref = model_and_reference()
    rec = Recorder(ref, record_acts=criterion == "wanda", record_hessians=criterion == "sparsegpt")
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
    args = training_args(out, seed=0)
    state, control = TrainerState(max_steps=STEPS), TrainerControl()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref)]
    cb.on_train_begin(args, state, control, model=model)
    g = torch.Generator().manual_seed(0)  # same data on every rank
    for step in range(1, STEPS + 1):
        ids = torch.randint(3, 128, (2, 16), generator=g)
        cb.on_step_begin(args, state, control)
        for m in (model, ref):
            m(input_ids=ids, labels=ids).loss.backward()
        cb.on_pre_optimizer_step(args, state, control)
        rec.on_pre_optimizer_step(args, state, control)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        state.global_step = step
        cb.on_step_end(args, state, control)
        rec.on_step_end(args, state, control)
        if step == SAVE_AT:
            os.makedirs(os.path.join(out, f"checkpoint-{step}"), exist_ok=True)
            cb.on_save(args, state, control)
    cb.on_train_end(args, state, control)
    return model, ref, rec, cb


def check(criterion: str, out: str) -> None:
    model, ref, rec, cb = train(criterion, out)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    if criterion not in ("wanda", "sparsegpt"):  # activation statistics: every rank keeps full sums
        rank = dist.get_rank()
        assert cb.accumulator.plan.rows[qkv] == (48 * rank, 48), cb.accumulator.plan.rows[qkv]  # the boundary at row 48 is inside k (32-63)
        assert cb.accumulator.states[qkv].shape == (48, 32)  # local rows only
    expected = reference(criterion, rec) if criterion != "magnitude" else {
        t.name: t.param.detach().double().abs() for t in rec.tracked}
    loaded = load_importance(out, model=ref)
    live = cb.importance().bind(ref)
    assert loaded.names == list(expected) and qkv in expected
    for name, value in expected.items():
        if criterion == "sparsegpt":  # the Hessians (sums over both ranks' identical batches, halved: see below)
            got = loaded.state(name).double() / dist.get_world_size()
            torch.testing.assert_close(got, value, rtol=RTOL, atol=RTOL * value.abs().max().item(), msg=name)
            assert loaded.meta["tokens"][name] == dist.get_world_size() * STEPS * 2 * 16
            torch.testing.assert_close(live.state(name), loaded.state(name), rtol=0, atol=0, msg=name)
            continue
        torch.testing.assert_close(loaded.scores[name].double(), value, rtol=RTOL, atol=ATOL, msg=name)
        torch.testing.assert_close(live.scores[name], loaded.scores[name], rtol=0, atol=0, msg=name)
    # Resume: a fresh sharded model restores its own rows of checkpoint-2 (FSDP2 layout written above).
    model2, _ = model_and_reference()
    cb2 = ImportanceCallback(ImportanceConfig(criterion=criterion))
    args = training_args(out, seed=0)
    cb2.on_train_begin(args, TrainerState(max_steps=STEPS, global_step=SAVE_AT), TrainerControl(), model=model2)
    at_save = load_importance(os.path.join(out, f"checkpoint-{SAVE_AT}"), model=ref)
    for name in expected:
        saved = at_save.state(name)
        if name in cb2.accumulator.plan.rows:  # this rank's rows of the reassembled buffer
            offset, rows = cb2.accumulator.plan.rows[name]
            saved = saved[offset : offset + rows]
        elif dist.get_rank() != 0:  # wanda's activation sums are restored once, on rank 0
            saved = torch.zeros_like(saved)
        torch.testing.assert_close(cb2.accumulator.states[name], saved, rtol=0, atol=0, msg=f"{criterion} {name}")
    if criterion != "magnitude":  # magnitude snapshots the current weights whenever it is read
        restored = cb2.importance().bind(ref)
        assert restored.num_samples == at_save.num_samples == SAVE_AT
        for name in expected:
            torch.testing.assert_close(restored.state(name), at_save.state(name), rtol=0, atol=0, msg=name)


def main(out: str, criteria: list[str]) -> None:
    dist.init_process_group("gloo")
    for criterion in criteria:
        check(criterion, os.path.join(out, criterion))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    end_process_group()
