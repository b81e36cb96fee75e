"""Benchmark: ferrotune LoRA training vs transformers + PEFT on the CPU, same model, same rows,
same threads, each contender in a fresh subprocess.

    .venv/bin/python bench/bench_train_cpu.py                 # defaults below, 2 threads
    .venv/bin/python bench/bench_train_cpu.py --threads 1 --steps 5
    .venv/bin/python bench/bench_train_cpu.py --hidden 256 --layers 4 --seq 256   # quicker
    .venv/bin/python bench/bench_train_cpu.py --contenders peer                   # peer only

Model: a "small but real" Phi-3 (default hidden 512, 8 layers, 8 heads (head_dim 64), no GQA,
intermediate 1536 (gate_up 3072), vocab 32064, untied lm_head, RoPE theta 10000, no sliding
window), random weights from transformers' own init (`Phi3ForCausalLM(config)` after
`torch.manual_seed(seed)`, std 0.02), saved with `save_pretrained` as float32 safetensors into a
temporary folder together with the Phi-3 tokenizer fixture. The LoRA starting point (PEFT's init:
lora_A Kaiming-uniform, lora_B zero; r 8, alpha 16, dropout 0, on qkv_proj / o_proj /
gate_up_proj / down_proj) is saved once as a PEFT adapter and both contenders start from it
(ferrotune: `adapter=` / `adapter_init`), so not only the first loss but the whole loss curve is
comparable. `--no-shared-init` lets each tool draw its own LoRA init instead.

Data: random token rows in ferrotune's tokenized format, written once by this script (Parquet
with list<int32> input_ids / labels / position_ids / seq_lengths and the `ferrotune` metadata key,
as `tokenize_dataset` writes it, plus the same arrays as .npz for the peer). Every row is exactly
`--seq` tokens (no padding anywhere) made of 2-3 packed segments ("conversations"); each segment
starts with BOS, has 1-3 turns of which ~30 % of the tokens (the "prompt" part) are -100 and ~70 %
are trained; the first token of every segment is never a target. Micro-batch i is rows
[i*B, (i+1)*B), B = --batch (default 4), so a step processes B*seq tokens (default 2048).

Two phases, each contender and phase in its own process:
  fwd_bwd  forward + backward only (loss and LoRA gradients; no optimizer).
           ferrotune: `LoraModel.load(folder, lora_r, lora_alpha, adapter=...)` then
           `m.loss_and_grads(flat_ids, flat_labels, seq_lengths)` per micro-batch (the B rows
           flattened, seq_lengths = all their segments).
           peer: `loss = model(input_ids=(B, seq), position_ids=..., labels=..., use_cache=False).loss;
           loss.backward()`, grads zeroed (set_to_none) between micro-batches.
  step     full optimizer steps (forward, backward, grad-norm clip 1.0, AdamW lr 1e-4, betas
           (0.9, 0.999), eps 1e-8, weight decay 0, constant LR).
           ferrotune: the whole trainer, `ferrotune.finetune(model, parquet, None, out,
           progress=False, report_to="none", callbacks=[cb], **params)` (in builds without the
           Python wrapper `ferrotune._core.finetune(config_json, progress=cb)`) with
           per_device_train_batch_size B, max_steps warm-up + N, shuffle false, logging_steps 1,
           evaluation/saving off, merge_lora_weights false, precision "32". Its step times are
           the trainer's own per-step tokens_per_second from the metrics events (timed in Rust;
           the events reach Python batched every ~100 ms, so their arrival times are only a
           cross-check); the summary's tokens_per_second (warm-up included) is kept beside.
           peer: a plain PyTorch loop over the same micro-batches (`torch.optim.AdamW`, foreach,
           `clip_grad_norm_`), i.e. what HF Trainer does per step minus its bookkeeping.
  Both time N steps (--steps, default 10) after 2 warm-up steps (--warmup) and read the loss of
  every step (`.item()`), which is also what ferrotune's per-step log does.

The peer's attention ("what HF users do"): `attn_implementation="sdpa"`, float32, the packed rows
fed as B rows of `seq` tokens with `position_ids` restarting at 0 in every segment and *no*
attention_mask. That is TRL's padding-free packing (`DataCollatorWithFlattening` /
`padding_free=True`): transformers 5 detects packed sequences from the position_ids
(`masking_utils.find_packed_sequence_indices`) and builds a block-diagonal causal mask, so
segments do not see each other and the model computes exactly ferrotune's segment semantics
(checked: identical logits to running every segment alone). This only happens without a KV cache,
so the peer passes `use_cache=False` (with the default cache the detection is skipped and the
segments silently attend across each other). HF's loss shifts labels within each row; because the
first token of every segment is -100, that equals ferrotune's per-segment targets, so the losses
of both tools must agree to float32 rounding. SDPA under a dense (B, 1, seq, seq) mask still
computes all seq x seq scores (on CUDA it also cannot use the flash kernel; the memory-efficient
one takes the mask): that cost is the peer's, as it is for its users.

Threads: every process gets OMP_NUM_THREADS = MKL_NUM_THREADS = OPENBLAS_NUM_THREADS =
RAYON_NUM_THREADS = --threads, and the peer calls torch.set_num_threads(--threads).

Memory: each contender/phase runs under a tiny stdlib launcher (`python -S`) that posix_spawns it
and reports the tool process's own ru_maxrss, so the RSS of this (large) parent is not inherited
and counted. Loading the model is part of each process; the timed section is steps only.

Output: a table (tool, phase, tokens/s, s/step, CPU s/step (process CPU time of all threads over
the timed steps; on these shared 2-core machines less noisy than wall time), peak RSS, ratios,
first loss, max loss difference)
and bench/results/train_cpu.json (or --out). A contender that ferrotune does not have yet is
reported as skipped; one that runs out of memory as such. bench/gpu_train.py reuses this file
(its workers run as `bench_train_cpu.py --_worker ...`) for the GPU measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_table import profile_of, run_profiled  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RESULT_TAG = "BENCH_RESULT="
DEFAULT_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000}
BOS_ID = 1
FIRST_SPECIAL_ID = 32000  # ids >= 32000 are Phi-3's added special tokens; the data avoids them
PHASES = ("fwd_bwd", "step")


def tokenizer_folder() -> Path | None:
    for cand in (ROOT / "tests" / "fixtures" / "phi3-tokenizer", ROOT.parent / "shared" / "fixtures" / "phi3-tokenizer"):
        if (cand / "tokenizer.json").is_file():
            return cand
    return None


# --------------------------------------------------------------------------------------------
# model folder (made in a worker process: torch stays out of this parent and, on a GPU, the
# creating process's memory is gone before anything is measured)


def model_config(args) -> dict:
    """Phi3Config keyword arguments from the command line."""
    return {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads or args.heads,
        "max_position_embeddings": max(4096, args.seq),
        "original_max_position_embeddings": max(4096, args.seq),
        "sliding_window": None,
        "rms_norm_eps": 1e-5,  # rope theta: Phi3Config's default 10000, as Phi-3-mini-4k
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "pad_token_id": 32000,
        "tie_word_embeddings": False,
    }


def worker_make_model(job: dict) -> None:
    """Random Phi-3 (transformers' init after torch.manual_seed) saved as safetensors in
    job["dtype"], the tokenizer fixture, generation_config.json, and (job["adapter_dir"]) PEFT's
    LoRA init saved as an adapter."""
    import torch
    import transformers
    from transformers import Phi3Config, Phi3ForCausalLM

    t0 = time.perf_counter()
    out = Path(job["model_dir"])
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, job["dtype"])
    device = job.get("device", "cpu")
    cfg = Phi3Config(**job["config"])
    torch.manual_seed(job["seed"])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # init directly in the target dtype (no float32 copy on a GPU)
    try:
        with torch.device(device):
            model = Phi3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    t_init = time.perf_counter()
    model.save_pretrained(str(out), safe_serialization=True)
    tok = job.get("tokenizer_dir")
    if tok:
        for name in TOKENIZER_FILES:
            if (Path(tok) / name).is_file():
                shutil.copyfile(Path(tok) / name, out / name)
    with open(out / "generation_config.json", "w") as f:
        json.dump({**GENERATION_CONFIG, "transformers_version": transformers.__version__}, f, indent=2)
    t_save = time.perf_counter()
    if job.get("adapter_dir"):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(job["seed"] + 1)
        pm = get_peft_model(model, LoraConfig(
            r=job["lora_r"], lora_alpha=job["lora_alpha"], lora_dropout=0.0, target_modules=list(job["target_modules"]),
            bias="none", task_type="CAUSAL_LM"))
        pm.save_pretrained(job["adapter_dir"])
    _emit({"params": n_params, "init_s": t_init - t0, "save_s": t_save - t_init, "total_s": time.perf_counter() - t0,
           "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))})


# --------------------------------------------------------------------------------------------
# data


def make_rows(n_rows: int, seq: int, vocab: int, seed: int, trained_fraction: float = 0.7):
    """n_rows packed rows of exactly `seq` tokens: dict of (n_rows, seq) int32 input_ids, labels,
    position_ids, and `segments`: a list (per row) of segment lengths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hi = min(vocab, FIRST_SPECIAL_ID)
    ids = rng.integers(3, hi, size=(n_rows, seq), dtype=np.int64).astype(np.int32)
    labels = np.full((n_rows, seq), -100, dtype=np.int32)
    pos = np.zeros((n_rows, seq), dtype=np.int32)
    segments: list[list[int]] = []
    min_seg = max(8, seq // 8)
    for r in range(n_rows):
        k = int(rng.integers(2, 4)) if seq >= 2 * min_seg else 1
        if seq < 3 * min_seg:
            k = min(k, 2 if seq >= 2 * min_seg else 1)
        # k lengths >= min_seg summing to seq
        free = seq - k * min_seg
        cuts = np.sort(rng.integers(0, free + 1, size=k - 1))
        lens = np.diff(np.concatenate([[0], cuts, [free]])) + min_seg
        segments.append([int(x) for x in lens])
        o = 0
        for n in lens:
            n = int(n)
            ids[r, o] = BOS_ID
            pos[r, o:o + n] = np.arange(n, dtype=np.int32)
            # 1-3 turns over positions 1..n-1: a masked prompt part, then a trained reply
            body = n - 1
            turns = int(rng.integers(1, 4)) if body >= 12 else 1
            tcuts = np.sort(rng.choice(np.arange(1, body), size=turns - 1, replace=False)) if turns > 1 else np.array([], int)
            bounds = np.concatenate([[0], tcuts, [body]]).astype(int)
            for a, b in zip(bounds[:-1], bounds[1:]):
                p = int(round((1.0 - trained_fraction) * (b - a)))
                p = min(max(p, 1 if b - a > 1 else 0), b - a - 1) if b - a > 1 else 0
                s0, s1 = o + 1 + a + p, o + 1 + b
                labels[r, s0:s1] = ids[r, s0:s1]
            o += n
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "segments": segments}


def write_npz(rows: dict, npz: Path) -> None:
    """The rows as .npz: (rows, seq) arrays, flat seq_lengths and per-row segment counts."""
    import numpy as np

    np.savez(npz, input_ids=rows["input_ids"], labels=rows["labels"], position_ids=rows["position_ids"],
             seq_lengths=np.array([x for s in rows["segments"] for x in s], dtype=np.int32),
             n_segments=np.array([len(s) for s in rows["segments"]], dtype=np.int32))


def write_parquet(rows: dict, parquet: Path, description: dict) -> bool:
    """The rows as a ferrotune tokenized Parquet file (src/chat/output.rs's schema: four non-null
    list<int32 "item"> columns, JSON description under the `ferrotune` metadata key, row groups of
    8192 rows, Snappy). False (nothing written) when pyarrow is not importable."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    item = pa.field("item", pa.int32(), nullable=True)
    lt = pa.list_(item)
    schema = pa.schema([pa.field(c, lt, nullable=False) for c in ("input_ids", "labels", "position_ids", "seq_lengths")],
                       metadata={"ferrotune": json.dumps(description)})
    cols = [pa.array([list(map(int, x)) for x in rows[c]], type=lt) for c in ("input_ids", "labels", "position_ids")]
    cols.append(pa.array(rows["segments"], type=lt))
    table = pa.Table.from_arrays(cols, schema=schema)
    tmp = parquet.with_name(parquet.name + ".tmp")
    pq.write_table(table, tmp, compression="snappy", row_group_size=8192, use_compliant_nested_type=False)
    os.replace(tmp, parquet)
    return True


def read_npz(npz: Path) -> dict:
    """write_npz's rows back (the `segments` per row included)."""
    import numpy as np

    d = np.load(npz)
    offs = np.concatenate([[0], np.cumsum(d["n_segments"])])
    segs = [[int(x) for x in d["seq_lengths"][offs[i]:offs[i + 1]]] for i in range(len(d["n_segments"]))]
    return {"input_ids": d["input_ids"], "labels": d["labels"], "position_ids": d["position_ids"], "segments": segs}


def load_batches(npz: str, batch: int, n_batches: int) -> list[dict]:
    """Micro-batches of `batch` consecutive rows: (B, seq) arrays and the flat segment lengths."""
    import numpy as np

    d = np.load(npz)
    offs = np.concatenate([[0], np.cumsum(d["n_segments"])])
    out = []
    for i in range(n_batches):
        a, b = i * batch, (i + 1) * batch
        out.append({
            "input_ids": d["input_ids"][a:b],
            "labels": d["labels"][a:b],
            "position_ids": d["position_ids"][a:b],
            "seq_lengths": [int(x) for x in d["seq_lengths"][offs[a]:offs[b]]],
        })
    return out


# --------------------------------------------------------------------------------------------
# measuring a subprocess

# A tiny stdlib-only launcher (as in bench_tokenize.py): it posix_spawns the tool and reports the
# tool process's own ru_maxrss, so nothing of this parent's RSS is inherited into the number.
_LAUNCHER = (
    "import os, sys\n"
    "pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)\n"
    "_, status, ru = os.wait4(pid, 0)\n"
    "sys.stderr.write('\\nRSS_KIB=' + str(ru.ru_maxrss) + ' CPU_S=' + str(ru.ru_utime + ru.ru_stime) + '\\n')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


class GpuMemorySampler:
    """Peak of the device's used memory (nvidia-smi / NVML) minus what was in use before the
    tool started: the whole footprint of the one tool running (CUDA context, allocator cache)."""

    def __init__(self, index: int = 0, interval: float = 0.2):
        self.index, self.interval = index, interval
        self._nvml = None
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            self._nvml = None
        self.available = self._nvml is not None or shutil.which("nvidia-smi") is not None
        self.baseline = self.read() if self.available else None
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def read(self) -> int | None:
        """Used MiB of the device."""
        try:
            if self._nvml is not None:
                return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used // 2**20)
            out = subprocess.run(["nvidia-smi", f"--id={self.index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10)
            return int(out.stdout.strip().splitlines()[0])
        except Exception:
            return None

    def _loop(self):
        while not self._stop.is_set():
            v = self.read()
            if v is not None:
                self.peak = max(self.peak, v)
            self._stop.wait(self.interval)

    def start(self):
        self.baseline = self.read()
        self.peak = self.baseline or 0
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.baseline is None:
            return {}
        return {"gpu_used_peak_mib": self.peak, "gpu_used_baseline_mib": self.baseline,
                "gpu_used_peak_minus_baseline_mib": self.peak - self.baseline}


def run_measured(cmd: list, env: dict, gpu_index: int | None = None) -> dict:
    """Runs cmd in a fresh process (under the launcher): wall seconds, the tool process's peak
    RSS and CPU seconds, optionally the device's peak used memory, and the JSON the worker
    printed after RESULT_TAG."""
    out_f = tempfile.TemporaryFile()
    err_f = tempfile.TemporaryFile()
    sampler = GpuMemorySampler(gpu_index) if gpu_index is not None else None
    if sampler is not None and sampler.available:
        sampler.start()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, *cmd], env=env, stdout=out_f, stderr=err_f, cwd=ROOT)
    proc.wait()
    wall = time.perf_counter() - t0
    gpu = sampler.stop() if sampler is not None and sampler.available else {}
    out_f.seek(0)
    err_f.seek(0)
    stdout = out_f.read().decode("utf-8", "replace")
    stderr = err_f.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[1:6]))} ... failed ({proc.returncode}):\n{stderr[-4000:]}\n{stdout[-2000:]}")
    rss_kib = int(stderr.rsplit("RSS_KIB=", 1)[1].split()[0])
    cpu_s = float(stderr.rsplit("CPU_S=", 1)[1].split()[0])
    result = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    if result is None:
        raise RuntimeError(f"worker printed no result:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return {"process_s": wall, "cpu_s": cpu_s, "peak_rss_mib": rss_kib / 1024, **gpu, "result": result}


def thread_env(threads: int, extra_pythonpath: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "TOKENIZERS_", "RAYON_"))}
    n = str(threads)
    env.update({
        "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "RAYON_NUM_THREADS": n,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    # The checkout's python/ only when it holds a built extension (a `maturin develop` tree);
    # elsewhere (a wheel installed on a GPU machine) it would shadow the installed package.
    if extra_pythonpath and list(Path(extra_pythonpath, "ferrotune").glob("_core*.so")):
        env["PYTHONPATH"] = os.pathsep.join([p for p in (env.get("PYTHONPATH"), extra_pythonpath) if p])
    return env


# --------------------------------------------------------------------------------------------
# workers (run as `python bench/bench_train_cpu.py --_worker NAME --_job JOB.json`)


def _emit(result: dict) -> None:
    sys.stdout.write("\n" + RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


def _timing(job: dict, t_steps: list[float], tokens_per_step: list[int], cpu_steps: list[float]) -> dict:
    """tokens/s and s/step over the timed steps (those after the warm-up). t_steps[0] is the
    start of the first step and t_steps[i] the end of step i (1-based); cpu_steps the same in
    process CPU seconds (all threads: less sensitive than wall time to a busy machine)."""
    w, n = job["warmup"], job["steps"]
    t0, t1 = t_steps[w], t_steps[w + n]
    toks = sum(tokens_per_step[w:w + n])
    return {"timed_s": t1 - t0, "timed_tokens": toks, "tokens_per_second": toks / (t1 - t0),
            "s_per_step": (t1 - t0) / n, "step_s": [b - a for a, b in zip(t_steps[:-1], t_steps[1:])],
            "timed_cpu_s": cpu_steps[w + n] - cpu_steps[w]}


def worker_peer(job: dict) -> None:
    t_start = time.perf_counter()
    import numpy as np
    import peft
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Phi3ForCausalLM

    torch.set_num_threads(job["threads"])
    device = job["device"]
    cuda = device.startswith("cuda")
    dtype = getattr(torch, job["dtype"])
    t_import = time.perf_counter()
    kw = {"dtype": dtype, "attn_implementation": "sdpa"}
    if cuda:
        kw["device_map"] = {"": device}
    model = Phi3ForCausalLM.from_pretrained(job["model_dir"], **kw)
    if not cuda:
        model = model.to(device)
    model.config.use_cache = False
    if job.get("gradient_checkpointing") or job.get("peer_gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if job.get("adapter_dir"):
        model = PeftModel.from_pretrained(model, job["adapter_dir"], is_trainable=True)
    else:
        torch.manual_seed(job["seed"] + 1)
        model = get_peft_model(model, LoraConfig(
            r=job["lora_r"], lora_alpha=job["lora_alpha"], lora_dropout=0.0, target_modules=list(job["target_modules"]),
            bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in params)
    opt = None
    if job["phase"] == "step":
        opt = torch.optim.AdamW(params, lr=job["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                **({"fused": True} if cuda else {}))
    n_batches = job["warmup"] + job["steps"]
    batches = []
    for b in load_batches(job["data_npz"], job["batch"], n_batches):
        batches.append({k: torch.from_numpy(np.ascontiguousarray(b[k])).to(torch.long).to(device)
                        for k in ("input_ids", "labels", "position_ids")})
    autocast = torch.autocast("cuda", dtype=dtype, enabled=bool(cuda and job.get("autocast") and dtype != torch.float32))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_load = time.perf_counter()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    losses, grad_norms, tokens = [], [], []
    sync()
    t_steps = [time.perf_counter()]
    cpu_steps = [time.process_time()]
    try:
        for b in batches:
            with autocast:
                loss = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"], use_cache=False).loss
            loss.backward()
            if opt is not None:
                if job["max_grad_norm"] > 0:
                    grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, job["max_grad_norm"])))
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
            losses.append(float(loss.item()))  # a host sync every step, as ferrotune's per-step loss
            sync()
            t_steps.append(time.perf_counter())
            cpu_steps.append(time.process_time())
            tokens.append(int(b["input_ids"].numel()))
    except torch.cuda.OutOfMemoryError as e:
        _emit({"tool": "peer", "phase": job["phase"], "oom": f"out of GPU memory at step {len(losses) + 1}: {str(e)[:300]}",
               "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20, "losses": losses})
        return
    profile = _profile_peer(job, model, batches[job["warmup"]:], autocast) if opt is None else {}
    res = {
        **profile,
        "tool": "peer", "phase": job["phase"], "losses": losses, "grad_norms": grad_norms, "lora_params": n_lora,
        "import_s": t_import - t_start, "load_s": t_load - t_import, **_timing(job, t_steps, tokens, cpu_steps),
        "threads": torch.get_num_threads(), "device": device, "dtype": job["dtype"],
        "gradient_checkpointing": bool(job.get("gradient_checkpointing") or job.get("peer_gradient_checkpointing")),
        "autocast": bool(cuda and job.get("autocast") and dtype != torch.float32),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    if cuda:
        res["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        res["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        res["device_name"] = torch.cuda.get_device_name()
    _emit(res)


def torch_profile_summary(prof, device: str, host_seconds: float) -> dict:
    """A torch.profiler run in the shape of ferrotune's `_core._gpu_profile("stop")` (so that
    bench/profile_table.py tabulates both): the device's kernels, copies and memsets (the CPU's
    operators when `device` is "cpu") with calls and self seconds, longest first; busy seconds
    (their sum) and the device span (first start to last end)."""
    from torch.autograd import DeviceType

    on_gpu = device != "cpu"
    kind = DeviceType.CUDA if on_gpu else DeviceType.CPU

    def self_us(e) -> float:
        return float(e.self_device_time_total if on_gpu else e.self_cpu_time_total)

    entries = [{"name": e.key, "calls": int(e.count), "seconds": self_us(e) / 1e6, "flops": 0}
               for e in prof.key_averages() if e.device_type == kind and self_us(e) > 0]
    ranges = [(ev.time_range.start, ev.time_range.end) for ev in prof.events() if ev.device_type == kind]
    span = (max(b for _, b in ranges) - min(a for a, _ in ranges)) / 1e6 if ranges else 0.0
    return profile_of(entries, device, host_seconds, span)


def _profile_peer(job: dict, model, batches: list, autocast) -> dict:
    """The peer's side of `_profile_ferrotune`: job["profile_steps"] more forward + backward
    passes (the first timed batches again) under torch.profiler, on a GPU only: {"profile": ...},
    {} on the CPU, {"profile_error": ...} when it fails (the timed result stands)."""
    n = int(job.get("profile_steps") or 0)
    if n <= 0 or not job["device"].startswith("cuda"):
        return {}
    try:
        summary = profile_peer_passes(model, batches[:n], autocast, job["device"])
    except Exception as e:  # noqa: BLE001 (reported, not raised)
        return {"profile_error": f"{type(e).__name__}: {e}"[:500]}
    return {"profile": summary}


def profile_peer_passes(model, batches: list, autocast, device: str) -> dict:
    """Forward + backward of each batch under torch.profiler: the device's kernels on a GPU (the
    CPU's operators on the CPU), as torch_profile_summary, with the steps and tokens."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for b in batches:
            with autocast:
                loss = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"],
                             use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        sync()
    summary = torch_profile_summary(prof, device, time.perf_counter() - t0)
    if cuda:
        summary["device"] = f"{torch.cuda.get_device_name()} (torch.profiler)"
    summary["steps"] = len(batches)
    summary["tokens"] = int(sum(b["input_ids"].numel() for b in batches))
    return summary


def _ferrotune_core():
    """(ferrotune module, _core) or raises ImportError naming what is missing."""
    import ferrotune
    from ferrotune import _core

    return ferrotune, _core


def _profile_ferrotune(job: dict, _core, m, flat: list) -> dict:
    """After the timed steps, job["profile_steps"] more micro-batches (the first timed ones
    again) under ferrotune's GPU profiler (`_core._gpu_profile`): {"profile": ...} with the
    device time per kernel / GEMM shape, or {} on the CPU and in builds without it."""
    n = int(job.get("profile_steps") or 0)
    if n <= 0 or job["device"] == "cpu" or not hasattr(_core, "_gpu_profile"):
        return {}
    batches = flat[job["warmup"]:job["warmup"] + n] or flat[:n]
    def run():
        for ids, labels, seqs in batches:
            m.loss_and_grads(ids, labels, seqs, recompute=bool(job.get("gradient_checkpointing")))

    try:  # a failure here must not cost the timed result
        prof, _ = run_profiled(_core, run)
    except Exception as e:  # noqa: BLE001 (reported, not raised)
        return {"profile_error": f"{type(e).__name__}: {e}"[:500]}
    prof["steps"] = len(batches)
    prof["tokens"] = int(sum(ids.shape[0] for ids, _, _ in batches))
    return {"profile": prof}


def worker_ferrotune(job: dict) -> None:
    t_start = time.perf_counter()
    try:
        ferrotune, _core = _ferrotune_core()
    except ImportError as e:
        _emit({"tool": "ferrotune", "phase": job["phase"], "skipped": f"cannot import ferrotune: {e}"})
        return
    version = getattr(ferrotune, "__version__", "?")
    if job["phase"] == "fwd_bwd":
        LoraModel = getattr(ferrotune, "LoraModel", None) or getattr(_core, "LoraModel", None)
        if LoraModel is None:
            _emit({"tool": "ferrotune", "phase": job["phase"], "skipped": "ferrotune has no LoraModel yet"})
            return
        import numpy as np

        t_import = time.perf_counter()
        kw = dict(lora_r=job["lora_r"], lora_alpha=float(job["lora_alpha"]), lora_dropout=0.0,
                  target_modules=list(job["target_modules"]), seed=job["seed"], device=job["device"],
                  precision=job["precision"])
        if job.get("adapter_dir"):
            kw["adapter"] = job["adapter_dir"]
        m = LoraModel.load(job["model_dir"], **kw)
        n_batches = job["warmup"] + job["steps"]
        flat = []
        for b in load_batches(job["data_npz"], job["batch"], n_batches):
            # int64: what the binding converts any integer array to (no copy on its side)
            flat.append((np.ascontiguousarray(b["input_ids"].reshape(-1), dtype=np.int64),
                         np.ascontiguousarray(b["labels"].reshape(-1), dtype=np.int64), b["seq_lengths"]))
        t_load = time.perf_counter()
        losses, n_targets, tokens = [], [], []
        t_steps = [time.perf_counter()]
        cpu_steps = [time.process_time()]
        try:
            for ids, labels, seqs in flat:
                loss, nt, grads = m.loss_and_grads(ids, labels, seqs, recompute=bool(job.get("gradient_checkpointing")))
                losses.append(float(loss))
                n_targets.append(int(nt))
                t_steps.append(time.perf_counter())
                cpu_steps.append(time.process_time())
                tokens.append(int(ids.shape[0]))
        except Exception as e:
            if "out of memory" in str(e).lower():
                _emit({"tool": "ferrotune", "phase": job["phase"], "oom": f"out of memory at step {len(losses) + 1}: {str(e)[:300]}",
                       "losses": losses})
                return
            raise
        profile = _profile_ferrotune(job, _core, m, flat)
        _emit({"tool": "ferrotune", "phase": job["phase"], "losses": losses, "n_targets": n_targets,
               "lora_params": int(sum(np.asarray(v).size for v in grads.values())),
               "import_s": t_import - t_start, "load_s": t_load - t_import, **_timing(job, t_steps, tokens, cpu_steps),
               "device": job["device"], "versions": {"ferrotune": version}, **profile})
        return

    # phase "step": the whole trainer
    finetune = getattr(_core, "finetune", None)
    if finetune is None:
        _emit({"tool": "ferrotune", "phase": job["phase"], "skipped": "ferrotune._core has no finetune yet"})
        return
    if not job.get("data_parquet"):
        _emit({"tool": "ferrotune", "phase": job["phase"],
               "skipped": "no Parquet rows (pyarrow missing): make them elsewhere with --data-only and carry --data-dir"})
        return
    n_steps = job["warmup"] + job["steps"]
    cfg = {
        "model": job["model_dir"],
        "train_file": job["data_parquet"],
        "output_dir": job["out_dir"],
        "max_steps": n_steps,
        "per_device_train_batch_size": job["batch"],
        "gradient_accumulation_steps": 1,
        "learning_rate": job["lr"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "max_grad_norm": job["max_grad_norm"],
        "max_seq_length": job["seq"],
        "lora_r": job["lora_r"],
        "lora_alpha": float(job["lora_alpha"]),
        "lora_dropout": 0.0,
        "target_modules": list(job["target_modules"]),
        "merge_lora_weights": False,
        "precision": job["precision"],
        "seed": job["seed"],
        "logging_steps": 1,
        "evaluation_strategy": "no",
        "save_strategy": "no",
        "device": job["device"],
        "gradient_checkpointing": bool(job.get("gradient_checkpointing")),
        "shuffle": False,
        "packing": True,
    }
    if job.get("adapter_dir"):
        cfg["adapter_init"] = job["adapter_dir"]
    step_t: dict[int, float] = {}
    step_cpu: dict[int, float] = {}
    events: list[dict] = []

    def on_metrics(ev: dict) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        events.append(ev)
        if "step" in ev and "loss" in ev:  # a training log (eval logs carry eval_loss)
            step_t.setdefault(int(ev["step"]), now)
            step_cpu.setdefault(int(ev["step"]), cpu)

    def progress(*args):
        # the native renderer protocol: renderer("metrics", 0, json_str, None, 0, "") for metrics
        if args and args[0] == "metrics":
            for a in args[1:]:
                if isinstance(a, str) and a.startswith("{"):
                    try:
                        on_metrics(json.loads(a))
                    except ValueError:
                        pass
        return None

    wrapper = getattr(ferrotune, "finetune", None)  # the Python API (a module in older builds)
    t_import = time.perf_counter()
    t_call = time.perf_counter()
    try:
        if callable(wrapper):
            entry = "ferrotune.finetune"
            params = {k: v for k, v in cfg.items() if k not in ("model", "train_file", "output_dir")}
            out = wrapper(job["model_dir"], job["data_parquet"], None, job["out_dir"], progress=False, report_to="none",
                          callbacks=[on_metrics], **params)
            summary = {k: getattr(out, k, None) for k in ("step_losses", "tokens_per_second", "train_seconds",
                                                          "train_tokens", "global_step")}
        else:
            entry = "ferrotune._core.finetune"
            summary = json.loads(finetune(json.dumps(cfg), progress=progress))
    except Exception as e:
        if "out of memory" in str(e).lower():
            _emit({"tool": "ferrotune", "phase": job["phase"], "oom": f"out of memory: {str(e)[:300]}"})
            return
        raise
    t_end = time.perf_counter()
    tokens_per_step = job["batch"] * job["seq"]
    res = {"tool": "ferrotune", "phase": job["phase"], "entry": entry, "losses": summary.get("step_losses"),
           "grad_norms": [e.get("grad_norm") for e in events if "grad_norm" in e],
           "summary_tokens_per_second": summary.get("tokens_per_second"),
           "summary_train_seconds": summary.get("train_seconds"), "summary_train_tokens": summary.get("train_tokens"),
           "global_step": summary.get("global_step"), "import_s": t_import - t_start, "call_s": t_end - t_call,
           "device": job["device"], "precision": job["precision"], "versions": {"ferrotune": version}}
    if step_t and min(step_t) == 0:  # events numbered from 0: make "step k" mean k steps done
        step_t = {k + 1: v for k, v in step_t.items()}
        step_cpu = {k + 1: v for k, v in step_cpu.items()}
        events = [{**e, "step": e["step"] + 1} if "step" in e else e for e in events]
    w, n = job["warmup"], job["steps"]
    # Each per-step metrics event carries the trainer's own tokens_per_second over its logging
    # window (logging_steps=1: exactly that step, timed in Rust; the windows tile the run). That
    # is the primary timing: the events reach Python in batches (the binding delivers them every
    # ~100 ms), so Python-side arrival times are only a cross-check, good for long steps.
    step_tps = {int(e["step"]): e["tokens_per_second"] for e in events
                if "step" in e and "loss" in e and e.get("tokens_per_second")}
    timed = list(range(w + 1, w + n + 1))
    if all(k in step_tps for k in timed):
        step_s = {k: tokens_per_step / step_tps[k] for k in step_tps}
        dt = sum(step_s[k] for k in timed)
        res.update({"timed_s": dt, "timed_tokens": n * tokens_per_step, "tokens_per_second": n * tokens_per_step / dt,
                    "s_per_step": dt / n, "rate_source": "per-step tokens_per_second of the metrics events (timed in Rust)",
                    "step_s": [step_s[k] for k in sorted(step_s)]})
    t0 = step_t.get(w) if w > 0 else t_call
    if t0 is not None and (w + n) in step_t:
        dt_py = step_t[w + n] - t0
        res["python_event_timed_s"] = dt_py  # arrival times in Python: +-0.1 s per end
        if w > 0:
            res["timed_cpu_s"] = step_cpu[w + n] - step_cpu[w]  # CPU seconds at those arrivals
        res["load_s"] = step_t[min(step_t)] - t_call  # loading + first step (+ up to 0.1 s)
        if "tokens_per_second" not in res:
            res.update({"timed_s": dt_py, "timed_tokens": n * tokens_per_step, "tokens_per_second": n * tokens_per_step / dt_py,
                        "s_per_step": dt_py / n, "rate_source": "arrival times of the per-step metrics events (+-0.1 s)"})
    if "tokens_per_second" not in res:
        tps = summary.get("tokens_per_second")
        res.update({"tokens_per_second": tps, "s_per_step": tokens_per_step / tps if tps else None,
                    "rate_source": "summary tokens_per_second (all steps, warm-up included)"})
    _emit(res)


# --------------------------------------------------------------------------------------------
# orchestration (shared with gpu_train.py)


def add_model_args(ap: argparse.ArgumentParser, d: dict) -> None:
    """Model / data / LoRA / schedule flags, defaults from `d`."""
    ap.add_argument("--hidden", type=int, default=d["hidden"])
    ap.add_argument("--layers", type=int, default=d["layers"])
    ap.add_argument("--heads", type=int, default=d["heads"])
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (Phi-3-mini has no GQA)")
    ap.add_argument("--intermediate", type=int, default=d["intermediate"], help="MLP width (gate_up_proj is 2x)")
    ap.add_argument("--vocab", type=int, default=d["vocab"])
    ap.add_argument("--seq", type=int, default=d["seq"], help="tokens per packed row")
    ap.add_argument("--batch", type=int, default=d["batch"], help="rows per micro-batch / step")
    ap.add_argument("--lora-r", type=int, default=d["lora_r"])
    ap.add_argument("--lora-alpha", type=float, default=d["lora_alpha"])
    ap.add_argument("--target-modules", default=",".join(DEFAULT_TARGETS))
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=d["steps"], help="timed steps")
    ap.add_argument("--warmup", type=int, default=d["warmup"], help="untimed steps first")
    ap.add_argument("--threads", type=int, default=d["threads"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default=",".join(PHASES), help="comma list of fwd_bwd, step")
    ap.add_argument("--contenders", default="peer,ferrotune", help="comma list of peer, ferrotune")
    ap.add_argument("--no-shared-init", action="store_true", help="each tool draws its own LoRA init (default: both start from one PEFT adapter)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="both: recompute activations in backward")
    ap.add_argument("--peer-gradient-checkpointing", action="store_true",
                    help="the peer only (what an HF user does when the batch does not fit otherwise)")
    ap.add_argument("--model-dir", default=None, help="keep/reuse the random model here (default: a temporary folder)")
    ap.add_argument("--data-dir", default=None, help="keep/reuse the token rows here (default: a temporary folder)")
    ap.add_argument("--data-only", action="store_true", help="write the token rows to --data-dir and exit")
    ap.add_argument("--out", default=None, help="JSON results path")


def prepare(args, work: Path, dtype: str, device: str, env: dict) -> dict:
    """Model folder (reused when --model-dir holds one with the same spec), adapter, data files."""
    cfg = model_config(args)
    spec = {"config": cfg, "dtype": dtype, "seed": args.seed, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
            "target_modules": args.target_modules.split(",")}
    model_dir = Path(args.model_dir) if args.model_dir else work / "model"
    adapter_dir = model_dir.parent / (model_dir.name + "-lora-init")
    marker = model_dir / ".bench_spec.json"
    made = None
    have_adapter = args.no_shared_init or (adapter_dir / "adapter_config.json").is_file()
    if marker.is_file() and json.loads(marker.read_text()) == spec and have_adapter:
        print(f"model: reusing {model_dir}", flush=True)
    else:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(adapter_dir, ignore_errors=True)
        job = {**spec, "model_dir": str(model_dir), "device": device,
               "tokenizer_dir": str(tokenizer_folder() or ""),
               "adapter_dir": None if args.no_shared_init else str(adapter_dir)}
        print(f"model: creating random Phi-3 ({dtype}, on {device}) in {model_dir} ...", end=" ", flush=True)
        made = run_job("make_model", job, work, env)["result"]
        marker.write_text(json.dumps(spec))
        print(f"{made['params'] / 1e6:.1f} M params, {made['bytes'] / 2**20:.0f} MiB, {made['total_s']:.1f} s", flush=True)
    data = prepare_data(args, Path(args.data_dir) if getattr(args, "data_dir", None) else work)
    return {"model_dir": str(model_dir), "adapter_dir": None if args.no_shared_init else str(adapter_dir),
            "model_made": made, "config": cfg, **data}


def prepare_data(args, data_dir: Path) -> dict:
    """The rows (.npz, and .parquet when pyarrow is here) in data_dir, reused when present: the
    rows depend only on (rows, seq, vocab, seed), so a machine without pyarrow can be handed
    files made elsewhere (gpu_train.py --data-only)."""
    n_rows = (args.warmup + args.steps) * args.batch
    data_dir.mkdir(parents=True, exist_ok=True)
    stem = f"rows{n_rows}-seq{args.seq}-vocab{args.vocab}-seed{args.seed}"
    parquet, npz = data_dir / f"{stem}.parquet", data_dir / f"{stem}.npz"
    if npz.is_file():
        rows, how = read_npz(npz), "reused"
    else:
        rows, how = make_rows(n_rows, args.seq, args.vocab, args.seed + 7), "written"
        write_npz(rows, npz)
    if not parquet.is_file():
        try:  # not `import ferrotune`: this parent stays free of the native module (and CUDA)
            from importlib.metadata import version

            fv = version("ferrotune")
        except Exception:
            fv = "0.0.0"
        desc = {"tokenizer": str(tokenizer_folder() or ""), "mode": "pack", "max_seq_length": args.seq,
                "train_on": "assistant", "data_files": [], "ferrotune_version": fv}
        write_parquet(rows, parquet, desc)
    info = {"rows": n_rows, "segments": rows["segments"], "trained_fraction": float((rows["labels"] != -100).mean())}
    segs = [x for s in info["segments"] for x in s]
    print(f"data ({how}): {n_rows} rows x {args.seq} tokens ({len(segs)} segments, mean {sum(segs) / len(segs):.0f} tokens; "
          f"{100 * info['trained_fraction']:.1f} % of tokens trained) in {npz}"
          f"{'' if parquet.is_file() else ' (no Parquet: pyarrow is missing, so ferrotune step is skipped)'}", flush=True)
    return {"data_parquet": str(parquet) if parquet.is_file() else None, "data_npz": str(npz), **info}


def run_job(worker: str, job: dict, work: Path, env: dict, gpu_index: int | None = None) -> dict:
    path = work / f"job-{worker}-{job.get('phase', '')}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(job))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", worker, "--_job", str(path)]
    return run_measured(cmd, env, gpu_index=gpu_index)


def run_contenders(args, prep: dict, work: Path, *, device: str, dtype: str, precision: str, autocast: bool,
                   env_peer: dict, env_ferro: dict, gpu_index: int | None = None, on_run=None) -> list[dict]:
    """Each phase's contenders in turn, each in its own process; `on_run(runs)` (if given) after
    every one, with the runs so far (bench/gpu_train.py saves them: a time limit that stops the
    benchmark then still leaves the finished runs)."""
    runs = []
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for p in phases:
        if p not in PHASES:
            raise SystemExit(f"unknown phase {p!r}")
    for c in contenders:
        if c not in ("peer", "ferrotune"):
            raise SystemExit(f"unknown contender {c!r}")
    for phase in phases:
        for tool in contenders:
            job = {"tool": tool, "phase": phase, "model_dir": prep["model_dir"], "adapter_dir": prep["adapter_dir"],
                   "data_parquet": prep["data_parquet"], "data_npz": prep["data_npz"],
                   "out_dir": str(work / f"ferrotune-out-{phase}"), "batch": args.batch, "seq": args.seq,
                   "warmup": args.warmup, "steps": args.steps, "threads": args.threads, "device": device,
                   "dtype": dtype, "precision": precision, "autocast": autocast, "lora_r": args.lora_r,
                   "lora_alpha": args.lora_alpha, "target_modules": args.target_modules.split(","), "lr": args.lr,
                   "max_grad_norm": args.max_grad_norm, "gradient_checkpointing": args.gradient_checkpointing,
                   "peer_gradient_checkpointing": args.peer_gradient_checkpointing,
                   "profile_steps": getattr(args, "profile_steps", 0), "seed": args.seed}
            runs.append(_run_one(tool, phase, job, work, env_peer if tool == "peer" else env_ferro, gpu_index))
            if on_run is not None:
                on_run(runs)
    return runs


def _run_one(tool: str, phase: str, job: dict, work: Path, env: dict, gpu_index: int | None) -> dict:
    """One contender's phase in its own process, with a line of progress: the run's record."""
    print(f"{tool:9} {phase:7} ...", end=" ", flush=True)
    try:
        m = run_job(tool, job, work, env, gpu_index)
    except RuntimeError as e:
        print("FAILED")
        print(str(e)[-3000:], file=sys.stderr)
        return {"tool": tool, "phase": phase, "error": str(e)[-3000:]}
    shutil.rmtree(work / f"ferrotune-out-{phase}", ignore_errors=True)
    r = m["result"]
    if "skipped" in r or "oom" in r:
        why = r.get("skipped") or r["oom"]
        print(f"{'skipped' if 'skipped' in r else 'OUT OF MEMORY'} ({why})")
        return {"tool": tool, "phase": phase, **({"skipped": why} if "skipped" in r else {"oom": why}), **m}
    extra = ""
    if "gpu_used_peak_minus_baseline_mib" in m:
        extra = f"  GPU {m['gpu_used_peak_minus_baseline_mib']:.0f} MiB (nvidia-smi)"
    tps = r.get("tokens_per_second")
    print(f"{tps or 0:10,.0f} tokens/s  {r.get('s_per_step') or 0:7.3f} s/step  RSS {m['peak_rss_mib']:6.0f} MiB"
          f"  loss[0] {r['losses'][0] if r.get('losses') else float('nan'):.6f}{extra}", flush=True)
    return {"tool": tool, "phase": phase, **m}


def compare(runs: list[dict]) -> list[dict]:
    """Per phase: ratios ferrotune/peer and loss agreement."""
    out = []
    by = {(r["tool"], r["phase"]): r for r in runs if "result" in r and "oom" not in r and "skipped" not in r}
    for phase in PHASES:
        p, f = by.get(("peer", phase)), by.get(("ferrotune", phase))
        if not p or not f:
            continue
        pr, fr = p["result"], f["result"]
        c = {"phase": phase}
        if pr.get("tokens_per_second") and fr.get("tokens_per_second"):
            c["speed_ratio_ferrotune_over_peer"] = fr["tokens_per_second"] / pr["tokens_per_second"]
        if pr.get("timed_cpu_s") and fr.get("timed_cpu_s"):
            c["cpu_ratio_peer_over_ferrotune"] = pr["timed_cpu_s"] / fr["timed_cpu_s"]
        c["rss_ratio_ferrotune_over_peer"] = f["peak_rss_mib"] / p["peak_rss_mib"]
        if "gpu_used_peak_minus_baseline_mib" in f and "gpu_used_peak_minus_baseline_mib" in p and p["gpu_used_peak_minus_baseline_mib"]:
            c["gpu_mem_ratio_ferrotune_over_peer"] = f["gpu_used_peak_minus_baseline_mib"] / p["gpu_used_peak_minus_baseline_mib"]
        lp, lf = pr.get("losses") or [], fr.get("losses") or []
        if lp and lf:
            k = min(len(lp), len(lf))
            diffs = [abs(a - b) for a, b in zip(lp[:k], lf[:k])]
            c.update({"loss_step1_peer": lp[0], "loss_step1_ferrotune": lf[0], "loss_step1_abs_diff": diffs[0],
                      "loss_max_abs_diff": max(diffs), "loss_steps_compared": k})
        out.append(c)
    return out


def print_report(runs: list[dict], comps: list[dict], header: str, gpu: bool = False, extra_cols=None) -> None:
    print()
    print(header)
    cols = "| tool | phase | tokens/s | s/step | CPU s/step | peak RSS MiB |"
    sep = "|---|---|---:|---:|---:|---:|"
    if gpu:
        cols += " GPU peak MiB (nvidia-smi) | torch max allocated MiB |"
        sep += "---:|---:|"
    if extra_cols:
        cols += "".join(f" {name} |" for name, _ in extra_cols)
        sep += "---:|" * len(extra_cols)
    cols += " loss step 1 |"
    sep += "---:|"
    print(cols)
    print(sep)
    for r in runs:
        if "result" not in r or "skipped" in r or "oom" in r:
            why = r.get("skipped") or ("out of memory" if "oom" in r else "FAILED")
            print(f"| {r['tool']} | {r['phase']} | {why} |")
            continue
        res = r["result"]
        cpu = res.get("timed_cpu_s")
        n_timed = round(res["timed_s"] / res["s_per_step"]) if res.get("timed_s") and res.get("s_per_step") else 0
        cpu = f"{cpu / n_timed:.3f}" if cpu is not None and n_timed else "n/a"
        line = (f"| {r['tool']} | {r['phase']} | {res.get('tokens_per_second') or 0:,.0f} | {res.get('s_per_step') or 0:.3f} | "
                f"{cpu} | {r['peak_rss_mib']:,.0f} |")
        if gpu:
            g = r.get("gpu_used_peak_minus_baseline_mib")
            a = res.get("cuda_max_allocated_mib")
            line += f" {g:,.0f} |" if g is not None else " n/a |"
            line += f" {a:,.0f} |" if a is not None else " n/a |"
        if extra_cols:
            line += "".join(f" {fn(r)} |" for _, fn in extra_cols)
        line += f" {res['losses'][0]:.6f} |" if res.get("losses") else " |"
        print(line)
    if comps:
        print()
        print("| phase | speed ferrotune/peer | CPU s peer/ferrotune | RSS ferrotune/peer |" + (" GPU mem ferrotune/peer |" if gpu else "")
              + " loss step 1 peer | loss step 1 ferrotune | max abs loss diff (steps) |")
        print("|---|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|---:|---:|")
        for c in comps:
            sp = c.get("speed_ratio_ferrotune_over_peer")
            cr = c.get("cpu_ratio_peer_over_ferrotune")
            line = (f"| {c['phase']} | {f'{sp:.2f}×' if sp else 'n/a'} | {f'{cr:.2f}×' if cr else 'n/a'} | "
                    f"{c['rss_ratio_ferrotune_over_peer']:.2f} |")
            if gpu:
                g = c.get("gpu_mem_ratio_ferrotune_over_peer")
                line += f" {f'{g:.2f}' if g else 'n/a'} |"
            if "loss_step1_peer" in c:
                line += (f" {c['loss_step1_peer']:.6f} | {c['loss_step1_ferrotune']:.6f} | "
                         f"{c['loss_max_abs_diff']:.2e} ({c['loss_steps_compared']}) |")
            else:
                line += " | | |"
            print(line)


CPU_DEFAULTS = {"hidden": 512, "layers": 8, "heads": 8, "intermediate": 1536, "vocab": 32064, "seq": 512, "batch": 4,
                "lora_r": 8, "lora_alpha": 16.0, "steps": 10, "warmup": 2, "threads": 2}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, CPU_DEFAULTS)
    ap.add_argument("--_worker", choices=["make_model", "peer", "ferrotune"], help=argparse.SUPPRESS)
    ap.add_argument("--_job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        job = json.loads(Path(args._job).read_text())
        {"make_model": worker_make_model, "peer": worker_peer, "ferrotune": worker_ferrotune}[args._worker](job)
        return 0

    if args.data_only:
        if not args.data_dir:
            raise SystemExit("--data-only needs --data-dir")
        prepare_data(args, Path(args.data_dir))
        return 0
    work = Path(tempfile.mkdtemp(prefix="ferrotune-bench-train-"))
    env = thread_env(args.threads)
    env_ferro = thread_env(args.threads, extra_pythonpath=str(ROOT / "python"))
    print(f"{os.cpu_count()} CPUs, {args.threads} threads per contender; Phi-3 hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads, intermediate {args.intermediate}, vocab {args.vocab}; {args.batch} rows x {args.seq} tokens "
          f"per step; LoRA r {args.lora_r} alpha {args.lora_alpha:g} on {args.target_modules}; "
          f"{args.warmup} warm-up + {args.steps} timed steps", flush=True)
    try:
        prep = prepare(args, work, "float32", "cpu", env)
        runs = run_contenders(args, prep, work, device="cpu", dtype="float32", precision="32", autocast=False,
                              env_peer=env, env_ferro=env_ferro)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    comps = compare(runs)
    header = (f"CPU LoRA training, float32, {args.threads} threads, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
              f"Phi-3 h{args.hidden} L{args.layers} heads {args.heads} I{args.intermediate} V{args.vocab}; "
              f"{args.batch}x{args.seq} tokens/step; tokens/s over {args.steps} steps after {args.warmup} warm-up.\n"
              "fwd_bwd: forward+backward only (ferrotune LoraModel.loss_and_grads vs peer loss.backward()); "
              "step: + clip + AdamW (ferrotune finetune() vs a PyTorch loop). Peak RSS: each process's ru_maxrss. "
              "CPU s/step: process CPU time (all threads) over the timed steps.")
    print_report(runs, comps, header)
    out = Path(args.out) if args.out else RESULTS / "train_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "timestamp": time.strftime("%Y%m%d-%H%M%S"), "args": vars(args), "cpus": os.cpu_count(),
        "python": platform.python_version(), "platform": platform.platform(), "model_config": prep["config"],
        "data": {"rows": prep["rows"], "segments": prep["segments"], "trained_fraction": prep["trained_fraction"]},
        "model_made": prep["model_made"], "runs": runs, "comparison": comps,
    }, indent=2, default=str))
    print(f"\nresults: {out}")
    return 0 if not any("error" in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
