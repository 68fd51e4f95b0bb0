"""Heads and hidden sizes read together (issue 25): a config may tie `hidden_size` to `num_attention_heads`, so the
hidden sizes a combined prune may choose are those the *pruned* head count allows, not the dense one's. Which stock
layouts tie them is pinned against the stock config classes; a Llama budget reaches a hidden size the dense heads
forbid, and a longrope Phi-3 (whose heads and hidden size can only move together) prunes both; each result reloads in
stock transformers and generates the same tokens with and without the KV cache."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_weightprune import PruneConfig, prune_
from hf_weightprune.prune.budget import SizeRule, axis_sizes
from hf_weightprune.prune.surgery import _CONFIG_ERRORS

from .test_budget import _closest, _head_dim, _stock_count
from .test_depth_hidden import ARCHS, COMMON, make_model
from .test_structure_matrix import EPS, X, _dense, trained  # noqa: F401, F811 (a fixture)

TIED = {"llama", "llama_tied_bias", "gemma2", "gemma3"}  # validate hidden_size % num_attention_heads == 0
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
            "original_max_position_embeddings": 32}  # rotary dims 8 = hidden 32 // 4 heads: 4 factors


def _stock_accepts(arch: str, groups: int, hidden: int, **extra) -> bool:
    """The stock config class's own verdict on 2 query heads per KV group and this hidden size."""
    _, config_cls, base = ARCHS[arch]
    kwargs = {**COMMON, **base, **extra, "hidden_size": hidden, "num_attention_heads": 2 * groups,
              "num_key_value_heads": groups, "head_dim": _head_dim(arch)}
    try:
        config_cls(**kwargs).validate()
    except _CONFIG_ERRORS:
        return False
    return True


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_the_hidden_sizes_follow_the_pruned_head_count(arch):
    model = make_model(arch)
    rule = SizeRule(model, ("heads", "hidden"), axis_sizes(model, ("heads", "hidden")))
    for groups, hidden in itertools.product((1, 2), range(1, 33)):
        assert rule.accepts({"heads": groups, "hidden": hidden}) == _stock_accepts(arch, groups, hidden), (groups, hidden)
    dense, cut = rule.keeps("hidden"), rule.keeps("hidden", {"heads": 1})
    if arch in TIED:  # 4 heads: multiples of 4; after one of the 2 KV groups is cut, 2 heads: multiples of 2
        assert dense == list(range(32, 0, -4)) and cut == list(range(32, 0, -2))
        assert rule.ladder("hidden") == cut
    else:  # Mistral, Qwen2, Qwen3, Phi-3 (default rope): no tie, every size either way
        assert dense == cut == list(range(32, 0, -1))


def test_a_longrope_phi3_ties_both_ways():
    # hidden_size // num_attention_heads sizes the rope factors: with 4 heads only 32 passes (of 1..32), with 2 heads
    # only 16..19; the dense 32 is refused once the heads are cut (a checkpoint that would not load).
    model = make_model("phi3", rope_scaling=LONGROPE)
    rule = SizeRule(model, ("heads", "hidden"), axis_sizes(model, ("heads", "hidden")))
    assert rule.keeps("hidden") == [32] and rule.keeps("hidden", {"heads": 1}) == [19, 18, 17, 16]
    assert rule.keeps("heads") == [2] and rule.keeps("heads", {"hidden": 16}) == [1]
    assert not rule.accepts({"heads": 1, "hidden": 32})
    for groups, hidden in ((2, 32), (1, 16), (1, 19), (1, 32), (2, 16)):
        assert rule.accepts({"heads": groups, "hidden": hidden}) == _stock_accepts(
            "phi3", groups, hidden, rope_scaling=LONGROPE), (groups, hidden)


def _reloads_and_generates(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert {n: p.shape for n, p in stock.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=X, use_cache=False).logits,
                                   model(input_ids=X, use_cache=False).logits, rtol=1e-5, atol=1e-6)
    tokens = model.generate(X[:1], max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert tokens.shape[1] > X.shape[1]
    for m, use_cache in itertools.product((model, stock), (True, False)):
        assert torch.equal(m.generate(X[:1], max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0),
                           tokens), use_cache


def _joint_closest(arch: str, target: int) -> int:
    """The smallest |kept - target| over every (KV groups, hidden) pair the stock config class accepts together."""
    return min(abs(_stock_count(arch, 4, h, 48, g) - target) for g in (1, 2) for h in range(1, 33)
               if _stock_accepts(arch, g, h))


@pytest.mark.parametrize("arch, fraction", [("llama", 0.8), ("gemma2", 0.7), ("gemma3", 0.6)])
def test_a_heads_and_hidden_budget_reaches_a_size_the_dense_heads_forbid(trained, arch, fraction, tmp_path):  # noqa: F811
    model, imp = trained(arch)
    before = sum(p.numel() for p in model.parameters())
    target = round(fraction * before)
    config = PruneConfig(structure="heads,hidden", target_params=fraction)
    report = prune_(model, imp, config, progress=False).structured
    after, cfg = sum(p.numel() for p in model.parameters()), model.config
    assert report["num_parameters"]["after"] == after == _stock_count(arch, 4, cfg.hidden_size, 48,
                                                                       cfg.num_key_value_heads)
    # one KV group of two cut: two heads, so a hidden size that is not a multiple of the dense four
    assert (cfg.num_key_value_heads, cfg.num_attention_heads) == (1, 2) and cfg.hidden_size % 4 != 0
    assert abs(after - target) == _joint_closest(arch, target) < _closest(arch, target, ("heads", "hidden"), _dense(arch))
    assert abs(after - target) <= report["target_tolerance"]  # within one step of the coarsest axis
    _reloads_and_generates(model, tmp_path)


def test_a_longrope_phi3_cuts_heads_and_hidden_together(trained, tmp_path):  # noqa: F811
    dense, imp = trained("phi3")
    model = make_model("phi3", rope_scaling=LONGROPE, **EPS)
    model.load_state_dict(dense.state_dict())
    # heads alone: 32 // 2 heads sizes 8 rope factors, not 4
    with pytest.raises(ValueError, match=r"^structure 'heads': keeping 1 of 2 gives a config that Phi3Config "
                                         r"rejects; sizes it accepts: \[2\]$"):
        prune_(make_model("phi3", rope_scaling=LONGROPE), imp, PruneConfig(structure="heads", sparsity=0.5),
               progress=False)
    report = prune_(model, imp, PruneConfig(structure="heads,hidden", sparsity=0.5), progress=False).structured
    assert {a: v["after"] for a, v in report["axes"].items()} == {"heads": 1, "hidden": 16}
    assert (model.config.num_attention_heads, model.config.hidden_size, model.config.head_dim) == (2, 16, 8)
    _reloads_and_generates(model, tmp_path)
