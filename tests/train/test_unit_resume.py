"""Unit statistics (`ImportanceConfig(units=True)`) survive a SIGKILL: a run killed after checkpoint-6 and resumed
ends with the unit statistics of an uninterrupted run, in the final importance and in every checkpoint.

The killed run is a real subprocess of `tests/scripts/ckpt_train.py --units`, killed as `test_checkpoint.py` kills
its runs; the reference is the same script's uninterrupted run, in process.
"""

from __future__ import annotations

import pytest
import torch

from hf_weightprune import load_importance
from tests.helpers import assert_same_importance, leftovers, sigkill_at_hang, snapshot, workdir
from tests.scripts.ckpt_train import make_callback, run

# taylor: the unit Taylor sums are taken once per optimizer step, the activation ones per forward; both must resume.
CRITERION = "taylor"


def _assert_same_units(got, expected):
    a, b = load_importance(got).unit_state(), load_importance(expected).unit_state()
    assert a.keys() == b.keys()
    assert any(k.endswith(".influence") for k in b) and any(k.endswith("taylor.neurons") for k in b)
    for key, ref in b.items():
        if ref.is_floating_point():
            torch.testing.assert_close(a[key], ref, rtol=1e-6, atol=0, msg=key)
        else:  # token and step counts
            assert torch.equal(a[key], ref), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the killed run's root, the uninterrupted reference run)."""
    killed = sigkill_at_hang(tmp_path_factory.mktemp("killed"),
                             {"units": ["--criterion", CRITERION, "--units", "--hang-after-save", "6"]})
    reference = tmp_path_factory.mktemp("reference") / "run"
    run(reference, CRITERION, importance_callback=make_callback(CRITERION, units=True))
    return killed, reference


def test_sigkill_after_save_then_resume_gives_the_unit_statistics_of_an_uninterrupted_run(runs, tmp_path):
    killed, reference = runs
    out = workdir(killed, "units", tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert load_importance(out / "checkpoint-6").has_units
    cb = make_callback(CRITERION, units=True)
    run(out, CRITERION, resume=True, importance_callback=cb)
    assert int(cb.importance().unit_state()["taylor.steps"]) == 8  # 6 restored + 2 after the resume
    for sub in ("checkpoint-6", "checkpoint-8", "."):
        _assert_same_units(out / sub, reference / sub)
    assert_same_importance(out, reference)  # and the per-weight statistics beside them
    assert not leftovers(out)


def test_a_resume_that_drops_the_unit_statistics_is_refused_in_one_line(runs, tmp_path):
    # Resuming without them would silently lose the statistics gathered so far: refused, naming the change.
    killed, _ = runs
    out = workdir(killed, "units", tmp_path)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"importance config changed since \S+: units: checkpoint True -> now False") as e:
        run(out, CRITERION, resume=True, importance_callback=make_callback(CRITERION))
    assert "\n" not in str(e.value)
    assert snapshot(out) == before
