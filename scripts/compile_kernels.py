#!/usr/bin/env python3
"""Compile ferrotune's CUDA kernels (src/kernels/cuda/*.cu) with NVRTC, without nvcc or a GPU.

Every source is compiled for each target architecture: `sm_XX` gives a CUBIN, `compute_XX`
a PTX file (JIT-compiled by the driver on newer GPUs). Default targets: sm_70 sm_75 sm_80
sm_86 sm_89 sm_90 and compute_90. The script fails (exit status 1, with NVRTC's log) on any
compile error, or when a kernel declared in a source (`extern "C" __global__ void <name>`)
is missing from one of its outputs.

    python3 scripts/compile_kernels.py --cuda-site /work/cuda12 --out build/kernels
    python3 scripts/compile_kernels.py --cuda-site SITE --arch sm_90 --arch compute_90
    python3 scripts/compile_kernels.py --nvrtc /path/libnvrtc.so.12 --include /path/include

--cuda-site DIR is a site-packages folder holding NVIDIA's PyPI wheels (nvidia-cuda-nvrtc-cu12,
nvidia-cuda-runtime-cu12, nvidia-cuda-nvcc-cu12): NVRTC from DIR/nvidia/cuda_nvrtc/lib, headers
from DIR/nvidia/cuda_runtime/include and DIR/nvidia/cuda_nvcc/include (crt/mma.h). Without it,
the running interpreter's site-packages and $FT_CUDA_SITE are tried.

With --out DIR the outputs are written as <stem>.<arch>.cubin / <stem>.<arch>.ptx with a
manifest.json (files, architectures, kernels found, sizes, sha256, and per kernel the
registers, spills, stack and shared memory that ptxas reports). Without --out nothing is
written: the sources are only compiled and checked.
"""

import argparse
import concurrent.futures as cf
import ctypes
import hashlib
import json
import os
import re
import struct
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SRC = ROOT / "src" / "kernels" / "cuda"
DEFAULT_ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]
# No --use_fast_math: RoPE needs precise sin/cos; kernels call __expf explicitly where wanted.
BASE_OPTIONS = ["-std=c++17", "-default-device", "-DNDEBUG", "--ptxas-options=-v"]
KERNEL_RE = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\(')
ARCH_RE = re.compile(r"^(sm|compute)_(\d{2,3}[a-z]?)$")
# NVRTC's notes that only say an architecture is deprecated
NOISE_RE = re.compile(r"Architectures prior to .* are deprecated")


class Fail(Exception):
    pass


# ------------------------------------------------------------------------------------------
# NVRTC through ctypes
class Nvrtc:
    def __init__(self, path):
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise Fail(f"cannot load NVRTC from {path}: {e}")
        L = self.lib
        P = ctypes.c_void_p
        L.nvrtcGetErrorString.restype = ctypes.c_char_p
        L.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        L.nvrtcCreateProgram.argtypes = [ctypes.POINTER(P), ctypes.c_char_p, ctypes.c_char_p,
                                         ctypes.c_int, P, P]
        L.nvrtcCompileProgram.argtypes = [P, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        L.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(P)]
        for name in ("nvrtcGetProgramLogSize", "nvrtcGetCUBINSize", "nvrtcGetPTXSize"):
            getattr(L, name).argtypes = [P, ctypes.POINTER(ctypes.c_size_t)]
        for name in ("nvrtcGetProgramLog", "nvrtcGetCUBIN", "nvrtcGetPTX"):
            getattr(L, name).argtypes = [P, ctypes.c_char_p]
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(L.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = f"{major.value}.{minor.value}"

    def check(self, rc, what):
        if rc != 0:
            raise Fail(f"{what}: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def _get(self, prog, size_fn, get_fn):
        n = ctypes.c_size_t()
        self.check(size_fn(prog, ctypes.byref(n)), size_fn.__name__)
        buf = ctypes.create_string_buffer(n.value)
        self.check(get_fn(prog, buf), get_fn.__name__)
        return buf.raw[: n.value]

    def compile(self, source, name, options, ptx):
        """(ok, log, binary): CUBIN for sm_XX, PTX (text without its NUL) for compute_XX."""
        prog = ctypes.c_void_p()
        self.check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source, name.encode(), 0, None, None),
                   "nvrtcCreateProgram")
        try:
            opts = [o.encode() for o in options]
            arr = (ctypes.c_char_p * len(opts))(*opts)
            rc = self.lib.nvrtcCompileProgram(prog, len(opts), arr)
            log = self._get(prog, self.lib.nvrtcGetProgramLogSize, self.lib.nvrtcGetProgramLog)
            log = log.rstrip(b"\0").decode(errors="replace")
            if rc != 0:
                return False, log, None
            if ptx:
                out = self._get(prog, self.lib.nvrtcGetPTXSize, self.lib.nvrtcGetPTX).rstrip(b"\0")
            else:
                out = self._get(prog, self.lib.nvrtcGetCUBINSize, self.lib.nvrtcGetCUBIN)
            return True, log, out
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ------------------------------------------------------------------------------------------
# What the outputs contain
def cubin_kernels(data):
    """Names of the global functions defined in an ELF64 CUBIN (its kernels)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise Fail("not an ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = set()
    for sh in sections:
        if sh[1] != 2:  # SHT_SYMTAB
            continue
        off, size, link, entsize = sh[4], sh[5], sh[6], sh[9] or 24
        stroff = sections[link][4]
        for i in range(size // entsize):
            st_name, st_info, _other, st_shndx = struct.unpack_from("<IBBH", data, off + i * entsize)
            if st_info & 0xF == 2 and st_info >> 4 == 1 and st_shndx != 0:  # FUNC, GLOBAL, defined
                end = data.index(b"\0", stroff + st_name)
                names.add(data[stroff + st_name:end].decode())
    return names


def ptx_kernels(text):
    """Names of the entry functions of a PTX file."""
    return {m.decode() for m in re.findall(rb"\.entry\s+([A-Za-z_]\w*)\s*\(", text)}


def ptxas_report(log):
    """Per kernel: registers, spill stores/loads, stack frame, shared memory (from ptxas -v)."""
    info, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = info.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return info


def user_log(log):
    """The log without ptxas' statistics and NVRTC's deprecation note."""
    keep = [l for l in log.splitlines()
            if l.strip() and not l.startswith("ptxas") and not NOISE_RE.search(l)]
    return "\n".join(keep)


# ------------------------------------------------------------------------------------------
def find_cuda_site(explicit):
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    else:
        if os.environ.get("FT_CUDA_SITE"):
            candidates.append(Path(os.environ["FT_CUDA_SITE"]))
        for key in ("purelib", "platlib"):
            candidates.append(Path(sysconfig.get_paths()[key]))
    for c in candidates:
        if (c / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12").exists():
            return c
    if explicit:
        raise Fail(f"--cuda-site {explicit}: no nvidia/cuda_nvrtc/lib/libnvrtc.so.12 there "
                   "(pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12)")
    return None


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Compile src/kernels/cuda/*.cu with NVRTC into CUBIN (sm_XX) and PTX (compute_XX).",
        epilog="Exit status: 0 all compiled and every declared kernel found; 1 otherwise; 2 usage.")
    ap.add_argument("--cuda-site", metavar="DIR",
                    help="site-packages with NVIDIA's cu12 wheels (NVRTC and headers from there)")
    ap.add_argument("--nvrtc", metavar="PATH", help="libnvrtc.so to use (default: from --cuda-site)")
    ap.add_argument("--include", metavar="DIR", action="append", default=[],
                    help="extra include folder (repeatable; cuda_fp16.h, cuda_bf16.h, mma.h, crt/mma.h)")
    ap.add_argument("--arch", metavar="ARCH", action="append",
                    help=f"sm_XX (CUBIN) or compute_XX (PTX); repeatable (default: {' '.join(DEFAULT_ARCHS)})")
    ap.add_argument("--out", metavar="DIR", help="write the outputs and manifest.json here")
    ap.add_argument("--src", metavar="DIR", default=str(DEFAULT_SRC), help="kernel sources (default: %(default)s)")
    ap.add_argument("--only", metavar="STEM", action="append", help="compile only <STEM>.cu (repeatable)")
    ap.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1, help="parallel compilations (default: %(default)s)")
    ap.add_argument("--lineinfo", action="store_true", help="add -lineinfo (source lines for profilers)")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")
    args = ap.parse_args(argv)
    args.arch = args.arch or DEFAULT_ARCHS
    for a in args.arch:
        if not ARCH_RE.match(a):
            ap.error(f"--arch {a}: expected sm_XX or compute_XX")
    return args


def main(argv=None):
    args = parse_args(argv)
    src_dir = Path(args.src)
    sources = sorted(src_dir.glob("*.cu"))
    if args.only:
        sources = [s for s in sources if s.stem in args.only]
        missing = set(args.only) - {s.stem for s in sources}
        if missing:
            raise Fail(f"--only: no {', '.join(sorted(missing))}.cu in {src_dir}")
    if not sources:
        raise Fail(f"no .cu files in {src_dir}")

    site = find_cuda_site(args.cuda_site)
    nvrtc_path = args.nvrtc or (site / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12" if site else None)
    if nvrtc_path is None:
        raise Fail("NVRTC not found: give --cuda-site DIR (site-packages with nvidia-cuda-nvrtc-cu12) or --nvrtc PATH")
    includes = [str(src_dir.resolve())] + args.include
    if site:
        includes += [str(site / "nvidia" / "cuda_runtime" / "include"), str(site / "nvidia" / "cuda_nvcc" / "include")]
    nvrtc = Nvrtc(nvrtc_path)
    options = BASE_OPTIONS + (["-lineinfo"] if args.lineinfo else []) + [f"-I{d}" for d in includes]
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    say(f"NVRTC {nvrtc.version} ({nvrtc_path})")
    say(f"options: {' '.join(BASE_OPTIONS + (['-lineinfo'] if args.lineinfo else []))}")
    say(f"include: {' '.join(includes)}")
    say(f"{len(sources)} sources x {len(args.arch)} targets ({' '.join(args.arch)}), {args.jobs} jobs")

    declared = {}
    for s in sources:
        names = KERNEL_RE.findall(s.read_text())
        if not names:
            raise Fail(f"{s.name}: no `extern \"C\" __global__ void <name>(` kernel declared")
        declared[s.name] = names

    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)

    def job(src, arch):
        ptx = arch.startswith("compute_")
        t0 = time.monotonic()
        ok, log, data = nvrtc.compile(src.read_bytes(), src.name, options + [f"--gpu-architecture={arch}"], ptx)
        return src, arch, ptx, ok, log, data, time.monotonic() - t0

    # biggest sources first: they dominate the wall time
    work = sorted(((s, a) for s in sources for a in args.arch), key=lambda sa: -sa[0].stat().st_size)
    entries, errors = [], []
    t_start = time.monotonic()
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for fut in cf.as_completed([pool.submit(job, s, a) for s, a in work]):
            src, arch, ptx, ok, log, data, dt = fut.result()
            kind = "ptx" if ptx else "cubin"
            if not ok:
                errors.append(f"{src.name} [{arch}]: compilation failed\n{user_log(log) or log}")
                print(f"  FAIL {src.name:18} {arch:11} ({dt:.1f} s)", flush=True)
                continue
            extra = user_log(log)
            if extra:
                print(f"  warnings from {src.name} [{arch}]:\n{extra}", file=sys.stderr, flush=True)
            try:
                found = ptx_kernels(data) if ptx else cubin_kernels(data)
            except Fail as e:
                errors.append(f"{src.name} [{arch}]: cannot read the {kind}: {e}")
                continue
            missing = [k for k in declared[src.name] if k not in found]
            if missing:
                errors.append(f"{src.name} [{arch}]: declared kernels missing from the {kind}: {', '.join(missing)}")
            stats = ptxas_report(log)
            spills = sorted(k for k, v in stats.items() if v.get("spill_stores") or v.get("spill_loads"))
            entry = {
                "source": src.name,
                "arch": arch,
                "kind": kind,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "kernels": sorted(found),
                "ptxas": {k: stats[k] for k in sorted(stats)},
            }
            if out_dir:
                name = f"{src.stem}.{arch}.{kind}"
                (out_dir / name).write_bytes(data)
                entry["file"] = name
            entries.append(entry)
            note = f", spills in {', '.join(spills)}" if spills else ""
            say(f"  ok   {src.name:18} {arch:11} {kind:5} {len(data) / 1024:8.1f} KiB {len(found):3} kernels {dt:6.1f} s{note}")

    for e in errors:
        print(f"\nERROR {e}", file=sys.stderr)
    if out_dir and not errors:
        entries.sort(key=lambda e: (e["source"], e["arch"]))
        manifest = {
            "nvrtc": nvrtc.version,
            "options": BASE_OPTIONS + (["-lineinfo"] if args.lineinfo else []),
            "archs": args.arch,
            "sources": {s: declared[s] for s in sorted(declared)},
            "files": entries,
        }
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    n_ok = len(entries)
    summary = (f"{n_ok} of {len(work)} compiled, {sum(len(v) for v in declared.values())} kernels in "
               f"{len(sources)} sources, {time.monotonic() - t_start:.0f} s"
               + (f", written to {out_dir}" if out_dir and not errors else ""))
    if errors:
        print(f"FAILED: {len(errors)} error(s); {summary}", file=sys.stderr)
        return 1
    print(f"OK: {summary}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Fail as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
