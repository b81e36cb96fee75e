"""``ferrotune.azureml``: the notebook's Azure ML steps, with ferrotune doing the work.

The "fine-tune Phi-3-mini on ultrachat_200k" notebook talks to Azure ML in seven places:
it builds an ``MLClient``, checks the GPU compute, runs the fine-tuning pipeline, registers
the model, deploys it to a managed online endpoint, scores a sample and deletes the
endpoint. This package gives each step one function, with the notebook's settings as
defaults, and catches on the laptop the mistakes that otherwise surface after an hour of
provisioning:

==========================  ==============================================================
:func:`client`              ``MLClient`` from ``config.json`` (or explicit ids), no network
:func:`check_compute`       the compute exists, is not in a failed state, has GPUs of
                            compute capability >= 7.0
:func:`finetune_job`        a command job running ``ferrotune finetune`` + ``ferrotune
                            package`` on the compute, parameters checked before submitting;
                            the ferrotune wheel travels in its code folder, checkpoints go
                            to a ``checkpoints`` output it resumes from
:func:`register_model`      the job's ``trained_model`` output (or a local MLflow folder)
:func:`deploy`              endpoint (key auth) + deployment (probe 600 s, timeout 90 s) +
                            100 % traffic, after checking that the instance type can hold
                            the model; the wheel travels in the image's build context
:func:`invoke`              the notebook's request shape, parsed JSON back
:func:`delete`              deletes the endpoint
==========================  ==============================================================

The ``build_*`` / ``*_environment`` functions return the SDK entities these functions
submit, so they can be inspected, changed or dumped to YAML first.

By step, in sub-modules (everything is also importable from ``ferrotune.azureml``):
:mod:`~ferrotune.azureml.workspace` (client, compute), :mod:`~ferrotune.azureml.instance_types`
(VM sizes, GPU generation, serving memory), :mod:`~ferrotune.azureml.job`,
:mod:`~ferrotune.azureml.model`, :mod:`~ferrotune.azureml.endpoint` (deployment, scoring,
clean-up), :mod:`~ferrotune.azureml.environments` (images) and
:mod:`~ferrotune.azureml.wheels` (which ferrotune wheel is shipped, and how).

In a notebook::

    from ferrotune import azureml as az

    ml_client = az.client()                                  # config.json, as from_config
    gpus = az.check_compute(ml_client, "gpu-cluster")
    job = az.finetune_job(model=foundation_model, compute="gpu-cluster",  # one GPU per job
                          train_file="ultrachat_200k_dataset/train_sft.jsonl",
                          finetune_parameters=finetune_parameters,  # validation: last 20 % of train
                          wheels=["dist/ferrotune-0.1.0-cp310-abi3-manylinux_2_34_x86_64.whl",
                                  "dist-cuda/ferrotune-0.1.0+cu12-cp310-abi3-manylinux_2_34_x86_64.whl"])
    job = ml_client.jobs.create_or_update(job)
    ml_client.jobs.stream(job.name)
    model = az.register_model(ml_client, job, "Phi-3-mini-4k-instruct-ultrachat-200k")
    az.deploy(ml_client, model, "ultrachat-completion-" + timestamp, wheels=...)
    az.invoke(ml_client, "ultrachat-completion-" + timestamp, test_df["messages"][0])
    az.delete(ml_client, "ultrachat-completion-" + timestamp)

The Azure ML SDK is an optional extra (``pip install "ferrotune[azure]"``): this package
imports without it and only the functions that need the SDK ask for it.
"""

from __future__ import annotations

from ._common import (
    AzureExtraMissingError,
    AzureMLError,
    ComputeTargetError,
    PathLike,
    WheelBuildError,
    WheelError,
    WheelNotFoundError,
    WorkspaceConfigError,
)
from ._node_install import MIN_COMPUTE_CAPABILITY, MIN_DRIVER
from .endpoint import (
    DEFAULT_PARAMETERS,
    build_deployment,
    build_endpoint,
    delete,
    deploy,
    invoke,
    sample_request,
    write_scoring_code,
)
from .environments import (
    CPU_INFERENCE_IMAGE,
    CUDA_IMAGE,
    GPU_INFERENCE_IMAGE,
    TRAINING_IMAGE,
    inference_environment,
    training_environment,
)
from .instance_types import (
    INSTANCE_TYPES,
    InstanceType,
    ServingMemory,
    check_instance_type,
    instance_type,
    serving_memory,
)
from .job import DEFAULT_EXPERIMENT, PACKAGE_DIR, WORK_DIR, _flag_value, finetune_job  # noqa: F401 (_flag_value: tests)
from .model import build_model, register_model
from .wheels import Wheel, default_wheels
from .workspace import check_compute, client

__all__ = [
    # errors
    "AzureMLError",
    "AzureExtraMissingError",
    "WorkspaceConfigError",
    "ComputeTargetError",
    "WheelError",
    "WheelNotFoundError",
    "WheelBuildError",
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
    # the wheels they ship
    "Wheel",
    "default_wheels",
    # sizing
    "InstanceType",
    "INSTANCE_TYPES",
    "instance_type",
    "ServingMemory",
    "serving_memory",
    "check_instance_type",
    # constants
    "DEFAULT_EXPERIMENT",
    "DEFAULT_PARAMETERS",
    "CUDA_IMAGE",
    "TRAINING_IMAGE",
    "CPU_INFERENCE_IMAGE",
    "GPU_INFERENCE_IMAGE",
    "MIN_COMPUTE_CAPABILITY",
    "MIN_DRIVER",
    "WORK_DIR",
    "PACKAGE_DIR",
]
