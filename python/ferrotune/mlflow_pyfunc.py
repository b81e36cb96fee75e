"""The ``python_function`` flavor of a ``ferrotune package`` folder: what
``mlflow.pyfunc.load_model(folder)`` runs (``loader_module: ferrotune.mlflow_pyfunc``).

``model.predict(model_input, params=None)`` takes:

* the scoring request's inner object ``{"input_string": ..., "parameters": {...}}`` (or the
  whole request ``{"input_data": {...}, "params": {...}}``), ``input_string`` being one
  conversation or a list of them;
* a list of conversations, or one conversation (a list of ``{"role", "content"}``
  messages);
* a pandas DataFrame with an ``input_string`` (or ``messages``) column, one conversation per
  row — e.g. ``pd.read_json("test_gen.jsonl", lines=True)``.

It returns a **list of reply strings, one per conversation, in order** — also for a single
conversation (a list of one), as MLflow's text-generation models return one prediction per
input row. A conversation that ends with an assistant message is continued.

``params`` are the generation parameters (``max_new_tokens``, ``do_sample``,
``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``seed``; the MLmodel
signature declares them, so MLflow passes them through). They override the ``parameters``
inside the input; what neither sets comes from the model's defaults (greedy, 256 new tokens,
``generation_config.json``). No request-size or ``max_new_tokens`` cap applies here (that is
the endpoint's job, ``ferrotune.scoring``). Bad input raises
:class:`ferrotune.InvalidArgumentError` with a message naming the position.

The model loads on ``FERROTUNE_DEVICE`` / ``FERROTUNE_PRECISION`` (default ``auto``), or
``model_config={"device": ..., "precision": ...}`` given to ``load_model``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from .scoring import (
    DEFAULT_PARAMETERS,
    _packaged_defaults,
    check_parameters,
    parse_conversations,
    parse_input,
    parse_request,
)

__all__ = ["FerrotunePyfuncModel", "_load_pyfunc"]

_COLUMNS = ("input_string", "messages")


def _model_root(data_path: Path) -> Path:
    """The packaged folder (MLmodel + data/) of the flavor's ``data`` path."""
    if data_path.name == "data" and (data_path / "model").is_dir():
        return data_path.parent
    return data_path


class FerrotunePyfuncModel:
    """A loaded :class:`ferrotune.Generator` behind MLflow's ``predict``."""

    def __init__(self, generator: Any, defaults: Optional[Mapping[str, Any]] = None) -> None:
        self.generator = generator
        self.defaults = dict(DEFAULT_PARAMETERS if defaults is None else defaults)

    def _conversations(self, model_input: Any) -> tuple:
        """``(conversations, parameters from the input)``."""
        if hasattr(model_input, "columns") and hasattr(model_input, "iloc"):  # a pandas DataFrame
            col = next((c for c in _COLUMNS if c in model_input.columns), None)
            if col is None:
                raise _error(
                    f"the DataFrame needs an 'input_string' or 'messages' column (one conversation per row); it has "
                    f"{', '.join(map(str, model_input.columns)) or 'no columns'}"
                )
            convs, _ = parse_conversations(list(model_input[col]), col)
            return convs, {}
        if isinstance(model_input, Mapping):
            if "input_data" in model_input:
                req = parse_request(dict(model_input))
            else:
                req = parse_input(model_input, where="model_input")
            return req.conversations, req.parameters
        convs, _ = parse_conversations(model_input, "model_input")
        return convs, {}

    def predict(self, model_input: Any, params: Optional[dict] = None) -> list:
        """Reply texts, one per conversation (see the module docstring)."""
        from .scoring import RequestError

        try:
            convs, from_input = self._conversations(model_input)
            given = {k: v for k, v in (params or {}).items() if v is not None}
            overrides = check_parameters(given, "params")
        except RequestError as e:
            raise _error(str(e)) from None
        settings = {**self.defaults, **from_input, **overrides}
        return [c.text for c in self.generator.generate(convs, **settings)]

    def __repr__(self) -> str:
        return f"FerrotunePyfuncModel({self.generator!r})"


def _error(message: str) -> Exception:
    from .exceptions import InvalidArgumentError

    return InvalidArgumentError(message)


def _load_pyfunc(data_path: str, model_config: Optional[Mapping[str, Any]] = None) -> FerrotunePyfuncModel:
    """MLflow's entry point: loads the model of the packaged folder whose ``data`` folder is
    ``data_path``."""
    from ._generate import Generator

    cfg = dict(model_config or {})
    root = _model_root(Path(data_path))
    gen = Generator.load(
        os.fspath(root),
        device=str(cfg.get("device") or os.environ.get("FERROTUNE_DEVICE") or "auto"),
        precision=str(cfg.get("precision") or os.environ.get("FERROTUNE_PRECISION") or "auto"),
        progress=False,
    )
    return FerrotunePyfuncModel(gen, _packaged_defaults(root))
