"""Split discovery equals `datasets.get_dataset_split_names` on repos without YAML configs
(file-name conventions) and with several configs."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ferrotune
from tests.conftest import hf_json


def parquet_bytes(n: int, tag: str) -> bytes:
    t = pa.table({"text": [f"{tag}-{i}" for i in range(n)], "id": list(range(n))})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


LAYOUTS = {
    "org/sharded": {
        "README.md": b"# no yaml here\n",
        "data/train-00000-of-00002.parquet": parquet_bytes(5, "a"),
        "data/train-00001-of-00002.parquet": parquet_bytes(5, "b"),
        "data/validation-00000-of-00001.parquet": parquet_bytes(3, "v"),
        "data/extra_split-00000-of-00001.parquet": parquet_bytes(2, "x"),
        "data/test-00000-of-00001.parquet": parquet_bytes(4, "t"),
    },
    "org/keywords": {
        "train.parquet": parquet_bytes(5, "a"),
        "dev.parquet": parquet_bytes(3, "v"),
        "test.parquet": parquet_bytes(4, "t"),
    },
    "org/single": {"stuff.parquet": parquet_bytes(7, "s")},
}


@pytest.mark.parametrize("repo_id", sorted(LAYOUTS))
def test_inferred_split_names_match_datasets(hub, hf_env, repo_id):
    hub.add_repo(repo_id, LAYOUTS[repo_id], repo_type="dataset")
    ref = hf_json(f"import json, datasets; print(json.dumps(datasets.get_dataset_split_names({repo_id!r})))", hf_env)
    assert ferrotune.split_names(repo_id) == ref


def test_several_configs(hub, hf_env, tmp_path):
    card = (
        "---\nconfigs:\n- config_name: small\n  data_files:\n  - split: train\n    path: small/*.parquet\n"
        "- config_name: big\n  default: true\n  data_files:\n  - split: train\n    path: big/train-*\n  - split: test\n    path: big/test-*\n---\n"
    )
    files = {
        "README.md": card.encode(),
        "small/a.parquet": parquet_bytes(4, "s"),
        "big/train-0.parquet": parquet_bytes(10, "bt"),
        "big/test-0.parquet": parquet_bytes(6, "bs"),
    }
    hub.add_repo("org/multi", files, repo_type="dataset")
    for subset in (None, "small", "big"):
        ref = hf_json(f"import json, datasets; print(json.dumps(datasets.get_dataset_split_names('org/multi', {subset!r})))", hf_env)
        assert ferrotune.split_names("org/multi", subset=subset) == ref
    r = ferrotune.download_dataset("org/multi", tmp_path, split_pc=50, subset="small", progress=False)
    assert r["train"].rows == 2 and r["train"].total_rows == 4


def test_non_parquet_data_is_a_clear_error(hub, hf_env, tmp_path):
    hub.add_repo("org/jsonl", {"train.jsonl": b'{"a":1}\n'}, repo_type="dataset")
    with pytest.raises(ferrotune.DatasetError, match="Parquet data files only"):
        ferrotune.download_dataset("org/jsonl", tmp_path, split_pc=5, progress=False)


def test_corrupt_parquet_is_a_data_format_error(hub, hf_env, tmp_path):
    hub.add_repo("org/broken", {"data/train-00000-of-00001.parquet": b"PAR1" + b"\0" * 5000 + b"garbage!"}, repo_type="dataset")
    with pytest.raises(ferrotune.DataFormatError, match="train-00000-of-00001.parquet: not a readable Parquet file"):
        ferrotune.download_dataset("org/broken", tmp_path / "o", split_pc=5, progress=False)
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []
