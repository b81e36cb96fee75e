"""``ferrotune finetune``: LoRA fine-tuning from the command line.

Takes the Azure ML pipeline's parameter names three ways, later ones winning:
``--params-json`` (a file or an inline JSON object, e.g. the notebook's
``finetune_parameters``), ``--param NAME=VALUE`` (repeatable), and one flag per parameter
in either spelling, ``--num-train-epochs 3`` or ``--num_train_epochs 3`` (what an Azure ML
command job passes). Values are parsed like :func:`ferrotune.finetune` parses notebook
values (``"true"``, ``"5e-6"``); :func:`config_from_args` gives the config without training.

Also runs as ``python -m ferrotune.finetune_cli ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence

from .exceptions import InvalidArgumentError

#: the flags shown first in ``--help`` (the ones most runs set)
COMMON = (
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "max_seq_length",
    "precision",
    "seed",
    "logging_steps",
    "device",
)

_DEST = "param__"  # argparse dest prefix of the per-parameter flags


def _flags(name: str) -> list:
    dashed = "--" + name.replace("_", "-")
    under = "--" + name
    return [dashed] if dashed == under else [dashed, under]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .finetune import _PARAMS

    p.add_argument("--model", required=True, help="model folder, Azure ML MLflow model folder or Hub repo id")
    p.add_argument("--train-file", "--train_file", dest="train_file", required=True,
                   help="conversations (JSONL/Parquet with 'messages') or a tokenized ferrotune file")
    p.add_argument("--validation-file", "--validation_file", dest="validation_file", default=None,
                   help="default: the last validation_split (20%%) of the training conversations")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True,
                   help="checkpoints, adapter/, merged/, train_summary.json")
    p.add_argument("--params-json", "--params_json", dest="params_json", default=None, metavar="FILE_OR_JSON",
                   help="a JSON object of parameters (Azure ML names): a file, or the object itself")
    p.add_argument("--param", dest="param", action="append", default=[], metavar="NAME=VALUE",
                   help="one parameter (repeatable), e.g. --param apply_lora=true")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="resume from the latest checkpoint in --output-dir, or from PATH")
    p.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                   help="progress display (auto: bars in a terminal, lines in logs)")
    p.add_argument("--report-to", "--report_to", dest="report_to", choices=["auto", "mlflow", "none"], default="auto",
                   help="auto: MLflow when a run is active (Azure ML jobs); mlflow: always")

    common = p.add_argument_group("training parameters (Azure ML pipeline names; dashes or underscores)")
    other = p.add_argument_group("other parameters (same as --param NAME=VALUE)")
    for name in (*COMMON, *sorted(set(_PARAMS) - set(COMMON))):
        spec = _PARAMS[name]
        group = common if name in COMMON else other
        kw: dict = dict(dest=_DEST + name, default=argparse.SUPPRESS, help=spec.help)
        if spec.kind == "bool":
            # `--gradient-checkpointing` alone means true; `--apply_lora false` also works
            kw.update(nargs="?", const="true", metavar="true|false")
        else:
            kw.update(metavar=spec.kind.upper() if spec.kind in ("int", "float", "path") else "VALUE")
        group.add_argument(*_flags(name), **kw)


DESCRIPTION = (
    "LoRA fine-tuning of Phi-3 on chat conversations, with the Azure ML pipeline's parameter names and "
    "defaults: --params-json (e.g. the notebook's finetune_parameters), --param NAME=VALUE, or one flag per "
    "parameter in either spelling (--num-train-epochs 3 or --num_train_epochs 3); later ones win. Writes "
    "checkpoint-*/, adapter/ (PEFT), merged/ and train_summary.json into --output-dir."
)


def build_parser(prog: str = "ferrotune finetune") -> argparse.ArgumentParser:
    from ._cli_errors import Parser

    p = Parser(prog=prog, description=DESCRIPTION, allow_abbrev=False)
    add_arguments(p)
    return p


#: what makes a failed run's output folder worth keeping
_USEFUL = ("adapter", "merged", "train_summary.json")


def _useful(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in _USEFUL) or any(output_dir.glob("checkpoint-*"))


def check_args(args: argparse.Namespace) -> None:
    """Checks the paths of the command line before any work; raises ``InvalidArgumentError``."""
    from . import _cli_errors as c

    c.model_source("--model", args.model)
    c.input_file("--train-file", args.train_file)
    if args.validation_file is not None:
        c.input_file("--validation-file", args.validation_file)
    c.output_dir("--output-dir", args.output_dir)
    if isinstance(args.resume, str) and args.resume.strip().lower() not in ("true", "false", "1", "0", ""):
        if not Path(args.resume).is_dir():
            raise InvalidArgumentError(f"--resume {args.resume}: no such checkpoint folder")


def _load_params_json(text: str) -> dict:
    s = text.strip()
    if not s[:1] or s[0] not in "{[":  # a file name; inline JSON starts with a bracket
        try:
            with open(s, encoding="utf-8") as f:
                s = f.read()
        except OSError as e:
            raise InvalidArgumentError(f"--params-json: cannot read {text!r}: {e.strerror or e}") from None
    try:
        obj = json.loads(s)
    except ValueError as e:
        raise InvalidArgumentError(f"--params-json: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InvalidArgumentError(f"--params-json: expected a JSON object of parameters, got {type(obj).__name__}")
    return obj


def params_from_args(args: argparse.Namespace) -> dict:
    """The parameters the flags give, merged: --params-json, then --param, then the flags."""
    from .finetune import _normalize_key

    params: dict = {}

    def put(key: Any, value: Any) -> None:
        params[_normalize_key(key)] = value

    if args.params_json is not None:
        for k, v in _load_params_json(args.params_json).items():
            put(k, v)
    for item in args.param:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise InvalidArgumentError(f"--param {item!r}: expected NAME=VALUE")
        put(key, value)
    for dest, value in vars(args).items():
        if dest.startswith(_DEST):
            put(dest[len(_DEST):], value)
    if args.resume is not None:
        put("resume_from_checkpoint", args.resume)
    return params


def config_from_args(argv: Sequence[str]) -> tuple[dict, list]:
    """``(config, notes)`` for a command line, exactly as ``ferrotune finetune`` would train."""
    from .finetune import build_config

    from ._cli_errors import parse_args

    args = parse_args(build_parser(), list(argv))
    return build_config(args.model, args.train_file, args.validation_file, args.output_dir, params_from_args(args))


def run(args: argparse.Namespace) -> int:
    from . import _cli_errors
    from .finetune import build_config, distributed_from_env, finetune

    progress = _cli_errors.renderer(False if args.progress == "none" else args.progress)

    def go() -> Any:
        params = params_from_args(args)
        # Checked here first so that a name like "model" or "report_to" in --params-json is
        # an error, not a keyword that collides with finetune()'s own arguments.
        build_config(args.model, args.train_file, args.validation_file, args.output_dir, params)
        check_args(args)
        group = distributed_from_env()
        # rank 0 owns the output folder; a failed run leaves none behind that it created
        # and that holds no checkpoint, adapter or merged model
        cleanup = _cli_errors.remove_if_failed(args.output_dir, keep=_useful) if not group or group["rank"] == 0 else nullcontext()
        with cleanup:
            return finetune(
                args.model,
                args.train_file,
                args.validation_file,
                args.output_dir,
                progress=progress,
                report_to=args.report_to,
                **params,
            )

    result, status = _cli_errors.call(go, progress)
    if status:
        return status
    print(result.summary())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ._cli_errors import parse_args

    return run(parse_args(build_parser(prog="python -m ferrotune.finetune_cli"), argv))


if __name__ == "__main__":
    sys.exit(main())
