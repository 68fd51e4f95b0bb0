"""Mixture-of-experts building blocks: discovery and expert slices (`moe.py`), router statistics
(`collect/router.py`), whole-expert removal (`prune/experts.py`), and per-tensor masks on expert slices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

from hf_weightprune.collect.router import RouterCollector
from hf_weightprune.matching import find_tracked_weights
from hf_weightprune.moe import find_expert_slices, find_moe_blocks
from hf_weightprune.prune.experts import choose_experts, remove_experts_
from hf_weightprune.prune.masks import apply_mask_, check_nm_shapes, nm_mask, row_mask, unstructured_mask
from hf_weightprune.scorers import get_scorer
from hf_weightprune.scorers.sparsegpt import hessian_sum

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "mixtral": lambda **kw: T.MixtralConfig(**{**SMALL, "intermediate_size": 48, "num_local_experts": 4,
                                               "num_experts_per_tok": 2, **kw}),
    "qwen3_moe": lambda **kw: T.Qwen3MoeConfig(**{**SMALL, "intermediate_size": 48, "moe_intermediate_size": 24,
                                                  "num_experts": 4, "num_experts_per_tok": 2, **kw}),
    "olmoe": lambda **kw: T.OlmoeConfig(**{**SMALL, "intermediate_size": 48, "num_experts": 4,
                                           "num_experts_per_tok": 2, **kw}),
    # shared expert beside the routed ones
    "qwen2_moe": lambda **kw: T.Qwen2MoeConfig(**{**SMALL, "intermediate_size": 48, "moe_intermediate_size": 24,
                                                  "shared_expert_intermediate_size": 32, "num_experts": 4,
                                                  "num_experts_per_tok": 2, **kw}),
    # transposed, interleaved gate/up, expert and router biases, its own gate function
    "gpt_oss": lambda **kw: T.GptOssConfig(**{**SMALL, "intermediate_size": 24, "num_local_experts": 4,
                                              "num_experts_per_tok": 2, "head_dim": 8, **kw}),
}
# Removal only: a dense first layer, `n_routed_experts`, and a per-expert router buffer (`e_score_correction_bias`)
REMOVAL = {**CONFIGS, "deepseek_v3": lambda **kw: T.DeepseekV3Config(**{
    **SMALL, "num_key_value_heads": 4, "intermediate_size": 48, "moe_intermediate_size": 24, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 16,
    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, **kw})}


def tiny(arch: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(REMOVAL[arch](**overrides))
    with torch.no_grad():  # biases initialise to zero: make them count in the checks
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("_bias", "router.bias")):
                p.normal_(0, 0.1)
    return model


def _batch(seed: int, batch: int = 3, seq: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, -3:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------
# Discovery, naming, views
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_blocks_found_with_their_router_and_top_k(arch):
    model = tiny(arch)
    blocks = find_moe_blocks(model)
    assert [b.name for b in blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    router = "router" if arch == "gpt_oss" else "gate"
    assert [b.router_name for b in blocks] == [f"model.layers.{i}.mlp.{router}" for i in range(2)]
    assert all(b.num_experts == 4 and b.top_k == 2 for b in blocks)
    names = [s.name for s in blocks[0].slices()]
    assert names[:3] == [f"model.layers.0.mlp.experts.0.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    assert len(names) == 12 and len(set(names)) == 12
    assert find_moe_blocks(T.LlamaForCausalLM(T.LlamaConfig(**{**SMALL, "intermediate_size": 48}))) == []


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_slices_compute_each_expert_like_its_module(arch):
    """An expert run through its three slices as Linears (gate/up halves, `[out, in]`) gives what the fused experts
    module computes for tokens routed to it alone, with weight 1: the names and layouts are right."""
    model = tiny(arch)
    block = find_moe_blocks(model)[0]
    experts = block.experts
    x = torch.randn(5, 32)
    for e in range(block.num_experts):
        s = {sl.proj: sl for sl in block.slices() if sl.expert == e}
        ref = experts(x, torch.full((5, 2), e), torch.tensor([[1.0, 0.0]]).expand(5, 2))
        gate, up, down = (s[p].weight() for p in ("gate_proj", "up_proj", "down_proj"))
        if arch == "gpt_oss":  # interleaved gate/up with biases and a clamped SwiGLU
            b = experts.gate_up_proj_bias[e]
            h = experts._apply_gate(torch.stack([F.linear(x, gate, b[::2]), F.linear(x, up, b[1::2])], -1).flatten(1))
            out = F.linear(h, down, experts.down_proj_bias[e])
        else:
            out = F.linear(experts.act_fn(F.linear(x, gate)) * F.linear(x, up), down)
        torch.testing.assert_close(out, ref)


def test_slice_views_share_storage_with_the_parameter_and_its_gradient():
    model = tiny("mixtral")
    s = {sl.name: sl for sl in find_expert_slices(model)}
    up = s["model.layers.1.mlp.experts.2.up_proj.weight"]
    w = up.weight()
    assert w.shape == (48, 32) and w.untyped_storage().data_ptr() == up.param.untyped_storage().data_ptr()
    with torch.no_grad():
        w.fill_(7.0)
    assert bool((model.model.layers[1].mlp.experts.gate_up_proj[2, 48:] == 7).all())
    assert not bool((model.model.layers[1].mlp.experts.gate_up_proj[2, :48] == 7).any())
    assert up.grad() is None
    ids, mask = _batch(0)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    torch.testing.assert_close(up.grad(), model.model.layers[1].mlp.experts.gate_up_proj.grad[2, 48:], rtol=0, atol=0)
    assert up.grad().untyped_storage().data_ptr() == up.param.grad.untyped_storage().data_ptr()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_attention_and_expert_slices_cover_nine_tenths_of_the_non_embedding_weights(arch):
    model = tiny(arch)
    tracked = sum(t.param.numel() for t in find_tracked_weights(model)) + sum(
        s.weight().numel() for s in find_expert_slices(model))
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    total = sum(p.numel() for p in model.parameters() if id(p) not in embeddings and p.dim() > 1)
    assert tracked / total >= 0.9, tracked / total


def test_peft_rules_name_expert_slices():
    model = tiny("mixtral")
    assert len(find_expert_slices(model)) == 2 * 4 * 3
    downs = find_expert_slices(model, ["down_proj"])
    assert len(downs) == 8 and all(s.proj == "down_proj" for s in downs)
    one = find_expert_slices(model, ["layers.1.mlp.experts.3.gate_proj"])
    assert [s.name for s in one] == ["model.layers.1.mlp.experts.3.gate_proj.weight"]
    regex = find_expert_slices(model, r".*\.experts\.0\.(gate|up)_proj")
    assert len(regex) == 4 and {s.expert for s in regex} == {0}
    assert find_expert_slices(model, exclude_modules=["experts"]) == []
    assert len(find_expert_slices(model, ["experts"], exclude_modules=["up_proj"])) == 16


def test_fused_experts_without_a_router_are_refused_by_name():
    model = tiny("mixtral")
    del model.model.layers[0].mlp.gate
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.experts: fused expert weights without a router"):
        find_moe_blocks(model)


# ----------------------------------------------------------------------------------------------------------------
# Router statistics and per-expert inputs
# ----------------------------------------------------------------------------------------------------------------


def _record_routing(model):
    """Hooks recording every router call's input and outputs: the tokens as actually routed."""
    calls, hooks = [], []
    for b in find_moe_blocks(model):
        def hook(module, args, output, b=b):
            calls.append((b, args[0].detach().reshape(-1, 32).clone(), output[0].detach().clone(),
                          output[1].detach().clone(), output[2].clone()))
        hooks.append(b.router.register_forward_hook(hook))
    return calls, hooks


def _brute_force(calls, masks):
    """Per-token loops over the recorded routing of the real tokens: the statistics the collector must match."""
    stats, inputs = {}, {}
    masks = iter([m for m in masks for _ in range(2)])  # two layers per forward
    for b, x, logits, weights, index in calls:
        real = next(masks).reshape(-1)
        st = stats.setdefault(b.name, {"tokens": torch.zeros(4, dtype=torch.int64),
                                       "gate_mass": torch.zeros(4, dtype=torch.float64),
                                       "prob_mass": torch.zeros(4, dtype=torch.float64), "seen": 0})
        experts = b.experts
        inter = experts.gate_up_proj.shape[1] // 2
        for t in range(x.shape[0]):
            if not real[t]:
                continue
            st["seen"] += 1
            st["prob_mass"] += torch.softmax(logits[t].double(), -1)
            for j in range(index.shape[1]):
                e = int(index[t, j])
                st["tokens"][e] += 1
                st["gate_mass"][e] += float(weights[t, j])
                w = experts.gate_up_proj[e].detach()
                mid = experts.act_fn(w[:inter] @ x[t]) * (w[inter:] @ x[t])
                for proj, v in (("gate_proj", x[t]), ("up_proj", x[t]), ("down_proj", mid)):
                    key = f"{b.experts_name}.{e}.{proj}.weight"
                    acc = inputs.setdefault(key, [torch.zeros(v.numel(), v.numel(), dtype=torch.float64), 0])
                    acc[0] += torch.outer(v.double(), v.double())
                    acc[1] += 1
    return stats, inputs


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe"])
def test_router_and_expert_input_statistics_equal_a_brute_force_over_the_routed_real_tokens(arch):
    """Two forwards summed (gradient accumulation), top-2 routing, left and right padding excluded."""
    model = tiny(arch).train()
    slices = find_expert_slices(model)
    hess = RouterCollector(model, slices=slices, statistic=hessian_sum, soft_probs=True)
    wanda = RouterCollector(model, slices=slices, statistic=get_scorer("wanda").statistic)
    for c in (hess, wanda):
        c.register()
        c.active = True
    calls, hooks = _record_routing(model)
    masks = []
    for seed in (1, 2):
        ids, mask = _batch(seed)
        masks.append(mask)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    stats, inputs = _brute_force(calls, masks)
    sums, tokens = hess.pop()
    wsums, wtokens = wanda.pop()
    assert set(sums) == set(inputs) == set(wsums)
    for block, ref in stats.items():
        got = hess.stats(block)
        assert int(got["seen"]) == ref["seen"] == 2 * (21 - 5)
        assert torch.equal(got["tokens"], ref["tokens"]) and int(got["tokens"].sum()) == 2 * ref["seen"]
        torch.testing.assert_close(got["gate_mass"], ref["gate_mass"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["prob_mass"], ref["prob_mass"], rtol=1e-5, atol=1e-5)
        assert torch.equal(wanda.stats(block)["prob_mass"], torch.zeros(4, dtype=torch.float64))
    for name, (h, n) in inputs.items():
        assert tokens[name] == wtokens[name] == n
        torch.testing.assert_close(sums[name].double(), h, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(wsums[name].double(), h.diagonal(), rtol=1e-4, atol=1e-4)
    # inactive steps count routing, not inputs; eval forwards count nothing
    hess.active = False
    ids, mask = _batch(3)
    model(input_ids=ids, attention_mask=mask)
    assert hess.pop() == ({}, {}) and int(hess.stats("model.layers.0.mlp")["seen"]) == 3 * (21 - 5)
    model.eval()
    model(input_ids=ids, attention_mask=mask)
    assert int(hess.stats("model.layers.0.mlp")["seen"]) == 3 * (21 - 5)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing:FutureWarning")  # renamed activation_checkpointing in 5.x
@pytest.mark.parametrize("use_reentrant", [True, False])  # non-reentrant stops its recompute before the experts
def test_gradient_checkpoint_recompute_is_not_counted_again(use_reentrant):
    def run(checkpointing):
        model = tiny("mixtral").train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        c = RouterCollector(model, slices=find_expert_slices(model, ["down_proj"]), statistic=hessian_sum)
        c.register()
        c.active = True
        ids, mask = _batch(4)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return c.state_dict(), c.pop()

    (plain, (ps, pt)), (ckpt, (cs, ct)) = run(False), run(True)
    assert pt == ct and set(ps) == set(cs)
    for k in plain:
        torch.testing.assert_close(plain[k], ckpt[k])


def test_state_dict_resumes_exactly_and_refuses_another_model():
    model = tiny("mixtral").train()
    full = RouterCollector(model, soft_probs=True)
    full.register()
    for seed in (5, 6):
        ids, mask = _batch(seed)
        model(input_ids=ids, attention_mask=mask)
        if seed == 5:
            saved = full.state_dict()
    resumed = RouterCollector(model, soft_probs=True)
    resumed.load_state_dict(saved)
    full.remove()
    resumed.register()
    ids, mask = _batch(6)
    model(input_ids=ids, attention_mask=mask)
    assert full.state_dict().keys() == resumed.state_dict().keys()
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    other = RouterCollector(tiny("mixtral", num_local_experts=6))
    with pytest.raises(ValueError, match=r"^router statistics: model\.layers\.0\.mlp\.tokens is \(4,\), expected \(6,"):
        other.load_state_dict(saved)


# ----------------------------------------------------------------------------------------------------------------
# Whole-expert removal
# ----------------------------------------------------------------------------------------------------------------


def test_choose_experts_removes_the_lowest_ties_to_the_lower_index():
    scores = {"a": torch.tensor([5.0, 1.0, 1.0, 9.0]), "b": torch.tensor([0.0, 3.0, 2.0, 2.0])}
    assert choose_experts(scores, count=2) == {"a": [1, 2], "b": [0, 2]}
    assert choose_experts(scores, sparsity=0.25) == {"a": [1], "b": [0]}
    assert choose_experts(scores, sparsity=0.0) == {"a": [], "b": []}
    with pytest.raises(ValueError, match="exactly one"):
        choose_experts(scores)
    with pytest.raises(ValueError, match="different expert counts"):
        choose_experts({"a": torch.zeros(4), "b": torch.zeros(3)}, count=1)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3"])
def test_removed_experts_give_a_smaller_checkpoint_stock_transformers_reloads(arch, tmp_path):
    model = tiny(arch).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    # tokens routed from the model's own routing on some text: the least used go
    collector = RouterCollector(model, training_only=False)
    collector.register()
    ids, mask = _batch(7, batch=4, seq=12)
    model(input_ids=ids, attention_mask=mask)
    collector.remove()
    remove = choose_experts({b.name: collector.stats(b.name)["tokens"].double() for b in collector.blocks}, count=2)
    kept = remove_experts_(model, remove)
    for b in collector.blocks:
        tokens = collector.stats(b.name)["tokens"]
        assert min(tokens[kept[b.name]]) >= max(tokens[remove[b.name]])
    blocks = find_moe_blocks(model)
    assert all(b.num_experts == 2 for b in blocks)
    count_key = {"mixtral": "num_local_experts", "gpt_oss": "num_local_experts", "deepseek_v3": "n_routed_experts"}.get(
        arch, "num_experts")
    assert getattr(model.config, count_key) == 2
    for b in blocks:  # the kept experts and router rows are the original ones, in order
        keep = torch.tensor(kept[b.name])
        tensors = [(b.experts_name, a, p) for a, p in b.experts.named_parameters(recurse=False)] + [
            (b.router_name, a, p) for a, p in [*b.router.named_parameters(recurse=False), *b.router.named_buffers()]]
        assert len(tensors) >= 3
        for owner, attr, p in tensors:
            assert torch.equal(p, original[f"{owner}.{attr}"][keep]), (owner, attr)
    ids, mask = _batch(8)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(reloaded.config, count_key) == 2
    assert find_moe_blocks(reloaded)[0].experts.gate_up_proj.shape[0] == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, logits, rtol=0, atol=0)
    prompt = ids[:1, :5]
    ref = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    for cache in (True, False):
        out = reloaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=cache, pad_token_id=0)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("remove, message", [
    ({"model.layers.0.mlp": [0, 1, 2, 3], "model.layers.1.mlp": [0, 1, 2, 3]},
     r"^model\.layers\.0\.mlp\.gate: removing all 4 experts of the layer$"),
    ({"model.layers.0.mlp": [0, 1, 2], "model.layers.1.mlp": [0, 1, 2]},
     r"^model\.layers\.0\.mlp\.gate: 1 expert left, fewer than top-k num_experts_per_tok=2$"),
    ({"model.layers.0.mlp": [0], "model.layers.1.mlp": [0, 1]},
     r"^config\.num_local_experts: one expert count for every layer"),
    ({"model.layers.0.mlp": [4], "model.layers.1.mlp": [0]}, r"^model\.layers\.0\.mlp: expert indices must be"),
    ({"model.layers.9.mlp": [0]}, r"^model\.layers\.9\.mlp: not an MoE block"),
])
def test_bad_removal_is_one_line_naming_the_parameter_and_changes_nothing(remove, message):
    model = tiny("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as err:
        remove_experts_(model, remove)
    assert "\n" not in str(err.value)
    assert model.config.num_local_experts == 4
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------------------------
# Per-expert masks: the per-tensor builders on slice views, unchanged
# ----------------------------------------------------------------------------------------------------------------


def test_mask_builders_work_on_expert_slice_views():
    model = tiny("mixtral")
    slices = {s.name: s for s in find_expert_slices(model)}
    experts = model.model.layers[0].mlp.experts
    before = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    up = slices["model.layers.0.mlp.experts.1.up_proj.weight"]
    down = slices["model.layers.0.mlp.experts.2.down_proj.weight"]
    up_mask = nm_mask(up.weight().abs(), 2, 4)
    down_mask = row_mask(down.weight().abs(), 0.5)
    apply_mask_(up.weight(), up_mask)
    apply_mask_(down.weight(), down_mask)
    gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
    assert torch.equal(gu[1, 48:] != 0, up_mask) and torch.equal(dn[2] != 0, down_mask)
    # nothing else in the fused parameters changed
    changed = gu != before[0]
    changed[1, 48:] = False
    assert not changed.any()
    changed = dn != before[1]
    changed[2] = False
    assert not changed.any()
    gate = slices["model.layers.1.mlp.experts.3.gate_proj.weight"]
    keep = unstructured_mask(gate.weight().abs(), 0.5)
    apply_mask_(gate.weight(), keep)
    assert int((model.model.layers[1].mlp.experts.gate_up_proj[3, :48] == 0).sum()) == keep.numel() // 2


def test_nm_on_an_expert_whose_input_width_is_not_a_multiple_of_m_is_one_line_naming_it():
    model = tiny("mixtral", intermediate_size=30)  # down_proj's input width 30
    shapes = {s.name: tuple(s.shape) for s in find_expert_slices(model)}
    check_nm_shapes({k: v for k, v in shapes.items() if not k.endswith("down_proj.weight")}, 2, 4)
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.experts\.0\.down_proj\.weight: in_features 30 is "
                                         r"not a multiple of 4") as err:
        check_nm_shapes(shapes, 2, 4)
    assert "\n" not in str(err.value)
