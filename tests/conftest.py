"""Shared fixtures: a loopback fake Hub serving a synthetic ultrachat_200k, isolated Hugging
Face caches, and a runner for the original download-dataset.py logic (the reference)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# GPU runs compare float32 results with references: full f32 products, not TF32.
os.environ.setdefault("FERROTUNE_TF32", "0")

from tests.support import fakehub, synth  # noqa: E402

PEER = ROOT / "tests" / "support" / "peer_download_dataset.py"
REPO_ID = fakehub.ULTRACHAT_REPO_ID


@pytest.fixture(scope="session")
def ultrachat_dir(tmp_path_factory) -> Path:
    """The synthetic dataset, generated once per session (small row counts chosen so that
    5 %, 10 % and 50 % hit Python's half-to-even rounding)."""
    d = tmp_path_factory.mktemp("ultrachat") / "ultrachat_200k"
    synth.make_ultrachat_repo(d, rows=synth.SMALL_ROWS, row_group_size=100, seed=0, tricky=True)
    return d


@pytest.fixture
def hub(ultrachat_dir):
    """A fresh fake Hub (new request log, no faults) serving the synthetic dataset."""
    h = fakehub.FakeHub()
    files = fakehub.repo_files_from_dir(ultrachat_dir)
    commit = h.add_repo(REPO_ID, files, repo_type="dataset")
    h.synth = {"dir": ultrachat_dir, "rows": dict(synth.SMALL_ROWS), "commit": commit, "files": sorted(files)}
    with h:
        yield h
    assert not h.errors, h.errors


@pytest.fixture
def hf_env(hub, tmp_path, monkeypatch):
    """Points ferrotune (in this process, through os.environ) and any subprocess at the fake
    Hub, with an empty private cache; returns the environment for subprocesses."""
    env = fakehub.client_env(hub, tmp_path / "hf-home")
    env["FERROTUNE_HUB_BACKOFF"] = "0.01"  # retries in tests need not wait
    for k in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        env.pop(k, None)
    for k in list(os.environ):
        if k not in env:
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def run_python(code: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    """Runs Python code in a subprocess with `env` on top of the current environment
    (huggingface_hub reads its settings at import time, so reference runs go here)."""
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=timeout)


def run_peer(env: dict, out_dir: Path, pc: str, subset: str | None = None) -> None:
    """The original download-dataset.py logic with real `datasets`, against the fake Hub."""
    cmd = [sys.executable, str(PEER), "--dataset", REPO_ID, "--download_dir", str(out_dir), "--dataset_split_pc", pc]
    if subset:
        cmd += ["--dataset_subset", subset]
    r = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


def hf_json(code: str, env: dict):
    """Runs code that prints one JSON value as its last line; returns it."""
    r = run_python(code, env)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
