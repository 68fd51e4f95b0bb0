"""Depth pruning (prune/depth.py) and hidden-size pruning (prune/hidden.py) on every supported layout."""

import math
import types

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hf_weightprune.prune.depth import _config_updates, choose_layers, remove_layers_
from hf_weightprune.prune.hidden import shrink_hidden_

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SEQ = 12  # longer than every sliding window below, so a layer that slides when it should not changes the logits

# name -> (model class, config class, extra config kwargs)
ARCHS = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "llama_tied_bias": (LlamaForCausalLM, LlamaConfig,
                        {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "mistral": (MistralForCausalLM, MistralConfig, {"sliding_window": 4}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {"head_dim": 16, "use_sliding_window": True, "sliding_window": 4,
                                              "max_window_layers": 1}),
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16}),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, {"head_dim": 16, "sliding_window": 4, "sliding_window_pattern": 2,
                                                     "query_pre_attn_scalar": 16}),
    "phi3": (Phi3ForCausalLM, Phi3Config, {}),
}


def make_model(arch, seed=0, **overrides):
    model_cls, config_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **extra, **overrides})).eval()
    # HF initialises biases and norms to constants; randomise them so that a wrong slice cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ids(seed=0, batch=2):
    return torch.randint(3, 128, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x, use_cache=False).logits


@torch.no_grad()
def greedy(model, x, use_cache):
    return model.generate(x, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)


def layers_of(model):
    return model.model.layers


def skip_layers(model, drop):
    """Reference for depth pruning: the dense model with the dropped layers replaced by the identity."""
    def identity(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    return [layers_of(model)[i].register_forward_hook(identity, with_kwargs=True) for i in drop]


def reload(model, tmp_path):
    model.save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path).eval()


# ----------------------------------------------------------------------------------------------------------------------
# Depth
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_remove_layers_equals_dense_with_identity_layers(arch, tmp_path):
    model, drop = make_model(arch), [0, 2]
    x = ids()
    handles = skip_layers(model, drop)
    want, want_gen = logits(model, x), greedy(model, x[:1], use_cache=True)
    for h in handles:
        h.remove()
    assert not torch.allclose(logits(model, x), want, atol=1e-4)  # the dropped layers matter

    assert remove_layers_(model, drop) == [1, 3]
    assert len(layers_of(model)) == model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in layers_of(model)] == [0, 1]
    torch.testing.assert_close(logits(model, x), want, rtol=1e-5, atol=1e-5)
    for use_cache in (True, False):
        assert torch.equal(greedy(model, x[:1], use_cache), want_gen)

    stock = reload(model, tmp_path / "m")
    assert type(stock) is type(model)
    torch.testing.assert_close(logits(stock, x), want, rtol=1e-5, atol=1e-5)
    for use_cache in (True, False):
        assert torch.equal(greedy(stock, x[:1], use_cache), want_gen)


@pytest.mark.parametrize(
    ("arch", "drop", "expected"),
    [
        # Gemma 3 alternates sliding/full every 2 layers here: the kept layers keep their own kind.
        ("gemma3", [0], {"layer_types": ["full_attention", "sliding_attention", "full_attention"]}),
        ("gemma2", [1, 2], {"layer_types": ["sliding_attention", "full_attention"]}),
        # Qwen2: layers >= max_window_layers=2 slide; dropping layer 0 moves the first sliding layer to index 1.
        ("qwen2", [0], {"layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
                        "max_window_layers": 1}),
        ("qwen2", [3], {"layer_types": ["full_attention", "full_attention", "sliding_attention"],
                        "max_window_layers": 2}),
        ("qwen3", [2, 3], {"layer_types": ["full_attention", "sliding_attention"], "max_window_layers": 1}),
        ("mistral", [1], {"sliding_window": 4}),
    ],
)
def test_per_layer_config_entries_follow_the_kept_layers(arch, drop, expected, tmp_path):
    model = make_model(arch)
    remove_layers_(model, drop)
    for key, value in expected.items():
        assert getattr(model.config, key) == value
    stock = reload(model, tmp_path / "m")
    for key, value in expected.items():
        assert getattr(stock.config, key) == value
    torch.testing.assert_close(logits(stock, ids()), logits(model, ids()), rtol=0, atol=0)


def test_phi3_longrope_settings_survive_depth_pruning(tmp_path):
    half = 32 // 4 // 2  # rope factors are per rotary frequency (head_dim / 2), not per layer
    rope = {"rope_type": "longrope", "short_factor": [1.0] * half, "long_factor": [2.0] * half,
            "original_max_position_embeddings": 32}
    model = make_model("phi3", rope_scaling=rope)
    before = dict(model.config.rope_parameters)
    remove_layers_(model, [1])
    assert model.config.rope_parameters == before
    stock = reload(model, tmp_path / "m")
    assert stock.config.rope_parameters["short_factor"] == before["short_factor"]
    torch.testing.assert_close(logits(stock, ids()), logits(model, ids()), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("drop", "match"),
    [
        ([0, 1, 2, 3], "dropping all 4 decoder layers"),
        ([4], r"out of range \[0, 4\)"),
        ([-1], "out of range"),
        ([1, 1], "duplicate"),
        ([1.0], "must be ints"),
    ],
)
def test_bad_drop_is_refused_before_any_change(drop, match):
    model = make_model("gemma3")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as err:
        remove_layers_(model, drop)
    assert "\n" not in str(err.value)
    assert len(layers_of(model)) == model.config.num_hidden_layers == 4
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_config_that_would_rebuild_other_layers_is_refused():
    model = make_model("gemma3")
    # The config no longer describes the modules (layers 1 and 3 were built as full attention): a reload would build
    # another model, so the removal refuses instead of writing a checkpoint that silently changes.
    model.config.layer_types = ["sliding_attention"] * 4
    with pytest.raises(ValueError, match="layer 1 would reload as layer 0 with other attention kind") as err:
        remove_layers_(model, [0])
    assert "\n" not in str(err.value)
    assert len(layers_of(model)) == 4


def test_choose_layers_takes_the_lowest_scores_ties_to_lower_index():
    scores = torch.tensor([0.5, 0.1, 0.3, 0.1, 0.9])
    assert choose_layers(scores, 0) == []
    assert choose_layers(scores, 1) == [1]
    assert choose_layers(scores, 3) == [1, 2, 3]
    for bad, match in (((scores, 5), "one layer must remain"), ((scores, -1), r"in \[0, 5\)"),
                       ((torch.tensor([0.1, float("nan")]), 1), "NaN"), ((scores[None], 1), "1-D float")):
        with pytest.raises(ValueError, match=match):
            choose_layers(*bad)


# ----------------------------------------------------------------------------------------------------------------------
# Hidden size
# ----------------------------------------------------------------------------------------------------------------------

KEEP = torch.tensor([0, 1, 3, 4, 6, 9, 10, 11, 12, 15, 17, 20, 23, 26, 28, 31])  # 16 of 32, a multiple of 4 heads


def zero_channels_(model, removed):
    """Reference for hidden pruning: the dense model whose residual stream is zero on the removed channels."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, removed] = 0
        for layer in layers_of(model):
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight[removed] = 0
                if linear.bias is not None:
                    linear.bias[removed] = 0


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shrink_hidden_equals_dense_with_zero_residual_channels(arch):
    # A tiny eps: with norms rescaled by sqrt(D / D') the models differ only through rms_norm_eps (not rescaled).
    model = make_model(arch, rms_norm_eps=1e-12)
    removed = sorted(set(range(32)) - set(KEEP.tolist()))
    zero_channels_(model, removed)
    x = ids()
    want = logits(model, x)
    plain = make_model(arch, rms_norm_eps=1e-12)
    zero_channels_(plain, removed)

    report = shrink_hidden_(model, KEEP)
    assert report["removed"] == removed and report["norm_gain"] == pytest.approx(math.sqrt(2))
    torch.testing.assert_close(logits(model, x), want, rtol=1e-4, atol=1e-5)
    # Without the gain the mean over fewer channels changes every norm's output: NOT the zeroed dense model.
    shrink_hidden_(plain, KEEP, rescale_norms=False)
    assert not torch.allclose(logits(plain, x), want, atol=1e-3)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shrink_hidden_reloads_with_stock_transformers_and_generates(arch, tmp_path):
    model = make_model(arch)
    head_dim = model.model.layers[0].self_attn.head_dim
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    report = shrink_hidden_(model, KEEP)
    assert model.config.hidden_size == 16 and model.config.head_dim == head_dim == report["head_dim"]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert report["num_parameters"]["after"] < report["num_parameters"]["before"]
    assert model.model.embed_tokens.weight.shape == (128, 16) and model.lm_head.weight.shape == (128, 16)
    assert model.model.norm.weight.shape == (16,) and model.model.layers[1].input_layernorm.weight.shape == (16,)

    x = ids()
    stock = reload(model, tmp_path / "m")
    assert stock.model.layers[0].self_attn.head_dim == head_dim
    assert {n: p.shape for n, p in stock.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    assert (stock.lm_head.weight is stock.model.embed_tokens.weight) == tied
    torch.testing.assert_close(logits(stock, x), logits(model, x), rtol=0, atol=0)
    with_cache = greedy(stock, x[:1], use_cache=True)
    assert with_cache.shape[1] > SEQ
    assert torch.equal(greedy(stock, x[:1], use_cache=False), with_cache)
    assert torch.equal(greedy(model, x[:1], use_cache=True), with_cache)


def test_gemma_embedding_scale_is_folded_into_the_weights():
    model = make_model("gemma3")
    x = ids()
    with torch.no_grad():
        before = model.model.embed_tokens(x)[..., KEEP]
    report = shrink_hidden_(model, KEEP)
    assert report["embed_scale_ratio"] == pytest.approx(math.sqrt(2), rel=1e-6)
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(4.0)  # sqrt(16), what a reload computes
    with torch.no_grad():
        torch.testing.assert_close(model.model.embed_tokens(x), before)


def test_depth_then_hidden_compose(tmp_path):
    model = make_model("qwen3")
    remove_layers_(model, [1])
    shrink_hidden_(model, KEEP)
    stock = reload(model, tmp_path / "m")
    assert stock.config.num_hidden_layers == 3 and stock.config.hidden_size == 16
    torch.testing.assert_close(logits(stock, ids()), logits(model, ids()), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("keep", "match"),
    [
        (torch.tensor([], dtype=torch.long), "keep is empty"),
        (torch.tensor([3, 1, 2, 4]), "sorted and unique"),
        (torch.tensor([1, 1, 2, 4]), "sorted and unique"),
        (torch.tensor([0, 1, 2, 32]), r"outside \[0, 32\)"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), "1-D integer tensor"),
        (torch.tensor([0, 1, 2, 3, 4, 5]), "not a multiple of the number of attention heads"),
    ],
)
def test_bad_keep_is_refused_before_any_change(keep, match):
    model = make_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as err:
        shrink_hidden_(model, keep)
    assert "\n" not in str(err.value)
    assert model.config.hidden_size == 32
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_embeddings_shared_beyond_the_lm_head_tie_are_refused():
    model = make_model("llama_tied_bias")
    model.model.extra = nn.Linear(32, 128, bias=False)
    model.model.extra.weight = model.model.embed_tokens.weight  # e.g. a second head reading the same tensor
    with pytest.raises(ValueError, match="shared with model.extra.weight beyond the lm_head tie"):
        shrink_hidden_(model, KEEP)
    assert model.model.embed_tokens.weight.shape == (128, 32)


def test_unknown_hidden_sized_parameter_is_refused():
    model = make_model("llama")
    model.model.layers[0].scale = nn.Parameter(torch.ones(32))  # a per-channel parameter no rule covers
    with pytest.raises(ValueError, match=r"model.layers.0.scale \(32,\) has a hidden_size=32 dimension"):
        shrink_hidden_(model, KEEP)
    assert model.config.hidden_size == 32


def test_phi3_longrope_hidden_pruning_is_refused_in_one_line():
    # Phi3Config sizes its longrope factors by hidden_size // num_attention_heads, even with head_dim explicit.
    half = 32 // 4 // 2
    rope = {"rope_type": "longrope", "short_factor": [1.0] * half, "long_factor": [2.0] * half,
            "original_max_position_embeddings": 32}
    model = make_model("phi3", rope_scaling=rope)
    with pytest.raises(ValueError, match="Phi3Config rejects: `rope_parameters`'s short_factor") as err:
        shrink_hidden_(model, KEEP)
    assert "\n" not in str(err.value)
    assert model.config.hidden_size == 32 and model.model.embed_tokens.weight.shape == (128, 32)


def test_per_layer_config_list_of_another_length_is_refused_in_its_own_number():
    """A per-layer config list that does not have one entry per layer cannot be cut: one line, in the right number."""
    config = types.SimpleNamespace(layer_types=["full_attention"])
    with pytest.raises(ValueError, match=r"^config\.layer_types: 1 entry for 2 layers; cannot tell which to keep$"):
        _config_updates(config, [0], 2)
    config = types.SimpleNamespace(layer_types=["full_attention"] * 3)
    with pytest.raises(ValueError, match=r"^config\.layer_types: 3 entries for 1 layer; cannot tell"):
        _config_updates(config, [0], 1)
