"""``ferrotune package``: a fine-tuned model → an MLflow model folder for Azure ML.

    ferrotune package TRAINED_DIR OUT_DIR [--ferrotune-requirement REQ] [--overwrite]

``TRAINED_DIR`` is a ``ferrotune finetune`` output folder (its ``merged/`` model), a merged
model folder or an MLflow model folder; see :func:`ferrotune.packaging.package_model`.

Also runs as ``python -m ferrotune.package_cli ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


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


DESCRIPTION = (
    "Package a fine-tuned model as an MLflow model folder for Azure ML registration and serving: MLmodel, "
    "conda.yaml / requirements.txt pinning ferrotune, the model and tokenizer, and a score.py for a custom "
    "deployment. The folder is built under a temporary name and renamed into place."
)


def build_parser(prog: str = "ferrotune package") -> argparse.ArgumentParser:
    from ._cli_errors import Parser

    p = Parser(prog=prog, description=DESCRIPTION, allow_abbrev=False)
    add_arguments(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Checks the command line before any work; raises ``InvalidArgumentError``."""
    from . import _cli_errors as c
    from .exceptions import InvalidArgumentError

    src = Path(args.trained_dir)
    if not src.exists():
        raise InvalidArgumentError(f"TRAINED_DIR {args.trained_dir}: no such folder")
    if not src.is_dir():
        raise InvalidArgumentError(f"TRAINED_DIR {args.trained_dir}: is a file; expected a fine-tuning output, model or MLflow model folder")
    c.output_dir("OUT_DIR", args.out_dir)


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

    progress = _cli_errors.renderer(False if args.progress == "none" else args.progress)

    def go() -> Any:
        check_args(args)
        return package_model(
            args.trained_dir,
            args.out_dir,
            ferrotune_requirement=args.ferrotune_requirement,
            overwrite=args.overwrite,
            progress=progress,
        )

    out, status = _cli_errors.call(go, progress)
    if status:
        return status
    print(out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ._cli_errors import parse_args

    return run(parse_args(build_parser(prog="python -m ferrotune.package_cli"), argv))


if __name__ == "__main__":
    sys.exit(main())
