"""The GEMMs under prefill and training: candle's CPU matmul (the `gemm` crate, what ferrotune
runs) vs torch's (MKL), `x @ w.T` in float32 for the CPU benchmark model's layer shapes, same
threads, same run.

    python bench/bench_gemm.py --threads 2

Prints GFLOP/s for both and the ratio ferrotune / torch. Builds `examples/gemm_probe.rs` with
cargo (release) first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (m, k, n) of hidden 512 / intermediate 1536 with 512 tokens: qkv, o, gate_up, down
SHAPES = [(512, 512, 1536), (512, 512, 512), (512, 512, 3072), (512, 1536, 512), (2048, 512, 3072)]


def candle(threads: int, reps: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "gemm_probe"], cwd=ROOT, check=True)
    args = [str(reps)] + [str(x) for s in SHAPES for x in s]
    out = subprocess.run([str(ROOT / "target" / "release" / "examples" / "gemm_probe"), *args], env=env,
                         capture_output=True, text=True, check=True).stdout
    return {(r["m"], r["k"], r["n"]): r["seconds"] for r in map(json.loads, out.splitlines())}


def torch_times(threads: int, reps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    res = {}
    for m, k, n in SHAPES:
        x, w = torch.randn(m, k), torch.randn(n, k)
        for _ in range(3):
            x @ w.t()
        t0 = time.perf_counter()
        for _ in range(reps):
            x @ w.t()
        res[(m, k, n)] = (time.perf_counter() - t0) / reps
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    c, t = candle(a.threads, a.reps), torch_times(a.threads, a.reps)
    print(f"{a.threads} thread(s), mean of {a.reps}")
    print(f"{'m x k @ k x n':>22} {'gemm GFLOP/s':>13} {'torch GFLOP/s':>14} {'gemm/torch':>11}")
    for s in SHAPES:
        fl = 2 * s[0] * s[1] * s[2]
        print(f"{f'{s[0]}x{s[1]} @ {s[1]}x{s[2]}':>22} {fl / c[s] / 1e9:>13.1f} {fl / t[s] / 1e9:>14.1f} {t[s] / c[s]:>11.2f}")


if __name__ == "__main__":
    main()
