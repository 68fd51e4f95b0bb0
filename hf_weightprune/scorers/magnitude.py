from __future__ import annotations

from .base import Scorer, register_scorer


@register_scorer
class Magnitude(Scorer):
    """One-shot magnitude `|w|` at the end of training (Han et al. 2015): the baseline.

    Nothing is accumulated during training; the buffer is a snapshot of `|w|` taken when importance is
    read or saved, so a saved file can be pruned without the model.
    """

    name = "magnitude"
    source = "final"
    formula = "|w|"
    paper = "Han et al. 2015, arXiv:1506.02626"

    def update_(self, states, weights, grads, t, generator=None):
        for s, w in zip(states, weights):
            s.copy_(w.detach().abs())

    def ranking(self, state, **kwargs):
        return state if kwargs["num_samples"] > 0 else self.score(state, **kwargs)

    def score(self, state, *, weight, num_samples, weight_sum, tokens):
        if num_samples == 0:
            if weight is None:
                raise ValueError("magnitude importance has no snapshot and no weight to read")
            return weight.detach().float().abs()
        return state.float()
