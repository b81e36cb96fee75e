"""Registering the fine-tuned model: the job's ``trained_model`` output (or a local MLflow
folder) as an MLflow model asset, as the notebook's "Register the model" cell does."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from ..exceptions import FerrotuneFileNotFoundError, InvalidArgumentError
from ._common import _ferrotune_version, _sdk
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


