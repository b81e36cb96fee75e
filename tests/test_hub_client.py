"""The Rust Hub client against the fake Hub: cache interop with huggingface_hub, typed
errors, and fault handling (drops, corruption, 5xx/429, ignored Range, unsafe answers,
offline mode, Ctrl-C)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ferrotune
from tests.conftest import REPO_ID, hf_json
from tests.support import synth

MODEL = "tiny-org/tiny-phi3"


@pytest.fixture
def model_hub(hub, hf_env):
    """Adds a small model repo (a 3 MB LFS safetensors and JSON files) to the fake Hub."""
    files = synth.make_model_repo_files(weights_size=3 * 1024 * 1024)
    commit = hub.add_repo(MODEL, files, repo_type="model", lfs_min_size=1024 * 1024)
    hub.model_files = files
    hub.model_commit = commit
    return hub


def cache_root(env) -> Path:
    return Path(env["HF_HUB_CACHE"])


def test_model_files_land_in_hf_layout(model_hub, hf_env):
    p = ferrotune.hub_download(MODEL, "model.safetensors")
    data = model_hub.model_files["model.safetensors"]
    assert Path(p).read_bytes() == data
    sha = hashlib.sha256(data).hexdigest()
    repo = cache_root(hf_env) / "models--tiny-org--tiny-phi3"
    assert (repo / "blobs" / sha).is_file()
    link = repo / "snapshots" / model_hub.model_commit / "model.safetensors"
    assert os.readlink(link) == f"../../blobs/{sha}"
    assert (repo / "refs" / "main").read_text() == model_hub.model_commit
    # a regular (non-LFS) file is verified against its git blob sha1
    cfg = ferrotune.hub_download(MODEL, "config.json")
    assert Path(cfg).read_bytes() == model_hub.model_files["config.json"]
    assert not list((repo / "blobs").glob("*.incomplete"))


def test_token_goes_to_hub_but_never_to_cdn(model_hub, hf_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    ferrotune.hub_download(MODEL, "model.safetensors")
    assert model_hub.cdn_auth_headers == []
    heads = model_hub.find_requests(port="hub", method="HEAD")
    assert heads and all(r["headers"].get("authorization") == "Bearer hf_secret" for r in heads)
    assert model_hub.find_requests(port="cdn"), "LFS bytes came from the CDN port"


def test_ferrotune_download_is_found_by_huggingface_hub(model_hub, hf_env):
    ferrotune.hub_download(MODEL, "model.safetensors")
    code = (
        "import json; from huggingface_hub import hf_hub_download; "
        f"print(json.dumps(hf_hub_download({MODEL!r}, 'model.safetensors', local_files_only=True)))"
    )
    p = hf_json(code, hf_env)
    assert Path(p).read_bytes() == model_hub.model_files["model.safetensors"]


def test_huggingface_hub_download_is_reused_without_a_request(model_hub, hf_env):
    code = (
        "import json; from huggingface_hub import hf_hub_download; "
        f"print(json.dumps(hf_hub_download({MODEL!r}, 'model.safetensors', revision={model_hub.model_commit!r})))"
    )
    theirs = hf_json(code, hf_env)
    model_hub.clear_log()
    ours = ferrotune.hub_download(MODEL, "model.safetensors", revision=model_hub.model_commit)
    assert model_hub.requests == [], "a pinned commit in the cache needs no request"
    assert Path(ours).resolve() == Path(theirs).resolve()
    # by branch name: one metadata request, no file bytes
    model_hub.clear_log()
    ferrotune.hub_download(MODEL, "model.safetensors")
    assert model_hub.find_requests(port="cdn") == []
    assert [r for r in model_hub.requests if r["method"] == "GET"] == []


def test_parallel_ranges_for_large_files(model_hub, hf_env, monkeypatch):
    monkeypatch.setenv("FERROTUNE_PARALLEL_THRESHOLD", str(1 << 20))
    monkeypatch.setenv("FERROTUNE_PARALLEL_CONNECTIONS", "4")
    model_hub.add_fault("drop", path_contains="", port="cdn", times=1, after_bytes=1000)
    p = ferrotune.hub_download(MODEL, "model.safetensors")
    assert Path(p).read_bytes() == model_hub.model_files["model.safetensors"]
    ranges = [r["headers"].get("range") for r in model_hub.find_requests(port="cdn")]
    assert len([r for r in ranges if r]) >= 5, ranges  # 4 parts + the resumed one
    blobs = Path(p).resolve().parent
    assert not [x for x in os.listdir(blobs) if x.endswith((".partial", ".incomplete"))]


def test_dropped_connection_resumes_with_range(model_hub, hf_env):
    model_hub.add_fault("drop", port="cdn", times=2, after_bytes=700_000)
    p = ferrotune.hub_download(MODEL, "model.safetensors")
    assert Path(p).read_bytes() == model_hub.model_files["model.safetensors"]
    ranges = [r["headers"].get("range") for r in model_hub.find_requests(port="cdn")]
    assert ranges[0] is None and ranges[1] == "bytes=700000-", ranges


def test_dropped_connection_with_reset_resumes(model_hub, hf_env):
    model_hub.add_fault("drop", port="cdn", times=1, after_bytes=123_456, rst=True)
    p = ferrotune.hub_download(MODEL, "model.safetensors")
    assert Path(p).read_bytes() == model_hub.model_files["model.safetensors"]


def test_server_ignoring_range_restarts_from_zero(model_hub, hf_env):
    model_hub.add_fault("drop", port="cdn", times=1, after_bytes=500_000)
    model_hub.add_fault("ignore_range", port="cdn", times=1)
    p = ferrotune.hub_download(MODEL, "model.safetensors")
    assert Path(p).read_bytes() == model_hub.model_files["model.safetensors"]


def test_corrupted_bytes_are_detected_and_retried(model_hub, hf_env):
    model_hub.add_fault("corrupt", port="cdn", times=1)
    p = ferrotune.hub_download(MODEL, "model.safetensors")
    assert Path(p).read_bytes() == model_hub.model_files["model.safetensors"]
    assert len(model_hub.find_requests(port="cdn")) == 2


def test_persistent_corruption_is_never_cached(model_hub, hf_env, monkeypatch):
    monkeypatch.setenv("FERROTUNE_HUB_MAX_RETRIES", "2")
    model_hub.add_fault("corrupt", port="cdn", times=None)
    with pytest.raises(ferrotune.IntegrityError, match="nothing was cached"):
        ferrotune.hub_download(MODEL, "model.safetensors")
    repo = cache_root(hf_env) / "models--tiny-org--tiny-phi3"
    assert [p.name for p in (repo / "blobs").iterdir()] == []
    assert not (repo / "snapshots" / model_hub.model_commit / "model.safetensors").exists()


def test_transient_errors_back_off_then_succeed(model_hub, hf_env):
    model_hub.add_fault("status", port="cdn", status=503, times=2)
    model_hub.add_fault("status", method="HEAD", status=500, times=1)
    p = ferrotune.hub_download(MODEL, "model.safetensors")
    assert Path(p).read_bytes() == model_hub.model_files["model.safetensors"]


def test_429_retry_after_is_honoured(model_hub, hf_env):
    model_hub.add_fault("status", port="cdn", status=429, retry_after="1", times=1)
    t0 = time.monotonic()
    ferrotune.hub_download(MODEL, "model.safetensors")
    assert time.monotonic() - t0 >= 0.9
    cdn = model_hub.find_requests(port="cdn")
    assert [r["status"] for r in cdn][:2] == [429, 200]


def test_persistent_500_is_a_clear_error(model_hub, hf_env, monkeypatch):
    monkeypatch.setenv("FERROTUNE_HUB_MAX_RETRIES", "3")
    model_hub.add_fault("status", method="HEAD", status=500, times=None)
    with pytest.raises(ferrotune.HubHTTPError, match=r"failed after 4 attempts: HTTP 500") as ei:
        ferrotune.hub_download(MODEL, "model.safetensors")
    assert isinstance(ei.value, ConnectionError)
    assert len(model_hub.find_requests(method="HEAD")) == 4


def test_missing_repo_revision_and_file(model_hub, hf_env):
    with pytest.raises(ferrotune.RepositoryNotFoundError, match="'nobody/nothing' was not found"):
        ferrotune.hub_download("nobody/nothing", "config.json")
    with pytest.raises(ferrotune.RevisionNotFoundError, match="revision 'v9' was not found"):
        ferrotune.split_names(REPO_ID, revision="v9")
    with pytest.raises(ferrotune.EntryNotFoundError, match="'missing.bin' was not found"):
        ferrotune.hub_download(MODEL, "missing.bin")
    repo = cache_root(hf_env) / "models--tiny-org--tiny-phi3"
    assert (repo / ".no_exist" / model_hub.model_commit / "missing.bin").exists()
    with pytest.raises(ferrotune.InvalidArgumentError, match="not a valid dataset repo id"):
        ferrotune.split_names("../etc")


def test_gated_repo_and_bad_token(model_hub, hf_env, monkeypatch, tmp_path):
    model_hub.set_gated(MODEL, allowed_tokens={"hf_granted"}, repo_type="model")
    with pytest.raises(ferrotune.GatedRepoError, match="ask for access"):
        ferrotune.hub_download(MODEL, "config.json")
    with pytest.raises(ferrotune.GatedRepoError):
        ferrotune.hub_download(MODEL, "config.json", token="hf_not_granted")
    assert Path(ferrotune.hub_download(MODEL, "config.json", token="hf_granted")).is_file()


def test_invalid_token(hub, hf_env, tmp_path, monkeypatch):
    hub.valid_tokens = frozenset({"hf_good"})
    # the token file is used when HF_TOKEN is not set
    (Path(hf_env["HF_HOME"])).mkdir(parents=True, exist_ok=True)
    (Path(hf_env["HF_HOME"]) / "token").write_text("hf_bad\n")
    with pytest.raises(ferrotune.InvalidTokenError, match="token file"):
        ferrotune.split_names(REPO_ID)
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert ferrotune.split_names(REPO_ID)[0] == "train_sft"


def test_offline_with_and_without_cache(hub, hf_env, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ferrotune.OfflineNotCachedError, match="HF_HUB_OFFLINE") as ei:
        ferrotune.download_dataset(REPO_ID, tmp_path / "a", split_pc=5, progress=False)
    assert isinstance(ei.value, FileNotFoundError)
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    ferrotune.download_dataset(REPO_ID, tmp_path / "b", split_pc=5, full_download=True, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear_log()
    r = ferrotune.download_dataset(REPO_ID, tmp_path / "c", split_pc=5, progress=False)
    assert hub.requests == []
    for split, s in r.items():
        assert Path(s.path).read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()


def test_unreachable_hub_falls_back_to_cache(model_hub, hf_env, monkeypatch):
    ferrotune.hub_download(MODEL, "config.json")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("FERROTUNE_HUB_MAX_RETRIES", "0")
    # same cache; the endpoint changed, so the client cannot confirm `main`, and uses refs/main
    assert Path(ferrotune.hub_download(MODEL, "config.json")).is_file()
    with pytest.raises(ferrotune.HubHTTPError):
        ferrotune.hub_download(MODEL, "generation_config.json")


def test_path_traversal_in_tree_is_refused(hub, hf_env, tmp_path):
    hub.add_fault("traversal_tree", times=None)
    with pytest.raises(ferrotune.ProtocolError, match="unsafe file path"):
        ferrotune.download_dataset(REPO_ID, tmp_path / "o", split_pc=5, progress=False)
    assert not (tmp_path / "o").exists()
    assert not list(Path(hf_env["HF_HUB_CACHE"]).rglob("evil*"))


def test_bad_etag_is_refused(model_hub, hf_env):
    model_hub.add_fault("bad_etag", method="HEAD", times=None)
    with pytest.raises(ferrotune.ProtocolError, match="ETag"):
        ferrotune.hub_download(MODEL, "model.safetensors")
    assert not list(Path(hf_env["HF_HUB_CACHE"]).rglob("passwd"))


def test_ignored_range_during_prefix_read_falls_back_to_full_download(hub, hf_env, tmp_path):
    hub.add_fault("ignore_range", port="cdn", times=None)
    r = ferrotune.download_dataset(REPO_ID, tmp_path / "o", split_pc=5, splits=["test_sft"], progress=False)
    assert r["test_sft"].rows == round(5 * 211 / 100)
    # the shard went into the cache in full instead
    assert list((Path(hf_env["HF_HUB_CACHE"]) / "datasets--HuggingFaceH4--ultrachat_200k" / "blobs").iterdir())


def _interrupt_script(out: Path) -> str:
    return (
        "import ferrotune, sys\n"
        "try:\n"
        f"    ferrotune.download_dataset({REPO_ID!r}, {str(out)!r}, split_pc=100, full_download=True, progress=False)\n"
        "except KeyboardInterrupt:\n"
        "    print('KI', flush=True); sys.exit(130)\n"
    )


def test_ctrl_c_stops_promptly_and_leaves_no_final_file(hub, hf_env, tmp_path):
    hub.add_fault("stall", port="cdn", seconds=20, times=None)
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-c", _interrupt_script(out)], env={**os.environ, **hf_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not hub.find_requests(port="cdn") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 130, stderr
    assert "KI" in stdout
    assert time.monotonic() - t0 < 5, "Ctrl-C was not honoured promptly"
    assert not out.exists() or [p for p in os.listdir(out) if p.endswith(".jsonl")] == []
    blobs = Path(hf_env["HF_HUB_CACHE"]) / "datasets--HuggingFaceH4--ultrachat_200k" / "blobs"
    finals = [p for p in blobs.iterdir() if len(p.name) == 64] if blobs.exists() else []
    parquet_blobs = [p for p in finals if p.stat().st_size > 10_000]
    assert parquet_blobs == [], "a half-downloaded shard must not get its final name"


def test_stalled_server_times_out_and_retries(model_hub, hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    model_hub.add_fault("stall", port="cdn", seconds=3, times=1)
    t0 = time.monotonic()
    p = ferrotune.hub_download(MODEL, "model.safetensors")
    assert Path(p).read_bytes() == model_hub.model_files["model.safetensors"]
    assert time.monotonic() - t0 < 3, "the stalled request should time out after ~1 s and be retried"


def test_same_origin_redirect_is_followed_with_the_token(model_hub, hf_env, monkeypatch):
    """A redirect within the Hub (e.g. a renamed repo) is followed, token and all; only a
    redirect to another origin (the CDN) stops the metadata walk."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    target = "/" + model_hub.resolve_url(MODEL, "model.safetensors", revision=model_hub.model_commit, repo_type="model").split("/", 3)[3]
    model_hub.add_fault("status", method="HEAD", path_contains="/resolve/main/model.safetensors", status=307, headers={"Location": target}, times=1)
    p = ferrotune.hub_download(MODEL, "model.safetensors")
    assert Path(p).read_bytes() == model_hub.model_files["model.safetensors"]
    heads = model_hub.find_requests(port="hub", method="HEAD")
    assert [r["status"] for r in heads] == [307, 302]
    assert heads[1]["path"].startswith(target.split("?")[0])
    assert all(r["headers"].get("authorization") == "Bearer hf_secret" for r in heads)
    assert model_hub.cdn_auth_headers == []
