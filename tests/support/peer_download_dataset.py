"""Re-implementation of azureml-examples' ``download-dataset.py`` (the step ferrotune replaces).

Byte-equality reference and benchmark peer. Behaviour, as documented in
``/work/shared/notes/azureml-flow.md`` §1:

* ``--dataset`` (default ``samsum``), ``--dataset_subset`` (default none),
  ``--dataset_split_pc`` (a *string*, pasted verbatim into ``"{split}[0%:{pc}%]"``, default ``"5"``),
  ``--download_dir`` (default ``data``, created if missing);
* for every split that ``datasets.get_dataset_split_names`` reports, in that order, load the
  first ``pc`` percent of the split (``load_dataset(..., split=f"{split}[0%:{pc}%]")``) and write
  it with ``Dataset.to_json`` to ``{download_dir}/{split}.jsonl``.

Nothing is added on top (no shuffling, no retries, no validation of ``pc``), so its failure modes
are the original's too. Run it with ``HF_ENDPOINT`` pointing at a :class:`~tests.support.fakehub.FakeHub`::

    python tests/support/peer_download_dataset.py --dataset HuggingFaceH4/ultrachat_200k \
        --download_dir ultrachat_200k_dataset --dataset_split_pc 5
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download a percentage of every split of a Hugging Face dataset as JSON lines."
    )
    parser.add_argument("--dataset", type=str, default="samsum", help="dataset name on the Hub")
    parser.add_argument("--dataset_subset", type=str, default=None, help="dataset subset (config) name")
    parser.add_argument(
        "--dataset_split_pc",
        type=str,
        default="5",
        help="percentage of each split to download (pasted into the split slice as is)",
    )
    parser.add_argument("--download_dir", type=str, default="data", help="folder to write {split}.jsonl files to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # The original creates the folder before importing `datasets`.
    if not os.path.exists(args.download_dir):
        os.makedirs(args.download_dir)

    from datasets import get_dataset_split_names, load_dataset

    for split in get_dataset_split_names(args.dataset, args.dataset_subset):
        print(f"Loading {split} split of {args.dataset} dataset...")
        dataset = load_dataset(args.dataset, args.dataset_subset, split=f"{split}[0%:{args.dataset_split_pc}%]")
        dataset.to_json(os.path.join(args.download_dir, f"{split}.jsonl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
