"""Azure ML scoring script of a model packaged by ferrotune (``ferrotune package``).

``init()`` loads the model once; ``run(request)`` scores one request. It needs only
ferrotune (and, to serve HTTP, ``azureml-inference-server-http``).

Request — the notebook's ``sample_score.json``, a list of conversations::

    {"input_data": {"input_string": [[{"role": "user", "content": "..."}, ...]],
                    "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": true,
                                   "max_new_tokens": 200}},
     "params": {}}

or the model card's flat form, one conversation:
``{"input_data": {"input_string": [{"role": "user", "content": "..."}], "parameters": {...}}}``.
A conversation that ends with an assistant message is continued.

Response — one conversation: ``{"output": "<reply>"}``; a list of conversations:
``{"output": ["<reply>", ...]}`` (one per conversation, in order). Errors:
``{"error": "<message>"}`` with status 400 (a bad request; the message says what to fix),
413 (body larger than ``FERROTUNE_MAX_REQUEST_BYTES``), 405 (not a POST) or 500 (details
in the server log). Parameters and limits: see ``ferrotune.scoring``.

Where the model is: ``AZUREML_MODEL_DIR`` (Azure ML mounts a registered model folder there,
often one level down, ``$AZUREML_MODEL_DIR/<folder>/``), searched two levels deep for the
folder with ``MLmodel`` or ``data/model/config.json``; without the variable, the folder of
this file.

Three ways to run it:

* the Azure ML inference server (``azmlinfsrv``, a managed online deployment): ``run`` is
  marked ``@rawhttp`` and gets the HTTP request, so the size bound applies before the body
  is read and errors carry their status (``AMLResponse``);
* the server calling ``run`` with the body as a JSON string (an entry script that forwards
  to this one): the same responses, the size checked on the string;
* in-process, e.g. ``init(); run('{"input_data": ...}')``: ``run`` returns the response
  body as a dict (``{"error": ...}`` on failure) and ``score(raw)`` returns
  ``(status, body)``.
"""

import logging
import os
import sys

try:  # inside the inference server (it aliases these modules)
    from azureml.contrib.services.aml_request import AMLRequest, rawhttp  # noqa: F401
    from azureml.contrib.services.aml_response import AMLResponse
except ImportError:
    try:  # the server's package installed, not running in it
        from azureml_inference_server_http.api.aml_request import AMLRequest, rawhttp  # noqa: F401
        from azureml_inference_server_http.api.aml_response import AMLResponse
    except ImportError:  # plain ferrotune: in-process use
        AMLRequest = None
        AMLResponse = None

        def rawhttp(func):
            return func


logger = logging.getLogger("azmlinfsrv.ferrotune")

_scorer = None


def _log_setup():
    """Tracebacks of failed requests (logger ``ferrotune.scoring``) must reach the
    deployment log even where nothing configured the root logger."""
    ft = logging.getLogger("ferrotune")
    if not ft.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s [%(process)d] %(name)s - %(message)s"))
        ft.addHandler(handler)
        ft.setLevel(logging.INFO)


def _qualifies(folder):
    return os.path.isfile(os.path.join(folder, "MLmodel")) or os.path.isfile(
        os.path.join(folder, "data", "model", "config.json")
    )


def find_model_dir(root):
    """The packaged model folder: ``root`` itself or a folder up to two levels below it
    (never inside ``data/``), the first in name order at the shallowest level."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ferrotune: AZUREML_MODEL_DIR={root} is not a folder")
    level = [root]
    for _ in range(3):
        for folder in level:
            if _qualifies(folder):
                return folder
        nxt = []
        for folder in level:
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                continue
            for name in names:
                path = os.path.join(folder, name)
                if name != "data" and not name.startswith(".") and os.path.isdir(path):
                    nxt.append(path)
        level = nxt
    try:
        found = ", ".join(sorted(os.listdir(root))[:20]) or "(empty)"
    except OSError:
        found = "(unreadable)"
    raise FileNotFoundError(
        f"ferrotune: no packaged model (a folder with MLmodel or data/model/config.json) in {root} or two levels "
        f"below it; it holds: {found}"
    )


def init():
    """Loads the model (once per worker)."""
    global _scorer
    _log_setup()
    from ferrotune.scoring import Scorer

    root = os.environ.get("AZUREML_MODEL_DIR") or os.path.dirname(os.path.abspath(__file__))
    folder = find_model_dir(root)
    logger.info("ferrotune: loading the model in %s", folder)
    _scorer = Scorer.load(folder)
    logger.info(
        "ferrotune: ready on %s (limits: %s)", getattr(_scorer.generator, "device", "?"), _scorer.limits
    )


def _is_http_request(raw):
    return hasattr(raw, "get_data") and hasattr(raw, "method") and hasattr(raw, "headers")


#: how much of a refused body is still read and thrown away, so that the client gets the
#: 413 instead of a connection reset (a server that closes with unread data sends a RST)
_DRAIN_LIMIT = 64 * 1024 * 1024


def _drain(stream, most):
    left = most
    while left > 0:
        chunk = stream.read(min(left, 1 << 16))
        if not chunk:
            return
        left -= len(chunk)


def _read_body(request, limit):
    """The body of a POST, or ``(status, error)`` — at most limit + 1 bytes are kept."""
    length = request.content_length
    too_big = (413, {"error": f"the request body has more than {limit} bytes; this endpoint takes at most {limit} "
                              "(FERROTUNE_MAX_REQUEST_BYTES)"})
    if length is not None and length > limit:
        if length <= _DRAIN_LIMIT:
            _drain(request.stream, length)
        return None, (413, {"error": f"the request body has {length} bytes; this endpoint takes at most {limit} "
                                     "(FERROTUNE_MAX_REQUEST_BYTES)"})
    if length is not None:
        return request.get_data(cache=False), None
    body = request.stream.read(limit + 1)  # chunked: read at most one byte too many
    if len(body) > limit:
        _drain(request.stream, _DRAIN_LIMIT)
        return None, too_big
    return body, None


def score(raw):
    """``(status, body)`` for a request: a flask/AML request, the JSON body as ``str`` /
    ``bytes``, or an already parsed ``dict``."""
    if _scorer is None:
        return 503, {"error": "the model is not loaded (init() has not run or failed; see the log)"}
    if _is_http_request(raw):
        if raw.method != "POST":
            return 405, {"error": f"use POST with a JSON body, not {raw.method}"}
        body, err = _read_body(raw, _scorer.limits.max_request_bytes)
        if err is not None:
            return err
        return _scorer.score(body)
    if isinstance(raw, (str, bytes, bytearray, dict)):
        return _scorer.score(raw)
    return 400, {"error": f"unsupported input of type {type(raw).__name__}; send the JSON request body"}


def _in_server():
    return "azureml_inference_server_http.server" in sys.modules


@rawhttp
def run(raw_data):
    """Scores one request; returns the response (see the module docstring)."""
    try:
        status, body = score(raw_data)
    except Exception:  # score() handles request and model errors; this is a last resort
        logging.getLogger("ferrotune.scoring").exception("ferrotune: scoring failed")
        status, body = 500, {"error": "internal error; see the server log"}
    if AMLResponse is not None and (_is_http_request(raw_data) or _in_server()):
        return AMLResponse(body, status, {}, json_str=True)
    return body
