"""The workspace and its compute: :func:`client` (the notebook's ``MLClient.from_config``)
and :func:`check_compute` (the notebook's compute checks, plus GPU generation)."""

from __future__ import annotations

import importlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Optional

from ..exceptions import InvalidArgumentError
from ._common import _INSTALL_HINT, AzureExtraMissingError, ComputeTargetError, PathLike, WorkspaceConfigError, _sdk
from .instance_types import INSTANCE_TYPES, _unsupported

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


def check_compute(ml_client: Any, compute_name: str) -> int:
    """Checks a compute cluster the way the notebook does and returns its GPUs per node.

    Beyond the notebook's checks, the VM size's GPU generation is checked: ferrotune's
    CUDA build needs compute capability >= 7.0 (V100 or newer; V100 and T4 train in fp16,
    A100 / H100 in bf16, see :data:`INSTANCE_TYPES`). The NVIDIA driver is the node's:
    Azure ML's GPU nodes come with a current one, and the job itself checks that it is new
    enough for the CUDA wheel (>= 525 for a ``+cu12`` wheel) before it trains.

    Args:
        ml_client: the workspace ``MLClient``.
        compute_name: the compute's name in the workspace.

    Returns:
        the number of GPUs of one node (for :func:`finetune_job`'s ``gpus_per_node``).

    Raises:
        ComputeTargetError: the compute does not exist, its provisioning failed, its VM size
            has a GPU older than compute capability 7.0 (K80 ``Standard_NC6``, P100
            ``Standard_NC6s_v2``, ...), the size is not in the workspace's size list, or it
            has no GPUs.

    Warns:
        UserWarning: a GPU VM size ferrotune does not know (its GPU generation is not
            checked).
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
    known = INSTANCE_TYPES.get(size.lower())
    if known is not None and not known.supported:
        raise _unsupported(known, "VM size", f" of compute {compute_name!r}")
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
    if known is None:
        warnings.warn(
            f"ferrotune does not know VM size {size} of compute {compute_name!r}: its GPU's compute capability "
            f"is not checked (ferrotune's CUDA build needs >= 7.0, V100 or newer)",
            UserWarning,
            stacklevel=2,
        )
    return gpus
