"""Side virtualenvs for tests that need packages which cannot live in the main test
environment.

``azureml-inference-server-http`` and ``azure-ai-ml`` break each other's imports
(OpenTelemetry), and neither belongs in the environment that runs the rest of the suite, so
each gets its own virtualenv under ``<repo>/.venvs/<name>``. A venv is created once and
reused while its requirement list stays the same (a marker file holds their hash); a
failed install leaves no marker, so the next run starts over.

``with_ferrotune=True`` makes the checkout's ``python/`` folder importable in the venv
(a ``.pth`` file), with ferrotune's own runtime dependencies installed: the native module
that ``maturin develop`` built into ``python/ferrotune/`` is then used as is, with no second
compile. That is how these tests run ferrotune "installed" in a foreign environment.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".venvs"

#: ferrotune's runtime dependencies (pyproject's `dependencies`), for venvs that import it.
FERROTUNE_RUNTIME = ["tqdm>=4.60", "numpy>=1.22"]


class VenvError(RuntimeError):
    """The side virtualenv could not be created (e.g. PyPI is unreachable)."""


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(name: str, requirements: list[str], *, with_ferrotune: bool = False, timeout: float = 1200) -> Path:
    """The python executable of the side venv `name` with `requirements` installed."""
    reqs = list(requirements) + (FERROTUNE_RUNTIME if with_ferrotune else [])
    key = hashlib.sha256(("\n".join(reqs) + f"\nferrotune={with_ferrotune}\n{sys.version}").encode()).hexdigest()
    venv = VENVS / name
    marker = venv / ".ferrotune-requirements"
    py = _python(venv)
    if marker.is_file() and marker.read_text() == key and py.exists():
        return py
    marker.unlink(missing_ok=True)
    VENVS.mkdir(exist_ok=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)]]
    if reqs:
        steps.append([str(py), "-m", "pip", "install", "-q", *reqs])
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode != 0:
            raise VenvError(f"{' '.join(cmd[:4])} ... failed ({r.returncode}):\n{r.stderr[-3000:]}")
    if with_ferrotune:
        purelib = subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        Path(purelib, "ferrotune-checkout.pth").write_text(str(ROOT / "python") + "\n")
    marker.write_text(key)
    return py
