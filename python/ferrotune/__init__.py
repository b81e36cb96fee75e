"""ferrotune: fine-tune Phi-3 on ultrachat with Azure ML, fast and dependably.

The heavy lifting is in the native module ``ferrotune._core`` (Rust); this package is its
Python face.
"""

from __future__ import annotations

from . import _core
from ._download import SplitDownload, download_dataset, hub_download, split_names
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
