"""Test material for ferrotune.azureml: packaged model folders with header-only (sparse)
safetensors files, and a YAML round trip through the SDK's own loaders.

Imports only the standard library at module level, so it works in the main test
environment (sizing tests) and in the azure-ai-ml side venv (entity round trips).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

#: Phi-3-mini-4k-instruct's parameter count (config: 32 layers, hidden 3072, vocab 32064)
PHI3_MINI_PARAMS = 3_821_079_552

_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "U8": 1}


def write_safetensors(path: Path, tensors: dict) -> int:
    """A safetensors file whose header declares ``tensors`` (name → (dtype, shape)) and
    whose data region is a hole (``truncate``): the right size, no bytes on disk.
    Returns the file size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = _BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def packaged_model(folder: Path, parameters: int = PHI3_MINI_PARAMS, dtype: str = "BF16", shards: int = 2) -> Path:
    """A folder shaped like ``ferrotune package`` output (MLmodel, conda.yaml,
    requirements.txt, score.py, data/model/*.safetensors, data/tokenizer/) whose weights
    declare ``parameters`` parameters of ``dtype`` (plus a small int64 buffer)."""
    folder = Path(folder)
    (folder / "data" / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "MLmodel").write_text(
        "flavors:\n  python_function:\n    loader_module: ferrotune.mlflow_model\n    data: data\n"
    )
    (folder / "conda.yaml").write_text("dependencies:\n- python=3.11\n- pip:\n  - ferrotune\n")
    (folder / "requirements.txt").write_text("ferrotune\n")
    (folder / "score.py").write_text("def init():\n    pass\n\n\ndef run(raw):\n    return {'output': raw}\n")
    (folder / "data" / "tokenizer" / "tokenizer.json").write_text("{}")
    per = parameters // shards
    for i in range(shards):
        n = per if i < shards - 1 else parameters - per * (shards - 1)
        tensors = {f"model.layers.{i}.weight": (dtype, (n,))}
        if i == 0:
            tensors["model.position_ids"] = ("I64", (4096,))
        write_safetensors(folder / "data" / "model" / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", tensors)
    return folder


def dump_and_load(entity: Any, path: Path, loader: Callable[..., Any]) -> tuple[str, Any]:
    """``(yaml text, loaded entity)``: ``entity`` dumped to YAML and loaded back with the
    SDK's ``load_*`` function (schema validation included).

    Two SDK quirks: a command node is dumped through ``_to_job()``; online endpoints'
    ``dump`` ignores its destination and returns a dict (written here with PyYAML)."""
    import yaml

    if hasattr(entity, "_to_job"):
        entity = entity._to_job()
    path = Path(path)
    returned = entity.dump(path)
    if not path.exists():
        path.write_text(yaml.safe_dump(json.loads(json.dumps(returned))))
    return path.read_text(), loader(str(path))


def disk_usage(path: Path) -> int:
    """Bytes actually allocated on disk for ``path`` (sparse files: almost none)."""
    return os.stat(path).st_blocks * 512
