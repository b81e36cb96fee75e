"""A loopback stand-in for the Azure Resource Manager REST API of one Azure ML workspace.

It lets a real ``azure.ai.ml.MLClient`` (a custom cloud whose resource manager is this
server, a fake ``TokenCredential``) run ferrotune's Azure ML calls end to end without
Azure: the workspace, computes and VM sizes, command jobs, online endpoints (+ keys, scoring), online
deployments, model / environment / code versions, and the blob uploads of a code folder
(through the pending-upload SAS URI the service hands out, which points back here) or of an
environment's Docker build context (through the workspace's default datastore, whose storage
account host, :data:`STORAGE_HOST`, resolves to this server: see :meth:`FakeArm.trust`).
Every request is recorded (method, path, query, JSON or raw body) for the tests to
assert on.

Runs inside the azure-ai-ml side venv: only the standard library and ``cryptography``
(a dependency of azure-identity), which makes the self-signed TLS certificate. HTTPS is
needed because azure-core refuses to send a bearer token over plain HTTP.

Long-running operations complete at once: a PUT answers 200 with
``provisioningState: Succeeded``; a DELETE answers 200.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import ssl
import threading
import uuid
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
RESOURCE_GROUP = "ferrotune-rg"
WORKSPACE = "ferrotune-ws"
LOCATION = "eastus"
CLOUD = "FerrotuneLoopbackCloud"
ENDPOINT_KEY = "primary-key-for-tests"
#: the workspace datastore's storage account and container (blob paths start with /blob/)
STORAGE_ACCOUNT = "fakestorage"
STORAGE_SUFFIX = "core.invalid"
STORAGE_HOST = f"{STORAGE_ACCOUNT}.blob.{STORAGE_SUFFIX}"
DATASTORE = "workspaceblobstore"

_WS = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
    f"/providers/Microsoft.MachineLearningServices/workspaces/{WORKSPACE}"
)


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost: ``(cert.pem, key.pem)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.DNSName(STORAGE_HOST),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "arm-cert.pem", folder / "arm-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class FakeCredential:
    """A ``TokenCredential`` that hands out a fixed token and never signs in."""

    def __init__(self) -> None:
        self.scopes: list = []

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.scopes.extend(scopes)
        return AccessToken("fake-arm-token", 4102444800)  # year 2100


class FakeArm:
    """The stand-in server. Use as a context manager; ``url`` is its base URL.

    State the tests can set before calling: ``computes`` (name → dict with ``size``,
    ``provisioningState``), ``vm_sizes`` (list of ``(name, gpus)``), ``score_response``
    (what ``POST /score`` answers, a JSON-able value).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.requests: list = []
        self.unhandled: list = []
        self.lock = threading.Lock()
        self.endpoints: dict = {}
        self.jobs: dict = {}
        self.deployments: dict = {}
        self.models: dict = {}
        self.environments: dict = {}
        self.codes: dict = {}
        self.blobs: dict = {}
        self.blob_metadata: dict = {}
        self.computes: dict = {}
        self.vm_sizes: list = []
        self.score_response: Any = {"output": "Hello from the loopback endpoint."}
        self._meta: dict = {}  # x-ms-meta-* headers of the request being handled (under lock)
        self.cert, key = make_certificate(self.folder)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert), str(key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeArm":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- what MLClient needs -------------------------------------------------------------

    def cloud_kwargs(self) -> dict:
        """``MLClient(..., **cloud_kwargs())``: a custom cloud whose resource manager is us.

        Trust in the certificate comes from ``REQUESTS_CA_BUNDLE`` (see :meth:`trust`):
        the SDK builds some clients (blob storage) without the MLClient's kwargs."""
        return {
            "cloud": CLOUD,
            "cloud_metadata": {
                "azure_portal": "https://portal.invalid/",
                "resource_manager": self.url + "/",
                "active_directory": "https://login.invalid/",
                "aml_resource_id": "https://ml.invalid/",
                "storage_endpoint": f"{STORAGE_SUFFIX}:{self.port}",  # blob storage: this server too
                "registry_discovery_endpoint": "https://registry.invalid/",
            },
            "enable_telemetry": False,
            "show_progress": False,
        }

    def trust(self) -> None:
        """Makes ``requests`` (azure-core's transport) trust this server's certificate,
        and only it, for the rest of the process, and makes the datastore's storage host
        (:data:`STORAGE_HOST`) resolve to 127.0.0.1 (so the socket guard lets it through)."""
        import os
        import socket

        os.environ["REQUESTS_CA_BUNDLE"] = str(self.cert)
        os.environ["SSL_CERT_FILE"] = str(self.cert)
        for var in ("NO_PROXY", "no_proxy"):  # straight to us, not through the tests' dead proxy
            os.environ[var] = ",".join(filter(None, [os.environ.get(var, ""), STORAGE_HOST]))
        inner = socket.getaddrinfo

        def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host in (STORAGE_HOST, STORAGE_HOST.encode()):
                host = "127.0.0.1"
            return inner(host, *args, **kwargs)

        socket.getaddrinfo = resolve  # type: ignore[assignment]

    def calls(self, method: Optional[str] = None, contains: str = "") -> list:
        with self.lock:
            return [r for r in self.requests if (method is None or r["method"] == method) and contains in r["path"]]

    # -- the resources -------------------------------------------------------------------

    def _arm(self, kind: str, rid: str, name: str, props: dict, **extra: Any) -> dict:
        return {"id": rid, "name": name, "type": kind, **extra, "properties": props}

    def handle(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any, dict]:
        """``(status, JSON-able body or bytes or None, headers)`` for one request."""
        # -- blob storage (the SAS URI of a pending upload points here) -----------------------
        if path.startswith("/blob/"):
            return self._blob(method, path, query, body)
        if path == "/score":
            return 200, self.score_response, {}
        if not path.startswith(_WS) and "/locations/" in path and path.endswith("/vmSizes") and method == "GET":
            return 200, {
                "value": [
                    {"name": n, "family": "standardFamily", "vCPUs": 4, "gpus": g, "osVhdSizeMB": 1047552,
                     "maxResourceVolumeMB": 100000, "memoryGB": 16.0, "lowPriorityCapable": True,
                     "premiumIO": True, "supportedComputeTypes": ["AmlCompute"]}
                    for n, g in self.vm_sizes
                ]
            }, {}
        if not path.startswith(_WS):
            return self._unhandled(method, path)
        rest = path[len(_WS):]
        if rest == "" and method == "GET":
            return 200, {
                "id": _WS, "name": WORKSPACE, "type": "Microsoft.MachineLearningServices/workspaces",
                "location": LOCATION, "kind": "Default",
                "properties": {"friendlyName": WORKSPACE, "workspaceId": str(uuid.UUID(int=1)),
                               "discoveryUrl": "https://registry.invalid/discovery"},
            }, {}
        m = re.fullmatch(r"/computes/([^/]+)", rest)
        if m and method == "GET":
            c = self.computes.get(m[1])
            if c is None:
                return _not_found(f"compute {m[1]}")
            props = {
                "computeType": "AmlCompute", "computeLocation": LOCATION,
                "provisioningState": c.get("provisioningState", "Succeeded"),
                "properties": {"vmSize": c["size"], "vmPriority": "Dedicated",
                               "scaleSettings": {"minNodeCount": 0, "maxNodeCount": 1}},
            }
            return 200, self._arm("Microsoft.MachineLearningServices/workspaces/computes", path, m[1], props,
                                  location=LOCATION), {}
        m = re.fullmatch(r"/jobs/([^/]+)", rest)
        if m and method == "PUT":
            job = json.loads(json.dumps(body))
            job.update(id=path, name=m[1], type="Microsoft.MachineLearningServices/workspaces/jobs")
            job.setdefault("properties", {})["status"] = "NotStarted"
            self.jobs[m[1]] = job
            return 201, job, {}
        if m and method == "GET":
            return (200, self.jobs[m[1]], {}) if m[1] in self.jobs else _not_found(f"job {m[1]}")
        m = re.fullmatch(r"/onlineEndpoints/([^/]+)", rest)
        if m:
            return self._endpoint(method, path, m[1], body)
        m = re.fullmatch(r"/onlineEndpoints/([^/]+)/listKeys", rest)
        if m and method == "POST":
            if m[1] not in self.endpoints:
                return _not_found(f"endpoint {m[1]}")
            return 200, {"primaryKey": ENDPOINT_KEY, "secondaryKey": "secondary"}, {}
        m = re.fullmatch(r"/onlineEndpoints/([^/]+)/deployments/([^/]+)", rest)
        if m:
            return self._deployment(method, path, m[1], m[2], body)
        m = re.fullmatch(r"/onlineEndpoints/([^/]+)/deployments", rest)
        if m and method == "GET":
            return 200, {"value": [d for (e, _), d in self.deployments.items() if e == m[1]]}, {}
        m = re.fullmatch(r"/(models|environments|codes)/([^/]+)/versions/([^/]+)", rest)
        if m:
            return self._version(method, path, m[1], m[2], m[3], body)
        m = re.fullmatch(r"/(models|environments|codes)/([^/]+)/versions", rest)
        if m and method == "GET":
            # a listing by hash (codes) or of versions (models): nothing there yet
            store = {"models": self.models, "environments": self.environments, "codes": self.codes}[m[1]]
            if m[1] == "codes":
                return 200, {"value": []}, {}
            return 200, {"value": [v for (n, _), v in store.items() if n == m[2]]}, {}
        m = re.fullmatch(r"/datastores/([^/]+)", rest)
        if m and method == "GET":
            return (200, self._datastore(), {}) if m[1] == DATASTORE else _not_found(f"datastore {m[1]}")
        if rest == "/datastores" and method == "GET":  # get_default(): ?isDefault=true
            return 200, {"value": [self._datastore()]}, {}
        m = re.fullmatch(r"/datastores/([^/]+)/listSecrets", rest)
        if m and method == "POST" and m[1] == DATASTORE:
            return 200, {"secretsType": "Sas", "sasToken": "sv=2021-08-06&sig=fake"}, {}
        m = re.fullmatch(r"/codes/([^/]+)/versions/([^/]+)/startPendingUpload", rest)
        if m and method == "POST":
            container = "code-" + m[2]
            blob_uri = f"{self.url}/blob/{container}"
            return 200, {
                "blobReferenceForConsumption": {
                    "blobUri": blob_uri,
                    "storageAccountArmId": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
                    "/providers/Microsoft.Storage/storageAccounts/fakestorage",
                    "credential": {"credentialType": "SAS", "sasUri": blob_uri + "?sv=2021-08-06&sig=fake"},
                },
                "pendingUploadId": m[2],
                "pendingUploadType": "TemporaryBlobReference",
            }, {}
        return self._unhandled(method, path)

    def _datastore(self) -> dict:
        return self._arm(
            "Microsoft.MachineLearningServices/workspaces/datastores", f"{_WS}/datastores/{DATASTORE}", DATASTORE,
            {"datastoreType": "AzureBlob", "accountName": STORAGE_ACCOUNT, "containerName": "blob",
             "endpoint": STORAGE_SUFFIX, "protocol": "https", "isDefault": True,
             "credentials": {"credentialsType": "Sas"}},
        )

    def _endpoint(self, method: str, path: str, name: str, body: Any) -> tuple[int, Any, dict]:
        if method == "PUT":
            ep = json.loads(json.dumps(body))
            ep.update(id=path, name=name, type="Microsoft.MachineLearningServices/workspaces/onlineEndpoints")
            ep.setdefault("identity", {"type": "SystemAssigned", "principalId": str(uuid.UUID(int=2)),
                                       "tenantId": str(uuid.UUID(int=3))})
            props = ep.setdefault("properties", {})
            props.update(provisioningState="Succeeded", scoringUri=f"{self.url}/score",
                         swaggerUri=f"{self.url}/swagger.json")
            self.endpoints[name] = ep
            return 200, ep, {}
        if name not in self.endpoints:
            return _not_found(f"endpoint {name}")
        if method == "GET":
            return 200, self.endpoints[name], {}
        if method == "DELETE":
            del self.endpoints[name]
            for key in [k for k in self.deployments if k[0] == name]:
                del self.deployments[key]
            return 200, None, {}
        return self._unhandled(method, path)

    def _deployment(self, method: str, path: str, endpoint: str, name: str, body: Any) -> tuple[int, Any, dict]:
        if endpoint not in self.endpoints:
            return _not_found(f"endpoint {endpoint}")
        if method == "PUT":
            dep = json.loads(json.dumps(body))
            dep.update(id=path, name=name,
                       type="Microsoft.MachineLearningServices/workspaces/onlineEndpoints/deployments")
            dep.setdefault("properties", {})["provisioningState"] = "Succeeded"
            self.deployments[(endpoint, name)] = dep
            return 200, dep, {}
        if (endpoint, name) not in self.deployments:
            return _not_found(f"deployment {name}")
        if method == "GET":
            return 200, self.deployments[(endpoint, name)], {}
        return self._unhandled(method, path)

    def _version(self, method: str, path: str, kind: str, name: str, version: str, body: Any) -> tuple[int, Any, dict]:
        store = {"models": self.models, "environments": self.environments, "codes": self.codes}[kind]
        if method == "PUT":
            res = json.loads(json.dumps(body))
            res.update(id=path, name=version,
                       type=f"Microsoft.MachineLearningServices/workspaces/{kind}/versions")
            props = res.setdefault("properties", {})
            props["provisioningState"] = "Succeeded"
            if kind == "models":
                props.setdefault("flavors", {})  # the service always returns the (possibly empty) flavors
            store[(name, version)] = res
            return 200, res, {}
        if method == "GET":
            if (name, version) not in store:
                return _not_found(f"{kind} {name}:{version}")
            return 200, store[(name, version)], {}
        return self._unhandled(method, path)

    def _blob(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any, dict]:
        blob = unquote(path[len("/blob/"):])
        headers = {"ETag": '"0x1"', "Last-Modified": formatdate(usegmt=True), "x-ms-version": "2021-08-06",
                   "x-ms-request-id": str(uuid.uuid4())}
        comp = query.get("comp", [""])[0]
        if method in ("HEAD", "GET") and not comp:
            if blob not in self.blobs:
                return 404, None, {**headers, "x-ms-error-code": "BlobNotFound"}
            meta = {f"x-ms-meta-{k}": v for k, v in self.blob_metadata.get(blob, {}).items()}
            return 200, self.blobs[blob], {**headers, **meta, "x-ms-blob-type": "BlockBlob",
                                           "Content-Type": "application/octet-stream"}
        if method == "PUT" and not comp:
            self.blobs[blob] = body if isinstance(body, bytes) else json.dumps(body).encode()
            return 201, None, {**headers, "x-ms-request-server-encrypted": "true"}
        if method == "PUT" and comp == "metadata":
            if blob not in self.blobs:
                return 404, None, {**headers, "x-ms-error-code": "BlobNotFound"}
            self.blob_metadata[blob] = dict(self._meta)
            return 200, None, headers
        return self._unhandled(method, path)

    def _unhandled(self, method: str, path: str) -> tuple[int, Any, dict]:
        self.unhandled.append(f"{method} {path}")
        return 501, {"error": {"code": "NotImplementedInStandIn", "message": f"{method} {path}"}}, {}


def _not_found(what: str) -> tuple[int, Any, dict]:
    return 404, {"error": {"code": "ResourceNotFound", "message": f"{what} not found"}}, {}


def _make_handler(arm: FakeArm) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _serve(self) -> None:
            url = urlsplit(self.path)
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            body: Any = raw
            if raw and "json" in (self.headers.get("Content-Type") or ""):
                try:
                    body = json.loads(raw)
                except ValueError:
                    pass
            query = parse_qs(url.query)
            with arm.lock:
                arm._meta = {k[len("x-ms-meta-"):]: v for k, v in self.headers.items()
                             if k.lower().startswith("x-ms-meta-")}
                arm.requests.append({
                    "method": self.command, "path": url.path, "query": {k: v[0] for k, v in query.items()},
                    "body": body if not isinstance(body, bytes) else body.decode("utf-8", "replace"),
                    "authorization": self.headers.get("Authorization", ""),
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                })
                try:
                    status, payload, headers = arm.handle(self.command, url.path, query, body)
                except Exception as e:  # a bug in the stand-in: make it visible
                    arm.unhandled.append(f"{self.command} {url.path}: {type(e).__name__}: {e}")
                    status, payload, headers = 500, {"error": {"code": "StandInError", "message": str(e)}}, {}
            data = payload if isinstance(payload, bytes) else (b"" if payload is None else json.dumps(payload).encode())
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if not isinstance(payload, bytes) and payload is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("x-ms-request-id", str(uuid.uuid4()))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _serve

    return Handler
