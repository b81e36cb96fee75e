"""Tables of a GPU profile from `ferrotune._core._gpu_profile` (see src/kernels/cuda/profile.rs),
or of the peer's run under torch.profiler in the same shape (bench_train_cpu.torch_profile_summary):
where the device's time goes, per group of calls and per call, per profiled step, and the two
side by side per group.

Used by bench/gpu_train.py (printed after its report) and scripts/gpu_check_report.py (the GPU
check's markdown), bench_train_cpu.py and bench_generate.py (which make the profiles). Standard
library only.
"""

import json

# Kernel names, lower case, by group: ferrotune's own (attn_*, "gemm <shape>", ce_rows, the
# profiler's copy rows) and what PyTorch runs on a GPU (flash / memory-efficient / cuDNN
# attention; cuBLAS(Lt) kernels: nvjet_*, *gemm*, sm90_xmma_*, cutlass; log-softmax + NLL for
# the loss; Memcpy / Memset rows).
_ATTENTION = ("attn_", "flash", "fmha", "attention", "sdpa")
_GEMM = ("gemm", "gemv", "nvjet", "xmma", "cublas", "cutlass")
_LOSS = ("ce_rows", "softmax", "nll_loss", "cross_entropy")
_COPIES = ("copy to", "copy on", "memset", "memcpy")

# (group, test on a row's lower-case name), first match wins
GROUPS = [
    ("attention", lambda n: any(k in n for k in _ATTENTION)),
    ("GEMMs (cuBLAS)", lambda n: any(k in n for k in _GEMM)),
    ("cross-entropy", lambda n: any(k in n for k in _LOSS)),
    ("copies, memsets", lambda n: n.startswith(_COPIES)),
    ("other kernels", lambda n: True),
]


def group_of(name: str) -> str:
    low = name.lower()
    return next(g for g, test in GROUPS if test(low))


def group_totals(prof: dict) -> dict[str, tuple[float, float]]:
    """(seconds, FLOPs) per group over the whole profile."""
    out: dict[str, tuple[float, float]] = {}
    for e in prof.get("entries") or []:
        s, f = out.get(group_of(e["name"]), (0.0, 0.0))
        out[group_of(e["name"])] = (s + e["seconds"], f + (e.get("flops") or 0.0))
    return out


def profile_of(entries: list[dict], device, host_seconds: float, span_seconds: float) -> dict:
    """A profile in the shape of `_core._gpu_profile("stop")`: the rows longest first, busy
    seconds and calls their sums."""
    entries = sorted(entries, key=lambda e: -e["seconds"])
    return {"device": device, "host_seconds": host_seconds, "device_span_seconds": span_seconds,
            "busy_seconds": sum(e["seconds"] for e in entries), "calls": sum(e["calls"] for e in entries),
            "entries": entries}


def run_profiled(core, run) -> tuple[dict, object]:
    """`run()` under ferrotune's GPU profiler (`core` is `ferrotune._core`): (the profile, what
    run returned); the profiler is stopped when run fails too."""
    core._gpu_profile("start")
    try:
        result = run()
    finally:
        prof = json.loads(core._gpu_profile("stop"))
    return prof, result


def subtract_profiles(whole: dict, part: dict) -> dict:
    """The profile of what `whole` ran beyond `part` (e.g. a generation of N tokens less its
    first token: the decoding steps), row by row by name; rows that `part` alone has, or that
    cancel out, are left out."""
    left = {e["name"]: e for e in part.get("entries") or []}
    entries = []
    for e in whole.get("entries") or []:
        p = left.get(e["name"], {})
        row = {"name": e["name"], "calls": e["calls"] - p.get("calls", 0),
               "seconds": max(e["seconds"] - p.get("seconds", 0.0), 0.0),
               "flops": (e.get("flops") or 0) - (p.get("flops") or 0)}
        if row["calls"] > 0:
            entries.append(row)
    diff = lambda k: max(float(whole.get(k) or 0.0) - float(part.get(k) or 0.0), 0.0)  # noqa: E731
    return profile_of(entries, whole.get("device"), diff("host_seconds"), diff("device_span_seconds"))


def side_by_side(ours: dict, peer: dict) -> list[str]:
    """Markdown: ms per step of each group for ferrotune and the peer (each over its own
    profiled steps, the same batches), and their ratio; then the busy totals."""
    def per_step(prof: dict) -> tuple[dict[str, float], float]:
        steps = max(int(prof.get("steps") or 1), 1)
        return ({g: 1e3 * s / steps for g, (s, _) in group_totals(prof).items()},
                1e3 * float(prof.get("busy_seconds") or 0.0) / steps)

    (a, busy_a), (b, busy_b) = per_step(ours), per_step(peer)
    ratio = lambda x, y: f"{x / y:.2f}" if x > 0 and y > 0 else ""  # noqa: E731
    lines = ["| group | ferrotune ms/step | peer ms/step | ferrotune / peer |", "|---|---:|---:|---:|"]
    for name, _ in GROUPS:
        if name in a or name in b:
            x, y = a.get(name, 0.0), b.get(name, 0.0)
            lines.append(f"| {name} | {x:.2f} | {y:.2f} | {ratio(x, y)} |")
    lines.append(f"| **busy** | {busy_a:.2f} | {busy_b:.2f} | {ratio(busy_a, busy_b)} |")
    return lines


def _tflops(flops: float, seconds: float) -> str:
    return f"{flops / seconds / 1e12:.0f}" if flops and seconds > 0 else ""


def profile_tables(prof: dict, steps: int, top: int = 15) -> list[str]:
    """Markdown lines: a summary, the groups, and the `top` longest rows, in ms per step."""
    steps = max(int(steps or 1), 1)
    entries = prof.get("entries") or []
    busy = float(prof.get("busy_seconds") or 0.0)
    span = float(prof.get("device_span_seconds") or 0.0)
    host = float(prof.get("host_seconds") or 0.0)
    ms = lambda s: f"{1e3 * s / steps:.2f}"  # noqa: E731
    pct = lambda s: f"{100 * s / busy:.1f}" if busy > 0 else ""  # noqa: E731
    lines = [
        f"{steps} profiled step(s) on {prof.get('device') or '?'}: {prof.get('calls', 0):,} calls; per step "
        f"{ms(busy)} ms busy, device span {ms(span)} ms ({100 * busy / span:.0f} % busy), host {ms(host)} ms"
        if span > 0 else f"{steps} profiled step(s): nothing ran on the GPU",
        "",
        "| group | ms/step | % of busy | TFLOP/s |",
        "|---|---:|---:|---:|",
    ]
    groups = group_totals(prof)
    for name, _ in GROUPS:
        if name in groups:
            s, f = groups[name]
            lines.append(f"| {name} | {ms(s)} | {pct(s)} | {_tflops(f, s)} |")
    lines += ["", "| call | calls/step | ms/step | % of busy | TFLOP/s |", "|---|---:|---:|---:|---:|"]
    for e in entries[:top]:
        s = e["seconds"]
        lines.append(f"| `{e['name']}` | {e['calls'] / steps:g} | {ms(s)} | {pct(s)} | "
                     f"{_tflops(e.get('flops') or 0.0, s)} |")
    if len(entries) > top:
        rest = sum(e["seconds"] for e in entries[top:])
        lines.append(f"| {len(entries) - top} more | | {ms(rest)} | {pct(rest)} | |")
    return lines
