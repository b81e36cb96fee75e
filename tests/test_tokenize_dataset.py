"""``ferrotune.tokenize_dataset`` / ``load_tokenized`` / ``ferrotune tokenize`` end to end, on small
JSONL and Parquet files written here.

References: per-conversation ``ChatTokenizer.encode_chat`` (itself checked against
transformers 5.24 and TRL 0.19.1 in test_chat_parity.py / test_chat_labels.py; the pad-mode test
also compares with transformers directly), pyarrow for reading the output, and the contract in
the tokenization API notes for the stats, drop reasons, packing and errors.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ferrotune
from tests.support import chatgen
from tests.support import tokenizer_dirs as tdirs

COLUMNS = ("input_ids", "labels", "position_ids", "seq_lengths")
MESSAGE_TYPE = pa.struct([pa.field("content", pa.string()), pa.field("role", pa.string())])
ULTRACHAT_SCHEMA = pa.schema(
    [pa.field("prompt", pa.string()), pa.field("prompt_id", pa.string()), pa.field("messages", pa.list_(MESSAGE_TYPE))]
)
REASONS = ("empty", "single_message", "no_assistant", "unknown_role", "non_string_content", "template_error", "no_trainable_tokens")

# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows) -> Path:
    """One line per row: dicts as JSON (non-ASCII kept as UTF-8, like datasets' to_json), strings as is."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def write_parquet(path: Path, convs, row_group_size: int = 64) -> Path:
    """ultrachat_200k's schema: prompt, prompt_id, messages list<struct<content, role>>; None -> null."""
    prompts = [(c[0]["content"] if c else None) for c in convs]
    table = pa.table(
        {
            "prompt": pa.array(prompts, pa.string()),
            "prompt_id": pa.array([f"{i:064x}" for i in range(len(convs))], pa.string()),
            "messages": pa.array(
                [None if c is None else [{"content": m["content"], "role": m["role"]} for m in c] for c in convs],
                pa.list_(MESSAGE_TYPE),
            ),
        },
        schema=ULTRACHAT_SCHEMA,
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def rows_of(convs) -> list[dict]:
    return [{"prompt": c[0]["content"] if c else "", "messages": c, "prompt_id": str(i)} for i, c in enumerate(convs)]


def read_table(path: Path) -> pa.Table:
    path = Path(path)
    if path.suffix == ".parquet":
        return pq.read_table(path)
    with ipc.open_file(path) as r:  # Arrow IPC *file* format
        return r.read_all()


def table_rows(path: Path) -> list[dict[str, list[int]]]:
    return read_table(path).to_pylist()


def segments(row: dict) -> list[tuple[tuple, tuple]]:
    """(input_ids, labels) of every conversation in an output row, using seq_lengths."""
    out, pos = [], 0
    for n in row["seq_lengths"]:
        out.append((tuple(row["input_ids"][pos : pos + n]), tuple(row["labels"][pos : pos + n])))
        pos += n
    return out


def expected_encodings(tok, convs, max_seq_length, train_on="assistant"):
    """Per-conversation encode_chat, truncated; None for conversations that keep no trained token."""
    out = []
    for m in convs:
        try:
            e = tok.encode_chat(m, train_on=train_on, max_seq_length=max_seq_length)
        except ferrotune.ConversationError:
            # (allowed when truncation leaves nothing trainable, see test_chat_labels.py)
            e = tok.encode_chat(m, train_on=train_on)
            assert not (e["labels"][:max_seq_length] != -100).any()
            out.append(None)
            continue
        ids, labels = e["input_ids"].tolist(), e["labels"].tolist()
        out.append((ids, labels) if any(x != -100 for x in labels) else None)
    return out


def names_row(msg: str, index: int) -> bool:
    """Whether an error message names the row with this 0-based index. Whether rows are counted
    from 0 or 1 is not specified, so "row 4", "row 5", "line 5" and "file:5" all name index 4."""
    n = rf"({index}|{index + 1})"
    return re.search(rf"(\b(row|line|record)\D{{0,3}}|:){n}\b", msg) is not None


def nonzero(d: dict) -> dict:
    return {k: v for k, v in d.items() if v}


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in Path(d).iterdir())


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ds-tokenizers")
    return {
        "phi3": tdirs.phi3(base),
        "strict_template": tdirs.strict_template(base),
        "broken_template": tdirs.broken_template(base),
    }


@pytest.fixture(scope="module")
def tok(folders):
    return ferrotune.ChatTokenizer.from_pretrained(str(folders["phi3"]))


@pytest.fixture(scope="module")
def convs():
    return chatgen.conversations(120, 31, tricky=True, system=True)


# ---------------------------------------------------------------------------------------
# Stats and drop reasons
# ---------------------------------------------------------------------------------------

LONG_USER = " ".join(["token"] * 300)

CRAFTED = [
    ("empty", {"messages": []}),
    ("empty", {"messages": None}),
    ("single_message", {"messages": [{"role": "assistant", "content": "a lone reply"}]}),
    ("no_assistant", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
    ("no_assistant", {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}),
    (
        "unknown_role",
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "{}"}]},
    ),
    ("non_string_content", {"messages": [{"role": "user", "content": 123}, {"role": "assistant", "content": "a"}]}),
    # cut by max_seq_length=64 before the assistant turn starts
    ("no_trainable_tokens", {"messages": [{"role": "user", "content": LONG_USER}, {"role": "assistant", "content": "ok"}]}),
]


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_stats_and_drop_reasons(tmp_path, tok, convs, fmt):
    L = 64
    valid = rows_of(convs[:60])
    crafted = [r for _, r in CRAFTED]
    rows = []
    for i, r in enumerate(valid):  # a crafted row after every 7th valid one
        rows.append(r)
        if i % 7 == 6 and crafted:
            rows.append(crafted.pop(0))
    rows.extend(crafted)
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out" / f"tokenized.{fmt}"
    out.parent.mkdir()
    stats = ferrotune.tokenize_dataset(tok, str(src), str(out), max_seq_length=L)

    exp = expected_encodings(tok, convs[:60], L)
    kept = [e for e in exp if e is not None]
    full_lengths = [len(tok.encode_chat(m)["input_ids"]) for m in convs[:60]]
    expected_dropped = Counter(reason for reason, _ in CRAFTED)
    expected_dropped["no_trainable_tokens"] += sum(1 for e in exp if e is None)

    assert isinstance(stats, ferrotune.TokenizeStats)
    assert stats.rows_in == len(rows)
    assert nonzero(stats.dropped) == dict(expected_dropped)
    assert set(stats.dropped) <= set(REASONS)
    assert stats.rows_out == len(kept)
    assert stats.rows_in == stats.rows_out + sum(stats.dropped.values())
    assert stats.max_seq_length == L
    assert Path(stats.output).resolve() == out.resolve()
    assert listing(out.parent) == [out.name]  # no temp files left
    n_trunc_kept = sum(1 for e, n in zip(exp, full_lengths) if e is not None and n > L)
    # Whether a conversation dropped for no_trainable_tokens also counts as truncated is not
    # specified; both readings are accepted.
    assert stats.truncated in (n_trunc_kept, n_trunc_kept + expected_dropped["no_trainable_tokens"])
    assert n_trunc_kept > 0

    ds = ferrotune.load_tokenized(str(out))
    assert stats.rows_written == len(ds) == read_table(out).num_rows
    assert stats.total_tokens == sum(len(ids) for ids, _ in kept) == len(ds.input_ids)
    # the first token of every conversation is <|user|> / <|system|>, untrained anyway, so the
    # pack-mode rule "first token of a conversation -> -100" changes nothing here
    assert stats.trainable_tokens == sum(sum(1 for x in lab if x != -100) for _, lab in kept) == int((ds.labels != -100).sum())
    assert stats.packing_efficiency == pytest.approx(stats.total_tokens / (stats.rows_written * L))
    assert 0 < stats.packing_efficiency <= 1
    assert all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in stats.length_histogram.items())
    # The histogram's buckets are not specified; it counts either the conversations or the rows.
    assert sum(stats.length_histogram.values()) in (stats.rows_out, stats.rows_written)


def test_drop_reasons_from_parquet(tmp_path, tok, convs):
    # The same crafted rows in an ultrachat-shaped parquet file (a string column cannot hold 123,
    # so no non_string_content here; null messages -> "empty").
    crafted = [(reason, row["messages"]) for reason, row in CRAFTED if reason != "non_string_content"]
    data = list(convs[:20])
    for k, (_, msgs) in enumerate(crafted):
        data.insert(3 * k + 1, msgs)
    src = write_parquet(tmp_path / "train.parquet", data, row_group_size=5)
    stats = ferrotune.tokenize_dataset(tok, src, tmp_path / "o.parquet", max_seq_length=64)
    exp = expected_encodings(tok, convs[:20], 64)
    want = Counter(reason for reason, _ in crafted)
    want["no_trainable_tokens"] += exp.count(None)
    assert nonzero(stats.dropped) == dict(want)
    assert stats.rows_in == len(data)
    assert stats.rows_out == len(exp) - exp.count(None)
    rows = table_rows(tmp_path / "o.parquet")
    got = Counter(seg for r in rows for seg in segments(r))
    assert got == Counter((tuple(i), tuple([-100] + lab[1:])) for i, lab in (e for e in exp if e is not None))


def test_template_error_is_a_drop_reason(tmp_path, folders):
    tok = ferrotune.ChatTokenizer.from_pretrained(str(folders["strict_template"]))
    good = chatgen.conversations(10, 32, system=True)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    src = write_jsonl(tmp_path / "t.jsonl", rows_of(good[:5] + [bad] + good[5:]))
    stats = ferrotune.tokenize_dataset(tok, src, tmp_path / "o.parquet", max_seq_length=512)
    assert nonzero(stats.dropped) == {"template_error": 1}
    assert (stats.rows_in, stats.rows_out) == (11, 10)
    # strict=True: the template's message, the file and the row (0-based 5 / 1-based line 6)
    with pytest.raises(ferrotune.ConversationError) as ei:
        ferrotune.tokenize_dataset(tok, src, tmp_path / "o2.parquet", max_seq_length=512, strict=True)
    msg = str(ei.value)
    assert "t.jsonl" in msg and names_row(msg, 5), msg
    assert not (tmp_path / "o2.parquet").exists()


def test_broken_template_folder(tmp_path, folders, convs):
    src = write_jsonl(tmp_path / "t.jsonl", rows_of(convs[:3]))
    with pytest.raises(ferrotune.ChatTemplateError):
        ferrotune.tokenize_dataset(str(folders["broken_template"]), src, tmp_path / "o.parquet")
    assert listing(tmp_path) == ["t.jsonl"]


@pytest.mark.parametrize("reason,row", CRAFTED[:-1], ids=[f"{r}-{i}" for i, (r, _) in enumerate(CRAFTED[:-1])])
def test_strict_raises_naming_file_and_row(tmp_path, tok, convs, reason, row):
    rows = rows_of(convs[:4]) + [row] + rows_of(convs[4:8])
    src = write_jsonl(tmp_path / "strict-data.jsonl", rows)
    with pytest.raises(ferrotune.ConversationError) as ei:
        ferrotune.tokenize_dataset(tok, src, tmp_path / "o.parquet", max_seq_length=64, strict=True)
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert "strict-data.jsonl" in msg, msg
    assert names_row(msg, 4), msg  # the 5th row: 0-based 4, 1-based line 5
    assert listing(tmp_path) == ["strict-data.jsonl"]
    # without strict the row is dropped under its reason
    stats = ferrotune.tokenize_dataset(tok, src, tmp_path / "o.parquet", max_seq_length=64)
    assert stats.dropped.get(reason, 0) >= 1


def test_strict_no_trainable_tokens(tmp_path, tok):
    src = write_jsonl(tmp_path / "d.jsonl", [CRAFTED[-1][1]])
    with pytest.raises(ferrotune.ConversationError, match=r"d\.jsonl"):
        ferrotune.tokenize_dataset(tok, src, tmp_path / "o.arrow", max_seq_length=64, strict=True)


def test_strict_parquet_names_file_and_row(tmp_path, tok, convs):
    data = convs[:6] + [[{"role": "user", "content": "only one"}, {"role": "user", "content": "two"}]] + convs[6:9]
    src = write_parquet(tmp_path / "train_sft-00000-of-00001.parquet", data, row_group_size=4)
    with pytest.raises(ferrotune.ConversationError) as ei:
        ferrotune.tokenize_dataset(tok, src, tmp_path / "o.parquet", strict=True)
    msg = str(ei.value)
    assert "train_sft-00000-of-00001.parquet" in msg and names_row(msg, 6), msg
    stats = ferrotune.tokenize_dataset(tok, src, tmp_path / "o.parquet")
    assert nonzero(stats.dropped) == {"no_assistant": 1}


@pytest.mark.parametrize("progress", ["auto"])
def test_progress_argument(tmp_path, tok, convs, progress):
    # "auto" is the documented default (passed explicitly here).
    src = write_jsonl(tmp_path / "d.jsonl", rows_of(convs[:5]))
    stats = ferrotune.tokenize_dataset(tok, src, tmp_path / "o.parquet", max_seq_length=1024, progress=progress)
    assert stats.rows_out == 5


def test_strict_with_clean_data_succeeds(tmp_path, tok, convs):
    src = write_jsonl(tmp_path / "d.jsonl", rows_of(convs[:20]))
    stats = ferrotune.tokenize_dataset(tok, src, tmp_path / "o.parquet", max_seq_length=1024, strict=True)
    assert (stats.rows_in, stats.rows_out, nonzero(stats.dropped)) == (20, 20, {})


# ---------------------------------------------------------------------------------------
# Input format errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
def test_malformed_json_line(tmp_path, tok, convs, strict):
    lines = [json.dumps(r) for r in rows_of(convs[:5])]
    lines[2] = '{"messages": [{"role": "user", "content": "unterminated'
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ferrotune.DataFormatError) as ei:
        ferrotune.tokenize_dataset(tok, src, tmp_path / "out.parquet", strict=strict)
    msg = str(ei.value)
    assert str(src) in msg or "bad.jsonl" in msg, msg
    assert "line 3" in msg, msg
    assert isinstance(ei.value, ferrotune.DatasetError)
    assert listing(tmp_path) == ["bad.jsonl"]


def test_parquet_without_messages_column(tmp_path, tok):
    src = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "conversation": [[{"content": "x", "role": "user"}]]}), src)
    with pytest.raises(ferrotune.DataFormatError) as ei:
        ferrotune.tokenize_dataset(tok, src, tmp_path / "out.parquet")
    assert "wrong.parquet" in str(ei.value) and "messages" in str(ei.value)
    assert not (tmp_path / "out.parquet").exists()


def test_parquet_messages_of_the_wrong_type(tmp_path, tok):
    src = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"messages": ["[{\"role\": \"user\", \"content\": \"x\"}]"]}), src)
    with pytest.raises(ferrotune.DataFormatError) as ei:
        ferrotune.tokenize_dataset(tok, src, tmp_path / "out.parquet")
    assert "strings.parquet" in str(ei.value) and "messages" in str(ei.value)


# ---------------------------------------------------------------------------------------
# Output files and load_tokenized
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pack", "pad"])
@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_output_schema_and_load_tokenized(tmp_path, tok, convs, fmt, mode):
    src = write_jsonl(tmp_path / "d.jsonl", rows_of(convs))
    out = tmp_path / f"o.{fmt}"
    stats = ferrotune.tokenize_dataset(tok, src, out, max_seq_length=300, mode=mode)
    table = read_table(out)
    assert set(table.column_names) == set(COLUMNS)
    for name in COLUMNS:
        t = table.schema.field(name).type
        assert pa.types.is_list(t) and t.value_type == pa.int32(), (name, t)
    assert table.num_rows == stats.rows_written

    ds = ferrotune.load_tokenized(str(out))
    assert len(ds) == table.num_rows
    for name in ("input_ids", "labels", "position_ids"):
        arr = getattr(ds, name)
        assert isinstance(arr, np.ndarray) and arr.dtype == np.int32 and arr.ndim == 1
        col = table.column(name).combine_chunks()
        assert np.array_equal(arr, col.flatten().to_numpy(zero_copy_only=False)), name
    lengths = np.array([len(x) for x in table.column("input_ids").to_pylist()], dtype=np.int64)
    assert ds.row_offsets.dtype == np.int64
    assert np.array_equal(ds.row_offsets, np.concatenate([[0], np.cumsum(lengths)]))
    seq = table.column("seq_lengths").to_pylist()
    assert ds.seq_lengths.dtype == np.int32 and ds.seq_offsets.dtype == np.int64
    assert np.array_equal(ds.seq_lengths, np.array([x for r in seq for x in r], dtype=np.int32))
    assert np.array_equal(ds.seq_offsets, np.concatenate([[0], np.cumsum([len(r) for r in seq])]).astype(np.int64))
    rows = table.to_pylist()
    for i in (0, len(ds) // 2, len(ds) - 1):
        item = ds[i]
        assert set(item) >= set(COLUMNS)
        for name in COLUMNS:
            assert isinstance(item[name], np.ndarray)
            assert item[name].tolist() == rows[i][name], (i, name)
    with pytest.raises(IndexError):
        ds[len(ds)]


def same_content(a: Path, b: Path) -> bool:
    """Same columns and values (schema metadata, which may record the inputs, aside)."""
    return read_table(a).equals(read_table(b))


def test_jsonl_and_parquet_inputs_give_the_same_output(tmp_path, tok, convs):
    a = write_jsonl(tmp_path / "d.jsonl", rows_of(convs))
    b = write_parquet(tmp_path / "d.parquet", convs, row_group_size=17)
    c = write_jsonl(tmp_path / "d.json", rows_of(convs))  # *.json is JSON Lines too
    outs = []
    for i, src in enumerate((a, b, c)):
        out = tmp_path / f"o{i}.parquet"
        ferrotune.tokenize_dataset(tok, src, out, max_seq_length=512)
        outs.append(out)
    assert same_content(outs[0], outs[1]) and same_content(outs[0], outs[2])


def test_tokenizer_argument_may_be_a_folder(tmp_path, folders, tok, convs):
    src = write_jsonl(tmp_path / "d.jsonl", rows_of(convs[:40]))
    ferrotune.tokenize_dataset(tok, src, tmp_path / "a.parquet", max_seq_length=256)
    ferrotune.tokenize_dataset(str(folders["phi3"]), src, tmp_path / "b.parquet", max_seq_length=256)
    ferrotune.tokenize_dataset(folders["phi3"], [src], tmp_path / "c.parquet", max_seq_length=256)
    assert same_content(tmp_path / "a.parquet", tmp_path / "b.parquet")
    assert same_content(tmp_path / "a.parquet", tmp_path / "c.parquet")


def test_default_max_seq_length(tmp_path, folders, convs):
    src = write_jsonl(tmp_path / "d.jsonl", rows_of(convs[:10]))
    # tokenizer_config model_max_length 4096, no config.json
    stats = ferrotune.tokenize_dataset(str(folders["phi3"]), src, tmp_path / "a.parquet")
    assert stats.max_seq_length == 4096
    # config.json max_position_embeddings 2048 < model_max_length 4096
    d = tdirs.phi3_with_model_config(tmp_path / "tk")
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    cfg["max_position_embeddings"] = 2048
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    stats = ferrotune.tokenize_dataset(str(d), src, tmp_path / "b.parquet")
    assert stats.max_seq_length == 2048
    assert stats.packing_efficiency == pytest.approx(stats.total_tokens / (stats.rows_written * 2048))


# ---------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------


def test_pad_mode_rows_are_encode_chat_in_input_order(tmp_path, tok, convs, folders):
    L = 200
    # two files: rows of the first, then of the second
    a = write_jsonl(tmp_path / "a.jsonl", rows_of(convs[:70]))
    b = write_parquet(tmp_path / "b.parquet", convs[70:])
    stats = ferrotune.tokenize_dataset(tok, [a, b], tmp_path / "o.parquet", max_seq_length=L, mode="pad")
    exp = [e for e in expected_encodings(tok, convs, L) if e is not None]
    rows = table_rows(tmp_path / "o.parquet")
    assert stats.rows_in == len(convs)
    assert stats.rows_written == stats.rows_out == len(rows) == len(exp)
    for r, (ids, labels) in zip(rows, exp):
        assert r["input_ids"] == ids
        assert r["labels"] == labels
        assert r["seq_lengths"] == [len(ids)]
        assert r["position_ids"] == list(range(len(ids)))
    # and straight against transformers 5.24 for the untruncated ones
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(folders["phi3"]))
    kept = [m for m, e in zip(convs, expected_encodings(tok, convs, L)) if e is not None]
    for m, r in zip(kept[:40], rows):
        ref = hf.apply_chat_template(m, tokenize=True)["input_ids"]
        assert r["input_ids"] == ref[:L]


def test_pad_mode_train_on_all(tmp_path, tok, convs):
    src = write_jsonl(tmp_path / "a.jsonl", rows_of(convs[:30]))
    ferrotune.tokenize_dataset(tok, src, tmp_path / "o.arrow", max_seq_length=4096, mode="pad", train_on="all")
    for r, m in zip(table_rows(tmp_path / "o.arrow"), convs[:30]):
        ids = tok.encode_chat(m)["input_ids"].tolist()
        assert r["input_ids"] == ids
        assert r["labels"] == [-100] + ids[1:]


def check_packed(rows: list[dict], L: int) -> None:
    """The layout invariants of pack mode."""
    for r in rows:
        n = len(r["input_ids"])
        assert 0 < n <= L
        assert len(r["labels"]) == len(r["position_ids"]) == n
        assert all(s > 0 for s in r["seq_lengths"]) and sum(r["seq_lengths"]) == n
        assert r["position_ids"] == [p for s in r["seq_lengths"] for p in range(s)]
        start = 0
        for s in r["seq_lengths"]:
            assert r["labels"][start] == -100
            start += s
        assert all(lab == -100 or lab == i for lab, i in zip(r["labels"], r["input_ids"]))


def run_pack(tok, convs, L, workdir: Path, **kw):
    src = write_jsonl(workdir / "d.jsonl", rows_of(convs))
    out = workdir / "packed.parquet"
    stats = ferrotune.tokenize_dataset(tok, src, out, max_seq_length=L, mode="pack", **kw)
    return stats, table_rows(out)


def check_against_encode_chat(tok, convs, L, stats, rows) -> None:
    exp = expected_encodings(tok, convs, L)
    # pack mode: the first token of every conversation gets label -100
    want = Counter((tuple(ids), tuple([-100] + labels[1:])) for ids, labels in (e for e in exp if e is not None))
    got = Counter(seg for r in rows for seg in segments(r))
    assert got == want
    assert stats.rows_in == len(convs)
    assert stats.rows_out == sum(want.values())
    assert stats.rows_written == len(rows)
    assert nonzero(stats.dropped) == ({"no_trainable_tokens": exp.count(None)} if exp.count(None) else {})
    assert stats.total_tokens == sum(len(r["input_ids"]) for r in rows)


_POOL = chatgen.conversations(150, 33, tricky=True, system=True)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(st.integers(0, len(_POOL) - 1), min_size=1, max_size=40),
    L=st.one_of(st.integers(4, 64), st.integers(65, 1200)),
)
def test_packing_invariants(tok, picks, L):
    convs = [_POOL[i] for i in picks]
    with tempfile.TemporaryDirectory() as d:
        stats, rows = run_pack(tok, convs, L, Path(d))
        assert listing(Path(d)) == ["d.jsonl", "packed.parquet"]
    check_packed(rows, L)
    check_against_encode_chat(tok, convs, L, stats, rows)
    # Best fit (an any-fit rule) opens a new row only for a conversation that fits in no open row,
    # so (all in one pack window here) no two rows could have been merged.
    lengths = sorted(len(r["input_ids"]) for r in rows)
    if len(lengths) >= 2:
        assert lengths[0] + lengths[1] > L
    if rows:
        assert stats.packing_efficiency == pytest.approx(stats.total_tokens / (len(rows) * L))


def test_packing_with_small_windows(tmp_path, tok):
    convs = chatgen.conversations(300, 34, system=True)
    stats, rows = run_pack(tok, convs, 700, tmp_path, pack_window=16)
    check_packed(rows, 700)
    check_against_encode_chat(tok, convs, 700, stats, rows)


def test_packing_is_deterministic_across_threads(tmp_path, tok):
    convs = chatgen.conversations(600, 35, system=True)
    src = write_jsonl(tmp_path / "d.jsonl", rows_of(convs))
    for fmt in ("parquet", "arrow"):
        for mode in ("pack", "pad"):
            blobs = []
            for threads in (1, 2, 4, None):
                out = tmp_path / f"o-{mode}-{threads}.{fmt}"
                ferrotune.tokenize_dataset(tok, src, out, max_seq_length=512, mode=mode, num_threads=threads, pack_window=128)
                blobs.append(out.read_bytes())
            assert all(b == blobs[0] for b in blobs), (fmt, mode)


# ---------------------------------------------------------------------------------------
# Atomic output
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_failed_run_leaves_no_output(tmp_path, tok, fmt):
    convs = chatgen.conversations(800, 36, system=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows_of(convs)]
    lines[499] = "{this is not json"
    src = tmp_path / "in" / "d.jsonl"
    src.parent.mkdir()
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"tokenized.{fmt}"
    with pytest.raises(ferrotune.DataFormatError, match=r"line 500\b"):
        ferrotune.tokenize_dataset(tok, src, out, max_seq_length=512, num_threads=2)
    assert not out.exists()
    assert listing(out_dir) == []
    # an existing file of that name is left as it was
    out.write_bytes(b"previous run")
    with pytest.raises(ferrotune.DataFormatError):
        ferrotune.tokenize_dataset(tok, src, out, max_seq_length=512)
    assert out.read_bytes() == b"previous run"
    assert listing(out_dir) == [out.name]
    # and a successful run replaces it, leaving nothing else behind
    src.write_text("\n".join(lines[:499] + lines[500:]) + "\n", encoding="utf-8")
    stats = ferrotune.tokenize_dataset(tok, src, out, max_seq_length=512)
    assert stats.rows_in == 799
    assert listing(out_dir) == [out.name]
    assert read_table(out).num_rows == stats.rows_written


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "ferrotune.cli", "tokenize", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_tokenize(tmp_path, folders, convs):
    a = write_jsonl(tmp_path / "a.jsonl", rows_of(convs[:60]))
    b = write_parquet(tmp_path / "b.parquet", convs[60:])
    out = tmp_path / "cli.parquet"
    r = _cli("--tokenizer", str(folders["phi3"]), "--train-file", str(a), "--train-file", str(b), "--output", str(out), "--max-seq-length", "256")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), "no summary printed"
    # the same call through the API writes the same rows
    stats = ferrotune.tokenize_dataset(str(folders["phi3"]), [a, b], tmp_path / "api.parquet", max_seq_length=256)
    assert same_content(out, tmp_path / "api.parquet")
    assert str(stats.rows_in) in r.stdout  # the summary mentions how many rows were read

    out2 = tmp_path / "cli.arrow"
    r = _cli(
        "--tokenizer", str(folders["phi3"]), "--train-file", str(a), "--output", str(out2),
        "--max-seq-length", "300", "--mode", "pad", "--train-on", "all", "--strict",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ferrotune.tokenize_dataset(str(folders["phi3"]), a, tmp_path / "api.arrow", max_seq_length=300, mode="pad", train_on="all", strict=True)
    assert same_content(out2, tmp_path / "api.arrow")


def test_cli_errors(tmp_path, folders, convs):
    lines = [json.dumps(r) for r in rows_of(convs[:5])]
    lines[2] = "{broken"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "o.parquet"
    r = _cli("--tokenizer", str(folders["phi3"]), "--train-file", str(bad), "--output", str(out))
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr + r.stdout
    assert "error:" in err and "bad.jsonl" in err and "line 3" in err, err
    assert "Traceback" not in err
    assert not out.exists()
    # a missing input file
    r = _cli("--tokenizer", str(folders["phi3"]), "--train-file", str(tmp_path / "nope.jsonl"), "--output", str(out))
    assert r.returncode == 2 and "error:" in r.stderr + r.stdout
    # a strict run over a bad row
    rows = rows_of(convs[:3]) + [{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}]
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    r = _cli("--tokenizer", str(folders["phi3"]), "--train-file", str(src), "--output", str(out), "--strict")
    assert r.returncode == 2 and "error:" in r.stderr + r.stdout and "s.jsonl" in r.stderr + r.stdout
    # a broken chat template
    r = _cli("--tokenizer", str(folders["broken_template"]), "--train-file", str(src), "--output", str(out))
    assert r.returncode == 2 and "error:" in r.stderr + r.stdout
    assert not out.exists()
