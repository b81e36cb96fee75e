"""The GPU code path without a GPU: ferrotune's GPU backend (its CUDA kernels compiled for the
host, cuBLAS-contract GEMMs, device buffers, device-side AdamW) on the emulated GPU of test
builds (``device="emu"``: an sm_80-class GPU, bf16; ``"emu-sm70"``: a V100, fp16), checked
against transformers + peft and against the CPU, plus the typed errors of a machine without a
GPU. The float32 runs of the GPU path are also in test_model_parity.py, test_generate.py and
test_finetune_train.py; the same checks on a real GPU are in test_gpu.py (``pytest -m gpu``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ferrotune
from ferrotune import GpuUnavailableError, InvalidArgumentError, OutOfMemoryError, _core

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.support import tiny_phi3 as tp  # noqa: E402

torch.set_num_threads(1)
emulated = pytest.mark.skipif(not _core.gpu_emulator(), reason="this build has no emulated GPU (cargo feature gpu-emu)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tp.make_tiny_phi3(tmp_path_factory.mktemp("gpu-path") / "m", kv_heads=2, sliding_window=16, seed=7)


def pair(model_dir, device, precision, r=8, alpha=16.0):
    ref = tp.peft_model(tp.load_reference(model_dir), r, alpha, seed=1)
    ft = ferrotune.LoraModel.load(str(model_dir), lora_r=r, lora_alpha=alpha, device=device, precision=precision)
    ft.set_lora(tp.lora_state(ref))
    return ft, ref


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@emulated
@pytest.mark.parametrize(
    "device, precision, loss_rtol, min_cosine",
    [("emu", "bf16", 2e-2, 0.99), ("emu-sm70", "16", 5e-3, 0.999)],
    ids=["bf16", "fp16"],
)
def test_16_bit_loss_and_gradients_track_peft(model_dir, device, precision, loss_rtol, min_cosine):
    """bf16 / fp16 activations and frozen weights (f32 adapters, f32 accumulation) against peft in
    float32: the loss within a 16-bit rounding, every adapter gradient pointing the same way."""
    ft, ref = pair(model_dir, device, precision)
    lengths = [40, 9, 33]
    ids, labels = tp.random_batch(np.random.default_rng(3), lengths, 32064)
    loss, n, grads = ft.loss_and_grads(ids, labels, lengths)
    ref_loss, ref_n, ref_grads = tp.ref_loss_and_grads(ref, ids, labels, lengths)
    assert n == ref_n
    assert abs(loss - ref_loss) <= loss_rtol * abs(ref_loss), (loss, ref_loss)
    worst = min((cosine(grads[k], v), k) for k, v in ref_grads.items())
    assert worst[0] >= min_cosine, worst


@emulated
def test_bf16_is_refused_on_a_gpu_without_it(model_dir):
    with pytest.raises(InvalidArgumentError, match=r"compute capability 8\.0.*precision='16'"):
        ferrotune.LoraModel.load(str(model_dir), device="emu-sm70", precision="bf16")


@emulated
def test_auto_precision_picks_bf16_or_fp16_by_the_gpu(model_dir, tmp_path):
    # the default precision ("auto") trains on either GPU; the summary names the device
    for device in ("emu", "emu-sm70"):
        ft = ferrotune.LoraModel.load(str(model_dir), device=device)
        lengths = [20]
        ids, labels = tp.random_batch(np.random.default_rng(5), lengths, 32064)
        loss, _, grads = ft.loss_and_grads(ids, labels, lengths)
        assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())


@emulated
def test_out_of_gpu_memory_is_a_typed_error(model_dir, monkeypatch):
    monkeypatch.setenv("FERROTUNE_EMU_MEMORY", str(1 << 20))  # not even the weights fit
    with pytest.raises(OutOfMemoryError, match="out of GPU memory") as e:
        ferrotune.LoraModel.load(str(model_dir), device="emu")
    assert isinstance(e.value, MemoryError) and "\n" not in str(e.value)


@emulated
def test_every_primitive_matches_its_cpu_twin_through_the_python_hook():
    # the hook scripts/gpu_check.sh and test_gpu.py use on a real GPU
    for precision in ("bf16", "32"):
        checks = json.loads(_core._gpu_selfcheck("emu", precision))
        assert len(checks) >= 30
        failed = [c for c in checks if not c["passed"]]
        assert not failed, failed
        assert {c["dtype"] for c in checks} == {"bf16" if precision == "bf16" else "f32"}


def test_cuda_without_a_usable_gpu_is_a_typed_error(model_dir):
    # a CPU build says it has no CUDA support; a CUDA build on a machine without a GPU names
    # what is missing (no driver, no device); both before any work, in one line
    if ferrotune.cuda_available():
        pytest.skip("this machine has a usable GPU")
    with pytest.raises(GpuUnavailableError) as e:
        ferrotune.LoraModel.load(str(model_dir), device="cuda")
    msg = str(e.value)
    assert "\n" not in msg and ("no CUDA support" in msg or "NVIDIA driver" in msg or "no GPU" in msg), msg
    assert isinstance(e.value, RuntimeError)
