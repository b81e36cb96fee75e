"""The packaged ``score.py`` served by the real Azure ML inference server
(``azureml-inference-server-http==1.5.1``, gunicorn on 127.0.0.1; ``tests/support/
inference_server.py``) in its own virtualenv, where ferrotune is the checkout's.

The model folder is laid out as a managed online deployment mounts a registered model:
``$AZUREML_MODEL_DIR/<registered folder>/`` (MLmodel, data/, score.py). Replies are checked
against :class:`ferrotune.Generator` run in this process on the same folder (greedy, or
sampling with a seed), request by request.

Without PyPI the side venv cannot be created and these tests fail, saying so.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

import ferrotune
from ferrotune.packaging import package_model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.support import tiny_phi3 as tp  # noqa: E402
from tests.support.inference_server import InferenceServer, server_python  # noqa: E402
from tests.support.venvs import VenvError  # noqa: E402

#: what the server under test is told (the environment variables score.py reads)
MAX_NEW_TOKENS = 512
MAX_REQUEST_BYTES = 65536
SERVER_ENV = {
    "FERROTUNE_DEVICE": "cpu",
    "FERROTUNE_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
    "FERROTUNE_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
}
#: the notebook's scoring parameters (sample_score.json)
NOTEBOOK_PARAMS = {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200}
GREEDY = {"do_sample": False, "max_new_tokens": 24}


def chat(i: int, *, answered: bool = False) -> list:
    """An ultrachat-like conversation; ``answered`` ends it with the assistant's turn (a
    whole ``test_gen`` row, as the notebook sends)."""
    conv = [
        {"content": f"How do I keep basil plant number {i} alive indoors?", "role": "user"},
        {"content": "Give it bright light, water when the top soil is dry, and pinch the flowers.", "role": "assistant"},
        {"content": f"And how often should I feed plant {i}?", "role": "user"},
    ]
    if answered:
        conv.append({"content": "Every two to four weeks in spring and summer, with", "role": "assistant"})
    return conv


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def side_python() -> Path:
    try:
        return server_python()
    except VenvError as e:
        pytest.fail(
            "could not create the side virtualenv with azureml-inference-server-http==1.5.1 "
            f"(.venvs/azureml-inference-server; it needs PyPI): {e}",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inference-server")


@pytest.fixture(scope="module")
def model_mount(work) -> Path:
    """``AZUREML_MODEL_DIR``: the packaged folder one level below it, as Azure mounts it."""
    torch.set_num_threads(1)
    merged = tp.make_tiny_phi3(work / "merged", seed=3)
    mount = work / "azureml-models" / "ferrotune-chat" / "1"
    package_model(merged, mount / "trained_model", progress=False)
    return mount


@pytest.fixture(scope="module")
def packaged(model_mount) -> Path:
    return model_mount / "trained_model"


@pytest.fixture(scope="module")
def generator(packaged):
    return ferrotune.Generator.load(packaged, device="cpu", progress=False)


@pytest.fixture(scope="module")
def server(side_python, work, model_mount, packaged):
    """The packaged score.py as a custom deployment's entry script."""
    app = work / "app"
    app.mkdir()
    shutil.copyfile(packaged / "score.py", app / "score.py")
    srv = InferenceServer(side_python, app, "score.py", model_mount, work / "server.log", env=SERVER_ENV)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def expect_ok(srv, status, body):
    assert status == 200, f"{status} {body}\n--- server log ---\n{srv.log_tail()}"
    return body


# ---------------------------------------------------------------------------------------
# Accepted shapes
# ---------------------------------------------------------------------------------------


def test_health(server):
    status, body = server.request("GET", "/")
    assert (status, body) == (200, "Healthy")


def test_notebook_sample_score(server, generator):
    """sample_score.json as the notebook writes it: one test_gen row (ending with the
    assistant's turn) in a list, the notebook's sampling parameters."""
    conv = chat(0, answered=True)
    request = {"input_data": {"input_string": [conv], "parameters": dict(NOTEBOOK_PARAMS)}, "params": {}}
    body = expect_ok(server, *server.score(request))
    assert isinstance(body, dict) and set(body) == {"output"}
    assert isinstance(body["output"], list) and len(body["output"]) == 1 and isinstance(body["output"][0], str)

    # the same request with a seed: the in-process generator's reply, exactly
    request["input_data"]["parameters"]["seed"] = 1234
    body = expect_ok(server, *server.score(request))
    want = generator.generate(conv, **NOTEBOOK_PARAMS, seed=1234)[0].text
    assert body == {"output": [want]}

    # greedy
    request["input_data"]["parameters"] = dict(GREEDY)
    body = expect_ok(server, *server.score(request))
    assert body == {"output": [generator.generate(conv, **GREEDY)[0].text]}
    assert body["output"][0]


def test_model_card_flat_conversation(server, generator):
    """The model card's shape: one flat conversation → {"output": "<text>"}."""
    conv = [{"role": "user", "content": "What is the tallest mountain in Europe?"}]
    request = {"input_data": {"input_string": conv, "parameters": {**GREEDY, "return_full_text": False}}}
    body = expect_ok(server, *server.score(request))
    assert body == {"output": generator.generate(conv, **GREEDY)[0].text}
    assert body["output"]


def test_several_conversations_in_order(server, generator):
    convs = [chat(1), chat(2, answered=True), [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    body = expect_ok(server, *server.score({"input_data": {"input_string": convs, "parameters": GREEDY}}))
    assert body == {"output": [c.text for c in generator.generate(convs, **GREEDY)]}


# ---------------------------------------------------------------------------------------
# Refused requests
# ---------------------------------------------------------------------------------------

_FLAT = [{"role": "user", "content": "hello"}]
BAD_REQUESTS = [
    ("malformed-json", '{"input_data": {"input_string": [', 400, "not valid JSON"),
    ("empty-body", "", 400, "body is empty"),
    ("not-an-object", "[1, 2]", 400, "must be a JSON object"),
    ("wrong-top-key", {"inputs": {"input_string": _FLAT}}, 400, "unknown key 'inputs'"),
    ("no-input-data", {"params": {}}, 400, "no 'input_data'"),
    ("wrong-inner-key", {"input_data": {"input_strings": [_FLAT]}}, 400, "unknown key 'input_strings'"),
    ("input-not-a-list", {"input_data": {"input_string": "hello"}}, 400, "input_string must be a list"),
    ("bad-role", {"input_data": {"input_string": [{"role": "robot", "content": "x"}]}}, 400, "role is 'robot'"),
    ("non-string-content", {"input_data": {"input_string": [[{"role": "user", "content": 5}]]}}, 400,
     "input_string[0][0].content must be a string"),
    ("absurd-max-new-tokens", {"input_data": {"input_string": _FLAT, "parameters": {"max_new_tokens": 10**9}}}, 400,
     f"above this endpoint's limit of {MAX_NEW_TOKENS}"),
    ("unknown-parameter", {"input_data": {"input_string": _FLAT, "parameters": {"max_length": 5}}}, 400,
     "unknown parameter 'max_length'"),
    ("wrong-parameter-type", {"input_data": {"input_string": _FLAT, "parameters": {"do_sample": "yes"}}}, 400,
     "do_sample must be true or false"),
]


@pytest.mark.parametrize("body, status, message", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests(server, body, status, message):
    got_status, got = server.score(body)
    assert got_status == status, got
    assert isinstance(got, dict) and set(got) == {"error"}, got
    assert message in got["error"]
    assert "Traceback" not in got["error"]


def _oversized() -> bytes:
    text = "x" * (3 * MAX_REQUEST_BYTES)
    return json.dumps({"input_data": {"input_string": [{"role": "user", "content": text}]}}).encode()


def test_oversized_body_is_refused_before_reading(server):
    status, body = server.score(_oversized())
    assert status == 413, body
    assert "FERROTUNE_MAX_REQUEST_BYTES" in body["error"] and str(MAX_REQUEST_BYTES) in body["error"]


def test_oversized_chunked_body(server):
    data = _oversized()
    status, body = server.score(iter([data[i : i + 4096] for i in range(0, len(data), 4096)]))
    assert status == 413, body
    assert f"at most {MAX_REQUEST_BYTES}" in body["error"]


def test_get_score_is_not_allowed(server):
    status, body = server.request("GET", "/score")
    assert status == 405 and "POST" in body["error"]


def test_prompt_longer_than_context(server):
    long = " ".join(["word"] * 4200)  # > 4096 tokens, < the size bound
    status, body = server.score({"input_data": {"input_string": [{"role": "user", "content": long}]}})
    assert status == 400, body
    assert "context is 4096 tokens" in body["error"]


# ---------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------


def test_twenty_concurrent_requests(server, generator):
    convs = [chat(100 + i, answered=i % 3 == 0) for i in range(20)]
    want = [generator.generate(c, **GREEDY)[0].text for c in convs]
    results: list = [None] * len(convs)

    def call(i: int) -> None:
        try:
            results[i] = server.score({"input_data": {"input_string": convs[i], "parameters": GREEDY}})
        except Exception as e:  # recorded, asserted below
            results[i] = ("exception", repr(e))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(r is not None for r in results), "a request did not finish"
    bad = [(i, r) for i, r in enumerate(results) if r[0] != 200]
    assert not bad, f"{bad}\n--- server log ---\n{server.log_tail()}"
    assert [r[1]["output"] for r in results] == want


# ---------------------------------------------------------------------------------------
# The deployment's entry script (ferrotune.azureml) forwarding to the packaged score.py
# ---------------------------------------------------------------------------------------


def test_azureml_entry_script_forwards_to_packaged_score(side_python, work, model_mount, generator):
    """``ferrotune.azureml.deploy`` uploads a one-file entry script that finds the packaged
    folder under AZUREML_MODEL_DIR and hands init()/run() to its score.py; the contract (status
    codes, the size bound) holds through it."""
    from ferrotune import azureml

    app = azureml.write_scoring_code(work / "entry-app")
    srv = InferenceServer(side_python, app, "score.py", model_mount, work / "server-entry.log", env=SERVER_ENV)
    try:
        srv.start()
        conv = chat(7, answered=True)
        status, body = srv.score({"input_data": {"input_string": [conv], "parameters": GREEDY}, "params": {}})
        assert status == 200, srv.log_tail()
        assert body == {"output": [generator.generate(conv, **GREEDY)[0].text]}
        status, body = srv.score({"input_data": {"input_string": "hello"}})
        assert status == 400 and "input_string must be a list" in body["error"]
        status, body = srv.score(_oversized())
        assert status == 413 and "FERROTUNE_MAX_REQUEST_BYTES" in body["error"]
    finally:
        srv.stop()


_STRING_FORWARDER = '''\
"""An entry script without @rawhttp: the server hands run() the body as a JSON string."""
import importlib.util
import os

_packaged = None


def init():
    global _packaged
    folder = os.path.join(os.environ["AZUREML_MODEL_DIR"], "trained_model")
    spec = importlib.util.spec_from_file_location("packaged_score", os.path.join(folder, "score.py"))
    _packaged = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_packaged)
    _packaged.init()


def run(raw_data):
    assert isinstance(raw_data, str)
    return _packaged.run(raw_data)
'''


def test_json_string_mode_keeps_status_codes(side_python, work, model_mount, generator):
    """Forwarded as a JSON string (the server's default mode), run() still answers with
    AMLResponse and the right status."""
    app = work / "string-app"
    app.mkdir()
    (app / "score.py").write_text(_STRING_FORWARDER)
    srv = InferenceServer(side_python, app, "score.py", model_mount, work / "server-string.log", env=SERVER_ENV)
    try:
        srv.start()
        conv = [{"role": "user", "content": "Say hi."}]
        status, body = srv.score({"input_data": {"input_string": conv, "parameters": GREEDY}})
        assert status == 200, srv.log_tail()
        assert body == {"output": generator.generate(conv, **GREEDY)[0].text}
        status, body = srv.score({"input_data": {"input_string": [[{"role": "user", "content": 1}]]}})
        assert status == 400 and "content must be a string" in body["error"]
        status, body = srv.score(_oversized())
        assert status == 413 and "FERROTUNE_MAX_REQUEST_BYTES" in body["error"]
    finally:
        srv.stop()
