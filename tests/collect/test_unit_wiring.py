"""`ImportanceConfig(units=True)`: unit statistics gathered by the callback through a real Trainer (padding, gradient
accumulation), equal to a brute force over the real tokens, written with every checkpoint and exact on resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_weightprune import ImportanceCallback, ImportanceConfig, load_importance
from hf_weightprune.collect.units import unit_scores
from hf_weightprune.files.unit_files import UNITS_NAME
from tests.helpers import training_args

from .test_units import _model, assert_statistic_close, brute_force, taylor_by_hand

SEQ = 10


class PaddedDataset(torch.utils.data.Dataset):
    """Right-padded token windows of varying length (labels -100 on padding)."""

    def __init__(self, n: int = 24, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 128, (n, SEQ), generator=g)
        self.lengths = torch.randint(4, SEQ + 1, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        mask = (torch.arange(SEQ) < self.lengths[i]).long()
        ids = self.ids[i].masked_fill(mask == 0, 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class UnitRecorder(TrainerCallback):
    """Every training forward's batch and the weights it ran with; the by-hand Taylor of each optimizer step."""

    def __init__(self, model):
        self.forwards, self.taylor = [], []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
            self.forwards.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone(), weights))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.taylor.append({k: v.abs() for k, v in taylor_by_hand(model).items()})


def _train(out, *, max_steps, save_steps=None, resume=False, recorder=False, seed=3):
    model = _model("llama", seed=seed)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda", units=True))
    callbacks = [cb] + ([UnitRecorder(model)] if recorder else [])
    args = training_args(out, max_steps=max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         learning_rate=1e-3, seed=0, save_strategy="steps" if save_steps else "no",
                         save_steps=save_steps or 500)
    trainer = Trainer(model=model, args=args, train_dataset=PaddedDataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume or None)
    return cb, callbacks[-1], model


def _expected(recorder) -> dict[str, torch.Tensor]:
    ref = _model("llama")
    out: dict[str, torch.Tensor] = {}
    for ids, mask, weights in recorder.forwards:
        ref.load_state_dict(weights)
        for k, v in brute_force(ref, [(ids, mask)]).items():
            out[k] = out.get(k, 0) + v
    for step in recorder.taylor:
        for k, v in step.items():
            out[k] = out.get(k, 0) + v
    return out


def test_unit_statistics_through_trainer_equal_brute_force(tmp_path):
    cb, rec, _ = _train(tmp_path / "run", max_steps=3, recorder=True)
    imp = cb.importance()
    assert imp.has_units
    state = imp.unit_state()
    assert len(rec.forwards) == 6 and len(rec.taylor) == 3  # 3 steps x 2 micro-batches
    expected = _expected(rec)
    assert int(state["taylor.steps"]) == 3
    real = sum(int(m.sum()) for _, m, _ in rec.forwards)
    assert real < 6 * 2 * SEQ and int(state["layers.0.tokens"]) == real  # padding is not counted
    assert {"layers.0.neurons.sum", "layers.1.heads.sum"} <= expected.keys()  # FLAP's signed input sums too
    for key, want in expected.items():
        assert_statistic_close(key, state[key], want)
    # what prune_ ranks by, read back from output_dir/importance
    loaded = load_importance(tmp_path / "run" / "importance")
    for statistic in ("activation", "activation_l2", "taylor"):
        a, b = loaded.unit_scores(statistic), unit_scores(state, statistic)
        assert torch.equal(a["layers"], b["layers"]) and torch.equal(a["hidden"], b["hidden"])
        assert all(torch.equal(a["neurons"][i], b["neurons"][i]) for i in b["neurons"])


def test_unit_statistics_resume_exactly(tmp_path):
    _train(tmp_path / "whole", max_steps=6)
    _train(tmp_path / "cut", max_steps=6, save_steps=3)
    assert (tmp_path / "cut" / "checkpoint-3" / "importance" / UNITS_NAME).is_file()
    # resume from checkpoint-3 as if the run had stopped there
    shutil.rmtree(tmp_path / "cut" / "checkpoint-6")
    shutil.rmtree(tmp_path / "cut" / "importance")
    _train(tmp_path / "cut", max_steps=6, save_steps=3, resume=True)
    a = load_importance(tmp_path / "whole" / "importance").unit_state()
    b = load_importance(tmp_path / "cut" / "importance").unit_state()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=0, msg=key)
    assert int(b["taylor.steps"]) == 6


def test_no_units_says_how_to_gather_them(tmp_path):
    from hf_weightprune.testing import tiny_llama
    from tests.helpers import train

    model = tiny_llama()
    cb = ImportanceCallback(ImportanceConfig())
    train(model, [cb], tmp_path, max_steps=1)
    assert not cb.importance().has_units
    with pytest.raises(ValueError, match=r"ImportanceConfig\(units=True\)"):
        cb.importance().unit_scores()
