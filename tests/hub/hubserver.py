"""A local Hub-compatible HTTP server for the Hub tests (no network).

It implements the subset of the Hugging Face Hub API that huggingface_hub 2.4's
``create_repo``, ``create_branch``, ``create_commit`` (preupload, LFS batch, basic LFS
upload, ndjson commit, README metadata validation), ``model_info``, ``list_repo_tree``,
``list_repo_refs``, ``hf_hub_download`` and ``snapshot_download`` send, with the
response shapes read from huggingface_hub's source. Repositories live in memory:
each commit is a full file table ``path -> (oid, lfs sha256 or None)``; contents are
stored by oid. Bearer tokens map to users; a private repository is invisible (401)
without its owner's token; every write needs a valid token.

Fault knobs for the tests: ``corrupt`` (paths whose served bytes are altered),
``cut_after`` (send that many bytes of a file, then drop the connection and refuse
further file downloads while ``down`` is set).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    commits: dict[str, dict[str, tuple[str, str | None, int]]] = field(default_factory=dict)
    # commit sha -> {path: (git oid, lfs sha256 or None, size)}


class HubState:
    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # git oid or lfs sha256 -> content
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.corrupt: set[str] = set()
        self.cut_after: dict[str, int] = {}
        self.down = False
        self.counter = 0

    # -- repository content -------------------------------------------------------------
    def new_commit(self, repo: Repo, files: dict[str, tuple[str, str | None, int]]) -> str:
        self.counter += 1
        sha = hashlib.sha1(json.dumps([self.counter, sorted(files.items())]).encode()).hexdigest()
        repo.commits[sha] = files
        return sha

    def add_regular(self, data: bytes) -> tuple[str, None, int]:
        oid = git_blob_sha1(data)
        self.blobs[oid] = data
        return oid, None, len(data)

    def add_lfs(self, data: bytes) -> tuple[str, str, int]:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
        )
        return git_blob_sha1(pointer.encode()), sha, len(data)

    def resolve(self, repo: Repo, revision: str | None) -> str | None:
        rev = revision or "main"
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        return None

    def put_files(self, repo_id: str, files: dict[str, bytes], *, revision: str = "main") -> str:
        """Test helper: commit raw files directly (e.g. a pickle-only repository)."""
        repo = self.repos[repo_id]
        table = dict(repo.commits[repo.branches[revision]])
        for path, data in files.items():
            table[path] = (
                self.add_lfs(data) if path.endswith(LFS_SUFFIXES) else self.add_regular(data)
            )
        repo.branches[revision] = self.new_commit(repo, table)
        return repo.branches[revision]


class _Cut(Exception):
    pass


def make_handler(state: HubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        # -- plumbing ------------------------------------------------------------------
        def _user(self) -> str | None:
            auth = self.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                return state.tokens.get(auth[7:].strip())
            return None

        def _body(self) -> bytes:
            n = int(self.headers.get("content-length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(
            self,
            status: int,
            body: bytes | dict[str, Any] | list[Any] = b"",
            headers: dict[str, str] | None = None,
            head: bool = False,
        ) -> None:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers)

        def _repo(self, repo_id: str, *, write: bool = False) -> Repo | None:
            repo = state.repos.get(repo_id)
            user = self._user()
            if repo is None or (repo.private and user != repo.owner):
                status = 401 if user is None else 404
                self._error(status, "RepoNotFound", "Repository not found")
                return None
            if write and user != repo.owner:
                self._error(403, None, "You don't have the rights to write to this repo")
                return None
            return repo

        def _commit(self, repo: Repo, revision: str) -> str | None:
            sha = state.resolve(repo, revision)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return sha

        # -- dispatch ------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            query = parse_qs(url.query)
            with state.lock:
                state.requests.append((method, url.path))
            try:
                self._route(method, parts, query)
            except _Cut:
                self.close_connection = True

        def _route(self, method: str, parts: list[str], query: dict[str, list[str]]) -> None:
            if parts[:2] == ["api", "whoami-v2"]:
                user = self._user()
                if user is None:
                    return self._error(401, None, "Invalid credentials in Authorization header")
                return self._send(200, {"type": "user", "name": user, "orgs": []})
            if parts == ["api", "validate-yaml"] and method == "POST":
                self._body()
                return self._send(200, {"errors": [], "warnings": []})
            if parts == ["api", "repos", "create"] and method == "POST":
                return self._create(json.loads(self._body() or b"{}"))
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                return self._api_model(method, f"{parts[2]}/{parts[3]}", parts[4:], query)
            if len(parts) == 2 and parts[0] == "lfs-upload" and method == "PUT":
                return self._lfs_put(parts[1])
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(
                    method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                )
            if (
                len(parts) == 6
                and parts[1].endswith(".git")
                and parts[2:] == ["info", "lfs", "objects", "batch"]
            ):
                return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
            self._error(404, None, f"no route for {method} /{'/'.join(parts)}")
            return None

        # -- repositories ----------------------------------------------------------------
        def _create(self, payload: dict[str, Any]) -> None:
            user = self._user()
            if user is None:
                return self._error(401, None, "Invalid credentials in Authorization header")
            owner = payload.get("organization") or user
            repo_id = f"{owner}/{payload['name']}"
            private = bool(payload.get("private")) or payload.get("visibility") == "private"
            base = f"http://{self.headers.get('host')}"
            with state.lock:
                if repo_id in state.repos:
                    # the Hub answers a conflict with the URL too (create_repo(exist_ok) reads it)
                    message = "You already created this model repo"
                    body = {"error": message, "url": f"{base}/{repo_id}"}
                    return self._send(409, body, {"X-Error-Message": message})
                repo = Repo(owner=user, private=private)
                state.repos[repo_id] = repo
                files = {".gitattributes": state.add_regular(GITATTRIBUTES)}
                repo.branches["main"] = state.new_commit(repo, files)
            return self._send(200, {"url": f"{base}/{repo_id}", "name": repo_id})

        def _api_model(
            self, method: str, repo_id: str, rest: list[str], query: dict[str, list[str]]
        ) -> None:
            write = method == "POST"
            repo = self._repo(repo_id, write=write)
            if repo is None:
                return None
            if not rest or rest[0] == "revision":
                sha = self._commit(repo, rest[1] if rest else "main")
                if sha is None:
                    return None
                return self._send(200, self._info(repo_id, repo, sha))
            if rest[0] == "tree" and len(rest) >= 2:
                sha = self._commit(repo, rest[1])
                if sha is None:
                    return None
                entries = [
                    {
                        "type": "file",
                        "path": path,
                        "size": size,
                        "oid": oid,
                        **({"lfs": {"oid": lfs, "size": size, "pointerSize": 134}} if lfs else {}),
                    }
                    for path, (oid, lfs, size) in sorted(repo.commits[sha].items())
                ]
                return self._send(200, entries)
            if rest[0] == "refs":
                return self._send(
                    200,
                    {
                        "branches": [
                            {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                            for n, s in repo.branches.items()
                        ],
                        "tags": [],
                        "converts": [],
                    },
                )
            if rest[0] == "branch" and method == "POST":
                branch = "/".join(rest[1:])
                payload = json.loads(self._body() or b"{}")
                start = state.resolve(repo, payload.get("startingPoint"))
                if branch in repo.branches:
                    return self._error(409, None, "Reference already exists")
                repo.branches[branch] = start or repo.branches["main"]
                return self._send(200, {})
            if rest[0] == "preupload" and method == "POST":
                payload = json.loads(self._body())
                files = [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                        "shouldIgnore": False,
                    }
                    for f in payload["files"]
                ]
                return self._send(200, {"files": files})
            if rest[0] == "commit" and method == "POST":
                return self._commit_post(repo_id, repo, "/".join(rest[1:]))
            self._error(404, None, f"no route for {method} {rest}")
            return None

        def _info(self, repo_id: str, repo: Repo, sha: str) -> dict[str, Any]:
            siblings = []
            for path, (oid, lfs, size) in sorted(repo.commits[sha].items()):
                sibling: dict[str, Any] = {"rfilename": path, "size": size, "blobId": oid}
                if lfs:
                    sibling["lfs"] = {"size": size, "sha256": lfs, "pointerSize": 134}
                siblings.append(sibling)
            return {
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": repo.private,
                "siblings": siblings,
                "tags": [],
            }

        def _commit_post(self, repo_id: str, repo: Repo, revision: str) -> None:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            with state.lock:
                if revision not in repo.branches:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                table = dict(repo.commits[repo.branches[revision]])
                for item in lines:
                    key, value = item["key"], item["value"]
                    if key == "file":
                        data = base64.b64decode(value["content"])
                        table[value["path"]] = state.add_regular(data)
                    elif key == "lfsFile":
                        oid = value["oid"]
                        if oid not in state.blobs:
                            return self._error(400, None, f"LFS object {oid} was not uploaded")
                        data = state.blobs[oid]
                        table[value["path"]] = state.add_lfs(data)
                    elif key == "deletedFile":
                        table.pop(value["path"], None)
                sha = state.new_commit(repo, table)
                repo.branches[revision] = sha
            base = f"http://{self.headers.get('host')}"
            return self._send(
                200,
                {
                    "commitUrl": f"{base}/{repo_id}/commit/{sha}",
                    "commitOid": sha,
                    "success": True,
                    "pullRequestUrl": None,
                },
            )

        # -- LFS ---------------------------------------------------------------------------
        def _lfs_batch(self, repo_id: str) -> None:
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return None
            payload = json.loads(self._body())
            base = f"http://{self.headers.get('host')}"
            objects = []
            for obj in payload["objects"]:
                entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in state.blobs:
                    entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            return self._send(200, {"transfer": "basic", "objects": objects})

        def _lfs_put(self, oid: str) -> None:
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, None, "sha256 mismatch")
            state.blobs[oid] = data
            return self._send(200, {})

        # -- file resolution ---------------------------------------------------------------
        def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
            if state.down:
                raise _Cut
            repo = self._repo(repo_id)
            if repo is None:
                return None
            sha = self._commit(repo, revision)
            if sha is None:
                return None
            entry = repo.commits[sha].get(path)
            if entry is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
            oid, lfs, size = entry
            data = state.blobs[lfs or oid]
            if path in state.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{lfs or oid}"', "Accept-Ranges": "bytes"}
            if lfs:
                headers["X-Linked-Etag"] = f'"{lfs}"'
                headers["X-Linked-Size"] = str(size)
            status, start = 200, 0
            ranged = self.headers.get("range", "")
            if ranged.startswith("bytes=") and method == "GET":
                start = int(ranged[6:].split("-")[0] or 0)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            cut = state.cut_after.get(path)
            if method == "GET" and cut is not None:
                # Promise the whole body, send part of it, then go away.
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:cut])
                self.wfile.flush()
                state.down = True
                time.sleep(0.05)
                raise _Cut
            return self._send(status, body, headers, head=method == "HEAD")

    return Handler


class HubServer:
    """``with HubServer(tokens) as hub: hub.endpoint``."""

    def __init__(self, tokens: dict[str, str]):
        self.state = HubState(tokens)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state))
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
