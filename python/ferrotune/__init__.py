"""ferrotune: fine-tune Phi-3 on ultrachat with Azure ML, fast and dependably.

The heavy lifting is in the native module ``ferrotune._core`` (Rust); this package is its
Python face.
"""

from __future__ import annotations

import os as _os
import sys as _sys


def _nvidia_lib_dirs() -> str:
    """The folders where pip's NVIDIA wheels keep their libraries (``nvidia/*/lib`` under every
    ``sys.path`` entry): where a CUDA build of ferrotune looks for cuBLAS and NCCL, also when
    they were installed in another site-packages than ferrotune (a ``--system-site-packages``
    virtualenv, a ``--target`` folder). A few ``stat`` calls; nothing is loaded here."""
    found = []
    for entry in _sys.path:
        root = _os.path.join(entry or ".", "nvidia")
        if not _os.path.isdir(root):
            continue
        for sub in sorted(_os.listdir(root)):
            lib = _os.path.join(root, sub, "lib")
            if _os.path.isdir(lib) and lib not in found:
                found.append(lib)
    return _os.pathsep.join(found)


if "FERROTUNE_CUDA_LIB_DIRS" not in _os.environ:
    _dirs = _nvidia_lib_dirs()
    if _dirs:
        _os.environ["FERROTUNE_CUDA_LIB_DIRS"] = _dirs

from . import _core  # noqa: E402
from ._download import SplitDownload  # noqa: E402, download_dataset, hub_download, split_names
from ._tokenize import ChatTokenizer, TokenizedDataset, TokenizeStats, load_tokenized, tokenize_dataset
from .exceptions import *  # noqa: F401,F403
from .exceptions import __all__ as _exc_all
from .finetune import FinetuneResult, finetune  # the function; the module stays in sys.modules
from ._core import LoraModel, create_random_model, cuda_available
from ._generate import Completion, Generator
from .packaging import package_model

__version__: str = _core.__version__

__all__ = [
    "__version__",
    "download_dataset",
    "split_names",
    "hub_download",
    "SplitDownload",
    "ChatTokenizer",
    "tokenize_dataset",
    "TokenizeStats",
    "load_tokenized",
    "TokenizedDataset",
    "finetune",
    "FinetuneResult",
    "LoraModel",
    "create_random_model",
    "cuda_available",
    "Generator",
    "Completion",
    "package_model",
    *_exc_all,
]
