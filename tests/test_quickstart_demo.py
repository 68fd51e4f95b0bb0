"""The README's first Quickstart command runs `examples/quickstart.py` (after building `.venv`): run that script here
with fewer steps, so a change that breaks the demo fails the suite, not a newcomer's first try."""

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_trains_prunes_and_writes_checkpoint_card_and_plot(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output_dir", str(out),
                          "--max_steps", "8"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    pruned = out / "pruned"
    for name in ("README.md", "sparsity.json", "sweep.png", "sweep.csv", "model.safetensors", "config.json"):
        assert (pruned / name).is_file(), name
    assert (pruned / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((pruned / "sparsity.json").read_text())
    weights = load_file(str(pruned / "model.safetensors"))
    zeros = sum(int((weights[n] == 0).sum()) for n in record["tensors"])
    numel = sum(weights[n].numel() for n in record["tensors"])
    assert abs(zeros / numel - 0.5) < 0.01 and abs(record["global_sparsity"] - zeros / numel) < 1e-6
    assert (out / "train" / "importance").is_dir()
    card = (pruned / "README.md").read_text()
    assert "sweep.png" in card and "wanda" in card
    assert f"{100 * record['global_sparsity']:.2f}%" in card  # the card states what the weights hold
    assert str(out / "pruned") in run.stdout  # it says where its outputs are
