"""``ferrotune generate``: replies from a merged model or a base model + PEFT adapter.

One conversation from flags (``--prompt``, optional ``--system``), printed as it forms; or
many from ``--input`` (JSON Lines: each line a list of messages, or an object with a
``messages`` list — the ``{split}.jsonl`` files ``download-dataset`` writes work as is)
with one JSON object per conversation written to ``--output`` (or stdout).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from .exceptions import DataFormatError, InvalidArgumentError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="merged model folder, Azure ML MLflow model folder or Hub repo id")
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder to run on top of --model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user's message (one conversation)")
    src.add_argument("--input", help="JSON Lines of conversations (a list of messages, or {\"messages\": [...]} per line)")
    p.add_argument("--system", default=None, help="a system message before --prompt")
    p.add_argument("--output", default=None, help="with --input: write JSON Lines here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=8, help="with --input: conversations generated together (default 8)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=256)
    p.add_argument("--do-sample", "--do_sample", dest="do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=50)
    p.add_argument("--repetition-penalty", "--repetition_penalty", dest="repetition_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
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
    return out


def _generate(args: argparse.Namespace) -> None:
    from ._generate import Generator

    if args.batch_size < 1:
        raise InvalidArgumentError("--batch-size must be at least 1")
    convs = None if args.input is None else read_conversations(args.input)
    gen = Generator.load(args.model, adapter=args.adapter, device=args.device, precision=args.precision,
                         progress=not args.quiet)
    kw: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    if convs is None:
        conv = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        gen.generate(conv, stream=True, **kw)
        return
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for start in range(0, len(convs), args.batch_size):
            for c in gen.generate(convs[start : start + args.batch_size], progress=not args.quiet, **kw):
                row = {"text": c.text, "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                       "completion_tokens": len(c.token_ids)}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()


def run(args: argparse.Namespace) -> int:
    from . import _cli_errors

    _, status = _cli_errors.call(lambda: _generate(args))
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="ferrotune generate", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
