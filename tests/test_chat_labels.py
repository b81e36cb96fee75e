"""Training labels of ``ChatTokenizer.encode_chat`` against TRL 0.19.1's
``DataCollatorForCompletionOnlyLM`` (the reference), run on the transformers 5.24 input ids.

The reference set-up (what people used for Phi-3 SFT before TRL 0.20)::

    DataCollatorForCompletionOnlyLM(response_template="<|assistant|>",
                                    instruction_template="<|user|>", tokenizer=hf)

It works with transformers 5.24 (warning DeprecationWarning "This class is deprecated ..." and,
for Phi-3 where pad_token == eos_token, UserWarning "The pad_token_id and eos_token_id values ...";
both filtered below). It clones input_ids into labels, then masks everything before each
``<|assistant|>`` (inclusive) back to the preceding ``<|user|>``. For Phi-3 that trains each
assistant content plus its ``<|end|>`` (the ``"\\n"`` after ``<|end|>`` is absorbed by the token,
which has ``rstrip: true``), exactly what ferrotune's offset rule gives, with one difference:
TRL's parent class (transformers' ``DataCollatorForLanguageModeling``) sets
``labels[input_ids == pad_token_id] = -100``, and Phi-3's pad token is its EOS
``<|endoftext|>``, so TRL never trains the final EOS, while ferrotune does (the contract: "for the
last message the end (EOS) are trained"). Verified on the reference side when writing these tests::

    <|user|>\\nHi<|end|>\\n<|assistant|>\\nHello there<|end|>\\n<|user|>\\nMore<|end|>\\n<|assistant|>\\nSure.<|end|>\\n<|endoftext|>
    ids  [32010, 18567, 32007, 32001, 10994, 727, 32007, 32010, 20761, 32007, 32001, 29903, 545, 29889, 32007, 32000]
    TRL  [ -100,  -100,  -100,  -100, 10994, 727, 32007,  -100,  -100,  -100,  -100, 29903, 545, 29889, 32007,  -100]

With the tokenizer's pad token changed to ``<unk>`` TRL trains the EOS too and matches
ferrotune exactly; both comparisons are made. Conversations are ``special_free`` (no text that
tokenizes to an added token), because TRL finds turns by searching token ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ferrotune
from tests.support import chatgen
from tests.support import tokenizer_dirs as tdirs

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
from transformers import AutoTokenizer  # noqa: E402
from trl import DataCollatorForCompletionOnlyLM  # noqa: E402

pytestmark = [
    # TRL 0.19.1 deprecates the collator (removed in 0.20) and warns that Phi-3's pad == eos.
    pytest.mark.filterwarnings("ignore:This class is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The pad_token_id and eos_token_id values:UserWarning"),
]

N_CONVERSATIONS = 1000
LABEL_FOLDERS = ("phi3_with_model_config", "phi3")
PHI3_EOS = 32000  # <|endoftext|>, also Phi-3's pad token
USER, ASSISTANT, END = 32010, 32001, 32007


def _collator(hf):
    return DataCollatorForCompletionOnlyLM(response_template="<|assistant|>", instruction_template="<|user|>", tokenizer=hf)


def _trl_labels(collator, ids: list[int]) -> list[int]:
    # One example per batch: no padding, so the labels line up with the ids.
    return collator([{"input_ids": list(ids)}])["labels"][0].tolist()


class Ref:
    def __init__(self, name: str, folder: Path):
        self.name = name
        self.folder = folder
        self.hf = AutoTokenizer.from_pretrained(str(folder))
        self.hf_unk_pad = AutoTokenizer.from_pretrained(str(folder))
        self.hf_unk_pad.pad_token = "<unk>"  # so that TRL does not mask the EOS
        assert self.hf.pad_token_id == self.hf.eos_token_id == PHI3_EOS
        assert self.hf_unk_pad.pad_token_id == 0
        self.tok = ferrotune.ChatTokenizer.from_pretrained(str(folder))
        self.convs = chatgen.conversations(N_CONVERSATIONS, 21, tricky=True, system=True, special_free=True)
        self.ids = [list(self.hf.apply_chat_template(m, tokenize=True)["input_ids"]) for m in self.convs]
        col, col_unk = _collator(self.hf), _collator(self.hf_unk_pad)
        self.trl = [_trl_labels(col, ids) for ids in self.ids]
        self.trl_unk_pad = [_trl_labels(col_unk, ids) for ids in self.ids]


@pytest.fixture(scope="module")
def label_folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("label-folders")
    return {"phi3": tdirs.phi3(base), "phi3_with_model_config": tdirs.phi3_with_model_config(base)}


@pytest.fixture(scope="module", params=LABEL_FOLDERS)
def ref(request, label_folders) -> Ref:
    return Ref(request.param, label_folders[request.param])


def _show(hf, ids, *label_lists) -> list:
    return list(zip(hf.convert_ids_to_tokens(ids), ids, *label_lists))


# ---------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------


def test_trl_reference_on_a_simple_case(label_folders):
    hf = AutoTokenizer.from_pretrained(str(label_folders["phi3"]))
    m = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "More"},
        {"role": "assistant", "content": "Sure."},
    ]
    ids = hf.apply_chat_template(m, tokenize=True)["input_ids"]
    assert ids == [32010, 18567, 32007, 32001, 10994, 727, 32007, 32010, 20761, 32007, 32001, 29903, 545, 29889, 32007, 32000]
    trained = [10994, 727, 32007]  # "Hello there<|end|>"
    trained2 = [29903, 545, 29889, 32007]  # "Sure.<|end|>"
    # TRL: user turns and the <|assistant|> marker masked; the final <|endoftext|> masked too (pad == eos).
    assert _trl_labels(_collator(hf), ids) == [-100] * 4 + trained + [-100] * 4 + trained2 + [-100]
    # ferrotune: the same, plus the EOS.
    tok = ferrotune.ChatTokenizer.from_pretrained(str(label_folders["phi3"]))
    enc = tok.encode_chat(m)
    assert enc["input_ids"].tolist() == ids
    assert enc["labels"].tolist() == [-100] * 4 + trained + [-100] * 4 + trained2 + [PHI3_EOS]
    # with a pad token that is not the EOS, TRL trains the EOS as well
    hf.pad_token = "<unk>"
    assert _trl_labels(_collator(hf), ids) == enc["labels"].tolist()


# ---------------------------------------------------------------------------------------
# Generated conversations
# ---------------------------------------------------------------------------------------


def test_input_ids_match_transformers(ref):
    for m, ids in zip(ref.convs, ref.ids):
        assert ref.tok.encode_chat(m)["input_ids"].tolist() == ids, m


def test_labels_match_trl_except_the_eos(ref):
    bad = []
    for m, ids, trl_labels in zip(ref.convs, ref.ids, ref.trl):
        labels = ref.tok.encode_chat(m)["labels"].tolist()
        # ferrotune trains the final EOS (the conversation ends with an assistant turn)...
        assert ids[-1] == PHI3_EOS and labels[-1] == PHI3_EOS, m
        # ...which TRL masks, like every token equal to pad_token_id (no other one in special_free text).
        assert ids.count(PHI3_EOS) == 1
        masked = [-100 if i == PHI3_EOS else lab for i, lab in zip(ids, labels)]
        if masked != trl_labels:
            bad.append((m, _show(ref.hf, ids, labels, trl_labels)))
    assert not bad, bad[:2]


def test_labels_match_trl_with_distinct_pad_token(ref):
    bad = []
    for m, ids, trl_labels in zip(ref.convs, ref.ids, ref.trl_unk_pad):
        labels = ref.tok.encode_chat(m)["labels"].tolist()
        if labels != trl_labels:
            bad.append((m, _show(ref.hf, ids, labels, trl_labels)))
    assert not bad, bad[:2]


def test_label_structure(ref):
    # Follows from the contract: a label is -100 or the token id; nothing of a system/user turn is
    # trained; every assistant turn ends with a trained <|end|>.
    for m in ref.convs[:300]:
        enc = ref.tok.encode_chat(m)
        ids, labels = enc["input_ids"], enc["labels"]
        trained = labels != -100
        assert np.array_equal(labels[trained], ids[trained])
        assert not trained[0]
        assert not trained[(ids == USER) | (ids == ASSISTANT) | (ids == 32006)].any()
        n_assistant = sum(1 for x in m if x["role"] == "assistant")
        assert int((trained & (ids == END)).sum()) == n_assistant


def test_train_on_all(ref):
    for m, ids in zip(ref.convs[:300], ref.ids):
        enc = ref.tok.encode_chat(m, train_on="all")
        assert enc["input_ids"].tolist() == ids
        assert enc["labels"].tolist() == [-100] + ids[1:]
    # the default is train_on="assistant"
    m = ref.convs[0]
    assert ref.tok.encode_chat(m)["labels"].tolist() == ref.tok.encode_chat(m, train_on="assistant")["labels"].tolist()


def test_train_on_bad_value(ref):
    with pytest.raises(ValueError):
        ref.tok.encode_chat(ref.convs[0], train_on="everything")


def _encode_truncated(tok, m, L, train_on="assistant"):
    """encode_chat with max_seq_length, or None if it raised ConversationError."""
    try:
        return tok.encode_chat(m, max_seq_length=L, train_on=train_on)
    except ferrotune.ConversationError:
        return None


def test_truncation_keeps_a_prefix(ref):
    for j, m in enumerate(ref.convs[:200]):
        full = ref.tok.encode_chat(m)
        ids, labels = full["input_ids"].tolist(), full["labels"].tolist()
        n = len(ids)
        for L in sorted({1, 2, 5, max(1, n // 2), max(1, n - 1), n, n + 7, 4096}):
            for train_on, want in (("assistant", labels), ("all", [-100] + ids[1:])):
                enc = _encode_truncated(ref.tok, m, L, train_on)
                if enc is None:
                    # The contract leaves open whether encode_chat raises when truncation leaves no
                    # trained token (tokenize_dataset drops such rows as "no_trainable_tokens"); it
                    # may only raise then.
                    assert all(x == -100 for x in want[:L]), (j, L, train_on)
                    continue
                assert enc["input_ids"].tolist() == ids[:L], (j, L)
                assert enc["labels"].tolist() == want[:L], (j, L, train_on)
    # max_seq_length=None is "no truncation"
    long = [{"role": "user", "content": "word " * 3000}, {"role": "assistant", "content": "ok " * 3000}]
    assert len(ref.tok.encode_chat(long)["input_ids"]) == len(ref.hf.apply_chat_template(long, tokenize=True)["input_ids"]) > 4096


def test_user_marker_inside_assistant_content(ref):
    """A documented difference: an assistant reply that contains the text "<|user|>".

    The tokenizer turns that text into the <|user|> token (32010) in the middle of the reply.
    TRL's collator searches token ids, so it takes it for the start of a user turn. It pairs the
    i-th <|user|> with the i-th <|assistant|> and, when there are more <|user|> than <|assistant|>
    markers, masks everything from the last <|user|> on; observed with TRL 0.19.1 on this
    conversation: only "Write" and the space token after it stay trained, the rest of the reply,
    the whole second reply and the EOS are masked. ferrotune assigns labels by character offsets of
    the messages, so both replies stay wholly trained.
    """
    reply = "Write <|user|> before your text, like this:\n<|user|>\nhello\nand the model answers."
    m = [
        {"role": "user", "content": "How do I mark a user turn in Phi-3?"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    ids = ref.hf.apply_chat_template(m, tokenize=True)["input_ids"]
    assert ids.count(USER) == 4  # two real user turns + two inside the reply
    enc = ref.tok.encode_chat(m)
    assert enc["input_ids"].tolist() == ids
    labels = enc["labels"].tolist()
    trl_labels = _trl_labels(_collator(ref.hf_unk_pad), ids)

    a1 = ids.index(ASSISTANT)
    e1 = ids.index(END, a1)  # the <|end|> closing the first reply
    a2 = ids.index(ASSISTANT, e1)
    reply1 = range(a1 + 1, e1 + 1)
    reply2_and_eos = range(a2 + 1, len(ids))
    trained = set(reply1) | set(reply2_and_eos)
    # ferrotune: every token of both replies (the literal <|user|> tokens included), their <|end|>, the EOS
    assert [i for i, lab in enumerate(labels) if lab != -100] == sorted(trained)
    assert all(labels[i] == ids[i] for i in trained)
    assert sum(1 for i in reply1 if labels[i] == USER) == 2
    # TRL: only the reply's tokens before the first literal <|user|>
    cut = ids.index(USER, a1)
    assert cut - (a1 + 1) == 2  # "Write", "▁"
    assert [i for i, lab in enumerate(trl_labels) if lab != -100] == list(range(a1 + 1, cut))


# ---------------------------------------------------------------------------------------
# Invalid conversations
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}, {"role": "tool", "content": "{}"}],
        [{"role": "user", "content": 123}, {"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
    ],
    ids=["empty", "unknown_role", "int_content", "null_content"],
)
def test_invalid_conversation_raises(ref, messages):
    with pytest.raises(ferrotune.ConversationError) as ei:
        ref.tok.encode_chat(messages)
    assert isinstance(ei.value, ValueError)
    assert str(ei.value)
