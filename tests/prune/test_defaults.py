"""Safe defaults (issue 15): the default criterion and scope, refusing layer collapse, the importance summary logged
while training, lazy binding of a loaded importance to its checkpoint's weights, and honest card comparisons."""

import json
import math
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import Trainer

from hf_weightprune import (
    ImportanceCallback,
    ImportanceConfig,
    PruneConfig,
    PruneSchedule,
    load_importance,
    prune_,
    save_pruned,
)
from hf_weightprune.scorers import SCORERS, Scorer, default_scope, register_scorer
from hf_weightprune.testing import TokenDataset, tiny_llama
from tests.helpers import train, training_args

O_PROJ = "model.layers.0.self_attn.o_proj.weight"


# ------------------------------------------------------------------------------------------------ defaults
def test_defaults_are_wanda_and_resolve_scope_per_criterion():
    assert ImportanceConfig().criterion == "wanda"
    assert ImportanceConfig(criterion="temporal_magnitude").criterion == "temporal_magnitude"
    cfg = PruneConfig()
    assert cfg.scope is None and cfg.allow_collapse is False
    assert cfg.resolve_scope("wanda") == "row" and cfg.resolve_scope("magnitude") == "layer"
    assert PruneConfig(scope="global").resolve_scope("wanda") == "global"
    assert PruneConfig(structure="neurons").scope == "layer" and PruneConfig(structure="2:4").scope == "layer"
    # Every registered criterion has a deliberate default (declared by its scorer), never the global threshold.
    assert {c: default_scope(c) for c in SCORERS} == {
        "wanda": "row", "taylor": "row", "fisher": "row", "magnitude": "layer", "temporal_magnitude": "layer",
        "movement": "layer", "sparsegpt": "layer"}
    assert default_scope(None) == "layer" and default_scope("not_registered") == "layer"
    with pytest.raises(ValueError, match="default_scope must be 'row' or 'layer'"):
        register_scorer(type("GlobalByDefault", (Scorer,), {"name": "test_global_default", "default_scope": "global"}))
    assert "test_global_default" not in SCORERS
    with pytest.raises(ValueError, match="allow_collapse must be a bool"):
        PruneConfig(allow_collapse="yes")


# --------------------------------------------------------------------------------------------- collapse
def _readme_schedule(scope=None, allow_collapse=False):
    # The README's "prune while fine-tuning" example.
    return PruneSchedule(final_sparsity=0.6, start=0.1, end=0.8, every_n_steps=10, ramp="cubic",
                         structure="unstructured", scope=scope, allow_collapse=allow_collapse)


def _lora_llama():
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def test_readme_schedule_on_lora_collapses_no_tensor(tmp_path):
    schedule = _readme_schedule()
    cb = ImportanceCallback(schedule=schedule)  # the default criterion, wanda, as in the README
    train(_lora_llama(), [cb], tmp_path, max_steps=30)
    masks = cb.mask_holder.masks
    assert len(masks) == 14
    for name, mask in masks.items():
        # Row scope (wanda's default): every row keeps the same count, 13 of 32 (26 of 64 for down_proj) at 60%.
        assert (mask.sum(dim=1) == mask.shape[1] - round(0.6 * mask.shape[1])).all(), name
    assert cb.mask_holder.sparsity == pytest.approx(19 / 32)
    assert cb.pruning_report(cb.trainer.model).scope == "row"


def test_schedule_refuses_global_collapse_at_the_update_naming_the_tensor(tmp_path):
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"), schedule=_readme_schedule(scope="global"))
    with pytest.raises(ValueError, match=r"^model\.layers\.\d\.\S+\.weight would be pruned to 100% \(layer collapse\)"
                       ) as err:
        train(_lora_llama(), [cb], tmp_path, max_steps=30)
    assert "\n" not in str(err.value) and "allow_collapse=True" in str(err.value)

    allowed = _readme_schedule(scope="global", allow_collapse=True)
    holder = (cb := ImportanceCallback(schedule=allowed)).mask_holder
    train(_lora_llama(), [cb], tmp_path / "allowed", max_steps=30)
    assert any(not bool(m.any()) for m in holder.masks.values())  # some tensor is pruned whole, as asked


@pytest.fixture(scope="module")
def magnitude_importance(tmp_path_factory):
    """A trained `magnitude` importance of a tiny Llama whose first o_proj is 1000x smaller than the rest."""
    model = tiny_llama(seed=3)
    with torch.no_grad():
        model.get_parameter(O_PROJ).mul_(1e-3)
    cb = ImportanceCallback(ImportanceConfig(criterion="magnitude"))
    train(model, [cb], tmp_path_factory.mktemp("mag"), max_steps=2, lr=1e-4)
    return model, cb.importance()


def test_one_shot_global_collapse_is_refused_before_any_change(magnitude_importance):
    model, imp = magnitude_importance
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as err:
        prune_(model, imp, PruneConfig(sparsity=0.5, scope="global"), progress=False)
    message = str(err.value)
    assert message.startswith(f"{O_PROJ} would be pruned to 100% (layer collapse) by scope='global' at sparsity 0.5")
    assert "scope='layer'" in message and "\n" not in message
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing was touched

    # The default scope for magnitude is per layer: exactly half of every tensor, o_proj included.
    pruned = prune_(model, imp, PruneConfig(sparsity=0.5), progress=False)
    assert pruned.scope == "layer"
    assert all(v["sparsity"] == 0.5 for v in pruned.tensors.values())


def test_allow_collapse_lets_a_global_threshold_prune_a_tensor_whole(magnitude_importance):
    model, imp = magnitude_importance
    model = tiny_llama(seed=3)
    with torch.no_grad():
        model.get_parameter(O_PROJ).mul_(1e-3)
    report = prune_(model, imp, PruneConfig(sparsity=0.5, scope="global", allow_collapse=True), progress=False)
    assert report.tensors[O_PROJ]["sparsity"] == 1.0
    assert not bool(model.get_parameter(O_PROJ).any())
    assert report.global_sparsity == pytest.approx(0.5, abs=1e-4)


def test_row_and_layer_scopes_refuse_a_sparsity_that_empties_every_row(magnitude_importance):
    _, imp = magnitude_importance
    # k_proj is [16, 32]: a row of 32 rounds 0.99 * 32 = 31.68 up to 32 pruned weights.
    with pytest.raises(ValueError, match=r"would be pruned to 100% .* by scope='row' at sparsity 0.99"):
        prune_(tiny_llama(seed=3), imp, PruneConfig(sparsity=0.99, scope="row"), progress=False)


# ---------------------------------------------------------------------------------------------- logging
def _brute_force_summary(imp, target=0.5):
    if imp.criterion == "sparsegpt":  # logged: wanda's |W_ij| * ||x_j|| from diag(H) (no Cholesky per log step)
        scores = {
            n: (imp.weights[n].float().abs() * (imp.state(n).diagonal().float() / imp.meta["tokens"][n]).sqrt())
            .reshape(-1).double() for n in imp.names}
    else:
        scores = {n: imp.scores[n].reshape(-1).double() for n in imp.names}
    pooled = torch.cat(list(scores.values()))
    threshold = pooled.sort().values[math.ceil(target * pooled.numel()) - 1]
    expected = {}
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        joined = torch.cat([s for n, s in scores.items() if n.endswith(f".{kind}.weight")])
        expected[f"importance/{kind}/mean"] = float(joined.mean())
        expected[f"importance/{kind}/frac_below"] = float((joined < threshold).double().mean())
    return expected


@pytest.mark.parametrize("criterion", ["wanda", "temporal_magnitude", "taylor", "sparsegpt"])
def test_logged_importance_summary_equals_brute_force(criterion, tmp_path):
    model = tiny_llama(seed=5)
    args = training_args(tmp_path, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=4,
                         save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=16))
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion)).attach(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "importance/samples" in h]
    assert len(logged) == 1 and logged[0]["step"] == 4 and logged[0]["importance/samples"] == 4
    entry = {k: v for k, v in logged[0].items() if k not in ("step", "epoch")}
    assert len(entry) == 16  # samples, skipped and 2 per module type: a handful of scalars
    expected = _brute_force_summary(cb.importance())
    for key, value in expected.items():
        assert entry[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key


def test_logged_summary_follows_the_schedule_target(tmp_path):
    model = tiny_llama(seed=5)
    schedule = PruneSchedule(final_sparsity=0.3, start=1, end=2, every_n_steps=1, scope="layer")
    args = training_args(tmp_path, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=4,
                         save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=16))
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"), schedule=schedule).attach(trainer)
    trainer.train()
    entry = [h for h in trainer.state.log_history if "importance/samples" in h][-1]
    assert entry["pruning/target_sparsity"] == pytest.approx(0.3)
    assert entry["pruning/sparsity"] == pytest.approx(0.3, abs=1e-3)  # each tensor rounds its own count
    expected = _brute_force_summary(cb.importance(), target=0.3)
    for key, value in expected.items():
        assert entry[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key


# ----------------------------------------------------------------------------------------- lazy binding
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_loaded_importance_binds_lazily_to_its_checkpoint(criterion, tmp_path):
    model = tiny_llama(seed=7)
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
    trainer = train(model, [cb], tmp_path / "out", max_steps=4, save_steps=2)
    trainer.save_model()  # output_dir/model.safetensors beside output_dir/importance
    name = "model.layers.1.mlp.down_proj.weight"
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert torch.equal(load_importance(tmp_path / "out").scores[name], cb.importance().scores[name])

    # checkpoint-2 holds other weights than the final model: the lazy binding must read that checkpoint's.
    ckpt_model = type(model).from_pretrained(ckpt)
    expected = load_importance(ckpt, model=ckpt_model).scores[name]
    lazy = load_importance(ckpt)
    assert lazy.criterion == criterion and lazy.weights is not None
    assert torch.equal(lazy.scores[name], expected)
    assert not torch.equal(expected, load_importance(ckpt, model=model).scores[name])  # not the final weights
    # bind() takes precedence over the lazy binding.
    assert torch.equal(load_importance(ckpt).bind(model).scores[name], load_importance(ckpt, model=model).scores[name])

    # Elsewhere (the importance folder on its own) the clear error stays.
    shutil.copytree(ckpt / "importance", tmp_path / "alone")
    with pytest.raises(ValueError, match=r"call `importance.bind\(model\)`"):
        load_importance(tmp_path / "alone").scores[name]
    # Beside weights of another model: a one-line error naming the weight, at the first score.
    other = tmp_path / "other"
    tiny_llama(seed=0, intermediate_size=48).save_pretrained(other)
    shutil.copytree(ckpt / "importance", other / "importance")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight in .* has shape \[48, 32\]"):
        load_importance(other).scores[name]


# ------------------------------------------------------------------------------------------------ cards
def _pruned_checkpoint(tmp_path, eval_results):
    model = tiny_llama(seed=9)
    cb = ImportanceCallback(ImportanceConfig(criterion="magnitude"))
    train(model, [cb], tmp_path / "train", max_steps=1)
    report = prune_(model, cb.importance(), PruneConfig(sparsity=0.5), progress=False)
    out = tmp_path / "pruned"
    save_pruned(model, out, report=report, eval_results=eval_results, overwrite=True)
    return (out / "README.md").read_text(), json.loads((out / "sparsity.json").read_text())


def test_card_compares_only_losses_of_the_same_evaluation(tmp_path):
    same = {"dense_loss": 3.0, "pruned_loss": 3.5, "dataset": "kjv", "tokens": 4096, "step": 200}
    card, meta = _pruned_checkpoint(tmp_path, same)
    assert meta["eval"] == same
    assert "Evaluated on `kjv`, 4,096 tokens: dense model at step 200 vs pruned model at step 200" in card
    assert "| Dense (step 200) | 3.0000 | 20.09 |" in card and "| Pruned (this model) | 3.5000 | 33.12 |" in card
    # The model-index lists this model's own results only: the dense loss is another model's.
    index = ModelCard(card).data.eval_results
    assert [(r.metric_type, r.metric_value) for r in index] == [("loss", 3.5), ("perplexity", pytest.approx(33.115, abs=1e-3))]
    assert "dense_loss" not in card

    # The example's old mistake: the dense model evaluated at step 60 (pruning start), the pruned one at step 200.
    card, _ = _pruned_checkpoint(tmp_path, {**same, "dense_step": 60})
    assert "| Dense" not in card and "dense_loss" not in card
    assert "| Pruned (this model) | 3.5000 | 33.12 |" in card
    assert "not measured by the same evaluation (step 60 (dense) vs 200 (pruned))" in card

    # A comparison that does not state its evaluation is dropped too.
    card, _ = _pruned_checkpoint(tmp_path, {"dense_loss": 3.0, "pruned_loss": 3.5, "dataset": "kjv"})
    assert "| Dense" not in card and "does not state its tokens" in card
    card, _ = _pruned_checkpoint(tmp_path, {"dense_loss": 3.0, "pruned_loss": 3.5, "dataset": "kjv", "tokens": 4096,
                                            "pruned_step": 200})
    assert "| Dense" not in card and "step None (dense) vs 200 (pruned)" in card
