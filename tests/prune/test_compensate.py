"""Compensation of removed input columns (prune/compensate.py) against brute-force least squares on known inputs."""

import pytest
import torch
from torch import nn

from hf_weightprune.prune.compensate import check_hessian, compensate_linear, mean_shift, refit_columns

IN, OUT, TOKENS = 24, 10, 200
KEEP = torch.tensor([0, 2, 3, 5, 8, 9, 11, 12, 15, 17, 18, 20, 21, 23])


def data(seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs (a random mixing), so the kept columns can stand in for the removed ones.
    x = torch.randn(TOKENS, IN, generator=g, dtype=torch.float64) @ torch.randn(IN, IN, generator=g,
                                                                                 dtype=torch.float64) + offset
    w = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    return x, w


def error(w_new, x, w, bias_shift=None):
    out = x[:, KEEP] @ w_new.T + (0 if bias_shift is None else bias_shift)
    return ((out - x @ w.T) ** 2).sum().item()


def test_refit_equals_brute_force_lstsq_and_beats_plain_removal():
    x, w = data()
    h = x.T @ x
    refit = refit_columns(w, h, KEEP, damp=0.0)
    brute = torch.linalg.lstsq(x[:, KEEP], x @ w.T).solution.T  # argmin_V ||X_K V^T - X W^T||
    torch.testing.assert_close(refit, brute, rtol=1e-8, atol=1e-8)
    plain = w[:, KEEP]
    assert error(refit, x, w) < 0.9 * error(plain, x, w)
    # Damping trades a little error for stability; still better than removing the columns outright.
    assert error(refit, x, w) <= error(refit_columns(w, h, KEEP, damp=0.01), x, w) < error(plain, x, w)


def test_hessian_scale_does_not_matter():
    x, w = data(1)
    h = x.T @ x
    torch.testing.assert_close(refit_columns(w, h, KEEP), refit_columns(w, h / TOKENS, KEEP))


def test_mean_shift_is_flap_and_zeroes_the_mean_error():
    x, w = data(2, offset=3.0)
    mu = x.mean(dim=0)
    removed = sorted(set(range(IN)) - set(KEEP.tolist()))
    shift = mean_shift(w, mu, KEEP)
    torch.testing.assert_close(shift, w[:, removed] @ mu[removed])
    plain = w[:, KEEP]
    mean_err = (x[:, KEEP] @ plain.T + shift - x @ w.T).mean(dim=0)
    torch.testing.assert_close(mean_err, torch.zeros(OUT, dtype=torch.float64), rtol=0, atol=1e-9)
    assert error(plain, x, w, shift) < error(plain, x, w)
    # After a refit the best bias is the mean of the refit's residual, which can only lower the error further.
    refit = refit_columns(w, x.T @ x, KEEP, damp=0.0)
    assert error(refit, x, w, mean_shift(w, mu, KEEP, kept_weight=refit)) <= error(refit, x, w) + 1e-9


@pytest.mark.parametrize("bias", [True, False])
def test_compensate_linear_builds_the_smaller_module(bias):
    x, w = data(3, offset=1.0)
    linear = nn.Linear(IN, OUT, bias=bias).double()
    with torch.no_grad():
        linear.weight.copy_(w)
    new, report = compensate_linear(linear, KEEP, hessian=x.T @ x, mean=x.mean(dim=0), damp=0.0)
    assert new.in_features == len(KEEP) and new.weight.shape == (OUT, len(KEEP))  # removed columns stay removed
    assert report == {"refit": "applied", "mean": "applied" if bias else "no_bias"}
    with torch.no_grad():
        got, want = new(x[:, KEEP]), linear(x)
        plain = x[:, KEEP] @ w[:, KEEP].T + (linear.bias if bias else 0)
    assert ((got - want) ** 2).sum() < ((plain - want) ** 2).sum()
    if not bias:
        assert new.bias is None
    only_slice, report = compensate_linear(linear, KEEP)
    assert report == {"refit": "off", "mean": "off"}
    torch.testing.assert_close(only_slice.weight, w[:, KEEP])


def test_bad_inputs_are_refused():
    x, w = data()
    h = x.T @ x
    singular = torch.zeros(IN, IN, dtype=torch.float64)
    for call, match in (
        (lambda: refit_columns(w, singular, KEEP, damp=0.0), "not positive definite"),
        (lambda: refit_columns(w, h[:-1], KEEP), "hessian has shape"),
        (lambda: refit_columns(w, h, KEEP.flip(0)), "sorted, unique"),
        (lambda: refit_columns(w, h, torch.tensor([], dtype=torch.long)), "non-empty"),
        (lambda: refit_columns(w, h, KEEP, damp=-1.0), "damp must be >= 0"),
        (lambda: mean_shift(w, torch.zeros(IN + 1), KEEP), "mean has shape"),
    ):
        with pytest.raises(ValueError, match=match):
            call()


def test_check_hessian_refuses_what_cannot_refit_and_warns_on_few_tokens():
    x, _ = data()
    h = x.T @ x  # 200 tokens for 24 inputs: 8 per input, no warning
    assert check_hessian("m.weight", h, IN, TOKENS) is None
    nan = h.clone()
    nan[0, 0] = float("nan")
    for args, match in (
        ((None, IN, TOKENS), r"needs the input Hessian of m\.weight, which this importance does not track"),
        ((h[:-1], IN, TOKENS), r"the Hessian of m\.weight has shape \(23, 24\), the module has 24 inputs"),
        ((nan, IN, TOKENS), "not finite or all zero"),
        ((torch.zeros(IN, IN), IN, TOKENS), "not finite or all zero"),
        ((h, IN, IN - 1), r"over 23 tokens, fewer than its 24 inputs, so it is singular.*at least 96 advised"),
    ):
        with pytest.raises(ValueError, match=match) as e:
            check_hessian("m.weight", *args)
        assert "\n" not in str(e.value)
    warning = check_hessian("m.weight", h, IN, 4 * IN - 1)
    assert "over 95 tokens for 24 inputs" in warning and "fewer than 4 tokens per input" in warning
    assert check_hessian("m.weight", h, IN, 4 * IN) is None
