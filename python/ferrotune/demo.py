"""``ferrotune demo``: the main job on an embedded default, fully offline.

The notebook's whole flow in one command, on the CPU, in about a minute: a small
ultrachat_200k-schema sample (all four splits, several shards) and a Phi-3 tokenizer ship
inside the package. The demo lays the sample out as a Hugging Face cache snapshot and runs
the real download path with ``HF_HUB_OFFLINE=1`` (the code that serves
``HuggingFaceH4/ultrachat_200k`` online); tokenizes, labels and packs ``train_sft``; creates
a tiny random model of the Phi-3 architecture with that tokenizer; fine-tunes LoRA adapters
on ``train_sft`` with the notebook's parameter names (the loss falls); merges them; answers a
``test_sft`` question with the merged model; packages it as an MLflow model folder with
``score.py``; and scores the notebook's request (a ``test_gen`` conversation) through that
``score.py``. It prints where every artifact went and writes ``demo_summary.json``.

With network, ``--model microsoft/Phi-3-mini-4k-instruct --dataset HuggingFaceH4/ultrachat_200k``
runs the same steps on the real model and dataset (slow on a CPU: set ``--max-steps``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any, Optional

SAMPLE_REPO = "ferrotune/ultrachat_sample"
#: a fixed commit id for the bundled snapshot
SAMPLE_COMMIT = "f" * 8 + "0" * 32


def _sample_files() -> dict:
    root = resources.files("ferrotune") / "_sample" / "ultrachat_sample"
    out = {}

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, rel + "/")
            else:
                out[rel] = child.read_bytes()

    walk(root, "")
    return out


def seed_cache(cache_dir: Path) -> str:
    """Writes the bundled sample into ``cache_dir`` in huggingface_hub's layout (blobs by
    sha256, relative snapshot symlinks, ``refs/main``) and returns the repo id."""
    repo_dir = cache_dir / ("datasets--" + SAMPLE_REPO.replace("/", "--"))
    for rel, data in _sample_files().items():
        etag = hashlib.sha256(data).hexdigest()
        blob = repo_dir / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = repo_dir / "snapshots" / SAMPLE_COMMIT / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        depth = rel.count("/")
        target = Path(*([".."] * (2 + depth)), "blobs", etag)
        try:
            os.symlink(target, link)
        except OSError:
            shutil.copyfile(blob, link)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(SAMPLE_COMMIT)
    return SAMPLE_REPO


__all__ = ["DEMO_MODEL", "DEMO_PARAMETERS", "SAMPLE_REPO", "seed_cache", "add_arguments", "run", "main"]

#: The demo's model: Phi-3's architecture and tokenizer at a size a CPU trains in seconds.
#: initializer_range 0.2 (not Phi-3's 0.02) gives logits with room to move, so the loss
#: visibly falls within a few dozen LoRA steps.
DEMO_MODEL = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "original_max_position_embeddings": 2048,
    "initializer_range": 0.2,
}

#: The notebook's finetune_parameters, with a learning rate and LoRA size for a random model.
DEMO_PARAMETERS = dict(
    num_train_epochs=3,
    per_device_train_batch_size=1,
    per_device_eval_batch_size=1,
    learning_rate=5e-3,
    lr_scheduler_type="cosine",
    warmup_steps=2,
    apply_lora="true",
    apply_deepspeed="true",
    deepspeed_stage=2,
    lora_r=16,
    lora_alpha=32,
    max_seq_length=1024,
    logging_steps=5,
    evaluation_strategy="epoch",
    seed=42,
)


DESCRIPTION = (
    "The notebook's whole flow on an embedded default, offline on the CPU in about a minute: download 25% of a "
    "bundled ultrachat_200k-schema sample, tokenize and pack train_sft with the bundled Phi-3 tokenizer, "
    "fine-tune LoRA adapters on a tiny random Phi-3, merge, generate, package an MLflow model folder and score "
    "the notebook's request through its score.py. --model / --dataset run the same steps on the real thing."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ._cli_errors import at_least, split_pc

    p.add_argument("--workdir", default=None, help="where to put the demo's cache and outputs (default: a new temp folder)")
    p.add_argument("--split-pc", "--split_pc", dest="split_pc", type=split_pc, default=None,
                   help="percentage of each split to keep, 0 < N <= 100 (default 25 of the 200-row bundled sample; "
                        "5 with --dataset, as in the notebook)")
    p.add_argument("--max-seq-length", "--max_seq_length", dest="max_seq_length", type=at_least(1), default=1024,
                   help="packed row length in tokens, >= 1 (default 1024)")
    p.add_argument("--model", default=None,
                   help="a Phi-3 model (Hub id or folder) instead of the tiny random one; needs network for a Hub id")
    p.add_argument("--dataset", default=None,
                   help="a Hub dataset (e.g. HuggingFaceH4/ultrachat_200k) instead of the bundled sample; needs network")
    p.add_argument("--max-steps", "--max_steps", dest="max_steps", type=at_least(1), default=None,
                   help="stop training after this many optimizer steps, >= 1 (default: whole epochs, 3; 1 with --model)")
    p.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _params(args: argparse.Namespace) -> dict:
    """The finetune parameters the demo trains with."""
    if args.model is None:
        params = dict(DEMO_PARAMETERS)
    else:
        # the notebook's own parameters for a real model
        params = dict(num_train_epochs=1, learning_rate=5e-6, lr_scheduler_type="cosine", apply_lora="true",
                      logging_steps=5, evaluation_strategy="epoch")
    params["max_seq_length"] = args.max_seq_length
    if args.max_steps is not None:
        params["max_steps"] = args.max_steps
    return params


def check_args(args: argparse.Namespace) -> None:
    """Checks the command line before any work (nothing is created when it fails);
    raises ``InvalidArgumentError``."""
    from . import _cli_errors as c
    from .exceptions import InvalidArgumentError
    from .finetune import build_config

    if args.workdir is not None:
        c.output_dir("--workdir", args.workdir)
    if args.model is not None:
        c.model_source("--model", args.model)
    if args.dataset is not None and not args.dataset.strip():
        raise InvalidArgumentError("--dataset is empty; expected a Hub dataset repo id, e.g. HuggingFaceH4/ultrachat_200k")
    # the training parameters and --device, checked as finetune will check them
    build_config(args.model or "model", "train.jsonl", None, "outputs", {**_params(args), "device": args.device})


class _Env:
    """Sets environment variables for the duration of a ``with`` block."""

    def __init__(self, **values: Optional[str]) -> None:
        self._values = values
        self._saved: dict = {}

    def __enter__(self) -> "_Env":
        for k, v in self._values.items():
            self._saved[k] = os.environ.get(k)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return self

    def __exit__(self, *exc: object) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_line(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())


def _sparkline(values: list) -> str:
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(bars[min(7, int((v - lo) / span * 7.999))] for v in values)


def _load_score_py(model_dir: Path):
    """The packaged score.py as a module (what the Azure ML inference server imports)."""
    spec = importlib.util.spec_from_file_location("ferrotune_demo_score", model_dir / "score.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    from . import _cli_errors

    progress = _cli_errors.renderer(not args.quiet)

    def go() -> dict:
        check_args(args)
        return _run(args, progress)

    _, status = _cli_errors.call(go, progress)
    return status


def _run(args: argparse.Namespace, progress: Any = True) -> dict:
    from ._core import create_random_model
    from ._download import download_dataset
    from ._generate import Generator
    from ._text import plural
    from ._tokenize import tokenize_dataset
    from .download_dataset import empty_splits_warning
    from .exceptions import DatasetError, FerrotuneError
    from .finetune import finetune
    from .packaging import package_model

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ferrotune-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    bundled = args.dataset is None
    offline = bundled and args.model is None
    split_pc = args.split_pc or ("25" if bundled else "5")
    data_dir = work / "ultrachat_200k_dataset"
    env: dict = {}
    if bundled:
        env["HF_HUB_CACHE"] = str(work / "hf-cache")
        repo = seed_cache(work / "hf-cache")
    else:
        repo = args.dataset
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    summary: dict = {"workdir": str(work)}
    t_start = time.perf_counter()
    steps = 7

    def step(n: int, text: str) -> float:
        print(f"  step {n}/{steps}  {text}", flush=True)
        return time.perf_counter()

    with _Env(**env):
        where = "offline, bundled sample" if bundled else "dataset"
        print(f"ferrotune demo — {where} '{repo}' (ultrachat_200k schema), work folder {work}")

        t0 = step(1, f"download-dataset --dataset {repo} --dataset_split_pc {split_pc} --download_dir {data_dir}")
        result = download_dataset(repo, data_dir, split_pc=split_pc, format="both", progress=progress)
        for s in result.values():
            print(f"    {s.split:<10} {s.rows:>5} of {plural(s.total_rows, 'row'):>10} -> {s.paths['jsonl']}")
        print(f"    done in {time.perf_counter() - t0:.2f} s")
        warning = empty_splits_warning(result, split_pc, "--split-pc")
        if warning:
            print(warning, file=sys.stderr)
        train = result["train_sft"] if "train_sft" in result else next(iter(result.values()))
        if train.rows == 0:
            raise DatasetError(f"--split-pc {split_pc} keeps no rows of {train.split} to train on; use a larger --split-pc")
        train_file = train.paths["jsonl"]
        summary["data"] = {k: v.paths["jsonl"] for k, v in result.items()}

        tokenizer = str(resources.files("ferrotune") / "_sample" / "phi3-tokenizer") if args.model is None else args.model
        packed = work / "train_sft.tokenized.parquet"
        t0 = step(2, f"tokenize --train-file {train_file} --output {packed}")
        stats = tokenize_dataset(tokenizer, train_file, packed, max_seq_length=args.max_seq_length, progress=progress)
        print(f"    {stats.summary()}")
        print(f"    done in {time.perf_counter() - t0:.2f} s")

        if args.model is None:
            t0 = step(3, "model: a tiny random Phi-3 (the Phi-3 architecture and tokenizer, 2 layers, hidden 128)")
            model = create_random_model(str(work / "tiny-phi3"), DEMO_MODEL, seed=0, tokenizer=tokenizer)
            print(f"    -> {model}")
        else:
            t0 = step(3, f"model: {args.model}")
            model = args.model
        params = _params(args)

        outputs = work / "outputs"
        t0 = step(4, f"finetune (LoRA) on {Path(train_file).name} -> {outputs}")
        print(f"    finetune_parameters = {params}")
        res = finetune(model, train_file, None, outputs, progress=progress, report_to="none", device=args.device, **params)
        losses = res.step_losses
        print(f"    loss per step {_sparkline(losses)}  {losses[0]:.3f} -> {losses[-1]:.3f}")
        for e in res.eval:
            print(f"    eval after step {e['step']:>3}: loss {e['eval_loss']:.3f}, perplexity {e['eval_perplexity']:.4g}")
        print(f"    {res.summary()}")
        summary["train"] = {
            "step_losses": losses,
            "eval": res.eval,
            "adapter": res.adapter_dir,
            "merged": res.merged_dir,
            "tokens_per_second": res.tokens_per_second,
        }
        if not res.merged_dir:
            raise FerrotuneError("finetune wrote no merged model")

        question = next(
            (m for m in _first_line(summary["data"].get("test_sft", train_file))["messages"] if m["role"] == "user"),
            {"role": "user", "content": "Hello!"},
        )
        t0 = step(5, "generate: the merged model answers the first test_sft question")
        gen = Generator.load(res.merged_dir, device=args.device, progress=False)
        reply = gen.generate([question], max_new_tokens=32)[0]
        print(f"    user: {question['content'][:100]}{'...' if len(question['content']) > 100 else ''}")
        print(f"    assistant ({len(reply.token_ids)} tokens, {reply.finish_reason}): {reply.text[:160]!r}")
        summary["generate"] = {"question": question["content"], "reply": reply.text}

        packaged = work / "mlflow_model"
        t0 = step(6, f"package -> {packaged} (MLflow model folder + score.py for Azure ML)")
        package_model(outputs, packaged, overwrite=True, progress=False)
        print(f"    {', '.join(sorted(p.name for p in packaged.iterdir()))}")
        summary["package"] = str(packaged)

        t0 = step(7, "score: the notebook's request (a test_gen conversation) through the packaged score.py")
        conversation = _first_line(summary["data"].get("test_gen", train_file))["messages"]
        request = {
            "input_data": {
                "input_string": [conversation],
                "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 32, "seed": 0},
            },
            "params": {},
        }
        (work / "sample_score.json").write_text(json.dumps(request), encoding="utf-8")
        with _Env(AZUREML_MODEL_DIR=str(packaged)):
            score = _load_score_py(packaged)
            score.init()
            status, response = score.score(json.dumps(request))
        print(f"    HTTP {status}: {json.dumps(response)[:200]}")
        summary["score"] = {"status": status, "response": response}
        if status != 200:
            raise FerrotuneError(f"the packaged score.py answered {status}: {response}")

    summary["seconds"] = round(time.perf_counter() - t_start, 2)
    (work / "demo_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"done in {summary['seconds']:.0f} s. Data: {data_dir}; adapter: {res.adapter_dir}; merged: {res.merged_dir};")
    print(f"  MLflow model: {packaged}; request: {work / 'sample_score.json'}; summary: {work / 'demo_summary.json'}")
    return summary


def main(argv: Optional[list] = None) -> int:
    from . import _cli_errors

    p = _cli_errors.Parser(prog="python -m ferrotune.demo", description=DESCRIPTION)
    add_arguments(p)
    return run(_cli_errors.parse_args(p, argv))


if __name__ == "__main__":
    sys.exit(main())
