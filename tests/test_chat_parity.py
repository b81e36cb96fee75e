"""``ferrotune.ChatTokenizer`` against ``transformers==5.24.0`` (the reference for every
expectation in this file unless a comment says otherwise).

For each tokenizer folder of :mod:`tests.support.tokenizer_dirs` and 2000 generated
conversations (:mod:`tests.support.chatgen`, with the hard characters and special-token
look-alikes), ferrotune must give exactly what ``AutoTokenizer.from_pretrained(folder)`` gives:

- ``render(m)`` / ``render(m, add_generation_prompt=True)`` == ``apply_chat_template(m, tokenize=False, ...)``
- ``encode_chat(m)["input_ids"]`` == ``apply_chat_template(m, tokenize=True)["input_ids"]``
  (transformers 5.24 tokenizes the rendered text with ``add_special_tokens=False``)
- ``encode(text)`` == ``hf.encode(text, add_special_tokens=False)``, ``encode(text, True)`` == ``hf.encode(text)``
- ``decode(ids)`` == ``hf.decode(ids)`` (also with ``skip_special_tokens=True``)
- the special tokens and ids.

What transformers 5.24 does with these folders (checked while writing the tests, see
tests/support/tokenizer_dirs.py): the fixture's LlamaTokenizer with ``legacy: false`` is rebuilt
with a Metaspace pre-tokenizer ``prepend_scheme="first"`` (``"<|user|>\\nHello"`` ->
``[32010, 10994]``); with a config.json of ``model_type: phi3`` tokenizer.json is used as is
(``[32010, 15043]``); and although tokenizer_config says ``add_bos_token: false``,
``hf.encode(text)`` prepends ``<s>`` because tokenizer.json's TemplateProcessing post-processor is
kept.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import ferrotune
from tests.support import chatgen
from tests.support import tokenizer_dirs as tdirs
from tests.support.synth import TRICKY_SNIPPETS

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")
from transformers import AutoTokenizer, GenerationConfig  # noqa: E402

N_CONVERSATIONS = 2000
PARITY_FOLDERS = ("phi3", "phi3_with_model_config", "phi3_legacy", "chatml", "strict_template")
# Different conversations per folder (each folder still sees every kind of text).
SEEDS = {name: 100 + i for i, name in enumerate(PARITY_FOLDERS)}

# Hand-picked texts for encode/decode on top of the conversation contents.
EXTRA_TEXTS = (
    "",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "Hello world",
    " Hello world",
    "Hello  world ",
    "grabbed",
    "<|user|>\nHello",
    "<|user|>Hello",
    "<|user|> Hello",
    "<|assistant|>\n<|end|>\n<|endoftext|>",
    "<s>",
    "<s>[INST] hi [/INST]",
    "</s> after",
    "a</s>b",
    "<unk>",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|placeholder3|>x",
    "<|notatoken|>",
    "▁already▁metaspace",
    "1234567890",
    "x" * 3000,
    "😀" * 50,
    "\u200d",
    "\x00",
    *TRICKY_SNIPPETS,
    *chatgen.SPECIAL_LOOKALIKES,
)


def _first_mismatches(pairs, limit: int = 3) -> list:
    """The first `limit` (index, got, expected) with got != expected."""
    out = []
    for i, (got, exp) in enumerate(pairs):
        if got != exp:
            out.append((i, got, exp))
            if len(out) >= limit:
                break
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tokenizer-folders")
    out = {name: fn(base) for name, fn in tdirs.ALL_LOADABLE.items()}
    out["broken_template"] = tdirs.broken_template(base)
    out["mlflow_model"] = tdirs.mlflow_model(base)
    return out


@dataclass
class Case:
    name: str
    folder: Path
    hf: object
    tok: object
    convs: list
    # References from transformers, computed once per folder.
    rendered: list = field(default_factory=list)
    rendered_gen: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    _memo: dict = field(default_factory=dict)

    def memo(self, key, fn):
        """A reference value computed once per folder."""
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


@pytest.fixture(scope="module", params=PARITY_FOLDERS)
def case(request, folders) -> Case:
    name = request.param
    d = folders[name]
    hf = AutoTokenizer.from_pretrained(str(d))
    convs = chatgen.conversations(N_CONVERSATIONS, SEEDS[name], tricky=True, system=True)
    c = Case(name=name, folder=d, hf=hf, tok=ferrotune.ChatTokenizer.from_pretrained(str(d)), convs=convs)
    for m in convs:
        c.rendered.append(hf.apply_chat_template(m, tokenize=False))
        c.rendered_gen.append(hf.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
        c.ids.append(list(hf.apply_chat_template(m, tokenize=True)["input_ids"]))
    return c


# ---------------------------------------------------------------------------------------
# Chat rendering and chat token ids
# ---------------------------------------------------------------------------------------


def test_render_matches_transformers(case):
    got = [case.tok.render(m) for m in case.convs]
    bad = _first_mismatches(zip(got, case.rendered))
    assert not bad, [(i, case.convs[i], g, e) for i, g, e in bad]


def test_render_with_generation_prompt_matches_transformers(case):
    got = [case.tok.render(m, add_generation_prompt=True) for m in case.convs]
    bad = _first_mismatches(zip(got, case.rendered_gen))
    assert not bad, [(i, case.convs[i], g, e) for i, g, e in bad]
    # and keyword / positional spellings agree
    assert case.tok.render(case.convs[0], True) == case.rendered_gen[0]


def test_encode_chat_ids_match_transformers(case):
    got = []
    for m in case.convs:
        enc = case.tok.encode_chat(m)
        assert isinstance(enc["input_ids"], np.ndarray) and enc["input_ids"].dtype == np.int32
        assert isinstance(enc["labels"], np.ndarray) and enc["labels"].dtype == np.int32
        assert enc["labels"].shape == enc["input_ids"].shape
        got.append(enc["input_ids"].tolist())
    bad = _first_mismatches(zip(got, case.ids))
    assert not bad, [
        (i, case.convs[i], case.hf.convert_ids_to_tokens(g), case.hf.convert_ids_to_tokens(e)) for i, g, e in bad
    ]


def test_chat_ids_are_the_rendered_text_tokenized(case):
    # transformers 5.24: apply_chat_template(tokenize=True) == encode(render, add_special_tokens=False)
    # (so no BOS is added on top of what the template writes). Checked on the reference here so a
    # transformers upgrade that changes it shows up as a failure of this test, not of ferrotune's.
    for m, r, ids in zip(case.convs[:200], case.rendered, case.ids):
        assert case.hf.encode(r, add_special_tokens=False) == ids
        assert case.tok.encode(r).tolist() == ids


# ---------------------------------------------------------------------------------------
# Plain text encode / decode
# ---------------------------------------------------------------------------------------


def _texts(case) -> list[str]:
    return case.memo("texts", lambda: _collect_texts(case))


def _hf_encode(case, add_special_tokens: bool) -> list[list[int]]:
    return case.memo(("encode", add_special_tokens), lambda: [case.hf.encode(t, add_special_tokens=add_special_tokens) for t in _texts(case)])


def _collect_texts(case) -> list[str]:
    seen: dict[str, None] = {}
    for t in EXTRA_TEXTS:
        seen.setdefault(t, None)
    for m in case.convs[:600]:
        for msg in m:
            seen.setdefault(msg["content"], None)
    for r in case.rendered[:100]:
        seen.setdefault(r, None)
    return list(seen)


def test_encode_matches_transformers(case):
    texts = _texts(case)
    got = []
    for t in texts:
        ids = case.tok.encode(t)
        assert isinstance(ids, np.ndarray) and ids.dtype == np.int32
        got.append(ids.tolist())
    exp = _hf_encode(case, False)
    bad = _first_mismatches(zip(got, exp))
    assert not bad, [(texts[i], g, e) for i, g, e in bad]
    # keyword spelling is the same thing
    assert case.tok.encode(texts[6], add_special_tokens=False).tolist() == exp[6]


def test_encode_with_special_tokens_matches_transformers(case):
    # transformers 5.24 keeps tokenizer.json's post-processor: hf.encode(text) == [1] + ids here,
    # even with "add_bos_token": false in tokenizer_config.json.
    texts = _texts(case)
    got = [case.tok.encode(t, add_special_tokens=True).tolist() for t in texts]
    exp = _hf_encode(case, True)  # hf.encode(t) (add_special_tokens defaults to True)
    bad = _first_mismatches(zip(got, exp))
    assert not bad, [(texts[i], g, e) for i, g, e in bad]
    assert exp[0] == [case.hf.convert_tokens_to_ids("<s>")]  # "" -> [<s>] (observed in 5.24)


def test_encode_batch_equals_encode(case):
    texts = _texts(case)[:500]
    for add in (False, True):
        batch = case.tok.encode_batch(texts, add_special_tokens=add)
        assert len(batch) == len(texts)
        for t, ids, exp in zip(texts, batch, _hf_encode(case, add)):
            assert isinstance(ids, np.ndarray) and ids.dtype == np.int32
            assert ids.tolist() == exp, t
    assert case.tok.encode_batch([]) == []


def test_decode_matches_transformers(case):
    for skip in (False, True):
        got = [case.tok.decode(ids, skip_special_tokens=skip) for ids in case.ids[:500]]
        exp = [case.hf.decode(ids, skip_special_tokens=skip) for ids in case.ids[:500]]
        bad = _first_mismatches(zip(got, exp))
        assert not bad, (skip, bad)
    assert case.tok.decode(case.ids[0]) == case.hf.decode(case.ids[0])


def test_decode_round_trip_matches_transformers(case):
    # decode(encode(text)) with the numpy array encode returns; the expected value is transformers'
    # own round trip (not `text`: Metaspace / rstrip tokens lose some spaces).
    texts = _texts(case)
    for skip in (False, True):
        got = [case.tok.decode(case.tok.encode(t), skip_special_tokens=skip) for t in texts]
        exp = [case.hf.decode(ids, skip_special_tokens=skip) for ids in _hf_encode(case, False)]
        bad = _first_mismatches(zip(got, exp))
        assert not bad, [(texts[i], g, e) for i, g, e in bad]


# ---------------------------------------------------------------------------------------
# Special tokens and metadata
# ---------------------------------------------------------------------------------------


def test_special_tokens_match_transformers(case):
    tok, hf = case.tok, case.hf
    assert tok.bos_token == hf.bos_token
    assert tok.eos_token == hf.eos_token
    assert tok.pad_token == hf.pad_token
    assert tok.unk_token == hf.unk_token
    # no generation_config.json in these folders: [id of eos_token]
    assert tok.eos_token_ids == [hf.eos_token_id]
    assert tok.pad_token_id == hf.pad_token_id
    assert tok.model_max_length == hf.model_max_length == 4096
    assert tok.vocab_size == len(hf)  # len() counts the added tokens (hf.vocab_size does not)
    assert tok.chat_template == hf.chat_template
    for t in ("<s>", "</s>", "<unk>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "▁Hello", "Hello", "<0x0A>"):
        assert tok.token_to_id(t) == hf.convert_tokens_to_ids(t), t
    assert tok.token_to_id("<|no such token|>") is None  # (transformers answers the unk id 0 here)


def test_special_token_values_per_folder(folders):
    # The concrete values transformers 5.24 reports for each folder (pins the folders themselves).
    expected = {
        "phi3": ("<s>", "<|endoftext|>", [32000], 32000, 32011),
        "phi3_with_model_config": ("<s>", "<|endoftext|>", [32000], 32000, 32011),
        "phi3_legacy": ("<s>", "<|endoftext|>", [32000], 32000, 32011),
        "chatml": ("<s>", "<|im_end|>", [32012], 32000, 32013),
        "strict_template": ("<s>", "</s>", [2], 32000, 32011),
    }
    for name, (bos, eos, eos_ids, pad_id, n) in expected.items():
        hf = AutoTokenizer.from_pretrained(str(folders[name]))
        assert (hf.bos_token, hf.eos_token, [hf.eos_token_id], hf.pad_token_id, len(hf)) == (bos, eos, eos_ids, pad_id, n)
        tok = ferrotune.ChatTokenizer.from_pretrained(str(folders[name]))
        assert (tok.bos_token, tok.eos_token, tok.eos_token_ids, tok.pad_token_id, tok.vocab_size) == (bos, eos, eos_ids, pad_id, n)


@pytest.mark.parametrize(
    "eos_in_generation_config,expected",
    [([32000, 32001, 32007], [32000, 32001, 32007]), (32007, [32007])],
    ids=["list", "scalar"],
)
def test_eos_token_ids_from_generation_config(tmp_path, eos_in_generation_config, expected):
    # microsoft/Phi-3-mini-4k-instruct's generation_config.json has eos_token_id [32000, 32001, 32007].
    d = tdirs.phi3(tmp_path)
    (d / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": eos_in_generation_config, "pad_token_id": 32000}),
        encoding="utf-8",
    )
    ref = GenerationConfig.from_pretrained(str(d)).eos_token_id  # the reference
    ref = ref if isinstance(ref, list) else [ref]
    assert ref == expected
    tok = ferrotune.ChatTokenizer.from_pretrained(str(d))
    assert tok.eos_token_ids == expected
    assert tok.eos_token == "<|endoftext|>"  # eos_token itself still comes from tokenizer_config


def test_phi3_chat_tokens(folders):
    # The README's example: "<|user|>\nHello" -> [32010, 10994] under transformers 5.24 with the
    # plain fixture (Metaspace prepend_scheme="first"; "<|user|>" has rstrip so "\n" is absorbed and
    # "Hello" is not at the start of the text -> no "▁"), [32010, 15043] with tokenizer.json as is.
    for name, expected in (("phi3", [32010, 10994]), ("phi3_with_model_config", [32010, 15043]), ("phi3_legacy", [32010, 15043])):
        hf = AutoTokenizer.from_pretrained(str(folders[name]))
        tok = ferrotune.ChatTokenizer.from_pretrained(str(folders[name]))
        assert hf.encode("<|user|>\nHello", add_special_tokens=False) == expected, name
        assert tok.encode("<|user|>\nHello").tolist() == expected, name
        assert tok.encode("<|user|>\nHello", add_special_tokens=True).tolist() == [1, *expected], name
        for t, i in (("<|endoftext|>", 32000), ("<|assistant|>", 32001), ("<|system|>", 32006), ("<|end|>", 32007), ("<|user|>", 32010)):
            assert hf.convert_tokens_to_ids(t) == i
            assert tok.token_to_id(t) == i
            assert tok.encode(t).tolist() == [i]
    # README: "Hello world" -> [1, 15043, 3186] (llama-tokenizer-js reference encoding)
    tok = ferrotune.ChatTokenizer.from_pretrained(str(folders["phi3"]))
    assert tok.encode("Hello world", add_special_tokens=True).tolist() == [1, 15043, 3186]


def test_chatml_default_system_prompt(folders):
    d = folders["chatml"]
    hf = AutoTokenizer.from_pretrained(str(d))
    tok = ferrotune.ChatTokenizer.from_pretrained(str(d))
    m = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ref = hf.apply_chat_template(m, tokenize=False)
    assert ref.startswith("<|im_start|>system\n" + tdirs.CHATML_DEFAULT_SYSTEM + "<|im_end|>\n<|im_start|>user\nHi")
    assert tok.render(m) == ref
    assert tok.encode_chat(m)["input_ids"].tolist()[:1] == [32011]
    m2 = [{"role": "system", "content": "Custom."}, *m]
    assert tok.render(m2) == hf.apply_chat_template(m2, tokenize=False)
    assert tdirs.CHATML_DEFAULT_SYSTEM not in tok.render(m2)


# ---------------------------------------------------------------------------------------
# Template errors
# ---------------------------------------------------------------------------------------


def _perturbed(convs: list[list[dict]]) -> list[list[dict]]:
    """Role sequences that break strict alternation (and some that do not)."""
    out = []
    for i, m in enumerate(convs):
        k = i % 6
        if k == 0 and len(m) >= 2:  # starts with the assistant (or system, assistant)
            out.append([x for x in m if x["role"] != "user"][:3] + m[-2:])
        elif k == 1 and len(m) >= 3:  # two user turns in a row
            out.append(m[:2] + [{"role": "user", "content": m[0]["content"]}, *m[2:]])
        elif k == 2 and len(m) >= 3:  # two assistant turns in a row
            out.append(m + [{"role": "assistant", "content": "again"}])
        elif k == 3:  # a system message in the middle
            out.append(m + [{"role": "system", "content": "late system"}, {"role": "user", "content": "u"}])
        elif k == 4:  # ends with a user message: valid for the template
            out.append(m + [{"role": "user", "content": "one more"}])
        else:  # only the first message (user or system)
            out.append(m[:1])
    return out


def _raises_in_transformers(hf, m) -> str | None:
    try:
        hf.apply_chat_template(m, tokenize=False)
    except jinja2.exceptions.TemplateError as e:  # raise_exception() raises jinja2's TemplateError
        return str(e)
    return None


def test_strict_template_raises_like_transformers(folders):
    d = folders["strict_template"]
    hf = AutoTokenizer.from_pretrained(str(d))
    tok = ferrotune.ChatTokenizer.from_pretrained(str(d))
    errors = (ferrotune.ConversationError, ferrotune.ChatTemplateError)
    convs = _perturbed(chatgen.conversations(300, 7, system=True))
    n_raised = 0
    for m in convs:
        msg = _raises_in_transformers(hf, m)
        if msg is None:
            assert tok.render(m) == hf.apply_chat_template(m, tokenize=False), m
            continue
        n_raised += 1
        assert msg == tdirs.STRICT_ALTERNATION_ERROR
        with pytest.raises(errors) as ei:
            tok.render(m)
        assert tdirs.STRICT_ALTERNATION_ERROR in str(ei.value)
        assert isinstance(ei.value, ValueError)
        with pytest.raises(errors) as ei:
            tok.render(m, add_generation_prompt=True)
        assert tdirs.STRICT_ALTERNATION_ERROR in str(ei.value)
        with pytest.raises(errors) as ei:
            tok.encode_chat(m)
        assert tdirs.STRICT_ALTERNATION_ERROR in str(ei.value)
    assert 150 < n_raised < len(convs)  # both branches are exercised


def test_strict_template_simple_cases(folders):
    d = folders["strict_template"]
    hf = AutoTokenizer.from_pretrained(str(d))
    tok = ferrotune.ChatTokenizer.from_pretrained(str(d))
    bad = [
        [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
        [
            {"role": "system", "content": "s"},
            {"role": "system", "content": "t"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ],
    ]
    errors = (ferrotune.ConversationError, ferrotune.ChatTemplateError)
    for m in bad:
        assert _raises_in_transformers(hf, m) == tdirs.STRICT_ALTERNATION_ERROR
        with pytest.raises(errors, match=r"Conversation roles must alternate"):
            tok.render(m)
        with pytest.raises(errors, match=r"Conversation roles must alternate"):
            tok.encode_chat(m)
    # A conversation with no assistant turn may be refused by encode_chat for that reason first
    # (no_assistant); render still reports the template's own error.
    m = [{"role": "system", "content": "s"}, {"role": "system", "content": "t"}, {"role": "user", "content": "u"}]
    assert _raises_in_transformers(hf, m) == tdirs.STRICT_ALTERNATION_ERROR
    with pytest.raises(errors, match=r"Conversation roles must alternate"):
        tok.render(m)
    with pytest.raises(errors):
        tok.encode_chat(m)
    good = [{"role": "system", "content": " S "}, {"role": "user", "content": " u "}, {"role": "assistant", "content": "# a"}]
    # reference value, written out so the template's trim_blocks/lstrip_blocks handling is pinned too
    assert hf.apply_chat_template(good, tokenize=False) == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\n u [/INST] (heading)  # a </s>"
    assert tok.render(good) == hf.apply_chat_template(good, tokenize=False)


def test_broken_template_fails_at_load(folders):
    d = folders["broken_template"]
    # Reference: transformers loads the folder and fails only when the template is used.
    hf = AutoTokenizer.from_pretrained(str(d))
    with pytest.raises(jinja2.exceptions.TemplateSyntaxError):
        hf.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    # ferrotune compiles the template in from_pretrained.
    with pytest.raises(ferrotune.ChatTemplateError) as ei:
        ferrotune.ChatTokenizer.from_pretrained(str(d))
    assert isinstance(ei.value, ValueError)
    assert isinstance(ei.value, ferrotune.FerrotuneError)


# ---------------------------------------------------------------------------------------
# MLflow model folders
# ---------------------------------------------------------------------------------------


def test_mlflow_model_folder_equals_plain_folder(folders):
    plain = ferrotune.ChatTokenizer.from_pretrained(str(folders["phi3"]))
    ml = ferrotune.ChatTokenizer.from_pretrained(str(folders["mlflow_model"]))
    hf = AutoTokenizer.from_pretrained(str(folders["mlflow_model"] / "data" / "tokenizer"))
    assert ml.chat_template == plain.chat_template == hf.chat_template
    assert (ml.bos_token, ml.eos_token, ml.pad_token, ml.eos_token_ids, ml.pad_token_id, ml.vocab_size) == (
        plain.bos_token,
        plain.eos_token,
        plain.pad_token,
        plain.eos_token_ids,
        plain.pad_token_id,
        plain.vocab_size,
    )
    for m in chatgen.conversations(200, 11, system=True):
        ids = ml.encode_chat(m)["input_ids"].tolist()
        assert ids == plain.encode_chat(m)["input_ids"].tolist()
        assert ids == hf.apply_chat_template(m, tokenize=True)["input_ids"]
        assert ml.render(m) == plain.render(m)


def test_mlflow_model_folder_with_data_model(tmp_path, folders):
    # The other Azure ML layout: tokenizer files next to the weights in data/model/.
    root = tmp_path / "mlflow_model_folder"
    shutil.copytree(folders["mlflow_model"], root)
    (root / "data" / "tokenizer").rename(root / "data" / "model")
    ml = ferrotune.ChatTokenizer.from_pretrained(str(root))
    hf = AutoTokenizer.from_pretrained(str(root / "data" / "model"))
    for m in chatgen.conversations(50, 12):
        assert ml.encode_chat(m)["input_ids"].tolist() == hf.apply_chat_template(m, tokenize=True)["input_ids"]
