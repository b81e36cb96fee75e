"""The real Azure ML inference server (``azureml-inference-server-http``) on loopback, for
tests of the scoring script that ``ferrotune package`` writes.

The server lives in its own virtualenv (``tests/support/venvs.py``; it cannot share an
environment with ``azure-ai-ml``), where the checkout's ferrotune is importable through a
``.pth`` file. ``azmlinfsrv`` binds 0.0.0.0, so the server is started the way ``azmlinfsrv``
starts it — gunicorn running ``azureml_inference_server_http.server.entry:app`` with one
sync worker and a 300 s timeout — but bound to 127.0.0.1, with ``AML_APP_ROOT``,
``AZUREML_ENTRY_SCRIPT`` and ``AZUREML_MODEL_DIR`` set as a managed online deployment sets
them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from tests.support.venvs import ensure_venv

#: the server release the tests pin (the one Azure ML's inference images ship at writing)
SERVER_REQUIREMENTS = ["azureml-inference-server-http==1.5.1"]
VENV_NAME = "azureml-inference-server"

# urllib without the environment's proxies: every request here goes to 127.0.0.1
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def server_python() -> Path:
    """The side venv's python (created on first use; raises ``VenvError`` without PyPI)."""
    return ensure_venv(VENV_NAME, SERVER_REQUIREMENTS, with_ferrotune=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerDied(RuntimeError):
    """The server exited or never became healthy; the message ends with its log."""


class InferenceServer:
    """One gunicorn process serving ``app_root/entry_script`` with the model under
    ``model_dir``. Use as a context manager, or call :meth:`start` / :meth:`stop`."""

    def __init__(
        self,
        python: Path,
        app_root: Path,
        entry_script: str,
        model_dir: Path,
        log_path: Path,
        env: Optional[dict] = None,
    ) -> None:
        self.python = Path(python)
        self.app_root = Path(app_root)
        self.entry_script = entry_script
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        self.extra_env = dict(env or {})
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZUREML_", "AML_", "FERROTUNE_"))}
        env.pop("PYTHONPATH", None)
        env.update(
            AML_APP_ROOT=str(self.app_root),
            AZUREML_ENTRY_SCRIPT=self.entry_script,
            AZUREML_MODEL_DIR=str(self.model_dir),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 120.0) -> "InferenceServer":
        self.port = free_port()
        cmd = [
            str(self.python), "-m", "gunicorn",
            "-b", f"127.0.0.1:{self.port}",
            "-w", "1",
            "--timeout", "300",
            "--access-logfile", "-",
            "azureml_inference_server_http.server.entry:app",
        ]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                cmd, cwd=self.app_root, env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerDied(f"the inference server exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, body = self.request("GET", "/", timeout=5)
                if status == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerDied(f"the inference server did not answer GET / within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to gunicorn's master (it stops its worker), SIGKILL to the process group
        it leads if it does not exit in time."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this Popen created (start_new_session)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)

    def __enter__(self) -> "InferenceServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def request(
        self,
        method: str,
        path: str,
        body: Union[bytes, str, dict, Iterable[bytes], None] = None,
        headers: Optional[dict] = None,
        timeout: float = 120,
    ) -> tuple:
        """``(status, parsed JSON or text)``. ``body``: a dict (sent as JSON), ``str`` /
        ``bytes`` (sent as is, with Content-Length) or an iterable of ``bytes`` chunks (sent
        with ``Transfer-Encoding: chunked``)."""
        if isinstance(body, dict):
            data: Any = json.dumps(body).encode()
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with _OPENER.open(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode("utf-8", "replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def score(self, body: Any, **kw: Any) -> tuple:
        return self.request("POST", "/score", body, **kw)
