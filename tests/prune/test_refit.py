"""Re-fit of kept weights on a fixed support and the asymmetric (dense-to-pruned) objective: pure math, no Trainer."""

import pytest
import torch

from hf_weightprune.prune.masks import row_mask
from hf_weightprune.prune.obs import sparsegpt_prune_
from hf_weightprune.prune.refit import asymmetric_sparsegpt_prune_, propagate_target, refit_masked_


def _inputs(tokens, cols, g, mix):
    scale = torch.logspace(-1, 1, cols)
    return (torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mix) * scale


def _problem(out=12, cols=24, tokens=400, seed=0):
    """A dense weight, correlated dense inputs X, and the 'pruned stream' X~ = X + a token-wise perturbation."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g, dtype=torch.float64)
    mix = torch.eye(cols, dtype=torch.float64) + 0.6 * torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    X = _inputs(tokens, cols, g, mix)
    Xt = X + 0.3 * torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mix
    mask = row_mask(torch.rand(out, cols, generator=g), 0.5)
    return W, X, Xt, mask, mix, g


def _brute(W, mask, X_in, X_target):
    """Row by row: argmin ||X_target w_ref - X_in[:, S] w_S|| by lstsq (float64), zero off S."""
    out = torch.zeros_like(W)
    for i in range(W.shape[0]):
        S = mask[i].nonzero().squeeze(1)
        out[i, S] = torch.linalg.lstsq(X_in[:, S], X_target @ W[i]).solution
    return out


def test_refit_equals_lstsq_keeps_zeros_and_beats_masking_on_held_out_inputs():
    W, X, _, mask, mix, g = _problem()
    fitted = W.clone()
    refit_masked_(fitted, mask, X.T @ X, percdamp=0.0, row_chunk=5)  # chunks of 5 rows: a ragged last chunk
    torch.testing.assert_close(fitted, _brute(W, mask, X, X), rtol=1e-3, atol=1e-4)
    assert bool((fitted[~mask] == 0).all()) and not bool(torch.signbit(fitted[~mask]).any())
    held_out = _inputs(2000, W.shape[1], g, mix)
    err_masked = (held_out @ (W * mask).T - held_out @ W.T).square().sum()
    err_refit = (held_out @ fitted.T - held_out @ W.T).square().sum()
    assert err_refit < 0.8 * err_masked


def test_refit_of_a_reference_on_the_support_is_a_no_op_and_reference_is_the_target():
    W, X, _, mask, _, _ = _problem(seed=1)
    masked = (W * mask).float()
    before = masked.clone()
    refit_masked_(masked, mask, (X.T @ X).float(), percdamp=0.01)  # the ridge pulls towards the reference itself
    torch.testing.assert_close(masked, before, rtol=1e-4, atol=1e-5)
    # A separate reference: the already-masked weight is re-fitted towards the dense one.
    refit_masked_(masked, mask, X.T @ X, reference=W, percdamp=0.0)
    torch.testing.assert_close(masked.double(), _brute(W, mask, X, X), rtol=1e-4, atol=1e-4)


def test_refit_bfloat16_weight_and_dead_inputs():
    W, X, _, mask, _, _ = _problem(seed=2)
    X[:, 3] = 0.0
    w = W.to(torch.bfloat16)
    refit_masked_(w, mask, X.T @ X)
    assert w.dtype == torch.bfloat16
    assert bool((w[~mask] == 0).all()) and bool((w[:, 3] == 0).all())


def test_asymmetric_refit_equals_lstsq_of_dense_outputs_from_pruned_inputs():
    W, X, Xt, mask, _, _ = _problem(seed=3)
    H, C = Xt.T @ Xt, (X - Xt).T @ Xt
    fitted = W.clone()
    refit_masked_(fitted, mask, H, cross=C, alpha=1.0, percdamp=0.0)
    torch.testing.assert_close(fitted, _brute(W, mask, Xt, X), rtol=1e-3, atol=1e-4)
    # alpha=0 is the symmetric objective on H~ alone.
    sym = W.clone()
    refit_masked_(sym, mask, H, cross=C, alpha=0.0, percdamp=0.0)
    torch.testing.assert_close(sym, _brute(W, mask, Xt, Xt), rtol=1e-3, atol=1e-4)
    # The asymmetric fit reproduces the dense outputs better than the symmetric one does (what it is for).
    dense = X @ W.T
    assert (Xt @ fitted.T - dense).square().sum() < (Xt @ sym.T - dense).square().sum()


def test_asymmetric_with_equal_streams_equals_plain():
    W, X, _, mask, _, _ = _problem(seed=4)
    H, C = (X.T @ X).float(), torch.zeros(W.shape[1], W.shape[1])
    W = W.float()
    torch.testing.assert_close(propagate_target(W, H, C, alpha=0.5), W)
    a, b = W.clone(), W.clone()
    refit_masked_(a, mask, H)
    refit_masked_(b, mask, H, cross=C, alpha=0.5)
    torch.testing.assert_close(a, b)
    a, b = W.clone(), W.clone()
    keep_a = sparsegpt_prune_(a, H, sparsity=0.5, blocksize=8)
    keep_b = asymmetric_sparsegpt_prune_(b, H, C, alpha=0.5, sparsity=0.5, blocksize=8)
    assert torch.equal(keep_a, keep_b)
    torch.testing.assert_close(a, b)


def test_propagated_target_turns_the_asymmetric_objective_into_the_symmetric_one():
    W, X, Xt, _, _, _ = _problem(seed=5)
    H, C = Xt.T @ Xt, (X - Xt).T @ Xt
    R = propagate_target(W, H, C, alpha=1.0, percdamp=0.0).double()
    # Stationarity of the asymmetric objective at any W_hat: grad_sym(R') == grad_asym(R) for all W_hat.
    W_hat = torch.randn_like(W)
    torch.testing.assert_close((W_hat @ Xt.T - R @ Xt.T) @ Xt, (W_hat @ Xt.T - W @ X.T) @ Xt, rtol=1e-4, atol=1e-3)
    # An OBS sweep from the propagated target loses less dense output than one from the raw weights on H~.
    asym, sym = W.float().clone(), W.float().clone()
    asymmetric_sparsegpt_prune_(asym, H.float(), C.float(), alpha=1.0, sparsity=0.5, blocksize=8)
    sparsegpt_prune_(sym, H.float(), sparsity=0.5, blocksize=8)
    dense = X @ W.T
    assert (Xt @ asym.double().T - dense).square().sum() < (Xt @ sym.double().T - dense).square().sum()


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 1.5}, "alpha"),
    ({"percdamp": -1.0}, "percdamp"),
    ({"reference": torch.zeros(3, 3)}, "reference"),
    ({"cross": torch.zeros(3, 3)}, "cross"),
])
def test_refit_refusals_leave_the_weight_untouched(kwargs, match):
    W, X, _, mask, _, _ = _problem(seed=6)
    W = W.float()
    before = W.clone()
    with pytest.raises(ValueError, match=match):
        refit_masked_(W, mask, (X.T @ X).float(), **kwargs)
    with pytest.raises(ValueError, match="mask"):
        refit_masked_(W, mask.float(), (X.T @ X).float())
    assert torch.equal(W, before)


def _ragged_mask(out, cols, g):
    """Layer-scope keep-mask: every row its own count, one row fully pruned and one fully kept."""
    mask = torch.rand(out, cols, generator=g) < torch.linspace(0.1, 0.9, out)[:, None]
    mask[0] = False
    mask[-1] = True
    return mask


@pytest.mark.parametrize("row_chunk", [None, 1, 3])
def test_exact_refit_on_ragged_supports_equals_lstsq(row_chunk):
    W, X, _, _, _, g = _problem(out=10, cols=16, seed=7)
    mask = _ragged_mask(10, 16, g)
    fitted = W.clone()
    refit_masked_(fitted, mask, X.T @ X, percdamp=0.0, row_chunk=row_chunk, solver="exact")
    torch.testing.assert_close(fitted, _brute(W, mask, X, X), rtol=1e-3, atol=1e-4)
    assert bool((fitted[0] == 0).all()) and bool((fitted[~mask] == 0).all())


def test_sweep_refit_keeps_zeros_and_pruning_the_first_input_only_is_exact():
    W, X, _, _, mix, g = _problem(seed=8)
    first = torch.ones_like(W, dtype=torch.bool)
    first[:, 0] = False  # every other kept input comes after it: the OBS update is then the least-squares one
    swept = W.clone()
    refit_masked_(swept, first, X.T @ X, percdamp=0.0, solver="sweep")
    torch.testing.assert_close(swept, _brute(W, first, X, X), rtol=1e-3, atol=1e-4)

    mask = _ragged_mask(*W.shape, g)
    swept, exact = W.clone(), W.clone()
    refit_masked_(swept, mask, X.T @ X, solver="sweep")
    refit_masked_(exact, mask, X.T @ X, solver="exact")
    assert bool((swept[~mask] == 0).all()) and not bool(torch.signbit(swept[~mask]).any())
    held_out = _inputs(2000, W.shape[1], g, mix)
    err = {name: (held_out @ (w - W).T).square().sum() for name, w in
           [("masked", W * mask), ("sweep", swept), ("exact", exact)]}
    assert err["exact"] < err["sweep"] < err["masked"]


def test_auto_solver_sweeps_above_the_flop_budget(monkeypatch):
    import hf_weightprune.prune.refit as refit

    W, X, Xt, mask, _, _ = _problem(seed=9)
    H, C = Xt.T @ Xt, (X - Xt).T @ Xt
    results = {}
    for solver in ("auto", "sweep", "exact"):
        results[solver] = W.clone()
        monkeypatch.setattr(refit, "_EXACT_FLOPS", 0.0)
        refit_masked_(results[solver], mask, H, cross=C, alpha=0.5, solver=solver)
    assert torch.equal(results["auto"], results["sweep"]) and not torch.equal(results["auto"], results["exact"])
    # The sweep with the cross term sweeps the propagated target, as `asymmetric_sparsegpt_prune_` does.
    target = propagate_target(W, H, C, alpha=0.5)
    plain = target.double()
    refit_masked_(plain, mask, H, solver="sweep")
    torch.testing.assert_close(results["sweep"], plain, rtol=1e-5, atol=1e-6)


def test_fixed_mask_sweep_refusals():
    W, X, _, mask, _, _ = _problem(seed=10)
    W = W.float()
    with pytest.raises(ValueError, match="without `sparsity`"):
        sparsegpt_prune_(W.clone(), (X.T @ X).float(), sparsity=0.5, mask=mask)
    with pytest.raises(ValueError, match="`mask` must be a bool"):
        sparsegpt_prune_(W.clone(), (X.T @ X).float(), mask=mask.float())
    with pytest.raises(ValueError, match="solver"):
        refit_masked_(W, mask, (X.T @ X).float(), solver="cg")
    with pytest.raises(ValueError, match="row_chunk"):
        refit_masked_(W, mask, (X.T @ X).float(), row_chunk=0)
