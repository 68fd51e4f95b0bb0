"""Multi-process importance: DDP through the Trainer equals one process; FSDP2 local shards reassemble exactly.

Real processes (`torchrun`, gloo on 127.0.0.1), real Trainer, real files. One launch per backend keeps the
cost down; the logic lives in importable scripts (`tests/dist_ddp.py`, `tests/dist_fsdp.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hf_weightprune import load_importance

from . import dist_ddp

pytestmark = pytest.mark.multiproc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDP_CRITERIA = ["temporal_magnitude", "taylor", "wanda", "sparsegpt"]
# Gradients are all-reduced (a sum of two rank means) instead of averaged over one batch of 4, so the float
# summation order differs; AdamW (lr 1e-2) turns those ~1e-7 differences into weight differences up to ~5e-6.
# Tolerance per tensor: |a - b| <= 1e-4 * max|b| + 1e-4 * |b| (measured worst: 4.6e-5 * max|b|).
RTOL, ATOL_OF_MAX = 1e-4, 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module: str, *argv: str, nproc: int = 2, timeout: int = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", module, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{module} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _copy_checkpoint(src_run: str, dst_run: str, step: int = 3) -> None:
    shutil.copytree(os.path.join(src_run, f"checkpoint-{step}"), os.path.join(dst_run, f"checkpoint-{step}"))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _assert_same_scores(a, b):
    assert a.names == b.names
    assert a.num_samples == b.num_samples
    assert a.meta.get("tokens", {}) == b.meta.get("tokens", {})
    for name in a.names:
        ref = b.scores[name]
        torch.testing.assert_close(a.scores[name], ref, rtol=RTOL, atol=ATOL_OF_MAX * ref.abs().max().item(), msg=name)


def test_ddp_trainer_equals_single_process(tmp_path):
    w1, w2 = str(tmp_path / "w1"), str(tmp_path / "w2")
    # 1 process, batch 4: uninterrupted runs (they also give the checkpoint-3 that 2 processes resume from).
    dist_ddp.main(w1, DDP_CRITERIA)
    for c in DDP_CRITERIA:
        _copy_checkpoint(os.path.join(w1, f"{c}-full"), os.path.join(w2, f"{c}-resume"))
    # 2 processes, batch 2 each: uninterrupted runs, and resumes of the 1-process checkpoints (1 -> 2).
    torchrun("tests.dist_ddp", w2, *DDP_CRITERIA)
    # 1 process resumes the 2-process checkpoints (2 -> 1).
    for c in DDP_CRITERIA:
        _copy_checkpoint(os.path.join(w2, f"{c}-full"), os.path.join(w1, f"{c}-resume"))
        dist_ddp.run(c, os.path.join(w1, f"{c}-resume"), resume=True)

    bytes1 = _read_json(os.path.join(w1, "state_bytes-rank0-of-1.json"))
    bytes2 = [_read_json(os.path.join(w2, f"state_bytes-rank{r}-of-2.json")) for r in (0, 1)]
    for c in DDP_CRITERIA:
        one = load_importance(os.path.join(w1, f"{c}-full"))
        model = dist_ddp.tiny_phi3(seed=1)
        one.bind(model)  # wanda scores multiply by |W|: compare the statistics on the same weights
        # the 2-process folder: one file per rank plus the HF index, read back in a single process
        d2 = os.path.join(w2, f"{c}-full", "importance")
        assert sorted(f for f in os.listdir(d2) if f.endswith(".json") or f.endswith(".safetensors")) == [
            "importance-00001-of-00002.safetensors", "importance-00002-of-00002.safetensors",
            "importance.safetensors.index.json", "importance_config.json"]
        two = load_importance(d2, model=model)
        assert two.meta["world_size"] == 2 and one.meta["world_size"] == 1
        _assert_same_scores(two, one)
        # the checkpoint in the middle too (what a resume reads)
        _assert_same_scores(load_importance(os.path.join(w2, f"{c}-full", "checkpoint-3"), model=model),
                            load_importance(os.path.join(w1, f"{c}-full", "checkpoint-3"), model=model))
        # resume across world sizes gives the uninterrupted result
        for resumed in (os.path.join(w1, f"{c}-resume"), os.path.join(w2, f"{c}-resume")):
            _assert_same_scores(load_importance(resumed, model=model), one)

        # per-rank state: weight/grad criteria own about half each; activation criteria (wanda's [in] sums,
        # sparsegpt's [in, in] Hessians) keep their own sums on every rank, added when read
        if c not in ("wanda", "sparsegpt"):
            for r in (0, 1):
                assert 0.4 <= bytes2[r][c] / bytes1[c] <= 0.6, (c, r, bytes2[r][c], bytes1[c])
            assert bytes2[0][c] + bytes2[1][c] == bytes1[c]
        else:
            assert bytes2[0][c] == bytes2[1][c] == bytes1[c]

        # identical masks on every rank and across world sizes
        ref = load_file(os.path.join(w1, f"{c}-masks-rank0.safetensors"))
        for r in (0, 1):
            got = load_file(os.path.join(w2, f"{c}-masks-rank{r}.safetensors"))
            assert got.keys() == ref.keys()
            for name in ref:
                assert torch.equal(got[name], ref[name]), f"{c}: rank {r} mask of {name} differs from 1 process"


FSDP_CRITERIA = ["temporal_magnitude", "taylor", "wanda", "magnitude", "sparsegpt"]


def test_fsdp2_local_shards_reassemble_exactly(tmp_path):
    # The checks run on every rank inside the script (sharded == unsharded reference, files, resume).
    torchrun("tests.dist_fsdp", str(tmp_path), *FSDP_CRITERIA)
    d = tmp_path / "taylor" / "importance"
    index = _read_json(str(d / "importance.safetensors.index.json"))
    assert index["row_shards"]["model.layers.0.self_attn.qkv_proj.weight"] == [
        ["importance-00001-of-00002.safetensors", 0], ["importance-00002-of-00002.safetensors", 48]]
    halves = [load_file(str(d / f"importance-0000{r}-of-00002.safetensors")) for r in (1, 2)]
    assert halves[0]["model.layers.0.self_attn.qkv_proj.weight"].shape == (48, 32)
    full = load_importance(str(d)).state("model.layers.0.self_attn.qkv_proj.weight")
    assert torch.equal(full, torch.cat([h["model.layers.0.self_attn.qkv_proj.weight"] for h in halves]))


def test_fsdp1_and_deepspeed_zero3_are_refused():
    from types import SimpleNamespace

    from torch.distributed.fsdp import FullyShardedDataParallel

    from hf_weightprune.distributed import check_supported
    from hf_weightprune.testing import tiny_llama

    # FSDP1 needs an accelerator to be built; an instance made without __init__ is enough for the detection.
    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(wrapper)
    wrapper._modules["_fsdp_wrapped_module"] = tiny_llama()  # add_module would recurse in FSDP.__getattr__
    with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
        check_supported(wrapper)
    zero = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3))
    with pytest.raises(ValueError, match="ZeRO-3"):
        check_supported(tiny_llama(), zero)
    zero2 = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2))
    check_supported(tiny_llama(), zero2)
    with pytest.raises(ValueError, match="'taylor' reads gradients.*DeepSpeed") as refused:
        check_supported(tiny_llama(), zero2, needs_grad=True, criterion="taylor")
    # the way out names every criterion that reads no gradient (each supported under ZeRO-1/2, docs/distributed.md)
    from hf_weightprune.scorers import SCORERS

    assert all(repr(name) in str(refused.value) for name, s in SCORERS.items() if not s.needs_grad)


DS_CRITERIA = ["temporal_magnitude", "magnitude", "wanda", "sparsegpt"]


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_1_2_trainer_equals_single_process(tmp_path, stage):
    """ZeRO-1/2 through the Trainer (2 processes, CPU): same importance and masks as one plain process.

    DeepSpeed is a dev dependency (not optional here: a missing install must fail, not skip). Its first use on a
    machine compiles a small C++ shared-memory op (about 30 s on 2 cores, cached under ~/.cache/torch_extensions).
    """
    import deepspeed  # noqa: F401

    w1, w2 = str(tmp_path / "w1"), str(tmp_path / "w2")
    dist_ddp.main(w1, DS_CRITERIA)
    # A gradient criterion is refused at on_train_begin, before any step: it goes last, its error is recorded.
    torchrun("tests.dist_ddp", w2, "--zero", str(stage), *DS_CRITERIA, "taylor", timeout=900)

    for r in (0, 1):
        with open(os.path.join(w2, f"taylor-error-rank{r}.txt")) as f:
            assert "'taylor' reads gradients" in f.read()
    assert not os.path.exists(os.path.join(w2, "taylor-full", "importance"))
    bytes1 = _read_json(os.path.join(w1, "state_bytes-rank0-of-1.json"))
    bytes2 = [_read_json(os.path.join(w2, f"state_bytes-rank{r}-of-2.json")) for r in (0, 1)]
    model = dist_ddp.tiny_phi3(seed=1)
    for c in DS_CRITERIA:
        one = load_importance(os.path.join(w1, f"{c}-full"), model=model)
        two = load_importance(os.path.join(w2, f"{c}-full"), model=model)
        assert two.meta["world_size"] == 2
        _assert_same_scores(two, one)
        _assert_same_scores(load_importance(os.path.join(w2, f"{c}-full", "checkpoint-3"), model=model),
                            load_importance(os.path.join(w1, f"{c}-full", "checkpoint-3"), model=model))
        # the DeepSpeed checkpoint-3 resumed under DeepSpeed gives the uninterrupted result
        _assert_same_scores(load_importance(os.path.join(w2, f"{c}-resume"), model=model), one)
        if c not in ("wanda", "sparsegpt"):  # the DDP partition plan applies: each rank owns about half
            assert bytes2[0][c] + bytes2[1][c] == bytes1[c]
            assert all(0.4 <= bytes2[r][c] / bytes1[c] <= 0.6 for r in (0, 1)), (c, bytes2, bytes1)
        ref = load_file(os.path.join(w1, f"{c}-masks-rank0.safetensors"))
        for r in (0, 1):
            got = load_file(os.path.join(w2, f"{c}-masks-rank{r}.safetensors"))
            assert all(torch.equal(got[n], ref[n]) for n in ref), f"ZeRO-{stage} {c}: rank {r} masks differ"


def test_torchrun_with_one_process_equals_plain_single_process(tmp_path):
    """`torchrun --nproc_per_node 1` starts a process group of one: checkpoints and the final importance are written
    (the cross-rank sums of activation criteria used to come back as slices of one flat buffer, which the
    single-process writer refused at the first checkpoint) and equal a run without torchrun, resume included."""
    plain, group = str(tmp_path / "plain"), str(tmp_path / "group")
    criteria = ["wanda", "sparsegpt"]
    dist_ddp.main(plain, criteria)
    for c in criteria:
        _copy_checkpoint(os.path.join(plain, f"{c}-full"), os.path.join(group, f"{c}-resume"))
    torchrun("tests.dist_ddp", group, *criteria, nproc=1)
    model = dist_ddp.tiny_phi3(seed=1)
    for c in criteria:
        ref = load_importance(os.path.join(plain, f"{c}-full"), model=model)
        for run in ("full", "full/checkpoint-3", "resume"):
            got = load_importance(os.path.join(group, f"{c}-{run}"), model=model)
            assert got.meta["world_size"] == 1 and got.step == (3 if "checkpoint" in run else ref.step)
            if "checkpoint" not in run:
                _assert_same_scores(got, ref)
