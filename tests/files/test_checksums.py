"""Checksums of the importance files and the schedule masks (issue 14, item 9): per-tensor CRC32s in
`importance_config.json` (and for `masks.safetensors`) catch swapped tensor names, every rank's checksums reach rank 0,
and a stale layout beside the recorded one is never read. Real Trainer runs and real safetensors files."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from hf_weightprune import ImportanceCallback, ImportanceConfig, load_importance
from hf_weightprune.config import PruneConfig
from hf_weightprune.files import importance_files as F
from hf_weightprune.files import training_state as T
from hf_weightprune.files.pruned_files import load_masks
from hf_weightprune.files.safetensors_io import ImportanceFileError
from hf_weightprune.prune.pruner import prune_
from hf_weightprune.publish.export import save_pruned
from hf_weightprune.testing import save_importance_dir
from hf_weightprune.train.schedule import PruneSchedule
from tests.scripts.ckpt_train import run

CONFIG = F.IMPORTANCE_CONFIG_NAME
Q, OPROJ = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"  # both 32 x 32

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
