"""Serving: the online endpoint and its deployment (:func:`deploy`), the notebook's scoring
request (:func:`sample_request`, :func:`invoke`) and clean-up (:func:`delete`)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..exceptions import FerrotuneFileNotFoundError, InvalidArgumentError
from ._common import AzureMLError, PathLike, _ferrotune_version, _positive_int, _sdk
from .environments import inference_environment
from .instance_types import INSTANCE_TYPES, check_instance_type

#: the notebook's scoring parameters (``sample_score.json``)
DEFAULT_PARAMETERS: dict = {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200}

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
    wheels: Any = None,
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
        environment = inference_environment(ferrotune_requirement, gpu=bool(t.gpus) if t else True, wheels=wheels)
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
    wheels: Any = None,
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
    and its scoring code always matches it), in :func:`inference_environment`: an image
    that Azure ML builds from a Docker build context holding the ferrotune wheel (the
    CUDA wheel and the CUDA image for GPU instance types, the CPU wheel and the minimal
    CPU inference image otherwise).

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
        environment: default: :func:`inference_environment` (the GPU image and the
            CUDA wheel for GPU instance types).
        ferrotune_requirement: a pip requirement for ferrotune from a package index
            (``"ferrotune==X"``), instead of shipping a wheel.
        description: the endpoint's description.
        liveness_initial_delay: seconds before the first liveness probe (600).
        request_timeout_ms: the scoring request timeout (90000).
        wheels: the ferrotune wheel(s) to choose from (default: the running ferrotune's,
            :func:`~ferrotune.azureml.wheels.default_wheels`); a GPU instance type needs
            the CUDA wheel.

    Returns:
        the endpoint (``ManagedOnlineEndpoint``) with its traffic set.

    Raises:
        ComputeTargetError: the model does not fit on ``instance_type``, or its GPU is
            older than compute capability 7.0.
        WheelError: a GPU instance type and no CUDA wheel.
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
            wheels=wheels,
        )
        ml_client.online_endpoints.begin_create_or_update(endpoint).wait()
        # the code folder is uploaded here, before the poller is returned
        ml_client.online_deployments.begin_create_or_update(deployment).wait()
    endpoint.traffic = {deployment_name: 100}
    return ml_client.online_endpoints.begin_create_or_update(endpoint).result()


# ---------------------------------------------------------------------------------------
# Scoring requests
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
# Clean-up
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
