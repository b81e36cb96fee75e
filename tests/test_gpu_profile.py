"""ferrotune's GPU profiler (`_core._gpu_profile`, src/kernels/cuda/profile.rs) on the emulated
GPU, and its tables (bench/profile_table.py) in the GPU check's report: the profile the first GPU
run brings back is what the attention and GEMM tuning will start from, so its counts must be
right. One training micro-batch (forward + backward, no recompute) of a small random Phi-3:
  - every layer launches the attention forward, its backward and the row kernels once;
  - the GEMMs' FLOPs add up to exactly what LoRA training must compute (bench/gpu_train.py's
    model FLOPs, 4 per frozen weight and 6 per LoRA weight per token) less what ferrotune
    leaves out: the logits of tokens without a target, and the input gradient of the first
    layer's qkv_proj (only the frozen embedding is upstream). No product is computed twice,
    none is left out of the count.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ferrotune import Generator, LoraModel, _core
from tests.support import tiny_phi3 as tp
from tests.support.gpu_report import run_report

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_generate  # noqa: E402
import bench_train_cpu  # noqa: E402
from profile_table import group_of, profile_tables  # noqa: E402

pytestmark = pytest.mark.skipif(not _core.gpu_emulator(), reason="a build without the emulated GPU")

H, LAYERS, HEADS, I, V, R = 64, 2, 4, 128, 32064, 8


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> dict:
    d = tp.make_tiny_phi3(tmp_path_factory.mktemp("prof") / "m", hidden=H, layers=LAYERS, heads=HEADS,
                          intermediate=I, vocab=V, seed=7)
    m = LoraModel.load(str(d), lora_r=R, lora_alpha=16.0, lora_dropout=0.0, device="emu", precision="bf16", seed=0)
    rng = np.random.default_rng(0)
    seqs = [40, 17, 71]
    ids = rng.integers(0, V, sum(seqs)).astype(np.int64)
    labels = ids.copy()
    labels[rng.random(ids.size) < 0.3] = -100
    m.loss_and_grads(ids, labels, seqs)  # not profiled
    _core._gpu_profile("start")
    _, targets, _ = m.loss_and_grads(ids, labels, seqs)
    prof = json.loads(_core._gpu_profile("stop"))
    prof["steps"], prof["tokens"], prof["targets"] = 1, int(ids.size), targets
    return prof


def calls(prof: dict, name: str) -> int:
    return sum(e["calls"] for e in prof["entries"] if e["name"] == name)


def test_one_training_step_launches_each_layer_kernel_once_per_layer(profile):
    assert "emulated GPU" in profile["device"]
    for kernel in ("attn_fwd_bf16", "attn_bwd_dot_simt_bf16", "attn_bwd_dq_bf16", "attn_bwd_dkdv_bf16"):
        assert calls(profile, kernel) == LAYERS, (kernel, profile["entries"])
    # model/layer.rs keeps the inputs of the two norms and of SwiGLU and recomputes their outputs
    # in the backward; the final norm runs once; the first layer's input norm needs no gradient
    assert calls(profile, "rms_norm_fwd_bf16") == 2 * LAYERS + 1 + 2 * LAYERS
    assert calls(profile, "rms_norm_bwd_bf16") == 2 * LAYERS + 1 - 1
    assert calls(profile, "swiglu_fwd_bf16") == 2 * LAYERS and calls(profile, "swiglu_bwd_bf16") == LAYERS
    assert calls(profile, "ce_rows_bf16") >= 1
    assert profile["calls"] == sum(e["calls"] for e in profile["entries"])
    assert 0 < profile["busy_seconds"] <= profile["device_span_seconds"] + 1e-9
    assert profile["device_span_seconds"] <= profile["host_seconds"] + 1e-9
    secs = [e["seconds"] for e in profile["entries"]]
    assert secs == sorted(secs, reverse=True)


def test_the_gemm_flops_are_the_model_flops_of_lora_training(profile):
    lin = {"qkv_proj": (H, 3 * H), "o_proj": (H, H), "gate_up_proj": (H, 2 * I), "down_proj": (I, H)}
    n_layers = LAYERS * sum(i * o for i, o in lin.values())
    n_lora = LAYERS * sum(R * (i + o) for i, o in lin.values())
    t, targets = profile["tokens"], profile["targets"]
    assert 0 < targets < t
    model_flops = t * (4 * n_layers + 6 * n_lora) + targets * 4 * H * V
    first_qkv_dx = 2 * t * (H * 3 * H + R * H)  # frozen weight and LoRA A: x's gradient
    gemm = [e for e in profile["entries"] if e["name"].startswith("gemm ")]
    assert gemm and all(e["flops"] > 0 for e in gemm)
    assert all(e["flops"] == 0 for e in profile["entries"] if not e["name"].startswith("gemm "))
    assert sum(e["flops"] for e in gemm) == model_flops - first_qkv_dx


def test_the_tables_group_and_rank_the_calls(profile):
    lines = profile_tables(profile, 1, top=5)
    text = "\n".join(lines)
    assert lines[0].startswith(f"1 profiled step(s) on {profile['device']}: {profile['calls']:,} calls; per step ")
    for group in ("attention", "GEMMs (cuBLAS)", "cross-entropy", "other kernels"):
        assert f"| {group} | " in text, text
    top = profile["entries"][0]
    assert f"| `{top['name']}` | {top['calls']:g} | {1e3 * top['seconds']:.2f} |" in text
    assert f"| {len(profile['entries']) - 5} more | |" in text
    assert group_of("attn_bwd_dq_f16") == "attention" and group_of("gemm NT 3x6x4 bf16") == "GEMMs (cuBLAS)"
    assert group_of("copy to the GPU") == "copies, memsets" and group_of("rope_bf16") == "other kernels"
    # nothing profiled: one line, no division by zero
    assert profile_tables({"entries": [], "calls": 0}, 2)[0] == "2 profiled step(s): nothing ran on the GPU"


def test_the_gpu_check_report_shows_the_profile_of_the_training_benchmark(profile, tmp_path):
    train = {"runs": [{"tool": "ferrotune", "phase": "fwd_bwd", "result": {"tokens_per_second": 123.0, "profile": profile}}],
             "comparison": []}
    md, report, _ = run_report(tmp_path, "train\t0\t200\n", train=train)
    assert "## Where ferrotune's GPU time goes (its profiler, fwd_bwd)" in md
    assert "\n".join(profile_tables(profile, 1)) in md
    assert report["train"]["profile"]["calls"] == profile["calls"]


def test_stopping_a_profiler_that_is_not_running_is_a_clear_error():
    with pytest.raises(ValueError, match="not running"):
        _core._gpu_profile("stop")
    with pytest.raises(ValueError, match="use \"start\" or \"stop\""):
        _core._gpu_profile("pause")


def test_the_training_benchmark_profiles_its_extra_steps_and_survives_a_failing_one(tmp_path):
    # bench_train_cpu._profile_ferrotune, as bench/gpu_train.py's ferrotune worker runs it after
    # its timed steps (here on the emulated GPU); a failure is reported beside the timings
    d = tp.make_tiny_phi3(tmp_path / "m", hidden=H, layers=1, heads=HEADS, intermediate=I, seed=3)
    m = LoraModel.load(str(d), lora_r=R, lora_alpha=16.0, device="emu")
    flat = []
    for k in range(3):
        ids = np.random.default_rng(k).integers(0, V, 24).astype(np.int64)
        flat.append((ids, ids.copy(), [10, 14]))
    job = {"profile_steps": 2, "device": "emu", "warmup": 1}
    prof = bench_train_cpu._profile_ferrotune(job, _core, m, flat)["profile"]
    assert prof["steps"] == 2 and prof["tokens"] == 48
    assert calls(prof, "attn_fwd_bf16") == 2  # default precision "auto": bf16 on an sm_80 GPU
    assert bench_train_cpu._profile_ferrotune({**job, "device": "cpu"}, _core, m, flat) == {}
    assert bench_train_cpu._profile_ferrotune({**job, "profile_steps": 0}, _core, m, flat) == {}
    bad = [(flat[1][0], flat[1][1], [10, 99])]  # segments longer than the row
    out = bench_train_cpu._profile_ferrotune({**job, "warmup": 0}, _core, m, bad)
    assert list(out) == ["profile_error"] and "InvalidArgumentError" in out["profile_error"], out
    with pytest.raises(ValueError, match="not running"):  # stopped after the failure too
        _core._gpu_profile("stop")


def test_a_decoding_step_launches_the_same_kernels_whatever_the_batch(tmp_path):
    # Generation appends every sequence's new keys and values with one kv_append per layer (a
    # copy per sequence, key and value was half of a batched decoding step's launches): the
    # launches per forward are the same for one conversation as for five.
    d = tp.make_tiny_phi3(tmp_path / "m", hidden=H, layers=LAYERS, heads=HEADS, intermediate=I, seed=5)
    g = Generator.load(str(d), device="emu", precision="bf16")

    def launches(batch: int) -> dict:
        prompts = [[1, 2 + i, 3, 4 + 2 * i][: 2 + i % 3] for i in range(batch)]
        g.generate_ids(prompts, max_new_tokens=2)  # not profiled
        _core._gpu_profile("start")
        g.generate_ids(prompts, max_new_tokens=6)
        prof = json.loads(_core._gpu_profile("stop"))
        # six forwards (the prompts, then five decoding steps) in both runs
        assert calls(prof, "attn_fwd_bf16") == 6 * LAYERS, prof["entries"]
        kernels = {e["name"]: e["calls"] for e in prof["entries"] if group_of(e["name"]) != "copies, memsets"}
        gemms = sum(n for k, n in kernels.items() if k.startswith("gemm "))
        return {"gemm": gemms, **{k: n for k, n in kernels.items() if not k.startswith("gemm ")}}

    one, five = launches(1), launches(5)
    assert one == five
    assert one["gemm"] >= 6 * (4 * LAYERS + 1) and one["kv_append_bf16"] == 6 * LAYERS


def test_the_generation_benchmark_profiles_the_decoding_steps_alone(tmp_path):
    # bench_generate.profile_decoding, as its ferrotune worker runs it on a GPU after the timings:
    # a generation of `new` tokens less one of a single token is `new - 1` decoding steps
    d = tp.make_tiny_phi3(tmp_path / "m", hidden=H, layers=LAYERS, heads=HEADS, intermediate=I, seed=6)
    g = Generator.load(str(d), device="emu", precision="bf16")
    job = {"profile": True, "device": "emu", "new": 5, "batch_sizes": [1, 3],
           "prompts": [[1, 5, 6, 7], [1, 8, 9, 10], [1, 11, 12, 13]]}
    prof = bench_generate.profile_decoding(g, job)["decode_profile"]
    assert prof["steps"] == 4 and prof["batch"] == 3 and 0 < prof["decoded_tokens"] <= 12
    per_step = {e["name"]: e["calls"] / 4 for e in prof["entries"]}
    assert per_step["kv_append_bf16"] == per_step["attn_fwd_bf16"] == LAYERS, per_step
    assert per_step["rms_norm_fwd_bf16"] == 2 * LAYERS + 1  # two per layer and the final norm
    assert not [n for n in per_step if n.startswith("attn_bwd")]  # nothing of training
    lines = profile_tables(prof, prof["steps"])
    assert f"| `kv_append_bf16` | {LAYERS:g} |" in "\n".join(lines)
    assert bench_generate.profile_decoding(g, {**job, "device": "cpu"}) == {}
    assert bench_generate.profile_decoding(g, {**job, "profile": False}) == {}
    bad = bench_generate.profile_decoding(g, {**job, "prompts": [[1, 99999]] * 3})
    assert list(bad) == ["decode_profile_error"] and "InvalidArgumentError" in bad["decode_profile_error"], bad
