"""The Python face of the chat tokenization path (the work happens in ``ferrotune._core``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from . import _core
from ._progress import make_renderer
from ._text import plural
from .exceptions import InvalidArgumentError

__all__ = ["ChatTokenizer", "TokenizeStats", "TokenizedDataset", "tokenize_dataset", "load_tokenized"]

#: A tokenizer and its chat template (see ``help(ferrotune.ChatTokenizer)``).
ChatTokenizer = _core.ChatTokenizer

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class TokenizeStats:
    """What :func:`tokenize_dataset` did."""

    #: rows read from the data files
    rows_in: int
    #: conversations kept
    rows_out: int
    #: rows in the output file (packed rows, or one per conversation with ``mode="pad"``)
    rows_written: int
    #: dropped rows by reason: empty, single_message, no_assistant, unknown_role,
    #: non_string_content, template_error, no_trainable_tokens
    dropped: dict = field(default_factory=dict)
    #: kept conversations cut to ``max_seq_length``
    truncated: int = 0
    total_tokens: int = 0
    #: tokens whose label is not -100
    trainable_tokens: int = 0
    #: real tokens / token slots (rows x max_seq_length when packing)
    packing_efficiency: float = 0.0
    #: conversation lengths (after truncation) in power-of-two buckets, e.g. ``"129-256"``
    length_histogram: dict = field(default_factory=dict)
    max_seq_length: int = 0
    output: str = ""

    def summary(self) -> str:
        dropped = ", ".join(f"{k} {v}" for k, v in self.dropped.items() if v) or "none"
        return (
            f"{plural(self.rows_in, 'row')} read, {plural(self.rows_out, 'conversation')} kept (dropped: {dropped}; "
            f"{self.truncated} truncated to {self.max_seq_length}); {plural(self.total_tokens, 'token')}, "
            f"{self.trainable_tokens} trainable; {plural(self.rows_written, 'row')} written, "
            f"{100 * self.packing_efficiency:.1f}% of token slots used -> {self.output}"
        )


def _count(name: str, value: Any, lo: int, optional: bool = True) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < lo:
        raise InvalidArgumentError(f"{name} must be an integer >= {lo}{' or None' if optional else ''}, got {value!r}")
    return int(value)


def _paths(data_files: Union[PathLike, Sequence[PathLike]]) -> list:
    if isinstance(data_files, (str, os.PathLike)):
        return [os.fspath(data_files)]
    return [os.fspath(p) for p in data_files]


def tokenize_dataset(
    tokenizer: Union["ChatTokenizer", PathLike],
    data_files: Union[PathLike, Sequence[PathLike]],
    output: PathLike,
    *,
    max_seq_length: Optional[int] = None,
    mode: str = "pack",
    train_on: str = "assistant",
    strict: bool = False,
    num_threads: Optional[int] = None,
    pack_window: int = 8192,
    revision: str = "main",
    token: Optional[str] = None,
    progress: Any = True,
) -> TokenizeStats:
    """Render, tokenize, label and pack conversations into training rows.

    Reads JSON Lines (``.jsonl``/``.json``: one object per line with a ``messages`` list of
    ``{"role", "content"}``) or Parquet (a ``messages`` column), renders each conversation
    with the tokenizer's chat template, and tokenizes it to exactly the ids
    ``transformers`` ``apply_chat_template(messages, tokenize=True)`` gives. Labels are
    ``-100`` except on the assistant turns (content, end-of-turn token, final EOS), or on
    everything with ``train_on="all"``. Conversations are cut on the right to
    ``max_seq_length``; with ``mode="pack"`` whole conversations are packed into rows of
    that length (best fit decreasing, within windows of ``pack_window`` conversations),
    with ``position_ids`` restarting at 0 per conversation; ``mode="pad"`` keeps one
    conversation per row.

    Rows that cannot be trained on are dropped and counted in ``stats.dropped`` by reason;
    ``strict=True`` raises :class:`ConversationError` naming the file and row instead.
    The output (``.parquet`` or ``.arrow``) appears under its name only when complete.

    Args:
        tokenizer: a :class:`ChatTokenizer`, a tokenizer folder, an Azure ML MLflow model
            folder or a Hub model repo id.
        data_files: one path or a list.
        output: ``.parquet`` or ``.arrow`` file to write.
        max_seq_length: default ``min(model_max_length, max_position_embeddings)``.
        mode: ``"pack"`` or ``"pad"``.
        train_on: ``"assistant"`` or ``"all"``.
        strict: raise on the first unusable row instead of counting it.
        num_threads: tokenizer threads (default: all cores). The output does not depend on it.
        pack_window: conversations packed together at a time (bounds memory).
        revision, token: for a Hub repo id.
        progress: ``True`` (bars in notebooks, lines in logs), ``False``, ``"bar"``,
            ``"lines"`` or a callable.

    Returns:
        :class:`TokenizeStats`.
    """
    out = _core.tokenize_dataset(
        tokenizer if isinstance(tokenizer, _core.ChatTokenizer) else os.fspath(tokenizer),
        _paths(data_files),
        os.fspath(output),
        max_seq_length=_count("max_seq_length", max_seq_length, 1),
        mode=mode,
        train_on=train_on,
        strict=bool(strict),
        num_threads=_count("num_threads", num_threads, 0),
        pack_window=_count("pack_window", pack_window, 1, optional=False),
        revision=revision,
        token=token,
        progress=make_renderer(progress),
    )
    return TokenizeStats(**out)


class TokenizedDataset:
    """A tokenized dataset read back into flat numpy arrays.

    ``input_ids``, ``labels`` and ``position_ids`` hold every row back to back (int32);
    row ``i`` is ``[row_offsets[i], row_offsets[i + 1])``. ``seq_lengths`` holds the
    conversation lengths of every row, row ``i``'s being
    ``[seq_offsets[i], seq_offsets[i + 1])``.
    """

    def __init__(self, arrays: dict) -> None:
        self.input_ids: np.ndarray = arrays["input_ids"]
        self.labels: np.ndarray = arrays["labels"]
        self.position_ids: np.ndarray = arrays["position_ids"]
        self.seq_lengths: np.ndarray = arrays["seq_lengths"]
        self.row_offsets: np.ndarray = arrays["row_offsets"]
        self.seq_offsets: np.ndarray = arrays["seq_offsets"]
        desc = arrays.get("description")
        #: how the file was made (tokenizer, mode, max_seq_length, ...)
        self.metadata: dict = json.loads(desc) if desc else {}

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        a, b = int(self.row_offsets[i]), int(self.row_offsets[i + 1])
        s, e = int(self.seq_offsets[i]), int(self.seq_offsets[i + 1])
        return {
            "input_ids": self.input_ids[a:b],
            "labels": self.labels[a:b],
            "position_ids": self.position_ids[a:b],
            "seq_lengths": self.seq_lengths[s:e],
        }

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"TokenizedDataset(rows={len(self)}, tokens={len(self.input_ids)})"


def load_tokenized(path: PathLike) -> TokenizedDataset:
    """Read a file written by :func:`tokenize_dataset` (Parquet or Arrow IPC)."""
    return TokenizedDataset(_core.load_tokenized(os.fspath(path)))
