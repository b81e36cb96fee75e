"""Rehearsals: what Azure ML does with ferrotune's job and deployment, done on this machine.

The job and the deployment are built by ``ferrotune.azureml`` with the real ``azure-ai-ml``
objects (offline, in the SDK's side venv), dumped and loaded back by the SDK, and then
executed as Azure ML would execute them (``tests/support/azure_node.py``):

- **the job**: the environment's image is a virtualenv with the pip part of its conda spec
  (from PyPI, built once); each run gets a fresh container venv on that image, a copy of
  the job's uploaded code folder (``install_ferrotune.py`` and the wheel) as its working
  directory, its inputs and outputs as local folders substituted into the command, and the
  launcher's MLflow variables (an MLflow run in a file store). The command installs the CPU
  wheel (no GPU here), trains a tiny Phi-3 on the bundled sample, and writes the MLflow
  ``trained_model`` the registration step reads. A resubmission with the same outputs, on
  a fresh container, resumes from the checkpoint in the ``checkpoints`` output.
- **the deployment**: the serving environment's build context (Dockerfile, requirements.txt,
  the wheel): its ``pip install -r requirements.txt`` in a fresh container venv on an image
  venv with the inference server; then the deployment's code folder (``score.py``) under the
  real ``azureml-inference-server-http`` with the job's ``trained_model`` mounted as Azure ML
  mounts a registered model, answering the notebook's ``sample_score.json`` request.
- **the default wheel**: built from this checkout by ``default_wheels()`` itself
  (``maturin build --release`` into a wheel cache under the session's temporary folder, once
  per session), and found again, without a rebuild; inside the job's container, the
  installed ferrotune's own ``default_wheels()`` finds the wheel it was installed from.

Slow (they build the wheel and create virtualenvs from PyPI on first use): marked ``slow``;
``pytest -m "not slow"`` leaves them out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import zipfile
from importlib import resources
from pathlib import Path

import pytest

import ferrotune
from ferrotune import azureml as az
from tests.support import azure_node, azure_wheels
from tests.support.inference_server import InferenceServer, free_port
from tests.support.venvs import ROOT
from tests.test_azureml import _NO_NETWORK_ENV, _markers, local_paths, run_side, side_python  # noqa: F401

pytestmark = [
    pytest.mark.slow,
    # a developer's dist-cuda/ wheel older than their edits is warned about (tested in
    # test_azureml.py); these rehearsals run the CPU wheel and must not depend on it
    pytest.mark.filterwarnings(r"ignore:the CUDA wheel dist-cuda/.* is older than:UserWarning"),
]

EXPERIMENT = "rehearsal"
# The stand-in for Azure ML's tracking server is an MLflow file store (Azure ML's own is an
# azureml:// URI served by azureml-mlflow); MLflow 3 wants this opt-in for file stores.
MLFLOW_FILE_STORE = {"MLFLOW_ALLOW_FILE_STORE": "true"}


# ---------------------------------------------------------------------------------------
# The wheel, built from the checkout once per session
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wheel-cache")


@pytest.fixture(scope="session")
def checkout_wheel(wheel_cache) -> Path:
    return azure_wheels.checkout_wheel(wheel_cache)


def test_default_wheel_is_built_from_the_checkout_once(checkout_wheel, wheel_cache, monkeypatch):
    name = checkout_wheel.name
    assert re.fullmatch(rf"ferrotune-{re.escape(ferrotune.__version__)}-cp310-abi3-(manylinux_\d+_\d+|linux)_x86_64\.whl", name)
    assert checkout_wheel.parent.parent == wheel_cache / "built"
    with zipfile.ZipFile(checkout_wheel) as z:
        names = set(z.namelist())
    assert {"ferrotune/_core.abi3.so", "ferrotune/azureml/__init__.py", "ferrotune/azureml/_node_install.py",
            "ferrotune/_serving/score.py"} <= names
    from ferrotune.azureml.wheels import read_wheel

    w = read_wheel(checkout_wheel)
    assert w.cuda is None and w.version == ferrotune.__version__ and "numpy>=1.22" in w.requires
    # the same sources: the same file, not rebuilt
    before = checkout_wheel.stat()
    monkeypatch.setenv("FERROTUNE_WHEEL_CACHE", str(wheel_cache))
    again = az.default_wheels()
    assert again[0] == checkout_wheel and all("+cu" in Path(p).name for p in again[1:])  # + dist-cuda/'s, if any
    after = checkout_wheel.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


# ---------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------

JOB = r"""
import os
from pathlib import Path
import yaml
import ferrotune.azureml as az
from azure.ai.ml import load_job
from tests.support.azure_fixtures import dump_and_load

tmp = Path(ARGS["tmp"])
os.environ["FERROTUNE_WHEEL_CACHE"] = ARGS["cache"]
job = az.finetune_job(model=ARGS["model"], train_file=ARGS["train"], compute="cpu-cluster",
                      finetune_parameters=ARGS["params"], wheels=[ARGS["wheel"]], experiment_name=ARGS["experiment"],
                      gpus_per_node=ARGS.get("processes", 1))
text, loaded = dump_and_load(job, tmp / "job.yml", load_job)
y = yaml.safe_load(text)
result = {
    "command": loaded.command, "code": str(loaded.code), "inputs": y["inputs"], "outputs": y["outputs"],
    "image": loaded.environment.image, "conda": loaded.environment.conda_file,
    "environment_variables": dict(loaded.environment_variables or {}), "distribution": y.get("distribution"),
    "yaml": y,
}
"""


def _pip_part(conda: dict) -> list:
    (pip,) = [d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d]
    return pip


def _mlflow_run(image_python: Path, store: Path) -> tuple:
    """A run in an MLflow file store, as the launcher creates the job's run: (uri, run id)."""
    uri = store.as_uri()
    code = (
        "import sys, mlflow\n"
        "c = mlflow.MlflowClient(sys.argv[1])\n"
        f"e = c.create_experiment({EXPERIMENT!r})\n"
        "print(e, c.create_run(e).info.run_id)\n"
    )
    r = subprocess.run([str(image_python), "-c", code, uri], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **MLFLOW_FILE_STORE})
    assert r.returncode == 0, r.stderr[-3000:]
    experiment_id, run_id = r.stdout.split()[-2:]
    return uri, experiment_id, run_id


def _node(job: dict, image_python: Path, node: Path, inputs: dict, outputs: Path, mlflow: tuple) -> dict:
    """One node running the job: fresh container, the code folder as working directory."""
    node.mkdir(parents=True)
    python = azure_node.container_venv(image_python, node / "container")
    workdir = azure_node.copy_code(Path(job["code"]), node / "wd")
    bound_outputs = {name: outputs / name for name in job["outputs"]}
    for folder in bound_outputs.values():
        folder.mkdir(parents=True, exist_ok=True)  # Azure ML mounts the outputs before the command starts
    command = azure_node.substitute(job["command"], inputs, bound_outputs)
    uri, experiment_id, run_id = mlflow
    env = {
        # what the launcher sets and ferrotune (MLflow) reads
        "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": experiment_id, "MLFLOW_RUN_ID": run_id,
        "AZUREML_RUN_ID": run_id, **MLFLOW_FILE_STORE,
        **{f"AZURE_ML_INPUT_{k}": str(v) for k, v in inputs.items()},
        **{f"AZURE_ML_OUTPUT_{k}": str(v) for k, v in bound_outputs.items()},
        **job["environment_variables"],
    }
    proc = azure_node.run_command(command, node / "container", workdir, env)
    return {"proc": proc, "python": python, "container": node / "container", "workdir": workdir,
            "outputs": bound_outputs, "command": command}


@pytest.fixture(scope="module")
def job_run(side_python, checkout_wheel, tmp_path_factory) -> dict:
    """The job built by finetune_job, run once on a stand-in node."""
    tmp = tmp_path_factory.mktemp("job")
    hf_cache = tmp / "hf-cache"
    from ferrotune.demo import DEMO_MODEL, DEMO_PARAMETERS, seed_cache

    old = {k: os.environ.get(k) for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_HUB_CACHE=str(hf_cache), HF_HUB_OFFLINE="1")
    try:
        repo = seed_cache(hf_cache)
        data = ferrotune.download_dataset(repo, tmp / "data", split_pc=25, progress=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    tokenizer = str(resources.files("ferrotune") / "_sample" / "phi3-tokenizer")
    model = ferrotune.create_random_model(str(tmp / "tiny-phi3"), DEMO_MODEL, seed=0, tokenizer=tokenizer)
    params = {**DEMO_PARAMETERS, "device": "cpu", "num_train_epochs": 1, "max_steps": 6, "save_strategy": "steps",
              "save_steps": 3, "logging_steps": 1, "max_seq_length": 512}
    job = run_side(side_python, JOB, tmp, tmp=str(tmp), cache=str(tmp / "wheel-cache"), model=str(model),
                   train=str(data["train_sft"].path), params=params, wheel=str(checkout_wheel), experiment=EXPERIMENT)
    image = azure_node.image_venv("rehearsal-train-image", _pip_part(job["conda"]))
    mlflow = _mlflow_run(image, tmp / "mlruns")
    inputs = {"model": Path(model), "train_file": Path(data["train_sft"].path)}
    first = _node(job, image, tmp / "node-1", inputs, tmp / "outputs", mlflow)
    return {"tmp": tmp, "job": job, "image": image, "mlflow": mlflow, "inputs": inputs, "first": first,
            "data": data, "wheel": checkout_wheel, "params": params}


def test_job_rehearsal(job_run):
    job, first = job_run["job"], job_run["first"]
    proc = first["proc"]
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    wheel = job_run["wheel"].name

    # the spec the node got: the CUDA 12 image, ferrotune's dependencies, no ferrotune
    assert job["image"] == az.CUDA_IMAGE
    pip = _pip_part(job["conda"])
    assert "numpy>=1.22" in pip and "mlflow-skinny" in pip and not any(p.startswith("ferrotune") for p in pip)
    assert job["inputs"]["model"]["type"] == "uri_folder" and job["inputs"]["train_file"]["type"] == "uri_file"
    assert sorted(p.name for p in Path(job["code"]).rglob("*") if p.is_file()) == sorted(["install_ferrotune.py", wheel])
    assert local_paths(job["yaml"], _markers(job_run["tmp"]) + [str(ROOT)],
                       {("code",), ("inputs", "model", "path"), ("inputs", "train_file", "path")}) == []

    # the installer chose the CPU wheel (no GPU here) and installed it into the container
    assert f"ferrotune: installed {wheel} (device=cpu: training on the CPU)" in proc.stdout
    where = azure_node.installed_from(first["python"])
    assert where is not None and where.startswith(str(first["container"]) + "/"), where
    # inside the container, the installed ferrotune knows the wheel it came from
    r = subprocess.run([str(first["python"]), "-c",
                        "import json, ferrotune.azureml as az; print(json.dumps([str(p) for p in az.default_wheels()]))"],
                       capture_output=True, text=True, cwd=first["workdir"],
                       env={"PATH": "/usr/bin:/bin", "HOME": str(first["workdir"].parent / "home"),
                            "FERROTUNE_WHEEL_CACHE": str(first["workdir"].parent / "wheel-cache")})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [str(first["workdir"] / "wheels" / wheel)]

    # what the registration step reads: an MLflow model folder in the trained_model output
    trained = first["outputs"]["trained_model"]
    for name in ("MLmodel", "score.py", "conda.yaml", "data/model/config.json", "data/tokenizer/tokenizer.json"):
        assert (trained / name).is_file(), name
    assert list((trained / "data" / "model").glob("*.safetensors"))
    import mlflow.models

    assert "python_function" in mlflow.models.Model.load(str(trained / "MLmodel")).flavors
    # metrics reached the job's MLflow run
    uri, _, run_id = job_run["mlflow"]
    code = ("import sys, mlflow\nc = mlflow.MlflowClient(sys.argv[1])\n"
            "print(len(c.get_metric_history(sys.argv[2], 'loss')))\n")
    r = subprocess.run([str(job_run["image"]), "-c", code, uri, run_id], capture_output=True, text=True,
                       env={**os.environ, **MLFLOW_FILE_STORE})
    assert r.returncode == 0 and int(r.stdout.split()[-1]) >= 1, (r.stdout, r.stderr[-2000:])
    # the checkpoints went to their output (save_steps 3, max_steps 6)
    checkpoints = sorted(p.name for p in first["outputs"]["checkpoints"].iterdir())
    assert checkpoints == ["checkpoint-3", "checkpoint-6"], checkpoints


def test_a_data_parallel_job_on_one_node(job_run, side_python):
    """The job with two processes on one node (``gpus_per_node=2``: a PyTorchDistribution):
    Azure ML starts the command once per process, with the launcher's RANK / LOCAL_RANK /
    WORLD_SIZE / MASTER_ADDR / MASTER_PORT, in one container. Both run the installer at the
    same time (one installs, the other waits for it and finds it done), train together, and
    rank 0 alone packages the model into trained_model."""
    tmp = job_run["tmp"] / "parallel"
    tmp.mkdir()
    job = run_side(side_python, JOB, tmp, tmp=str(tmp), cache=str(tmp / "wheel-cache"),
                   model=str(job_run["inputs"]["model"]), train=str(job_run["inputs"]["train_file"]),
                   params=job_run["params"], wheel=str(job_run["wheel"]), experiment=EXPERIMENT, processes=2)
    assert job["distribution"] == {"type": "pytorch", "process_count_per_instance": 2}
    node = tmp / "node"
    node.mkdir()
    python = azure_node.container_venv(job_run["image"], node / "container")
    workdir = azure_node.copy_code(Path(job["code"]), node / "wd")
    outputs = {name: tmp / "outputs" / name for name in job["outputs"]}
    for folder in outputs.values():
        folder.mkdir(parents=True)
    command = azure_node.substitute(job["command"], job_run["inputs"], outputs)
    port = str(free_port())
    procs = [
        azure_node.start_command(command, node / "container", workdir, {
            "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
        })
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [(o[0][-3000:], o[1][-3000:]) for o in outs]
    wheel = job_run["wheel"].name
    installs = sorted(line for o in outs for line in o[0].splitlines() if line.startswith("ferrotune: "))
    assert installs == sorted([f"ferrotune: installed {wheel} (device=cpu: training on the CPU)",
                               f"ferrotune: already installed: {wheel} (device=cpu: training on the CPU)"]), outs
    assert azure_node.installed_from(python).startswith(str(node / "container") + "/")
    summary = json.loads((workdir / "ferrotune_work" / "train_summary.json").read_text())
    assert summary["global_step"] == 6
    assert (outputs["trained_model"] / "MLmodel").is_file()
    assert "ferrotune_model" in outs[0][0] and "ferrotune_model" not in outs[1][0]  # only rank 0 packaged


def test_a_resubmitted_job_resumes_from_its_checkpoints_output(job_run):
    """The job again, on a fresh node, with the same outputs: it resumes from the newest
    checkpoint there (as if the first node had been preempted after step 3's checkpoint)."""
    assert job_run["first"]["proc"].returncode == 0
    checkpoints = job_run["tmp"] / "outputs" / "checkpoints"
    shutil.rmtree(checkpoints / "checkpoint-6")  # preempted before step 6 was saved
    second = _node(job_run["job"], job_run["image"], job_run["tmp"] / "node-2", job_run["inputs"],
                   job_run["tmp"] / "outputs", job_run["mlflow"])
    proc = second["proc"]
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    summary = json.loads((second["workdir"] / "ferrotune_work" / "train_summary.json").read_text())
    assert Path(summary["resumed_from"]).name == "checkpoint-3", summary.get("resumed_from")
    assert summary["global_step"] == 6
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert (second["outputs"]["trained_model"] / "MLmodel").is_file()


# ---------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------

DEPLOYMENT = r"""
import os
from pathlib import Path
import yaml
import ferrotune.azureml as az
from azure.ai.ml import load_online_deployment
from tests.support.azure_fixtures import dump_and_load

tmp = Path(ARGS["tmp"])
os.environ["FERROTUNE_WHEEL_CACHE"] = ARGS["cache"]
dep = az.build_deployment(ARGS["model"], "ultrachat-completion-rehearsal", instance_type="Standard_E8s_v3",
                          code_dir=tmp / "code", wheels=[ARGS["wheel"]])
text, d = dump_and_load(dep, tmp / "deployment.yml", load_online_deployment)
result = {"code": str(d.code_configuration.code), "scoring_script": d.code_configuration.scoring_script,
          "build": str(d.environment.build.path), "dockerfile": d.environment.build.dockerfile_path,
          "instance_type": d.instance_type, "yaml": yaml.safe_load(text)}
"""


def test_deployment_rehearsal(job_run, side_python, tmp_path):
    """The deployment of the job's trained_model: image from the build context, the wheel
    installed by its requirements.txt, score.py under the real inference server."""
    assert job_run["first"]["proc"].returncode == 0
    trained = job_run["first"]["outputs"]["trained_model"]
    spec = run_side(side_python, DEPLOYMENT, tmp_path, tmp=str(tmp_path), cache=str(tmp_path / "wheel-cache"),
                    model=str(trained), wheel=str(job_run["wheel"]))
    wheel = job_run["wheel"].name
    build = Path(spec["build"])
    assert sorted(p.name for p in build.iterdir()) == sorted(["Dockerfile", "requirements.txt", wheel])
    dockerfile = (build / spec["dockerfile"]).read_text()
    assert f"FROM {az.CPU_INFERENCE_IMAGE}\n" in dockerfile
    # the Dockerfile's install step, run in a fresh container of an image with the same spec
    m = re.search(r"&& (\S+/bin/python) -m pip install (.*?) -r requirements.txt", dockerfile)
    assert m, dockerfile
    requirements = (build / "requirements.txt").read_text().split()
    assert requirements[-1] == f"./{wheel}"
    image = azure_node.image_venv("rehearsal-serve-image", requirements[:-1])
    container = azure_node.container_venv(image, tmp_path / "container")
    r = subprocess.run([str(container), "-m", "pip", "install", *m.group(2).split(), "-r", "requirements.txt"],
                       cwd=build, capture_output=True, text=True, timeout=600,
                       env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}})
    assert r.returncode == 0, r.stderr[-4000:]
    where = azure_node.installed_from(container)
    assert where is not None and where.startswith(str(tmp_path / "container")), where

    # the registered model, mounted one level below AZUREML_MODEL_DIR, as Azure ML mounts it
    model_root = tmp_path / "azureml-models" / "Phi-3-mini-4k-instruct-ultrachat-200k" / "1"
    shutil.copytree(trained, model_root / "trained_model")
    # the notebook's request: a test_gen row, the notebook's parameters
    test_gen = [json.loads(line) for line in Path(job_run["data"]["test_gen"].path).read_text().splitlines()]
    request = az.sample_request(test_gen[0]["messages"], az.DEFAULT_PARAMETERS)
    sample_score = tmp_path / "sample_score.json"
    sample_score.write_text(json.dumps(request))
    server = InferenceServer(container, Path(spec["code"]), spec["scoring_script"], model_root,
                             tmp_path / "server.log", env=_NO_NETWORK_ENV)
    with server:
        status, body = server.score(sample_score.read_text())
        assert status == 200, (body, server.log_tail())
        assert isinstance(body["output"], list) and len(body["output"]) == 1 and isinstance(body["output"][0], str)
