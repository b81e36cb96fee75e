"""How the command-line tools end on errors: ``error: ...`` and status 2 for a
:class:`FerrotuneError`, status 130 for Ctrl-C — never a traceback."""

from __future__ import annotations

import sys
from typing import Any, Callable

#: exit status for an error ferrotune reports
ERROR = 2
#: exit status after Ctrl-C (128 + SIGINT)
INTERRUPTED = 130


def call(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Runs ``fn()``; returns ``(result, 0)``, or ``(None, status)`` after printing why."""
    from .exceptions import FerrotuneError

    try:
        return fn(), 0
    except FerrotuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, ERROR
    except KeyboardInterrupt:
        print("interrupted; no partial file was left under a final name", file=sys.stderr)
        return None, INTERRUPTED
