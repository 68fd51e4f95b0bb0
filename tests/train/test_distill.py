"""Dense-teacher distillation (`DistillConfig`, `Distiller`) under a real `Trainer`, checked against brute force."""

from __future__ import annotations

import copy
import inspect
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from hf_weightprune import DistillConfig
from hf_weightprune.testing import TokenDataset, tiny_llama, tiny_phi3
from hf_weightprune.train.distiller import Distiller
from tests.helpers import end_process_group, training_args

ARCHS = {"llama": tiny_llama, "phi3": tiny_phi3}


class DistillAdapter(TrainerCallback):
    """What the lead's ImportanceCallback does with a Distiller: setup/install on train begin, remove on train end."""

    def __init__(self, config: DistillConfig, prunes_base: bool = True):
        self.distiller = Distiller(config)
        self.prunes_base = prunes_base
        self.teacher = None
        self.logs: list[dict[str, float]] = []
        self.grad_max: list[float] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.teacher = self.distiller.setup(model, prunes_base=self.prunes_base)
        self.distiller.install(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grad_max.append(max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None))

    def on_step_end(self, args, state, control, **kwargs):
        self.logs.append(self.distiller.pop_logs())

    def on_train_end(self, args, state, control, **kwargs):
        self.distiller.remove()


class PaddedDataset(torch.utils.data.Dataset):
    """Right-padded rows of different lengths; labels are -100 on the padding and on a short 'prompt' prefix."""

    def __init__(self, n: int = 16, seq_len: int = 12, vocab_size: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab_size, (n, seq_len), generator=g)
        self.mask = torch.ones(n, seq_len, dtype=torch.long)
        self.labels = self.ids.clone()
        lengths = torch.randint(4, seq_len + 1, (n,), generator=g)
        prompts = torch.randint(0, 4, (n,), generator=g)
        for i in range(n):
            self.ids[i, lengths[i]:] = 0
            self.mask[i, lengths[i]:] = 0
            self.labels[i, lengths[i]:] = -100
            self.labels[i, : prompts[i]] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def train(model, callbacks, tmp_path, *, dataset=None, max_steps=3, batch=4, ga=1, lr=1e-2, **kw):
    args = training_args(tmp_path, max_steps=max_steps, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=ga, learning_rate=lr, weight_decay=0.0, seed=0,
                         save_strategy="no", logging_steps=1, **kw)
    dataset = dataset if dataset is not None else TokenDataset(n=16, vocab_size=model.config.vocab_size)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    return trainer


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, field", [
    ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha"), ({"alpha": True}, "alpha"),
    ({"temperature": 0}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"hidden_weight": -1.0}, "hidden_weight"), ({"teacher_dtype": "int8"}, "teacher_dtype"),
    ({"teacher_device": "gpu0"}, "teacher_device"), ({"teacher": 3}, "teacher"),
])
def test_config_rejects_bad_values_in_one_line(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be") as err:
        DistillConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_config_to_dict(tmp_path):
    cfg = DistillConfig(teacher=tmp_path, alpha=1, temperature=3, teacher_device="cpu")
    assert cfg.to_dict() == {"teacher": str(tmp_path), "alpha": 1.0, "temperature": 3.0, "hidden_weight": 0.0,
                             "teacher_dtype": None, "teacher_device": "cpu"}
    assert DistillConfig(teacher=tiny_llama()).to_dict()["teacher"] == "LlamaForCausalLM"


# --------------------------------------------------------------------------------------------- trainer runs
def test_alpha_zero_trains_exactly_like_no_distillation(tmp_path):
    plain = tiny_llama(seed=3)
    train(plain, [], tmp_path / "plain")
    student = tiny_llama(seed=3)
    cb = DistillAdapter(DistillConfig(teacher=tiny_llama(seed=1), alpha=0.0))
    train(student, [cb], tmp_path / "distill")
    for name, p in plain.named_parameters():
        torch.testing.assert_close(student.get_parameter(name), p, rtol=0, atol=0)
    assert all(log["distill/kl"] > 1e-3 for log in cb.logs)  # the teacher did run and differs


def test_identical_teacher_alpha_one_leaves_weights_unchanged(tmp_path):
    model = tiny_llama(seed=2)
    before = params(model)
    cb = DistillAdapter(DistillConfig(teacher=None, alpha=1.0, temperature=2.0, hidden_weight=1.0))
    trainer = train(model, [cb], tmp_path, max_steps=1)  # AdamW: any nonzero gradient would move every weight ~lr
    assert cb.grad_max == [0.0]
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert cb.logs[0]["distill/kl"] == 0.0 and cb.logs[0]["distill/hidden"] == 0.0
    assert trainer.state.log_history[0]["loss"] == 0.0
    assert "forward" not in model.__dict__  # restored at train end


def test_teacher_weights_are_bit_identical_after_training(tmp_path):
    given = tiny_llama(seed=1)
    given_before = params(given)
    student = tiny_llama(seed=2)
    cb = DistillAdapter(DistillConfig(teacher=given, alpha=0.5, hidden_weight=1.0))
    train(student, [cb], tmp_path / "given")
    assert all(torch.equal(p, given_before[n]) and not p.requires_grad for n, p in given.named_parameters())
    assert not given.training

    student = tiny_llama(seed=2)
    initial = params(student)
    cb = DistillAdapter(DistillConfig(alpha=0.5, hidden_weight=1.0))  # default: frozen copy as training begins
    train(student, [cb], tmp_path / "copy")
    assert cb.teacher is not None and cb.teacher is not student
    assert all(torch.equal(p, initial[n]) for n, p in cb.teacher.named_parameters())
    assert not torch.equal(student.lm_head.weight, initial["lm_head.weight"])  # while the student did move
    assert cb.distiller.teacher is None  # dropped by remove()


def brute_force(student, teacher, batch, alpha, temperature, hidden_weight):
    """Per-token loops in float64 on the weights before the first step."""
    with torch.no_grad():
        s_out = student.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True)
        t_out = teacher.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True)
    labels = batch["labels"]
    kl = ce = hidden = 0.0
    n = 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            target = int(labels[b, i + 1])
            if target == -100:
                continue
            n += 1
            s, t = s_out.logits[b, i].double(), t_out.logits[b, i].double()
            ps, pt = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
            kl += float((pt * (pt.log() - ps.log())).sum())
            ce += float(-torch.log_softmax(s, -1)[target])
            layers = [(hs[b, i].double(), ht[b, i].double())
                      for hs, ht in zip(s_out.hidden_states[1:], t_out.hidden_states[1:])]
            hidden += sum(float(((hs - ht) ** 2).sum() / (ht**2).sum()) for hs, ht in layers) / len(layers)
    loss = (1 - alpha) * ce / n + alpha * temperature**2 * kl / n + hidden_weight * hidden / n
    return {"kl": kl / n, "ce": ce / n, "hidden": hidden / n, "loss": loss, "tokens": n}


@pytest.mark.parametrize("arch, teacher_as", [("llama", "module"), ("phi3", "module"), ("llama", "path")])
def test_kl_and_loss_match_brute_force_on_padded_batch(arch, teacher_as, tmp_path):
    make = ARCHS[arch]
    student, teacher = make(seed=2), make(seed=1)
    initial = copy.deepcopy(student)
    if teacher_as == "path":
        teacher.save_pretrained(tmp_path / "teacher")
    data = PaddedDataset(n=4, seq_len=12)
    alpha, temperature, hidden_weight = 0.3, 2.0, 0.5
    cfg = DistillConfig(teacher=str(tmp_path / "teacher") if teacher_as == "path" else teacher, alpha=alpha,
                        temperature=temperature, hidden_weight=hidden_weight)
    cb = DistillAdapter(cfg)
    trainer = train(student, [cb], tmp_path / "run", dataset=data, max_steps=1, batch=4)  # one batch = all 4 rows
    ref = brute_force(initial, teacher, data[:4], alpha, temperature, hidden_weight)
    assert ref["tokens"] < 4 * 11  # padding and prompts were really excluded
    assert cb.logs[0]["distill/kl"] == pytest.approx(ref["kl"], rel=1e-5)
    assert cb.logs[0]["distill/ce"] == pytest.approx(ref["ce"], rel=1e-5)
    assert cb.logs[0]["distill/hidden"] == pytest.approx(ref["hidden"], rel=1e-5)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_gradient_accumulation_equals_large_batch(tmp_path):
    results = []
    for batch, ga in [(4, 1), (2, 2)]:
        student = tiny_llama(seed=4)
        cb = DistillAdapter(DistillConfig(teacher=tiny_llama(seed=1), alpha=0.5, temperature=2.0, hidden_weight=1.0))
        # rows hold 2..11 real tokens: a per-micro-batch mean would weigh them differently than the batch of 4
        train(student, [cb], tmp_path / f"b{batch}", dataset=PaddedDataset(n=24), max_steps=3, batch=batch, ga=ga)
        results.append(params(student))
    for name, p in results[0].items():
        torch.testing.assert_close(results[1][name], p, rtol=1e-4, atol=1e-6)
    assert not torch.equal(results[0]["lm_head.weight"], tiny_llama(seed=4).lm_head.weight)


def test_peft_disabled_adapters_teacher_equals_frozen_base_copy(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    runs = {}
    for how in ("disabled_adapters", "copy"):
        base = tiny_llama(seed=5)
        teacher = copy.deepcopy(base) if how == "copy" else None
        model = peft.get_peft_model(base, peft.LoraConfig(**lora))
        cb = DistillAdapter(DistillConfig(teacher=teacher, alpha=0.5, hidden_weight=1.0), prunes_base=False)
        train(model, [cb], tmp_path / how, max_steps=4, lr=5e-2)
        assert cb.distiller.uses_disabled_adapters is False  # reset by remove()
        assert (cb.teacher is None) == (how == "disabled_adapters")
        runs[how] = (cb.logs, {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
        assert "forward" not in model.__dict__
        lora_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        assert len(lora_layers) == 6 and not any(m.disable_adapters for m in lora_layers)  # re-enabled
    (logs_a, lora_a), (logs_b, lora_b) = runs["disabled_adapters"], runs["copy"]
    assert logs_a[0]["distill/kl"] == 0.0  # lora_B starts at zero: student == base
    assert logs_a[-1]["distill/kl"] > 1e-4
    for a, b in zip(logs_a, logs_b):
        assert a["distill/kl"] == pytest.approx(b["distill/kl"], rel=1e-5, abs=1e-9)
        assert a["distill/hidden"] == pytest.approx(b["distill/hidden"], rel=1e-5, abs=1e-9)
    for name, p in lora_a.items():
        torch.testing.assert_close(lora_b[name], p, rtol=1e-5, atol=1e-7)


def test_incompatible_teacher_is_refused_in_one_line(tmp_path):
    cb = DistillAdapter(DistillConfig(teacher=tiny_llama(seed=1, vocab_size=256)))
    student = tiny_llama(seed=2)
    before = params(student)
    with pytest.raises(ValueError, match="vocab_size 256 but the student has 128") as err:
        train(student, [cb], tmp_path / "vocab", max_steps=1)
    assert "\n" not in str(err.value)
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())  # refused before any step

    deeper = tiny_llama(seed=1, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"num_hidden_layers/hidden_size \(2/32\) in the teacher \(it has 3/32\)"):
        Distiller(DistillConfig(teacher=deeper, hidden_weight=1.0)).setup(student)
    assert Distiller(DistillConfig(teacher=deeper, hidden_weight=0.0)).setup(student) is deeper  # logits suffice
    with pytest.raises(ValueError, match="teacher is the student itself"):
        Distiller(DistillConfig(teacher=student)).setup(student)
    deeper.save_pretrained(tmp_path / "deeper")
    os.remove(tmp_path / "deeper" / "model.safetensors")  # refused from config.json, before loading any weights
    with pytest.raises(ValueError, match=re.escape(f"teacher ({tmp_path / 'deeper'}) ") + ".*it has 3/32"):
        Distiller(DistillConfig(teacher=str(tmp_path / "deeper"), hidden_weight=1.0)).setup(student)
    for missing in (tmp_path / "no-such-folder", tmp_path / "vocab"):  # absent; a folder without config.json
        with pytest.raises(ValueError, match=re.escape(f"DistillConfig.teacher={str(missing)!r} cannot be loaded as a "
                                                       "model (")) as err:
            Distiller(DistillConfig(teacher=str(missing))).setup(student)
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------- the wrapper itself
def test_wrapper_changes_only_the_training_loss(caplog):
    model, teacher = tiny_llama(seed=2), tiny_llama(seed=1)
    initial = copy.deepcopy(model)
    sig = inspect.signature(model.forward)
    batch = PaddedDataset(n=3)[:3]
    with torch.no_grad():
        plain = model(**batch)
        plain_hidden = model(**batch, output_hidden_states=True)
    d = Distiller(DistillConfig(teacher=teacher, alpha=0.5, hidden_weight=1.0))
    d.setup(model)
    d.install(model)
    assert inspect.signature(model.forward) == sig  # Trainer's model_accepts_loss_kwargs sees the same signature
    with torch.no_grad():
        out = model(**batch)  # no num_items_in_batch: every term is a mean over the real tokens
        out_hidden = model(**batch, output_hidden_states=True)
        model.eval()
        evaluated = model(**batch)
    assert list(out.keys()) == list(plain.keys())  # hidden states fetched for SquareHead are not handed back
    assert torch.equal(out.logits, plain.logits)
    assert out.loss.item() == pytest.approx(brute_force(initial, teacher, batch, 0.5, 2.0, 1.0)["loss"], rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(out_hidden.hidden_states, plain_hidden.hidden_states))
    assert torch.equal(evaluated.loss, plain.loss)  # eval loss stays the plain cross-entropy
    model.train()
    with torch.no_grad(), caplog.at_level("WARNING", logger="hf_weightprune.train.distiller"):
        unlabeled = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # label smoothing
    assert unlabeled.loss is None and torch.equal(unlabeled.logits, plain.logits)
    assert "without labels is left plain" in caplog.text
    assert set(d.pop_logs()) == {"distill/kl", "distill/ce", "distill/hidden"} and d.pop_logs() == {}
    with pytest.raises(RuntimeError, match="already installed"):
        d.install(model)
    d.remove()
    assert "forward" not in model.__dict__


def test_teacher_cost_per_step(tmp_path):
    """Measured, not asserted: the teacher forward (and KL, SquareHead) on top of a tiny model's training step."""

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    median = {}
    for name, extra in [("plain", []), ("distill", [DistillAdapter(DistillConfig(hidden_weight=1.0))])]:
        timer = StepTimer()
        train(tiny_llama(seed=2), [timer, *extra], tmp_path / name, max_steps=12)
        median[name] = sorted(timer.times[2:])[len(timer.times[2:]) // 2]  # the first steps warm up
    print(f"\nmedian step: plain {median['plain'] * 1e3:.2f} ms, with teacher {median['distill'] * 1e3:.2f} ms "
          f"(+{(median['distill'] / median['plain'] - 1) * 100:.0f}%)")
    assert len(timer.times) == 12


# --------------------------------------------------------------------------------------------- DDP
def ddp_run(out: str) -> None:
    """Same global batch (4) whatever the world size; rank 0 writes the final weights. `python -m tests.train.test_distill OUT`."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.manual_seed(0)
    student = tiny_llama(seed=4)
    cb = DistillAdapter(DistillConfig(teacher=tiny_llama(seed=1), alpha=0.7, temperature=2.0, hidden_weight=1.0))
    trainer = train(student, [cb], out, dataset=PaddedDataset(n=24), max_steps=3, batch=4 // world,
                    ddp_backend="gloo" if world > 1 else None)
    assert trainer.args.world_size == world
    if trainer.args.process_index == 0:
        save_file({n: p.detach().contiguous() for n, p in student.named_parameters()},
                  os.path.join(out, f"weights-world{world}.safetensors"))


@pytest.mark.multiproc
def test_ddp_equals_single_process(tmp_path):
    # Rows hold 2..11 real tokens, so the two ranks see different token counts: only a KL normalized by the global
    # num_items_in_batch (as the CE is) gives the single-process gradients.
    ddp_run(str(tmp_path))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "tests.train.test_distill", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = (load_file(str(tmp_path / f"weights-world{w}.safetensors")) for w in (1, 2))
    for name, ref in one.items():
        # all-reduced sum of two rank gradients vs one batch: float summation order only
        torch.testing.assert_close(two[name], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=name)


if __name__ == "__main__":
    ddp_run(sys.argv[1])
    end_process_group()
