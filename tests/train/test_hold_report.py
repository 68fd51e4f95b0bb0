"""A hold recovery's in-memory report (`cb.pruning_report(model)`) states what chose its masks, as the `sparsity.json`
`save_pruned` writes from it does: the criterion, scope, reconstruction and allocation of the prune its masks came
from (before, the report fell back to the schedule's default scope, `layer`, beside a `row`-scope card)."""

from __future__ import annotations

from transformers import Trainer

from hf_weightprune import ImportanceCallback, PruneConfig, PruneSchedule, load_sparsity, prune_, save_pruned
from hf_weightprune.prune.oneshot import oneshot_importance
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
