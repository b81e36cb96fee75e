"""Synthetic data with the shape of ``HuggingFaceH4/ultrachat_200k`` (and a tiny model repo).

The real dataset is 4 splits of chat conversations stored as sharded parquet files::

    data/train_sft-00000-of-00003-<hash16>.parquet   ... x3
    data/test_sft-00000-of-00001-<hash16>.parquet
    data/train_gen-00000-of-00003-<hash16>.parquet   ... x3
    data/test_gen-00000-of-00001-<hash16>.parquet
    README.md   (YAML front matter: ``configs`` -> ``data_files`` per split, ``dataset_info``)

with the arrow schema ``prompt: string, prompt_id: string,
messages: list<struct<content: string, role: string>>``.

:func:`make_ultrachat_repo` writes a look-alike, deterministically from a seed, fast enough to
produce the full-size variant (~515k rows, ~3 GB of text, ~1.6 GB of parquet) in well under a
minute per GB: text is sliced out of one pre-generated random-word corpus with numpy-chosen
offsets, and row groups are written incrementally so memory stays bounded.

With ``tricky=True`` a fraction of the rows carry the characters that JSON writers, tokenizers and
chat templates get wrong (non-ASCII, astral emoji, ``/``, ``\\``, ``"``, C0 controls, DEL,
U+2028/U+2029, ``< > &``, look-alike special tokens, empty and whitespace-padded strings, and a
few 100 kB+ messages). Rows 2-4 of every split hold every snippet (one per message) and row 1
has a 100 kB+ reply, so even a 5 % prefix of a small split contains all of them.

Command line (used by benchmarks)::

    python -m tests.support.synth --out DIR [--full | --rows train_sft=1003,...] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "SPLITS",
    "FULL_ROWS",
    "SMALL_ROWS",
    "DEFAULT_SHARDS",
    "SCHEMA",
    "TRICKY_SNIPPETS",
    "make_ultrachat_repo",
    "make_model_repo_files",
    "shard_row_counts",
    "read_split_rows",
]

#: Split names, in the order of the real dataset card (and of ``get_dataset_split_names``).
SPLITS: tuple[str, ...] = ("train_sft", "test_sft", "train_gen", "test_gen")

#: Row counts of the real ``HuggingFaceH4/ultrachat_200k``.
FULL_ROWS: dict[str, int] = {"train_sft": 207865, "test_sft": 23110, "train_gen": 256032, "test_gen": 28304}

#: Small row counts for unit tests (odd numbers, so percent slices exercise rounding).
SMALL_ROWS: dict[str, int] = {"train_sft": 1003, "test_sft": 211, "train_gen": 1210, "test_gen": 305}

#: Shards per split of the real dataset.
DEFAULT_SHARDS: dict[str, int] = {"train_sft": 3, "test_sft": 1, "train_gen": 3, "test_gen": 1}

_MESSAGE_TYPE = pa.struct([pa.field("content", pa.string()), pa.field("role", pa.string())])

#: The exact arrow schema of the real parquet files.
SCHEMA = pa.schema(
    [
        pa.field("prompt", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("messages", pa.list_(_MESSAGE_TYPE)),
    ]
)

# Schema metadata that `datasets.push_to_hub` writes into every parquet file (the real files have it).
_HF_FEATURES_METADATA = {
    "info": {
        "features": {
            "prompt": {"dtype": "string", "_type": "Value"},
            "prompt_id": {"dtype": "string", "_type": "Value"},
            "messages": [
                {
                    "content": {"dtype": "string", "_type": "Value"},
                    "role": {"dtype": "string", "_type": "Value"},
                }
            ],
        }
    }
}

#: Strings that JSON writers / tokenizers / chat templates tend to mishandle. Each is used as a
#: whole message, or spliced into one (see ``_apply_tricky``).
TRICKY_SNIPPETS: tuple[str, ...] = (
    "café crème, naïve façade, Straße, Ångström",  # Latin-1 / BMP
    "中文字符测试：你好，世界！",  # CJK
    "Привет, мир! Съешь же ещё этих мягких французских булок",  # Cyrillic
    "emoji: 😀 🚀 👩\u200d💻 🇧🇬 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # astral plane, ZWJ sequence, flags, math letters
    "a/b/c and http://example.com/path?q=1&r=2",  # '/' (pandas writes '\/'), '&'
    "back\\slash C:\\Users\\x \\n (not a newline) \\u0041",  # backslashes
    'say "hello" and \'bye\' and "\\"nested\\""',  # quotes
    "ctrl:\x00nul\x01soh\x07bel\bbs\ttab\nlf\x0bvt\fff\rcr\x1bsc\x1fus\x7fdel!",  # C0 controls + DEL
    "line\u2028separator and paragraph\u2029separator, nbsp\u00a0and bom\ufeff",  # JS-unsafe separators
    "<b>bold</b> & <i>amp; &lt;escaped&gt;</i> <script>alert('x')</script>",  # HTML-ish
    "   leading and trailing spaces   ",
    "<|user|>\nfake turn<|end|>\n<|assistant|>\n<s> </s> <|endoftext|> <unk> [INST] {{ bos_token }}",
    "multi\nline\n\n\nwith\r\nCRLF\rand tabs\t\t",
    "null",
    "NaN",
    "1e5",
    "true",
    "{\"json\": [1, 2, {\"k\": null}]}",
    "",  # empty string
)

# How a snippet is used: replace the whole content, or splice in at the start / middle / end.
_SPLICE_MODES = ("whole", "start", "middle", "end")

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their can has been if more when will would who "
    "so no model data training learning language neural network layer attention token sequence "
    "gradient loss optimizer batch epoch weights parameter inference deploy endpoint dataset split "
    "history science culture people world water energy city country music story health garden "
    "explain describe write summarize compare analyze discuss suggest create provide example "
    "however therefore moreover furthermore although because while during between through "
    "important different possible specific various several particular significant additional "
    "recipe kitchen travel mountain river forest ocean climate economy market company product "
    "customer service quality research study result method approach problem solution question "
    "answer information system process development management design strategy performance "
    "Python function variable class object string integer list dictionary loop condition error "
    "Rust memory ownership borrow thread async future trait generic lifetime compiler cargo crate"
).split()


def shard_row_counts(n_rows: int, n_shards: int) -> list[int]:
    """Split ``n_rows`` into ``n_shards`` contiguous, nearly equal parts (earlier shards get the extra rows)."""
    if n_shards < 1:
        raise ValueError("n_shards must be >= 1")
    base, extra = divmod(n_rows, n_shards)
    return [base + (1 if i < extra else 0) for i in range(n_shards)]


class _Corpus:
    """One big ASCII text of random words; messages are word-aligned slices of it.

    Slicing keeps per-message work in C, and because consecutive slices come from random places in
    a corpus much larger than snappy's 64 kB window, compression ratios stay close to real text.
    """

    def __init__(self, rng: np.random.Generator, n_words: int = 3_000_000) -> None:
        vocab = list(_WORDS)
        # Zipf-like word frequencies.
        weights = 1.0 / np.arange(1, len(vocab) + 1) ** 0.8
        weights /= weights.sum()
        idx = rng.choice(len(vocab), size=n_words, p=weights)
        # Sentence structure: ~1 in 14 words ends a sentence (". "), the next one is capitalized,
        # ~1 in 9 is followed by a comma, ~1 in 120 by a newline.
        ends = rng.random(n_words) < 1 / 14
        commas = (rng.random(n_words) < 1 / 9) & ~ends
        newlines = (rng.random(n_words) < 1 / 120) & ends
        starts = np.empty(n_words, dtype=bool)
        starts[0] = True
        starts[1:] = ends[:-1]
        plain = vocab
        capital = [w[:1].upper() + w[1:] for w in vocab]
        parts: list[str] = []
        append = parts.append
        for i, s, e, c, nl in zip(idx.tolist(), starts.tolist(), ends.tolist(), commas.tolist(), newlines.tolist()):
            w = capital[i] if s else plain[i]
            if e:
                append(w + (".\n" if nl else ". "))
            elif c:
                append(w + ", ")
            else:
                append(w + " ")
        self.text: str = "".join(parts)
        # Positions where a word starts (after a space or newline): messages begin there.
        raw = np.frombuffer(self.text.encode("ascii"), dtype=np.uint8)
        seps = np.flatnonzero((raw == 0x20) | (raw == 0x0A))
        self.word_starts: np.ndarray = seps + 1
        self.word_starts = self.word_starts[self.word_starts < len(self.text)]

    def slices(self, rng: np.random.Generator, lengths: np.ndarray) -> list[str]:
        """Word-aligned slices of (about) the given lengths, stripped of the trailing separator."""
        n = len(lengths)
        text_len = len(self.text)
        lengths = np.minimum(lengths, text_len // 2)
        ws = self.word_starts
        # Start at a word start that leaves room for the whole slice.
        limit = int(np.searchsorted(ws, text_len - int(lengths.max()) - 1)) if n else 0
        starts = ws[rng.integers(0, max(limit, 1), size=n)]
        # End just before the next word start at or after start+length.
        ends_idx = np.searchsorted(ws, starts + lengths)
        ends = np.where(ends_idx < len(ws), ws[np.minimum(ends_idx, len(ws) - 1)] - 1, text_len)
        text = self.text
        return [text[s:e].rstrip() for s, e in zip(starts.tolist(), ends.tolist())]


# Snippets that only make sense as a whole message (empty, whitespace-padded, JSON-literal look-alikes).
_WHOLE_ONLY = frozenset({"", "   leading and trailing spaces   ", "null", "NaN", "1e5", "true"})

#: Rows of every split that carry all tricky snippets (8 messages each, one snippet per message).
_FIXED_TRICKY_ROWS = tuple(range(2, 2 + math.ceil(len(TRICKY_SNIPPETS) / 8)))


def _apply_tricky(rng: np.random.Generator, content: str, kind: int) -> str:
    snippet = TRICKY_SNIPPETS[kind % len(TRICKY_SNIPPETS)]
    mode = "whole" if snippet in _WHOLE_ONLY else _SPLICE_MODES[int(rng.integers(0, len(_SPLICE_MODES)))]
    if mode == "whole" or not content:
        return snippet
    if mode == "start":
        return snippet + " " + content
    if mode == "end":
        return content + " " + snippet
    mid = len(content) // 2
    return content[:mid] + snippet + content[mid:]


def _generate_rows(
    rng: np.random.Generator,
    corpus: _Corpus,
    n_rows: int,
    row_offset: int,
    avg_chars: int,
    tricky: bool,
) -> pa.Table:
    """Generate one batch of ``n_rows`` conversations (rows ``row_offset ..`` of the split)."""
    # Messages per conversation: mostly even (ends with the assistant), 2..8.
    n_msgs = rng.choice(np.array([2, 4, 6, 8]), size=n_rows, p=[0.45, 0.3, 0.15, 0.10])
    row_ids = np.arange(row_offset, row_offset + n_rows)
    fixed = np.isin(row_ids, _FIXED_TRICKY_ROWS) if tricky else np.zeros(n_rows, dtype=bool)
    if tricky:
        odd = (rng.random(n_rows) < 0.02) & (row_ids >= _FIXED_TRICKY_ROWS[-1] + 1)
        n_msgs = np.where(odd, n_msgs + np.where(n_msgs >= 8, -1, 1), n_msgs)
        n_msgs[fixed] = 8
    total = int(n_msgs.sum())
    offsets = np.zeros(n_rows + 1, dtype=np.int32)
    np.cumsum(n_msgs, out=offsets[1:])
    # Position of each message inside its conversation.
    pos = np.arange(total) - np.repeat(offsets[:-1], n_msgs)
    is_user = (pos % 2) == 0
    # Conversation length ~ lognormal around avg_chars; users write ~1/8 of the text.
    conv_chars = rng.lognormal(mean=np.log(avg_chars) - 0.18, sigma=0.6, size=n_rows)
    per_msg = np.repeat(conv_chars / n_msgs, n_msgs)
    lengths = np.where(is_user, per_msg * 0.22, per_msg * 1.78) * rng.uniform(0.5, 1.5, size=total)
    lengths = np.maximum(lengths.astype(np.int64), 8)
    contents = corpus.slices(rng, lengths)

    if tricky:
        n_kinds = len(TRICKY_SNIPPETS)
        # Every snippet near the start of every split: row _FIXED_TRICKY_ROWS[q], message m gets
        # snippet 8q + m (so the prompts of those rows are tricky too).
        for r in np.flatnonzero(fixed).tolist():
            q = _FIXED_TRICKY_ROWS.index(int(row_ids[r]))
            for m in range(8):
                kind = 8 * q + m
                if kind < n_kinds:
                    contents[int(offsets[r]) + m] = _apply_tricky(rng, contents[int(offsets[r]) + m], kind)
        # ...and ~3 % of the other rows get one random snippet in a random message.
        rand = np.flatnonzero((row_ids > _FIXED_TRICKY_ROWS[-1]) & (rng.random(n_rows) < 0.03))
        for r in rand.tolist():
            m = int(rng.integers(int(offsets[r]), int(offsets[r + 1])))
            contents[m] = _apply_tricky(rng, contents[m], int(rng.integers(0, n_kinds)))
        # A few very long assistant messages (100-160 kB): at row 1 of every split, and ~1/3000.
        long_rows = np.flatnonzero((row_ids == 1) | ((rng.random(n_rows) < 1 / 3000) & ~fixed))
        for r in long_rows.tolist():
            m = int(offsets[r]) + 1  # the first assistant reply
            if m < int(offsets[r + 1]):
                size = int(rng.integers(100_000, 160_000))
                contents[m] = corpus.slices(rng, np.array([size]))[0]

    roles = ["user" if u else "assistant" for u in is_user.tolist()]
    starts = offsets[:-1].tolist()
    prompts = [contents[s] for s in starts]
    prompt_ids = [hashlib.sha256(p.encode("utf-8")).hexdigest() for p in prompts]

    messages = pa.ListArray.from_arrays(
        pa.array(offsets, type=pa.int32()),
        pa.StructArray.from_arrays(
            [pa.array(contents, type=pa.string()), pa.array(roles, type=pa.string())],
            fields=list(_MESSAGE_TYPE),
        ),
    )
    return pa.Table.from_arrays(
        [pa.array(prompts, type=pa.string()), pa.array(prompt_ids, type=pa.string()), messages],
        schema=SCHEMA,
    )


def _shard_hash(seed: int, split: str, index: int, n_shards: int) -> str:
    return hashlib.sha256(f"ferrotune-synth:{seed}:{split}:{index}:{n_shards}".encode()).hexdigest()[:16]


def _readme(rows: Mapping[str, int], split_bytes: Mapping[str, int], download_size: int) -> str:
    """Dataset card shaped like the real one (YAML front matter + a short body)."""
    lines = [
        "---",
        "language:",
        "- en",
        "license: mit",
        "size_categories:",
        "- 100K<n<1M",
        "task_categories:",
        "- text-generation",
        "pretty_name: UltraChat 200k (synthetic)",
        "configs:",
        "- config_name: default",
        "  data_files:",
    ]
    for split in rows:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    lines += [
        "dataset_info:",
        "  features:",
        "  - name: prompt",
        "    dtype: string",
        "  - name: prompt_id",
        "    dtype: string",
        "  - name: messages",
        "    list:",
        "    - name: content",
        "      dtype: string",
        "    - name: role",
        "      dtype: string",
        "  splits:",
    ]
    for split, n in rows.items():
        lines += [f"  - name: {split}", f"    num_bytes: {split_bytes[split]}", f"    num_examples: {n}"]
    lines += [
        f"  download_size: {download_size}",
        f"  dataset_size: {sum(split_bytes.values())}",
        "---",
        "",
        "# Dataset Card for UltraChat 200k (synthetic look-alike)",
        "",
        "Generated by `tests/support/synth.py` for ferrotune's tests: same splits, sharding and schema",
        "as `HuggingFaceH4/ultrachat_200k`, random text.",
        "",
    ]
    return "\n".join(lines)


def make_ultrachat_repo(
    out_dir: str | os.PathLike,
    rows: Mapping[str, int] | None = None,
    shards: Mapping[str, int] | None = None,
    row_group_size: int | None = None,
    seed: int = 0,
    avg_chars: int = 5800,
    tricky: bool = True,
    progress: bool = False,
) -> dict:
    """Write a synthetic ultrachat_200k-like dataset repo under ``out_dir``.

    Args:
        out_dir: target folder (created); receives ``README.md`` and ``data/*.parquet``.
        rows: rows per split, in split order (default :data:`SMALL_ROWS`; :data:`FULL_ROWS` is the
            real size). Splits are written in the order of this mapping.
        shards: shards per split (default :data:`DEFAULT_SHARDS`; 1 for unknown splits).
        row_group_size: rows per parquet row group; default: about 5 row groups per shard,
            at most 5000 rows each.
        seed: everything is a deterministic function of the arguments.
        avg_chars: mean characters per conversation (the real data: ~5.8 k).
        tricky: sprinkle hard-to-serialize strings (see :data:`TRICKY_SNIPPETS`).
        progress: print progress lines to stderr.

    Returns:
        ``{"files": [relative paths, README.md first], "rows": {split: n}, "shards": {split: [paths]}}``
    """
    rows = dict(SMALL_ROWS if rows is None else rows)
    shard_spec = dict(DEFAULT_SHARDS)
    if shards is not None:
        shard_spec.update(shards)
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    rng_master = np.random.default_rng(seed)
    t0 = time.monotonic()
    corpus = _Corpus(np.random.default_rng([seed, 0xC0FFEE]))
    if progress:
        elapsed = time.monotonic() - t0
        print(f"[synth] corpus of {len(corpus.text) / 1e6:.1f} MB ready in {elapsed:.1f}s", file=sys.stderr)

    metadata = {b"huggingface": json.dumps(_HF_FEATURES_METADATA).encode()}
    files: list[str] = []
    shard_files: dict[str, list[str]] = {}
    split_bytes: dict[str, int] = {}
    download_size = 0
    total_rows = sum(rows.values())
    done_rows = 0
    for split_index, (split, n_rows) in enumerate(rows.items()):
        n_shards = int(shard_spec.get(split, 1))
        rng = np.random.default_rng([seed, split_index, int(rng_master.integers(0, 2**31))])
        split_bytes[split] = 0
        shard_files[split] = []
        row_offset = 0
        for shard_index, shard_rows in enumerate(shard_row_counts(n_rows, n_shards)):
            suffix = _shard_hash(seed, split, shard_index, n_shards)
            rel = f"data/{split}-{shard_index:05d}-of-{n_shards:05d}-{suffix}.parquet"
            path = out / rel
            tmp = path.with_name(path.name + ".tmp")
            rg = row_group_size or max(1, min(5000, math.ceil(shard_rows / 5)))
            with pq.ParquetWriter(tmp, SCHEMA.with_metadata(metadata), compression="snappy") as writer:
                written = 0
                while written < shard_rows or (shard_rows == 0 and written == 0):
                    n = min(rg, shard_rows - written)
                    table = _generate_rows(rng, corpus, n, row_offset, avg_chars, tricky)
                    split_bytes[split] += table.nbytes
                    writer.write_table(table, row_group_size=max(n, 1))
                    written += n
                    row_offset += n
                    done_rows += n
                    if shard_rows == 0:
                        break
                    if progress:
                        elapsed = time.monotonic() - t0
                        print(
                            f"[synth] {split} shard {shard_index + 1}/{n_shards}: {written}/{shard_rows} rows"
                            f" (total {done_rows}/{total_rows}, {elapsed:.1f}s)",
                            file=sys.stderr,
                        )
            os.replace(tmp, path)
            download_size += path.stat().st_size
            files.append(rel)
            shard_files[split].append(rel)

    (out / "README.md").write_text(_readme(rows, split_bytes, download_size), encoding="utf-8", newline="\n")
    if progress:
        print(
            f"[synth] wrote {total_rows} rows, {download_size / 1e6:.1f} MB of parquet in {time.monotonic() - t0:.1f}s",
            file=sys.stderr,
        )
    return {"files": ["README.md", *files], "rows": dict(rows), "shards": shard_files}


def read_split_rows(repo_dir: str | os.PathLike, split: str) -> Iterator[dict]:
    """Yield the rows of one split of a repo made by :func:`make_ultrachat_repo`, in stored order."""
    for path in sorted((Path(repo_dir) / "data").glob(f"{split}-*.parquet")):
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1000):
            yield from batch.to_pylist()


def _safetensors_bytes(tensors: Mapping[str, tuple[str, list[int], bytes]], metadata: Mapping[str, str]) -> bytes:
    """Serialize tensors (name -> (dtype, shape, raw little-endian bytes)) in the safetensors format."""
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(blob)) + blob + b"".join(raw for _, _, raw in tensors.values())


def make_model_repo_files(seed: int = 0, weights_size: int = 3 * 1024 * 1024) -> dict[str, bytes]:
    """Small files of a model repo for Hub-client tests.

    ``model.safetensors`` is a valid safetensors file (two F32 tensors of random values, about
    ``weights_size`` bytes), so it is LFS-sized; the JSON files are small regular files.
    """
    rng = np.random.default_rng([seed, 0x5AFE])
    n = max(weights_size // 4 - 1024, 16)
    n_a = n // 2
    a = rng.standard_normal(n_a).astype("<f4").tobytes()
    b = rng.standard_normal(n - n_a).astype("<f4").tobytes()
    safetensors = _safetensors_bytes(
        {"model.embed.weight": ("F32", [n_a], a), "model.head.weight": ("F32", [n - n_a], b)},
        {"format": "pt"},
    )
    config = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "pad_token_id": 32000,
        "torch_dtype": "float32",
    }
    tokenizer_config = {
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
        "chat_template": (
            "{% for message in messages %}"
            "{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
        ),
        "tokenizer_class": "LlamaTokenizer",
    }
    return {
        "README.md": b"---\nlicense: mit\n---\n# tiny synthetic model for ferrotune tests\n",
        "config.json": (json.dumps(config, indent=2) + "\n").encode(),
        "generation_config.json": b'{\n  "bos_token_id": 1,\n  "eos_token_id": 32000\n}\n',
        "tokenizer_config.json": (json.dumps(tokenizer_config, indent=2) + "\n").encode(),
        "model.safetensors": safetensors,
    }


def _parse_rows(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        out[name.strip()] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--full", action="store_true", help="the real row counts (~1.6 GB)")
    group.add_argument("--rows", type=_parse_rows, help="e.g. train_sft=1003,test_sft=211,train_gen=1210,test_gen=305")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--row-group-size", type=int, default=None)
    parser.add_argument("--avg-chars", type=int, default=5800)
    parser.add_argument("--no-tricky", action="store_true")
    args = parser.parse_args(argv)
    rows = FULL_ROWS if args.full else (args.rows or SMALL_ROWS)
    info = make_ultrachat_repo(
        args.out,
        rows=rows,
        row_group_size=args.row_group_size,
        seed=args.seed,
        avg_chars=args.avg_chars,
        tricky=not args.no_tricky,
        progress=True,
    )
    print(json.dumps({"out": str(args.out), "rows": info["rows"], "files": info["files"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
