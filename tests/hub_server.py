"""A tiny in-memory fake of the Hugging Face Hub HTTP API, served on 127.0.0.1, for Hub round-trip tests.

It implements just what `huggingface_hub` 2.x calls for `create_repo`, `create_branch`, `upload_folder` /
`create_commit` (preupload + NDJSON commit; every file is answered ``uploadMode: "regular"`` so contents
arrive base64-inlined in the commit: no LFS, no Xet), `repo_info`/`model_info`, `list_repo_tree`,
`snapshot_download`/`hf_hub_download` (``HEAD``/``GET`` on ``/{repo_id}/resolve/{revision}/{path}``) and
`whoami`. Repos keep their full commit history, so downloading an older commit sha works. Unknown routes
answer 404 with a JSON error and are logged and recorded in `FakeHub.unknown_requests`.

Why a subprocess: `huggingface_hub` reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``,
``HF_HOME`` ... into `huggingface_hub.constants` at import time, and `tests/conftest.py` turns offline mode
on for the whole test session. So the client side of a round trip runs the way a user would run it: in a
fresh Python process whose environment points at the fake Hub. The server runs in the pytest process, so
the test can inspect (or seed) its state directly.

Usage from another test module (``tests/`` is on `sys.path` under pytest)::

    from hub_server import fake_hub, run_with_hub  # noqa: F401  (fake_hub is a pytest fixture)

    def test_round_trip(fake_hub, tmp_path):
        write_files_atomically(tmp_path / "art", {"a.safetensors": data, "config.json": cfg})  # in-process
        result = run_with_hub(fake_hub, f'''
            import json
            from meerkat_hf.hub import push_folder, resolve_folder
            url = push_folder({str(tmp_path / "art")!r}, "me/mask", commit_message="v1")
            folder = resolve_folder("me/mask", cache_dir={str(tmp_path / "cache")!r})
            print(json.dumps({{"url": url, "folder": str(folder)}}))
        ''')
        out = json.loads(result.stdout.splitlines()[-1])
        assert fake_hub.files("me/mask")["config.json"] == cfg                 # server state, in-process
        assert (Path(out["folder"]) / "config.json").read_bytes() == cfg       # what the client got

`run_with_hub` dedents the script, runs it with ``{**os.environ, **fake_hub.env}`` (repo root on
``PYTHONPATH``) and raises `AssertionError` with the script's stdout/stderr if it exits non-zero; use
``print(json.dumps(...))`` as the script's last output line to get values back (mind the doubled braces in
f-strings). `FakeHub.commit` seeds a repo without any client, for download-only tests; `FakeHub.files`,
`history`, `repos`, `requests` and `unknown_requests` show what the client did.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import traceback
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = ["FakeHub", "fake_hub", "run_with_hub"]

logger = logging.getLogger("hub_server")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BRANCH = "main"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_ID_RE = re.compile(r"^(?:[\w\-.]{1,96}/)?[\w\-.]{1,96}$")


def git_blob_sha1(data: bytes) -> str:
    """Git blob id of `data`: what the Hub reports as `oid`/ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch name or "refs/pr/N" -> commit oid
    num_prs: int = 0
    created_at: str = field(default_factory=_now)


class HubError(Exception):
    """Raised inside a route to answer an error the way the Hub does (status, X-Error-Code, JSON body)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers or {})


class FakeHub:
    """In-memory Hub (repos -> commits -> files) served over HTTP on 127.0.0.1 by a background thread.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT``.
        env: environment for a client process (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME`, offline/Xet off, ...).
        token: the only token accepted for writes (`"fake-token"`).
        requests: ``(method, path)`` of every request served, in order.
        unknown_requests: ``"METHOD path"`` of requests no route matched (a test can assert it is empty).
        errors: tracebacks of exceptions raised by route handlers (answered as 500).
    """

    def __init__(self, home: str | os.PathLike[str], *, token: str = "fake-token", user: str = "fake-user"):
        self.token = token
        self.user = user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.user_agents: list[str] = []  # the User-Agent of every request
        self.unknown_requests: list[str] = []
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        home = Path(home)
        no_proxy = ",".join(x for x in ("127.0.0.1", "localhost", os.environ.get("NO_PROXY", "")) if x)
        self.env: dict[str, str] = {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_TOKEN": token,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),  # an inherited HF_HUB_CACHE would otherwise win over HF_HOME
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state helpers for tests (in-process, no HTTP) -----------------------------------------------

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo with the Hub's initial commit (a `.gitattributes`), or return the existing one."""
        with self._lock:
            key = (repo_type, repo_id)
            if key not in self.repos:
                repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private)
                self.repos[key] = repo
                self._add_commit(repo, DEFAULT_BRANCH, None, "initial commit", {".gitattributes": GITATTRIBUTES})
            return self.repos[key]

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        message: str = "seed",
        revision: str = DEFAULT_BRANCH,
        repo_type: str = "model",
        deletions: tuple[str, ...] = (),
    ) -> str:
        """Seed a commit directly (creating the repo/branch if needed); returns the commit sha."""
        with self._lock:
            repo = self.create_repo(repo_id, repo_type=repo_type)
            base = repo.refs.get(revision, repo.refs[DEFAULT_BRANCH])
            new_files = dict(repo.commits[base].files)
            for path in deletions:
                new_files.pop(path, None)
            new_files.update(files)
            return self._add_commit(repo, revision, base, message, new_files).oid

    def files(self, repo_id: str, revision: str = DEFAULT_BRANCH, *, repo_type: str = "model") -> dict[str, bytes]:
        """Files at `revision` (branch, `refs/pr/N` or commit sha)."""
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            return dict(repo.commits[self._resolve(repo, revision)].files)

    def history(self, repo_id: str, revision: str = DEFAULT_BRANCH, *, repo_type: str = "model") -> list[str]:
        """Commit shas reachable from `revision`, newest first (the initial commit is last)."""
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            oid: str | None = self._resolve(repo, revision)
            out = []
            while oid is not None:
                out.append(oid)
                oid = repo.commits[oid].parent
            return out

    # -- internals ---------------------------------------------------------------------------------

    def _add_commit(self, repo: Repo, ref: str, parent: str | None, message: str, files: dict[str, bytes]) -> Commit:
        oid = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{message}\0{uuid.uuid4()}".encode()).hexdigest()
        commit = Commit(oid=oid, parent=parent, message=message, files=files)
        repo.commits[oid] = commit
        repo.refs[ref] = oid
        return commit

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> str:
        if revision in repo.refs:
            return repo.refs[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"


# --------------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------------

_TYPES = r"(?P<type>models|datasets|spaces)"
_Route = tuple[str, re.Pattern[str], str]
_ROUTES: list[_Route] = [
    (m, re.compile(p), h)
    for m, p, h in [
        ("GET", r"^/api/whoami-v2$", "whoami"),
        ("GET", r"^/api/agent-harnesses$", "agent_harnesses"),
        ("GET", r"^/api/models$", "list_models"),
        ("POST", r"^/api/repos/create$", "create_repo"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
        ("POST", rf"^/api/{_TYPES}/(?P<repo>.+?)/preupload/(?P<rev>[^/]+)$", "preupload"),
        ("POST", rf"^/api/{_TYPES}/(?P<repo>.+?)/commit/(?P<rev>[^/]+)$", "commit"),
        ("POST", rf"^/api/{_TYPES}/(?P<repo>.+?)/branch/(?P<rev>[^/]+)$", "create_branch"),
        ("GET", rf"^/api/{_TYPES}/(?P<repo>.+?)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", "tree"),
        ("GET", rf"^/api/{_TYPES}/(?P<repo>.+?)/revision/(?P<rev>[^/]+)$", "info"),
        ("GET", rf"^/api/{_TYPES}/(?P<repo>[^/]+(?:/[^/]+)?)$", "info"),
        ("GET", r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
        ("HEAD", r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
    ]
]


def _front_matter(text: str) -> dict[str, Any] | None:
    """YAML metadata of a README.md (None when there is no front matter). Raises on invalid YAML."""
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", text, re.DOTALL)
    if match is None:
        return None
    data = yaml.safe_load(match.group(1))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("metadata must be a YAML mapping")
    return data


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries a Content-Length
    hub: FakeHub

    # -- plumbing ----------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s - " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.body = self._read_body()
        self.hub.requests.append((method, split.path))
        self.hub.user_agents.append(self.headers.get("User-Agent", ""))
        for route_method, pattern, name in _ROUTES:
            match = pattern.match(split.path) if route_method == method else None
            if match is None:
                continue
            params = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
            try:
                with self.hub._lock:
                    getattr(self, f"route_{name}")(**params)
            except HubError as err:
                self._error(err)
            except Exception:
                tb = traceback.format_exc()
                self.hub.errors.append(tb)
                logger.error("fake hub: %s %s failed:\n%s", method, self.path, tb)
                self._error(HubError(500, f"fake hub internal error: {tb.splitlines()[-1]}"))
            return
        logger.warning("fake hub: no route for %s %s", method, self.path)
        self.hub.unknown_requests.append(f"{method} {self.path}")
        self._error(HubError(404, f"fake hub: unknown route {method} {split.path}"))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None, *, length: int | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json({"error": err.message}, err.status, headers)

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as exc:
            raise HubError(400, f"invalid JSON body: {exc}") from exc

    # -- auth / lookup -----------------------------------------------------------------------------

    def _auth(self, *, required: bool) -> bool:
        """True if a valid token was sent; raises 401 when `required` (or when an invalid one is sent)."""
        header = self.headers.get("Authorization")
        if header is None:
            if required:
                raise HubError(401, "You must be authenticated to do this (fake hub: send `Bearer fake-token`).")
            return False
        if header != f"Bearer {self.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _repo(self, type: str | None, repo: str, *, write: bool = False) -> Repo:  # noqa: A002
        authed = self._auth(required=write)
        found = self.hub.repos.get((_TYPE_FROM_PLURAL.get(type or "models", "model"), repo))
        if found is None or (found.private and not authed):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return found

    # -- routes ------------------------------------------------------------------------------------

    def route_whoami(self) -> None:
        self._auth(required=True)
        self._json(
            {
                "type": "user",
                "id": "fake-user-id",
                "name": self.hub.user,
                "fullname": "Fake User",
                "email": None,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
            }
        )

    def route_agent_harnesses(self) -> None:
        self._json({"standardEnvVars": [], "harnesses": {}})  # telemetry registry fetched by the user agent

    def route_create_repo(self) -> None:
        self._auth(required=True)
        body = self._json_body()
        name, org = body.get("name"), body.get("organization")
        repo_id = f"{org}/{name}" if org else str(name)
        repo_type = body.get("type") or "model"
        if not _REPO_ID_RE.match(repo_id) or repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo name or type: {repo_id!r} ({repo_type})")
        key = (repo_type, repo_id)
        if key in self.hub.repos:
            url = self.hub._url(self.hub.repos[key])
            self._json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
            return
        private = body.get("visibility", "public") != "public" or bool(body.get("private"))
        repo = self.hub.create_repo(repo_id, repo_type=repo_type, private=private)
        self._json({"url": self.hub._url(repo), "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def route_validate_yaml(self) -> None:
        body = self._json_body()
        try:
            metadata = _front_matter(body.get("content", ""))
        except Exception as exc:  # yaml.YAMLError or not a mapping
            self._json({"error": "Invalid metadata", "errors": [{"message": str(exc)}]}, 400)
            return
        warnings = [] if metadata else [{"message": "empty or missing yaml metadata in repo card"}]
        self._json({"errors": [], "warnings": warnings})

    def route_preupload(self, type: str, repo: str, rev: str) -> None:  # noqa: A002
        found = self._repo(type, repo, write=True)
        head = self.hub._resolve(found, rev)
        current = found.commits[head].files
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",  # never "lfs": contents come inline in the commit payload
                "shouldIgnore": False,
                "oid": git_blob_sha1(current[f["path"]]) if f["path"] in current else None,
            }
            for f in self._json_body().get("files", [])
        ]
        self._json({"files": files, "commitOid": head})

    def route_commit(self, type: str, repo: str, rev: str) -> None:  # noqa: A002
        found = self._repo(type, repo, write=True)
        head = self.hub._resolve(found, rev)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, head):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(found.commits[head].files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:  # lfsFile etc.: never requested since preupload always answers "regular"
                raise HubError(400, f"fake hub does not support commit operation {key!r}")
        message = header.get("summary", "")
        if header.get("description"):
            message += "\n\n" + header["description"]
        pr_url = None
        ref = rev
        if self.query.get("create_pr") == "1":
            found.num_prs += 1
            ref = f"refs/pr/{found.num_prs}"
            pr_url = f"{self.hub._url(found)}/discussions/{found.num_prs}"
        commit = self.hub._add_commit(found, ref, head, message, files)
        self._json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub._url(found)}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def route_create_branch(self, type: str, repo: str, rev: str) -> None:  # noqa: A002
        found = self._repo(type, repo, write=True)
        if rev in found.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{rev}")
        start = self._json_body().get("startingPoint") or DEFAULT_BRANCH
        found.refs[rev] = self.hub._resolve(found, start)
        self._json({})

    def route_list_models(self) -> None:
        """`HfApi.list_models(filter=..., search=..., author=...)`: the model repos whose card tags (the Hub counts
        `library_name` as one) hold every `filter` value, whose id contains `search`, by `author`."""
        split = urlsplit(self.path)
        params = parse_qs(split.query)
        wanted = [t for v in params.get("filter", []) for t in v.split(",") if t]
        search, author = self.query.get("search", ""), self.query.get("author")
        found = []
        for (repo_type, repo_id), repo in sorted(self.hub.repos.items()):
            if repo_type != "model" or repo.private or search.lower() not in repo_id.lower():
                continue
            if author and repo_id.split("/")[0] != author:
                continue
            files = repo.commits[self.hub._resolve(repo, DEFAULT_BRANCH)].files
            try:
                card = _front_matter(files["README.md"].decode()) if "README.md" in files else {}
            except Exception:
                card = {}
            tags = [*(card.get("tags") or []), *([card["library_name"]] if card.get("library_name") else [])]
            if all(t in tags for t in wanted):
                found.append({"id": repo_id, "modelId": repo_id, "tags": tags, "private": False,
                              "library_name": card.get("library_name")})
        self._json(found)

    def route_info(self, type: str, repo: str, rev: str | None = None) -> None:  # noqa: A002
        found = self._repo(type, repo)
        commit = found.commits[self.hub._resolve(found, rev or DEFAULT_BRANCH)]
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = [
            {"rfilename": p, **({"size": len(d), "blobId": git_blob_sha1(d)} if blobs else {})}
            for p, d in sorted(commit.files.items())
        ]
        try:
            card = _front_matter(commit.files["README.md"].decode()) if "README.md" in commit.files else None
        except Exception:
            card = None
        info: dict[str, Any] = {
            "_id": hashlib.sha1(found.repo_id.encode()).hexdigest()[:24],
            "id": found.repo_id,
            "author": found.repo_id.split("/")[0] if "/" in found.repo_id else None,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": found.created_at,
            "private": found.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": list((card or {}).get("tags") or []),
            "siblings": siblings,
        }
        if found.repo_type == "model":
            info["modelId"] = found.repo_id
            if card and card.get("library_name"):
                info["library_name"] = card["library_name"]
        if card is not None:
            info["cardData"] = card
        self._json(info)

    def route_tree(self, type: str, repo: str, rev: str, path: str | None = None) -> None:  # noqa: A002
        found = self._repo(type, repo)
        files = found.commits[self.hub._resolve(found, rev)].files
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path and path.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for file_path, data in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            dirs = ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
            for d in dirs if recursive else dirs[:1]:
                full = prefix + d
                tree_oid = git_blob_sha1(full.encode())  # any stable id will do
                entries.setdefault(full, {"type": "directory", "oid": tree_oid, "size": 0, "path": full})
            if recursive or len(parts) == 1:
                entries[file_path] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": file_path}
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        self._json(list(entries.values()))

    def route_resolve(self, type: str | None, repo: str, rev: str, path: str) -> None:  # noqa: A002
        found = self._repo(type or "models", repo)
        oid = self.hub._resolve(found, rev)
        files = found.commits[oid].files
        if path not in files:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        data = files[path]
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{git_blob_sha1(data)}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and self.command == "GET":
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            part = data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
            self._send(206, part, headers)
            return
        self._send(200, data, headers, length=len(data))


# --------------------------------------------------------------------------------------------------
# pytest glue
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A running `FakeHub` with an empty store and its own `HF_HOME`; stopped after the test."""
    with FakeHub(tmp_path_factory.mktemp("hf_home")) as hub:
        yield hub


def run_with_hub(
    hub: FakeHub,
    script: str,
    cwd: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run `script` (dedented) in a fresh Python process configured for `hub`; raise if it fails.

    `env` entries override `hub.env` (e.g. ``{"HF_HUB_OFFLINE": "1"}``). The repo root is put on
    ``PYTHONPATH`` and is the default working directory, so ``import meerkat_hf`` works without installing.
    A non-zero exit raises `AssertionError` with the script, its stdout/stderr and the fake Hub's errors.
    """
    full_env = {**os.environ, **hub.env, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p)
    code = textwrap.dedent(script)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=str(cwd) if cwd is not None else str(REPO_ROOT),
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"Hub client script failed (exit {result.returncode}).\n"
            f"--- script ---\n{code}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}\n"
            f"--- unknown fake-hub routes --- {hub.unknown_requests}\n--- fake-hub errors --- {hub.errors}"
        )
    return result
