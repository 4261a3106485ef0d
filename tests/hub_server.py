"""A small in-memory Hugging Face Hub served over real HTTP on 127.0.0.1, for tests.

The Hub cannot be reached from this machine, so the tests point ``huggingface_hub``'s real client at this
server (``HF_ENDPOINT``) instead of mocking it. It implements the endpoints that huggingface_hub 2.x calls
for the operations priorzoo uses, with the Hub's status codes and ``X-Error-Code`` headers so that the client
raises its own ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``EntryNotFoundError``:

==========================================================  ==============================================
``POST /api/repos/create``, ``DELETE /api/repos/delete``    create_repo (private, exist_ok), delete_repo
``GET /api/whoami-v2``, ``POST /api/validate-yaml``         whoami, README front-matter check before commits
``GET /api/{models,datasets,spaces}``                       list_models & co (filter/library/author/search/
                                                            limit/full/cardData)
``GET /api/{type}s/{repo}[/revision/{rev}]``                repo_info / model_info (``blobs`` for sizes)
``GET /api/{type}s/{repo}/refs``                            list_repo_refs (``include_prs``)
``GET /api/{type}s/{repo}/tree/{rev}[/{path}]``             list_repo_tree / list_repo_files (recursive)
``POST /api/{type}s/{repo}/paths-info/{rev}``               get_paths_info
``GET /api/{type}s/{repo}/commits/{rev}``                   list_repo_commits
``POST /api/{type}s/{repo}/preupload/{rev}``                upload mode per file ("regular" unless a suffix
                                                            is in ``lfs_suffixes``) and the remote oid
``POST /api/{type}s/{repo}/commit/{rev}``                   create_commit / upload_file / upload_folder
                                                            (parentCommit, create_pr, file / lfsFile /
                                                            deletedFile / deletedFolder)
``POST|DELETE /api/{type}s/{repo}/branch/{b}``, ``/tag/``   create_branch / delete_branch / create_tag
``POST /{repo}.git/info/lfs/objects/batch`` + upload hrefs  the legacy LFS upload path (basic transfer)
``HEAD|GET /{repo}/resolve/{rev}/{path}``                   hf_hub_download / snapshot_download, with ETag,
                                                            X-Repo-Commit, Content-Length, Range; no redirect
==========================================================  ==============================================

Repos live in memory: every commit is an immutable snapshot ``{path: blob}`` with a sha-1 id; refs are
branches, tags and ``refs/pr/N``. A revision is a ref name or a (possibly abbreviated) commit id. Like the
Hub, a new repo starts with one commit holding ``.gitattributes``. Each response closes its connection, so
no keep-alive socket outlives a test and :meth:`HubServer.close` joins every handler thread.

Auth: ``Authorization: Bearer <token>``. Reading a public repo needs no token; writing needs a valid one; a
private repo is visible only to the user who created it (otherwise 401 without a token, 404 with another
user's token, both ``RepoNotFound``, as on the Hub). An unknown token gets 401 "Invalid credentials".

Uploads must run with ``HF_HUB_DISABLE_XET=1`` (see :func:`patch_hf_env`): this server speaks no Xet.

Example:
    >>> from huggingface_hub import HfApi
    >>> with HubServer() as server:
    ...     api = HfApi(endpoint=server.url, token=server.token)
    ...     url = api.create_repo("org/demo")
    ...     server.commit_count("org/demo")
    1
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["HubServer", "patch_hf_env", "set_hf_offline"]

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SHA_RE = re.compile(r"[0-9a-f]{7,40}")
_PR_RE = re.compile(r"refs/pr/(\d+)")


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class _Blob:
    data: bytes
    lfs: bool = False
    git_oid: str = field(init=False)
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "git_oid", _git_oid(self.data))
        object.__setattr__(self, "sha256", hashlib.sha256(self.data).hexdigest())

    @property
    def pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        ).encode()

    @property
    def tree_oid(self) -> str:
        """What git stores: the blob itself, or the LFS pointer file for an LFS blob."""
        return _git_oid(self.pointer) if self.lfs else self.git_oid

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass(frozen=True)
class _Commit:
    oid: str
    parents: tuple[str, ...]
    files: Mapping[str, _Blob]
    title: str
    message: str
    author: str
    date: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    owner: str
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **body: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = {"error": message, **body}


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads
    block_on_close = True
    allow_reuse_address = True


class HubServer:
    """An in-memory Hub on ``http://127.0.0.1:<free port>``; use as a context manager or start()/close().

    Attributes:
        url: the endpoint, e.g. ``http://127.0.0.1:41234`` (set HF_ENDPOINT to it).
        token: a write token of user ``user``.
        requests: ``(method, path)`` of every request received, in order (to assert "no network").
        outage: set to an HTTP status (e.g. 403 from a proxy) to answer every request with it, without any
            Hub error code, as a broken network path would.
        on_request: ``hook(method, path)`` called for every request before it is handled (outside the server's
            lock, so the hook may change the repos, e.g. :meth:`push` a commit between a client's requests); a
            hook that raises ``ConnectionError`` drops the connection without an answer.
        drip: seconds between two bytes of a file download's body (``GET …/resolve/…``), to play a Hub that
            trickles; ``None`` (default) sends bodies at once. A dripping answer stops when the server closes.

    Args:
        user: name of the user owning ``token``.
        lfs_suffixes: files whose name ends with one of these are uploaded through the LFS protocol (as the
            real Hub does for ``.safetensors``); by default every file is a regular git blob.
    """

    def __init__(self, *, user: str = "priorzoo-tester", lfs_suffixes: tuple[str, ...] = ()) -> None:
        self.user = user
        self.token = "hf_" + secrets.token_hex(16)
        self.lfs_suffixes = tuple(lfs_suffixes)
        self.requests: list[tuple[str, str]] = []
        self.outage: int | None = None
        self.on_request: Callable[[str, str], None] | None = None
        self.drip: float | None = None
        self._closing = threading.Event()
        self._tokens = {self.token: user}
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lfs: dict[str, bytes] = {}
        self._lock = threading.RLock()
        self._seq = itertools.count()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        """Bind a free port on 127.0.0.1 and serve in a background thread."""
        owner = self

        class Handler(_Handler):
            hub = owner

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        # poll_interval bounds how long close() waits for the accept loop to notice the shutdown
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, wait for in-flight requests to finish and release the port."""
        self._closing.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            assert self._thread is not None
            self._thread.join()
            self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- test helpers
    def add_user(self, name: str) -> str:
        """Register another user and return a token for it."""
        token = "hf_" + secrets.token_hex(16)
        with self._lock:
            self._tokens[token] = name
        return token

    def commit_count(self, repo_id: str, repo_type: str = "model") -> int:
        """Number of commits in a repo (all refs), the initial ``.gitattributes`` commit included."""
        with self._lock:
            return len(self._get(repo_type, repo_id).commits)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The content of a repo at a revision, as ``{path: bytes}``."""
        with self._lock:
            repo = self._get(repo_type, repo_id)
            return {p: b.data for p, b in repo.commits[self._resolve(repo, revision)].files.items()}

    def push(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        delete: tuple[str, ...] = (),
        revision: str = "main",
        message: str = "server-side push",
        repo_type: str = "model",
    ) -> str:
        """Commit ``files`` (added or replaced) and ``delete`` (paths removed) on branch ``revision`` directly,
        as another client's push would; return the new commit id."""
        with self._lock:
            repo = self._get(repo_type, repo_id)
            head = repo.branches[revision]
            snapshot = dict(repo.commits[head].files)
            for path in delete:
                del snapshot[path]
            lfs = self.lfs_suffixes
            snapshot.update({p: _Blob(d, lfs=bool(lfs) and p.endswith(lfs)) for p, d in files.items()})
            commit = self._commit(repo, head, snapshot, message, "", repo.owner)
            repo.branches[revision] = commit.oid
            return commit.oid

    def _get(self, repo_type: str, repo_id: str) -> _Repo:
        try:
            return self._repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on this server") from None

    # ----------------------------------------------------------------- repo model
    def _commit(
        self, repo: _Repo, parent: str | None, files: Mapping[str, _Blob], title: str, message: str, user: str
    ) -> _Commit:
        listing = "\n".join(f"{p} {b.tree_oid}" for p, b in sorted(files.items()))
        seed = f"{repo.repo_id}\n{parent}\n{listing}\n{title}\n{next(self._seq)}".encode()
        commit = _Commit(
            oid=hashlib.sha1(seed).hexdigest(),
            parents=(parent,) if parent else (),
            files=dict(files),
            title=title,
            message=message,
            author=user,
            date=_now(),
        )
        repo.commits[commit.oid] = commit
        return commit

    @staticmethod
    def _resolve(repo: _Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision.startswith("refs/heads/") and revision[11:] in repo.branches:
            return repo.branches[revision[11:]]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision.startswith("refs/tags/") and revision[10:] in repo.tags:
            return repo.tags[revision[10:]]
        if (m := _PR_RE.fullmatch(revision)) and int(m[1]) in repo.prs:
            return repo.prs[int(m[1])]
        if _SHA_RE.fullmatch(revision):
            hits = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(hits) == 1:
                return hits[0]
        raise _HTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _repo_for(self, repo_type: str, repo_id: str, user: str | None, *, write: bool = False) -> _Repo:
        if write and user is None:
            raise _HTTPError(401, "You must be authenticated to access this resource.")
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.owner):
            status = 401 if user is None else 404
            raise _HTTPError(status, "Repository not found", "RepoNotFound")
        return repo

    def _url_of(self, repo: _Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ----------------------------------------------------------------- JSON views
    @staticmethod
    def _card(commit: _Commit) -> dict[str, Any]:
        blob = commit.files.get("README.md")
        if blob is None:
            return {}
        text = blob.data.decode("utf-8", "replace")
        m = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.S)
        if not m:
            return {}
        try:
            data = yaml.safe_load(m[1])
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}

    def _summary(self, repo: _Repo, oid: str, *, full: bool, card_data: bool, blobs: bool) -> dict[str, Any]:
        commit = repo.commits[oid]
        card = self._card(commit)
        tags: list[str] = []
        card_tags = card.get("tags") or []
        for tag in [*(card_tags if isinstance(card_tags, list) else [card_tags]), card.get("library_name")]:
            if isinstance(tag, str) and tag not in tags:
                tags.append(tag)
        for key, prefix in (("license", "license:"), ("base_model", "base_model:"), ("datasets", "dataset:")):
            values = card.get(key) or []
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, str) and prefix + value not in tags:
                    tags.append(prefix + value)
        info: dict[str, Any] = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "createdAt": repo.created_at,
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            info["library_name"] = card.get("library_name")
            if card.get("pipeline_tag"):
                info["pipeline_tag"] = card["pipeline_tag"]
        if full:
            info["sha"] = oid
            info["lastModified"] = commit.date
            info["siblings"] = []
            for path, blob in sorted(commit.files.items()):
                sibling: dict[str, Any] = {"rfilename": path}
                if blobs:
                    sibling.update(size=len(blob.data), blobId=blob.tree_oid)
                    if blob.lfs:
                        sibling["lfs"] = {
                            "size": len(blob.data),
                            "sha256": blob.sha256,
                            "pointerSize": len(blob.pointer),
                        }
                info["siblings"].append(sibling)
            info["usedStorage"] = sum(len(b.data) for b in commit.files.values())
        if card_data and card:
            info["cardData"] = card
        return info

    @staticmethod
    def _entry(path: str, blob: _Blob | None, children: list[str] | None = None) -> dict[str, Any]:
        if blob is None:
            oid = hashlib.sha1("\n".join(sorted(children or [])).encode()).hexdigest()
            return {"type": "directory", "oid": oid, "size": 0, "path": path}
        entry: dict[str, Any] = {"type": "file", "oid": blob.tree_oid, "size": len(blob.data), "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
        return entry

    @staticmethod
    def _dirs(files: Mapping[str, _Blob]) -> dict[str, list[str]]:
        """Every directory of a snapshot with the files below it."""
        dirs: dict[str, list[str]] = {}
        for path in files:
            parts = path.split("/")
            for i in range(1, len(parts)):
                dirs.setdefault("/".join(parts[:i]), []).append(path)
        return dirs

    def _tree(self, files: Mapping[str, _Blob], base: str, recursive: bool) -> list[dict[str, Any]]:
        dirs = self._dirs(files)
        if base and base not in dirs:
            raise _HTTPError(404, f"Entry not found: {base}", "EntryNotFound")
        prefix = base + "/" if base else ""

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

        folders = [self._entry(d, None, dirs[d]) for d in sorted(dirs) if wanted(d)]
        return folders + [self._entry(p, b) for p, b in sorted(files.items()) if wanted(p)]


# --------------------------------------------------------------------------- HTTP layer
class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # a stuck client cannot pin a handler thread forever

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

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

    # ------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        """The request body (read once; Content-Length or chunked)."""
        if not hasattr(self, "_raw_body"):
            self._raw_body = self._read_body()
        return self._raw_body

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> Any:
        raw = self._body()
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            raise _HTTPError(400, "Body is not valid JSON") from None

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            pass
        elif self.hub.drip is not None and "/resolve/" in self.path:
            for i in range(len(body)):
                delay = self.hub.drip
                if delay is None:  # dripping was switched off: the rest at once
                    self.wfile.write(body[i:])
                    break
                if self.hub._closing.wait(delay):
                    break
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
        else:
            self.wfile.write(body)
        self.close_connection = True

    def _send_json(self, data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.hub._tokens.get(token)
        if user is None:
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        query = parse_qs(split.query)
        with self.hub._lock:
            self.hub.requests.append((method, split.path))
        try:
            if self.hub.on_request is not None:  # a hook raising ConnectionError drops the connection
                self.hub.on_request(method, split.path)
            if self.hub.outage is not None:
                raise _HTTPError(self.hub.outage, "the test hub server is simulating an outage")
            self._route(method, segments, query)
        except _HTTPError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            if self.hub.outage is None:
                headers["X-Error-Message"] = e.message
            self._send_json(e.body, e.status, headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a bug in this server: make it visible in the test's error
            self._send_json({"error": f"test hub server crashed: {e!r}"}, 500)
            raise

    def _route(self, method: str, s: list[str], q: dict[str, list[str]]) -> None:
        if s[:1] == ["api"]:
            rest = s[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if rest == ["repos", "delete"] and method in ("DELETE", "POST"):
                return self._delete_repo()
            if len(rest) == 1 and rest[0] in _TYPES and method == "GET":
                return self._list(_TYPES[rest[0]], q)
            if len(rest) >= 3 and rest[0] in _TYPES:
                return self._repo_api(method, _TYPES[rest[0]], f"{rest[1]}/{rest[2]}", rest[3:], q)
        if s[:1] == ["lfs-upload"] and len(s) == 2 and method == "PUT":
            return self._lfs_upload(s[1])
        if s[:1] == ["lfs-verify"] and len(s) == 2 and method == "POST":
            return self._lfs_verify(s[1])
        repo_type = _TYPES.get(s[0], "model") if s else "model"
        parts = s[1:] if s and s[0] in _TYPES else s
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(repo_type, f"{parts[0]}/{parts[1][:-4]}")
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise _HTTPError(404, f"{method} {self.path} is not implemented by the test hub server")

    # ------------------------------------------------------------- account-level endpoints
    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise _HTTPError(401, "Invalid username or password.")
        token = {"displayName": "test", "role": "write"}
        self._send_json({"type": "user", "name": user, "fullname": user, "orgs": [], "auth": {"accessToken": token}})

    def _validate_yaml(self) -> None:
        content = self._json_body().get("content", "")
        m = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", content, re.S)
        if m:
            try:
                yaml.safe_load(m[1])
            except yaml.YAMLError as e:
                return self._send_json({"errors": [{"message": f"Invalid YAML: {e}"}]}, 400)
        self._send_json({"errors": [], "warnings": []})

    def _create_repo(self) -> None:
        hub, user = self.hub, self._user()
        if user is None:
            raise _HTTPError(401, "You must be authenticated to create a repo.")
        body = self._json_body()
        name, org = body.get("name"), body.get("organization")
        if not name:
            raise _HTTPError(400, "Missing repo name")
        repo_id = f"{org or user}/{name}"
        repo_type = body.get("type") or "model"
        with hub._lock:
            existing = hub._repos.get((repo_type, repo_id))
            if existing is not None:
                if existing.private and existing.owner != user:
                    raise _HTTPError(403, "You don't have the rights to create a repo in this namespace")
                raise _HTTPError(409, "You already created this repo", url=hub._url_of(existing))
            private = body.get("visibility") == "private" or body.get("private") is True
            repo = _Repo(repo_type, repo_id, private=private, owner=user, created_at=_now())
            attributes = _Blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
            commit = hub._commit(repo, None, {".gitattributes": attributes}, "initial commit", "", user)
            repo.branches["main"] = commit.oid
            hub._repos[(repo_type, repo_id)] = repo
        self._send_json({"url": hub._url_of(repo), "name": repo_id, "id": commit.oid})

    def _delete_repo(self) -> None:
        hub, user = self.hub, self._user()
        body = self._json_body()
        org, name = body.get("organization"), body.get("name")
        repo_type = body.get("type") or "model"
        repo_id = f"{org or user}/{name}"
        with hub._lock:
            hub._repo_for(repo_type, repo_id, user, write=True)
            del hub._repos[(repo_type, repo_id)]
        self._send_json({})

    def _list(self, repo_type: str, q: dict[str, list[str]]) -> None:
        hub, user = self.hub, self._user()
        filters = q.get("filter", []) + q.get("library", []) + q.get("tags", [])
        author = (q.get("author") or [None])[0]
        search = ((q.get("search") or [""])[0]).lower()
        limit = int((q.get("limit") or [0])[0]) or None
        full = (q.get("full") or ["false"])[0].lower() in ("1", "true")
        card_data = (q.get("cardData") or ["false"])[0].lower() in ("1", "true")
        out = []
        with hub._lock:
            for (rtype, repo_id), repo in hub._repos.items():
                if rtype != repo_type or (repo.private and user != repo.owner):
                    continue
                oid = repo.branches.get("main") or next(iter(repo.commits))
                info = hub._summary(repo, oid, full=full, card_data=card_data, blobs=False)
                if author and info["author"] != author:
                    continue
                if search and search not in repo_id.lower():
                    continue
                if any(f not in info["tags"] and f != info.get("library_name") for f in filters):
                    continue
                out.append(info)
        self._send_json(out[:limit] if limit else out)

    # ------------------------------------------------------------- repo-level API
    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str], q: dict) -> None:
        hub, user = self.hub, self._user()
        flag = {k: (v[0].lower() in ("1", "true")) for k, v in q.items()}
        if method != "GET":
            self._body()  # read the upload before taking the lock
        with hub._lock:
            write = method != "GET" and rest[:1] not in (["paths-info"],)
            repo = hub._repo_for(repo_type, repo_id, user, write=write)
            if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
                oid = hub._resolve(repo, rest[1] if rest else "main")
                blobs = flag.get("blobs", False)
                return self._send_json(hub._summary(repo, oid, full=True, card_data=True, blobs=blobs))
            if method == "GET" and rest == ["refs"]:
                return self._send_json(self._refs(repo, flag.get("include_prs", False)))
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                files = repo.commits[hub._resolve(repo, rest[1])].files
                recursive = flag.get("recursive", False)
                return self._send_json(hub._tree(files, "/".join(rest[2:]).strip("/"), recursive))
            if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
                return self._paths_info(repo, rest[1])
            if method == "GET" and len(rest) == 2 and rest[0] == "commits":
                return self._send_json(self._history(repo, hub._resolve(repo, rest[1])))
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo, rest[1], flag.get("create_pr", False))
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo, user, rest[1], flag.get("create_pr", False))
            if len(rest) == 2 and rest[0] == "branch" and method in ("POST", "DELETE"):
                return self._branch(repo, rest[1], method)
            if len(rest) == 2 and rest[0] == "tag" and method == "POST":
                return self._tag(repo, rest[1])
        raise _HTTPError(404, f"{method} {self.path} is not implemented by the test hub server")

    def _refs(self, repo: _Repo, include_prs: bool) -> dict[str, Any]:
        def ref(kind: str, name: str, oid: str) -> dict[str, str]:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}

        out: dict[str, Any] = {
            "branches": [ref("heads", n, o) for n, o in sorted(repo.branches.items())],
            "tags": [ref("tags", n, o) for n, o in sorted(repo.tags.items())],
            "converts": [],
        }
        if include_prs:
            out["pullRequests"] = [ref("pr", str(n), o) for n, o in sorted(repo.prs.items())]
        return out

    def _history(self, repo: _Repo, oid: str) -> list[dict[str, Any]]:
        out = []
        while oid:
            c = repo.commits[oid]
            out.append(
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author}],
                    "date": c.date,
                }
            )
            oid = c.parents[0] if c.parents else ""
        return out

    def _paths_info(self, repo: _Repo, revision: str) -> None:
        form = parse_qs(self._body().decode())
        files = repo.commits[self.hub._resolve(repo, revision)].files
        dirs = self.hub._dirs(files)
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in files:
                out.append(self.hub._entry(path, files[path]))
            elif path in dirs:
                out.append(self.hub._entry(path, None, dirs[path]))
        self._send_json(out)

    def _preupload(self, repo: _Repo, revision: str, create_pr: bool) -> None:
        body = self._json_body()
        files = repo.commits[self.hub._resolve(repo, revision)].files
        out = []
        for item in body.get("files", []):
            path = item["path"]
            lfs = path.endswith(self.hub.lfs_suffixes) if self.hub.lfs_suffixes else False
            info = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in files:
                info["oid"] = files[path].sha256 if lfs else files[path].git_oid
            out.append(info)
        self._send_json({"files": out, "commitOid": self.hub._resolve(repo, revision)})

    def _commit(self, repo: _Repo, user: str | None, revision: str, create_pr: bool) -> None:
        hub = self.hub
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HTTPError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        head = hub._resolve(repo, revision)
        if not create_pr and revision not in repo.branches and not _PR_RE.fullmatch(revision):
            raise _HTTPError(400, f"Cannot commit to {revision!r}: not a branch")
        parent_commit = header.get("parentCommit")
        if parent_commit and not head.startswith(parent_commit):
            raise _HTTPError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)
        for op in lines[1:]:
            key, value = op.get("key"), op.get("value", {})
            path = value.get("path", "").strip("/")
            if key == "file":
                files[path] = _Blob(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                data = hub._lfs.get(value["oid"])
                if data is None:
                    raise _HTTPError(422, f"LFS object {value['oid']} of {path!r} was never uploaded")
                files[path] = _Blob(data, lfs=True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise _HTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise _HTTPError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise _HTTPError(400, f"Unsupported commit operation {key!r}")
        commit = hub._commit(repo, head, files, header.get("summary", ""), header.get("description", ""), user or "")
        out: dict[str, Any] = {"success": True, "commitOid": commit.oid, "hookOutput": ""}
        out["commitUrl"] = f"{hub._url_of(repo)}/commit/{commit.oid}"
        if create_pr:
            num = max(repo.prs, default=0) + 1
            repo.prs[num] = commit.oid
            out["pullRequestUrl"] = f"{hub._url_of(repo)}/discussions/{num}"
        elif (m := _PR_RE.fullmatch(revision)) is not None:
            repo.prs[int(m[1])] = commit.oid
        else:
            repo.branches[revision] = commit.oid
        self._send_json(out)

    def _branch(self, repo: _Repo, branch: str, method: str) -> None:
        if method == "DELETE":
            if repo.branches.pop(branch, None) is None:
                raise _HTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            return self._send_json({})
        body = self._json_body()
        if branch in repo.branches:
            raise _HTTPError(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = self.hub._resolve(repo, body.get("startingPoint") or "main")
        self._send_json({})

    def _tag(self, repo: _Repo, revision: str) -> None:
        body = self._json_body()
        tag = body.get("tag", "")
        if tag in repo.tags:
            raise _HTTPError(409, f"Tag already exists: {tag}")
        repo.tags[tag] = self.hub._resolve(repo, revision)
        self._send_json({})

    # ------------------------------------------------------------- LFS (legacy, non-Xet) upload
    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        hub = self.hub
        user = self._user()
        with hub._lock:
            hub._repo_for(repo_type, repo_id, user, write=True)
        body = self._json_body()
        objects = []
        for obj in body.get("objects", []):
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in hub._lfs:
                entry["actions"] = {
                    "upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{hub.url}/lfs-verify/{obj['oid']}", "header": {}},
                }
            objects.append(entry)
        self._send_json({"transfer": "basic", "objects": objects})

    def _lfs_upload(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _HTTPError(400, "Uploaded content does not match its sha256 oid")
        with self.hub._lock:
            self.hub._lfs[oid] = data
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _lfs_verify(self, oid: str) -> None:
        body = self._json_body()
        data = self.hub._lfs.get(oid)
        if data is None or len(data) != body.get("size"):
            raise _HTTPError(404, f"LFS object {oid} not found or has the wrong size")
        self._send_json({"success": True})

    # ------------------------------------------------------------- file download
    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub, user = self.hub, self._user()
        with hub._lock:
            repo = hub._repo_for(repo_type, repo_id, user)
            oid = hub._resolve(repo, revision)
            blob = repo.commits[oid].files.get(path)
        if blob is None:
            raise _HTTPError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": oid})
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{blob.etag}"',
            "X-Repo-Commit": oid,
            "Accept-Ranges": "bytes",
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(len(blob.data))
        data, status = blob.data, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m:
            start = int(m[1])
            end = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            if start >= len(data):
                raise _HTTPError(416, "Requested range not satisfiable")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers)


# --------------------------------------------------------------------------- client-side environment
_CONSTANT_COPIES = (
    # modules that did `from huggingface_hub.constants import NAME` at import time
    ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE"),
    ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE"),
    ("huggingface_hub.utils._git_credential", "ENDPOINT"),
)


def patch_hf_env(monkeypatch: Any, endpoint: str, home: str | Path) -> None:
    """Point huggingface_hub at ``endpoint`` with a fresh cache and no credentials, for this test only.

    huggingface_hub reads its environment variables once, at import, into ``huggingface_hub.constants``;
    the module-level helpers (``huggingface_hub.create_repo`` …) are bound to an ``HfApi`` created at import
    with the endpoint of that time. Setting the variables is therefore not enough: this also patches the
    constants (and the few copies other modules took) and that default ``HfApi``.
    """
    import importlib

    from huggingface_hub import constants, hf_api

    home = Path(home)
    cache = home / "hub"
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_OIDC_RESOURCE",
    ):
        monkeypatch.delenv(key, raising=False)

    host = urlsplit(endpoint).hostname or "127.0.0.1"
    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {host}),
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
    }
    for name, value in values.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    for module_name, name in _CONSTANT_COPIES:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(module_name)
            if hasattr(module, name):
                monkeypatch.setattr(module, name, values[name])
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)


def set_hf_offline(monkeypatch: Any, offline: bool = True) -> None:
    """Switch huggingface_hub's offline mode for this test (``HF_HUB_OFFLINE``, env and constant)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
