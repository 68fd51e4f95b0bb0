"""Expert statistics under DDP (2 processes, gloo, real Trainer) equal one process: expert slices' importance for a
weight, a gradient and an activation criterion, tokens routed to each expert, and the router statistics."""

from __future__ import annotations

import pytest
import torch

from hf_weightprune import load_importance

from . import dist_moe
from .test_distributed import ATOL_OF_MAX, RTOL, torchrun

pytestmark = pytest.mark.multiproc

CRITERIA = ["temporal_magnitude", "taylor", "wanda"]


def test_ddp_expert_statistics_equal_one_process(tmp_path):
    w1, w2 = str(tmp_path / "w1"), str(tmp_path / "w2")
    dist_moe.main(w1, CRITERIA)
    torchrun("tests.dist_moe", w2, *CRITERIA)
    for criterion in CRITERIA:
        a, b = load_importance(f"{w2}/{criterion}"), load_importance(f"{w1}/{criterion}")
        assert a.names == b.names and sum(".experts." in n for n in a.names) == 24
        assert a.num_samples == b.num_samples == dist_moe.STEPS
        assert a.meta.get("tokens", {}) == b.meta.get("tokens", {})  # tokens routed to each expert, summed over ranks
        for name in a.names:
            ref = b.state(name)
            torch.testing.assert_close(a.state(name), ref, rtol=RTOL, atol=ATOL_OF_MAX * ref.abs().max().item(),
                                       msg=f"{criterion} {name}")
        ra, rb = a.sections["router"], b.sections["router"]
        assert ra.keys() == rb.keys()
        for block in rb:
            assert (ra[block]["seen"], ra[block]["tokens"]) == (rb[block]["seen"], rb[block]["tokens"])
            torch.testing.assert_close(torch.tensor(ra[block]["gate_mass"]), torch.tensor(rb[block]["gate_mass"]),
                                       rtol=1e-5, atol=1e-5)
        assert sum(rb["model.layers.0.mlp"]["tokens"]) == 2 * rb["model.layers.0.mlp"]["seen"] > 0
