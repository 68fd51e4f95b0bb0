"""`ImportanceCallback.training_record()`: the optimizer steps and real training tokens of a recovery, counted while it
ran (padding and evaluation excluded, gradient accumulation included), exact across `resume_from_checkpoint`, recorded
by `save_pruned(training=...)` in `sparsity.json` and on the card."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from transformers import Trainer

from hf_weightprune import (
    DistillConfig,
    ImportanceCallback,
    PruneConfig,
    PruneSchedule,
    load_sparsity,
    prune_,
    save_pruned,
)
from hf_weightprune.prune.oneshot import oneshot_importance
from hf_weightprune.publish.card import render_model_card
from hf_weightprune.testing import TokenDataset, tiny_llama
from tests.helpers import training_args
from tests.train.test_distill import PaddedDataset

N = 16  # examples; batch 2 x accumulation 2 x 4 steps reads each once


def _structured():
    """A dense teacher and its one-shot structured prune (half the MLP neurons)."""
    teacher = tiny_llama(seed=7)
    student = copy.deepcopy(teacher)
    report = prune_(student, oneshot_importance(student), PruneConfig(structure="neurons", sparsity=0.5), progress=False)
    return student, teacher, report


def _trainer(model, cb, out, dataset, **kw):
    args = training_args(out, max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2, seed=0,
                         logging_steps=1, include_num_input_tokens_seen="non_padding", **kw)
    return Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=PaddedDataset(n=4, seed=3),
                   callbacks=[cb])


def _distilled_recovery(out, **kw):
    student, teacher, report = _structured()
    cb = ImportanceCallback(distill=DistillConfig(teacher=teacher, alpha=0.5))
    dataset = PaddedDataset(n=N, vocab_size=student.config.vocab_size)
    trainer = _trainer(student, cb, out, dataset, **kw)
    return trainer, cb, dataset, student, report


def test_the_counts_are_the_real_tokens_of_every_step_with_padding_accumulation_and_evaluation(tmp_path):
    trainer, cb, dataset, _, _ = _distilled_recovery(tmp_path / "run", eval_strategy="steps", eval_steps=2)
    trainer.train()
    record = cb.training_record()
    # Brute force: every training row once (4 steps x 2 accumulated batches x 2 rows), its attention mask's ones;
    # the padding and the evaluation forwards (eval mode) are not training tokens.
    real = int(dataset.mask.sum())
    assert real < dataset.mask.numel()  # the rows are padded
    assert record == {"steps": 4, "tokens": real}
    assert trainer.state.num_input_tokens_seen == real  # the Trainer's own count of the same tokens agrees
    assert cb.training_record() == record  # asking twice counts nothing twice


def test_a_hold_recovery_without_distillation_counts_every_token_of_unpadded_rows(tmp_path):
    dense = tiny_llama(seed=5)
    report = prune_(dense, oneshot_importance(dense), PruneConfig(sparsity=0.5), progress=False)
    save_pruned(dense, tmp_path / "pruned", report=report)
    schedule = PruneSchedule(mode="hold", masks_from=str(tmp_path / "pruned"))
    cb = ImportanceCallback(schedule=schedule)
    dataset = TokenDataset(n=N, seq_len=10, vocab_size=dense.config.vocab_size)  # no attention_mask: all count
    _trainer(dense, cb, tmp_path / "run", dataset).train()
    assert cb.training_record() == {"steps": 4, "tokens": N * 10}
    out = save_pruned(dense, tmp_path / "recovered", report=cb.pruning_report(dense), schedule=schedule,
                      training=cb.training_record())
    assert load_sparsity(out)["training"] == {"steps": 4, "tokens": 160}
    card = (tmp_path / "recovered" / "README.md").read_text()
    assert "- **Recovery**: 4 optimizer steps, 160 training tokens (padding excluded), counted while it trained." in card


def test_without_an_attention_mask_the_count_is_the_trainers_non_padding_count(tmp_path):
    """Padded rows and no attention mask: the Trainer's `non_padding` count leaves out its tokenizer's
    `pad_token_id`; so does the callback (before, it counted every token, padding included)."""
    from transformers import default_data_collator

    from hf_weightprune.testing import train_tokenizer
    from tests.doc_blocks import KJV

    tok = train_tokenizer([(KJV / "train.txt").read_text()[:5000]], vocab_size=300)
    tok.pad_token = tok.eos_token
    rows = PaddedDataset(n=N, vocab_size=300)
    rows.ids[rows.mask == 0] = tok.pad_token_id

    class Unmasked(torch.utils.data.Dataset):  # the padded rows, without their attention mask
        def __len__(self):
            return N

        def __getitem__(self, i):
            return {"input_ids": rows.ids[i], "labels": rows.labels[i]}

    model = tiny_llama(seed=5, vocab_size=300)
    cb = ImportanceCallback(distill=DistillConfig(teacher=tiny_llama(seed=5, vocab_size=300), alpha=0.5))
    args = training_args(tmp_path / "run", max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         seed=0, include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=args, train_dataset=Unmasked(), processing_class=tok,
                      data_collator=default_data_collator, callbacks=[cb])
    trainer.train()
    real = int((rows.ids != tok.pad_token_id).sum())
    assert real < rows.ids.numel()  # the rows are padded
    assert cb.training_record() == {"steps": 4, "tokens": real} and trainer.state.num_input_tokens_seen == real


def test_a_resumed_recovery_counts_the_whole_run_exactly(tmp_path):
    trainer, cb, dataset, _, _ = _distilled_recovery(tmp_path / "full", save_strategy="steps", save_steps=2)
    trainer.train()
    whole = cb.training_record()
    # The counts of steps 1-2 ride in checkpoint-2's trainer_state.json, as the Trainer's own token count does.
    state = json.loads((tmp_path / "full" / "checkpoint-2" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["hf_weightprune.training"]
    assert saved == {"global_step": 2, "steps": 2, "tokens": state["num_input_tokens_seen"]}
    assert 0 < saved["tokens"] < whole["tokens"]

    # A fresh process would build everything again: a new model, callback and Trainer, resumed from checkpoint-2.
    resumed, cb2, _, _, _ = _distilled_recovery(tmp_path / "full", save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert cb2.training_record() == whole == {"steps": 4, "tokens": int(dataset.mask.sum())}


def test_a_resume_from_a_checkpoint_without_counts_refuses_to_state_a_length(tmp_path):
    trainer, _, _, _, _ = _distilled_recovery(tmp_path / "run", save_strategy="steps", save_steps=2)
    trainer.train()
    path = tmp_path / "run" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["stateful_callbacks"]["hf_weightprune.training"]  # as an earlier version wrote it
    path.write_text(json.dumps(state))
    resumed, cb, _, _, _ = _distilled_recovery(tmp_path / "run", save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(path.parent))
    with pytest.raises(ValueError, match=r"resumed at step 2 from a checkpoint that holds no training counts"):
        cb.training_record()


def test_before_training_there_is_no_record():
    with pytest.raises(RuntimeError, match=r"no optimizer step has run"):
        ImportanceCallback(distill=DistillConfig()).training_record()


def test_sparsity_json_and_the_card_state_the_recovery_and_an_old_file_renders_as_before(tmp_path):
    trainer, cb, _, student, report = _distilled_recovery(tmp_path / "run")
    trainer.train()
    record = cb.training_record()
    out = save_pruned(student, tmp_path / "pruned", report=report, distillation=cb.distill, training=record)
    payload = load_sparsity(out)
    assert payload["training"] == record
    card = (tmp_path / "pruned" / "README.md").read_text()
    line = (f"- **Recovery**: 4 optimizer steps, {record['tokens']:,} training tokens (padding excluded), counted "
            "while it trained.")
    assert line in card
    assert "- **Schedule**: one-shot; the pruned model was then fine-tuned with the distillation below." in card

    old = {k: v for k, v in payload.items() if k != "training"}  # a file written before the field existed
    old_card = str(render_model_card(out, sparsity=old))
    assert "**Recovery**" not in old_card and "optimizer step" not in old_card
    assert old_card.replace("\n", "") == str(render_model_card(out, sparsity=payload)).replace(line, "").replace("\n", "")


@pytest.mark.parametrize("schedule, label", [(None, "Recovery"), ("prune", "Training")])
def test_a_record_without_distillation_is_a_fine_tune_or_the_gradual_run_s_training(tmp_path, schedule, label):
    student, _, report = _structured()
    payload_schedule = (PruneSchedule(final_sparsity=0.5, start=1, end=3, every_n_steps=1) if schedule else None)
    out = save_pruned(student, tmp_path / "out", report=report, schedule=payload_schedule,
                      training={"steps": 1, "tokens": 1234})
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"- **{label}**: 1 optimizer step, 1,234 training tokens (padding excluded), counted while it trained." in card
    if schedule is None:
        assert "pruned in one shot, then fine-tuned (hf-weightprune" in card
        assert "- **Schedule**: one-shot; the pruned model was then fine-tuned." in card
    assert load_sparsity(out)["training"] == {"steps": 1, "tokens": 1234}


@pytest.mark.parametrize("training, error, match", [
    ({"steps": -1, "tokens": 10}, ValueError, r"training\['steps'\] must be an integer >= 1; got -1"),
    ({"steps": 3, "tokens": 0}, ValueError, r"training\['tokens'\] must be an integer >= 1; got 0"),
    ({"steps": 3, "tokens": "2k"}, ValueError, r"training\['tokens'\] must be an integer >= 1; got '2k'"),
    ({"steps": 2.5, "tokens": 10}, ValueError, r"training\['steps'\] must be an integer >= 1; got 2.5"),
    ({"steps": True, "tokens": 10}, ValueError, r"training\['steps'\] must be an integer >= 1; got True"),
    ({"steps": 3}, ValueError, r"exactly the keys 'steps' and 'tokens'.*got \['steps'\]"),
    ({"steps": 3, "tokens": 9, "epochs": 1}, ValueError, r"exactly the keys"),
    ([3, 9], TypeError, r"training must be ImportanceCallback.training_record\(\) \(a dict\) or None; got list"),
])
def test_a_garbled_record_is_refused_in_one_line_before_any_write(tmp_path, training, error, match):
    student, _, report = _structured()
    with pytest.raises(error, match=match) as info:
        save_pruned(student, tmp_path / "out", report=report, training=training)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_the_counter_s_hook_goes_with_the_run(tmp_path):
    trainer, cb, _, student, _ = _distilled_recovery(tmp_path / "run")
    assert not student._forward_pre_hooks
    trainer.train()
    assert not student._forward_pre_hooks and not student._forward_hooks  # removed at train end, with the distiller's
    with torch.no_grad():  # forwards after training (train mode or not) are no training tokens of the run
        student.train()(torch.ones(1, 5, dtype=torch.long))
    assert cb.training_record()["steps"] == 4 and cb.training_record()["tokens"] == trainer.state.num_input_tokens_seen


# SIGKILL: `tests/scripts/ckpt_train.py` (tiny Llama, 16 unpadded windows of 16 tokens, 4 per step, 8 steps, a checkpoint
# every 3 steps), distilled from its frozen copy (the teacher's forwards are no training tokens), killed once
# checkpoint-6 is complete ("steps"), or checkpoint-5, a save another callback decided after the counter's step end
# ("late"), and resumed by a fresh process; the reference is the same script's uninterrupted run.
KILLED = {"steps": ["--distill", "--hang-after-save", "6"],
          "late": ["--distill", "--save-late", "5", "--hang-after-save", "5"]}
WHOLE = {"steps": 8, "tokens": 8 * 4 * 16}


def _killed(tmp_path, nproc=1):
    from tests.helpers import sigkill_at_hang, workdir

    (tmp_path / "killed").mkdir()
    killed = sigkill_at_hang(tmp_path / "killed", KILLED, nproc=nproc)
    outs = {name: workdir(killed, name, tmp_path) for name in KILLED}
    for name, step in (("steps", 6), ("late", 5)):  # the counts of the steps the checkpoint holds
        state = json.loads((outs[name] / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["stateful_callbacks"]["hf_weightprune.training"] == {"global_step": step, "steps": step,
                                                                          "tokens": step * 64}
    return outs


def test_a_sigkilled_run_resumed_states_the_uninterrupted_run_s_record(tmp_path):
    from tests.scripts.ckpt_train import make_callback, run

    reference = make_callback(distill=True)
    run(tmp_path / "reference", importance_callback=reference)
    assert reference.training_record() == WHOLE
    outs = _killed(tmp_path)
    # As a late save wrote it before the counter rewrote the entry: the counts of step 3 only, refused by name.
    stale = tmp_path / "stale"
    shutil.copytree(outs["late"], stale)
    path = stale / "checkpoint-5" / "trainer_state.json"
    state = json.loads(path.read_text())
    state["stateful_callbacks"]["hf_weightprune.training"] = {"global_step": 3, "steps": 3, "tokens": 192}
    path.write_text(json.dumps(state))
    for name, out in (*outs.items(), ("stale", stale)):
        resumed = make_callback(distill=True)
        run(out, resume=True, importance_callback=resumed)
        if name == "stale":
            with pytest.raises(ValueError, match="resumed at step 5 from a checkpoint that holds the training counts "
                                                 "of step 3 only"):
                resumed.training_record()
        else:
            assert resumed.training_record() == WHOLE, name


@pytest.mark.multiproc
def test_two_ranks_sigkilled_and_resumed_state_the_record_of_one_uninterrupted_process(tmp_path):
    """The same under `torchrun --nproc_per_node 2` (gloo, 2 windows per rank and step): both ranks killed at once
    after the checkpoint, resumed by a fresh `torchrun`; each rank's record is the whole run's, the tokens summed over
    the ranks, equal to one process's uninterrupted run over the same global batches."""
    from tests.scripts.ckpt_train import make_callback, run
    from tests.test_distributed import torchrun

    one = make_callback(distill=True)
    run(tmp_path / "one", importance_callback=one)
    for name, out in _killed(tmp_path, nproc=2).items():
        torchrun("tests.scripts.ckpt_train", str(out), "--distill", "--resume", "--record")
        records = [json.loads((out / f"training_record.rank{r}.json").read_text()) for r in (0, 1)]
        assert records == [one.training_record()] * 2 == [WHOLE] * 2, name
