"""Files are written with the process umask, like `save_pretrained` (0644 under umask 022, 0640 under 027): the
atomic writers' temporary files come from mkstemp (0600), whose mode a rename would publish."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hf_weightprune import PruneConfig, oneshot_importance, prune_, save_pruned
from hf_weightprune.io_utils import atomic_write_text, process_umask
from hf_weightprune.testing import save_importance_dir, tiny_llama
from hf_weightprune.tools.sweep import write_results

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_process_umask_reads_without_changing_it(umask):
    assert process_umask() == umask
    assert process_umask() == umask  # reading did not reset it


def test_pruned_folder_importance_and_sweep_files_follow_the_umask(tmp_path, umask):
    expected = 0o666 & ~umask
    model = tiny_llama(seed=0)
    imp = oneshot_importance(model, "magnitude")
    save_importance_dir(str(tmp_path / "imp"), imp.state_dict(), config=imp.config, meta=imp.meta, shapes=imp.shapes)
    report = prune_(model, imp, PruneConfig(sparsity=0.5), progress=False)
    out = Path(save_pruned(model, tmp_path / "pruned", report=report))
    reference = out / "config.json"  # written by save_pretrained with a plain open()
    assert _mode(reference) == expected
    files = [p for p in out.iterdir() if p.is_file()]
    assert {"README.md", "sparsity.json", "model.safetensors"} <= {p.name for p in files}
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: oct(expected) for p in files}
    # The importance folder: JSON by atomic writes, safetensors by safetensors itself (0600 from 0.5 on); the one
    # folder publish (io_utils.publish_folder) gives them all the umask's modes, like the pruned folder.
    imp_files = [p for p in (tmp_path / "imp").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in imp_files)
    assert imp_files and {p.name: _mode(p) for p in imp_files} == {p.name: expected for p in imp_files}

    atomic_write_text(tmp_path / "note.txt", "x")
    assert _mode(tmp_path / "note.txt") == expected

    write_results([{"criterion": "magnitude", "sparsity": 0.5, "loss": 3.0, "perplexity": 20.1}], tmp_path / "sweep")
    sweep_files = [p for p in (tmp_path / "sweep").iterdir() if p.is_file()]
    assert sweep_files and all(_mode(p) == expected for p in sweep_files), {p.name: oct(_mode(p)) for p in sweep_files}


def test_plots_follow_the_umask(tmp_path, umask):
    pytest.importorskip("matplotlib")
    from hf_weightprune.tools.sweep_plot import plot_sweep

    path = plot_sweep([{"criterion": "magnitude", "sparsity": 0.5, "loss": 3.0, "perplexity": 20.1}], tmp_path / "sweep.png")
    assert Path(path).is_file() and _mode(Path(path)) == 0o666 & ~umask
