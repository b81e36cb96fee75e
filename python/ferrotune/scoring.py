"""The scoring contract of a ferrotune endpoint, independent of any web framework.

:class:`Scorer` turns one HTTP request body into ``(status_code, response_dict)``; the
``score.py`` that ``ferrotune package`` writes next to the model hands it the raw body and
returns the answer with that status, and ``ferrotune.mlflow_pyfunc`` reuses the same checks.

Request (what the notebook writes to ``sample_score.json``)::

    {"input_data": {"input_string": [[{"role": "user", "content": "..."}, ...], ...],
                    "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": true,
                                   "max_new_tokens": 200}},
     "params": {}}

``input_string`` is either a **list of conversations** (the notebook's form, above) or
**one conversation** — a flat list of messages, the model card's form
``"input_string": [{"role": "user", "content": "..."}]``. A message is exactly
``{"role": "system" | "user" | "assistant", "content": "<string>"}``. A conversation whose
last message is the assistant's is continued (that message is left open and the reply
extends it), as transformers' chat pipeline does; the notebook scores whole ``test_gen``
rows, which end that way.

Response (status 200):

* one conversation (the flat form) → ``{"output": "<reply>"}``
* a list of conversations → ``{"output": ["<reply 0>", "<reply 1>", ...]}``, one reply per
  conversation, in request order (also for a list of one).

The reply is the generated text only (special tokens removed), never the prompt.

Parameters (``input_data.parameters``; all optional; the top-level ``params`` object may
carry the same names, ``parameters`` wins on a clash): ``max_new_tokens`` (int ≥ 1, at most
the endpoint's cap), ``do_sample`` (bool), ``temperature`` (number ≥ 0; > 0 when sampling),
``top_p`` (0 < p ≤ 1), ``top_k`` (int ≥ 0, 0 = off), ``repetition_penalty`` (number > 0),
``seed`` (int ≥ 0, makes sampling reproducible). ``null`` means "the default". The
defaults are transformers': greedy, temperature 1, top_p 1, top_k 50, no penalty, 256 new
tokens — overridden by the model's ``generation_config.json`` where it sets them.
``return_full_text`` (which Azure ML's model card sends) is accepted when ``false`` and
changes nothing, since the reply never includes the prompt; ``true`` is refused. Any other
name is refused, and the message lists the valid ones.

Errors are JSON ``{"error": "<message>"}``, never a traceback:

* 400 — malformed JSON or UTF-8, a missing or unknown key, ``input_string`` not a list,
  a bad message (not an object, unknown role, non-string content, extra keys), an empty
  conversation, a parameter of the wrong type or out of range, ``max_new_tokens`` above
  the cap, more conversations than allowed, a prompt longer than the model's context;
* 413 — a body larger than the size bound (checked before parsing);
* 500 — anything else (the traceback goes to the ``ferrotune.scoring`` logger).

Limits (read by :meth:`Limits.from_env` when the scorer loads): ``FERROTUNE_MAX_NEW_TOKENS``
(1024), ``FERROTUNE_MAX_CONVERSATIONS`` per request (16), ``FERROTUNE_MAX_REQUEST_BYTES``
(1 MiB). Serving device and precision: ``FERROTUNE_DEVICE`` (``auto``) and
``FERROTUNE_PRECISION`` (``auto``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .exceptions import ChatTemplateError, InvalidArgumentError

__all__ = [
    "Scorer",
    "Limits",
    "ScoringRequest",
    "RequestError",
    "parse_request",
    "parse_input",
    "parse_conversations",
    "check_parameters",
    "generation_defaults",
    "PARAMETERS",
    "DEFAULT_PARAMETERS",
    "ROLES",
]

logger = logging.getLogger("ferrotune.scoring")

#: the generation parameters a request may set
PARAMETERS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
#: transformers' defaults (and ferrotune.Generator's), before generation_config.json
DEFAULT_PARAMETERS: dict = {
    "max_new_tokens": 256,
    "do_sample": False,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "repetition_penalty": 1.0,
    "seed": None,
}
#: accepted only with this value, and ignored (the reply never contains the prompt)
_NO_OP_PARAMETERS = {"return_full_text": False}
#: message roles the chat template knows
ROLES = ("system", "user", "assistant")
_REQUEST_KEYS = ("input_data", "params")
_INPUT_KEYS = ("input_string", "parameters")
_MESSAGE_KEYS = ("role", "content")
_U64_MAX = 2**64 - 1

PathLike = Union[str, "os.PathLike[str]"]


class RequestError(InvalidArgumentError):
    """A scoring request the endpoint refuses; ``status`` is the HTTP status (400 or 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    #: the largest ``max_new_tokens`` a request may set
    max_new_tokens: int = 1024
    #: conversations per request
    max_conversations: int = 16
    #: request body size, checked before parsing
    max_request_bytes: int = 1 << 20

    ENV = {
        "max_new_tokens": "FERROTUNE_MAX_NEW_TOKENS",
        "max_conversations": "FERROTUNE_MAX_CONVERSATIONS",
        "max_request_bytes": "FERROTUNE_MAX_REQUEST_BYTES",
    }

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_conversations", "max_request_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"Limits.{name} must be a positive integer, not {value!r}")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Limits":
        """The defaults, overridden by ``FERROTUNE_MAX_NEW_TOKENS``,
        ``FERROTUNE_MAX_CONVERSATIONS`` and ``FERROTUNE_MAX_REQUEST_BYTES``.

        Raises:
            InvalidArgumentError: a variable that is not a positive integer.
        """
        env = os.environ if environ is None else environ
        values: dict = {}
        for name, var in cls.ENV.items():
            raw = env.get(var)
            if raw is None or not raw.strip():
                continue
            try:
                value = int(raw.strip())
            except ValueError:
                raise InvalidArgumentError(f"{var}={raw!r} is not an integer") from None
            if value < 1:
                raise InvalidArgumentError(f"{var}={raw!r} must be at least 1")
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringRequest:
    """A checked request."""

    #: the conversations, each a list of ``{"role", "content"}`` dicts
    conversations: list
    #: ``True`` for the flat one-conversation form (the response is then a single string)
    single: bool
    #: the parameters the request set (validated; defaults not filled in)
    parameters: dict


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _as_list(value: Any) -> Any:
    """numpy arrays (pandas cells) → lists; everything else unchanged."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def _check_message(msg: Any, where: str) -> dict:
    if not isinstance(msg, Mapping):
        raise RequestError(f"{where} must be a message object {{\"role\": ..., \"content\": ...}}, not {_type_name(msg)}")
    for key in msg:
        if key not in _MESSAGE_KEYS:
            raise RequestError(f"{where} has an unexpected key {key!r}; a message has only 'role' and 'content'")
    if "role" not in msg:
        raise RequestError(f"{where} has no 'role' (one of {', '.join(ROLES)})")
    if "content" not in msg:
        raise RequestError(f"{where} has no 'content'")
    role, content = msg["role"], msg["content"]
    if not isinstance(role, str) or role not in ROLES:
        shown = repr(role) if isinstance(role, str) else _type_name(role)
        raise RequestError(f"{where}.role is {shown}; use one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string, not {_type_name(content)}")
    return {"role": role, "content": content}


def _check_conversation(conv: Any, where: str) -> list:
    conv = _as_list(conv)
    if isinstance(conv, str) or not isinstance(conv, (list, tuple)):
        raise RequestError(
            f"{where} must be a conversation (a list of {{\"role\", \"content\"}} messages), not {_type_name(conv)}"
        )
    if not conv:
        raise RequestError(f"{where} is an empty conversation; give at least one message")
    return [_check_message(m, f"{where}[{j}]") for j, m in enumerate(conv)]


def parse_conversations(value: Any, where: str = "input_string", *, max_conversations: Optional[int] = None) -> tuple:
    """``(conversations, single)`` from ``input_string``: a list of conversations, or one
    conversation (a flat list of messages, ``single=True``).

    Raises:
        RequestError: anything but those two shapes; the message gives the position.
    """
    value = _as_list(value)
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise RequestError(
            f"{where} must be a list: one conversation [{{\"role\": \"user\", \"content\": \"...\"}}, ...] "
            f"or a list of conversations [[...], ...]; got {_type_name(value)}"
        )
    if not value:
        raise RequestError(f"{where} is empty; give one conversation or a list of conversations")
    items = [_as_list(x) for x in value]
    if isinstance(items[0], Mapping):
        return [_check_conversation(items, where)], True
    if isinstance(items[0], (list, tuple)):
        for i, item in enumerate(items):
            if isinstance(item, Mapping):
                raise RequestError(
                    f"{where}[{i}] is a message, but {where}[0] is a conversation; use either one conversation "
                    "(a list of messages) or a list of conversations, not both"
                )
        if max_conversations is not None and len(items) > max_conversations:
            raise RequestError(
                f"{where} has {len(items)} conversations; this endpoint takes at most {max_conversations} per request "
                "(FERROTUNE_MAX_CONVERSATIONS)"
            )
        return [_check_conversation(c, f"{where}[{i}]") for i, c in enumerate(items)], False
    raise RequestError(
        f"{where}[0] must be a message object or a conversation (a list of messages), not {_type_name(items[0])}"
    )


def _number(name: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{where}.{name} must be a number, not {_type_name(value)}")
    x = float(value)
    if not math.isfinite(x):
        raise RequestError(f"{where}.{name} must be a finite number, not {value!r}")
    return x


def _integer(name: str, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{where}.{name} must be an integer, not {_type_name(value)}")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise RequestError(f"{where}.{name} must be an integer, not {value!r}")
        value = int(value)
    return int(value)


def check_parameters(
    parameters: Any, where: str = "parameters", *, max_new_tokens_cap: Optional[int] = None
) -> dict:
    """Validates generation parameters; returns the ones set (``null`` values dropped),
    converted to ``int`` / ``float`` / ``bool``.

    Raises:
        RequestError: an unknown name, a wrong type or a value out of range.
    """
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise RequestError(f"{where} must be an object of generation parameters, not {_type_name(parameters)}")
    out: dict = {}
    for name, value in parameters.items():
        if name in _NO_OP_PARAMETERS:
            if value is not None and value != _NO_OP_PARAMETERS[name]:
                raise RequestError(
                    f"{where}.{name}={json.dumps(value)} is not supported: the output is the reply only, never the "
                    f"prompt (send {name}: false or leave it out)"
                )
            continue
        if name not in PARAMETERS:
            raise RequestError(
                f"{where} has an unknown parameter {name!r}; valid ones are {', '.join(PARAMETERS)} "
                "(and return_full_text: false)"
            )
        value = _as_scalar(value)
        if value is None:
            continue
        if name == "max_new_tokens":
            n = _integer(name, value, where)
            if n < 1:
                raise RequestError(f"{where}.max_new_tokens must be at least 1, not {n}")
            if max_new_tokens_cap is not None and n > max_new_tokens_cap:
                raise RequestError(
                    f"{where}.max_new_tokens={n} is above this endpoint's limit of {max_new_tokens_cap} "
                    "(FERROTUNE_MAX_NEW_TOKENS)"
                )
            out[name] = n
        elif name == "do_sample":
            if not isinstance(value, bool):
                raise RequestError(f"{where}.do_sample must be true or false, not {_type_name(value)}")
            out[name] = value
        elif name == "temperature":
            t = _number(name, value, where)
            if t < 0:
                raise RequestError(f"{where}.temperature must be >= 0, not {value!r}")
            out[name] = t
        elif name == "top_p":
            p = _number(name, value, where)
            if not 0.0 < p <= 1.0:
                raise RequestError(f"{where}.top_p must be in (0, 1], not {value!r}")
            out[name] = p
        elif name == "top_k":
            k = _integer(name, value, where)
            if k < 0:
                raise RequestError(f"{where}.top_k must be >= 0 (0 turns it off), not {k}")
            out[name] = k
        elif name == "repetition_penalty":
            r = _number(name, value, where)
            if r <= 0:
                raise RequestError(f"{where}.repetition_penalty must be > 0, not {value!r}")
            out[name] = r
        elif name == "seed":
            s = _integer(name, value, where)
            if not 0 <= s <= _U64_MAX:
                raise RequestError(f"{where}.seed must be between 0 and 2**64-1, not {s}")
            out[name] = s
    if out.get("do_sample") and out.get("temperature") == 0.0:
        raise RequestError(f"{where}.temperature must be > 0 when do_sample is true (for greedy decoding send do_sample: false)")
    return out


def _as_scalar(value: Any) -> Any:
    """numpy scalars (from pandas / MLflow) → Python scalars."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes, list, tuple, dict)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def parse_input(
    input_data: Any, *, where: str = "input_data", limits: Optional[Limits] = None, extra_parameters: Any = None
) -> ScoringRequest:
    """Checks the inner object ``{"input_string": ..., "parameters": {...}}``.

    ``extra_parameters`` (the request's top-level ``params``) fill in what ``parameters``
    does not set.
    """
    if not isinstance(input_data, Mapping):
        raise RequestError(
            f"{where} must be an object {{\"input_string\": [...], \"parameters\": {{...}}}}, not {_type_name(input_data)}"
        )
    for key in input_data:
        if key not in _INPUT_KEYS:
            raise RequestError(f"{where} has an unknown key {key!r}; expected 'input_string' and optionally 'parameters'")
    if "input_string" not in input_data:
        raise RequestError(f"{where} has no 'input_string' (the conversations to score)")
    cap = limits.max_new_tokens if limits is not None else None
    params = check_parameters(extra_parameters, "params", max_new_tokens_cap=cap)
    params.update(check_parameters(input_data.get("parameters"), f"{where}.parameters", max_new_tokens_cap=cap))
    convs, single = parse_conversations(
        input_data["input_string"],
        f"{where}.input_string",
        max_conversations=limits.max_conversations if limits is not None else None,
    )
    return ScoringRequest(convs, single, params)


def parse_request(body: Any, limits: Optional[Limits] = None) -> ScoringRequest:
    """Checks a whole request: ``bytes`` / ``str`` (the raw body; its size is checked
    before parsing) or an already parsed ``dict``.

    Raises:
        RequestError: with the HTTP status (400, or 413 for an oversized body).
    """
    limits = limits if limits is not None else Limits()
    if isinstance(body, (bytes, bytearray, memoryview)):
        raw = bytes(body)
        _check_size(len(raw), limits)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"the request body is not UTF-8 text ({e.reason} at byte {e.start})") from None
        obj = _loads(text)
    elif isinstance(body, str):
        _check_size(len(body.encode("utf-8", "surrogatepass")), limits)
        obj = _loads(body)
    else:
        obj = body
    if not isinstance(obj, Mapping):
        raise RequestError(
            'the request must be a JSON object {"input_data": {"input_string": [...], "parameters": {...}}}, '
            f"not {_type_name(obj)}"
        )
    for key in obj:
        if key not in _REQUEST_KEYS:
            raise RequestError(
                f"unknown key {key!r} in the request; expected 'input_data' (and optionally 'params')"
                + (" — put input_string inside input_data" if key == "input_string" else "")
            )
    if "input_data" not in obj:
        raise RequestError('the request has no \'input_data\'; send {"input_data": {"input_string": [...], "parameters": {...}}}')
    return parse_input(obj["input_data"], limits=limits, extra_parameters=obj.get("params"))


def _check_size(n: int, limits: Limits) -> None:
    if n > limits.max_request_bytes:
        raise RequestError(
            f"the request body has {n} bytes; this endpoint takes at most {limits.max_request_bytes} "
            "(FERROTUNE_MAX_REQUEST_BYTES)",
            status=413,
        )


def _loads(text: str) -> Any:
    if not text.strip():
        raise RequestError("the request body is empty; send a JSON object with 'input_data'")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None


# ---------------------------------------------------------------------------------------
# Defaults from the model folder
# ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _model_files_dir(model_dir: Path) -> Path:
    for candidate in (model_dir / "data" / "model", model_dir):
        if (candidate / "config.json").is_file():
            return candidate
    return model_dir


def generation_defaults(model_dir: PathLike) -> dict:
    """The parameters a request gets when it does not set them: :data:`DEFAULT_PARAMETERS`,
    overridden by the ``generation_config.json`` of ``model_dir`` (a packaged folder, an
    MLflow folder or a model folder) where it sets ``max_new_tokens``, ``do_sample``,
    ``temperature``, ``top_p``, ``top_k`` or ``repetition_penalty`` (as transformers'
    pipeline does). Values of the wrong type are ignored."""
    out = dict(DEFAULT_PARAMETERS)
    cfg = _read_json(_model_files_dir(Path(model_dir)) / "generation_config.json") or {}
    for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty"):
        if k not in cfg:
            continue
        v = cfg[k]
        try:
            out.update(check_parameters({k: v}, "generation_config"))
        except RequestError:
            logger.warning("ignoring generation_config.json %s=%r (not a valid value)", k, v)
    return out


# ---------------------------------------------------------------------------------------
# The scorer
# ---------------------------------------------------------------------------------------


class Scorer:
    """A loaded model behind the scoring contract (see the module docstring).

    ``Scorer.load(folder)`` once, then ``scorer.score(body)`` per request; safe to call
    from several threads at once.
    """

    def __init__(self, generator: Any, *, limits: Optional[Limits] = None, defaults: Optional[Mapping[str, Any]] = None) -> None:
        self._generator = generator
        self._limits = limits if limits is not None else Limits()
        self._defaults = dict(DEFAULT_PARAMETERS if defaults is None else defaults)

    @classmethod
    def load(
        cls,
        model_dir: PathLike,
        *,
        device: Optional[str] = None,
        precision: Optional[str] = None,
        limits: Optional[Limits] = None,
        progress: Any = False,
    ) -> "Scorer":
        """Loads the model in ``model_dir`` (a ``ferrotune package`` folder, an Azure ML
        MLflow folder or a merged model folder).

        Args:
            device, precision: as :meth:`ferrotune.Generator.load`; default the
                ``FERROTUNE_DEVICE`` / ``FERROTUNE_PRECISION`` variables, else ``"auto"``.
            limits: default :meth:`Limits.from_env`.
            progress: the loading progress display (default silent).

        Raises:
            InvalidArgumentError: a limit variable that is not a positive integer.
            ModelError, FerrotuneFileNotFoundError: the model cannot be loaded.
        """
        from ._generate import Generator

        limits = limits if limits is not None else Limits.from_env()
        gen = Generator.load(
            os.fspath(model_dir),
            device=device or os.environ.get("FERROTUNE_DEVICE") or "auto",
            precision=precision or os.environ.get("FERROTUNE_PRECISION") or "auto",
            progress=progress,
        )
        return cls(gen, limits=limits, defaults=_packaged_defaults(Path(model_dir)))

    @property
    def generator(self) -> Any:
        return self._generator

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def defaults(self) -> dict:
        """The parameters used when a request does not set them."""
        return dict(self._defaults)

    def parameters_for(self, request: ScoringRequest) -> dict:
        """The request's parameters over the defaults (``max_new_tokens`` at most the cap)."""
        params = dict(self._defaults)
        params["max_new_tokens"] = min(int(params["max_new_tokens"]), self._limits.max_new_tokens)
        params.update(request.parameters)
        return params

    def check_context(self, request: ScoringRequest) -> None:
        """Raises :class:`RequestError` for a prompt that leaves no room for a reply in the
        model's context (the message names the conversation)."""
        limit = int(self._generator.max_context)
        for i, conv in enumerate(request.conversations):
            n = len(self._generator.prompt_ids(conv))
            if n >= limit:
                where = "input_data.input_string" + ("" if request.single else f"[{i}]")
                raise RequestError(
                    f"{where}: the prompt is {n} tokens long; the model's context is {limit} tokens (prompt and reply "
                    "together), which leaves no room for a reply — shorten the conversation"
                )

    def generate(self, request: ScoringRequest) -> list:
        """The reply texts of a checked request, one per conversation."""
        self.check_context(request)
        completions = self._generator.generate(request.conversations, **self.parameters_for(request))
        return [c.text for c in completions]

    def score(self, body: Any) -> tuple:
        """``(status_code, response)`` for a request body (``bytes``, ``str`` or a parsed
        ``dict``): ``(200, {"output": ...})`` or ``(4xx/500, {"error": "..."})``. Never
        raises for a bad request or a failed generation."""
        try:
            request = parse_request(body, self._limits)
        except RequestError as e:
            return e.status, {"error": str(e)}
        except Exception:  # a bug in the checks themselves: still no traceback to the caller
            logger.exception("ferrotune scoring: unexpected error while reading a request")
            return 500, {"error": "internal error while reading the request; see the server log"}
        try:
            texts = self.generate(request)
        except RequestError as e:
            return e.status, {"error": str(e)}
        except (InvalidArgumentError, ChatTemplateError) as e:
            # the conversations or parameters do not suit this model (e.g. a prompt longer
            # than its context): the client's to fix
            return 400, {"error": str(e)}
        except Exception as e:
            logger.exception("ferrotune scoring: generation failed")
            return 500, {"error": f"internal error while generating ({type(e).__name__}); see the server log"}
        return 200, {"output": texts[0] if request.single else texts}

    def __repr__(self) -> str:
        return f"Scorer({self._generator!r}, limits={self._limits})"


def _packaged_defaults(model_dir: Path) -> dict:
    """The generation defaults ``ferrotune package`` recorded in ``ferrotune.json``, else
    :func:`generation_defaults` of the folder."""
    meta = _read_json(model_dir / "ferrotune.json")
    recorded = meta.get("generation_defaults") if meta else None
    if isinstance(recorded, dict):
        out = dict(DEFAULT_PARAMETERS)
        try:
            out.update(check_parameters(recorded, "ferrotune.json generation_defaults"))
            return out
        except RequestError as e:
            logger.warning("ignoring %s: %s", model_dir / "ferrotune.json", e)
    return generation_defaults(model_dir)
