"""Collects the steps of scripts/gpu_check.sh into one JSON and one markdown table.

    python scripts/gpu_check_report.py --work DIR --out DIR --wheel WHEEL --seconds N

Reads DIR/status.tsv (step, exit code, seconds), DIR/selfcheck_<precision>.json,
DIR/pytest.xml (JUnit), OUT/train_gpu.json and OUT/generate_gpu.json when present; writes
OUT/gpu_check.json and OUT/gpu_check.md, and prints the markdown (with the GPU profiles of the
training benchmark, ferrotune's and the peer's, side by side per group and each per kernel,
bench/profile_table.py, when train_gpu.json has them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from profile_table import profile_tables, side_by_side  # noqa: E402


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return "unknown GPU"


def num(x, spec: str) -> str:
    """``x`` formatted with ``spec``, or "–" when a step did not produce it (None, not a number):
    a missing value must not cost the rest of the report."""
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return "–"


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_summary(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    cases = root.iter("testcase")
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for c in cases:
        name = f"{c.get('classname', '')}::{c.get('name', '')}"
        if c.find("failure") is not None or c.find("error") is not None:
            out["failed"] += 1
            el = c.find("failure") if c.find("failure") is not None else c.find("error")
            out["failures"].append({"test": name, "message": (el.get("message") or "")[:300]})
        elif c.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def train_profile(train: dict, tool: str) -> dict | None:
    """The GPU profile that `tool`'s training run brought back (fwd_bwd), if any."""
    return next((p for p in ((r.get("result") or {}).get("profile") for r in train.get("runs", [])
                             if r.get("tool") == tool) if p), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--wheel", required=True)
    ap.add_argument("--seconds", type=int, default=0)
    a = ap.parse_args()
    work, out = Path(a.work), Path(a.out)
    steps = []
    status = work / "status.tsv"
    if status.is_file():
        for line in status.read_text().splitlines():
            name, rc, took = line.split("\t")
            if rc == "-":  # not started: the check's time budget was spent
                steps.append({"step": name, "exit": None, "seconds": 0, "result": "skipped (no time left)"})
                continue
            steps.append({"step": name, "exit": int(rc), "seconds": int(took),
                          "result": "ok" if rc == "0" else ("timed out" if rc in ("124", "137") else "failed")})
    selfcheck = {}
    for f in sorted(work.glob("selfcheck_*.json")):
        selfcheck[f.stem.split("_", 1)[1]] = read_json(f) or []
    tests = pytest_summary(work / "pytest.xml")
    train = read_json(out / "train_gpu.json")
    gen = read_json(out / "generate_gpu.json")
    report = {"gpu": gpu_name(), "wheel": Path(a.wheel).name, "seconds": a.seconds, "steps": steps,
              "selfcheck": selfcheck, "pytest": tests,
              "train": train and {"comparison": train.get("comparison"), "runs": [
                  {k: r.get(k) for k in ("tool", "phase", "mfu", "gpu_used_peak_minus_baseline_mib", "error", "oom")}
                  | {"tokens_per_second": (r.get("result") or {}).get("tokens_per_second")} for r in train.get("runs", [])],
                  "profile": train_profile(train, "ferrotune"), "peer_profile": train_profile(train, "peer")},
              "generate": gen and gen.get("rows"),
              "decode_profile": gen and (gen.get("decode_profile") or gen.get("decode_profile_error"))}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))

    md = [f"# GPU check: {report['gpu']}", "", f"wheel `{report['wheel']}`, {a.seconds} s in all", "",
          "| step | result | seconds |", "|---|---|---:|"]
    for s in steps:
        exit_code = "" if s["exit"] is None else f" (exit {s['exit']})"
        md.append(f"| {s['step']} | {s['result']}{exit_code} | {s['seconds']} |")
    for prec, checks in selfcheck.items():
        bad = [c for c in checks if not c["passed"]]
        md += ["", f"## Self-check, precision {prec}: {len(checks) - len(bad)} of {len(checks)} within tolerance", "",
               "| check | error | tolerance | shapes |", "|---|---:|---:|---|"]
        md += [f"| {'' if c['passed'] else '**FAIL** '}{c['name']} | {num(c['error'], '.3g')} | {num(c['tolerance'], '.3g')} | "
               f"{c['shapes']}{(' — ' + c['failure']) if c['failure'] else ''} |" for c in checks]
    if tests:
        md += ["", f"## pytest -m gpu: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"]
        md += [f"- {f['test']}: {f['message']}" for f in tests["failures"]]
    if train:
        md += ["", "## Training (bench/gpu_train.py)", ""]
        if train.get("partial"):
            md += ["The benchmark stopped before its last run (the step's time limit): the runs that finished.", ""]
        md += ["| tool | phase | tokens/s | MFU % | GPU peak MiB |", "|---|---|---:|---:|---:|"]
        for r in report["train"]["runs"]:
            mfu = r.get("mfu")
            md.append(f"| {r['tool']} | {r['phase']} | {num(r.get('tokens_per_second'), ',.0f')} | "
                      f"{num(mfu and 100 * mfu, '.1f')} | {num(r.get('gpu_used_peak_minus_baseline_mib'), ',.0f')} |"
                      + (f" {r.get('error') or r.get('oom')}" if r.get("error") or r.get("oom") else ""))
        for c in train.get("comparison") or []:
            md.append(f"- {c.get('phase')}: speed ferrotune/peer {num(c.get('speed_ratio_ferrotune_over_peer'), '.2f')}x, "
                      f"GPU memory ferrotune/peer {num(c.get('gpu_mem_ratio_ferrotune_over_peer'), '.2f')}, "
                      f"max loss difference {num(c.get('loss_max_abs_diff'), '.3g')}")
        prof, peer = report["train"]["profile"], report["train"]["peer_profile"]
        if prof and peer:
            md += ["", "## GPU time per group, ferrotune against the peer (fwd_bwd, the same batches)", ""]
            md += side_by_side(prof, peer)
        if prof:
            md += ["", "## Where ferrotune's GPU time goes (its profiler, fwd_bwd)", ""]
            md += profile_tables(prof, prof.get("steps", 1))
        if peer:
            md += ["", "## Where the peer's GPU time goes (torch.profiler, fwd_bwd)", ""]
            md += profile_tables(peer, peer.get("steps", 1))
    if gen:
        md += ["", "## Generation (bench/bench_generate.py)", "", "| B | tool | prefill tok/s | decode tok/s |", "|---:|---|---:|---:|"]
        md += [f"| {r.get('batch')} | {r.get('tool')} | {num(r.get('prefill_tokens_per_second'), ',.0f')} | "
               f"{num(r.get('decode_tokens_per_second'), ',.1f')} |" for r in gen.get("rows", [])]
        d = gen.get("decode_profile")
        if d:
            md += ["", f"## Where ferrotune's decoding time goes (its profiler, B={d.get('batch')}, per decoding step)", ""]
            md += profile_tables(d, d.get("steps", 1))
        elif gen.get("decode_profile_error"):
            md += ["", f"ferrotune's decoding profile failed: {gen['decode_profile_error']}"]
    text = "\n".join(md) + "\n"
    (out / "gpu_check.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
