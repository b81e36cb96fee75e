"""``ferrotune.LoraModel`` (Phi-3 + LoRA in Rust) against transformers 5.24 + PEFT, on tiny random
Phi-3 folders built by ``tests/support/tiny_phi3.py``.

References: ``transformers.Phi3ForCausalLM`` (eager attention, float32) wrapped by ``peft``
(``get_peft_model`` / ``PeftModel.from_pretrained``); the packed format is checked against each
segment run on its own (batch of one, positions from 0). Relative error is
max|ferrotune - reference| / max|reference|: logits and loss <= 1e-5, every LoRA gradient
<= 1e-4 (per tensor), a merged model reloaded by transformers <= 1e-4.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import ferrotune

if not hasattr(ferrotune._core, "LoraModel"):
    pytest.skip("ferrotune._core has no LoraModel yet", allow_module_level=True)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.support import tiny_phi3 as tp  # noqa: E402

# One intra-op thread: the reference models are tiny, and with 2 OpenMP threads on a 2-CPU box
# (next to ferrotune's own threads) every small matmul waits ~10 ms for a descheduled thread:
# measured 0.94 s vs 0.035 s for one reference forward.
torch.set_num_threads(1)

LoraModel = getattr(ferrotune, "LoraModel", None) or ferrotune._core.LoraModel
VOCAB = 32064
LOGITS_TOL = 1e-5
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
MERGED_TOL = 1e-4
SUBSET = ("qkv_proj", "down_proj")

# ---------------------------------------------------------------------------------------
# Model folders (one of each per module)
# ---------------------------------------------------------------------------------------


def _legacy_config(folder: Path) -> None:
    """Rewrites config.json the way the Hub's Phi-3 repos ship it (rope_theta at the top level,
    ``rope_scaling`` with ``type``, instead of transformers 5's ``rope_parameters``)."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope.pop("partial_rotary_factor", None)
    rope.pop("original_max_position_embeddings", None)
    rope.pop("rope_type", None)
    cfg["rope_scaling"] = {"type": "longrope", **rope} if rope.get("long_factor") else None
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-phi3")


@pytest.fixture(scope="module")
def base_dir(model_root) -> Path:
    return tp.make_tiny_phi3(model_root / "base", seed=0)


@pytest.fixture(scope="module")
def gqa_dir(model_root) -> Path:
    return tp.make_tiny_phi3(model_root / "gqa", kv_heads=2, seed=1)


@pytest.fixture(scope="module")
def sharded_dir(model_root) -> Path:
    d = tp.make_tiny_phi3(model_root / "sharded", shards=2, seed=2)
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("model-*.safetensors"))) >= 2
    return d


@pytest.fixture(scope="module")
def longrope_dir(model_root) -> Path:
    return tp.make_tiny_phi3(model_root / "longrope", longrope=True, seed=3)


@pytest.fixture(scope="module")
def longrope_legacy_dir(model_root) -> Path:
    d = tp.make_tiny_phi3(model_root / "longrope-legacy", longrope=True, seed=4)
    _legacy_config(d)
    return d


@pytest.fixture(scope="module")
def sliding_dir(model_root) -> Path:
    return tp.make_tiny_phi3(model_root / "sliding", kv_heads=2, sliding_window=16, seed=5)


@pytest.fixture
def dirs(request):
    """Model folder by name, built on first use."""
    return lambda name: request.getfixturevalue(f"{name}_dir")


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def load_ft(model_dir, **kw):
    return LoraModel.load(str(model_dir), **kw)


def make_pair(model_dir, *, r=8, alpha=16.0, targets=tp.DEFAULT_TARGETS, rslora=False, seed=0, device="cpu"):
    """(ferrotune model, PEFT reference) holding the same random LoRA weights."""
    ref = tp.peft_model(tp.load_reference(model_dir), r, alpha, target_modules=targets, use_rslora=rslora, seed=seed)
    ft = load_ft(model_dir, lora_r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                 device=device, precision="32")
    ft.set_lora(tp.lora_state(ref))
    return ft, ref


def batch(seq_lengths, seed=0, vocab=VOCAB):
    return tp.random_batch(np.random.default_rng(seed), seq_lengths, vocab)


def assert_rel(actual, expected, tol, what=""):
    err = tp.max_rel(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def assert_grads(actual: dict, expected: dict, tol=GRAD_TOL):
    assert sorted(actual) == sorted(expected)
    bad = {}
    for k, v in expected.items():
        a = np.asarray(actual[k])
        assert a.dtype == np.float32 and a.shape == v.shape, (k, a.dtype, a.shape, v.shape)
        assert np.abs(v).max() > 0, f"reference gradient of {k} is zero: the test is too weak"
        err = tp.max_rel(a, v)
        if err > tol:
            bad[k] = err
    assert not bad, f"gradients off by more than {tol:g} (relative): {bad}"


def check_logits(ft, ref, seq_lengths, seed=0, tol=LOGITS_TOL, pass_lengths=True):
    """ferrotune's logits of a random batch vs the reference; pass_lengths=False calls
    ``logits(ids)`` (one segment)."""
    ids, _ = batch(seq_lengths, seed)
    got = ft.logits(ids, list(seq_lengths)) if pass_lengths else ft.logits(ids)
    want = tp.ref_logits(ref, ids, list(seq_lengths))
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (len(ids), VOCAB)
    assert_rel(got, want, tol, f"logits {seq_lengths}")
    return got


def read_json(p: Path):
    return json.loads(Path(p).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------
# Loading, names, initial state
# ---------------------------------------------------------------------------------------


def test_names_shapes_and_initial_state(base_dir):
    ft = load_ft(base_dir, lora_r=8, lora_alpha=16.0, seed=7)
    ref = tp.peft_model(tp.load_reference(base_dir), 8, 16.0, randomize_b=False)
    expected = tp.lora_state(ref)

    assert sorted(ft.lora_names()) == sorted(expected)
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in ft.lora_names()
    init = ft.get_lora()
    assert sorted(init) == sorted(expected)
    for k, v in expected.items():
        assert init[k].dtype == np.float32 and init[k].shape == v.shape, k
        if ".lora_B." in k:
            assert not init[k].any(), f"{k} must start at zero (PEFT init)"
        else:
            assert np.abs(init[k]).max() > 0, f"{k} must start random"
    assert ft.config["hidden_size"] == 64 and ft.config["num_hidden_layers"] == 2

    # lora_B = 0: the model is the base model
    ids, _ = batch([37])
    assert_rel(ft.logits(ids), tp.ref_logits(tp.load_reference(base_dir), ids), LOGITS_TOL, "base logits")

    # the seed decides lora_A
    again = load_ft(base_dir, lora_r=8, lora_alpha=16.0, seed=7).get_lora()
    other = load_ft(base_dir, lora_r=8, lora_alpha=16.0, seed=8).get_lora()
    assert all(np.array_equal(again[k], init[k]) for k in init)
    assert any(not np.array_equal(other[k], init[k]) for k in init if ".lora_A." in k)


def test_set_get_roundtrip(base_dir):
    ft = load_ft(base_dir, lora_r=4, lora_alpha=8.0)
    ref = tp.peft_model(tp.load_reference(base_dir), 4, 8.0)
    state = tp.lora_state(ref)
    ft.set_lora(state)
    got = ft.get_lora()
    assert sorted(got) == sorted(state)
    for k in state:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], state[k])
    # any float dtype is accepted
    ft2 = load_ft(base_dir, lora_r=4, lora_alpha=8.0)
    ft2.set_lora({k: v.astype(np.float64) for k, v in state.items()})
    got2 = ft2.get_lora()
    for k in state:
        np.testing.assert_array_equal(got2[k], state[k])


def test_default_hyperparameters(base_dir):
    """lora_r=8, lora_alpha=128, the four default target modules."""
    ft = load_ft(base_dir)
    ref = tp.peft_model(tp.load_reference(base_dir), 8, 128.0)
    assert sorted(ft.lora_names()) == sorted(tp.lora_state(ref))
    ft.set_lora(tp.lora_state(ref))
    check_logits(ft, ref, [41])


# ---------------------------------------------------------------------------------------
# Logits
# ---------------------------------------------------------------------------------------


def test_logits_single_segment(base_dir):
    ft, ref = make_pair(base_dir)
    got = check_logits(ft, ref, [48], seed=1, pass_lengths=False)
    ids, _ = batch([48], seed=1)
    assert_rel(ft.logits(ids, [48]), got, 1e-6, "seq_lengths=None vs [n]")


def test_logits_packed_segments(base_dir):
    ft, ref = make_pair(base_dir)
    lengths = [23, 40, 17]
    packed = check_logits(ft, ref, lengths, seed=2)
    # and each segment through ferrotune alone
    ids, _ = batch(lengths, seed=2)
    for s in tp.segment_slices(lengths):
        assert_rel(packed[s], ft.logits(ids[s]), LOGITS_TOL, f"segment {s}")


@pytest.mark.parametrize(
    "name, lengths",
    [
        ("gqa", [45]),
        ("gqa", [19, 33, 8]),
        ("sharded", [30, 12]),
        ("sliding", [40]),  # window 16 < 40
        ("sliding", [40, 9, 33]),
        ("longrope", [64]),  # = original_max_position_embeddings: still the short factors
        ("longrope", [65]),  # long factors from here
        ("longrope", [90]),
        ("longrope", [50, 30]),  # packed, every segment short
        ("longrope_legacy", [40]),
        ("longrope_legacy", [90]),
    ],
)
def test_logits_architectures(dirs, name, lengths):
    ft, ref = make_pair(dirs(name))
    check_logits(ft, ref, lengths, seed=sum(lengths))


@pytest.mark.parametrize("rslora", [False, True])
def test_logits_rslora_and_target_subset(base_dir, rslora):
    ft, ref = make_pair(base_dir, r=4, alpha=32.0, targets=SUBSET, rslora=rslora)
    assert sorted(ft.lora_names()) == sorted(tp.lora_state(ref))
    assert all(re.search(r"\.(qkv_proj|down_proj)\.lora_[AB]\.weight$", k) for k in ft.lora_names())
    check_logits(ft, ref, [21, 34], seed=3)


# ---------------------------------------------------------------------------------------
# Loss and gradients
# ---------------------------------------------------------------------------------------

GRAD_CASES = [
    pytest.param("base", {}, [30, 1, 45], id="default-packed"),
    pytest.param("base", {}, [52], id="default-single"),
    pytest.param("base", {"r": 4, "alpha": 8.0, "rslora": True}, [25, 38], id="rslora"),
    pytest.param("base", {"targets": SUBSET}, [25, 38], id="subset"),
    pytest.param("base", {"targets": ("o_proj", "gate_up_proj")}, [44, 20], id="subset2"),
    pytest.param("sliding", {}, [40, 9, 33], id="gqa-sliding"),
    pytest.param("longrope", {}, [90], id="longrope-long"),
    pytest.param("longrope", {}, [50, 30], id="longrope-short-packed"),
]


#: the CPU backend, and the GPU backend (CUDA kernels, cuBLAS-contract GEMMs) on the emulated
#: GPU of test builds, in float32: the same tolerances against peft
DEVICES = ["cpu"] + (["emu"] if ferrotune._core.gpu_emulator() else [])
#: and a real GPU (`pytest -m gpu`; float32 with TF32 off, so the same tolerances hold)
DEVICES += [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not ferrotune.cuda_available(), reason="no CUDA GPU")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, lora, lengths", GRAD_CASES)
def test_loss_and_grads(dirs, name, lora, lengths, device):
    # The layer's hand-written backward (model/layer.rs) on each backend.
    ft, ref = make_pair(dirs(name), device=device, **lora)
    ids, labels = batch(lengths, seed=11)
    loss, n, grads = ft.loss_and_grads(ids, labels, list(lengths))
    ref_loss, ref_n, ref_grads = tp.ref_loss_and_grads(ref, ids, labels, list(lengths))
    assert isinstance(loss, float) and isinstance(n, int)
    assert n == ref_n
    assert_rel(loss, ref_loss, LOSS_TOL, "loss")
    assert_grads(grads, ref_grads)


@pytest.mark.parametrize("device", DEVICES)
def test_recompute_gives_same_gradients(base_dir, device):
    ft, _ = make_pair(base_dir, device=device)
    lengths = [30, 1, 45]
    ids, labels = batch(lengths, seed=12)
    loss0, n0, g0 = ft.loss_and_grads(ids, labels, lengths, recompute=False)
    loss1, n1, g1 = ft.loss_and_grads(ids, labels, lengths, recompute=True)
    assert n0 == n1
    assert loss1 == pytest.approx(loss0, rel=1e-6, abs=0)
    assert sorted(g0) == sorted(g1)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-6, atol=1e-6 * float(np.abs(g0[k]).max()), err_msg=k)


def test_packed_equals_separate_segments(base_dir):
    """Summed CE and summed gradients of a packed batch equal those of its segments run one by one."""
    ft, _ = make_pair(base_dir, r=4, alpha=8.0)
    lengths = [26, 2, 41, 15]
    ids, labels = batch(lengths, seed=13)
    loss, n, grads = ft.loss_and_grads(ids, labels, lengths)
    sum_ce, sum_n = 0.0, 0
    sum_grads = {k: np.zeros_like(v, dtype=np.float64) for k, v in grads.items()}
    for s in tp.segment_slices(lengths):
        l_i, n_i, g_i = ft.loss_and_grads(ids[s], labels[s], [s.stop - s.start])
        sum_ce += l_i * n_i
        sum_n += n_i
        for k, v in g_i.items():
            sum_grads[k] += v.astype(np.float64) * n_i
    assert n == sum_n
    assert_rel(loss * n, sum_ce, LOSS_TOL, "summed CE")
    assert_grads({k: (v.astype(np.float64) * n).astype(np.float32) for k, v in grads.items()},
                 {k: v.astype(np.float32) for k, v in sum_grads.items()})
    # seq_lengths=None is one segment
    s = tp.segment_slices(lengths)[2]
    a = ft.loss_and_grads(ids[s], labels[s])
    b = ft.loss_and_grads(ids[s], labels[s], [s.stop - s.start])
    assert a[1] == b[1] and a[0] == pytest.approx(b[0], rel=1e-6, abs=0)


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lora",
    [
        pytest.param({}, id="default"),
        pytest.param({"r": 4, "alpha": 32.0, "targets": SUBSET, "rslora": True}, id="rslora-subset"),
    ],
)
def test_save_adapter_loads_in_peft(base_dir, tmp_path, lora):
    from safetensors.numpy import load_file

    ft, ref = make_pair(base_dir, **lora)
    out = tmp_path / "adapter"
    ft.save_adapter(str(out))

    cfg = read_json(out / "adapter_config.json")
    assert cfg["peft_type"] == "LORA"
    assert cfg["r"] == lora.get("r", 8)
    assert float(cfg["lora_alpha"]) == lora.get("alpha", 16.0)
    assert sorted(cfg["target_modules"]) == sorted(lora.get("targets", tp.DEFAULT_TARGETS))
    assert bool(cfg.get("use_rslora", False)) == lora.get("rslora", False)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(ft.lora_names())
    state = ft.get_lora()
    for k, v in saved.items():
        np.testing.assert_array_equal(v.astype(np.float32), state[k])

    loaded = peft.PeftModel.from_pretrained(tp.load_reference(base_dir), str(out)).eval()
    check_logits(ft, loaded, [28, 19], seed=4)


def test_load_with_adapter(base_dir, tmp_path):
    """LoraModel.load(adapter=...) starts from a PEFT adapter folder."""
    ref = tp.peft_model(tp.load_reference(base_dir), 4, 8.0, seed=3)
    ref.save_pretrained(str(tmp_path / "peft"))
    ft = load_ft(base_dir, lora_r=4, lora_alpha=8.0, adapter=str(tmp_path / "peft"))
    state = tp.lora_state(ref)
    got = ft.get_lora()
    assert sorted(got) == sorted(state)
    for k in state:
        np.testing.assert_array_equal(got[k], state[k])
    check_logits(ft, ref, [33], seed=5)


@pytest.mark.parametrize(
    "name, lengths",
    [("base", [28, 19]), ("longrope_legacy", [90]), ("sharded", [24])],
)
def test_save_merged_loads_in_transformers(dirs, tmp_path, name, lengths):
    src = dirs(name)
    ft, _ = make_pair(src)
    out = tmp_path / "merged"
    ft.save_merged(str(out))

    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f"{f} missing from the merged folder"
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    gen = read_json(out / "generation_config.json")
    assert gen["eos_token_id"] == tp.GENERATION_CONFIG["eos_token_id"]
    weights = list(out.glob("*.safetensors"))
    assert weights
    from safetensors import safe_open

    for w in weights:
        with safe_open(str(w), "np") as f:
            assert not [k for k in f.keys() if "lora" in k], f"LoRA tensors left in {w.name}"

    merged = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert type(merged).__name__ == "Phi3ForCausalLM"
    ids, _ = batch(lengths, seed=6)
    assert_rel(tp.ref_logits(merged, ids, lengths), ft.logits(ids, lengths), MERGED_TOL, "merged logits")
    # the tokenizer loads from the merged folder
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("<|end|>") == 32007


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def _copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_missing_model_folder(tmp_path):
    with pytest.raises(ferrotune.ModelError, match="no-such-model"):
        load_ft(tmp_path / "no-such-model")


def test_config_without_weights(base_dir, tmp_path):
    d = tmp_path / "config-only"
    d.mkdir()
    shutil.copyfile(base_dir / "config.json", d / "config.json")
    with pytest.raises(ferrotune.ModelError, match=r"(?i)safetensors"):
        load_ft(d)


@pytest.mark.parametrize("keep", [4, 100, 0.5], ids=["in-header-length", "in-header", "in-data"])
def test_truncated_safetensors(base_dir, tmp_path, keep):
    d = _copy_model(base_dir, tmp_path / "truncated")
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ferrotune.ModelError, match=r"(?i)safetensors"):
        load_ft(d)


def test_missing_shard(sharded_dir, tmp_path):
    d = _copy_model(sharded_dir, tmp_path / "missing-shard")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ferrotune.ModelError, match=re.escape(shard.name)):
        load_ft(d)


def test_config_weights_mismatch(base_dir, tmp_path):
    d = _copy_model(base_dir, tmp_path / "mismatch")
    cfg = read_json(d / "config.json")
    cfg["hidden_size"] = 96  # the weights are 64 wide
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(ferrotune.ModelError, match=r"(?i)shape|mismatch"):
        load_ft(d)


def test_unknown_target_module(base_dir):
    with pytest.raises(ferrotune.InvalidArgumentError, match="not_a_module"):
        load_ft(base_dir, target_modules=["qkv_proj", "not_a_module"])


def test_lora_r_zero(base_dir):
    with pytest.raises(ferrotune.InvalidArgumentError, match="lora_r"):
        load_ft(base_dir, lora_r=0)


def test_set_lora_missing_key(base_dir):
    ft = load_ft(base_dir, lora_r=4, lora_alpha=8.0)
    state = ft.get_lora()
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    del state[key]
    with pytest.raises(ferrotune.InvalidArgumentError, match=re.escape(key)):
        ft.set_lora(state)


def test_set_lora_wrong_shape(base_dir):
    ft = load_ft(base_dir, lora_r=4, lora_alpha=8.0)
    before = ft.get_lora()
    state = {k: v.copy() for k, v in before.items()}
    key = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"
    state[key] = np.zeros((5, 64), np.float32)  # r is 4
    with pytest.raises(ferrotune.InvalidArgumentError, match=re.escape(key)) as err:
        ft.set_lora(state)
    assert re.search(r"(?i)shape", str(err.value)), str(err.value)
    after = ft.get_lora()  # nothing was changed
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_seq_lengths_must_sum_to_length(base_dir):
    ft = load_ft(base_dir, lora_r=4, lora_alpha=8.0)
    ids, labels = batch([30])
    with pytest.raises(ferrotune.InvalidArgumentError, match="seq_lengths"):
        ft.logits(ids, [10, 10])
    with pytest.raises(ferrotune.InvalidArgumentError, match="seq_lengths"):
        ft.loss_and_grads(ids, labels, [10, 25])
    with pytest.raises(ferrotune.InvalidArgumentError, match="labels"):
        ft.loss_and_grads(ids, labels[:-1], [30])


def test_token_id_out_of_vocab(base_dir):
    ft = load_ft(base_dir, lora_r=4, lora_alpha=8.0)
    ids, labels = batch([30])
    ids = ids.copy()
    ids[5] = VOCAB
    with pytest.raises(ferrotune.InvalidArgumentError, match=str(VOCAB)):
        ft.logits(ids)
    with pytest.raises(ferrotune.InvalidArgumentError, match=str(VOCAB)):
        ft.loss_and_grads(ids, labels)
