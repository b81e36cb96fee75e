"""``ferrotune generate``: replies from a merged model or a base model + PEFT adapter.

One conversation from flags (``--prompt``, optional ``--system``), printed as it forms; or
many from ``--input`` (JSON Lines: each line a list of messages, or an object with a
``messages`` list — the ``{split}.jsonl`` files ``download-dataset`` writes work as is)
with one JSON object per conversation written to ``--output`` (or stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

from .exceptions import DataFormatError, InvalidArgumentError


DESCRIPTION = (
    "Chat replies from a fine-tuned Phi-3 (a merged model, or a base model + PEFT adapter): one "
    "conversation from --prompt, streamed as it forms, or every conversation of a JSON Lines --input, "
    "batched, one JSON object per line on --output or stdout."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ._cli_errors import at_least

    p.add_argument("--model", required=True, help="merged model folder, Azure ML MLflow model folder or Hub repo id")
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder to run on top of --model (default: none)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user's message (one conversation; the reply is printed as it forms)")
    src.add_argument("--input", help="JSON Lines of conversations (a list of messages, or {\"messages\": [...]} per line)")
    p.add_argument("--system", default=None, help="with --prompt: a system message before it")
    p.add_argument("--output", default=None,
                   help="with --input: write the replies here as JSON Lines (default: stdout); "
                        "the file appears when every reply is done")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=at_least(1), default=None,
                   help="with --input: conversations generated together (default 8)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=256,
                   help="most tokens to generate per reply, >= 1 (default 256)")
    p.add_argument("--do-sample", "--do_sample", dest="do_sample", action="store_true",
                   help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="with --do-sample: divides the logits, > 0 (default 1.0)")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0,
                   help="with --do-sample: nucleus sampling mass, in (0, 1] (default 1.0 = off)")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=50,
                   help="with --do-sample: sample among the k likeliest tokens, >= 0 (default 50; 0 = off)")
    p.add_argument("--repetition-penalty", "--repetition_penalty", dest="repetition_penalty", type=float, default=1.0,
                   help="penalty on tokens already seen, > 0 (default 1.0 = none)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for sampling, 0 <= seed < 2**64 (default: a fresh one each run)")
    p.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda[:N]")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPU, float32 on CPU), 32 or 16")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def read_conversations(path: str) -> list:
    """Conversations of a JSON Lines file (blank lines skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
                conv = row.get("messages") if isinstance(row, dict) else row
                if not isinstance(conv, list):
                    raise DataFormatError(f"{path}: line {n}: expected a list of messages or an object with 'messages'")
                out.append(conv)
    except FileNotFoundError:
        raise InvalidArgumentError(f"--input {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InvalidArgumentError(f"--input {path}: {e.strerror or e}") from None
    return out


def check_args(args: argparse.Namespace) -> dict:
    """Checks the command line before anything is loaded; returns the generation
    parameters. Raises :class:`InvalidArgumentError` naming the flag."""
    from . import _cli_errors as c
    from ._generate import check_parameters

    if args.prompt is not None:
        for flag, value in (("--output", args.output), ("--batch-size", args.batch_size)):
            if value is not None:
                raise InvalidArgumentError(f"{flag} goes with --input (with --prompt the reply is printed)")
        if not args.prompt.strip():
            raise InvalidArgumentError("--prompt is empty")
    else:
        if args.system is not None:
            raise InvalidArgumentError("--system goes with --prompt (with --input, put system messages in the conversations)")
        c.input_file("--input", args.input)
        if args.output is not None:
            c.output_file("--output", args.output, inputs=[args.input])
    c.model_source("--model", args.model)
    if args.adapter is not None:
        c.model_source("--adapter", args.adapter, "PEFT adapter folder")
    return check_parameters(
        args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.top_k, args.repetition_penalty,
        args.seed, name=lambda p: "--" + p.replace("_", "-"),
    )


def _write_replies(path: Optional[str], rows: Any) -> None:
    """Writes JSON Lines to ``path`` under a temporary name, renamed when complete (or to
    stdout, line by line)."""
    if path is None:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            sys.stdout.flush()
        return
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the output is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _generate(args: argparse.Namespace, progress: Any) -> None:
    from . import _cli_errors as c
    from ._generate import Generator

    kw = check_args(args)
    convs = None if args.input is None else read_conversations(args.input)
    if convs is not None and not convs:
        raise InvalidArgumentError(f"--input {args.input}: no conversations in it")
    gen = Generator.load(args.model, adapter=args.adapter, device=args.device, precision=args.precision,
                         progress=progress)
    if convs is None:
        conv = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        gen.generate(conv, stream=True, **kw)
        return
    batch = args.batch_size or 8

    def rows() -> Any:
        for start in range(0, len(convs), batch):
            for r in gen.generate(convs[start : start + batch], progress=progress, **kw):
                yield {"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                       "completion_tokens": len(r.token_ids)}

    if args.output is None:
        _write_replies(None, rows())
    else:
        with c.remove_if_failed(os.path.dirname(os.path.abspath(args.output))):
            _write_replies(args.output, rows())


def run(args: argparse.Namespace) -> int:
    from . import _cli_errors

    progress = _cli_errors.renderer(not args.quiet)
    _, status = _cli_errors.call(lambda: _generate(args, progress), progress)
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import _cli_errors

    p = _cli_errors.Parser(prog="python -m ferrotune.generate_cli", description=DESCRIPTION)
    add_arguments(p)
    return run(_cli_errors.parse_args(p, argv))


if __name__ == "__main__":
    sys.exit(main())
