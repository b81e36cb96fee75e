"""The Python face of the dataset downloader (the work happens in ``ferrotune._core``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

from . import _core
from ._progress import make_renderer
from .exceptions import InvalidArgumentError

__all__ = ["SplitDownload", "download_dataset", "split_names", "hub_download"]


@dataclass(frozen=True)
class SplitDownload:
    """One split written by :func:`download_dataset`."""

    split: str
    #: rows written (the first ``split_pc`` % of the split)
    rows: int
    #: rows in the whole split on the Hub
    total_rows: int
    #: written files by format, e.g. ``{"jsonl": ".../train_sft.jsonl"}``
    paths: dict = field(default_factory=dict)
    #: bytes fetched over the network for this split's rows (0 when read from the cache)
    bytes_fetched: int = 0

    @property
    def path(self) -> str:
        """The JSON Lines file if one was written, else the Parquet file."""
        return self.paths.get("jsonl") or next(iter(self.paths.values()))


def _pc_text(split_pc: Any) -> str:
    if isinstance(split_pc, bool) or not isinstance(split_pc, (int, float, str)):
        raise InvalidArgumentError(
            f"split_pc must be a number between 0 (exclusive) and 100, e.g. 5; got {split_pc!r}"
        )
    return str(split_pc)


def _formats(format: Union[str, Sequence[str]]) -> list:
    if isinstance(format, str):
        fmts = ["jsonl", "parquet"] if format == "both" else [format]
    else:
        fmts = list(format)
    return fmts


def download_dataset(
    dataset: str,
    download_dir: Union[str, os.PathLike],
    split_pc: Union[int, float, str] = 5,
    subset: Optional[str] = None,
    splits: Optional[Iterable[str]] = None,
    revision: str = "main",
    format: Union[str, Sequence[str]] = "jsonl",
    token: Optional[str] = None,
    progress: Any = True,
    full_download: bool = False,
) -> dict:
    """Download the first ``split_pc`` % of every split of a Hub dataset.

    Writes ``{download_dir}/{split}.jsonl`` byte for byte as the Azure ML notebook's
    ``download-dataset.py`` does (and/or ``{split}.parquet``), each file appearing under its
    final name only once complete.

    Shards already in the Hugging Face cache are read from disk. Otherwise only the
    Parquet footers and the row groups holding the requested rows are fetched with HTTP
    Range requests (nothing is added to the cache); pass ``full_download=True`` to download
    whole shards into the cache instead, like ``datasets`` does.

    Args:
        dataset: Hub dataset id, e.g. ``"HuggingFaceH4/ultrachat_200k"``.
        download_dir: output folder (created if missing).
        split_pc: percentage of each split's rows to keep, ``0 < split_pc <= 100``.
            Integers give exactly the original script's row counts; fractions are allowed.
        subset: dataset config name (``--dataset_subset``).
        splits: only these splits (default: all of them, like the original script).
        revision: branch, tag or commit.
        format: ``"jsonl"``, ``"parquet"``, ``"both"`` or a list.
        token: Hub token (default: ``HF_TOKEN`` or the saved token file).
        progress: ``True`` (bars in notebooks, lines in logs), ``False``, ``"bar"``,
            ``"lines"`` or a callable.
        full_download: download whole shards into the HF cache.

    Returns:
        ``{split: SplitDownload}`` in the dataset's split order.
    """
    out = _core.download_dataset(
        str(dataset),
        os.fspath(download_dir),
        _pc_text(split_pc),
        subset=subset,
        splits=list(splits) if splits is not None else None,
        revision=revision,
        formats=_formats(format),
        token=token,
        full_download=bool(full_download),
        progress=make_renderer(progress),
    )
    result = {}
    for item in out:
        paths = {}
        for p in item["paths"]:
            paths["jsonl" if p.endswith(".jsonl") else "parquet"] = p
        result[item["split"]] = SplitDownload(
            split=item["split"],
            rows=item["rows"],
            total_rows=item["total_rows"],
            paths=paths,
            bytes_fetched=item["bytes_fetched"],
        )
    return result


def split_names(dataset: str, subset: Optional[str] = None, revision: str = "main", token: Optional[str] = None) -> list:
    """The split names of a Hub dataset, as ``datasets.get_dataset_split_names`` reports."""
    return _core.split_names(dataset, subset=subset, revision=revision, token=token)


def hub_download(
    repo_id: str,
    filename: str,
    repo_type: str = "model",
    revision: str = "main",
    token: Optional[str] = None,
    progress: Any = False,
) -> str:
    """Download one file into the shared Hugging Face cache and return its local path
    (the same cache and layout as ``huggingface_hub.hf_hub_download``)."""
    return _core.hub_download(
        repo_id, filename, repo_type=repo_type, revision=revision, token=token, progress=make_renderer(progress)
    )
