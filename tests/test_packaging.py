"""``ferrotune.package_model`` / ``ferrotune package``, the scoring contract
(``ferrotune.scoring``), the packaged ``score.py`` in-process and the MLflow pyfunc flavor.

The packaged model comes from a real (tiny) fine-tuning run: ``make_tiny_phi3`` + two steps
of ``ferrotune.finetune`` on a small ultrachat-like JSONL. The folder is checked with
MLflow itself (``mlflow.models.Model.load``, ``mlflow.pyfunc.load_model``, MLflow's own
environment-file readers), and every reply against :class:`ferrotune.Generator` on the same
folder. The real inference server is in ``tests/test_inference_server.py``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import pytest

import ferrotune
from ferrotune import packaging
from ferrotune.exceptions import FerrotuneFileNotFoundError, InvalidArgumentError, ModelError
from ferrotune.scoring import Limits, Scorer

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pd = pytest.importorskip("pandas")
yaml = pytest.importorskip("yaml")

with warnings.catch_warnings():  # MLflow's import-time warnings are its own business
    warnings.simplefilter("ignore")
    import mlflow.models  # noqa: E402
    import mlflow.pyfunc  # noqa: E402
    from mlflow.utils.environment import _PythonEnv  # noqa: E402

from tests.support import tiny_phi3 as tp  # noqa: E402

GREEDY = {"do_sample": False, "max_new_tokens": 16}
SERVING = Path(ferrotune.__file__).parent / "_serving" / "score.py"


def ultrachat_rows(n: int) -> list:
    topics = ["tea", "bicycles", "volcanoes", "jazz", "sourdough", "comets"]
    rows = []
    for i in range(n):
        t = topics[i % len(topics)]
        rows.append(
            [
                {"content": f"Tell me something about {t} (question {i}).", "role": "user"},
                {"content": f"Here is a fact about {t}: it is interesting in way {i}.", "role": "assistant"},
                {"content": "Can you say more?", "role": "user"},
                {"content": f"Certainly. {t.capitalize()} have a long history.", "role": "assistant"},
            ]
        )
    return rows


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packaging")


@pytest.fixture(scope="module")
def base_dir(work) -> Path:
    torch.set_num_threads(1)
    return tp.make_tiny_phi3(work / "base", seed=1)


@pytest.fixture(scope="module")
def trained(work, base_dir) -> Path:
    """A real fine-tuning output folder: adapter/, merged/, train_summary.json."""
    train = work / "train.jsonl"
    with open(train, "w", encoding="utf-8") as f:
        for conv in ultrachat_rows(12):
            f.write(json.dumps({"prompt": conv[0]["content"], "prompt_id": "x", "messages": conv}) + "\n")
    out = work / "trained"
    ferrotune.finetune(
        str(base_dir), str(train), None, str(out),
        progress=False, report_to="none", max_steps=2, device="cpu", precision="32",
        lora_r=4, lora_alpha=8, learning_rate=1e-2, save_strategy="no", evaluation_strategy="no", logging_steps=1,
    )
    assert (out / "merged" / "config.json").is_file() and (out / "adapter").is_dir()
    return out


@pytest.fixture(scope="module")
def packaged(work, trained) -> Path:
    return ferrotune.packaging.package_model(trained, work / "pkg" / "trained_model", progress=False)


@pytest.fixture(scope="module")
def generator(packaged):
    return ferrotune.Generator.load(packaged, device="cpu", progress=False)


@pytest.fixture(scope="module")
def scorer(packaged):
    return Scorer.load(packaged, device="cpu", limits=Limits())


@pytest.fixture(scope="module")
def pyfunc(packaged):
    return mlflow.pyfunc.load_model(str(packaged))


def texts(gen, convs, **params) -> list:
    return [c.text for c in gen.generate(convs, **params)]


# ---------------------------------------------------------------------------------------
# Layout and file contents
# ---------------------------------------------------------------------------------------


def test_layout(packaged, trained):
    files = sorted(str(p.relative_to(packaged)) for p in packaged.rglob("*") if p.is_file())
    assert files == [
        "MLmodel",
        "conda.yaml",
        "data/model/config.json",
        "data/model/generation_config.json",
        "data/model/model.safetensors",
        "data/tokenizer/special_tokens_map.json",
        "data/tokenizer/tokenizer.json",
        "data/tokenizer/tokenizer_config.json",
        "ferrotune.json",
        "python_env.yaml",
        "requirements.txt",
        "score.py",
    ]
    merged = trained / "merged"
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        assert (packaged / "data" / "model" / name).read_bytes() == (merged / name).read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (packaged / "data" / "tokenizer" / name).read_bytes() == (merged / name).read_bytes()
    assert (packaged / "score.py").read_text() == SERVING.read_text()
    # nothing left beside it
    assert [p.name for p in packaged.parent.iterdir()] == ["trained_model"]


def test_mlmodel_reads_with_mlflow(packaged):
    m = mlflow.models.Model.load(str(packaged / "MLmodel"))
    flavor = m.flavors["python_function"]
    # what mlflow.pyfunc.add_to_model writes for the same loader, data and env files
    ref = mlflow.models.Model()
    mlflow.pyfunc.add_to_model(
        ref, loader_module="ferrotune.mlflow_pyfunc", data="data", conda_env="conda.yaml", python_env="python_env.yaml"
    )
    for key, value in ref.flavors["python_function"].items():
        assert flavor[key] == value, key
    assert m.mlflow_version == packaging.MLFLOW_FORMAT_VERSION
    assert len(m.model_uuid) == 32 and int(m.model_uuid, 16) >= 0
    assert m.utc_time_created[:2] == "20"
    assert m.metadata["ferrotune_version"] == ferrotune.__version__
    assert m.metadata["task"] == "chat-completion"
    assert m.model_size_bytes > (packaged / "data" / "model" / "model.safetensors").stat().st_size
    assert m.get_input_schema() is None
    assert [p.name for p in m.get_params_schema().params] == [
        "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "return_full_text",
    ]


def test_environment_files_pin_ferrotune(packaged):
    pin = f"ferrotune=={ferrotune.__version__}"
    assert (packaged / "requirements.txt").read_text() == pin + "\n"
    assert mlflow.pyfunc._get_pip_requirements_from_model_path(str(packaged)) == [pin]
    env = _PythonEnv.from_yaml(str(packaged / "python_env.yaml"))
    assert env.python == packaging._python_version()
    assert env.dependencies == ["-r requirements.txt"]
    conda = _PythonEnv.get_dependencies_from_conda_yaml(str(packaged / "conda.yaml"))
    assert conda["python"] == packaging._python_version() and conda["dependencies"] == [pin]
    with open(packaged / "conda.yaml", encoding="utf-8") as f:
        assert yaml.safe_load(f)["channels"] == ["conda-forge"]


def test_ferrotune_metadata(packaged, trained, base_dir):
    meta = json.loads((packaged / "ferrotune.json").read_text())
    assert meta["ferrotune_version"] == ferrotune.__version__
    assert meta["source"] == {"kind": "finetune-output", "path": str(trained.resolve())}
    assert meta["base_model"] == str(base_dir)
    assert meta["train_summary"]["global_step"] == 2
    assert meta["model"]["max_context"] == 4096 and meta["model"]["model_type"] == "phi3"
    assert meta["generation_defaults"]["max_new_tokens"] == 256 and meta["generation_defaults"]["do_sample"] is False
    assert meta["serving_limits"]["max_new_tokens"] == 1024
    assert meta["requirement"] == f"ferrotune=={ferrotune.__version__}"


def test_yaml_writer_round_trips():
    obj = {
        "a": "plain", "b": "3.11", "c": "yes", "d": "-r x", "e": "üñí: {x}", "f": None, "g": True, "h": 1.5,
        "i": [], "j": {}, "k": [{"pip": ["x==1", "y"]}, "z"], "l": {"m": {"n": [1, 2]}}, "o": 'quote " and \\ \n nl',
    }
    assert yaml.safe_load(packaging.to_yaml(obj)) == obj


# ---------------------------------------------------------------------------------------
# MLflow pyfunc and the Generator agree
# ---------------------------------------------------------------------------------------


def test_pyfunc_predict_matches_generator(pyfunc, generator):
    convs = ultrachat_rows(3)
    convs[1] = convs[1][:3]  # ends with the user
    want = texts(generator, convs, **GREEDY)
    assert all(want)
    # a list of conversations, params through MLflow's params schema
    assert pyfunc.predict(convs, params=GREEDY) == want
    # one conversation → a list of one
    assert pyfunc.predict(convs[1], params=GREEDY) == want[1:2]
    # the scoring request's inner object, and the whole request
    assert pyfunc.predict({"input_string": convs, "parameters": GREEDY}) == want
    assert pyfunc.predict({"input_data": {"input_string": convs[0], "parameters": GREEDY}, "params": {}}) == want[:1]
    # a DataFrame, one conversation per row (numpy object cells, as pandas reads JSONL)
    df = pd.read_json(io.StringIO("\n".join(json.dumps({"messages": c}) for c in convs)), lines=True)
    assert pyfunc.predict(df, params=GREEDY) == want
    assert pyfunc.predict(pd.DataFrame({"input_string": convs}), params=GREEDY) == want


def test_pyfunc_params_override_input_and_sampling_is_seeded(pyfunc, generator):
    conv = ultrachat_rows(1)[0][:3]
    sample = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 12, "seed": 5}
    want = texts(generator, [conv], **sample)
    assert pyfunc.predict([conv], params=sample) == want
    # params= wins over the input's parameters
    assert pyfunc.predict({"input_string": [conv], "parameters": {"max_new_tokens": 2}}, params=sample) == want
    # no params: the model's defaults (greedy, 256 new tokens)
    assert pyfunc.predict([conv]) == texts(generator, [conv], max_new_tokens=256)


def test_pyfunc_bad_input(pyfunc):
    with pytest.raises(InvalidArgumentError, match=r"role is 'robot'"):
        pyfunc.predict([{"role": "robot", "content": "x"}])
    with pytest.raises(InvalidArgumentError, match="needs an 'input_string' or 'messages' column"):
        pyfunc.predict(pd.DataFrame({"text": ["hello"]}))
    with pytest.raises(InvalidArgumentError, match="must be a list"):
        pyfunc.predict("hello")


def test_generator_loads_packaged_folder_like_merged(packaged, trained, generator):
    conv = ultrachat_rows(1)[0][:1]
    merged = ferrotune.Generator.load(trained / "merged", device="cpu", progress=False)
    assert texts(generator, [conv], **GREEDY) == texts(merged, [conv], **GREEDY)


# ---------------------------------------------------------------------------------------
# The scoring contract
# ---------------------------------------------------------------------------------------


def req(input_string, parameters=None, **extra) -> dict:
    inner = {"input_string": input_string}
    if parameters is not None:
        inner["parameters"] = parameters
    return {"input_data": inner, **extra}


def test_scorer_notebook_shape(scorer, generator):
    conv = ultrachat_rows(1)[0]  # a whole test_gen row: ends with the assistant's turn
    status, body = scorer.score(json.dumps(req([conv], GREEDY, params={})))
    assert status == 200
    assert body == {"output": texts(generator, [conv], **GREEDY)}


def test_scorer_flat_shape_and_body_types(scorer, generator):
    conv = [{"role": "user", "content": "Name a prime number."}]
    want = {"output": texts(generator, [conv], **GREEDY)[0]}
    request = req(conv, {**GREEDY, "return_full_text": False})
    assert scorer.score(json.dumps(request)) == (200, want)
    assert scorer.score(json.dumps(request).encode()) == (200, want)
    assert scorer.score(request) == (200, want)


def test_scorer_several_conversations(scorer, generator):
    convs = [c[:3] for c in ultrachat_rows(4)]
    status, body = scorer.score(req(convs, GREEDY))
    assert status == 200 and body == {"output": texts(generator, convs, **GREEDY)}


def test_scorer_parameters(scorer, generator):
    conv = [{"role": "user", "content": "Write a haiku."}]
    sample = {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 10, "seed": 11}
    assert scorer.score(req([conv], sample))[1] == {"output": texts(generator, [conv], **sample)}
    # top-level params fill in; input_data.parameters wins on a clash
    assert scorer.score(req([conv], {"max_new_tokens": 10, "seed": 11}, params={"do_sample": True, "temperature": 0.6,
                                                                                "top_p": 0.9, "seed": 99}))[1] == {
        "output": texts(generator, [conv], **sample)
    }
    # null = default; defaults are greedy with 256 new tokens (capped by the limit)
    nulls = {k: None for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")}
    assert scorer.score(req([conv], nulls))[1] == {"output": texts(generator, [conv], max_new_tokens=256)}
    # integral floats are integers
    assert scorer.score(req([conv], {"max_new_tokens": 4.0}))[1] == {"output": texts(generator, [conv], max_new_tokens=4)}
    assert scorer.score(req([conv], {"top_k": 0, "repetition_penalty": 1.3, "max_new_tokens": 6}))[0] == 200


_MSG = [{"role": "user", "content": "hi"}]
BAD = [
    ("bad-json", "{'input_data': 1}", 400, "not valid JSON"),
    ("empty", "   ", 400, "body is empty"),
    ("not-utf8", b'{"input_data": "\xff"}', 400, "not UTF-8"),
    ("deep", "[" * 100000 + "]" * 100000, 400, "nested too deeply"),
    ("list-body", "[]", 400, "must be a JSON object"),
    ("no-input-data", {"input_string": _MSG}, 400, "put input_string inside input_data"),
    ("missing-input-data", {}, 400, "no 'input_data'"),
    ("input-data-not-object", {"input_data": [_MSG]}, 400, "input_data must be an object"),
    ("missing-input-string", {"input_data": {"parameters": {}}}, 400, "no 'input_string'"),
    ("extra-inner-key", {"input_data": {"input_string": _MSG, "params": {}}}, 400, "unknown key 'params'"),
    ("input-string-str", req("hello"), 400, "input_string must be a list"),
    ("input-string-dict", req({"role": "user", "content": "x"}), 400, "input_string must be a list"),
    ("input-string-empty", req([]), 400, "input_string is empty"),
    ("list-of-strings", req(["hello"]), 400, "input_string[0] must be a message object or a conversation"),
    ("mixed", req([_MSG, _MSG[0]]), 400, "input_string[1] is a message"),
    ("empty-conversation", req([[]]), 400, "input_string[0] is an empty conversation"),
    ("message-not-object", req([["hi"]]), 400, "input_string[0][0] must be a message object"),
    ("bad-role", req([{"role": "bot", "content": "x"}]), 400, "input_data.input_string[0].role is 'bot'"),
    ("role-not-string", req([[{"role": 1, "content": "x"}]]), 400, "role is a number"),
    ("no-role", req([{"content": "x"}]), 400, "has no 'role'"),
    ("no-content", req([{"role": "user"}]), 400, "has no 'content'"),
    ("content-list", req([{"role": "user", "content": ["x"]}]), 400, "content must be a string, not a list"),
    ("extra-message-key", req([{"role": "user", "content": "x", "name": "n"}]), 400, "unexpected key 'name'"),
    ("parameters-not-object", req(_MSG, [1]), 400, "parameters must be an object"),
    ("unknown-parameter", req(_MSG, {"max_length": 3}), 400,
     "unknown parameter 'max_length'; valid ones are max_new_tokens, do_sample, temperature, top_p, top_k, "
     "repetition_penalty, seed"),
    ("return-full-text-true", req(_MSG, {"return_full_text": True}), 400, "return_full_text=true is not supported"),
    ("max-new-tokens-str", req(_MSG, {"max_new_tokens": "200"}), 400, "max_new_tokens must be an integer, not a string"),
    ("max-new-tokens-frac", req(_MSG, {"max_new_tokens": 2.5}), 400, "max_new_tokens must be an integer, not 2.5"),
    ("max-new-tokens-zero", req(_MSG, {"max_new_tokens": 0}), 400, "max_new_tokens must be at least 1"),
    ("max-new-tokens-huge", req(_MSG, {"max_new_tokens": 100000}), 400,
     "max_new_tokens=100000 is above this endpoint's limit of 1024 (FERROTUNE_MAX_NEW_TOKENS)"),
    ("max-new-tokens-bool", req(_MSG, {"max_new_tokens": True}), 400, "must be an integer, not a boolean"),
    ("do-sample-str", req(_MSG, {"do_sample": "true"}), 400, "do_sample must be true or false"),
    ("temperature-str", req(_MSG, {"temperature": "0.6"}), 400, "temperature must be a number"),
    ("temperature-neg", req(_MSG, {"temperature": -1}), 400, "temperature must be >= 0"),
    ("temperature-zero-sampling", req(_MSG, {"temperature": 0, "do_sample": True}), 400, "must be > 0 when do_sample"),
    ("top-p-zero", req(_MSG, {"top_p": 0}), 400, "top_p must be in (0, 1]"),
    ("top-p-big", req(_MSG, {"top_p": 1.5}), 400, "top_p must be in (0, 1]"),
    ("top-k-neg", req(_MSG, {"top_k": -1}), 400, "top_k must be >= 0"),
    ("rep-penalty-zero", req(_MSG, {"repetition_penalty": 0}), 400, "repetition_penalty must be > 0"),
    ("seed-neg", req(_MSG, {"seed": -3}), 400, "seed must be between 0 and 2**64-1"),
    ("seed-float", req(_MSG, {"seed": 1.5}), 400, "seed must be an integer"),
    ("params-not-object", req(_MSG, params=[1]), 400, "params must be an object"),
    ("params-bad-value", req(_MSG, params={"top_p": 7}), 400, "params.top_p must be in (0, 1]"),
    ("too-many-conversations", req([_MSG] * 17), 400,
     "has 17 conversations; this endpoint takes at most 16 per request (FERROTUNE_MAX_CONVERSATIONS)"),
    ("context", req([{"role": "user", "content": "word " * 4200}]), 400,
     "input_data.input_string: the prompt is"),
    ("oversized", json.dumps(req([{"role": "user", "content": "x" * (1 << 20)}])), 413,
     "this endpoint takes at most 1048576 (FERROTUNE_MAX_REQUEST_BYTES)"),
]


@pytest.mark.parametrize("body, status, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_scorer_refuses(scorer, body, status, message):
    got_status, got = scorer.score(body)
    assert (got_status, set(got)) == (status, {"error"}), got
    assert message in got["error"]


def test_scorer_context_message_names_conversation(scorer):
    long = [{"role": "user", "content": "word " * 4200}]
    status, body = scorer.score(req([_MSG, long]))
    assert status == 400 and body["error"].startswith("input_data.input_string[1]: the prompt is")
    assert "context is 4096 tokens" in body["error"]


def test_limits_from_env(monkeypatch, packaged):
    monkeypatch.setenv("FERROTUNE_MAX_NEW_TOKENS", "8")
    monkeypatch.setenv("FERROTUNE_MAX_CONVERSATIONS", "2")
    monkeypatch.setenv("FERROTUNE_MAX_REQUEST_BYTES", "300")
    assert Limits.from_env() == Limits(max_new_tokens=8, max_conversations=2, max_request_bytes=300)
    s = Scorer.load(packaged, device="cpu")
    assert s.limits.max_new_tokens == 8
    assert s.score(req(_MSG, {"max_new_tokens": 9}))[1]["error"].endswith("limit of 8 (FERROTUNE_MAX_NEW_TOKENS)")
    assert "at most 2 per request" in s.score(req([_MSG] * 3))[1]["error"]
    assert s.score("x" * 301)[0] == 413
    # the default (256) is capped at the limit: 8 new tokens
    status, body = s.score(req(_MSG))
    assert status == 200 and body["output"] == texts(s.generator, [_MSG], max_new_tokens=8)[0]
    monkeypatch.setenv("FERROTUNE_MAX_CONVERSATIONS", "lots")
    with pytest.raises(InvalidArgumentError, match="FERROTUNE_MAX_CONVERSATIONS='lots' is not an integer"):
        Limits.from_env()
    monkeypatch.setenv("FERROTUNE_MAX_CONVERSATIONS", "0")
    with pytest.raises(InvalidArgumentError, match="must be at least 1"):
        Limits.from_env()


def test_generation_defaults_follow_generation_config(tmp_path, caplog):
    from ferrotune.scoring import DEFAULT_PARAMETERS, generation_defaults

    (tmp_path / "config.json").write_text("{}")
    assert generation_defaults(tmp_path) == DEFAULT_PARAMETERS
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"max_new_tokens": 64, "do_sample": True, "temperature": 0.7, "top_k": "many", "eos_token_id": 2})
    )
    with caplog.at_level(logging.WARNING, logger="ferrotune.scoring"):
        got = generation_defaults(tmp_path)
    assert got == {**DEFAULT_PARAMETERS, "max_new_tokens": 64, "do_sample": True, "temperature": 0.7}
    assert "top_k='many'" in caplog.text
    with pytest.raises(InvalidArgumentError, match="Limits.max_conversations must be a positive integer"):
        Limits(max_conversations=0)


class _Broken:
    max_context = 4096

    def prompt_ids(self, conv):
        return [1, 2, 3]

    def generate(self, convs, **kw):
        raise RuntimeError("CUDA error: an illegal memory access /secret/path")


def test_scorer_internal_error_is_500_without_traceback(caplog):
    s = Scorer(_Broken())
    with caplog.at_level(logging.ERROR, logger="ferrotune.scoring"):
        status, body = s.score(req(_MSG))
    assert status == 500
    assert body == {"error": "internal error while generating (RuntimeError); see the server log"}
    assert "Traceback" in caplog.text and "illegal memory access" in caplog.text


def test_scorer_is_thread_safe(scorer, generator):
    convs = [[{"role": "user", "content": f"Count to {i}."}] for i in range(8)]
    want = [texts(generator, [c], **GREEDY)[0] for c in convs]
    got: list = [None] * len(convs)

    def one(i):
        got[i] = scorer.score(req(convs[i], GREEDY))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == [(200, {"output": w}) for w in want]


# ---------------------------------------------------------------------------------------
# score.py in-process (what Azure ML runs, without the server)
# ---------------------------------------------------------------------------------------


def load_score_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"ferrotune_score_{id(path)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_script_in_process(packaged, generator, monkeypatch):
    # Azure mounts the registered folder one level below AZUREML_MODEL_DIR
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(packaged.parent))
    monkeypatch.setenv("FERROTUNE_DEVICE", "cpu")
    score = load_score_module(packaged / "score.py")
    assert score.run("{}") == {"error": "the model is not loaded (init() has not run or failed; see the log)"}
    score.init()
    conv = ultrachat_rows(1)[0]
    want = texts(generator, [conv], **GREEDY)
    assert score.run(json.dumps(req([conv], GREEDY, params={}))) == {"output": want}
    assert score.run(json.dumps(req(conv, GREEDY))) == {"output": want[0]}
    assert score.score(json.dumps(req("x")))[0] == 400
    assert score.run(json.dumps(req("x"))) == {"error": "input_data.input_string must be a list: one conversation "
                                                         '[{"role": "user", "content": "..."}, ...] or a list of '
                                                         "conversations [[...], ...]; got a string"}
    assert score.score(12) == (400, {"error": "unsupported input of type int; send the JSON request body"})


def test_score_script_finds_model(packaged, tmp_path, monkeypatch):
    score = load_score_module(SERVING)
    assert score.find_model_dir(packaged) == str(packaged)
    assert score.find_model_dir(packaged.parent) == str(packaged)
    deep = tmp_path / "azureml-models" / "name"
    deep.mkdir(parents=True)
    (deep / "notes").mkdir()
    os.symlink(packaged, deep / "trained_model")
    assert score.find_model_dir(tmp_path / "azureml-models") == str(deep / "trained_model")
    with pytest.raises(FileNotFoundError, match="no packaged model"):
        score.find_model_dir(deep / "notes")
    # without AZUREML_MODEL_DIR: the folder score.py is in
    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    monkeypatch.setenv("FERROTUNE_DEVICE", "cpu")
    packaged_score = load_score_module(packaged / "score.py")
    packaged_score.init()
    assert packaged_score._scorer.generator.model_dir


# ---------------------------------------------------------------------------------------
# Sources, atomicity, overwrite, errors
# ---------------------------------------------------------------------------------------


def test_other_sources(work, trained, packaged, generator):
    conv = [{"role": "user", "content": "Hello there"}]
    want = texts(generator, [conv], **GREEDY)
    # the merged folder itself (the run's summary is found beside it)
    a = packaging.package_model(trained / "merged", work / "from-merged", progress=False)
    meta = json.loads((a / "ferrotune.json").read_text())
    assert meta["source"]["kind"] == "model-folder" and meta["train_summary"]["global_step"] == 2
    # an MLflow folder, repackaged with another requirement
    wheel = "https://example.invalid/ferrotune-9.9.9-cp310-abi3-manylinux_2_28_x86_64.whl"
    b = packaging.package_model(packaged, work / "from-mlflow", ferrotune_requirement=wheel, progress=False)
    assert (b / "requirements.txt").read_text() == wheel + "\n"
    assert wheel in (b / "conda.yaml").read_text()
    meta = json.loads((b / "ferrotune.json").read_text())
    assert meta["source"]["kind"] == "mlflow-folder" and meta["train_summary"]["global_step"] == 2
    for folder in (a, b):
        assert texts(ferrotune.Generator.load(folder, device="cpu", progress=False), [conv], **GREEDY) == want


def test_sharded_model(work):
    src = tp.make_tiny_phi3(work / "sharded", seed=2, shards=2)
    out = packaging.package_model(src, work / "sharded-pkg", progress=False)
    names = sorted(p.name for p in (out / "data" / "model").iterdir())
    assert "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) >= 2
    conv = [{"role": "user", "content": "hi"}]
    assert texts(ferrotune.Generator.load(out, device="cpu", progress=False), [conv], **GREEDY) == texts(
        ferrotune.Generator.load(src, device="cpu", progress=False), [conv], **GREEDY
    )
    # a shard missing from the index
    broken = work / "sharded-broken"
    shutil.copytree(src, broken)
    next(broken.glob("model-0000*-of-*.safetensors")).unlink()
    with pytest.raises(ModelError, match="missing safetensors shards"):
        packaging.package_model(broken, work / "never", progress=False)
    assert not (work / "never").exists()


def _no_leftovers(parent: Path, name: str) -> None:
    left = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    assert not left, left


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_mid_package_leaves_nothing(work, trained, exc):
    out = work / "atomic" / f"model-{type(exc).__name__}"
    seen = []

    def progress(kind, task_id, name, total, n, unit=""):
        seen.append(kind)
        if kind == "advance":
            raise exc

    with pytest.raises(type(exc)):
        packaging.package_model(trained, out, progress=progress)
    assert "advance" in seen
    assert not out.exists()
    _no_leftovers(out.parent, out.name)


def test_overwrite_rules(work, trained, packaged):
    out = work / "ow" / "model"
    first = packaging.package_model(trained, out, progress=False)
    uuid1 = mlflow.models.Model.load(str(first / "MLmodel")).model_uuid
    with pytest.raises(InvalidArgumentError, match="already exists; pass overwrite=True"):
        packaging.package_model(trained, out, progress=False)
    assert mlflow.models.Model.load(str(out / "MLmodel")).model_uuid == uuid1  # untouched
    again = packaging.package_model(trained, out, overwrite=True, progress=False)
    assert again == first and mlflow.models.Model.load(str(out / "MLmodel")).model_uuid != uuid1
    _no_leftovers(out.parent, out.name)
    # a folder that is not an MLflow model is never replaced
    other = work / "ow" / "my-notes"
    other.mkdir()
    (other / "keep.txt").write_text("important")
    with pytest.raises(InvalidArgumentError, match="not an MLflow model folder"):
        packaging.package_model(trained, other, overwrite=True, progress=False)
    assert (other / "keep.txt").read_text() == "important"
    # an empty folder is fine
    empty = work / "ow" / "empty"
    empty.mkdir()
    packaging.package_model(trained, empty, overwrite=True, progress=False)
    assert (empty / "MLmodel").is_file()
    # a folder holding the source is refused
    with pytest.raises(InvalidArgumentError, match="contains the model being packaged"):
        packaging.package_model(trained, trained, overwrite=True, progress=False)
    # repackaging an MLflow folder in place
    inplace = packaging.package_model(out, out, overwrite=True, progress=False)
    assert texts(ferrotune.Generator.load(inplace, device="cpu", progress=False), [_MSG], **GREEDY)


def test_adapter_only_is_a_clear_error(work, trained, base_dir):
    only = work / "adapter-only"
    shutil.copytree(trained / "adapter", only / "adapter")
    shutil.copyfile(trained / "train_summary.json", only / "train_summary.json")
    for src in (only, only / "adapter"):
        with pytest.raises(ModelError) as e:
            packaging.package_model(src, work / "adapter-pkg", progress=False)
        msg = str(e.value)
        assert "only a LoRA adapter" in msg and "merge_lora_weights=true" in msg and "merged" in msg
        assert str(base_dir) in msg
    assert not (work / "adapter-pkg").exists()


def test_unusable_sources(work, trained):
    with pytest.raises(FerrotuneFileNotFoundError, match="does not exist"):
        packaging.package_model(work / "nope", work / "x", progress=False)
    no_weights = work / "bin-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(trained / "merged" / name, no_weights / name)
    (no_weights / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights.*pytorch_model\.bin"):
        packaging.package_model(no_weights, work / "x", progress=False)
    corrupt = work / "corrupt"
    shutil.copytree(trained / "merged", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="is not a safetensors file"):
        packaging.package_model(corrupt, work / "x", progress=False)
    no_tok = work / "no-tokenizer"
    shutil.copytree(trained / "merged", no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="no tokenizer"):
        packaging.package_model(no_tok, work / "x", progress=False)
    stray = work / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match=r"is not a fine-tuning output folder .* it holds: notes\.txt"):
        packaging.package_model(stray, work / "x", progress=False)
    with pytest.raises(InvalidArgumentError, match="ferrotune_requirement"):
        packaging.package_model(trained, work / "x", ferrotune_requirement="a\nb", progress=False)
    assert not (work / "x").exists()


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------


def test_cli(work, trained, capsys):
    from ferrotune import package_cli

    out = work / "cli" / "model"
    assert package_cli.main([str(trained), str(out), "--progress", "none"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "MLmodel").is_file()
    assert package_cli.main([str(trained), str(out), "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and "Traceback" not in err
    req = "ferrotune @ file:///wheels/ferrotune-0.1.0-cp310-abi3-linux_x86_64.whl"
    assert package_cli.main([str(trained), str(out), "--overwrite", "--ferrotune-requirement", req, "--progress", "none"]) == 0
    assert (out / "requirements.txt").read_text() == req + "\n"
