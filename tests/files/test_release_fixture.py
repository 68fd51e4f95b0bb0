"""Folders written by the release code (0.1.0, commit e8849d2) still load: tests/fixtures/release-0.1/ (see its
README.md for how they were made)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_weightprune import load_importance, load_sparsity
from hf_weightprune.files import training_state as T
from hf_weightprune.files.pruned_files import load_masks
from hf_weightprune.train.holder import MaskHolder
from hf_weightprune.train.schedule import PruneSchedule

RELEASE = Path(__file__).resolve().parents[1] / "fixtures" / "release-0.1"


def test_release_checkpoint_importance_masks_and_teacher_load(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RELEASE / "run", run)  # read-only use, but a copy keeps the fixture clean of any stray write
    imp = load_importance(run / "checkpoint-2")
    assert imp.criterion == "wanda" and imp.step == 2 and imp.num_samples == 2
    stored = load_file(run / "checkpoint-2" / "importance" / "importance.safetensors")
    assert set(imp.names) == set(stored) and len(stored) == 7  # one layer's 7 projections
    for name in imp.names:  # each read is checked against the CRC32 the release recorded
        assert torch.equal(imp.state(name), stored[name]), name
    # The schedule's state and masks: the sections parsed once by the reader, the masks checked against their CRCs.
    schedule_state = imp.sections["schedule"]
    assert schedule_state["has_masks"] and schedule_state["num_updates"] == 2
    masks = T.load_schedule_masks(imp.path, imp.sections["checksums"]["masks"])
    assert set(masks) == set(imp.names) and all(m.dtype == torch.bool for m in masks.values())
    holder = MaskHolder(PruneSchedule(final_sparsity=0.5, start=1, end=2, every_n_steps=1))
    holder.load_state_dict(schedule_state, masks)  # the release's schedule config matches today's fields
    assert holder.num_updates == 2 and holder.last_update_step == 2
    teacher, meta = T.load_teacher_state(str(run / "_distill-teacher"))
    assert meta["format_version"] == T.TEACHER_FORMAT_VERSION and "model.embed_tokens.weight" in teacher


def test_release_pruned_folder_loads(tmp_path):
    pruned = RELEASE / "pruned"
    info = load_sparsity(pruned)
    assert info["format_version"] == 1 and info["structure"] == "unstructured" and info["target_sparsity"] == 0.5
    assert info["schedule"]["final_sparsity"] == 0.5
    masks = load_masks(pruned)  # checked: each weight has at least the zeros sparsity.json records
    assert set(masks) == set(info["tensors"])
    model = AutoModelForCausalLM.from_pretrained(pruned)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(params[name] != 0, mask), name
    zeros = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs(zeros - info["global_sparsity"]) < 1e-6
    assert json.loads((pruned / "config.json").read_text())["num_hidden_layers"] == 1
