"""``ferrotune tokenize``: conversations (JSONL/Parquet) → packed training rows."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

DESCRIPTION = (
    "Render conversations with the tokenizer's chat template, tokenize them (the ids transformers' "
    "apply_chat_template gives), label the assistant turns and pack whole conversations into training rows "
    "of --max-seq-length tokens. Unusable rows are dropped and counted (--strict: an error instead). "
    "The output appears under its name only when complete."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ._cli_errors import at_least

    p.add_argument("--tokenizer", required=True, help="tokenizer folder, Azure ML MLflow model folder or Hub model repo id")
    p.add_argument(
        "--train-file", "--train_file", dest="train_files", action="append", required=True,
        help="JSONL or Parquet file with a 'messages' column (repeat for several files)",
    )
    p.add_argument("--output", required=True, help="the file to write: .parquet or .arrow (Arrow IPC)")
    p.add_argument("--max-seq-length", "--max_seq_length", dest="max_seq_length", type=at_least(1), default=None,
                   help="truncation length and packed row size, >= 1 (default: the model's maximum)")
    p.add_argument("--mode", choices=["pack", "pad"], default="pack",
                   help="pack: several whole conversations per row (default); pad: one conversation per row")
    p.add_argument("--train-on", "--train_on", dest="train_on", choices=["assistant", "all"], default="assistant",
                   help="which tokens get labels: the assistant turns (default) or every token")
    p.add_argument("--strict", action="store_true", help="fail on the first unusable row instead of counting it")
    p.add_argument("--num-threads", "--num_threads", dest="num_threads", type=at_least(1), default=None,
                   help="tokenizer threads, >= 1 (default: all cores; the output does not depend on it)")
    p.add_argument("--revision", default="main", help="branch, tag or commit of a Hub tokenizer (default main)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")


def check_args(args: argparse.Namespace) -> None:
    """Checks the command line before any work; raises ``InvalidArgumentError``."""
    from . import _cli_errors as c
    from .exceptions import InvalidArgumentError

    c.model_source("--tokenizer", args.tokenizer, "tokenizer folder")
    for f in args.train_files:
        c.input_file("--train-file", f)
    c.output_file("--output", args.output, inputs=args.train_files)
    if not args.output.lower().endswith((".parquet", ".arrow")):
        raise InvalidArgumentError(f"--output {args.output}: must end in .parquet or .arrow")


def run(args: argparse.Namespace) -> int:
    from . import _cli_errors
    from ._tokenize import tokenize_dataset

    progress = _cli_errors.renderer(args.progress)

    def go():  # type: ignore[no-untyped-def]
        check_args(args)
        with _cli_errors.remove_if_failed(os.path.dirname(os.path.abspath(args.output))):
            return tokenize_dataset(
                args.tokenizer,
                args.train_files,
                args.output,
                max_seq_length=args.max_seq_length,
                mode=args.mode,
                train_on=args.train_on,
                strict=args.strict,
                num_threads=args.num_threads,
                revision=args.revision,
                progress=progress,
            )

    stats, status = _cli_errors.call(go, progress)
    if status:
        return status
    print(stats.summary())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import _cli_errors

    p = _cli_errors.Parser(prog="python -m ferrotune.tokenize_cli", description=DESCRIPTION)
    add_arguments(p)
    return run(_cli_errors.parse_args(p, argv))


if __name__ == "__main__":
    sys.exit(main())
