"""On a real GPU (``pytest -m gpu``; skipped without one): every CUDA primitive against its CPU
twin at Phi-3's sizes (segments of 1, 2047 and 4096 tokens, GQA, the sliding window,
head_dim 96, vocab 32064) in each precision the GPU has, and the model's forward and backward
against the CPU in float32. The GPU cases of test_model_parity.py (gradients vs peft),
test_finetune_train.py (20 training steps vs transformers + peft) and test_generate.py (greedy
generation vs transformers) run under the same marker. ``scripts/gpu_check.sh`` runs all of it.

Tolerances: see ``src/kernels/cuda/selfcheck.rs`` (relative to the largest CPU magnitude:
f32 2e-5, bf16 2e-2, fp16 4e-3; 2-4x that for attention and the cross-entropy).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ferrotune
from ferrotune import _core

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ferrotune.cuda_available(), reason="no usable CUDA GPU")]

torch = pytest.importorskip("torch")

from tests.support import tiny_phi3 as tp  # noqa: E402


def capability() -> tuple:
    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (0, 0)


PRECISIONS = ["bf16", "fp16", "32"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_primitive_matches_its_cpu_twin(precision):
    if precision == "bf16" and capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0")
    checks = json.loads(_core._gpu_selfcheck("cuda", precision, full=True))
    for c in checks:
        print(f"{'ok  ' if c['passed'] else 'FAIL'} {c['name']:<40} {c['dtype']:<5} {c['error']:.3g} <= {c['tolerance']:.3g}  {c['shapes']}"
              + (f"  [{c['failure']}]" if c["failure"] else ""))
    failed = [c for c in checks if not c["passed"]]
    assert len(checks) >= 30 and not failed, failed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # head_dim 64 (a multiple of 16: the tensor-core attention), GQA, a sliding window
    return tp.make_tiny_phi3(tmp_path_factory.mktemp("gpu") / "m", kv_heads=2, sliding_window=48, seed=11)


@pytest.mark.parametrize("precision, loss_rtol, min_cosine", [("32", 1e-5, 0.99999), ("16", 2e-2, 0.99)])
def test_model_forward_and_backward_match_the_cpu(model_dir, precision, loss_rtol, min_cosine):
    lengths = [1, 100, 47, 2]
    ids, labels = tp.random_batch(np.random.default_rng(2), lengths, 32064)
    cpu = ferrotune.LoraModel.load(str(model_dir), device="cpu", lora_r=8, lora_alpha=16.0, seed=3)
    gpu = ferrotune.LoraModel.load(str(model_dir), device="cuda", precision=precision, lora_r=8, lora_alpha=16.0, seed=3)
    state = {k: v + 0.01 * np.random.default_rng(4).standard_normal(v.shape).astype(np.float32)
             for k, v in cpu.get_lora().items()}  # B non-zero: every tensor gets a gradient
    cpu.set_lora(state)
    gpu.set_lora(state)
    l_cpu, n_cpu, g_cpu = cpu.loss_and_grads(ids, labels, lengths)
    l_gpu, n_gpu, g_gpu = gpu.loss_and_grads(ids, labels, lengths)
    assert n_cpu == n_gpu
    assert abs(l_gpu - l_cpu) <= loss_rtol * abs(l_cpu), (l_gpu, l_cpu)
    for k in g_cpu:
        a, b = g_gpu[k].ravel().astype(np.float64), g_cpu[k].ravel().astype(np.float64)
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cos >= min_cosine, (k, cos)
    logits_cpu = cpu.logits(ids, lengths)
    logits_gpu = gpu.logits(ids, lengths)
    rel = np.abs(logits_gpu - logits_cpu).max() / np.abs(logits_cpu).max()
    assert rel <= (1e-4 if precision == "32" else 5e-2), rel
