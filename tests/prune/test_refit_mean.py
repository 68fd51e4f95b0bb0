"""`PruneConfig(compensate="refit,mean")`: least squares with an intercept, the kept `down_proj` / `o_proj` columns and
their bias fitted together from the input Hessians and the unit statistics' mean inputs. Checked against a brute-force
lstsq with an intercept column on the very tokens the callback counted (padding excluded), against refit and mean
alone, through a stock reload, and its refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, PruneSchedule, prune_, save_pruned
from hf_weightprune.prune.compensate import mean_shift, refit_columns, refit_mean
from hf_weightprune.testing import tiny_llama
from tests.helpers import REPO, training_args
from tests.test_architectures import build

TEXT = (REPO / "data" / "kjv" / "train.txt").read_bytes()


class _Padded(torch.utils.data.Dataset):
    """KJV byte windows of 32 (ids modulo `vocab`) whose last `i % 8` positions are padding (masked out, no loss)."""

    def __init__(self, n: int = 256, seq: int = 32, vocab: int = 128):
        self.ids = torch.tensor(list(TEXT[: n * seq]), dtype=torch.long).view(n, seq) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids, mask = self.ids[i].clone(), torch.ones(self.ids.shape[1], dtype=torch.long)
        if i % 8:
            ids[-(i % 8):], mask[-(i % 8):] = 0, 0
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class _Inputs:
    """Every real-token input row of each layer's `down_proj` and `o_proj` in training forwards (float64)."""

    def __init__(self, model):
        self.rows: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._mask = None
        model.register_forward_pre_hook(lambda m, a, kw: setattr(self, "_mask", kw.get("attention_mask")),
                                        with_kwargs=True)
        for i, layer in enumerate(model.model.layers):
            for axis, consumer in (("neurons", layer.mlp.down_proj), ("heads", layer.self_attn.o_proj)):
                consumer.register_forward_pre_hook(self._hook((axis, i)))

    def _hook(self, key):
        def hook(module, args):
            if module.training:
                x = args[0].detach().double()
                self.rows.setdefault(key, []).append(x[self._mask.bool()] if self._mask is not None else
                                                     x.reshape(-1, x.shape[-1]))
        return hook

    def x(self, axis: str, layer: int) -> torch.Tensor:
        return torch.cat(self.rows[(axis, layer)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama trained 40 steps on padded KJV windows with `sparsegpt` Hessians and unit statistics, and every
    input its consumers saw: `(model, importance, inputs)`."""
    model = tiny_llama(seed=1, intermediate_size=128)
    inputs = _Inputs(model)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", units=True))
    args = training_args(tmp_path_factory.mktemp("run"), max_steps=40, per_device_train_batch_size=16,
                         learning_rate=1e-2, seed=1, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=_Padded(), callbacks=[cb]).train()
    return model.eval(), cb.importance(), inputs


def _pruned(model, imp, compensate, structure="neurons"):
    pruned = copy.deepcopy(model)
    report = prune_(pruned, imp, PruneConfig(structure=structure, sparsity=0.5, compensate=compensate),
                    progress=False)
    return pruned, report.structured


def _consumers(model, axis):
    return [layer.mlp.down_proj if axis == "neurons" else layer.self_attn.o_proj for layer in model.model.layers]


def _keep(model, report, axis, layer) -> torch.Tensor:
    """The consumer's input columns that stay: a KV group's query heads are consecutive `o_proj` columns."""
    removed = report["axes"][axis]["removed"][layer]
    cfg = model.config
    width = 1 if axis == "neurons" else cfg.num_attention_heads // cfg.num_key_value_heads * cfg.head_dim
    in_f = cfg.intermediate_size if axis == "neurons" else cfg.num_attention_heads * cfg.head_dim
    gone = {u * width + c for u in removed for c in range(width)}
    return torch.tensor(sorted(set(range(in_f)) - gone))


@pytest.mark.parametrize("axis", ["neurons", "heads"])
def test_equals_brute_force_lstsq_with_an_intercept_on_the_counted_tokens(trained, axis):
    model, imp, inputs = trained
    pruned, report = _pruned(model, imp, "refit,mean", axis)
    assert report["compensation"] == "refit,mean"
    for i, (dense, new) in enumerate(zip(_consumers(model, axis), _consumers(pruned, axis))):
        x = inputs.x(axis, i)
        name = f"model.layers.{i}.{'mlp.down_proj' if axis == 'neurons' else 'self_attn.o_proj'}.weight"
        assert x.shape[0] == imp.meta["tokens"][name] < 16 * 40 * 32  # the real tokens only, as counted
        keep = _keep(model, report, axis, i)
        w = dense.weight.detach().double()
        n = x.shape[0]
        # The damping refit_columns applies (0.01 of the centred covariance's mean diagonal, a ridge towards W_K),
        # written as extra rows of the lstsq: min ||X_K V^T + 1 b^T - X W^T||^2 + n lam ||V - W_K||^2.
        lam = 0.01 * torch.cov(x.T, correction=0).diagonal().mean()
        design = torch.cat([x[:, keep], torch.ones(n, 1, dtype=x.dtype)], 1)
        ridge = torch.cat([(n * lam).sqrt() * torch.eye(len(keep), dtype=x.dtype),
                           torch.zeros(len(keep), 1, dtype=x.dtype)], 1)
        target = torch.cat([x @ w.T, (n * lam).sqrt() * w[:, keep].T])
        sol = torch.linalg.lstsq(torch.cat([design, ridge]), target).solution.T
        torch.testing.assert_close(new.weight.detach().double(), sol[:, :-1], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(new.bias.detach().double(), sol[:, -1], rtol=1e-3, atol=1e-4)
        assert sol[:, -1].abs().max() > 1e-3  # a real intercept


def _error(model, pruned, inputs, axis, report, with_bias):
    """Sum over the counted tokens and layers of `||W x - W' x_K - b'||^2` (`b' = 0` without a bias)."""
    total = 0.0
    for i, (dense, new) in enumerate(zip(_consumers(model, axis), _consumers(pruned, axis))):
        x = inputs.x(axis, i)
        keep = _keep(model, report, axis, i)
        out = x[:, keep] @ new.weight.detach().double().T + (new.bias.detach().double() if with_bias else 0)
        total += float((out - x @ dense.weight.detach().double().T).square().sum())
    return total


def test_output_error_on_the_counted_tokens_is_at_most_refit_or_mean_alone(trained):
    model, imp, inputs = trained
    errors = {}
    for comp in ("refit", "mean", "refit,mean", None):
        pruned, report = _pruned(model, imp, comp)
        errors[comp] = _error(model, pruned, inputs, "neurons", report, with_bias=comp in ("mean", "refit,mean"))
    assert errors["refit,mean"] <= errors["refit"] and errors["refit,mean"] <= errors["mean"], errors
    assert errors["refit,mean"] < 0.9 * errors[None], errors


def test_undamped_is_the_exact_lstsq_with_an_intercept_and_minimises_a_superset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 20, generator=g, dtype=torch.float64)
    x = x + 2.0  # a mean the bias must absorb
    w = torch.randn(6, 20, generator=g, dtype=torch.float64)
    keep = torch.arange(0, 20, 3)
    new, shift = refit_mean(w, x.T @ x, x.mean(0), x.shape[0], keep, damp=0.0)
    design = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=x.dtype)], 1)
    brute = torch.linalg.lstsq(design, x @ w.T).solution.T
    torch.testing.assert_close(new, brute[:, :-1], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(shift, brute[:, -1], rtol=1e-8, atol=1e-8)

    def err(v, b):
        return float((x[:, keep] @ v.T + b - x @ w.T).square().sum())

    refit = refit_columns(w, x.T @ x, keep, damp=0.0)
    both = err(new, shift)
    assert both < err(refit, 0) and both < err(w[:, keep], mean_shift(w, x.mean(0), keep))
    # Refitting on the uncentred Hessian and then moving the mean error into the bias is not the joint optimum.
    assert both < err(refit, mean_shift(w, x.mean(0), keep, kept_weight=refit))


@pytest.mark.parametrize("structure", ["neurons", "heads", ("layers", "heads", "neurons")])
def test_checkpoint_reloads_in_stock_transformers(trained, structure, tmp_path):
    model, imp, _ = trained
    pruned = copy.deepcopy(model)
    budget = dict(target_params=0.7) if isinstance(structure, tuple) else dict(sparsity=0.5)
    report = prune_(pruned, imp, PruneConfig(structure=structure, compensate=["mean", "refit"], **budget),
                    progress=False)
    assert report.structured["compensation"] == "refit,mean"
    save_pruned(pruned, tmp_path, report=report)
    sparsity = json.loads((tmp_path / "sparsity.json").read_text())
    assert sparsity["structured"]["compensation"] == "refit,mean"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, pruned(input_ids=x).logits)
    for cache in (True, False):
        out = reloaded.generate(x[:1], min_new_tokens=4, max_new_tokens=4, do_sample=False, use_cache=cache,
                                pad_token_id=0)
        assert out.shape == (1, 14)
    card = (tmp_path / "README.md").read_text()
    assert "least squares with an intercept" in card and "arXiv:2412.18110" in card and "arXiv:2312.11983" in card


def _assert_refused(model, imp, config, match):
    before, cfg = copy.deepcopy(model.state_dict()), model.config.to_dict()
    with pytest.raises(ValueError, match=match) as e:
        prune_(model, imp, config, progress=False)
    assert "\n" not in str(e.value)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.config.to_dict() == cfg


@pytest.mark.parametrize("arch, structure, match", [
    ("mistral", "neurons", "compensate='refit,mean' needs a bias on down_proj, and MistralForCausalLM has no config"),
    ("qwen2", "heads", "compensate='refit,mean' needs a bias on o_proj, and Qwen2ForCausalLM"),
    ("phi3", "neurons", "compensate='refit,mean' needs a bias on down_proj, and Phi3ForCausalLM"),
    ("llama", "layers", "compensate='refit,mean' moves the mean output .* structure 'layers' removes neither"),
])
def test_refused_where_no_bias_can_be_created(arch, structure, match, tmp_path):
    model = build(arch)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", units=True))
    Trainer(model=model, args=training_args(tmp_path, max_steps=2, per_device_train_batch_size=4, save_strategy="no"),
            train_dataset=_Padded(16, vocab=64), callbacks=[cb]).train()
    _assert_refused(model.eval(), cb.importance(), PruneConfig(structure=structure, sparsity=0.5,
                                                               compensate="refit,mean"), match)


def test_refused_without_the_hessians_or_the_means(trained, tmp_path):
    model, _, _ = trained
    for criterion, units, match in (
        ("wanda", True, r"compensate='refit,mean' needs input Hessians: .*criterion='sparsegpt'"),
        ("sparsegpt", False, r"compensate='refit,mean' needs the mean input .* ImportanceConfig\(units=True\)"),
    ):
        m = copy.deepcopy(model)
        cb = ImportanceCallback(ImportanceConfig(criterion=criterion, units=units))
        Trainer(model=m, args=training_args(tmp_path / criterion, max_steps=2, per_device_train_batch_size=4,
                                            save_strategy="no"), train_dataset=_Padded(16), callbacks=[cb]).train()
        _assert_refused(m.eval(), cb.importance(), PruneConfig(structure="neurons", sparsity=0.5,
                                                               compensate="refit,mean"), match)


def test_refused_when_the_hessian_and_the_means_count_different_tokens(tmp_path):
    # The pruned stream restarts the Hessians at every mask change; the unit statistics keep every step.
    model = tiny_llama(seed=1)
    schedule = PruneSchedule(final_sparsity=0.3, start=1, end=2, every_n_steps=1, pruned_stream=True)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", units=True), schedule=schedule)
    Trainer(model=model, args=training_args(tmp_path, max_steps=4, per_device_train_batch_size=16, seed=1,
                                            save_strategy="no"), train_dataset=_Padded(64), callbacks=[cb]).train()
    imp = cb.importance()
    name = "model.layers.0.mlp.down_proj.weight"
    assert imp.meta["tokens"][name] < int(imp.unit_state()["layers.0.neurons.tokens"])
    _assert_refused(model.eval(), imp, PruneConfig(structure="neurons", sparsity=0.5, compensate="refit,mean"),
                    rf"the Hessian of {name} counts [\d,]+ tokens and its mean input [\d,]+; both must be gathered "
                    "over the same tokens")
    # Either alone reads one statistic and is not refused for it.
    prune_(copy.deepcopy(model), imp, PruneConfig(structure="neurons", sparsity=0.5, compensate="refit"),
           progress=False)


def test_refused_with_step_weighted_hessians(tmp_path):
    model = tiny_llama(seed=1)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", units=True, weighting="step"))
    Trainer(model=model, args=training_args(tmp_path, max_steps=2, per_device_train_batch_size=16,
                                            save_strategy="no"), train_dataset=_Padded(32), callbacks=[cb]).train()
    _assert_refused(model.eval(), cb.importance(),
                    PruneConfig(structure="neurons", sparsity=0.5, compensate="refit,mean"),
                    r"ImportanceConfig\(weighting='step'\) weighs the Hessian's steps")


@pytest.mark.parametrize("spelling", ["refit,mean", "mean,refit", " refit , mean", ("refit", "mean"), ["mean", "refit"]])
def test_one_canonical_spelling(spelling):
    config = PruneConfig(structure="neurons", sparsity=0.5, compensate=spelling)
    assert config.compensate == "refit,mean"
    assert PruneConfig.from_dict(config.to_dict()).compensate == "refit,mean"
    with pytest.raises(ValueError, match="compensate must be one of"):
        PruneConfig(structure="neurons", sparsity=0.5, compensate="refit,refit")
