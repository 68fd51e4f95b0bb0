"""Reliability faults of the importance files and the schedule (issue 14, items 6, 9, 10, 11).

- 6: a SIGKILL between the Trainer's checkpoint write and the move of the staged importance into it; the resume
  publishes the staged importance of the same step and is exact.
- 9: per-tensor CRC32s in `importance_config.json` (and for `masks.safetensors`): swapped tensor names fail.
- 10: several callbacks on one Trainer write `importance-<name>/` each; collisions are refused at train begin.
- 11: `PruneSchedule(mode="hold", masks_from=...)` on a checkpoint another tool pruned (no `sparsity.json`).

Real Trainer runs, real safetensors files, a real SIGKILLed subprocess (`tests/scripts/ckpt_train.py`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_weightprune import ImportanceCallback, ImportanceConfig, load_importance
from hf_weightprune.config import PruneConfig
from hf_weightprune.files import importance_files as F
from hf_weightprune.files import training_state as T
from hf_weightprune.files.pruned_files import load_masks
from hf_weightprune.files.safetensors_io import ImportanceFileError
from hf_weightprune.prune.pruner import prune_
from hf_weightprune.publish.export import save_pruned
from hf_weightprune.testing import TokenDataset, save_importance_dir, tiny_llama
from hf_weightprune.train.callback import STAGING_DIR
from hf_weightprune.train.holder import MaskHolder
from hf_weightprune.train.schedule import PruneSchedule

from .helpers import sigkill_at_hang
from .scripts.ckpt_train import MARKER, run

CONFIG = F.IMPORTANCE_CONFIG_NAME
Q, OPROJ = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"  # both 32 x 32


def assert_same_importance(a, b):
    assert (a.step, a.num_samples, a.names) == (b.step, b.num_samples, b.names)
    assert a.meta["weight_sum"] == b.meta["weight_sum"] and a.meta["tokens"] == b.meta["tokens"]
    for name in b.names:
        torch.testing.assert_close(a.state(name), b.state(name), rtol=1e-6, atol=0, msg=name)


def leftovers(folder) -> list[str]:
    return [str(p) for p in Path(folder).rglob("*") if p.name.startswith((".importance", STAGING_DIR))]


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(Path(folder).rglob("*"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted single-callback runs (saves at steps 3, 6, 8 of 8), one per criterion, made on first use."""
    root, done = tmp_path_factory.mktemp("reference"), {}

    def get(criterion: str) -> Path:
        if criterion not in done:
            run(root / criterion, criterion)
            done[criterion] = root / criterion
        return done[criterion]

    return get


# ------------------------------------------------------------------- 6: SIGKILL between checkpoint and publish


@pytest.fixture(scope="module")
def killed_before_publish(tmp_path_factory):
    """A wanda run SIGKILLed after the Trainer wrote checkpoint-6, before the staged importance was moved into it."""
    argv = ["--criterion", "wanda", "--hang-in", "publish", "--hang-call", "2"]  # 2nd publish: step 6
    out = sigkill_at_hang(tmp_path_factory.mktemp("killed"), {"run": argv}) / "run"
    (out / MARKER).unlink()
    return out


def test_sigkill_before_publish_resumes_from_the_staged_importance_exactly(killed_before_publish, reference,
                                                                           tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(killed_before_publish, out)
    ckpt, staged = out / "checkpoint-6", out / STAGING_DIR
    assert (ckpt / "trainer_state.json").is_file() and not (ckpt / F.IMPORTANCE_DIR).exists()
    assert json.loads((staged / CONFIG).read_text())["state"]["global_step"] == 6
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.train.callback"):
        run(out, "wanda", resume=True)
    assert "used the complete importance of step 6 staged in" in caplog.text
    ref = reference("wanda")
    # checkpoint-6 got the staged importance (moved, not rewritten), and the resumed run ends where the reference does
    assert_same_importance(load_importance(ckpt), load_importance(ref / "checkpoint-6"))
    assert_same_importance(load_importance(out), load_importance(ref))
    assert_same_importance(load_importance(out / "checkpoint-8"), load_importance(ref / "checkpoint-8"))
    assert not leftovers(out)


def test_staged_importance_of_another_step_is_not_used(killed_before_publish, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed_before_publish, out)
    config = out / STAGING_DIR / CONFIG
    meta = json.loads(config.read_text())
    meta["state"]["global_step"] = 5
    config.write_text(json.dumps(meta))
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"^Cannot resume importance: No importance in \S*checkpoint-6: ") as e:
        run(out, "wanda", resume=True)
    assert "\n" not in str(e.value)
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------- 9: checksums


def header(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])


def swap_header_entries(path: Path, a: str, b: str) -> None:
    """Rewrite a safetensors file so that tensors `a` and `b` (same shape and dtype) exchange names."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    assert header[a]["shape"] == header[b]["shape"] and header[a]["dtype"] == header[b]["dtype"]
    header[a], header[b] = header[b], header[a]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_swapped_tensor_names_fail_naming_the_tensor(reference, tmp_path):
    d = tmp_path / "importance"
    shutil.copytree(reference("temporal_magnitude") / "importance", d)
    meta = json.loads((d / CONFIG).read_text())
    assert meta["checksums"]["algorithm"] == "crc32"
    assert sorted(meta["checksums"]["tensors"]) == sorted(meta["tensors"])
    good = load_importance(d)
    expected = {Q: good.state(Q), OPROJ: good.state(OPROJ)}
    assert not torch.equal(expected[Q], expected[OPROJ])
    swap_header_entries(d / F.WEIGHTS_NAME, Q, OPROJ)

    imp = load_importance(d)  # headers and shapes still agree: the swap is found when the tensor is read
    with pytest.raises(ImportanceFileError, match=rf"tensor {Q} in importance\.safetensors does not match its crc32 "
                                                  r"in importance_config\.json .*names swapped") as e:
        imp.state(Q)
    assert "\n" not in str(e.value)
    torch.testing.assert_close(imp.state("model.layers.1.mlp.up_proj.weight"),
                               good.state("model.layers.1.mlp.up_proj.weight"), rtol=0, atol=0)

    # A folder written before checksums existed still loads (and cannot tell).
    del meta["checksums"]
    (d / CONFIG).write_text(json.dumps(meta))
    old = load_importance(d)
    assert torch.equal(old.state(Q), expected[OPROJ]) and torch.equal(old.state(OPROJ), expected[Q])


def test_checksums_cover_hf_shards_and_schedule_masks(tmp_path):
    cb = ImportanceCallback(ImportanceConfig(criterion="magnitude"),
                            schedule=PruneSchedule(final_sparsity=0.5, start=1, end=2, every_n_steps=1))
    run(tmp_path / "run", importance_callback=cb, max_steps=3, save_steps=3)
    d = tmp_path / "run" / "checkpoint-3" / F.IMPORTANCE_DIR
    sums = json.loads((d / CONFIG).read_text())["checksums"]
    assert sorted(sums["masks"]) == sorted(cb.mask_holder.masks)
    masks = T.load_schedule_masks(str(d), sums["masks"])
    assert all(torch.equal(masks[n], m) for n, m in cb.mask_holder.masks.items())
    assert not torch.equal(masks[Q], masks[OPROJ])
    swap_header_entries(d / T.MASKS_NAME, Q, OPROJ)
    with pytest.raises(ImportanceFileError, match=rf"masks\.safetensors: mask ({Q}|{OPROJ}) does not match its crc32"):
        T.load_schedule_masks(str(d), sums["masks"])

    # HF-sharded single-process layout: the checksum belongs to the tensor, whichever shard holds it.
    imp = load_importance(d)
    shard_dir = tmp_path / "sharded"
    save_importance_dir(str(shard_dir), imp.state_dict(), config=imp.config, shapes=imp.shapes,
                          meta={k: v for k, v in imp.meta.items() if k not in ("world_size", "state_dtype")},
                          max_shard_size=6000)
    shards = sorted(shard_dir.glob("importance-*.safetensors"))
    assert len(shards) > 2
    shard = shards[1]
    entries = {k: v for k, v in header(shard).items() if k != "__metadata__"}
    last = max(entries, key=lambda k: entries[k]["data_offsets"][1])
    assert torch.equal(load_importance(shard_dir).state(last), imp.state(last))
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte in the last tensor's data
    shard.write_bytes(bytes(raw))
    with pytest.raises(ImportanceFileError, match=rf"tensor {last} in {shard.name} does not match its crc32"):
        load_importance(shard_dir).state(last)


def test_load_masks_refuses_weights_with_fewer_zeros_than_recorded(tmp_path):
    imp = ImportanceCallback(ImportanceConfig(criterion="magnitude"))
    model = run(tmp_path / "train", importance_callback=imp, max_steps=1, save_steps=10).model
    report = prune_(model, imp.importance(), PruneConfig(sparsity=0.5, scope="layer", target_modules=["q_proj"]),
                    progress=False)
    save_pruned(model, tmp_path / "pruned", report=report, write_card=False)
    assert set(load_masks(tmp_path / "pruned")) == {Q, "model.layers.1.self_attn.q_proj.weight"}
    # q_proj (pruned, 50% zeros) and o_proj (dense) of layer 0 swap names in the checkpoint
    swap_header_entries(tmp_path / "pruned" / "model.safetensors", Q, OPROJ)
    with pytest.raises(ValueError, match=rf"weight {Q} has 0 zeros, sparsity\.json records 512 pruned"):
        load_masks(tmp_path / "pruned")


# ------------------------------------------------------------------------------ 10: two callbacks, one Trainer


def two_callbacks():
    return (ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", name="tm")),
            ImportanceCallback(ImportanceConfig(criterion="wanda", name="wanda")))


def test_two_named_callbacks_each_equal_a_separate_run_and_resume(reference, tmp_path):
    out = tmp_path / "both"
    tm, wanda = two_callbacks()
    run(out, importance_callback=tm, callbacks=[wanda])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6", "checkpoint-8",
                                                     "importance-tm", "importance-wanda"]
    assert sorted(p.name for p in (out / "checkpoint-6").iterdir() if p.name.startswith("importance")) == [
        "importance-tm", "importance-wanda"]
    for name, criterion in (("tm", "temporal_magnitude"), ("wanda", "wanda")):
        for sub in ("", "checkpoint-3", "checkpoint-8"):
            got = load_importance(out / sub if sub else out, name=name)
            assert got.config.name == name and got.criterion == criterion
            assert_same_importance(got, load_importance(reference(criterion) / sub if sub else reference(criterion)))
    assert load_importance(out / "importance-wanda", name="wanda").criterion == "wanda"  # the folder itself
    assert not leftovers(out)
    with pytest.raises(ImportanceFileError, match=r"No unnamed importance in \S+; it holds the named importances "
                                                  r"\['tm', 'wanda'\]: pass load_importance\(path, name=\.\.\.\) \(on the command "
                                                  r"line: prune/inspect/sweep --importance_name tm\), or the folder itself "
                                                  r"\(\S+importance-tm\)"):
        load_importance(out)
    with pytest.raises(ImportanceFileError, match=r"No importance named 'taylor' .*\['tm', 'wanda'\]"):
        load_importance(out / "checkpoint-3", name="taylor")

    # Resume from checkpoint-6: both callbacks restore their own importance.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-6", resumed / "checkpoint-6")
    tm2, wanda2 = two_callbacks()
    run(resumed, resume=True, importance_callback=tm2, callbacks=[wanda2])
    assert tm2.importance().num_samples == 8
    for name in ("tm", "wanda"):
        assert_same_importance(load_importance(resumed, name=name), load_importance(out, name=name))
    assert not leftovers(resumed)


@pytest.mark.parametrize("names", [(None, None), ("a", "a")])
def test_two_callbacks_writing_one_folder_are_refused_at_train_begin(names, tmp_path):
    first = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", name=names[0]))
    second = ImportanceCallback(ImportanceConfig(criterion="wanda", name=names[1]))
    folder = F.importance_dir_name(names[0])
    with pytest.raises(ValueError, match=rf"^Two ImportanceCallbacks on this Trainer write the same folder {folder}/ "
                                         r"\(criteria 'temporal_magnitude' and 'wanda'\): give each "
                                         r"ImportanceConfig\(name=\.\.\.\) a distinct name$"):
        run(tmp_path, importance_callback=first, callbacks=[second])
    assert not list(tmp_path.glob("checkpoint-*")) and second.accumulator.tracked == []  # refused before any work


@pytest.mark.parametrize("bad", ["", "a/b", "../x", ".hidden", "-x", 3])
def test_bad_importance_name_is_refused(bad):
    with pytest.raises(ValueError, match=r"^name must be None or letters, digits"):
        ImportanceConfig(name=bad)


# ------------------------------------------------------------------ 11: masks from another tool's checkpoint


def foreign_pruned_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """What another tool (llm-compressor) leaves: zeros in the Linear weights, no sparsity.json. Returns the masks."""
    model = tiny_llama(seed=5)
    masks = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                keep = torch.rand(module.weight.shape, generator=g) >= 0.6
                module.weight.mul_(keep)
                masks[f"{name}.weight"] = keep
    model.save_pretrained(path)
    assert not (path / "sparsity.json").exists()
    return masks


def test_hold_masks_from_a_checkpoint_without_sparsity_json(tmp_path, caplog):
    src = tmp_path / "foreign"
    masks = foreign_pruned_checkpoint(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    schedule = PruneSchedule(mode="hold", masks_from=str(src))
    cb = ImportanceCallback(schedule=schedule)
    assert not cb.tracks_importance
    args = TrainingArguments(str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=16, vocab_size=128), callbacks=[cb])
    cb.attach(trainer)
    with caplog.at_level(logging.INFO, logger="hf_weightprune.train.holder"):
        trainer.train()
    zeros = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert f"has no sparsity.json (pruned by another tool?): holding the zeros of {len(masks)} targeted weights, " \
           f"sparsity {zeros:.4f} over them" in caplog.text
    assert set(cb.mask_holder.masks) == set(masks) and "lm_head.weight" not in cb.mask_holder.masks
    after = dict(model.named_parameters())
    for n, m in masks.items():
        assert torch.equal(cb.mask_holder.masks[n], m), n
        assert torch.equal(after[n] != 0, m) and not torch.equal(before[n], after[n]), n  # held, and it trained
    # nothing tracked: no state, no hooks, no importance files
    assert cb.state_bytes() == 0 and cb.accumulator.states == {} and cb.accumulator.tracked == [] and cb.accumulator.collector is None
    assert cb.accumulator.meta["num_samples"] == 0
    logged = [e["pruning/sparsity"] for e in trainer.state.log_history if "pruning/sparsity" in e]
    assert len(logged) == 4 and logged[-1] == pytest.approx(zeros)  # the held sparsity still reaches the loggers
    assert not list((tmp_path / "out").rglob(CONFIG))
    with pytest.raises(RuntimeError, match="tracks no importance"):
        cb.importance()

    # the schedule's target_modules / exclude_modules choose the weights
    sub = PruneSchedule(mode="hold", masks_from=str(src), exclude_modules=["mlp.down_proj"])
    assert set(MaskHolder(sub)._held_masks(model)) == {n for n in masks if "down_proj" not in n}


def test_masks_from_is_checked_at_train_begin_before_any_step(tmp_path):
    missing = PruneSchedule(mode="hold", masks_from=str(tmp_path / "missing"))  # a config does no I/O when built
    with pytest.raises(ValueError, match=r"^masks_from='\S*missing' is not a folder"):
        missing.check_masks_from()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"^masks_from='\S*empty' holds no model\.safetensors"):
        PruneSchedule(mode="hold", masks_from=str(tmp_path / "empty")).check_masks_from()
    args = TrainingArguments(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(n=8, vocab_size=128),
                      callbacks=[ImportanceCallback(schedule=missing)])
    with pytest.raises(ValueError, match=r"^masks_from='\S*missing' is not a folder"):
        trainer.train()
    assert trainer.state.global_step == 0  # refused in on_train_begin, before the first step


# ------------------------------------------------------------------- 9: multi-rank writers' checksums reach rank 0

ROWS = torch.arange(24, dtype=torch.float32).reshape(12, 2) / 7  # "c": row-sharded (FSDP2-like), 6 rows per rank
WHOLE = {"a": torch.linspace(-1, 1, 12).reshape(4, 3), "b": torch.linspace(2, 3, 12).reshape(4, 3)}


def _write_from_two_ranks(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from hf_weightprune import distributed as D

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        owners = {"a": 0, "b": 1, "c": D.ALL_RANKS}
        plan = D.OwnershipPlan(rank, world, True, owners, dict(owners), {"c": (6 * rank, 6)})
        mine = {"c": ROWS[6 * rank : 6 * rank + 6], **({"a": WHOLE["a"]} if rank == 0 else {"b": WHOLE["b"]})}
        error = F.write_importance(out, mine, plan, config=ImportanceConfig(criterion="magnitude"),
                                   meta={"global_step": 1, "num_samples": 1}, shapes={"a": [4, 3], "b": [4, 3],
                                                                                     "c": [12, 2]})
        assert error is None, error
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_every_writers_checksums_reach_rank_0(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "importance"
    mp.spawn(_write_from_two_ranks, args=(2, port, str(out)), nprocs=2, join=True)
    sums = json.loads((out / CONFIG).read_text())["checksums"]["tensors"]
    assert sums == {"a": F.tensor_checksum(WHOLE["a"]), "b": F.tensor_checksum(WHOLE["b"]),
                    "c": {F.shard_name(r, 2): F.tensor_checksum(ROWS[6 * r : 6 * r + 6]) for r in (0, 1)}}
    imp = load_importance(out)
    assert torch.equal(imp.state("c"), ROWS) and torch.equal(imp.state("b"), WHOLE["b"])
    shard = out / F.shard_name(1, 2)
    entries = {k: v for k, v in header(shard).items() if k != "__metadata__"}
    raw = bytearray(shard.read_bytes())
    raw[8 + struct.unpack("<Q", raw[:8])[0] + entries["c"]["data_offsets"][0]] ^= 0x01  # rank 1's rows of "c"
    shard.write_bytes(bytes(raw))
    with pytest.raises(ImportanceFileError, match=r"tensor c in importance-00002-of-00002\.safetensors does not match"):
        load_importance(out).state("c")


def test_a_stale_layout_beside_the_new_one_is_not_read(reference, tmp_path):
    # A Hub repo only gains files from uploads (the Trainer's push adds, never deletes): a sharded importance/
    # pushed first and a single-file one pushed later leave both layouts; importance_config.json, written by the
    # later push, says which one to read.
    good = load_importance(reference("temporal_magnitude") / "importance")
    meta = {k: v for k, v in good.meta.items() if k not in ("world_size", "state_dtype")}
    other = {n: t * 2 + 1 for n, t in good.state_dict().items()}
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    save_importance_dir(str(sharded), other, config=good.config, shapes=good.shapes, meta=meta, max_shard_size=6000)
    save_importance_dir(str(single), good.state_dict(), config=good.config, shapes=good.shapes, meta=meta)
    assert json.loads((sharded / CONFIG).read_text())["index"] == F.INDEX_NAME
    assert json.loads((single / CONFIG).read_text())["index"] is None

    for newer, older, expected in ((single, sharded, good.state_dict()), (sharded, single, other)):
        repo = tmp_path / f"repo-{newer.name}"
        shutil.copytree(older, repo)
        shutil.copytree(newer, repo, dirs_exist_ok=True)  # the later upload: its files over the earlier ones
        assert (repo / F.INDEX_NAME).is_file() and (repo / F.WEIGHTS_NAME).is_file()
        imp = load_importance(repo)
        for name, tensor in expected.items():
            assert torch.equal(imp.state(name), tensor), name
    # The recorded layout missing: refused, not the other (stale) one read instead
    (tmp_path / f"repo-{single.name}" / F.WEIGHTS_NAME).unlink()
    with pytest.raises(ImportanceFileError, match=r"importance\.safetensors, which importance_config\.json says this "
                                                  r"write used, is missing"):
        load_importance(tmp_path / f"repo-{single.name}")
