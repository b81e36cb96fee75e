"""What every ``ferrotune`` command shares: how it parses, checks and ends.

* Usage errors are one line, ``error: PROG: what is wrong (see PROG --help)``, exit status 2;
  a mistyped flag gets the closest valid one (``did you mean --learning_rate?``).
* Arguments are checked before any work starts (:func:`input_file`, :func:`output_file`,
  :func:`output_dir`, :func:`model_source`, :func:`at_least`), so a bad one leaves nothing
  behind.
* :func:`call` runs the work: ``error: ...`` and status 2 for a :class:`FerrotuneError`,
  status 130 for Ctrl-C — never a traceback. A failed call prints no ``done`` line.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence

from ._progress import LineRenderer, make_renderer
from ._text import singular_unit
from .exceptions import InvalidArgumentError

#: exit status for an error ferrotune reports (bad arguments included)
ERROR = 2
#: exit status after Ctrl-C (128 + SIGINT)
INTERRUPTED = 130

#: where :func:`add_command` keeps a subcommand's parser in the parsed namespace
_PARSER_DEST = "_ferrotune_parser"


# ---------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line on stderr, status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def closest(word: str, candidates: Sequence[str]) -> Optional[str]:
    """The candidate closest to a mistyped ``word``, if one is close enough."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def option_strings(parser: argparse.ArgumentParser) -> list:
    """Every long flag ``parser`` accepts."""
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def unrecognized(parser: argparse.ArgumentParser, extra: Sequence[str]) -> str:
    """The message for arguments ``parser`` did not recognize, with the closest valid flag."""
    for tok in extra:
        if tok.startswith("-") and tok != "-" and not _is_number(tok):
            name = tok.split("=", 1)[0]
            best = closest(name, option_strings(parser))
            return f"unrecognized option {name}" + (f"; did you mean {best}?" if best else "")
    return f"unexpected argument {extra[0]!r}"


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def add_command(sub: Any, name: str, **kw: Any) -> Parser:
    """A subcommand's parser (``sub`` from ``add_subparsers``) that :func:`parse_args` can
    name in its errors."""
    p = sub.add_parser(name, **kw)
    p.set_defaults(**{_PARSER_DEST: p})
    return p


def _subcommand(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple:
    """``(the parser that reads the flags, those arguments)``: a subcommand's parser and the
    arguments after its name, or ``parser`` and all of ``argv``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for i, tok in enumerate(argv):
                if tok in action.choices:
                    return action.choices[tok], argv[i + 1 :]
    return parser, argv


def _known(parser: argparse.ArgumentParser, name: str) -> bool:
    flags = option_strings(parser)
    if name in flags:
        return True
    # argparse takes an unambiguous prefix where allow_abbrev is on
    return parser.allow_abbrev and len([f for f in flags if f.startswith(name)]) == 1


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an unknown flag is reported first (before a missing
    required one), by the subcommand it was given to, with that subcommand's closest flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    target, rest = _subcommand(parser, argv)
    for tok in rest:
        if tok == "--":
            break
        if tok.startswith("--") and not _known(target, tok.split("=", 1)[0]):
            target.error(unrecognized(target, [tok]))
    args, extra = parser.parse_known_args(argv)
    target = vars(args).pop(_PARSER_DEST, None) or parser
    if extra:
        target.error(unrecognized(target, extra))
    return args


def at_least(lo: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= lo``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {n}")
        return n

    parse.__name__ = f"integer >= {lo}"
    return parse


def split_pc(text: str) -> str:
    """An argparse ``type``: a percentage of rows, ``0 < pc <= 100`` (kept as text: the
    core rounds it exactly as ``download-dataset.py``)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage between 0 (exclusive) and 100, e.g. 5; got {text!r}") from None
    if not 0 < x <= 100:
        raise argparse.ArgumentTypeError(f"must be greater than 0 and at most 100 (a percentage of each split's rows); got {text}")
    return text.strip()


# ---------------------------------------------------------------------------------------
# Checks before work (each raises InvalidArgumentError naming the flag)
# ---------------------------------------------------------------------------------------


def input_file(flag: str, path: str) -> str:
    """An existing, readable file (not a folder)."""
    p = Path(path)
    if not p.exists():
        raise InvalidArgumentError(f"{flag} {path}: no such file")
    if p.is_dir():
        raise InvalidArgumentError(f"{flag} {path}: is a folder; expected a file")
    if not os.access(p, os.R_OK):
        raise InvalidArgumentError(f"{flag} {path}: not readable (permission denied)")
    return path


def output_file(flag: str, path: str, *, inputs: Sequence[str] = ()) -> str:
    """A file that can be written: not a folder, not one of ``inputs``, and its folder is
    a folder where it exists."""
    p = Path(path)
    if p.is_dir():
        raise InvalidArgumentError(f"{flag} {path}: is a folder; expected a file name")
    for src in inputs:
        if os.path.abspath(src) == os.path.abspath(path) or (p.exists() and Path(src).exists() and os.path.samefile(src, p)):
            raise InvalidArgumentError(f"{flag} {path}: is also an input file; choose another output")
    _writable_parent(flag, path, p.parent)
    return path


def output_dir(flag: str, path: str) -> str:
    """A folder that exists or can be created (not a file, not under a file)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InvalidArgumentError(f"{flag} {path}: is a file; expected a folder")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise InvalidArgumentError(f"{flag} {path}: not writable (permission denied)")
        return path
    _writable_parent(flag, path, p.parent)
    return path


def _writable_parent(flag: str, path: str, parent: Path) -> None:
    # the nearest existing ancestor must be a writable folder
    q = parent if str(parent) else Path(".")
    while not q.exists() and q != q.parent:
        q = q.parent
    if q.exists() and not q.is_dir():
        raise InvalidArgumentError(f"{flag} {path}: {q} is a file, not a folder")
    if q.is_dir() and not os.access(q, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"{flag} {path}: cannot write in {q} (permission denied)")


def model_source(flag: str, source: str, what: str = "model folder") -> str:
    """A local folder or a Hub repo id, classified as the core does: an existing path is a
    folder (a file is an error); a missing one that starts with ``.`` or ``/`` is an error;
    anything else is a Hub repo id."""
    if not source:
        raise InvalidArgumentError(f"{flag}: empty; expected a {what} or a Hub repo id")
    p = Path(source)
    if p.exists():
        if not p.is_dir():
            raise InvalidArgumentError(f"{flag} {source}: is a file; expected a {what} or a Hub repo id")
    elif source.startswith((".", "/")) or "\\" in source:
        raise InvalidArgumentError(f"{flag} {source}: no such folder")
    return source


# ---------------------------------------------------------------------------------------
# Folders a failed call must not leave behind
# ---------------------------------------------------------------------------------------


@contextmanager
def remove_if_failed(path: str, keep: Callable[[Path], bool] = lambda p: False) -> Iterator[None]:
    """Removes, if the block fails, the folder ``path`` and those of its parents that did
    not exist before — unless ``keep(path)`` finds something worth keeping in it. A folder
    that existed before is never touched."""
    p = Path(path).absolute()
    top = None  # the outermost folder this call creates
    q = p
    while not q.exists() and q != q.parent:
        top = q
        q = q.parent
    try:
        yield
    except BaseException:
        if top is not None and top.is_dir() and not (p.is_dir() and keep(p)):
            shutil.rmtree(top, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------
# Progress and the end of a command
# ---------------------------------------------------------------------------------------


class _CommandLines(LineRenderer):
    """The log-line renderer of a command: counts in the singular where they are one
    (``1 row``), and a task's ``done`` line held until the command is known to go on or
    to have succeeded — a failed command ends with its ``error:`` line, not ``done``."""

    def __init__(self) -> None:
        super().__init__()
        self._held: list = []

    @staticmethod
    def _amount(n: int, unit: str) -> str:
        return f"{n / 1e6:,.1f} MB" if unit == "B" else singular_unit(n, unit)

    def __call__(self, kind: str, task_id: int, name: str, total: Optional[int], n: int, unit: str = "") -> None:
        if kind == "finish":
            self._held.append((kind, task_id, name, total, n, unit))
            return
        self.release()
        super().__call__(kind, task_id, name, total, n, unit)

    def release(self) -> None:
        held, self._held = self._held, []
        for event in held:
            super().__call__(*event)

    def discard(self) -> None:
        self._held = []


def renderer(progress: Any) -> Any:
    """The progress renderer for a command's ``progress`` setting (``True``, ``False``,
    ``"auto"``, ``"bar"``, ``"lines"``): as :func:`ferrotune._progress.make_renderer`,
    with log lines that say ``1 row`` and no ``done`` line for a failed task."""
    r = make_renderer(progress)
    return _CommandLines() if type(r) is LineRenderer else r


def one_line(e: BaseException) -> str:
    """An exception's message on one line."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None and not str(e).startswith(str(e.filename)):
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e)
    return "; ".join(part.strip() for part in text.splitlines() if part.strip()) or type(e).__name__


def call(fn: Callable[[], Any], progress: Any = None) -> tuple[Any, int]:
    """Runs ``fn()``; returns ``(result, 0)``, or ``(None, status)`` after printing why.
    ``progress``: the :func:`renderer` the work reports to (its held lines are printed on
    success and dropped on failure)."""
    from .exceptions import FerrotuneError

    release = getattr(progress, "release", None)
    discard = getattr(progress, "discard", None)
    try:
        result = fn()
    except (FerrotuneError, OSError) as e:
        if discard:
            discard()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return None, ERROR
    except KeyboardInterrupt:
        if discard:
            discard()
        print("interrupted; no partial file was left under a final name", file=sys.stderr)
        return None, INTERRUPTED
    except BaseException:
        if discard:
            discard()
        raise
    if release:
        release()
    return result, 0
