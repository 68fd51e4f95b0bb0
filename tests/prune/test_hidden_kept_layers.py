"""Issue 25: a prune that removes decoder layers and hidden channels together ranks the channels by the layers that
stay. The model is built so that channel `C` of the residual stream is non-zero only at the input of the last layer
(layer 2's `down_proj` bias writes it, layer 3's takes it out again, nothing else touches it) and the last layer
changes little else, so that block influence removes it: summed over every layer `C` ranks near the top, over the
layers that stay it is never used and must go first. Trained with `learning_rate=0` over one epoch, so that a brute
force over the same windows with the same weights gives the statistics.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, load_importance, prune_
from hf_weightprune.files.unit_files import UNITS_NAME, save_unit_state
from hf_weightprune.testing import TokenDataset
from tests.helpers import train

from .test_depth_hidden import layers_of, make_model, skip_layers, zero_channels_

C, WRITE = 5, 3.0
WINDOWS = dict(n=12, vocab_size=128, seed=0)  # 3 steps of 4: every window once
X = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def _model():
    model = make_model("llama", seed=3, rms_norm_eps=1e-12, mlp_bias=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
        layers = layers_of(model)
        model.get_input_embeddings().weight[:, C] = 0
        for layer in layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight[C] = 0
                if linear.bias is not None:
                    linear.bias[C] = 0
        layers[2].mlp.down_proj.bias[C] = WRITE
        layers[3].mlp.down_proj.bias[C] = -WRITE
        for linear in (layers[3].self_attn.o_proj, layers[3].mlp.down_proj):  # little else: low block influence
            linear.weight.mul_(0.05)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model = _model().train()
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda", units=True))
    train(model, [cb], out, max_steps=3, batch=4, n=WINDOWS["n"], lr=0.0)
    model.eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _model().state_dict().values()))
    return model, cb.importance(), out / "importance"


@torch.no_grad()
def _brute_force_hidden(model, layers) -> torch.Tensor:
    """Sum over `layers` of the mean `|x_c|` of each layer's input over every training window."""
    ids = TokenDataset(**WINDOWS).ids
    states = model(input_ids=ids, output_hidden_states=True).hidden_states  # [i]: the input of layer i
    return sum(states[i].double().abs().mean((0, 1)) for i in layers).float()


def test_a_channel_only_a_removed_layer_reads_ranks_low(trained):
    model, imp, _ = trained
    everywhere = imp.unit_scores("activation")
    assert int(everywhere["layers"].argmin()) == 3  # block influence removes the last layer first
    kept = imp.unit_scores("activation", kept_layers=[0, 1, 2])["hidden"]
    torch.testing.assert_close(everywhere["hidden"], _brute_force_hidden(model, range(4)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kept, _brute_force_hidden(model, range(3)), rtol=1e-4, atol=1e-6)
    assert int((everywhere["hidden"] > everywhere["hidden"][C]).sum()) <= 2  # before: among the three highest
    assert kept[C] == 0 and int((kept > 0).sum()) == 31  # over the layers that stay: the lowest
    with pytest.raises(ValueError, match=r"kept_layers \[4\] are not some of the layers \[0, 1, 2, 3\]"):
        imp.unit_scores("activation", kept_layers=[4])


def test_combined_prune_removes_it_equals_the_zeroed_dense_model_and_reloads(trained, tmp_path):
    dense, imp, _ = trained
    config = PruneConfig(structure="layers,hidden", sparsity=0.25)
    model = copy.deepcopy(dense)
    axes = prune_(model, imp, config, progress=False).structured["axes"]
    assert axes["layers"]["removed"] == [3]
    scores = imp.unit_scores("activation", kept_layers=[0, 1, 2])["hidden"]
    assert axes["hidden"]["removed"] == sorted(torch.sort(scores, stable=True).indices[:8].tolist())
    assert C in axes["hidden"]["removed"]

    # Exact only for channels that are zero along the residual stream (the norms average over fewer): prune the
    # dense model with them zeroed, which removes the same units, against that model with layer 3 skipped.
    model = copy.deepcopy(dense)
    zero_channels_(model, axes["hidden"]["removed"])
    reference = copy.deepcopy(model)
    assert prune_(model, imp, config, progress=False).structured["axes"] == axes
    skip_layers(reference, [3])
    with torch.no_grad():
        want, got = reference(input_ids=X).logits, model(input_ids=X).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=X).logits, got, rtol=1e-5, atol=1e-6)
    tokens = [m.generate(X[:1], max_new_tokens=4, do_sample=False, use_cache=c, pad_token_id=0)
              for m in (model, stock) for c in (True, False)]
    assert all(torch.equal(t, tokens[0]) for t in tokens)


def test_the_budget_split_ranks_by_the_layers_it_keeps(trained):
    dense, imp, _ = trained
    model = copy.deepcopy(dense)
    report = prune_(model, imp, PruneConfig(structure="layers,hidden", target_params=0.7), progress=False).structured
    axes = report["axes"]
    assert 3 in axes["layers"]["removed"] and axes["hidden"]["removed"], axes  # both axes cut
    kept = [i for i in range(4) if i not in axes["layers"]["removed"]]
    scores = imp.unit_scores("activation", kept_layers=kept)["hidden"]
    n = len(axes["hidden"]["removed"])
    assert axes["hidden"]["removed"] == sorted(torch.sort(scores, stable=True).indices[:n].tolist())
    assert C in axes["hidden"]["removed"]


def test_unit_file_without_per_layer_taylor_sums_still_loads(trained, tmp_path):
    """A `units.safetensors` written before the per-layer hidden Taylor sums: it loads and ranks as before; only the
    Taylor ranking over the layers that stay needs the new sums, and says so in one line before any change."""
    dense, imp, folder = trained
    old = tmp_path / "importance"
    old.mkdir()
    for f in folder.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    # copies: safetensors 0.4 (the floor) maps the file, which save_unit_state below rewrites in place
    state = {k: v.clone() for k, v in load_file(old / UNITS_NAME).items()}
    state = {k.removeprefix("units."): v for k, v in state.items()
             if not (k.endswith(".taylor.hidden") and k.startswith("units.layers.")) and k != "units.taylor.hidden.outside"}
    assert "taylor.hidden" in state and len(state) < len(imp.unit_state())
    meta = json.loads((old / "importance_config.json").read_text())
    meta["checksums"]["units"] = save_unit_state(str(old), state)
    (old / "importance_config.json").write_text(json.dumps(meta))

    loaded = load_importance(old)
    for statistic in ("activation", "activation_l2", "taylor"):
        for axis, want in imp.unit_scores(statistic).items():
            got = loaded.unit_scores(statistic)[axis]
            assert all(torch.equal(got[i], want[i]) for i in want) if isinstance(want, dict) else torch.equal(got, want)
    torch.testing.assert_close(loaded.unit_scores("activation", kept_layers=[0, 1, 2])["hidden"],
                               imp.unit_scores("activation", kept_layers=[0, 1, 2])["hidden"])
    model = copy.deepcopy(dense)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^unit statistics: no per-layer Taylor sums of the hidden channels \(saved "
                                         r"by an older hf-weightprune\)") as e:
        prune_(model, loaded, PruneConfig(structure="layers,hidden", sparsity=0.25, unit_statistic="taylor"),
               progress=False)
    assert "\n" not in str(e.value)
    assert len(layers_of(model)) == 4 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
