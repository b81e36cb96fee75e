"""``python -m ferrotune.download_dataset`` — a drop-in for the notebook's
``download-dataset.py``, with exactly its flags::

    python -m ferrotune.download_dataset --dataset HuggingFaceH4/ultrachat_200k \\
        --download_dir ultrachat_200k_dataset --dataset_split_pc 5

Importing this module keeps ``ferrotune.download_dataset(...)`` callable: the module
object forwards calls to :func:`ferrotune.download_dataset`.
"""

from __future__ import annotations

import argparse
import sys
import types
from typing import Any, Optional, Sequence

from ._download import download_dataset as _download_dataset


DESCRIPTION = (
    "Download the first N% of every split of a Hugging Face Hub dataset as {split}.jsonl, byte for byte "
    "what the Azure ML notebook's download-dataset.py writes (same flags). Reads shards from the Hugging Face "
    "cache when they are there, otherwise fetches only the row groups it needs."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ._cli_errors import split_pc

    # The original script's flags, names and defaults.
    p.add_argument("--dataset", type=str, default="samsum",
                   help="dataset repo id on the Hub, e.g. HuggingFaceH4/ultrachat_200k (default samsum, as the original)")
    p.add_argument("--dataset_subset", type=str, default=None, help="dataset subset (config) name (default: the default config)")
    p.add_argument("--dataset_split_pc", type=split_pc, default="5",
                   help="percentage of each split to keep, 0 < N <= 100; fractions allowed (default 5)")
    p.add_argument("--download_dir", type=str, default="data", help="folder to write {split}.jsonl to (default data)")
    # ferrotune's extensions.
    p.add_argument("--format", default="jsonl", choices=["jsonl", "parquet", "both"],
                   help="output format: {split}.jsonl (default), {split}.parquet or both")
    p.add_argument("--splits", nargs="+", default=None, metavar="SPLIT", help="only these splits (default: all of them)")
    p.add_argument("--revision", default="main", help="branch, tag or commit of the dataset (default main)")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved token)")
    p.add_argument("--full-download", "--full_download", dest="full_download", action="store_true",
                   help="download whole shards into the Hugging Face cache instead of byte ranges")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser(prog: str = "python -m ferrotune.download_dataset") -> argparse.ArgumentParser:
    from ._cli_errors import Parser

    p = Parser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Checks the command line before any work; raises ``InvalidArgumentError``."""
    from . import _cli_errors as c
    from .exceptions import InvalidArgumentError

    if not args.dataset.strip():
        raise InvalidArgumentError("--dataset is empty; expected a Hub dataset repo id, e.g. HuggingFaceH4/ultrachat_200k")
    c.output_dir("--download_dir", args.download_dir)
    if args.splits is not None and len(set(args.splits)) != len(args.splits):
        raise InvalidArgumentError(f"--splits names a split twice: {' '.join(args.splits)}")


def _has_files(folder: Any) -> bool:
    return any(not p.name.startswith(".") for p in folder.iterdir())


def empty_splits_warning(result: dict, pc: str, flag: str = "--dataset_split_pc") -> Optional[str]:
    """One line about the splits of which ``pc`` % rounds to 0 rows (their files are empty),
    or ``None``."""
    from ._text import plural

    empty = [s for s in result.values() if s.rows == 0]
    if not empty:
        return None
    which = ", ".join(f"{s.split} ({plural(s.total_rows, 'row')})" for s in empty)
    files = "its file is" if len(empty) == 1 else "their files are"
    return f"warning: {flag} {pc} keeps 0 rows of {which}; {files} empty (a larger {flag} keeps some)"


def run(args: argparse.Namespace) -> int:
    from . import _cli_errors
    from ._text import plural

    progress = _cli_errors.renderer(not args.quiet)

    def go() -> dict:
        check_args(args)
        # a folder this call creates goes again if the call fails before any file is complete
        with _cli_errors.remove_if_failed(args.download_dir, keep=_has_files):
            return _download_dataset(
                args.dataset,
                args.download_dir,
                split_pc=args.dataset_split_pc,
                subset=args.dataset_subset,
                splits=args.splits,
                revision=args.revision,
                format=args.format,
                token=args.token,
                progress=progress,
                full_download=args.full_download,
            )

    result, status = _cli_errors.call(go, progress)
    if status:
        return status
    for s in result.values():
        for p in s.paths.values():
            print(f"{s.split}: {s.rows} of {plural(s.total_rows, 'row')} -> {p}")
    warning = empty_splits_warning(result, args.dataset_split_pc)
    if warning:
        print(warning, file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ._cli_errors import parse_args

    return run(parse_args(build_parser(), argv))


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return _download_dataset(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
