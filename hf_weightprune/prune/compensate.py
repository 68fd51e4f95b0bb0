"""Compensation of removed input columns of a consumer Linear, from statistics of its inputs.

When structured pruning removes units that feed a Linear (MLP neurons feeding `down_proj`, heads feeding `o_proj`,
hidden channels feeding q/k/v/gate/up), the consumer's remaining columns can be refit so that its output on the
observed inputs changes as little as possible:

- **Least-squares refit** (structured OBS; SlimGPT, arXiv 2412.18110, in closed form). With `H = sum_t x_t x_t^T`
  the consumer's input Hessian (the callback's `sparsegpt` statistic is exactly this), `K` the kept and `R` the
  removed columns, the kept columns absorb what the removed ones did, as far as the kept inputs predict it:

      W_K' = W_K + W_R H[R, K] (H[K, K] + lambda I)^{-1},

  with `lambda = damp * mean(diag(H))` (SparseGPT's relative damping). Undamped this is the exact least squares
  `argmin_V sum_t ||W x_t - V x_{t,K}||^2 = W H[:, K] H[K, K]^{-1}`; damped, the ridge pulls towards the weights as
  they are (`W_K`), not towards zero: the directions the Hessian saw little of keep their weights. (Damping the
  least-squares form instead shrinks `W_K` in every weakly seen direction: on SmolLM2-135M, 20% of the decoder
  parameters removed as MLP neurons with Hessians of 1,024 tokens, that gave a held-out loss of 4.64 against 3.72
  without compensation; the form above 4.06, and 3.57 with Hessians of 8,192 tokens.)
  The refit needs more tokens than the consumer has inputs: with fewer, `H` is singular and the refit fits those
  tokens' noise ([`check_hessian`] refuses it; below [`ADVISED_TOKENS_PER_INPUT`] tokens per input it warns).
- **Mean compensation** (FLAP, arXiv 2312.11983): the average of what the removed columns contributed is moved into
  the bias, `b += W[:, R] mean(x_R)`. After a refit the same idea gives the best bias for the refit weights,
  `b += W mean(x) - W_K' mean(x_K)` (the mean of the remaining error). A consumer without a bias cannot absorb it;
  [`compensate_linear`] then reports `"no_bias"` and changes no bias.
- **Both** ([`refit_mean`], `compensate="refit,mean"`): least squares with an intercept, the kept columns and the
  bias fitted together on the same tokens. It is the refit on the centred covariance `C = H/n - mu mu^T` followed by
  the mean shift of the refit weights; its output error on those tokens is at most either alone's (it minimises over
  a superset of what each of them chooses from).

A Llama-style `down_proj` / `o_proj` usually has no bias. The checkpoint must still load in stock transformers, so
a bias is only added the way the architecture's own config creates one ([`bias_plan`]): `mlp_bias=True` (Llama,
Granite: biases on gate/up/down) or `attention_bias=True` (Llama, Qwen3, Gemma: biases on q/k/v/o). Every bias the
flag creates besides the consumer's starts at zero, so the model computes what it computed before. Where no flag
gives the consumer a bias (Mistral, Qwen2's `o_proj`, Phi-3) mean compensation is refused.

These are pure functions on tensors plus helpers that build the smaller Linear and add the biases; they never see a
Trainer.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..layouts import decoder_layers

__all__ = ["ADVISED_TOKENS_PER_INPUT", "add_biases_", "bias_plan", "check_hessian", "compensate_linear", "mean_shift",
           "refit_columns", "refit_mean"]

# The config flag under which stock transformers builds each consumer with a bias (checked by building the model).
BIAS_FLAGS = {"down_proj": "mlp_bias", "o_proj": "attention_bias"}
# Tokens per consumer input below which the refit is warned about. Measured on SmolLM2-135M (down_proj, 1,536
# inputs; 20% of the decoder parameters removed as neurons, held-out loss 3.72 without compensation): 3.90 with 2,048
# tokens, 3.70 with 4,096, 3.57 with 8,192.
ADVISED_TOKENS_PER_INPUT = 4


def _check_keep(keep: Tensor, n_in: int) -> Tensor:
    if not isinstance(keep, Tensor) or keep.dim() != 1 or keep.is_floating_point() or keep.dtype == torch.bool:
        raise ValueError(f"keep must be a 1-D integer tensor of input-column indices, got {keep!r}")
    keep = keep.long().cpu()
    if keep.numel() == 0 or bool((keep[1:] <= keep[:-1]).any()) or keep[0] < 0 or keep[-1] >= n_in:
        raise ValueError(f"keep must be non-empty, sorted, unique and in [0, {n_in}), got {keep.tolist()}")
    return keep


def refit_columns(weight: Tensor, hessian: Tensor, keep: Tensor, *, damp: float = 0.01) -> Tensor:
    """
    Least-squares refit of the kept input columns of `weight` (see the module docstring for the formula).

    Args:
        weight (`torch.Tensor`): `[out_features, in_features]` weight of the consumer Linear.
        hessian (`torch.Tensor`): `[in_features, in_features]` symmetric `sum_t x_t x_t^T` of the consumer's inputs
            (any positive multiple gives the same result).
        keep (`torch.LongTensor`): Sorted, unique indices of the input columns that stay.
        damp (`float`, *optional*, defaults to 0.01): Ridge term relative to the mean diagonal of `H`, pulling the
            kept columns towards their present values; `0` is the exact least-squares solution and needs `H[K, K]`
            to be positive definite.

    Returns:
        `torch.Tensor`: `[out_features, len(keep)]`, the refit columns, in `weight`'s dtype and device. Solved in
        float64.

    Raises:
        `ValueError`: shapes that do not match, a bad `keep`, a negative `damp`, or an `H[K, K] + lambda I` that is
        not positive definite (raise `damp`).
    """
    out_f, in_f = weight.shape
    if tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({in_f}, {in_f}) for weight {out_f}x{in_f}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    keep = _check_keep(keep, in_f).to(hessian.device)
    removed = torch.ones(in_f, dtype=torch.bool, device=hessian.device)
    removed[keep] = False
    drop = removed.nonzero().squeeze(1)
    h = hessian.double()
    h_kk = h.index_select(0, keep).index_select(1, keep)
    lam = damp * h.diagonal().mean()
    chol, info = torch.linalg.cholesky_ex(h_kk + lam * torch.eye(len(keep), dtype=h.dtype, device=h.device))
    if info.item() != 0:
        raise ValueError(f"H[kept, kept] + damp is not positive definite (damp={damp}); use a larger damp")
    w = weight.double().to(h.device)
    # delta = W_R H[R, K] H_KK^-1  <=>  H_KK delta^T = (W_R H[R, K])^T, H_KK symmetric.
    rhs = (w.index_select(1, drop) @ h.index_select(0, drop).index_select(1, keep)).T
    new = w.index_select(1, keep) + torch.cholesky_solve(rhs, chol).T
    return new.to(device=weight.device, dtype=weight.dtype)


def check_hessian(name: str, hessian: Tensor | None, in_features: int, tokens: int, *,
                  compensate: str = "refit") -> str | None:
    """
    Whether a consumer's input Hessian can refit it: checked for every consumer before a structured prune changes
    anything.

    Args:
        name (`str`): the consumer's weight name, for the messages.
        hessian (`torch.Tensor`, *optional*): its `[in, in]` Hessian, `None` when the importance does not track it.
        in_features (`int`): the consumer's inputs.
        tokens (`int`): the real tokens the Hessian was gathered over.
        compensate (`str`, *optional*, defaults to `"refit"`): the `PruneConfig.compensate` asking, for the messages.

    Returns:
        `str` or `None`: a warning when the Hessian saw fewer than `ADVISED_TOKENS_PER_INPUT` tokens per input,
        else `None`.

    Raises:
        `ValueError`: one line, naming `name` and the fix: no Hessian, one of another shape, non-finite or all-zero
        entries, or fewer tokens than inputs (a singular Hessian: the refit would fit those tokens' noise).
    """
    what = f"compensate={compensate!r}"
    if hessian is None:
        raise ValueError(f"{what} needs the input Hessian of {name}, which this importance does not track: gather "
                         "it with ImportanceConfig(criterion='sparsegpt') over that module too")
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"{what}: the Hessian of {name} has shape {tuple(hessian.shape)}, the module has "
                         f"{in_features} inputs")
    if not bool(torch.isfinite(hessian).all()) or not bool((hessian.diagonal() > 0).any()):
        raise ValueError(f"{what}: the Hessian of {name} is not finite or all zero; gather it again")
    if tokens < in_features:
        raise ValueError(f"{what}: the Hessian of {name} was gathered over {tokens:,} tokens, fewer than its "
                         f"{in_features:,} inputs, so it is singular and the refit would fit those tokens' noise; "
                         f"gather it over more tokens (at least {ADVISED_TOKENS_PER_INPUT * in_features:,} advised) "
                         "or use compensate=None")
    if tokens < ADVISED_TOKENS_PER_INPUT * in_features:
        return (f"{what}: the Hessian of {name} was gathered over {tokens:,} tokens for {in_features:,} inputs; with "
                f"fewer than {ADVISED_TOKENS_PER_INPUT} tokens per input the refit can do worse than no compensation: "
                "gather it over more tokens")
    return None


def mean_shift(weight: Tensor, mean: Tensor, keep: Tensor, *, kept_weight: Tensor | None = None) -> Tensor:
    """
    The bias change that keeps the consumer's average output: `W mean(x) - W_K' mean(x_K)`.

    With `kept_weight=None` (`W_K' = W[:, K]`) this is FLAP's `W[:, R] mean(x_R)` over the removed columns `R`.

    Args:
        weight (`torch.Tensor`): `[out_features, in_features]` original weight.
        mean (`torch.Tensor`): `[in_features]` mean of the consumer's inputs over real tokens.
        keep (`torch.LongTensor`): Sorted, unique indices of the input columns that stay.
        kept_weight (`torch.Tensor`, *optional*): `[out_features, len(keep)]` new kept columns (e.g. from
            [`refit_columns`]); defaults to `weight[:, keep]`.

    Returns:
        `torch.Tensor`: `[out_features]` in `weight`'s dtype, to add to the bias.
    """
    out_f, in_f = weight.shape
    if tuple(mean.shape) != (in_f,):
        raise ValueError(f"mean has shape {tuple(mean.shape)}, expected ({in_f},)")
    keep = _check_keep(keep, in_f).to(weight.device)
    w, mu = weight.double(), mean.double().to(weight.device)
    kept = w.index_select(1, keep) if kept_weight is None else kept_weight.double()
    if tuple(kept.shape) != (out_f, len(keep)):
        raise ValueError(f"kept_weight has shape {tuple(kept.shape)}, expected ({out_f}, {len(keep)})")
    return (w @ mu - kept @ mu.index_select(0, keep)).to(weight.dtype)


def refit_mean(weight: Tensor, hessian: Tensor, mean: Tensor, tokens: int, keep: Tensor, *,
               damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """
    Least squares with an intercept: the kept columns `V` and a bias change `b` that best reproduce `W x` over the
    tokens `H` and `mean` were gathered over.

    Derivation. Minimise `E(V, b) = sum_t ||W x_t - V x_{t,K} - b||^2`. For any `V`, `dE/db = 0` gives
    `b = W mu - V mu_K` (the mean residual). Substituted back, `E = sum_t ||W (x_t - mu) - V (x_{t,K} - mu_K)||^2`: the
    plain refit on the centred inputs, whose Hessian is `sum_t (x_t - mu)(x_t - mu)^T = H - n mu mu^T = n C` with
    `C = H/n - mu mu^T`. So `V = W_K + W_R C[R, K] C[K, K]^{-1}` ([`refit_columns`] on `C`, damped relative to
    `mean(diag(C))`: the ridge still pulls towards `W_K`), and `b = W mu - V mu_K = W_R mu_R + W_K mu_K - V mu_K`
    ([`mean_shift`] with `kept_weight=V`). `(W_K', 0)` of the refit alone and `(W_K, W_R mu_R)` of the mean alone
    are both candidates of this minimisation, so undamped its error is at most either's.

    Args:
        weight (`torch.Tensor`): `[out_features, in_features]` weight of the consumer Linear.
        hessian (`torch.Tensor`): `[in_features, in_features]` `sum_t x_t x_t^T` over `tokens` tokens (not a
            multiple of it: the centring needs the sum itself).
        mean (`torch.Tensor`): `[in_features]` mean input over exactly the same tokens.
        tokens (`int`): how many tokens `hessian` and `mean` were gathered over.
        keep (`torch.LongTensor`): Sorted, unique indices of the input columns that stay.
        damp (`float`, *optional*, defaults to 0.01): See [`refit_columns`].

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the `[out_features, len(keep)]` refit columns and the `[out_features]`
        change of the bias, in `weight`'s dtype and device.

    Raises:
        `ValueError`: shapes that do not match, `tokens < 1`, or as [`refit_columns`].
    """
    in_f = weight.shape[1]
    if tuple(mean.shape) != (in_f,):
        raise ValueError(f"mean has shape {tuple(mean.shape)}, expected ({in_f},)")
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    mu = mean.double().to(hessian.device)
    centred = hessian.double() / tokens - torch.outer(mu, mu)
    new = refit_columns(weight, centred, keep, damp=damp)
    return new, mean_shift(weight, mean.to(weight.device), keep, kept_weight=new)


@torch.no_grad()
def compensate_linear(
    linear: nn.Linear,
    keep: Tensor,
    *,
    hessian: Tensor | None = None,
    mean: Tensor | None = None,
    damp: float = 0.01,
) -> tuple[nn.Linear, dict[str, str]]:
    """
    A new Linear with only the `keep` input columns, refit and/or mean-compensated.

    Args:
        linear (`nn.Linear`): The consumer (plain `nn.Linear`; merge adapters first).
        keep (`torch.LongTensor`): Sorted, unique indices of the input columns that stay.
        hessian (`torch.Tensor`, *optional*): `sum x x^T` of the consumer's inputs; refits the kept columns.
        mean (`torch.Tensor`, *optional*): Mean input; moves the average lost output into the bias.
        damp (`float`, *optional*, defaults to 0.01): See [`refit_columns`].

    Returns:
        `tuple[nn.Linear, dict[str, str]]`: the new module (same dtype, device and `requires_grad`) and what was done:
        `{"refit": "applied" | "off", "mean": "applied" | "no_bias" | "off"}`. `"no_bias"` means the consumer has no
        bias to absorb the shift (nothing was changed for it; add a bias only where the checkpoint's config allows
        one, e.g. `mlp_bias=True` for Llama).
    """
    if type(linear) is not nn.Linear:
        raise ValueError(f"compensate_linear needs a plain nn.Linear, got {type(linear).__name__}")
    weight = linear.weight
    keep = _check_keep(keep, linear.in_features)
    new_w = weight.index_select(1, keep.to(weight.device))
    report = {"refit": "off", "mean": "off"}
    if hessian is not None:
        new_w = refit_columns(weight, hessian, keep, damp=damp)
        report["refit"] = "applied"
    bias = linear.bias
    if mean is not None:
        if bias is None:
            report["mean"] = "no_bias"
        else:
            bias = bias + mean_shift(weight, mean, keep, kept_weight=new_w).to(bias.device)
            report["mean"] = "applied"
    new = nn.Linear(len(keep), linear.out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(new_w.contiguous().clone(), requires_grad=weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().contiguous().clone(), requires_grad=linear.bias.requires_grad)
    new.train(linear.training)
    return new, report


def _consumer(layer: nn.Module, name: str) -> nn.Module:
    return (layer.mlp if name == "down_proj" else layer.self_attn).get_submodule(name)


def bias_plan(model: nn.Module, consumer: str, *, compensate: str = "mean") -> tuple[str, list[str]] | None:
    """How to give every decoder layer's `consumer` a bias that stock `from_pretrained` loads, changing nothing.

    Builds the model's class on the meta device with the config flag of [`BIAS_FLAGS`] set, and lists the Linear
    modules that then have a bias the model lacks.

    Args:
        model (`PreTrainedModel`): the causal LM about to be pruned.
        consumer (`str`): `"down_proj"` or `"o_proj"`.
        compensate (`str`, *optional*, defaults to `"mean"`): the `PruneConfig.compensate` asking, for the message.

    Returns:
        `tuple[str, list[str]]` or `None`: `(flag, names of the Linear modules that gain a bias)`, or `None` when
        every layer's `consumer` already has one.

    Raises:
        `ValueError`: one line naming the model class, where no config flag gives `consumer` a bias.
    """
    layers = decoder_layers(model)
    if all(_consumer(layer, consumer).bias is not None for layer in layers):
        return None
    cfg, flag = model.config, BIAS_FLAGS[consumer]
    found = None
    if isinstance(getattr(cfg, flag, None), bool) and not getattr(cfg, flag):
        probe_cfg = copy.deepcopy(cfg)
        setattr(probe_cfg, flag, True)
        with torch.device("meta"):
            probe = type(model)(probe_cfg)
        have = dict(model.named_modules())
        gained = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear) and m.bias is not None
                  and isinstance(have.get(n), nn.Linear) and have[n].bias is None]
        if all(_consumer(layer, consumer).bias is not None for layer in decoder_layers(probe)):
            found = (flag, gained)
    if found is None:
        raise ValueError(f"compensate={compensate!r} needs a bias on {consumer}, and {type(model).__name__} has no "
                         "config flag that creates one in a form stock transformers loads: use compensate='refit' or "
                         "None")
    return found


@torch.no_grad()
def add_biases_(model: nn.Module, plan: tuple[str, list[str]]) -> None:
    """Apply a [`bias_plan`]: set its config flag and give each listed Linear a zero bias (the outputs are unchanged).

    Args:
        model (`PreTrainedModel`): the model the plan was made for.
        plan (`tuple[str, list[str]]`): `(flag, module names)` from [`bias_plan`].
    """
    flag, names = plan
    for name in names:
        linear = model.get_submodule(name)
        w = linear.weight
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                   requires_grad=w.requires_grad)
    setattr(model.config, flag, True)
