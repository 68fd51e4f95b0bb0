"""A hold recovery's in-memory report (`cb.pruning_report(model)`) states what chose its masks, as the `sparsity.json`
`save_pruned` writes from it does: the criterion, scope, reconstruction and allocation of the prune its masks came
from (before, the report fell back to the schedule's default scope, `layer`, beside a `row`-scope card), and the step
its re-fit ran at, if it ran (before, the card stated the configured `refit_at` whether or not the re-fit happened)."""

from __future__ import annotations

import pytest
from transformers import Trainer, TrainerCallback

from hf_weightprune import (
    DistillConfig,
    ImportanceCallback,
    ImportanceConfig,
    PruneConfig,
    PruneSchedule,
    load_sparsity,
    oneshot_importance,
    prune_,
    save_pruned,
)
from hf_weightprune.testing import TokenDataset, tiny_llama
from tests.helpers import training_args


def test_the_hold_report_states_the_source_prune_as_its_file_does(tmp_path):
    dense = tiny_llama(seed=5)
    source = prune_(dense, oneshot_importance(dense, "magnitude"), PruneConfig(sparsity=0.5, scope="row"),
                    progress=False)
    save_pruned(dense, tmp_path / "pruned", report=source)
    schedule = PruneSchedule(mode="hold", masks_from=str(tmp_path / "pruned"))
    assert schedule.prune_config.scope != "row"  # the fallback the report used to state
    cb = ImportanceCallback(schedule=schedule)
    args = training_args(tmp_path / "run", max_steps=2, per_device_train_batch_size=2, save_strategy="no")
    Trainer(model=dense, args=args, train_dataset=TokenDataset(n=8, seq_len=8), callbacks=[cb]).train()
    report = cb.pruning_report(dense)
    assert (report.scope, report.criterion, report.allocation) == ("row", "magnitude", "uniform")
    assert report.summary().startswith(source.summary().split(":")[0])  # e.g. "unstructured (row)"
    saved = load_sparsity(save_pruned(dense, tmp_path / "recovered", report=report, schedule=schedule))
    for key in ("scope", "criterion", "reconstruction", "allocation", "cross_term"):
        assert saved[key] == getattr(report, key), key


class StopAt(TrainerCallback):
    """Stops training at the end of step `step` (a run cut short, before its re-fit)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("stop_at", [None, 2])
def test_the_hold_report_states_the_step_its_refit_ran_at_and_none_when_it_did_not_run(tmp_path, stop_at):
    dense = tiny_llama(seed=5)
    report = prune_(dense, oneshot_importance(dense, "magnitude"), PruneConfig(sparsity=0.5), progress=False)
    save_pruned(dense, tmp_path / "pruned", report=report, write_card=False)
    schedule = PruneSchedule(mode="hold", masks_from=str(tmp_path / "pruned"), refit_at=0.75)  # step 3 of 4
    cb = ImportanceCallback(ImportanceConfig(criterion="sparsegpt"), schedule=schedule,
                            distill=DistillConfig(teacher=tiny_llama(seed=5), alpha=0.5, temperature=2.0))
    args = training_args(tmp_path / "run", max_steps=4, per_device_train_batch_size=2, save_strategy="no")
    callbacks = [cb] + ([StopAt(stop_at)] if stop_at else [])
    Trainer(model=dense, args=args, train_dataset=TokenDataset(n=8, seq_len=8), callbacks=callbacks).train()
    ran = None if stop_at else 3
    report = cb.pruning_report(dense)
    assert report.refitted_at == cb.mask_holder.refitted_at == ran
    out = save_pruned(dense, tmp_path / "recovered", report=report, schedule=schedule)
    assert load_sparsity(out)["refitted_at"] == ran
    card = (tmp_path / "recovered" / "README.md").read_text()
    if ran:
        assert "the kept weights were re-fitted at step 3 by least squares" in card and "75%" not in card
    else:
        assert "re-fitted" not in card
