import os

# Two-core machines: intra-op threads fighting over cores slow tiny-model steps ~20x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.hub_server import LoopbackHub, patched_hub_environment  # noqa: E402
from tests.scripts.ckpt_train import run  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A loopback Hub on a free 127.0.0.1 port, with `huggingface_hub` pointed at it and a private cache.

    Yields the [`LoopbackHub`]: `hub_server.endpoint`, `hub_server.token` (the only valid token),
    `hub_server.requests_log` (Authorization values redacted) and `hub_server.files(repo_id)`.
    """
    with LoopbackHub() as hub, patched_hub_environment(hub, tmp_path, monkeypatch):
        yield hub


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted `tests.scripts.ckpt_train` runs (saves at steps 3, 6, 8 of 8, as the killed runs), one per
    criterion, made on first use: `reference(criterion)` returns its output_dir."""
    root, done = tmp_path_factory.mktemp("reference"), {}

    def get(criterion: str) -> Path:
        if criterion not in done:
            run(root / criterion, criterion)
            done[criterion] = root / criterion
        return done[criterion]

    return get
