import os

import pytest
import torch

from hf_weightprune import ImportanceCallback, ImportanceConfig, load_importance
from hf_weightprune.testing import tiny_llama, tiny_phi3
from tests.helpers import Recorder, reference, train, training_args

CRITERIA = ["temporal_magnitude", "magnitude", "movement", "taylor", "fisher", "wanda"]
# float32 accumulation against a float64 reference over a few steps.
RTOL, ATOL = 1e-5, 1e-7


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_matches_bruteforce_reference(arch, criterion, tmp_path):
    model = (tiny_llama if arch == "llama" else tiny_phi3)(seed=1)
    rec = Recorder(model, record_acts=criterion == "wanda")
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
    train(model, [rec, cb], tmp_path, max_steps=5)
    ref = reference(criterion, rec)
    imp = cb.importance()
    assert imp.names == list(ref)
    for name, expected in ref.items():
        torch.testing.assert_close(imp.scores[name].double(), expected, rtol=RTOL, atol=ATOL, msg=name)
    # the file written at the end of training gives the same scores
    loaded = load_importance(tmp_path, model=model)
    for name in ref:
        torch.testing.assert_close(loaded.scores[name], imp.scores[name], rtol=0, atol=0)
    if arch == "phi3":
        assert "model.layers.0.self_attn.qkv_proj.weight" in ref
        assert "model.layers.0.mlp.gate_up_proj.weight" in ref


def test_every_n_steps_and_window(tmp_path):
    model = tiny_llama(seed=2)
    rec = Recorder(model)
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", every_n_steps=2, window=3))
    train(model, [rec, cb], tmp_path, max_steps=11)
    # samples at 2,4,...,10; the window keeps the last three: 6, 8, 10.
    assert cb.importance().num_samples == 3
    ref = reference("temporal_magnitude", rec, steps=[6, 8, 10])
    for name, expected in ref.items():
        torch.testing.assert_close(cb.importance().scores[name].double(), expected, rtol=RTOL, atol=ATOL)


def test_window_gradient_criterion(tmp_path):
    model = tiny_llama(seed=2)
    rec = Recorder(model)
    cb = ImportanceCallback(ImportanceConfig(criterion="fisher", window=2))
    train(model, [rec, cb], tmp_path, max_steps=5)
    ref = reference("fisher", rec, steps=[4, 5])
    for name, expected in ref.items():
        torch.testing.assert_close(cb.importance().scores[name].double(), expected, rtol=RTOL, atol=ATOL)


def test_per_epoch_sampling(tmp_path):
    model = tiny_llama(seed=3)
    rec = Recorder(model)
    cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", per_epoch=True))
    # 16 samples / batch 4 = 4 steps per epoch, 3 epochs: samples after steps 4, 8, 12 with t = 1, 2, 3
    train(model, [rec, cb], tmp_path, max_steps=-1, num_train_epochs=3, n=16)
    imp = cb.importance()
    assert imp.num_samples == 3
    for t in rec.tracked:
        expected = sum(e * rec.post[4 * e - 1][t.name].abs() for e in (1, 2, 3)) / 6
        torch.testing.assert_close(imp.scores[t.name].double(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("criterion", ["movement", "taylor", "fisher", "wanda"])
def test_gradient_accumulation_equals_large_batch(criterion, tmp_path):
    results = []
    for batch, ga in [(4, 1), (2, 2)]:
        model = tiny_llama(seed=4)
        cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
        train(model, [cb], tmp_path / f"b{batch}", max_steps=3, batch=batch, ga=ga)
        results.append(cb.importance())
    if criterion == "wanda":  # scores multiply |W|: compare the activation statistics on the same weights
        for imp in results:
            imp.bind(model)
    for name in results[0].names:
        # same samples, same mean loss; only the float summation order differs
        torch.testing.assert_close(results[1].scores[name], results[0].scores[name], rtol=1e-4, atol=1e-7)


def test_bfloat16_state_is_close_and_half_the_bytes(tmp_path):
    scores = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_llama(seed=5)
        cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude", state_dtype=dtype))
        train(model, [cb], tmp_path / dtype, max_steps=20)
        scores[dtype] = cb.importance()
        tracked = sum(t.param.numel() for t in cb.accumulator.tracked)
        assert cb.state_bytes() == tracked * (4 if dtype == "float32" else 2)
        assert all(v.dtype == getattr(torch, dtype) for v in cb.accumulator.states.values())
    for name in scores["float32"].names:
        torch.testing.assert_close(scores["bfloat16"].scores[name], scores["float32"].scores[name], rtol=2e-2, atol=1e-4)


def test_logs_reach_tensorboard_and_history(tmp_path):
    """Importance metrics go through `trainer.log`: TensorBoard event files and log_history get them, at the Trainer's
    log steps, and the Trainer's callback list is left as the user built it."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Trainer

    from hf_weightprune.testing import TokenDataset

    model = tiny_llama(seed=6)
    args = training_args(tmp_path, max_steps=4, per_device_train_batch_size=4, report_to=["tensorboard"],
                         logging_steps=2, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=16))
    cb = ImportanceCallback().attach(trainer)
    order = list(trainer.callback_handler.callbacks)
    assert order[-1] is cb and cb.attach(trainer) is cb and trainer.callback_handler.callbacks.count(cb) == 1
    trainer.train()
    assert trainer.callback_handler.callbacks == order  # no reordering
    logged = [h for h in trainer.state.log_history if "importance/samples" in h]
    assert [(h["step"], h["importance/samples"]) for h in logged] == [(2, 2), (4, 4)]
    # The per-module-type summary replaced the constant `importance/tracked_params` (values: tests/prune/test_defaults.py).
    assert "importance/tracked_params" not in logged[0] and 0 <= logged[0]["importance/o_proj/frac_below"] <= 1
    runs = [os.path.join(root, f) for root, _, files in os.walk(tmp_path) for f in files if "tfevents" in f]
    acc = EventAccumulator(os.path.dirname(runs[0]))
    acc.Reload()
    samples = [(e.step, e.value) for e in acc.Scalars("train/importance/samples")]
    assert samples == [(2, 2.0), (4, 4.0)]
    assert "train/importance/down_proj/mean" in acc.Tags()["scalars"]
    assert "train/loss" in acc.Tags()["scalars"]


def test_lora_wanda_and_frozen_taylor_error(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_phi3(seed=7)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["qkv_proj", "o_proj"]))
    rec = Recorder(model, record_acts=True)
    cb = ImportanceCallback(ImportanceConfig(criterion="wanda"))
    train(model, [rec, cb], tmp_path, max_steps=3)
    imp = cb.importance()
    # keys are the base model's names, LoRA layers are not tracked
    assert "model.layers.0.self_attn.qkv_proj.weight" in imp.names
    assert not any("lora" in n or "base_layer" in n for n in imp.names)
    ref = reference("wanda", rec)
    for name, expected in ref.items():
        torch.testing.assert_close(imp.scores[name].double(), expected, rtol=RTOL, atol=ATOL)
    # the same importance applies to the merged plain model
    load_importance(tmp_path, model=model.merge_and_unload())

    model2 = peft.get_peft_model(tiny_phi3(seed=7), peft.LoraConfig(r=4, target_modules=["qkv_proj"]))
    with pytest.raises(ValueError, match="needs weight gradients.*frozen.*wanda"):
        train(model2, [ImportanceCallback(ImportanceConfig(criterion="taylor"))], tmp_path / "t", max_steps=1)


@pytest.mark.parametrize("criterion", ["sparsegpt", "temporal_magnitude"])
def test_finished_run_frees_the_callback_and_its_state(criterion, tmp_path):
    """A notebook trains again on the same model: the finished run's callback, its state (gigabytes for sparsegpt)
    and its hooks must go with the Trainer. The folder-claim registry held a strong reference to every callback
    (found on an H200: each earlier run's 11.4 GiB of Hessians stayed allocated)."""
    import gc
    import weakref

    model = tiny_llama(seed=3)
    cb = ImportanceCallback(ImportanceConfig(criterion=criterion))
    trainer = train(model, [cb], tmp_path, max_steps=2)
    state_ref, cb_ref = weakref.ref(next(iter(cb.accumulator.states.values()))), weakref.ref(cb)
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    del trainer, cb
    gc.collect()
    assert cb_ref() is None and state_ref() is None
    assert hooks_before == 0  # removed at train end
