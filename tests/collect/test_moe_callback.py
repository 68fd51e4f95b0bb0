"""Mixture-of-experts through the callback and `prune_`: every expert slice tracked for every criterion (against a
token-by-token brute force under a real Trainer: padding, gradient accumulation, top-2 routing), exact resume, and
per-slice masks."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, load_importance, prune_
from hf_weightprune.moe import find_expert_slices, find_moe_blocks
from hf_weightprune.testing import tiny_llama, tiny_moe, tiny_phi3
from tests.helpers import Recorder, reference, training_args

# float32 accumulation (bf16-free) against a float64 brute force over a few steps
RTOL, ATOL = 1e-4, 1e-6


class PaddedTokens(torch.utils.data.Dataset):
    """Random windows with left or right padding (`attention_mask` 0, labels -100) of varying length."""

    def __init__(self, n: int = 16, seq_len: int = 8, vocab_size: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab_size, (n, seq_len), generator=g)
        self.mask = torch.ones(n, seq_len, dtype=torch.long)
        pads = torch.randint(0, seq_len // 2, (n,), generator=g)
        for i, p in enumerate(pads.tolist()):
            if p:
                self.mask[i, :p] = 0 if i % 2 else 1
                self.mask[i, -p:] = 1 if i % 2 else 0
        self.ids[self.mask == 0] = 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def train(model, callbacks, out, *, max_steps=3, ga=2, save_steps=None, resume=None):
    args = training_args(out, max_steps=max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=ga,
                         learning_rate=1e-2, seed=0, save_strategy="steps" if save_steps else "no",
                         save_steps=save_steps or 500, logging_steps=100)
    trainer = Trainer(model=model, args=args, train_dataset=PaddedTokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _tracked_share(model, names) -> float:
    """Share of the parameters outside embeddings (and 1-D norms) that `names` cover."""
    slices = {s.name: s.weight().numel() for s in find_expert_slices(model)}
    params = dict(model.named_parameters())
    covered = sum(slices[n] if n in slices else params[n].numel() for n in names)
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    total = sum(p.numel() for p in model.parameters() if id(p) not in embeddings and p.dim() > 1)
    return covered / total


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("criterion", ["temporal_magnitude", "taylor", "fisher", "wanda", "sparsegpt"])
def test_expert_slices_match_a_token_by_token_brute_force(arch, criterion, tmp_path):
    model = tiny_moe(arch, seed=1)
    rec = Recorder(model, record_acts=criterion == "wanda", record_hessians=criterion == "sparsegpt")
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
    train(model, [rec, cb], tmp_path)
    ref = reference(criterion, rec)
    imp = cb.importance()
    assert imp.names == list(ref)
    experts = [n for n in ref if ".experts." in n]
    assert len(experts) == 2 * 4 * 3  # every slice of both layers
    assert _tracked_share(model, imp.names) >= 0.9
    for name, expected in ref.items():
        got = imp.state(name) if criterion == "sparsegpt" else imp.scores[name]
        torch.testing.assert_close(got.double(), expected, rtol=RTOL, atol=ATOL, msg=name)
    if criterion in ("wanda", "sparsegpt"):
        # each routed real token counted once per expert it went to; the dense layers see every real token
        routed = {n: sum(step[n] for step in rec.tokens if n in step) for n in experts}
        assert {n: imp.meta["tokens"].get(n, 0) for n in experts} == routed
        real = int(PaddedTokens().mask[:2 * 2 * 3].sum())
        assert imp.meta["tokens"]["model.layers.0.self_attn.q_proj.weight"] == real
        assert sum(routed[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] for e in range(4)) == 2 * real


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen2_moe"])
@pytest.mark.parametrize("criterion", ["temporal_magnitude", "taylor"])
def test_other_expert_layouts_match_the_brute_force(arch, criterion, tmp_path):
    """Transposed storage with interleaved gate/up rows (gpt-oss); a shared expert beside the routed ones (Qwen2-MoE)."""
    model = tiny_moe(arch, seed=1)
    rec = Recorder(model)
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
    train(model, [rec, cb], tmp_path, max_steps=2)
    ref, imp = reference(criterion, rec), cb.importance()
    assert imp.names == list(ref) and sum(".experts." in n for n in ref) == 24
    for name, expected in ref.items():
        torch.testing.assert_close(imp.scores[name].double(), expected, rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("criterion", ["taylor", "wanda"])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(criterion, tmp_path):
    full = tmp_path / "full"
    cfg = ImportanceConfig(criterion=criterion)
    train(tiny_moe("qwen3_moe", seed=2), [ImportanceCallback(cfg)], full, max_steps=4, save_steps=2)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    # transformers 5.25's Trainer resumes with `model.load_state_dict(file, strict=False)`, which skips the fused
    # experts saved under their per-expert names (a warning, not an error): the model comes from the checkpoint here
    model = AutoModelForCausalLM.from_pretrained(resumed / "checkpoint-2")
    cb = ImportanceCallback(cfg)
    train(model, [cb], resumed, max_steps=4, save_steps=2, resume=str(resumed / "checkpoint-2"))
    a, b = load_importance(resumed), load_importance(full)
    assert a.names == b.names and any(".experts.3.down_proj" in n for n in a.names)
    assert (a.step, a.num_samples, a.meta["tokens"]) == (b.step, b.num_samples, b.meta["tokens"])
    for name in b.names:
        torch.testing.assert_close(a.state(name), b.state(name), rtol=1e-6, atol=0, msg=name)
    # router statistics: written with every checkpoint, resumed from checkpoint-2, equal at the end
    assert a.sections["router"] == b.sections["router"] == cb.importance().sections["router"]
    early = load_importance(full / "checkpoint-2").sections["router"]["model.layers.1.mlp"]
    final = b.sections["router"]["model.layers.1.mlp"]
    assert 0 < early["seen"] < final["seen"] == int(PaddedTokens().mask[:2 * 2 * 4].sum())
    assert sum(final["tokens"]) == 2 * final["seen"]


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_prune_zeroes_half_of_every_expert_slice(arch, criterion, tmp_path):
    model = tiny_moe(arch, seed=3)
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
    train(model, [cb], tmp_path, max_steps=2)
    before = {s.name: s.weight().clone() for s in find_expert_slices(model)}
    zeros_before = sum(int((p == 0).sum()) for p in model.parameters())  # the padding token's embedding row
    report = prune_(model, cb.importance(), PruneConfig(sparsity=0.5), progress=False)
    for s in find_expert_slices(model):
        w = s.weight()
        assert float((w == 0).float().mean()) == 0.5, s.name
        if criterion != "sparsegpt":  # masks only: the kept weights are the trained ones (OBS updates them)
            kept = w != 0
            assert torch.equal(w[kept], before[s.name][kept]), s.name
    # the report's model sparsity counts the zeroed expert weights among all of the model's parameters
    zeros = sum(int((p == 0).sum()) for p in model.parameters()) - zeros_before
    assert report.model_sparsity == pytest.approx(zeros / sum(p.numel() for p in model.parameters()), abs=1e-4)
    assert report.model_sparsity > 0.4


def test_peft_rules_select_experts_alone_and_exclude_them(tmp_path):
    model = tiny_moe("mixtral", seed=4)
    only = ImportanceCallback(ImportanceConfig(criterion="magnitude", target_modules=["down_proj"]))
    train(model, [only], tmp_path / "a", max_steps=1, ga=1)
    assert only.tracked_names == [f"model.layers.{i}.mlp.experts.{e}.down_proj.weight" for i in range(2)
                                  for e in range(4)]
    dense = ImportanceCallback(ImportanceConfig(criterion="magnitude", exclude_modules=["experts"]))
    train(model, [dense], tmp_path / "b", max_steps=1, ga=1)
    assert len(dense.tracked_names) == 8 and not any("experts" in n for n in dense.tracked_names)
    assert _tracked_share(model, dense.tracked_names) < 0.2


def test_router_statistics_count_every_training_forward_for_any_criterion(tmp_path):
    model = tiny_moe("mixtral", seed=5)
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"))
    train(model, [cb], tmp_path, max_steps=3)
    router = cb.accumulator.router
    real = int(PaddedTokens().mask[:2 * 2 * 3].sum())
    for block in find_moe_blocks(model):
        stats = router.stats(block.name)
        assert int(stats["seen"]) == real and int(stats["tokens"].sum()) == 2 * real
        torch.testing.assert_close(float(stats["gate_mass"].sum()), float(real))  # top-k weights renormalised
    assert router._hooks == []  # removed at train end


# ----------------------------------------------------------------------------------------------------------------
# No silent skips
# ----------------------------------------------------------------------------------------------------------------


def _coverage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hf_weightprune.coverage"]


@pytest.mark.parametrize("arch", ["llama", "phi3", "mixtral", "qwen3_moe"])
def test_no_coverage_warning_on_models_whose_weights_are_tracked(arch, tmp_path, caplog):
    dense = {"llama": tiny_llama, "phi3": tiny_phi3}
    model = dense[arch](vocab_size=64) if arch in dense else tiny_moe(arch)
    cb = ImportanceCallback(ImportanceConfig(criterion="magnitude"))
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.coverage"):
        train(model, [cb], tmp_path, max_steps=1, ga=1)
        prune_(model, cb.importance(), PruneConfig(sparsity=0.5), progress=False)
    assert _coverage_warnings(caplog) == []


def test_experts_left_out_by_a_rule_are_named_with_the_fraction(tmp_path, caplog):
    model = tiny_moe("mixtral", seed=6)
    cb = ImportanceCallback(ImportanceConfig(criterion="magnitude", exclude_modules=["experts"]))
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.coverage"):
        train(model, [cb], tmp_path, max_steps=1, ga=1)
        report = prune_(model, cb.importance(), PruneConfig(sparsity=0.5), progress=False)
    begin, pruned = _coverage_warnings(caplog)
    share = _tracked_share(model, cb.tracked_names)
    for message, who in ((begin, "ImportanceCallback"), (pruned, "prune_")):
        assert message.startswith(f"{who}: the tracked weights cover {share:.1%} of the model's parameters outside "
                                  "embeddings and norms"), message
        assert ("model.layers.0.mlp.gate.weight (MoE router, removed with whole experts only); model.layers.0.mlp."
                "experts.gate_up_proj (expert slices not selected by target_modules / exclude_modules)") in message
    assert report.model_sparsity < 0.1  # and the report says how little of the model that was


def test_an_untracked_expert_like_parameter_is_named_at_train_begin(tmp_path, caplog):
    model = tiny_llama(vocab_size=64)
    # three experts stored [E, out, in] under names the MoE discovery does not know: nothing routes to them
    model.model.layers[0].mlp.w_experts = torch.nn.Parameter(torch.randn(16, 64, 64) * 0.02)
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.coverage"):
        train(model, [ImportanceCallback(ImportanceConfig(criterion="magnitude"))], tmp_path, max_steps=1, ga=1)
    (message,) = _coverage_warnings(caplog)
    assert "model.layers.0.mlp.w_experts (LlamaMLP.w_experts: not an nn.Linear or a fused expert weight)" in message


def test_gpt2_conv1d_is_refused_by_name_at_train_begin(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64))
    with pytest.raises(ValueError, match=r"^transformer\.h\.0\.attn\.c_attn is a transformers Conv1D \(GPT-2 style"):
        train(model, [ImportanceCallback(ImportanceConfig(criterion="magnitude"))], tmp_path, max_steps=1, ga=1)


def test_nm_on_an_expert_whose_input_width_is_not_a_multiple_of_m_is_refused_by_name(tmp_path):
    # down_proj input width 20: not a multiple of 8 (the fused kernels need widths of whole 16-byte strides)
    model = tiny_moe("qwen3_moe", seed=8, moe_intermediate_size=20)
    cb = ImportanceCallback(ImportanceConfig(criterion="magnitude"))
    train(model, [cb], tmp_path, max_steps=1, ga=1)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.0\.down_proj\.weight.*20"):
        prune_(model, cb.importance(), PruneConfig(structure="4:8"), progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
