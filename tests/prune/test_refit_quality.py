"""`compensate="refit"` where the Hessian is well determined (a tiny Llama trained on KJV bytes, Hessians over
~77k tokens for 128 inputs): it lowers each layer's held-out output error and the held-out loss against no
compensation; and the damped update keeps the weights the Hessian says nothing about."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_weightprune import PruneConfig, prune_
from hf_weightprune.prune.compensate import refit_columns
from tests.prune.test_mean_compensation import HELD_OUT, _loss, train_kjv_llama


@pytest.fixture(scope="module")
def kjv_sparsegpt(tmp_path_factory):
    """Unit statistics and sparsegpt Hessians of a trained tiny Llama."""
    return train_kjv_llama(tmp_path_factory.mktemp("kjv"), "sparsegpt")


def _down_inputs(model) -> dict[int, torch.Tensor]:
    """Every layer's down_proj input on the held-out windows, `[tokens, intermediate]`."""
    seen, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, args, i=i: seen.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).detach())))
    with torch.no_grad():
        model(input_ids=HELD_OUT)
    for h in hooks:
        h.remove()
    return seen


def test_refit_lowers_held_out_layer_error_and_loss(kjv_sparsegpt):
    dense, imp = kjv_sparsegpt
    assert min(imp.meta["tokens"].values()) >= 100 * 128  # a well-determined Hessian
    inputs = _down_inputs(dense)
    losses, errors = {}, {}
    for comp in (None, "refit"):
        model = copy.deepcopy(dense)
        report = prune_(model, imp, PruneConfig(structure="neurons", sparsity=0.5, compensate=comp), progress=False)
        losses[comp] = _loss(model)
        errors[comp] = []
        for i, removed in report.structured["removed"].items():
            keep = sorted(set(range(128)) - set(removed))
            x, w = inputs[i], dense.model.layers[i].mlp.down_proj.weight.detach()
            out = x[:, keep] @ model.model.layers[i].mlp.down_proj.weight.detach().T
            errors[comp].append(float((out - x @ w.T).square().sum()))
    # Every layer's output on held-out tokens is closer to the dense layer's, and so is the model's loss.
    assert all(r < 0.7 * n for r, n in zip(errors["refit"], errors[None])), errors
    dense_loss = _loss(dense)
    assert losses["refit"] < losses[None]
    assert losses["refit"] - dense_loss < 0.5 * (losses[None] - dense_loss), (dense_loss, losses)


@pytest.mark.parametrize("damp", [0.0, 0.01, 1.0])
def test_weights_the_removed_columns_do_not_explain_are_kept(damp):
    # Fewer tokens than inputs (a singular Hessian) and removed columns of zero weight: nothing to compensate, so the
    # refit must return the kept columns unchanged. Damped least squares towards zero shrank them.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g, dtype=torch.float64)
    w = torch.randn(5, 16, generator=g, dtype=torch.float64)
    keep = torch.arange(0, 16, 2)
    w[:, 1::2] = 0
    h = x.T @ x
    if damp == 0.0:
        h = h + torch.eye(16, dtype=h.dtype)  # undamped needs H[K, K] invertible
    torch.testing.assert_close(refit_columns(w, h, keep, damp=damp), w[:, keep], rtol=0, atol=1e-12)
