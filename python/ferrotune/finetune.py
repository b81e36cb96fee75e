"""``ferrotune.finetune``: LoRA fine-tuning with the Azure ML pipeline's parameter names.

The training loop is native (``ferrotune._core.finetune``, a JSON config in, a JSON summary
out). This module is its Python face:

- :func:`build_config` turns the ``finetune_parameters`` a notebook passes to Azure ML's
  ``chat_completion_pipeline`` (strings like ``"true"`` or ``"5e-6"`` included, the
  pipeline's defaults where a name is left out) into the native config, and says in
  plain notes which pipeline switches have no meaning here (DeepSpeed, ONNX Runtime, ...);
- the progress callback it hands the core forwards training metrics to MLflow, to user
  callbacks and, as one short line per logging step, to the progress display;
- :class:`FinetuneResult` is the returned summary.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import numbers
import os
import re
import signal
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core
from ._progress import LineRenderer, TqdmRenderer, _in_notebook, make_renderer
from ._text import plural
from .exceptions import FerrotuneError, InvalidArgumentError, MissingDependencyError, TrainingInterrupted

__all__ = ["finetune", "FinetuneResult", "build_config", "DEFAULTS", "PARAMETER_NAMES"]

PathLike = Union[str, "os.PathLike[str]"]

#: the schedulers the core implements (``transformers.get_scheduler`` semantics)
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# transformers' other scheduler names (the pipeline offers the first two)
_HF_ONLY_SCHEDULERS = (
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)
#: Phi-3's fused linear layers: the pipeline's LoRA targets (also PEFT's "all-linear" for Phi-3)
DEFAULT_TARGET_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

#: The native config's defaults. Where Azure ML's chat_completion_pipeline has the same
#: parameter, this is the pipeline's default (num_train_epochs 1, learning_rate 2e-5,
#: lora_r 8, lora_alpha 128, logging_steps 10, save_total_limit -1, evaluation_strategy
#: "epoch", ...). ``save_steps`` is left to the core unless given. One deliberate
#: difference: ``precision`` defaults to "auto" (the pipeline's "32"), which is float32 on
#: the CPU and the GPU's fast 16-bit type on a GPU.
DEFAULTS: dict = {
    "num_train_epochs": 1.0,
    "max_steps": -1,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "learning_rate": 2e-5,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "max_seq_length": -1,
    "lora_r": 8,
    "lora_alpha": 128.0,
    "lora_dropout": 0.0,
    "target_modules": list(DEFAULT_TARGET_MODULES),
    "use_rslora": False,
    "merge_lora_weights": True,
    "precision": "auto",
    "seed": 42,
    "logging_steps": 10,
    "evaluation_strategy": "epoch",
    "eval_steps": None,
    "save_strategy": "epoch",
    "save_total_limit": -1,
    "save_interval_minutes": 30.0,
    "resume_from_checkpoint": None,
    "checkpoint_dir": None,
    "device": "auto",
    "gradient_checkpointing": False,
    "shuffle": True,
    "validation_split": 0.2,
    "adapter_init": None,
    "packing": True,
    "token": None,
}

# The arguments of finetune() itself: never training parameters.
_ARGUMENTS = ("model", "train_file", "validation_file", "output_dir", "progress", "report_to", "callbacks")

# Other spellings of a parameter: transformers' newer name for evaluation_strategy.
_ALIASES = {"eval_strategy": "evaluation_strategy"}


# ---------------------------------------------------------------------------------------
# Coercion: notebook values ("true", "5e-6", 3.0) to typed values, or a clear error
# ---------------------------------------------------------------------------------------


def _bad(name: str, value: Any, expected: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{name}={value!r} is not valid: expected {expected}")


def _is_bool(v: Any) -> bool:
    return isinstance(v, (bool, np.bool_))


def _as_bool(name: str, v: Any) -> bool:
    if _is_bool(v):
        return bool(v)
    if isinstance(v, numbers.Integral) and int(v) in (0, 1):
        return bool(int(v))
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "1"):
            return True
        if s in ("false", "0"):
            return False
    raise _bad(name, v, 'true or false ("true"/"false"/"1"/"0" also work)')


def _as_float(name: str, v: Any, expected: str = "a number") -> float:
    if _is_bool(v):
        raise _bad(name, v, expected)
    if isinstance(v, numbers.Real):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            raise _bad(name, v, expected) from None
    else:
        raise _bad(name, v, expected)
    if not math.isfinite(x):
        raise _bad(name, v, expected)
    return x


def _as_int(name: str, v: Any, expected: str = "an integer") -> int:
    if _is_bool(v):
        raise _bad(name, v, expected)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    x = _as_float(name, v, expected)  # "3.0", 3.0 and "1e3" are integers too
    if x != int(x):
        raise _bad(name, v, expected)
    return int(x)


def _as_choice(name: str, v: Any, choices: Sequence[str]) -> str:
    if isinstance(v, str) and v.strip().lower() in choices:
        return v.strip().lower()
    raise _bad(name, v, "one of " + ", ".join(repr(c) for c in choices))


def _as_path(name: str, v: Any) -> str:
    if isinstance(v, (str, os.PathLike)):
        s = os.fspath(v)
        if isinstance(s, str) and s:
            return s
    raise _bad(name, v, "a path")


# ---------------------------------------------------------------------------------------
# The parameters: native ones (into the config) and pipeline-only ones (a note each)
# ---------------------------------------------------------------------------------------

Parser = Callable[[str, Any, list], Any]


@dataclass(frozen=True)
class _Param:
    #: "bool", "int", "float", "str", "list" or "path" (what a command-line flag takes)
    kind: str
    #: (name, value, notes) -> the config value; pipeline-only parameters return None
    parse: Parser
    help: str
    #: True: the value goes into the native config under this name
    native: bool = True


def _int_param(lo: int, help: str, *, minus_one: str = "") -> _Param:
    expected = f"an integer >= {lo}" + (f", or -1 ({minus_one})" if minus_one else "")

    def parse(name: str, v: Any, notes: list) -> int:
        x = _as_int(name, v, expected)
        if x >= lo or (minus_one and x == -1):
            return x
        raise _bad(name, v, expected)

    return _Param("int", parse, help)


def _float_param(help: str, *, lo: float, lo_open: bool = False, hi: Optional[float] = None) -> _Param:
    expected = f"a number {'>' if lo_open else '>='} {lo:g}" + (f" and < {hi:g}" if hi is not None else "")

    def parse(name: str, v: Any, notes: list) -> float:
        x = _as_float(name, v, expected)
        if (x > lo if lo_open else x >= lo) and (hi is None or x < hi):
            return x
        raise _bad(name, v, expected)

    return _Param("float", parse, help)


def _any_float_param(help: str) -> _Param:
    return _Param("float", lambda name, v, notes: _as_float(name, v), help)


def _bool_param(help: str) -> _Param:
    return _Param("bool", lambda name, v, notes: _as_bool(name, v), help)


def _choice_param(choices: Sequence[str], help: str) -> _Param:
    return _Param("str", lambda name, v, notes: _as_choice(name, v, choices), help)


def _parse_scheduler(name: str, v: Any, notes: list) -> str:
    s = v.strip().lower() if isinstance(v, str) else v
    if s in _HF_ONLY_SCHEDULERS:
        raise InvalidArgumentError(
            f"{name}={v!r} is not supported yet; ferrotune implements " + ", ".join(repr(c) for c in SCHEDULERS)
        )
    return _as_choice(name, v, SCHEDULERS)


_PRECISION_HELP = (
    '"auto" (default: bfloat16 on GPUs that have it, float16 with loss scaling on older ones, '
    'float32 on the CPU), "16" (the same on a GPU), "bf16", "fp16", or "32" (float32; TF32 '
    "tensor-core products on a GPU)"
)


def _parse_precision(name: str, v: Any, notes: list) -> str:
    if _is_bool(v):
        raise _bad(name, v, _PRECISION_HELP)
    s = v.strip().lower() if isinstance(v, str) else v
    if isinstance(s, numbers.Real) and not isinstance(s, numbers.Integral) and float(s).is_integer():
        s = int(s)
    if s in (32, "32", "fp32", "float32"):
        return "32"
    if s in (16, "16"):
        return "16"
    if s in ("bf16", "bfloat16"):
        return "bf16"
    if s in ("fp16", "float16", "half"):
        return "fp16"
    if s == "auto":
        return "auto"
    raise _bad(name, v, _PRECISION_HELP)


def _parse_target_modules(name: str, v: Any, notes: list) -> list:
    expected = 'a list of module names, e.g. ["qkv_proj", "o_proj"] or "qkv_proj,o_proj"'
    items: Any = v
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                items = json.loads(s)
            except ValueError:
                raise _bad(name, v, expected) from None
        elif s == "all-linear":
            return list(DEFAULT_TARGET_MODULES)
        else:
            items = s.split(",")
    if not isinstance(items, (list, tuple)) or not items:
        raise _bad(name, v, expected)
    out = []
    for it in items:
        if not isinstance(it, str) or not it.strip():
            raise _bad(name, v, expected)
        if it.strip() not in out:
            out.append(it.strip())
    return out


def _parse_resume(name: str, v: Any, notes: list) -> Union[None, bool, str]:
    # The pipeline passes "true"/"false"; ferrotune also takes a checkpoint folder.
    if v is None or v is False or v == "":
        return None
    if v is True:
        return True
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return True if _as_bool(name, v) else None
    return _as_path(name, v)


def _parse_optional_path(name: str, v: Any, notes: list) -> Optional[str]:
    return None if v is None else _as_path(name, v)


def _parse_token(name: str, v: Any, notes: list) -> Optional[str]:
    if v is None or (isinstance(v, str) and v):
        return v
    raise _bad(name, v, "a Hugging Face token string")


def _parse_device(name: str, v: Any, notes: list) -> str:
    if isinstance(v, str):
        s = v.strip().lower()
        if s == "gpu":
            return "cuda"
        if re.fullmatch(r"cuda:\d+", s):
            return s
        # the emulated GPU of test builds (the `gpu-emu` cargo feature)
        if s in ("emu", "emu-sm70") and _core.gpu_emulator():
            return s
    return _as_choice(name, v, ("auto", "cpu", "cuda"))


def _parse_eval_steps(name: str, v: Any, notes: list) -> Optional[int]:
    return None if v is None else _int_param(1, "").parse(name, v, notes)


# -- pipeline-only parameters: validated like the pipeline would, then one note each ---------


def _ignored(kind: str, reason: str, check: Optional[Callable[[str, Any], Any]] = None, help: str = "") -> _Param:
    def parse(name: str, v: Any, notes: list) -> None:
        if check is not None and v is not None:
            check(name, v)
        notes.append(f"{name}: {reason}")
        return None

    return _Param(kind, parse, help or f"accepted for compatibility with Azure ML, ignored: {reason}", native=False)


def _parse_apply_lora(name: str, v: Any, notes: list) -> None:
    if v is not None and not _as_bool(name, v):
        raise InvalidArgumentError(
            f"{name}={v!r}: ferrotune trains LoRA adapters only (no full fine-tuning); "
            "set apply_lora=True (or leave it out)"
        )
    return None


def _parse_optim(name: str, v: Any, notes: list) -> None:
    ok = ("adamw_torch", "adamw_hf", "adamw_torch_fused", "adamw")
    if isinstance(v, str) and v.strip().lower() in ok:
        notes.append(f"{name}: ferrotune's optimizer is AdamW with torch.optim.AdamW's math; {v!r} needs no setting")
        return None
    raise InvalidArgumentError(f"{name}={v!r} is not supported: ferrotune's optimizer is AdamW (use {ok[0]!r} or leave it out)")


def _parse_metric_for_best_model(name: str, v: Any, notes: list) -> None:
    if isinstance(v, str) and v.strip().lower() in ("loss", "eval_loss"):
        notes.append(f"{name}: ferrotune always picks the best checkpoint by eval loss")
        return None
    raise InvalidArgumentError(f"{name}={v!r} is not supported: ferrotune picks the best checkpoint by eval loss ('loss')")


def _parse_logging_strategy(name: str, v: Any, notes: list) -> None:
    if v is None or _as_choice(name, v, ("steps", "epoch", "no")) == "steps":
        return None  # what ferrotune does: log every logging_steps
    raise InvalidArgumentError(f"{name}={v!r} is not supported yet: ferrotune logs every logging_steps steps ('steps')")


def _parse_early_stopping(name: str, v: Any, notes: list) -> None:
    if v is not None and _as_bool(name, v):
        raise InvalidArgumentError(f"{name}={v!r}: early stopping is not supported yet; the best checkpoint by eval loss is kept")
    return None


def _parse_eval_interval(name: str, v: Any, notes: list) -> None:
    if v is not None and _float_param("", lo=0.0).parse(name, v, notes) > 0:
        raise InvalidArgumentError(
            f"{name}={v!r} is not supported yet; set evaluation_strategy='steps' and eval_steps=N instead"
        )
    return None


def _parse_task_name(name: str, v: Any, notes: list) -> None:
    if isinstance(v, str) and v.strip().lower().replace("-", "").replace("_", "") == "chatcompletion":
        return None
    raise InvalidArgumentError(f"{name}={v!r} is not supported: ferrotune fine-tunes chat completion ('ChatCompletion')")


def _check_int_ge(lo: int) -> Callable[[str, Any], Any]:
    return lambda name, v: _int_param(lo, "").parse(name, v, [])


def _check_bool(name: str, v: Any) -> Any:
    return _as_bool(name, v)


_ONE_DEVICE = (
    "the launcher decides: ferrotune trains on the processes it starts (Azure ML's PyTorchDistribution, "
    "see ferrotune.azureml.finetune_job(gpus_per_node=..., instance_count=...)); ignored"
)

_PARAMS: dict[str, _Param] = {
    # -- native -----------------------------------------------------------------------------
    "num_train_epochs": _float_param("epochs to train (fractions allowed)", lo=0.0, lo_open=True),
    "max_steps": _int_param(1, "optimizer steps to train; overrides num_train_epochs", minus_one="use num_train_epochs"),
    "per_device_train_batch_size": _int_param(1, "packed rows per micro-batch"),
    "per_device_eval_batch_size": _int_param(1, "packed rows per evaluation batch"),
    "gradient_accumulation_steps": _int_param(1, "micro-batches per optimizer step"),
    "learning_rate": _float_param("peak learning rate", lo=0.0, lo_open=True),
    "lr_scheduler_type": _Param("str", _parse_scheduler, "learning-rate schedule: " + ", ".join(SCHEDULERS)),
    "warmup_steps": _int_param(0, "warm-up optimizer steps"),
    "warmup_ratio": _float_param("warm-up as a fraction of all steps (when warmup_steps is 0)", lo=0.0, hi=1.0),
    "weight_decay": _float_param("AdamW decoupled weight decay", lo=0.0),
    "adam_beta1": _float_param("AdamW beta1", lo=0.0, hi=1.0),
    "adam_beta2": _float_param("AdamW beta2", lo=0.0, hi=1.0),
    "adam_epsilon": _float_param("AdamW epsilon", lo=0.0, lo_open=True),
    "max_grad_norm": _any_float_param("clip the total gradient norm to this (<= 0: no clipping)"),
    "max_seq_length": _int_param(1, "truncation length and packed row size", minus_one="the model's maximum"),
    "lora_r": _int_param(1, "LoRA rank"),
    "lora_alpha": _float_param("LoRA alpha (scale alpha/r)", lo=0.0, lo_open=True),
    "lora_dropout": _float_param("dropout on the LoRA input", lo=0.0, hi=1.0),
    "target_modules": _Param("list", _parse_target_modules, "LoRA targets, comma-separated (default: all four Phi-3 linears)"),
    "use_rslora": _bool_param("rank-stabilized LoRA scale alpha/sqrt(r)"),
    "merge_lora_weights": _bool_param("also save the merged model in output_dir/merged"),
    "precision": _Param("str", _parse_precision, _PRECISION_HELP),
    "seed": _int_param(0, "random seed (LoRA init, shuffling, dropout)"),
    "logging_steps": _int_param(1, "log metrics every this many optimizer steps"),
    "evaluation_strategy": _choice_param(("no", "steps", "epoch"), "when to evaluate: no, steps, epoch"),
    "eval_steps": _Param("int", _parse_eval_steps, "evaluate every this many steps (default: logging_steps)"),
    "save_strategy": _choice_param(("no", "steps", "epoch"), "when to save checkpoints: no, steps, epoch"),
    "save_steps": _int_param(1, "save a checkpoint every this many steps (save_strategy steps)"),
    "save_total_limit": _int_param(1, "checkpoints to keep (the best one is kept too)", minus_one="keep all"),
    "save_interval_minutes": _float_param(
        "also save a checkpoint when this many minutes have passed since the last (0: off); "
        "the next checkpoint replaces it",
        lo=0.0,
    ),
    "resume_from_checkpoint": _Param(
        "path", _parse_resume, "a checkpoint folder, or true for the latest in checkpoint_dir (default output_dir)"
    ),
    "checkpoint_dir": _Param(
        "path",
        _parse_optional_path,
        "folder for checkpoint-N/ (written, rotated, resumed from); default output_dir. "
        "On Azure ML: an rw_mount output, so a resubmitted job resumes",
    ),
    "device": _Param("str", _parse_device, "auto, cpu or cuda"),
    "gradient_checkpointing": _bool_param("recompute activations in the backward pass (less memory)"),
    "shuffle": _bool_param("shuffle the rows every epoch"),
    "validation_split": _float_param(
        "without a validation file: the last fraction of the training conversations", lo=0.0, lo_open=True, hi=1.0
    ),
    "adapter_init": _Param("path", _parse_optional_path, "a PEFT adapter folder to start from"),
    "packing": _bool_param("pack several conversations per row"),
    "token": _Param("str", _parse_token, "Hugging Face token for a Hub model (default: HF_TOKEN / the token file)"),
    # -- Azure ML pipeline names with no ferrotune meaning (validated, then a note) ---------------
    "apply_lora": _Param("bool", _parse_apply_lora, "must be true: ferrotune trains LoRA adapters", native=False),
    "apply_deepspeed": _ignored("bool", "not needed, ferrotune trains LoRA without DeepSpeed (data-parallel over the launched processes); ignored", _check_bool),
    "deepspeed_stage": _ignored("int", "not needed, ferrotune does not use DeepSpeed; ignored", _check_int_ge(0)),
    "deepspeed": _ignored("path", "not needed, ferrotune does not use DeepSpeed; the config is ignored"),
    "apply_ort": _ignored("bool", "not needed, ferrotune does not use ONNX Runtime training; ignored", _check_bool),
    "optim": _Param("str", _parse_optim, "accepted for compatibility: adamw_torch/adamw_hf (ferrotune uses AdamW)", native=False),
    "pad_to_max_length": _ignored(
        "bool", "not needed, ferrotune packs conversations into rows (padding only wastes compute); ignored", _check_bool
    ),
    "metric_for_best_model": _Param(
        "str", _parse_metric_for_best_model, "accepted for compatibility: loss (the best checkpoint is by eval loss)", native=False
    ),
    "dataloader_num_workers": _ignored(
        "int", "not needed, ferrotune loads its tokenized rows in native code; ignored", _check_int_ge(0)
    ),
    "auto_find_batch_size": _ignored(
        "bool", "not supported, ferrotune uses per_device_train_batch_size as given; ignored", _check_bool
    ),
    "eval_accumulation_steps": _ignored("int", "not needed, evaluation keeps only the loss; ignored", _check_int_ge(-1)),
    "enable_full_determinism": _ignored("bool", "ferrotune has no separate determinism switch; ignored", _check_bool),
    "ignore_mismatched_sizes": _ignored(
        "bool", "not needed, ferrotune loads the weights as they are and reports a mismatch as an error; ignored", _check_bool
    ),
    "evaluation_steps_interval": _Param(
        "float", _parse_eval_interval, "must be 0: use evaluation_strategy steps and eval_steps", native=False
    ),
    "logging_strategy": _Param("str", _parse_logging_strategy, "must be steps: ferrotune logs every logging_steps", native=False),
    "apply_early_stopping": _Param("bool", _parse_early_stopping, "must be false: early stopping is not supported yet", native=False),
    "early_stopping_patience": _ignored("int", "early stopping is not supported yet; ignored", _check_int_ge(0)),
    "early_stopping_threshold": _ignored("float", "early stopping is not supported yet; ignored", lambda n, v: _as_float(n, v)),
    "num_nodes_finetune": _ignored("int", _ONE_DEVICE, _check_int_ge(1)),
    "number_of_gpu_to_use_finetuning": _ignored("int", _ONE_DEVICE, _check_int_ge(1)),
    "batch_size": _ignored("int", "the pipeline's preprocessing batch size; ferrotune tokenizes in parallel natively; ignored", _check_int_ge(1)),
    "task_name": _Param("str", _parse_task_name, "accepted for compatibility: ChatCompletion", native=False),
    "learning_rate_min": _ignored(
        "float", "a model tag for learning-rate search, not a training setting; ignored (learning_rate is used)",
        lambda n, v: _as_float(n, v),
    ),
    "learning_rate_max": _ignored(
        "float", "a model tag for learning-rate search, not a training setting; ignored (learning_rate is used)",
        lambda n, v: _as_float(n, v),
    ),
}
assert set(DEFAULTS) <= set(_PARAMS) and all(_PARAMS[k].native for k in DEFAULTS)

#: every name :func:`build_config` accepts (sorted): native names, Azure ML pipeline names, aliases
PARAMETER_NAMES: tuple = tuple(sorted({*_PARAMS, *_ALIASES}))


def _normalize_key(key: Any) -> str:
    if not isinstance(key, str):
        raise InvalidArgumentError(f"parameter names must be strings, not {key!r}")
    return key.strip().replace("-", "_")


def _unknown(key: str) -> InvalidArgumentError:
    close = difflib.get_close_matches(key, PARAMETER_NAMES, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return InvalidArgumentError(
        f"unknown finetune parameter {key!r}{hint} Valid names: {', '.join(PARAMETER_NAMES)}"
    )


def build_config(
    model: PathLike,
    train_file: PathLike,
    validation_file: Optional[PathLike],
    output_dir: PathLike,
    params: Mapping[str, Any],
) -> tuple[dict, list]:
    """Maps ``finetune_parameters`` (Azure ML pipeline names) to the native training config.

    Values may be notebook-style strings (``"true"``, ``"0"``, ``"5e-6"``, ``"3"``); names
    may use dashes. A value of ``None`` means "not set". Left-out parameters take the
    Azure ML pipeline's defaults (:data:`DEFAULTS`).

    Returns:
        ``(config, notes)``: the config dict (every key of :data:`DEFAULTS`, plus the four
        paths and ``save_steps`` when given) and one note per pipeline parameter that
        ferrotune accepts but does not need (e.g. ``apply_deepspeed``).

    Raises:
        InvalidArgumentError: an unknown name (with the valid names and the closest one),
            a value of the wrong type or out of range, or a setting ferrotune does not
            support (``apply_lora=False``, ``lr_scheduler_type="polynomial"``, ...).
    """
    if not isinstance(model, (str, os.PathLike)) or not os.fspath(model):
        raise _bad("model", model, "a model folder, an Azure ML MLflow model folder or a Hub repo id")
    config: dict = {
        "model": os.fspath(model),
        "train_file": _as_path("train_file", train_file),
        "validation_file": None if validation_file is None else _as_path("validation_file", validation_file),
        "output_dir": _as_path("output_dir", output_dir),
        **{k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()},
    }
    notes: list = []
    seen: dict = {}  # canonical name -> the name it was given as
    for raw_key, value in params.items():
        key = _normalize_key(raw_key)
        if key in _ARGUMENTS:
            raise InvalidArgumentError(f"{key!r} is an argument of finetune(), not a training parameter")
        name = _ALIASES.get(key, key)
        if name not in _PARAMS:
            raise _unknown(key)
        if name in seen:
            raise InvalidArgumentError(f"{name} is given twice (as {seen[name]!r} and {raw_key!r})")
        seen[name] = raw_key
        spec = _PARAMS[name]
        if not spec.native:
            spec.parse(name, value, notes)
        elif value is None and (name not in DEFAULTS or DEFAULTS[name] is not None):
            continue  # not set: the default stays (save_steps: the core's)
        else:
            config[name] = spec.parse(name, value, notes)
    if config["save_strategy"] == "steps" and "save_steps" not in config:
        raise InvalidArgumentError("save_strategy='steps' needs save_steps (save a checkpoint every N optimizer steps)")
    return config, notes


# ---------------------------------------------------------------------------------------
# Metrics: MLflow, user callbacks, one line on the progress display
# ---------------------------------------------------------------------------------------


def _resolve_report_to(report_to: Any) -> str:
    """``"auto"`` / ``"all"`` → ``"auto"``; ``"mlflow"`` or ``["mlflow"]`` → ``"mlflow"``;
    ``"none"``, ``None``, ``False``, ``[]`` → ``"none"``."""
    if report_to is None or report_to is False:
        return "none"
    if isinstance(report_to, (list, tuple)):
        names = {str(x).strip().lower() for x in report_to}
        if not names or names == {"none"}:
            return "none"
        if names == {"mlflow"}:
            return "mlflow"
        report_to = ",".join(sorted(names))
    elif isinstance(report_to, str) and report_to.strip().lower() in ("auto", "all", "mlflow", "none"):
        r = report_to.strip().lower()
        return "auto" if r == "all" else r
    raise InvalidArgumentError(
        f"report_to={report_to!r} is not supported: use 'auto' (MLflow when a run is active), 'mlflow' or 'none'; "
        "for other trackers pass callbacks=[fn] (fn gets each metrics dict)"
    )


def _callbacks(callbacks: Any) -> list:
    if callbacks is None:
        return []
    if callable(callbacks):
        return [callbacks]
    if isinstance(callbacks, (list, tuple)) and all(callable(c) for c in callbacks):
        return list(callbacks)
    raise InvalidArgumentError(f"callbacks must be a callable or a list of callables, not {callbacks!r}")


def _say_stderr(text: str) -> None:
    print(f"[ferrotune] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _mlflow_session(report_to: str, say: Callable[[str], None] = _say_stderr) -> Iterator[Any]:
    """Yields the ``mlflow`` module to log to, or ``None``.

    ``"mlflow"``: the active run, or a run started here and ended on the way out (status
    FAILED / KILLED if training raised). ``"auto"``: the active run if ``mlflow`` is
    already imported and a run is active, or (Azure ML command jobs) the run named by
    ``MLFLOW_RUN_ID``; otherwise nothing, and MLflow is not even imported.
    """
    if report_to == "none":
        yield None
        return
    if report_to == "auto" and "mlflow" not in sys.modules and not os.environ.get("MLFLOW_RUN_ID"):
        yield None
        return
    try:
        import mlflow  # type: ignore[import-not-found]
    except ImportError:
        if report_to == "mlflow":
            raise InvalidArgumentError(
                "report_to='mlflow' needs MLflow: pip install mlflow (or mlflow-skinny)"
            ) from None
        yield None
        return
    started = False
    if mlflow.active_run() is None:
        if report_to == "auto" and not os.environ.get("MLFLOW_RUN_ID"):
            yield None
            return
        try:
            mlflow.start_run()
        except Exception as e:
            if report_to == "mlflow":
                raise FerrotuneError(f"report_to='mlflow': cannot start an MLflow run: {e}") from e
            say(f"MLflow: cannot start a run ({e}); metrics are not logged to MLflow")
            yield None
            return
        started = True
    status = "FINISHED"
    try:
        yield mlflow
    except (KeyboardInterrupt, _Terminated):
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if started:
            mlflow.end_run(status=status)


def format_metrics(metrics: Mapping[str, Any], total_steps: Optional[int] = None) -> str:
    """One line for a metrics event, e.g. ``step 10/120  loss 1.234  lr 2.0e-05  1,234 tok/s``."""
    parts = []
    step = metrics.get("step")
    if step is not None:
        parts.append(f"step {step}/{total_steps}" if total_steps else f"step {step}")

    def num(key: str) -> Optional[float]:
        v = metrics.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    if (v := num("loss")) is not None:
        parts.append(f"loss {v:.4g}")
    if (v := num("learning_rate")) is not None:
        parts.append(f"lr {v:.1e}")
    if (v := num("tokens_per_second")) is not None:
        parts.append(f"{v:,.0f} tok/s")
    if (v := num("eval_loss")) is not None:
        parts.append(f"eval_loss {v:.4g}")
    if (v := num("eval_perplexity")) is not None:
        parts.append(f"eval_ppl {v:.4g}")
    return "  ".join(parts)


class MetricsRouter:
    """The progress callback :func:`finetune` gives the core.

    ``"metrics"`` events (``name`` is a JSON object such as ``{"step": 10, "loss": 1.2,
    "learning_rate": 2e-5, ...}``) go to MLflow (numeric values except ``step``, at that
    step), to each callback as a dict, and to the renderer: ferrotune's own renderers
    get a one-line ``"message"``, a user's renderer gets the raw event. Other events go
    to the renderer unchanged. A ``"start"`` event whose unit is ``"steps"`` gives the
    total shown as ``step 10/120``.
    """

    def __init__(
        self,
        renderer: Optional[Callable[..., Any]],
        *,
        mlflow: Any = None,
        callbacks: Iterable[Callable[[dict], Any]] = (),
    ) -> None:
        self.renderer = renderer
        self.mlflow = mlflow
        self.callbacks = list(callbacks)
        self.summarize = isinstance(renderer, (LineRenderer, TqdmRenderer))
        self.total_steps: Optional[int] = None

    def message(self, text: str) -> None:
        if self.renderer is not None:
            self.renderer("message", 0, text, None, 0, "")

    def __call__(self, kind: str, task_id: int, name: str, total: Optional[int], n: int, unit: str = "") -> None:
        if kind == "metrics":
            self._metrics(json.loads(name), (kind, task_id, name, total, n, unit))
            return
        if kind == "start" and total and unit in ("steps", "step"):
            self.total_steps = int(total)
        if self.renderer is not None:
            self.renderer(kind, task_id, name, total, n, unit)

    def _metrics(self, metrics: dict, event: tuple) -> None:
        if isinstance(metrics.get("total_steps"), int):
            self.total_steps = metrics["total_steps"]
        if self.mlflow is not None:
            values = {
                k: float(v)
                for k, v in metrics.items()
                if k not in ("step", "total_steps") and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            step = metrics.get("step")
            try:
                self.mlflow.log_metrics(values, step=int(step) if isinstance(step, (int, float)) else None)
            except Exception as e:  # a tracking-server hiccup must not end the training run
                self.mlflow = None
                (self.message if self.renderer is not None else _say_stderr)(
                    f"MLflow: logging failed ({e}); metrics are no longer sent to MLflow"
                )
        for cb in self.callbacks:
            cb(dict(metrics))
        if self.renderer is not None:
            if self.summarize:
                line = format_metrics(metrics, self.total_steps)
                if line:
                    self.message(line)
            else:
                self.renderer(*event)


# ---------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` did (``output_dir/train_summary.json``)."""

    output_dir: str
    #: the final PEFT adapter (adapter_config.json + adapter_model.safetensors)
    adapter_dir: str
    #: the merged Hugging Face model, when ``merge_lora_weights``
    merged_dir: Optional[str]
    #: optimizer steps taken
    global_step: int
    #: loss of every optimizer step (token-weighted mean over the step's micro-batches)
    step_losses: list = field(default_factory=list)
    #: the logged metrics dicts, in order (train and eval)
    log_history: list = field(default_factory=list)
    #: the evaluation dicts (``step``, ``eval_loss``, ``eval_perplexity``)
    eval: list = field(default_factory=list)
    #: the checkpoint folder with the lowest eval loss, if any evaluation ran
    best_checkpoint: Optional[str] = None
    #: tokens trained on (all positions of the micro-batches)
    train_tokens: int = 0
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0
    #: epochs trained (fractional with max_steps)
    epochs: float = 0.0
    #: the steps planned (``max_steps``, or from ``num_train_epochs``)
    total_steps: int = 0
    #: the lowest eval loss, if any evaluation ran
    best_eval_loss: Optional[float] = None
    #: where it trained ("cpu", "cuda", ...)
    device: str = ""
    #: the checkpoint training resumed from, if any
    resumed_from: Optional[str] = None
    #: data-parallel processes that trained together (1 without a launcher)
    world_size: int = 1
    #: this process's rank; only rank 0 writes checkpoints, exports and the summary file
    rank: int = 0
    #: what :func:`build_config` said about ignored Azure ML parameters
    notes: list = field(default_factory=list)

    @classmethod
    def from_summary(cls, summary: Union[str, Mapping[str, Any]], output_dir: str, notes: Sequence[str] = ()) -> "FinetuneResult":
        """From the core's JSON summary (a string or a parsed dict)."""
        s = json.loads(summary) if isinstance(summary, str) else dict(summary)
        return cls(
            output_dir=str(s.get("output_dir") or output_dir),
            adapter_dir=str(s.get("adapter_dir") or os.path.join(output_dir, "adapter")),
            merged_dir=s.get("merged_dir"),
            global_step=int(s.get("global_step", 0)),
            step_losses=[float(x) for x in s.get("step_losses", [])],
            log_history=list(s.get("log_history", [])),
            eval=list(s.get("eval", [])),
            best_checkpoint=s.get("best_checkpoint"),
            train_tokens=int(s.get("train_tokens", 0)),
            train_seconds=float(s.get("train_seconds", 0.0)),
            tokens_per_second=float(s.get("tokens_per_second", 0.0)),
            epochs=float(s.get("epochs", 0.0)),
            total_steps=int(s.get("total_steps") or s.get("global_step", 0)),
            best_eval_loss=None if s.get("best_eval_loss") is None else float(s["best_eval_loss"]),
            device=str(s.get("device") or ""),
            resumed_from=s.get("resumed_from"),
            world_size=int(s.get("world_size") or 1),
            rank=int(s.get("rank") or 0),
            notes=list(notes),
        )

    def loss_curve(self) -> tuple[list, list]:
        """``(steps, losses)`` for plotting: steps 1..global_step and each step's loss."""
        return list(range(1, len(self.step_losses) + 1)), list(self.step_losses)

    def plot(self, ax: Any = None) -> Any:
        """The loss curves with matplotlib: training loss of every step and validation loss
        of every evaluation, against the optimizer step.

        Args:
            ax: a matplotlib ``Axes`` to draw into; default: a new figure.

        Returns:
            The ``matplotlib.figure.Figure``. In Jupyter it shows when it is the cell's
            value (``result.plot()`` as the last line); elsewhere ``plt.show()`` or
            ``fig.savefig(path)``.

        Raises:
            MissingDependencyError: matplotlib is not installed (``pip install matplotlib``).
        """
        try:
            import matplotlib.pyplot as plt  # type: ignore[import-not-found]
        except ImportError:
            raise MissingDependencyError(
                "FinetuneResult.plot() needs matplotlib, which is not installed: pip install matplotlib"
            ) from None
        created = ax is None
        if ax is None:
            fig, ax = plt.subplots(figsize=(7, 4))
        else:
            fig = ax.figure
        steps, losses = self.loss_curve()
        ax.plot(steps, losses, label="training loss", linewidth=1.2)
        evals = [(e["step"], e["eval_loss"]) for e in self.eval if isinstance(e.get("eval_loss"), (int, float))]
        if evals:
            ax.plot([s for s, _ in evals], [v for _, v in evals], marker="o", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(f"ferrotune: {self.global_step} steps")
        ax.grid(True, alpha=0.3)
        ax.legend()
        if created and _in_notebook():
            # Jupyter shows the returned figure; left open, the inline backend would draw it twice
            plt.close(fig)
        return fig

    def best_eval(self) -> Optional[dict]:
        """The evaluation with the lowest ``eval_loss``, or ``None``."""
        evals = [e for e in self.eval if isinstance(e.get("eval_loss"), (int, float))]
        return min(evals, key=lambda e: e["eval_loss"]) if evals else None

    def summary(self) -> str:
        """One paragraph: steps, time, throughput, loss, best evaluation, outputs."""
        text = (
            f"Trained {plural(self.global_step, 'optimizer step')} ({self.epochs:g} epoch{'' if self.epochs == 1 else 's'}) "
            f"in {_duration(self.train_seconds)}{f' on {self.device}' if self.device else ''}: "
            f"{self.train_tokens:,} tokens, {self.tokens_per_second:,.0f} tokens/s"
        )
        if self.resumed_from:
            text += f" (resumed from {self.resumed_from})"
        if self.step_losses:
            text += f"; loss {self.step_losses[0]:.4g} at step 1, {self.step_losses[-1]:.4g} at step {len(self.step_losses)}"
        best = self.best_eval()
        if best is not None:
            where = f" ({self.best_checkpoint})" if self.best_checkpoint else ""
            text += f"; best eval loss {best['eval_loss']:.4g} at step {best.get('step', '?')}{where}"
        else:
            text += "; no evaluation"
        text += f". Adapter: {self.adapter_dir}"
        if self.merged_dir:
            text += f"; merged model: {self.merged_dir}"
        return text + "."


# ---------------------------------------------------------------------------------------
# finetune()
# ---------------------------------------------------------------------------------------


def finetune(
    model: PathLike,
    train_file: PathLike,
    validation_file: Optional[PathLike] = None,
    output_dir: PathLike = "outputs",
    *,
    progress: Any = "auto",
    report_to: Any = "auto",
    callbacks: Any = None,
    **finetune_parameters: Any,
) -> FinetuneResult:
    """LoRA fine-tuning of a Phi-3 model on chat conversations, natively.

    Takes the ``finetune_parameters`` of Azure ML's ``chat_completion_pipeline`` as they
    are — the notebook's ``dict(num_train_epochs=3, learning_rate=5e-6,
    lr_scheduler_type="cosine", apply_lora="true", apply_deepspeed="true", ...)`` plus the
    model's ``model_specific_defaults`` tags — with the pipeline's defaults for the rest.
    Pipeline switches that do not apply (DeepSpeed, ONNX Runtime, ...) are accepted with a
    note; unknown names and bad values raise before anything runs.

    The training file (conversations as JSONL/Parquet with a ``messages`` column, or a
    file from :func:`tokenize_dataset`) is tokenized into ``output_dir/tokenized/``;
    without a ``validation_file`` the last ``validation_split`` (20 %) of the conversations
    is held out, as the pipeline does. ``output_dir`` gets ``checkpoint-{step}/`` (in
    ``checkpoint_dir`` when given), ``adapter/`` (PEFT), ``merged/`` (when ``merge_lora_weights``) and
    ``train_summary.json``.

    Args:
        model: a model folder (config.json + safetensors), an Azure ML MLflow model folder
            or a Hub repo id.
        train_file, validation_file, output_dir: paths.
        progress: ``"auto"``/``True`` (in Jupyter a live table of step, training and
            validation loss, learning rate, tokens/s and ETA; bars in a terminal, lines in
            logs), ``False``, ``"bar"``, ``"lines"`` or a callable
            ``(kind, task_id, name, total, n, unit)``.
        report_to: ``"auto"`` (MLflow when ``mlflow`` is imported and a run is active, or
            in an Azure ML job), ``"mlflow"`` (the active run, or a new one for the
            duration) or ``"none"``.
        callbacks: callables (or one) called with each metrics dict, e.g.
            ``{"step": 10, "epoch": 0.5, "loss": 1.2, "learning_rate": 2e-5, ...}``.
        **finetune_parameters: see ``ferrotune.finetune_cli`` / :data:`PARAMETER_NAMES`.

    Returns:
        :class:`FinetuneResult`.

    Raises:
        TrainingInterrupted: SIGTERM (Azure ML's notice before preemption or cancel) stopped
            training after a checkpoint of the last whole step was saved; resume with
            ``resume_from_checkpoint=True``. (Ctrl-C: the same, as ``KeyboardInterrupt``.)
    """
    distributed = distributed_from_env()
    report = _resolve_report_to(report_to)
    cbs = _callbacks(callbacks)
    config, notes = build_config(model, train_file, validation_file, output_dir, finetune_parameters)
    if distributed is not None:
        config["distributed"] = distributed
        if distributed["rank"] > 0:
            # Rank 0 reports for the group (progress, MLflow, callbacks), as in HF Trainer;
            # the others print their own messages only.
            progress, report, cbs, notes = _worker_messages(distributed["rank"]), "none", [], []
    try:
        renderer = make_renderer(progress, training=True)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None
    native = getattr(_core, "finetune", None)
    if native is None:
        raise FerrotuneError("this build of ferrotune has no training support (ferrotune._core.finetune is missing)")
    say = (lambda text: renderer("message", 0, text, None, 0, "")) if renderer is not None else _say_stderr
    try:
        with _sigterm_stops_training(), _mlflow_session(report, say) as mlflow:
            router = MetricsRouter(renderer, mlflow=mlflow, callbacks=cbs)
            for note in notes:
                router.message(f"note: {note}")
            out = native(json.dumps(config, allow_nan=False), progress=router)
    except _Terminated as e:
        raise _interrupted(config, e.signal_number, say) from None
    return FinetuneResult.from_summary(out, output_dir=config["output_dir"], notes=notes)


class _Terminated(BaseException):
    """Raised by finetune()'s SIGTERM handler; finetune() turns it into
    :class:`TrainingInterrupted` once the core has saved its checkpoint."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


@contextlib.contextmanager
def _sigterm_stops_training() -> Iterator[None]:
    """While training, SIGTERM (Azure ML's notice before preemption or cancel) stops it
    like Ctrl-C: the core finishes the micro-batch it is in, saves a checkpoint of the
    last whole step, and the call raises. Only in the main thread (Python delivers signals
    there, and only there may handlers be set); the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    fired: list = []

    def handler(signum: int, frame: Any) -> None:
        if not fired:  # a second SIGTERM while the checkpoint is written changes nothing
            fired.append(signum)
            raise _Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        # None: a handler not set from Python; the default is the closest we can restore
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _newest_checkpoint(folder: str) -> tuple:
    """``(path, step)`` of the newest complete ``checkpoint-{step}`` in ``folder``, or ``(None, None)``."""
    best: tuple = (None, None)
    try:
        entries = os.listdir(folder)
    except OSError:
        return best
    for name in entries:
        head, _, num = name.partition("-")
        if head != "checkpoint" or not num.isdigit():
            continue
        path = os.path.join(folder, name)
        if os.path.isfile(os.path.join(path, "trainer_state.json")) and (best[1] is None or int(num) > best[1]):
            best = (path, int(num))
    return best


def _interrupted(config: Mapping[str, Any], signal_number: int, say: Callable[[str], None]) -> TrainingInterrupted:
    """The exception (and the one line said) after SIGTERM stopped training."""
    folder = config.get("checkpoint_dir") or config["output_dir"]
    path, step = _newest_checkpoint(folder)
    name = signal.Signals(signal_number).name
    if path is None:
        line = f"stopped by {name} before the first optimizer step: no checkpoint in {folder} to resume from"
    else:
        line = (
            f"stopped by {name}: checkpoint {path} (step {step}); to continue, run the same training with "
            "resume_from_checkpoint=True (ferrotune finetune ... --resume)"
            + (" and the same checkpoint_dir" if config.get("checkpoint_dir") else "")
        )
    say(line)
    return TrainingInterrupted(line, checkpoint=path, step=step, signal_number=signal_number)


def _worker_messages(rank: int) -> Callable[..., None]:
    """The progress sink of a data-parallel worker: its messages, marked with its rank."""

    def sink(kind: str, task_id: int, name: str, total: Optional[int], n: int, unit: str = "") -> None:
        if kind == "message":
            print(f"[ferrotune rank {rank}] {name}", file=sys.stderr, flush=True)

    return sink


def distributed_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """The data-parallel group a launcher put this process in, or ``None``.

    Azure ML's ``PyTorchDistribution`` and ``torchrun`` start one process per GPU and set
    ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with
    ``WORLD_SIZE > 1`` the processes train together: each takes its share of every
    optimizer step's micro-batches and the gradients are summed before the update.
    ``FERROTUNE_DIST_TIMEOUT`` (seconds, default 1800) bounds the wait for the group and
    for any one exchange.

    Raises:
        InvalidArgumentError: ``WORLD_SIZE > 1`` with a missing or malformed variable.
    """
    env = os.environ if environ is None else environ

    def integer(name: str, default: Optional[int] = None) -> int:
        raw = str(env.get(name, "")).strip()
        if not raw:
            if default is not None:
                return default
            raise InvalidArgumentError(
                f"WORLD_SIZE={env.get('WORLD_SIZE')} says this is one of several data-parallel processes, but {name} is not set; "
                "launch with Azure ML's PyTorchDistribution or torchrun, which set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
            )
        try:
            return int(raw)
        except ValueError:
            raise InvalidArgumentError(f"{name}={raw!r} is not an integer") from None

    world = integer("WORLD_SIZE", 1)
    if world <= 1:
        return None
    rank = integer("RANK")
    if not 0 <= rank < world:
        raise InvalidArgumentError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    port = integer("MASTER_PORT")
    if not 0 < port < 65536:
        raise InvalidArgumentError(f"MASTER_PORT={port} is not a TCP port")
    addr = str(env.get("MASTER_ADDR", "")).strip()
    if not addr:
        integer("MASTER_ADDR")  # raises the "not set" message
    raw_timeout = str(env.get("FERROTUNE_DIST_TIMEOUT", "1800")).strip()
    try:
        timeout = float(raw_timeout)
    except ValueError:
        timeout = -1.0
    if not (timeout > 0 and timeout < float("inf")):
        raise InvalidArgumentError(f"FERROTUNE_DIST_TIMEOUT={raw_timeout!r} must be a positive number of seconds")
    return {
        "rank": rank,
        "world_size": world,
        "local_rank": integer("LOCAL_RANK", rank),
        "master_addr": addr,
        "master_port": port,
        "timeout_s": timeout,
    }


class _CallableModule(types.ModuleType):
    """``ferrotune.finetune`` is the function; should anyone get hold of this module
    under that name (``importlib.import_module``), calling it still trains."""

    def __call__(self, *args: Any, **kwargs: Any) -> FinetuneResult:
        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
