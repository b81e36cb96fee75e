"""The peer's side of the training benchmark's GPU profile: bench/gpu_train.py runs the same
batches through transformers + peft under torch.profiler after the timed steps
(bench_train_cpu._profile_peer), so that the first GPU run says per group where ferrotune loses
or wins against the peer. Here: torch.profiler's real output (on the CPU) in the shape of
ferrotune's own profile, the kernel names of both sides in their groups, the side-by-side table,
and the GPU check's report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.gpu_report import run_report

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_train_cpu  # noqa: E402
from profile_table import group_of, profile_tables, side_by_side, subtract_profiles  # noqa: E402


def test_a_torch_profile_has_the_shape_of_ferrotunes_own():
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(48, 64, requires_grad=True)
    w = torch.randn(64, 32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            (x @ w).log_softmax(-1).sum().backward()
    s = bench_train_cpu.torch_profile_summary(prof, "cpu", 0.5)
    names = [e["name"] for e in s["entries"]]
    assert "aten::mm" in names, names
    mm = next(e for e in s["entries"] if e["name"] == "aten::mm")
    assert mm["calls"] >= 3 and mm["seconds"] > 0 and mm["flops"] == 0  # forward, and x's gradient, per pass
    secs = [e["seconds"] for e in s["entries"]]
    assert secs == sorted(secs, reverse=True) and all(t > 0 for t in secs)
    assert s["calls"] == sum(e["calls"] for e in s["entries"])
    assert s["busy_seconds"] == pytest.approx(sum(secs))
    assert s["device_span_seconds"] > 0 and s["host_seconds"] == 0.5
    lines = profile_tables({**s, "steps": 3}, 3)
    assert f"| `{s['entries'][0]['name']}` |" in "\n".join(lines)


def test_the_peers_profiled_passes_run_transformers_and_peft(tmp_path):
    # the same model calls as the GPU run, on the CPU (where torch.profiler sees operators)
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3ForCausalLM

    from tests.support import tiny_phi3 as tp

    d = tp.make_tiny_phi3(tmp_path / "m", hidden=32, layers=1, heads=2, intermediate=64, vocab=32064, seed=1)
    model = get_peft_model(Phi3ForCausalLM.from_pretrained(str(d), attn_implementation="sdpa"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"], task_type="CAUSAL_LM"))
    model.train()
    ids = torch.randint(3, 32000, (1, 24))
    pos = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0)
    batches = [{"input_ids": ids, "position_ids": pos, "labels": ids.clone()}] * 2
    s = bench_train_cpu.profile_peer_passes(model, batches, contextlib.nullcontext(), "cpu")
    assert s["steps"] == 2 and s["tokens"] == 48
    calls = {e["name"]: e["calls"] for e in s["entries"]}
    # each pass: sdpa's attention forward and backward once (one layer), the loss and its gradient
    for op in ("aten::_scaled_dot_product_flash_attention_for_cpu",
               "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::nll_loss_backward"):
        assert calls.get(op) == 2, (op, sorted(calls))
    assert group_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert all(p.grad is None for p in model.parameters())  # zero_grad after each pass


def test_the_peer_is_profiled_on_a_gpu_only():
    job = {"profile_steps": 2, "device": "cpu"}
    assert bench_train_cpu._profile_peer(job, None, [], None) == {}
    assert bench_train_cpu._profile_peer({**job, "device": "cuda", "profile_steps": 0}, None, [], None) == {}


@pytest.mark.parametrize("name,group", [
    # ferrotune's own rows
    ("attn_bwd_dkdv_bf16", "attention"), ("attn_bwd_dot_simt_bf16", "attention"),
    ("gemm TN 9216x8192x3072 bf16", "GEMMs (cuBLAS)"), ("ce_rows_bf16", "cross-entropy"),
    ("copy to the GPU", "copies, memsets"), ("memset", "copies, memsets"),
    ("rms_norm_fwd_bf16", "other kernels"), ("scatter_rows_bf16", "other kernels"), ("sum_f32_finish", "other kernels"),
    ("cast_f32_to_bf16", "other kernels"), ("kv_append_bf16", "other kernels"),
    # what PyTorch runs on a GPU
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128, 64, 4, false, false, cutlass::bfloat16_t>>",
     "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k96_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0", "attention"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNN", "GEMMs (cuBLAS)"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "GEMMs (cuBLAS)"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>", "GEMMs (cuBLAS)"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>", "GEMMs (cuBLAS)"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>",
     "cross-entropy"),
    ("void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>", "cross-entropy"),
    ("Memcpy HtoD (Pageable -> Device)", "copies, memsets"), ("Memset (Device)", "copies, memsets"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, float>>", "other kernels"),
])
def test_kernel_names_of_both_sides_fall_in_their_groups(name, group):
    assert group_of(name) == group


def profile(steps: int, rows: list[tuple[str, int, float]]) -> dict:
    entries = [{"name": n, "calls": c, "seconds": s, "flops": 0} for n, c, s in rows]
    busy = sum(s for _, _, s in rows)
    return {"device": "H100", "steps": steps, "calls": sum(c for _, c, _ in rows), "busy_seconds": busy,
            "device_span_seconds": busy * 1.1, "host_seconds": busy * 1.2, "entries": entries}


OURS = profile(2, [("gemm TN 9216x8192x3072 bf16", 64, 0.100), ("attn_fwd_bf16", 64, 0.040), ("rope_bf16", 64, 0.004)])
PEER = profile(2, [("nvjet_tst_192x192", 300, 0.150), ("void pytorch_flash::flash_fwd_kernel<x>", 64, 0.020),
                   ("cunn_SoftMaxForward", 2, 0.010), ("Memset (Device)", 10, 0.002)])


def test_the_side_by_side_table_compares_ms_per_step_per_group():
    lines = side_by_side(OURS, PEER)
    assert lines[:2] == ["| group | ferrotune ms/step | peer ms/step | ferrotune / peer |", "|---|---:|---:|---:|"]
    assert "| attention | 20.00 | 10.00 | 2.00 |" in lines
    assert "| GEMMs (cuBLAS) | 50.00 | 75.00 | 0.67 |" in lines
    assert "| cross-entropy | 0.00 | 5.00 |  |" in lines  # a group one side does not have: no ratio
    assert "| other kernels | 2.00 | 0.00 |  |" in lines
    assert lines[-1] == "| **busy** | 72.00 | 91.00 | 0.79 |"


def test_the_gpu_check_report_shows_both_profiles_side_by_side(tmp_path):
    train = {"runs": [{"tool": "peer", "phase": "fwd_bwd", "result": {"tokens_per_second": 100.0, "profile": PEER}},
                      {"tool": "ferrotune", "phase": "fwd_bwd", "result": {"tokens_per_second": 123.0, "profile": OURS}}],
             "comparison": []}
    md, report, _ = run_report(tmp_path, "train\t0\t200\n", train=train)
    assert "## GPU time per group, ferrotune against the peer (fwd_bwd, the same batches)\n\n" + "\n".join(
        side_by_side(OURS, PEER)) in md
    assert "\n".join(profile_tables(OURS, 2)) in md and "\n".join(profile_tables(PEER, 2)) in md
    assert md.index("Where ferrotune's GPU time goes") < md.index("Where the peer's GPU time goes")
    assert report["train"]["profile"] == OURS and report["train"]["peer_profile"] == PEER


def test_a_profile_less_another_keeps_what_only_the_first_ran():
    whole = profile(1, [("attn_fwd_bf16", 40, 0.050), ("kv_append_bf16", 40, 0.004), ("gemm TN 3x4x5 bf16", 9, 0.020)])
    first = profile(1, [("attn_fwd_bf16", 4, 0.030), ("gemm TN 3x4x5 bf16", 9, 0.020), ("rope_bf16", 4, 0.001)])
    d = subtract_profiles(whole, first)
    assert [(e["name"], e["calls"]) for e in d["entries"]] == [("attn_fwd_bf16", 36), ("kv_append_bf16", 40)]
    assert d["entries"][0]["seconds"] == pytest.approx(0.020)
    assert d["busy_seconds"] == pytest.approx(0.024) and d["calls"] == 76
    assert d["device_span_seconds"] == pytest.approx(1.1 * (0.074 - 0.051))
    assert d["host_seconds"] == pytest.approx(1.2 * (0.074 - 0.051))


def test_the_gpu_check_report_shows_the_decoding_profile(tmp_path):
    dec = {**profile(63, [("attn_fwd_bf16", 63 * 32, 0.3), ("kv_append_bf16", 63 * 32, 0.01)]), "batch": 8}
    gen = {"rows": [{"batch": 8, "tool": "ferrotune", "prefill_tokens_per_second": 30555.0,
                     "decode_tokens_per_second": 900.0}], "decode_profile": dec}
    md, report, _ = run_report(tmp_path, "generate\t0\t100\n", generate=gen)
    assert "## Where ferrotune's decoding time goes (its profiler, B=8, per decoding step)\n\n" + "\n".join(
        profile_tables(dec, 63)) in md
    assert report["decode_profile"]["batch"] == 8
    md2, report2, _ = run_report(tmp_path / "failed", "generate\t0\t100\n",
                                 generate={"rows": [], "decode_profile_error": "ComputeError: boom"})
    assert "ferrotune's decoding profile failed: ComputeError: boom" in md2
    assert report2["decode_profile"] == "ComputeError: boom"
