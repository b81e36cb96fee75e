"""Benchmark: ferrotune.download_dataset vs the original download-dataset.py (HF `datasets`),
in the same run, on the same full-scale synthetic ultrachat_200k behind the loopback fake
Hub. Each tool runs in its own subprocess; wall time and peak RSS (ru_maxrss of that
child) are recorded, and the JSON Lines outputs of both are compared byte for byte.

    .venv/bin/python bench/bench_download.py                 # full scale (1.6 GB), all cases
    .venv/bin/python bench/bench_download.py --scale small   # quick check

Cases:
  cold5   5 %, empty caches (ferrotune: footers + needed row groups by HTTP Range)
  warm5   5 %, second run: the HF hub cache holds the shards (and, for the peer, the
          `datasets` Arrow cache built by its first run)
  cold100 100 %, empty caches
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import synth  # noqa: E402

REPO = "HuggingFaceH4/ultrachat_200k"
PEER = ROOT / "tests" / "support" / "peer_download_dataset.py"
SMALL = {"train_sft": 20786, "test_sft": 2311, "train_gen": 25603, "test_gen": 2830}


# A tiny stdlib-only launcher: it starts the tool and reports the tool's own peak RSS.
# (Measuring from this benchmark process directly would be wrong: on Linux a child's
# ru_maxrss starts from its parent's RSS at fork time, and this process holds pyarrow.)
_LAUNCHER = (
    "import os, sys, json\n"
    "pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)\n"
    "_, status, ru = os.wait4(pid, 0)\n"
    "sys.stderr.write('\\nRSS_KIB=' + str(ru.ru_maxrss) + '\\n')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_measured(cmd: list, env: dict) -> dict:
    """Runs cmd; returns wall seconds and the tool's peak RSS (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_kib = int(proc.stderr.rsplit("RSS_KIB=", 1)[1].split()[0])
    return {"wall_s": wall, "peak_rss_mib": rss_kib / 1024, "stdout": proc.stdout[-500:]}


def start_hub(data_dir: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fakehub", "--data", str(data_dir), "--page-size", "1000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    for line in proc.stdout:
        if line.startswith("FAKEHUB_ENDPOINT="):
            return proc, line.strip().split("=", 1)[1]
    raise RuntimeError("fake hub did not start")


def tool_cmd(tool: str, out_dir: Path, pc: str) -> list:
    if tool == "ferrotune":
        return [sys.executable, "-m", "ferrotune.download_dataset", "--dataset", REPO, "--download_dir", str(out_dir), "--dataset_split_pc", pc, "--quiet"]
    return [sys.executable, str(PEER), "--dataset", REPO, "--download_dir", str(out_dir), "--dataset_split_pc", pc]


def same_outputs(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.jsonl"))
    return names == sorted(p.name for p in b.glob("*.jsonl")) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=["full", "small"], default="full")
    ap.add_argument("--cases", default="cold5,warm5,cold100")
    ap.add_argument("--data", default=str(ROOT / "bench" / "data"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "download.json"))
    args = ap.parse_args()

    rows = synth.FULL_ROWS if args.scale == "full" else SMALL
    data_dir = Path(args.data) / f"ultrachat_{args.scale}"
    if not (data_dir / "README.md").is_file():
        print(f"generating {args.scale} synthetic ultrachat in {data_dir} ...", flush=True)
        synth.make_ultrachat_repo(data_dir, rows=rows, seed=0, progress=True)
    size = sum(p.stat().st_size for p in (data_dir / "data").glob("*.parquet"))
    hub, endpoint = start_hub(data_dir)
    work = Path(tempfile.mkdtemp(prefix="ferrotune-bench-"))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    base_env.update({"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT)})

    def env_for(tag: str) -> dict:
        home = work / f"home-{tag}"
        return {**base_env, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_DATASETS_CACHE": str(home / "datasets")}

    results = []
    cases = args.cases.split(",")
    try:
        for case in cases:
            pc = "100" if case.endswith("100") else "5"
            row = {"case": case, "pc": pc}
            for tool in ("peer", "ferrotune"):
                if case.startswith("warm"):
                    # the warm case reuses the cache the tool's own cold run left; ferrotune's
                    # cold path does not fill the cache, so its warm cache is the peer's (a
                    # user with ultrachat already in ~/.cache/huggingface)
                    tag = "peer-cold5"
                    if tool == "peer" and "cold5" not in cases:
                        run_measured(tool_cmd("peer", work / "prewarm", pc), env_for(tag))
                else:
                    tag = f"{tool}-{case}"
                out = work / f"out-{tool}-{case}"
                print(f"{case:8} {tool:10} ...", end=" ", flush=True)
                m = run_measured(tool_cmd(tool, out, pc), env_for(tag))
                print(f"{m['wall_s']:7.2f} s  {m['peak_rss_mib']:7.0f} MiB", flush=True)
                row[tool] = {"wall_s": round(m["wall_s"], 3), "peak_rss_mib": round(m["peak_rss_mib"], 1)}
            row["identical_jsonl"] = same_outputs(work / f"out-peer-{case}", work / f"out-ferrotune-{case}")
            row["speedup"] = round(row["peer"]["wall_s"] / row["ferrotune"]["wall_s"], 2)
            row["rss_ratio"] = round(row["ferrotune"]["peak_rss_mib"] / row["peer"]["peak_rss_mib"], 3)
            results.append(row)
    finally:
        hub.terminate()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"dataset: synthetic ultrachat_200k ({args.scale}: {sum(rows.values()):,} rows, {size / 1e9:.2f} GB parquet), {os.cpu_count()} CPUs, {platform.python_version()}")
    print("| case | peer (datasets) s | ferrotune s | speed-up | peer RSS MiB | ferrotune RSS MiB | RSS ratio | identical |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['case']} | {r['peer']['wall_s']:.2f} | {r['ferrotune']['wall_s']:.2f} | {r['speedup']:.1f}× | {r['peer']['peak_rss_mib']:.0f} | {r['ferrotune']['peak_rss_mib']:.0f} | {r['rss_ratio']:.2f} | {'yes' if r['identical_jsonl'] else 'NO'} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"scale": args.scale, "rows": rows, "parquet_bytes": size, "results": results}, indent=2))
    return 0 if all(r["identical_jsonl"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
