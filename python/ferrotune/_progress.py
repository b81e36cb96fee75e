"""Renders the core's progress events: tqdm bars (``tqdm.auto``: widgets in Jupyter,
text bars in a terminal), plain log lines when stderr is not a terminal (Azure ML job
logs), or nothing.

The native module calls a renderer as ``renderer(kind, task_id, name, total, n, unit)``:
``kind`` is ``start`` (a task ``name`` with ``total`` ``unit``s — ``"B"`` or ``"rows"`` —
if known), ``advance`` (``n`` more done), ``finish`` or ``message`` (the text in ``name``).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional

ProgressCallback = Callable[[str, int, str, Optional[int], int, str], None]


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython  # type: ignore[import-not-found]

        shell = get_ipython()
        return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"
    except Exception:
        return False


def _has_widgets() -> bool:
    try:
        import ipywidgets  # type: ignore[import-not-found]  # noqa: F401

        return True
    except ImportError:
        return False


class TqdmRenderer:
    """One tqdm bar per running task."""

    def __init__(self) -> None:
        if _in_notebook() and not _has_widgets():
            # tqdm.auto would warn ("IProgress not found") and print a line per update
            from tqdm.std import tqdm
        else:
            from tqdm.auto import tqdm

        self._tqdm = tqdm
        self._bars: dict[int, Any] = {}

    def __call__(self, kind: str, task_id: int, name: str, total: Optional[int], n: int, unit: str = "") -> None:
        if kind == "start":
            scale = unit == "B"
            self._bars[task_id] = self._tqdm(
                total=total, desc=name, unit=unit or "it", unit_scale=scale, unit_divisor=1024 if scale else 1000, leave=True
            )
        elif kind == "advance":
            bar = self._bars.get(task_id)
            if bar is not None:
                bar.update(n)
        elif kind == "finish":
            bar = self._bars.pop(task_id, None)
            if bar is not None:
                bar.close()
        elif kind == "message":
            self._tqdm.write(name, file=sys.stderr)


class LineRenderer:
    """Plain lines for logs: start, every ~10 s of progress, and finish."""

    def __init__(self, stream: Any = None, every_s: float = 10.0) -> None:
        self._stream = stream or sys.stderr
        self._every = every_s
        self._tasks: dict[int, list[Any]] = {}

    def _say(self, text: str) -> None:
        print(f"[ferrotune] {text}", file=self._stream, flush=True)

    @staticmethod
    def _amount(n: int, unit: str) -> str:
        return f"{n / 1e6:,.1f} MB" if unit == "B" else f"{n:,} {unit}".rstrip()

    def __call__(self, kind: str, task_id: int, name: str, total: Optional[int], n: int, unit: str = "") -> None:
        if kind == "start":
            self._tasks[task_id] = [name, total, 0, time.monotonic(), unit]
            todo = f" ({self._amount(total, unit)} to do)" if total is not None else ""
            self._say(f"{name}: started{todo}")
        elif kind == "advance":
            t = self._tasks.get(task_id)
            if t is None:
                return
            t[2] += n
            now = time.monotonic()
            if now - t[3] >= self._every:
                t[3] = now
                pct = f" ({100 * t[2] / t[1]:.0f}%)" if t[1] else ""
                self._say(f"{t[0]}: {self._amount(t[2], t[4])}{pct}")
        elif kind == "finish":
            t = self._tasks.pop(task_id, None)
            if t is not None:
                self._say(f"{t[0]}: done ({self._amount(t[2], t[4])})")
        elif kind == "message":
            self._say(name)


def make_renderer(progress: Any) -> Optional[ProgressCallback]:
    """``True`` → bars in notebooks/terminals, lines in logs; ``False``/``None`` → silent;
    ``"bar"`` / ``"lines"`` force one; ``"auto"`` is ``True``; a callable is used as is."""
    if progress == "auto":
        progress = True
    if progress is None or progress is False:
        return None
    if callable(progress):
        return progress
    if progress not in (True, "bar", "lines"):
        raise ValueError(f"progress must be True, False, 'auto', 'bar', 'lines' or a callable, not {progress!r}")
    if progress == "lines":
        return LineRenderer()
    if progress == "bar" or _in_notebook() or sys.stderr.isatty():
        try:
            return TqdmRenderer()
        except ImportError:
            return LineRenderer()
    return LineRenderer()
