"""Benchmark: ferrotune LoRA training vs transformers + PEFT on one GPU (an H100), full-size
Phi-3-mini dimensions with random weights, same rows, each contender in its own process.

    python bench/gpu_train.py                          # Phi-3-mini dims, 2 x 4096 tokens per step
    python bench/gpu_train.py --batch 2 --steps 20
    python bench/gpu_train.py --peer-only              # or --ferrotune-only
    python bench/gpu_train.py --phases step            # only full optimizer steps
    python bench/gpu_train.py --device cpu --tiny      # smoke test of the whole script on a CPU

Everything but the defaults is bench/bench_train_cpu.py (see its docstring for the data, the
phases, the peer's packing and the loss check); this file adds the GPU parts:

Model: Phi-3-mini-4k dimensions (hidden 3072, 32 layers, 32 heads x 96, no GQA, intermediate
8192, vocab 32064, untied lm_head; `sliding_window` null instead of the real 2047: no segment here
is that long, so it changes nothing but the peer's mask path), random weights from transformers'
init made directly on the device in bfloat16 (`torch.manual_seed`, default dtype bf16 under
`torch.device("cuda")`), saved as bf16 safetensors (7.6 GB) under
bench/data/gpu_train/<dims>/ and reused by later runs with the same spec (--model-dir to move it).
LoRA: r 16, alpha 128 (the CUDA training issue's target setting; scale 8), dropout 0, on
qkv_proj / o_proj / gate_up_proj / down_proj; both tools start from the same PEFT adapter init.
Data: packed rows of 4096 tokens (conversations of ~1.3k tokens, ultrachat's mean), batch 2
rows (8192 tokens) per step.

Peer: `Phi3ForCausalLM.from_pretrained(dtype=bfloat16, attn_implementation="sdpa",
device_map="cuda")` + PEFT (adapter weights float32, PEFT's default), forward under
`torch.autocast("cuda", bfloat16)` as HF Trainer(bf16=True) does (--no-autocast to turn it off),
position_ids restarting per segment and no attention mask (transformers' packed-sequence
detection -> block-diagonal causal mask; `use_cache=False`), fused `torch.optim.AdamW` (HF
Trainer's default `adamw_torch_fused`), `clip_grad_norm_(1.0)`.
ferrotune: `LoraModel.load(..., device="cuda", precision="bf16")` + `loss_and_grads` (phase fwd_bwd) and
`finetune(device="cuda", precision="bf16")` (phase step), without gradient checkpointing unless
its memory plan turns it on (it says so in its log).

Reported per contender and phase: tokens/s (after --warmup steps), MFU, peak GPU memory as the
device's used memory (NVML / nvidia-smi, minus what was in use before the process started; this
includes the CUDA context and the caching allocator's reserve, and is the only number available for
ferrotune) and, for the peer, torch.cuda.max_memory_allocated / max_memory_reserved; host peak RSS.

MFU = model FLOPs / (time x peak), peak 989.4e12 (H100 SXM dense bf16; --peak-tflops). Model
FLOPs of a step, counting what LoRA training must compute, recompute not counted:
  tokens x (4 N_frozen + 6 N_lora) + sum over segments of 6 L h n (n + 1)
- N_frozen: the weights of every frozen matmul (per layer qkv_proj h x (h + 2 kv_heads head_dim),
  o_proj h x h, gate_up_proj h x 2I, down_proj I x h; and lm_head h x V; the embedding is a lookup,
  no FLOPs): forward 2 FLOPs per weight per token, backward 2 for the input gradient only (frozen
  weights need no weight gradient) -> 4.
- N_lora: the LoRA A and B weights (r (in + out) per adapted linear): forward 2, backward 4 -> 6.
- attention: a segment of n tokens has n (n + 1) / 2 causal (query, key) pairs; QK^T and PV cost
  2 h FLOPs per pair each (h = heads x head_dim), so forward 2 h n (n + 1) per layer and backward
  twice that: 6 h n (n + 1) per layer, about 6 L h s per token for a segment of s tokens (the
  usual 12 L h s, halved for causality). Tokens attend only inside their segment, so the segment
  length, not the row length, is what counts; the peer's SDPA computes the full row x row scores
  under its mask and that extra work is not counted.
For Phi-3-mini that is 4 x 3.72 G + 6 x 12.6 M = 14.97 GFLOP per token plus attention: ~0.58
GFLOP per token for the 2-3 segments (mean ~810 tokens) per 2048-token row here (15.55 in all), 1.21
for one 2048-token sequence (16.17 in all; performance.md's ~16.3).

Data without pyarrow: the token rows are made with numpy (.npz, for the peer) and written as
Parquet for ferrotune's trainer with pyarrow. If the GPU machine has no pyarrow, make them here
with the same --batch / --steps / --warmup / --seq / --seed:
    .venv/bin/python bench/gpu_train.py --data-only        # -> bench/data/gpu_train_data/
and carry bench/data/gpu_train_data (a few MB; the default --data-dir on cuda), which is then
reused. Otherwise the ferrotune "step" phase is reported as skipped.

Memory: at 4 x 2048 tokens without recompute the peer's activations (HF's float32 RMSNorm
intermediates, PEFT's input casts, eager RoPE copies) may not fit in 80 GB; a contender that runs
out of GPU memory is reported as such (not as a crash), and `--batch 2` or
`--peer-gradient-checkpointing` (what an HF user would do) give the comparison that fits.

Profile: after its timed fwd_bwd steps, ferrotune runs --profile-steps (default 2) more under its
own GPU profiler (`_core._gpu_profile`: CUDA events around every launch, GEMM and copy), and the
peer the same batches under torch.profiler (CUDA kernels only). The run prints where each one's
device time goes (bench/profile_table.py), per group (attention, GEMMs, cross-entropy, other
kernels, copies) and per kernel / GEMM shape, with the device's busy share of the span (the rest
is the GPU waiting for the host), then the two side by side per group: where ferrotune loses or
wins against the peer. The profiles are in the JSON too. The profiled steps come after the
timed ones and do not change the timings; a profile that fails is reported beside them.

Results: tables on stdout, bench/results/train_gpu.json (or --out; the --tiny / CPU smoke test
writes train_gpu_smoke.json). Not yet timed on a GPU (none was lent when this was written): the
estimate is a few minutes at the defaults, model creation included the first time; a run that
nears the device machine's 10-minute limit per command can be split with --phases / --peer-only /
--ferrotune-only (the model folder and the rows are reused). CPU threads per process: --threads,
default min(8, CPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_cpu as B  # noqa: E402
from profile_table import profile_tables, side_by_side  # noqa: E402

ROOT = B.ROOT
GPU_DEFAULTS = {"hidden": 3072, "layers": 32, "heads": 32, "intermediate": 8192, "vocab": 32064, "seq": 4096, "batch": 2,
                "lora_r": 16, "lora_alpha": 128.0, "steps": 10, "warmup": 3, "threads": min(8, os.cpu_count() or 1)}
TINY = {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 256, "seq": 128, "batch": 2, "steps": 2, "warmup": 1}
H100_SXM_BF16_PEAK_TFLOPS = 989.4


def flops_breakdown(cfg: dict, lora_r: int, targets: list[str]) -> dict:
    """Per-token matmul FLOPs (4 N_frozen + 6 N_lora) and the attention coefficient 6 L h."""
    h, L, I, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = h // heads
    lin = {"qkv_proj": (h, h + 2 * kv * hd), "o_proj": (h, h), "gate_up_proj": (h, 2 * I), "down_proj": (I, h)}
    n_frozen = L * sum(i * o for i, o in lin.values()) + h * V
    n_lora = L * sum(lora_r * (i + o) for name, (i, o) in lin.items() if name in targets)
    return {"n_frozen_matmul": n_frozen, "n_lora": n_lora, "n_embedding": h * V,
            "matmul_flops_per_token": 4 * n_frozen + 6 * n_lora, "attention_coeff": 6 * L * h}


def step_flops(fb: dict, segments: list[list[int]]) -> float:
    """Model FLOPs of the rows whose segment lengths are given."""
    tokens = sum(sum(s) for s in segments)
    attn = sum(fb["attention_coeff"] * n * (n + 1) for s in segments for n in s)
    return tokens * fb["matmul_flops_per_token"] + attn


def gpu_name(index: int) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except Exception:
        return None


def main() -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--tiny", action="store_true")
    known, _ = pre.parse_known_args()
    defaults = {**GPU_DEFAULTS, **(TINY if known.tiny else {})}

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    B.add_model_args(ap, defaults)
    ap.add_argument("--tiny", action="store_true", help=f"tiny dims for a smoke test: {TINY}")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (smoke test)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--no-autocast", action="store_true", help="peer: no torch.autocast around the forward")
    ap.add_argument("--peer-only", action="store_true")
    ap.add_argument("--ferrotune-only", action="store_true")
    ap.add_argument("--gpu-index", type=int, default=None, help="nvidia-smi index of the GPU to sample (default: the cuda index)")
    ap.add_argument("--profile-steps", type=int, default=2,
                    help="ferrotune fwd_bwd: this many more steps under its GPU profiler after the timed ones (0: none)")
    ap.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_PEAK_TFLOPS, help="dense bf16 peak for MFU (H100 SXM: 989.4)")
    args = ap.parse_args()
    if args.peer_only and args.ferrotune_only:
        raise SystemExit("--peer-only and --ferrotune-only exclude each other")
    if args.peer_only:
        args.contenders = "peer"
    elif args.ferrotune_only:
        args.contenders = "ferrotune"
    cuda = args.device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    precision = {"bfloat16": "bf16", "float32": "32"}[dtype]
    gpu_index = None
    if cuda:
        # the device nvidia-smi / NVML samples (its numbering ignores CUDA_VISIBLE_DEVICES)
        gpu_index = args.gpu_index if args.gpu_index is not None else (int(args.device.split(":", 1)[1]) if ":" in args.device else 0)
    if args.data_dir is None and (args.data_only or (cuda and not args.tiny)):
        args.data_dir = str(ROOT / "bench" / "data" / "gpu_train_data")
    if args.data_only:
        B.prepare_data(args, Path(args.data_dir))
        return 0
    if args.model_dir is None and not args.tiny and cuda:
        args.model_dir = str(ROOT / "bench" / "data" / "gpu_train" /
                             f"phi3-h{args.hidden}-L{args.layers}-H{args.heads}-I{args.intermediate}-V{args.vocab}-{dtype}-seed{args.seed}")

    card = gpu_name(gpu_index) if cuda else None
    work = Path(tempfile.mkdtemp(prefix="ferrotune-bench-gpu-"))
    env = B.thread_env(args.threads)
    env_ferro = B.thread_env(args.threads, extra_pythonpath=str(ROOT / "python"))
    targets = args.target_modules.split(",")
    print(f"device {args.device}{f' ({card})' if cuda else ''}, {dtype}; Phi-3 hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads, intermediate {args.intermediate}, vocab {args.vocab}; {args.batch} rows x {args.seq} tokens per step; "
          f"LoRA r {args.lora_r} alpha {args.lora_alpha:g}; {args.warmup} warm-up + {args.steps} timed steps; "
          f"{args.threads} CPU threads", flush=True)
    out = Path(args.out) if args.out else B.RESULTS / ("train_gpu.json" if cuda and not args.tiny else "train_gpu_smoke.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        prep = B.prepare(args, work, dtype, args.device, env)
        fb = flops_breakdown(prep["config"], args.lora_r, targets)
        timed_rows = prep["segments"][args.warmup * args.batch:(args.warmup + args.steps) * args.batch]
        timed_tokens = sum(sum(s) for s in timed_rows)
        flops_timed = step_flops(fb, timed_rows)
        flops_per_token = flops_timed / timed_tokens
        peak = args.peak_tflops * 1e12

        def save(runs: list[dict], partial: bool) -> list[dict]:
            """MFU per run, the comparison, and the JSON (after every run, marked partial until
            the last: a time limit that stops the benchmark still leaves the finished runs)."""
            for r in runs:
                tps = (r.get("result") or {}).get("tokens_per_second")
                if tps:
                    r["mfu"] = tps * flops_per_token / peak
                    r["model_tflops_per_s"] = tps * flops_per_token / 1e12
            comps = B.compare(runs)
            out.write_text(json.dumps({
                "timestamp": time.strftime("%Y%m%d-%H%M%S"), "args": vars(args), "device": card, "dtype": dtype,
                "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                "model_config": prep["config"], "flops": {**fb, "timed_tokens": timed_tokens, "timed_model_flops": flops_timed,
                                                          "model_flops_per_token": flops_per_token, "peak_flops": peak},
                "data": {"rows": prep["rows"], "segments": prep["segments"], "trained_fraction": prep["trained_fraction"]},
                "model_made": prep["model_made"], "runs": runs, "comparison": comps, "partial": partial,
            }, indent=2, default=str))
            return comps

        runs = B.run_contenders(args, prep, work, device=args.device, dtype=dtype, precision=precision,
                                autocast=not args.no_autocast, env_peer=env, env_ferro=env_ferro, gpu_index=gpu_index,
                                on_run=lambda rs: save(rs, partial=True))
        comps = save(runs, partial=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = (f"LoRA training on {args.device}{f' ({card})' if card else ''}, {dtype}, Phi-3 h{args.hidden} L{args.layers} heads {args.heads} "
              f"I{args.intermediate} V{args.vocab}, {args.batch}x{args.seq} tokens/step, LoRA r {args.lora_r} alpha {args.lora_alpha:g}"
              f"{', gradient checkpointing' if args.gradient_checkpointing else ''}"
              f"{', peer with gradient checkpointing' if args.peer_gradient_checkpointing and not args.gradient_checkpointing else ''}; tokens/s over {args.steps} steps after "
              f"{args.warmup} warm-up.\nModel FLOPs/token {flops_per_token / 1e9:.2f} G (matmuls {fb['matmul_flops_per_token'] / 1e9:.2f} G "
              f"= 4 x {fb['n_frozen_matmul'] / 1e9:.3f} G frozen + 6 x {fb['n_lora'] / 1e6:.2f} M LoRA; attention "
              f"{(flops_per_token - fb['matmul_flops_per_token']) / 1e9:.2f} G); MFU vs {args.peak_tflops:g} TFLOP/s.\n"
              "GPU peak: device used memory (NVML/nvidia-smi) minus the baseline before the process; torch max allocated: peer only.")
    mfu_col = [("MFU %", lambda r: f"{100 * r['mfu']:.1f}" if r.get("mfu") is not None else "n/a")]
    B.print_report(runs, comps, header, gpu=cuda, extra_cols=mfu_col)
    profs = {}
    for r in runs:
        prof = (r.get("result") or {}).get("profile")
        if prof:
            profs[r["tool"]] = prof
            how = "its profiler" if r["tool"] == "ferrotune" else "torch.profiler"
            print(f"\nWhere {r['tool']}'s GPU time goes ({r['phase']}, {how}):")
            print("\n".join(profile_tables(prof, prof.get("steps", 1))))
    if len(profs) == 2:
        print("\nGPU time per group, ferrotune against the peer (the same batches):")
        print("\n".join(side_by_side(profs["ferrotune"], profs["peer"])))
    print(f"\nresults: {out}")
    return 0 if not any("error" in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
