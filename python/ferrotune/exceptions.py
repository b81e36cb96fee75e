"""ferrotune's exceptions: one class per kind of failure, all under :class:`FerrotuneError`.

Classes also derive from the built-in a user would catch anyway (``ValueError`` for bad
arguments, ``OSError`` subclasses for file-system problems, ``ConnectionError`` for network
failures), so existing ``except`` clauses keep working.

One class stands apart: :class:`TrainingInterrupted` is not an error but a request to stop
(SIGTERM), so it is a ``SystemExit`` and no ``except Exception`` swallows it.
"""

from __future__ import annotations

__all__ = [
    "FerrotuneError",
    "InvalidArgumentError",
    "HubError",
    "RepositoryNotFoundError",
    "GatedRepoError",
    "RevisionNotFoundError",
    "EntryNotFoundError",
    "InvalidTokenError",
    "OfflineNotCachedError",
    "HubHTTPError",
    "IntegrityError",
    "ProtocolError",
    "DatasetError",
    "DataFormatError",
    "ConversationError",
    "ChatTemplateError",
    "ModelError",
    "TrainingError",
    "ComputeError",
    "OutOfMemoryError",
    "GpuUnavailableError",
    "FerrotuneIOError",
    "FerrotuneFileNotFoundError",
    "FerrotunePermissionError",
    "MissingDependencyError",
    "TrainingInterrupted",
]


class FerrotuneError(Exception):
    """Base class of every error ferrotune raises on purpose."""


class InvalidArgumentError(FerrotuneError, ValueError):
    """An argument is out of range or malformed."""


class HubError(FerrotuneError):
    """A problem talking to the Hugging Face Hub."""


class RepositoryNotFoundError(HubError):
    """The repository does not exist, or is private and no valid token was given."""


class GatedRepoError(HubError):
    """The repository is gated and the token has not been granted access."""


class RevisionNotFoundError(HubError):
    """The branch, tag or commit does not exist."""


class EntryNotFoundError(HubError):
    """The file does not exist at that revision."""


class InvalidTokenError(HubError):
    """The Hub rejected the token."""


class OfflineNotCachedError(HubError, FileNotFoundError):
    """Offline (``HF_HUB_OFFLINE``) or unreachable Hub, and the file is not cached."""


class HubHTTPError(HubError, ConnectionError):
    """A network or HTTP failure that retries did not cure."""


class IntegrityError(HubError):
    """Downloaded bytes do not match the size or checksum the Hub announced."""


class ProtocolError(HubError):
    """The server sent something unsafe or malformed (path traversal, bad ETag)."""


class DatasetError(FerrotuneError):
    """The dataset has no such split or subset, or its layout is not understood."""


class DataFormatError(DatasetError):
    """A data file is not in the expected format."""


class ConversationError(DatasetError, ValueError):
    """A conversation cannot be trained on (no assistant turn, unknown role, ...) and
    ``strict=True`` was asked; the message names the file and the row."""


class ChatTemplateError(FerrotuneError, ValueError):
    """The tokenizer's chat template does not compile, or fails on the conversations."""


class ModelError(FerrotuneError):
    """Model files that cannot be used: missing or corrupt weights, a config.json that does
    not match the weights, an architecture ferrotune does not train, a bad adapter."""


class TrainingError(FerrotuneError):
    """Training cannot go on: a NaN/inf loss, no trainable tokens, an unusable checkpoint."""


class ComputeError(FerrotuneError):
    """A tensor computation failed."""


class OutOfMemoryError(ComputeError, MemoryError):
    """The GPU ran out of memory; the message says how much was asked and what to lower."""


class GpuUnavailableError(FerrotuneError, RuntimeError):
    """No usable GPU: no NVIDIA driver, a driver too old, no such device, a GPU too old, a
    missing CUDA library (the message names the pip package), or a CPU-only build."""


class FerrotuneIOError(FerrotuneError, OSError):
    """A local file-system error."""


class FerrotuneFileNotFoundError(FerrotuneIOError, FileNotFoundError):
    """A local file or folder does not exist."""


class FerrotunePermissionError(FerrotuneIOError, PermissionError):
    """Not allowed to read or write a local path."""


class MissingDependencyError(FerrotuneError, ImportError):
    """An optional package a feature needs is not installed; the message has the ``pip``
    command (e.g. matplotlib for ``FinetuneResult.plot()``)."""


class TrainingInterrupted(SystemExit):
    """:func:`ferrotune.finetune` stopped because the process was asked to terminate
    (SIGTERM: what Azure ML sends before it preempts or cancels a job), after saving a
    checkpoint of the last whole optimizer step.

    A ``SystemExit`` with exit status 143 (128 + SIGTERM), not a :class:`FerrotuneError`:
    left uncaught, a script or the ``ferrotune finetune`` command ends as a terminated
    process does (status 143, no traceback), and no ``except Exception`` swallows it.
    Run the same training again with ``resume_from_checkpoint=True`` (and the same
    ``checkpoint_dir``) to continue from :attr:`checkpoint`.
    """

    def __init__(self, message: str, *, checkpoint: "str | None" = None, step: "int | None" = None,
                 signal_number: int = 15) -> None:
        super().__init__(128 + signal_number)
        self.message = message
        #: the checkpoint folder to resume from, or ``None`` (stopped before the first step)
        self.checkpoint = checkpoint
        #: the optimizer step that checkpoint holds
        self.step = step
        self.signal_number = signal_number

    def __str__(self) -> str:
        return self.message
