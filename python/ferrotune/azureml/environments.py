"""The Azure ML environments (images) the fine-tuning job and the deployment run in.

- Training (:func:`training_environment`): Azure ML's CUDA 12 base image
  (:data:`CUDA_IMAGE`) + a conda file with Python 3.11, ferrotune's dependencies (read
  from the wheels' metadata: numpy, tqdm, and for the CUDA wheel its NVIDIA runtime
  wheels) and MLflow. ferrotune itself is not in the image: the job installs the wheel it
  carries in its code folder (CPU or CUDA, by what the node has), so the image is built
  once and reused by every job whose wheels declare the same dependencies.
- Serving (:func:`inference_environment`): a Docker build context (Dockerfile,
  requirements.txt, the wheel) on Azure ML's minimal CPU inference image or the CUDA
  image: the wheel is installed when Azure ML builds the image.

With ``ferrotune_requirement="ferrotune==X"`` (a package index that has ferrotune) both
are an image plus a conda file that pip-installs that requirement, as before wheels.
"""

from __future__ import annotations

from typing import Any, Optional

from ..exceptions import InvalidArgumentError
from ._common import WheelError, _sdk
from .wheels import ENV_PYTHON, resolve_wheels, serving_context

#: Azure ML's CUDA 12 base image (Ubuntu 22.04, conda, OpenMPI 5, CUDA 12.4), from the
#: AzureML-Containers base images. The fine-tuning job and GPU deployments run on it. Its
#: CUDA toolkit does not matter to ferrotune (the CUDA wheel brings its CUDA 12 runtime
#: wheels); what matters is the node's NVIDIA driver (>= 525 for CUDA 12), which Azure ML's
#: GPU nodes provide.
CUDA_IMAGE = "mcr.microsoft.com/azureml/openmpi5.0-cuda12.4-ubuntu22.04:latest"
#: the fine-tuning job's image (:data:`CUDA_IMAGE`)
TRAINING_IMAGE = CUDA_IMAGE
#: Azure ML's minimal CPU inference image (Python 3.11, the inference server's prerequisites)
CPU_INFERENCE_IMAGE = "mcr.microsoft.com/azureml/minimal-ubuntu22.04-py311-cpu-inference:latest"
#: the image for GPU instance types (:data:`CUDA_IMAGE`)
GPU_INFERENCE_IMAGE = CUDA_IMAGE

#: the Azure ML inference server the serving environment installs
INFERENCE_SERVER_REQUIREMENT = "azureml-inference-server-http~=1.5"
#: what the training environment adds to ferrotune's dependencies: MLflow, and the plugin
#: that sends its metrics to the job's Azure ML run
TRAINING_EXTRAS = ("mlflow-skinny", "azureml-mlflow")


def _requirement(ferrotune_requirement: Optional[str]) -> Optional[str]:
    if ferrotune_requirement is None:
        return None
    if not isinstance(ferrotune_requirement, str) or not ferrotune_requirement.strip():
        raise InvalidArgumentError(
            f"ferrotune_requirement={ferrotune_requirement!r}: expected a pip requirement, e.g. "
            "'ferrotune==0.1.0' or the URL of a (CUDA) wheel"
        )
    return ferrotune_requirement.strip()


def _either(ferrotune_requirement: Optional[str], wheels: Any) -> Optional[str]:
    req = _requirement(ferrotune_requirement)
    if req is not None and wheels is not None:
        raise InvalidArgumentError(
            "pass either wheels= (shipped with the job / environment) or ferrotune_requirement= (installed by pip "
            "from a package index), not both"
        )
    return req


def _conda(name: str, pip: list) -> dict:
    return {
        "name": name,
        "channels": ["conda-forge"],
        "dependencies": [f"python={ENV_PYTHON}", "pip", {"pip": pip}],
    }


def _dependencies(wheels: list) -> list:
    """The wheels' declared dependencies, each once, in order."""
    out: list = []
    for w in wheels:
        for r in w.requires:
            if r not in out:
                out.append(r)
    return out


def training_environment(ferrotune_requirement: Optional[str] = None, *, wheels: Any = None) -> Any:
    """The default environment of :func:`finetune_job`: :data:`TRAINING_IMAGE` with
    Python 3.11, ferrotune's dependencies and MLflow (so training metrics show in Azure ML
    studio).

    Azure ML builds it once and reuses the image for later jobs with the same spec.

    Args:
        ferrotune_requirement: a pip requirement that installs ferrotune from a package
            index (``"ferrotune==X"``): it goes into the image, and the job ships no wheel.
        wheels: the wheels whose dependencies go into the image (default:
            :func:`~ferrotune.azureml.wheels.default_wheels`); ferrotune itself is
            installed by the job from its code folder.

    Returns:
        ``azure.ai.ml.entities.Environment``
    """
    sdk = _sdk()
    req = _either(ferrotune_requirement, wheels)
    if req is not None:
        pip = [req, *TRAINING_EXTRAS]
        what = req
    else:
        resolved = resolve_wheels(wheels)
        pip = [*_dependencies(resolved), *TRAINING_EXTRAS]
        what = "dependencies of " + ", ".join(w.filename for w in resolved)
    # anonymous (no name): Azure ML keys it by its content and reuses the built image
    return sdk.Environment(
        description=f"ferrotune fine-tuning ({what}) on {TRAINING_IMAGE}",
        image=TRAINING_IMAGE,
        conda_file=_conda("ferrotune-train", pip),
    )


def _serving_wheel(wheels: list, gpu: bool) -> Any:
    cpu = [w for w in wheels if w.cuda is None]
    cuda = [w for w in wheels if w.cuda is not None]
    if gpu:
        if not cuda:
            raise WheelError(
                f"serving on a GPU instance type needs ferrotune's CUDA wheel, and only {wheels[0].filename} was "
                "given: pass wheels=[..., 'dist-cuda/ferrotune-<ver>+cu12-...whl'] (scripts/build_cuda.sh builds it), "
                "or deploy to a CPU instance type (e.g. instance_type='Standard_E8s_v3')"
            )
        return cuda[0]
    return (cpu or cuda)[0]


def inference_environment(
    ferrotune_requirement: Optional[str] = None, *, gpu: bool = False, wheels: Any = None
) -> Any:
    """The serving environment: an Azure ML image with the inference server and
    ferrotune.

    By default a Docker build context (``Dockerfile``, ``requirements.txt`` and the
    wheel; Azure ML uploads it and builds the image): on :data:`GPU_INFERENCE_IMAGE` with
    the CUDA wheel for GPU instance types, on :data:`CPU_INFERENCE_IMAGE` with the CPU
    wheel (or the CUDA wheel, which also runs on a CPU) otherwise. The Dockerfile creates
    a Python 3.11 conda environment and runs ``pip install -r requirements.txt``
    (:data:`INFERENCE_SERVER_REQUIREMENT` and ``./<the wheel>``).

    Args:
        ferrotune_requirement: instead of a wheel, a pip requirement for ferrotune
            (``"ferrotune==X"`` from your package index): the image plus a conda file.
        gpu: a GPU instance type: the CUDA image and the CUDA wheel.
        wheels: the wheels to choose from (default:
            :func:`~ferrotune.azureml.wheels.default_wheels`).

    Returns:
        ``azure.ai.ml.entities.Environment``

    Raises:
        WheelError: ``gpu`` and no CUDA wheel, or an unusable wheel.
    """
    sdk = _sdk()
    req = _either(ferrotune_requirement, wheels)
    image = GPU_INFERENCE_IMAGE if gpu else CPU_INFERENCE_IMAGE
    if req is not None:
        return sdk.Environment(
            description=f"ferrotune serving ({req}) on {image}",
            image=image,
            conda_file=_conda("ferrotune-serve", [INFERENCE_SERVER_REQUIREMENT, req]),
        )
    wheel = _serving_wheel(resolve_wheels(wheels), gpu)
    context = serving_context(wheel, image, [INFERENCE_SERVER_REQUIREMENT])
    return sdk.Environment(
        description=f"ferrotune serving ({wheel.filename}) on {image}",
        build=sdk.BuildContext(path=str(context), dockerfile_path="Dockerfile"),
    )
