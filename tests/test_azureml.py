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
from tests.support import azure_fixtures, azure_wheels
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
    env["FERROTUNE_WHEEL_CACHE"] = str(cwd / "wheel-cache")  # never the user's cache
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
    from ferrotune.azureml import _common

    monkeypatch.setattr(_common, "_SDK", None)
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
    t = az.INSTANCE_TYPES
    # the seed's SKUs: GPUs, GPU memory, compute capability, 16-bit training precision
    for name, gpus, gpu, gib, cc, precision in (
        ("Standard_NC6s_v3", 1, "V100", 16, 7.0, "fp16"),
        ("Standard_NC12s_v3", 2, "V100", 16, 7.0, "fp16"),
        ("Standard_NC24rs_v3", 4, "V100", 16, 7.0, "fp16"),
        ("Standard_NC24ads_A100_v4", 1, "A100", 80, 8.0, "bf16"),
        ("Standard_NC40ads_H100_v5", 1, "H100 NVL", 94, 9.0, "bf16"),
        ("Standard_ND96asr_v4", 8, "A100", 40, 8.0, "bf16"),
    ):
        it = az.instance_type(name)
        assert it is t[name.lower()] and (it.gpus, it.gpu, it.gpu_gib, it.compute_capability) == (gpus, gpu, gib, cc)
        assert it.supported and it.precision == precision
        req = it.requirements()
        assert f"compute capability {cc:.1f}" in req and "cu12: >= 525" in req and f"training in {precision}" in req
    assert t["standard_ds3_v2"].gpus == 0 and t["standard_ds3_v2"].ram_gib == 14 and t["standard_ds3_v2"].supported
    assert t["standard_ds3_v2"].precision == "fp32" and "CPU wheel" in t["standard_ds3_v2"].requirements()
    assert t["standard_nc4as_t4_v3"].compute_capability == 7.5 and t["standard_nc4as_t4_v3"].precision == "fp16"
    # older GPU generations are in the table to be refused, with the reason
    for name, gpu, cc in (("Standard_NC6", "K80", 3.7), ("Standard_NC24r", "K80", 3.7), ("Standard_NV6", "M60", 5.2),
                          ("Standard_NC6s_v2", "P100", 6.0), ("Standard_ND6s", "P40", 6.1)):
        it = az.instance_type(name)
        assert (it.gpu, it.compute_capability, it.supported) == (gpu, cc, False)
        assert "not supported" in it.requirements() and ">= 7.0 (V100 or newer)" in it.requirements()
    assert az.instance_type("Standard_XY1") is None
    assert az.MIN_COMPUTE_CAPABILITY == 7.0 and az.MIN_DRIVER[12] == 525
    for key, it in t.items():
        assert key == it.name.lower() and it.vcpus > 0 and it.ram_gib > 0 and (it.gpus == 0) == (it.gpu_gib == 0)
        assert (it.gpus == 0) == (it.compute_capability == 0)


def test_old_gpus_are_refused_with_or_without_a_model(tmp_path):
    folder = azure_fixtures.packaged_model(tmp_path / "phi3")
    for model in (None, folder):
        with pytest.raises(az.ComputeTargetError) as e:
            az.check_instance_type("Standard_NC6", model)
        msg = str(e.value)
        assert "instance type Standard_NC6 (K80, compute capability 3.7) is not supported" in msg
        assert "Standard_NC6s_v3 (1 x V100 16 GB, fp16)" in msg
    # a model too big for a V100 names only supported GPUs, never a P40 (24 GB, too old)
    mid = azure_fixtures.packaged_model(tmp_path / "mid", parameters=8_000_000_000)
    with pytest.raises(az.ComputeTargetError) as e:
        az.check_instance_type("Standard_NC6s_v3", mid)
    assert "P40" not in str(e.value) and "Standard_NV36ads_A10_v5 (1 x A10 24 GB)" in str(e.value)


# Every public name of ``ferrotune.azureml`` before it became a package, with the parameters of
# each function then: all must stay importable, and every old call must stay valid.
OLD_PUBLIC = {
    "AzureMLError": None, "AzureExtraMissingError": None, "WorkspaceConfigError": None, "ComputeTargetError": None,
    "client": ["config_path", "subscription_id", "resource_group", "workspace", "credential", "kwargs"],
    "check_compute": ["ml_client", "compute_name"],
    "finetune_job": ["model", "train_file", "validation_file", "compute", "finetune_parameters", "gpus_per_node",
                     "instance_count", "experiment_name", "environment", "ferrotune_requirement", "display_name"],
    "register_model": ["ml_client", "job_or_path", "name", "version", "description"],
    "deploy": ["ml_client", "model", "endpoint_name", "instance_type", "instance_count", "deployment_name", "model_dir",
               "environment", "ferrotune_requirement", "description", "liveness_initial_delay", "request_timeout_ms"],
    "sample_request": ["conversations", "parameters"],
    "invoke": ["ml_client", "endpoint_name", "conversations_or_request", "parameters", "deployment_name"],
    "delete": ["ml_client", "endpoint_name", "missing_ok"],
    "training_environment": ["ferrotune_requirement"],
    "inference_environment": ["ferrotune_requirement", "gpu"],
    "build_model": ["job_or_path", "name", "version", "description"],
    "build_endpoint": ["endpoint_name", "description", "traffic"],
    "build_deployment": ["model", "endpoint_name", "instance_type", "instance_count", "deployment_name", "code_dir",
                         "environment", "ferrotune_requirement", "liveness_initial_delay", "request_timeout_ms"],
    "write_scoring_code": ["folder"],
    "InstanceType": None, "INSTANCE_TYPES": None, "ServingMemory": None,
    "serving_memory": ["model_dir"],
    "check_instance_type": ["instance_type", "model_dir"],
    "DEFAULT_EXPERIMENT": None, "DEFAULT_PARAMETERS": None, "TRAINING_IMAGE": None, "CPU_INFERENCE_IMAGE": None,
    "GPU_INFERENCE_IMAGE": None, "WORK_DIR": None, "PACKAGE_DIR": None, "PathLike": None,
}


def test_every_old_public_name_still_works():
    import inspect
    import ferrotune.azureml

    assert set(OLD_PUBLIC) - {"PathLike"} <= set(az.__all__)
    for name, params in OLD_PUBLIC.items():
        ns: dict = {}
        exec(f"from ferrotune.azureml import {name} as obj", ns)  # the import form
        assert ns["obj"] is getattr(ferrotune.azureml, name)  # the attribute form
        if params is None:
            continue
        sig = inspect.signature(ns["obj"]).parameters
        new = list(sig)
        assert new[: len(params)] == params, (name, new)  # same names, same order: old calls bind the same way
        for p in new[len(params):]:
            assert sig[p].kind is inspect.Parameter.KEYWORD_ONLY and sig[p].default is not inspect.Parameter.empty, (name, p)
    # the classes keep their bases, the constants their values where they did not have to change
    assert issubclass(az.ComputeTargetError, ValueError) and issubclass(az.AzureExtraMissingError, ImportError)
    assert az.WORK_DIR == "ferrotune_work" and az.PACKAGE_DIR == "ferrotune_model"
    assert az.DEFAULT_EXPERIMENT == "chat_completion_Phi-3-mini-4k-instruct"
    assert az.TRAINING_IMAGE == az.GPU_INFERENCE_IMAGE == az.CUDA_IMAGE
    # InstanceType still builds from its old positional fields
    assert az.InstanceType("X", 4, 16, 1, "V100", 16).describe() == "X (1 x V100 16 GB)"
    # the sub-modules by step
    from ferrotune.azureml import endpoint, environments, instance_types, job, model, wheels, workspace

    assert (workspace.client, workspace.check_compute) == (az.client, az.check_compute)
    assert (job.finetune_job, model.register_model, endpoint.deploy) == (az.finetune_job, az.register_model, az.deploy)
    assert (environments.inference_environment, instance_types.INSTANCE_TYPES) == (az.inference_environment, az.INSTANCE_TYPES)
    assert wheels.default_wheels is az.default_wheels


# ---------------------------------------------------------------------------------------
# Entities: built by ferrotune, dumped, loaded back by the SDK
# ---------------------------------------------------------------------------------------

ENTITIES = r"""
import json
import os
import shlex
from pathlib import Path
import yaml
import ferrotune
import ferrotune.azureml as az
from ferrotune.finetune_cli import config_from_args
from azure.ai.ml import load_job, load_model, load_online_endpoint, load_online_deployment, load_environment
from tests.support.azure_fixtures import dump_and_load, packaged_model
from tests.support.azure_wheels import CUDA_REQUIRES, make_wheel

tmp = Path(ARGS["tmp"])
os.environ["FERROTUNE_WHEEL_CACHE"] = ARGS["cache"]
train = tmp / "train_sft.jsonl"; train.write_text("{}\n")
test = tmp / "test_sft.jsonl"; test.write_text("{}\n")
params = dict(ARGS["params"])
version = ferrotune.__version__
cpu_wheel = make_wheel(tmp / "dist", version)
cuda_wheel = make_wheel(tmp / "dist-cuda", version, local="cu12", requires=CUDA_REQUIRES)
result = {"version": version, "wheels": [cpu_wheel.name, cuda_wheel.name]}


def files_under(folder):
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes().decode("utf-8", "replace")
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the fine-tuning job: registry model, local files, 2 GPUs, both wheels ----------------
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    job = az.finetune_job(
        model="azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/7",
        train_file=train, validation_file=test, compute="gpu-cluster",
        finetune_parameters=params, gpus_per_node=2, wheels=[cuda_wheel, cpu_wheel],
    )
result["gpu_warnings"] = [str(w.message) for w in caught]
text, loaded = dump_and_load(job, tmp / "job.yml", load_job)
y = yaml.safe_load(text)
install, first, second, third = loaded.command.split(" && ")
# two GPUs: every process runs the command; only rank 0 packages and copies the model
guard_open, guard_close = 'if [ "${RANK:-0}" = 0 ]; then ', "; fi"
result["guard"] = [second.startswith(guard_open), third.endswith(guard_close)]
second, third = second[len(guard_open):], third[: -len(guard_close)]
argv = shlex.split(first)
assert argv[:2] == ["ferrotune", "finetune"], argv
sub = {"${{inputs.model}}": str(tmp), "${{inputs.train_file}}": str(train), "${{inputs.validation_file}}": str(test),
       "${{outputs.checkpoints}}": str(tmp / "checkpoints")}
config, notes = config_from_args([sub.get(a, a) for a in argv[2:]])
result["job"] = {
    "command": loaded.command, "install": shlex.split(install), "argv": argv, "package": shlex.split(second),
    "copy": shlex.split(third),
    "config": {k: config.get(k) for k in ("num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "precision",
                                          "save_total_limit", "per_device_train_batch_size", "target_modules",
                                          "output_dir", "validation_file", "checkpoint_dir", "resume_from_checkpoint")},
    "notes": notes,
    "inputs": y["inputs"], "outputs": y["outputs"],
    "distribution": y.get("distribution"),
    "instance_count": loaded.resources.instance_count, "compute": loaded.compute,
    "experiment": loaded.experiment_name, "display_name": loaded.display_name,
    "image": loaded.environment.image, "conda": loaded.environment.conda_file,
    "tags": loaded.tags, "code": str(loaded.code), "code_files": sorted(files_under(loaded.code)),
    "installer": files_under(loaded.code)["install_ferrotune.py"],
    "yaml": y,
}
# ... and `ferrotune package`'s own parser reads the packaging step
from ferrotune.package_cli import build_parser as package_parser
pa = package_parser().parse_args(shlex.split(second)[2:])
result["job"]["package_args"] = [pa.trained_dir, pa.out_dir, pa.ferrotune_requirement]
# the same wheels again: the same code folder (Azure ML uploads it once)
again = az.finetune_job(model="microsoft/Phi-3-mini-4k-instruct", train_file=train, compute="gpu-cluster",
                        wheels=[cpu_wheel, cuda_wheel])
result["job"]["code_again"] = str(again.code)

# -- CPU training on purpose: the CPU wheel alone, a fixed checkpoint folder -------------------
job_cpu = az.finetune_job(model="microsoft/Phi-3-mini-4k-instruct", train_file=train, compute="cpu-cluster",
                          finetune_parameters={"device": "cpu", "max_steps": 5}, wheels=str(cpu_wheel),
                          checkpoint_path="azureml://datastores/workspaceblobstore/paths/ferrotune/ckpt/run-1/")
text_cpu, loaded_cpu = dump_and_load(job_cpu, tmp / "job_cpu.yml", load_job)
y_cpu = yaml.safe_load(text_cpu)
result["job_cpu"] = {"command": loaded_cpu.command, "code_files": sorted(files_under(loaded_cpu.code)),
                     "conda": loaded_cpu.environment.conda_file, "outputs": y_cpu["outputs"], "yaml": y_cpu,
                     "code": str(loaded_cpu.code)}

# -- one GPU, a Hub id, a user environment and a wheel URL ------------------------------
job1 = az.finetune_job(
    model="microsoft/Phi-3-mini-4k-instruct", train_file="azureml:ultrachat_train:1", compute="gpu-cluster",
    environment="azureml:my-gpu-env@latest",
    ferrotune_requirement="https://example.invalid/ferrotune-0.1.0+cu12-cp310-abi3-linux_x86_64.whl",
    display_name="my run",
)
text1, loaded1 = dump_and_load(job1, tmp / "job1.yml", load_job)
y1 = yaml.safe_load(text1)
result["job1"] = {"command": loaded1.command, "package": shlex.split(loaded1.command.split(" && ")[2]),
                  "distribution": y1.get("distribution"), "inputs": y1["inputs"], "code": y1.get("code"),
                  "environment": y1["environment"], "display_name": loaded1.display_name}

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
    text, env = dump_and_load(az.inference_environment(gpu=gpu, wheels=[cpu_wheel, cuda_wheel]),
                              tmp / f"env{gpu}.yml", load_environment)
    result[f"inference_env_gpu={gpu}"] = {
        "image": env.image, "conda": env.conda_file, "build_path": env.build.path,
        "dockerfile_path": env.build.dockerfile_path, "files": files_under(env.build.path),
        "yaml": yaml.safe_load(text),
    }
text, env = dump_and_load(az.inference_environment("ferrotune==9.9.9"), tmp / "env-req.yml", load_environment)
result["inference_env_req"] = {"image": env.image, "conda": env.conda_file, "build": env.build is not None}
text, env = dump_and_load(az.training_environment(wheels=[cpu_wheel, cuda_wheel]), tmp / "trainenv.yml", load_environment)
result["training_env"] = {"image": env.image, "conda": env.conda_file, "yaml": yaml.safe_load(text)}
text, env = dump_and_load(az.training_environment("ferrotune==9.9.9"), tmp / "trainenv-req.yml", load_environment)
result["training_env_req"] = {"image": env.image, "conda": env.conda_file}

dep = az.build_deployment("azureml:Phi-3-mini-4k-instruct-ultrachat-200k:1700000000", "ultrachat-completion-1700000000",
                          code_dir=tmp / "code", wheels=[cpu_wheel, cuda_wheel])
text, d = dump_and_load(dep, tmp / "deployment.yml", load_online_deployment)
score = Path(d.code_configuration.code) / d.code_configuration.scoring_script
result["deployment"] = {
    "name": d.name, "endpoint_name": d.endpoint_name, "model": d.model, "instance_type": d.instance_type,
    "instance_count": d.instance_count, "initial_delay": d.liveness_probe.initial_delay,
    "timeout_ms": d.request_settings.request_timeout_ms, "scoring_script": d.code_configuration.scoring_script,
    "code_files": sorted(p.name for p in Path(d.code_configuration.code).iterdir()),
    "score_py": score.read_text(), "image": d.environment.image,
    "build_files": sorted(files_under(d.environment.build.path)),
    "yaml": yaml.safe_load(text),
}
dep_cpu = az.build_deployment(pkg, "ultrachat-completion-1700000000", instance_type="Standard_DS4_v2",
                              deployment_name="cpu", code_dir=tmp / "code2", wheels=[cpu_wheel, cuda_wheel])
text, d2 = dump_and_load(dep_cpu, tmp / "deployment2.yml", load_online_deployment)
result["deployment_local"] = {"model_path": str(d2.model.path), "model_type": d2.model.type,
                              "build_files": sorted(files_under(d2.environment.build.path)), "name": d2.name}
"""


def _strings(obj, keys=()):
    """Every string in a YAML document, with the key path that leads to it."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v, keys + (str(k),))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _strings(v, keys + (str(i),))
    elif isinstance(obj, str):
        yield keys, obj


def local_paths(doc, markers, allowed=()):
    """The strings of ``doc`` that name a path of this machine (contain one of
    ``markers``), except under the key paths in ``allowed`` (what the SDK uploads:
    ``code``, local input files, a build context)."""
    return [(".".join(k), s) for k, s in _strings(doc) if any(m in s for m in markers) and k not in allowed]


def _markers(tmp_path: Path) -> list:
    return [str(tmp_path), str(ROOT), str(Path.home()), os.path.realpath(tmp_path)]


def test_entities_round_trip_through_the_sdk(side_python, tmp_path):
    from ferrotune.azureml import _node_install

    params = {**NOTEBOOK_PARAMETERS, **MODEL_SPECIFIC_DEFAULTS, "max_steps": -1, "seed": None,
              "target_modules": ["qkv_proj", "o_proj"], "deepspeed": "/a path/with 'quotes'/ds.json"}
    cache = tmp_path / "wheel-cache"
    r = run_side(side_python, ENTITIES, tmp_path, tmp=str(tmp_path), cache=str(cache), params=params,
                 )
    version = r["version"]
    cpu_name, cuda_name = r["wheels"]
    assert version == ferrotune.__version__
    assert r["default_client"] == ["DefaultAzureCredential", "sub-1", "rg-1", "ws-1"]

    job = r["job"]
    # first the installer picks the wheel on the node, then the training command
    assert job["install"] == ["python", "install_ferrotune.py", "--device", "auto"]
    expected = (
        "ferrotune finetune --model ${{inputs.model}} --train-file ${{inputs.train_file}} "
        "--validation-file ${{inputs.validation_file}} --output-dir ferrotune_work "
    )
    # checkpoints: written to the `checkpoints` output, resumed from there
    expected += "--checkpoint_dir ${{outputs.checkpoints}} --resume_from_checkpoint true "
    expected += (
        "--num_train_epochs 3 "
        "--per_device_train_batch_size 1 --per_device_eval_batch_size 1 --learning_rate 5e-06 "
        "--lr_scheduler_type cosine --apply_lora true --apply_deepspeed true --deepspeed_stage 2 "
        "--precision 16 --save_total_limit 1 --learning_rate_min 1e-6 --max_steps -1 "
        "--target_modules qkv_proj,o_proj "
    )
    assert job["command"].startswith("python install_ferrotune.py --device auto && " + expected)
    assert "--seed" not in job["command"]  # None: not set, the pipeline's default
    # the path with a space and quotes survives the shell: shlex quoting
    assert job["argv"][-2:] == ["--deepspeed", "/a path/with 'quotes'/ds.json"]
    assert job["package"] == ["ferrotune", "package", "ferrotune_work", "ferrotune_model"]
    assert job["copy"] == ["cp", "-R", "ferrotune_model/.", "${{outputs.trained_model}}"]
    assert job["package_args"] == ["ferrotune_work", "ferrotune_model", None]
    # ferrotune's own CLI parser reads the job's command line as the notebook meant it
    config = dict(job["config"])
    assert config.pop("checkpoint_dir") == str(tmp_path / "checkpoints")
    assert config.pop("resume_from_checkpoint") is True
    assert config == {
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
    assert job["outputs"] == {"trained_model": {"type": "mlflow_model"},
                              "checkpoints": {"type": "uri_folder", "mode": "rw_mount"}}  # uploaded as written
    # one training process per GPU, started by Azure ML (ferrotune finetune joins them)
    assert job["distribution"] == {"type": "pytorch", "process_count_per_instance": 2}
    assert r["guard"] == [True, True] and r["gpu_warnings"] == []
    assert job["instance_count"] == 1 and job["compute"] == "gpu-cluster"
    assert job["experiment"] == "chat_completion_Phi-3-mini-4k-instruct"
    assert job["display_name"] == "ferrotune-Phi-3-mini-4k-instruct"
    assert job["tags"] == {"ferrotune": version, "ferrotune_wheels": f"{cpu_name}, {cuda_name}"}
    # the CUDA 12 image; ferrotune's dependencies (the CUDA wheel's NVIDIA runtime wheels too)
    # and MLflow in the image; ferrotune itself comes from the code folder
    assert job["image"] == az.CUDA_IMAGE == "mcr.microsoft.com/azureml/openmpi5.0-cuda12.4-ubuntu22.04:latest"
    assert job["conda"]["dependencies"][:2] == ["python=3.11", "pip"]
    assert job["conda"]["dependencies"][-1]["pip"] == [*azure_wheels.CUDA_REQUIRES, "mlflow-skinny", "azureml-mlflow"]
    # the code folder: the installer and both wheels, in the wheel cache, named by content
    assert job["code_files"] == sorted(["install_ferrotune.py", f"wheels/{cpu_name}", f"wheels/{cuda_name}"])
    assert job["installer"] == Path(_node_install.__file__).read_text()
    assert Path(job["code"]).parent == cache / "job-code"
    assert job["code_again"] == job["code"]
    # no path of this machine in the job, but for what the SDK uploads on submit
    markers = _markers(tmp_path)
    allowed = {("code",), ("inputs", "train_file", "path"), ("inputs", "validation_file", "path")}
    assert local_paths(job["yaml"], markers, allowed) == []
    assert local_paths(job["yaml"], markers) != []  # (the check sees them where they are)

    job_cpu = r["job_cpu"]
    assert job_cpu["command"].startswith("python install_ferrotune.py --device cpu && ferrotune finetune ")
    assert job_cpu["code_files"] == ["install_ferrotune.py", f"wheels/{cpu_name}"]
    assert job_cpu["conda"]["dependencies"][-1]["pip"] == [*azure_wheels.CPU_REQUIRES, "mlflow-skinny", "azureml-mlflow"]
    assert job_cpu["outputs"]["checkpoints"] == {  # a fixed folder: a new job resumes from it
        "type": "uri_folder", "mode": "rw_mount",
        "path": "azureml://datastores/workspaceblobstore/paths/ferrotune/ckpt/run-1/",
    }
    assert local_paths(job_cpu["yaml"], markers, {("code",), ("inputs", "train_file", "path")}) == []

    job1 = r["job1"]
    wheel = "https://example.invalid/ferrotune-0.1.0+cu12-cp310-abi3-linux_x86_64.whl"
    assert job1["command"].startswith(f"python -m pip install --quiet {wheel} && ferrotune finetune --model ${{{{inputs.model}}}}")
    assert job1["package"] == ["ferrotune", "package", "ferrotune_work", "ferrotune_model",
                               "--ferrotune-requirement", wheel]
    assert job1["code"] is None  # nothing to ship
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

    # serving: a Docker build context with the wheel; the CUDA wheel on the CUDA image for GPUs
    for gpu, image, wheel_name in ((False, az.CPU_INFERENCE_IMAGE, cpu_name), (True, az.CUDA_IMAGE, cuda_name)):
        env = r[f"inference_env_gpu={gpu}"]
        assert env["image"] is None and env["conda"] is None and env["dockerfile_path"] == "Dockerfile"
        assert Path(env["build_path"]).parent == cache / "serving-context"
        files = env["files"]
        assert sorted(files) == sorted(["Dockerfile", "requirements.txt", wheel_name])
        assert files["requirements.txt"] == f"azureml-inference-server-http~=1.5\n./{wheel_name}\n"
        docker = files["Dockerfile"]
        assert f"\nFROM {image}\n" in docker and f"COPY requirements.txt {wheel_name} ./" in docker
        assert "python=3.11" in docker and "-m pip install --no-cache-dir --disable-pip-version-check -r requirements.txt" in docker
        assert "ENV PATH=/azureml-envs/ferrotune/bin:$PATH" in docker
        for name in ("Dockerfile", "requirements.txt"):
            assert not any(m in files[name] for m in markers), files[name]
        assert local_paths(env["yaml"], markers, {("build", "path")}) == []
    assert r["inference_env_req"] == {
        "image": az.CPU_INFERENCE_IMAGE, "build": False,
        "conda": {"name": "ferrotune-serve", "channels": ["conda-forge"],
                  "dependencies": ["python=3.11", "pip", {"pip": ["azureml-inference-server-http~=1.5", "ferrotune==9.9.9"]}]},
    }
    assert r["training_env"]["image"] == az.TRAINING_IMAGE == az.CUDA_IMAGE
    assert r["training_env"]["conda"]["dependencies"][-1]["pip"] == [
        *azure_wheels.CUDA_REQUIRES, "mlflow-skinny", "azureml-mlflow"]
    assert local_paths(r["training_env"]["yaml"], markers) == []
    assert r["training_env_req"]["conda"]["dependencies"][-1]["pip"] == ["ferrotune==9.9.9", "mlflow-skinny", "azureml-mlflow"]

    dep = r["deployment"]
    assert dep["name"] == "demo" and dep["endpoint_name"] == "ultrachat-completion-1700000000"
    assert dep["model"] == "Phi-3-mini-4k-instruct-ultrachat-200k:1700000000"  # the loader drops "azureml:"
    assert dep["instance_type"] == "Standard_NC6s_v3" and dep["instance_count"] == 1
    assert dep["initial_delay"] == 600 and dep["timeout_ms"] == 90000
    assert dep["scoring_script"] == "score.py" and dep["code_files"] == ["score.py"]
    assert "def init():" in dep["score_py"] and "def run(raw_data):" in dep["score_py"]
    assert "AZUREML_MODEL_DIR" in dep["score_py"]
    compile(dep["score_py"], "score.py", "exec")
    assert dep["build_files"] == sorted(["Dockerfile", cuda_name, "requirements.txt"])  # NC6s_v3 has a GPU: the CUDA wheel
    assert local_paths(dep["yaml"], markers, {("code_configuration", "code"), ("environment", "build", "path")}) == []
    assert r["deployment_local"] == {"model_path": str(tmp_path / "packaged"), "model_type": "mlflow_model",
                                     "build_files": sorted(["Dockerfile", cpu_name, "requirements.txt"]), "name": "cpu"}


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
from tests.support.azure_wheels import CUDA_REQUIRES, make_wheel

tmp = Path(ARGS["tmp"])
wheels = [make_wheel(tmp / "dist", ferrotune.__version__),
          make_wheel(tmp / "dist-cuda", ferrotune.__version__, local="cu12", requires=CUDA_REQUIRES)]
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
        compute="gpu-cluster", finetune_parameters=ARGS["params"], gpus_per_node=gpus, wheels=wheels,
    )
    arm.models[("Phi-3-mini-4k-instruct", "7")] = {"id": "m", "name": "7", "properties": {
        "modelType": "mlflow_model", "modelUri": "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/7",
        "flavors": {}}}
    submitted = ml.jobs.create_or_update(job)
    registered = az.register_model(ml, submitted, "Phi-3-mini-4k-instruct-ultrachat-200k", version="1700000000")
    result["registered"] = {"id": registered.id, "path": registered.path}

    local = packaged_model(tmp / "packaged")  # a local copy, for the instance-type check
    endpoint = az.deploy(ml, registered, "ultrachat-completion-1700000000", model_dir=local, wheels=wheels)
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
    result["blobs"] = {k: v.decode("utf-8", "replace") for k, v in arm.blobs.items()}
    result["wheels"] = [w.name for w in wheels]
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
    assert props["command"].startswith(
        "python install_ferrotune.py --device auto && "
        "ferrotune finetune --model ${{inputs.model}} --train-file ${{inputs.train_file}} "
        "--validation-file ${{inputs.validation_file}} --output-dir ferrotune_work "
        + "--checkpoint_dir ${{outputs.checkpoints}} --resume_from_checkpoint true "
        + "--num_train_epochs 3 "
    )
    assert props["command"].endswith(
        " && ferrotune package ferrotune_work ferrotune_model && cp -R ferrotune_model/. ${{outputs.trained_model}}"
    )
    assert props["inputs"]["model"] == {"uri": f"{_WS}/models/Phi-3-mini-4k-instruct/versions/7", "jobInputType": "mlflow_model"}
    assert props["inputs"]["train_file"]["jobInputType"] == "uri_file"
    assert props["outputs"] == {"trained_model": {"jobOutputType": "mlflow_model"},
                                "checkpoints": {"jobOutputType": "uri_folder", "mode": "ReadWriteMount"}}
    # the code folder (installer + both wheels) was uploaded, and the job points at it
    cpu_name, cuda_name = r["wheels"]
    assert "/codes/" in props["codeId"]
    for name in ("install_ferrotune.py", f"wheels/{cpu_name}", f"wheels/{cuda_name}"):
        assert any(k.endswith("/" + name) for k in r["blobs"]), (name, sorted(r["blobs"]))
    (train_env,) = [q for q in reqs if q["method"] == "PUT" and "/environments/" in q["path"]
                    and "ferrotune-train" in q["body"]["properties"].get("condaFile", "")]
    assert train_env["body"]["properties"]["image"] == "mcr.microsoft.com/azureml/openmpi5.0-cuda12.4-ubuntu22.04:latest"
    assert "nvidia-cublas-cu12" in train_env["body"]["properties"]["condaFile"]
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
    # the serving environment: a Docker build context (Dockerfile, requirements.txt, the CUDA
    # wheel for the V100), uploaded to the workspace datastore, then built by Azure ML
    (env_put,) = [q for q in reqs if q["method"] == "PUT" and "/environments/" in q["path"]
                  and q["body"]["properties"].get("build")]
    build = env_put["body"]["properties"]["build"]
    assert build["dockerfilePath"] == "Dockerfile"
    context = build["contextUri"]
    assert context.startswith("https://fakestorage.blob.core.invalid:") and "/blob/" in context, build
    prefix = context.split("/blob/", 1)[1]
    context_blobs = {k[len(prefix):]: v for k, v in r["blobs"].items() if k.startswith(prefix)}
    assert sorted(context_blobs) == sorted(["Dockerfile", "requirements.txt", cuda_name]), sorted(r["blobs"])
    assert "FROM mcr.microsoft.com/azureml/openmpi5.0-cuda12.4-ubuntu22.04:latest" in context_blobs["Dockerfile"]
    assert context_blobs["requirements.txt"].endswith(f"./{cuda_name}\n")
    assert dp["environmentId"] == env_put["path"]
    # nothing the service received names a path of this machine
    markers = _markers(tmp_path)
    leaks = [(q["method"], q["path"]) for q in reqs if any(m in json.dumps(q["body"]) for m in markers)]
    assert leaks == []
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
import warnings
from tests.support.azure_arm import FakeArm, FakeCredential, SUBSCRIPTION, RESOURCE_GROUP, WORKSPACE
from tests.support.azure_fixtures import packaged_model
from tests.support.azure_wheels import CUDA_REQUIRES, make_wheel

tmp = Path(ARGS["tmp"])
train = tmp / "train.jsonl"; train.write_text("{}\n")
version = ferrotune.__version__
cpu_wheel = make_wheel(tmp / "dist", version)
cuda_wheel = make_wheel(tmp / "dist-cuda", version, local="cu12", requires=CUDA_REQUIRES)
wheels = [cpu_wheel, cuda_wheel]
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
    arm.vm_sizes = [("Standard_NC24ads_A100_v4", 1), ("Standard_DS3_v2", 0), ("Standard_NC6", 1),
                    ("Standard_NC6s_v2", 1), ("Standard_NV12", 2), ("Standard_NG99_v9", 2)]
    arm.computes["cpu-cluster"] = {"size": "Standard_DS3_v2"}
    arm.computes["broken"] = {"size": "Standard_NC24ads_A100_v4", "provisioningState": "Failed"}
    arm.computes["k80"] = {"size": "Standard_NC6"}
    arm.computes["p100"] = {"size": "standard_nc6s_v2"}
    arm.computes["m60"] = {"size": "Standard_NV12"}
    arm.computes["odd"] = {"size": "Standard_ZZ9"}
    arm.computes["new-gpu"] = {"size": "Standard_NG99_v9"}
    for name in ("missing", "cpu-cluster", "broken", "k80", "p100", "m60", "odd"):
        result[f"compute:{name}"] = error(az.check_compute, ml, name)
    with warnings.catch_warnings(record=True) as caught:  # listed, with GPUs, unknown to ferrotune
        warnings.simplefilter("always")
        result["compute:new-gpu"] = [az.check_compute(ml, "new-gpu"), [str(w.message) for w in caught]]

    # a model folder too big for the instance type: refused before any request
    pkg = packaged_model(tmp / "packaged")
    before = len(arm.requests)
    result["sku"] = error(az.deploy, ml, pkg, "ultrachat-completion-1", instance_type="Standard_DS3_v2")
    result["sku_requests"] = len(arm.requests) - before
    result["endpoint_name"] = error(az.deploy, ml, pkg, "ultrachat_completion_1")
    result["not_packaged"] = error(az.deploy, ml, tmp, "ultrachat-completion-1")

    # fine-tuning parameters and inputs, checked on the laptop
    job = lambda **kw: az.finetune_job(**{"model": "microsoft/Phi-3-mini-4k-instruct", "train_file": train,
                                          "compute": "gpu-cluster", "wheels": wheels, **kw})
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
                       "command_tail": two_nodes.command.split(" && ", 2)[2]}
    result["register_not_mlflow"] = error(az.register_model, ml, tmp, "x")

    # wheels: a GPU job or deployment with only the CPU wheel, a wheel for another platform,
    # two CPU wheels, wheels of two versions, a wheel and a requirement, a missing file
    result["gpu_job_cpu_wheel"] = error(job, wheels=[cpu_wheel])
    result["cpu_job_cpu_wheel"] = job(wheels=[cpu_wheel], finetune_parameters={"device": "cpu"}).command.split(" && ")[0]
    mac = make_wheel(tmp / "mac", version, platform="macosx_11_0_arm64")
    result["mac_wheel"] = error(job, wheels=[mac])
    result["py312_wheel"] = error(job, wheels=[make_wheel(tmp / "py312", version, python="cp312", abi="cp312",
                                                           platform="manylinux_2_17_x86_64.manylinux2014_x86_64")])
    result["two_cpu"] = error(job, wheels=[cpu_wheel, make_wheel(tmp / "other", version, platform="linux_x86_64")])
    result["two_versions"] = error(job, wheels=[cpu_wheel, make_wheel(tmp / "old", "0.0.9", local="cu12")])
    result["both"] = error(job, ferrotune_requirement="ferrotune==1.0")
    result["missing_wheel"] = error(job, wheels=[tmp / "nope" / "ferrotune-0.1.0-cp310-abi3-linux_x86_64.whl"])
    (tmp / "not-a-wheel.whl").write_text("hello")
    result["not_ferrotune"] = error(job, wheels=[tmp / "not-a-wheel.whl"])
    bad_zip = tmp / "zip" / "ferrotune-0.1.0-cp310-abi3-linux_x86_64.whl"; bad_zip.parent.mkdir(); bad_zip.write_text("x")
    result["bad_zip"] = error(job, wheels=[bad_zip])
    result["checkpoint_dir_param"] = error(job, finetune_parameters={"checkpoint_dir": "/mnt/x"})
    result["gpu_deploy_cpu_wheel"] = error(az.deploy, ml, pkg, "ultrachat-completion-1", wheels=[cpu_wheel])
    result["old_gpu_deploy"] = error(az.deploy, ml, pkg, "ultrachat-completion-1", instance_type="Standard_NC6s_v2",
                                     wheels=wheels)
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
    for name, gpu, cc in (("k80", "K80", "3.7"), ("p100", "P100", "6.0"), ("m60", "M60", "5.2")):
        check(f"compute:{name}", "ComputeTargetError", f"({gpu}, compute capability {cc}) of compute '{name}' is not "
              "supported", "needs compute capability >= 7.0 (V100 or newer)", "Standard_NC24ads_A100_v4")
    gpus, warned = r["compute:new-gpu"]
    assert gpus == 2 and len(warned) == 1 and "does not know VM size Standard_NG99_v9" in warned[0]
    assert "compute capability is not checked" in warned[0]
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

    mro = check("gpu_job_cpu_wheel", "WheelError", "only the CPU wheel", "scripts/build_cuda.sh",
                "finetune_parameters['device'] = 'cpu'")
    assert "ValueError" in mro and "AzureMLError" in mro
    assert r["cpu_job_cpu_wheel"] == "python install_ferrotune.py --device cpu"
    check("mac_wheel", "WheelError", "built for macosx_11_0_arm64", "Linux x86-64", "--zig")
    check("py312_wheel", "WheelError", "cp312-cp312", "CPython 3.11", "abi3")
    check("two_cpu", "WheelError", "2 CPU wheels given", "at most one CPU and one CUDA wheel")
    check("two_versions", "WheelError", "different ferrotune versions")
    check("both", "InvalidArgumentError", "either wheels=", "not both")
    mro = check("missing_wheel", "WheelNotFoundError", "does not exist")
    assert "FileNotFoundError" in mro
    check("not_ferrotune", "WheelError", "not a ferrotune wheel")
    check("bad_zip", "WheelError", "not a readable wheel (zip) file")
    # the job owns checkpoint_dir (its `checkpoints` output)
    check("checkpoint_dir_param", "InvalidArgumentError",
          "leave checkpoint_dir out")
    check("gpu_deploy_cpu_wheel", "WheelError", "GPU instance type needs ferrotune's CUDA wheel", "Standard_E8s_v3")
    check("old_gpu_deploy", "ComputeTargetError", "instance type Standard_NC6s_v2 (P100, compute capability 6.0)")
    assert r["requests_after_errors"] == 0


# ---------------------------------------------------------------------------------------
# The node-side installer (install_ferrotune.py): which wheel, or why none
# ---------------------------------------------------------------------------------------

CPU = "wheels/ferrotune-0.1.0-cp310-abi3-manylinux_2_34_x86_64.whl"
CU12 = "wheels/ferrotune-0.1.0+cu12-cp310-abi3-manylinux_2_34_x86_64.whl"
CU13 = "wheels/ferrotune-0.1.0+cu13-cp310-abi3-manylinux_2_34_x86_64.whl"


def test_installer_reads_nvidia_smi_and_proc():
    from ferrotune.azureml import _node_install as ni

    gpus, driver = ni.parse_nvidia_smi(
        "Tesla V100-PCIE-16GB, 535.161.08, 7.0\nTesla V100-PCIE-16GB, 535.161.08, 7.0\n"
    )
    assert gpus == (ni.Gpu("Tesla V100-PCIE-16GB", 7.0),) * 2 and driver == 535
    gpus, driver = ni.parse_nvidia_smi("NVIDIA A100 80GB PCIe, 470.82.01\n")  # an nvidia-smi without compute_cap
    assert gpus == (ni.Gpu("NVIDIA A100 80GB PCIe", None),) and driver == 470
    assert ni.parse_nvidia_smi("") == ((), None)
    proc = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 19:50:25 UTC 2024\nGCC version: gcc 12\n"
    assert ni.parse_proc_driver(proc) == 550 and ni.parse_proc_driver("nothing here") is None
    assert (ni.cuda_major(CPU), ni.cuda_major(CU12), ni.cuda_major("x/ferrotune-0.1.0+cu12.nccl-cp310-abi3-linux_x86_64.whl")) == (
        None, 12, 12)
    # this machine: no NVIDIA driver, so no GPU (what the job rehearsal relies on)
    node = ni.inspect_node()
    assert node.gpus == () and node.driver is None


@pytest.mark.parametrize(
    "wheels, gpus, driver, device, expected",
    [
        # a GPU node: the CUDA wheel, precision noted
        ([CPU, CU12], [("Tesla V100-PCIE-16GB", 7.0)], 535, "auto", (CU12, "no bf16: fp16 training")),
        ([CU12, CPU], [("NVIDIA A100 80GB PCIe", 8.0)], 550, "cuda", (CU12, "bf16-capable")),
        ([CU12], [("NVIDIA H100 NVL", 9.0)], 525, "auto", (CU12, "driver 525")),
        ([CU12], [("NVIDIA GPU (no nvidia-smi)", None)], 560, "auto", (CU12, "driver 560")),
        # no GPU: the CPU wheel, or the CUDA wheel (which runs on a CPU too)
        ([CPU, CU12], [], None, "auto", (CPU, "no NVIDIA GPU on this node")),
        ([CU12], [], None, "auto", (CU12, "training on the CPU")),
        ([CPU, CU12], [("Tesla V100-PCIE-16GB", 7.0)], 535, "cpu", (CPU, "device=cpu")),
    ],
)
def test_installer_picks_the_wheel(wheels, gpus, driver, device, expected):
    from ferrotune.azureml import _node_install as ni

    node = ni.NodeInfo(tuple(ni.Gpu(*g) for g in gpus), driver, "test")
    wheel, reason = ni.choose_wheel(wheels, node, device)
    assert wheel == expected[0] and expected[1] in reason, reason


@pytest.mark.parametrize(
    "wheels, gpus, driver, device, message",
    [
        ([CPU, CU12], [("Tesla V100-PCIE-16GB", 7.0)], 470, "auto", "needs an NVIDIA driver >= 525, this node has driver 470"),
        ([CU13], [("NVIDIA A100 80GB PCIe", 8.0)], 550, "auto", "CUDA 13 wheel"),
        ([CPU, CU12], [("Tesla P100-PCIE-16GB", 6.0)], 535, "auto", "compute capability 6.0"),
        ([CPU], [("Tesla V100-PCIE-16GB", 7.0)], 535, "auto", "ships only the CPU wheel"),
        ([CPU, CU12], [], None, "cuda", "device=cuda but this node has no NVIDIA GPU"),
        ([], [], None, "auto", "no ferrotune wheel"),
        ([CPU], [], None, "gpu", "expected auto, cpu or cuda"),
    ],
)
def test_installer_refuses_a_node_it_cannot_serve(wheels, gpus, driver, device, message):
    from ferrotune.azureml import _node_install as ni

    node = ni.NodeInfo(tuple(ni.Gpu(*g) for g in gpus), driver, "test")
    with pytest.raises(ni.InstallError, match=message):
        ni.choose_wheel(wheels, node, device)


def test_installer_script_says_why_in_one_line(tmp_path):
    """The installer as the job runs it: a script beside a wheels/ folder, one line and exit
    status 1 when it cannot install (here: device=cuda on a machine without GPU)."""
    from ferrotune.azureml import _node_install as ni

    code = tmp_path / "code"
    (code / "wheels").mkdir(parents=True)
    (code / "install_ferrotune.py").write_text(Path(ni.__file__).read_text())
    azure_wheels.make_wheel(code / "wheels", local="cu12", requires=azure_wheels.CUDA_REQUIRES)
    r = subprocess.run([sys.executable, "install_ferrotune.py", "--device", "cuda"], cwd=code,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("install_ferrotune.py: error: device=cuda but this node has no")
    empty = tmp_path / "empty"
    (empty / "wheels").mkdir(parents=True)
    r = subprocess.run([sys.executable, str(code / "install_ferrotune.py"), "--wheels", str(empty / "wheels")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no ferrotune wheel in the job's code folder" in r.stderr


# ---------------------------------------------------------------------------------------
# Which wheel by default (the fast cases; the checkout build is in test_azureml_rehearsal.py)
# ---------------------------------------------------------------------------------------


def test_default_wheel_of_a_ferrotune_installed_from_a_wheel_file(tmp_path, monkeypatch):
    """pip's direct_url.json names the wheel file; it is kept in the wheel cache, which
    serves when the file is gone or has been rebuilt since."""
    import importlib as il

    from ferrotune.azureml import wheels

    wheel = azure_wheels.make_wheel(tmp_path / "dist")
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                        "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    monkeypatch.syspath_prepend(str(site))
    il.invalidate_caches()
    monkeypatch.setenv("FERROTUNE_WHEEL_CACHE", str(tmp_path / "cache"))
    pkg = site / "ferrotune"
    cached = tmp_path / "cache" / "installed" / wheel.name

    assert wheels._installed_wheel(pkg) == (wheel, "installed from this wheel file")
    assert cached.read_bytes() == wheel.read_bytes()
    original = wheel.read_bytes()
    wheel.write_bytes(b"rebuilt since: not what is installed")
    path, note = wheels._installed_wheel(pkg)
    assert path == cached and "copy in the wheel cache" in note
    wheel.unlink()
    assert wheels._installed_wheel(pkg)[0] == cached
    cached.unlink()
    path, note = wheels._installed_wheel(pkg)
    assert path is None and f"installed from {wheel}, which no longer exists" in note
    wheel.write_bytes(original)  # back: found again, and cached again
    assert wheels._installed_wheel(pkg)[0] == wheel and cached.is_file()
    # another ferrotune than the one installed there: not its wheel
    path, note = wheels._installed_wheel(tmp_path / "elsewhere" / "ferrotune")
    assert path is None and "is not the one running" in note


def test_no_default_wheel_is_a_clear_error(tmp_path):
    """ferrotune imported from a plain folder (neither a wheel install nor a checkout)."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(ROOT / "python" / "ferrotune", site / "ferrotune", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import ferrotune.azureml as az\n"
        "try:\n    az.default_wheels()\n"
        "except az.WheelNotFoundError as e:\n    print(type(e).__name__, isinstance(e, FileNotFoundError), e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(site), "FERROTUNE_WHEEL_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    assert out.startswith(f"WheelNotFoundError True no wheel of the running ferrotune {ferrotune.__version__} ({site / 'ferrotune'})")
    for hint in ("wheels=['ferrotune-...whl']", "maturin build --release", "scripts/build_cuda.sh",
                 "ferrotune_requirement='ferrotune==X'"):
        assert hint in out, out
    assert "\n" not in out


def test_the_checkout_cuda_wheel_comes_from_dist_cuda(tmp_path):
    from ferrotune.azureml import wheels

    root = tmp_path / "checkout"
    (root / "src").mkdir(parents=True)
    (root / "src" / "lib.rs").write_text("// source\n")
    assert wheels._dist_cuda_wheel(root, "0.1.0") is None
    old = azure_wheels.make_wheel(root / "dist-cuda", "0.1.0", local="cu12")
    other = azure_wheels.make_wheel(root / "dist-cuda", "0.2.0", local="cu12")
    new = azure_wheels.make_wheel(root / "dist-cuda", "0.1.0", local="cu12.nccl")
    os.utime(old, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    os.utime(other, ns=(3_000_000_000_000_000_000, 3_000_000_000_000_000_000))
    os.utime(new, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    os.utime(root / "src" / "lib.rs", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    _, newest = wheels._source_state(root)
    assert wheels._dist_cuda_wheel(root, "0.1.0", newest) == new  # the newest of this version
    os.utime(root / "src" / "lib.rs", ns=(2_500_000_000_000_000_000, 2_500_000_000_000_000_000))
    _, newest = wheels._source_state(root)
    with pytest.warns(UserWarning, match=r"dist-cuda/ferrotune-0\.1\.0\+cu12\.nccl-.*is older than the checkout's sources"):
        assert wheels._dist_cuda_wheel(root, "0.1.0", newest) == new


def test_a_failed_checkout_build_is_a_typed_error_and_leaves_nothing(tmp_path, monkeypatch):
    from ferrotune.azureml import wheels

    root = tmp_path / "checkout"
    (root / "python" / "ferrotune").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "ferrotune"\n')
    (root / "Cargo.toml").write_text("this is not toml [\n")
    assert wheels._checkout_root(root / "python" / "ferrotune") == root
    monkeypatch.setenv("FERROTUNE_WHEEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(az.WheelBuildError) as e:
        wheels.build_wheel(root)
    msg = str(e.value)
    assert msg.startswith(f"`maturin build --release` in {root} failed (exit status ") and "wheels=[...]" in msg
    assert "maturin said:\n" in msg and msg.split("maturin said:\n", 1)[1].strip()
    assert list((tmp_path / "cache" / "built").iterdir()) == []  # no half-built folder
