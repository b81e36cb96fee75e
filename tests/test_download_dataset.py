"""download_dataset against the original download-dataset.py (real `datasets`) on the same
fake Hub: identical bytes, identical row counts, and the cache/range-read strategies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ferrotune
from tests.conftest import REPO_ID, hf_json, run_peer

SPLITS = ["train_sft", "test_sft", "train_gen", "test_gen"]


def py_round_rows(pc: int, n: int) -> int:
    return int(round(pc * n / 100))


@pytest.mark.parametrize("pc", ["5", "10", "50"])
def test_jsonl_byte_identical_to_original_script_cold(hf_env, hub, tmp_path, pc):
    """Cold cache: ferrotune range-reads row groups; the peer downloads everything.
    5 % of 1210 (60.5), 10 % of 305 (30.5), 50 % of 1003 and 211 (501.5, 105.5) are ties
    that Python rounds to even."""
    ours = tmp_path / "ours"
    result = ferrotune.download_dataset(REPO_ID, ours, split_pc=int(pc), progress=False)
    # nothing was added to the HF cache by the range-read path (blobs stay empty)
    blobs = Path(hf_env["HF_HUB_CACHE"]) / "datasets--HuggingFaceH4--ultrachat_200k" / "blobs"
    assert [p.name for p in blobs.glob("*") if p.stat().st_size > 100_000] == []

    peer = tmp_path / "peer"
    run_peer(hf_env, peer, pc)
    assert list(result) == SPLITS
    for split in SPLITS:
        n = hub.synth["rows"][split]
        assert result[split].total_rows == n
        assert result[split].rows == py_round_rows(int(pc), n)
        a = (ours / f"{split}.jsonl").read_bytes()
        b = (peer / f"{split}.jsonl").read_bytes()
        assert a == b, f"{split}: first difference at byte {next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) if len(a) == len(b) else 'length'}"
        assert a.count(b"\n") == result[split].rows
    assert sorted(os.listdir(ours)) == sorted(f"{s}.jsonl" for s in SPLITS), "no temp files left"


def test_jsonl_byte_identical_warm_and_full(hf_env, hub, tmp_path):
    """After the peer filled the HF cache, ferrotune reads the cached shards (no file
    request at all) and still writes the same bytes; 100 % too."""
    peer = tmp_path / "peer"
    run_peer(hf_env, peer, "100")
    hub.clear_log()
    ours = tmp_path / "ours"
    result = ferrotune.download_dataset(REPO_ID, ours, split_pc=100, progress=False)
    file_requests = [r for r in hub.requests if r["route"] in ("resolve", "cdn")]
    assert [r["path"] for r in file_requests if "README" not in r["path"]] == []
    for split in SPLITS:
        assert result[split].rows == hub.synth["rows"][split]
        assert result[split].bytes_fetched == 0
        assert (ours / f"{split}.jsonl").read_bytes() == (peer / f"{split}.jsonl").read_bytes()


def test_full_download_fills_cache_that_hf_hub_finds(hf_env, hub, tmp_path):
    result = ferrotune.download_dataset(REPO_ID, tmp_path / "o", split_pc=5, full_download=True, progress=False)
    assert result["train_sft"].rows == py_round_rows(5, hub.synth["rows"]["train_sft"])
    shard = next(f for f in hub.synth["files"] if f.startswith("data/train_sft-"))
    code = (
        "import json; from huggingface_hub import hf_hub_download; "
        f"p = hf_hub_download({REPO_ID!r}, {shard!r}, repo_type='dataset', local_files_only=True); "
        "print(json.dumps(p))"
    )
    p = hf_json(code, hf_env)
    assert Path(p).read_bytes() == (hub.synth["dir"] / shard).read_bytes()


def test_parquet_output_has_same_rows(hf_env, hub, tmp_path):
    import pyarrow.parquet as pq

    result = ferrotune.download_dataset(REPO_ID, tmp_path, split_pc=10, format="both", progress=False)
    for split in SPLITS:
        t = pq.read_table(result[split].paths["parquet"])
        assert t.num_rows == result[split].rows
        assert t.column_names == ["prompt", "prompt_id", "messages"]
        # same rows as the JSON Lines file
        import json

        lines = Path(result[split].paths["jsonl"]).read_text().splitlines()
        assert [json.loads(line)["prompt_id"] for line in lines] == t.column("prompt_id").to_pylist()


def test_split_names_match_datasets(hf_env, hub):
    ref = hf_json("import json, datasets; print(json.dumps(datasets.get_dataset_split_names(%r)))" % REPO_ID, hf_env)
    assert ferrotune.split_names(REPO_ID) == ref == SPLITS


def test_subset_selection_and_unknown_split(hf_env, hub, tmp_path):
    with pytest.raises(ferrotune.DatasetError, match="subset 'nope' not found; available: default"):
        ferrotune.download_dataset(REPO_ID, tmp_path, split_pc=5, subset="nope", progress=False)
    with pytest.raises(ferrotune.DatasetError, match="available: train_sft, test_sft, train_gen, test_gen"):
        ferrotune.download_dataset(REPO_ID, tmp_path, split_pc=5, splits=["validation"], progress=False)
    r = ferrotune.download_dataset(REPO_ID, tmp_path / "o", split_pc=5, subset="default", splits=["test_gen"], progress=False)
    assert list(r) == ["test_gen"]
    assert os.listdir(tmp_path / "o") == ["test_gen.jsonl"]


@pytest.mark.parametrize("bad", [0, -1, 101, 100.5, "abc", "", True, None, float("nan"), [5]])
def test_invalid_split_pc_is_a_clear_value_error(hf_env, hub, tmp_path, bad):
    with pytest.raises(ferrotune.InvalidArgumentError, match="split_pc") as ei:
        ferrotune.download_dataset(REPO_ID, tmp_path / "o", split_pc=bad, progress=False)
    assert isinstance(ei.value, ValueError)
    assert not (tmp_path / "o").exists()


def test_fractional_pc_is_an_extension(hf_env, hub, tmp_path):
    r = ferrotune.download_dataset(REPO_ID, tmp_path, split_pc=2.5, splits=["train_sft"], progress=False)
    assert r["train_sft"].rows == round(2.5 * 1003 / 100)


def test_progress_callback_receives_events(hf_env, hub, tmp_path):
    events = []
    ferrotune.download_dataset(REPO_ID, tmp_path / "o", split_pc=5, progress=lambda *e: events.append(e))
    kinds = {e[0] for e in events}
    assert {"start", "advance", "finish", "message"} <= kinds
    rows = {}
    names = {e[1]: e[2] for e in events if e[0] == "start"}
    for e in events:
        if e[0] == "advance" and names.get(e[1]) in SPLITS:
            rows[names[e[1]]] = rows.get(names[e[1]], 0) + e[4]
    assert rows["train_sft"] == py_round_rows(5, 1003)


def test_progress_callback_error_stops_the_call(hf_env, hub, tmp_path):
    def boom(*e):
        raise RuntimeError("renderer broke")

    with pytest.raises(RuntimeError, match="renderer broke"):
        ferrotune.download_dataset(REPO_ID, tmp_path / "o", split_pc=5, progress=boom)
    # whatever was finished is complete; nothing half-written is left behind
    assert [p for p in os.listdir(tmp_path / "o") if not p.endswith(".jsonl")] == []


def test_python_m_module_with_original_flags(hf_env, hub, tmp_path):
    out = tmp_path / "ultrachat_200k_dataset"
    cmd = [sys.executable, "-m", "ferrotune.download_dataset", "--dataset", REPO_ID, "--download_dir", str(out), "--dataset_split_pc", "5"]
    r = subprocess.run(cmd, env={**os.environ, **hf_env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(f"{s}.jsonl" for s in SPLITS)
    assert f"train_sft: {py_round_rows(5, 1003)} of 1003 rows" in r.stdout


def test_console_command_and_clear_cli_errors(hf_env, hub, tmp_path):
    env = {**os.environ, **hf_env}
    ok = subprocess.run(
        [sys.executable, "-m", "ferrotune.cli", "download-dataset", "--dataset", REPO_ID, "--download_dir", str(tmp_path / "o"), "--dataset_split_pc", "5", "--quiet"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "ferrotune.cli", "download-dataset", "--dataset", REPO_ID, "--download_dir", str(tmp_path / "b"), "--dataset_split_pc", "5.5.5"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "--dataset_split_pc" in bad.stderr and "'5.5.5'" in bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert not (tmp_path / "b").exists()
    missing = subprocess.run(
        [sys.executable, "-m", "ferrotune.cli", "download-dataset", "--dataset", "nobody/nothing", "--download_dir", str(tmp_path / "m"), "--quiet"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert missing.returncode == 2 and "was not found" in missing.stderr and "Traceback" not in missing.stderr


def test_module_stays_callable_after_import(hf_env, hub, tmp_path):
    import importlib

    importlib.import_module("ferrotune.download_dataset")
    r = ferrotune.download_dataset(REPO_ID, tmp_path, split_pc=5, splits=["test_sft"], progress=False)
    assert r["test_sft"].rows == py_round_rows(5, 211)
