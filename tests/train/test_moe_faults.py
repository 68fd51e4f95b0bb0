"""SIGKILL + resume of a mixture-of-experts run (issue 26): expert slice statistics and router statistics equal an
uninterrupted run's.

Real Trainer runs of `tests/scripts/ckpt_train.py --arch ...` (saves at steps 3, 6, 8 of 8; the resume crosses an
epoch boundary), a real SIGKILLed subprocess, real safetensors files. Two kill points, one per architecture:

- Mixtral (wanda: the inputs routed to each expert): killed once checkpoint-3 is complete, resumed from it;
- Qwen3-MoE (taylor: each slice's gradient): killed after the Trainer wrote checkpoint-6 but before the staged
  importance (router statistics included) was moved into it; the resume publishes the staged one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hf_weightprune import load_importance
from hf_weightprune.files import importance_files as F
from hf_weightprune.train.callback import STAGING_DIR
from tests.helpers import assert_same_importance, leftovers, sigkill_at_hang, workdir
from tests.scripts.ckpt_train import run

KILLS = {
    "mixtral": ("wanda", ["--hang-after-save", "3"]),
    "qwen3_moe": ("taylor", ["--hang-in", "publish", "--hang-call", "2"]),  # 2nd publish: step 6
}


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """Both MoE runs, SIGKILLed at their hang points (started together: imports dominate)."""
    runs = {arch: ["--arch", arch, "--criterion", criterion, *argv] for arch, (criterion, argv) in KILLS.items()}
    return sigkill_at_hang(tmp_path_factory.mktemp("killed_moe"), runs)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root, done = tmp_path_factory.mktemp("reference_moe"), {}

    def get(arch: str) -> Path:
        if arch not in done:
            run(root / arch, KILLS[arch][0], arch=arch)
            done[arch] = root / arch
        return done[arch]

    return get


def assert_same_run(got: Path, expected: Path) -> None:
    """Same importance (expert slices included) and the same router statistics, bit for bit."""
    a, b = load_importance(got), load_importance(expected)
    assert_same_importance(a, b)
    assert a.sections["router"] == b.sections["router"]


@pytest.mark.parametrize("arch", sorted(KILLS))
def test_sigkill_and_resume_equal_the_uninterrupted_run(arch, killed, uninterrupted, tmp_path, caplog):
    criterion = KILLS[arch][0]
    out = workdir(killed, arch, tmp_path)
    last = 3 if arch == "mixtral" else 6
    assert not (out / f"checkpoint-{last + 3}").exists() and not (out / F.IMPORTANCE_DIR).exists()
    if arch == "qwen3_moe":  # killed between the Trainer's checkpoint and the move of the staged importance
        assert not (out / "checkpoint-6" / F.IMPORTANCE_DIR).exists() and (out / STAGING_DIR).is_dir()
    with caplog.at_level(logging.WARNING, logger="hf_weightprune.train.callback"):
        run(out, criterion, resume=True, arch=arch)
    if arch == "qwen3_moe":
        assert "used the complete importance of step 6 staged in" in caplog.text
    ref = uninterrupted(arch)
    final = load_importance(ref)
    experts = [n for n in final.names if ".mlp.experts." in n]
    assert len(experts) == 2 * 4 * 3  # every expert slice of both layers is tracked (and compared below)
    router = final.sections["router"]
    assert set(router) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    # 8 steps x 4 windows x 16 tokens, each routed to 2 experts
    assert all(r["seen"] == 8 * 4 * 16 and sum(r["tokens"]) == 2 * r["seen"] for r in router.values())
    for sub in (f"checkpoint-{last}", "checkpoint-8", ""):
        assert_same_run(out / sub, ref / sub)
    assert not leftovers(out)
