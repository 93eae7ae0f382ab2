"""A tiny in-memory Hugging Face Hub, so push/pull round trips run offline against the real `huggingface_hub`.

Only the standard library is used; repos live in memory and vanish with the server.

    with HubServer() as hub:
        ...                       # talk to hub.url
        hub.files("user/tiny")    # {path: bytes} at the head of "main"

How a test must point clients at it
-----------------------------------
`huggingface_hub` reads `HF_ENDPOINT` once, at import (`huggingface_hub.constants.ENDPOINT`), and `transformers`
offers no endpoint argument at all (`from_pretrained`, `push_to_hub`, `ModelCard.load`). So run such clients in a
fresh interpreter (`subprocess.run([sys.executable, "-c", code], env=env)`) with:

    HF_ENDPOINT=<hub.url>            # every Hub call goes here
    HF_TOKEN=dummy                   # any non-empty token: writes and whoami need an Authorization header
    HF_HOME=<a fresh tmp dir>        # own cache and token store; never touch ~/.cache/huggingface
    HF_HUB_DISABLE_TELEMETRY=1       # no telemetry calls to the endpoint

In process, without `HF_ENDPOINT`, it works to pass the endpoint explicitly:
`HfApi(endpoint=hub.url, token="dummy")` for API calls (create_repo, upload_folder, create_commit, repo_info,
list_repo_tree, ...), and `hf_hub_download(..., endpoint=hub.url)` / `snapshot_download(..., endpoint=hub.url)`
for downloads (checked with huggingface_hub 2.4: `hf_hub_url` swaps the default endpoint prefix for the given one).
Pass `cache_dir=` there too, to stay out of the user cache.

What it serves (model repos, one branch "main"; any earlier commit sha also resolves):
    GET  /api/whoami-v2
    POST /api/repos/create                          409 with the repo url when it exists (create_repo(exist_ok=True))
    POST /api/validate-yaml                         accepts everything (the client checks README.md before a commit)
    GET  /api/models/{repo}[/revision/{rev}]        id, sha, siblings (rfilename, size, blobId), ...
    GET  /api/models/{repo}/tree/{rev}[/{path}]     ?recursive=true lists files and folders below
    POST /api/models/{repo}/paths-info/{rev}        form body paths=...&paths=...
    POST /api/models/{repo}/preupload/{rev}         uploadMode "lfs" for *.safetensors (the real Hub's
                                                    .gitattributes rule), "regular" (contents inline) otherwise
    POST /{repo}.git/info/lfs/objects/batch         LFS batch API, "basic" transfer: an upload (and verify) action
                                                    for each object not stored yet
    PUT  /lfs/objects/{oid}                         an LFS object's bytes (refused unless their sha256 is oid)
    POST /lfs/verify                                {oid, size}: 404 unless that object was stored
    POST /api/models/{repo}/commit/{rev}            NDJSON: header, file (base64), lfsFile (an uploaded object),
                                                    deletedFile, deletedFolder; a commit is applied whole or not
    HEAD/GET /{repo}/resolve/{rev}/{path}           ETag (git blob sha1; X-Linked-Etag: sha256 for LFS files),
                                                    X-Repo-Commit, Content-Length
Errors carry the `X-Error-Code` the client maps to exceptions: RepoNotFound, RevisionNotFound, EntryNotFound.
Not supported (400): other repo types, pull requests (create_pr); parentCommit is not checked. Xet storage is not
served: `run_client` sets HF_HUB_DISABLE_XET=1, so the client takes the LFS path it falls back to without hf_xet.

Faults: `hub.inject(route, status, times)` answers the next `times` requests of a route (its handler's name
without `_route_`: "commit", "preupload", "lfs_batch", "lfs_put", ...) with `status` and nothing done, or with
status None drops the connection without an answer; `hub.requests` counts the requests each route received.
`create_repo` without a namespace lands under the whoami user, "user".
Requests that match no route get a plain 404 and are recorded in `HubServer.unhandled`, so a test can assert the
client needed nothing more.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

USER = "user"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


def git_blob_sha(data: bytes) -> str:
    """The oid the Hub reports for a non-LFS file; the client compares it to skip unchanged uploads."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class _Commit:
    sha: str
    files: dict[str, bytes]
    date: str


@dataclass
class _Repo:
    commits: list[_Commit] = field(default_factory=list)

    def resolve(self, revision: str) -> _Commit | None:
        """"main" is the head; a full commit sha pins any earlier snapshot (snapshot_download asks by sha)."""
        if revision == "main":
            return self.commits[-1]
        return next((c for c in self.commits if c.sha == revision), None)


class HubError(Exception):
    """An error answer: status, Hub error code (what `hf_raise_for_status` dispatches on) and message."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class HubServer:
    """An in-memory Hub on 127.0.0.1 with a free port, served from a daemon thread."""

    def __init__(self) -> None:
        self._repos: dict[str, _Repo] = {}
        self._lfs: dict[str, bytes] = {}  # LFS objects by sha256, uploaded before the commit that names them
        self._faults: dict[str, list[int | None]] = {}
        self._lock = threading.Lock()
        self.unhandled: list[str] = []
        self.requests: dict[str, int] = {}
        self._httpd = _HTTPServer(self)
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def inject(self, route: str, status: int | None, times: int = 1) -> None:
        """Answer the next `times` requests of `route` with `status` (None: close the connection unanswered)."""
        if not hasattr(_Handler, f"_route_{route}"):
            raise ValueError(f"no route {route!r}")
        with self._lock:
            self._faults.setdefault(route, []).extend([status] * times)

    def _take_fault(self, route: str) -> tuple[bool, int | None]:
        with self._lock:
            self.requests[route] = self.requests.get(route, 0) + 1
            pending = self._faults.get(route)
            return (True, pending.pop(0)) if pending else (False, None)

    def commits(self, repo_id: str) -> int:
        """How many commits `repo_id` has, its initial empty one included."""
        with self._lock:
            return len(self._repos[repo_id].commits)

    def files(self, repo_id: str) -> dict[str, bytes]:
        """Contents at the head of "main" (a copy); KeyError for an unknown repo."""
        with self._lock:
            return dict(self._repos[repo_id].commits[-1].files)

    # --- state changes, each under the lock -------------------------------------------------------------------

    def _create_repo(self, repo_id: str) -> bool:
        """Create with an empty initial commit so the repo has a sha at once; False when it already exists."""
        with self._lock:
            if repo_id in self._repos:
                return False
            repo = _Repo()
            self._repos[repo_id] = repo
            self._append_commit(repo_id, repo, {}, "initial commit")
            return True

    def _snapshot(self, repo_id: str, revision: str) -> _Commit:
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            commit = repo.resolve(revision)
            if commit is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return commit

    def _commit(self, repo_id: str, revision: str, operations: list[dict[str, Any]], summary: str) -> str:
        """Apply the NDJSON operations on top of the head of `revision` and return the new commit sha."""
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            if revision != "main":
                raise HubError(404, f"Invalid rev id: {revision} (only 'main' accepts commits)", "RevisionNotFound")
            files = dict(repo.commits[-1].files)
            for op in operations:
                key, value = op.get("key"), op.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                    files[path] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    if value.get("algo") != "sha256" or value.get("oid") not in self._lfs:
                        raise HubError(400, f"LFS object {value.get('oid')} for {path} was never uploaded")
                    files[path] = self._lfs[value["oid"]]
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"Unsupported commit operation {key!r}: this test Hub takes inline files only")
            return self._append_commit(repo_id, repo, files, summary)

    def _append_commit(self, repo_id: str, repo: _Repo, files: dict[str, bytes], summary: str) -> str:
        parent = repo.commits[-1].sha if repo.commits else ""
        tree = "".join(f"{p}\0{git_blob_sha(d)}\n" for p, d in sorted(files.items()))
        sha = hashlib.sha1(f"{repo_id}\n{parent}\n{len(repo.commits)}\n{summary}\n{tree}".encode()).hexdigest()
        repo.commits.append(_Commit(sha=sha, files=files, date=_now()))
        return sha


def is_lfs(path: str) -> bool:
    """Files the Hub stores through LFS (its default .gitattributes names *.safetensors among others)."""
    return path.endswith(".safetensors")


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    entry = {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": path}
    if is_lfs(path):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _folder_entry(path: str, files: dict[str, bytes]) -> dict[str, Any]:
    listing = "".join(f"{p}\0{git_blob_sha(d)}\n" for p, d in sorted(files.items()) if p.startswith(path + "/"))
    return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}


def _folders(files: dict[str, bytes]) -> set[str]:
    """Every folder that holds a file (git has no empty folders)."""
    return {"/".join(parts[:i]) for parts in (p.split("/") for p in files) for i in range(1, len(parts))}


_ROUTES: list[tuple[set[str], re.Pattern[str], str]] = [
    (methods, re.compile(pattern), name)
    for methods, pattern, name in [
        ({"GET"}, r"/api/whoami-v2", "_route_whoami"),
        ({"POST"}, r"/api/repos/create", "_route_create_repo"),
        ({"POST"}, r"/api/validate-yaml", "_route_validate_yaml"),
        ({"GET"}, rf"/api/models/{_REPO}(?:/revision/{_REV})?", "_route_model_info"),
        ({"GET"}, rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.+))?", "_route_tree"),
        ({"POST"}, rf"/api/models/{_REPO}/paths-info/{_REV}", "_route_paths_info"),
        ({"POST"}, rf"/api/models/{_REPO}/preupload/{_REV}", "_route_preupload"),
        ({"POST"}, rf"/api/models/{_REPO}/commit/{_REV}", "_route_commit"),
        ({"GET", "HEAD"}, rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "_route_resolve"),
        ({"POST"}, rf"/{_REPO}\.git/info/lfs/objects/batch", "_route_lfs_batch"),
        ({"PUT"}, r"/lfs/objects/(?P<oid>[0-9a-f]{64})", "_route_lfs_put"),
        ({"POST"}, r"/lfs/verify", "_route_lfs_verify"),
    ]
]


class _HTTPServer(ThreadingHTTPServer):
    """Binds a free port and carries the hub state for the handlers."""

    daemon_threads = True

    def __init__(self, hub: HubServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("test hub: error while serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    """Routes a request to a `_route_*` method; a `HubError` becomes a JSON error with Hub headers."""

    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses connections
    server: _HTTPServer
    query: dict[str, list[str]]
    body: bytes

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        for methods, pattern, name in _ROUTES:
            match = pattern.fullmatch(split.path)
            if match and method in methods:
                # Match on the raw path: the client quotes a revision with safe="", so "refs/pr/1" is one segment.
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                injected, status = self.hub._take_fault(name.removeprefix("_route_"))
                if injected and status is None:  # the connection dropped: no answer at all
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if injected:
                    self._send_error(HubError(status, f"injected fault: {status} for {method} {split.path}"))
                    return
                try:
                    getattr(self, name)(**args)
                except HubError as err:
                    self._send_error(err)
                except (KeyError, TypeError, ValueError) as err:  # a malformed body (JSONDecodeError is a ValueError)
                    self._send_error(HubError(400, f"Bad request: {err!r}"))
                return
        self.hub.unhandled.append(f"{method} {self.path}")
        logger.warning("test hub: no route for %s %s", method, self.path)
        self._send_error(HubError(404, f"No route for {method} {split.path}"))

    # --- responses ------------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        self._send_json({"error": err.message}, err.status, headers)

    def _require_token(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "This route needs an Authorization: Bearer <token> header")

    # --- routes -------------------------------------------------------------------------------------------------

    def _route_whoami(self) -> None:
        self._require_token()
        self._send_json({
            "type": "user", "id": "0" * 24, "name": USER, "fullname": "Test User", "email": None, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "dummy", "role": "write"}},
        })

    def _route_create_repo(self) -> None:
        self._require_token()
        payload = json.loads(self.body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "This test Hub only hosts model repos")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if self.hub._create_repo(repo_id):
            self._send_json({"url": url, "name": repo_id, "id": repo_id})
        else:
            self._send_json({"error": "You already created this model repo", "url": url}, 409)

    def _route_validate_yaml(self) -> None:
        self._send_json({"errors": [], "warnings": []})

    def _route_model_info(self, repo: str, rev: str = "main") -> None:
        commit = self.hub._snapshot(repo, rev)
        files = sorted(commit.files.items())
        siblings = [{"rfilename": p, "size": len(d), "blobId": git_blob_sha(d)} for p, d in files]
        self._send_json({
            "_id": repo, "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.sha,
            "lastModified": commit.date, "private": False, "disabled": False, "gated": False,
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
        })

    def _route_tree(self, repo: str, rev: str, path: str = "") -> None:
        files = self.hub._snapshot(repo, rev).files
        folders = _folders(files)
        path = path.strip("/")
        if path and path not in folders:
            raise HubError(404, f"Folder not found: {path}", "EntryNotFound")
        prefix = path + "/" if path else ""
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")

        def listed(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

        entries = [_folder_entry(p, files) for p in sorted(folders) if listed(p)]
        entries += [_file_entry(p, d) for p, d in sorted(files.items()) if listed(p)]
        self._send_json(entries)

    def _route_paths_info(self, repo: str, rev: str) -> None:
        files = self.hub._snapshot(repo, rev).files
        folders = _folders(files)
        entries = []
        for path in parse_qs(self.body.decode()).get("paths", []):
            path = path.strip("/")
            if path in files:
                entries.append(_file_entry(path, files[path]))
            elif path in folders:
                entries.append(_folder_entry(path, files))
        self._send_json(entries)

    def _route_preupload(self, repo: str, rev: str) -> None:
        self._require_token()
        commit = self.hub._snapshot(repo, rev)
        answer = []
        for item in json.loads(self.body)["files"]:
            path = item["path"]
            oid = git_blob_sha(commit.files[path]) if path in commit.files else None
            answer.append({"path": path, "uploadMode": "lfs" if is_lfs(path) else "regular", "shouldIgnore": False,
                           "oid": oid})
        self._send_json({"files": answer, "commitOid": commit.sha})

    def _route_commit(self, repo: str, rev: str) -> None:
        self._require_token()
        if self.query.get("create_pr"):
            raise HubError(400, "This test Hub does not support pull requests")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        headers = [line["value"] for line in lines if line.get("key") == "header"]
        if len(headers) != 1 or not headers[0].get("summary"):
            raise HubError(400, "A commit needs exactly one header line with a summary")
        operations = [line for line in lines if line.get("key") != "header"]
        sha = self.hub._commit(repo, rev, operations, headers[0]["summary"])
        self._send_json({
            "success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo}/commit/{sha}",
            "hookOutput": "", "pullRequestUrl": None,
        })

    def _route_resolve(self, repo: str, rev: str, path: str) -> None:
        commit = self.hub._snapshot(repo, rev)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", commit=commit.sha)
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{git_blob_sha(data)}"',
                   "X-Repo-Commit": commit.sha}
        if is_lfs(path):
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        self._send(200, data, headers)

    def _route_lfs_batch(self, repo: str) -> None:
        self._require_token()
        self.hub._snapshot(repo, "main")  # RepoNotFound
        payload = json.loads(self.body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "This test Hub serves LFS uploads with the basic transfer only")
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.hub._lfs:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs/objects/{item['oid']}"},
                                    "verify": {"href": f"{self.hub.url}/lfs/verify"}}
            objects.append(entry)
        self._send_json({"transfer": "basic", "objects": objects})

    def _route_lfs_put(self, oid: str) -> None:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"LFS object {oid}: the body's sha256 differs (truncated upload?)")
        with self.hub._lock:
            self.hub._lfs[oid] = self.body
        self._send(200, b"", {})

    def _route_lfs_verify(self) -> None:
        item = json.loads(self.body)
        if len(self.hub._lfs.get(item["oid"], b"")) != item["size"] or item["oid"] not in self.hub._lfs:
            raise HubError(404, f"LFS object {item['oid']} not stored")
        self._send_json({"success": True})


def run_client(hub: HubServer, home: Path, code: str, *args: str) -> str:
    """Run `code` in a fresh interpreter pointed at `hub`; return its stdout, failing with its stderr.

    Inherited HF_*/TRANSFORMERS_* settings (offline mode, another endpoint or token) are dropped first.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT=hub.url, HF_TOKEN="dummy", HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost", OMP_NUM_THREADS="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
