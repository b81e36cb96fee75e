"""A loopback fake of the Hugging Face Hub, with a separate "CDN" port for LFS files.

It speaks the subset of the Hub protocol that ``huggingface_hub`` (2.4) and ``datasets`` (5.2)
use to find and download files (see ``/work/shared/notes/hub-protocol.md``), faithfully enough
that the real libraries work against it with ``HF_ENDPOINT`` pointing at :attr:`FakeHub.endpoint`:

* ``GET  /api/{models|datasets}/{id}[/revision/{rev}]``     repo info (``id``, ``sha``, ``siblings``, ...)
* ``GET  /api/{models|datasets}/{id}/tree/{rev}[/{path}]``  listing, ``recursive``/``expand``, ``Link`` pagination
* ``POST /api/{models|datasets}/{id}/paths-info/{rev}``     form fields ``paths`` (repeated), ``expand``
* ``GET  /api/{models|datasets}/{id}/refs``                 branches and tags
* ``HEAD|GET /[datasets/]{id}/resolve/{rev}/{path}``        regular files: 200/206 with ``ETag`` (git blob
  sha1), ``X-Repo-Commit``; LFS files: ``302`` to the CDN port with ``X-Linked-Etag`` (sha256),
  ``X-Linked-Size``, ``X-Repo-Commit``
* CDN port ``HEAD|GET /cdn/{sha256}?X-Amz-Signature=...``  the bytes (Range -> 206), signature checked,
  any ``Authorization`` header it receives is recorded in :attr:`FakeHub.cdn_auth_headers`

Errors carry ``X-Error-Code`` / ``X-Error-Message`` like the real Hub: ``RepoNotFound`` (401 without a
token, 404 with one), ``RevisionNotFound`` (404), ``EntryNotFound`` (404, with ``X-Repo-Commit``),
``GatedRepo`` (401 without a token, 403 with a token that was not granted access), and a 401 with
``X-Error-Message: Invalid credentials in Authorization header`` for a token that is not in
``valid_tokens``. Xet is never advertised (no ``X-Xet-Hash``, no ``xet-auth`` link, no ``xetHash``),
so clients use plain HTTP even when ``hf_xet`` is installed.

Every request is logged (:attr:`FakeHub.requests`), and faults can be injected on either port with
:meth:`FakeHub.add_fault`: ``drop``, ``corrupt``, ``status``, ``ignore_range``, ``stall``,
``bad_etag``, ``traversal_tree``.

Files may be ``bytes`` or paths on disk; on-disk files are streamed (``sendfile`` when no fault
applies) and hashed once, in chunks, when added (optionally cached in a JSON file across runs).

Command line (benchmarks)::

    python -m tests.support.fakehub --data DIR [--port P] [--cdn-port Q] [--repo-id ORG/NAME]

serves a folder made by :mod:`tests.support.synth` and prints ``FAKEHUB_ENDPOINT=http://127.0.0.1:P``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import http.server
import json
import os
import pathlib
import re
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "FakeHub",
    "Fault",
    "Headers",
    "HubFile",
    "FAULT_KINDS",
    "LFS_SUFFIXES",
    "ULTRACHAT_REPO_ID",
    "running_hub",
    "client_env",
    "git_blob_sha1",
    "lfs_pointer",
]

ULTRACHAT_REPO_ID = "HuggingFaceH4/ultrachat_200k"

#: Suffixes stored in LFS whatever their size (as the default ``.gitattributes`` of Hub repos says).
LFS_SUFFIXES = (
    ".parquet", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".arrow",
    ".gz", ".zip", ".zst", ".tar", ".npy", ".npz", ".pkl", ".model", ".gguf",
)  # fmt: skip

FAULT_KINDS = ("drop", "corrupt", "status", "ignore_range", "stall", "bad_etag", "traversal_tree")

_DEFAULT_GITATTRIBUTES = (
    "*.7z filter=lfs diff=lfs merge=lfs -text\n"
    "*.arrow filter=lfs diff=lfs merge=lfs -text\n"
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.gz filter=lfs diff=lfs merge=lfs -text\n"
    "*.parquet filter=lfs diff=lfs merge=lfs -text\n"
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*.zip filter=lfs diff=lfs merge=lfs -text\n"
    "*.zst filter=lfs diff=lfs merge=lfs -text\n"
).encode()

_FIXED_DATE = "2024-01-01T00:00:00.000Z"
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 1 << 20
_TREE_KEYWORDS = {"revision", "tree", "paths-info", "refs", "commits", "preupload", "commit", "treesize"}


# --------------------------------------------------------------------------------------------
# Content model
# --------------------------------------------------------------------------------------------


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with these bytes (``sha1("blob <len>\\0" + data)``)."""
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class HubFile:
    """One file of a commit. ``data`` (in memory) or ``source`` (on disk) holds the bytes."""

    path: str
    size: int
    lfs: bool
    sha256: str
    git_oid: str  # git blob id: of the content for regular files, of the pointer file for LFS files
    pointer_size: int | None = None
    data: bytes | None = None
    source: pathlib.Path | None = None

    def chunks(self, start: int = 0, length: int | None = None, chunk: int = _CHUNK) -> Iterator[bytes]:
        """The bytes ``[start, start + length)`` in chunks."""
        if length is None:
            length = self.size - start
        if self.data is not None:
            view = memoryview(self.data)
            for off in range(start, start + length, chunk):
                yield bytes(view[off : min(off + chunk, start + length)])
            return
        assert self.source is not None
        with open(self.source, "rb") as f:
            f.seek(start)
            left = length
            while left > 0:
                buf = f.read(min(chunk, left))
                if not buf:
                    raise OSError(f"{self.source} shrank while being served")
                left -= len(buf)
                yield buf

    def read(self) -> bytes:
        return self.data if self.data is not None else b"".join(self.chunks())


@dataclass
class _Commit:
    sha: str
    files: dict[str, HubFile]  # sorted by path
    dirs: dict[str, str] = field(default_factory=dict)  # dir path -> fake tree oid

    def __post_init__(self) -> None:
        children: dict[str, list[str]] = {}
        for path, f in self.files.items():
            parts = path.split("/")
            for i in range(1, len(parts)):
                children.setdefault("/".join(parts[:i]), []).append(f"{path}:{f.git_oid}")
        self.dirs = {d: hashlib.sha1("\n".join(sorted(c)).encode()).hexdigest() for d, c in sorted(children.items())}


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    private: bool = False
    gated_tokens: frozenset[str] | None = None  # None: not gated

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        for prefix, table in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if rev.startswith(prefix) and rev[len(prefix) :] in table:
                return table[rev[len(prefix) :]]
        if _HEX40.match(rev) and rev in self.commits:
            return rev
        return None


class _HashCache:
    """sha256 / git sha1 of on-disk files keyed by (path, size, mtime), optionally persisted as JSON."""

    _memory: dict[tuple[str, int, int], tuple[str, str | None]] = {}
    _lock = threading.Lock()

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = pathlib.Path(path) if path else None
        self.dirty = False
        if self.path and self.path.is_file():
            try:
                for key, value in json.loads(self.path.read_text()).items():
                    p, size, mtime = key.rsplit("|", 2)
                    with self._lock:
                        self._memory[(p, int(size), int(mtime))] = (value[0], value[1])
            except (ValueError, KeyError, IndexError):
                pass

    def get(self, source: pathlib.Path, need_git_sha1: bool) -> tuple[str, str | None]:
        st = source.stat()
        key = (str(source.resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._memory.get(key)
        if hit and (hit[1] is not None or not need_git_sha1):
            return hit
        sha256 = hashlib.sha256()
        sha1 = hashlib.sha1(b"blob %d\0" % st.st_size) if need_git_sha1 else None
        with open(source, "rb") as f:
            while buf := f.read(8 * _CHUNK):
                sha256.update(buf)
                if sha1 is not None:
                    sha1.update(buf)
        value = (sha256.hexdigest(), sha1.hexdigest() if sha1 else None)
        with self._lock:
            self._memory[key] = value
        self.dirty = True
        return value

    def save(self) -> None:
        if not (self.path and self.dirty):
            return
        with self._lock:
            data = {f"{p}|{s}|{m}": list(v) for (p, s, m), v in self._memory.items()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=0))
        os.replace(tmp, self.path)
        self.dirty = False


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


@dataclass
class Fault:
    """An injected misbehaviour; see :meth:`FakeHub.add_fault`."""

    kind: str
    path_contains: str = ""
    times: int | None = 1  # None: forever
    port: str | None = None  # "hub", "cdn" or None for both
    method: str | None = None  # e.g. "GET"; None for any
    params: dict[str, Any] = field(default_factory=dict)
    hits: int = 0

    @property
    def remaining(self) -> int | None:
        return None if self.times is None else max(self.times - self.hits, 0)

    def matches(self, port: str, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.port is not None and self.port != port:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path_contains in path or self.path_contains in unquote(path)


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


class Headers(dict):
    """Request headers as logged: keys in canonical ``Title-Case``, lookups in any case."""

    @staticmethod
    def _key(key: str) -> str:
        return "-".join(part.capitalize() for part in key.split("-"))

    def __init__(self, items: Any = ()) -> None:
        super().__init__()
        for k, v in (items.items() if hasattr(items, "items") else items):
            self[k] = v

    def __setitem__(self, key: str, value: str) -> None:
        super().__setitem__(self._key(key), value)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(self._key(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(self._key(key))

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(self._key(key), default)


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


@dataclass
class _Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    file: HubFile | None = None  # stream file bytes [start, start+length) instead of `body`
    start: int = 0
    length: int = 0

    @property
    def content_length(self) -> int:
        return self.length if self.file is not None else len(self.body)


def _json_response(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> _Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return _Response(status, [("Content-Type", "application/json; charset=utf-8"), *(headers or [])], body)


def _error_response(err: _HubError) -> _Response:
    # Header values must be latin-1; keep them ASCII (the JSON body carries the exact message).
    headers = [("X-Error-Message", err.message.encode("ascii", "backslashreplace").decode())]
    if err.code:
        headers.insert(0, ("X-Error-Code", err.code))
    headers += list(err.headers.items())
    return _json_response(err.status, {"error": err.message}, headers)


def _parse_range(value: str | None, size: int) -> tuple[int, int] | None | str:
    """``(start, end_exclusive)``, ``None`` (no usable Range: serve 200) or ``"unsatisfiable"``."""
    if not value:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", value, flags=re.IGNORECASE)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # malformed or multi-range: ignoring Range is allowed by RFC 9110
    first, last = m.group(1), m.group(2)
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return (max(size - n, 0), size)
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if start >= size or (last and int(last) < start):
        return "unsatisfiable"
    return (start, end)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # keep-alive connections must not block stop()
    allow_reuse_address = True
    request_queue_size = 128  # clients open many connections at once

    def __init__(self, addr: tuple[str, int], hub: "FakeHub", port_name: str) -> None:
        self.hub = hub
        self.port_name = port_name
        super().__init__(addr, _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    timeout = 120  # idle keep-alive connections end eventually
    # Headers and body go out in separate writes: with Nagle on, each keep-alive response would
    # wait ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -- request handling ------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        hub = self.server.hub
        port = self.server.port_name
        body = self._read_body()
        entry: dict[str, Any] = {
            "port": port,
            "method": method,
            "path": self.path,
            "headers": Headers(self.headers.items()),
            "status": None,
            "bytes": 0,
            "fault": None,
            "route": None,
            "time": time.time(),
        }
        hub._log(entry)
        if port == "cdn" and self.headers.get("Authorization") is not None:
            hub._record_cdn_auth(self.path, self.headers.get("Authorization", ""))
        try:
            stall = hub._take_fault("stall", port, method, self.path)
            if stall:
                entry["fault"] = "stall"
                time.sleep(float(stall.params.get("seconds", 5.0)))
            status_fault = hub._take_fault("status", port, method, self.path)
            if status_fault:
                entry["fault"] = "status"
                resp = self._status_fault_response(status_fault)
            else:
                try:
                    resp = hub._route(self, port, method, body, entry)
                except _HubError as err:
                    resp = _error_response(err)
                except Exception as err:  # a bug in the fake: answer 500 and keep it for the test to see
                    hub._record_error(self.path, err)
                    resp = _error_response(_HubError(500, f"fakehub internal error: {err!r}"))
            self._send(resp, method, entry)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _status_fault_response(self, fault: Fault) -> _Response:
        status = int(fault.params.get("status", 500))
        message = str(fault.params.get("message", f"injected fault: HTTP {status}"))
        headers: dict[str, str] = dict(fault.params.get("headers", {}))
        if fault.params.get("retry_after") is not None:
            headers["Retry-After"] = str(fault.params["retry_after"])
        return _error_response(_HubError(status, message, fault.params.get("error_code"), headers))

    def _send(self, resp: _Response, method: str, entry: dict[str, Any]) -> None:
        hub = self.server.hub
        port = self.server.port_name
        self.send_response(resp.status)
        request_id = self.headers.get("X-Amzn-Trace-Id") or str(uuid.uuid4())
        headers = list(resp.headers) + [("X-Request-Id", request_id), ("Content-Length", str(resp.content_length))]
        for name, value in headers:
            self.send_header(name, value)
        entry["status"] = resp.status
        send_body = method != "HEAD" and resp.content_length > 0
        drop = corrupt = None
        if send_body:
            drop = hub._take_fault("drop", port, method, self.path)
            corrupt = None if drop else hub._take_fault("corrupt", port, method, self.path)
            if drop or corrupt:
                entry["fault"] = "drop" if drop else "corrupt"
        self.end_headers()
        if not send_body:
            return
        total = resp.content_length
        limit = total
        if drop:
            after = drop.params.get("after_bytes")
            limit = min(total // 2 if after is None else int(after), total)
        flip_at: set[int] = set()
        if corrupt:
            offset = corrupt.params.get("offset")
            offset = total // 2 if offset is None else min(int(offset), total - 1)
            flip_at = set(range(offset, min(offset + int(corrupt.params.get("length", 1)), total)))

        sent = 0
        if resp.file is None:
            data = bytearray(resp.body[:limit])
            for i in flip_at:
                if i < len(data):
                    data[i] ^= 0xFF
            self.wfile.write(bytes(data))
            sent = len(data)
        elif not (drop or corrupt) and resp.file.source is not None:
            with open(resp.file.source, "rb") as f:
                sent = self.connection.sendfile(f, offset=resp.start, count=resp.length)
        else:
            for chunk in resp.file.chunks(resp.start, limit):
                if flip_at:
                    buf = bytearray(chunk)
                    for i in flip_at:
                        if sent <= i < sent + len(buf):
                            buf[i - sent] ^= 0xFF
                    chunk = bytes(buf)
                self.wfile.write(chunk)
                sent += len(chunk)
                entry["bytes"] = sent
        entry["bytes"] = sent
        if drop:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.wfile.flush()
                if drop.params.get("rst"):  # close with a TCP reset instead of a FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()  # the fd really closes (-> RST) once rfile/wfile are closed
                else:
                    self.connection.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------------------------
# The hub
# --------------------------------------------------------------------------------------------


class FakeHub:
    """A fake Hugging Face Hub on 127.0.0.1 with a second port acting as the LFS CDN.

    Args:
        port, cdn_port: ports to bind (0: pick free ones).
        valid_tokens: if set, a request whose ``Authorization: Bearer`` token is not in it gets
            ``401 Invalid credentials in Authorization header``. ``None`` accepts any token.
        tree_page_size: entries per page of the tree listing (small, so pagination is exercised).
        hash_cache: optional JSON file to persist sha256 of on-disk files across runs.
        cdn_reject_auth: answer 400 (like S3 presigned URLs) when the CDN receives an
            ``Authorization`` header; the header is recorded either way.
    """

    def __init__(
        self,
        port: int = 0,
        cdn_port: int = 0,
        *,
        valid_tokens: set[str] | frozenset[str] | None = None,
        tree_page_size: int = 50,
        hash_cache: str | os.PathLike | None = None,
        cdn_reject_auth: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self._ports = (port, cdn_port)
        self.valid_tokens = None if valid_tokens is None else frozenset(valid_tokens)
        self.tree_page_size = tree_page_size
        self.cdn_reject_auth = cdn_reject_auth
        self._hash_cache = _HashCache(hash_cache)
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blobs: dict[str, HubFile] = {}  # sha256 -> LFS file, for the CDN
        self._faults: list[Fault] = []
        self._requests: list[dict[str, Any]] = []
        self._cdn_auth: list[dict[str, str]] = []
        self._errors: list[dict[str, str]] = []
        self._secret = os.urandom(16)
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self.endpoint: str = ""
        self.cdn_endpoint: str = ""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "FakeHub":
        if self._servers:
            return self
        hub_server = _Server((self.host, self._ports[0]), self, "hub")
        cdn_server = _Server((self.host, self._ports[1]), self, "cdn")
        self._servers = [hub_server, cdn_server]
        self.endpoint = f"http://{self.host}:{hub_server.server_address[1]}"
        self.cdn_endpoint = f"http://{self.host}:{cdn_server.server_address[1]}"
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            t.name = f"fakehub-{srv.port_name}"
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._servers[0].server_address[1] if self._servers else self._ports[0]

    @property
    def cdn_port(self) -> int:
        return self._servers[1].server_address[1] if self._servers else self._ports[1]

    # -- content ---------------------------------------------------------------------------

    def _make_file(self, path: str, content: bytes | str | os.PathLike, lfs_min_size: int) -> HubFile:
        if ".." in path.split("/") or path.startswith("/") or not path or "\\" in path:
            raise ValueError(f"bad repo path {path!r}")
        if isinstance(content, (bytes, bytearray, memoryview)):
            data = bytes(content)
            lfs = len(data) >= lfs_min_size or path.endswith(LFS_SUFFIXES)
            sha256 = hashlib.sha256(data).hexdigest()
            if lfs:
                pointer = lfs_pointer(sha256, len(data))
                return HubFile(path, len(data), True, sha256, git_blob_sha1(pointer), len(pointer), data=data)
            return HubFile(path, len(data), False, sha256, git_blob_sha1(data), data=data)
        source = pathlib.Path(content).resolve()
        size = source.stat().st_size
        lfs = size >= lfs_min_size or path.endswith(LFS_SUFFIXES)
        sha256, sha1 = self._hash_cache.get(source, need_git_sha1=not lfs)
        if lfs:
            pointer = lfs_pointer(sha256, size)
            return HubFile(path, size, True, sha256, git_blob_sha1(pointer), len(pointer), source=source)
        assert sha1 is not None
        return HubFile(path, size, False, sha256, sha1, source=source)

    def _make_commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        files: Mapping[str, bytes | str | os.PathLike],
        lfs_min_size: int,
    ) -> _Commit:
        hub_files = {p: self._make_file(p, c, lfs_min_size) for p, c in sorted(files.items())}
        listing = "\n".join(f"{p} {f.git_oid} {f.size}" for p, f in hub_files.items())
        sha = hashlib.sha1(f"{repo_type}/{repo_id}@{branch}\n{listing}".encode()).hexdigest()
        return _Commit(sha, hub_files)

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike],
        repo_type: str = "dataset",
        branch: str = "main",
        lfs_min_size: int = 10 * 1024 * 1024,
        extra_revisions: Mapping[str, Mapping[str, bytes | str | os.PathLike] | None] | None = None,
        private: bool = False,
        add_gitattributes: bool = True,
    ) -> str:
        """Add (or update) a repo; returns the commit sha that ``branch`` now points to.

        ``files`` maps repo paths to ``bytes`` or a path on disk. A file is LFS when its size is at
        least ``lfs_min_size`` or its name ends with one of :data:`LFS_SUFFIXES`. ``extra_revisions``
        maps more branch names to their own file sets, or to ``None`` for a tag on the new commit.
        Calling again for the same repo moves ``branch`` to a new commit; old commits stay
        reachable by sha. A ``.gitattributes`` is added like on real repos unless disabled.
        """
        if repo_type not in ("dataset", "model"):
            raise ValueError("repo_type must be 'dataset' or 'model'")
        files = dict(files)
        if add_gitattributes:
            files.setdefault(".gitattributes", _DEFAULT_GITATTRIBUTES)
        commit = self._make_commit(repo_type, repo_id, branch, files, lfs_min_size)
        extra_commits: dict[str, _Commit] = {}
        tags: list[str] = []
        for name, extra in (extra_revisions or {}).items():
            if extra is None:
                tags.append(name)
            else:
                extra = dict(extra)
                if add_gitattributes:
                    extra.setdefault(".gitattributes", _DEFAULT_GITATTRIBUTES)
                extra_commits[name] = self._make_commit(repo_type, repo_id, name, extra, lfs_min_size)
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), _Repo(repo_type, repo_id))
            repo.private = repo.private or private
            for name, c in [(branch, commit), *extra_commits.items()]:
                repo.commits[c.sha] = c
                repo.branches[name] = c.sha
                for f in c.files.values():
                    if f.lfs:
                        self._blobs[f.sha256] = f
            for name in tags:
                repo.tags[name] = commit.sha
        self._hash_cache.save()
        return commit.sha

    def add_tag(self, repo_id: str, tag: str, revision: str = "main", repo_type: str = "dataset") -> str:
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            sha = repo.resolve(revision)
            if sha is None:
                raise KeyError(revision)
            repo.tags[tag] = sha
            return sha

    def set_gated(
        self,
        repo_id: str,
        allowed_tokens: set[str] | frozenset[str] | None = frozenset(),
        repo_type: str = "dataset",
    ) -> None:
        """Gate a repo: file downloads need a token in ``allowed_tokens`` (``None`` ungates).

        Like the real Hub, metadata (repo info, tree, paths-info) stays readable; ``resolve``
        answers 401 ``GatedRepo`` without a token and 403 ``GatedRepo`` with one not granted.
        """
        tokens = None if allowed_tokens is None else frozenset(allowed_tokens)
        with self._lock:
            self._repos[(repo_type, repo_id)].gated_tokens = tokens

    def set_private(self, repo_id: str, private: bool = True, repo_type: str = "dataset") -> None:
        """A private repo looks exactly like a missing one to requests without a valid token."""
        with self._lock:
            self._repos[(repo_type, repo_id)].private = private

    def commit_sha(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> str:
        with self._lock:
            sha = self._repos[(repo_type, repo_id)].resolve(revision)
        if sha is None:
            raise KeyError(revision)
        return sha

    def file_info(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "dataset") -> HubFile:
        """The :class:`HubFile` (size, sha256, git_oid, lfs) of a file, e.g. to predict cache blob names."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return repo.commits[self.commit_sha(repo_id, revision, repo_type)].files[path]

    def resolve_url(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "dataset") -> str:
        prefix = "datasets/" if repo_type == "dataset" else ""
        return f"{self.endpoint}/{prefix}{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"

    # -- faults and logs -------------------------------------------------------------------

    def add_fault(
        self,
        kind: str,
        path_contains: str = "",
        times: int | None = 1,
        port: str | None = None,
        method: str | None = None,
        **params: Any,
    ) -> Fault:
        """Inject a fault into the next ``times`` matching requests (``None``: all of them).

        A request matches when its path (raw or percent-decoded, query included) contains
        ``path_contains``, and ``port`` ("hub"/"cdn") and ``method`` match when given. Kinds and
        their parameters:

        * ``drop``: send the headers (full ``Content-Length``) and ``after_bytes`` bytes of the
          body (default: half), then close the connection (``rst=True``: with a TCP reset).
        * ``corrupt``: flip ``length`` (1) bytes at body ``offset`` (default: the middle).
        * ``status``: answer ``status`` (500) instead, with optional ``retry_after``,
          ``error_code``, ``message``, ``headers``.
        * ``ignore_range``: answer 200 with the whole file even if a ``Range`` was asked.
        * ``stall``: sleep ``seconds`` (5) before answering (then answer normally).
        * ``bad_etag``: replace ``ETag``/``X-Linked-Etag`` by ``etag`` (default ``../../etc/passwd``).
        * ``traversal_tree``: add entries with ``paths`` (default ``["../evil.parquet",
          "/abs/path.parquet"]``) to a tree / paths-info answer.

        ``drop``/``corrupt`` only count on responses with a body; ``ignore_range`` only on file
        responses that were asked for a range; ``bad_etag`` on resolve and CDN responses;
        ``traversal_tree`` on listings.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        if port not in (None, "hub", "cdn"):
            raise ValueError("port must be 'hub', 'cdn' or None")
        fault = Fault(kind, path_contains, times, port, method, dict(params))
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, kind: str, port: str, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind == kind and fault.matches(port, method, path):
                    fault.hits += 1
                    return fault
        return None

    def _log(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(entry)

    def _record_error(self, path: str, err: BaseException) -> None:
        import traceback

        with self._lock:
            self._errors.append({"path": path, "error": "".join(traceback.format_exception(err))})

    @property
    def errors(self) -> list[dict[str, str]]:
        """Internal errors of the fake itself (tracebacks); a test may assert this stays empty."""
        with self._lock:
            return list(self._errors)

    def _record_cdn_auth(self, path: str, value: str) -> None:
        with self._lock:
            self._cdn_auth.append({"path": path, "authorization": value})

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Snapshot of the request log: dicts with ``port``, ``method``, ``path`` (raw, with query),
        ``headers`` (:class:`Headers`: any-case lookups), ``status``, ``bytes`` (body bytes sent),
        ``fault`` (kind applied or None), ``route`` ("revision", "tree", "paths-info", "refs",
        "resolve", "cdn", "api" for an unknown repo, "auth" for a rejected token, ``None`` for a
        URL the fake does not serve: a sign that a client asked for something the fake lacks),
        ``time``."""
        with self._lock:
            return [{**e, "headers": Headers(e["headers"])} for e in self._requests]

    def find_requests(
        self, *, port: str | None = None, method: str | None = None, path_contains: str = ""
    ) -> list[dict[str, Any]]:
        """Logged requests filtered by port, method and (raw or decoded) path substring."""
        return [
            e
            for e in self.requests
            if (port is None or e["port"] == port)
            and (method is None or e["method"] == method)
            and (path_contains in e["path"] or path_contains in unquote(e["path"]))
        ]

    @property
    def cdn_auth_headers(self) -> list[dict[str, str]]:
        """Every ``Authorization`` header the CDN port received (it should receive none)."""
        with self._lock:
            return list(self._cdn_auth)

    def clear_log(self) -> None:
        with self._lock:
            self._requests.clear()
            self._cdn_auth.clear()

    # -- routing ---------------------------------------------------------------------------

    def _route(self, h: _Handler, port: str, method: str, body: bytes, entry: dict[str, Any]) -> _Response:
        split = urlsplit(h.path)
        raw_segments = split.path.split("/")[1:]
        query = parse_qs(split.query, keep_blank_values=True)
        if port == "cdn":
            if method not in ("GET", "HEAD"):
                raise _HubError(405, "Method not allowed")
            entry["route"] = "cdn"
            return self._serve_cdn(h, method, raw_segments, query, entry)

        token = _bearer(h.headers.get("Authorization"))
        if token is not None and self.valid_tokens is not None and token not in self.valid_tokens:
            entry["route"] = "auth"
            raise _HubError(401, "Invalid credentials in Authorization header")

        if raw_segments[:1] == ["api"] and len(raw_segments) >= 3 and raw_segments[1] in ("models", "datasets"):
            repo_type = raw_segments[1][:-1]
            entry["route"] = "api"
            repo, rest = self._find_repo_in_api_path(repo_type, raw_segments[2:], token)
            action = rest[0] if rest else ""
            get = method in ("GET", "HEAD")
            if action == "" and get:
                entry["route"] = "revision"
                return self._repo_info(repo, "main", query)
            if action == "revision" and len(rest) >= 2 and get:
                entry["route"] = "revision"
                return self._repo_info(repo, unquote("/".join(rest[1:])), query)
            if action == "tree" and len(rest) >= 2 and get:
                rev, sub = _split_rev_and_path(repo, rest[1:])
                entry["route"] = "tree"
                return self._tree(h, repo, rev, sub, query, split.path, method, entry)
            if action == "paths-info" and len(rest) >= 2 and method == "POST":
                form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
                rev = unquote("/".join(rest[1:]))
                entry["route"] = "paths-info"
                return self._paths_info(h, repo, rev, form, method, entry)
            if action == "refs" and get:
                entry["route"] = "refs"
                return self._refs(repo, query)
            entry["route"] = None
            raise _HubError(404, "Sorry, we can't find the page you are looking for.")

        # /[datasets/]{id}/resolve/{rev}/{path}
        segs = raw_segments
        repo_type = "model"
        if segs[:1] == ["datasets"]:
            repo_type, segs = "dataset", segs[1:]
        elif segs[:1] in (["spaces"], ["kernels"], ["buckets"]):
            raise _HubError(404, "Sorry, we can't find the page you are looking for.")
        for id_len in (2, 1):
            if len(segs) > id_len + 1 and segs[id_len] == "resolve":
                entry["route"] = "resolve"
                if method not in ("GET", "HEAD"):
                    raise _HubError(405, "Method not allowed")
                repo = self._get_repo(repo_type, "/".join(unquote(s) for s in segs[:id_len]), token)
                rev, path = _split_rev_and_path(repo, segs[id_len + 1 :])
                return self._resolve(h, repo, rev, path, token, method, entry)
        raise _HubError(404, "Sorry, we can't find the page you are looking for.")

    def _find_repo_in_api_path(self, repo_type: str, segs: list[str], token: str | None) -> tuple[_Repo, list[str]]:
        two = "/".join(unquote(s) for s in segs[:2])
        one = unquote(segs[0])
        with self._lock:
            known_two = len(segs) >= 2 and (repo_type, two) in self._repos
            known_one = (repo_type, one) in self._repos
        if known_two:
            return self._get_repo(repo_type, two, token), segs[2:]
        if known_one:
            return self._get_repo(repo_type, one, token), segs[1:]
        # Unknown repo: report it under the most plausible id.
        guess = one if (len(segs) >= 2 and segs[1] in _TREE_KEYWORDS) or len(segs) == 1 else two
        return self._get_repo(repo_type, guess, token), []

    def _get_repo(self, repo_type: str, repo_id: str, token: str | None) -> _Repo:
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        if repo is not None and repo.private and not self._token_ok(token):
            repo = None
        if repo is None:
            # Like the real Hub: 401 when anonymous (could be private), 404 when authenticated.
            raise _HubError(404 if token else 401, "Repository not found", "RepoNotFound")
        return repo

    def _token_ok(self, token: str | None) -> bool:
        return token is not None and (self.valid_tokens is None or token in self.valid_tokens)

    def _commit(self, repo: _Repo, rev: str) -> _Commit:
        sha = repo.resolve(rev)
        if sha is None:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    # -- API endpoints ---------------------------------------------------------------------

    def _repo_info(self, repo: _Repo, rev: str, query: dict[str, list[str]]) -> _Response:
        commit = self._commit(repo, rev)
        blobs = _truthy(query.get("blobs"))
        siblings = []
        for f in commit.files.values():
            s: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                s["size"] = f.size
                s["blobId"] = f.git_oid
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(s)
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        payload: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": author,
            "sha": commit.sha,
            "lastModified": _FIXED_DATE,
            "createdAt": _FIXED_DATE,
            "private": repo.private,
            "gated": "manual" if repo.gated_tokens is not None else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        if repo.repo_type == "model":
            payload["modelId"] = repo.repo_id
        return _json_response(200, payload)

    def _refs(self, repo: _Repo, query: dict[str, list[str]]) -> _Response:
        def ref(kind: str, name: str, sha: str) -> dict[str, str]:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}

        payload: dict[str, Any] = {
            "branches": [ref("heads", n, s) for n, s in sorted(repo.branches.items())],
            "tags": [ref("tags", n, s) for n, s in sorted(repo.tags.items())],
            "converts": [],
        }
        if _truthy(query.get("include_prs")):
            payload["pullRequests"] = []
        return _json_response(200, payload)

    def _entry(self, commit: _Commit, path: str, expand: bool) -> dict[str, Any]:
        if path in commit.files:
            f = commit.files[path]
            e: dict[str, Any] = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path}
            if f.lfs:
                e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        else:
            e = {"type": "directory", "oid": commit.dirs[path], "size": 0, "path": path}
        if expand:
            e["lastCommit"] = {"id": commit.sha, "title": "Upload dataset", "date": _FIXED_DATE}
            if e["type"] == "file":
                e["securityFileStatus"] = {"status": "safe", "avScan": None, "pickleImportScan": None}
        return e

    def _tree(
        self,
        h: _Handler,
        repo: _Repo,
        rev: str,
        sub: str,
        query: dict[str, list[str]],
        raw_path: str,
        method: str,
        entry: dict[str, Any],
    ) -> _Response:
        commit = self._commit(repo, rev)
        recursive = _truthy(query.get("recursive"))
        expand = _truthy(query.get("expand"))
        sub = sub.strip("/")
        if sub and sub in commit.files:
            paths = [sub]
        elif sub and sub not in commit.dirs:
            raise _HubError(404, f"Entry not found: {sub}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        else:
            prefix = sub + "/" if sub else ""
            paths = []
            for p in sorted([*commit.dirs, *commit.files]):
                if not p.startswith(prefix):
                    continue
                if recursive or "/" not in p[len(prefix) :]:
                    paths.append(p)
        entries = [self._entry(commit, p, expand) for p in paths]

        limit = self.tree_page_size if not expand else min(self.tree_page_size, 50)
        if query.get("limit"):
            limit = max(1, min(limit, int(query["limit"][0])))
        start = _decode_cursor(query.get("cursor", [""])[0])
        page = entries[start : start + limit]
        headers: list[tuple[str, str]] = []
        if start + limit < len(entries):
            params = [f"recursive={'true' if recursive else 'false'}", f"expand={'true' if expand else 'false'}"]
            if query.get("limit"):
                params.append(f"limit={limit}")
            params.append(f"cursor={_encode_cursor(start + limit)}")
            headers.append(("Link", f"<{self.endpoint}{raw_path}?{'&'.join(params)}>; rel=\"next\""))
        fault = self._take_fault("traversal_tree", "hub", method, h.path)
        if fault:
            entry["fault"] = "traversal_tree"
            page = page + _traversal_entries(fault)
        return _json_response(200, page, headers)

    def _paths_info(
        self, h: _Handler, repo: _Repo, rev: str, form: dict[str, list[str]], method: str, entry: dict[str, Any]
    ) -> _Response:
        commit = self._commit(repo, rev)
        expand = _truthy(form.get("expand"))
        out = []
        seen = set()
        for p in form.get("paths", []):
            p = p.strip("/")
            if p in seen:
                continue
            seen.add(p)
            if p in commit.files or p in commit.dirs:
                out.append(self._entry(commit, p, expand))
        fault = self._take_fault("traversal_tree", "hub", method, h.path)
        if fault:
            entry["fault"] = "traversal_tree"
            out += _traversal_entries(fault)
        return _json_response(200, out)

    # -- file endpoints --------------------------------------------------------------------

    def _resolve(
        self, h: _Handler, repo: _Repo, rev: str, path: str, token: str | None, method: str, entry: dict[str, Any]
    ) -> _Response:
        commit = self._commit(repo, rev)
        if repo.gated_tokens is not None and not (self._token_ok(token) and token in repo.gated_tokens):
            kind = "dataset" if repo.repo_type == "dataset" else "model"
            page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo.repo_id}"
            if token is None:
                msg = (
                    f"Access to {kind} {repo.repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in."
                )
                raise _HubError(401, msg, "GatedRepo")
            msg = (
                f"Access to {kind} {repo.repo_id} is restricted and you are not in the authorized list. "
                f"Visit {page} to ask for access."
            )
            raise _HubError(403, msg, "GatedRepo")
        f = commit.files.get(path)
        if f is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        bad = self._take_fault("bad_etag", "hub", method, h.path)
        if bad:
            entry["fault"] = "bad_etag"
        bad_etag = str(bad.params.get("etag", "../../etc/passwd")) if bad else None
        base = [("X-Repo-Commit", commit.sha), ("Accept-Ranges", "bytes"), ("Vary", "Origin, Accept-Encoding")]
        if f.lfs:
            location = self._cdn_url(f)
            body = f"Found. Redirecting to {location}".encode()
            headers = base + [
                ("Location", location),
                ("X-Linked-Etag", f'"{bad_etag or f.sha256}"'),
                ("X-Linked-Size", str(f.size)),
                ("ETag", f'"{bad_etag or f.git_oid}"'),
                ("Content-Type", "text/plain; charset=utf-8"),
            ]
            return _Response(302, headers, body)
        headers = base + [("ETag", f'"{bad_etag or f.git_oid}"'), ("Content-Type", _content_type(f.path))]
        headers.append(("Content-Disposition", _disposition(f.path)))
        return self._file_response(h, f, headers, method, "hub", entry)

    def _cdn_url(self, f: HubFile) -> str:
        sig = hmac.new(self._secret, f.sha256.encode(), hashlib.sha256).hexdigest()
        disposition = quote(_disposition(f.path), safe="")
        return (
            f"{self.cdn_endpoint}/cdn/{f.sha256}?response-content-disposition={disposition}"
            f"&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=3600&X-Amz-Signature={sig}"
        )

    def _serve_cdn(
        self, h: _Handler, method: str, segs: list[str], query: dict[str, list[str]], entry: dict[str, Any]
    ) -> _Response:
        if len(segs) != 2 or segs[0] != "cdn":
            return _Response(404, [("Content-Type", "application/xml")], b"<Error><Code>NoSuchKey</Code></Error>")
        if self.cdn_reject_auth and h.headers.get("Authorization") is not None:
            body = b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>"
            return _Response(400, [("Content-Type", "application/xml")], body)
        sha = segs[1]
        with self._lock:
            f = self._blobs.get(sha)
        expected = hmac.new(self._secret, sha.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(query.get("X-Amz-Signature", [""])[0], expected):
            body = b"<Error><Code>AccessDenied</Code><Message>Request signature mismatch</Message></Error>"
            return _Response(403, [("Content-Type", "application/xml")], body)
        if f is None:
            return _Response(404, [("Content-Type", "application/xml")], b"<Error><Code>NoSuchKey</Code></Error>")
        bad = self._take_fault("bad_etag", "cdn", method, h.path)
        if bad:
            entry["fault"] = "bad_etag"
        etag = str(bad.params.get("etag", "../../etc/passwd")) if bad else f.sha256
        headers = [
            ("ETag", f'"{etag}"'),
            ("Accept-Ranges", "bytes"),
            ("Content-Type", "application/octet-stream"),
            ("Content-Disposition", query.get("response-content-disposition", [_disposition(f.path)])[0]),
            ("Cache-Control", "public, max-age=604800, immutable"),
        ]
        return self._file_response(h, f, headers, method, "cdn", entry)

    def _file_response(
        self, h: _Handler, f: HubFile, headers: list[tuple[str, str]], method: str, port: str, entry: dict[str, Any]
    ) -> _Response:
        rng = _parse_range(h.headers.get("Range"), f.size)
        if rng is not None and self._take_fault("ignore_range", port, method, h.path):
            entry["fault"] = "ignore_range"
            rng = None
        if rng == "unsatisfiable":
            return _Response(416, headers + [("Content-Range", f"bytes */{f.size}")], b"")
        if rng is None:
            return _Response(200, headers, file=f, start=0, length=f.size)
        start, end = rng  # type: ignore[misc]
        headers = headers + [("Content-Range", f"bytes {start}-{end - 1}/{f.size}")]
        return _Response(206, headers, file=f, start=start, length=end - start)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes", "on")  # type: ignore[index]


def _split_rev_and_path(repo: _Repo, segs: list[str]) -> tuple[str, str]:
    """Split ``{rev}/{path}`` segments: the revision is one (quoted) segment, except for known
    revisions that contain ``/`` and were sent unquoted (e.g. ``refs/convert/parquet``)."""
    names = sorted([*repo.branches, *repo.tags], key=len, reverse=True)
    joined = "/".join(unquote(s) for s in segs)
    for name in names:
        if "/" in name and (joined == name or joined.startswith(name + "/")):
            return name, joined[len(name) + 1 :]
    return unquote(segs[0]), unquote("/".join(segs[1:]))


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    if not cursor:
        return 0
    try:
        return int(json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["offset"])
    except (ValueError, KeyError, TypeError) as e:
        raise _HubError(400, f"Invalid cursor: {e}") from e


def _traversal_entries(fault: Fault) -> list[dict[str, Any]]:
    paths = fault.params.get("paths")
    if not paths and fault.params.get("path"):
        paths = [fault.params["path"]]
    paths = paths or ["../evil.parquet", "/abs/path.parquet"]
    out = []
    for p in paths:
        data = b"evil"
        sha = hashlib.sha256(data).hexdigest()
        pointer = lfs_pointer(sha, len(data))
        out.append(
            {
                "type": "file",
                "oid": git_blob_sha1(pointer),
                "size": len(data),
                "path": p,
                "lfs": {"oid": sha, "size": len(data), "pointerSize": len(pointer)},
            }
        )
    return out


def _content_type(path: str) -> str:
    if path.endswith(".json"):
        return "application/json; charset=utf-8"
    if path.endswith((".md", ".txt", ".yaml", ".yml", ".py")) or path.endswith(".gitattributes"):
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


def _disposition(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_")
    return f"inline; filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\";"


# --------------------------------------------------------------------------------------------
# conveniences for tests and benchmarks
# --------------------------------------------------------------------------------------------


def client_env(
    hub: FakeHub, home: str | os.PathLike, token: str | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for a subprocess using huggingface_hub / datasets against ``hub``.

    Caches go under ``home`` (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_DATASETS_CACHE``); any
    inherited ``HF_TOKEN`` / offline flag is removed, ``token`` is set if given. Xet stays enabled
    (the fake never advertises it), telemetry and progress bars are off.
    """
    home = pathlib.Path(home)
    env = dict(os.environ if base is None else base)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
              "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_HUB_DISABLE_XET", "HF_ENDPOINT"):  # fmt: skip
        env.pop(k, None)
    env.update(
        {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_DATASETS_CACHE": str(home / "datasets"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    if token is not None:
        env["HF_TOKEN"] = token
        env.pop("HF_HUB_DISABLE_IMPLICIT_TOKEN")
    return env


def repo_files_from_dir(data_dir: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Map every file under ``data_dir`` (skipping the fake hub's own ``.fakehub*`` and ``*.tmp``) to its repo path."""
    root = pathlib.Path(data_dir)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(".fakehub") and not rel.endswith(".tmp"):
            out[rel] = p
    return out


@contextlib.contextmanager
def running_hub(
    tmp_path: str | os.PathLike,
    rows: Mapping[str, int] | None = None,
    shards: Mapping[str, int] | None = None,
    row_group_size: int | None = 100,
    seed: int = 0,
    tricky: bool = True,
    repo_id: str = ULTRACHAT_REPO_ID,
    data_dir: str | os.PathLike | None = None,
    **hub_kwargs: Any,
) -> Iterator[FakeHub]:
    """Start a :class:`FakeHub` serving a small synthetic ``HuggingFaceH4/ultrachat_200k``.

    The data is generated under ``data_dir`` (default ``tmp_path/"ultrachat_200k"``; an existing
    folder with a ``README.md`` is reused as is). Defaults: rows train_sft 1003, test_sft 211,
    train_gen 1210, test_gen 305, shards 3/1/3/1, row groups of 100 rows. The hub gets a
    ``synth`` attribute: ``{"dir", "files", "rows", "commit", "repo_id"}``.
    """
    from . import synth

    rows = dict(synth.SMALL_ROWS if rows is None else rows)
    target = pathlib.Path(data_dir) if data_dir is not None else pathlib.Path(tmp_path) / "ultrachat_200k"
    if not (target / "README.md").is_file():
        info = synth.make_ultrachat_repo(
            target, rows=rows, shards=shards, row_group_size=row_group_size, seed=seed, tricky=tricky
        )
        rows = info["rows"]
    hub = FakeHub(**hub_kwargs)
    files = repo_files_from_dir(target)
    commit = hub.add_repo(repo_id, files, repo_type="dataset")
    info = {"dir": target, "files": sorted(files), "rows": rows, "commit": commit, "repo_id": repo_id}
    hub.synth = info  # type: ignore[attr-defined]
    with hub:
        yield hub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve a folder as a dataset repo on a loopback fake Hugging Face Hub."
    )
    parser.add_argument("--data", required=True, help="repo folder, e.g. made by `python -m tests.support.synth`")
    parser.add_argument("--repo-id", default=ULTRACHAT_REPO_ID)
    parser.add_argument("--repo-type", default="dataset", choices=["dataset", "model"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cdn-port", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=1000, help="tree listing page size (the real Hub: 1000)")
    parser.add_argument("--token", action="append", help="accept only these tokens (repeatable)")
    parser.add_argument("--gated", action="store_true", help="gate the repo; --token values get access")
    args = parser.parse_args(argv)

    data = pathlib.Path(args.data)
    hub = FakeHub(
        args.port,
        args.cdn_port,
        valid_tokens=set(args.token) if args.token else None,
        tree_page_size=args.page_size,
        hash_cache=data / ".fakehub-hashes.json",
    )
    t0 = time.monotonic()
    commit = hub.add_repo(args.repo_id, repo_files_from_dir(data), repo_type=args.repo_type)
    if args.gated:
        hub.set_gated(args.repo_id, set(args.token or []), repo_type=args.repo_type)
    hub.start()
    print(f"FAKEHUB_ENDPOINT={hub.endpoint}", flush=True)
    print(f"FAKEHUB_CDN={hub.cdn_endpoint}", flush=True)
    print(f"FAKEHUB_COMMIT={commit}  (indexed in {time.monotonic() - t0:.1f}s)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
