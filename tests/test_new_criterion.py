"""A new criterion is one file: a toy scorer registered here, in this file only, trains, prunes and reports.

The toy is what a newcomer would add as `scorers/toy_l1.py`: Wanda with the mean absolute input instead of the root
mean square, `|W_ij| * mean_t |x_j|`. Nothing outside the class tells the package about it: the default scope, the
input norms OWL reads, the logged summary and `inspect`'s raw label all come from the scorer.
"""

import pytest
import torch

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, prune_
from hf_weightprune.collect.summary import layer_stats
from hf_weightprune.prune.masks import row_mask
from hf_weightprune.scorers import SCORERS, Scorer, default_scope, register_scorer
from hf_weightprune.testing import tiny_llama

from .helpers import train


class ToyL1(Scorer):
    """`|W_ij| * mean_t |x_j|`: the state is the per-input-channel sum of `|x|` over real tokens."""

    name = "toy_l1"
    source = "activations"
    formula = "|W_ij| * mean_t |x_j|"
    default_scope = "row"
    raw_label = "activation sum of |x|"

    def state_shape(self, weight):
        return torch.Size([weight.shape[-1]])

    def statistic(self, x, token_mask):
        x = x if token_mask is None else x[token_mask]
        return x.detach().float().abs().reshape(-1, x.shape[-1]).sum(0)

    def update_(self, states, weights, grads, t, generator=None):
        torch._foreach_add_(list(states), list(weights))  # one step's sums, collected by the forward hooks

    def input_norms(self, state, *, tokens, num_samples=0, weight_sum=0.0):
        if tokens <= 0:
            raise ValueError("toy_l1 importance has seen no training tokens yet")
        return state.float() / tokens

    def score(self, state, *, weight, num_samples, weight_sum, tokens):
        if weight is None:
            raise ValueError("toy_l1 scores need the weights: call `importance.bind(model)`")
        norms = self.input_norms(state, tokens=tokens)
        return weight.detach().float().abs() * norms.to(weight.device)[None, :]


@pytest.fixture
def toy_criterion():
    register_scorer(ToyL1)
    yield ToyL1.name
    del SCORERS[ToyL1.name]


@pytest.fixture
def trained(toy_criterion, tmp_path):
    model = tiny_llama(seed=11)
    cb = ImportanceCallback(ImportanceConfig(criterion=toy_criterion))
    trainer = train(model, [cb], tmp_path, max_steps=3)
    return model, cb, trainer


def test_a_registered_criterion_prunes_with_its_own_default_scope(trained):
    model, cb, _ = trained
    imp = cb.importance()
    assert default_scope("toy_l1") == "row" and PruneConfig().resolve_scope("toy_l1") == "row"
    name = "model.layers.1.mlp.down_proj.weight"
    weight = dict(model.named_parameters())[name].detach().clone()
    tokens = imp.meta["tokens"][name]
    assert tokens > 0
    expected = row_mask(weight.abs() * (imp.state(name) / tokens)[None, :], 0.5)

    report = prune_(model, imp, PruneConfig(sparsity=0.5), progress=False)

    assert report.criterion == "toy_l1" and report.scope == "row" and report.reconstruction is None
    assert set(report.tensors) == set(imp.names) and report.global_sparsity == pytest.approx(0.5)
    pruned = dict(model.named_parameters())[name].detach()
    assert torch.equal(pruned != 0, expected)  # the toy's own scores, per row
    assert all(int((row == 0).sum()) == row.numel() // 2 for row in pruned)


def test_a_registered_criterion_feeds_owl_the_log_and_inspect(trained):
    model, cb, trainer = trained
    logged = [h for h in trainer.state.log_history if "importance/down_proj/mean" in h]
    assert logged and all(0 <= h["importance/down_proj/frac_below"] <= 1 for h in logged)

    imp = cb.importance()
    norms = imp.input_norms("model.layers.0.self_attn.q_proj.weight")
    torch.testing.assert_close(norms, imp.state("model.layers.0.self_attn.q_proj.weight") /
                               imp.meta["tokens"]["model.layers.0.self_attn.q_proj.weight"])
    report = prune_(model, imp, PruneConfig(sparsity=0.6, allocation="owl"), progress=False)
    assert report.allocation == "owl" and report.scope == "row"
    assert len({round(v["sparsity"], 3) for v in report.tensors.values()}) > 1  # per-layer targets, from outliers

    imp.bind(model)
    unbound = type(imp)(imp.config, imp.meta, imp.shapes, imp.state)  # no weights: the raw statistics
    raw = layer_stats(unbound)
    assert [row["name"] for row in raw] == imp.names
    assert raw[0]["mean"] == pytest.approx(float(imp.state(imp.names[0]).float().mean()), rel=1e-6)
    assert unbound.scorer.raw_label == "activation sum of |x|"


def test_registering_a_name_twice_is_refused(toy_criterion):
    with pytest.raises(ValueError, match="already registered"):
        register_scorer(ToyL1)
    assert SCORERS[toy_criterion] is ToyL1
