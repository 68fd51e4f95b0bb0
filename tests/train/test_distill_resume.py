"""Distillation + pruning resumed after SIGKILL: the resumed run distils from the same dense teacher and ends exactly
where an uninterrupted run ends (weights, masks, importance, distillation losses). Killed runs are real subprocesses
(`tests/scripts/ckpt_train.py`); references and resumes are real Trainer runs in this process."""

import copy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from hf_weightprune import (
    DistillConfig,
    ImportanceCallback,
    ImportanceConfig,
    PruneConfig,
    PruneSchedule,
    prune_,
    save_pruned,
)
from hf_weightprune.files import importance_files as F
from hf_weightprune.files import training_state as T
from hf_weightprune.prune.oneshot import oneshot_importance
from hf_weightprune.testing import TokenDataset, tiny_llama
from hf_weightprune.train.distiller import Distiller, _unique_state
from tests.helpers import assert_same_importance, sigkill_at_hang, snapshot, training_args, workdir
from tests.scripts.ckpt_train import make_callback, run

SEED = 11  # the model ckpt_train.run trains: tiny_llama(seed=11)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The dense model the runs start from (saved: the explicit teacher) and its one-shot 50% pruning (hold's masks)."""
    root = tmp_path_factory.mktemp("models")
    dense = tiny_llama(seed=SEED)
    dense.save_pretrained(root / "dense")
    pruned = copy.deepcopy(dense)
    report = prune_(pruned, oneshot_importance(pruned), PruneConfig(sparsity=0.5), progress=False)
    save_pruned(pruned, root / "pruned", report=report)
    return root


def settings(models) -> dict:
    """Each killed run: its criterion and `make_callback` arguments (the same for the killed, resumed and reference
    runs). Both are killed once checkpoint-3 (of 3, 6, 8) is complete: inside the pruning ramp (steps 1-6)."""
    return {
        "prune": ("temporal_magnitude", dict(schedule="prune", distill=True)),  # default teacher: the frozen copy
        "hold": ("wanda", dict(schedule="hold", masks_from=str(models / "pruned"), distill=True,
                               teacher=str(models / "dense"))),
    }


def argv(criterion, kw) -> list[str]:
    out = ["--criterion", criterion, "--hang-after-save", "3", "--schedule", kw["schedule"], "--distill"]
    if kw.get("masks_from"):
        out += ["--masks-from", kw["masks_from"], "--teacher", kw["teacher"]]
    return out


@pytest.fixture(scope="module")
def killed(models, tmp_path_factory):
    """Start both killed runs at once, SIGKILL each as soon as checkpoint-3 is complete; returns the root."""
    root = tmp_path_factory.mktemp("killed")
    return sigkill_at_hang(root, {name: argv(criterion, kw) for name, (criterion, kw) in settings(models).items()})


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """Uninterrupted runs with the killed runs' arguments, made on first use; returns (output_dir, trainer)."""
    root, done = tmp_path_factory.mktemp("reference"), {}

    def get(name):
        if name not in done:
            criterion, kw = settings(models)[name]
            done[name] = (root / name, run(root / name, criterion, importance_callback=make_callback(criterion, **kw)))
        return done[name]

    return get


def losses(trainer) -> dict[int, float]:
    """The training loss logged at each step: with `distill=`, the mixed CE + KL + SquareHead loss."""
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def assert_same_end(out, trainer, ref_out, ref_trainer):
    a, b = (load_file(d / "checkpoint-8" / "model.safetensors") for d in (out, ref_out))
    assert a.keys() == b.keys()
    for name in b:
        assert torch.equal(a[name], b[name]), name  # bit for bit
    ma, mb = (T.load_schedule_masks(d / "checkpoint-8" / F.IMPORTANCE_DIR) for d in (out, ref_out))
    assert ma.keys() == mb.keys() and len(mb) == 14
    assert all(torch.equal(ma[n], mb[n]) for n in mb)
    assert_same_importance(out, ref_out)
    assert_same_importance(out / "checkpoint-8", ref_out / "checkpoint-8")
    # the per-step (distillation) losses after the resume are those of the uninterrupted run: the same teacher
    resumed, full = losses(trainer), losses(ref_trainer)
    assert sorted(resumed) == list(range(1, 9)) == sorted(full)  # steps 1-3 from the checkpoint's log history
    for step in range(4, 9):
        assert resumed[step] == full[step], step


def test_sigkill_during_gradual_pruning_with_default_teacher_resumes_exactly(models, killed, reference, tmp_path):
    out = workdir(killed, "prune", tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [T.TEACHER_DIR, "checkpoint-3"]
    # The dense model as training began, written once before checkpoint-3: not the pruned weights the resume loads.
    teacher, meta = T.load_teacher_state(str(out / T.TEACHER_DIR))
    dense = _unique_state(tiny_llama(seed=SEED))
    assert teacher.keys() == dense.keys() and all(torch.equal(teacher[n], dense[n]) for n in dense)
    ckpt = load_file(out / "checkpoint-3" / "model.safetensors")
    assert (ckpt["model.layers.0.mlp.up_proj.weight"] == 0).float().mean() > 0.1
    assert meta["state"] == {"global_step": 0}
    written = snapshot(out / T.TEACHER_DIR)

    cb = make_callback("temporal_magnitude", schedule="prune", distill=True)
    trainer = run(out, resume=True, importance_callback=cb)
    assert_same_end(out, trainer, *reference("prune"))
    assert snapshot(out / T.TEACHER_DIR) == written  # loaded, never rewritten
    assert cb.mask_holder.sparsity == pytest.approx(0.5, abs=1e-3)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_sigkill_during_hold_recovery_with_explicit_teacher_resumes_exactly(models, killed, reference, tmp_path):
    out = workdir(killed, "hold", tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]  # a teacher given by path is not saved
    criterion, kw = settings(models)["hold"]
    trainer = run(out, criterion, resume=True, importance_callback=make_callback(criterion, **kw))
    assert_same_end(out, trainer, *reference("hold"))
    held = T.load_schedule_masks(out / "checkpoint-8" / F.IMPORTANCE_DIR)
    weights = load_file(models / "pruned" / "model.safetensors")
    assert all(torch.equal(held[n], weights[n] != 0) for n in held)  # the pruned checkpoint's exact masks


def truncate_weights(folder):
    f = folder / T.TEACHER_WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[:-64])


def edit_one_value(folder):
    from safetensors.torch import save_file

    tensors = load_file(folder / T.TEACHER_WEIGHTS_NAME)
    tensors["model.norm.weight"][0] += 1  # same shape and dtype: only the checksum notices
    save_file(tensors, folder / T.TEACHER_WEIGHTS_NAME, metadata={"format": "pt"})


BAD_TEACHERS = [
    ("missing", lambda folder: shutil.rmtree(folder), r"_distill-teacher does not exist \(no teacher_config\.json\)"),
    ("truncated", truncate_weights, r"model\.safetensors is missing, corrupt or truncated"),
    ("modified", edit_one_value, r"tensor model\.norm\.weight does not match its shape, dtype or crc32"),
]


@pytest.mark.parametrize("case, damage, message", BAD_TEACHERS, ids=[c[0] for c in BAD_TEACHERS])
def test_resume_without_a_usable_teacher_refuses_then_an_explicit_teacher_is_exact(case, damage, message, models,
                                                                                   killed, reference, tmp_path):
    out = workdir(killed, "prune", tmp_path)
    damage(out / T.TEACHER_DIR)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"^Cannot resume distillation with DistillConfig\(teacher=None\): .*"
                                         + message + r".*pass DistillConfig\(teacher=\.\.\.\) with the model the run "
                                         r"started from") as e:
        run(out, resume=True, importance_callback=make_callback(schedule="prune", distill=True))
    assert "\n" not in str(e.value)
    assert snapshot(out) == before  # refused in on_train_begin, before any step or write
    if case != "missing":
        return
    # The fix the message names: the dense model the run started from, by path (loaded in the student's dtype).
    cb = make_callback(schedule="prune", distill=True, teacher=str(models / "dense"))
    trainer = run(out, resume=True, importance_callback=cb)
    assert_same_end(out, trainer, *reference("prune"))


class TeacherWrites(TrainerCallback):
    """Records the teacher folder's files (bytes, mtime) at every save."""

    def __init__(self):
        self.seen = {}

    def on_save(self, args, state, control, **kwargs):
        self.seen[state.global_step] = snapshot(Path(args.output_dir) / T.TEACHER_DIR)


def test_bfloat16_teacher_is_saved_once_in_bfloat16(tmp_path):
    seen = TeacherWrites()
    # what a writer killed mid-write leaves (pid 2**22 + 1 is above Linux's pid_max: never alive); removed by the write
    stale = tmp_path / "out" / f".{T.TEACHER_DIR}.{2**22 + 1}-0a1b2c3d.tmp"
    stale.mkdir(parents=True)
    (stale / T.TEACHER_WEIGHTS_NAME).write_bytes(b"partial")
    cb = make_callback(schedule="prune", distill=True, teacher_dtype="bfloat16")
    run(tmp_path / "out", importance_callback=cb, callbacks=[seen], max_steps=6, save_steps=2)
    assert not stale.exists()
    assert sorted(seen.seen) == [2, 4, 6] and seen.seen[2] == seen.seen[4] == seen.seen[6]  # written once
    teacher, meta = T.load_teacher_state(str(tmp_path / "out" / T.TEACHER_DIR))
    dense = _unique_state(tiny_llama(seed=SEED).to(torch.bfloat16))
    assert teacher.keys() == dense.keys() and all(torch.equal(teacher[n], dense[n]) for n in dense)
    data = sum(t.numel() for t in dense.values()) * 2  # bytes the docs promise: 2 per parameter
    file = tmp_path / "out" / T.TEACHER_DIR / T.TEACHER_WEIGHTS_NAME
    assert data < file.stat().st_size < data + 4096  # + the safetensors header
    assert {v["dtype"] for v in meta["tensors"].values()} == {"bfloat16"}
    assert not any(T.TEACHER_DIR in str(p) for p in (tmp_path / "out").glob("checkpoint-*/**/*"))

    # No checkpoint, no teacher on disk.
    run(tmp_path / "nosave", importance_callback=make_callback(distill=True), max_steps=1, save_strategy="no")
    assert sorted(p.name for p in (tmp_path / "nosave").iterdir()) == [F.IMPORTANCE_DIR]


def test_teacher_state_keeps_tied_weights_once_and_restores_them_into_another_copy():
    first = tiny_llama(seed=1, tie_word_embeddings=True)
    saving = Distiller(DistillConfig())
    saving.setup(first)
    state = saving.teacher_state_dict()
    assert len(state) == len(first.state_dict()) - 1 and "lm_head.weight" not in state  # one tensor, two names
    other = tiny_llama(seed=2, tie_word_embeddings=True)  # "the resumed model": other weights
    resumed = Distiller(DistillConfig())
    teacher = resumed.setup(other, teacher_state=state)
    assert resumed.teacher_is_copy and teacher is not other
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight  # still tied, so lm_head got it too
    for name, p in first.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], p), name
    assert not torch.equal(other.lm_head.weight, first.lm_head.weight)  # the student itself is untouched

    wrong = {k: v.to(torch.bfloat16) for k, v in state.items()}
    with pytest.raises(ValueError, match=r"^The saved distillation teacher's model\.embed_tokens\.weight is "
                                         r"torch\.bfloat16 \[128, 32\], the teacher now torch\.float32 \[128, 32\]: "
                                         r"resume with the same model and DistillConfig\(teacher_dtype=\.\.\.\)"):
        Distiller(DistillConfig()).setup(other, teacher_state=wrong)
    with pytest.raises(ValueError, match=r"does not fit this model \(0 weights missing, e\.g\. None; 1 unexpected, "
                                         r"e\.g\. extra\)"):
        Distiller(DistillConfig()).setup(other, teacher_state={**state, "extra": torch.zeros(1)})


def test_resume_under_peft_lora_with_pruned_base_is_exact(tmp_path):
    """LoRA with the base pruned in place: the teacher is a copy of the PeftModel (adapters included); the resumed
    model's adapters are trained, so only the saved copy gives the same teacher."""
    peft = pytest.importorskip("peft")

    def go(out, resume=None):
        model = peft.get_peft_model(tiny_llama(seed=SEED), peft.LoraConfig(r=4, target_modules="all-linear"))
        cb = ImportanceCallback(ImportanceConfig(criterion="temporal_magnitude"), distill=DistillConfig(alpha=0.5),
                                schedule=PruneSchedule(final_sparsity=0.5, start=1, end=6, every_n_steps=1))
        args = training_args(out, max_steps=8, save_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, seed=7,
                             dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=TokenDataset(n=16, vocab_size=128, seed=3),
                callbacks=[cb]).train(resume_from_checkpoint=resume)
        assert cb.mask_holder.sparsity == pytest.approx(0.5, abs=1e-3)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    full = go(tmp_path / "full")
    out = tmp_path / "resumed"
    for part in ("checkpoint-3", T.TEACHER_DIR):
        shutil.copytree(tmp_path / "full" / part, out / part)
    resumed = go(out, resume=True)
    assert any("lora_B" in n for n in full) and full.keys() == resumed.keys()
    for name, p in full.items():
        assert torch.equal(resumed[name], p), name
