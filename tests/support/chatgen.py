"""Deterministic synthetic chat conversations for the tokenizer / chat-template tests.

:func:`conversations` returns lists of ``{"role", "content"}`` dicts: an optional leading system
message, then 1-6 user/assistant pairs (so every conversation alternates strictly and ends with
an assistant turn). Message texts mix plain words with the things tokenizers and chat templates
get wrong:

- leading / trailing spaces, tabs, newlines, CRLF, whitespace-only and empty strings;
- non-ASCII: accents, CJK, Cyrillic, RTL (Arabic / Hebrew), combining marks;
- emoji, astral-plane characters, ZWJ sequences, flags, variation selectors;
- digits and numbers (Llama splits digits one by one), code with indentation and braces;
- Jinja-looking text (``{{ bos_token }}``, ``{% if %}``) that must come out verbatim;
- with ``special_free=False``: text that looks like special tokens (``<|user|>``, ``<|end|>``,
  ``<s>``, ``</s>``, ``<|im_start|>``, ``<|endoftext|>``, ``[INST]`` ...). Tokenizers match added
  tokens inside message text too, so these turn into real special-token ids.

``special_free=True`` leaves out everything that the tokenizers used in the tests match as an
added token (needed when comparing with TRL's collator, which finds turns by searching the token
ids for ``<|assistant|>`` / ``<|user|>`` and masks every pad-token id).

Only Python's ``random.Random(seed)`` is used, so the output is the same on every platform and
Python version >= 3.2 (``Random.random``/``randrange``/``choice`` are stable for a given seed).
"""

from __future__ import annotations

import random
from typing import Iterator

from tests.support.synth import TRICKY_SNIPPETS

__all__ = [
    "conversations",
    "iter_conversations",
    "SPECIAL_LOOKALIKES",
    "FORBIDDEN_IN_SPECIAL_FREE",
    "is_special_free",
]

#: Text that looks like (and, for the fixtures, is) a special / added token.
SPECIAL_LOOKALIKES: tuple[str, ...] = (
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "<|endoftext|>",
    "<|placeholder1|>",
    "<s>",
    "</s>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|im_start|>assistant\n",
    "<|user|>\nfake turn<|end|>\n<|assistant|>\n",
    "[INST] hi [/INST]",
    "<<SYS>>\nsys\n<</SYS>>",
    "<|user|> <|end|>\n\n",
    "</s><s>[INST]",
)

#: Substrings that must not occur anywhere in a ``special_free`` conversation: every added token of
#: the fixtures (Phi-3's ``<|...|>`` tokens, ``<s>``, ``</s>``, ``<unk>``, ChatML's tokens).
FORBIDDEN_IN_SPECIAL_FREE: tuple[str, ...] = ("<|", "|>", "<s>", "</s>", "<unk>")

_WORDS = (
    "the of and to in is that for it as was with be by on not this are or from at which but have an "
    "they you we can has been if more when will would so no model data training learning token "
    "sequence gradient loss batch epoch weights inference dataset history science water energy city "
    "music story garden explain describe write summarize compare recipe travel mountain river ocean "
    "Python function variable class string integer list loop error Rust memory thread trait cargo "
    "Hello hello world OK yes Yes no No I I'm don't it's can't you're a an"
).split()

_NON_ASCII = (
    "café", "crème brûlée", "naïve", "Straße", "Ångström", "Ærøskøbing", "ﬁne ligature",
    "中文", "你好，世界！", "日本語のテキスト", "한국어 문장", "Привет", "ещё",
    "مرحبا بالعالم", "שלום עולם", "\u202bRTL embed\u202c", "e\u0301 combining", "Ω≈ç√∫",
    "ñ", "ü", "ß", "½ ¾ ⅓", "₀₁₂", "…", "—", "“quoted”", "«guillemets»", "\u00a0nbsp\u00a0",
    "zero\u200bwidth", "soft\u00adhyphen", "\ufeffbom",
)

_EMOJI = (
    "😀", "🚀", "🎉", "👍🏽", "👩\u200d💻", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "🇧🇬", "🇯🇵",
    "❤️", "☕", "✅", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝟘𝟙𝟚", "🫠", "🧑🏿\u200d🚀", "©️", "#️⃣", "🀄",
)

_CODE = (
    "```python\ndef f(x):\n    return x * 2\n```",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}",
    "SELECT * FROM t WHERE a = 'b';",
    "if x:\n    pass\nelse:\n        y = {'k': [1, 2]}",
    "    indented line\n\tand tab",
    "{{ bos_token }} {% if true %}yes{% endif %} {# comment #}",
    "{% raw %}not raw{% endraw %} }} {{ {%",
    "a<b && c>d || e != f",
    "<div class=\"x\">&amp; &lt;tag&gt;</div>",
    "C:\\Users\\x\\n \\t \\\\",
    "$HOME/path/to/file.txt ~/.bashrc",
)

_NUMBERS = (
    "0", "7", "42", "2024", "3.14159", "-17", "1e-9", "1,000,000", "0x1F", "12345678901234567890",
    "v1.2.3", "10:30", "50%", "#1", "Phi-3", "4k", "128K",
)

_WHITESPACE = (" ", "  ", "\n", "\n\n", "\t", " \n ", "\r\n", "   \t  ", "\n\n\n", " \t\n")


def _special_free(s: str) -> bool:
    return not any(f in s for f in FORBIDDEN_IN_SPECIAL_FREE)


def is_special_free(conversation: list[dict]) -> bool:
    """True if no message text contains anything the fixtures' tokenizers treat as an added token."""
    return all(_special_free(m["content"]) for m in conversation)


_TRICKY_ALL = tuple(TRICKY_SNIPPETS)
_TRICKY_FREE = tuple(s for s in TRICKY_SNIPPETS if _special_free(s))


def _words(rng: random.Random, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    out = []
    for _ in range(n):
        w = rng.choice(_WORDS)
        r = rng.random()
        if r < 0.08:
            w += ","
        elif r < 0.14:
            w += "."
        elif r < 0.16:
            w += "?"
        elif r < 0.18:
            w += "!"
        out.append(w)
    return " ".join(out)


def _piece(rng: random.Random, *, tricky: bool, special_free: bool) -> str:
    """One fragment of a message."""
    r = rng.random()
    if not tricky or r < 0.45:
        return _words(rng, 1, 12)
    if r < 0.55:
        return rng.choice(_NON_ASCII)
    if r < 0.63:
        return "".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 3)))
    if r < 0.70:
        return rng.choice(_NUMBERS)
    if r < 0.77:
        return rng.choice(_CODE)
    if r < 0.84:
        return rng.choice(_WHITESPACE)
    if r < 0.92:
        return rng.choice(_TRICKY_FREE if special_free else _TRICKY_ALL)
    if special_free:
        return _words(rng, 1, 4)
    return rng.choice(SPECIAL_LOOKALIKES)


def _text(rng: random.Random, *, tricky: bool, special_free: bool) -> str:
    """A message text."""
    if tricky:
        r = rng.random()
        if r < 0.04:
            return ""
        if r < 0.06:
            return rng.choice(_WHITESPACE)
        if r < 0.08:
            return rng.choice(_EMOJI)
        if r < 0.10:
            return rng.choice(_NUMBERS)
        if not special_free and r < 0.12:
            return rng.choice(SPECIAL_LOOKALIKES)
    n = rng.randint(1, 6)
    parts = [_piece(rng, tricky=tricky, special_free=special_free) for _ in range(n)]
    seps = (" ", "", "\n", " ", ". ", "\n\n", "\t") if tricky else (" ", " ", ". ", "\n")
    text = parts[0]
    for p in parts[1:]:
        text += rng.choice(seps) + p
    if tricky:
        # Leading / trailing whitespace on ~1/4 of the messages.
        if rng.random() < 0.25:
            text = rng.choice(_WHITESPACE) + text
        if rng.random() < 0.25:
            text = text + rng.choice(_WHITESPACE)
    return text


def _conversation(rng: random.Random, *, tricky: bool, system: bool, special_free: bool) -> list[dict]:
    msgs: list[dict] = []
    if system and rng.random() < 0.5:
        msgs.append({"role": "system", "content": _text(rng, tricky=tricky, special_free=special_free)})
    for _ in range(rng.randint(1, 6)):
        msgs.append({"role": "user", "content": _text(rng, tricky=tricky, special_free=special_free)})
        msgs.append({"role": "assistant", "content": _text(rng, tricky=tricky, special_free=special_free)})
    return msgs


def iter_conversations(
    n: int, seed: int, *, tricky: bool = True, system: bool = False, special_free: bool = False
) -> Iterator[list[dict]]:
    """Lazily yields the same conversations as :func:`conversations`."""
    rng = random.Random(f"chatgen/{seed}/{int(tricky)}{int(system)}{int(special_free)}")
    for _ in range(n):
        conv = _conversation(rng, tricky=tricky, system=system, special_free=special_free)
        if special_free:
            assert is_special_free(conv), conv
        yield conv


def conversations(
    n: int, seed: int, *, tricky: bool = True, system: bool = False, special_free: bool = False
) -> list[list[dict]]:
    """``n`` conversations, a pure function of the arguments.

    - ``tricky``: mix in the hard characters and whitespace (else plain words only);
    - ``system``: about half of the conversations start with a system message;
    - ``special_free``: no text that any fixture tokenizer would match as an added token.
    """
    return list(iter_conversations(n, seed, tricky=tricky, system=system, special_free=special_free))


if __name__ == "__main__":  # a quick look: python -m tests.support.chatgen
    import json

    for c in conversations(3, 0, system=True):
        print(json.dumps(c, ensure_ascii=False, indent=1))
