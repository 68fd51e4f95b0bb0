from __future__ import annotations

from .base import Scorer, accumulate_, blocks, register_scorer


@register_scorer
class TemporalMagnitude(Scorer):
    """Time-weighted magnitude, arXiv 2502.17071: `imp_i = sum_t t*|w_i(t)| / sum_t t`.

    The buffer holds the running sum `sum_t t*|w_i(t)|`; the normaliser `sum_t t` is one scalar kept beside it.
    Later samples weigh more, so weights that grew important late in training are kept. `t` is the global
    step (or the epoch number with `per_epoch=True`); the result is invariant to the scale of `t`.
    """

    name = "temporal_magnitude"
    source = "weights"
    formula = "sum_t t*|w(t)| / sum_t t"
    paper = "arXiv:2502.17071"

    def update_(self, states, weights, grads, t, generator=None):
        for s, w in blocks(states, weights):
            accumulate_(s, w.abs(), float(t), generator)

    def ranking(self, state, **kwargs):
        return state if kwargs["weight_sum"] > 0 else self.score(state, **kwargs)

    def score(self, state, *, weight, num_samples, weight_sum, tokens):
        if weight_sum <= 0:  # no sample yet (e.g. the window has not opened): fall back to |w|
            if weight is None:
                raise ValueError("temporal_magnitude has no samples yet and no weight to fall back on")
            return weight.detach().float().abs()
        return state.float() / weight_sum
