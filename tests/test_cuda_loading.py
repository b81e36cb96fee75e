"""The CUDA build on a machine without a usable GPU: it imports (the NVIDIA driver, cuBLAS and
NCCL are loaded only when a GPU is asked for), ``device="cuda"`` raises a typed error with one
line naming what is missing, and the CUDA wheel's metadata (``scripts/cuda_wheel_metadata.py``,
what ``scripts/build_cuda.sh`` runs) declares the NVIDIA runtime wheels under a ``+cu12`` label.

The driver cases use stand-in ``libcuda.so.1`` libraries compiled here with the system C
compiler: each answers the driver API calls ferrotune makes before it touches a GPU
(``cuInit``, ``cuDriverGetVersion``, ``cuDeviceGetCount``, ``cuDeviceGet``,
``cuDeviceGetAttribute``, ``cuDeviceGetName``) the way an old driver, a machine without a GPU,
or an old GPU does, and is found through ``LD_LIBRARY_PATH`` as the real one would be.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import ferrotune
from ferrotune import GpuUnavailableError

ROOT = Path(__file__).resolve().parent.parent
cuda_build = pytest.mark.skipif(not ferrotune._core.cuda_build(), reason="this build has no CUDA support (cargo feature cuda)")

FAKE_DRIVER = r"""
#include <string.h>
/* CUDA driver API stand-in: version, devices and compute capability from the defines */
typedef int CUresult;
int cuInit(unsigned flags) { (void)flags; return INIT_RESULT; }
int cuDriverGetVersion(int* v) { *v = DRIVER_VERSION; return 0; }
int cuDeviceGetCount(int* n) { *n = DEVICES; return 0; }
int cuDeviceGet(int* d, int ordinal) { *d = ordinal; return 0; }
int cuDeviceGetAttribute(int* v, int attr, int dev) {
  (void)dev;
  if (attr == 75) { *v = CC_MAJOR; return 0; }  /* COMPUTE_CAPABILITY_MAJOR */
  if (attr == 76) { *v = CC_MINOR; return 0; }  /* COMPUTE_CAPABILITY_MINOR */
  *v = 0; return 0;
}
int cuDeviceGetName(char* name, int len, int dev) { (void)dev; strncpy(name, "Stand-in GPU", len); return 0; }
int cuGetErrorName(int e, const char** s) { (void)e; *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
int cuGetErrorString(int e, const char** s) { (void)e; *s = "no CUDA-capable device"; return 0; }
"""


def fake_driver(folder: Path, *, version=12080, devices=1, cc=(8, 0), init=0) -> Path:
    cc_bin = shutil.which("cc") or shutil.which("gcc")
    if cc_bin is None:
        pytest.skip("no C compiler for the stand-in driver")
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "fake_cuda.c"
    src.write_text(FAKE_DRIVER)
    defines = [f"-DDRIVER_VERSION={version}", f"-DDEVICES={devices}", f"-DCC_MAJOR={cc[0]}", f"-DCC_MINOR={cc[1]}",
               f"-DINIT_RESULT={init}"]
    subprocess.run([cc_bin, "-shared", "-fPIC", "-o", str(folder / "libcuda.so.1"), "-Wl,-soname,libcuda.so.1",
                    *defines, str(src)], check=True)
    return folder


def ask_for_cuda(env_extra: dict, model_dir: Path) -> subprocess.CompletedProcess:
    """`LoraModel.load(device="cuda")` in a fresh process; prints the exception's class and text."""
    code = (
        "import ferrotune, sys\n"
        "try:\n"
        f"    ferrotune.LoraModel.load({str(model_dir)!r}, device='cuda')\n"
        "    print('LOADED')\n"
        "except ferrotune.FerrotuneError as e:\n"
        "    print(type(e).__name__ + ': ' + str(e))\n"
    )
    import os

    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cuda-loading") / "m"
    ferrotune.create_random_model(str(d), {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 64})
    return d


@cuda_build
def test_the_cuda_build_imports_and_runs_on_the_cpu_without_a_driver(model_dir):
    # nothing CUDA was loaded to import it; "auto" falls back to the CPU
    assert ferrotune.cuda_available() is False
    m = ferrotune.LoraModel.load(str(model_dir), device="auto")
    assert m.logits([1, 2, 3]).shape == (3, 64)


@cuda_build
def test_no_driver_is_a_typed_one_line_error(model_dir, tmp_path):
    r = ask_for_cuda({"LD_LIBRARY_PATH": str(tmp_path)}, model_dir)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("GpuUnavailableError: no NVIDIA driver here (libcuda.so.1 cannot be loaded)"), line
    assert "device='cpu'" in line and "\n" not in line


@cuda_build
@pytest.mark.parametrize(
    "driver, expected",
    [
        (dict(version=11080), "the NVIDIA driver supports CUDA 11.8; this ferrotune wheel needs CUDA 12 (driver 525 or newer): update the driver"),
        (dict(devices=0), "no GPU cuda:0 here (0 visible"),
        (dict(cc=(6, 1)), "Stand-in GPU (cuda:0) has compute capability 6.1; ferrotune needs 7.0 or newer"),
        (dict(init=100), "the NVIDIA driver did not start (CUDA_ERROR_NO_DEVICE)"),
    ],
    ids=["driver-too-old", "no-gpu", "gpu-too-old", "driver-fails"],
)
def test_a_driver_or_gpu_that_cannot_serve_gives_a_typed_error(model_dir, tmp_path, driver, expected):
    lib = fake_driver(tmp_path / "driver", **driver)
    r = ask_for_cuda({"LD_LIBRARY_PATH": str(lib)}, model_dir)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("GpuUnavailableError: ") and expected in line, line
    assert "Traceback" not in r.stderr


def _wheel(path: Path, version="0.1.0") -> Path:
    info = f"ferrotune-{version}.dist-info"
    files = {
        "ferrotune/__init__.py": b"x = 1\n",
        f"{info}/METADATA": (f"Metadata-Version: 2.4\nName: ferrotune\nVersion: {version}\n"
                             "Requires-Dist: tqdm>=4.60\nRequires-Dist: numpy>=1.22\n\n# ferrotune\n\nlong description\n").encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: maturin\nRoot-Is-Purelib: false\nTag: cp310-abi3-linux_x86_64\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n")
    return path


def test_the_cuda_wheel_metadata_declares_its_nvidia_wheels(tmp_path):
    src = _wheel(tmp_path / "ferrotune-0.1.0-cp310-abi3-linux_x86_64.whl")
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cuda_wheel_metadata.py"), str(src), str(tmp_path / "dist"),
         "--label", "cu12", "--requires", "nvidia-cublas-cu12>=12.1,<13", "--requires", "nvidia-nccl-cu12>=2.18"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    whl = Path(out)
    assert whl.name == "ferrotune-0.1.0+cu12-cp310-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        info = "ferrotune-0.1.0+cu12.dist-info"
        meta = z.read(f"{info}/METADATA").decode()
        record = z.read(f"{info}/RECORD").decode().splitlines()
        assert not any(n.startswith("ferrotune-0.1.0.dist-info/") for n in names)
        for row in record:
            name, digest, size = row.split(",")
            if name.endswith("RECORD"):
                continue
            data = z.read(name)
            want = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (want, len(data)), name
    head, _, body = meta.partition("\n\n")
    assert "Version: 0.1.0+cu12" in head.splitlines()
    assert head.splitlines()[-2:] == ["Requires-Dist: nvidia-cublas-cu12>=12.1,<13", "Requires-Dist: nvidia-nccl-cu12>=2.18"]
    assert "Requires-Dist: tqdm>=4.60" in head and body.startswith("# ferrotune")
    # a wheel that already has a label is refused
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "cuda_wheel_metadata.py"), str(whl), str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "already has a local version label" in r.stderr


def test_build_cuda_declares_what_the_loader_loads():
    # the libraries the Rust loader opens are the wheels build_cuda.sh declares
    script = (ROOT / "scripts" / "build_cuda.sh").read_text()
    libs = (ROOT / "src" / "kernels" / "cuda" / "libs.rs").read_text()
    assert '"nvidia-cublas-cu12>=12.1,<13"' in script and '"nvidia-nccl-cu12>=2.18"' in script
    assert "libcublas.so.12" in libs and "libnccl.so.2" in libs
    assert "sm_70 sm_75 sm_80 sm_86 sm_89 sm_90" in script


def test_nvidia_libraries_of_another_site_packages_are_found(tmp_path):
    # a --system-site-packages virtualenv (what scripts/gpu_check.sh makes on the GPU machine,
    # whose torch brought CUDA 13's nvidia/cu13/lib): cuBLAS sits in a site-packages other than
    # ferrotune's, and the loader learns of it through FERROTUNE_CUDA_LIB_DIRS at import
    import os

    site = tmp_path / "system-site"
    for sub in ("cu13", "nccl"):
        (site / "nvidia" / sub / "lib").mkdir(parents=True)
    (site / "nvidia" / "no_lib_folder").mkdir()
    code = "import os, ferrotune; print(os.environ.get('FERROTUNE_CUDA_LIB_DIRS', ''))"
    env = {k: v for k, v in os.environ.items() if k != "FERROTUNE_CUDA_LIB_DIRS"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
    dirs = found.split(os.pathsep)
    assert [str(site / "nvidia" / s / "lib") for s in ("cu13", "nccl")] == [d for d in dirs if d.startswith(str(site))]
    # a user's own setting wins
    env["FERROTUNE_CUDA_LIB_DIRS"] = "/opt/my-cuda/lib"
    kept = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert kept == "/opt/my-cuda/lib"
