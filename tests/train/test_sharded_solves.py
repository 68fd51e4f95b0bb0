"""The schedule's per-weight solves (OBS sweeps of the mask updates, the re-fit) shared across ranks by their cost.

Under DDP each weight is solved by one rank and broadcast from it; one process solves every weight. Real
`torchrun --nproc_per_node 2` launches (gloo, CPU; `multiproc`), the solves counted by `MaskHolder.solves`.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_weightprune.distributed import partition, same_error_on_every_rank
from hf_weightprune.prune.refit import refit_solver, sweep_flops
from tests import ddp_solves


def test_partition_by_cost_is_balanced_and_deterministic():
    # An MLP-heavy layer stack: down_proj's sweep (in=1536) costs far more than its element count says.
    shapes = {f"layers.{i}.{k}": s for i in range(4) for k, s in
              {"q_proj": (576, 576), "k_proj": (192, 576), "down_proj": (576, 1536), "up_proj": (1536, 576)}.items()}
    costs = {n: sweep_flops(*s) for n, s in shapes.items()}
    owners = partition(costs, 3)
    assert owners == partition(dict(reversed(costs.items())), 3)  # the same plan whatever the names' order
    loads = [sum(c for n, c in costs.items() if owners[n] == r) for r in range(3)]
    # greedy, largest first: no rank above the mean by more than the largest single solve
    assert max(loads) - sum(loads) / 3 <= max(costs.values())
    assert all(owners[f"layers.{i}.down_proj"] != owners[f"layers.{i + 1}.down_proj"] for i in range(2))
    assert partition(costs, 1) == dict.fromkeys(costs, 0)


def test_solve_costs():
    assert sweep_flops(576, 1536) == 1536.0**3 + 576 * 1536.0**2
    counts = torch.full((8,), 4)
    assert refit_solver(counts, in_features=8) == ("exact", 8 * 4**3 / 3)
    big = torch.full((4096,), 4096)  # 4096 rows of 4096^3 / 3: past the exact solve's 2.5e11, swept instead
    assert refit_solver(big, in_features=8192) == ("sweep", sweep_flops(4096, 8192))


def test_one_process_raises_in_place_and_solves_every_weight(tmp_path):
    with pytest.raises(KeyError), same_error_on_every_rank():  # no collective, the error as raised
        raise KeyError("w")
    _, record = ddp_solves.run(str(tmp_path), batch=4)
    solves = record["solves"]
    assert record["refitted_at"] == ddp_solves.REFIT and record["reconstruction"] == "OBS"
    # every masked weight: swept at both updates and re-fitted once, all in this process
    assert len(solves) == 14 and set(solves.values()) == {len(ddp_solves.UPDATES) + 1}


@pytest.mark.multiproc
def test_ddp_two_processes_share_the_solves_and_equal_one(tmp_path):
    from tests.test_distributed import ATOL_OF_MAX, RTOL, torchrun

    torchrun("tests.ddp_solves", str(tmp_path))
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)  # each owner's bits everywhere
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    one, single = ddp_solves.run(str(tmp_path / "single"), batch=4)
    assert single["solves"] and all(r["refitted_at"] == ddp_solves.REFIT for r in (*records, single))
    # Each solve ran on exactly one rank: the two ranks' counts add up to one process's, and each rank ran a share
    # (every rank solving every weight, as before, would count each solve twice).
    solves = [r["solves"] for r in records]
    assert {n: solves[0].get(n, 0) + solves[1].get(n, 0) for n in single["solves"]} == single["solves"]
    total = sum(single["solves"].values())
    assert all(0.25 * total <= sum(s.values()) <= 0.75 * total for s in solves), solves
    assert one.keys() == r0.keys()
    for k, want in one.items():
        if k.startswith("mask."):
            assert torch.equal(r0[k], want), k
            continue
        # The same tokens summed in another order (two partial Hessians all-reduced), then the sweeps and the re-fit
        # solved from them: the tolerance of the other DDP-vs-one-process tests (measured: 4.0e-5 of max|w|).
        torch.testing.assert_close(r0[k], want, rtol=RTOL, atol=ATOL_OF_MAX * float(want.abs().max()), msg=k)
    moved = [k for k in one if k.startswith("weight.") and f"mask.{k.removeprefix('weight.')}" in one]
    assert moved and all(not bool(r0[k][~r0[f"mask.{k.removeprefix('weight.')}"].bool()].any()) for k in moved)


@pytest.mark.multiproc
def test_a_failure_on_one_rank_is_raised_on_every_rank_and_views_broadcast(tmp_path):
    from tests.test_distributed import torchrun

    torchrun("tests.ddp_solves", str(tmp_path), "--collectives", timeout=120)
    caught = [json.loads((tmp_path / f"collectives{r}.json").read_text()) for r in (0, 1)]
    message = "w1: its input Hessian is not positive definite"
    assert caught[1][:3] == [["ValueError", message], ["KeyError", repr(message)], 2]  # its own errors, as raised
    assert caught[0][:3] == [["ValueError", message], ["RuntimeError", f"rank 1 failed: KeyError: {repr(message)}"], 2]
    # rank 0's expert 1 holds rank 1's 3 x 3 values in its odd rows only; expert 0 and rank 1 are untouched
    assert caught[0][3] == [0.0, 9.0] and caught[1][3] == [18.0, 18.0]
