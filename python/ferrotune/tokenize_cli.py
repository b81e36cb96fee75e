"""``ferrotune tokenize``: conversations (JSONL/Parquet) → packed training rows."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="tokenizer folder, Azure ML MLflow model folder or Hub model repo id")
    p.add_argument(
        "--train-file", "--train_file", dest="train_files", action="append", required=True,
        help="JSONL or Parquet file with a 'messages' column (repeat for several files)",
    )
    p.add_argument("--output", required=True, help="output .parquet or .arrow file")
    p.add_argument("--max-seq-length", "--max_seq_length", dest="max_seq_length", type=int, default=None,
                   help="truncation length and packed row size (default: the model's maximum)")
    p.add_argument("--mode", choices=["pack", "pad"], default="pack")
    p.add_argument("--train-on", "--train_on", dest="train_on", choices=["assistant", "all"], default="assistant")
    p.add_argument("--strict", action="store_true", help="fail on the first unusable row instead of counting it")
    p.add_argument("--num-threads", dest="num_threads", type=int, default=None)
    p.add_argument("--revision", default="main", help="revision of a Hub tokenizer")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from . import _cli_errors
    from ._tokenize import tokenize_dataset

    stats, status = _cli_errors.call(
        lambda: tokenize_dataset(
            args.tokenizer,
            args.train_files,
            args.output,
            max_seq_length=args.max_seq_length,
            mode=args.mode,
            train_on=args.train_on,
            strict=args.strict,
            num_threads=args.num_threads,
            revision=args.revision,
            progress=args.progress,
        )
    )
    if status:
        return status
    print(stats.summary())
    return 0
