import pytest

from tests.hub_server import LoopbackHub, patched_hub_environment


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A loopback Hub on a free 127.0.0.1 port, with `huggingface_hub` pointed at it and a private cache.

    Yields the [`LoopbackHub`]: `hub_server.endpoint`, `hub_server.token` (the only valid token),
    `hub_server.requests_log` (Authorization values redacted) and `hub_server.files(repo_id)`.
    """
    with LoopbackHub() as hub, patched_hub_environment(hub, tmp_path, monkeypatch):
        yield hub
