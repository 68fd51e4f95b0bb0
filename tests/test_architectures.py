"""The architecture matrix of docs/compatibility.md: one row per architecture, each a tiny seeded model built from the
stock config class, trained with the callback under a real Trainer, then pruned one-shot (unstructured, 2:4,
structured), saved, reloaded by stock `AutoModelForCausalLM` (equal logits) and generated with, plus a gradual run."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, PruneSchedule, prune_, save_pruned
from hf_weightprune.moe import find_weights
from hf_weightprune.testing import tiny_moe
from tests.collect.test_moe_callback import _tracked_share, train

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# dense rows: stock config class and what makes the row exercise its architecture (sliding windows, head_dim)
DENSE = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 4}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "phi3": ("Phi3Config", {}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16}),
}
MOE = ["mixtral", "qwen3_moe", "olmoe"]


def build(arch):
    if arch in MOE:
        return tiny_moe(arch)
    config_cls, extra = DENSE[arch]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(getattr(T, config_cls)(**{**COMMON, **extra}))


def _nm_holds(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """At most `n` nonzeros in every group of `m` consecutive input weights of every row."""
    return bool(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n).all())


@pytest.mark.parametrize("arch", [*DENSE, *MOE])
def test_architecture_row(arch, tmp_path):
    model = build(arch)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    train(model, [cb], tmp_path / "run", max_steps=2)
    imp = cb.importance()
    assert _tracked_share(model, imp.names) >= 0.9
    if arch in MOE:
        assert any(".experts." in n for n in imp.names)
    x = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    # MoE rows: whole experts, and neurons inside every expert (1/3 of them: the kept width, 32 of 48 or 16 of 24,
    # stays a multiple of 8 as transformers' grouped_mm experts kernel needs); dense rows: MLP neurons
    structured = [("experts", 0.5), ("neurons", 1 / 3)] if arch in MOE else [("neurons", 0.5)]
    for structure, sparsity in (("unstructured", 0.5), ("2:4", None), *structured):
        pruned = copy.deepcopy(model).eval()
        before = sum(p.numel() for p in pruned.parameters())
        report = prune_(pruned, imp, PruneConfig(structure=structure, sparsity=sparsity), progress=False)
        if structure == "unstructured":
            assert report.global_sparsity == pytest.approx(0.5, abs=0.01)
        elif structure == "2:4":
            assert all(_nm_holds(w.weight()) for w in find_weights(pruned)), structure
        else:
            assert sum(p.numel() for p in pruned.parameters()) == report.structured["num_parameters"]["after"] < before
        if arch in MOE and structure == "neurons":  # every expert of every MoE layer is 1/3 narrower
            width = report.structured["units_per_layer"]
            assert width["after"] == width["before"] * 2 // 3 and width["after"] % 8 == 0
            assert {tuple(s.weight().shape) for s in find_weights(pruned) if s.name.endswith(".down_proj.weight")
                    and ".experts." in s.name} == {(32, width["after"])}
        out = tmp_path / structure.replace(":", "_")
        save_pruned(pruned, out, report=report)
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=x).logits, pruned(input_ids=x).logits, msg=structure)
        generated = reloaded.generate(x[:1], min_new_tokens=4, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert generated.shape == (1, 14)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2", "mixtral", "qwen3_moe"])
def test_architecture_row_gradual_schedule(arch, tmp_path):
    model = build(arch)
    # the last mask update at the last step: the moments it zeroes are the ones left at the end
    schedule = PruneSchedule(final_sparsity=0.5, start=1, end=3, every_n_steps=1)
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"), schedule=schedule)
    trainer = train(model, [cb], tmp_path, max_steps=3)
    report = cb.pruning_report(model)
    assert report.global_sparsity == pytest.approx(0.5, abs=0.01)
    if arch in MOE:  # the experts hold their masks through the optimizer steps, their Adam moments zeroed at the update
        slices = [w for w in find_weights(model) if ".experts." in w.name]
        assert len(slices) == 24
        for s in slices:
            pruned = s.weight() == 0
            assert float(pruned.float().mean()) == pytest.approx(0.5, abs=0.02), s.name
            moments = trainer.optimizer.state[s.param]
            assert not s.view(moments["exp_avg"])[pruned].any() and not s.view(moments["exp_avg_sq"])[pruned].any()
            assert s.view(moments["exp_avg"])[~pruned].any()  # the kept weights' moments are not touched


def test_architecture_row_gpt2_is_refused_by_name(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64))
    with pytest.raises(ValueError, match=r"^transformer\.h\.0\.attn\.c_attn is a transformers Conv1D"):
        train(copy.deepcopy(model), [ImportanceCallback(ImportanceConfig(criterion="wanda"))], tmp_path, max_steps=1)
