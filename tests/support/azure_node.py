"""A stand-in for an Azure ML node on this machine: what the service does with a job or a
deployment after it accepted it, done with real virtualenvs, pip and subprocesses.

- :func:`image_venv`: the environment's *image*: a virtualenv with the pip part of the
  environment's spec installed from PyPI, built once and reused while the spec stays the same
  (as Azure ML builds an environment image once per spec); ``.venvs/<name>``.
- :func:`container_venv`: a fresh *container* of that image for one job or deployment: a new
  virtualenv whose ``site-packages`` sees the image's packages (a ``.pth`` file), so that what
  the job or the Dockerfile installs (the ferrotune wheel) lands in the container only.
- :func:`substitute`: the command's ``${{inputs.x}}`` / ``${{outputs.y}}`` replaced by paths, as
  Azure ML does before it runs the command.
- :func:`run_command`: the command under ``bash -c`` in the job's working directory (a copy of
  its code folder), with the launcher's environment variables and nothing of this process's
  Python setup (no ``PYTHONPATH``: the checkout's ferrotune is not importable there).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from tests.support.venvs import ensure_venv


def image_venv(name: str, requirements: Sequence[str]) -> Path:
    """The python of the image venv ``name`` with ``requirements`` (a spec's pip list)."""
    return ensure_venv(name, list(requirements), with_ferrotune=False)


def _site_packages(python: Path) -> str:
    return subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()


def container_venv(image_python: Path, folder: Path) -> Path:
    """A fresh venv at ``folder`` layered on the image venv; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, capture_output=True)
    python = folder / "bin" / "python"
    Path(_site_packages(python), "azureml-image.pth").write_text(_site_packages(image_python) + "\n")
    return python


def substitute(command: str, inputs: Mapping[str, object], outputs: Mapping[str, object]) -> str:
    """``command`` with every ``${{inputs.NAME}}`` / ``${{outputs.NAME}}`` replaced; fails on
    a reference to a binding that was not given."""

    def one(m: re.Match) -> str:
        kind, name = m.group(1), m.group(2)
        table = inputs if kind == "inputs" else outputs
        if name not in table:
            raise KeyError(f"the command refers to {kind}.{name}, which the rehearsal did not bind")
        return str(table[name])

    return re.sub(r"\$\{\{(inputs|outputs)\.([A-Za-z0-9_]+)\}\}", one, command)


def _env(container: Path, workdir: Path, env: Mapping[str, str]) -> dict:
    home = workdir.parent / "home"
    home.mkdir(exist_ok=True)
    base = {
        "PATH": f"{container / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    for k in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CERT", "SSL_CERT_FILE", "SSL_CERT_DIR",
              "REQUESTS_CA_BUNDLE", "TMPDIR"):
        if k in os.environ:
            base[k] = os.environ[k]
    return {**base, **env}


def run_command(
    command: str,
    container: Path,
    workdir: Path,
    env: Mapping[str, str],
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """Runs ``command`` as the node would: ``bash -c`` in ``workdir``, the container's
    ``bin`` first on ``PATH``, the launcher's ``env`` and a private ``HOME``."""
    return subprocess.run(
        ["bash", "-c", command], cwd=workdir, env=_env(container, workdir, env), capture_output=True, text=True,
        timeout=timeout,
    )


def start_command(command: str, container: Path, workdir: Path, env: Mapping[str, str]) -> subprocess.Popen:
    """:func:`run_command`, started and not waited for (one process of a data-parallel job)."""
    return subprocess.Popen(
        ["bash", "-c", command], cwd=workdir, env=_env(container, workdir, env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def copy_code(code: Path, workdir: Path) -> Path:
    """The job's code folder as the node sees it: a copy, the command's working directory."""
    shutil.copytree(code, workdir)
    return workdir


def installed_from(python: Path) -> Optional[str]:
    """Where ``import ferrotune`` comes from for ``python`` (None: not importable)."""
    r = subprocess.run([str(python), "-c", "import ferrotune; print(ferrotune.__file__)"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    return r.stdout.strip() if r.returncode == 0 else None
