"""Faults replayed from public bug reports (each example, with the right value, and its siblings)."""

import logging

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_weightprune import ImportanceCallback, ImportanceConfig, PruneConfig, PruneSchedule, load_importance, prune_
from hf_weightprune.matching import find_tracked_weights
from hf_weightprune.prune.oneshot import oneshot_importance
from hf_weightprune.testing import tiny_llama
from tests.helpers import Recorder, reference, train, training_args


# ------------------------------------------------------------------------------- padding is not data (14.3)
class PaddedDataset(torch.utils.data.Dataset):
    """SFT-style rows: random lengths 3..16, right-padded to 16, `attention_mask` 0 and labels -100 on padding."""

    def __init__(self, n=24, seq_len=16, vocab=128, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            length = int(torch.randint(3, seq_len + 1, (1,), generator=g))
            ids = torch.zeros(seq_len, dtype=torch.long)
            ids[:length] = torch.randint(3, vocab, (length,), generator=g)
            mask = (torch.arange(seq_len) < length).long()
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class MaskedRecorder(TrainerCallback):
    """Brute force: sums x_j^2 (float64) over the real tokens of every training forward of each tracked Linear."""

    def __init__(self, model):
        self.sums, self.tokens, self._mask = {}, {}, None
        model.register_forward_pre_hook(self._capture, with_kwargs=True)
        for t in find_tracked_weights(model):
            t.module.register_forward_hook(self._hook(t.name))

    def _capture(self, module, args, kwargs):
        self._mask = kwargs["attention_mask"].bool()

    def _hook(self, name):
        def hook(module, inputs, output):
            if module.training:
                x = inputs[0].detach()[self._mask].double()
                self.sums[name] = self.sums.get(name, 0) + (x * x).sum(0)
                self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

        return hook


def _train_padded(model, callbacks, tmp_path, steps=4):
    args = training_args(tmp_path, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                         save_strategy="no", seed=0)
    Trainer(model=model, args=args, train_dataset=PaddedDataset(), callbacks=callbacks).train()


def test_single_padded_sequence_counts_three_tokens(tmp_path):
    """[5, 6, 7] right-padded to 4: 3 tokens, and the sums hold only those 3 positions' activations."""
    model = tiny_llama(seed=30)

    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"input_ids": torch.tensor([5, 6, 7, 0]), "attention_mask": torch.tensor([1, 1, 1, 0]),
                    "labels": torch.tensor([5, 6, 7, -100])}

    rec = MaskedRecorder(model)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    args = training_args(tmp_path, max_steps=1, per_device_train_batch_size=1, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=One(), callbacks=[rec, cb]).train()
    imp = cb.importance()
    assert set(imp.meta["tokens"].values()) == {3}
    for name, expected in rec.sums.items():
        torch.testing.assert_close(imp.state(name).double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_activation_statistics_count_only_real_tokens(criterion, tmp_path):
    from hf_weightprune.scorers import SCORERS

    if criterion not in SCORERS:
        pytest.skip("sparsegpt not registered")
    model = tiny_llama(seed=31)
    rec = MaskedRecorder(model)
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
    _train_padded(model, [rec, cb], tmp_path)
    imp = cb.importance()
    real = set(rec.tokens.values())  # the real tokens of the 16 rows the Trainer drew (4 steps x 4 rows)
    assert set(imp.meta["tokens"].values()) == real and next(iter(real)) < 16 * 16
    for name, expected in rec.sums.items():
        state = imp.state(name).double()
        got = state if criterion == "wanda" else torch.diagonal(state)  # diag(sum x x^T) = sum x^2
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_oneshot_wanda_counts_only_real_tokens():
    model = tiny_llama(seed=32)
    ids = torch.randint(3, 128, (2, 8))
    short = oneshot_importance(model, "wanda", ids[:, :5])  # the real tokens only
    padded = ids.clone()
    padded[:, 5:] = 0
    # same windows, now as padded rows with an attention mask through the collector's pre-hook
    from hf_weightprune.collect.activations import ActivationCollector
    from hf_weightprune.scorers import get_scorer

    tracked = find_tracked_weights(model)
    col = ActivationCollector(model, tracked, get_scorer("wanda").statistic, training_only=False)
    col.register()
    col.active = True
    model.eval()
    with torch.no_grad():
        model(input_ids=padded, attention_mask=(torch.arange(8) < 5).long().expand(2, 8))
    sums, tokens = col.pop()
    col.remove()
    assert set(tokens.values()) == {10}
    for name in short.names:
        torch.testing.assert_close(sums[name], short.state(name), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- non-finite weights (14.4)
class PoisonWeight(TrainerCallback):
    """At step k, right after the optimizer step, one element of a weight becomes NaN; restored after our sample."""

    def __init__(self, param, k):
        self.param, self.k, self.saved = param, k, None

    def on_optimizer_step(self, args, state, control, **kw):
        if state.global_step + 1 == self.k:
            with torch.no_grad():
                self.saved = self.param[0, 0].clone()
                self.param[0, 0] = float("nan")


class Restore(TrainerCallback):
    def __init__(self, poison):
        self.poison = poison

    def on_step_end(self, args, state, control, **kw):
        if self.poison.saved is not None:
            with torch.no_grad():
                self.poison.param[0, 0] = self.poison.saved
            self.poison.saved = None


def test_nonfinite_weight_is_detected_at_the_sample(tmp_path, caplog):
    k, steps = 3, 5
    model = tiny_llama(seed=33)
    name = "model.layers.1.self_attn.o_proj.weight"
    poison = PoisonWeight(dict(model.named_parameters())[name], k)
    rec = Recorder(model)
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"))
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.collect.accumulator"):
        trainer = train(model, [poison, rec, cb, Restore(poison)], tmp_path, max_steps=steps)
    imp = cb.importance()
    assert imp.meta["skipped"] == 1 and imp.num_samples == steps - 1
    assert f"non-finite weight at step {k} ({name}); sample skipped" in caplog.text
    assert [h["importance/skipped"] for h in trainer.state.log_history if "importance/skipped" in h][-1] == 1
    ref = reference("temporal_magnitude", rec, steps=[s for s in range(1, steps + 1) if s != k])
    for n, expected in ref.items():
        torch.testing.assert_close(imp.scores[n].double(), expected, rtol=1e-5, atol=1e-7)
    saved = load_importance(tmp_path)
    assert all(bool(torch.isfinite(saved.state(n)).all()) for n in saved.names)


# ------------------------------------------------------------------ resume from the final checkpoint (14.5)
@pytest.mark.parametrize("criterion", ["temporal_magnitude", "fisher", "wanda"])
def test_resume_from_final_checkpoint_takes_no_extra_sample(criterion, tmp_path):
    full = ImportanceCallback(ImportanceConfig(criterion=criterion))
    train(tiny_llama(seed=34), [full], tmp_path / "a", max_steps=6, save_steps=6)
    again = ImportanceCallback(ImportanceConfig(criterion=criterion))
    trainer = train(tiny_llama(seed=34), [again], tmp_path / "a", max_steps=6, save_steps=6,
                    resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert trainer.state.global_step >= 6
    assert again.importance().num_samples == full.importance().num_samples == 6
    for n in full.importance().names:
        torch.testing.assert_close(again.importance().state(n), full.importance().state(n), rtol=0, atol=0)


# ----------------------------------------------------------- N:M refused on the schedule path too (14.1)
@pytest.mark.parametrize("overrides, weight, features", [
    ({"hidden_size": 30, "num_attention_heads": 3, "num_key_value_heads": 3}, "model.layers.0.self_attn.q_proj.weight",
     30),
    ({"intermediate_size": 65}, "model.layers.0.mlp.down_proj.weight", 65),
])
def test_nm_shapes_refused_before_the_first_step_on_both_paths(overrides, weight, features, tmp_path):
    expected = f"{weight}: in_features {features} is not a multiple of 4"
    schedule = PruneSchedule(structure="2:4", start=1, end=4, every_n_steps=1)
    model = tiny_llama(seed=35, **overrides)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=expected):
        train(model, [ImportanceCallback(schedule=schedule)], tmp_path, max_steps=4)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before any step
    with pytest.raises(ValueError, match=expected):
        prune_(model, oneshot_importance(model), PruneConfig(structure="2:4"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_config_only_folder_is_named_as_such_by_load_importance(tmp_path):
    """`ImportanceConfig.save_pretrained` writes `importance_config.json` with only the config: `load_importance`
    says so (and `ImportanceConfig.from_pretrained` reads it back), instead of 'format_version None'."""
    from hf_weightprune.files.safetensors_io import ImportanceFileError

    cfg = ImportanceConfig(criterion="wanda", every_n_steps=4)
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ImportanceFileError, match="holds only an ImportanceConfig"):
        load_importance(tmp_path)
    assert ImportanceConfig.from_pretrained(tmp_path) == cfg


def test_prune_schedule_save_pretrained_round_trip(tmp_path):
    schedule = PruneSchedule(start=0.1, end=0.8, every_n_steps=10, structure="2:4")
    schedule.save_pretrained(tmp_path)
    again = PruneSchedule.from_pretrained(tmp_path)
    assert again.to_dict() == schedule.to_dict() and again.prune_config.nm == (2, 4)


# ------------------------------------------------------------ the Trainer swaps the weights behind us (14.2)
class BestIsEarly(TrainerCallback):
    """Makes the Trainer consider checkpoint-2 (early in the pruning ramp) the best one, as eval loss usually does."""

    def on_save(self, args, state, control, **kwargs):
        state.best_model_checkpoint = str(args.output_dir) + "/checkpoint-2"
        state.best_metric = 0.0


def test_load_best_model_at_end_ends_with_the_final_masks_and_an_honest_report(tmp_path, caplog):
    from hf_weightprune import save_pruned
    from hf_weightprune.files.pruned_files import load_sparsity

    model = tiny_llama(seed=36)
    schedule = PruneSchedule(final_sparsity=0.5, start=2, end=6, every_n_steps=2, scope="layer")
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"), schedule=schedule)
    from hf_weightprune.testing import TokenDataset

    args = training_args(tmp_path, max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
                         save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                         load_best_model_at_end=True, metric_for_best_model="eval_loss", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=48), eval_dataset=TokenDataset(n=8, seed=1),
                      callbacks=[cb, BestIsEarly()])
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.train.callback"):
        trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert "they do not hold the final masks" in caplog.text and "load_best_model_at_end" in caplog.text
    params = dict(model.named_parameters())
    for name, mask in cb.mask_holder.masks.items():
        assert not params[name].detach()[~mask].any(), name  # the final masks hold on what the Trainer loaded
    report = cb.pruning_report(model)
    zeros = sum(int((params[n] == 0).sum()) for n in report.tensors)
    numel = sum(v["numel"] for v in report.tensors.values())
    assert report.global_sparsity == pytest.approx(zeros / numel) == pytest.approx(0.5, abs=1e-3)
    save_pruned(model, tmp_path / "pruned", report=report)
    assert load_sparsity(tmp_path / "pruned")["global_sparsity"] == pytest.approx(zeros / numel)
