"""Empty safetensors files (a rank that owns no tensor, a cross term restarted just before a save) read back on every
supported safetensors version: 0.4 cannot read an empty file that carries metadata (the floor suite runs it)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from hf_weightprune.files import importance_files as F
from hf_weightprune.files.cross_files import load_cross_state, save_cross_state
from hf_weightprune.files.safetensors_io import write_safetensors
from hf_weightprune.files.training_state import load_schedule_masks, save_schedule_masks
from hf_weightprune.files.unit_files import load_unit_state, save_unit_state


def test_empty_files_of_every_writer_read_back(tmp_path):
    assert save_cross_state(str(tmp_path), {}) == {}
    assert load_cross_state(str(tmp_path)) == {}
    assert save_unit_state(str(tmp_path), {}) == {}
    assert load_unit_state(str(tmp_path)) == {}
    _, crcs = save_schedule_masks(str(tmp_path), {})
    assert crcs == {} and load_schedule_masks(str(tmp_path)) == {}
    shard = F.write_shard(str(tmp_path / "shards"), {}, rank=1, world_size=2)
    assert load_file(shard) == {}


def test_non_empty_files_keep_their_metadata(tmp_path):
    from safetensors import safe_open

    write_safetensors({"a": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("a"), torch.ones(2))
