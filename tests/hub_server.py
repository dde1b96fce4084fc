"""A small Hub-compatible HTTP server on 127.0.0.1, for testing efm against the real huggingface_hub client.

It serves the endpoints the client calls for downloads and pushes: model info (optionally at a revision), the
file tree, file resolution (HEAD and GET, with ETag, X-Repo-Commit and the error codes the client understands),
repo and branch creation, YAML validation, preupload, ndjson commits, and the Git LFS upload protocol. Repos live
in memory as commits (a commit maps paths to bytes) and refs (branch or tag name → commit). Faults can be injected
per request pattern, and every request is logged so tests can count what the client really asked for.

LFS, as the real Hub does it for files its `.gitattributes` marks `filter=lfs` (every new repo tracks
`*.safetensors`): preupload answers "lfs" for them; the client asks the batch endpoint what to do with each object
(sha256 oid + size), PUTs the bytes to the `upload` href it gets back (on the Hub a signed storage URL, here this
server), POSTs the `verify` href, and finally commits an `lfsFile` line naming the oid instead of the bytes. An
object the repo already stores gets no actions, so it is not uploaded again. Multipart uploads are never offered.
The client only takes this path with Xet disabled (HF_HUB_DISABLE_XET=1): with hf_xet installed it would upload
through Xet storage instead, which this server does not speak.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

CUT = 0
"""`Fault.status` of a response cut off in the middle of its body (see `HubServer.cut`)."""

TOKEN = "hf_TestTokenNeverPrinted0123456789"
"""The one token the server accepts; tests check it never shows up in efm's output."""

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_LFS = r"^/(?P<repo>[^/]+/[^/]+?)\.git/info/lfs/objects"
_ROUTES = [
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"), "branch"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"{_LFS}/batch$"), "lfs_batch"),
    ("PUT", re.compile(rf"{_LFS}/(?P<oid>[0-9a-f]{{64}})$"), "lfs_upload"),
    ("POST", re.compile(rf"{_LFS}/verify$"), "lfs_verify"),
]


def lfs_pointer(data: bytes) -> bytes:
    """The pointer file git keeps in the tree in place of an LFS file's bytes."""
    oid = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()


def git_blob_id(data: bytes) -> str:
    """The id git gives a blob: the sha1 of a short header plus the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """A model repo: commits (sha → {path: bytes}), refs (name → sha), visibility, and LFS storage.

    `lfs` holds the objects uploaded through LFS (sha256 → bytes); a file whose bytes are one of them is served as
    an LFS file. `granted` holds the oids (→ size) the batch endpoint told a client to upload: the PUT carries no
    token (on the Hub it goes to a signed storage URL), so only an upload the batch endpoint handed out is taken.
    """

    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    granted: dict[str, int] = field(default_factory=dict)

    def commit(self, files: dict[str, bytes], branch: str = "main") -> str:
        """Add a commit on `branch` holding the branch's files updated by `files`; return its sha."""
        parent = self.refs.get(branch)
        tree = {**(self.commits[parent] if parent else {}), **files}
        digest = hashlib.sha1(json.dumps([parent, sorted(tree)]).encode())
        for path in sorted(tree):
            digest.update(tree[path])
        sha = digest.hexdigest()
        self.commits[sha] = tree
        self.refs[branch] = sha
        return sha

    def lookup(self, revision: str) -> str | None:
        """The commit sha a branch, tag or full sha names, else None."""
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None

    def tracks_lfs(self, sha: str, path: str) -> bool:
        """Whether the `.gitattributes` of commit `sha` puts `path` in LFS (`PATTERN ... filter=lfs ...` lines).

        As in git, a pattern without a slash matches the file name in any folder, one with a slash the whole path.
        """
        for line in self.commits[sha].get(".gitattributes", b"").decode().splitlines():
            fields = line.split()
            if len(fields) < 2 or "filter=lfs" not in fields[1:]:
                continue
            pattern = fields[0]
            if fnmatch.fnmatchcase(path if "/" in pattern else path.rsplit("/", 1)[-1], pattern):
                return True
        return False

    def oid(self, data: bytes) -> str:
        """What preupload reports for a stored file: its LFS sha256, or its git blob id; the client skips equal ones."""
        return self.lfs_oid(data) or git_blob_id(data)

    def lfs_oid(self, data: bytes) -> str | None:
        """The sha256 oid of `data` if it was uploaded through LFS, else None."""
        oid = hashlib.sha256(data).hexdigest()
        return oid if oid in self.lfs else None


@dataclass
class Fault:
    """Answer `status` (instead of serving), after `delay` seconds, to the next `times` matching requests."""

    method: str
    pattern: re.Pattern[str]
    status: int
    times: int
    delay: float = 0.0


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    authorized: bool


class HubServer:
    """Start with `start()`, point HF_ENDPOINT at `url`, stop with `stop()`; see the module docstring."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.log: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: later connections to `url` are refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def add(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", private: bool = False) -> str:
        """Commit `files` to `repo_id` (created if new) on `branch`; return the commit sha."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id, private=private))
        return repo.commit(files, branch)

    def fail(self, method: str, pattern: str, status: int = 500, times: int = 1, delay: float = 0.0) -> None:
        self.faults.append(Fault(method, re.compile(pattern), status, times, delay))

    def cut(self, pattern: str, times: int = 1) -> None:
        """Answer the next `times` matching GETs with their full length announced but only half the body sent."""
        self.fail("GET", pattern, status=CUT, times=times)

    def requests(self, kind: str = "", method: str | None = None) -> list[Request]:
        """Logged requests whose path contains `kind` (e.g. '/resolve/'), optionally of one method."""
        with self._lock:
            return [r for r in self.log if kind in r.path and (method is None or r.method == method)]

    def file_requests(self) -> list[Request]:
        return self.requests("/resolve/")

    def _fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fault.pattern.search(path):
                    fault.times -= 1
                    return fault
        return None

    def _record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the request log is kept in `hub.log` instead."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    @property
    def authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {TOKEN}"

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        fault = self.hub._fault(method, url.path)
        self.cut = fault is not None and fault.status == CUT
        try:
            if fault is not None and not self.cut:
                time.sleep(fault.delay)
                self._send(fault.status, {"error": "injected fault"})
            else:
                self._route(method, url.path)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up waiting (a timeout test): nothing left to answer
        self.hub._record(Request(method, unquote(url.path), self._status, self.authorized))

    def _route(self, method: str, path: str) -> None:
        for route_method, pattern, name in _ROUTES:
            match = pattern.match(path)
            if match and route_method == method:
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                getattr(self, f"_{name}")(method, **params)
                return
        self._send(404, {"error": "no such endpoint"})

    def _send(
        self, status: int, payload: Any = None, *, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self._status = status
        data = body if body is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if body is None else "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        # No keep-alive: a stopped server must refuse the next request, not leave a pooled connection behind.
        self.send_header("Connection", "close")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[: len(data) // 2] if self.cut else data)
            self.close_connection = self.close_connection or self.cut

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})}
        self._send(status, {"error": message}, headers=headers)

    def _readable(self, repo_id: str) -> Repo | None:
        """The repo if it exists and this request may see it; otherwise answer as the Hub does and return None."""
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self.authorized):
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        return repo

    def _revision(self, repo: Repo, revision: str) -> str | None:
        sha = repo.lookup(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def _info(self, method: str, repo: str, rev: str = "main") -> None:
        found = self._readable(repo)
        sha = found and self._revision(found, rev)
        if found and sha:
            files = found.commits[sha]
            self._send(
                200,
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": sha,
                    "private": found.private,
                    "tags": [],
                    "siblings": [{"rfilename": path} for path in sorted(files)],
                },
            )

    def _tree(self, method: str, repo: str, rev: str, path: str = "") -> None:
        found = self._readable(repo)
        sha = found and self._revision(found, rev)
        if found and sha:
            entries = []
            for name, data in sorted(found.commits[sha].items()):
                if not name.startswith(path):
                    continue
                entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                oid = found.lfs_oid(data)
                if oid is not None:  # as on the Hub: the git oid is the pointer's, the lfs entry describes the bytes
                    pointer = lfs_pointer(data)
                    entry["oid"] = git_blob_id(pointer)
                    entry["lfs"] = {"oid": oid, "size": len(data), "pointerSize": len(pointer)}
                entries.append(entry)
            self._send(200, entries)

    def _resolve(self, method: str, repo: str, rev: str, path: str) -> None:
        found = self._readable(repo)
        sha = found and self._revision(found, rev)
        if not (found and sha):
            return
        data = found.commits[sha].get(path)
        if data is None:
            self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": sha})
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        oid = found.lfs_oid(data)
        if oid is not None:
            # The Hub's answer for an LFS file: the ETag is the git pointer's, X-Linked-Etag and X-Linked-Size describe
            # the bytes, and the client prefers them (the cached blob is named by the sha256). The Hub would also
            # redirect to its CDN, another host; this server serves the bytes itself, because the client follows a
            # redirect to the same host on HEAD and would then miss these headers on the final answer.
            headers.update(
                {
                    "ETag": f'"{git_blob_id(lfs_pointer(data))}"',
                    "X-Linked-Etag": f'"{oid}"',
                    "X-Linked-Size": str(len(data)),
                }
            )
        start = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if start and method == "GET":
            offset = int(start[1])
            headers["Content-Range"] = f"bytes {offset}-{len(data) - 1}/{len(data)}"
            self._send(206, body=data[offset:], headers=headers)
        else:
            self._send(200, body=data, headers=headers)

    def _json_body(self) -> Any:
        return json.loads(self.body or b"{}")

    def _writable(self, repo_id: str) -> Repo | None:
        if not self.authorized:
            self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return None
        return self._readable(repo_id)

    def _create(self, method: str) -> None:
        if not self.authorized:
            self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return
        payload = self._json_body()
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.hub.repos:
            self._send(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
            return
        repo = self.hub.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
        repo.commit({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, method: str) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def _branch(self, method: str, repo: str, rev: str) -> None:
        found = self._writable(repo)
        if found is None:
            return
        if rev in found.refs:
            self._send(409, {"error": "Reference already exists"})
            return
        start = self._json_body().get("startingPoint", "main")
        sha = self._revision(found, start)
        if sha:
            found.refs[rev] = sha
            self._send(200, {})

    def _preupload(self, method: str, repo: str, rev: str) -> None:
        found = self._writable(repo)
        if found is not None:
            files = self._json_body()["files"]
            sha = found.lookup(rev)
            stored = found.commits[sha] if sha else {}
            answer = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if sha and found.tracks_lfs(sha, f["path"]) else "regular",
                    "shouldIgnore": False,
                    **({"oid": found.oid(stored[f["path"]])} if f["path"] in stored else {}),
                }
                for f in files
            ]
            self._send(200, {"files": answer, "commitOid": sha})

    def _commit(self, method: str, repo: str, rev: str) -> None:
        found = self._writable(repo)
        if found is None or not self._revision(found, rev):
            return
        files: dict[str, bytes] = {}
        for line in self.body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "lfsFile":
                data = found.lfs.get(item["value"]["oid"])
                if data is None or item["value"].get("size", len(data)) != len(data):
                    # Nothing is committed: a commit never points at an object its storage lacks.
                    self._send(400, {"error": f"LFS object of {item['value']['path']} was never uploaded"})
                    return
                files[item["value"]["path"]] = data
            elif item["key"] != "header":
                self._send(400, {"error": f"this test server does not support {item['key']!r}"})
                return
        sha = found.commit(files, rev)
        self._send(200, {"commitUrl": f"{self.hub.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def _lfs_batch(self, method: str, repo: str) -> None:
        """Tell the client, per object, whether and where to upload it; a stored object gets no actions."""
        found = self._writable(repo)
        if found is None:
            return
        request = self._json_body()
        if request.get("operation") != "upload":
            self._send(400, {"error": "this test server takes LFS uploads only; files download through /resolve/"})
            return
        base = f"{self.hub.url}/{repo}.git/info/lfs/objects"
        objects = []
        for item in request["objects"]:
            answer = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in found.lfs:
                found.granted[item["oid"]] = item["size"]
                answer["actions"] = {"upload": {"href": f"{base}/{item['oid']}"}, "verify": {"href": f"{base}/verify"}}
            objects.append(answer)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_upload(self, method: str, repo: str, oid: str) -> None:
        """Store the PUT body as object `oid`, if the batch endpoint granted it and the bytes are what it announced."""
        found = self.hub.repos.get(repo)
        size = found.granted.get(oid) if found else None
        if found is None or size is None:
            self._send(403, {"error": "no upload of this object was granted"})
        elif len(self.body) != size or hashlib.sha256(self.body).hexdigest() != oid:
            self._send(400, {"error": "the body does not match the announced oid and size"})
        else:
            found.lfs[oid] = self.body
            self._send(200, body=b"")

    def _lfs_verify(self, method: str, repo: str) -> None:
        """Confirm that an object arrived whole: 200 if it is stored with the size the client claims, else 404."""
        found = self._writable(repo)
        if found is None:
            return
        claim = self._json_body()
        data = found.lfs.get(claim.get("oid", ""))
        if data is None or len(data) != claim.get("size"):
            self._send(404, {"error": "object not uploaded"})
        else:
            self._send(200, {})
