"""Renders the core's progress events: tqdm bars (``tqdm.auto``: widgets in Jupyter,
text bars in a terminal), plain log lines when stderr is not a terminal (Azure ML job
logs), a live HTML table of training metrics in Jupyter (:class:`NotebookTrainingTable`),
or nothing.

The native module calls a renderer as ``renderer(kind, task_id, name, total, n, unit)``:
``kind`` is ``start`` (a task ``name`` with ``total`` ``unit``s — ``"B"``, ``"rows"`` or
``"steps"`` — if known), ``advance`` (``n`` more done), ``finish``, ``message`` (the text in
``name``) or ``metrics`` (training metrics as a JSON object in ``name``).
"""

from __future__ import annotations

import html
import json
import math
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


def format_duration(seconds: Optional[float]) -> str:
    """``"mm:ss"`` under an hour, ``"h:mm:ss"`` above (as HF Trainer's notebook display);
    ``""`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    t = int(round(seconds))
    h, rest = divmod(t, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _ipython_show(html_text: str) -> Any:
    """Displays ``html_text`` in the notebook; returns a handle whose ``update(html_text)``
    replaces it in place."""
    from IPython.display import HTML, display  # type: ignore[import-not-found]

    handle = display(HTML(html_text), display_id=True)

    class _Handle:
        def update(self, text: str) -> None:
            handle.update(HTML(text))

    return _Handle()


class NotebookTrainingTable:
    """Training in Jupyter as HF Trainer shows it: a progress bar and a table with one row
    per logged step — step, training loss, validation loss, learning rate, tokens/s and the
    ETA at that step — displayed once and updated in place (``display(...,
    display_id=True)`` then ``.update(...)``; plain HTML, no widgets).

    Events of other tasks (downloads, tokenizing) and messages go to ``other`` (tqdm bars
    by default). ``show(html) -> handle`` and ``clock`` are replaceable for tests.
    """

    #: at most this often (seconds) the bar is redrawn for progress alone; metrics redraw at once
    MIN_REDRAW_S = 0.5

    COLUMNS = ("Step", "Training Loss", "Validation Loss", "Learning Rate", "Tokens/s", "ETA")

    def __init__(
        self,
        other: Optional[ProgressCallback] = None,
        *,
        show: Callable[[str], Any] = _ipython_show,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._other = other
        self._show = show
        self._clock = clock
        self._handle: Any = None
        self._task: Optional[int] = None
        self.total: Optional[int] = None
        self.step = 0
        self._t0: Optional[float] = None
        self._since: Optional[tuple] = None  # (time, step) of the first progress report
        self._drawn_at = -math.inf
        self._done = False
        #: step -> {"loss", "eval_loss", "learning_rate", "tokens_per_second", "eta"}
        self.rows: dict[int, dict] = {}

    # -- the renderer protocol -----------------------------------------------------------

    def __call__(self, kind: str, task_id: int, name: str, total: Optional[int], n: int, unit: str = "") -> None:
        if kind == "start" and unit in ("steps", "step"):
            self._task, self.total, self._t0 = task_id, total, self._clock()
            self._draw(force=True)
        elif kind == "advance" and task_id == self._task and self._task is not None:
            self._advance(n)
        elif kind == "finish" and task_id == self._task and self._task is not None:
            self._done = True
            self._draw(force=True)
            self._task = None
        elif kind == "metrics":
            self.add_metrics(json.loads(name) if isinstance(name, str) else dict(name))
        elif self._other is not None:
            self._other(kind, task_id, name, total, n, unit)

    # -- state ---------------------------------------------------------------------------

    def _advance(self, n: int) -> None:
        self.step += n
        if self._since is None:
            # The speed is measured from the first report on: that one may be a resumed
            # run's earlier steps (reported at once), and holds the start-up anyway.
            self._since = (self._clock(), self.step)
        self._draw()

    def eta(self) -> Optional[float]:
        """Seconds left at this run's speed so far; ``None`` until it can be measured."""
        if self._since is None or not self.total:
            return None
        t, first = self._since
        done = self.step - first
        if done <= 0:
            return None
        return (self._clock() - t) / done * max(0, self.total - self.step)

    def add_metrics(self, metrics: dict) -> None:
        """A metrics dict from training (``step`` with ``loss``/``learning_rate``/
        ``tokens_per_second``, or with ``eval_loss``): into the row of its step."""
        step = metrics.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            return
        row = self.rows.setdefault(int(step), {})
        for key in ("loss", "eval_loss", "learning_rate", "tokens_per_second"):
            v = metrics.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[key] = float(v)
        if "loss" in metrics or "eta" not in row:
            row["eta"] = self.eta()
        if isinstance(metrics.get("total_steps"), int):
            self.total = metrics["total_steps"]
        self._draw(force=True)

    # -- drawing -------------------------------------------------------------------------

    def _draw(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._drawn_at < self.MIN_REDRAW_S:
            return
        self._drawn_at = now
        text = self.html()
        if self._handle is None:
            self._handle = self._show(text)
        else:
            self._handle.update(text)

    def html(self) -> str:
        """The progress bar and the table, as HTML."""
        total = self.total or 0
        elapsed = None if self._t0 is None else self._clock() - self._t0
        eta = None if self._done else self.eta()
        status = f"{self.step}/{total}" if total else str(self.step)
        times = format_duration(elapsed)
        if eta is not None:
            times += f" &lt; {format_duration(eta)}"
        head = (
            f"<progress value='{self.step}' max='{max(total, 1)}' style='width:300px; height:20px; vertical-align: middle;'>"
            f"</progress> [{status} {times}]".rstrip()
        )

        def num(v: Optional[float], fmt: str) -> str:
            return "" if v is None else html.escape(format(v, fmt))

        body = []
        for step in sorted(self.rows):
            r = self.rows[step]
            cells = (
                str(step),
                num(r.get("loss"), ".6f"),
                num(r.get("eval_loss"), ".6f"),
                num(r.get("learning_rate"), ".3e"),
                num(r.get("tokens_per_second"), ",.0f"),
                format_duration(r.get("eta")),
            )
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        header = "".join(f"<th>{c}</th>" for c in self.COLUMNS)
        return (
            f"<div>{head}</div>"
            "<table border='1' class='dataframe ferrotune-training'>"
            f"<thead><tr style='text-align: left;'>{header}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>"
        )


def make_renderer(progress: Any, *, training: bool = False) -> Optional[ProgressCallback]:
    """``True`` → bars in notebooks/terminals, lines in logs; ``False``/``None`` → silent;
    ``"bar"`` / ``"lines"`` force one; ``"auto"`` is ``True``; a callable is used as is.
    ``training=True`` (``finetune``): in Jupyter, ``True`` gives the live metrics table
    (:class:`NotebookTrainingTable`, other tasks as bars)."""
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
    if progress is True and training and _in_notebook():
        try:
            return NotebookTrainingTable(TqdmRenderer())
        except ImportError:
            return NotebookTrainingTable(LineRenderer())
    if progress == "bar" or _in_notebook() or sys.stderr.isatty():
        try:
            return TqdmRenderer()
        except ImportError:
            return LineRenderer()
    return LineRenderer()
