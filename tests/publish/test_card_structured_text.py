"""A structured card names what ranked and what re-fitted the units that were removed, and no other axis: read on
SmolLM2-135M pruned to 80% of its MLP neurons, the card listed how KV groups, hidden channels and layers would have
been ranked, and `down_proj` / `o_proj` as re-fitted, though only neurons went and only `down_proj` changed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, prune_, save_pruned
from hf_weightprune.testing import tiny_llama
from tests.helpers import train


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    """A tiny Llama trained 6 steps with SparseGPT's Hessians and the unit statistics, saved to `dense/`."""
    root = tmp_path_factory.mktemp("structured-card")
    model = tiny_llama(seed=0)
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt", units=True))
    train(model, [cb], root / "run", max_steps=6)
    model.save_pretrained(root / "dense")
    return root, cb.importance()


def _card(root, importance, out, config: PruneConfig) -> tuple[str, str, dict]:
    """The card of `dense/` pruned with `config`: the whole text, its Method section, and what changed in the model."""
    model = AutoModelForCausalLM.from_pretrained(root / "dense")
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = prune_(model, importance, config, progress=False)
    save_pruned(model, out, report=report)
    text = " ".join((out / "README.md").read_text().split())
    changed = {n for n, p in model.named_parameters() if n in dense and p.shape == dense[n].shape
               and not torch.equal(p, dense[n])}
    return text, text.split("## Method")[1].split("## Structured pruning")[0], changed


def test_a_neuron_prune_names_the_neuron_ranking_and_down_proj_only(stats, tmp_path):
    root, importance = stats
    text, method, changed = _card(root, importance, tmp_path / "neurons",
                                  PruneConfig(structure="neurons", target_params=0.8, compensate="refit"))
    assert ("**Criterion**: `sparsegpt`: not used for the units, which are ranked by mean activation magnitude over "
            "the training tokens (Minitron: MLP neurons by `|a|`).") in method
    assert not any(other in method for other in ("KV groups", "hidden channels", "block influence", "ShortGPT"))
    assert "the consumers of the removed units (`down_proj` input columns) were re-fitted by least squares" in method
    assert "o_proj" not in method
    # what the card says was re-fitted is what changed: down_proj's kept columns (of the same shape: none here)
    assert not any("o_proj" in n for n in changed)


def test_a_kv_group_prune_names_the_group_ranking_and_o_proj_only(stats, tmp_path):
    root, importance = stats
    text, method, changed = _card(root, importance, tmp_path / "heads",
                                  PruneConfig(structure="heads", sparsity=0.5, compensate="refit"))
    assert "ranked by mean activation magnitude over the training tokens (Minitron: KV groups by their heads' " \
           "output norms)." in method
    assert not any(other in method for other in ("MLP neurons by", "hidden channels", "block influence"))
    assert "the consumers of the removed units (`o_proj` input columns) were re-fitted" in method
    assert "down_proj" not in method
    assert not any("down_proj" in n for n in changed)  # the MLPs are untouched


def test_a_depth_prune_is_ranked_by_block_influence_not_activations(stats, tmp_path):
    root, importance = stats
    _, method, _ = _card(root, importance, tmp_path / "layers", PruneConfig(structure="layers", sparsity=0.5))
    assert ("**Criterion**: `sparsegpt`: not used for the layers, which are ranked by block influence "
            "`1 - cos(input, output)` over the training tokens (ShortGPT).") in method
    assert "activation magnitude" not in method and "Minitron" not in method


@pytest.mark.parametrize(("statistic", "axes", "says"), [
    ("taylor", "neurons,heads", "ranked by first-order Taylor `|sum g * w|` over each unit's weights"),
    ("activation", "neurons", "MLP neurons by `|a|`"),
    ("activation_l2", "heads", "KV groups by the root-mean-square of their heads' outputs"),
])
def test_unit_ranking_text_per_statistic(statistic, axes, says):
    from hf_weightprune.publish.card_text import unit_ranking_text

    text = unit_ranking_text({"unit_statistic": statistic, "structure": axes})
    assert says in text
    assert unit_ranking_text({"unit_statistic": None, "structure": axes}) is None


def test_without_unit_statistics_the_card_says_the_units_sum_their_weights_scores(tmp_path):
    """A `wanda` importance without unit statistics ranks neurons and KV groups by their weights' summed scores: the
    Criterion line says so beside the formula, naming only the axes that lost units."""
    from hf_weightprune import load_importance
    from tests.helpers import train as train_

    model = tiny_llama(seed=1)
    train_(model, [ImportanceCallback(ImportanceConfig(criterion="wanda"))], tmp_path / "run", max_steps=2)
    model.save_pretrained(tmp_path / "dense")
    for structure, named, other in (("neurons", "MLP neurons over their gate and up rows", "KV groups over"),
                                    ("heads", "KV groups over their heads' q, k and v rows", "MLP neurons over")):
        text, method, _ = _card(tmp_path, load_importance(tmp_path / "run"), tmp_path / structure,
                                PruneConfig(structure=structure, sparsity=0.5))
        criterion = method.split("**Criterion**: ")[1].split("\n")[0]
        assert criterion.startswith("`wanda`: `|W_ij| * sqrt(mean_tokens x_j^2)`; the units are ranked by their "
                                    "weights' scores under it, summed per unit"), criterion
        assert named in criterion and other not in criterion
