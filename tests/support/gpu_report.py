"""Runs scripts/gpu_check_report.py (the GPU check's last step) on step outputs written by a
test: the work folder's status.tsv and other files, the out folder's bench JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_report(tmp_path: Path, status: str, *, work_files: dict[str, str] | None = None,
               train: dict | None = None, generate: dict | None = None, wheel: str = "w.whl",
               seconds: int | None = None) -> tuple[str, dict, subprocess.CompletedProcess]:
    """(gpu_check.md, gpu_check.json, the process) of a report over these outputs; fails the
    test when the script does not exit 0."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(parents=True)
    out.mkdir(parents=True)
    (work / "status.tsv").write_text(status)
    for name, text in (work_files or {}).items():
        (work / name).write_text(text)
    for name, data in (("train_gpu.json", train), ("generate_gpu.json", generate)):
        if data is not None:
            (out / name).write_text(json.dumps(data))
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check_report.py"), "--work", str(work), "--out", str(out),
           "--wheel", wheel]
    if seconds is not None:
        cmd += ["--seconds", str(seconds)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return (out / "gpu_check.md").read_text(), json.loads((out / "gpu_check.json").read_text()), r
