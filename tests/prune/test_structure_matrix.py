"""Issue 25's matrix: every supported layout x every structure through the public `prune_`, compensation off.

Each cell checks, on a real batch, that (i) the pruned model equals the dense model with the removed units zeroed
(neurons: `down_proj` columns; KV groups: the `o_proj` columns of their query heads; hidden channels: the residual
stream's channels, zero in the embedding and in every `o_proj` / `down_proj` output) and the removed layers skipped,
a reference built here from the dense weights, not by the surgery code; (ii) `save_pretrained` + stock
`AutoModelForCausalLM.from_pretrained` gives the same logits; (iii) greedy `generate` with and without the KV cache
gives the in-memory model's tokens. The importance comes from a short real Trainer run with `units=True`, one per
layout. Then `target_params` budgets (met within one unit per layer) and the structures a layout cannot take.
"""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, prune_
from hf_weightprune.layouts import decoder_layers
from hf_weightprune.prune.hidden import hidden_channel_cost
from hf_weightprune.prune.surgery import config_error
from tests.helpers import train

from .test_depth_hidden import ARCHS, make_model, skip_layers, zero_channels_

# hidden 32, intermediate 48, 4 layers, 4 query heads in 2 KV groups (Gemma 2/3, Qwen3: head_dim 16 != 32 / 4).
# A negligible rms_norm_eps: hidden pruning rescales the norm gains exactly, but not the eps (see prune/hidden.py).
EPS = dict(rms_norm_eps=1e-12)
STRUCTURES = ["neurons", "heads", "hidden", "layers", "layers,heads,neurons,hidden"]
SPARSITY = {"neurons": 0.25, "heads": 0.5, "hidden": 0.25, "layers": 0.5, "layers,heads,neurons,hidden": 0.5}
X = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def _dense(arch: str):
    model = make_model(arch, seed=3, **EPS)
    with torch.no_grad():  # stock init (std 0.02) makes every layer nearly the identity: a wrong slice would hide
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Per layout, made on first use: the dense model after 3 Trainer steps with unit statistics, and its importance."""
    done = {}

    def get(arch):
        if arch not in done:
            model = _dense(arch).train()
            cb = ImportanceCallback(ImportanceConfig(criterion="wanda", units=True))
            train(model, [cb], tmp_path_factory.mktemp(arch), max_steps=3, lr=1e-3)
            done[arch] = (model.eval(), cb.importance())
        return copy.deepcopy(done[arch][0]), done[arch][1]

    return get


@torch.no_grad()
def _logits(model, x=X):
    return model(input_ids=x, use_cache=False).logits


@torch.no_grad()
def _greedy(model, use_cache):
    return model.generate(X[:1], max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0)


def _zeroed_reference(dense, axes: dict):
    """`dense` with the units `axes` (a report's `structured["axes"]`) removed set to zero, layers skipped by hooks."""
    n = len(decoder_layers(dense))
    dropped = axes.get("layers", {}).get("removed", [])
    kept = [i for i in range(n) if i not in dropped]  # new layer j was layer kept[j]
    layers = decoder_layers(dense)
    with torch.no_grad():
        for j, removed in axes.get("neurons", {}).get("removed", {}).items():
            layers[kept[j]].mlp.down_proj.weight[:, removed] = 0
        for j, groups in axes.get("heads", {}).get("removed", {}).items():
            attn = layers[kept[j]].self_attn
            d, group = attn.head_dim, dense.config.num_attention_heads // dense.config.num_key_value_heads
            cols = [h * d + k for g in groups for h in range(g * group, (g + 1) * group) for k in range(d)]
            attn.o_proj.weight[:, cols] = 0
    if axes.get("hidden", {}).get("removed"):
        zero_channels_(dense, axes["hidden"]["removed"])
    skip_layers(dense, dropped)
    return dense


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_pruned_equals_zeroed_dense_reloads_and_generates(trained, arch, structure, tmp_path):
    model, imp = trained(arch)
    config = PruneConfig(structure=structure, sparsity=SPARSITY[structure])
    first = prune_(model, imp, config, progress=False).structured["axes"]
    for axis in config.structures:
        assert first[axis]["after"] < first[axis]["before"], axis
    hidden_removed = first.get("hidden", {}).get("removed")
    if hidden_removed:
        # Hidden pruning is exact only for channels that are zero along the residual stream (an RMSNorm averages
        # over fewer channels): prune the dense model with those channels zeroed, which must remove the same units.
        model, _ = trained(arch)
        zero_channels_(model, hidden_removed)
        assert prune_(model, imp, config, progress=False).structured["axes"] == first
    dense, _ = trained(arch)
    want = _logits(_zeroed_reference(dense, first))
    assert not torch.allclose(want, _logits(trained(arch)[0]), atol=1e-3)  # what was removed mattered
    got = _logits(model)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    model.save_pretrained(tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(stock) is type(model)
    assert {n: p.shape for n, p in stock.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    torch.testing.assert_close(_logits(stock), got, rtol=1e-5, atol=1e-6)
    tokens = _greedy(model, use_cache=True)
    assert tokens.shape[1] > X.shape[1]
    assert torch.equal(_greedy(model, use_cache=False), tokens)
    for use_cache in (True, False):
        assert torch.equal(_greedy(stock, use_cache), tokens), use_cache


# ---------------------------------------------------------------------------------------------- target_params


def _unit_costs(model) -> dict[str, int]:
    """Parameters of one unit in every layer (a KV group with its query heads; a neuron) or in the model (a hidden
    channel, the largest layer), counted from the module shapes here."""
    layers = decoder_layers(model)
    attn, mlp = layers[0].self_attn, layers[0].mlp
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    d = attn.head_dim
    in_q = attn.q_proj if hasattr(attn, "q_proj") else attn.qkv_proj
    per_row = in_q.in_features + (in_q.bias is not None)
    heads = (group + 2) * d * per_row + group * d * attn.o_proj.out_features
    up = mlp.up_proj if hasattr(mlp, "up_proj") else mlp.gate_up_proj
    neurons = 2 * (up.in_features + (up.bias is not None)) + mlp.down_proj.out_features
    return {"heads": heads * len(layers), "neurons": neurons * len(layers), "hidden": hidden_channel_cost(model),
            "layers": max(sum(p.numel() for p in layer.parameters()) for layer in layers)}


def _hidden_step(config, head_dim: int) -> int:
    """The smallest change of `hidden_size` the config class accepts: transformers 5's `LlamaConfig.validate` wants
    `hidden_size % num_attention_heads == 0` even with `head_dim` explicit, so a hidden "unit" is that many channels."""
    accepted = [k for k in range(1, config.hidden_size + 1)
                if config_error(config, {"hidden_size": k, "head_dim": head_dim}) is None]
    return max(b - a for a, b in zip(accepted, accepted[1:]))


@pytest.mark.parametrize("structure, target", [
    ("neurons", 0.8), ("heads", 0.85), ("hidden", 0.8), ("layers", 0.6),
    ("layers,heads,neurons", 0.6), ("heads,neurons,hidden", 0.7),
])
@pytest.mark.parametrize("arch", ["llama_tied_bias", "qwen3", "phi3"])
def test_target_params_met_within_one_unit_per_layer(trained, arch, structure, target):
    model, imp = trained(arch)
    before = sum(p.numel() for p in model.parameters())
    costs = _unit_costs(model)  # of the dense model: an upper bound of what one unit costs after depth pruning
    dense_config = copy.deepcopy(model.config), decoder_layers(model)[0].self_attn.head_dim
    report = prune_(model, imp, PruneConfig(structure=structure, target_params=target), progress=False).structured
    after = sum(p.numel() for p in model.parameters())
    assert report["num_parameters"] == {"before": before, "after": after}
    assert report["target_params"] == round(target * before)
    axes = PruneConfig(structure=structure, target_params=target).structures
    if len(axes) == 1:  # a combination splits the budget by the statistics: an axis may take nothing
        assert report["axes"][axes[0]]["after"] < report["axes"][axes[0]]["before"]
    # the axis that meets the budget: the last width axis of a combination (depth first, then heads, neurons, hidden)
    last = [a for a in ("layers", "heads", "neurons", "hidden") if a in axes][-1]
    unit = costs[last] * (_hidden_step(*dense_config) if last == "hidden" else 1)
    assert abs(after - round(target * before)) <= unit, (after, round(target * before), unit)


# ------------------------------------------------------------------------------------------ refused, by name


def _unchanged(model, before) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_hidden_pruning_of_phi3_longrope_is_refused_by_name(trained):
    # Phi3Config sizes the longrope factors by hidden_size // num_attention_heads: no narrower hidden size passes.
    dense, imp = trained("phi3")
    half = 32 // 4 // 2
    rope = {"rope_type": "longrope", "short_factor": [1.0] * half, "long_factor": [2.0] * half,
            "original_max_position_embeddings": 32}
    model = make_model("phi3", rope_scaling=rope, **EPS)
    model.load_state_dict(dense.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for config in (PruneConfig(structure="hidden", sparsity=0.25), PruneConfig(structure="layers,hidden", sparsity=0.5)):
        with pytest.raises(ValueError, match=r"^structure 'hidden': keeping \d+ of 32 gives a config that Phi3Config "
                                             "rejects") as e:
            prune_(model, imp, config, progress=False)
        assert "\n" not in str(e.value)
        assert _unchanged(model, before) and len(decoder_layers(model)) == 4


def test_heads_of_a_single_kv_group_are_refused_by_name(tmp_path):
    model = make_model("qwen2", num_key_value_heads=1)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda", units=True))
    train(model, [cb], tmp_path, max_steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^structure 'heads' is not possible for Qwen2ForCausalLM: ") as e:
        prune_(model, cb.importance(), PruneConfig(structure="heads,neurons", sparsity=0.5), progress=False)
    assert "\n" not in str(e.value)
    assert _unchanged(model, before)


# ------------------------------------------------------------------------------ every structure x compensation

# Every layout kind: Llama (a config flag gives down_proj and o_proj a bias), Qwen2 (q/k/v biases, no flag for either
# consumer), Qwen3 (q/k norms, head_dim 16 != 32 / 4), Phi-3 (fused qkv and gate_up, no flag), Gemma 3 (head_dim 16).
COMPENSATED_ARCHS = ["llama", "qwen2", "qwen3", "phi3", "gemma3"]
ALL_STRUCTURES = [",".join(c) for r in range(1, 5) for c in itertools.combinations(("layers", "heads", "neurons",
                                                                                     "hidden"), r)]
COMPENSATIONS = [None, "mean", "refit", "refit,mean"]
CONSUMER = {"heads": "o_proj", "neurons": "down_proj"}
# The consumers a config flag of stock transformers gives a bias (compensate.BIAS_FLAGS): mean compensation of the
# others is refused, naming them.
BIASED = {"llama": {"heads", "neurons"}, "qwen2": set(), "qwen3": {"heads"}, "phi3": set(), "gemma3": {"heads"}}


@pytest.fixture(scope="module")
def with_hessians(tmp_path_factory):
    """Per layout, made on first use: the dense model after 4 Trainer steps of 8 x 16 tokens (512: at least 4 per
    input of every consumer, so no refit is warned about) and its `sparsegpt` importance with unit statistics."""
    done = {}

    def get(arch):
        if arch not in done:
            model = _dense(arch).train()
            cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", units=True))
            train(model, [cb], tmp_path_factory.mktemp(arch), max_steps=4, batch=8, n=32, lr=1e-3)
            done[arch] = (model.eval(), cb.importance())
        return copy.deepcopy(done[arch][0]), done[arch][1]

    return get


def _expected_refusal(arch: str, model, structure: str, compensate: str | None) -> str | None:
    """The one-line refusal a cell must give (a regex), or `None` where it must prune."""
    axes = PruneConfig(structure=structure, sparsity=0.5).structures
    served = [a for a in ("heads", "neurons") if a in axes]  # the order _mean_inputs checks the consumers in
    if compensate is None:
        return None
    if not served:
        return rf"^compensate={re.escape(repr(compensate))} .* structure {re.escape(repr(structure))} removes " \
               r"neither: use compensate=None$"
    lacking = [a for a in served if a not in BIASED[arch]]
    if "mean" in compensate and lacking:
        return rf"^compensate={re.escape(repr(compensate))} needs a bias on {CONSUMER[lacking[0]]}, and " \
               rf"{type(model).__name__} has no config flag"
    return None


def _columns(dense, axis: str, removed: list[int]) -> list[int]:
    """The consumer's input columns of the removed units (a KV group: the o_proj columns of its query heads)."""
    if axis == "neurons":
        return removed
    d = decoder_layers(dense)[0].self_attn.head_dim
    group = dense.config.num_attention_heads // dense.config.num_key_value_heads
    return [h * d + k for g in removed for h in range(g * group, (g + 1) * group) for k in range(d)]


@torch.no_grad()
def _compensate_reference_(dense, imp, axes: dict, compensate: str | None) -> None:
    """What each compensation does to a consumer, written out from its formula on the dense weights: `refit`
    `W_K + W_R H_RK (H_KK + 0.01 mean(diag H) I)^-1`; `mean` (FLAP) `b += W_R mu_R`; `refit,mean` the refit on
    `C = H/n - mu mu^T`, then `b += W mu - V mu_K`. The removed columns are left for `_zeroed_reference`."""
    if compensate is None:
        return
    dropped = axes.get("layers", {}).get("removed", [])
    kept = [i for i in range(len(decoder_layers(dense))) if i not in dropped]
    means = imp.unit_means() if "mean" in compensate else None
    for axis in ("heads", "neurons"):
        for j, removed in axes.get(axis, {}).get("removed", {}).items():
            i = kept[j]
            layer = decoder_layers(dense)[i]
            lin = layer.mlp.down_proj if axis == "neurons" else layer.self_attn.o_proj
            name = f"model.layers.{i}.{'mlp.down_proj' if axis == 'neurons' else 'self_attn.o_proj'}.weight"
            w = lin.weight.double()
            r = torch.tensor(_columns(dense, axis, removed))
            k = torch.tensor(sorted(set(range(w.shape[1])) - set(r.tolist())))
            new = w[:, k]
            if "refit" in compensate:
                h = imp.state(name).double()
                if compensate == "refit,mean":
                    mu = means[axis][i].double()
                    h = h / imp.meta["tokens"][name] - torch.outer(mu, mu)
                ridge = h[k][:, k] + 0.01 * h.diagonal().mean() * torch.eye(len(k), dtype=h.dtype)
                new = new + torch.linalg.solve(ridge, (w[:, r] @ h[r][:, k]).T).T
            if "mean" in compensate:
                mu = means[axis][i].double()
                shift = w @ mu - new @ mu[k]
                if lin.bias is None:  # the config flag's zero bias
                    lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype))
                lin.bias += shift.to(lin.bias.dtype)
            lin.weight[:, k] = new.to(lin.weight.dtype)


def _budgets(structure: str) -> list[dict]:
    # target_params makes the finest width axis (neurons) go last, after hidden channels: the order that once
    # looked the Hessians up by a stale module id. Heads alone cannot remove 25% of these models.
    return [dict(sparsity=0.5), dict(target_params=0.85 if structure == "heads" else 0.7)]


@pytest.mark.parametrize("compensate", COMPENSATIONS)
@pytest.mark.parametrize("structure", ALL_STRUCTURES)
@pytest.mark.parametrize("arch", COMPENSATED_ARCHS)
def test_every_structure_and_compensation_prunes_exactly_or_is_refused_untouched(with_hessians, arch, structure,
                                                                                 compensate):
    for budget in _budgets(structure):
        config = PruneConfig(structure=structure, compensate=compensate, **budget)
        model, imp = with_hessians(arch)
        refusal = _expected_refusal(arch, model, structure, compensate)
        if refusal is not None:
            before = _snapshot(model)
            with pytest.raises(ValueError, match=refusal) as e:
                prune_(model, imp, config, progress=False)
            assert "\n" not in str(e.value)
            assert _snapshot(model) == before, "a refused prune changed the model"
            continue
        axes = prune_(model, imp, config, progress=False).structured["axes"]
        assert sum(a["before"] - a["after"] for a in axes.values()) > 0, budget
        dense, _ = with_hessians(arch)
        hidden_removed = axes.get("hidden", {}).get("removed")
        if hidden_removed:  # exact for channels zero along the residual stream (see the test above)
            zero_channels_(dense, hidden_removed)
            again = copy.deepcopy(dense)
            assert prune_(again, imp, config, progress=False).structured["axes"] == axes
            model = again
        got = _logits(model)
        served = any(r for a in CONSUMER for r in axes.get(a, {}).get("removed", {}).values())
        if compensate is not None and served:  # what the compensation did mattered: slicing alone gives other logits
            sliced = _logits(_zeroed_reference(copy.deepcopy(dense), axes))
            assert not torch.allclose(got, sliced, atol=1e-3), budget
        _compensate_reference_(dense, imp, axes, compensate)
        want = _logits(_zeroed_reference(dense, axes))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5, msg=lambda m, b=budget: f"{b}: {m}")


def _snapshot(model):
    """Every parameter and buffer (bit for bit), the config and the module tree."""
    state = model.state_dict()
    return ({k: (v.dtype, tuple(v.shape), v.flatten().view(torch.uint8).tolist() if v.numel() else []) for k, v in
             state.items()}, model.config.to_dict(),
            [(n, type(m).__name__) for n, m in model.named_modules()])
