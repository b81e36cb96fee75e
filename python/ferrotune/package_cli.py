"""``ferrotune package``: a fine-tuned model → an MLflow model folder for Azure ML.

    ferrotune package TRAINED_DIR OUT_DIR [--ferrotune-requirement REQ] [--overwrite]

``TRAINED_DIR`` is a ``ferrotune finetune`` output folder (its ``merged/`` model), a merged
model folder or an MLflow model folder; see :func:`ferrotune.packaging.package_model`.

Also runs as ``python -m ferrotune.package_cli ...``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trained_dir", metavar="TRAINED_DIR",
                   help="fine-tuning output folder (with merged/), merged model folder or MLflow model folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the MLflow model folder to write")
    p.add_argument("--ferrotune-requirement", "--ferrotune_requirement", dest="ferrotune_requirement", default=None,
                   metavar="REQ",
                   help="pip requirement installing ferrotune where the model is served "
                        "(default: ferrotune==<this version>; e.g. a wheel path or URL)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it is an existing MLflow model folder (or empty)")
    p.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                   help="progress display (auto: bars in a terminal, lines in logs)")


def build_parser(prog: str = "ferrotune package") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Package a fine-tuned model as an MLflow model folder (Azure ML registration and serving).",
        allow_abbrev=False,
    )
    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from . import _cli_errors
    from .finetune import distributed_from_env
    from .packaging import package_model

    # In a data-parallel job every process runs the same command line; rank 0 trained the
    # output and packages it, the others would only race it for the same folder.
    group, status = _cli_errors.call(distributed_from_env)
    if status:
        return status
    if group is not None and group["rank"] > 0:
        print(f"rank {group['rank']} of {group['world_size']}: packaging is rank 0's job; nothing to do", file=sys.stderr)
        return 0

    out, status = _cli_errors.call(
        lambda: package_model(
            args.trained_dir,
            args.out_dir,
            ferrotune_requirement=args.ferrotune_requirement,
            overwrite=args.overwrite,
            progress=False if args.progress == "none" else args.progress,
        )
    )
    if status:
        return status
    print(out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(prog="python -m ferrotune.package_cli").parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
