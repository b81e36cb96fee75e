"""The ``ferrotune`` command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__


def main(argv: Optional[Sequence[str]] = None) -> int:
    import importlib

    # import_module, not `from . import`: the package attribute of that name is the function.
    dd = importlib.import_module("ferrotune.download_dataset")
    from . import demo, tokenize_cli

    # import_module: `ferrotune.finetune` is the function, its module sits beside it
    finetune_cli = importlib.import_module("ferrotune.finetune_cli")
    from . import generate_cli

    parser = argparse.ArgumentParser(prog="ferrotune", description="Fast Phi-3 fine-tuning tools.")
    parser.add_argument("--version", action="version", version=f"ferrotune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "download-dataset",
        help="download the first N%% of every split of a Hub dataset (drop-in for download-dataset.py)",
        parents=[dd.build_parser()],
        add_help=False,
    )
    d.set_defaults(func=dd.run)
    t = sub.add_parser("tokenize", help="render, tokenize, label and pack conversations into training rows")
    tokenize_cli.add_arguments(t)
    t.set_defaults(func=tokenize_cli.run)
    f = sub.add_parser(
        "finetune",
        help="LoRA fine-tuning with the Azure ML pipeline's parameter names",
        description="LoRA fine-tuning of Phi-3 on chat conversations.",
        allow_abbrev=False,
    )
    finetune_cli.add_arguments(f)
    f.set_defaults(func=finetune_cli.run)
    g = sub.add_parser(
        "generate",
        help="replies from a merged model or a base model + PEFT adapter",
        description="Chat generation with a fine-tuned Phi-3 (KV cache, batched, streamed).",
    )
    generate_cli.add_arguments(g)
    g.set_defaults(func=generate_cli.run)
    package_cli = importlib.import_module("ferrotune.package_cli")
    pk = sub.add_parser(
        "package",
        help="package a fine-tuned model as an MLflow model folder for Azure ML",
        description="Package a fine-tuned model as an MLflow model folder (Azure ML registration and serving).",
        allow_abbrev=False,
    )
    package_cli.add_arguments(pk)
    pk.set_defaults(func=package_cli.run)
    m = sub.add_parser("demo", help="run the pipeline on the bundled sample dataset, offline")
    demo.add_arguments(m)
    m.set_defaults(func=demo.run)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
