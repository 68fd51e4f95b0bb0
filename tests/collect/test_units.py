"""`collect/units.py`: unit statistics (neurons, KV groups, hidden channels, layers) against a brute force.

The brute force runs each decoder layer by hand (q/k/v or fused qkv, q/k norms, rotary, GQA, causal + padding mask,
softmax, gate/up or fused gate_up, the activation from the config), checks that it reproduces the model's logits on
the real tokens, and computes every statistic over the real tokens with plain masked sums. Taylor per unit is the
sum of `g * w` over index sets of the unit's rows and columns, written out per layout.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.activations import ACT2FN

from hf_weightprune.collect.units import UNIT_STATISTICS, UnitCollector, unit_means
from hf_weightprune.testing import TINY, tiny_llama, tiny_phi3


def _build(cls, cfg_cls, seed, **overrides):
    torch.manual_seed(seed)
    return cls(cfg_cls(**{**TINY, **overrides}))


MODELS = {
    "llama": lambda seed: tiny_llama(seed),
    "mistral": lambda seed: _build(MistralForCausalLM, MistralConfig, seed),
    "qwen2": lambda seed: _build(Qwen2ForCausalLM, Qwen2Config, seed),  # q/k/v biases
    "qwen3": lambda seed: _build(Qwen3ForCausalLM, Qwen3Config, seed, head_dim=16),  # q/k norms, wide heads
    "gemma": lambda seed: _build(GemmaForCausalLM, GemmaConfig, seed, head_dim=16),  # head_dim != hidden / heads
    "phi3": lambda seed: tiny_phi3(seed),  # fused qkv_proj and gate_up_proj
}


def _model(arch: str, seed: int = 0):
    model = MODELS[arch](seed)
    with torch.no_grad():  # stock init gives near-identity layers; spread the weights so every statistic varies
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.normal_(0, 0.2)
    return model.train()


def _batch(seed: int, side: str, batch: int = 3, seq: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b, pad in enumerate([0, 2, 4][:batch]):
        if pad:
            mask[b, :pad] = 0 if side == "left" else 1
            if side == "right":
                mask[b, seq - pad :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------------
# Brute force: the decoder run by hand
# ----------------------------------------------------------------------------------------------------------------------


def _rope(x, cos, sin):  # x [B, S, n, d]; cos/sin [B, S, rot]: rotate the first `rot` dims (Phi-3 may be partial)
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = torch.cat([-x_rot[..., rot // 2 :], x_rot[..., : rot // 2]], dim=-1)
    return torch.cat([x_rot * cos[:, :, None] + half * sin[:, :, None], x_pass], dim=-1)


@torch.no_grad()
def by_hand(model, ids, mask):
    """Per layer `(layer input, o_proj input, down_proj input, layer output)` of a forward, each `[B, S, .]`."""
    cfg, base = model.config, model.model
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    B, S = ids.shape
    x = base.embed_tokens(ids)
    cos, sin = base.rotary_emb(x, torch.arange(S).expand(B, S))
    allowed = torch.ones(S, S, dtype=torch.bool).tril()[None] & (mask[:, None, :] != 0)  # [B, query, key]
    act = ACT2FN[cfg.hidden_act]
    records = []
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        h = layer.input_layernorm(x)
        if hasattr(attn, "qkv_proj"):
            q, k, v = attn.qkv_proj(h).split([heads * d, kv * d, kv * d], dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q, k, v = q.view(B, S, heads, d), k.view(B, S, kv, d), v.view(B, S, kv, d)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k, v = k.repeat_interleave(heads // kv, dim=2), v.repeat_interleave(heads // kv, dim=2)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5
        logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
        o = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(B, S, heads * d)
        mid = x + attn.o_proj(o)
        m = layer.post_attention_layernorm(mid)
        if hasattr(mlp, "gate_up_proj"):
            gate, up = mlp.gate_up_proj(m).chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(m), mlp.up_proj(m)
        a = act(gate) * up
        y = mid + mlp.down_proj(a)
        records.append((x, o, a, y))
        x = y
    real = mask.bool()
    expected = model(input_ids=ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(model.lm_head(base.norm(x))[real], expected, rtol=1e-4, atol=1e-4)  # the hand is right
    return records


def brute_force(model, batches) -> dict[str, torch.Tensor]:
    """The collector's state keys, summed over the real tokens of `batches` with masked sums (float64)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    out: dict[str, torch.Tensor] = {}

    def add(key, value):
        out[key] = out.get(key, 0) + value

    for ids, mask in batches:
        real = mask.bool()
        for i, (x, o, a, y) in enumerate(by_hand(model, ids, mask)):
            x, o, a, y = (t[real].double() for t in (x, o, a, y))  # [real tokens, .]
            n = torch.tensor(int(real.sum()))
            p = f"layers.{i}"
            add(f"{p}.hidden.abs", x.abs().sum(0))
            add(f"{p}.hidden.sq", (x * x).sum(0))
            cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
            add(f"{p}.influence", (1 - cos).sum())
            add(f"{p}.neurons.abs", a.abs().sum(0))
            add(f"{p}.neurons.sq", (a * a).sum(0))
            add(f"{p}.neurons.sum", a.sum(0))  # signed: FLAP's mean input of down_proj
            add(f"{p}.heads.sum", o.sum(0))  # and of o_proj
            per_head = o.view(o.shape[0], heads, -1)
            add(f"{p}.heads.norm", per_head.norm(dim=-1).sum(0))
            add(f"{p}.heads.sq", (per_head * per_head).sum((0, 2)))
            for key in ("tokens", "neurons.tokens", "heads.tokens"):
                add(f"{p}.{key}", n)
    return out


def assert_statistic_close(key, got, want):
    """One state entry against the brute force: counts exactly, sums to float32-forward tolerance. Signed sums
    (`*.sum`) cancel, so their tolerance is relative to their largest entry rather than to each entry."""
    if key.endswith("tokens"):
        assert int(got) == int(want), key
        return
    atol = 1e-5 * float(want.abs().max()) if key.endswith(".sum") else 1e-6
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=atol, msg=key)


def _assert_matches(state, expected):
    for key, want in expected.items():
        assert_statistic_close(key, state[key], want)


def _forward(model, ids, mask, *, backward=False):
    if backward:
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    else:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)


# ----------------------------------------------------------------------------------------------------------------------
# Activation statistics and block influence
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_statistics_equal_brute_force(arch, side):
    model = _model(arch)
    batches = [_batch(1, side), _batch(2, side)]  # two forwards of one step, like gradient accumulation
    c = UnitCollector(model)
    c.register()
    for ids, mask in batches:
        _forward(model, ids, mask)
    step = c.pop()
    assert int(step["layers.0.tokens"]) == sum(int(m.sum()) for _, m in batches) < sum(m.numel() for _, m in batches)
    c.add_(step)
    c.remove()
    expected = brute_force(model, batches)
    _assert_matches(c.state_dict(), expected)

    cfg, L = model.config, model.config.num_hidden_layers
    kv, rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    n = expected["layers.0.tokens"].double()
    act, l2 = c.scores("activation"), c.scores("activation_l2")
    for i in range(L):
        p = f"layers.{i}"
        torch.testing.assert_close(act["neurons"][i], (expected[f"{p}.neurons.abs"] / n).float())
        torch.testing.assert_close(l2["neurons"][i], (expected[f"{p}.neurons.sq"] / n).sqrt().float())
        groups = [expected[f"{p}.heads.norm"][g * rep : (g + 1) * rep].sum() / n for g in range(kv)]
        torch.testing.assert_close(act["heads"][i], torch.stack(groups).float())
        assert act["heads"][i].shape == (kv,) and act["neurons"][i].dtype == torch.float32
    hidden = sum(expected[f"layers.{i}.hidden.abs"] / n for i in range(L))
    torch.testing.assert_close(act["hidden"], hidden.float())
    # a prune removing layer 0 ranks the channels by what the layers that stay read
    torch.testing.assert_close(c.scores("activation_l2", kept_layers=[1])["hidden"],
                               (expected["layers.1.hidden.sq"] / n).sqrt().float())
    influence = torch.stack([expected[f"layers.{i}.influence"] / n for i in range(L)])
    torch.testing.assert_close(act["layers"], influence.float())
    assert (act["layers"] > 0).all()
    means = unit_means(c.state_dict())
    for i in range(L):
        assert_statistic_close("neurons.sum", means["neurons"][i], expected[f"layers.{i}.neurons.sum"] / n)
        assert_statistic_close("heads.sum", means["heads"][i], expected[f"layers.{i}.heads.sum"] / n)
        assert means["heads"][i].shape == (cfg.num_attention_heads * c.units[i].head_dim,)
        assert (means["neurons"][i] < 0).any() and (means["neurons"][i] > 0).any()  # signed, not magnitudes


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing:FutureWarning")
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_gradient_checkpointing_counts_once(arch, use_reentrant):
    batches = [_batch(3, "left"), _batch(4, "right")]
    states = {}
    for ckpt in (False, True):
        model = _model(arch)
        if ckpt:
            model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        c = UnitCollector(model)
        c.register()
        for ids, mask in batches:
            _forward(model, ids, mask, backward=True)
        c.add_(c.pop())
        states[ckpt] = c.state_dict()
    _assert_matches(states[True], brute_force(_model(arch), batches))
    assert states[True].keys() == states[False].keys()
    for key in states[False]:
        torch.testing.assert_close(states[True][key], states[False][key], rtol=1e-5, atol=1e-8, msg=key)


def test_eval_forwards_and_inactive_collector_count_nothing():
    model = _model("llama")
    c = UnitCollector(model)
    c.register()
    ids, mask = _batch(5, "left")
    model.eval()
    _forward(model, ids, mask)
    assert c.pop() == {}
    model.train()
    c.active = False
    _forward(model, ids, mask)
    assert c.pop() == {}
    c.active = True
    _forward(model, ids, mask)
    assert int(c.pop()["layers.1.tokens"]) == int(mask.sum())
    c.remove()
    _forward(model, ids, mask)
    assert c.pop() == {}
    everything = UnitCollector(model, training_only=False)
    everything.register()
    model.eval()
    _forward(model, ids, mask)
    assert int(everything.pop()["layers.0.heads.tokens"]) == int(mask.sum())


# ----------------------------------------------------------------------------------------------------------------------
# First-order Taylor
# ----------------------------------------------------------------------------------------------------------------------


def _gw(model, name):
    p = model.get_parameter(name)
    return (p.grad * p).double() if p.grad is not None else None


def taylor_by_hand(model) -> dict[str, torch.Tensor]:
    """Signed `sum g * w` per unit, from explicit row/column index sets of each unit."""
    cfg = model.config
    heads, kv, H, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size, cfg.num_hidden_layers
    d = getattr(cfg, "head_dim", None) or H // heads
    rep = heads // kv
    out = {}
    for i in range(L):
        p = f"model.layers.{i}"
        layer = model.get_submodule(p)
        out[f"layers.{i}.taylor"] = sum(_gw(model, f"{p}.{n}").sum() for n, _ in layer.named_parameters())
        inter = layer.mlp.down_proj.in_features
        neurons = torch.zeros(inter, dtype=torch.float64)
        down = _gw(model, f"{p}.mlp.down_proj.weight")
        for j in range(inter):
            if hasattr(layer.mlp, "gate_up_proj"):
                gu = _gw(model, f"{p}.mlp.gate_up_proj.weight")
                neurons[j] = gu[j].sum() + gu[inter + j].sum()
            else:
                neurons[j] = _gw(model, f"{p}.mlp.gate_proj.weight")[j].sum() + _gw(model, f"{p}.mlp.up_proj.weight")[j].sum()
            neurons[j] += down[:, j].sum()
        out[f"layers.{i}.taylor.neurons"] = neurons
        groups = torch.zeros(kv, dtype=torch.float64)
        o = _gw(model, f"{p}.self_attn.o_proj.weight")
        for g in range(kv):
            q_rows = list(range(g * rep * d, (g + 1) * rep * d))
            kv_rows = list(range(g * d, (g + 1) * d))
            if hasattr(layer.self_attn, "qkv_proj"):
                parts = [("qkv_proj", q_rows + [heads * d + r for r in kv_rows] + [(heads + kv) * d + r for r in kv_rows])]
            else:
                parts = [("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)]
            for proj, rows in parts:
                groups[g] += _gw(model, f"{p}.self_attn.{proj}.weight")[rows].sum()
                bias = getattr(layer.self_attn, proj).bias
                if bias is not None:
                    groups[g] += _gw(model, f"{p}.self_attn.{proj}.bias")[rows].sum()
            groups[g] += o[:, q_rows].sum()
        out[f"layers.{i}.taylor.heads"] = groups
    # per hidden channel, by where the weights are: each decoder layer, and outside them (embeddings, head, norm)
    parts = {f"layers.{i}.taylor.hidden": torch.zeros(H, dtype=torch.float64) for i in range(L)}
    parts["taylor.hidden.outside"] = torch.zeros(H, dtype=torch.float64)
    readers = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "embed_tokens", "lm_head")
    for name, param in model.named_parameters(remove_duplicate=True):
        if param.grad is None:
            continue
        gw, module = _gw(model, name), name.rsplit(".", 2)[-2]
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        hidden = parts["taylor.hidden.outside" if layer is None else f"layers.{layer}.taylor.hidden"]
        for c in range(H):
            if module in readers and name.endswith("weight"):
                hidden[c] += gw[:, c].sum()
            elif module in ("o_proj", "down_proj"):
                hidden[c] += gw[c].sum()
            elif "norm" in module and module not in ("q_norm", "k_norm"):
                hidden[c] += gw[c]
    out.update(parts)
    out["taylor.hidden"] = sum(parts.values())  # the whole model's sum, before its |.|
    return out


@pytest.mark.parametrize("arch", list(MODELS))
def test_taylor_equals_sum_of_g_times_w_by_hand(arch):
    model = _model(arch, seed=1)
    c = UnitCollector(model)  # not registered: Taylor reads gradients only
    expected: dict[str, torch.Tensor] = {}
    for step in range(2):  # |sum| per step, then summed over steps
        model.zero_grad()
        ids, mask = _batch(10 + step, "left")
        _forward(model, ids, mask, backward=True)
        assert c.update_taylor_(model)
        for k, v in taylor_by_hand(model).items():
            expected[k] = expected.get(k, 0) + v.abs()
    step_sums = c.pop()
    assert int(step_sums["taylor.steps"]) == 2
    c.add_(step_sums)
    state = c.state_dict()
    for key, want in expected.items():
        torch.testing.assert_close(state[key], want, rtol=1e-5, atol=1e-9, msg=key)
    scores = c.scores("taylor")
    torch.testing.assert_close(scores["neurons"][1], (expected["layers.1.taylor.neurons"] / 2).float())
    torch.testing.assert_close(scores["layers"], torch.stack([expected[f"layers.{i}.taylor"] / 2
                                                              for i in range(2)]).float())
    torch.testing.assert_close(scores["hidden"], (expected["taylor.hidden"] / 2).float())
    # layer 0 removed by the same prune: its weights' |sum g*w| no longer counts for the channels
    kept = c.scores("taylor", kept_layers=[1])["hidden"]
    torch.testing.assert_close(kept, ((expected["layers.1.taylor.hidden"] + expected["taylor.hidden.outside"]) / 2)
                               .float())
    assert not torch.allclose(kept, scores["hidden"])
    assert torch.equal(c.scores("taylor", kept_layers=[0, 1])["hidden"], scores["hidden"])  # all layers: the whole


def test_taylor_without_gradients_counts_nothing():
    model = _model("llama")
    c = UnitCollector(model)
    assert not c.update_taylor_()
    assert c.pop() == {}
    with pytest.raises(ValueError, match="no optimizer step with gradients"):
        c.scores("taylor")
    with pytest.raises(ValueError, match="decoder layers are not the collector's"):
        c.update_taylor_(_model("llama"))


# ----------------------------------------------------------------------------------------------------------------------
# Resume and merge
# ----------------------------------------------------------------------------------------------------------------------


def _step(model, c, seed):
    model.zero_grad()
    ids, mask = _batch(seed, "left" if seed % 2 else "right")
    _forward(model, ids, mask, backward=True)
    c.update_taylor_(model)
    c.add_(c.pop())


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_state_dict_round_trip_continues_exactly(arch, tmp_path):
    model = _model(arch, seed=2)
    first = UnitCollector(model)
    first.register()
    _step(model, first, 20)
    _step(model, first, 21)
    save_file(first.state_dict(), tmp_path / "units.safetensors")  # what a checkpoint would hold
    _step(model, first, 22)
    first.remove()

    resumed = UnitCollector(model)
    resumed.register()
    resumed.load_state_dict(load_file(tmp_path / "units.safetensors"))
    _step(model, resumed, 22)
    a, b = first.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for statistic in UNIT_STATISTICS:
        assert torch.equal(first.scores(statistic)["layers"], resumed.scores(statistic)["layers"])


def test_a_state_without_per_layer_taylor_sums_resumes_without_them():
    """A checkpoint of an older version (no per-layer hidden Taylor sums): the run resumes, every statistic it has
    continues exactly, the missing sums are not restarted from part of the run, and only the Taylor ranking over the
    layers that stay is refused, in one line, as for that version's files."""
    model = _model("llama", seed=2)
    first = UnitCollector(model)
    first.register()
    _step(model, first, 20)
    old = {k: v for k, v in first.state_dict().items()
           if not (k.startswith("layers.") and k.endswith(".taylor.hidden")) and k != "taylor.hidden.outside"}
    _step(model, first, 21)
    first.remove()
    resumed = UnitCollector(model)
    resumed.register()
    resumed.load_state_dict(old)
    _step(model, resumed, 21)
    a, b = first.state_dict(), resumed.state_dict()
    assert set(b) == set(old) and set(a) - set(b) == {"layers.0.taylor.hidden", "layers.1.taylor.hidden",
                                                       "taylor.hidden.outside"}
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert torch.equal(resumed.scores("taylor")["hidden"], first.scores("taylor")["hidden"])
    with pytest.raises(ValueError, match=r"^unit statistics: no per-layer Taylor sums of the hidden channels") as e:
        resumed.scores("taylor", kept_layers=[1])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="missing entry layers.0.neurons"):  # any other missing entry: still refused
        UnitCollector(model).load_state_dict({k: v for k, v in old.items() if not k.startswith("layers.0.neurons")})


def test_sums_merge_like_ranks():
    """Two collectors on halves of the data, added, equal one collector on all of it (how ranks merge)."""
    halves = [[_batch(30, "left")], [_batch(31, "right")]]
    parts = []
    for batches in [halves[0], halves[1], halves[0] + halves[1]]:
        model = _model("gemma")
        c = UnitCollector(model)
        c.register()
        for ids, mask in batches:
            _forward(model, ids, mask)
        c.add_(c.pop())
        parts.append(c)
    parts[0].add_(parts[1].state_dict())
    merged, whole = parts[0].state_dict(), parts[2].state_dict()
    for key in whole:
        torch.testing.assert_close(merged[key], whole[key], rtol=1e-12, atol=1e-12, msg=key)


def test_bad_state_is_refused_in_one_line():
    c = UnitCollector(_model("llama"))
    state = c.state_dict()
    with pytest.raises(ValueError, match="missing entry layers.0.heads.norm"):
        c.load_state_dict({k: v for k, v in state.items() if k != "layers.0.heads.norm"})
    with pytest.raises(ValueError, match="unexpected entry layers.9.tokens"):
        c.load_state_dict({**state, "layers.9.tokens": torch.zeros((), dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"layers.1.neurons.abs is \(3,\), expected \(64,\)"):
        c.add_({"layers.1.neurons.abs": torch.zeros(3)})
    with pytest.raises(ValueError, match="unknown statistic 'wanda'"):
        c.scores("wanda")
    with pytest.raises(ValueError, match="no training tokens"):
        c.scores()
    with pytest.raises(ValueError, match="no training tokens"):
        unit_means(state)
    with pytest.raises(ValueError, match=r"no signed input sums .* ImportanceConfig\(units=True\)"):
        unit_means({k: v for k, v in state.items() if not k.endswith(".sum")})  # a file from before the sums


def test_moe_layer_has_no_neuron_units_but_counts_the_rest():
    """Qwen3-MoE with a dense first layer: neurons of layer 0 only; heads, hidden channels and layers everywhere."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**TINY, "moe_intermediate_size": 24, "num_experts": 4,
                                                  "num_experts_per_tok": 2, "mlp_only_layers": [0]})).train()
    c = UnitCollector(model)
    assert [(u.mlp, u.attn) for u in c.units] == [("split", "split"), (None, "split")]
    c.register()
    ids, mask = _batch(40, "left")
    _forward(model, ids, mask, backward=True)
    assert c.update_taylor_(model)
    c.add_(c.pop())
    for statistic in UNIT_STATISTICS:
        s = c.scores(statistic)
        assert list(s["neurons"]) == [0] and s["neurons"][0].shape == (64,)
        assert list(s["heads"]) == [0, 1] and s["hidden"].shape == (32,) and s["layers"].shape == (2,)
        assert (s["layers"] > 0).all() and (s["hidden"] > 0).all()
    assert int(c.state_dict()["layers.1.tokens"]) == int(mask.sum())
