"""The gradient exchange of data-parallel training, on its own: ferrotune's group sum vs
``torch.distributed.all_reduce`` (gloo), same processes count, same float32 buffer, same run,
on 127.0.0.1.

Each optimizer step of a data-parallel run sums every rank's LoRA gradients once. Sizes:
``--floats`` defaults to a small LoRA (1 M floats) and Phi-3-mini's LoRA at r=8 on all four
target modules (12,582,912 floats = 50 MB, the notebook's setting), so the numbers say what
the exchange adds to one step on one node (CPU transport; the GPU's NCCL path is separate).

    python bench/bench_grad_exchange.py --world 2 --repeats 10

Prints, per size, the median seconds per exchange for both and the ratio peer / ferrotune
(> 1: ferrotune is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys

PHI3_MINI_LORA_R8 = 32 * (8 * (3072 + 9216) + 8 * (3072 + 3072) + 8 * (3072 + 16384) + 8 * (8192 + 3072))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args) -> None:
    rank, world, port = args.rank, args.world, args.port
    if args.tool == "ferrotune":
        from ferrotune import _core

        spec = {"rank": rank, "world_size": world, "local_rank": rank, "master_addr": "127.0.0.1", "master_port": port,
                "timeout_s": 300}
        times = _core._group_sum_timings(json.dumps(spec), args.floats, args.repeats)
    else:
        import time

        import torch
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        t = torch.ones(args.floats, dtype=torch.float32)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
            t.fill_(1.0)
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"times": times}))


def run(tool: str, world: int, floats: int, repeats: int, threads: int) -> list:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), RAYON_NUM_THREADS=str(threads))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--tool", tool, "--rank", str(r), "--world", str(world),
             "--port", str(port), "--floats", str(floats), "--repeats", str(repeats)],
            stdout=subprocess.PIPE, env=env, text=True,
        )
        for r in range(world)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p in procs:
        if p.returncode != 0:
            raise SystemExit(f"{tool} worker failed ({p.returncode})")
    return json.loads(outs[0].strip().splitlines()[-1])["times"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--floats", default=f"1000000,{PHI3_MINI_LORA_R8}")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="untimed exchanges first (dropped from the median)")
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tool", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.floats = int(args.floats)
        worker(args)
        return
    rows = []
    print(f"world {args.world}, {args.threads} thread(s) per process, median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'floats':>12} {'MB':>7} {'ferrotune s':>12} {'gloo s':>10} {'gloo/ferrotune':>15}")
    for n in [int(x) for x in args.floats.split(",")]:
        med = {}
        for tool in ("ferrotune", "torch"):
            times = run(tool, args.world, n, args.repeats + args.warmup, args.threads)[args.warmup:]
            med[tool] = statistics.median(times)
        ratio = med["torch"] / med["ferrotune"]
        rows.append({"floats": n, "world": args.world, "ferrotune_s": med["ferrotune"], "gloo_s": med["torch"], "ratio": ratio})
        print(f"{n:>12} {n * 4 / 1e6:>7.1f} {med['ferrotune']:>12.4f} {med['torch']:>10.4f} {ratio:>15.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
