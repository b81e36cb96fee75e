"""Tiny random Phi-3 model folders and the torch / transformers / PEFT reference computations
for ferrotune's model tests (``tests/test_model_parity.py``).

Everything here runs on the CPU in float32 with ``transformers==5.24.0``'s ``Phi3ForCausalLM``
(eager attention) and ``peft``; nothing is mocked. The batches use ferrotune's flat packed
format: a 1-D ``input_ids`` (n,), ``labels`` (n,) with -100 for untrained tokens, and
``seq_lengths`` (one entry per conversation, summing to n). Position t of a segment predicts
``labels[t + 1]`` of the same segment; positions restart at 0 in every segment and attention
never crosses segments. The reference therefore runs every segment on its own (batch of one,
``position_ids`` from 0), which is what packing must be equivalent to.

Weights: the usual std-0.02 init makes attention almost uniform and the logits almost flat, which
would hide RoPE, mask and norm mistakes, so :func:`make_tiny_phi3` draws every linear weight
with std ``1/sqrt(fan_in)``, the embeddings with std 1, and every RMSNorm weight uniformly in
[0.5, 1.5] (so a norm weight that is dropped or misapplied shows up).

Call ``torch.set_num_threads(1)`` in processes that use these helpers on a small machine: the
models are tiny, and with more OpenMP threads than free CPUs each small matmul stalls for
milliseconds (a reference forward went from 0.035 s to 0.9 s with 2 threads on 2 busy CPUs).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "TOKENIZER_FIXTURE",
    "TOKENIZER_FILES",
    "DEFAULT_TARGETS",
    "GENERATION_CONFIG",
    "make_tiny_phi3",
    "load_reference",
    "peft_model",
    "lora_state",
    "lora_grads",
    "ref_logits",
    "ref_loss_and_grads",
    "random_batch",
    "segment_slices",
    "max_rel",
]

TOKENIZER_FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "phi3-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
#: What microsoft/Phi-3-mini-4k-instruct's generation_config.json says about special tokens.
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000}


# ---------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights (see the module docstring), drawn in a fixed order from `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "norm" in name:
                new = torch.rand(p.shape, generator=g, dtype=torch.float32) + 0.5
            elif "embed_tokens" in name:
                new = torch.randn(p.shape, generator=g, dtype=torch.float32)
            else:  # nn.Linear weight (out, in)
                new = torch.randn(p.shape, generator=g, dtype=torch.float32) / math.sqrt(p.shape[-1])
            p.copy_(new.to(p.dtype))


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def make_tiny_phi3(
    out_dir,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int = 128,
    vocab: int = 32064,
    seed: int = 0,
    longrope: bool = False,
    max_position_embeddings: int = 4096,
    sliding_window: int | None = None,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Writes a complete random Phi-3 model folder (config.json, safetensors weights, the Phi-3
    tokenizer fixture, generation_config.json) to `out_dir` and returns its path.

    ``longrope=True``: ``rope_scaling`` type longrope with random short/long factors in [1, 4]
    (head_dim/2 each), ``original_max_position_embeddings=64`` and
    ``max_position_embeddings=256`` (so a segment longer than 64 tokens uses the long factors;
    the attention scaling sqrt(1 + ln(4)/ln(64)) applies to both). ``shards > 1`` saves several
    safetensors files and ``model.safetensors.index.json``.
    """
    from transformers import Phi3Config, Phi3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    kw = {}
    if longrope:
        rng = np.random.default_rng(seed + 1000)
        kw["rope_scaling"] = {
            "type": "longrope",
            "short_factor": [float(x) for x in rng.uniform(1.0, 4.0, head_dim // 2)],
            "long_factor": [float(x) for x in rng.uniform(1.0, 4.0, head_dim // 2)],
        }
        max_position_embeddings = 256
        original_max = 64
    else:
        original_max = max_position_embeddings
    cfg = Phi3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads if kv_heads is not None else heads,
        max_position_embeddings=max_position_embeddings,
        original_max_position_embeddings=original_max,
        sliding_window=sliding_window,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
        tie_word_embeddings=False,
        attn_implementation="eager",
        **kw,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(cfg)
    _randomize(model, seed)
    model = model.to(dtype).eval()

    save_kw = {}
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        save_kw["max_shard_size"] = int(math.ceil(total / shards))
    model.save_pretrained(out, safe_serialization=True, **save_kw)
    if shards > 1:
        files = sorted(out.glob("model-*.safetensors"))
        if not (out / "model.safetensors.index.json").is_file() or len(files) < 2:
            raise RuntimeError(f"expected a sharded checkpoint in {out}, got {sorted(p.name for p in out.iterdir())}")
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_FIXTURE / name, out / name)
    _write_json(out / "generation_config.json", {**GENERATION_CONFIG, "transformers_version": "5.24.0"})
    return out


def load_reference(model_dir, dtype: torch.dtype = torch.float32):
    """The transformers model of a folder: eager attention, eval mode, `dtype`."""
    from transformers import Phi3ForCausalLM

    model = Phi3ForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="eager")
    return model.eval()


# ---------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------


def peft_model(
    base,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Iterable[str] = DEFAULT_TARGETS,
    use_rslora: bool = False,
    seed: int = 0,
    randomize_b: bool = True,
):
    """Wraps `base` (modified in place, as PEFT does) in a LoRA adapter. PEFT initializes lora_A
    (Kaiming-uniform) and zeroes lora_B; with `randomize_b` every lora_B gets small random values
    scaled so that the update is roughly a third of the base weight, so that outputs differ from
    the base model and d/dA is not zero."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    if randomize_b:
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        std = 0.5 / (scaling * math.sqrt(r))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                if ".lora_B." in name:
                    p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    return model.eval()


def _peft_key(param_name: str) -> str:
    """A live parameter name -> the name PEFT saves (the adapter name dropped)."""
    return param_name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def lora_state(model) -> dict[str, np.ndarray]:
    """The adapter's tensors under PEFT's saved names (``base_model.model.model.layers.0.
    self_attn.qkv_proj.lora_A.weight``), float32 numpy arrays."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to(torch.float32).cpu().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def lora_grads(model) -> dict[str, np.ndarray]:
    """The .grad of every LoRA tensor, keyed like :func:`lora_state` (zeros where None)."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            out[_peft_key(name)] = g.detach().to(torch.float32).cpu().numpy().copy()
    return out


# ---------------------------------------------------------------------------------------
# Reference computations on the flat packed format
# ---------------------------------------------------------------------------------------


def segment_slices(seq_lengths: Sequence[int], n: int | None = None) -> list[slice]:
    """slice of every segment; checks that the lengths sum to n when n is given."""
    out, pos = [], 0
    for length in seq_lengths:
        out.append(slice(pos, pos + int(length)))
        pos += int(length)
    if n is not None and pos != n:
        raise ValueError(f"seq_lengths sum to {pos}, not {n}")
    return out


def _segments(input_ids, seq_lengths):
    ids = np.asarray(input_ids).astype(np.int64)
    if seq_lengths is None:
        seq_lengths = [len(ids)]
    return ids, segment_slices(seq_lengths, len(ids))


def _forward(model, seg_ids: np.ndarray) -> torch.Tensor:
    """(len, vocab) float32 logits of one segment run alone (batch of one, positions from 0)."""
    ids = torch.from_numpy(seg_ids).unsqueeze(0)
    pos = torch.arange(ids.shape[1], dtype=torch.long).unsqueeze(0)
    out = model(input_ids=ids, position_ids=pos, use_cache=False)
    return out.logits[0].to(torch.float32)


def ref_logits(model, input_ids, seq_lengths=None) -> np.ndarray:
    """(n, vocab) float32 logits, every segment run separately."""
    ids, slices = _segments(input_ids, seq_lengths)
    parts = []
    with torch.no_grad():
        for s in slices:
            parts.append(_forward(model, ids[s]).cpu().numpy())
    return np.concatenate(parts, axis=0).astype(np.float32)


def ref_loss_and_grads(model, input_ids, labels, seq_lengths=None) -> tuple[float, int, dict[str, np.ndarray]]:
    """(mean loss, number of targets, grads) like ``LoraModel.loss_and_grads``: the summed
    float32 cross-entropy of every segment (position t predicts labels[t+1] of its segment,
    -100 ignored) divided by the total number of targets, back-propagated into the LoRA tensors;
    grads keyed like :func:`lora_state`."""
    ids, slices = _segments(input_ids, seq_lengths)
    lab = np.asarray(labels).astype(np.int64)
    if lab.shape != ids.shape:
        raise ValueError("labels and input_ids differ in length")
    model.zero_grad(set_to_none=True)
    total = None
    n_targets = 0
    for s in slices:
        seg_lab = lab[s][1:]
        k = int((seg_lab != -100).sum())
        if k == 0:
            continue
        logits = _forward(model, ids[s])[:-1]
        ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(seg_lab), ignore_index=-100, reduction="sum")
        total = ce if total is None else total + ce
        n_targets += k
    if total is None:
        raise ValueError("the batch has no target tokens")
    loss = total / n_targets
    loss.backward()
    grads = lora_grads(model)
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), n_targets, grads


def random_batch(rng: np.random.Generator, seq_lengths: Sequence[int], vocab: int, label_fraction: float = 0.7):
    """(input_ids, labels) int32 arrays for `seq_lengths`: random token ids in [0, vocab); each
    token is trained (label = its id) with probability `label_fraction`, otherwise -100; the first
    token of every segment is never a label, and every segment of 2+ tokens has at least one
    target."""
    n = int(sum(seq_lengths))
    ids = rng.integers(0, vocab, size=n, dtype=np.int64).astype(np.int32)
    keep = rng.random(n) < label_fraction
    labels = np.where(keep, ids, -100).astype(np.int32)
    for s in segment_slices(seq_lengths, n):
        labels[s.start] = -100
        if s.stop - s.start >= 2 and not (labels[s.start + 1 : s.stop] != -100).any():
            j = int(rng.integers(s.start + 1, s.stop))
            labels[j] = ids[j]
    return ids, labels


def max_rel(a, b) -> float:
    """max|a - b| / max|b| (the tests' relative error)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    denom = float(np.abs(b).max()) if b.size else 0.0
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom
