"""The ``ferrotune`` command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__

#: the subcommands, in the order of the notebook's flow
COMMANDS = ("download-dataset", "tokenize", "finetune", "generate", "package", "demo")


def build_parser() -> argparse.ArgumentParser:
    """The ``ferrotune`` parser with every subcommand (``subparsers(parser)`` lists them)."""
    import importlib

    from . import _cli_errors as c

    # import_module, not `from . import`: the package attributes `download_dataset` and
    # `finetune` are the functions; their modules sit beside them
    dd = importlib.import_module("ferrotune.download_dataset")
    tokenize_cli = importlib.import_module("ferrotune.tokenize_cli")
    finetune_cli = importlib.import_module("ferrotune.finetune_cli")
    generate_cli = importlib.import_module("ferrotune.generate_cli")
    package_cli = importlib.import_module("ferrotune.package_cli")
    demo = importlib.import_module("ferrotune.demo")

    parser = c.Parser(
        prog="ferrotune",
        description="Fast, dependable Phi-3 fine-tuning for the Azure ML ultrachat notebook: download, tokenize, "
        "finetune, generate, package — or all of them offline with `ferrotune demo`.",
        epilog="`ferrotune COMMAND --help` describes every option of a command.",
    )
    parser.add_argument("--version", action="version", version=f"ferrotune {__version__}",
                        help="print ferrotune's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = [
        ("download-dataset", dd, dict(help="download the first N%% of every split of a Hub dataset (drop-in for download-dataset.py)")),
        ("tokenize", tokenize_cli, dict(help="render, tokenize, label and pack conversations into training rows")),
        ("finetune", finetune_cli, dict(help="LoRA fine-tuning with the Azure ML pipeline's parameter names",
                                        allow_abbrev=False)),
        ("generate", generate_cli, dict(help="replies from a merged model or a base model + PEFT adapter")),
        ("package", package_cli, dict(help="package a fine-tuned model as an MLflow model folder for Azure ML",
                                      allow_abbrev=False)),
        ("demo", demo, dict(help="run the whole flow on the bundled sample dataset, offline, in about a minute")),
    ]
    for name, module, kw in commands:
        p = c.add_command(sub, name, description=module.DESCRIPTION, **kw)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def subparsers(parser: argparse.ArgumentParser) -> dict:
    """``{command: its parser}`` of :func:`build_parser`'s parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import _cli_errors as c

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in COMMANDS and not any(a in ("-h", "--help", "--version") for a in argv[: argv.index(first)]):
        best = c.closest(first, COMMANDS)
        parser.error(f"unknown command {first!r}" + (f"; did you mean {best!r}?" if best else f"; the commands are {', '.join(COMMANDS)}"))
    if first is None:
        unknown = [a for a in argv if a not in ("-h", "--help", "--version")]
        if unknown:
            parser.error(c.unrecognized(parser, unknown))
    args = c.parse_args(parser, argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
