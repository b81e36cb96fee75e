"""``ferrotune.azureml``: the notebook's Azure ML steps, with ferrotune doing the work.

The "fine-tune Phi-3-mini on ultrachat_200k" notebook talks to Azure ML in seven places:
it builds an ``MLClient``, checks the GPU compute, runs the fine-tuning pipeline, registers
the model, deploys it to a managed online endpoint, scores a sample and deletes the
endpoint. This module gives each step one function, with the notebook's settings as
defaults, and catches on the laptop the mistakes that otherwise surface after an hour of
provisioning:

==========================  ==============================================================
:func:`client`              ``MLClient`` from ``config.json`` (or explicit ids), no network
:func:`check_compute`       the compute exists, is not in a failed state and has GPUs
:func:`finetune_job`        a command job running ``ferrotune finetune`` + ``ferrotune
                            package`` on the compute, parameters checked before submitting
:func:`register_model`      the job's ``trained_model`` output (or a local MLflow folder)
:func:`deploy`              endpoint (key auth) + deployment (probe 600 s, timeout 90 s) +
                            100 % traffic, after checking that the instance type can hold
                            the model
:func:`invoke`              the notebook's request shape, parsed JSON back
:func:`delete`              deletes the endpoint
==========================  ==============================================================

The ``build_*`` / ``*_environment`` functions return the SDK entities these functions
submit, so they can be inspected, changed or dumped to YAML first.

In a notebook::

    from ferrotune import azureml as az

    ml_client = az.client()                                  # config.json, as from_config
    gpus = az.check_compute(ml_client, "gpu-cluster")
    job = az.finetune_job(model=foundation_model, compute="gpu-cluster",  # one GPU per job
                          train_file="ultrachat_200k_dataset/train_sft.jsonl",
                          finetune_parameters=finetune_parameters)  # validation: last 20 % of train
    job = ml_client.jobs.create_or_update(job)
    ml_client.jobs.stream(job.name)
    model = az.register_model(ml_client, job, "Phi-3-mini-4k-instruct-ultrachat-200k")
    az.deploy(ml_client, model, "ultrachat-completion-" + timestamp)
    az.invoke(ml_client, "ultrachat-completion-" + timestamp, test_df["messages"][0])
    az.delete(ml_client, "ultrachat-completion-" + timestamp)

The Azure ML SDK is an optional extra (``pip install "ferrotune[azure]"``): this module
imports without it and only the functions that need the SDK ask for it.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shlex
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .exceptions import FerrotuneError, FerrotuneFileNotFoundError, InvalidArgumentError, ModelError
from .packaging import read_safetensors_header

__all__ = [
    # errors
    "AzureMLError",
    "AzureExtraMissingError",
    "WorkspaceConfigError",
    "ComputeTargetError",
    # the notebook's steps
    "client",
    "check_compute",
    "finetune_job",
    "register_model",
    "deploy",
    "sample_request",
    "invoke",
    "delete",
    # the entities behind them
    "training_environment",
    "inference_environment",
    "build_model",
    "build_endpoint",
    "build_deployment",
    "write_scoring_code",
    # sizing
    "InstanceType",
    "INSTANCE_TYPES",
    "ServingMemory",
    "serving_memory",
    "check_instance_type",
    # constants
    "DEFAULT_EXPERIMENT",
    "DEFAULT_PARAMETERS",
    "TRAINING_IMAGE",
    "CPU_INFERENCE_IMAGE",
    "GPU_INFERENCE_IMAGE",
    "WORK_DIR",
    "PACKAGE_DIR",
]

PathLike = Union[str, "os.PathLike[str]"]

_INSTALL_HINT = 'pip install "ferrotune[azure]"'

#: the notebook's experiment name
DEFAULT_EXPERIMENT = "chat_completion_Phi-3-mini-4k-instruct"

#: the notebook's scoring parameters (``sample_score.json``)
DEFAULT_PARAMETERS: dict = {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200}

#: Azure ML's CUDA base image (Ubuntu 22.04, conda, OpenMPI); the training environment adds
#: Python 3.11 and ferrotune on top. The CUDA build of ferrotune brings its own CUDA 13
#: libraries from pip (it needs an NVIDIA driver >= R580 on the node), so the image's
#: CUDA version does not matter to it.
TRAINING_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04:latest"
#: Azure ML's minimal CPU inference image (Python 3.11, the inference server's prerequisites)
CPU_INFERENCE_IMAGE = "mcr.microsoft.com/azureml/minimal-ubuntu22.04-py311-cpu-inference:latest"
#: the image for GPU instance types (the CUDA base image; see TRAINING_IMAGE)
GPU_INFERENCE_IMAGE = TRAINING_IMAGE

#: where ``ferrotune finetune`` writes checkpoints, adapter and merged model inside the job
#: (the job's working directory on the node's disk); only the packaged MLflow model is
#: uploaded, as the ``trained_model`` output
WORK_DIR = "ferrotune_work"
#: where ``ferrotune package`` writes the MLflow folder on the node's disk (the weights are
#: hard links into WORK_DIR); it is then copied into the ``trained_model`` output. Not
#: written into the output directly: Azure ML creates the output folder (a mount) before
#: the job starts, and ``ferrotune package`` builds its folder beside the target and
#: renames it into place, which a mount point does not allow.
PACKAGE_DIR = "ferrotune_model"

_GIB = 1024**3


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class AzureMLError(FerrotuneError):
    """A problem in the Azure ML layer (workspace, compute, endpoint), caught before or
    instead of an opaque SDK error."""


class AzureExtraMissingError(AzureMLError, ImportError):
    """The Azure ML SDK (``azure-ai-ml``, ``azure-identity``) is not installed or does not
    import; ``pip install "ferrotune[azure]"`` installs it."""


class WorkspaceConfigError(AzureMLError):
    """No usable workspace configuration: no ``config.json`` was found, it is not valid, or
    the explicit ids are incomplete. The message says where ferrotune looked."""


class ComputeTargetError(AzureMLError, ValueError):
    """The compute or instance type cannot run the job or serve the model: it does not
    exist, is in a failed state, has no GPUs, or has too little memory for the model.

    Also a ``ValueError``, like the notebook's own checks."""


# ---------------------------------------------------------------------------------------
# The SDK, imported when first needed
# ---------------------------------------------------------------------------------------


class _Sdk:
    """The parts of ``azure.ai.ml`` this module uses, imported once."""

    def __init__(self) -> None:
        try:
            ml = importlib.import_module("azure.ai.ml")
            entities = importlib.import_module("azure.ai.ml.entities")
            constants = importlib.import_module("azure.ai.ml.constants")
            core_exc = importlib.import_module("azure.core.exceptions")
        except ImportError as e:
            raise AzureExtraMissingError(
                f"ferrotune.azureml needs the Azure ML SDK: {_INSTALL_HINT} "
                f"(importing it failed: {e})"
            ) from e
        self.ml = ml
        self.MLClient = ml.MLClient
        self.Input = ml.Input
        self.Output = ml.Output
        self.command = ml.command
        self.PyTorchDistribution = ml.PyTorchDistribution
        self.Model = entities.Model
        self.Environment = entities.Environment
        self.ManagedOnlineEndpoint = entities.ManagedOnlineEndpoint
        self.ManagedOnlineDeployment = entities.ManagedOnlineDeployment
        self.CodeConfiguration = entities.CodeConfiguration
        self.ProbeSettings = entities.ProbeSettings
        self.OnlineRequestSettings = entities.OnlineRequestSettings
        self.AssetTypes = constants.AssetTypes
        self.ResourceNotFoundError = core_exc.ResourceNotFoundError


_SDK: Optional[_Sdk] = None


def _sdk() -> _Sdk:
    global _SDK
    if _SDK is None:
        _SDK = _Sdk()
    return _SDK


def _ferrotune_version() -> str:
    from . import __version__

    return __version__


def _requirement(ferrotune_requirement: Optional[str]) -> str:
    if ferrotune_requirement is None:
        return f"ferrotune=={_ferrotune_version()}"
    if not isinstance(ferrotune_requirement, str) or not ferrotune_requirement.strip():
        raise InvalidArgumentError(
            f"ferrotune_requirement={ferrotune_requirement!r}: expected a pip requirement, e.g. "
            "'ferrotune==0.1.0' or the URL of a (CUDA) wheel"
        )
    return ferrotune_requirement.strip()


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name}={value!r} is not valid: expected an integer >= 1")
    return value


# ---------------------------------------------------------------------------------------
# 1. MLClient
# ---------------------------------------------------------------------------------------

# What MLClient.from_config searches, in this order, from the start folder upwards.
_CONFIG_DIRS = (".azureml", "aml_config", None)
_CONFIG_FILES = ("config.json", "project.json")
_SCOPE_RE = re.compile(
    r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)"
    r"/providers/Microsoft\.MachineLearningServices/workspaces/(?P<ws>[^/]+)",
    re.IGNORECASE,
)


def _find_config(start: Path) -> Optional[Path]:
    for sub in _CONFIG_DIRS:
        for name in _CONFIG_FILES:
            folder = start
            for _ in range(21):
                candidate = (folder / sub / name) if sub else (folder / name)
                if candidate.is_file():
                    return candidate
                if folder.parent == folder:
                    break
                folder = folder.parent
    return None


def _read_config(path: Path) -> tuple[str, str, str]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise WorkspaceConfigError(f"cannot read the workspace config {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise WorkspaceConfigError(f"the workspace config {path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise WorkspaceConfigError(f"the workspace config {path} is not a JSON object")
    scope = cfg.get("Scope") or cfg.get("scope")
    if isinstance(scope, str) and (m := _SCOPE_RE.search(scope)):
        return m["sub"], m["rg"], m["ws"]
    values = (cfg.get("subscription_id"), cfg.get("resource_group"), cfg.get("workspace_name"))
    missing = [k for k, v in zip(("subscription_id", "resource_group", "workspace_name"), values) if not v]
    if missing:
        raise WorkspaceConfigError(
            f"the workspace config {path} lacks {', '.join(missing)}: download config.json again from the "
            "Azure portal (your Azure Machine Learning workspace, Overview, 'Download config.json')"
        )
    return values  # type: ignore[return-value]


def client(
    config_path: Optional[PathLike] = None,
    *,
    subscription_id: Optional[str] = None,
    resource_group: Optional[str] = None,
    workspace: Optional[str] = None,
    credential: Any = None,
    **kwargs: Any,
) -> Any:
    """An ``MLClient`` for the workspace, like the notebook's ``MLClient.from_config``.

    Nothing is sent over the network here: the first call that needs Azure (e.g.
    :func:`check_compute`) signs in.

    Args:
        config_path: the workspace's ``config.json`` (download it from the Azure portal:
            the workspace's Overview page, "Download config.json"), or a folder to start
            the search from. Default: search the current folder and its parents for
            ``config.json`` / ``project.json``, also in ``.azureml/`` and ``aml_config/``
            sub-folders (where ``MLClient.from_config`` looks).
        subscription_id, resource_group, workspace: the workspace's ids instead of a
            config file (all three, or none).
        credential: an ``azure.identity`` credential. Default:
            ``DefaultAzureCredential()`` (Azure CLI login, managed identity on an Azure
            ML compute instance, environment variables, ...); pass
            ``InteractiveBrowserCredential()`` to sign in through a browser.
        **kwargs: passed on to ``MLClient`` (e.g. ``cloud=``).

    Returns:
        ``azure.ai.ml.MLClient``

    Raises:
        WorkspaceConfigError: no config file found (the message names the folders
            searched), a config file without the three ids, or only some explicit ids.
        AzureExtraMissingError: the Azure ML SDK is not installed.
    """
    explicit = {"subscription_id": subscription_id, "resource_group": resource_group, "workspace": workspace}
    given = [k for k, v in explicit.items() if v]
    if given and config_path is not None:
        raise WorkspaceConfigError("pass either config_path or subscription_id/resource_group/workspace, not both")
    if given and len(given) < 3:
        missing = [k for k in explicit if k not in given]
        raise WorkspaceConfigError(
            f"{', '.join(given)} given but not {', '.join(missing)}: pass all three ids, or none to read config.json"
        )
    if given:
        ids = (str(subscription_id), str(resource_group), str(workspace))
    else:
        start = Path(config_path) if config_path is not None else Path.cwd()
        if config_path is not None and start.is_file():
            found: Optional[Path] = start
        elif config_path is not None and not start.exists():
            raise WorkspaceConfigError(
                f"the workspace config {start} does not exist. Download config.json from the Azure portal "
                "(your Azure Machine Learning workspace, Overview, 'Download config.json'), or pass "
                "subscription_id=, resource_group= and workspace="
            )
        else:
            found = _find_config(start.resolve())
        if found is None:
            raise WorkspaceConfigError(
                f"no Azure ML workspace config found: looked for config.json (and project.json, also in "
                f".azureml/ and aml_config/) in {start.resolve()} and its parent folders. Download config.json "
                "from the Azure portal (your Azure Machine Learning workspace, Overview, 'Download config.json') "
                "into this folder, or call ferrotune.azureml.client(subscription_id=..., resource_group=..., "
                "workspace=...)"
            )
        ids = _read_config(found)
    sdk = _sdk()
    if credential is None:
        try:
            identity = importlib.import_module("azure.identity")
        except ImportError as e:
            raise AzureExtraMissingError(
                f"ferrotune.azureml.client needs azure-identity for its default credential: {_INSTALL_HINT} "
                f"(importing it failed: {e})"
            ) from e
        credential = identity.DefaultAzureCredential()
    return sdk.MLClient(
        credential,
        subscription_id=ids[0],
        resource_group_name=ids[1],
        workspace_name=ids[2],
        **kwargs,
    )


# ---------------------------------------------------------------------------------------
# 2. The compute
# ---------------------------------------------------------------------------------------

# K80 sizes the fine-tuning pipeline refuses (the notebook's list)
_UNSUPPORTED_TRAINING_SIZES = ("standard_nc6", "standard_nc12", "standard_nc24", "standard_nc24r")


def check_compute(ml_client: Any, compute_name: str) -> int:
    """Checks a compute cluster the way the notebook does and returns its GPUs per node.

    Args:
        ml_client: the workspace ``MLClient``.
        compute_name: the compute's name in the workspace.

    Returns:
        the number of GPUs of one node (for :func:`finetune_job`'s ``gpus_per_node``).

    Raises:
        ComputeTargetError: the compute does not exist, its provisioning failed, its VM size
            is one the fine-tuning stack does not support (K80 ``Standard_NC6``...), the
            size is not in the workspace's size list, or it has no GPUs.
    """
    sdk = _sdk()
    if not isinstance(compute_name, str) or not compute_name:
        raise InvalidArgumentError(f"compute_name={compute_name!r}: expected the compute's name")
    try:
        compute = ml_client.compute.get(compute_name)
    except sdk.ResourceNotFoundError:
        raise ComputeTargetError(
            f"compute {compute_name!r} does not exist in this workspace: create it first, e.g. "
            f"ml_client.begin_create_or_update(AmlCompute(name={compute_name!r}, size='Standard_NC24ads_A100_v4', "
            "min_instances=0, max_instances=1)).result()"
        ) from None
    state = getattr(compute, "provisioning_state", None) or ""
    state = str(getattr(state, "value", state))  # the SDK gives a str enum: str() would say "ProvisioningState.FAILED"
    if state.lower() == "failed":
        raise ComputeTargetError(
            f"compute {compute_name!r} is in a failed state (provisioning failed): delete it and create it again, "
            "or use another compute"
        )
    size = getattr(compute, "size", None)
    if not size:
        raise ComputeTargetError(
            f"compute {compute_name!r} ({getattr(compute, 'type', 'unknown type')}) has no VM size; "
            "use an Azure ML compute cluster (AmlCompute) with GPUs"
        )
    if size.lower() in _UNSUPPORTED_TRAINING_SIZES:
        raise ComputeTargetError(
            f"VM size {size} (K80) of compute {compute_name!r} is not supported for fine-tuning; "
            "use e.g. Standard_NC24ads_A100_v4 or Standard_NC6s_v3"
        )
    sizes = list(ml_client.compute.list_sizes())
    gpus: Optional[int] = None
    for sku in sizes:
        if str(getattr(sku, "name", "")).lower() == size.lower():
            gpus = int(getattr(sku, "gpus", 0) or 0)
            break
    if gpus is None:
        names = sorted(str(getattr(s, "name", "")) for s in sizes)
        raise ComputeTargetError(
            f"VM size {size} of compute {compute_name!r} is not in the workspace's list of sizes "
            f"({len(names)} available: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}); "
            "check the compute"
        )
    if gpus < 1:
        raise ComputeTargetError(
            f"compute {compute_name!r} has no GPUs (VM size {size}): fine-tuning needs a GPU compute, "
            "e.g. Standard_NC24ads_A100_v4 (1 x A100 80 GB) or Standard_NC6s_v3 (1 x V100 16 GB)"
        )
    return gpus


# ---------------------------------------------------------------------------------------
# 3. The fine-tuning job
# ---------------------------------------------------------------------------------------

_URI_RE = re.compile(r"^(azureml:|https?://|wasbs?://|abfss?://|adl://|gs://|s3://)", re.IGNORECASE)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_input(obj: Any) -> bool:
    try:
        return isinstance(obj, _sdk().Input)
    except AzureExtraMissingError:
        return False


def _model_input(model: Any) -> tuple[Any, str]:
    """``(job input, short name for the display name)`` for finetune_job's ``model``."""
    sdk = _sdk()
    if _is_input(model):
        return model, "model"
    if isinstance(model, sdk.Model):
        if not model.id:
            raise InvalidArgumentError(
                f"model {model.name!r} is not registered (no id): pass a registered model, e.g. "
                "registry_ml_client.models.get('Phi-3-mini-4k-instruct', label='latest'), or a folder"
            )
        return sdk.Input(type=model.type or sdk.AssetTypes.MLFLOW_MODEL, path=model.id), str(model.name)
    if not isinstance(model, (str, os.PathLike)) or not os.fspath(model):
        raise InvalidArgumentError(
            f"model={model!r}: expected a registered model (e.g. foundation_model), its id, a local model "
            "folder or a Hugging Face Hub id"
        )
    s = os.fspath(model)
    short = re.split(r"[/:@]", s.rstrip("/"))[-1] or "model"
    if _URI_RE.match(s):
        if "/models/" in s or (s.lower().startswith("azureml:") and not s.lower().startswith("azureml://")):
            # a model asset: azureml://registries/azureml/models/NAME/versions/N, azureml:NAME:VERSION
            m = re.search(r"/models/([^/]+)", s) or re.match(r"azureml:([^:@/]+)", s, re.IGNORECASE)
            return sdk.Input(type=sdk.AssetTypes.MLFLOW_MODEL, path=s), (m.group(1) if m else short)
        return sdk.Input(type=sdk.AssetTypes.URI_FOLDER, path=s), short
    p = Path(s).expanduser()
    if p.is_dir():
        return sdk.Input(type=sdk.AssetTypes.URI_FOLDER, path=str(p.resolve())), p.resolve().name
    if p.exists():
        raise InvalidArgumentError(f"model={s!r} is a file; expected a model folder (config.json + *.safetensors)")
    if _HUB_ID_RE.match(s) and not s.startswith("."):
        # A literal input: the job downloads the model from the Hugging Face Hub.
        return s, short
    raise FerrotuneFileNotFoundError(
        f"model={s!r}: no such folder, and not a Hugging Face Hub id (owner/name) or an azureml:// id"
    )


def _file_input(name: str, value: Any) -> Any:
    sdk = _sdk()
    if _is_input(value):
        return value
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise InvalidArgumentError(f"{name}={value!r}: expected a local file, an azureml:// or https:// URI")
    s = os.fspath(value)
    if _URI_RE.match(s):
        return sdk.Input(type=sdk.AssetTypes.URI_FILE, path=s)
    p = Path(s).expanduser()
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise FerrotuneFileNotFoundError(f"{name}={s!r} {what}; expected a JSONL or Parquet file of conversations")
    return sdk.Input(type=sdk.AssetTypes.URI_FILE, path=str(p.resolve()))


def _flag_value(value: Any) -> str:
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return "true" if value else "false"
    if isinstance(value, float):  # numpy floats too; repr(float) is exact and short ("5e-06")
        return repr(float(value))
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def _finetune_flags(params: Mapping[str, Any], has_validation: bool) -> list:
    """The ``--name value`` flags for ``ferrotune finetune``, after checking every
    parameter with ferrotune's own table (the same check the job will run)."""
    ft = importlib.import_module("ferrotune.finetune")
    if not isinstance(params, Mapping):
        raise InvalidArgumentError(f"finetune_parameters must be a dict, not {type(params).__name__}")
    # Checked here, on the laptop, exactly as `ferrotune finetune` will check them on the node.
    ft.build_config("model", "train.jsonl", "validation.jsonl" if has_validation else None, WORK_DIR, params)
    flags: list = []
    for key, value in params.items():
        name = ft._normalize_key(key)
        name = ft._ALIASES.get(name, name)
        if name == "token" and value is not None:
            raise InvalidArgumentError(
                "finetune_parameters['token']: a token in the job's command line is visible to everyone who can "
                "see the job; leave it out (set HF_TOKEN on the compute instead)"
            )
        if value is None:
            continue  # "not set": the pipeline's default
        flags += [f"--{name}", shlex.quote(_flag_value(value))]
    return flags


def training_environment(ferrotune_requirement: Optional[str] = None) -> Any:
    """The default environment of :func:`finetune_job`: Azure ML's CUDA base image with
    Python 3.11, ferrotune and MLflow (so training metrics show in Azure ML studio).

    Azure ML builds it once and reuses the image for later jobs with the same spec.

    Args:
        ferrotune_requirement: what pip installs; default ``ferrotune==<this version>``.
            For GPU training pass the CUDA wheel (its URL or ``ferrotune==X+cu13`` from
            your index): the default wheel from PyPI trains on the CPU.

    Returns:
        ``azure.ai.ml.entities.Environment``
    """
    sdk = _sdk()
    req = _requirement(ferrotune_requirement)
    conda = {
        "name": "ferrotune-train",
        "channels": ["conda-forge"],
        "dependencies": ["python=3.11", "pip", {"pip": [req, "mlflow-skinny", "azureml-mlflow"]}],
    }
    # anonymous (no name): Azure ML keys it by its content and reuses the built image
    return sdk.Environment(
        description=f"ferrotune fine-tuning ({req}) on {TRAINING_IMAGE}",
        image=TRAINING_IMAGE,
        conda_file=conda,
    )


def finetune_job(
    *,
    model: Any,
    train_file: Any,
    validation_file: Any = None,
    compute: str,
    finetune_parameters: Optional[Mapping[str, Any]] = None,
    gpus_per_node: int = 1,
    instance_count: int = 1,
    experiment_name: str = DEFAULT_EXPERIMENT,
    environment: Any = None,
    ferrotune_requirement: Optional[str] = None,
    display_name: Optional[str] = None,
) -> Any:
    """The notebook's fine-tuning pipeline as one Azure ML command job running ferrotune.

    The job runs, on the compute::

        ferrotune finetune --model ${{inputs.model}} --train-file ${{inputs.train_file}}
            [--validation-file ${{inputs.validation_file}}] --output-dir ferrotune_work
            --num_train_epochs 3 --learning_rate 5e-06 ...   # one flag per parameter
        ferrotune package ferrotune_work ferrotune_model
        cp -R ferrotune_model/. ${{outputs.trained_model}}

    and its output ``trained_model`` is an MLflow model folder, like the pipeline's
    ``mlflow_model_folder``: register it with :func:`register_model`. Submit it with
    ``ml_client.jobs.create_or_update(job)`` and follow it with
    ``ml_client.jobs.stream(job.name)``.

    Every ``finetune_parameters`` key and value is checked here with ferrotune's own
    parameter table (:func:`ferrotune.finetune.build_config`), so a typo fails now, not
    after the compute has been provisioned.

    Args:
        model: the foundation model, one of: a registered model (e.g. the notebook's
            ``foundation_model = registry_ml_client.models.get("Phi-3-mini-4k-instruct",
            label="latest")``) or its id (``azureml://registries/azureml/models/...``,
            ``azureml:name:version``), passed as an ``mlflow_model`` input (mounted as a
            folder; ferrotune reads Azure ML's MLflow layout ``data/model/``); a local
            model folder or an ``azureml://datastores/...`` / ``https://`` folder, passed
            as a ``uri_folder`` input (a local folder is uploaded when the job is
            submitted); or a Hugging Face Hub id (``microsoft/Phi-3-mini-4k-instruct``),
            passed as a plain string: the job downloads the model, so the compute needs
            internet access. An ``azure.ai.ml.Input`` is used as is.
        train_file: conversations (the ``train_sft.jsonl`` that
            :func:`ferrotune.download_dataset` writes): a local file (uploaded on submit),
            an ``azureml:`` data asset / ``azureml://`` or ``https://`` URI, or an
            ``Input``; a ``uri_file`` input.
        validation_file: like ``train_file``; default: ferrotune validates on the last
            20 % of the training conversations (as the pipeline does).
        compute: the compute cluster's name (see :func:`check_compute`).
        finetune_parameters: the notebook's dict (Azure ML pipeline names, e.g.
            ``num_train_epochs=3, learning_rate=5e-6, lr_scheduler_type="cosine",
            apply_lora="true", apply_deepspeed="true", deepspeed_stage=2`` plus the model's
            ``model_specific_defaults`` tag). ``None`` values are left out.
        gpus_per_node: GPUs of one node (what :func:`check_compute` returns); one
            training process per GPU.
        instance_count: nodes.
        experiment_name: the Azure ML experiment (the notebook's by default).
        environment: an ``Environment`` or an environment id; ferrotune is pip-installed
            at the start of the job in that case. Default: :func:`training_environment`.
        ferrotune_requirement: the pip requirement for ferrotune on the compute; default
            ``ferrotune==<this version>``. Pass the CUDA wheel to train on the GPU (the
            PyPI wheel trains on the CPU).
        display_name: the job's name in Azure ML studio; default
            ``ferrotune-<model name>``.

    Returns:
        an ``azure.ai.ml`` command job (``azure.ai.ml.entities.Command``), ready for
        ``ml_client.jobs.create_or_update``.

    Several GPUs: with ``gpus_per_node > 1`` or ``instance_count > 1`` the job gets a
    ``PyTorchDistribution`` with one process per GPU. Azure ML starts them and sets
    ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; ``ferrotune
    finetune`` joins them into one data-parallel group (every process takes its share of
    each optimizer step's micro-batches; gradients are summed before the update, so the
    effective batch is ``per_device_train_batch_size × gradient_accumulation_steps ×
    GPUs``, as with the pipeline). Rank 0 alone writes, packages and copies the model.

    Raises:
        InvalidArgumentError: an unknown parameter (with the valid names and the
            closest one), a bad value, or bad arguments.
        FerrotuneFileNotFoundError: a local training/validation file or model folder
            that does not exist.
    """
    sdk = _sdk()
    if not isinstance(compute, str) or not compute:
        raise InvalidArgumentError(f"compute={compute!r}: expected the compute cluster's name")
    gpus_per_node = _positive_int("gpus_per_node", gpus_per_node)
    instance_count = _positive_int("instance_count", instance_count)
    parallel = gpus_per_node > 1 or instance_count > 1
    params = dict(finetune_parameters or {})
    flags = _finetune_flags(params, validation_file is not None)
    model_input, model_name = _model_input(model)
    inputs: dict = {"model": model_input, "train_file": _file_input("train_file", train_file)}
    if validation_file is not None:
        inputs["validation_file"] = _file_input("validation_file", validation_file)
    req = _requirement(ferrotune_requirement)

    train = [
        "ferrotune", "finetune",
        "--model", "${{inputs.model}}",
        "--train-file", "${{inputs.train_file}}",
    ]
    if validation_file is not None:
        train += ["--validation-file", "${{inputs.validation_file}}"]
    train += ["--output-dir", WORK_DIR, *flags]
    package = ["ferrotune", "package", WORK_DIR, PACKAGE_DIR]
    if ferrotune_requirement is not None:  # the packaged conda.yaml installs the same ferrotune
        package += ["--ferrotune-requirement", shlex.quote(req)]
    copy = ["cp", "-R", f"{PACKAGE_DIR}/.", "${{outputs.trained_model}}"]
    steps = [" ".join(train), " ".join(package), " ".join(copy)]
    if parallel:
        # Every process runs this command line: only rank 0 (which wrote the output)
        # packages and copies it.
        steps = [steps[0], f'if [ "${{RANK:-0}}" = 0 ]; then {steps[1]} && {steps[2]}; fi']
    if environment is None:
        environment = training_environment(req)
    else:
        steps.insert(0, f"python -m pip install --quiet {shlex.quote(req)}")
    return sdk.command(
        command=" && ".join(steps),
        inputs=inputs,
        outputs={"trained_model": sdk.Output(type=sdk.AssetTypes.MLFLOW_MODEL)},
        environment=environment,
        compute=compute,
        instance_count=instance_count,
        distribution=sdk.PyTorchDistribution(process_count_per_instance=gpus_per_node) if parallel else None,
        experiment_name=experiment_name,
        display_name=display_name or f"ferrotune-{model_name}",
        description="LoRA fine-tuning with ferrotune (ferrotune finetune + ferrotune package)",
        tags={"ferrotune": req},
    )


# ---------------------------------------------------------------------------------------
# 4. Registering the model
# ---------------------------------------------------------------------------------------

_JOB_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


def build_model(
    job_or_path: Any,
    name: str,
    version: Optional[str] = None,
    description: Optional[str] = None,
) -> Any:
    """The ``Model`` entity :func:`register_model` registers (see there)."""
    sdk = _sdk()
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$", name):
        raise InvalidArgumentError(
            f"name={name!r}: a model name uses letters, digits, '-', '_' and '.' (the notebook replaces '/' "
            "with '-')"
        )
    if isinstance(job_or_path, (str, os.PathLike)):
        s = os.fspath(job_or_path)
        p = Path(s).expanduser()
        if s.startswith("azureml://"):
            path = s
        elif p.is_dir():
            if not (p / "MLmodel").is_file():
                raise InvalidArgumentError(
                    f"{s!r} is not an MLflow model folder (no MLmodel file); `ferrotune package OUTPUT_DIR FOLDER` "
                    "writes one from a fine-tuning output folder"
                )
            path = str(p.resolve())
        elif p.exists() or os.sep in s or "/" in s:
            raise FerrotuneFileNotFoundError(f"{s!r}: no such MLflow model folder")
        elif _JOB_NAME_RE.match(s):
            path = f"azureml://jobs/{s}/outputs/trained_model"
        else:
            raise InvalidArgumentError(f"{s!r} is neither a job name nor an MLflow model folder")
    else:
        job_name = getattr(job_or_path, "name", None)
        if not isinstance(job_name, str) or not job_name:
            raise InvalidArgumentError(
                f"job_or_path={job_or_path!r}: expected a submitted job (what ml_client.jobs.create_or_update "
                "returns), a job name, or a local MLflow model folder"
            )
        path = f"azureml://jobs/{job_name}/outputs/trained_model"
    return sdk.Model(
        path=path,
        type=sdk.AssetTypes.MLFLOW_MODEL,
        name=name,
        version=str(version) if version is not None else str(int(time.time())),
        description=description or "fine-tuned with ferrotune for ultrachat_200k chat-completion",
        tags={"ferrotune": _ferrotune_version()},
    )


def register_model(
    ml_client: Any,
    job_or_path: Any,
    name: str,
    version: Optional[str] = None,
    description: Optional[str] = None,
) -> Any:
    """Registers the fine-tuned model, like the notebook's "Register the model" cell.

    Args:
        ml_client: the workspace ``MLClient``.
        job_or_path: the fine-tuning job (what ``ml_client.jobs.create_or_update(job)``
            returned) or its name: its ``trained_model`` output
            (``azureml://jobs/{name}/outputs/trained_model``) is registered; or a local
            MLflow model folder (``ferrotune package`` output), which is uploaded.
        name: the model's name, e.g. ``"Phi-3-mini-4k-instruct-ultrachat-200k"``.
        version: default: the current Unix time, as the notebook does (unique per run).
        description: default: a short ferrotune description.

    Returns:
        the registered ``azure.ai.ml.entities.Model`` (with its ``id``, for
        :func:`deploy`).
    """
    return ml_client.models.create_or_update(build_model(job_or_path, name, version, description))


# ---------------------------------------------------------------------------------------
# 5. Deployment: instance types and what fits on them
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceType:
    """An Azure VM size for managed online endpoints."""

    name: str
    vcpus: int
    #: memory of the VM in GiB
    ram_gib: float
    gpus: int = 0
    gpu: str = ""
    #: memory of one GPU in GiB (ferrotune serves a model from one GPU)
    gpu_gib: float = 0.0

    def describe(self) -> str:
        if self.gpus:
            return f"{self.name} ({self.gpus} x {self.gpu} {self.gpu_gib:g} GB)"
        return f"{self.name} ({self.vcpus} vCPUs, {self.ram_gib:g} GiB RAM)"


def _it(*args: Any, **kw: Any) -> tuple[str, InstanceType]:
    t = InstanceType(*args, **kw)
    return t.name.lower(), t


#: Common instance types of managed online endpoints (Azure's VM size documentation).
INSTANCE_TYPES: dict = dict(
    [
        # CPU
        _it("Standard_DS2_v2", 2, 7),
        _it("Standard_DS3_v2", 4, 14),
        _it("Standard_DS4_v2", 8, 28),
        _it("Standard_DS5_v2", 16, 56),
        _it("Standard_F2s_v2", 2, 4),
        _it("Standard_F4s_v2", 4, 8),
        _it("Standard_F8s_v2", 8, 16),
        _it("Standard_F16s_v2", 16, 32),
        _it("Standard_F32s_v2", 32, 64),
        _it("Standard_F48s_v2", 48, 96),
        _it("Standard_F64s_v2", 64, 128),
        _it("Standard_F72s_v2", 72, 144),
        _it("Standard_E4s_v3", 4, 32),
        _it("Standard_E8s_v3", 8, 64),
        _it("Standard_E16s_v3", 16, 128),
        _it("Standard_E32s_v3", 32, 256),
        # GPU
        _it("Standard_NC4as_T4_v3", 4, 28, 1, "T4", 16),
        _it("Standard_NC8as_T4_v3", 8, 56, 1, "T4", 16),
        _it("Standard_NC16as_T4_v3", 16, 110, 1, "T4", 16),
        _it("Standard_NC64as_T4_v3", 64, 440, 4, "T4", 16),
        _it("Standard_NC6s_v3", 6, 112, 1, "V100", 16),
        _it("Standard_NC12s_v3", 12, 224, 2, "V100", 16),
        _it("Standard_NC24s_v3", 24, 448, 4, "V100", 16),
        _it("Standard_NC24ads_A100_v4", 24, 220, 1, "A100", 80),
        _it("Standard_NC48ads_A100_v4", 48, 440, 2, "A100", 80),
        _it("Standard_NC96ads_A100_v4", 96, 880, 4, "A100", 80),
        _it("Standard_ND96asr_v4", 96, 900, 8, "A100", 40),
        _it("Standard_ND96amsr_A100_v4", 96, 1900, 8, "A100", 80),
        _it("Standard_NC40ads_H100_v5", 40, 320, 1, "H100 NVL", 94),
        _it("Standard_NC80adis_H100_v5", 80, 640, 2, "H100 NVL", 94),
        _it("Standard_ND96isr_H100_v5", 96, 1900, 8, "H100", 80),
    ]
)

_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class ServingMemory:
    """What serving a model folder takes, estimated from its safetensors headers."""

    #: the weight files read
    files: tuple
    #: floating-point parameters (converted to the serving dtype when loaded)
    parameters: int
    #: bytes of non-float tensors (kept as stored)
    other_bytes: int

    @property
    def gpu_bytes(self) -> int:
        """Weights in bfloat16, as ferrotune serves on a GPU."""
        return 2 * self.parameters + self.other_bytes

    @property
    def cpu_bytes(self) -> int:
        """Weights in float32, as ferrotune serves on the CPU (2 x the bf16 bytes)."""
        return 4 * self.parameters + self.other_bytes

    def needed_bytes(self, gpu: bool) -> int:
        """Weights plus headroom: 20 % (KV cache, activations) and 1 GiB (CUDA context or
        the server process)."""
        weights = self.gpu_bytes if gpu else self.cpu_bytes
        return int(weights * 1.2) + _GIB


def _weight_files(folder: Path) -> list:
    for sub in (folder / "data" / "model", folder / "merged", folder):
        files = sorted(sub.glob("*.safetensors"))
        if files:
            return files
    return []


def serving_memory(model_dir: PathLike) -> Optional[ServingMemory]:
    """Estimates a model folder's serving memory from its safetensors headers (only the
    headers are read).

    Args:
        model_dir: a packaged MLflow folder (weights in ``data/model/``), a fine-tuning
            output folder (``merged/``) or a Hugging Face model folder.

    Returns:
        :class:`ServingMemory`, or ``None`` when the folder has no ``*.safetensors``.

    Raises:
        ModelError: a ``.safetensors`` file with a malformed header.
    """
    files = _weight_files(Path(model_dir))
    if not files:
        return None
    params = other = 0
    for path in files:
        for key, info in read_safetensors_header(path).items():
            if key == "__metadata__":
                continue
            try:
                dtype = str(info["dtype"]).upper()
                numel = math.prod(int(d) for d in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise ModelError(f"{path}: tensor {key!r} has no valid dtype/shape in the header") from None
            if dtype in _FLOAT_DTYPES:
                params += numel
            else:
                other += numel * _SAFETENSORS_DTYPE_BYTES.get(dtype, 1)
    return ServingMemory(tuple(str(f) for f in files), params, other)


def _fits(t: InstanceType, mem: ServingMemory) -> bool:
    if t.gpus:
        return mem.needed_bytes(gpu=True) <= t.gpu_gib * 1e9
    return mem.needed_bytes(gpu=False) <= t.ram_gib * _GIB


def _smallest_fit(mem: ServingMemory, gpu: bool) -> Optional[InstanceType]:
    fits = [t for t in INSTANCE_TYPES.values() if bool(t.gpus) == gpu and _fits(t, mem)]
    if gpu:
        return min(fits, key=lambda t: (t.gpu_gib, t.gpus, t.ram_gib), default=None)
    return min(fits, key=lambda t: (t.ram_gib, t.vcpus), default=None)


def check_instance_type(instance_type: str, model_dir: Optional[PathLike]) -> Optional[ServingMemory]:
    """Checks that ``instance_type`` can hold the model in ``model_dir``.

    GPU instance types are checked against one GPU's memory with the weights in bfloat16,
    CPU ones against the VM's memory with float32 weights (ferrotune's CPU serving keeps
    float32: twice the bf16 bytes). Both with 20 % + 1 GiB of headroom. An instance type
    missing from :data:`INSTANCE_TYPES` is not checked (a warning says so).

    Args:
        instance_type: e.g. ``"Standard_NC6s_v3"``.
        model_dir: the local model folder, or ``None`` (nothing to check).

    Returns:
        the estimate, or ``None`` when there was nothing to check.

    Raises:
        ComputeTargetError: the model does not fit; the message names an instance type
            that fits.
    """
    if model_dir is None:
        return None
    t = INSTANCE_TYPES.get(str(instance_type).lower())
    if t is None:
        warnings.warn(
            f"ferrotune does not know instance type {instance_type!r}; its memory is not checked against the model",
            UserWarning,
            stacklevel=3,
        )
        return None
    mem = serving_memory(model_dir)
    if mem is None or _fits(t, mem):
        return mem
    gb = 1e9
    if t.gpus:
        what = (
            f"{mem.parameters / 1e9:.2f} B parameters = {mem.gpu_bytes / gb:.1f} GB in bfloat16 on the GPU, "
            f"about {mem.needed_bytes(True) / gb:.1f} GB with the KV cache and CUDA context"
        )
        room = f"one {t.gpu} has {t.gpu_gib:g} GB"
    else:
        what = (
            f"{mem.parameters / 1e9:.2f} B parameters = {mem.cpu_bytes / gb:.1f} GB in float32 (ferrotune's CPU "
            f"serving keeps float32), about {mem.needed_bytes(False) / gb:.1f} GB with headroom"
        )
        room = f"it has {t.ram_gib:g} GiB of memory"
    same = _smallest_fit(mem, bool(t.gpus))
    other = _smallest_fit(mem, not t.gpus)
    hints = [x.describe() for x in (same, other) if x is not None]
    hint = f" Instance types that fit: {' or '.join(hints)}." if hints else " No instance type ferrotune knows fits it."
    raise ComputeTargetError(
        f"the model in {model_dir} does not fit on {t.name}: {what}; {room}.{hint}"
    )


# ---------------------------------------------------------------------------------------
# 5. Deployment: entities
# ---------------------------------------------------------------------------------------

_ENDPOINT_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]$")
_DEPLOYMENT_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]$")

# The entry script of the deployment. It hands init() and run() to the score.py that
# `ferrotune package` put in the model folder, so the scoring code always matches the
# model it serves, and the code upload is one small file instead of the model again.
# (The inference server's @rawhttp is a process-wide switch set when the entry script is
# imported, so the entry script itself must carry it for the packaged run() to get the
# HTTP request.)
_SCORE_SHIM = '''\
"""Azure ML entry script written by ferrotune.azureml (ferrotune {version}).

Finds the packaged model folder under AZUREML_MODEL_DIR (the folder with MLmodel and
score.py; Azure ML mounts a registered model one or two folders deeper), points
AZUREML_MODEL_DIR at it, and hands init() and run() to that folder's own score.py.
run() is marked @rawhttp, so the packaged run() gets the HTTP request itself (it checks
the method and the body size, and answers with its own status codes).
"""
import importlib.util
import os

try:  # inside the Azure ML inference server
    from azureml.contrib.services.aml_request import rawhttp
except ImportError:
    try:
        from azureml_inference_server_http.api.aml_request import rawhttp
    except ImportError:  # not serving: run() is a plain function

        def rawhttp(func):
            return func


_packaged = None


def _model_folder(root):
    level = [root]
    for _ in range(3):  # the folder itself, then two levels down (never into data/)
        for folder in level:
            names = os.listdir(folder)
            if "MLmodel" in names and "score.py" in names:
                return folder
        level = [
            os.path.join(folder, name)
            for folder in level
            for name in sorted(os.listdir(folder))
            if name != "data" and os.path.isdir(os.path.join(folder, name))
        ]
    raise RuntimeError(
        "ferrotune: no packaged model (a folder with MLmodel and score.py) under AZUREML_MODEL_DIR=" + root
    )


def init():
    global _packaged
    folder = _model_folder(os.path.abspath(os.environ.get("AZUREML_MODEL_DIR", ".")))
    os.environ["AZUREML_MODEL_DIR"] = folder
    spec = importlib.util.spec_from_file_location("ferrotune_packaged_score", os.path.join(folder, "score.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.init()
    _packaged = module


@rawhttp
def run(raw_data):
    return _packaged.run(raw_data)
'''


def write_scoring_code(folder: PathLike) -> Path:
    """Writes the deployment's entry script, ``score.py``, into ``folder`` (created if
    needed) and returns the folder: the ``code`` of the deployment's
    ``CodeConfiguration``.

    The script finds the packaged model (MLmodel + score.py) under
    ``AZUREML_MODEL_DIR`` and hands ``init()``/``run()`` to the model's own ``score.py``.
    """
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    (d / "score.py").write_text(_SCORE_SHIM.format(version=_ferrotune_version()), encoding="utf-8")
    return d


def inference_environment(ferrotune_requirement: Optional[str] = None, *, gpu: bool = False) -> Any:
    """The serving environment: an Azure ML inference base image plus a conda file that
    pip-installs the inference server and ferrotune.

    Args:
        ferrotune_requirement: default ``ferrotune==<this version>`` (the PyPI wheel
            serves on the CPU; pass the CUDA wheel to serve on the GPU).
        gpu: use the CUDA image (:data:`GPU_INFERENCE_IMAGE`) instead of the minimal CPU
            one (:data:`CPU_INFERENCE_IMAGE`).

    Returns:
        ``azure.ai.ml.entities.Environment``
    """
    sdk = _sdk()
    req = _requirement(ferrotune_requirement)
    image = GPU_INFERENCE_IMAGE if gpu else CPU_INFERENCE_IMAGE
    conda = {
        "name": "ferrotune-serve",
        "channels": ["conda-forge"],
        "dependencies": ["python=3.11", "pip", {"pip": ["azureml-inference-server-http", req]}],
    }
    return sdk.Environment(
        description=f"ferrotune serving ({req}) on {image}",
        image=image,
        conda_file=conda,
    )


def build_endpoint(endpoint_name: str, *, description: Optional[str] = None, traffic: Optional[dict] = None) -> Any:
    """The ``ManagedOnlineEndpoint`` :func:`deploy` creates: key authentication, as in
    the notebook.

    Args:
        endpoint_name: 3-32 letters, digits and '-', starting with a letter; unique in
            the Azure region.
        description: default: a short ferrotune description.
        traffic: e.g. ``{"demo": 100}``.
    """
    sdk = _sdk()
    if not isinstance(endpoint_name, str) or not _ENDPOINT_NAME_RE.match(endpoint_name):
        raise InvalidArgumentError(
            f"endpoint_name={endpoint_name!r}: an endpoint name has 3-32 characters (letters, digits, '-'), "
            "starts with a letter and does not end with '-'; e.g. 'ultrachat-completion-' + timestamp"
        )
    return sdk.ManagedOnlineEndpoint(
        name=endpoint_name,
        description=description or "ferrotune: fine-tuned Phi-3 chat completion",
        auth_mode="key",
        traffic=traffic,
    )


def _deployment_model(model: Any) -> tuple[Any, Optional[Path]]:
    """``(the deployment's model, a local folder to size it from)``."""
    sdk = _sdk()
    if isinstance(model, sdk.Model):
        if model.id:
            return model.id, None
        p = Path(str(model.path)) if model.path else None
        return model, (p if p is not None and p.is_dir() else None)
    if isinstance(model, (str, os.PathLike)) and os.fspath(model):
        s = os.fspath(model)
        if s.startswith(("azureml:", "/subscriptions/")):
            return s, None
        p = Path(s).expanduser()
        if p.is_dir():
            if not (p / "MLmodel").is_file():
                raise InvalidArgumentError(
                    f"{s!r} is not a packaged model folder (no MLmodel file); `ferrotune package` writes one"
                )
            p = p.resolve()
            return sdk.Model(path=str(p), type=sdk.AssetTypes.MLFLOW_MODEL, name=p.name), p
        raise FerrotuneFileNotFoundError(f"model={s!r}: no such folder, and not an azureml: model id")
    raise InvalidArgumentError(
        f"model={model!r}: expected a registered model (what register_model returns), its id, or a packaged "
        "model folder"
    )


def build_deployment(
    model: Any,
    endpoint_name: str,
    *,
    instance_type: str = "Standard_NC6s_v3",
    instance_count: int = 1,
    deployment_name: str = "demo",
    code_dir: Optional[PathLike] = None,
    environment: Any = None,
    ferrotune_requirement: Optional[str] = None,
    liveness_initial_delay: int = 600,
    request_timeout_ms: int = 90000,
) -> Any:
    """The ``ManagedOnlineDeployment`` :func:`deploy` creates (see there for the
    arguments). ``code_dir`` receives the entry script (:func:`write_scoring_code`);
    default: a new temporary folder."""
    sdk = _sdk()
    if not isinstance(deployment_name, str) or not _DEPLOYMENT_NAME_RE.match(deployment_name):
        raise InvalidArgumentError(
            f"deployment_name={deployment_name!r}: 3-32 characters (letters, digits, '-'), starting with a letter"
        )
    instance_count = _positive_int("instance_count", instance_count)
    the_model, _ = _deployment_model(model)
    if code_dir is None:
        code_dir = tempfile.mkdtemp(prefix="ferrotune-score-")
    code = write_scoring_code(code_dir)
    if environment is None:
        t = INSTANCE_TYPES.get(str(instance_type).lower())
        environment = inference_environment(ferrotune_requirement, gpu=bool(t.gpus) if t else True)
    return sdk.ManagedOnlineDeployment(
        name=deployment_name,
        endpoint_name=endpoint_name,
        model=the_model,
        code_configuration=sdk.CodeConfiguration(code=str(code), scoring_script="score.py"),
        environment=environment,
        instance_type=instance_type,
        instance_count=instance_count,
        liveness_probe=sdk.ProbeSettings(initial_delay=liveness_initial_delay),
        request_settings=sdk.OnlineRequestSettings(request_timeout_ms=request_timeout_ms),
    )


def deploy(
    ml_client: Any,
    model: Any,
    endpoint_name: str,
    *,
    instance_type: str = "Standard_NC6s_v3",
    instance_count: int = 1,
    deployment_name: str = "demo",
    model_dir: Optional[PathLike] = None,
    environment: Any = None,
    ferrotune_requirement: Optional[str] = None,
    description: Optional[str] = None,
    liveness_initial_delay: int = 600,
    request_timeout_ms: int = 90000,
) -> Any:
    """Deploys the model to a managed online endpoint, like the notebook's "Deploy" cells,
    and sends it 100 % of the traffic.

    Steps: ``ManagedOnlineEndpoint(auth_mode="key")`` (created, waited for), then a
    ``ManagedOnlineDeployment`` with ``liveness_probe=ProbeSettings(initial_delay=600)``
    and ``request_settings=OnlineRequestSettings(request_timeout_ms=90000)`` (created,
    waited for; 10-20 minutes), then ``endpoint.traffic = {deployment_name: 100}``.

    ferrotune deploys with its own scoring code, not as a no-code MLflow deployment: the
    deployment's ``code`` is a one-file folder whose ``score.py`` runs the ``score.py``
    that ``ferrotune package`` put into the model folder (so the model is uploaded once,
    and its scoring code always matches it), in :func:`inference_environment`.

    Before anything is created, the model's size is checked against ``instance_type``
    (when a local copy of the model folder is known: ``model`` itself or ``model_dir``),
    see :func:`check_instance_type`.

    Args:
        ml_client: the workspace ``MLClient``.
        model: the registered model (what :func:`register_model` returns) or its id
            (``azureml:name:version``), or a local packaged model folder (uploaded).
        endpoint_name: e.g. ``"ultrachat-completion-" + timestamp``.
        instance_type: the VM size (the notebook's ``Standard_NC6s_v3`` by default).
        instance_count: VMs behind the endpoint.
        deployment_name: the notebook's ``"demo"`` by default.
        model_dir: a local copy of the packaged model folder, to check the instance type
            against (default: ``model`` when it is a local folder).
        environment: default: :func:`inference_environment` (the GPU image for GPU
            instance types).
        ferrotune_requirement: the pip requirement for ferrotune in the serving image.
        description: the endpoint's description.
        liveness_initial_delay: seconds before the first liveness probe (600).
        request_timeout_ms: the scoring request timeout (90000).

    Returns:
        the endpoint (``ManagedOnlineEndpoint``) with its traffic set.

    Raises:
        ComputeTargetError: the model does not fit on ``instance_type``.
        InvalidArgumentError: a bad endpoint or deployment name, or a model folder that
            is not a packaged model.
    """
    endpoint = build_endpoint(endpoint_name, description=description)  # checks the name first
    _, local_dir = _deployment_model(model)
    check_instance_type(instance_type, model_dir if model_dir is not None else local_dir)
    with tempfile.TemporaryDirectory(prefix="ferrotune-score-") as code_dir:
        deployment = build_deployment(
            model,
            endpoint_name,
            instance_type=instance_type,
            instance_count=instance_count,
            deployment_name=deployment_name,
            code_dir=code_dir,
            environment=environment,
            ferrotune_requirement=ferrotune_requirement,
            liveness_initial_delay=liveness_initial_delay,
            request_timeout_ms=request_timeout_ms,
        )
        ml_client.online_endpoints.begin_create_or_update(endpoint).wait()
        # the code folder is uploaded here, before the poller is returned
        ml_client.online_deployments.begin_create_or_update(deployment).wait()
    endpoint.traffic = {deployment_name: 100}
    return ml_client.online_endpoints.begin_create_or_update(endpoint).result()


# ---------------------------------------------------------------------------------------
# 6. Scoring requests
# ---------------------------------------------------------------------------------------


def _conversation(obj: Any, where: str) -> list:
    if isinstance(obj, Mapping) and "messages" in obj:  # a dataset row
        obj = obj["messages"]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays from pandas
        obj = obj.tolist()
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Sequence) or not obj:
        raise InvalidArgumentError(
            f"{where}: expected a conversation, a non-empty list of {{'role', 'content'}} messages"
        )
    out = []
    for i, m in enumerate(obj):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidArgumentError(
                f"{where}, message {i}: expected {{'role': str, 'content': str}}, got {m!r:.200}"
            )
        out.append({"content": m["content"], "role": m["role"]})
    return out


def _is_message(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "role" in obj and "content" in obj


def sample_request(conversations: Any, parameters: Optional[Mapping[str, Any]] = None) -> dict:
    """The scoring request the notebook writes to ``sample_score.json``.

    ``{"input_data": {"input_string": [[messages...], ...], "parameters": {...}},
    "params": {}}``: a list of conversations, each a list of ``{"content", "role"}``
    messages.

    Args:
        conversations: one conversation (a list of messages, or a dataset row with
            ``messages``, like the notebook's ``test_df["messages"][0]``) or a list of
            them.
        parameters: generation settings; default the notebook's
            ``{"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200}``.

    Returns:
        the request dict (``json.dump`` it to write ``sample_score.json``).
    """
    if isinstance(conversations, Mapping) and "messages" in conversations:
        convs = [_conversation(conversations, "conversation")]
    else:
        if hasattr(conversations, "tolist") and not isinstance(conversations, (str, bytes)):
            conversations = conversations.tolist()
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence) or not conversations:
            raise InvalidArgumentError(
                "conversations: expected a conversation (a list of {'role', 'content'} messages) or a list of them"
            )
        if _is_message(conversations[0]):
            convs = [_conversation(conversations, "conversation")]
        else:
            convs = [_conversation(c, f"conversation {i}") for i, c in enumerate(conversations)]
    params = dict(DEFAULT_PARAMETERS if parameters is None else parameters)
    return {"input_data": {"input_string": convs, "parameters": params}, "params": {}}


def invoke(
    ml_client: Any,
    endpoint_name: str,
    conversations_or_request: Any,
    *,
    parameters: Optional[Mapping[str, Any]] = None,
    deployment_name: Optional[str] = None,
) -> Any:
    """Scores conversations on the endpoint, like the notebook's "Invoke" cell.

    Args:
        ml_client: the workspace ``MLClient``.
        endpoint_name: the endpoint.
        conversations_or_request: a ready request dict (with ``input_data``, sent as
            is), one conversation, or a list of conversations (see
            :func:`sample_request`).
        parameters: generation settings for conversations (default: the notebook's).
        deployment_name: a specific deployment; default: the endpoint's traffic rules.

    Returns:
        the parsed JSON response (e.g. ``{"output": "..."}``); the raw text if the
        response is not JSON.
    """
    if isinstance(conversations_or_request, Mapping) and "input_data" in conversations_or_request:
        if parameters is not None:
            raise InvalidArgumentError("parameters= applies to conversations; a ready request carries its own")
        request = dict(conversations_or_request)
    else:
        request = sample_request(conversations_or_request, parameters)
    fd, path = tempfile.mkstemp(prefix="ferrotune-request-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(request, f)
        kwargs: dict = {"endpoint_name": endpoint_name, "request_file": path}
        if deployment_name is not None:
            kwargs["deployment_name"] = deployment_name
        text = ml_client.online_endpoints.invoke(**kwargs)
    finally:
        os.unlink(path)
    try:
        out = json.loads(text)
    except (TypeError, ValueError):
        return text
    if isinstance(out, str):  # a scorer that returned json.dumps(...) is encoded twice
        try:
            return json.loads(out)
        except ValueError:
            return out
    return out


# ---------------------------------------------------------------------------------------
# 7. Clean-up
# ---------------------------------------------------------------------------------------


def delete(ml_client: Any, endpoint_name: str, *, missing_ok: bool = False) -> None:
    """Deletes the endpoint and its deployments and waits until it is gone (the notebook's
    last cell): an idle endpoint keeps costing money.

    Args:
        ml_client: the workspace ``MLClient``.
        endpoint_name: the endpoint.
        missing_ok: do nothing if the endpoint does not exist (default: raise).

    Raises:
        AzureMLError: the endpoint does not exist (unless ``missing_ok``).
    """
    sdk = _sdk()
    try:
        ml_client.online_endpoints.begin_delete(name=endpoint_name).wait()
    except sdk.ResourceNotFoundError:
        if not missing_ok:
            raise AzureMLError(f"endpoint {endpoint_name!r} does not exist (already deleted?)") from None
