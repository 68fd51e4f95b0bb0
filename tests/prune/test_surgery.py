import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_weightprune.layouts import check_structured_supported
from hf_weightprune.prune.surgery import prune_structured_, shrink_attention_, shrink_mlp_
from hf_weightprune.prune.unit_scores import head_group_scores, neuron_scores

COMMON = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# name -> (model class, config class, extra config kwargs)
ARCHS = {
    "llama_mha": (LlamaForCausalLM, LlamaConfig, {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "llama_gqa_bias": (
        LlamaForCausalLM,
        LlamaConfig,
        {"num_attention_heads": 8, "num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True},
    ),
    "qwen2_gqa": (Qwen2ForCausalLM, Qwen2Config, {"num_attention_heads": 8, "num_key_value_heads": 4}),
    "phi3_gqa": (Phi3ForCausalLM, Phi3Config, {"num_attention_heads": 8, "num_key_value_heads": 4}),
}


def make_model(arch, seed=0, dtype=torch.float32):
    model_cls, config_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra)).to(dtype).eval()
    # HF initialises biases and norms to constants; randomise them so wrong slicing cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def random_scores(model, seed=1, names=None):
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if names is not None and not any(n in name for n in names):
            continue
        # Different scales per tensor (and some negative scores) exercise the per-tensor normalisation.
        scores[name] = torch.randn(p.shape, generator=gen) * (1 + 10 * (i % 3)) + 0.1
    return scores


def input_ids(seed=0):
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def layout(model):
    attn = model.model.layers[0].self_attn
    return "fused" if hasattr(attn, "qkv_proj") else "split"


def zero_neurons_(model, removed):
    """Reference: silence neurons in the unpruned model by zeroing their rows/columns."""
    size = model.config.intermediate_size
    with torch.no_grad():
        for i, idx in removed.items():
            mlp = model.model.layers[i].mlp
            for j in idx:
                if layout(model) == "fused":
                    mlp.gate_up_proj.weight[j] = 0
                    mlp.gate_up_proj.weight[size + j] = 0
                else:
                    for lin in (mlp.gate_proj, mlp.up_proj):
                        lin.weight[j] = 0
                        if lin.bias is not None:
                            lin.bias[j] = 0
                mlp.down_proj.weight[:, j] = 0


def zero_groups_(model, removed):
    """Reference: silence KV groups (KV head + its query heads) by zeroing their rows/columns."""
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d, group = cfg.hidden_size // n_heads, n_heads // n_kv
    with torch.no_grad():
        for i, idx in removed.items():
            attn = model.model.layers[i].self_attn
            for g in idx:
                for h in range(g * group, (g + 1) * group):
                    q = slice(h * d, (h + 1) * d)
                    attn.o_proj.weight[:, q] = 0
                    if layout(model) == "fused":
                        attn.qkv_proj.weight[q] = 0
                    else:
                        attn.q_proj.weight[q] = 0
                kv = slice(g * d, (g + 1) * d)
                if layout(model) == "fused":
                    for off in (n_heads * d, n_heads * d + n_kv * d):
                        attn.qkv_proj.weight[off + kv.start : off + kv.stop] = 0
                else:
                    for lin in (attn.k_proj, attn.v_proj):
                        lin.weight[kv] = 0


# ----------------------------------------------------------------------------------------------------------------------
# Functional equivalence: physically shrunk model == original with the pruned units zeroed
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_shrink_mlp_matches_zeroed_reference(arch):
    model = make_model(arch)
    ids = input_ids()
    # Different, non-contiguous, unsorted neurons per layer.
    keep = {
        0: torch.randperm(128, generator=torch.Generator().manual_seed(3))[:80],
        1: torch.cat([torch.arange(127, 40, -2), torch.arange(0, 72, 2)]),
    }
    removed = {i: sorted(set(range(128)) - set(k.tolist())) for i, k in keep.items()}
    reference = copy.deepcopy(model)
    zero_neurons_(reference, removed)

    shrink_mlp_(model, keep)

    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)
    assert model.config.intermediate_size == 80
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 80)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_shrink_attention_matches_zeroed_reference(arch):
    model = make_model(arch)
    ids = input_ids()
    n_kv, n_heads = model.config.num_key_value_heads, model.config.num_attention_heads
    keep = {0: torch.tensor([3, 1]), 1: torch.tensor([0, 2])} if n_kv == 4 else {0: [1, 3], 1: [2, 0]}
    removed = {i: sorted(set(range(n_kv)) - set(torch.as_tensor(k).tolist())) for i, k in keep.items()}
    reference = copy.deepcopy(model)
    zero_groups_(reference, removed)
    head_dim = model.config.hidden_size // n_heads

    shrink_attention_(model, keep)

    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)
    assert model.config.num_key_value_heads == 2
    assert model.config.num_attention_heads == n_heads // 2
    assert model.config.head_dim == head_dim
    attn = model.model.layers[0].self_attn
    assert attn.o_proj.in_features == n_heads // 2 * head_dim
    assert attn.num_key_value_groups == n_heads // n_kv


def test_removed_units_matter():
    """Sanity check of the reference: removing units changes the logits, so equivalence is not vacuous."""
    model = make_model("phi3_gqa")
    ids = input_ids()
    before = logits(model, ids)
    shrink_attention_(model, {0: [0, 1], 1: [2, 3]})
    shrink_mlp_(model, {0: torch.arange(64), 1: torch.arange(64, 128)})
    assert (logits(model, ids) - before).abs().max() > 1e-3


def test_shrink_keeps_dtype_and_trains():
    model = make_model("llama_gqa_bias", dtype=torch.bfloat16).train()
    shrink_mlp_(model, {0: torch.arange(0, 128, 2), 1: torch.arange(1, 128, 2)})
    shrink_attention_(model, {0: [0, 3], 1: [1, 2]})
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and p.requires_grad
    assert model.model.layers[0].self_attn.q_proj.bias.shape == (32,)
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].mlp.gate_proj.weight.grad is not None


# ----------------------------------------------------------------------------------------------------------------------
# save_pretrained -> stock from_pretrained
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama_mha", "llama_gqa_bias", "phi3_gqa"])
def test_save_and_reload_with_stock_auto_class(arch, tmp_path):
    model = make_model(arch)
    scores = random_scores(model)
    prune_structured_(model, scores, structure="heads", sparsity=0.5)
    prune_structured_(model, random_scores(model, seed=2), structure="neurons", sparsity=0.25)
    model.save_pretrained(tmp_path)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()

    assert type(reloaded) is type(model)
    cfg = reloaded.config
    n_heads = ARCHS[arch][2]["num_attention_heads"]
    assert cfg.intermediate_size == 96
    assert cfg.num_attention_heads == n_heads // 2
    assert cfg.num_key_value_heads == ARCHS[arch][2]["num_key_value_heads"] // 2
    assert cfg.head_dim == 64 // n_heads
    ids = input_ids(seed=5)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=1e-6, rtol=0)
    gen_kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    out = reloaded.generate(ids[:1], **gen_kwargs)
    assert out.shape == (1, ids.shape[1] + 5)
    torch.testing.assert_close(out, model.generate(ids[:1], **gen_kwargs))


# ----------------------------------------------------------------------------------------------------------------------
# Score aggregation vs brute-force loops
# ----------------------------------------------------------------------------------------------------------------------


def ref_neuron_scores(model, scores, layer):
    size = model.config.intermediate_size
    out = [0.0] * size
    prefix = f"model.layers.{layer}.mlp."
    for name, s in scores.items():
        if not name.startswith(prefix):
            continue
        s = s.double() / s.double().abs().mean()
        part = name[len(prefix) :]
        if part in ("gate_proj.weight", "up_proj.weight", "gate_up_proj.weight"):
            for r in range(s.shape[0]):
                out[r % size] += s[r].sum().item()
        elif part in ("gate_proj.bias", "up_proj.bias"):
            for r in range(s.shape[0]):
                out[r] += s[r].item()
        elif part == "down_proj.weight":
            for c in range(s.shape[1]):
                out[c] += s[:, c].sum().item()
    return torch.tensor(out, dtype=torch.float64)


def ref_group_scores(model, scores, layer):
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d, group = cfg.hidden_size // n_heads, n_heads // n_kv
    out = [0.0] * n_kv
    prefix = f"model.layers.{layer}.self_attn."
    for name, s in scores.items():
        if not name.startswith(prefix):
            continue
        s = s.double() / s.double().abs().mean()
        part = name[len(prefix) :]
        module, kind = part.split(".")
        if module == "o_proj":
            if kind == "weight":
                for c in range(s.shape[1]):
                    out[(c // d) // group] += s[:, c].sum().item()
            continue
        for r in range(s.shape[0]):
            value = s[r].sum().item()
            if module == "q_proj":
                g = (r // d) // group
            elif module in ("k_proj", "v_proj"):
                g = r // d
            elif r < n_heads * d:  # qkv_proj: q block
                g = (r // d) // group
            else:  # qkv_proj: k then v block
                g = ((r - n_heads * d) % (n_kv * d)) // d
            out[g] += value
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("arch", ["llama_mha", "llama_gqa_bias", "phi3_gqa"])
@pytest.mark.parametrize("subset", [None, ("down_proj", "o_proj"), ("gate", "k_proj", "qkv_proj.weight")])
def test_unit_scores_match_brute_force(arch, subset):
    model = make_model(arch)
    scores = random_scores(model, names=subset)
    for layer in range(2):
        expected = ref_neuron_scores(model, scores, layer)
        torch.testing.assert_close(neuron_scores(model, scores, layer).double(), expected, atol=1e-3, rtol=1e-5)
        expected = ref_group_scores(model, scores, layer)
        torch.testing.assert_close(head_group_scores(model, scores, layer).double(), expected, atol=1e-3, rtol=1e-5)


def test_scores_are_scale_invariant_per_tensor():
    model = make_model("llama_gqa_bias")
    scores = random_scores(model)
    rescaled = {k: v * (1000.0 if "up_proj" in k or "v_proj" in k else 1.0) for k, v in scores.items()}
    torch.testing.assert_close(neuron_scores(model, rescaled, 0), neuron_scores(model, scores, 0))
    torch.testing.assert_close(head_group_scores(model, rescaled, 1), head_group_scores(model, scores, 1))


# ----------------------------------------------------------------------------------------------------------------------
# prune_structured_
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,structure", [("llama_gqa_bias", "neurons"), ("phi3_gqa", "heads"), ("qwen2_gqa", "heads")]
)
def test_prune_structured_removes_lowest_units(arch, structure):
    model = make_model(arch)
    scores = random_scores(model)
    fn = neuron_scores if structure == "neurons" else head_group_scores
    unit_scores = [fn(model, scores, i) for i in range(2)]
    units = unit_scores[0].numel()
    n_remove = round(0.3 * units)
    expected_removed = {i: sorted(s.argsort()[:n_remove].tolist()) for i, s in enumerate(unit_scores)}
    reference = copy.deepcopy(model)
    (zero_neurons_ if structure == "neurons" else zero_groups_)(reference, expected_removed)
    n_params = sum(p.numel() for p in model.parameters())

    report = prune_structured_(model, scores, structure=structure, sparsity=0.3)

    assert report["removed"] == expected_removed
    for i in range(2):
        assert report["kept"][i] == sorted(set(range(units)) - set(expected_removed[i]))
        # Every kept unit scores at least as high as every removed one.
        assert unit_scores[i][report["kept"][i]].min() >= unit_scores[i][report["removed"][i]].max()
    assert report["units_per_layer"] == {"before": units, "after": units - n_remove}
    assert report["num_parameters"] == {"before": n_params, "after": sum(p.numel() for p in model.parameters())}
    assert report["num_parameters"]["after"] < n_params
    key = "intermediate_size" if structure == "neurons" else "num_key_value_heads"
    assert report["config"]["before"][key] == units
    assert report["config"]["after"][key] == getattr(model.config, key) == units - n_remove
    ids = input_ids()
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)


def test_prune_structured_ties_remove_lower_index_first():
    model = make_model("llama_mha")
    scores = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    report = prune_structured_(model, scores, structure="heads", sparsity=0.5)
    assert report["removed"] == {0: [0, 1], 1: [0, 1]}
    model = make_model("phi3_gqa")
    scores = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    report = prune_structured_(model, scores, structure="neurons", sparsity=0.25)
    assert report["removed"][1] == list(range(32))


def test_prune_structured_zero_sparsity_is_noop():
    model = make_model("llama_gqa_bias")
    gate = model.model.layers[0].mlp.gate_proj
    report = prune_structured_(model, random_scores(model), structure="neurons", sparsity=0.0)
    assert model.model.layers[0].mlp.gate_proj is gate
    assert report["kept"][0] == list(range(128))
    assert report["num_parameters"]["before"] == report["num_parameters"]["after"]


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------


def test_unsupported_architecture():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
    with pytest.raises(ValueError, match="Supported: Llama-style"):
        check_structured_supported(gpt2, "neurons")
    with pytest.raises(ValueError, match="Supported: Llama-style"):
        prune_structured_(gpt2, {}, structure="heads", sparsity=0.5)


def test_unknown_structure_and_nothing_to_prune():
    with pytest.raises(ValueError, match="Unknown structure 'channels'"):
        check_structured_supported(make_model("llama_mha"), "channels")
    with pytest.raises(ValueError, match=r"'hidden' is checked by prune/hidden\.py"):
        check_structured_supported(make_model("llama_mha"), "hidden")
    torch.manual_seed(0)
    mqa = LlamaForCausalLM(LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1))
    check_structured_supported(mqa, "neurons")
    with pytest.raises(ValueError, match="single KV group"):
        check_structured_supported(mqa, "heads")


@pytest.mark.parametrize("sparsity,match", [(1.0, r"in \[0, 1\)"), (0.9, "at least one must remain"), (-0.1, "in")])
def test_sparsity_removing_everything(sparsity, match):
    model = make_model("phi3_gqa")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        prune_structured_(model, random_scores(model), structure="heads", sparsity=sparsity)
    # Nothing was modified.
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_bad_keep_dicts():
    model = make_model("llama_gqa_bias")
    with pytest.raises(ValueError, match="Non-uniform keep"):
        shrink_mlp_(model, {0: torch.arange(64), 1: torch.arange(32)})
    with pytest.raises(ValueError, match="Non-uniform keep"):
        shrink_attention_(model, {0: [0, 1], 1: [0, 1, 2]})
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        shrink_mlp_(model, {0: torch.arange(64)})
    with pytest.raises(ValueError, match="unique indices"):
        shrink_attention_(model, {0: [0, 0], 1: [0, 1]})
    with pytest.raises(ValueError, match="unique indices"):
        shrink_mlp_(model, {0: torch.arange(64), 1: torch.arange(100, 164)})
    # Failed calls leave the model untouched.
    assert model.config.intermediate_size == 128 and model.config.num_key_value_heads == 4
    assert model.model.layers[0].mlp.gate_proj.out_features == 128


def test_missing_scores_name_the_module():
    model = make_model("llama_gqa_bias")
    scores = {k: v for k, v in random_scores(model).items() if "layers.1.mlp" not in k}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp \(layer 1\)"):
        neuron_scores(model, scores, 1)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp"):
        prune_structured_(model, scores, structure="neurons", sparsity=0.5)
    assert model.config.intermediate_size == 128
    head_group_scores(model, scores, 1)  # attention scores are present
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn"):
        head_group_scores(model, {}, 0)
    bad = {"model.layers.0.mlp.down_proj.weight": torch.ones(3, 3)}
    with pytest.raises(ValueError, match="shape"):
        neuron_scores(model, bad, 0)


def test_peft_wrapped_linears_are_refused():
    peft = pytest.importorskip("peft")
    model = make_model("llama_mha")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["gate_proj", "q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        check_structured_supported(lora.base_model.model, "neurons")


def test_head_dim_survives_reload_when_heads_do_not_divide_hidden(tmp_path):
    # 6 heads of 8 dims in a 64-wide model: the default hidden_size // num_heads would give 10.
    model = make_model("qwen2_gqa")
    shrink_attention_(model, {0: [0, 1, 3], 1: [1, 2, 3]})
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (reloaded.config.num_attention_heads, reloaded.config.head_dim) == (6, 8)
    ids = input_ids()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=1e-6, rtol=0)


def test_head_counts_the_config_rejects_are_refused():
    # LlamaConfig validates hidden_size % num_attention_heads == 0 on save; 3 groups * 2 heads = 6 does not divide 64.
    model = make_model("llama_gqa_bias")
    with pytest.raises(ValueError, match=r"LlamaConfig rejects.*accepts: \[1, 2, 4\]"):
        shrink_attention_(model, {0: [0, 1, 3], 1: [1, 2, 3]})
    assert model.config.num_attention_heads == 8
    assert model.model.layers[0].self_attn.q_proj.out_features == 64


def test_phi3_longrope_head_pruning_is_refused():
    # Phi3Config checks longrope factors against hidden_size // num_attention_heads, ignoring head_dim.
    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    config = Phi3Config(
        **(COMMON | {"max_position_embeddings": 256}),
        original_max_position_embeddings=64,
        num_attention_heads=8,
        num_key_value_heads=4,
        rope_parameters=rope,
    )
    model = Phi3ForCausalLM(config)
    with pytest.raises(ValueError, match="Phi3Config rejects.*short_factor"):
        shrink_attention_(model, {0: [0, 1], 1: [2, 3]})
    shrink_mlp_(model, {0: torch.arange(64), 1: torch.arange(64)})  # neurons are fine
    assert model.config.intermediate_size == 64


def test_config_validator_bugs_are_not_swallowed():
    # Only the validator's rejections (ValueError, TypeError, huggingface_hub's strict-dataclass errors) mean "this
    # size is refused"; any other exception is a bug and must surface instead of being reported as a rejection.
    from hf_weightprune.prune.surgery import config_error

    model = make_model("llama_gqa_bias")
    assert "not a multiple of the number of attention heads" in config_error(model.config, {"num_attention_heads": 6})

    def broken_validate():
        raise RuntimeError("bug in a validator")

    model.config.validate = broken_validate
    with pytest.raises(RuntimeError, match="bug in a validator"):
        shrink_mlp_(model, {0: torch.arange(64), 1: torch.arange(64)})
    assert model.config.intermediate_size == 128 and model.model.layers[0].mlp.up_proj.out_features == 128


def test_decoder_layers_are_found_through_get_decoder():
    # `get_decoder()` finds the layers of a CausalLM (`model.model`), of a bare base model (itself), and of a wrapper
    # that keeps its decoder under another name (as multimodal models keep `language_model`).
    class Wrapper(torch.nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.backbone, self.config = decoder, decoder.config

        def get_decoder(self):
            return self.backbone

    model = make_model("llama_gqa_bias")
    scores = {k: v for k, v in random_scores(model).items() if k.startswith("model.")}
    expected = prune_structured_(copy.deepcopy(model), scores, structure="neurons", sparsity=0.25)
    base = copy.deepcopy(model.model)
    base_scores = {k[len("model."):]: v for k, v in scores.items()}
    assert prune_structured_(base, base_scores, structure="neurons", sparsity=0.25)["kept"] == expected["kept"]
    wrapped = Wrapper(model.model)
    wrapped_scores = {f"backbone.{k}": v for k, v in base_scores.items()}
    report = prune_structured_(wrapped, wrapped_scores, structure="neurons", sparsity=0.25)
    assert report["kept"] == expected["kept"] and model.config.intermediate_size == 96
    assert model.model.layers[1].mlp.down_proj.in_features == 96
