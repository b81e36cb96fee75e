"""Chat generation (the work happens in ``ferrotune._core``): :class:`Generator`."""

from __future__ import annotations

import math
import numbers
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core
from ._progress import make_renderer
from .exceptions import InvalidArgumentError

__all__ = ["Generator", "Completion", "as_conversations", "check_parameters"]

PathLike = Union[str, "os.PathLike[str]"]
Message = Mapping[str, Any]
StreamCallback = Callable[[int, str], None]


@dataclass(frozen=True)
class Completion:
    """One conversation's reply."""

    #: the generated text (special tokens removed)
    text: str
    #: the generated token ids, without the final EOS
    token_ids: list
    #: ``"stop"`` (an EOS token) or ``"length"`` (``max_new_tokens`` or the model's context)
    finish_reason: str
    #: tokens in the prompt
    prompt_tokens: int


_U64_LIMIT = 2**64
_MAX_INDEX = sys.maxsize  # the native side counts tokens in usize


#: the generation parameters, in transformers' order
PARAMETERS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_))


def _integer(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not _is_bool(x)


def _real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not _is_bool(x) and math.isfinite(x)


def check_parameters(
    max_new_tokens: Any = 256,
    do_sample: Any = False,
    temperature: Any = 1.0,
    top_p: Any = 1.0,
    top_k: Any = 50,
    repetition_penalty: Any = 1.0,
    seed: Any = None,
    *,
    name: Callable[[str], str] = lambda p: p,
) -> dict:
    """Checks generation parameters against transformers' ranges and returns them as plain
    ``int`` / ``float`` / ``bool``: ``max_new_tokens`` an integer >= 1, ``temperature`` a
    number >= 0 (> 0 when sampling; 0 is a common spelling of greedy decoding, where
    temperature plays no part), ``0 < top_p <= 1``, ``top_k`` an integer >= 0 (0 = off),
    ``repetition_penalty`` > 0, ``seed`` ``None`` or an integer in ``[0, 2**64)``. Every
    value is checked whether or not ``do_sample`` uses it.

    ``name`` maps a parameter's name to the one the message shows (a command-line flag).

    Raises:
        InvalidArgumentError: naming the parameter, its valid range and the value given.
    """

    def bad(param: str, expected: str, value: Any) -> InvalidArgumentError:
        return InvalidArgumentError(f"{name(param)} must be {expected}, got {value!r}")

    if not _integer(max_new_tokens) or not 1 <= max_new_tokens <= _MAX_INDEX:
        raise bad("max_new_tokens", "an integer >= 1", max_new_tokens)
    if not _is_bool(do_sample):
        raise bad("do_sample", "True or False", do_sample)
    do_sample = bool(do_sample)
    if not _real(temperature) or temperature < 0:
        raise bad("temperature", "a number > 0 (or 0 for greedy decoding)", temperature)
    if do_sample and temperature == 0:
        raise bad("temperature", "a number > 0 when sampling (for greedy decoding leave sampling off)", temperature)
    if not _real(top_p) or not 0 < top_p <= 1:
        raise bad("top_p", "a number in (0, 1]", top_p)
    if not _integer(top_k) or not 0 <= top_k <= _MAX_INDEX:
        raise bad("top_k", "an integer >= 0 (0 turns it off)", top_k)
    if not _real(repetition_penalty) or repetition_penalty <= 0:
        raise bad("repetition_penalty", "a number > 0 (1 = no penalty)", repetition_penalty)
    if seed is not None and (not _integer(seed) or not 0 <= seed < _U64_LIMIT):
        raise bad("seed", "an integer in [0, 2**64) or None", seed)
    return dict(
        max_new_tokens=int(max_new_tokens),
        do_sample=do_sample,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        repetition_penalty=float(repetition_penalty),
        seed=None if seed is None else int(seed),
    )


def _is_message(x: Any) -> bool:
    return isinstance(x, Mapping) and ("role" in x or "content" in x)


def as_conversations(conversations: Any) -> tuple[list, bool]:
    """``(list of conversations, was_single)``: accepts one conversation (a list of
    ``{"role", "content"}`` dicts) or a list of them."""
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
        raise InvalidArgumentError(
            "conversations must be a list of messages ({'role': ..., 'content': ...}) or a list of such lists, "
            f"not {type(conversations).__name__}"
        )
    if len(conversations) > 0 and _is_message(conversations[0]):
        return [list(conversations)], True
    return [c for c in conversations], False


class Generator:
    """A Phi-3 model and its tokenizer, loaded for generation (KV cache, batched decoding).

    ``Generator.load("outputs/merged")`` loads a merged model (a folder, an Azure ML MLflow
    model folder or a Hub repo id); ``Generator.load(base, adapter="outputs/adapter")`` runs
    a PEFT adapter on top of its base model, unmerged.
    """

    def __init__(self, native: "_core.Generator") -> None:
        self._native = native

    @classmethod
    def load(
        cls,
        model: PathLike,
        *,
        adapter: Optional[PathLike] = None,
        device: str = "auto",
        precision: str = "auto",
        token: Optional[str] = None,
        progress: Any = True,
    ) -> "Generator":
        """Loads the model. ``device``: ``"auto"`` (a CUDA GPU when this build has one, else
        the CPU), ``"cpu"`` or ``"cuda[:N]"``; ``precision``: ``"auto"`` (bf16 on a GPU, float32
        on the CPU), ``"32"`` or ``"16"``/``"bf16"``."""
        native = _core.Generator.load(
            os.fspath(model),
            adapter=None if adapter is None else os.fspath(adapter),
            device=device,
            precision=precision,
            token=token,
            progress=make_renderer(progress),
        )
        return cls(native)

    @property
    def eos_token_ids(self) -> list:
        """The ids that end a reply."""
        return self._native.eos_token_ids

    @property
    def max_context(self) -> int:
        """Prompt + reply length limit, in tokens."""
        return self._native.max_context

    @property
    def device(self) -> str:
        return self._native.device

    @property
    def model_dir(self) -> str:
        return self._native.model_dir

    def prompt_ids(self, messages: Sequence[Message]) -> list:
        """The prompt's token ids: the chat template with the generation prompt, or — when the
        last message is the assistant's — that message left open, so the reply continues it
        (what transformers' chat pipeline does)."""
        return self._native.prompt_ids(messages)

    def generate(
        self,
        conversations: Any,
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stream: Union[bool, StreamCallback, None] = None,
        progress: Any = False,
    ) -> list:
        """Replies to one conversation or a list of them; returns a list of
        :class:`Completion`, one per conversation.

        The parameters are transformers' (same defaults): greedy unless ``do_sample``;
        sampling applies ``temperature``, ``top_k`` (0 = off) and ``top_p``;
        ``repetition_penalty`` applies in both modes. ``seed`` makes sampling reproducible.
        ``stream=True`` prints the reply as it forms (one conversation); a callable
        ``stream(index, text_piece)`` receives the pieces of every conversation.
        """
        params = check_parameters(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, seed)
        convs, _ = as_conversations(conversations)
        on_text = self._stream_callback(stream, len(convs))
        renderer = make_renderer(progress)

        def events(kind, task_id, name, total, n, unit=""):
            if kind == "text":
                if on_text is not None:
                    on_text(int(task_id), name)
            elif renderer is not None:
                renderer(kind, task_id, name, total, n, unit)

        out = self._native.generate(
            convs,
            **params,
            stream=on_text is not None,
            progress=events if (on_text is not None or renderer is not None) else None,
        )
        if stream is True:
            print(flush=True)
        return [Completion(**d) for d in out]

    def chat(self, messages: Sequence[Message], **kwargs: Any) -> str:
        """The reply text to one conversation (keyword arguments as :meth:`generate`)."""
        convs, single = as_conversations(messages)
        if not single:
            raise InvalidArgumentError("chat() takes one conversation; use generate() for several")
        return self.generate(convs, **kwargs)[0].text

    def generate_ids(self, prompts: Sequence[Sequence[int]], **kwargs: Any) -> list:
        """The same loop on token ids: ``[(new_ids, finish_reason), ...]`` per prompt."""
        kwargs.pop("stream", None)
        progress = make_renderer(kwargs.pop("progress", False))
        unknown = sorted(set(kwargs) - set(PARAMETERS))
        if unknown:
            raise InvalidArgumentError(f"generate_ids() got unknown parameters: {', '.join(unknown)}")
        params = check_parameters(**kwargs)
        return self._native.generate_ids([list(map(int, p)) for p in prompts], progress=progress, **params)

    @staticmethod
    def _stream_callback(stream: Any, n: int) -> Optional[StreamCallback]:
        if stream is None or stream is False:
            return None
        if callable(stream):
            return stream
        if stream is True:
            if n != 1:
                raise InvalidArgumentError("stream=True prints one conversation; pass a callable stream(index, text) for several")
            return lambda _i, piece: (sys.stdout.write(piece), sys.stdout.flush())
        raise InvalidArgumentError(f"stream must be True, False or a callable(index, text), not {stream!r}")

    def __repr__(self) -> str:
        return f"Generator(model_dir={self.model_dir!r}, device={self.device!r})"
