"""``ferrotune.packaging``: a trained model → an MLflow model folder Azure ML registers,
deploys and scores.

:func:`package_model` writes the layout of the folder the Azure ML fine-tuning pipeline
outputs (``mlflow_model_folder``), so the notebook's ``Model(path=...,
type=AssetTypes.MLFLOW_MODEL)`` registration takes it as is::

    OUT/
      MLmodel             python_function flavor (loader ferrotune.mlflow_pyfunc), signature
                          with the generation parameters, metadata
      conda.yaml          python + pip: ferrotune==<version> (or ferrotune_requirement)
      python_env.yaml     the same for MLflow's virtualenv manager
      requirements.txt
      score.py            Azure ML scoring script (init / run), see ferrotune.scoring
      ferrotune.json      ferrotune's metadata: source, base model, train summary,
                          generation defaults, context length, serving limits
      data/model/         config.json, generation_config.json, *.safetensors (+ index)
      data/tokenizer/     tokenizer.json, tokenizer_config.json, special_tokens_map.json,
                          chat_template.jinja / tokenizer.model ... where present

Weights are hard-linked when the source is on the same file system (no copy, no extra
disk), copied otherwise. The folder is built under a hidden temporary name beside
``out_dir`` and renamed into place when complete: an error or Ctrl-C leaves nothing under
the final name.

MLflow is not needed to write the folder (the YAML is written here); ``mlflow.pyfunc.
load_model(OUT)`` and ``mlflow.models.Model.load(OUT / "MLmodel")`` read it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .exceptions import FerrotuneFileNotFoundError, FerrotuneIOError, InvalidArgumentError, ModelError

__all__ = ["package_model", "MLFLOW_FORMAT_VERSION", "LOADER_MODULE", "METADATA_FILE"]

PathLike = Union[str, "os.PathLike[str]"]

#: the MLflow release whose MLmodel format the folder follows (written as ``mlflow_version``;
#: the tests load the folder with it)
MLFLOW_FORMAT_VERSION = "3.17.2"
#: the python_function flavor's loader
LOADER_MODULE = "ferrotune.mlflow_pyfunc"
#: ferrotune's own metadata file in the folder
METADATA_FILE = "ferrotune.json"

_MODEL_FILES = ("config.json", "generation_config.json")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
)
_INDEX = "model.safetensors.index.json"

#: signature params: name → MLflow type; defaults are null so that MLflow does not fill in
#: values the request did not set (ferrotune applies the model's own defaults)
_PARAM_TYPES = (
    ("max_new_tokens", "long"),
    ("do_sample", "boolean"),
    ("temperature", "double"),
    ("top_p", "double"),
    ("top_k", "long"),
    ("repetition_penalty", "double"),
    ("seed", "long"),
    ("return_full_text", "boolean"),
)


# ---------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------


@dataclass
class _Source:
    kind: str  # "finetune-output" | "model-folder" | "mlflow-folder"
    root: Path
    model_dir: Path
    tokenizer_dir: Path
    train_summary: Optional[dict] = None
    base_model: Optional[str] = None
    previous_meta: dict = field(default_factory=dict)


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise FerrotuneIOError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ModelError(f"{path} is not valid JSON ({what}): {e}") from None


def _maybe_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        obj = _read_json(path, path.name)
    except (ModelError, FerrotuneIOError):
        return None
    return obj if isinstance(obj, dict) else None


def _adapter_base(adapter_dir: Path) -> Optional[str]:
    cfg = _maybe_json(adapter_dir / "adapter_config.json")
    base = cfg.get("base_model_name_or_path") if cfg else None
    return base if isinstance(base, str) and base else None


def _listing(p: Path, n: int = 12) -> str:
    try:
        names = sorted(x.name + ("/" if x.is_dir() else "") for x in p.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "(empty)"
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _adapter_only_error(where: Path, adapter_dir: Path) -> ModelError:
    base = _adapter_base(adapter_dir)
    on = f" on {base!r}" if base else ""
    return ModelError(
        f"{where} holds only a LoRA adapter ({adapter_dir}){on}, no merged model. An MLflow model folder needs "
        "the full weights, and merging needs the base model: train with merge_lora_weights=true (the default; "
        "finetune then writes OUTPUT_DIR/merged/), or pass a merged model folder."
    )


def _resolve_source(trained_dir: PathLike) -> _Source:
    p = Path(os.fspath(trained_dir)).expanduser()
    if not p.exists():
        raise FerrotuneFileNotFoundError(f"{p} does not exist (expected a fine-tuning output folder or a model folder)")
    if not p.is_dir():
        raise InvalidArgumentError(f"{p} is a file; expected a fine-tuning output folder or a model folder")
    p = p.resolve()
    if (p / "MLmodel").is_file() or (p / "data" / "model" / "config.json").is_file():
        model_dir = p / "data" / "model"
        if not model_dir.is_dir():
            raise ModelError(f"{p} has an MLmodel file but no data/model/ folder with the weights")
        tok = p / "data" / "tokenizer"
        prev = _maybe_json(p / METADATA_FILE) or {}
        return _Source(
            "mlflow-folder",
            p,
            model_dir,
            tok if tok.is_dir() else model_dir,
            train_summary=prev.get("train_summary") if isinstance(prev.get("train_summary"), dict) else None,
            base_model=prev.get("base_model") if isinstance(prev.get("base_model"), str) else None,
            previous_meta=prev,
        )
    if (p / "config.json").is_file():
        summary = base = None
        # the merged/ folder of a fine-tuning run: take the run's summary along
        if p.name == "merged" and (p.parent / "train_summary.json").is_file():
            summary = _maybe_json(p.parent / "train_summary.json")
            base = _adapter_base(p.parent / "adapter")
        return _Source("model-folder", p, p, p, train_summary=summary, base_model=base)
    if (p / "merged").is_dir():
        merged = p / "merged"
        if not (merged / "config.json").is_file():
            raise ModelError(f"{merged} has no config.json (an interrupted fine-tuning run?): {_listing(merged)}")
        return _Source(
            "finetune-output",
            p,
            merged,
            merged,
            train_summary=_maybe_json(p / "train_summary.json"),
            base_model=_adapter_base(p / "adapter"),
        )
    if (p / "adapter" / "adapter_config.json").is_file():
        raise _adapter_only_error(p, p / "adapter")
    if (p / "adapter_config.json").is_file():
        raise _adapter_only_error(p, p)
    raise ModelError(
        f"{p} is not a fine-tuning output folder (merged/), a model folder (config.json + *.safetensors) or an "
        f"MLflow model folder (MLmodel + data/model/); it holds: {_listing(p)}"
    )


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte length + JSON), checked for plausibility
    without reading the tensors."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > min(size - 8, 100 * 1024 * 1024):
                raise ModelError(f"{path} is not a safetensors file (header length {n}, file size {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise FerrotuneFileNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        raise FerrotuneIOError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError:
        raise ModelError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (its header is not a JSON object)")
    return header


def _weight_files(model_dir: Path) -> list:
    """The safetensors files to package (the index's shards, or every ``*.safetensors``)."""
    index = model_dir / _INDEX
    if index.is_file():
        obj = _read_json(index, "the safetensors index")
        wmap = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise ModelError(f"{index} has no weight_map")
        names = sorted(set(str(v) for v in wmap.values()))
        for name in names:
            if "/" in name or "\\" in name or name.startswith("."):
                raise ModelError(f"{index} names an unsafe shard path {name!r}")
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise ModelError(f"{model_dir} is missing safetensors shards listed in {_INDEX}: {', '.join(missing)}")
        return [model_dir / n for n in names]
    files = sorted(x for x in model_dir.glob("*.safetensors") if x.is_file())
    if files:
        return files
    torch_files = sorted(x.name for x in model_dir.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = (
        f" It has PyTorch weights ({', '.join(torch_files[:3])}); save them as safetensors first "
        "(model.save_pretrained(folder, safe_serialization=True))."
        if torch_files
        else ""
    )
    raise ModelError(f"{model_dir} has no *.safetensors weights; ferrotune packages safetensors only.{hint}")


def _check_model(src: _Source) -> tuple:
    """(model files, tokenizer files) to place, after checking that they make a usable model."""
    cfg_path = src.model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{src.model_dir} has no config.json")
    cfg = _read_json(cfg_path, "the model config")
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_path} is not a JSON object")
    weights = _weight_files(src.model_dir)
    for w in weights:
        read_safetensors_header(w)
    model_files = [src.model_dir / n for n in _MODEL_FILES if (src.model_dir / n).is_file()]
    if (src.model_dir / _INDEX).is_file():
        model_files.append(src.model_dir / _INDEX)
    model_files += weights

    tok_dir = src.tokenizer_dir
    tok_files = [tok_dir / n for n in _TOKENIZER_FILES if (tok_dir / n).is_file()]
    names = {f.name for f in tok_files}
    if not names & {"tokenizer.json", "tokenizer.model"}:
        raise ModelError(f"{tok_dir} has no tokenizer (tokenizer.json or tokenizer.model)")
    has_template = "chat_template.jinja" in names or "chat_template.json" in names
    if not has_template and "tokenizer_config.json" in names:
        tcfg = _maybe_json(tok_dir / "tokenizer_config.json") or {}
        has_template = bool(tcfg.get("chat_template"))
    if not has_template:
        raise ModelError(
            f"{tok_dir} has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); "
            "the scoring endpoint renders conversations with it"
        )
    return model_files, tok_files, cfg


def _check_requirement(req: Optional[str]) -> str:
    from . import _core

    if req is None:
        return f"ferrotune=={_core.__version__}"
    if not isinstance(req, str) or not req.strip():
        raise InvalidArgumentError(
            f"ferrotune_requirement must be a non-empty string (e.g. 'ferrotune==1.2.0' or a wheel URL), not {req!r}"
        )
    req = req.strip()
    if "\n" in req or "\r" in req:
        raise InvalidArgumentError("ferrotune_requirement must be one requirement on one line")
    return req


# ---------------------------------------------------------------------------------------
# YAML (the few shapes MLmodel / conda.yaml / python_env.yaml need)
# ---------------------------------------------------------------------------------------
# Written here rather than with PyYAML so that ferrotune's runtime dependencies stay tqdm +
# numpy (a deployment image installs ferrotune alone); the tests read every file back with
# yaml.safe_load and MLflow's own readers.

_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "none", "~"}


def _yaml_scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    s = str(v)
    plain = (
        s
        and (s[0].isalpha() or s[0] == "_")
        and all(c.isalnum() or c in "_.-/" for c in s)
        and s.isascii()
        and s.lower() not in _YAML_WORDS
    )
    return s if plain else json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def _yaml_lines(v: Any, indent: int) -> list:
    pad = " " * indent
    out: list = []
    if isinstance(v, dict):
        for k, x in v.items():
            if isinstance(x, (dict, list)) and x:
                out.append(f"{pad}{_yaml_scalar(k)}:")
                out += _yaml_lines(x, indent + (2 if isinstance(x, dict) else 0))
            else:
                out.append(f"{pad}{_yaml_scalar(k)}: {_yaml_inline(x)}")
    elif isinstance(v, list):
        for x in v:
            if isinstance(x, dict) and x:
                sub = _yaml_lines(x, indent + 2)
                out.append(f"{pad}- {sub[0].lstrip()}")
                out += sub[1:]
            elif isinstance(x, list) and x:
                out.append(f"{pad}-")
                out += _yaml_lines(x, indent + 2)
            else:
                out.append(f"{pad}- {_yaml_inline(x)}")
    return out


def _yaml_inline(x: Any) -> str:
    if isinstance(x, dict):
        return "{}"
    if isinstance(x, list):
        return "[]"
    return _yaml_scalar(x)


def to_yaml(obj: dict) -> str:
    """Block YAML for dicts / lists / str / int / float / bool / None (readable by PyYAML's
    safe loader, as MLflow reads MLmodel)."""
    return "\n".join(_yaml_lines(obj, 0)) + "\n"


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def _python_version() -> str:
    v = sys.version_info
    return f"{v.major}.{v.minor}.{v.micro}"


def _signature_params() -> str:
    return json.dumps([{"name": n, "default": None, "shape": None, "type": t} for n, t in _PARAM_TYPES])


def _mlmodel(meta: dict, size: int) -> dict:
    return {
        "flavors": {
            "python_function": {
                "code": None,
                "data": "data",
                "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
                "loader_module": LOADER_MODULE,
                "python_version": _python_version(),
                "ferrotune_version": meta["ferrotune_version"],
            }
        },
        "metadata": {
            "ferrotune_version": meta["ferrotune_version"],
            "task": "chat-completion",
            "base_model": meta["base_model"],
            "model_type": meta["model"].get("model_type"),
            "ferrotune_metadata": METADATA_FILE,
        },
        "mlflow_version": MLFLOW_FORMAT_VERSION,
        "model_size_bytes": size,
        "model_uuid": uuid.uuid4().hex,
        "signature": {"inputs": None, "outputs": None, "params": _signature_params()},
        "utc_time_created": datetime.now(timezone.utc).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f"),
    }


def _conda(req: str) -> dict:
    return {
        "channels": ["conda-forge"],
        "dependencies": [f"python={_python_version()}", "pip", {"pip": [req]}],
        "name": "mlflow-env",
    }


def _python_env() -> dict:
    return {
        "python": _python_version(),
        "build_dependencies": ["pip", "setuptools", "wheel"],
        "dependencies": ["-r requirements.txt"],
    }


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _place(src: Path, dst: Path, advance: Callable[[int], None], link: bool) -> None:
    """Hard-links ``src`` to ``dst`` (same file system) or copies it, reporting bytes."""
    real = src.resolve()  # Hub cache snapshots are symlinks to blobs
    if link:
        try:
            os.link(real, dst)
            advance(real.stat().st_size)
            return
        except OSError:
            pass
    with open(real, "rb") as fi, open(dst, "wb") as fo:
        while True:
            chunk = fi.read(8 << 20)
            if not chunk:
                break
            fo.write(chunk)
            advance(len(chunk))
    shutil.copymode(real, dst)


def _score_script() -> str:
    from importlib import resources

    return resources.files("ferrotune._serving").joinpath("score.py").read_text(encoding="utf-8")


def _is_replaceable(out: Path) -> bool:
    """An existing out_dir that overwrite=True may delete: a packaged/MLflow folder or an
    empty folder (never an arbitrary folder given by mistake)."""
    if not out.is_dir() or out.is_symlink():
        return False
    try:
        names = {x.name for x in out.iterdir()}
    except OSError:
        return False
    return not names or "MLmodel" in names


def _within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _renderer(progress: Any) -> Optional[Callable]:
    from ._progress import make_renderer

    try:
        return make_renderer(progress)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None


def package_model(
    trained_dir: PathLike,
    out_dir: PathLike,
    *,
    ferrotune_requirement: Optional[str] = None,
    overwrite: bool = False,
    progress: Any = True,
) -> Path:
    """Writes an MLflow model folder (see the module docstring) for the model in
    ``trained_dir``, ready for ``Model(path=out_dir, type=AssetTypes.MLFLOW_MODEL)``,
    ``mlflow.pyfunc.load_model(out_dir)``, :class:`ferrotune.Generator` and the Azure ML
    inference server (``score.py``).

    Args:
        trained_dir: a :func:`ferrotune.finetune` output folder (its ``merged/`` model is
            packaged, with ``train_summary.json``), a merged Hugging Face model folder
            (config.json + safetensors + tokenizer files), or an MLflow model folder
            (``MLmodel`` + ``data/model/``; repackaged, e.g. to change the requirement).
        out_dir: the folder to write; its parent is created if needed.
        ferrotune_requirement: the pip requirement that installs ferrotune where the model
            is served: default ``ferrotune==<this version>``; e.g. a wheel path or URL.
        overwrite: replace an existing ``out_dir`` — only an empty folder or an MLflow
            model folder (one with ``MLmodel``) is ever replaced.
        progress: ``True`` (bars / log lines), ``False``, ``"bar"``, ``"lines"`` or a
            callable ``(kind, task_id, name, total, n, unit)``.

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        ModelError: not a usable model: only a LoRA adapter (no ``merged/``), no
            ``*.safetensors``, a missing shard, no tokenizer or chat template.
        FerrotuneFileNotFoundError: ``trained_dir`` does not exist.
        InvalidArgumentError: ``out_dir`` exists (without ``overwrite``, or is not an
            MLflow folder), ``out_dir`` would contain the source, a bad requirement.
        FerrotuneIOError: a file-system error while writing.
    """
    renderer = _renderer(progress)
    req = _check_requirement(ferrotune_requirement)
    src = _resolve_source(trained_dir)
    out = Path(os.fspath(out_dir)).expanduser().absolute()
    out = out.parent.resolve() / out.name if out.parent.exists() else out
    if not out.name or out.name in (".", ".."):
        raise InvalidArgumentError(f"out_dir {os.fspath(out_dir)!r} must name a folder")

    in_place = src.kind == "mlflow-folder" and out.exists() and out.resolve() == src.root
    if not in_place and (_within(src.model_dir, out) or _within(src.tokenizer_dir, out)):
        raise InvalidArgumentError(
            f"out_dir {out} contains the model being packaged ({src.model_dir}); choose another folder"
        )
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InvalidArgumentError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
        if not _is_replaceable(out):
            raise InvalidArgumentError(
                f"{out} exists and is not an MLflow model folder (no MLmodel file) or an empty folder; "
                "refusing to replace it — remove it yourself or choose another out_dir"
            )

    model_files, tok_files, cfg = _check_model(src)
    from . import _core

    version = _core.__version__
    say = (lambda text: renderer("message", 0, text, None, 0, "")) if renderer is not None else (lambda text: None)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FerrotuneIOError(f"cannot create {out.parent}: {e.strerror or e}") from None
    tmp = out.parent / f".{out.name}.ferrotune-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    try:
        (tmp / "data" / "model").mkdir(parents=True)
        (tmp / "data" / "tokenizer").mkdir()
        total = sum(f.resolve().stat().st_size for f in model_files + tok_files)
        task = 1
        if renderer is not None:
            renderer("start", task, f"packaging {out.name}", total, 0, "B")
        advance = (lambda n: renderer("advance", task, "", None, n, "B")) if renderer is not None else (lambda n: None)
        for f in model_files:
            _place(f, tmp / "data" / "model" / f.name, advance, link=f.suffix == ".safetensors")
        for f in tok_files:
            _place(f, tmp / "data" / "tokenizer" / f.name, advance, link=False)
        if renderer is not None:
            renderer("finish", task, "", None, 0, "B")

        from .scoring import Limits, generation_defaults

        max_context = cfg.get("max_position_embeddings")
        meta = {
            "format": 1,
            "ferrotune_version": version,
            "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "task": "chat-completion",
            "source": {"kind": src.kind, "path": str(src.root)},
            "base_model": src.base_model,
            "model": {
                "model_type": cfg.get("model_type"),
                "architectures": cfg.get("architectures"),
                "max_context": max_context if isinstance(max_context, int) else None,
                "weights": [f.name for f in model_files if f.suffix == ".safetensors"],
            },
            "generation_defaults": generation_defaults(tmp),
            "serving_limits": {
                **Limits().to_dict(),
                "env": dict(Limits.ENV),
                "note": "defaults; the environment variables override them when score.py loads",
            },
            "request_example": {
                "input_data": {
                    "input_string": [[{"role": "user", "content": "What is the capital of France?"}]],
                    "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200},
                },
                "params": {},
            },
            "requirement": req,
            "train_summary": src.train_summary,
        }
        _write_text(tmp / METADATA_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        _write_text(tmp / "score.py", _score_script())
        _write_text(tmp / "requirements.txt", req + "\n")
        _write_text(tmp / "conda.yaml", to_yaml(_conda(req)))
        _write_text(tmp / "python_env.yaml", to_yaml(_python_env()))
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        _write_text(tmp / "MLmodel", to_yaml(_mlmodel(meta, size)))
        _swap_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, FerrotuneIOError):
            raise FerrotuneIOError(f"packaging into {out} failed: {e}") from e
        raise
    say(f"packaged {src.model_dir} into {out} ({time.monotonic() - t0:.1f} s)")
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Renames the finished folder to ``out``; an existing ``out`` is moved aside first and
    deleted only once the new folder is in place (restored if the rename fails)."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.ferrotune-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
