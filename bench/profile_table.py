"""Tables of a GPU profile from `ferrotune._core._gpu_profile` (see src/kernels/cuda/profile.rs):
where the device's time goes, per group of calls and per call, per profiled step.

Used by bench/gpu_train.py (printed after its report) and scripts/gpu_check_report.py (the GPU
check's markdown). Standard library only.
"""

# (group, test on a row's name), first match wins
GROUPS = [
    ("attention", lambda n: n.startswith("attn_")),
    ("GEMMs (cuBLAS)", lambda n: n.startswith("gemm ")),
    ("cross-entropy", lambda n: n.startswith("ce_")),
    ("copies, memsets", lambda n: n.startswith(("copy to", "copy on", "memset"))),
    ("other kernels", lambda n: True),
]


def group_of(name: str) -> str:
    return next(g for g, test in GROUPS if test(name))


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
    groups: dict[str, list[float]] = {}
    for e in entries:
        g = groups.setdefault(group_of(e["name"]), [0.0, 0.0])
        g[0] += e["seconds"]
        g[1] += e.get("flops") or 0.0
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
