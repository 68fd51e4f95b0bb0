"""SparseGPT's OBS sweep and the sparsegpt scorer: pure math, no Trainer."""

import pytest
import torch

from hf_weightprune.prune.masks import row_mask
from hf_weightprune.prune.obs import obs_saliency, sparsegpt_prune_
from hf_weightprune.scorers import get_scorer
from hf_weightprune.scorers.sparsegpt import hessian_sum
from hf_weightprune.scorers.wanda import activation_sq_sum
from hf_weightprune.testing import layer_reconstruction_error


def _layer(out=16, cols=32, tokens=256, seed=0, dead=()):
    """A weight and the Hessian of correlated inputs `X = Z A` with channel scales spread over 2 decades."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g)
    mix = torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / cols**0.5
    scale = torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    X = (torch.randn(tokens, cols, generator=g) @ mix) * scale
    X[:, list(dead)] = 0.0
    return W, X, X.T @ X


def _lowest(scores, k):
    keep = torch.ones(scores.shape, dtype=torch.bool)
    if k:
        keep.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], False)
    return keep


def reference_sparsegpt(W, H, *, sparsity=None, nm=None, scope="row", blocksize=128, percdamp=0.01):
    """The algorithm written plainly in float64: explicit inverses of the remaining columns' Hessian, one OBS update
    per column applied at once to every later column (no Cholesky factor, no lazy batches)."""
    W, H = W.double().clone(), H.double().clone()
    if isinstance(nm, str):
        nm = tuple(int(v) for v in nm.split(":"))
    rows, cols = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)

    def hinv_jj(j):  # OBS: [H_F^-1]_jj with F = the columns j.. still free
        return torch.linalg.inv(H[j:, j:])[0, 0]

    keep = torch.ones(rows, cols, dtype=torch.bool)
    total = round(sparsity * (cols if scope == "row" else rows * cols)) if sparsity is not None else 0
    for i in range(cols):
        if sparsity is not None and i % blocksize == 0:
            j = min(i + blocksize, cols)
            k = total * j // cols - total * i // cols
            scores = W[:, i:j] ** 2 / torch.stack([hinv_jj(c) for c in range(i, j)])
            if scope == "row":
                keep[:, i:j] = _lowest(scores, k)
            else:
                keep[:, i:j] = _lowest(scores.reshape(1, -1), k).view(rows, j - i)
        if nm is not None and i % nm[1] == 0:
            scores = W[:, i : i + nm[1]] ** 2 / torch.stack([hinv_jj(c) for c in range(i, i + nm[1])])
            keep[:, i : i + nm[1]] = _lowest(scores, nm[1] - nm[0])
        Hinv = torch.linalg.inv(H[i:, i:])
        err = W[:, i] * ~keep[:, i] / Hinv[0, 0]
        W[:, i:] -= err[:, None] * Hinv[0][None, :]
        W[:, i][~keep[:, i]] = 0.0
    return W, keep


CASES = [
    dict(sparsity=0.5, scope="row"),
    dict(sparsity=0.5, scope="layer"),
    dict(sparsity=0.3, scope="row", blocksize=8),  # blocks smaller than `in`: the lazy updates run
    dict(sparsity=0.7, scope="layer", blocksize=8),
    dict(sparsity=0.45, scope="row", blocksize=12),  # a last block narrower than the others
    dict(nm=(2, 4)),
    dict(nm="2:4", blocksize=8),
    dict(nm=(1, 4), blocksize=12),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_plain_float64_reference(case):
    W, _, H = _layer()
    ref_w, ref_keep = reference_sparsegpt(W, H, **case)
    w = W.clone()
    keep = sparsegpt_prune_(w, H, **case)
    assert keep.dtype == torch.bool and keep.shape == W.shape
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(w, ref_w.float(), rtol=1e-4, atol=1e-5)
    assert torch.equal(w == 0, ~keep)  # pruned exactly zero, the kept ones are not (random weights)
    assert not torch.signbit(w[~keep]).any()  # +0.0, not -0.0


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_validity(n, m):
    W, _, H = _layer(out=8, cols=64, seed=1)
    keep = sparsegpt_prune_(W, H, nm=(n, m), blocksize=16)
    assert torch.equal(keep.view(8, -1, m).sum(-1), torch.full((8, 64 // m), n))
    assert torch.equal((W != 0).view(8, -1, m).sum(-1), torch.full((8, 64 // m), n))


@pytest.mark.parametrize("seed", [0, 1])
def test_error_sparsegpt_below_wanda_below_magnitude(seed):
    # Inputs like an LLM's: a few shared directions (rank 8) plus noise, channel scales over one decade.
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(32, 64, generator=g)
    scale = torch.logspace(-0.5, 0.5, 64)[torch.randperm(64, generator=g)]
    X = (torch.randn(2048, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.3 * torch.randn(2048, 64, generator=g))
    X = X * scale
    H = X.T @ X
    norms = X.norm(dim=0)
    masks = {
        "magnitude": row_mask(W.abs(), 0.5),
        "wanda": row_mask(W.abs() * norms[None, :], 0.5),  # Wanda's score |W_ij| * ||x_j||, per output row
    }
    errors = {name: ((X @ (W * ~mask).T) ** 2).sum().item() for name, mask in masks.items()}
    w = W.clone()
    keep = sparsegpt_prune_(w, H, sparsity=0.5, scope="row")
    errors["sparsegpt"] = ((X @ (W - w).T) ** 2).sum().item()  # ||W X - W_hat X||_F^2 on the real inputs
    assert keep.sum(1).eq(32).all() and all(m.sum(1).eq(32).all() for m in masks.values())
    assert errors["wanda"] < 0.8 * errors["magnitude"]
    assert errors["sparsegpt"] < 0.5 * errors["wanda"]
    # The helper computes the same objective from H alone.
    assert layer_reconstruction_error(W, w, H) == pytest.approx(errors["sparsegpt"], rel=1e-4)


@pytest.mark.parametrize("scope", ["row", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.93])
def test_exact_counts(scope, sparsity):
    W, _, H = _layer(out=7, cols=40, seed=3)
    keep = sparsegpt_prune_(W, H, sparsity=sparsity, scope=scope, blocksize=16)
    if scope == "row":
        assert torch.equal((~keep).sum(1), torch.full((7,), round(sparsity * 40)))
    else:
        assert int((~keep).sum()) == round(sparsity * 7 * 40)
    assert int((W == 0).sum()) == int((~keep).sum())


def test_dead_inputs():
    dead = (0, 5, 17, 31)
    W, _, H = _layer(seed=4, dead=dead)
    assert torch.equal(H.diagonal()[list(dead)], torch.zeros(4))
    ref_w, ref_keep = reference_sparsegpt(W, H, sparsity=0.25, blocksize=8)
    keep = sparsegpt_prune_(W, H, sparsity=0.25, blocksize=8)
    assert torch.isfinite(W).all()
    assert torch.equal(W[:, list(dead)], torch.zeros(16, 4))
    assert not keep[:, list(dead)].any()  # a dead input scores 0, so it is pruned first
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(W, ref_w.float(), rtol=1e-4, atol=1e-5)


def test_bfloat16_weight_is_computed_in_float32():
    W, _, H = _layer(seed=5)
    w16 = W.to(torch.bfloat16)
    w32 = w16.float()
    keep32 = sparsegpt_prune_(w32, H, sparsity=0.5, blocksize=8)
    keep16 = sparsegpt_prune_(w16, H, sparsity=0.5, blocksize=8)
    assert w16.dtype == torch.bfloat16
    assert torch.equal(keep16, keep32)
    assert torch.equal(w16, w32.to(torch.bfloat16))  # one rounding at the end, not a bf16 sweep
    assert torch.equal(w16 == 0, ~keep16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    W, _, H = _layer(out=64, cols=256, seed=6)
    w = W.clone()
    keep = sparsegpt_prune_(w, H, sparsity=0.5, blocksize=64)
    wc = W.cuda()
    keep_c = sparsegpt_prune_(wc, H.cuda(), sparsity=0.5, blocksize=64)
    assert keep_c.is_cuda and wc.is_cuda
    assert torch.equal(keep_c.cpu(), keep)
    torch.testing.assert_close(wc.cpu(), w, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one of `sparsity`"),
        (dict(sparsity=0.5, nm="2:4"), "exactly one of `sparsity`"),
        (dict(sparsity=1.0), "`sparsity` must be"),
        (dict(sparsity=0.5, scope="global"), "`scope` must be"),
        (dict(nm="2:4", blocksize=6), "multiple of m=4"),
        (dict(nm="2:5"), "divisible by m=5"),
        (dict(nm=(2,)), "`nm` must be"),
        (dict(sparsity=0.5, blocksize=0), "`blocksize`"),
        (dict(sparsity=0.5, percdamp=-1), "`percdamp`"),
    ],
)
def test_bad_arguments_refused_before_any_work(kwargs, match):
    W, _, H = _layer()
    before = W.clone()
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune_(W, H, **kwargs)
    assert torch.equal(W, before)


def test_bad_hessians_refused():
    W, _, H = _layer()
    with pytest.raises(ValueError, match=r"\[32, 32\]"):
        sparsegpt_prune_(W, H[:8, :8], sparsity=0.5)
    with pytest.raises(ValueError, match="no tokens"):
        sparsegpt_prune_(W, torch.zeros(32, 32), sparsity=0.5)
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt_prune_(W, H.clone().fill_diagonal_(float("nan")), sparsity=0.5)
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_prune_(W, -H, sparsity=0.5, percdamp=0.0)


# --------------------------------------------------------------------------------------------------------------------
# The scorer: Hessian accumulation and the per-weight score
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hessian_sum_over_real_tokens(dtype, monkeypatch):
    import hf_weightprune.scorers.sparsegpt as sg

    monkeypatch.setattr(sg, "_BLOCK", 5 * 24)  # several row blocks through the reused buffer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 24, generator=g).to(dtype)
    mask = torch.rand(3, 7, generator=g) > 0.3
    real = x.double()[mask]
    expected = real.T @ real
    got = hessian_sum(x, mask)
    assert got.dtype == torch.float32 and got.shape == (24, 24)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hessian_sum(x).double(), x.double().reshape(-1, 24).T @ x.double().reshape(-1, 24),
                               rtol=1e-5, atol=1e-5)
    # diag(H) is wanda's state.
    torch.testing.assert_close(got.diagonal(), activation_sq_sum(x[mask]), rtol=1e-5, atol=1e-5)


def test_hessian_sum_refuses_a_misshaped_mask():
    with pytest.raises(ValueError, match="`token_mask` must be a bool tensor shaped"):
        hessian_sum(torch.randn(2, 5, 8), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="`token_mask`"):
        hessian_sum(torch.randn(2, 5, 8), torch.ones(2, 5))


def test_scorer_accumulates_and_scores():
    scorer = get_scorer("sparsegpt")
    assert scorer.source == "activations" and scorer.paper == "arXiv:2301.00774"
    W, X, _ = _layer(seed=7)
    assert scorer.state_shape(W) == (32, 32)
    state = torch.zeros(32, 32)
    for step in X.split(64):  # four steps of 64 tokens
        scorer.update_([state], [hessian_sum(step)], None, t=0)
    H = X.double().T @ X.double()
    torch.testing.assert_close(state.double(), H, rtol=1e-5, atol=1e-3)

    score = scorer.score(state, weight=W, tokens=256)
    # Reference: w^2 / [((H/T + damp I)_{j:, j:})^-1]_jj in float64.
    Hn = H / 256
    Hn += 0.01 * Hn.diagonal().mean() * torch.eye(32, dtype=torch.float64)
    d2 = torch.stack([torch.linalg.inv(Hn[j:, j:])[0, 0] for j in range(32)])
    torch.testing.assert_close(score.double(), W.double() ** 2 / d2[None, :], rtol=1e-4, atol=1e-6)
    # Its row ranking is the sweep's first-block choice when one block covers the layer.
    keep = sparsegpt_prune_(W.clone(), state, sparsity=0.5, scope="row", blocksize=32)
    assert torch.equal(keep, row_mask(score, 0.5))
    torch.testing.assert_close(obs_saliency(W, state * 3.0), obs_saliency(W, state) * 3.0)

    wanda = scorer.wanda_score(state, weight=W, tokens=256)
    torch.testing.assert_close(wanda, W.abs() * (X.square().sum(0) / 256).sqrt()[None, :], rtol=1e-5, atol=1e-6)


def test_scorer_errors():
    scorer = get_scorer("sparsegpt")
    state = torch.eye(4)
    with pytest.raises(ValueError, match="call `importance.bind\\(model\\)`"):
        scorer.score(state, weight=None, tokens=10)
    with pytest.raises(ValueError, match="no training tokens"):
        scorer.score(state, weight=torch.ones(2, 4), tokens=0)
