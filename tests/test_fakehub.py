"""The fake Hub (tests/support/fakehub.py) and synthetic data (tests/support/synth.py) are faithful.

Real-library checks run ``huggingface_hub`` / ``datasets`` in a subprocess: both read
``HF_ENDPOINT`` and the cache locations at import time, so a fresh interpreter with the right
environment is the only robust way to point them at the fake.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pathlib
import re
import struct
import subprocess
import sys
import textwrap
import time
from urllib.parse import quote, unquote, urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.support import synth  # noqa: E402
from tests.support.fakehub import FakeHub, client_env, git_blob_sha1, lfs_pointer, repo_files_from_dir  # noqa: E402

DATASET = "HuggingFaceH4/ultrachat_200k"
MODEL = "org/tiny-model"
GATED = "org/gated-data"
PRIVATE = "org/private-data"
GOOD_TOKEN = "hf_good_token_aaaaaaaaaaaaaaaaaaaaaaaaa"
GRANTED_TOKEN = "hf_granted_token_bbbbbbbbbbbbbbbbbbbbbbb"
# huggingface_hub writes downloads in 10 MiB chunks: a drop only leaves resumable bytes past that.
BIG_SIZE = 12 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("synth") / "ultrachat_200k"
    synth.make_ultrachat_repo(out, rows=synth.SMALL_ROWS, row_group_size=100, seed=0)
    return out


@pytest.fixture(scope="module")
def module_hub(synth_dir: pathlib.Path):
    hub = FakeHub(valid_tokens={GOOD_TOKEN, GRANTED_TOKEN}, tree_page_size=4)
    hub.add_repo(DATASET, repo_files_from_dir(synth_dir), repo_type="dataset")
    rng = np.random.default_rng(1)
    big = {name: rng.integers(0, 256, size=BIG_SIZE, dtype=np.uint8).tobytes() for name in ("big1.bin", "big2.bin")}
    hub.add_repo(MODEL, {**synth.make_model_repo_files(), **big}, repo_type="model", extra_revisions={"v1.0": None})
    hub.big_files = big  # type: ignore[attr-defined]
    hub.add_repo(GATED, {"README.md": b"# gated\n", "data/x.parquet": b"PAR1" * 10}, repo_type="dataset")
    hub.set_gated(GATED, {GRANTED_TOKEN})
    hub.add_repo(PRIVATE, {"README.md": b"# private\n"}, repo_type="dataset", private=True)
    with hub:
        yield hub


@pytest.fixture
def hub(module_hub: FakeHub, synth_dir: pathlib.Path):
    module_hub.clear_faults()
    module_hub.clear_log()
    module_hub.synth_dir = synth_dir  # type: ignore[attr-defined]
    yield module_hub
    assert module_hub.errors == [], module_hub.errors[-1]["error"]
    # every request a client made was one the fake knows how to answer
    unrouted = [(e["method"], e["path"]) for e in module_hub.requests if e["route"] is None and e["fault"] != "status"]
    assert unrouted == []
    module_hub.clear_faults()


def run_py(code: str, env: dict[str, str], timeout: float = 120) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON object as its last stdout line."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def request(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    """One request without following redirects: (status, headers (lower-case keys), body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def unquote_path(p: str) -> str:
    """The percent-decoded path of a logged request, without its query."""
    return unquote(p.split("?", 1)[0])


def first_parquet(hub: FakeHub, split: str = "test_sft") -> str:
    return next(p for p in hub_files(hub) if p.startswith(f"data/{split}-"))


def hub_files(hub: FakeHub) -> list[str]:
    status, _, body = request(f"{hub.endpoint}/api/datasets/{DATASET}/revision/main")
    assert status == 200
    return [s["rfilename"] for s in json.loads(body)["siblings"]]


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------


def test_synth_layout_schema_and_card(synth_dir: pathlib.Path) -> None:
    names = sorted(p.name for p in (synth_dir / "data").iterdir())
    assert len(names) == 8
    for split, n_shards in synth.DEFAULT_SHARDS.items():
        shard_names = [n for n in names if n.startswith(split + "-")]
        assert len(shard_names) == n_shards
        for i, name in enumerate(sorted(shard_names)):
            assert re.fullmatch(rf"{split}-{i:05d}-of-{n_shards:05d}-[0-9a-f]{{16}}\.parquet", name), name
    total = {}
    for path in sorted((synth_dir / "data").glob("*.parquet")):
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.remove_metadata().equals(synth.SCHEMA), pf.schema_arrow
        assert pf.metadata.num_row_groups >= 2
        assert pf.metadata.row_group(0).column(0).compression == "SNAPPY"
        split = path.name.split("-")[0]
        total[split] = total.get(split, 0) + pf.metadata.num_rows
    assert total == synth.SMALL_ROWS

    text = (synth_dir / "README.md").read_text()
    assert text.startswith("---\n")
    card = yaml.safe_load(text.split("---\n")[1])
    configs = card["configs"][0]
    assert configs["config_name"] == "default"
    assert [d["split"] for d in configs["data_files"]] == list(synth.SPLITS)
    assert [d["path"] for d in configs["data_files"]] == [f"data/{s}-*" for s in synth.SPLITS]
    assert {s["name"]: s["num_examples"] for s in card["dataset_info"]["splits"]} == synth.SMALL_ROWS
    assert [f["name"] for f in card["dataset_info"]["features"]] == ["prompt", "prompt_id", "messages"]


def test_synth_rows_are_conversations_with_tricky_content(synth_dir: pathlib.Path) -> None:
    long_messages = 0
    odd = 0
    for split in synth.SPLITS:
        rows = list(synth.read_split_rows(synth_dir, split))
        assert len(rows) == synth.SMALL_ROWS[split]
        for r in rows:
            msgs = r["messages"]
            assert 2 <= len(msgs) <= 8
            assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) + ["user"] * (len(msgs) % 2)
            assert r["prompt"] == msgs[0]["content"]
            assert re.fullmatch(r"[0-9a-f]{64}", r["prompt_id"])
            assert r["prompt_id"] == hashlib.sha256(r["prompt"].encode()).hexdigest()
            long_messages += any(len(m["content"]) >= 100_000 for m in msgs)
            odd += len(msgs) % 2
        # The first 5 rows of every split (inside any 5 % prefix here) hold every tricky snippet.
        head = [m["content"] for r in rows[:5] for m in r["messages"]]
        for snippet in synth.TRICKY_SNIPPETS:
            assert any(snippet in c for c in head), (split, snippet)
        assert "" in head and "   leading and trailing spaces   " in head
        assert any(len(c) >= 100_000 for c in head)
        blob = "".join(head)
        chars = ["é", "ß", "中", "П", "😀", "🚀", "/", "\\", '"', "\x00", "\b", "\f", "\x1f", "\x7f", "\u2028", "\u2029"]
        for ch in chars + ["<", ">", "&", "<|user|>", "<s>"]:
            assert ch in blob, (split, ch)
        assert not rows[2]["prompt"].isascii()  # prompts are tricky too
    assert long_messages >= 4
    assert odd > 0


def test_synth_is_deterministic_and_sized(tmp_path: pathlib.Path) -> None:
    rows = {"train_sft": 120, "test_sft": 7, "train_gen": 0, "test_gen": 31}
    a = synth.make_ultrachat_repo(tmp_path / "a", rows=rows, row_group_size=16, seed=7)
    b = synth.make_ultrachat_repo(tmp_path / "b", rows=rows, row_group_size=16, seed=7)
    c = synth.make_ultrachat_repo(tmp_path / "c", rows=rows, row_group_size=16, seed=8, tricky=False)
    assert a["files"] == b["files"] and a["rows"] == rows
    for rel in a["files"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / a["files"][1]).read_bytes() != (tmp_path / "c" / c["files"][1]).read_bytes()
    assert pq.ParquetFile(tmp_path / "a" / a["shards"]["train_sft"][0]).metadata.num_row_groups == 3  # 40 rows / 16
    assert sum(pq.ParquetFile(tmp_path / "a" / p).metadata.num_rows for p in a["shards"]["train_gen"]) == 0
    chars = [sum(len(m["content"]) for m in r["messages"]) for r in synth.read_split_rows(tmp_path / "c", "train_sft")]
    assert 3000 < sum(chars) / len(chars) < 10000  # ~5.8 kB per conversation
    assert synth.shard_row_counts(207865, 3) == [69289, 69288, 69288]


def test_model_repo_files_are_valid_safetensors() -> None:
    files = synth.make_model_repo_files()
    st = files["model.safetensors"]
    assert 2_500_000 < len(st) < 3_500_000
    (n,) = struct.unpack("<Q", st[:8])
    header = json.loads(st[8 : 8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert 8 + n + end == len(st)
    assert json.loads(files["config.json"])["model_type"] == "phi3"
    assert "chat_template" in json.loads(files["tokenizer_config.json"])


# --------------------------------------------------------------------------------------------
# protocol, checked directly
# --------------------------------------------------------------------------------------------


def test_revision_endpoint(hub: FakeHub) -> None:
    status, headers, body = request(f"{hub.endpoint}/api/datasets/{DATASET}/revision/main")
    assert status == 200 and headers["content-type"].startswith("application/json")
    info = json.loads(body)
    assert info["id"] == DATASET and re.fullmatch(r"[0-9a-f]{40}", info["sha"])
    names = [s["rfilename"] for s in info["siblings"]]
    assert "README.md" in names and ".gitattributes" in names and sum(n.endswith(".parquet") for n in names) == 8
    # by commit sha, and the plain /api/datasets/{id} form
    assert json.loads(request(f"{hub.endpoint}/api/datasets/{DATASET}/revision/{info['sha']}")[2])["sha"] == info["sha"]
    assert json.loads(request(f"{hub.endpoint}/api/datasets/{DATASET}")[2])["sha"] == info["sha"]
    # blobs=true adds sizes and LFS info
    blobs = json.loads(request(f"{hub.endpoint}/api/datasets/{DATASET}/revision/main?blobs=true")[2])["siblings"]
    pq_entry = next(s for s in blobs if s["rfilename"].endswith(".parquet"))
    assert pq_entry["lfs"]["size"] == pq_entry["size"] and len(pq_entry["lfs"]["sha256"]) == 64
    # a tag (quoted) resolves to the same commit as main
    model_sha = json.loads(request(f"{hub.endpoint}/api/models/{MODEL}/revision/main")[2])["sha"]
    tag_url = f"{hub.endpoint}/api/models/{MODEL}/revision/{quote('refs/tags/v1.0', safe='')}"
    assert json.loads(request(tag_url)[2])["sha"] == model_sha


def test_tree_listing_pagination_and_subpaths(hub: FakeHub) -> None:
    url = f"{hub.endpoint}/api/datasets/{DATASET}/tree/main?recursive=true&expand=false"
    entries, pages = [], 0
    while url:
        status, headers, body = request(url)
        assert status == 200
        entries += json.loads(body)
        pages += 1
        link = headers.get("link")
        url = re.fullmatch(r'<(.+)>; rel="next"', link).group(1) if link else None
        if url:
            assert url.startswith(hub.endpoint + "/") and "cursor=" in url
    assert pages == 3  # 11 entries, 4 per page
    by_path = {e["path"]: e for e in entries}
    assert len(by_path) == len(entries) == 11
    assert by_path["data"]["type"] == "directory"
    readme = by_path["README.md"]
    assert "lfs" not in readme
    assert readme["oid"] == git_blob_sha1((hub.synth_dir / "README.md").read_bytes())  # type: ignore[attr-defined]
    parquet = next(e for p, e in by_path.items() if p.endswith(".parquet"))
    data = (hub.synth_dir / parquet["path"]).read_bytes()  # type: ignore[attr-defined]
    assert parquet["lfs"] == {
        "oid": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "pointerSize": len(lfs_pointer(hashlib.sha256(data).hexdigest(), len(data))),
    }
    assert parquet["size"] == len(data)
    assert parquet["oid"] == git_blob_sha1(lfs_pointer(parquet["lfs"]["oid"], len(data)))
    # sub-path with %2F or /, non-recursive root listing, a file path, a missing path
    sub_a = json.loads(request(f"{hub.endpoint}/api/datasets/{DATASET}/tree/main/data?limit=100")[2])
    assert {e["path"] for e in sub_a} <= {p for p in by_path if p.startswith("data/")}
    root = json.loads(request(f"{hub.endpoint}/api/datasets/{DATASET}/tree/main?recursive=false")[2])
    assert {e["path"] for e in root} == {".gitattributes", "README.md", "data"}
    one = json.loads(request(f"{hub.endpoint}/api/datasets/{DATASET}/tree/main/{quote(parquet['path'], safe='')}")[2])
    assert one == [parquet]
    one_slash = json.loads(request(f"{hub.endpoint}/api/datasets/{DATASET}/tree/main/{parquet['path']}")[2])
    assert one_slash == [parquet]
    status, headers, _ = request(f"{hub.endpoint}/api/datasets/{DATASET}/tree/main/nope")
    assert status == 404 and headers["x-error-code"] == "EntryNotFound"
    # paths-info
    form = "paths=README.md&paths=data&paths=missing.txt&expand=false".encode()
    status, _, body = request(
        f"{hub.endpoint}/api/datasets/{DATASET}/paths-info/main",
        "POST",
        {"Content-Type": "application/x-www-form-urlencoded"},
        form,
    )
    assert status == 200
    assert [(e["path"], e["type"]) for e in json.loads(body)] == [("README.md", "file"), ("data", "directory")]


def test_resolve_regular_file_with_ranges(hub: FakeHub) -> None:
    data = (hub.synth_dir / "README.md").read_bytes()  # type: ignore[attr-defined]
    commit = hub.commit_sha(DATASET)
    url = hub.resolve_url(DATASET, "README.md")
    status, headers, body = request(url, "HEAD", {"Accept-Encoding": "identity"})
    assert status == 200 and body == b""
    assert headers["etag"] == f'"{git_blob_sha1(data)}"'
    assert headers["x-repo-commit"] == commit and int(headers["content-length"]) == len(data)
    assert "x-xet-hash" not in headers and "x-linked-etag" not in headers
    assert request(url)[2] == data
    status, headers, body = request(url, headers={"Range": "bytes=10-19"})
    assert status == 206 and body == data[10:20] and headers["content-range"] == f"bytes 10-19/{len(data)}"
    status, _, body = request(url, headers={"Range": "bytes=-5"})
    assert status == 206 and body == data[-5:]
    status, headers, _ = request(url, headers={"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"
    # commit-sha revision and keep-alive: two requests on one connection
    parts = urlsplit(hub.resolve_url(DATASET, "README.md", revision=commit))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    for _ in range(2):
        conn.request("GET", parts.path)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == data
    conn.close()


def test_resolve_lfs_redirects_to_cdn(hub: FakeHub) -> None:
    path = first_parquet(hub)
    data = (hub.synth_dir / path).read_bytes()  # type: ignore[attr-defined]
    sha = hashlib.sha256(data).hexdigest()
    status, headers, _ = request(hub.resolve_url(DATASET, path), "HEAD", {"Authorization": f"Bearer {GOOD_TOKEN}"})
    assert status == 302
    assert headers["x-linked-etag"] == f'"{sha}"' and int(headers["x-linked-size"]) == len(data)
    assert headers["x-repo-commit"] == hub.commit_sha(DATASET) and headers["etag"]
    location = headers["location"]
    assert location.startswith(hub.cdn_endpoint + "/cdn/" + sha)
    assert urlsplit(location).port != hub.port
    status, cdn_headers, body = request(location)
    assert status == 200 and body == data and cdn_headers["etag"] == f'"{sha}"'
    status, cdn_headers, body = request(location, headers={"Range": "bytes=100-"})
    assert status == 206 and body == data[100:]
    assert cdn_headers["content-range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    # tampered signature -> 403; no Authorization ever reached the CDN so far
    assert request(location.replace("X-Amz-Signature=", "X-Amz-Signature=0"))[0] == 403
    assert hub.cdn_auth_headers == []
    request(location, headers={"Authorization": "Bearer leaked"})
    raw = urlsplit(location).path + "?" + urlsplit(location).query
    assert hub.cdn_auth_headers == [{"path": raw, "authorization": "Bearer leaked"}]


def test_error_codes(hub: FakeHub) -> None:
    e = hub.endpoint
    auth = {"Authorization": f"Bearer {GOOD_TOKEN}"}
    cases = [
        (f"{e}/datasets/{DATASET}/resolve/main/nope.py", {}, 404, "EntryNotFound"),
        (f"{e}/datasets/{DATASET}/resolve/deadbeef/README.md", {}, 404, "RevisionNotFound"),
        (f"{e}/api/datasets/{DATASET}/revision/nobranch", {}, 404, "RevisionNotFound"),
        (f"{e}/datasets/org/missing/resolve/main/README.md", {}, 401, "RepoNotFound"),
        (f"{e}/datasets/org/missing/resolve/main/README.md", auth, 404, "RepoNotFound"),
        (f"{e}/api/datasets/org/missing/revision/main", {}, 401, "RepoNotFound"),
        (f"{e}/api/models/missing-model/revision/main", auth, 404, "RepoNotFound"),
        (f"{e}/datasets/{PRIVATE}/resolve/main/README.md", {}, 401, "RepoNotFound"),
        (f"{e}/datasets/{GATED}/resolve/main/README.md", {}, 401, "GatedRepo"),
        (f"{e}/datasets/{GATED}/resolve/main/README.md", auth, 403, "GatedRepo"),
        (f"{e}/datasets/{DATASET}/resolve/main/README.md", {"Authorization": "Bearer wrong"}, 401, None),
    ]
    for url, headers, want_status, want_code in cases:
        status, got, _ = request(url, "HEAD", headers)
        assert (status, got.get("x-error-code")) == (want_status, want_code), url
        assert got.get("x-error-message"), url
    status, got, _ = request(f"{e}/datasets/{DATASET}/resolve/main/nope.py")
    assert got["x-repo-commit"] == hub.commit_sha(DATASET)
    status, got, _ = request(f"{e}/datasets/{DATASET}/resolve/main/README.md", headers={"Authorization": "Bearer x"})
    assert got["x-error-message"] == "Invalid credentials in Authorization header"
    assert "visit" in request(f"{e}/datasets/{GATED}/resolve/main/README.md", "GET", auth)[1]["x-error-message"].lower()
    granted = {"Authorization": f"Bearer {GRANTED_TOKEN}"}
    assert request(f"{e}/datasets/{GATED}/resolve/main/README.md", "GET", granted)[0] == 200
    assert request(f"{e}/datasets/{PRIVATE}/resolve/main/README.md", "GET", auth)[0] == 200


# --------------------------------------------------------------------------------------------
# faults, checked directly
# --------------------------------------------------------------------------------------------


def test_faults_direct(hub: FakeHub) -> None:
    path = first_parquet(hub)
    data = (hub.synth_dir / path).read_bytes()  # type: ignore[attr-defined]
    location = request(hub.resolve_url(DATASET, path), "HEAD")[1]["location"]

    hub.add_fault("corrupt", "/cdn/", port="cdn", offset=1000, length=3)
    status, _, body = request(location)
    assert status == 200 and len(body) == len(data) and body != data
    assert [i for i in range(len(data)) if body[i] != data[i]] == [1000, 1001, 1002]

    hub.add_fault("ignore_range", "/cdn/", port="cdn")
    status, _, body = request(location, headers={"Range": "bytes=100-"})
    assert status == 200 and body == data

    hub.add_fault("drop", "/cdn/", port="cdn", after_bytes=5000)
    with pytest.raises(http.client.IncompleteRead) as exc:
        request(location)
    assert len(exc.value.partial) == 5000 and exc.value.partial == data[:5000]

    fault = hub.add_fault("status", "README.md", times=2, status=503, retry_after=7)
    for _ in range(2):
        status, headers, _ = request(hub.resolve_url(DATASET, "README.md"), "HEAD")
        assert status == 503 and headers["retry-after"] == "7"
    assert request(hub.resolve_url(DATASET, "README.md"), "HEAD")[0] == 200 and fault.remaining == 0

    hub.add_fault("stall", "README.md", seconds=0.4)
    t0 = time.monotonic()
    assert request(hub.resolve_url(DATASET, "README.md"))[0] == 200
    assert time.monotonic() - t0 >= 0.4

    hub.add_fault("bad_etag", path, etag="../../etc/passwd")
    headers = request(hub.resolve_url(DATASET, path), "HEAD")[1]
    assert headers["x-linked-etag"] == '"../../etc/passwd"'

    hub.add_fault("traversal_tree", "/tree/")
    listed = json.loads(request(f"{hub.endpoint}/api/datasets/{DATASET}/tree/main?recursive=true")[2])
    assert {"../evil.parquet", "/abs/path.parquet"} <= {e["path"] for e in listed}

    log = hub.requests
    assert [e["fault"] for e in log if e["fault"]] == [
        "corrupt", "ignore_range", "drop", "status", "status", "stall", "bad_etag", "traversal_tree",
    ]  # fmt: skip
    assert all(e["port"] in ("hub", "cdn") and e["status"] for e in log)
    with pytest.raises(ValueError):
        hub.add_fault("explode")


# --------------------------------------------------------------------------------------------
# the real libraries against the fake
# --------------------------------------------------------------------------------------------


def test_hf_hub_download_cache_layout(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    files = synth.make_model_repo_files()
    parquet = first_parquet(hub)
    env = client_env(hub, tmp_path / "home", token=GOOD_TOKEN)
    out = run_py(
        f"""
        import json, os
        from huggingface_hub import hf_hub_download
        paths = [
            hf_hub_download({MODEL!r}, "model.safetensors"),
            hf_hub_download({MODEL!r}, "config.json"),
            hf_hub_download({DATASET!r}, {parquet!r}, repo_type="dataset"),
        ]
        print(json.dumps({{"paths": paths}}))
        """,
        env,
    )
    cache = tmp_path / "home" / "hub"
    model_dir = cache / "models--org--tiny-model"
    commit = hub.commit_sha(MODEL, repo_type="model")
    assert (model_dir / "refs" / "main").read_text() == commit
    st_path = model_dir / "snapshots" / commit / "model.safetensors"
    sha256 = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert out["paths"][0] == str(st_path)
    assert os.readlink(st_path) == f"../../blobs/{sha256}"
    assert (model_dir / "blobs" / sha256).read_bytes() == files["model.safetensors"]
    cfg_blob = git_blob_sha1(files["config.json"])
    assert os.readlink(model_dir / "snapshots" / commit / "config.json") == f"../../blobs/{cfg_blob}"
    data_dir = cache / "datasets--HuggingFaceH4--ultrachat_200k"
    target = os.readlink(data_dir / "snapshots" / hub.commit_sha(DATASET) / parquet)
    assert target.startswith("../../../blobs/") and len(target.rsplit("/", 1)[1]) == 64
    assert (cache / ".locks" / "models--org--tiny-model").is_dir()
    # the token went to the Hub, never to the CDN
    assert any(e["headers"].get("Authorization") == f"Bearer {GOOD_TOKEN}" for e in hub.find_requests(port="hub"))
    assert hub.find_requests(port="cdn", method="GET") and hub.cdn_auth_headers == []


def test_list_repo_tree_paginates_and_hffs_reads(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    parquet = first_parquet(hub, "test_gen")
    env = client_env(hub, tmp_path / "home")
    out = run_py(
        f"""
        import json
        import pyarrow.parquet as pq
        from huggingface_hub import HfApi, HfFileSystem
        tree = [e.path for e in HfApi().list_repo_tree({DATASET!r}, repo_type="dataset", recursive=True)]
        fs = HfFileSystem()
        info = fs.info("datasets/{DATASET}/{parquet}")
        with fs.open("datasets/{DATASET}/{parquet}", block_size=64 * 1024) as f:
            n = pq.ParquetFile(f).metadata.num_rows
        print(json.dumps({{"tree": tree, "size": info["size"], "rows": n,
                           "glob": sorted(fs.glob("datasets/{DATASET}/data/train_sft-*"))}}))
        """,
        env,
    )
    assert len(out["tree"]) == len(set(out["tree"])) == 11
    assert out["size"] == (hub.synth_dir / parquet).stat().st_size  # type: ignore[attr-defined]
    assert out["rows"] == synth.SMALL_ROWS["test_gen"]
    assert len(out["glob"]) == 3
    tree_gets = hub.find_requests(method="GET", path_contains=f"/api/datasets/{DATASET}/tree/main?")
    assert len([e for e in tree_gets if "cursor=" in e["path"]]) >= 2
    ranged = [e for e in hub.find_requests(port="cdn") if "range" in e["headers"]]
    assert ranged and all(e["status"] == 206 for e in ranged)
    assert hub.cdn_auth_headers == []


def test_hf_errors_map_to_exceptions(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    env = client_env(hub, tmp_path / "home")
    out = run_py(
        f"""
        import json
        from huggingface_hub import hf_hub_download
        def name(**kw):
            try:
                hf_hub_download(**kw)
                return "ok"
            except Exception as e:
                return type(e).__name__ + ("|invalid-credentials" if "Invalid credentials" in str(e) else "")
        print(json.dumps([
            name(repo_id={DATASET!r}, filename="nope.txt", repo_type="dataset"),
            name(repo_id={DATASET!r}, filename="README.md", repo_type="dataset", revision="nobranch"),
            name(repo_id="org/missing", filename="README.md", repo_type="dataset"),
            name(repo_id={GATED!r}, filename="README.md", repo_type="dataset"),
            name(repo_id={GATED!r}, filename="README.md", repo_type="dataset", token={GOOD_TOKEN!r}),
            name(repo_id={GATED!r}, filename="README.md", repo_type="dataset", token={GRANTED_TOKEN!r}),
            name(repo_id={DATASET!r}, filename="README.md", repo_type="dataset", token="hf_bad"),
        ]))
        """,
        env,
    )
    assert out == [
        "RemoteEntryNotFoundError",
        "RevisionNotFoundError",
        "RepositoryNotFoundError",
        "GatedRepoError",
        "GatedRepoError",
        "ok",
        "HfHubHTTPError|invalid-credentials",
    ]
    # the 404 was cached as .no_exist under the commit
    no_exist = tmp_path / "home" / "hub" / "datasets--HuggingFaceH4--ultrachat_200k" / ".no_exist"
    assert (no_exist / hub.commit_sha(DATASET) / "nope.txt").is_file()


def test_datasets_split_names(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    env = client_env(hub, tmp_path / "home")
    out = run_py(
        f"""
        import json
        from datasets import get_dataset_split_names
        print(json.dumps(get_dataset_split_names({DATASET!r})))
        """,
        env,
    )
    assert out == list(synth.SPLITS)
    missing = [e for e in hub.find_requests(path_contains="/resolve/") if e["status"] == 404]
    probed = {unquote_path(e["path"]).rsplit("/", 1)[-1] for e in missing}
    assert {"ultrachat_200k.py", ".huggingface.yaml"} <= probed


def test_peer_script_writes_percent_prefix_of_every_split(
    hub: FakeHub, tmp_path: pathlib.Path, synth_dir: pathlib.Path
) -> None:
    env = client_env(hub, tmp_path / "home")
    out_dir = tmp_path / "out" / "ultrachat_200k_dataset"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tests" / "support" / "peer_download_dataset.py"),
            "--dataset", DATASET, "--download_dir", str(out_dir), "--dataset_split_pc", "5",
        ],  # fmt: skip
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{s}.jsonl" for s in synth.SPLITS)
    expected_counts = {"train_sft": 50, "test_sft": 11, "train_gen": 60, "test_gen": 15}  # 60.5 -> 60: half-even
    for split, n in synth.SMALL_ROWS.items():
        assert int(round(5 * n / 100)) == expected_counts[split]
        raw = (out_dir / f"{split}.jsonl").read_bytes()
        lines = raw.split(b"\n")
        assert lines[-1] == b"" and len(lines) - 1 == expected_counts[split]
        assert raw.isascii()  # pandas escapes every non-ASCII character
        want = list(synth.read_split_rows(synth_dir, split))[: expected_counts[split]]
        got = [json.loads(line) for line in lines[:-1]]
        assert got == want
        assert all(list(r) == ["prompt", "prompt_id", "messages"] for r in got)
    text = (out_dir / "test_sft.jsonl").read_text()
    # pandas (ujson) escapes: short forms for \b \f \n \r \t \" \\ and \/, \u00XX for other C0 controls,
    # \uXXXX (surrogate pairs for astral) for all non-ASCII; DEL stays raw.
    for escaped in ["\\/", "\\u00e9", "\\ud83d\\ude00", "\\u2028", "\\u0000", "\\b", "\\f", "\\u000b", "\\u001f",
                    "\x7f", '\\"']:  # fmt: skip
        assert escaped in text, escaped


def test_status_faults_are_retried_by_huggingface_hub(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    files = synth.make_model_repo_files()
    head_fault = hub.add_fault("status", "config.json", times=1, method="HEAD", status=500)
    cdn_fault = hub.add_fault("status", "/cdn/", times=1, port="cdn", method="GET", status=429, retry_after=0)
    env = client_env(hub, tmp_path / "home")
    out = run_py(
        f"""
        import json
        from huggingface_hub import hf_hub_download
        a = hf_hub_download({MODEL!r}, "config.json")
        b = hf_hub_download({MODEL!r}, "model.safetensors")
        print(json.dumps([open(a, "rb").read().hex(), open(b, "rb").read().hex()]))
        """,
        env,
    )
    assert bytes.fromhex(out[0]) == files["config.json"] and bytes.fromhex(out[1]) == files["model.safetensors"]
    assert head_fault.remaining == 0 and cdn_fault.remaining == 0
    heads = [e["status"] for e in hub.find_requests(method="HEAD", path_contains="config.json")]
    assert heads[:2] == [500, 200]
    assert [e["status"] for e in hub.find_requests(port="cdn", method="GET")] == [429, 200]


def test_dropped_downloads_resume_or_restart(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    big = hub.big_files  # type: ignore[attr-defined]
    sha1, sha2 = (hashlib.sha256(big[n]).hexdigest() for n in ("big1.bin", "big2.bin"))
    cut = 10 * 1024 * 1024 + 4096
    # big1: dropped past the first 10 MiB chunk, then resumed with a Range request (206)
    hub.add_fault("drop", sha1, port="cdn", after_bytes=cut)
    # big2: dropped, then the Range request is answered 200 with the whole file (client starts over)
    hub.add_fault("drop", sha2, port="cdn", after_bytes=cut)
    hub.add_fault("ignore_range", sha2, port="cdn")
    env = client_env(hub, tmp_path / "home")
    out = run_py(
        f"""
        import json, hashlib
        from huggingface_hub import hf_hub_download
        paths = [hf_hub_download({MODEL!r}, name) for name in ("big1.bin", "big2.bin")]
        print(json.dumps([hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]))
        """,
        env,
    )
    assert out == [sha1, sha2]
    chunk = 10 * 1024 * 1024
    log1 = hub.find_requests(port="cdn", path_contains=sha1)
    assert [(e["status"], e["fault"], e["bytes"]) for e in log1] == [(200, "drop", cut), (206, None, BIG_SIZE - chunk)]
    assert log1[1]["headers"].get("range") == f"bytes={chunk}-"
    log2 = hub.find_requests(port="cdn", path_contains=sha2)
    assert [(e["status"], e["fault"], e["bytes"]) for e in log2] == [
        (200, "drop", cut),
        (200, "ignore_range", BIG_SIZE),
    ]
    assert log2[1]["headers"].get("range") == f"bytes={chunk}-"


def test_small_dropped_download_is_retried_from_scratch(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    """Below one 10 MiB chunk nothing was written yet, so huggingface_hub retries without Range.

    A connection *reset* (rather than a clean close) is not retried by huggingface_hub 2.4: its
    ``http_get`` only catches ConnectError / TimeoutException / RemoteProtocolError, and a reset
    surfaces as ``httpx2.ReadError``.
    """
    model = synth.make_model_repo_files()["model.safetensors"]
    sha = hashlib.sha256(model).hexdigest()
    hub.add_fault("drop", sha, port="cdn", after_bytes=100_000)
    env = client_env(hub, tmp_path / "home")
    code = f"""
        import json, hashlib
        from huggingface_hub import hf_hub_download
        try:
            path = hf_hub_download({MODEL!r}, "model.safetensors")
            print(json.dumps(hashlib.sha256(open(path, "rb").read()).hexdigest()))
        except Exception as e:
            print(json.dumps(type(e).__name__))
        """
    assert run_py(code, env) == sha
    log = hub.find_requests(port="cdn", path_contains=sha)
    assert [(e["status"], e["fault"]) for e in log] == [(200, "drop"), (200, None)]
    assert "range" not in log[1]["headers"]

    hub.clear_log()
    hub.add_fault("drop", sha, port="cdn", after_bytes=100_000, rst=True)
    assert run_py(code, client_env(hub, tmp_path / "home2")) == "ReadError"
    assert [(e["status"], e["fault"]) for e in hub.find_requests(port="cdn", path_contains=sha)] == [(200, "drop")]


def test_cli_serves_a_synth_folder(synth_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fakehub", "--data", str(synth_dir), "--port", "0", "--cdn-port", "0"],
        cwd=str(REPO_ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("FAKEHUB_ENDPOINT=http://127.0.0.1:"), line
        endpoint = line.strip().split("=", 1)[1]
        status, _, body = request(f"{endpoint}/api/datasets/{DATASET}/revision/main")
        assert status == 200
        assert sum(s["rfilename"].endswith(".parquet") for s in json.loads(body)["siblings"]) == 8
        assert (synth_dir / ".fakehub-hashes.json").is_file()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0
