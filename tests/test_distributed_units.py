"""Unit statistics (`ImportanceConfig(units=True)`) under DDP: 2 processes on gloo equal 1 process on the same global
batches, in the final importance, in the checkpoint a resume reads, and after a resume across world sizes.

The launcher and the training script are those of `test_distributed.py` (`tests/dist_ddp.py --units`).
"""

from __future__ import annotations

import os

import pytest
import torch

from hf_weightprune import load_importance

from . import dist_ddp
from .test_distributed import ATOL_OF_MAX, RTOL, _copy_checkpoint, torchrun

pytestmark = pytest.mark.multiproc

# wanda: the per-weight statistic is activation-based as most unit ones; the Taylor unit sums read the gradients.
CRITERION = "wanda"


def _assert_same_units(got, expected):
    """Every unit statistic (neurons, KV groups, hidden channels, layers; activation, Taylor, block influence) and
    every token count of two importances."""
    a, b = got.unit_state(), expected.unit_state()
    assert a.keys() == b.keys()
    kinds = {k.split(".", 2)[-1] for k in b if k.startswith("layers.")}
    assert {"influence", "hidden.abs", "hidden.sq", "neurons.abs", "neurons.sq", "heads.norm", "heads.sq", "taylor",
            "taylor.neurons", "taylor.heads", "tokens"} <= kinds, sorted(kinds)
    assert {"taylor.hidden", "taylor.steps"} <= b.keys()
    for key, ref in b.items():
        if not ref.is_floating_point():  # token counts: exact
            assert torch.equal(a[key], ref), key
            continue
        # as for the per-weight statistics (test_distributed.py): all-reduced gradients differ in summation order,
        # which AdamW turns into weight differences of ~1e-6
        torch.testing.assert_close(a[key], ref, rtol=RTOL, atol=ATOL_OF_MAX * ref.abs().max().item(), msg=key)


def test_ddp_unit_statistics_equal_single_process(tmp_path):
    w1, w2 = str(tmp_path / "w1"), str(tmp_path / "w2")
    c = CRITERION
    dist_ddp.main(w1, [c], units=True)
    _copy_checkpoint(os.path.join(w1, f"{c}-full"), os.path.join(w2, f"{c}-resume"))  # 1 -> 2 processes
    torchrun("tests.dist_ddp", w2, "--units", c)

    one = load_importance(os.path.join(w1, f"{c}-full"))
    assert one.meta["world_size"] == 1 and one.has_units
    two = load_importance(os.path.join(w2, f"{c}-full", "importance"))
    assert two.meta["world_size"] == 2
    _assert_same_units(two, one)
    _assert_same_units(load_importance(os.path.join(w2, f"{c}-full", "checkpoint-3")),
                       load_importance(os.path.join(w1, f"{c}-full", "checkpoint-3")))
    _assert_same_units(load_importance(os.path.join(w2, f"{c}-resume")), one)
    # and the scores structured pruning ranks by
    for statistic in ("activation", "taylor"):
        s1, s2 = one.unit_scores(statistic), two.unit_scores(statistic)
        assert s2.keys() == s1.keys()
        for axis in ("neurons", "heads"):
            for i, ref in s1[axis].items():
                torch.testing.assert_close(s2[axis][i], ref, rtol=RTOL, atol=ATOL_OF_MAX * ref.abs().max().item())
        for axis in ("hidden", "layers"):
            torch.testing.assert_close(s2[axis], s1[axis], rtol=RTOL, atol=ATOL_OF_MAX * s1[axis].abs().max().item())
