"""`PruneConfig(compensate="mean")`: FLAP's bias compensation of removed MLP neurons and KV groups, from the unit
statistics' signed input means; the bias created through the config flag stock transformers reads; refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Trainer

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, prune_, save_pruned
from hf_weightprune.testing import tiny_llama
from tests.helpers import REPO, train, training_args
from tests.test_architectures import build

KJV = REPO / "data" / "kjv"


def _windows(path: Path, n: int, seq: int = 32) -> torch.Tensor:
    """`n` consecutive byte windows of a text: ASCII bytes are token ids of the tiny 128-token vocabulary."""
    return torch.tensor(list(path.read_bytes()[: n * seq]), dtype=torch.long).view(n, seq)


class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


HELD_OUT = _windows(KJV / "valid.txt", 128)


def train_kjv_llama(folder, criterion: str):
    """A tiny Llama trained 150 steps of 16 x 32 KJV bytes with `criterion` and unit statistics: the model (eval
    mode) and its importance."""
    model = tiny_llama(seed=1, intermediate_size=128)
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion, units=True))
    args = training_args(folder, max_steps=150, per_device_train_batch_size=16, learning_rate=1e-2, seed=1,
                         save_strategy="no")
    Trainer(model=model, args=args, train_dataset=_Windows(_windows(KJV / "train.txt", 512)), callbacks=[cb]).train()
    return model.eval(), cb.importance()


@pytest.fixture(scope="module")
def kjv_llama(tmp_path_factory):
    """Unit statistics with a real mean (activations of a trained model)."""
    return train_kjv_llama(tmp_path_factory.mktemp("kjv"), "wanda")


def _loss(model) -> float:
    with torch.no_grad():
        return float(model(input_ids=HELD_OUT, labels=HELD_OUT).loss)


@pytest.mark.parametrize("structure", ["neurons", "heads"])
def test_mean_compensation_lowers_the_held_out_loss(kjv_llama, structure):
    model, imp = kjv_llama
    plain, mean = copy.deepcopy(model), copy.deepcopy(model)
    a = prune_(plain, imp, PruneConfig(structure=structure, sparsity=0.5)).structured
    b = prune_(mean, imp, PruneConfig(structure=structure, sparsity=0.5, compensate="mean")).structured
    assert a["axes"][structure]["removed"] == b["axes"][structure]["removed"]  # the same units, only the bias differs
    assert b["compensation"] == "mean"
    assert _loss(mean) < _loss(plain)


def test_bias_is_flaps_shift_and_the_rest_is_the_zeroed_dense_model(kjv_llama):
    model, imp = kjv_llama
    pruned = copy.deepcopy(model)
    report = prune_(pruned, imp, PruneConfig(structure="neurons", sparsity=0.5, compensate="mean")).structured
    assert report["bias_added"] == ["mlp_bias"] and pruned.config.mlp_bias is True
    means = imp.unit_means()["neurons"]
    reference = copy.deepcopy(model)  # dense, removed down_proj columns zeroed, FLAP's bias added by hand
    for i, removed in report["axes"]["neurons"]["removed"].items():
        layer, down = pruned.model.layers[i], reference.model.layers[i].mlp.down_proj
        shift = (down.weight.double()[:, removed] @ means[i][removed]).float()
        torch.testing.assert_close(layer.mlp.down_proj.bias, shift)
        assert shift.abs().max() > 1e-3  # a real shift, not a zero bias
        assert not layer.mlp.gate_proj.bias.any() and not layer.mlp.up_proj.bias.any()  # created by the flag, zero
        with torch.no_grad():
            down.weight[:, removed] = 0
        down.bias = nn.Parameter(shift)
    ids = HELD_OUT[:4]
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _trained(arch, tmp_path):
    model = build(arch)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda", units=True))
    train(model, [cb], tmp_path / "run", max_steps=2)
    return model.eval(), cb.importance()


# Layouts whose config has a flag that gives the consumer a bias: Llama (mlp_bias, attention_bias); Qwen3 and Gemma
# (attention_bias only).
SERVED = [("llama", dict(structure="neurons", sparsity=0.5)), ("llama", dict(structure="heads", sparsity=0.5)),
          ("llama", dict(structure=("layers", "heads", "neurons"), target_params=0.6)),
          ("llama", dict(structure=("neurons", "hidden"), target_params=0.7)),
          ("qwen3", dict(structure="heads", sparsity=0.5)), ("gemma2", dict(structure="heads", sparsity=0.5)),
          ("gemma3", dict(structure="heads", sparsity=0.5))]


@pytest.mark.parametrize("arch, kwargs", SERVED)
def test_compensated_checkpoint_reloads_in_stock_transformers(arch, kwargs, tmp_path):
    model, imp = _trained(arch, tmp_path)
    x = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    report = prune_(model, imp, PruneConfig(**kwargs, compensate="mean"), progress=False)
    flags = report.structured["bias_added"]
    assert flags == sorted({"neurons": "mlp_bias", "heads": "attention_bias"}[a] for a in report.structured["axes"]
                           if a in ("neurons", "heads"))
    out = tmp_path / "pruned"
    save_pruned(model, out, report=report)
    saved = json.loads((out / "config.json").read_text())
    assert all(saved[f] is True for f in flags)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    consumer = reloaded.model.layers[0].self_attn.o_proj if "attention_bias" in flags else None
    assert consumer is None or consumer.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits)
    for cache in (True, False):
        out_ids = reloaded.generate(x[:1], min_new_tokens=4, max_new_tokens=4, do_sample=False, use_cache=cache,
                                    pad_token_id=0)
        assert out_ids.shape == (1, 14)
    card = (out / "README.md").read_text()
    assert "**Bias compensation (FLAP)**" in card and "arXiv:2312.11983" in card
    assert all(f"`{f}=True`" in card for f in flags)


@pytest.mark.parametrize("arch, structure, match", [
    ("mistral", "neurons", "needs a bias on down_proj, and MistralForCausalLM has no config flag"),
    ("mistral", "heads", "needs a bias on o_proj, and MistralForCausalLM has no config flag"),
    ("qwen2", "heads", "needs a bias on o_proj, and Qwen2ForCausalLM has no config flag"),
    ("qwen2", "neurons", "needs a bias on down_proj, and Qwen2ForCausalLM"),
    ("phi3", "neurons", "needs a bias on down_proj, and Phi3ForCausalLM"),
    ("qwen3", "neurons", "needs a bias on down_proj, and Qwen3ForCausalLM"),
    ("gemma2", ("heads", "neurons"), "needs a bias on down_proj, and Gemma2ForCausalLM"),
    ("llama", "layers", "structure 'layers' removes neither: use compensate=None"),
    ("llama", "hidden", "structure 'hidden' removes neither"),
])
def test_refused_in_one_line_before_any_change(arch, structure, match, tmp_path):
    model, imp = _trained(arch, tmp_path)
    before, config = copy.deepcopy(model.state_dict()), model.config.to_dict()
    budget = dict(target_params=0.6) if isinstance(structure, tuple) else dict(sparsity=0.5)
    with pytest.raises(ValueError, match=match) as e:
        prune_(model, imp, PruneConfig(structure=structure, compensate="mean", **budget), progress=False)
    assert "\n" not in str(e.value)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.config.to_dict() == config


def test_without_unit_statistics_is_refused(tmp_path):
    model = tiny_llama()
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    train(model, [cb], tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"compensate='mean' needs the mean input .* ImportanceConfig\(units=True\)"):
        prune_(model, cb.importance(), PruneConfig(structure="neurons", sparsity=0.5, compensate="mean"))
    assert model.config.intermediate_size == 64 and model.model.layers[0].mlp.down_proj.bias is None
