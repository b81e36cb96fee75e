"""The fine-tuning job: the notebook's ``chat_completion_pipeline`` as one command job that
runs ``ferrotune finetune`` and ``ferrotune package`` on the compute cluster."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Mapping, Optional

from ..exceptions import FerrotuneFileNotFoundError, InvalidArgumentError
from ._common import AzureExtraMissingError, WheelError, _positive_int, _sdk
from .environments import _either, training_environment
from .wheels import INSTALLER, job_code_folder, resolve_wheels

#: the notebook's experiment name
DEFAULT_EXPERIMENT = "chat_completion_Phi-3-mini-4k-instruct"

#: where ``ferrotune finetune`` writes the adapter and the merged model inside the job (the
#: job's working directory on the node's disk); only the packaged MLflow model is
#: uploaded, as the ``trained_model`` output
WORK_DIR = "ferrotune_work"
#: where ``ferrotune package`` writes the MLflow folder on the node's disk (the weights are
#: hard links into WORK_DIR); it is then copied into the ``trained_model`` output. Not
#: written into the output directly: Azure ML creates the output folder (a mount) before
#: the job starts, and ``ferrotune package`` builds its folder beside the target and
#: renames it into place, which a mount point does not allow.
PACKAGE_DIR = "ferrotune_model"


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


def _finetune_flags(params: Mapping[str, Any], has_validation: bool) -> tuple:
    """``(flags, config, names)``: the ``--name value`` flags for ``ferrotune finetune``,
    after checking every parameter with ferrotune's own table (the same check the job
    will run), the resulting config and the (normalized) names given."""
    ft = importlib.import_module("ferrotune.finetune")
    if not isinstance(params, Mapping):
        raise InvalidArgumentError(f"finetune_parameters must be a dict, not {type(params).__name__}")
    # Checked here, on the laptop, exactly as `ferrotune finetune` will check them on the node.
    config, _ = ft.build_config("model", "train.jsonl", "validation.jsonl" if has_validation else None, WORK_DIR, params)
    flags: list = []
    names: set = set()
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
        names.add(name)
        flags += [f"--{name}", shlex.quote(_flag_value(value))]
    return flags, config, names


def _checkpoint_output(sdk: Any, checkpoint_path: Optional[str]) -> Any:
    if checkpoint_path is None:
        return sdk.Output(type=sdk.AssetTypes.URI_FOLDER, mode="rw_mount")
    if not isinstance(checkpoint_path, str) or not checkpoint_path.startswith("azureml://"):
        raise InvalidArgumentError(
            f"checkpoint_path={checkpoint_path!r}: expected a datastore folder URI, e.g. "
            "'azureml://datastores/workspaceblobstore/paths/ferrotune/checkpoints/my-run/'"
        )
    return sdk.Output(type=sdk.AssetTypes.URI_FOLDER, mode="rw_mount", path=checkpoint_path)


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
    wheels: Any = None,
    checkpoint_path: Optional[str] = None,
) -> Any:
    """The notebook's fine-tuning pipeline as one Azure ML command job running ferrotune.

    The job's code folder carries the ferrotune wheel(s) and a small installer; on the
    compute it runs::

        python install_ferrotune.py --device auto     # the CUDA wheel on a GPU node, else the CPU wheel
        ferrotune finetune --model ${{inputs.model}} --train-file ${{inputs.train_file}}
            [--validation-file ${{inputs.validation_file}}] --output-dir ferrotune_work
            --checkpoint_dir ${{outputs.checkpoints}} --resume_from_checkpoint true
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

    **Which ferrotune runs on the node.** ``wheels`` (default: the running ferrotune's
    wheel, see :func:`~ferrotune.azureml.wheels.default_wheels`) go into the job's code
    folder, which Azure ML uploads with the job; ``install_ferrotune.py`` installs the
    CUDA wheel on a node with an NVIDIA GPU (it checks the driver, >= 525 for a ``+cu12``
    wheel, and compute capability >= 7.0, and stops with one line if either is too old),
    the CPU wheel otherwise. Training on a GPU needs the CUDA wheel: without one, this
    function refuses unless ``finetune_parameters["device"] = "cpu"`` says to train on
    the CPU on purpose. ``ferrotune_requirement="ferrotune==X"`` instead installs
    ferrotune from a package index into the image and ships no wheel.

    **Checkpoints and preemption.** The job has a second output, ``checkpoints`` (a
    ``uri_folder`` mounted read-write, ``rw_mount``: files are uploaded as they are
    written), and ``ferrotune finetune`` writes its ``checkpoint-N/`` folders there and
    resumes from the newest one it finds (``--resume_from_checkpoint true``; a first run
    finds none and starts from scratch). When Azure ML stops a node (a low-priority node
    is preempted, the job is cancelled), ferrotune saves a checkpoint on SIGTERM; the
    restarted job resumes from it. To resume in a *new* job, give both the same
    ``checkpoint_path``. In a multi-node job every node mounts the same folder: rank 0
    writes the checkpoints, every rank reads them to resume.

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
        environment: an ``Environment`` or an environment id. Default:
            :func:`training_environment` (the CUDA 12 image with ferrotune's
            dependencies). With your own environment the installer still installs the
            wheel (and pip fetches its dependencies if the image lacks them).
        ferrotune_requirement: a pip requirement for ferrotune from a package index
            (``"ferrotune==X"``), instead of shipping wheels.
        display_name: the job's name in Azure ML studio; default
            ``ferrotune-<model name>``.
        wheels: the wheel(s) to ship: the CPU wheel, the CUDA wheel or both (a path or a
            list of paths). Default: the running ferrotune's.
        checkpoint_path: where the ``checkpoints`` output lives, an ``azureml://``
            datastore folder; default: the job's own output folder (Azure ML's default).

    Returns:
        an ``azure.ai.ml`` command job (``azure.ai.ml.entities.Command``), ready for
        ``ml_client.jobs.create_or_update``.

    Several GPUs: with ``gpus_per_node > 1`` or ``instance_count > 1`` the job gets a
    ``PyTorchDistribution`` with one process per GPU. Azure ML starts them and sets
    ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; ``ferrotune
    finetune`` joins them into one data-parallel group (every process takes its share of
    each optimizer step's micro-batches; gradients are summed before the update, so the
    effective batch is ``per_device_train_batch_size × gradient_accumulation_steps ×
    GPUs``, as with the pipeline). Rank 0 alone writes checkpoints, packages and copies
    the model; the installer runs once per node.

    Raises:
        InvalidArgumentError: an unknown parameter (with the valid names and the
            closest one), a bad value, or bad arguments.
        FerrotuneFileNotFoundError: a local training/validation file or model folder
            that does not exist.
        WheelError: no CUDA wheel for a GPU job, or an unusable wheel;
            ``WheelNotFoundError`` / ``WheelBuildError``: no default wheel.
    """
    sdk = _sdk()
    if not isinstance(compute, str) or not compute:
        raise InvalidArgumentError(f"compute={compute!r}: expected the compute cluster's name")
    gpus_per_node = _positive_int("gpus_per_node", gpus_per_node)
    instance_count = _positive_int("instance_count", instance_count)
    parallel = gpus_per_node > 1 or instance_count > 1
    params = dict(finetune_parameters or {})
    flags, config, given = _finetune_flags(params, validation_file is not None)
    if "checkpoint_dir" in given:
        raise InvalidArgumentError(
            "finetune_parameters['checkpoint_dir']: the job keeps its checkpoints in its `checkpoints` output "
            "(finetune_job's checkpoint_path= chooses where); leave checkpoint_dir out"
        )
    model_input, model_name = _model_input(model)
    inputs: dict = {"model": model_input, "train_file": _file_input("train_file", train_file)}
    if validation_file is not None:
        inputs["validation_file"] = _file_input("validation_file", validation_file)
    req = _either(ferrotune_requirement, wheels)
    shipped: list = [] if req is not None else resolve_wheels(wheels)
    device = config["device"]
    if shipped and device != "cpu" and not any(w.cuda is not None for w in shipped):
        raise WheelError(
            f"the job would train on a GPU compute with only the CPU wheel ({shipped[0].filename}): pass the CUDA "
            "wheel too, wheels=[cpu_wheel, 'dist-cuda/ferrotune-<ver>+cu12-...whl'] (scripts/build_cuda.sh builds it), "
            "or set finetune_parameters['device'] = 'cpu' to train on the CPU on purpose"
        )

    train = [
        "ferrotune", "finetune",
        "--model", "${{inputs.model}}",
        "--train-file", "${{inputs.train_file}}",
    ]
    if validation_file is not None:
        train += ["--validation-file", "${{inputs.validation_file}}"]
    train += ["--output-dir", WORK_DIR]
    outputs: dict = {"trained_model": sdk.Output(type=sdk.AssetTypes.MLFLOW_MODEL)}
    # checkpoints go to their own output, written through as they are saved, and a
    # restarted or resubmitted job resumes from the newest one there
    train += ["--checkpoint_dir", "${{outputs.checkpoints}}"]
    if "resume_from_checkpoint" not in given:
        train += ["--resume_from_checkpoint", "true"]
    outputs["checkpoints"] = _checkpoint_output(sdk, checkpoint_path)
    train += flags
    package = ["ferrotune", "package", WORK_DIR, PACKAGE_DIR]
    if req is not None:  # the packaged conda.yaml installs the same ferrotune
        package += ["--ferrotune-requirement", shlex.quote(req)]
    copy = ["cp", "-R", f"{PACKAGE_DIR}/.", "${{outputs.trained_model}}"]
    steps = [" ".join(train), " ".join(package), " ".join(copy)]
    if parallel:
        # Every process runs this command line: only rank 0 (which wrote the output)
        # packages and copies it.
        steps = [steps[0], f'if [ "${{RANK:-0}}" = 0 ]; then {steps[1]} && {steps[2]}; fi']
    if shipped:
        steps.insert(0, f"python {INSTALLER} --device {device}")
    if environment is None:
        environment = training_environment(req) if req is not None else training_environment(wheels=shipped)
    elif req is not None:
        steps.insert(0, f"python -m pip install --quiet {shlex.quote(req)}")
    tags = {"ferrotune": req if req is not None else shipped[0].version}
    if shipped:
        tags["ferrotune_wheels"] = ", ".join(w.filename for w in shipped)
    return sdk.command(
        command=" && ".join(steps),
        code=str(job_code_folder(shipped)) if shipped else None,
        inputs=inputs,
        outputs=outputs,
        environment=environment,
        compute=compute,
        instance_count=instance_count,
        distribution=sdk.PyTorchDistribution(process_count_per_instance=gpus_per_node) if parallel else None,
        experiment_name=experiment_name,
        display_name=display_name or f"ferrotune-{model_name}",
        description="LoRA fine-tuning with ferrotune (ferrotune finetune + ferrotune package)",
        tags=tags,
    )
