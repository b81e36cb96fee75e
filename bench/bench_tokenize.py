"""Benchmark: ferrotune.tokenize_dataset vs the usual Hugging Face chat-SFT preprocessing, and vs
the raw Rust tokenizer as a speed ceiling, on the same input, on the same machine, one after
another, each in a fresh subprocess.

    .venv/bin/python bench/bench_tokenize.py              # full train_sft (207,865 conversations)
    .venv/bin/python bench/bench_tokenize.py --quick      # first 5,000 conversations
    .venv/bin/python bench/bench_tokenize.py --rows 20000 # first N conversations

Input: the `train_sft` split of the synthetic ultrachat_200k (`tests/support/synth.py`; reused
from `bench/data/ultrachat_full/` when bench_download.py already made it, otherwise only
train_sft is generated), converted to one JSON Lines file in the format the download step
writes (`{"prompt", "prompt_id", "messages"}` per line) under `bench/data/tokenize/`.
Tokenizer: `tests/fixtures/phi3-tokenizer`, max_seq_length 4096.

Contenders:
  peer       datasets.load_dataset("json") + .map(batched=True, num_proc=2) calling
             transformers' apply_chat_template(tokenize=True), TRL-style completion-only
             masking (-100 up to and including each <|assistant|>, trained until the next
             <|user|>), right truncation to 4096, rows with <= 1 message dropped, then
             .to_parquet(). Fresh HF_DATASETS_CACHE, so nothing is reused.
  ceiling    the `tokenizers.Tokenizer` transformers itself uses
             (AutoTokenizer.from_pretrained(folder).backend_tokenizer), encode_batch of all
             conversations already rendered by apply_chat_template(tokenize=False) (rendering not
             timed), 2 rayon threads. Only the encode time counts.
  ferrotune  ferrotune.tokenize_dataset(folder, jsonl, out.parquet, max_seq_length=4096,
             mode="pack") and mode="pad" (two rows).

Every contender runs as its own process (this file with --_worker); wall time is measured
around the whole process, and each worker also reports the time of its timed section. Peak
RSS is the peak of the sum of RSS over the tool's process tree (the peer's map workers
included), sampled with psutil every 50 ms, or the tool process's own ru_maxrss if larger;
the sum of PSS (shared pages split between the processes sharing them) is reported beside it.
Results: a table on stdout and bench/results/tokenize-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
RESULTS = ROOT / "bench" / "results"
FULL_TRAIN_SFT = 207865
QUICK_ROWS = 5000
MAX_SEQ_LENGTH = 4096
ASSISTANT_ID = 32001  # "<|assistant|>" in the Phi-3 vocabulary
USER_ID = 32010  # "<|user|>"
RESULT_TAG = "BENCH_RESULT="


def tokenizer_folder() -> Path:
    for cand in (ROOT / "tests" / "fixtures" / "phi3-tokenizer", ROOT.parent / "shared" / "fixtures" / "phi3-tokenizer"):
        if (cand / "tokenizer.json").is_file():
            return cand
    raise SystemExit("no phi3-tokenizer fixture (tests/fixtures/phi3-tokenizer or ../shared/fixtures/phi3-tokenizer)")


# --------------------------------------------------------------------------------------------
# input data


def _train_sft_shards() -> list[Path]:
    """The train_sft parquet shards of the full-size synthetic ultrachat (made if missing)."""
    for repo in (DATA / "ultrachat_full", DATA / "ultrachat_train_sft"):
        shards = sorted((repo / "data").glob("train_sft-*.parquet"))
        if (repo / "README.md").is_file() and shards:
            return shards
    sys.path.insert(0, str(ROOT))
    from tests.support import synth

    repo = DATA / "ultrachat_train_sft"
    print(f"generating the synthetic train_sft split ({FULL_TRAIN_SFT:,} rows) in {repo} ...", flush=True)
    # train_sft is the first split, so it is the same data as in the 4-split full repo
    synth.make_ultrachat_repo(repo, rows={"train_sft": FULL_TRAIN_SFT}, seed=0, progress=True)
    return sorted((repo / "data").glob("train_sft-*.parquet"))


def _shard_to_jsonl(src: Path, dst: Path) -> None:
    """One parquet shard -> JSON Lines as the download step writes it (ferrotune's own writer,
    byte-identical to `datasets.Dataset.to_json`); plain json.dumps if that is unavailable."""
    try:
        from ferrotune import _core

        _core._parquet_to_jsonl(str(src), str(dst))
        return
    except (ImportError, AttributeError):
        pass
    import pyarrow.parquet as pq

    with open(dst, "w", encoding="utf-8") as f:
        for batch in pq.ParquetFile(src).iter_batches(batch_size=2000):
            for row in batch.to_pylist():
                f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def prepare_jsonl(rows: int) -> Path:
    """bench/data/tokenize/train_sft.jsonl (all rows), or its first `rows` lines."""
    out_dir = DATA / "tokenize"
    out_dir.mkdir(parents=True, exist_ok=True)
    full = out_dir / "train_sft.jsonl"
    if not full.is_file():
        shards = _train_sft_shards()
        print(f"converting {len(shards)} train_sft shards to {full} ...", flush=True)
        t0 = time.perf_counter()
        tmp = full.with_name(full.name + ".tmp")
        with open(tmp, "wb") as out:
            for i, shard in enumerate(shards):
                part = out_dir / f".part{i}.jsonl"
                _shard_to_jsonl(shard, part)
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
                part.unlink()
        os.replace(tmp, full)
        print(f"  {full.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    if rows >= FULL_TRAIN_SFT:
        return full
    prefix = out_dir / f"train_sft-first{rows}.jsonl"
    if not prefix.is_file():
        tmp = prefix.with_name(prefix.name + ".tmp")
        with open(full, "rb") as f, open(tmp, "wb") as out:
            for i, line in enumerate(f):
                if i >= rows:
                    break
                out.write(line)
        os.replace(tmp, prefix)
    return prefix


# --------------------------------------------------------------------------------------------
# measuring a subprocess

# A tiny stdlib-only launcher (as in bench_download.py): it starts the tool and reports the
# tool process's own ru_maxrss. The psutil sampler below watches the launcher's descendants
# (the tool and whatever it forks), not the launcher itself.
_LAUNCHER = (
    "import os, sys\n"
    "pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)\n"
    "_, status, ru = os.wait4(pid, 0)\n"
    "sys.stderr.write('\\nRSS_KIB=' + str(ru.ru_maxrss) + ' CPU_S=' + str(ru.ru_utime + ru.ru_stime) + '\\n')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def _proc_kib(pid: int, field: str) -> int:
    """A "Field:   N kB" line of /proc/PID/status (VmRSS) or /proc/PID/smaps_rollup (Pss)."""
    try:
        with open(f"/proc/{pid}/{'status' if field == 'VmRSS:' else 'smaps_rollup'}") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_measured(cmd: list, env: dict, interval: float = 0.05, tree_interval: float = 0.5, pss_interval: float = 1.0) -> dict:
    """Runs cmd in a fresh process; wall seconds, peak RSS (MiB) of its process tree, and the
    JSON the worker printed after RESULT_TAG.

    The RSS of the tree is the sum of its processes' RSS, sampled every `interval` s (the list
    of processes is refreshed with psutil every `tree_interval` s: walking /proc is what costs).
    Forked workers (the peer's map processes) share pages with their parent, which such a sum
    counts once per process, so while the tree has several processes the sum of their PSS
    (/proc/PID/smaps_rollup; ~10 ms a process, hence only every `pss_interval` s) is sampled
    too. The sampler costs a few % of one CPU."""
    import psutil

    out_f = tempfile.TemporaryFile()
    err_f = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, *cmd], env=env, stdout=out_f, stderr=err_f, cwd=ROOT)
    launcher = psutil.Process(proc.pid)
    peak_tree = peak_pss = 0
    max_procs = 0
    last_tree = last_pss = -1e9
    pids: list = []
    while proc.poll() is None:
        now = time.perf_counter()
        if now - last_tree >= tree_interval or not pids:
            last_tree = now
            try:
                pids = [p.pid for p in launcher.children(recursive=True)]
            except psutil.Error:
                pids = []
            max_procs = max(max_procs, len(pids))
        total = sum(_proc_kib(pid, "VmRSS:") for pid in pids) * 1024
        peak_tree = max(peak_tree, total)
        if len(pids) <= 1:
            peak_pss = max(peak_pss, total)  # one process: nothing shared within the tree
        elif now - last_pss >= pss_interval:
            last_pss = now
            peak_pss = max(peak_pss, sum(_proc_kib(pid, "Pss:") for pid in pids) * 1024)
        time.sleep(interval)
    wall = time.perf_counter() - t0
    out_f.seek(0)
    err_f.seek(0)
    stdout = out_f.read().decode("utf-8", "replace")
    stderr = err_f.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:5]))} ... failed ({proc.returncode}):\n{stderr[-4000:]}\n{stdout[-2000:]}")
    rss_kib = int(stderr.rsplit("RSS_KIB=", 1)[1].split()[0])
    cpu_s = float(stderr.rsplit("CPU_S=", 1)[1].split()[0])  # the tool and the children it reaped
    result = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    if result is None:
        raise RuntimeError(f"worker printed no result:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return {
        "process_s": wall,
        "cpu_s": cpu_s,
        "peak_rss_mib": max(peak_tree / 2**20, rss_kib / 1024),
        "peak_rss_tree_sampled_mib": peak_tree / 2**20,
        # RSS while the tree is one process, the sum of PSS while it has several; never less
        # than the main process's own peak (the tree's footprint is at least that)
        "peak_pss_mib": max(peak_pss, rss_kib * 1024) / 2**20,
        "main_ru_maxrss_mib": rss_kib / 1024,
        "max_processes": max_procs,
        "result": result,
    }


# --------------------------------------------------------------------------------------------
# workers (run as `python bench/bench_tokenize.py --_worker NAME ...`)


def _emit(result: dict) -> None:
    sys.stdout.write("\n" + RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


def _trl_labels(ids):
    """TRL DataCollatorForCompletionOnlyLM semantics with response template "<|assistant|>" and
    instruction template "<|user|>": -100 up to and including each <|assistant|>, the tokens
    after it trained until the next <|user|> (which is masked again)."""
    import numpy as np

    ids = np.asarray(ids, dtype=np.int32)
    is_a = ids == ASSISTANT_ID
    marker = is_a | (ids == USER_ID)
    idx = np.arange(len(ids))
    last = np.maximum.accumulate(np.where(marker, idx, -1)) if len(ids) else idx
    trained = (last >= 0) & ~marker
    trained[trained] = is_a[last[trained]]
    return ids, np.where(trained, ids, np.int32(-100)).astype(np.int32)


_PEER_TOK = None


def _peer_tokenize(batch):
    """The .map function: chat template + tokenize + TRL-style labels + truncation; drops
    conversations with <= 1 message (a batched map may return fewer rows)."""
    msgs = [m for m in batch["messages"] if m is not None and len(m) > 1]
    if not msgs:
        return {"input_ids": [], "labels": []}
    enc = _PEER_TOK.apply_chat_template(msgs, tokenize=True)
    all_ids = enc["input_ids"] if not isinstance(enc, list) else enc
    input_ids, labels = [], []
    for ids in all_ids:
        ids, lab = _trl_labels(ids[:MAX_SEQ_LENGTH])
        input_ids.append(ids)
        labels.append(lab)
    return {"input_ids": input_ids, "labels": labels}


def worker_peer(args) -> None:
    global _PEER_TOK
    t_start = time.perf_counter()
    import datasets
    import transformers
    from transformers import AutoTokenizer

    t_import = time.perf_counter()
    _PEER_TOK = AutoTokenizer.from_pretrained(args.tokenizer)
    ds = datasets.load_dataset("json", data_files=args.jsonl, split="train")
    t_load = time.perf_counter()
    ds = ds.map(_peer_tokenize, batched=True, batch_size=1000, num_proc=args.threads, remove_columns=ds.column_names, desc=None)
    t_map = time.perf_counter()
    ds.to_parquet(args.out)
    t_end = time.perf_counter()
    _emit({
        "rows_out": len(ds),
        "import_s": t_import - t_start,
        "load_s": t_load - t_import,
        "map_s": t_map - t_load,
        "write_s": t_end - t_map,
        "timed_s": t_end - t_import,
        "versions": {"transformers": transformers.__version__, "datasets": datasets.__version__},
    })


def worker_ceiling(args) -> None:
    # must be set before the rayon pool starts (it reads RAYON_NUM_THREADS once)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    backend = tok.backend_tokenizer  # the tokenizers.Tokenizer transformers encodes with
    convs = []
    rows_in = 0
    with open(args.jsonl, encoding="utf-8") as f:
        for line in f:
            rows_in += 1
            m = json.loads(line).get("messages")
            if m is not None and len(m) > 1:
                convs.append(m)
    t0 = time.perf_counter()
    texts = [tok.apply_chat_template(m, tokenize=False) for m in convs]
    render_s = time.perf_counter() - t0
    # the ids must be transformers' own: check a sample against apply_chat_template(tokenize=True)
    sample = list(range(min(len(convs), 200)))
    ref = tok.apply_chat_template([convs[i] for i in sample], tokenize=True)
    ref = ref["input_ids"] if not isinstance(ref, list) else ref
    got = backend.encode_batch([texts[i] for i in sample], add_special_tokens=False)
    mismatches = sum(1 for r, g in zip(ref, got) if list(r) != g.ids)
    del convs, ref, got
    # Encode in chunks (all texts at once would hold tens of GB of Encoding objects at full
    # size); only the encode_batch calls are timed.
    chunk = 8192
    encode_s = encode_cpu_s = 0.0
    total = total_trunc = 0
    for i in range(0, len(texts), chunk):
        part = texts[i:i + chunk]
        c0 = time.process_time()
        t0 = time.perf_counter()
        encs = backend.encode_batch(part, add_special_tokens=False)
        encode_s += time.perf_counter() - t0
        encode_cpu_s += time.process_time() - c0
        for e in encs:
            n = len(e)  # tokens (len(e.ids) would build a list)
            total += n
            total_trunc += min(n, MAX_SEQ_LENGTH)
        del encs
    _emit({
        "rows_in": rows_in,
        "rows_out": len(texts),
        "render_s": render_s,
        "encode_s": encode_s,
        "encode_cpu_s": encode_cpu_s,  # CPU time of all threads: ~threads x encode_s on an idle machine
        "timed_s": encode_s,
        "total_tokens_untruncated": total,
        "total_tokens": total_trunc,
        "sample_checked": len(sample),
        "sample_mismatches": mismatches,
        "threads": args.threads,
        "versions": {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__},
    })


def worker_ferrotune(args) -> None:
    t_start = time.perf_counter()
    import ferrotune

    t_import = time.perf_counter()
    stats = ferrotune.tokenize_dataset(
        args.tokenizer, args.jsonl, args.out, max_seq_length=MAX_SEQ_LENGTH, mode=args.mode, num_threads=args.threads,
        progress=False,
    )
    t_end = time.perf_counter()
    s = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(vars(stats))
    _emit({
        "stats": s,
        "rows_in": s.get("rows_in"),
        "rows_out": s.get("rows_out"),
        "total_tokens": s.get("total_tokens"),
        "trainable_tokens": s.get("trainable_tokens"),
        "import_s": t_import - t_start,
        "timed_s": t_end - t_import,
        "versions": {"ferrotune": getattr(ferrotune, "__version__", "?")},
    })


# --------------------------------------------------------------------------------------------
# checking outputs (in this process, after the tool has exited: not measured)


def parquet_token_counts(path: Path) -> dict:
    """Rows, tokens (sum of input_ids lengths) and trained labels (!= -100) of an output file,
    and the rows (and their tokens) with no trained label at all."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = tokens = trained = dead_rows = dead_tokens = 0
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=4096, columns=["input_ids", "labels"]):
        lengths = pc.list_value_length(batch.column("input_ids")).to_numpy(zero_copy_only=False)
        labels = batch.column("labels")
        flat = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
        lab_len = pc.list_value_length(labels).to_numpy(zero_copy_only=False)
        cs = np.concatenate([[0], np.cumsum(flat != -100, dtype=np.int64)])
        ends = np.cumsum(lab_len, dtype=np.int64)
        per_row = cs[ends] - cs[ends - lab_len]
        rows += batch.num_rows
        tokens += int(lengths.sum())
        trained += int(per_row.sum())
        dead = per_row == 0
        dead_rows += int(dead.sum())
        dead_tokens += int(lengths[dead].sum())
    return {"rows": rows, "tokens": tokens, "trainable_tokens": trained, "rows_without_trained_token": dead_rows,
            "tokens_of_rows_without_trained_token": dead_tokens}


# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--rows", type=int, default=FULL_TRAIN_SFT, help="first N conversations of train_sft (default: all 207,865)")
    g.add_argument("--quick", action="store_true", help=f"first {QUICK_ROWS:,} conversations")
    ap.add_argument("--contenders", default="peer,ceiling,ferrotune", help="comma list of peer, ceiling, ferrotune")
    ap.add_argument("--threads", type=int, default=2, help="peer num_proc, ceiling rayon threads, ferrotune num_threads (default 2)")
    ap.add_argument("--out", default=None, help="JSON results path (default bench/results/tokenize-<timestamp>.json)")
    ap.add_argument("--_worker", choices=["peer", "ceiling", "ferrotune"], help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--jsonl", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="pack", help=argparse.SUPPRESS)
    ap.add_argument("--_out", dest="worker_out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._worker:
        args.out = args.worker_out
        {"peer": worker_peer, "ceiling": worker_ceiling, "ferrotune": worker_ferrotune}[args._worker](args)
        return 0

    rows = QUICK_ROWS if args.quick else min(args.rows, FULL_TRAIN_SFT)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    folder = tokenizer_folder()
    jsonl = prepare_jsonl(rows)
    jsonl_bytes = jsonl.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="ferrotune-bench-tok-"))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "TOKENIZERS_", "RAYON_"))}
    base_env.update({
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    })
    me = str(Path(__file__).resolve())
    print(f"input: {jsonl} ({rows:,} conversations, {jsonl_bytes / 1e6:.0f} MB); tokenizer: {folder}; "
          f"{os.cpu_count()} CPUs, {args.threads} threads/processes per contender", flush=True)

    runs: list[dict] = []
    try:
        plan = []
        for c in contenders:
            if c == "ferrotune":
                plan += [("ferrotune", "pack"), ("ferrotune", "pad")]
            elif c in ("peer", "ceiling"):
                plan.append((c, None))
            else:
                raise SystemExit(f"unknown contender {c!r}")
        for name, mode in plan:
            label = f"ferrotune ({mode})" if mode else {"peer": "peer (datasets+transformers)", "ceiling": "ceiling (tokenizers encode_batch)"}[name]
            home = work / f"home-{name}-{mode}"
            env = {**base_env, "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"), "HF_HUB_CACHE": str(home / "hub")}
            out = work / f"out-{name}-{mode}.parquet"
            cmd = [sys.executable, me, "--_worker", name, "--tokenizer", str(folder), "--jsonl", str(jsonl),
                   "--threads", str(args.threads), "--_out", str(out)]
            if mode:
                cmd += ["--mode", mode]
            print(f"{label:36} ...", end=" ", flush=True)
            try:
                m = run_measured(cmd, env)
            except RuntimeError as e:
                print("FAILED")
                print(str(e)[-3000:], file=sys.stderr)
                runs.append({"contender": name, "mode": mode, "label": label, "error": str(e)[-3000:]})
                continue
            r = {"contender": name, "mode": mode, "label": label, **m}
            if out.is_file():
                r["output_bytes"] = out.stat().st_size
                r["output_check"] = parquet_token_counts(out)
                out.unlink()
            shutil.rmtree(home, ignore_errors=True)
            res = m["result"]
            print(f"process {m['process_s']:8.2f} s  timed {res['timed_s']:8.2f} s  RSS {m['peak_rss_mib']:6.0f} MiB  PSS {m['peak_pss_mib']:6.0f} MiB", flush=True)
            runs.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    return report(args, rows, jsonl, jsonl_bytes, runs)


def _tokens_of(r: dict) -> int | None:
    if r["contender"] == "peer":
        return r.get("output_check", {}).get("tokens")
    if r["contender"] == "ceiling":
        return r["result"].get("total_tokens_untruncated")  # what encode_batch processed
    return r["result"].get("total_tokens")


def report(args, rows: int, jsonl: Path, jsonl_bytes: int, runs: list[dict]) -> int:
    ok = [r for r in runs if "error" not in r]
    by = {(r["contender"], r["mode"]): r for r in ok}
    peer = by.get(("peer", None))
    ceiling = by.get(("ceiling", None))
    ferro = [r for r in ok if r["contender"] == "ferrotune"]

    print()
    print(f"train_sft synthetic ultrachat, {rows:,} conversations ({jsonl_bytes / 1e6:.0f} MB JSONL), max_seq_length "
          f"{MAX_SEQ_LENGTH}, {os.cpu_count()} CPUs, {args.threads} threads/processes, Python {platform.python_version()}")
    print("process s: the whole subprocess; timed s: peer = load+map+write, ceiling = encode_batch only, "
          "ferrotune = the tokenize_dataset call. Rates use timed s.")
    print("peak RSS: sum of RSS over the process tree (counts pages shared by forked workers once per process); "
          "peak PSS: sum of PSS (shared pages split), the fairer number for the peer's 2 map workers.")
    print("CPU s: user+sys of the whole process tree (less sensitive than wall time to other load on the machine).")
    print("| contender | process s | timed s | CPU s | conversations/s | tokens/s | peak RSS MiB | peak PSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in ok:
        res = r["result"]
        t = res["timed_s"]
        conv = res.get("rows_out") or 0
        tok = _tokens_of(r) or 0
        print(f"| {r['label']} | {r['process_s']:.2f} | {t:.2f} | {r['cpu_s']:.1f} | {conv / t:,.0f} | {tok / t:,.0f} | {r['peak_rss_mib']:.0f} | {r['peak_pss_mib']:.0f} |")
    for r in runs:
        if "error" in r:
            print(f"| {r['label']} | failed | | | | | | |")

    checks: dict = {}
    ratios: list[dict] = []
    print()
    if peer:
        pc = peer.get("output_check", {})
        checks["peer"] = {"rows_kept": peer["result"]["rows_out"], "tokens": pc.get("tokens"), "trainable_tokens": pc.get("trainable_tokens"),
                          "rows_without_trained_token": pc.get("rows_without_trained_token", 0),
                          "tokens_of_rows_without_trained_token": pc.get("tokens_of_rows_without_trained_token", 0)}
        print(f"peer: {peer['result']['rows_out']:,} conversations kept, {pc.get('tokens', 0):,} tokens after truncation, "
              f"{pc.get('trainable_tokens', 0):,} trained, {pc.get('rows_without_trained_token', 0)} rows with none; load {peer['result']['load_s']:.1f} s, map {peer['result']['map_s']:.1f} s, "
              f"write {peer['result']['write_s']:.1f} s, {peer['max_processes']} processes")
    if ceiling:
        c = ceiling["result"]
        checks["ceiling"] = {"sample_mismatches": c["sample_mismatches"], "tokens_untruncated": c["total_tokens_untruncated"], "tokens": c["total_tokens"]}
        print(f"ceiling: {c['total_tokens_untruncated']:,} tokens untruncated ({c['total_tokens']:,} truncated to {MAX_SEQ_LENGTH}); "
              f"rendering (not timed) {c['render_s']:.1f} s; encode CPU {c.get('encode_cpu_s', 0):.1f} s "
              f"({c.get('encode_cpu_s', 0) / max(c['encode_s'], 1e-9):.2f} CPUs busy); ids == apply_chat_template(tokenize=True) on "
              f"{c['sample_checked']} samples: {'yes' if c['sample_mismatches'] == 0 else 'NO (%d differ)' % c['sample_mismatches']}")
        if peer and c["total_tokens"] != checks["peer"]["tokens"]:
            print(f"  WARNING: ceiling truncated total {c['total_tokens']:,} != peer {checks['peer']['tokens']:,}")
    all_ok = not any("error" in r for r in runs)
    for r in ferro:
        s = r["result"]["stats"]
        oc = r.get("output_check", {})
        line = (f"ferrotune ({r['mode']}): {s.get('rows_out'):,} of {s.get('rows_in'):,} kept, {s.get('rows_written'):,} rows written, "
                f"{s.get('total_tokens'):,} tokens ({oc.get('tokens', 0):,} in the file), {s.get('trainable_tokens'):,} trained, "
                f"{s.get('truncated')} truncated, dropped {s.get('dropped')}")
        if r["mode"] == "pack":
            line += f", packing efficiency {s.get('packing_efficiency', 0):.4f}"
        print(line)
        ck: dict = {"rows_kept": s.get("rows_out"), "tokens": s.get("total_tokens"), "tokens_in_file": oc.get("tokens"),
                    "trainable_tokens": s.get("trainable_tokens"), "packing_efficiency": s.get("packing_efficiency")}
        if oc and oc.get("tokens") != s.get("total_tokens"):
            print(f"  MISMATCH: stats.total_tokens {s.get('total_tokens'):,} != tokens in the output file {oc.get('tokens'):,}")
            all_ok = False
        ratio = {"mode": r["mode"]}
        if peer:
            p = checks["peer"]
            ck["rows_equal_peer"] = s.get("rows_out") == p["rows_kept"]
            ck["tokens_equal_peer"] = s.get("total_tokens") == p["tokens"]
            dead = (s.get("dropped") or {}).get("no_trainable_tokens", 0)
            if dead and dead == p["rows_without_trained_token"] and not ck["rows_equal_peer"]:
                # ferrotune drops what truncation left untrainable; the peer keeps such rows
                # (all labels -100): compare without them
                ck["rows_equal_peer"] = s.get("rows_out") == p["rows_kept"] - dead
                ck["tokens_equal_peer"] = s.get("total_tokens") == p["tokens"] - p["tokens_of_rows_without_trained_token"]
                print(f"  (comparing without the peer's {dead} rows with no trained token, which ferrotune drops)")
            ck["trainable_equal_peer"] = s.get("trainable_tokens") == p["trainable_tokens"]
            print(f"  vs peer: kept rows {'equal' if ck['rows_equal_peer'] else 'DIFFER (%s vs %s)' % (s.get('rows_out'), p['rows_kept'])}, "
                  f"total tokens {'equal' if ck['tokens_equal_peer'] else 'DIFFER (%s vs %s)' % (s.get('total_tokens'), p['tokens'])}, "
                  f"trained tokens {'equal' if ck['trainable_equal_peer'] else 'differ (%s vs %s; masking rules differ slightly)' % (s.get('trainable_tokens'), p['trainable_tokens'])}")
            all_ok &= ck["rows_equal_peer"] and ck["tokens_equal_peer"]
            ratio["speedup_vs_peer_process"] = peer["process_s"] / r["process_s"]
            ratio["speedup_vs_peer_timed"] = peer["result"]["timed_s"] / r["result"]["timed_s"]
            ratio["cpu_ratio_peer_over_ferrotune"] = peer["cpu_s"] / max(r["cpu_s"], 1e-9)
            ratio["rss_ratio_vs_peer"] = r["peak_rss_mib"] / peer["peak_rss_mib"]
            ratio["pss_ratio_vs_peer"] = r["peak_pss_mib"] / peer["peak_pss_mib"]
        if ceiling:
            ratio["vs_ceiling"] = ceiling["result"]["encode_s"] / r["result"]["timed_s"]
            if "encode_cpu_s" in ceiling["result"]:
                ratio["cpu_ratio_ceiling_encode_over_ferrotune"] = ceiling["result"]["encode_cpu_s"] / max(r["cpu_s"], 1e-9)
        checks[f"ferrotune_{r['mode']}"] = ck
        ratios.append(ratio)

    if ratios:
        print()
        print("| ferrotune mode | vs peer, process (target ≥ 5×) | vs peer, timed | vs ceiling (ceiling encode s / ferrotune call s, target ≥ 0.8) | RSS ferrotune/peer (target ≤ 0.5) | same with the peer's PSS | CPU s peer/ferrotune | CPU s ceiling encode/ferrotune |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        f = lambda k, x, fmt: (fmt % x[k]) if k in x else "n/a"  # noqa: E731
        for x in ratios:
            print(f"| {x['mode']} | {f('speedup_vs_peer_process', x, '%.1f×')} | {f('speedup_vs_peer_timed', x, '%.1f×')} | "
                  f"{f('vs_ceiling', x, '%.2f')} | {f('rss_ratio_vs_peer', x, '%.2f')} | {f('pss_ratio_vs_peer', x, '%.2f')} | "
                  f"{f('cpu_ratio_peer_over_ferrotune', x, '%.1f×')} | {f('cpu_ratio_ceiling_encode_over_ferrotune', x, '%.2f')} |")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else RESULTS / f"tokenize-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "timestamp": stamp,
        "rows": rows,
        "input": str(jsonl),
        "input_bytes": jsonl_bytes,
        "max_seq_length": MAX_SEQ_LENGTH,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "runs": runs,
        "checks": checks,
        "ratios": ratios,
    }, indent=2, default=str))
    print(f"\nresults: {out}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
