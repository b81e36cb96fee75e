"""Installs the right ferrotune wheel on an Azure ML node: the first step of a fine-tuning job.

:func:`ferrotune.azureml.finetune_job` copies this file, as ``install_ferrotune.py``, into
the job's code folder beside a ``wheels/`` folder holding the CPU wheel, the CUDA wheel or
both. The job's command starts with ``python install_ferrotune.py --device DEVICE``, which

1. looks at the node: ``nvidia-smi`` (GPU names, driver version, compute capability), else
   ``/proc/driver/nvidia/version`` (driver only);
2. picks a wheel (:func:`choose_wheel`): the CUDA wheel on a node with a usable NVIDIA GPU,
   the CPU wheel otherwise; or stops with one line saying why the node cannot run the job
   (driver too old for the wheel's CUDA, GPU older than compute capability 7.0, no GPU
   although ``--device cuda``, no CUDA wheel on a GPU node);
3. pip-installs it into the job's Python (the wheel replaces any ferrotune already there,
   its dependencies come from the environment image or the package index). Every process
   of a data-parallel job runs this command: a file lock lets the first one install and
   the others find it done.

Standard library only, and no ferrotune import: it runs before ferrotune is installed.
The tables below are the single source of the limits; ``ferrotune.azureml`` imports them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

#: the oldest GPU generation ferrotune's CUDA build runs on (V100 = 7.0)
MIN_COMPUTE_CAPABILITY = 7.0
#: the oldest NVIDIA driver each CUDA major version of the CUDA wheel needs (its local
#: version label: ``+cu12`` -> 525, ``+cu13`` -> 580)
MIN_DRIVER = {12: 525, 13: 580}

_WHEEL_RE = re.compile(
    r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+?)(?:\+(?P<local>[A-Za-z0-9.]+))?"
    r"(?:-(?P<build>\d[^-]*))?-(?P<python>[^-]+)-(?P<abi>[^-]+)-(?P<platform>[^-]+)\.whl$"
)


class InstallError(Exception):
    """The node cannot run the job with the wheels it was given (one line, no traceback)."""


class Gpu(NamedTuple):
    name: str
    compute_capability: Optional[float]


class NodeInfo(NamedTuple):
    """What the node has: its GPUs (empty: none found) and the NVIDIA driver's major
    version (None: no driver). ``source`` says where that came from."""

    gpus: tuple
    driver: Optional[int]
    source: str


def cuda_major(filename: str) -> Optional[int]:
    """The CUDA major version of a CUDA wheel's file name (``+cu12`` -> 12), or None for
    the CPU wheel."""
    m = _WHEEL_RE.match(os.path.basename(filename))
    local = (m.group("local") or "") if m else ""
    c = re.match(r"cu(\d+)", local)
    return int(c.group(1)) if c else None


def parse_nvidia_smi(text: str) -> tuple:
    """``(gpus, driver major)`` from ``nvidia-smi --query-gpu=name,driver_version,compute_cap
    --format=csv,noheader`` output."""
    gpus = []
    driver: Optional[int] = None
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not parts[0]:
            continue
        d = re.match(r"(\d+)", parts[1])
        if d:
            driver = int(d.group(1)) if driver is None else min(driver, int(d.group(1)))
        cc: Optional[float] = None
        if len(parts) >= 3:
            try:
                cc = float(parts[2])
            except ValueError:
                cc = None
        gpus.append(Gpu(parts[0], cc))
    return tuple(gpus), driver


def parse_proc_driver(text: str) -> Optional[int]:
    """The driver's major version from ``/proc/driver/nvidia/version``."""
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+)\.", text)
    return int(m.group(1)) if m else None


def _nvidia_smi(fields: str) -> Optional[str]:
    try:
        r = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def inspect_node() -> NodeInfo:
    """The GPUs and driver of this machine (no GPU, no driver: an empty NodeInfo)."""
    # compute_cap needs nvidia-smi from driver 510 or later; older ones get the short query
    for fields in ("name,driver_version,compute_cap", "name,driver_version"):
        out = _nvidia_smi(fields)
        if out is not None:
            gpus, driver = parse_nvidia_smi(out)
            if gpus:
                return NodeInfo(gpus, driver, "nvidia-smi")
    try:
        driver = parse_proc_driver(Path("/proc/driver/nvidia/version").read_text())
    except OSError:
        driver = None
    if driver is None:
        return NodeInfo((), None, "no nvidia-smi, no /proc/driver/nvidia/version")
    # a driver but no nvidia-smi: there is a GPU, its model is unknown
    return NodeInfo((Gpu("NVIDIA GPU (no nvidia-smi)", None),), driver, "/proc/driver/nvidia/version")


def choose_wheel(wheels: Sequence[str], node: NodeInfo, device: str = "auto") -> tuple:
    """``(wheel, reason)``: the wheel to install on ``node`` for ``device`` (auto, cpu or
    cuda). Raises :class:`InstallError` when none can run there."""
    if device not in ("auto", "cpu", "cuda"):
        raise InstallError(f"--device {device!r}: expected auto, cpu or cuda")
    cpu = [w for w in wheels if cuda_major(w) is None]
    cuda = [w for w in wheels if cuda_major(w) is not None]
    if not wheels:
        raise InstallError("no ferrotune wheel in the job's code folder")
    if device == "cpu":
        return (cpu or cuda)[0], "device=cpu: training on the CPU"
    if not node.gpus:
        if device == "cuda":
            raise InstallError(
                f"device=cuda but this node has no NVIDIA GPU ({node.source}): use a GPU compute cluster, "
                "or set finetune_parameters['device'] = 'cpu'"
            )
        return (cpu or cuda)[0], f"no NVIDIA GPU on this node ({node.source}): training on the CPU"
    names = ", ".join(sorted({g.name for g in node.gpus}))
    if not cuda:
        raise InstallError(
            f"this node has NVIDIA GPUs ({names}) but the job ships only the CPU wheel: pass the CUDA wheel "
            "(scripts/build_cuda.sh writes it to dist-cuda/) in wheels=, or set finetune_parameters['device'] = "
            "'cpu' to train on the CPU on purpose"
        )
    old = [g for g in node.gpus if g.compute_capability is not None and g.compute_capability < MIN_COMPUTE_CAPABILITY]
    if old:
        g = old[0]
        raise InstallError(
            f"GPU {g.name} has compute capability {g.compute_capability:.1f}; ferrotune's CUDA build needs "
            f">= {MIN_COMPUTE_CAPABILITY:.1f} (V100 or newer): use e.g. Standard_NC24ads_A100_v4 or Standard_NC6s_v3"
        )
    wheel = cuda[0]
    major = cuda_major(wheel)
    need = MIN_DRIVER.get(major or 0)
    if need is not None and (node.driver is None or node.driver < need):
        have = "no driver version found" if node.driver is None else f"driver {node.driver}"
        raise InstallError(
            f"the CUDA {major} wheel {os.path.basename(wheel)} needs an NVIDIA driver >= {need}, this node has "
            f"{have} ({names}): recreate the compute cluster (new nodes get Azure ML's current driver) or use a "
            "newer VM size"
        )
    cc = [g.compute_capability for g in node.gpus if g.compute_capability is not None]
    precision = "" if not cc else (" (bf16-capable)" if min(cc) >= 8.0 else " (no bf16: fp16 training)")
    return wheel, f"NVIDIA GPU {names}{precision}, driver {node.driver}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _lock(path: Path):  # -> a file object holding an exclusive lock, or None (no fcntl)
    try:
        import fcntl
    except ImportError:  # not on Linux: no concurrent processes to fence
        return None
    f = open(path, "a+")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def install(wheel: str) -> bool:
    """Installs ``wheel`` into this Python's environment unless it is already installed
    there (by this script, same file contents). Returns whether it installed."""
    prefix = Path(sys.prefix)
    marker = prefix / ".ferrotune-installed-wheel"
    lock_dir = prefix if os.access(prefix, os.W_OK) else Path(tempfile.gettempdir())
    digest = _sha256(wheel)
    held = _lock(lock_dir / ".ferrotune-install.lock")
    try:
        try:
            if marker.read_text().strip() == digest:
                return False
        except OSError:
            pass
        pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--quiet"]
        # First the wheel itself, replacing any ferrotune (same version number or not);
        # then its dependencies, which the environment image normally has already.
        for extra in (["--force-reinstall", "--no-deps"], []):
            r = subprocess.run([*pip, *extra, wheel])
            if r.returncode != 0:
                raise InstallError(f"pip could not install {os.path.basename(wheel)} (exit status {r.returncode}; see above)")
        try:
            marker.write_text(digest + "\n")
        except OSError:
            pass
        return True
    finally:
        if held is not None:
            held.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="install_ferrotune.py", description="Install the ferrotune wheel this node can run.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--wheels", default=str(Path(__file__).resolve().parent / "wheels"),
                   help="folder of ferrotune wheels (default: wheels/ beside this script)")
    args = p.parse_args(argv)
    try:
        folder = Path(args.wheels)
        wheels = sorted(str(w) for w in folder.glob("*.whl")) if folder.is_dir() else []
        node = inspect_node()
        wheel, reason = choose_wheel(wheels, node, args.device)
        did = install(wheel)
    except InstallError as e:
        print(f"install_ferrotune.py: error: {e}", file=sys.stderr)
        return 1
    print(f"ferrotune: {'installed' if did else 'already installed:'} {os.path.basename(wheel)} ({reason})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
