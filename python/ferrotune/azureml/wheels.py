"""The ferrotune wheels a job or a deployment ships, and the folders that carry them.

ferrotune is not installed from a package index on Azure ML: the wheel of the ferrotune
you run (or the wheels you name) travels with the job's code folder
(:func:`job_code_folder`) or the serving environment's Docker build context
(:func:`serving_context`), and is installed from there. Nothing in those folders, the job's
command or the environment names a path of the machine that submits them.

Which wheels, by default (:func:`default_wheels`):

1. the wheel file the running ferrotune was installed from (pip's ``direct_url.json``),
   kept in the wheel cache so that it stays available after the file is gone;
2. else, when ferrotune runs from a source checkout: ``maturin build --release`` into the
   wheel cache (again only when the sources changed), plus the CUDA wheel in the
   checkout's ``dist-cuda/`` with the same version, if ``scripts/build_cuda.sh`` wrote one;
3. else :class:`WheelNotFoundError`, saying how to get one.

The wheel cache is ``$FERROTUNE_WHEEL_CACHE``, else ``$XDG_CACHE_HOME/ferrotune``, else
``~/.cache/ferrotune``.

Two kinds of wheel, same project name (installing one replaces the other):

- the CPU wheel ``ferrotune-<ver>-cp310-abi3-<platform>.whl`` (``maturin build --release``);
- the CUDA wheel ``ferrotune-<ver>+cu12-cp310-abi3-<platform>.whl``
  (``scripts/build_cuda.sh``, in ``dist-cuda/``): imports anywhere, brings its NVIDIA
  runtime wheels as dependencies and needs an NVIDIA driver >= 525 on the node (>= 580 for
  a ``+cu13`` wheel), compute capability >= 7.0.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence
from urllib.parse import unquote, urlsplit

from ..exceptions import InvalidArgumentError
from . import _node_install
from ._common import PathLike, WheelBuildError, WheelError, WheelNotFoundError, _ferrotune_version

#: the Python of the Azure ML environments ferrotune builds (the wheels must run on it)
ENV_PYTHON = "3.11"
_ENV_PY = (3, 11)

#: the name the node-side installer has in a job's code folder
INSTALLER = "install_ferrotune.py"

_WHEEL_RE = _node_install._WHEEL_RE
# Source files whose change makes a new wheel (the fingerprint of a checkout build).
_SOURCE_DIRS = ("src", "python/ferrotune", "kernels")
_SOURCE_FILES = ("Cargo.toml", "Cargo.lock", "pyproject.toml", "README.md", "build.rs")
_SKIP_SUFFIXES = (".so", ".pyd", ".pyc", ".dylib", ".dll")


def cache_dir() -> Path:
    """The wheel cache: ``$FERROTUNE_WHEEL_CACHE``, ``$XDG_CACHE_HOME/ferrotune`` or
    ``~/.cache/ferrotune``."""
    explicit = os.environ.get("FERROTUNE_WHEEL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "ferrotune"


# ---------------------------------------------------------------------------------------
# One wheel file
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    """A ferrotune wheel file, checked to run in an Azure ML environment (Linux x86-64,
    CPython 3.11)."""

    path: Path
    #: the public version (``0.1.0``)
    version: str
    #: the local version label (``""`` for the CPU wheel, ``cu12`` for the CUDA 12 wheel)
    local: str
    #: the dependencies it declares (``Requires-Dist`` without extras), pip syntax
    requires: tuple

    @property
    def filename(self) -> str:
        return self.path.name

    @property
    def cuda(self) -> Optional[int]:
        """The CUDA major version of a CUDA wheel, ``None`` for the CPU wheel."""
        return _node_install.cuda_major(self.path.name)

    @property
    def min_driver(self) -> Optional[int]:
        """The oldest NVIDIA driver this wheel runs with (``None``: the CPU wheel, or a
        CUDA version ferrotune has no number for)."""
        return None if self.cuda is None else _node_install.MIN_DRIVER.get(self.cuda)

    def describe(self) -> str:
        if self.cuda is None:
            return f"{self.filename} (CPU)"
        driver = f", NVIDIA driver >= {self.min_driver}" if self.min_driver else ""
        return f"{self.filename} (CUDA {self.cuda}{driver})"


def _platform_ok(platform: str) -> bool:
    return any(p == "linux_x86_64" or (p.startswith("manylinux") and p.endswith("_x86_64")) for p in platform.split("."))


def _python_ok(python: str, abi: str) -> bool:
    for tag in python.split("."):
        m = re.fullmatch(r"(cp|py)(\d)(\d*)", tag)
        if not m:
            continue
        version = (int(m.group(2)), int(m.group(3) or 0))
        if abi == "abi3" and m.group(1) == "cp" and version <= _ENV_PY:
            return True
        if abi == "none" and m.group(1) == "py" and version[0] == 3 and (not m.group(3) or version <= _ENV_PY):
            return True
        if m.group(1) == "cp" and version == _ENV_PY and abi == f"cp{_ENV_PY[0]}{_ENV_PY[1]}":
            return True
    return False


def read_wheel(path: PathLike) -> Wheel:
    """Reads and checks one ferrotune wheel file.

    Raises:
        WheelNotFoundError: no such file.
        WheelError: not a ferrotune wheel (name, or no readable metadata inside), or not
            for Linux x86-64 / CPython 3.11.
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise WheelNotFoundError(f"wheel {os.fspath(path)!r} does not exist")
    m = _WHEEL_RE.match(p.name)
    if not m or m.group("name").lower().replace("-", "_") != "ferrotune":
        raise WheelError(
            f"{p.name} is not a ferrotune wheel: expected ferrotune-<version>[+cu12]-<python>-<abi>-<platform>.whl "
            "(maturin build --release, or scripts/build_cuda.sh for the CUDA wheel)"
        )
    if not _platform_ok(m.group("platform")):
        raise WheelError(
            f"{p.name} is built for {m.group('platform')}; Azure ML nodes run Linux x86-64: build the wheel on "
            "Linux x86-64 (maturin build --release), or cross-compile with "
            "`maturin build --release --zig --target x86_64-unknown-linux-gnu`"
        )
    if not _python_ok(m.group("python"), m.group("abi")):
        raise WheelError(
            f"{p.name} is for {m.group('python')}-{m.group('abi')}; the Azure ML environment runs CPython {ENV_PYTHON}: "
            "use the abi3 wheel maturin builds for ferrotune (cp310-abi3)"
        )
    try:
        with zipfile.ZipFile(p) as z:
            names = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
            if len(names) != 1:
                raise WheelError(f"{p.name} has no single .dist-info/METADATA: not a valid wheel")
            meta = HeaderParser().parsestr(z.read(names[0]).decode("utf-8"))
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as e:
        raise WheelError(f"{p.name} is not a readable wheel (zip) file: {e}") from None
    requires = tuple(r.strip() for r in (meta.get_all("Requires-Dist") or []) if not re.search(r"\bextra\s*==", r))
    return Wheel(path=p.resolve(), version=m.group("version"), local=m.group("local") or "", requires=requires)


def resolve_wheels(wheels: Any = None) -> list:
    """The wheels to ship: ``wheels`` (a path or a list of paths; at most one CPU and one
    CUDA wheel, same version), or :func:`default_wheels` when ``None``. CPU wheel first.

    Raises:
        WheelError, WheelNotFoundError, WheelBuildError: see :func:`read_wheel` and
            :func:`default_wheels`.
        InvalidArgumentError: ``wheels`` is not a path or a list of paths.
    """
    if wheels is None:
        paths: list = default_wheels()
    elif isinstance(wheels, (str, os.PathLike, Wheel)):
        paths = [wheels]
    elif isinstance(wheels, Sequence) and wheels and all(isinstance(w, (str, os.PathLike, Wheel)) for w in wheels):
        paths = list(wheels)
    else:
        raise InvalidArgumentError(
            f"wheels={wheels!r}: expected a wheel file or a list of them (the CPU and/or the CUDA wheel)"
        )
    read = [w if isinstance(w, Wheel) else read_wheel(w) for w in paths]
    cpu = [w for w in read if w.cuda is None]
    cuda = [w for w in read if w.cuda is not None]
    for kind, group in (("CPU", cpu), ("CUDA", cuda)):
        if len(group) > 1:
            raise WheelError(
                f"{len(group)} {kind} wheels given ({', '.join(w.filename for w in group)}): pass at most one CPU "
                "and one CUDA wheel"
            )
    if len({w.version for w in read}) > 1:
        raise WheelError(
            f"the wheels are different ferrotune versions ({', '.join(w.filename for w in read)}): the CPU and the "
            "CUDA wheel must be built from the same sources"
        )
    return cpu + cuda


# ---------------------------------------------------------------------------------------
# The default: the running ferrotune's wheel
# ---------------------------------------------------------------------------------------


def _package_dir() -> Path:
    from .. import __file__ as init

    return Path(init).resolve().parent


def _file_sha256(path: Path) -> str:
    return _node_install._sha256(str(path))  # the node installer's own (it cannot import us)


def _copy_atomic(src: Path, dest: Path) -> None:
    """``src`` → ``dest`` through a temporary name in ``dest``'s folder: ``dest`` is
    complete or absent. A copy, not a hard link: the source may be rebuilt in place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _installed_wheel(pkg: Path) -> tuple:
    """``(wheel path or None, note)`` for a ferrotune installed from a wheel file: the file,
    or its copy in the wheel cache. ``note`` says what was found (for the error message)."""
    try:
        dist = importlib.metadata.distribution("ferrotune")
    except importlib.metadata.PackageNotFoundError:
        return None, "no installed ferrotune distribution"
    try:
        located = Path(str(dist.locate_file("ferrotune/__init__.py"))).resolve()
    except OSError:
        return None, "no installed ferrotune distribution"
    if located != (pkg / "__init__.py"):
        return None, f"the installed ferrotune distribution is not the one running ({located.parent})"
    text = dist.read_text("direct_url.json")
    if not text:
        return None, "ferrotune was installed from a package index (pip recorded no wheel file)"
    try:
        info = json.loads(text)
    except ValueError:
        return None, "ferrotune's direct_url.json is not valid JSON"
    url = str(info.get("url", ""))
    if "archive_info" not in info or not url.lower().endswith(".whl"):
        what = "a folder (an editable or source install)" if "dir_info" in info else url
        return None, f"ferrotune was installed from {what}, not from a wheel file"
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None, f"ferrotune was installed from {url} (not a local wheel file)"
    archive = info.get("archive_info") or {}
    want = (archive.get("hashes") or {}).get("sha256")
    if want is None and str(archive.get("hash", "")).startswith("sha256="):
        want = archive["hash"][len("sha256="):]
    source = Path(unquote(parts.path))
    cached = cache_dir() / "installed" / source.name

    def same(p: Path) -> bool:  # the very file pip installed (when pip recorded its hash)
        return p.is_file() and (want is None or _file_sha256(p) == want)

    if same(source):
        if not same(cached):
            try:
                _copy_atomic(source, cached)
            except OSError:
                pass  # no cache today: the file itself still works
        return source, "installed from this wheel file"
    if same(cached):
        return cached, "the copy in the wheel cache of the wheel file it was installed from"
    what = "has changed since" if source.is_file() else "no longer exists"
    return None, (
        f"ferrotune was installed from {source}, which {what} (and the wheel cache {cached.parent} has no copy)"
    )


def _checkout_root(pkg: Path) -> Optional[Path]:
    root = pkg.parent.parent
    if pkg.parent.name != "python" or not (root / "Cargo.toml").is_file():
        return None
    try:
        if not re.search(r'(?m)^name\s*=\s*"ferrotune"', (root / "pyproject.toml").read_text(encoding="utf-8")):
            return None
    except OSError:
        return None
    return root


def _source_files(root: Path) -> Iterable[Path]:
    for name in _SOURCE_FILES:
        if (root / name).is_file():
            yield root / name
    for sub in _SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(root / sub):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for f in sorted(filenames):
                if not f.endswith(_SKIP_SUFFIXES) and not f.startswith("."):
                    yield Path(dirpath) / f


def _source_state(root: Path) -> tuple:
    """``(fingerprint, newest mtime)`` of the checkout's sources (names, sizes, mtimes)."""
    h = hashlib.sha256()
    newest = 0
    for f in _source_files(root):
        st = f.stat()
        newest = max(newest, st.st_mtime_ns)
        h.update(f"{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest(), newest


def _maturin() -> list:
    beside = Path(sys.executable).parent / "maturin"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("maturin")
    if found:
        return [found]
    if importlib.util.find_spec("maturin") is not None:
        return [sys.executable, "-m", "maturin"]
    raise WheelBuildError(
        "building ferrotune's wheel from the source checkout needs maturin: pip install maturin "
        "(or pass wheels=[...] with a wheel you built)"
    )


def build_wheel(root: PathLike) -> Path:
    """The CPU wheel of the source checkout ``root``: ``maturin build --release`` into the
    wheel cache, or the wheel built there before from the same sources.

    Raises:
        WheelBuildError: maturin is missing or the build failed (with maturin's last lines).
    """
    root = Path(root).resolve()
    fingerprint, _ = _source_state(root)
    dest = cache_dir() / "built" / fingerprint[:24]
    done = sorted(dest.glob("ferrotune-*.whl")) if dest.is_dir() else []
    if len(done) == 1:
        return done[0]
    cmd = [*_maturin(), "build", "--release"]
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        r = subprocess.run([*cmd, "--out", str(tmp)], cwd=root, capture_output=True, text=True)
        built = sorted(tmp.glob("ferrotune-*.whl"))
        if r.returncode != 0 or len(built) != 1:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
            raise WheelBuildError(
                f"`maturin build --release` in {root} failed (exit status {r.returncode}); pass wheels=[...] with a "
                f"wheel you built instead. maturin said:\n{tail}"
            )
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / built[0].name


def _dist_cuda_wheel(root: Path, version: str, newest_source: Optional[int] = None) -> Optional[Path]:
    """The newest CUDA wheel of ``version`` in the checkout's ``dist-cuda/`` (warns when it
    is older than the sources)."""
    found = [p for p in (root / "dist-cuda").glob(f"ferrotune-{version}+cu*.whl") if p.is_file()]
    if not found:
        return None
    wheel = max(found, key=lambda p: p.stat().st_mtime_ns)
    if newest_source is not None and wheel.stat().st_mtime_ns < newest_source:
        warnings.warn(
            f"the CUDA wheel dist-cuda/{wheel.name} is older than the checkout's sources: GPU jobs run the code it "
            "was built from; rebuild it with scripts/build_cuda.sh",
            UserWarning,
            stacklevel=4,
        )
    return wheel


def default_wheels() -> list:
    """The wheel files of the running ferrotune (see the module's documentation for the
    order in which they are looked for).

    Returns:
        a list of paths: one wheel, or the CPU and the CUDA wheel of a checkout.

    Raises:
        WheelNotFoundError: neither installed from a wheel file nor running from a source
            checkout; the message says what was found and how to get a wheel.
        WheelBuildError: the checkout build failed, or maturin is missing.
    """
    pkg = _package_dir()
    installed, note = _installed_wheel(pkg)
    if installed is not None:
        return [installed]
    root = _checkout_root(pkg)
    if root is not None:
        cpu = build_wheel(root)
        _, newest = _source_state(root)
        cuda = _dist_cuda_wheel(root, _ferrotune_version(), newest)
        return [cpu] + ([cuda] if cuda is not None else [])
    raise WheelNotFoundError(
        f"no wheel of the running ferrotune {_ferrotune_version()} ({pkg}) to ship to Azure ML: {note}. Pass "
        "wheels=['ferrotune-...whl'] (the CPU wheel from `maturin build --release` in a ferrotune checkout, "
        "the CUDA wheel from scripts/build_cuda.sh), or ferrotune_requirement='ferrotune==X' if your package "
        "index has it"
    )


# ---------------------------------------------------------------------------------------
# The folders that carry the wheels
# ---------------------------------------------------------------------------------------


def _assemble(kind: str, files: dict, wheels: Sequence[Wheel]) -> Path:
    """A folder in the wheel cache holding ``files`` (name → text) and ``wheels``, named
    by their contents: the same wheels give the same folder (and Azure ML, which keys
    uploads by content, uploads it once)."""
    h = hashlib.sha256()
    for name, text in sorted(files.items()):
        h.update(f"{name}\0{text}\0".encode())
    for w in wheels:
        h.update(f"{w.filename}\0{_file_sha256(w.path)}\0".encode())
    dest = cache_dir() / kind / h.hexdigest()[:24]
    if dest.is_dir():
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text, encoding="utf-8")
        for w in wheels:
            target = tmp / ("wheels" if kind == "job-code" else "") / w.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(w.path, target)  # not a hard link: the folder's name is its content
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not a concurrent twin that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def job_code_folder(wheels: Sequence[Wheel]) -> Path:
    """The code folder of a fine-tuning job: ``install_ferrotune.py`` (the node-side
    installer, :mod:`ferrotune.azureml._node_install`) and ``wheels/`` with ``wheels``."""
    installer = Path(_node_install.__file__).read_text(encoding="utf-8")
    return _assemble("job-code", {INSTALLER: installer}, wheels)


#: the serving environment's Python, created in the image as Azure ML creates a
#: conda_file environment
SERVING_PREFIX = "/azureml-envs/ferrotune"

_DOCKERFILE = """\
# The ferrotune serving environment, written by ferrotune.azureml (ferrotune {version}).
# Build context: this Dockerfile, requirements.txt and the wheel {wheel}.
FROM {image}
WORKDIR /tmp/ferrotune-build
COPY requirements.txt {wheel} ./
RUN conda create --yes --quiet --prefix {prefix} --override-channels --channel conda-forge python={python} pip \\
 && {prefix}/bin/python -m pip install --no-cache-dir --disable-pip-version-check -r requirements.txt \\
 && conda clean --all --yes --quiet \\
 && rm -rf /tmp/ferrotune-build
WORKDIR /
ENV AZUREML_CONDA_ENVIRONMENT_PATH={prefix}
ENV PATH={prefix}/bin:$PATH
"""


def serving_context(wheel: Wheel, image: str, requirements: Sequence[str]) -> Path:
    """The Docker build context of a serving environment: a ``Dockerfile`` on ``image``
    that creates a Python 3.11 environment (:data:`ENV_PYTHON`) and pip-installs ``requirements.txt``
    (``requirements`` plus ``./<wheel>``), and the wheel."""
    reqs = "".join(f"{r}\n" for r in (*requirements, f"./{wheel.filename}"))
    dockerfile = _DOCKERFILE.format(
        version=_ferrotune_version(), wheel=wheel.filename, image=image, prefix=SERVING_PREFIX, python=ENV_PYTHON
    )
    return _assemble("serving-context", {"Dockerfile": dockerfile, "requirements.txt": reqs}, [wheel])
