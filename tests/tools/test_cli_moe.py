"""`hf-weightprune prune` on MoE checkpoints: files that store each expert's projections as tensors of their own
(Mixtral, Qwen3-MoE) are pruned file to file like a dense model's; experts stored fused in the file (gpt-oss) are
pruned in memory. The path taken shows in the output file: file to file copies the input's safetensors header (a
metadata marker written into the input survives), `save_pruned` writes a fresh one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, load_importance, prune_
from hf_weightprune.files import safetensors_io as sio
from hf_weightprune.moe import find_expert_slices
from hf_weightprune.testing import tiny_moe
from hf_weightprune.tools.cli import main
from tests.collect.test_moe_callback import train

MARKER = {"format": "pt", "written_by": "test_cli_moe"}


def _run_with_marker(root, arch, criterion):
    """A 2-step run whose saved model file carries MARKER in its safetensors metadata."""
    model = tiny_moe(arch, seed=12)
    train(model, [ImportanceCallback(ImportanceConfig(criterion=criterion))], root, max_steps=2)
    model.save_pretrained(root / "model")
    path = root / "model" / sio.SAFETENSORS_NAME
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in sorted(f.keys())}
    save_file(tensors, path, metadata=MARKER)
    return root


def _metadata(folder):
    with safe_open(folder / sio.SAFETENSORS_NAME, framework="pt") as f:
        return f.metadata()


# the tiny gpt-oss's layer-1 router never picks one expert (its bias): wanda would refuse it by name, so magnitude
@pytest.mark.parametrize("arch, criterion, file_to_file", [
    ("mixtral", "wanda", True), ("qwen3_moe", "wanda", True), ("gpt_oss", "magnitude", False)])
def test_cli_prunes_per_projection_moe_files_file_to_file_and_fused_ones_in_memory(arch, criterion, file_to_file,
                                                                                    tmp_path):
    run = _run_with_marker(tmp_path / "run", arch, criterion)
    out = tmp_path / "out"
    assert main(["prune", str(run / "model"), "--importance", str(run), "--sparsity", "0.5",
                 "--output_dir", str(out)]) == 0
    assert (_metadata(out) == MARKER) is file_to_file
    # either way: what prune_ gives in memory, every expert slice at 50%
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    expected = prune_(model, load_importance(run), PruneConfig(sparsity=0.5), progress=False)
    got = AutoModelForCausalLM.from_pretrained(out)
    a, b = got.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert all(float((s.weight() == 0).float().mean()) == 0.5 for s in find_expert_slices(got))
    saved = json.loads((out / "sparsity.json").read_text())
    assert saved["tensors"] == json.loads(json.dumps(expected.tensors))
