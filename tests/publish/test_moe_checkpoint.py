"""`prune_checkpoint` (file to file) of an MoE model: expert slices stored as tensors of their own (Qwen3-MoE's
`mlp.experts.N.up_proj.weight`, Mixtral's original `block_sparse_moe.experts.N.w1.weight`) are each read once and
pruned as in memory; experts stored fused in the file (gpt-oss) are refused in one line before any work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, load_importance, prune_
from hf_weightprune.files import safetensors_io as sio
from hf_weightprune.moe import find_expert_slices
from hf_weightprune.publish.export import prune_checkpoint
from hf_weightprune.testing import tiny_moe
from tests.collect.test_moe_callback import train


def _run(root, arch, criterion):
    folder = root / f"{arch}-{criterion}"
    model = tiny_moe(arch, seed=12)
    train(model, [ImportanceCallback(ImportanceConfig(criterion=criterion))], folder, max_steps=2)
    model.save_pretrained(folder / "model")
    return folder


def _keys(folder):
    with safe_open(folder / sio.SAFETENSORS_NAME, framework="pt") as f:
        return sorted(f.keys())


@pytest.mark.parametrize("arch, criterion, structure", [
    ("mixtral", "wanda", "unstructured"),
    ("mixtral", "sparsegpt", "2:4"),  # OBS per expert slice, from each expert's own Hessian
    ("qwen3_moe", "wanda", "2:4"),
    ("qwen3_moe", "sparsegpt", "unstructured"),
])
def test_file_to_file_equals_prune_in_memory(arch, criterion, structure, tmp_path):
    run = _run(tmp_path, arch, criterion)
    config = PruneConfig(structure=structure, sparsity=0.5) if structure == "unstructured" else PruneConfig(
        structure=structure)
    report = prune_checkpoint(run / "model", load_importance(run), config, tmp_path / "out", progress=False)
    assert _keys(tmp_path / "out") == _keys(run / "model")  # the file's own names (Mixtral's w1/w2/w3 kept)
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    expected = prune_(model, load_importance(run), config, progress=False)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    a, b = got.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    for name in b:
        assert torch.equal(a[name], b[name]), name
    slices = find_expert_slices(got)
    assert len(slices) == 2 * 4 * 3 and all(float((s.weight() == 0).float().mean()) == 0.5 for s in slices)
    assert report.tensors == expected.tensors and report.model_sparsity == pytest.approx(expected.model_sparsity)
    saved = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert saved["tensors"] == json.loads(json.dumps(expected.tensors))


def test_experts_stored_fused_are_refused_in_one_line_before_any_work(tmp_path):
    run = _run(tmp_path, "gpt_oss", "magnitude")
    assert "model.layers.0.mlp.experts.gate_up_proj" in _keys(run / "model")  # fused in the file
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight is tracked by the "
                                         r"importance but not stored in .*: an expert's slice of a fused MoE "
                                         r"parameter; load the model, call prune_ and save_pruned$") as e:
        prune_checkpoint(run / "model", load_importance(run), PruneConfig(sparsity=0.5), tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
