"""Wheel files for the ``ferrotune.azureml`` tests.

- :func:`make_wheel`: a small but valid ferrotune wheel (``METADATA``, ``WHEEL``,
  ``RECORD`` with hashes, one module file), named like the real CPU or CUDA wheel, for the
  tests that build job and deployment entities (they read its name and metadata, never
  install it).
- :func:`checkout_wheel`: the real CPU wheel of this checkout, built once per test session
  by ``ferrotune.azureml.default_wheels()`` itself (``maturin build --release``, reusing
  ``target/``) into a wheel cache under the session's temporary folder.

Standard library only at module level (it also runs in the azure-ai-ml side venv).
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Iterable

#: what the real wheels declare (pyproject's dependencies); the CUDA wheel adds its
#: NVIDIA runtime wheels
CPU_REQUIRES = ("tqdm>=4.60", "numpy>=1.22")
CUDA_REQUIRES = CPU_REQUIRES + ("nvidia-cublas-cu12>=12.1,<13", "nvidia-nccl-cu12>=2.18")  # scripts/build_cuda.sh


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(
    folder: Path,
    version: str = "0.1.0",
    local: str = "",
    requires: Iterable[str] = CPU_REQUIRES,
    python: str = "cp310",
    abi: str = "abi3",
    platform: str = "manylinux_2_34_x86_64",
    extra_requires: Iterable[str] = ('azure-ai-ml>=1.20; extra == "azure"',),
) -> Path:
    """Writes ``ferrotune-<version>[+<local>]-<python>-<abi>-<platform>.whl`` into
    ``folder`` and returns its path."""
    full = f"{version}+{local}" if local else version
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ferrotune-{full}-{python}-{abi}-{platform}.whl"
    info = f"ferrotune-{full}.dist-info"
    meta = ["Metadata-Version: 2.4", "Name: ferrotune", f"Version: {full}", "Requires-Python: >=3.10"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    meta += ["Provides-Extra: azure"] + [f"Requires-Dist: {r}" for r in extra_requires]
    files = {
        "ferrotune/__init__.py": f'__version__ = "{version}"\n'.encode(),
        f"{info}/METADATA": ("\n".join(meta) + "\n").encode(),
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: ferrotune-tests\nRoot-Is-Purelib: false\nTag: {python}-{abi}-{platform}\n".encode(),
    }
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    record += f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", record)
    return path


def checkout_wheel(cache: Path) -> Path:
    """The checkout's CPU wheel, built by ``default_wheels()`` into the wheel cache
    ``cache`` (``FERROTUNE_WHEEL_CACHE``)."""
    from ferrotune.azureml import default_wheels

    old = os.environ.get("FERROTUNE_WHEEL_CACHE")
    os.environ["FERROTUNE_WHEEL_CACHE"] = str(cache)
    try:
        wheels = default_wheels()
    finally:
        if old is None:
            del os.environ["FERROTUNE_WHEEL_CACHE"]
        else:
            os.environ["FERROTUNE_WHEEL_CACHE"] = old
    cpu = [w for w in wheels if "+cu" not in Path(w).name]
    assert len(cpu) == 1, wheels
    return Path(cpu[0])
