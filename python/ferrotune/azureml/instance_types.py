"""Instance types (VM sizes): what GPU they have, whether ferrotune runs on it, and whether
a model folder fits for serving (:func:`check_instance_type`)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..exceptions import ModelError
from ..packaging import read_safetensors_header
from ._common import _GIB, ComputeTargetError, PathLike
from ._node_install import MIN_COMPUTE_CAPABILITY, MIN_DRIVER

@dataclass(frozen=True)
class InstanceType:
    """An Azure VM size (compute clusters and managed online endpoints)."""

    name: str
    vcpus: int
    #: memory of the VM in GiB
    ram_gib: float
    gpus: int = 0
    gpu: str = ""
    #: memory of one GPU in GiB (ferrotune serves a model from one GPU)
    gpu_gib: float = 0.0
    #: the GPU's CUDA compute capability (V100 7.0, T4 7.5, A100 8.0, H100 9.0; 0 without GPU)
    compute_capability: float = 0.0

    @property
    def supported(self) -> bool:
        """ferrotune runs on it: a CPU VM, or a GPU of compute capability >= 7.0."""
        return not self.gpus or self.compute_capability >= MIN_COMPUTE_CAPABILITY

    @property
    def precision(self) -> str:
        """How ferrotune's 16-bit training runs here: ``"bf16"`` (compute capability
        >= 8.0: A100, H100), ``"fp16"`` (V100, T4: no bfloat16), ``"fp32"`` (CPU)."""
        if not self.gpus:
            return "fp32"
        return "bf16" if self.compute_capability >= 8.0 else "fp16"

    def describe(self) -> str:
        if self.gpus:
            return f"{self.name} ({self.gpus} x {self.gpu} {self.gpu_gib:g} GB)"
        return f"{self.name} ({self.vcpus} vCPUs, {self.ram_gib:g} GiB RAM)"

    def requirements(self) -> str:
        """One line: what ferrotune needs to run here (wheel, driver, precision) or why it
        cannot."""
        if not self.gpus:
            return f"{self.describe()}: no GPU, ferrotune's CPU wheel (float32)"
        gpu = f"{self.describe()}, compute capability {self.compute_capability:.1f}"
        if not self.supported:
            return (
                f"{gpu}: not supported, ferrotune's CUDA build needs compute capability >= "
                f"{MIN_COMPUTE_CAPABILITY:.1f} (V100 or newer)"
            )
        drivers = ", ".join(f"cu{k}: >= {v}" for k, v in sorted(MIN_DRIVER.items()))
        return (
            f"{gpu}: ferrotune's CUDA wheel, NVIDIA driver on the node by the wheel's CUDA version ({drivers}), "
            f"16-bit training in {self.precision}"
        )


def _it(*args: Any, **kw: Any) -> tuple[str, InstanceType]:
    t = InstanceType(*args, **kw)
    return t.name.lower(), t


#: Common VM sizes of Azure ML compute clusters and managed online endpoints (Azure's VM
#: size documentation), keyed by the lower-case name. GPU generations older than V100 (K80,
#: M60, P100, P40) are listed so that they are refused with the reason.
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
        # GPU: T4 (7.5)
        _it("Standard_NC4as_T4_v3", 4, 28, 1, "T4", 16, 7.5),
        _it("Standard_NC8as_T4_v3", 8, 56, 1, "T4", 16, 7.5),
        _it("Standard_NC16as_T4_v3", 16, 110, 1, "T4", 16, 7.5),
        _it("Standard_NC64as_T4_v3", 64, 440, 4, "T4", 16, 7.5),
        # V100 (7.0)
        _it("Standard_NC6s_v3", 6, 112, 1, "V100", 16, 7.0),
        _it("Standard_NC12s_v3", 12, 224, 2, "V100", 16, 7.0),
        _it("Standard_NC24s_v3", 24, 448, 4, "V100", 16, 7.0),
        _it("Standard_NC24rs_v3", 24, 448, 4, "V100", 16, 7.0),
        _it("Standard_ND40rs_v2", 40, 672, 8, "V100", 32, 7.0),
        # A10 (8.6), A100 (8.0), H100 (9.0)
        _it("Standard_NV36ads_A10_v5", 36, 440, 1, "A10", 24, 8.6),
        _it("Standard_NV72ads_A10_v5", 72, 880, 2, "A10", 24, 8.6),
        _it("Standard_NC24ads_A100_v4", 24, 220, 1, "A100", 80, 8.0),
        _it("Standard_NC48ads_A100_v4", 48, 440, 2, "A100", 80, 8.0),
        _it("Standard_NC96ads_A100_v4", 96, 880, 4, "A100", 80, 8.0),
        _it("Standard_ND96asr_v4", 96, 900, 8, "A100", 40, 8.0),
        _it("Standard_ND96amsr_A100_v4", 96, 1900, 8, "A100", 80, 8.0),
        _it("Standard_NC40ads_H100_v5", 40, 320, 1, "H100 NVL", 94, 9.0),
        _it("Standard_NC80adis_H100_v5", 80, 640, 2, "H100 NVL", 94, 9.0),
        _it("Standard_ND96isr_H100_v5", 96, 1900, 8, "H100", 80, 9.0),
        # too old for ferrotune's CUDA build: K80 (3.7), M60 (5.2), P100 (6.0), P40 (6.1)
        _it("Standard_NC6", 6, 56, 1, "K80", 12, 3.7),
        _it("Standard_NC12", 12, 112, 2, "K80", 12, 3.7),
        _it("Standard_NC24", 24, 224, 4, "K80", 12, 3.7),
        _it("Standard_NC24r", 24, 224, 4, "K80", 12, 3.7),
        _it("Standard_NV6", 6, 56, 1, "M60", 8, 5.2),
        _it("Standard_NV12", 12, 112, 2, "M60", 8, 5.2),
        _it("Standard_NV24", 24, 224, 4, "M60", 8, 5.2),
        _it("Standard_NC6s_v2", 6, 112, 1, "P100", 16, 6.0),
        _it("Standard_NC12s_v2", 12, 224, 2, "P100", 16, 6.0),
        _it("Standard_NC24s_v2", 24, 448, 4, "P100", 16, 6.0),
        _it("Standard_NC24rs_v2", 24, 448, 4, "P100", 16, 6.0),
        _it("Standard_ND6s", 6, 112, 1, "P40", 24, 6.1),
        _it("Standard_ND12s", 12, 224, 2, "P40", 24, 6.1),
        _it("Standard_ND24s", 24, 448, 4, "P40", 24, 6.1),
        _it("Standard_ND24rs", 24, 448, 4, "P40", 24, 6.1),
    ]
)


def instance_type(name: str) -> Optional[InstanceType]:
    """The :class:`InstanceType` of a VM size name (any case), or ``None`` if ferrotune
    does not know it."""
    return INSTANCE_TYPES.get(str(name).lower())


def _unsupported(t: InstanceType, what: str, where: str = "") -> ComputeTargetError:
    return ComputeTargetError(
        f"{what} {t.name} ({t.gpu}, compute capability {t.compute_capability:.1f}){where} is not supported: ferrotune's CUDA "
        f"build needs compute capability >= {MIN_COMPUTE_CAPABILITY:.1f} (V100 or newer); use e.g. "
        "Standard_NC24ads_A100_v4 (1 x A100 80 GB, bf16) or Standard_NC6s_v3 (1 x V100 16 GB, fp16)"
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
        """Weights in 16 bit, as ferrotune serves on a GPU (bfloat16; float16 on V100 / T4)."""
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
    fits = [t for t in INSTANCE_TYPES.values() if bool(t.gpus) == gpu and t.supported and _fits(t, mem)]
    if gpu:
        return min(fits, key=lambda t: (t.gpu_gib, t.gpus, t.ram_gib), default=None)
    return min(fits, key=lambda t: (t.ram_gib, t.vcpus), default=None)


def check_instance_type(instance_type: str, model_dir: Optional[PathLike]) -> Optional[ServingMemory]:
    """Checks that ferrotune runs on ``instance_type`` and that it can hold the model in
    ``model_dir``.

    A GPU older than compute capability 7.0 (K80, M60, P100, P40 sizes) is refused, model
    or not. GPU instance types are checked against one GPU's memory with 16-bit weights
    (bfloat16; float16 on V100 and T4), CPU ones against the VM's memory with float32
    weights (ferrotune's CPU serving keeps float32: twice the 16-bit bytes). Both with
    20 % + 1 GiB of headroom. An instance type missing from :data:`INSTANCE_TYPES` is not
    checked (a warning says so when there is a model to check). GPU nodes also need an
    NVIDIA driver new enough for the CUDA wheel (see :meth:`InstanceType.requirements`);
    Azure ML's GPU nodes have one, the fine-tuning job checks it on the node.

    Args:
        instance_type: e.g. ``"Standard_NC6s_v3"``.
        model_dir: the local model folder, or ``None`` (no model to check).

    Returns:
        the estimate, or ``None`` when there was no model to check.

    Raises:
        ComputeTargetError: the GPU is too old, or the model does not fit; the message
            names an instance type that fits.
    """
    t = INSTANCE_TYPES.get(str(instance_type).lower())
    if t is not None and not t.supported:
        raise _unsupported(t, "instance type")
    if model_dir is None:
        return None
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
            f"{mem.parameters / 1e9:.2f} B parameters = {mem.gpu_bytes / gb:.1f} GB in 16 bit on the GPU, "
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
