"""``ferrotune demo``: the main job on an embedded default, fully offline.

A small ultrachat_200k-schema sample (all four splits, several shards) and a Phi-3
tokenizer stand-in ship inside the package. The demo lays the sample out as a Hugging Face
cache snapshot in a work folder, runs the real download path with ``HF_HUB_OFFLINE=1`` —
the same code that serves ``HuggingFaceH4/ultrachat_200k`` online — then renders,
tokenizes, labels and packs ``train_sft`` with the Phi-3 chat template, and prints what it
wrote.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Optional

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=None, help="where to put the demo's cache and outputs (default: a temp folder)")
    p.add_argument("--split-pc", default="5", help="percentage of each split to keep (default 5, as in the notebook)")
    p.add_argument("--max-seq-length", type=int, default=2048, help="packed row length for the tokenize step (default 2048)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ._download import download_dataset

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ferrotune-demo-"))
    cache = work / "hf-cache"
    out_dir = work / "ultrachat_200k_dataset"
    repo = seed_cache(cache)
    saved = {k: os.environ.get(k) for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    os.environ["HF_HUB_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        print(f"ferrotune demo — offline, bundled sample '{repo}' (ultrachat_200k schema)")
        print(f"  step 1/2  download-dataset --dataset_split_pc {args.split_pc} --download_dir {out_dir}")
        t0 = time.perf_counter()
        result = download_dataset(repo, out_dir, split_pc=args.split_pc, format="both", progress=not args.quiet)
        dt = time.perf_counter() - t0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for s in result.values():
        print(f"    {s.split:<10} {s.rows:>5} of {s.total_rows:>6} rows -> {s.paths['jsonl']}")
    print(f"  done in {dt:.2f} s. Artifacts: {out_dir}")
    first = next(iter(result.values()))
    with open(first.paths["jsonl"], encoding="ascii") as f:
        line = f.readline().strip()
    print(f"  first line of {first.split}.jsonl: {line[:120]}{'...' if len(line) > 120 else ''}")

    from ._tokenize import tokenize_dataset

    tokenizer = resources.files("ferrotune") / "_sample" / "phi3-tokenizer"
    train = result["train_sft"].paths["jsonl"] if "train_sft" in result else first.paths["jsonl"]
    packed = work / "train_sft.tokenized.parquet"
    print(f"  step 2/2  tokenize --tokenizer <bundled Phi-3 tokenizer> --train-file {train} --output {packed}")
    t0 = time.perf_counter()
    stats = tokenize_dataset(str(tokenizer), train, packed, max_seq_length=args.max_seq_length, progress=not args.quiet)
    dt = time.perf_counter() - t0
    print(f"    {stats.summary()}")
    print(f"  done in {dt:.2f} s.")
    print("  (LoRA training and packaging join this demo as they land)")
    return 0


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="ferrotune demo")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
