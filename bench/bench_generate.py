"""Benchmark: ferrotune generation vs transformers `generate`, same model, same prompts, same
threads, each contender in a fresh subprocess.

    .venv/bin/python bench/bench_generate.py                       # CPU config below, 2 threads
    .venv/bin/python bench/bench_generate.py --batches 1 --new 32  # quicker
    .venv/bin/python bench/bench_generate.py --device cuda --hidden 3072 --layers 32 \\
        --heads 32 --intermediate 8192 --dtype bfloat16             # Phi-3-mini dimensions on a GPU

Model: the CPU training benchmark's "small but real" Phi-3 (hidden 512, 8 layers, 8 heads,
intermediate 1536, vocab 32064, untied lm_head; random weights from transformers' own init,
saved as safetensors by `bench_train_cpu.py`'s model worker) — or any size by flags.

Prompts: random token ids (below the special tokens), `--prompt` tokens each, `--batches` sets
of B prompts. Greedy decoding; the peer gets `min_new_tokens=max_new_tokens` and EOS ids set
to the same ids ferrotune stops on, and both report how many tokens they produced (equal when
the two agree numerically, which the table shows as "same tokens").

Two measurements per contender and batch size B, each the median of `--repeats` runs after a
warm-up run:
  prefill  generate 1 new token: B x prompt tokens / seconds (time to first token)
  decode   generate `--new` tokens; decode tokens/s = B x (new - 1) / (t_new - t_prefill)
ferrotune: `Generator.load(folder, device, precision)` then `generate_ids(prompts, ...)`.
peer: `AutoModelForCausalLM.from_pretrained(folder, dtype, attn_implementation="sdpa")`,
`model.generate(input_ids (B, prompt), attention_mask=ones, do_sample=False, ...)` (prompts
of equal length: no padding), under `torch.inference_mode()`.

Profile (GPU): after the timings, ferrotune generates the largest batch once more under its own
profiler, once for 1 token and once for `--new`; the difference is the decoding steps: launches
and device time per kernel per step, and the GPU's busy share (`--no-profile` skips it).

Threads: OMP/MKL/RAYON_NUM_THREADS = --threads and torch.set_num_threads(--threads).
Memory: each process's own peak RSS (the launcher of bench_train_cpu.py).
Output: a table and bench/results/generate_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_cpu as btc  # noqa: E402  (model worker, measured subprocesses, thread env)
from profile_table import profile_tables, run_profiled, subtract_profiles  # noqa: E402

ROOT = btc.ROOT
EOS = btc.GENERATION_CONFIG["eos_token_id"]


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list:
    import random

    rng = random.Random(seed)
    top = min(vocab, btc.FIRST_SPECIAL_ID)
    return [[rng.randrange(2, top) for _ in range(length)] for _ in range(n)]


def _median(xs: list) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _measure(run_once, job: dict) -> dict:
    """run_once(prompts, max_new_tokens) -> list of generated id lists; timed per batch size."""
    out = {}
    for b in job["batch_sizes"]:
        prompts = job["prompts"][:b]
        run_once(prompts, 2)  # warm-up (allocations, kernels)
        t1, tn, toks = [], [], None
        for _ in range(job["repeats"]):
            t0 = time.perf_counter()
            run_once(prompts, 1)
            t1.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            toks = run_once(prompts, job["new"])
            tn.append(time.perf_counter() - t0)
        p, n = _median(t1), _median(tn)
        generated = sum(len(t) for t in toks)
        out[str(b)] = {
            "prefill_s": p,
            "generate_s": n,
            "prefill_tokens_per_second": b * len(prompts[0]) / p,
            "decode_tokens_per_second": (generated - b) / (n - p) if n > p else float("nan"),
            "generated_tokens": generated,
            "first_ids": [t[:16] for t in toks],
        }
    return out


def worker_ferrotune(job: dict) -> None:
    import ferrotune

    t0 = time.perf_counter()
    gen = ferrotune.Generator.load(job["model_dir"], device=job["device"], precision=job["precision"], progress=False)
    load_s = time.perf_counter() - t0

    def run_once(prompts, new):
        return [ids for ids, _ in gen.generate_ids(prompts, max_new_tokens=new)]

    batches = _measure(run_once, job)
    btc._emit({"load_s": load_s, "batches": batches, **profile_decoding(gen, job)})


def profile_decoding(gen, job: dict) -> dict:
    """On a GPU, ferrotune's own profiler over the decoding steps of the largest batch: a
    generation of `new` tokens less one of a single token (the prompts' forward), per
    decoding step — launches, device time per kernel, and how busy the GPU is (a low share
    means decoding waits for the host). {"decode_profile": ...}, {} on the CPU or with
    job["profile"] false, {"decode_profile_error": ...} when it fails."""
    if not job.get("profile") or job["device"] == "cpu" or job["new"] < 2:
        return {}
    from ferrotune import _core

    b = max(job["batch_sizes"])
    prompts = job["prompts"][:b]

    def generated(new: int) -> int:
        return sum(len(ids) for ids, _ in gen.generate_ids(prompts, max_new_tokens=new))

    try:
        first, _ = run_profiled(_core, lambda: generated(1))
        whole, n = run_profiled(_core, lambda: generated(job["new"]))
    except Exception as e:  # noqa: BLE001 (reported beside the timings)
        return {"decode_profile_error": f"{type(e).__name__}: {e}"[:500]}
    d = subtract_profiles(whole, first)
    d.update(steps=job["new"] - 1, batch=b, decoded_tokens=n - b)
    return {"decode_profile": d}


def worker_peer(job: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    dtype = getattr(torch, job["dtype"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype, attn_implementation="sdpa")
    model = model.to(job["device"]).eval()
    load_s = time.perf_counter() - t0

    def run_once(prompts, new):
        ids = torch.tensor(prompts, device=job["device"])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, eos_token_id=EOS, pad_token_id=EOS[0])
        if job["device"] != "cpu":
            torch.cuda.synchronize()
        return [row[len(prompts[0]):].tolist() for row in out]

    btc._emit({"load_s": load_s, "batches": _measure(run_once, job)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--_worker", choices=["ferrotune", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--_job", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--batches", default="1,4", help="batch sizes (prompts generated together)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32, or bfloat16 on a GPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--contenders", default="peer,ferrotune")
    ap.add_argument("--model-dir", default=None, help="keep/reuse the random model here")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-profile", action="store_true",
                    help="on a GPU, skip profiling ferrotune's decoding steps after the timings")
    args = ap.parse_args()
    if args._worker:
        job = json.loads(Path(args._job).read_text())
        {"ferrotune": worker_ferrotune, "peer": worker_peer}[args._worker](job)
        return 0

    batch_sizes = [int(b) for b in args.batches.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    env = btc.thread_env(args.threads, extra_pythonpath=str(ROOT / "python"))
    args.seq = args.prompt + args.new  # model_config sizes max_position_embeddings from it
    cfg = btc.model_config(args)
    model_dir = Path(args.model_dir) if args.model_dir else work / "model"
    spec = {"config": cfg, "dtype": args.dtype, "seed": args.seed}
    marker = model_dir / ".bench_spec.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == spec):
        print(f"model: creating a random Phi-3 in {model_dir} ...", flush=True)
        job = {**spec, "model_dir": str(model_dir), "device": args.device, "tokenizer_dir": str(btc.tokenizer_folder() or ""),
               "adapter_dir": None}
        btc.run_job("make_model", job, work, env)
        marker.write_text(json.dumps(spec))
    job = {"model_dir": str(model_dir), "prompts": make_prompts(max(batch_sizes), args.prompt, args.vocab, args.seed + 1),
           "batch_sizes": batch_sizes, "new": args.new, "repeats": args.repeats, "threads": args.threads,
           "device": args.device, "dtype": args.dtype, "profile": not args.no_profile,
           "precision": "32" if args.dtype == "float32" else "bf16"}
    runs = {}
    for name in args.contenders.split(","):
        path = work / f"job-{name}.json"
        path.write_text(json.dumps(job))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", name, "--_job", str(path)]
        print(f"running {name} ...", flush=True)
        runs[name] = btc.run_measured(cmd, env)

    print()
    print(f"generation, {args.device}, {args.threads} threads, {args.dtype}; model hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}; prompt {args.prompt} tokens, {args.new} new tokens, greedy; median of {args.repeats}")
    print(f"{'B':>3} {'tool':<10} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MiB':>13} {'same tokens':>12}")
    rows = []
    for b in batch_sizes:
        for name, r in runs.items():
            m = r["result"]["batches"][str(b)]
            same = ""
            if name == "ferrotune" and "peer" in runs:
                p = runs["peer"]["result"]["batches"][str(b)]
                pairs = [(x, y) for a, c in zip(m["first_ids"], p["first_ids"]) for x, y in zip(a, c)]
                same = f"{sum(x == y for x, y in pairs)}/{len(pairs)}"
            print(f"{b:>3} {name:<10} {m['prefill_tokens_per_second']:>14,.0f} {m['decode_tokens_per_second']:>13,.1f} "
                  f"{r['peak_rss_mib']:>13,.0f} {same:>12}")
            rows.append({"batch": b, "tool": name, **{k: v for k, v in m.items() if k != "first_ids"},
                         "peak_rss_mib": r["peak_rss_mib"]})
        if len(runs) == 2:
            f, p = runs["ferrotune"]["result"]["batches"][str(b)], runs["peer"]["result"]["batches"][str(b)]
            print(f"{b:>3} {'ratio':<10} {f['prefill_tokens_per_second'] / p['prefill_tokens_per_second']:>13.2f}x "
                  f"{f['decode_tokens_per_second'] / p['decode_tokens_per_second']:>12.2f}x "
                  f"{runs['ferrotune']['peak_rss_mib'] / runs['peer']['peak_rss_mib']:>12.2f}x")
    out = Path(args.out) if args.out else btc.RESULTS / f"generate_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    profile = {k: v for k, v in runs.get("ferrotune", {}).get("result", {}).items() if k.startswith("decode_profile")}
    if "decode_profile" in profile:
        d = profile["decode_profile"]
        print(f"\nWhere ferrotune's decoding time goes (B={d['batch']}, per decoding step, its profiler):")
        print("\n".join(profile_tables(d, d["steps"])))
    elif profile:
        print(f"\nferrotune's decoding profile failed: {profile['decode_profile_error']}")
    out.write_text(json.dumps({"args": vars(args), "machine": platform.platform(), "rows": rows,
                               "load_s": {k: v["result"]["load_s"] for k, v in runs.items()}, **profile}, indent=2))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
