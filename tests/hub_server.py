"""A loopback Hugging Face Hub server for tests (standard library only).

It implements the part of the Hub HTTP API that `huggingface_hub` (and `transformers.Trainer(push_to_hub=True)`)
call to create a repo, upload files with regular (inline, base64) commits, and download them again:

- `GET  /api/whoami-v2`
- `POST /api/repos/create` (409 + `url` when the repo exists, like the Hub) and `DELETE /api/repos/delete`
- `POST /api/validate-yaml`
- `GET  /api/{type}s/{repo_id}` and `/api/{type}s/{repo_id}/revision/{rev}` (repo info with `sha` and `siblings`)
- `GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]` (`recursive=true` supported)
- `GET  /api/{type}s/{repo_id}/refs`
- `POST /api/{type}s/{repo_id}/preupload/{rev}` (always answers `"regular"`: no LFS, no Xet)
- `POST /api/{type}s/{repo_id}/commit/{rev}` (NDJSON: header / file / deletedFile / deletedFolder)
- `POST /api/{type}s/{repo_id}/branch/{branch}`
- `GET|HEAD /{repo_id}/resolve/{rev}/{path}` (and `/{type}s/{repo_id}/resolve/...`), with `ETag`, `X-Repo-Commit`,
  `Content-Length` and single `Range` support.

Every write, and every read of a private repo, needs `Authorization: Bearer <token>` equal to the server's token.
A request carrying a wrong token is always refused (401), like the Hub does. Requests are logged in `requests_log`
with the `Authorization` value redacted, so tests can check that a token never leaks.

Usage in tests: the `hub_server` fixture (see `tests/conftest.py`) starts a server and points `huggingface_hub`
(and `transformers`) at it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

REDACTED = "<redacted>"
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_DEFAULT_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_oid(content: bytes) -> str:
    """The git blob id of `content`: what the Hub reports as `oid` / ETag for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, bytes]  # full snapshot: path -> content


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        # Short commit ids, like git
        if len(revision) >= 7:
            matches = [oid for oid in self.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return self.commits[matches[0]]
        return None


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra = extra or {}


class LoopbackHub:
    """In-memory Hub. Thread-safe: the HTTP server handles each connection in its own thread.

    Args:
        token (`str`, *optional*):
            The only valid user token. Random when not given.
        username (`str`, *optional*, defaults to `"tester"`):
            Namespace used when `create_repo` is called without one.
    """

    def __init__(self, *, token: str | None = None, username: str = "tester", host: str = "127.0.0.1", port: int = 0):
        self.token = token or "hf_loopback_" + secrets.token_hex(16)
        self.username = username
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests_log: list[dict] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LoopbackHub:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests

    def get_repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Snapshot of the files of `repo_id` at `revision`."""
        with self._lock:
            commit = self.get_repo(repo_id, repo_type).resolve(revision)
            if commit is None:
                raise KeyError(revision)
            return dict(commit.files)

    def create_repo(self, repo_id: str, *, private: bool = False, repo_type: str = "model") -> Repo:
        """Create a repo directly (no HTTP), with the Hub's initial commit holding `.gitattributes`."""
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, "You already created this repo", extra={"url": self.repo_url(repo_id, repo_type)})
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private, created_at=_now_iso())
            self.repos[(repo_type, repo_id)] = repo
            self._add_commit(repo, "main", "initial commit", "", {".gitattributes": _DEFAULT_GITATTRIBUTES})
            return repo

    def repo_url(self, repo_id: str, repo_type: str = "model") -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.endpoint}/{prefix}{repo_id}"

    # ------------------------------------------------------------------ internals

    def _add_commit(self, repo: Repo, branch: str, title: str, description: str, files: dict[str, bytes]) -> Commit:
        self._counter += 1
        parent = repo.branches.get(branch)
        digest = hashlib.sha1()
        digest.update(f"{parent}\n{title}\n{self._counter}\n{time.time_ns()}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_oid(files[path])}\n".encode())
        commit = Commit(digest.hexdigest(), parent, title, description, _now_iso(), files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


def _make_handler(hub: LoopbackHub):
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive, as `httpx` expects; every response carries a Content-Length.
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/0.1"
    timeout = 60
    hub: LoopbackHub

    # ------------------------------------------------------------------ plumbing

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr access log
        pass

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    # Trailer section ends with an empty line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _log_request(self, auth: str) -> None:
        headers = {}
        for key, value in self.headers.items():
            # Never keep the credential itself, only that one was sent
            headers[key] = REDACTED if key.lower() == "authorization" else value
        with self.hub._lock:
            self.hub.requests_log.append({"method": self.command, "path": self.path, "headers": headers, "auth": auth})

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str | None = None):
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers, "application/json; charset=utf-8")

    def _send_error(self, error: HubError, headers: dict | None = None):
        all_headers = {"X-Error-Message": error.message, **(headers or {})}
        if error.error_code:
            all_headers["X-Error-Code"] = error.error_code
        self._send_json(error.status, {"error": error.message, **error.extra}, all_headers)

    # ------------------------------------------------------------------ auth

    def _auth(self) -> str:
        """`"ok"` for the right token, `"missing"` without one, `"wrong"` otherwise."""
        value = self.headers.get("Authorization")
        if not value:
            return "missing"
        scheme, _, credential = value.partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(credential.strip(), self.hub.token):
            return "ok"
        return "wrong"

    @staticmethod
    def _require_auth(authorized: bool | None) -> None:
        if not authorized:
            raise HubError(401, "Invalid username or password.")

    def _get_repo(self, repo_type: str, repo_id: str, authorized: bool | None) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        # The Hub answers the same for a missing repo and a private one seen without credentials
        if repo is None or (repo.private and not authorized):
            raise HubError(
                401 if not authorized else 404,
                "Repository not found",
                error_code="RepoNotFound",
            )
        return repo

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")
        return commit

    # ------------------------------------------------------------------ routing

    def _dispatch(self):
        try:
            body = self._read_body()
            state = self._auth()
            self._log_request(state)
            if state == "wrong":
                # The Hub refuses a bad token even on public resources instead of falling back to anonymous
                raise HubError(401, "Invalid credentials in Authorization header")
            split = urlsplit(self.path)
            query = parse_qs(split.query)
            # Split before unquoting: branch names travel with `/` quoted as `%2F`.
            parts = [unquote(p) for p in split.path.strip("/").split("/")] if split.path.strip("/") else []
            with self.hub._lock:
                self._route(parts, query, body, state == "ok")
        except HubError as error:
            self._send_error(error)
        except (ValueError, KeyError, TypeError) as error:
            self._send_error(HubError(400, f"Bad request: {error}"))
        except Exception as error:  # a bug here must reach the test as an HTTP error, not a dropped connection
            self._send_error(HubError(500, f"Loopback Hub error: {error!r}"))

    def _route(self, parts: list[str], query: dict, body: bytes, authorized: bool | None):
        method = self.command
        if parts[:1] == ["api"]:
            rest = parts[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami(authorized)
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(body, authorized)
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(body, authorized)
            if rest == ["validate-yaml"] and method == "POST":
                return self._send_json(200, {"errors": [], "warnings": []})
            if len(rest) >= 3 and rest[0] in _REPO_TYPES:
                repo_type = _REPO_TYPES[rest[0]]
                repo_id = f"{rest[1]}/{rest[2]}"
                action, args = (rest[3], rest[4:]) if len(rest) > 3 else (None, [])
                if action is None and method == "GET":
                    return self._repo_info(repo_type, repo_id, "main", query, authorized)
                if action == "revision" and method == "GET" and len(args) == 1:
                    return self._repo_info(repo_type, repo_id, args[0], query, authorized)
                if action == "tree" and method == "GET" and args:
                    return self._tree(repo_type, repo_id, args[0], "/".join(args[1:]), query, authorized)
                if action == "refs" and method == "GET":
                    return self._refs(repo_type, repo_id, authorized)
                if action == "preupload" and method == "POST" and len(args) == 1:
                    return self._preupload(repo_type, repo_id, args[0], body, authorized)
                if action == "commit" and method == "POST" and len(args) == 1:
                    return self._commit(repo_type, repo_id, args[0], body, authorized)
                if action == "branch" and method == "POST" and len(args) == 1:
                    return self._create_branch(repo_type, repo_id, args[0], body, authorized)
            raise HubError(404, f"Not found: {method} {urlsplit(self.path).path}")
        # File download: /{ns}/{name}/resolve/{rev}/{path} or /{type}s/{ns}/{name}/resolve/...
        repo_type = "model"
        if parts and parts[0] in _REPO_TYPES and len(parts) > 4 and parts[3] == "resolve":
            repo_type, parts = _REPO_TYPES[parts[0]], parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), authorized)
        raise HubError(404, f"Not found: {method} {urlsplit(self.path).path}")

    # ------------------------------------------------------------------ endpoints

    def _whoami(self, authorized):
        self._require_auth(authorized)
        self._send_json(
            200,
            {
                "type": "user",
                "name": self.hub.username,
                "fullname": "Loopback Tester",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": "write"}},
            },
        )

    def _create_repo(self, body: bytes, authorized):
        self._require_auth(authorized)
        payload = json.loads(body or b"{}")
        name = payload["name"]
        namespace = payload.get("organization") or self.hub.username
        repo_type = payload.get("type") or "model"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = self.hub.create_repo(f"{namespace}/{name}", private=private, repo_type=repo_type)
        self._send_json(200, {"url": self.hub.repo_url(repo.repo_id, repo_type), "name": repo.repo_id})

    def _delete_repo(self, body: bytes, authorized):
        self._require_auth(authorized)
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self.hub.username}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        self._get_repo(repo_type, repo_id, authorized)
        del self.hub.repos[(repo_type, repo_id)]
        self._send_json(200, {})

    def _repo_info(self, repo_type, repo_id, revision, query, authorized):
        repo = self._get_repo(repo_type, repo_id, authorized)
        commit = self._resolve(repo, revision)
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=len(commit.files[path]), blobId=git_blob_oid(commit.files[path]))
            siblings.append(sibling)
        namespace = repo_id.split("/")[0]
        self._send_json(
            200,
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": namespace,
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            },
        )

    def _tree(self, repo_type, repo_id, revision, path, query, authorized):
        repo = self._get_repo(repo_type, repo_id, authorized)
        commit = self._resolve(repo, revision)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and prefix.rstrip("/") in commit.files:
            raise HubError(400, f"{path} is a file, not a folder")
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"Entry not found: {path}", error_code="EntryNotFound")
        entries: dict[str, dict] = {}
        for file_path, content in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            relative = file_path[len(prefix) :].split("/")
            # Folders on the way to the file
            depth = len(relative) - 1 if recursive else min(1, len(relative) - 1)
            for i in range(depth):
                folder = prefix + "/".join(relative[: i + 1])
                entries.setdefault(
                    folder,
                    {
                        "type": "directory",
                        "oid": hashlib.sha1(f"{commit.oid}:{folder}".encode()).hexdigest(),
                        "size": 0,
                        "path": folder,
                    },
                )
            if recursive or len(relative) == 1:
                entries[file_path] = {
                    "type": "file",
                    "oid": git_blob_oid(content),
                    "size": len(content),
                    "path": file_path,
                }
        self._send_json(200, [entries[k] for k in sorted(entries)])

    def _refs(self, repo_type, repo_id, authorized):
        repo = self._get_repo(repo_type, repo_id, authorized)
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in sorted(repo.branches.items())
        ]
        self._send_json(200, {"branches": branches, "converts": [], "tags": []})

    def _preupload(self, repo_type, repo_id, revision, body, authorized):
        self._require_auth(authorized)
        repo = self._get_repo(repo_type, repo_id, authorized)
        commit = repo.resolve(revision)
        payload = json.loads(body)
        files = []
        for item in payload["files"]:
            existing = commit.files.get(item["path"]) if commit is not None else None
            # Always "regular": files are then sent inline in the commit payload, so neither LFS nor Xet is used.
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(existing) if existing is not None else None,
                }
            )
        self._send_json(200, {"files": files, "commitOid": commit.oid if commit is not None else None})

    def _commit(self, repo_type, repo_id, revision, body, authorized):
        self._require_auth(authorized)
        repo = self._get_repo(repo_type, repo_id, authorized)
        if revision not in repo.branches:
            if repo.resolve(revision) is not None:
                raise HubError(400, f"Cannot commit to a commit id: {revision}")
            raise HubError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")
        head = repo.commits[repo.branches[revision]]
        files = dict(head.files)
        header = None
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
                parent = value.get("parentCommit")
                if parent is not None and not head.oid.startswith(parent):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", error_code="EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                matched = [p for p in files if p.startswith(folder)]
                if not matched:
                    raise HubError(404, "A folder with this name doesn't exist", error_code="EntryNotFound")
                for p in matched:
                    del files[p]
            elif key == "lfsFile":
                raise HubError(400, "This loopback Hub only accepts regular (inline) files")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        if header is None:
            raise HubError(400, "Missing commit header")
        commit = self.hub._add_commit(
            repo, revision, header.get("summary") or "", header.get("description") or "", files
        )
        self._send_json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.repo_url(repo_id, repo_type)}/commit/{commit.oid}",
                "hookOutput": "",
            },
        )

    def _create_branch(self, repo_type, repo_id, branch, body, authorized):
        self._require_auth(authorized)
        repo = self._get_repo(repo_type, repo_id, authorized)
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        payload = json.loads(body or b"{}")
        start = self._resolve(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        self._send_json(200, {})

    def _resolve_file(self, repo_type, repo_id, revision, path, authorized):
        repo = self._get_repo(repo_type, repo_id, authorized)
        commit = self._resolve(repo, revision)
        headers = {"X-Repo-Commit": commit.oid}
        content = commit.files.get(path)
        if content is None:
            # The Hub sends the commit even on a miss, so `hf_hub_download` can cache the non-existence
            return self._send_error(HubError(404, "Entry not found", error_code="EntryNotFound"), headers)
        headers.update({"ETag": f'"{git_blob_oid(content)}"', "Accept-Ranges": "bytes"})
        status, body = 200, content
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and "," not in range_header:
            start_s, _, end_s = range_header[len("bytes=") :].partition("-")
            start = int(start_s) if start_s else max(0, len(content) - int(end_s))
            end = int(end_s) if (start_s and end_s) else len(content) - 1
            if start >= len(content):
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"})
            end = min(end, len(content) - 1)
            status, body = 206, content[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        self._send(status, body, headers, "application/octet-stream")


def resolve_url(endpoint: str, repo_id: str, revision: str, path: str) -> str:
    """URL of a file on the loopback Hub, quoted the way `huggingface_hub.hf_hub_url` quotes it."""
    return f"{endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"


@contextlib.contextmanager
def patched_hub_environment(hub: LoopbackHub, tmp_path: os.PathLike, monkeypatch):
    """Point `huggingface_hub` (and `transformers` if imported) at `hub`, with a private cache and no token.

    `huggingface_hub.constants` reads its environment at import time, so the env vars alone are not enough once it is
    imported: the module attributes are patched too. Everything is restored by `monkeypatch` afterwards.
    """
    import sys

    from huggingface_hub import constants

    home = os.path.join(os.fspath(tmp_path), "hf_home")
    cache = os.path.join(home, "hub")
    os.makedirs(cache, exist_ok=True)
    env = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": home,
        "HF_HUB_CACHE": cache,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_TOKEN_PATH": os.path.join(home, "token"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # A token from the developer's machine must neither be used nor sent to the loopback server
    for key in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HUGGINGFACE_CO_STAGING",
    ):
        monkeypatch.delenv(key, raising=False)

    patches = {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": getattr(constants, "HF_URL_HOSTS", frozenset()) | {"127.0.0.1"},  # hub >= 1.18
        "HF_HOME": home,
        "HF_HUB_CACHE": cache,
        "HUGGINGFACE_HUB_CACHE": cache,
        "HF_ASSETS_CACHE": os.path.join(home, "assets"),
        "HF_XET_CACHE": os.path.join(home, "xet"),
        "HF_TOKEN_PATH": env["HF_TOKEN_PATH"],
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    # `transformers` shares one HfApi built with the endpoint of its first use: build a fresh one for this server.
    hub_module = sys.modules.get("transformers.utils.hub")
    if hub_module is not None and hasattr(hub_module, "_hf_api"):
        monkeypatch.setattr(hub_module, "_hf_api", None)
    yield hub
