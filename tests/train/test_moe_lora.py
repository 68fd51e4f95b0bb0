"""LoRA on fused MoE expert parameters (peft's `LoraConfig(target_parameters=[...])`, real peft): the callback tracks
the experts under peft's wrappers, a schedule's masks hold on the base expert weights while training, and
`merge_and_unload_sparse` keeps every expert's zeros."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, PruneSchedule, prune_
from hf_weightprune.moe import find_expert_slices, find_moe_blocks
from hf_weightprune.prune.lora import merge_and_unload_sparse
from hf_weightprune.testing import tiny_moe
from tests.collect.test_moe_callback import train

peft = pytest.importorskip("peft")

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _lora(model, seed=0):
    # init_lora_weights=False: B is not zero, so a plain merge would fill every pruned weight back in
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_PARAMS,
                          init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


def _slice_weights(model):
    return {s.name: s.weight().clone() for s in find_expert_slices(model)}


def test_peft_targets_fused_expert_parameters_and_blocks_are_found_through_its_wrappers():
    model = _lora(tiny_moe("mixtral", seed=20))
    blocks = find_moe_blocks(model)
    assert [(b.name, b.router_name) for b in blocks] == [(f"model.layers.{i}.mlp", f"model.layers.{i}.mlp.gate")
                                                         for i in range(2)]
    assert all(type(b.experts).__name__ == "MixtralExperts" for b in blocks)  # the base module under the wrappers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".mlp.experts.lora_A." in n for n in trainable) and any(".experts.base_layer.lora_B." in n
                                                                      for n in trainable)


def test_merge_keeps_the_expert_zeros_of_a_pruned_model(tmp_path):
    model = tiny_moe("mixtral", seed=21)
    imp_cb = ImportanceCallback(ImportanceConfig(criterion="magnitude"))
    train(model, [imp_cb], tmp_path, max_steps=1, ga=1)
    prune_(model, imp_cb.importance(), PruneConfig(sparsity=0.5), progress=False)  # 50% of every expert slice
    pruned = _slice_weights(model)
    plain = copy.deepcopy(model)
    merged = merge_and_unload_sparse(_lora(model))
    dense = _lora(plain).merge_and_unload()  # the same LoRA (same seed state), merged densely
    got, filled = _slice_weights(merged), _slice_weights(dense)
    for name, w in pruned.items():
        keep = w != 0
        assert float((~keep).float().mean()) == 0.5, name
        assert not got[name][~keep].any(), name  # every expert's zeros kept
        assert bool(filled[name][~keep].ne(0).all()), name  # which a plain merge fills in
        torch.testing.assert_close(got[name][keep], filled[name][keep], rtol=0, atol=0)  # the kept ones are merged


def test_held_masks_on_expert_slices_under_lora_and_the_merge_keeps_them(tmp_path):
    """A gradual schedule on a LoRA model whose experts carry LoRA: the masks (by slice name) hold on the frozen base
    expert weights at every step, and the merge with those masks keeps them."""
    model = _lora(tiny_moe("mixtral", seed=22))
    schedule = PruneSchedule(final_sparsity=0.5, start=1, end=3, every_n_steps=1)
    cb = ImportanceCallback(ImportanceConfig(criterion="magnitude", target_modules=["gate_proj", "up_proj",
                                                                                   "down_proj"]),
                            schedule=schedule)
    train(model, [cb], tmp_path, max_steps=4, ga=1)
    masks = cb.mask_holder.masks
    assert sorted(masks) == sorted(s.name for s in find_expert_slices(model)) and len(masks) == 24
    for s in find_expert_slices(model):
        mask = masks[s.name]
        assert float((~mask).float().mean()) == 0.5, s.name
        assert not s.weight()[~mask].any(), s.name  # held on the base weight
    merged = merge_and_unload_sparse(model, masks=masks)
    for s in find_expert_slices(merged):
        w, mask = s.weight(), masks[s.name]
        assert not w[~mask].any() and bool(w[mask].ne(0).all()), s.name
