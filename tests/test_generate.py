"""``ferrotune.Generator`` (KV-cached generation in Rust) against transformers 5.24 ``generate``.

The references are ``Phi3ForCausalLM.generate`` (eager attention, float32, greedy) on the same
tiny random Phi-3 folders (``tests/support/tiny_phi3.py``), for a plain model, GQA, a sliding
window shorter than the prompt, LongRoPE crossing ``original_max_position_embeddings`` while
generating, a base model + PEFT adapter (``PeftModel.generate``) and the merged model ferrotune
exports. Token ids must be equal, token for token. Chat prompts must equal
``apply_chat_template(add_generation_prompt=True)`` / ``continue_final_message=True``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import ferrotune
from ferrotune import Generator, InvalidArgumentError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.support import tiny_phi3 as tp  # noqa: E402

torch.set_num_threads(1)  # see tests/support/tiny_phi3.py
EOS = tp.GENERATION_CONFIG["eos_token_id"]
NEW = 24


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gen")


@pytest.fixture(scope="module")
def base_dir(root) -> Path:
    return tp.make_tiny_phi3(root / "base", seed=3)


def ref_greedy(model, prompt, max_new_tokens=NEW, eos=EOS) -> list:
    """transformers' greedy continuation of one prompt (batch of one, no padding)."""
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=32000,
        )
    new = out[0, len(prompt):].tolist()
    return [t for t in new[: next((i for i, t in enumerate(new) if t in eos), len(new))]]


def prompts(seed: int, lengths) -> list:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 32000, n)] for n in lengths]


def assert_same_as_reference(gen: Generator, ref, ps, max_new_tokens=NEW):
    got = gen.generate_ids(ps, max_new_tokens=max_new_tokens)
    for i, (p, (ids, reason)) in enumerate(zip(ps, got)):
        want = ref_greedy(ref, p, max_new_tokens)
        assert ids == want, f"prompt {i} ({len(p)} tokens): first difference at {next((j for j, (a, b) in enumerate(zip(ids, want)) if a != b), min(len(ids), len(want)))}"
        assert reason == ("length" if len(ids) == max_new_tokens else "stop")


#: the CPU, and the GPU code path (CUDA kernels, KV caches in device buffers) on the emulated
#: GPU of test builds, in float32
DEVICES = ["cpu"] + (["emu"] if ferrotune._core.gpu_emulator() else [])
#: and a real GPU (`pytest -m gpu`; float32 products with TF32 off, see tests/conftest.py)
DEVICES += [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not ferrotune.cuda_available(), reason="no CUDA GPU")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind",
    ["plain", "gqa", "sliding_window", "longrope"],
)
def test_greedy_equals_transformers(root, base_dir, kind, device):
    if kind == "plain":
        folder, lengths = base_dir, (5, 17, 9)
    elif kind == "gqa":
        folder, lengths = tp.make_tiny_phi3(root / "gqa", kv_heads=2, seed=4), (6, 11)
    elif kind == "sliding_window":
        # window 8: the prompt already exceeds it, and every decoding step must drop old keys
        folder, lengths = tp.make_tiny_phi3(root / "swa", sliding_window=8, seed=5), (12, 3)
    else:
        # original_max_position_embeddings 64: the short factors for the prompt, the long ones
        # once the sequence passes 64 tokens (transformers switches per forward, as we do)
        folder, lengths = tp.make_tiny_phi3(root / "longrope", longrope=True, seed=6), (50, 70)
    gen = Generator.load(folder, device=device, precision="32", progress=False)
    assert gen.device == device
    assert_same_as_reference(gen, tp.load_reference(folder), prompts(1, lengths), max_new_tokens=30)


def test_batched_conversations_equal_each_alone(base_dir):
    gen = Generator.load(base_dir, device="cpu", progress=False)
    ps = prompts(2, (3, 40, 8, 1))
    together = gen.generate_ids(ps, max_new_tokens=NEW)
    alone = [gen.generate_ids([p], max_new_tokens=NEW)[0] for p in ps]
    assert together == alone


@pytest.fixture(scope="module")
def adapter_dir(root, base_dir) -> Path:
    model = tp.peft_model(tp.load_reference(base_dir), r=4, alpha=8, seed=11)
    out = root / "adapter"
    model.save_pretrained(str(out))
    return out


def test_base_plus_adapter_equals_peft(base_dir, adapter_dir):
    ref = peft.PeftModel.from_pretrained(tp.load_reference(base_dir), str(adapter_dir)).eval()
    gen = Generator.load(base_dir, adapter=adapter_dir, device="cpu", progress=False)
    ps = prompts(3, (7, 15))
    assert_same_as_reference(gen, ref, ps)
    # the adapter matters: the base model alone says something else
    plain = Generator.load(base_dir, device="cpu", progress=False)
    assert plain.generate_ids(ps, max_new_tokens=NEW) != gen.generate_ids(ps, max_new_tokens=NEW)


def test_merged_export_equals_transformers(root, base_dir, adapter_dir):
    merged = root / "merged"
    ferrotune.LoraModel.load(str(base_dir), adapter=str(adapter_dir)).save_merged(str(merged))
    gen = Generator.load(merged, device="cpu", progress=False)
    assert_same_as_reference(gen, tp.load_reference(merged), prompts(4, (9, 4)))


# ---------------------------------------------------------------------------------------
# Chat prompts and text
# ---------------------------------------------------------------------------------------

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime number between 10 and 20, please."},
]


@pytest.fixture(scope="module")
def hf_tokenizer(base_dir):
    return transformers.AutoTokenizer.from_pretrained(str(base_dir))


def test_chat_prompt_ids_equal_apply_chat_template(base_dir, hf_tokenizer):
    gen = Generator.load(base_dir, device="cpu", progress=False)
    want = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert gen.prompt_ids(CHAT) == list(want)
    # a conversation that ends with the assistant's turn is continued (transformers' chat
    # pipeline: continue_final_message), not answered with a new turn
    open_turn = CHAT + [{"role": "assistant", "content": "Eleven, and also"}]
    want = hf_tokenizer.apply_chat_template(open_turn, continue_final_message=True, tokenize=True, return_dict=False)
    assert gen.prompt_ids(open_turn) == list(want)
    assert hf_tokenizer.decode(gen.prompt_ids(open_turn)).endswith("Eleven, and also")


def test_chat_text_equals_transformers_decode(base_dir, hf_tokenizer):
    gen = Generator.load(base_dir, device="cpu", progress=False)
    (c,) = gen.generate(CHAT, max_new_tokens=NEW)
    prompt = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    want = ref_greedy(tp.load_reference(base_dir), prompt)
    assert c.token_ids == want
    assert c.text == hf_tokenizer.decode(want, skip_special_tokens=True)
    assert c.prompt_tokens == len(prompt)
    assert gen.chat(CHAT, max_new_tokens=NEW) == c.text


def test_stops_on_eos_from_generation_config(root, base_dir):
    gen = Generator.load(base_dir, device="cpu", progress=False)
    p = prompts(5, (10,))[0]
    (full, _), = gen.generate_ids([p], max_new_tokens=NEW)
    stop = full[6]
    folder = root / "eos"
    shutil.copytree(base_dir, folder)
    cfg = json.loads((folder / "generation_config.json").read_text())
    cfg["eos_token_id"] = [stop]
    (folder / "generation_config.json").write_text(json.dumps(cfg))
    gen2 = Generator.load(folder, device="cpu", progress=False)
    assert gen2.eos_token_ids == [stop]
    (ids, reason), = gen2.generate_ids([p], max_new_tokens=NEW)
    assert (ids, reason) == (full[: full.index(stop)], "stop")
    assert ids == ref_greedy(tp.load_reference(folder), p, eos=[stop])


def test_context_limit_ends_with_length(root):
    folder = tp.make_tiny_phi3(root / "short", max_position_embeddings=32, seed=7)
    gen = Generator.load(folder, device="cpu", progress=False)
    assert gen.max_context == 32
    (ids, reason), = gen.generate_ids(prompts(6, (28,)), max_new_tokens=50)
    assert (len(ids), reason) == (4, "length")
    with pytest.raises(InvalidArgumentError, match="context is 32 tokens"):
        gen.generate_ids(prompts(6, (32,)), max_new_tokens=5)


# ---------------------------------------------------------------------------------------
# Sampling and streaming
# ---------------------------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_seed(base_dir):
    gen = Generator.load(base_dir, device="cpu", progress=False)
    ps = prompts(7, (6, 6))
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=3.0, top_k=0, top_p=0.95, repetition_penalty=1.3)
    a = gen.generate_ids(ps, seed=1, **kw)
    assert a == gen.generate_ids(ps, seed=1, **kw)
    assert a != gen.generate_ids(ps, seed=2, **kw)
    # same prompt twice in one call: separate random streams
    assert a[0][0] != a[1][0]
    greedy = gen.generate_ids(ps[:1], max_new_tokens=NEW)
    assert a[0] != greedy[0]


def test_top_k_one_is_greedy(base_dir):
    gen = Generator.load(base_dir, device="cpu", progress=False)
    ps = prompts(8, (9,))
    assert gen.generate_ids(ps, max_new_tokens=NEW, do_sample=True, top_k=1, seed=5) == gen.generate_ids(ps, max_new_tokens=NEW)


def test_repetition_penalty_matches_transformers(base_dir):
    gen = Generator.load(base_dir, device="cpu", progress=False)
    ref = tp.load_reference(base_dir)
    p = prompts(9, (12,))[0]
    ids = torch.tensor([p])
    plain = gen.generate_ids([p], max_new_tokens=NEW)[0][0]
    changed = False
    # > 1 discourages seen tokens; < 1 favours them (a random model rarely repeats on its own,
    # so this is the setting that visibly changes its output)
    for penalty in (1.8, 0.3):
        with torch.no_grad():
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                               do_sample=False, repetition_penalty=penalty, eos_token_id=EOS, pad_token_id=32000)
        new = out[0, len(p):].tolist()
        want = new[: next((i for i, t in enumerate(new) if t in EOS), len(new))]
        (got, _), = gen.generate_ids([p], max_new_tokens=NEW, repetition_penalty=penalty)
        assert got == want, penalty
        changed |= got != plain
    assert changed


def test_streaming_pieces_add_up_to_the_text(base_dir):
    gen = Generator.load(base_dir, device="cpu", progress=False)
    convs = [CHAT, [{"role": "user", "content": "Ciao! Come stai? ☃"}]]
    pieces: dict = {0: [], 1: []}
    out = gen.generate(convs, max_new_tokens=NEW, stream=lambda i, piece: pieces[i].append(piece))
    for i, c in enumerate(out):
        assert "".join(pieces[i]) == c.text
        assert len(pieces[i]) > 1


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conversations, message",
    [
        ([], None),
        ([[]], "empty"),
        ([{"role": "robot", "content": "hi"}], "role 'robot'|role \"robot\""),
        ([{"role": "user", "content": 3}], "string 'content'"),
        ("hello", "list of messages"),
        ([["hello"]], "string 'content'"),
    ],
)
def test_bad_conversations_raise_clear_errors(base_dir, conversations, message):
    gen = Generator.load(base_dir, device="cpu", progress=False)
    if message is None:
        assert gen.generate(conversations) == []
        return
    with pytest.raises(InvalidArgumentError, match=message):
        gen.generate(conversations, max_new_tokens=2)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_bad_parameters_raise_clear_errors(base_dir, kw, message):
    gen = Generator.load(base_dir, device="cpu", progress=False)
    with pytest.raises(InvalidArgumentError, match=message):
        gen.generate(CHAT, **kw)


def test_greedy_ignores_sampling_knobs(base_dir):
    gen = Generator.load(base_dir, device="cpu", progress=False)
    assert gen.generate(CHAT, max_new_tokens=4, temperature=0.0)[0].token_ids == gen.generate(CHAT, max_new_tokens=4)[0].token_ids


def test_missing_model_and_bad_adapter(tmp_path, base_dir):
    with pytest.raises(ferrotune.ModelError, match="no such model folder"):
        Generator.load(tmp_path / "nope", device="cpu", progress=False)
    with pytest.raises(ferrotune.FerrotuneError, match="adapter_config.json"):
        Generator.load(base_dir, adapter=tmp_path, device="cpu", progress=False)


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------


def test_cli_generates_a_jsonl_file_of_replies(tmp_path, base_dir):
    import subprocess
    import sys

    convs = [CHAT, {"prompt": "x", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in convs), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "ferrotune.cli", "generate", "--model", str(base_dir), "--input", str(src),
           "--output", str(out), "--max-new-tokens", "6", "--device", "cpu", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    gen = Generator.load(base_dir, device="cpu", progress=False)
    want = gen.generate([CHAT, convs[1]["messages"]], max_new_tokens=6)
    assert [r["text"] for r in rows] == [c.text for c in want]
    assert [r["completion_tokens"] for r in rows] == [len(c.token_ids) for c in want]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('[{"role": "user", "content": "ok"}]\n{not json\n', encoding="utf-8")
    r = subprocess.run(cmd[:7] + [str(bad)] + cmd[8:], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "line 2: not valid JSON" in r.stderr and "Traceback" not in r.stderr
