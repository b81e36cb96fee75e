"""The public surface: the hand-written stubs of ``ferrotune._core`` against the compiled
module, the exception hierarchy against the Rust error mapping, the callable
``ferrotune.download_dataset`` submodule, and the version."""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import ferrotune
import ferrotune.exceptions as exc
from ferrotune import _core

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "python" / "ferrotune" / "_core.pyi"
BINDINGS = sorted((ROOT / "src" / "python").glob("*.rs"))
ERRORS_RS = ROOT / "src" / "python" / "errors.rs"
CARGO_TOML = ROOT / "Cargo.toml"

# ---------------------------------------------------------------------------------------
# _core.pyi against the compiled module
# ---------------------------------------------------------------------------------------

_NO_DEFAULT = inspect.Parameter.empty


def _stub_functions() -> dict[str, ast.FunctionDef]:
    """Module functions by name, and class methods as ``Class.method`` (not properties)."""
    tree = ast.parse(STUB.read_text(encoding="utf-8"), filename=str(STUB))
    out = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for fn in cls.body:
            props = [d for d in getattr(fn, "decorator_list", []) if isinstance(d, ast.Name) and d.id == "property"]
            if isinstance(fn, ast.FunctionDef) and not props:
                out[f"{cls.name}.{fn.name}"] = fn
    return out


def _parameters(fn) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def _stub_classes() -> set[str]:
    tree = ast.parse(STUB.read_text(encoding="utf-8"), filename=str(STUB))
    return {n.name for n in tree.body if isinstance(n, ast.ClassDef)}


def _compiled(name: str):
    obj = _core
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _stub_parameters(fn: ast.FunctionDef) -> list[tuple[str, inspect._ParameterKind, object]]:
    """(name, kind, default) per parameter; defaults as Python values (ast.literal_eval)."""
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    defaults = [_NO_DEFAULT] * (len(positional) - len(a.defaults)) + [ast.literal_eval(d) for d in a.defaults]
    out = []
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        kind = inspect.Parameter.POSITIONAL_ONLY if i < len(a.posonlyargs) else inspect.Parameter.POSITIONAL_OR_KEYWORD
        out.append((arg.arg, kind, default))
    if a.vararg:
        out.append((a.vararg.arg, inspect.Parameter.VAR_POSITIONAL, _NO_DEFAULT))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, inspect.Parameter.KEYWORD_ONLY, _NO_DEFAULT if d is None else ast.literal_eval(d)))
    if a.kwarg:
        out.append((a.kwarg.arg, inspect.Parameter.VAR_KEYWORD, _NO_DEFAULT))
    return out


def _split_top_level(s: str) -> list[str]:
    """Splits at commas outside brackets and string literals."""
    parts, depth, quote, cur = [], 0, None, ""
    i = 0
    while i < len(s):
        c = s[i]
        if quote:
            cur += c
            if c == "\\":
                cur += s[i + 1]
                i += 1
            elif c == quote:
                quote = None
        elif c == '"':
            quote = c
            cur += c
        elif c in "([{":
            depth += 1
            cur += c
        elif c in ")]}":
            depth -= 1
            cur += c
        elif c == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += c
        i += 1
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _rust_default(expr: str) -> object:
    """A pyo3 signature default written in Rust (``"main".to_string()``,
    ``vec!["jsonl".to_string()]``, ``None``, ``false``) as the Python value it becomes."""
    py = expr
    py = re.sub(r"\.(to_string|to_owned|into)\(\)", "", py)
    py = re.sub(r"String::from\(([^()]*)\)", r"\1", py)
    py = re.sub(r"\bvec!\s*\[", "[", py)
    py = re.sub(r"\btrue\b", "True", py)
    py = re.sub(r"\bfalse\b", "False", py)
    try:
        return ast.literal_eval(py)
    except (ValueError, SyntaxError) as e:  # extend _rust_default for the new expression
        raise AssertionError(f"cannot read the Rust default {expr!r}") from e


def _rust_signatures() -> dict[str, dict[str, object]]:
    """``#[pyo3(signature = (...))]`` of each function and method in src/python/*.rs:
    {function or Class.method: {parameter: default expression or None}}."""
    src = "\n".join(p.read_text(encoding="utf-8") for p in BINDINGS)
    out = {}
    # Rust struct -> Python class name, and where each #[pymethods] block starts and ends
    # (blocks close with a "}" in column 0), so that a method is attributed to its class.
    classes = dict(
        (m.group(2), m.group(1))
        for m in re.finditer(r'#\[pyclass\(name\s*=\s*"(\w+)"[^\]]*\]\s*pub\s+struct\s+(\w+)', src)
    )
    blocks = []
    for m in re.finditer(r"#\[pymethods\]\s*impl\s+(\w+)\s*\{", src):
        end = src.find("\n}", m.end())
        blocks.append((m.start(), end if end >= 0 else len(src), classes.get(m.group(1))))
    pattern = re.compile(r"#\[pyo3\(signature\s*=\s*\((?P<sig>.*?)\)\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?fn\s+(?P<name>\w+)", re.S)
    for m in pattern.finditer(src):
        params = {}
        for p in _split_top_level(m.group("sig")):
            name, eq, default = p.partition("=")
            if name.strip() == "*":  # keyword-only marker, not a parameter
                continue
            params[name.strip()] = default.strip() if eq else None
        name = m.group("name")
        owner = next((cls for start, end, cls in blocks if start < m.start() < end), None)
        if owner is not None:
            name = f"{owner}.{name}"
        else:
            assert hasattr(_core, name), f"{name}: neither a module function nor inside a #[pymethods] block"
        out[name] = params
    return out


STUB_FUNCTIONS = _stub_functions()


def test_stub_parses_and_declares_functions():
    assert {"download_dataset", "split_names", "hub_download", "rows_for_split_pc"} <= set(STUB_FUNCTIONS)
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    annotated = {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    assert "__version__" in annotated
    assert isinstance(_core.__version__, str)


@pytest.mark.parametrize("name", sorted(STUB_FUNCTIONS))
def test_stub_signature_matches_compiled(name):
    try:
        _compiled(name)
    except AttributeError:
        pytest.fail(f"_core.pyi declares {name}() but ferrotune._core has no such function")
    fn = _compiled(name)
    assert callable(fn)
    compiled = _parameters(fn)
    # A method's `self` is positional-only in the module and not in the Rust attribute.
    stub = [s for s in _stub_parameters(STUB_FUNCTIONS[name]) if s[0] != "self"]

    assert [p.name for p in compiled] == [s[0] for s in stub], "parameter names/order"
    assert [p.kind for p in compiled] == [s[1] for s in stub], "parameter kinds"

    rust = _rust_signatures().get(name)
    for (pname, _, stub_default), param in zip(stub, compiled):
        if param.default is _NO_DEFAULT:
            assert stub_default is _NO_DEFAULT, f"{name}({pname}) has no default in the module"
        elif param.default is Ellipsis:
            # pyo3 renders defaults that are Rust expressions (`"main".to_string()`) as `...` in
            # __text_signature__: read the value from the #[pyo3(signature = ...)] attribute.
            assert rust is not None and rust.get(pname) is not None, (
                f"{name}({pname}): default hidden by pyo3 and not found in src/python/*.rs"
            )
            value = _rust_default(rust[pname])
            assert stub_default == value and type(stub_default) is type(value), (
                f"{name}({pname}): stub default {stub_default!r}, Rust default {value!r}"
            )
        else:
            assert stub_default == param.default and type(stub_default) is type(param.default), (
                f"{name}({pname}): stub default {stub_default!r}, module default {param.default!r}"
            )


def test_rust_signature_attributes_match_compiled():
    """The source the hidden defaults are read from is the source the module was built from."""
    sigs = _rust_signatures()
    assert sigs, f"no #[pyo3(signature = ...)] found in {BINDINGS}"
    for name, params in sigs.items():
        compiled = {p.name: p for p in _parameters(_compiled(name))}
        assert list(params) == list(compiled), name
        for pname, param in compiled.items():
            assert (params[pname] is None) == (param.default is _NO_DEFAULT), (name, pname)
            if param.default not in (_NO_DEFAULT, Ellipsis):
                assert _rust_default(params[pname]) == param.default, (name, pname)


def test_every_public_function_is_in_the_stub():
    public = {n for n in dir(_core) if not n.startswith("__") and callable(getattr(_core, n))}
    assert public, "ferrotune._core exports no functions?"
    missing = public - set(STUB_FUNCTIONS) - _stub_classes()
    assert not missing, f"in ferrotune._core but not in _core.pyi: {sorted(missing)}"
    # pyo3's __all__ lists the same names.
    assert set(_core.__all__) - {"__version__"} == public


# ---------------------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in exc.__all__ if n != "TrainingInterrupted"])
def test_exception_is_a_ferrotune_error_exported_from_the_package(name):
    cls = getattr(exc, name)
    assert isinstance(cls, type) and issubclass(cls, ferrotune.FerrotuneError)
    assert issubclass(cls, Exception)
    assert getattr(ferrotune, name) is cls
    assert name in ferrotune.__all__


def test_training_interrupted_is_a_system_exit_not_an_error():
    # a request to stop (SIGTERM), not an error: `except Exception` must not swallow it
    cls = exc.TrainingInterrupted
    assert issubclass(cls, SystemExit) and not issubclass(cls, Exception)
    assert ferrotune.TrainingInterrupted is cls and "TrainingInterrupted" in ferrotune.__all__
    e = cls("stopped by SIGTERM", checkpoint="ck/checkpoint-3", step=3)
    assert e.code == 143 and str(e) == "stopped by SIGTERM" and e.checkpoint == "ck/checkpoint-3" and e.step == 3


def test_every_exception_class_is_in_all():
    defined = {
        n for n, v in vars(exc).items() if isinstance(v, type) and issubclass(v, BaseException) and v.__module__ == exc.__name__
    }
    assert defined == set(exc.__all__)


@pytest.mark.parametrize(
    "name, builtin",
    [
        ("InvalidArgumentError", ValueError),
        ("HubHTTPError", ConnectionError),
        ("OfflineNotCachedError", FileNotFoundError),
        ("FerrotuneIOError", OSError),
        ("FerrotuneFileNotFoundError", FileNotFoundError),
        ("FerrotunePermissionError", PermissionError),
    ],
)
def test_exception_builtin_mixins(name, builtin):
    assert issubclass(getattr(exc, name), builtin)


def _rust_mapped_class_names() -> set[str]:
    names = set(re.findall(r'=>\s*"([A-Za-z_][A-Za-z0-9_]*)"', ERRORS_RS.read_text(encoding="utf-8")))
    names.discard("KeyboardInterrupt")  # raised as the built-in, not looked up
    return names


def test_rust_error_mapping_names_existing_classes():
    names = _rust_mapped_class_names()
    assert len(names) >= 10, f"the regex found too few names in {ERRORS_RS}: {sorted(names)}"
    missing = sorted(n for n in names if n not in exc.__all__ or not hasattr(exc, n))
    assert not missing, f"src/python/errors.rs maps to classes ferrotune.exceptions lacks: {missing}"
    for n in names:
        assert issubclass(getattr(exc, n), exc.FerrotuneError)


def test_rust_errors_arrive_as_the_mapped_classes(tmp_path):
    """The lookup by name works at run time (a typo would surface as RuntimeError)."""
    with pytest.raises(exc.InvalidArgumentError):
        _core.rows_for_split_pc("abc", 10)
    with pytest.raises(exc.FerrotuneFileNotFoundError):
        _core._parquet_to_jsonl(str(tmp_path / "missing.parquet"), str(tmp_path / "out.jsonl"))
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_bytes(b"not parquet")
    with pytest.raises(exc.DataFormatError):
        _core._parquet_to_jsonl(str(not_parquet), str(tmp_path / "out.jsonl"))


# ---------------------------------------------------------------------------------------
# ferrotune.download_dataset: a function, and still callable once the submodule is imported
# ---------------------------------------------------------------------------------------


def test_download_dataset_callable_before_and_after_submodule_import(tmp_path):
    # In a fresh interpreter: whether this process already imported the submodule depends on
    # which tests ran before.
    code = textwrap.dedent(
        """
        import inspect, sys, types
        import ferrotune
        from ferrotune.exceptions import InvalidArgumentError
        assert "ferrotune.download_dataset" not in sys.modules
        before = ferrotune.download_dataset
        assert inspect.isfunction(before) and callable(before), before

        import ferrotune.download_dataset
        after = ferrotune.download_dataset
        assert after is sys.modules["ferrotune.download_dataset"], after
        assert isinstance(after, types.ModuleType) and callable(after), after
        assert callable(after.main)

        # Calls are forwarded to the function (an invalid split_pc fails before any network).
        for f in (before, after):
            try:
                f("some/dataset", sys.argv[1], split_pc="abc")
            except InvalidArgumentError:
                pass
            else:
                raise AssertionError("no InvalidArgumentError")
        print("ok")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out")],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-4000:]


# ---------------------------------------------------------------------------------------
# Version
# ---------------------------------------------------------------------------------------


def test_version_matches_core_and_cargo():
    cargo = tomllib.loads(CARGO_TOML.read_text(encoding="utf-8"))["package"]["version"]
    assert ferrotune.__version__ == _core.__version__ == cargo
