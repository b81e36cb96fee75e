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
from typing import Optional, Sequence

from ._download import download_dataset as _download_dataset


def build_parser(prog: str = "python -m ferrotune.download_dataset") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Download the first N%% of every split of a Hub dataset as JSON Lines "
        "(byte-identical to download-dataset.py).",
    )
    # The original script's flags, names and defaults.
    p.add_argument("--dataset", type=str, default="samsum", help="dataset name on the Hub")
    p.add_argument("--dataset_subset", type=str, default=None, help="dataset subset (config) name")
    p.add_argument("--dataset_split_pc", type=str, default="5", help="percentage of each split to keep")
    p.add_argument("--download_dir", type=str, default="data", help="directory to write {split}.jsonl to")
    # ferrotune's extensions.
    p.add_argument("--format", default="jsonl", choices=["jsonl", "parquet", "both"], help="output format")
    p.add_argument("--splits", nargs="+", default=None, help="only these splits")
    p.add_argument("--revision", default="main", help="branch, tag or commit")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved token)")
    p.add_argument("--full-download", action="store_true", help="download whole shards into the HF cache")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def run(args: argparse.Namespace) -> int:
    from . import _cli_errors

    result, status = _cli_errors.call(
        lambda: _download_dataset(
            args.dataset,
            args.download_dir,
            split_pc=args.dataset_split_pc,
            subset=args.dataset_subset,
            splits=args.splits,
            revision=args.revision,
            format=args.format,
            token=args.token,
            progress=not args.quiet,
            full_download=args.full_download,
        )
    )
    if status:
        return status
    for s in result.values():
        for p in s.paths.values():
            print(f"{s.split}: {s.rows} of {s.total_rows} rows -> {p}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return _download_dataset(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
