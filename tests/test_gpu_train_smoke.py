"""bench/gpu_train.py, the GPU check's training benchmark, end to end on the CPU (--tiny): the
script a GPU run depends on must not fail on its own plumbing. Its JSON is written after every
run (marked partial until the last), so that the GPU check's time limit stopping it mid-way still
leaves the finished runs; here the final file is checked."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_training_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "train.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--device", "cpu", "--tiny",
                        "--contenders", "ferrotune", "--steps", "1", "--warmup", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["partial"] is False
    assert [(x["tool"], x["phase"]) for x in d["runs"]] == [("ferrotune", "fwd_bwd"), ("ferrotune", "step")]
    for x in d["runs"]:
        res = x["result"]
        assert res["tokens_per_second"] > 0 and all(math.isfinite(v) for v in res["losses"]), x
        assert "profile" not in res  # ferrotune's GPU profiler only runs on a GPU
    assert f"results: {out}" in r.stdout
