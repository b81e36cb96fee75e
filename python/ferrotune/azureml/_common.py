"""What every part of ``ferrotune.azureml`` shares: the errors, the Azure ML SDK (imported
when first needed) and small argument checks."""

from __future__ import annotations

import importlib
import os
from typing import Any, Optional, Union

from ..exceptions import FerrotuneError, InvalidArgumentError

PathLike = Union[str, "os.PathLike[str]"]

_INSTALL_HINT = 'pip install "ferrotune[azure]"'
_GIB = 1024**3


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
    exist, is in a failed state, has no GPUs, has a GPU older than compute capability 7.0,
    or has too little memory for the model.

    Also a ``ValueError``, like the notebook's own checks."""


class WheelError(AzureMLError, ValueError):
    """A ferrotune wheel that cannot run where it is sent: not a ferrotune wheel, not for
    Linux x86-64 or the environment's Python, two wheels of one kind, or a GPU job or
    deployment without the CUDA wheel."""


class WheelNotFoundError(WheelError, FileNotFoundError):
    """No wheel of the running ferrotune is known: it was neither installed from a wheel
    file nor runs from a source checkout. The message says how to get one."""


class WheelBuildError(AzureMLError):
    """Building the wheel from the source checkout (``maturin build --release``) failed or
    maturin is missing; the message ends with maturin's last lines."""


class _Sdk:
    """The parts of ``azure.ai.ml`` this package uses, imported once."""

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
        self.BuildContext = entities.BuildContext
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
    from .. import __version__

    return __version__


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name}={value!r} is not valid: expected an integer >= 1")
    return value
