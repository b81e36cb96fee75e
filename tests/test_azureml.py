"""``ferrotune.azureml`` against the real Azure ML SDK, offline.

- Entities (command job, model, endpoint, deployment, environments, code configuration)
  are built by ferrotune, dumped to YAML and loaded back through the SDK's own ``load_*``
  functions (schema validation), then checked field by field; the job's command line is
  parsed by ferrotune's own ``ferrotune finetune`` parser.
- The functions that take an ``ml_client`` run on a real ``azure.ai.ml.MLClient`` (fake
  token credential, custom cloud) whose resource manager is a loopback HTTPS stand-in
  (``tests/support/azure_arm.py``); the tests assert on the REST requests the SDK sent.
- The deployment's entry script runs under the real Azure ML inference server (loopback
  gunicorn, ``tests/support/inference_server.py``) with a packaged model mounted one level
  below ``AZUREML_MODEL_DIR``, as Azure ML mounts a registered model.
- Early errors (no workspace config, compute without GPUs / failed / missing, an
  instance type too small for a model folder, an unknown fine-tuning parameter) are typed
  ferrotune errors, raised before any request.

azure-ai-ml lives in a side virtualenv (``tests/support/venvs.py``); those tests run in
a subprocess whose sockets refuse anything but loopback and whose proxy variables point
at a closed port, so an accidental call to Azure fails loudly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ferrotune
from ferrotune import InvalidArgumentError
from ferrotune import azureml as az
from tests.support import azure_fixtures
from tests.support.venvs import ROOT, ensure_venv

SIDE_REQUIREMENTS = ["azure-ai-ml==1.35.2", "azure-identity"]
SIDE_RUNNER = ROOT / "tests" / "support" / "azure_side.py"

# The notebook's finetune_parameters (seed document), plus a Phi-3 model tag.
NOTEBOOK_PARAMETERS = dict(
    num_train_epochs=3,
    per_device_train_batch_size=1,
    per_device_eval_batch_size=1,
    learning_rate=5e-6,
    lr_scheduler_type="cosine",
    apply_lora="true",
    apply_deepspeed="true",
    deepspeed_stage=2,
)
MODEL_SPECIFIC_DEFAULTS = {"precision": "16", "save_total_limit": "1", "learning_rate_min": "1e-6"}

# No network for the side process: proxies at a closed port (the socket guard is the
# other fence), no Azure settings inherited from the machine running the tests.
_NO_NETWORK_ENV = {
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "ALL_PROXY": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "AZUREML_LOG_LEVEL": "WARNING",
    "PYTHONDONTWRITEBYTECODE": "1",
}


@pytest.fixture(scope="module")
def side_python() -> Path:
    return ensure_venv("azure-ai-ml", SIDE_REQUIREMENTS, with_ferrotune=True)


def run_side(python: Path, code: str, cwd: Path, *, expect_blocked: bool = False, **args) -> object:
    """Runs ``code`` in the side venv (``ARGS`` holds ``args``); returns its ``result``
    (with ``expect_blocked``: ``{"result": ..., "blocked": [...]}``)."""
    prelude = f"import json\nARGS = json.loads({json.dumps(json.dumps(args, default=str))})\n"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("AZURE", "AZUREML", "MSI_", "IDENTITY_"))}
    env.update(_NO_NETWORK_ENV)
    r = subprocess.run(
        [str(python), str(SIDE_RUNNER)],
        input=prelude + textwrap.dedent(code),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("@@RESULT@@ ")]
    assert r.returncode == 0 and lines, f"side process failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    out = json.loads(lines[-1][len("@@RESULT@@ "):])
    if expect_blocked:
        return out
    assert out["blocked"] == [], f"network access attempted: {out['blocked']}"
    return out["result"]


def test_network_guard_is_armed(side_python, tmp_path):
    code = """
    import socket, urllib.request
    result = []
    try:
        socket.socket().connect(("203.0.113.7", 443))
    except NetworkBlocked:
        result.append("connect")
    try:
        socket.create_connection(("203.0.113.8", 443), timeout=2)
    except NetworkBlocked:
        result.append("create_connection")
    try:
        socket.getaddrinfo("management.azure.com", 443)
    except NetworkBlocked:
        result.append("dns")
    try:  # through the proxy variables: a closed loopback port
        urllib.request.urlopen("http://management.azure.com/", timeout=5)
    except OSError as e:
        result.append("proxy:" + type(getattr(e, "reason", e)).__name__)
    """
    out = run_side(side_python, code, tmp_path, expect_blocked=True)
    assert out["result"] == ["connect", "create_connection", "dns", "proxy:ConnectionRefusedError"]
    assert out["blocked"] == [
        "connect ('203.0.113.7', 443)", "getaddrinfo 203.0.113.8", "getaddrinfo management.azure.com"
    ]


# ---------------------------------------------------------------------------------------
# Without the SDK (main environment)
# ---------------------------------------------------------------------------------------


def test_module_imports_without_the_sdk():
    r = subprocess.run(
        [sys.executable, "-c",
         "import sys, ferrotune.azureml; print(sorted(m for m in sys.modules if m.split('.')[0] == 'azure'))"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_missing_sdk_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(az, "_SDK", None)
    monkeypatch.setitem(sys.modules, "azure.ai.ml", None)  # as if not installed
    (tmp_path / "train.jsonl").write_text("{}\n")
    with pytest.raises(az.AzureExtraMissingError) as e:
        az.finetune_job(model="microsoft/Phi-3-mini-4k-instruct", train_file=tmp_path / "train.jsonl", compute="gpu")
    assert 'pip install "ferrotune[azure]"' in str(e.value)
    assert isinstance(e.value, ImportError) and isinstance(e.value, ferrotune.FerrotuneError)
    # pure helpers keep working
    assert az.sample_request([{"role": "user", "content": "hi"}])["input_data"]["input_string"] == [
        [{"content": "hi", "role": "user"}]
    ]


def test_client_without_config_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(az.WorkspaceConfigError) as e:
        az.client()
    msg = str(e.value)
    assert "config.json" in msg and str(tmp_path) in msg and "parent folders" in msg
    assert "Download config.json" in msg and "subscription_id" in msg

    with pytest.raises(az.WorkspaceConfigError, match="does not exist"):
        az.client(tmp_path / "nope" / "config.json")
    with pytest.raises(az.WorkspaceConfigError, match=r"subscription_id, resource_group given but not workspace"):
        az.client(subscription_id="s", resource_group="rg")

    bad = tmp_path / "config.json"
    bad.write_text('{"subscription_id": "s", "resource_group": "rg"}')
    with pytest.raises(az.WorkspaceConfigError, match=r"lacks workspace_name"):
        az.client()
    bad.write_text("{not json")
    with pytest.raises(az.WorkspaceConfigError, match=r"not valid JSON"):
        az.client(bad)


def test_flag_values_are_what_the_cli_parses():
    np = pytest.importorskip("numpy")
    assert az._flag_value(np.float64(5e-6)) == "5e-06"  # not "np.float64(5e-06)"
    assert az._flag_value(np.int64(3)) == "3"
    assert az._flag_value(np.bool_(True)) == "true" and az._flag_value(False) == "false"
    assert az._flag_value(["qkv_proj", "o_proj"]) == "qkv_proj,o_proj"


def test_sample_request_shapes():
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    expected_conv = [{"content": "Hi", "role": "user"}, {"content": "Hello!", "role": "assistant"}]
    one = az.sample_request(conv)
    assert one == {
        "input_data": {
            "input_string": [expected_conv],
            "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200},
        },
        "params": {},
    }
    # a dataset row (test_gen.jsonl) and a list of conversations
    row = {"prompt": "Hi", "prompt_id": "x", "messages": conv}
    assert az.sample_request(row) == one
    two = az.sample_request([conv, conv[:1]], parameters={"max_new_tokens": 5})
    assert two["input_data"] == {"input_string": [expected_conv, expected_conv[:1]], "parameters": {"max_new_tokens": 5}}
    json.dumps(two)  # what the notebook writes to sample_score.json
    for bad in ([], "hello", [{"role": "user"}], [[{"role": "user", "content": 3}]]):
        with pytest.raises(InvalidArgumentError):
            az.sample_request(bad)


# ---------------------------------------------------------------------------------------
# Sizing (pure: safetensors headers only)
# ---------------------------------------------------------------------------------------


def test_serving_memory_reads_only_headers(tmp_path):
    folder = azure_fixtures.packaged_model(tmp_path / "phi3", dtype="BF16")
    files = sorted((folder / "data" / "model").glob("*.safetensors"))
    assert len(files) == 2
    assert sum(f.stat().st_size for f in files) > 7.6e9  # the apparent size of Phi-3-mini in bf16
    assert sum(azure_fixtures.disk_usage(f) for f in files) < 10e6  # sparse: nothing written
    mem = az.serving_memory(folder)
    assert mem.parameters == azure_fixtures.PHI3_MINI_PARAMS
    assert mem.other_bytes == 4096 * 8
    assert mem.gpu_bytes == 2 * azure_fixtures.PHI3_MINI_PARAMS + 4096 * 8
    assert mem.cpu_bytes == 4 * azure_fixtures.PHI3_MINI_PARAMS + 4096 * 8
    # stored in f32, served the same way: the dtype on disk does not change the estimate
    f32 = az.serving_memory(azure_fixtures.packaged_model(tmp_path / "phi3-f32", dtype="F32"))
    assert f32.parameters == mem.parameters
    assert az.serving_memory(tmp_path) is None  # no weights: nothing to estimate


def test_instance_type_check(tmp_path):
    folder = azure_fixtures.packaged_model(tmp_path / "phi3")
    # 7.6 GB in bf16 fits a 16 GB V100 and an 80 GB A100
    assert az.check_instance_type("Standard_NC6s_v3", folder) is not None
    assert az.check_instance_type("standard_nc24ads_a100_v4", folder) is not None
    # CPU serving keeps f32 (15.3 GB + headroom): not on a 14 GiB Standard_DS3_v2
    with pytest.raises(az.ComputeTargetError) as e:
        az.check_instance_type("Standard_DS3_v2", folder)
    msg = str(e.value)
    assert "does not fit on Standard_DS3_v2" in msg and "float32" in msg and "14 GiB" in msg
    assert "Standard_DS4_v2" in msg and "Standard_NC4as_T4_v3" in msg  # what would fit, CPU and GPU
    assert isinstance(e.value, ValueError)
    # a 30 B model does not fit one V100; an A100 80 GB is named
    big = azure_fixtures.packaged_model(tmp_path / "big", parameters=30_000_000_000)
    with pytest.raises(az.ComputeTargetError, match=r"Standard_NC24ads_A100_v4 \(1 x A100 80 GB\)"):
        az.check_instance_type("Standard_NC6s_v3", big)
    # an unknown instance type: no check, one warning
    with pytest.warns(UserWarning, match="does not know instance type 'Standard_XY1'"):
        assert az.check_instance_type("Standard_XY1", big) is None
    assert az.check_instance_type("Standard_DS3_v2", None) is None
    # a malformed weights file is a ModelError, not a crash
    broken = tmp_path / "broken" / "model.safetensors"
    broken.parent.mkdir()
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ferrotune.ModelError, match="not a safetensors file"):
        az.serving_memory(broken.parent)


def test_instance_type_table():
    assert az.INSTANCE_TYPES["standard_nc6s_v3"].gpus == 1 and az.INSTANCE_TYPES["standard_nc6s_v3"].gpu_gib == 16
    assert az.INSTANCE_TYPES["standard_nd96asr_v4"].gpus == 8 and az.INSTANCE_TYPES["standard_nd96asr_v4"].gpu_gib == 40
    assert az.INSTANCE_TYPES["standard_ds3_v2"].gpus == 0 and az.INSTANCE_TYPES["standard_ds3_v2"].ram_gib == 14
    for key, t in az.INSTANCE_TYPES.items():
        assert key == t.name.lower() and t.vcpus > 0 and t.ram_gib > 0 and (t.gpus == 0) == (t.gpu_gib == 0)


# ---------------------------------------------------------------------------------------
# Entities: built by ferrotune, dumped, loaded back by the SDK
# ---------------------------------------------------------------------------------------

ENTITIES = r"""
import json
import shlex
from pathlib import Path
import yaml
import ferrotune
import ferrotune.azureml as az
from ferrotune.finetune_cli import config_from_args
from azure.ai.ml import load_job, load_model, load_online_endpoint, load_online_deployment, load_environment
from tests.support.azure_fixtures import dump_and_load, packaged_model

tmp = Path(ARGS["tmp"])
train = tmp / "train_sft.jsonl"; train.write_text("{}\n")
test = tmp / "test_sft.jsonl"; test.write_text("{}\n")
params = dict(ARGS["params"])
result = {"version": ferrotune.__version__}

# -- the fine-tuning job: registry model, local files, 2 GPUs ---------------------------
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    job = az.finetune_job(
        model="azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/7",
        train_file=train, validation_file=test, compute="gpu-cluster",
        finetune_parameters=params, gpus_per_node=2,
    )
result["gpu_warnings"] = [str(w.message) for w in caught]
text, loaded = dump_and_load(job, tmp / "job.yml", load_job)
y = yaml.safe_load(text)
first, second, third = loaded.command.split(" && ")
# two GPUs: every process runs the command; only rank 0 packages and copies the model
guard_open, guard_close = 'if [ "${RANK:-0}" = 0 ]; then ', "; fi"
result["guard"] = [second.startswith(guard_open), third.endswith(guard_close)]
second, third = second[len(guard_open):], third[: -len(guard_close)]
argv = shlex.split(first)
assert argv[:2] == ["ferrotune", "finetune"], argv
sub = {"${{inputs.model}}": str(tmp), "${{inputs.train_file}}": str(train), "${{inputs.validation_file}}": str(test)}
config, notes = config_from_args([sub.get(a, a) for a in argv[2:]])
result["job"] = {
    "command": loaded.command, "argv": argv, "package": shlex.split(second), "copy": shlex.split(third),
    "config": {k: config[k] for k in ("num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "precision",
                                      "save_total_limit", "per_device_train_batch_size", "target_modules",
                                      "output_dir", "validation_file")},
    "notes": notes,
    "inputs": y["inputs"], "outputs": y["outputs"],
    "distribution": y.get("distribution"),
    "instance_count": loaded.resources.instance_count, "compute": loaded.compute,
    "experiment": loaded.experiment_name, "display_name": loaded.display_name,
    "image": loaded.environment.image, "conda": loaded.environment.conda_file,
}
# ... and `ferrotune package`'s own parser reads the packaging step
from ferrotune.package_cli import build_parser as package_parser
pa = package_parser().parse_args(shlex.split(second)[2:])
result["job"]["package_args"] = [pa.trained_dir, pa.out_dir, pa.ferrotune_requirement]

# -- one GPU, a Hub id, a user environment and a wheel URL ------------------------------
job1 = az.finetune_job(
    model="microsoft/Phi-3-mini-4k-instruct", train_file="azureml:ultrachat_train:1", compute="gpu-cluster",
    environment="azureml:my-gpu-env@latest",
    ferrotune_requirement="https://example.invalid/ferrotune-0.1.0+cu13-cp310-abi3-linux_x86_64.whl",
    display_name="my run",
)
text1, loaded1 = dump_and_load(job1, tmp / "job1.yml", load_job)
result["job1"] = {"command": loaded1.command, "package": shlex.split(loaded1.command.split(" && ")[2]), "distribution": yaml.safe_load(text1).get("distribution"), "inputs": yaml.safe_load(text1)["inputs"],
                  "environment": yaml.safe_load(text1)["environment"], "display_name": loaded1.display_name}

# -- client(): found by searching upwards (.azureml/config.json), default credential, no request
(tmp / ".azureml").mkdir()
(tmp / ".azureml" / "config.json").write_text(json.dumps(
    {"subscription_id": "sub-1", "resource_group": "rg-1", "workspace_name": "ws-1"}))
(tmp / "notebooks" / "deep").mkdir(parents=True)
ml = az.client(tmp / "notebooks" / "deep")
result["default_client"] = [type(ml._credential).__name__, ml.subscription_id, ml.resource_group_name, ml.workspace_name]

# -- model, endpoint, environments, deployment --------------------------------------------
class Job:  # what ml_client.jobs.create_or_update returns, as far as register_model cares
    name = "helpful_cat_0123"
text, m = dump_and_load(az.build_model(Job(), "Phi-3-mini-4k-instruct-ultrachat-200k", version="1700000000"),
                        tmp / "model.yml", load_model)
result["model"] = {"path": m.path, "type": m.type, "name": m.name, "version": m.version, "tags": m.tags}
_, m2 = dump_and_load(az.build_model("helpful_cat_0123", "x"), tmp / "model2.yml", load_model)
result["model_from_name"] = {"path": m2.path, "version_is_timestamp": m2.version.isdigit() and len(m2.version) >= 10}
pkg = packaged_model(tmp / "packaged", parameters=1000)
_, m3 = dump_and_load(az.build_model(pkg, "local-model", version="1"), tmp / "model3.yml", load_model)
result["model_from_folder"] = {"path": str(m3.path), "type": m3.type}

text, e = dump_and_load(az.build_endpoint("ultrachat-completion-1700000000", traffic={"demo": 100}),
                        tmp / "endpoint.yml", load_online_endpoint)
result["endpoint"] = {"name": e.name, "auth_mode": e.auth_mode, "traffic": e.traffic}

for gpu in (False, True):
    text, env = dump_and_load(az.inference_environment(gpu=gpu), tmp / f"env{gpu}.yml", load_environment)
    result[f"inference_env_gpu={gpu}"] = {"image": env.image, "conda": env.conda_file}
text, env = dump_and_load(az.training_environment(), tmp / "trainenv.yml", load_environment)
result["training_env"] = {"image": env.image, "conda": env.conda_file}

dep = az.build_deployment("azureml:Phi-3-mini-4k-instruct-ultrachat-200k:1700000000", "ultrachat-completion-1700000000",
                          code_dir=tmp / "code")
text, d = dump_and_load(dep, tmp / "deployment.yml", load_online_deployment)
score = Path(d.code_configuration.code) / d.code_configuration.scoring_script
result["deployment"] = {
    "name": d.name, "endpoint_name": d.endpoint_name, "model": d.model, "instance_type": d.instance_type,
    "instance_count": d.instance_count, "initial_delay": d.liveness_probe.initial_delay,
    "timeout_ms": d.request_settings.request_timeout_ms, "scoring_script": d.code_configuration.scoring_script,
    "code_files": sorted(p.name for p in Path(d.code_configuration.code).iterdir()),
    "score_py": score.read_text(), "image": d.environment.image, "conda": d.environment.conda_file,
}
dep_cpu = az.build_deployment(pkg, "ultrachat-completion-1700000000", instance_type="Standard_DS4_v2",
                              deployment_name="cpu", code_dir=tmp / "code2")
text, d2 = dump_and_load(dep_cpu, tmp / "deployment2.yml", load_online_deployment)
result["deployment_local"] = {"model_path": str(d2.model.path), "model_type": d2.model.type, "image": d2.environment.image,
                              "name": d2.name}
"""


def test_entities_round_trip_through_the_sdk(side_python, tmp_path):
    params = {**NOTEBOOK_PARAMETERS, **MODEL_SPECIFIC_DEFAULTS, "max_steps": -1, "seed": None,
              "target_modules": ["qkv_proj", "o_proj"], "deepspeed": "/a path/with 'quotes'/ds.json"}
    r = run_side(side_python, ENTITIES, tmp_path, tmp=str(tmp_path), params=params)
    version = r["version"]
    assert version == ferrotune.__version__
    assert r["default_client"] == ["DefaultAzureCredential", "sub-1", "rg-1", "ws-1"]

    job = r["job"]
    assert job["command"].startswith(
        "ferrotune finetune --model ${{inputs.model}} --train-file ${{inputs.train_file}} "
        "--validation-file ${{inputs.validation_file}} --output-dir ferrotune_work --num_train_epochs 3 "
        "--per_device_train_batch_size 1 --per_device_eval_batch_size 1 --learning_rate 5e-06 "
        "--lr_scheduler_type cosine --apply_lora true --apply_deepspeed true --deepspeed_stage 2 "
        "--precision 16 --save_total_limit 1 --learning_rate_min 1e-6 --max_steps -1 "
        "--target_modules qkv_proj,o_proj "
    )
    assert "--seed" not in job["command"]  # None: not set, the pipeline's default
    # the path with a space and quotes survives the shell: shlex quoting
    assert job["argv"][-2:] == ["--deepspeed", "/a path/with 'quotes'/ds.json"]
    assert job["package"] == ["ferrotune", "package", "ferrotune_work", "ferrotune_model"]
    assert job["copy"] == ["cp", "-R", "ferrotune_model/.", "${{outputs.trained_model}}"]
    assert job["package_args"] == ["ferrotune_work", "ferrotune_model", None]
    # ferrotune's own CLI parser reads the job's command line as the notebook meant it
    assert job["config"] == {
        "num_train_epochs": 3.0, "max_steps": -1, "learning_rate": 5e-6, "lr_scheduler_type": "cosine", "precision": "16",
        "save_total_limit": 1, "per_device_train_batch_size": 1, "target_modules": ["qkv_proj", "o_proj"],
        "output_dir": "ferrotune_work", "validation_file": str(tmp_path / "test_sft.jsonl"),
    }
    assert any(n.startswith("apply_deepspeed") for n in job["notes"])
    assert job["inputs"]["model"] == {
        "type": "mlflow_model", "path": "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/7"
    }
    assert job["inputs"]["train_file"]["type"] == "uri_file"
    assert job["inputs"]["train_file"]["path"].endswith(str(tmp_path / "train_sft.jsonl"))
    assert job["inputs"]["validation_file"]["type"] == "uri_file"
    assert job["outputs"] == {"trained_model": {"type": "mlflow_model"}}
    # one training process per GPU, started by Azure ML (ferrotune finetune joins them)
    assert job["distribution"] == {"type": "pytorch", "process_count_per_instance": 2}
    assert r["guard"] == [True, True] and r["gpu_warnings"] == []
    assert job["instance_count"] == 1 and job["compute"] == "gpu-cluster"
    assert job["experiment"] == "chat_completion_Phi-3-mini-4k-instruct"
    assert job["display_name"] == "ferrotune-Phi-3-mini-4k-instruct"
    assert job["image"] == az.TRAINING_IMAGE
    assert job["conda"]["dependencies"][-1]["pip"][0] == f"ferrotune=={version}"

    job1 = r["job1"]
    wheel = "https://example.invalid/ferrotune-0.1.0+cu13-cp310-abi3-linux_x86_64.whl"
    assert job1["command"].startswith(f"python -m pip install --quiet {wheel} && ferrotune finetune --model ${{{{inputs.model}}}}")
    assert job1["package"] == ["ferrotune", "package", "ferrotune_work", "ferrotune_model",
                               "--ferrotune-requirement", wheel]
    assert job1["distribution"] is None  # one GPU, one node
    assert job1["inputs"]["model"] == "microsoft/Phi-3-mini-4k-instruct"  # a literal: downloaded from the Hub
    assert job1["inputs"]["train_file"] == {"type": "uri_file", "path": "azureml:ultrachat_train:1"}
    assert job1["environment"] == "azureml:my-gpu-env@latest" and job1["display_name"] == "my run"

    assert r["model"] == {
        "path": "azureml://jobs/helpful_cat_0123/outputs/trained_model", "type": "mlflow_model",
        "name": "Phi-3-mini-4k-instruct-ultrachat-200k", "version": "1700000000", "tags": {"ferrotune": version},
    }
    assert r["model_from_name"] == {
        "path": "azureml://jobs/helpful_cat_0123/outputs/trained_model", "version_is_timestamp": True
    }
    assert r["model_from_folder"] == {"path": str(tmp_path / "packaged"), "type": "mlflow_model"}

    assert r["endpoint"] == {"name": "ultrachat-completion-1700000000", "auth_mode": "key", "traffic": {"demo": 100}}

    assert r["inference_env_gpu=False"]["image"] == az.CPU_INFERENCE_IMAGE
    assert r["inference_env_gpu=True"]["image"] == az.GPU_INFERENCE_IMAGE
    for key in ("inference_env_gpu=False", "inference_env_gpu=True"):
        assert r[key]["conda"]["dependencies"][-1] == {"pip": ["azureml-inference-server-http", f"ferrotune=={version}"]}
    assert r["training_env"]["image"] == az.TRAINING_IMAGE
    assert f"ferrotune=={version}" in r["training_env"]["conda"]["dependencies"][-1]["pip"]

    dep = r["deployment"]
    assert dep["name"] == "demo" and dep["endpoint_name"] == "ultrachat-completion-1700000000"
    assert dep["model"] == "Phi-3-mini-4k-instruct-ultrachat-200k:1700000000"  # the loader drops "azureml:"
    assert dep["instance_type"] == "Standard_NC6s_v3" and dep["instance_count"] == 1
    assert dep["initial_delay"] == 600 and dep["timeout_ms"] == 90000
    assert dep["scoring_script"] == "score.py" and dep["code_files"] == ["score.py"]
    assert "def init():" in dep["score_py"] and "def run(raw_data):" in dep["score_py"]
    assert "AZUREML_MODEL_DIR" in dep["score_py"]
    compile(dep["score_py"], "score.py", "exec")
    assert dep["image"] == az.GPU_INFERENCE_IMAGE  # NC6s_v3 has a GPU
    assert r["deployment_local"] == {"model_path": str(tmp_path / "packaged"), "model_type": "mlflow_model",
                                     "image": az.CPU_INFERENCE_IMAGE, "name": "cpu"}


def test_scoring_shim_runs_the_packaged_score_py(tmp_path, monkeypatch):
    """The entry script finds the packaged folder one level under AZUREML_MODEL_DIR (how
    Azure ML mounts a registered model), repoints the variable and delegates."""
    code = az.write_scoring_code(tmp_path / "code")
    model_root = tmp_path / "azureml-models" / "phi3" / "1"
    pkg = model_root / "trained_model"
    (pkg / "data" / "model").mkdir(parents=True)
    (pkg / "MLmodel").write_text("flavors: {}\n")
    (pkg / "score.py").write_text(
        "import os, json\n"
        "def init():\n    global where\n    where = os.environ['AZUREML_MODEL_DIR']\n"
        "def run(raw):\n    return {'where': where, 'echo': json.loads(raw)}\n"
    )
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(model_root))
    ns: dict = {}
    exec(compile((code / "score.py").read_text(), str(code / "score.py"), "exec"), ns)
    ns["init"]()
    assert os.environ["AZUREML_MODEL_DIR"] == str(pkg)
    assert ns["run"]('{"a": 1}') == {"where": str(pkg), "echo": {"a": 1}}
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tmp_path / "code"))
    with pytest.raises(RuntimeError, match="no packaged model"):
        ns["init"]()


# A packaged score.py with the contract of ferrotune's own: @rawhttp, status codes through
# AMLResponse, the model folder from AZUREML_MODEL_DIR.
_PACKAGED_SCORE = """
import json, os
from azureml_inference_server_http.api.aml_request import rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse

def init():
    global folder
    folder = os.environ["AZUREML_MODEL_DIR"]

@rawhttp
def run(request):
    if request.method != "POST":
        return AMLResponse({"error": "use POST"}, 405, {}, json_str=True)
    body = json.loads(request.get_data())
    convs = body["input_data"]["input_string"]
    return AMLResponse({"model_dir": folder, "conversations": len(convs), "last": convs[-1][-1]["content"]},
                       207, {}, json_str=True)
"""


def test_entry_script_in_the_real_inference_server(tmp_path):
    """The deployment's entry script under azmlinfsrv (gunicorn, loopback): the model is
    found one level below AZUREML_MODEL_DIR, and the packaged run() gets the raw HTTP
    request and sets the status."""
    from tests.support.inference_server import InferenceServer, server_python

    code = az.write_scoring_code(tmp_path / "code")
    model_root = tmp_path / "azureml-models" / "Phi-3-mini-4k-instruct-ultrachat-200k" / "1"
    pkg = model_root / "trained_model"
    (pkg / "data" / "model").mkdir(parents=True)
    (pkg / "MLmodel").write_text("flavors: {}\n")
    (pkg / "score.py").write_text(_PACKAGED_SCORE)
    server = InferenceServer(server_python(), code, "score.py", model_root, tmp_path / "server.log", env=_NO_NETWORK_ENV)
    with server:
        conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
        status, body = server.score(az.sample_request([conv, conv[:1]]))
        assert (status, body) == (207, {"model_dir": str(pkg), "conversations": 2, "last": "Hi"}), server.log_tail()
        assert server.request("GET", "/score")[0] == 405


def test_entry_script_serves_a_packaged_model(tmp_path):
    """deploy()'s code configuration with a real ``ferrotune package`` folder (a tiny random
    Phi-3) mounted as Azure ML mounts a registered model, under the real inference server."""
    from ferrotune.packaging import package_model
    from tests.support import tiny_phi3
    from tests.support.inference_server import InferenceServer, server_python

    base = tiny_phi3.make_tiny_phi3(tmp_path / "base", seed=3)
    model_root = tmp_path / "azureml-models" / "Phi-3-mini-4k-instruct-ultrachat-200k" / "1"
    package_model(base, model_root / "trained_model", progress=False)
    code = az.write_scoring_code(tmp_path / "code")
    server = InferenceServer(server_python(), code, "score.py", model_root, tmp_path / "server.log", env=_NO_NETWORK_ENV)
    with server:
        request = az.sample_request(
            [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Write a haiku."}]],
            {"max_new_tokens": 4, "do_sample": False},
        )
        status, body = server.score(request)
        assert status == 200, (body, server.log_tail())
        assert isinstance(body["output"], list) and len(body["output"]) == 2
        assert all(isinstance(t, str) and t for t in body["output"])
        status, body = server.score("not json")  # the packaged run() sets the status
        assert status == 400 and "not valid JSON" in body["error"]


# ---------------------------------------------------------------------------------------
# A real MLClient against a loopback ARM stand-in
# ---------------------------------------------------------------------------------------

FLOW = r"""
import json
from pathlib import Path
import ferrotune
import ferrotune.azureml as az
from tests.support.azure_arm import FakeArm, FakeCredential, SUBSCRIPTION, RESOURCE_GROUP, WORKSPACE, ENDPOINT_KEY
from tests.support.azure_fixtures import packaged_model

tmp = Path(ARGS["tmp"])
(tmp / "config.json").write_text(json.dumps(
    {"subscription_id": SUBSCRIPTION, "resource_group": RESOURCE_GROUP, "workspace_name": WORKSPACE}))
result = {}
with FakeArm(tmp) as arm:
    arm.trust()
    cred = FakeCredential()
    ml = az.client(tmp / "config.json", credential=cred, **arm.cloud_kwargs())
    result["client"] = [ml.subscription_id, ml.resource_group_name, ml.workspace_name, len(arm.requests)]

    arm.computes["gpu-cluster"] = {"size": "STANDARD_NC24ADS_A100_V4"}
    arm.vm_sizes = [("Standard_NC24ads_A100_v4", 1), ("Standard_NC48ads_A100_v4", 2), ("Standard_DS3_v2", 0)]
    gpus = az.check_compute(ml, "gpu-cluster")
    result["gpus"] = gpus

    job = az.finetune_job(
        model="azureml:Phi-3-mini-4k-instruct:7",
        train_file="azureml://datastores/workspaceblobstore/paths/ultrachat_200k_dataset/train_sft.jsonl",
        validation_file="azureml://datastores/workspaceblobstore/paths/ultrachat_200k_dataset/test_sft.jsonl",
        compute="gpu-cluster", finetune_parameters=ARGS["params"], gpus_per_node=gpus,
    )
    arm.models[("Phi-3-mini-4k-instruct", "7")] = {"id": "m", "name": "7", "properties": {
        "modelType": "mlflow_model", "modelUri": "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/7",
        "flavors": {}}}
    submitted = ml.jobs.create_or_update(job)
    registered = az.register_model(ml, submitted, "Phi-3-mini-4k-instruct-ultrachat-200k", version="1700000000")
    result["registered"] = {"id": registered.id, "path": registered.path}

    local = packaged_model(tmp / "packaged")  # a local copy, for the instance-type check
    endpoint = az.deploy(ml, registered, "ultrachat-completion-1700000000", model_dir=local)
    result["endpoint"] = {"traffic": endpoint.traffic, "scoring_uri": endpoint.scoring_uri, "auth_mode": endpoint.auth_mode}

    conversation = [{"role": "user", "content": "Write a haiku about Rust."},
                    {"role": "assistant", "content": "Borrowed, never lost."}]
    result["invoke_default"] = az.invoke(ml, "ultrachat-completion-1700000000", conversation, deployment_name="demo")
    arm.score_response = json.dumps({"output": "twice encoded"})
    request = az.sample_request([conversation, conversation[:1]], {"max_new_tokens": 8})
    result["invoke_request"] = az.invoke(ml, "ultrachat-completion-1700000000", request)
    az.delete(ml, "ultrachat-completion-1700000000")
    az.delete(ml, "ultrachat-completion-1700000000", missing_ok=True)
    try:
        az.delete(ml, "ultrachat-completion-1700000000")
    except az.AzureMLError as e:
        result["delete_missing"] = str(e)

    result["requests"] = arm.requests
    result["unhandled"] = arm.unhandled
    result["blobs"] = {k: v.decode() for k, v in arm.blobs.items()}
    result["blob_metadata"] = arm.blob_metadata
    result["scopes"] = sorted(set(cred.scopes))
    result["key"] = ENDPOINT_KEY
"""

_WS = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/ferrotune-rg"
    "/providers/Microsoft.MachineLearningServices/workspaces/ferrotune-ws"
)


def test_notebook_flow_on_a_real_mlclient(side_python, tmp_path):
    r = run_side(side_python, FLOW, tmp_path, tmp=str(tmp_path), params=NOTEBOOK_PARAMETERS)
    assert r["unhandled"] == []
    reqs = r["requests"]

    def calls(method, suffix):
        return [q for q in reqs if q["method"] == method and q["path"].endswith(suffix)]

    # building the client sent nothing
    assert r["client"] == ["00000000-0000-0000-0000-000000000000", "ferrotune-rg", "ferrotune-ws", 0]
    assert r["gpus"] == 1
    assert calls("GET", "/computes/gpu-cluster") and calls("GET", "/locations/eastus/vmSizes")
    # every ARM call carried the fake credential's token, for the stand-in's cloud
    for q in reqs:
        if q["path"].startswith("/subscriptions/"):
            assert q["authorization"] == "Bearer fake-arm-token", q["path"]
    assert r["scopes"] and all(s.startswith("https://127.0.0.1:") for s in r["scopes"])

    # the job as the service received it
    (job_put,) = [q for q in reqs if q["method"] == "PUT" and "/jobs/" in q["path"]]
    props = job_put["body"]["properties"]
    assert props["jobType"] == "Command"
    assert props["command"].startswith("ferrotune finetune --model ${{inputs.model}} --train-file ${{inputs.train_file}} "
                                       "--validation-file ${{inputs.validation_file}} --output-dir ferrotune_work "
                                       "--num_train_epochs 3 ")
    assert props["command"].endswith(
        " && ferrotune package ferrotune_work ferrotune_model && cp -R ferrotune_model/. ${{outputs.trained_model}}"
    )
    assert props["inputs"]["model"] == {"uri": f"{_WS}/models/Phi-3-mini-4k-instruct/versions/7", "jobInputType": "mlflow_model"}
    assert props["inputs"]["train_file"]["jobInputType"] == "uri_file"
    assert props["outputs"] == {"trained_model": {"jobOutputType": "mlflow_model"}}
    assert props["computeId"] == f"{_WS}/computes/gpu-cluster"
    assert props["experimentName"] == "chat_completion_Phi-3-mini-4k-instruct"
    assert "distribution" not in props or props["distribution"] is None  # one GPU
    job_name = job_put["path"].rsplit("/", 1)[1]

    # register_model: the job's output, as an MLflow model
    (model_put,) = calls("PUT", "/models/Phi-3-mini-4k-instruct-ultrachat-200k/versions/1700000000")
    assert model_put["body"]["properties"]["modelUri"] == f"azureml://jobs/{job_name}/outputs/trained_model"
    assert model_put["body"]["properties"]["modelType"] == "mlflow_model"
    assert r["registered"]["id"].endswith("/models/Phi-3-mini-4k-instruct-ultrachat-200k/versions/1700000000")

    # deploy: endpoint (key auth), code upload, environment, deployment, then 100 % traffic
    ep_puts = calls("PUT", "/onlineEndpoints/ultrachat-completion-1700000000")
    assert len(ep_puts) == 2
    assert ep_puts[0]["body"]["properties"]["authMode"] == "Key"
    assert not ep_puts[0]["body"]["properties"].get("traffic")
    assert ep_puts[1]["body"]["properties"]["traffic"] == {"demo": 100}
    (dep_put,) = calls("PUT", "/onlineEndpoints/ultrachat-completion-1700000000/deployments/demo")
    dp = dep_put["body"]["properties"]
    assert reqs.index(ep_puts[0]) < reqs.index(dep_put) < reqs.index(ep_puts[1])
    assert dp["endpointComputeType"] == "Managed"
    assert dp["instanceType"] == "Standard_NC6s_v3" and dep_put["body"]["sku"]["capacity"] == 1
    assert dp["livenessProbe"]["initialDelay"] == "PT10M"
    assert dp["requestSettings"]["requestTimeout"] == "PT1M30S"
    assert dp["model"] == r["registered"]["id"]
    assert dp["codeConfiguration"]["scoringScript"] == "score.py"
    assert "/codes/" in dp["codeConfiguration"]["codeId"]
    assert "/environments/" in dp["environmentId"]
    (env_put,) = [q for q in reqs if q["method"] == "PUT" and "/environments/" in q["path"]
                  and "inference-server" in q["body"]["properties"].get("condaFile", "")]
    assert env_put["body"]["properties"]["image"] == "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04:latest"
    assert "ferrotune==" in env_put["body"]["properties"]["condaFile"]
    (score_py,) = [v for k, v in r["blobs"].items() if k.endswith("/score.py")]
    assert "ferrotune.azureml" in score_py and "def run(raw_data):" in score_py
    assert any(m.get("upload_status") == "completed" for m in r["blob_metadata"].values())
    assert r["endpoint"]["traffic"] == {"demo": 100} and r["endpoint"]["auth_mode"] == "key"

    # invoke: the notebook's request shape, the endpoint key, the deployment header
    scores = [q for q in reqs if q["path"] == "/score"]
    assert len(scores) == 2
    assert scores[0]["body"] == {
        "input_data": {
            "input_string": [[{"content": "Write a haiku about Rust.", "role": "user"},
                              {"content": "Borrowed, never lost.", "role": "assistant"}]],
            "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200},
        },
        "params": {},
    }
    assert scores[0]["authorization"] == f"Bearer {r['key']}"
    assert scores[0]["headers"].get("azureml-model-deployment") == "demo"
    assert len(scores[1]["body"]["input_data"]["input_string"]) == 2
    assert scores[1]["body"]["input_data"]["parameters"] == {"max_new_tokens": 8}
    assert r["invoke_default"] == {"output": "Hello from the loopback endpoint."}
    assert r["invoke_request"] == {"output": "twice encoded"}

    # delete, then again: missing_ok, then a typed error
    assert len(calls("DELETE", "/onlineEndpoints/ultrachat-completion-1700000000")) >= 1
    assert "does not exist" in r["delete_missing"]


EARLY_ERRORS = r"""
from pathlib import Path
import ferrotune
import ferrotune.azureml as az
from tests.support.azure_arm import FakeArm, FakeCredential, SUBSCRIPTION, RESOURCE_GROUP, WORKSPACE
from tests.support.azure_fixtures import packaged_model

tmp = Path(ARGS["tmp"])
train = tmp / "train.jsonl"; train.write_text("{}\n")
result = {}

def error(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except ferrotune.FerrotuneError as e:
        return [type(e).__name__, str(e), [c.__name__ for c in type(e).__mro__]]
    return None

with FakeArm(tmp) as arm:
    arm.trust()
    ml = az.client(subscription_id=SUBSCRIPTION, resource_group=RESOURCE_GROUP, workspace=WORKSPACE,
                   credential=FakeCredential(), **arm.cloud_kwargs())
    arm.vm_sizes = [("Standard_NC24ads_A100_v4", 1), ("Standard_DS3_v2", 0)]
    arm.computes["cpu-cluster"] = {"size": "Standard_DS3_v2"}
    arm.computes["broken"] = {"size": "Standard_NC24ads_A100_v4", "provisioningState": "Failed"}
    arm.computes["k80"] = {"size": "Standard_NC6"}
    arm.computes["odd"] = {"size": "Standard_ZZ9"}
    for name in ("missing", "cpu-cluster", "broken", "k80", "odd"):
        result[f"compute:{name}"] = error(az.check_compute, ml, name)

    # a model folder too big for the instance type: refused before any request
    pkg = packaged_model(tmp / "packaged")
    before = len(arm.requests)
    result["sku"] = error(az.deploy, ml, pkg, "ultrachat-completion-1", instance_type="Standard_DS3_v2")
    result["sku_requests"] = len(arm.requests) - before
    result["endpoint_name"] = error(az.deploy, ml, pkg, "ultrachat_completion_1")
    result["not_packaged"] = error(az.deploy, ml, tmp, "ultrachat-completion-1")

    # fine-tuning parameters and inputs, checked on the laptop
    job = lambda **kw: az.finetune_job(**{"model": "microsoft/Phi-3-mini-4k-instruct", "train_file": train,
                                          "compute": "gpu-cluster", **kw})
    result["unknown_param"] = error(job, finetune_parameters={"num_train_epoch": 3})
    result["bad_value"] = error(job, finetune_parameters={"learning_rate": "fast"})
    result["no_full_ft"] = error(job, finetune_parameters={"apply_lora": "false"})
    result["token"] = error(job, finetune_parameters={"token": "hf_secret"})
    result["no_train_file"] = error(job, train_file=tmp / "nope.jsonl")
    result["no_model"] = error(job, model="./models/phi3")
    result["gpus"] = error(job, gpus_per_node=0)
    two_nodes = job(instance_count=2)
    result["nodes"] = {"instance_count": two_nodes.resources.instance_count,
                       "distribution": dict(two_nodes.distribution._to_rest_object().as_dict()) if two_nodes.distribution else None,
                       "command_tail": two_nodes.command.split(" && ", 1)[1]}
    result["register_not_mlflow"] = error(az.register_model, ml, tmp, "x")
    result["requests_after_errors"] = len(arm.requests) - before
"""


def test_early_errors_are_typed_and_send_nothing(side_python, tmp_path):
    r = run_side(side_python, EARLY_ERRORS, tmp_path, tmp=str(tmp_path))

    def check(key, cls, *fragments):
        got = r[key]
        assert got is not None, f"{key}: no error"
        name, msg, mro = got
        assert name == cls, (key, got)
        for f in fragments:
            assert f in msg, (key, f, msg)
        return mro

    mro = check("compute:missing", "ComputeTargetError", "compute 'missing' does not exist", "AmlCompute(")
    assert "ValueError" in mro and "FerrotuneError" in mro
    check("compute:cpu-cluster", "ComputeTargetError", "has no GPUs", "Standard_DS3_v2")
    check("compute:broken", "ComputeTargetError", "failed state")
    check("compute:k80", "ComputeTargetError", "not supported for fine-tuning")
    check("compute:odd", "ComputeTargetError", "Standard_ZZ9", "not in the workspace's list of sizes", "Standard_DS3_v2")

    check("sku", "ComputeTargetError", "does not fit on Standard_DS3_v2", "Standard_DS4_v2")
    assert r["sku_requests"] == 0
    check("endpoint_name", "InvalidArgumentError", "endpoint name has 3-32 characters")
    check("not_packaged", "InvalidArgumentError", "no MLmodel file")

    mro = check("unknown_param", "InvalidArgumentError", "unknown finetune parameter 'num_train_epoch'",
                "did you mean 'num_train_epochs'?")
    assert "ValueError" in mro
    check("bad_value", "InvalidArgumentError", "learning_rate='fast' is not valid")
    check("no_full_ft", "InvalidArgumentError", "LoRA adapters only")
    check("token", "InvalidArgumentError", "HF_TOKEN")
    check("no_train_file", "FerrotuneFileNotFoundError", "nope.jsonl", "does not exist")
    check("no_model", "FerrotuneFileNotFoundError", "no such folder")
    check("gpus", "InvalidArgumentError", "gpus_per_node=0")
    nodes = r["nodes"]
    assert nodes["instance_count"] == 2
    assert nodes["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": 1}, nodes
    assert nodes["command_tail"].startswith('if [ "${RANK:-0}" = 0 ]; then ferrotune package ') and nodes["command_tail"].endswith("; fi")
    check("register_not_mlflow", "InvalidArgumentError", "not an MLflow model folder")
    assert r["requests_after_errors"] == 0
