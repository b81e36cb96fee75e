"""Runs a test snippet inside the azure-ai-ml side venv, with the network fenced off.

Usage (from tests/test_azureml.py): ``<side python> azure_side.py`` with the snippet on
stdin. Before the snippet runs:

- a socket guard makes every connection to a non-loopback address, and every DNS lookup
  of a name other than localhost, raise ``NetworkBlocked`` and be recorded, so an
  accidental call to Azure fails loudly (the proxy variables the test sets point at a
  closed local port as a second fence);
- ``sys.path`` gets the checkout root, so ``tests.support.azure_arm`` imports.

The snippet sets ``result`` (anything JSON-able); the last line on stdout is then
``@@RESULT@@ {"result": ..., "blocked": [...]}``.
"""

from __future__ import annotations

import json
import socket
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BLOCKED: list = []
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost", ""}


class NetworkBlocked(OSError):
    """A network access the test did not allow."""


def _is_loopback(host: object) -> bool:
    if not isinstance(host, str):
        return True  # AF_UNIX paths and the like
    return host in _LOCAL_NAMES or host.startswith("127.") or host == "::1"


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_getaddrinfo = socket.getaddrinfo


def _guarded_connect(self: socket.socket, address: object) -> object:
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):  # type: ignore[index]
        BLOCKED.append(f"connect {address}")
        raise NetworkBlocked(f"test guard: network access to {address} is not allowed")
    return _connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: object) -> object:
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):  # type: ignore[index]
        BLOCKED.append(f"connect_ex {address}")
        raise NetworkBlocked(f"test guard: network access to {address} is not allowed")
    return _connect_ex(self, address)


def _guarded_getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
    if host is not None and not _is_loopback(host.decode() if isinstance(host, bytes) else host):
        BLOCKED.append(f"getaddrinfo {host}")
        raise NetworkBlocked(f"test guard: DNS lookup of {host} is not allowed")
    return _getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
socket.getaddrinfo = _guarded_getaddrinfo  # type: ignore[assignment]


def main() -> int:
    code = sys.stdin.read()
    scope: dict = {"__name__": "__side__", "BLOCKED": BLOCKED, "NetworkBlocked": NetworkBlocked}
    status = 0
    try:
        exec(compile(code, "<side snippet>", "exec"), scope)
    except BaseException:  # report, then fail
        traceback.print_exc()
        status = 1
    out = {"result": scope.get("result"), "blocked": BLOCKED}
    sys.stdout.flush()
    print("@@RESULT@@ " + json.dumps(out, default=str), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
