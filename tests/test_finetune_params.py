"""``ferrotune.finetune``'s Python side, without the native training loop: the Azure ML
parameter mapping (``build_config``), the ``ferrotune finetune`` command line, and the
routing of training metrics to the progress display, to callbacks and to a real MLflow
tracking store. Where the flow needs ``_core.finetune``, a fake stands in for it (it
checks the config JSON it gets and plays back progress and metrics events); the training
itself is tested elsewhere."""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import ferrotune
from ferrotune import FinetuneResult, InvalidArgumentError, _core, _progress, cli
from ferrotune.finetune import (
    DEFAULTS,
    PARAMETER_NAMES,
    MetricsRouter,
    _mlflow_session,
    _resolve_report_to,
    build_config,
    format_metrics,
)
from ferrotune.finetune_cli import config_from_args

ftmod = importlib.import_module("ferrotune.finetune")  # `import ferrotune.finetune` names the function

# The notebook's dict (seed document, "finetune_parameters").
NOTEBOOK = dict(
    num_train_epochs=3,
    per_device_train_batch_size=1,
    per_device_eval_batch_size=1,
    learning_rate=5e-6,
    lr_scheduler_type="cosine",
    apply_lora="true",
    apply_deepspeed="true",
    deepspeed_stage=2,
)

# Phi-3 style model tags (`model_specific_defaults`, parsed with ast.literal_eval): strings.
MODEL_TAGS = {
    "apply_lora": "true",
    "apply_deepspeed": "true",
    "deepspeed_stage": "2",
    "precision": "16",
    "learning_rate": "5e-6",
    "lr_scheduler_type": "cosine",
    "save_total_limit": "1",
    "num_train_epochs": "1",
    "ignore_mismatched_sizes": "false",
    "learning_rate_min": "1e-6",
    "learning_rate_max": "1e-4",
}

# The Azure ML chat_completion_pipeline's defaults (shared/notes/azureml-flow.md §2).
PIPELINE_DEFAULTS = {
    "lora_r": 8,
    "lora_alpha": 128,
    "lora_dropout": 0.0,
    "merge_lora_weights": True,
    "num_train_epochs": 1,
    "max_steps": -1,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "learning_rate": 2e-5,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "precision": "auto",  # the pipeline says "32"; ferrotune defaults to the GPU's fast type (float32 on the CPU)
    "seed": 42,
    "evaluation_strategy": "epoch",
    "logging_steps": 10,
    "save_total_limit": -1,
    "max_seq_length": -1,
    # train = first 80 %, validation = last 20 % without a validation file
    "validation_split": 0.2,
    # Phi-3's fused linears
    "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}

# Every key of the native config (api spec), save_steps aside (the core's default unless given).
NATIVE_KEYS = {
    "model", "train_file", "validation_file", "output_dir", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "max_seq_length", "lora_r", "lora_alpha", "lora_dropout",
    "target_modules", "use_rslora", "merge_lora_weights", "precision", "seed", "logging_steps",
    "evaluation_strategy", "eval_steps", "save_strategy", "save_total_limit", "resume_from_checkpoint",
    "device", "gradient_checkpointing", "shuffle", "validation_split", "adapter_init", "packing", "token",
    "checkpoint_dir", "save_interval_minutes",
}


def cfg(**params):
    return build_config("microsoft/Phi-3-mini-4k-instruct", "train.jsonl", None, "out", params)


# ---------------------------------------------------------------------------------------
# build_config: the notebook's parameters, defaults, types
# ---------------------------------------------------------------------------------------


def test_notebook_parameters_map_with_a_note_per_deepspeed_key():
    config, notes = cfg(**NOTEBOOK)
    assert config["num_train_epochs"] == 3.0 and isinstance(config["num_train_epochs"], float)
    assert config["learning_rate"] == 5e-6
    assert config["lr_scheduler_type"] == "cosine"
    assert config["per_device_train_batch_size"] == 1 and config["per_device_eval_batch_size"] == 1
    assert "apply_lora" not in config and "apply_deepspeed" not in config and "deepspeed_stage" not in config
    assert [n.split(":")[0] for n in notes] == ["apply_deepspeed", "deepspeed_stage"]
    assert "not needed" in notes[0] and "DeepSpeed" in notes[0]
    # everything not given is the pipeline's default
    rest = {k: v for k, v in PIPELINE_DEFAULTS.items() if k not in NOTEBOOK}
    assert {k: config[k] for k in rest} == rest


def test_model_tag_strings_are_coerced():
    config, notes = cfg(**{**NOTEBOOK, **MODEL_TAGS})
    assert config["precision"] == "16"
    assert config["learning_rate"] == 5e-6
    assert config["save_total_limit"] == 1 and type(config["save_total_limit"]) is int
    assert config["num_train_epochs"] == 1.0
    noted = [n.split(":")[0] for n in notes]
    assert noted == ["apply_deepspeed", "deepspeed_stage", "ignore_mismatched_sizes", "learning_rate_min", "learning_rate_max"]
    assert all(noted.count(k) == 1 for k in noted)


def test_defaults_equal_the_pipelines_and_cover_the_native_keys():
    config, notes = cfg()
    assert notes == []
    assert set(config) == NATIVE_KEYS
    assert {k: config[k] for k in PIPELINE_DEFAULTS} == PIPELINE_DEFAULTS
    # the rest: the spec's defaults
    assert config["warmup_ratio"] == 0.0 and config["eval_steps"] is None
    assert config["save_strategy"] == "epoch" and config["device"] == "auto"
    assert config["resume_from_checkpoint"] is None and config["adapter_init"] is None and config["token"] is None
    assert config["use_rslora"] is False and config["gradient_checkpointing"] is False
    assert config["shuffle"] is True and config["packing"] is True
    assert config["validation_file"] is None
    # types the core's serde structs take
    for k in ("max_steps", "per_device_train_batch_size", "lora_r", "seed", "logging_steps", "save_total_limit", "max_seq_length"):
        assert type(config[k]) is int, k
    for k in ("num_train_epochs", "learning_rate", "lora_alpha", "lora_dropout", "warmup_ratio", "validation_split"):
        assert type(config[k]) is float, k
    assert json.loads(json.dumps(config)) == config
    assert DEFAULTS["target_modules"] is not config["target_modules"]  # a copy: mutating one is safe


def test_paths_are_strings(tmp_path):
    config, _ = build_config(tmp_path / "model", tmp_path / "t.jsonl", tmp_path / "v.jsonl", tmp_path / "o", {})
    assert config["model"] == str(tmp_path / "model")
    assert config["train_file"] == str(tmp_path / "t.jsonl") and config["validation_file"] == str(tmp_path / "v.jsonl")
    assert config["output_dir"] == str(tmp_path / "o")
    with pytest.raises(InvalidArgumentError, match="model"):
        build_config("", "t", None, "o", {})
    with pytest.raises(InvalidArgumentError, match="train_file"):
        build_config("m", None, None, "o", {})


@pytest.mark.parametrize("value", [True, "true", "TRUE", " True ", "1", 1, np.bool_(True)])
def test_bool_true_spellings(value):
    assert cfg(use_rslora=value)[0]["use_rslora"] is True


@pytest.mark.parametrize("value", [False, "false", "False", "0", 0, np.bool_(False)])
def test_bool_false_spellings(value):
    assert cfg(merge_lora_weights=value)[0]["merge_lora_weights"] is False


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("lora_r", "16", 16),
        ("lora_r", 16.0, 16),
        ("lora_r", "16.0", 16),
        ("lora_r", np.int64(4), 4),
        ("max_steps", "1e3", 1000),
        ("max_steps", "-1", -1),
        ("learning_rate", "5e-6", 5e-6),
        ("learning_rate", " 0.0002 ", 2e-4),
        ("learning_rate", np.float32(0.5), 0.5),
        ("num_train_epochs", "2.5", 2.5),
        ("num_train_epochs", 3, 3.0),
        ("lora_alpha", "32", 32.0),
        ("lora_dropout", "0.05", 0.05),
        ("max_seq_length", "-1", -1),
        ("max_seq_length", 4096, 4096),
        ("max_grad_norm", "0", 0.0),
        ("max_grad_norm", -1, -1.0),
        ("save_total_limit", "-1", -1),
        ("eval_steps", "50", 50),
        ("save_steps", "200", 200),
        ("warmup_ratio", "0.1", 0.1),
        ("validation_split", "0.1", 0.1),
        ("seed", "0", 0),
        ("device", "CUDA", "cuda"),
        ("device", "gpu", "cuda"),
        ("evaluation_strategy", "Steps", "steps"),
        ("save_strategy", "no", "no"),
        ("max_seq_length", "1", 1),
        ("lr_scheduler_type", "Constant_With_Warmup", "constant_with_warmup"),
        ("adapter_init", Path("some/adapter"), "some/adapter"),
        ("token", "hf_x", "hf_x"),
    ],
)
def test_values_are_coerced(name, value, expected):
    got = cfg(**{name: value})[0][name]
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("learning_rate", 0),
        ("learning_rate", -1e-5),
        ("learning_rate", "abc"),
        ("learning_rate", "nan"),
        ("learning_rate", float("inf")),
        ("learning_rate", True),
        ("learning_rate", [1e-5]),
        ("num_train_epochs", 0),
        ("num_train_epochs", "three"),
        ("max_steps", 0),
        ("max_steps", -2),
        ("max_steps", "2.5"),
        ("per_device_train_batch_size", 0),
        ("per_device_train_batch_size", "1.5"),
        ("per_device_train_batch_size", True),
        ("per_device_eval_batch_size", 0),
        ("gradient_accumulation_steps", 0),
        ("warmup_steps", -1),
        ("warmup_ratio", 1.0),
        ("warmup_ratio", -0.1),
        ("weight_decay", -0.01),
        ("adam_beta1", 1.0),
        ("adam_beta2", -0.5),
        ("adam_epsilon", 0),
        ("max_grad_norm", "x"),
        ("max_seq_length", -2),
        ("max_seq_length", 0),
        ("max_seq_length", "4096.5"),
        ("lora_r", 0),
        ("lora_r", "8.5"),
        ("lora_alpha", 0),
        ("lora_dropout", 1.0),
        ("lora_dropout", -0.1),
        ("lora_dropout", "high"),
        ("target_modules", []),
        ("target_modules", ""),
        ("target_modules", [1]),
        ("target_modules", "[not json"),
        ("use_rslora", "yes"),
        ("use_rslora", 2),
        ("use_rslora", 1.5),
        ("merge_lora_weights", "tru"),
        ("precision", "8"),
        ("precision", 64),
        ("precision", True),
        ("seed", -1),
        ("logging_steps", 0),
        ("evaluation_strategy", "sometimes"),
        ("evaluation_strategy", 1),
        ("eval_steps", 0),
        ("save_strategy", "best"),
        ("save_steps", 0),
        ("save_total_limit", 0),
        ("save_total_limit", -5),
        ("resume_from_checkpoint", 3),
        ("device", "tpu"),
        ("shuffle", "maybe"),
        ("validation_split", 1.0),
        ("validation_split", 0),
        ("validation_split", -0.2),
        ("adapter_init", 5),
        ("packing", "no"),
        ("token", ""),
        ("apply_deepspeed", "maybe"),
        ("deepspeed_stage", "x"),
        ("apply_ort", "perhaps"),
        ("pad_to_max_length", 3),
        ("dataloader_num_workers", -1),
        ("num_nodes_finetune", 0),
        ("learning_rate_min", "low"),
    ],
)
def test_bad_values_name_the_parameter_and_the_value(name, value):
    with pytest.raises(InvalidArgumentError) as e:
        cfg(**{name: value})
    assert f"{name}={value!r}" in str(e.value)


@pytest.mark.parametrize("value", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_supported_schedulers(value):
    assert cfg(lr_scheduler_type=value)[0]["lr_scheduler_type"] == value


@pytest.mark.parametrize("value", ["cosine_with_restarts", "polynomial", "inverse_sqrt", "reduce_lr_on_plateau"])
def test_transformers_only_schedulers_are_not_supported_yet(value):
    with pytest.raises(InvalidArgumentError, match="not supported yet") as e:
        cfg(lr_scheduler_type=value)
    assert "'cosine'" in str(e.value) and "'constant_with_warmup'" in str(e.value)


def test_unknown_scheduler_lists_the_supported_ones():
    with pytest.raises(InvalidArgumentError, match="one of 'linear', 'cosine', 'constant', 'constant_with_warmup'"):
        cfg(lr_scheduler_type="cosinus")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("32", "32"), (32, "32"), ("fp32", "32"), ("float32", "32"), ("16", "16"), (16, "16"), (16.0, "16"),
     ("bf16", "bf16"), ("BF16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16"), ("float16", "fp16"),
     ("auto", "auto")],
)
def test_precision_mapping(value, expected):
    config, notes = cfg(precision=value)
    assert config["precision"] == expected and notes == []


def test_precision_defaults_to_auto_the_gpus_fast_type():
    # the pipeline's default is "32"; ferrotune's is the fast, safe one on a GPU (bf16 where
    # the GPU has it, fp16 with loss scaling before sm_80) and float32 on the CPU
    config, notes = cfg()
    assert config["precision"] == "auto" and notes == []


@pytest.mark.parametrize("value", [False, "false", "0", 0])
def test_apply_lora_false_is_an_error(value):
    with pytest.raises(InvalidArgumentError, match=r"LoRA adapters only.*apply_lora=True"):
        cfg(apply_lora=value)


@pytest.mark.parametrize("value", [True, "true", "1", 1, None])
def test_apply_lora_true_is_fine_and_silent(value):
    config, notes = cfg(apply_lora=value)
    assert notes == [] and "apply_lora" not in config


def test_merge_lora_weights_maps_through():
    assert cfg(merge_lora_weights="false")[0]["merge_lora_weights"] is False
    assert cfg(merge_lora_weights=True)[0]["merge_lora_weights"] is True


# ---------------------------------------------------------------------------------------
# Pipeline-only names: one note each, or a clear "not supported"
# ---------------------------------------------------------------------------------------

# Each with the value the pipeline (or the notebook) would pass.
PIPELINE_ONLY_WITH_NOTE = {
    "apply_deepspeed": "true",
    "deepspeed_stage": "2",
    "deepspeed": "ds_config.json",
    "apply_ort": "false",
    "optim": "adamw_hf",
    "pad_to_max_length": "false",
    "metric_for_best_model": "loss",
    "dataloader_num_workers": 0,
    "auto_find_batch_size": "false",
    "eval_accumulation_steps": -1,
    "enable_full_determinism": "false",
    "ignore_mismatched_sizes": "false",
    "early_stopping_patience": 1,
    "early_stopping_threshold": 0.0,
    "num_nodes_finetune": 1,
    "number_of_gpu_to_use_finetuning": 4,
    "batch_size": 1000,
    "learning_rate_min": 1e-6,
    "learning_rate_max": 1e-4,
}
# Accepted silently: the value is what ferrotune does anyway.
PIPELINE_ONLY_SILENT = {
    "apply_lora": "true",
    "logging_strategy": "steps",
    "apply_early_stopping": "false",
    "evaluation_steps_interval": 0.0,
    "task_name": "ChatCompletion",
}


def test_pipeline_only_names_give_one_note_each_and_leave_the_config_alone():
    config, notes = cfg(**PIPELINE_ONLY_WITH_NOTE, **PIPELINE_ONLY_SILENT)
    assert [n.split(":")[0] for n in notes] == list(PIPELINE_ONLY_WITH_NOTE)
    assert config == cfg()[0]
    assert all(len(n.splitlines()) == 1 for n in notes)


def test_every_name_is_covered_by_these_tests():
    covered = set(NATIVE_KEYS) | {"save_steps", "eval_strategy"} | set(PIPELINE_ONLY_WITH_NOTE) | set(PIPELINE_ONLY_SILENT)
    covered -= {"model", "train_file", "validation_file", "output_dir"}
    assert covered == set(PARAMETER_NAMES)
    assert list(PARAMETER_NAMES) == sorted(PARAMETER_NAMES)


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("optim", "adafactor", "optimizer is AdamW"),
        ("metric_for_best_model", "f1", "by eval loss"),
        ("logging_strategy", "epoch", "not supported yet"),
        ("apply_early_stopping", "true", "not supported yet"),
        ("evaluation_steps_interval", 0.25, "eval_steps"),
        ("task_name", "TextGeneration", "chat completion"),
    ],
)
def test_pipeline_settings_ferrotune_cannot_honour(name, value, match):
    with pytest.raises(InvalidArgumentError, match=match) as e:
        cfg(**{name: value})
    assert f"{name}={value!r}" in str(e.value)


# ---------------------------------------------------------------------------------------
# Names: unknown, dashes, aliases, reserved; None; cross-checks
# ---------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names_and_suggests_the_closest():
    with pytest.raises(InvalidArgumentError) as e:
        cfg(learning_rat=1e-5)
    msg = str(e.value)
    assert "unknown finetune parameter 'learning_rat'; did you mean 'learning_rate'?" in msg
    listed = msg.split("Valid names: ", 1)[1].split(", ")
    assert listed == sorted(listed) == list(PARAMETER_NAMES)
    assert "apply_deepspeed" in listed and "lora_r" in listed and "model" not in listed


@pytest.mark.parametrize(("typo", "closest"), [("lora_rank", "lora_r"), ("num_epochs", "num_train_epochs"), ("warmup_ration", "warmup_ratio")])
def test_close_names_are_suggested(typo, closest):
    with pytest.raises(InvalidArgumentError, match=f"did you mean '{closest}'"):
        cfg(**{typo: 1})


def test_unknown_name_without_a_close_one():
    with pytest.raises(InvalidArgumentError) as e:
        cfg(zzzz=1)
    assert "did you mean" not in str(e.value) and "Valid names: " in str(e.value)


def test_dashed_names_and_the_eval_strategy_alias():
    config, _ = build_config("m", "t", None, "o", {"num-train-epochs": "2", "eval_strategy": "steps", "eval-steps": 5})
    assert config["num_train_epochs"] == 2.0 and config["evaluation_strategy"] == "steps" and config["eval_steps"] == 5
    with pytest.raises(InvalidArgumentError, match="given twice"):
        build_config("m", "t", None, "o", {"eval_strategy": "steps", "evaluation_strategy": "epoch"})
    with pytest.raises(InvalidArgumentError, match="given twice"):
        build_config("m", "t", None, "o", {"lora_r": 4, "lora-r": 8})


@pytest.mark.parametrize("name", ["model", "train_file", "validation_file", "output_dir", "report_to", "progress", "callbacks"])
def test_finetune_arguments_are_not_parameters(name):
    with pytest.raises(InvalidArgumentError, match="argument of finetune"):
        build_config("m", "t", None, "o", {name: "x"})


def test_none_means_not_set():
    config, notes = cfg(learning_rate=None, lora_r=None, eval_steps=None, save_steps=None, apply_deepspeed=None)
    assert config == cfg()[0]
    assert [n.split(":")[0] for n in notes] == ["apply_deepspeed"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), (True, True), ("1", True), ("false", None), (False, None), ("", None), (None, None),
     ("out/checkpoint-20", "out/checkpoint-20"), (Path("out/checkpoint-20"), "out/checkpoint-20")],
)
def test_resume_from_checkpoint(value, expected):
    assert cfg(resume_from_checkpoint=value)[0]["resume_from_checkpoint"] == expected


def test_save_interval_minutes_defaults_to_30_and_takes_minutes():
    assert cfg()[0]["save_interval_minutes"] == 30.0
    assert cfg(save_interval_minutes="7.5")[0]["save_interval_minutes"] == 7.5
    assert cfg(save_interval_minutes=0)[0]["save_interval_minutes"] == 0.0  # off
    for bad in (-1, "soon", float("inf")):
        with pytest.raises(InvalidArgumentError, match="save_interval_minutes="):
            cfg(save_interval_minutes=bad)
    config, _ = config_from_args(BASE_ARGS + ["--save-interval-minutes", "10"])
    assert config["save_interval_minutes"] == 10.0


def test_checkpoint_dir_defaults_to_none_and_takes_a_path():
    assert cfg()[0]["checkpoint_dir"] is None  # the core then uses output_dir
    assert cfg(checkpoint_dir=Path("ck") / "run1")[0]["checkpoint_dir"] == os.path.join("ck", "run1")
    assert cfg(checkpoint_dir=None)[0]["checkpoint_dir"] is None
    for bad in ("", 3, ["a"]):
        with pytest.raises(InvalidArgumentError, match="checkpoint_dir=.*expected a path"):
            cfg(checkpoint_dir=bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("qkv_proj,o_proj", ["qkv_proj", "o_proj"]),
        (" qkv_proj , down_proj ", ["qkv_proj", "down_proj"]),
        ('["gate_up_proj"]', ["gate_up_proj"]),
        (("o_proj", "o_proj"), ["o_proj"]),
        ("all-linear", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ],
)
def test_target_modules(value, expected):
    assert cfg(target_modules=value)[0]["target_modules"] == expected


def test_save_strategy_steps_needs_save_steps():
    with pytest.raises(InvalidArgumentError, match="save_strategy='steps' needs save_steps"):
        cfg(save_strategy="steps")
    config, _ = cfg(save_strategy="steps", save_steps="25")
    assert config["save_strategy"] == "steps" and config["save_steps"] == 25


def test_build_config_does_not_touch_its_input():
    params = dict(NOTEBOOK)
    cfg(**params)
    assert params == NOTEBOOK


# ---------------------------------------------------------------------------------------
# report_to, progress, callbacks: validated before anything runs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("AUTO", "auto"), ("all", "auto"), ("mlflow", "mlflow"), (["mlflow"], "mlflow"),
     ("none", "none"), (None, "none"), (False, "none"), ([], "none"), (["none"], "none")],
)
def test_report_to_values(value, expected):
    assert _resolve_report_to(value) == expected


@pytest.mark.parametrize("value", ["wandb", "tensorboard", "azure_ml", ["mlflow", "wandb"], 3, True])
def test_report_to_unsupported(value):
    with pytest.raises(InvalidArgumentError, match="report_to=.*callbacks"):
        _resolve_report_to(value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(report_to="wandb"), "report_to"),
        (dict(progress="fancy"), "progress must be"),
        (dict(callbacks=3), "callbacks must be"),
        (dict(callbacks=[print, 3]), "callbacks must be"),
        (dict(apply_lora="false"), "apply_lora"),
        (dict(lora_rr=8), "did you mean 'lora_r'"),
    ],
)
def test_finetune_rejects_bad_arguments_before_training(monkeypatch, kwargs, match):
    def must_not_run(*a, **k):
        raise AssertionError("the native finetune ran")

    monkeypatch.setattr(_core, "finetune", must_not_run, raising=False)
    with pytest.raises(InvalidArgumentError, match=match):
        ferrotune.finetune("m", "t.jsonl", output_dir="o", **kwargs)


def test_report_to_mlflow_without_mlflow_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with pytest.raises(InvalidArgumentError, match="pip install mlflow"):
        with _mlflow_session("mlflow"):
            pass
    with _mlflow_session("auto") as ml:
        assert ml is None


def test_public_names():
    assert ferrotune.finetune is ftmod.finetune and callable(ferrotune.finetune)
    assert ferrotune.FinetuneResult is FinetuneResult
    assert {"finetune", "FinetuneResult", "LoraModel"} <= set(ferrotune.__all__)
    assert callable(ftmod)  # the module, if someone gets it instead of the function, still trains


# ---------------------------------------------------------------------------------------
# The command line: parsing → the same config
# ---------------------------------------------------------------------------------------

BASE_ARGS = ["--model", "microsoft/Phi-3-mini-4k-instruct", "--train-file", "train.jsonl", "--output-dir", "out"]


def test_cli_flags_in_both_spellings_give_the_python_config():
    dashed = config_from_args(
        BASE_ARGS
        + ["--num-train-epochs", "3", "--learning-rate", "5e-6", "--per-device-train-batch-size", "2",
           "--gradient-accumulation-steps", "4", "--lr-scheduler-type", "cosine", "--max-steps", "100",
           "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0.05", "--max-seq-length", "2048",
           "--seed", "7", "--logging-steps", "5", "--precision", "16", "--device", "cpu"]
    )
    under = config_from_args(
        ["--model", "microsoft/Phi-3-mini-4k-instruct", "--train_file", "train.jsonl", "--output_dir", "out",
         "--num_train_epochs", "3", "--learning_rate", "5e-6", "--per_device_train_batch_size", "2",
         "--gradient_accumulation_steps", "4", "--lr_scheduler_type", "cosine", "--max_steps", "100",
         "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05", "--max_seq_length", "2048",
         "--seed", "7", "--logging_steps", "5", "--precision", "16", "--device", "cpu"]
    )
    python = cfg(num_train_epochs=3, learning_rate=5e-6, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                 lr_scheduler_type="cosine", max_steps=100, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                 max_seq_length=2048, seed=7, logging_steps=5, precision=16, device="cpu")
    assert dashed == under == python


def test_cli_azure_command_job_style_passes_every_pipeline_name():
    # what an Azure ML command job would pass: `--name value`, strings for everything
    argv = list(BASE_ARGS)
    for k, v in {**NOTEBOOK, **MODEL_TAGS}.items():
        argv += [f"--{k}", str(v)]
    assert config_from_args(argv) == cfg(**{**NOTEBOOK, **MODEL_TAGS})


def test_cli_params_json_inline_and_file_and_precedence(tmp_path):
    inline = config_from_args(BASE_ARGS + ["--params-json", json.dumps(NOTEBOOK)])
    assert inline == cfg(**NOTEBOOK)
    f = tmp_path / "params.json"
    f.write_text(json.dumps({**NOTEBOOK, "lora-r": 4}), encoding="utf-8")
    config, notes = config_from_args(BASE_ARGS + ["--params_json", str(f), "--param", "lora_r=16", "--param", "seed=3",
                                                  "--seed", "5"])
    # --params-json < --param < flags
    assert config["lora_r"] == 16 and config["seed"] == 5 and config["learning_rate"] == 5e-6
    assert [n.split(":")[0] for n in notes] == ["apply_deepspeed", "deepspeed_stage"]


def test_cli_param_values_and_bool_flags():
    config, _ = config_from_args(
        BASE_ARGS + ["--param", "target_modules=qkv_proj,o_proj", "--param", "warmup-ratio=0.1",
                     "--gradient-checkpointing", "--merge_lora_weights", "false", "--validation-file", "v.jsonl",
                     "--param", "eval_strategy=steps", "--save-steps", "50"]
    )
    assert config["target_modules"] == ["qkv_proj", "o_proj"] and config["warmup_ratio"] == 0.1
    assert config["gradient_checkpointing"] is True and config["merge_lora_weights"] is False
    assert config["validation_file"] == "v.jsonl"
    assert config["evaluation_strategy"] == "steps" and config["save_steps"] == 50


@pytest.mark.parametrize(
    ("extra", "expected"),
    [([], None), (["--resume"], True), (["--resume", "out/checkpoint-40"], "out/checkpoint-40"),
     (["--resume_from_checkpoint", "true"], True), (["--resume_from_checkpoint", "false"], None)],
)
def test_cli_resume(extra, expected):
    assert config_from_args(BASE_ARGS + extra)[0]["resume_from_checkpoint"] == expected


@pytest.mark.parametrize("flag", ["--checkpoint_dir", "--checkpoint-dir"])
def test_cli_checkpoint_dir(flag):
    config, _ = config_from_args(BASE_ARGS + [flag, "/mnt/checkpoints", "--resume"])
    assert config["checkpoint_dir"] == "/mnt/checkpoints" and config["resume_from_checkpoint"] is True
    assert config_from_args(BASE_ARGS)[0]["checkpoint_dir"] is None


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--param", "lora_r"], "NAME=VALUE"),
        (["--param", "=3"], "NAME=VALUE"),
        (["--params-json", "{not json"], "not valid JSON"),
        (["--params-json", "[1, 2]"], "JSON object"),
        (["--params-json", "/no/such/params.json"], "cannot read"),
        (["--param", "learning_rat=1"], "did you mean 'learning_rate'"),
        (["--params-json", '{"model": "x"}'], "argument of finetune"),
        (["--learning-rate", "fast"], "learning_rate='fast'"),
    ],
)
def test_cli_parameter_errors(extra, match):
    with pytest.raises(InvalidArgumentError, match=match):
        config_from_args(BASE_ARGS + extra)


def test_cli_errors_exit_2_with_a_message(capsys):
    assert cli.main(["finetune", *BASE_ARGS, "--apply_lora", "false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: apply_lora='false'") and "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # argparse: a flag that does not exist
        cli.main(["finetune", *BASE_ARGS, "--learning-rat", "1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):  # required flags
        cli.main(["finetune", "--model", "m"])


# ---------------------------------------------------------------------------------------
# The whole Python flow with a stand-in for _core.finetune
# ---------------------------------------------------------------------------------------

METRICS = [
    {"step": 1, "epoch": 0.25, "loss": 2.5, "learning_rate": 2e-5, "grad_norm": 0.9, "tokens_per_second": 1234.0},
    {"step": 2, "epoch": 0.5, "loss": 2.25, "learning_rate": 1.5e-5, "grad_norm": 0.8, "tokens_per_second": 1300.0},
    {"step": 2, "eval_loss": 2.0, "eval_perplexity": 7.389},
    {"step": 4, "epoch": 1.0, "loss": 1.75, "learning_rate": 0.0, "grad_norm": 0.7, "tokens_per_second": 1400.0},
    {"step": 4, "eval_loss": 1.9, "eval_perplexity": 6.686},
]


def summary_json(config: dict) -> str:
    out = config["output_dir"]
    return json.dumps({
        "global_step": 4, "epochs": 1.0, "step_losses": [2.5, 2.25, 2.0, 1.75],
        "log_history": [m for m in METRICS], "eval": [m for m in METRICS if "eval_loss" in m],
        "best_checkpoint": f"{out}/checkpoint-4", "train_tokens": 5000, "train_seconds": 3.5,
        "tokens_per_second": 1428.6, "adapter_dir": f"{out}/adapter",
        "merged_dir": f"{out}/merged" if config["merge_lora_weights"] else None,
        # fields the core adds
        "output_dir": out, "total_steps": 4, "best_eval_loss": 1.9, "device": "cpu", "resumed_from": None,
    })


class FakeNative:
    """Plays a training run's events through the progress callback, like the core would."""

    def __init__(self, raise_at_end: BaseException | None = None):
        self.configs: list = []
        self.raise_at_end = raise_at_end

    def __call__(self, config_json: str, progress=None):
        config = json.loads(config_json)
        self.configs.append(config)
        progress("start", 1, "training", 4, 0, "steps")
        done = 0
        for m in METRICS:
            if m["step"] > done:
                progress("advance", 1, "", None, m["step"] - done, "")
                done = m["step"]
            progress("metrics", 0, json.dumps(m), None, 0, "")
        progress("finish", 1, "", None, 0, "")
        if self.raise_at_end is not None:
            raise self.raise_at_end
        return summary_json(config)


@pytest.fixture
def fake_native(monkeypatch):
    fake = FakeNative()
    monkeypatch.setattr(_core, "finetune", fake, raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return fake


def test_finetune_sends_the_config_and_returns_the_result(fake_native, tmp_path):
    seen = []
    res = ferrotune.finetune("m", tmp_path / "t.jsonl", output_dir=tmp_path / "o", progress=False, report_to="none",
                             callbacks=seen.append, **NOTEBOOK)
    assert fake_native.configs == [build_config("m", tmp_path / "t.jsonl", None, tmp_path / "o", NOTEBOOK)[0]]
    assert seen == METRICS
    assert isinstance(res, FinetuneResult)
    assert res.global_step == 4 and res.epochs == 1.0 and res.step_losses == [2.5, 2.25, 2.0, 1.75]
    assert res.output_dir == str(tmp_path / "o") and res.adapter_dir == f"{tmp_path / 'o'}/adapter"
    assert res.merged_dir == f"{tmp_path / 'o'}/merged" and res.best_checkpoint.endswith("checkpoint-4")
    assert res.eval == METRICS[2::2] and res.log_history == METRICS
    assert res.train_tokens == 5000 and res.train_seconds == 3.5 and res.tokens_per_second == 1428.6
    assert res.total_steps == 4 and res.best_eval_loss == 1.9 and res.device == "cpu" and res.resumed_from is None
    assert [n.split(":")[0] for n in res.notes] == ["apply_deepspeed", "deepspeed_stage"]
    assert res.loss_curve() == ([1, 2, 3, 4], [2.5, 2.25, 2.0, 1.75])
    assert res.best_eval() == METRICS[4]
    s = res.summary()
    assert "\n" not in s
    assert "4 optimizer steps" in s and "5,000 tokens" in s and "1.9 at step 4" in s and "checkpoint-4" in s
    assert "merged model" in s and "loss 2.5 at step 1, 1.75 at step 4" in s and " on cpu:" in s


def test_finetune_result_without_evaluation_or_merge():
    res = FinetuneResult.from_summary({"global_step": 2, "step_losses": [1.0, 0.5], "adapter_dir": "o/adapter",
                                       "merged_dir": None, "train_seconds": 125.0}, output_dir="o")
    assert res.best_eval() is None and res.best_checkpoint is None
    s = res.summary()
    assert "no evaluation" in s and "merged" not in s and "2 min 05 s" in s
    assert res.total_steps == 2 and res.best_eval_loss is None and res.device == ""


def test_line_renderer_shows_notes_once_and_one_line_per_metrics_event(fake_native, capsys, monkeypatch):
    ferrotune.finetune("m", "t.jsonl", output_dir="o", progress="lines", report_to="none", **NOTEBOOK)
    lines = capsys.readouterr().err.splitlines()
    notes = [ln for ln in lines if ln.startswith("[ferrotune] note: ")]
    assert [n.split(":")[1].strip() for n in notes] == ["apply_deepspeed", "deepspeed_stage"]
    assert lines.index(notes[-1]) < lines.index("[ferrotune] training: started (4 steps to do)")
    assert "[ferrotune] step 1/4  loss 2.5  lr 2.0e-05  1,234 tok/s" in lines
    assert "[ferrotune] step 2/4  eval_loss 2  eval_ppl 7.389" in lines
    assert "[ferrotune] step 4/4  loss 1.75  lr 0.0e+00  1,400 tok/s" in lines
    assert "[ferrotune] training: done (4 steps)" in lines


def test_tqdm_renderer_gets_the_metrics_line(capsys):
    router = MetricsRouter(_progress.TqdmRenderer())
    router("start", 1, "training", 120, 0, "steps")
    router("metrics", 0, json.dumps({"step": 10, "loss": 1.234, "learning_rate": 2e-5, "tokens_per_second": 1234.0}), None, 0, "")
    router("finish", 1, "", None, 0, "")
    assert "step 10/120  loss 1.234  lr 2.0e-05  1,234 tok/s" in capsys.readouterr().err.splitlines()


def test_a_user_renderer_gets_the_raw_events(fake_native):
    events = []
    ferrotune.finetune("m", "t.jsonl", output_dir="o", progress=lambda *e: events.append(e), report_to="none",
                       apply_ort="false")
    assert events[0] == ("message", 0, "note: apply_ort: not needed, ferrotune does not use ONNX Runtime training; ignored", None, 0, "")
    assert [json.loads(e[2]) for e in events if e[0] == "metrics"] == METRICS
    assert events[1] == ("start", 1, "training", 4, 0, "steps")


def test_format_metrics():
    assert format_metrics({"step": 10, "epoch": 0.5, "loss": 1.234, "learning_rate": 2e-5, "grad_norm": 0.5,
                           "tokens_per_second": 1234.4}, 120) == "step 10/120  loss 1.234  lr 2.0e-05  1,234 tok/s"
    assert format_metrics({"step": 3, "loss": 12.3456}) == "step 3  loss 12.35"
    assert format_metrics({"step": 40, "eval_loss": 1.1, "eval_perplexity": 3.004}, 40) == "step 40/40  eval_loss 1.1  eval_ppl 3.004"
    assert format_metrics({}) == ""


def test_a_failing_callback_stops_training_with_its_error(monkeypatch):
    def cb(m):
        if m["step"] == 2:
            raise RuntimeError("stop here")

    def native(config_json, progress=None):  # the core re-raises what the callback raised
        for m in METRICS:
            progress("metrics", 0, json.dumps(m), None, 0, "")
        return summary_json(json.loads(config_json))

    monkeypatch.setattr(_core, "finetune", native, raising=False)
    with pytest.raises(RuntimeError, match="stop here"):
        ferrotune.finetune("m", "t.jsonl", progress=False, report_to="none", callbacks=[cb])


def _in_folder_with_train_file(tmp_path, monkeypatch) -> None:
    # the command checks that --train-file exists before it starts
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("")


def test_cli_trains_and_prints_the_summary(fake_native, capsys, tmp_path, monkeypatch):
    _in_folder_with_train_file(tmp_path, monkeypatch)
    assert cli.main(["finetune", *BASE_ARGS, "--num_train_epochs", "3", "--apply_deepspeed", "true",
                     "--progress", "none", "--report-to", "none"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Trained 4 optimizer steps") and err == ""
    assert fake_native.configs[0]["num_train_epochs"] == 3.0


def test_cli_ctrl_c_exits_130(monkeypatch, capsys, tmp_path):
    _in_folder_with_train_file(tmp_path, monkeypatch)
    monkeypatch.setattr(_core, "finetune", FakeNative(raise_at_end=KeyboardInterrupt()), raising=False)
    assert cli.main(["finetune", *BASE_ARGS, "--progress", "none", "--report-to", "none"]) == 130
    assert "interrupted" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# MLflow, for real (a file store in tmp_path)
# ---------------------------------------------------------------------------------------


@pytest.fixture
def mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3.x refuses the file store otherwise
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    for k in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)
    import mlflow

    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    yield mlflow
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def history(mlflow, run_id: str, key: str) -> list:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def logged_keys(mlflow, run_id: str) -> set:
    from mlflow.tracking import MlflowClient

    return set(MlflowClient().get_run(run_id).data.metrics)


def test_metrics_go_to_the_active_run(mlflow):
    run = mlflow.start_run()
    router = MetricsRouter(None, mlflow=mlflow)
    for m in METRICS:
        router("metrics", 0, json.dumps(m), None, 0, "")
    rid = run.info.run_id
    assert history(mlflow, rid, "loss") == [(1, 2.5), (2, 2.25), (4, 1.75)]
    assert history(mlflow, rid, "learning_rate") == [(1, 2e-5), (2, 1.5e-5), (4, 0.0)]
    assert history(mlflow, rid, "eval_loss") == [(2, 2.0), (4, 1.9)]
    assert history(mlflow, rid, "epoch") == [(1, 0.25), (2, 0.5), (4, 1.0)]
    assert logged_keys(mlflow, rid) == {"loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch",
                                        "eval_loss", "eval_perplexity"}


def test_finetune_auto_logs_to_the_active_run_and_leaves_it_open(mlflow, fake_native):
    seen = []
    with mlflow.start_run() as run:
        ferrotune.finetune("m", "t.jsonl", progress=False, callbacks=[seen.append])  # report_to="auto"
        assert mlflow.active_run().info.run_id == run.info.run_id
    assert history(mlflow, run.info.run_id, "loss") == [(1, 2.5), (2, 2.25), (4, 1.75)]
    assert seen == METRICS


def test_finetune_auto_without_an_active_run_logs_nothing(mlflow, fake_native):
    from mlflow.tracking import MlflowClient

    ferrotune.finetune("m", "t.jsonl", progress=False)
    assert mlflow.active_run() is None
    assert MlflowClient().search_runs(experiment_ids=["0"]) == []


def test_finetune_none_skips_the_active_run(mlflow, fake_native):
    with mlflow.start_run() as run:
        ferrotune.finetune("m", "t.jsonl", progress=False, report_to="none")
    assert logged_keys(mlflow, run.info.run_id) == set()


def test_finetune_mlflow_starts_and_ends_a_run(mlflow, fake_native):
    from mlflow.tracking import MlflowClient

    ferrotune.finetune("m", "t.jsonl", progress=False, report_to="mlflow")
    assert mlflow.active_run() is None
    (run,) = MlflowClient().search_runs(experiment_ids=["0"])
    assert run.info.status == "FINISHED"
    assert history(mlflow, run.info.run_id, "eval_loss") == [(2, 2.0), (4, 1.9)]


@pytest.mark.parametrize(("exc", "status"), [(KeyboardInterrupt(), "KILLED"), (ValueError("boom"), "FAILED")])
def test_a_run_started_here_records_how_training_ended(mlflow, monkeypatch, exc, status):
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(_core, "finetune", FakeNative(raise_at_end=exc), raising=False)
    with pytest.raises(type(exc)):
        ferrotune.finetune("m", "t.jsonl", progress=False, report_to="mlflow")
    assert mlflow.active_run() is None
    (run,) = MlflowClient().search_runs(experiment_ids=["0"])
    assert run.info.status == status and history(mlflow, run.info.run_id, "loss")[0] == (1, 2.5)


def test_azure_ml_job_run_id_is_used_in_auto_mode(mlflow, fake_native, monkeypatch):
    # An Azure ML command job has no active run in the process, but MLFLOW_RUN_ID names the job's run.
    from mlflow.tracking import MlflowClient

    job_run = MlflowClient().create_run(experiment_id="0")
    monkeypatch.setenv("MLFLOW_RUN_ID", job_run.info.run_id)
    ferrotune.finetune("m", "t.jsonl", progress=False)
    assert mlflow.active_run() is None
    assert history(mlflow, job_run.info.run_id, "loss") == [(1, 2.5), (2, 2.25), (4, 1.75)]


def test_an_mlflow_failure_does_not_stop_training():
    class Broken:
        calls = 0

        def log_metrics(self, *a, **k):
            Broken.calls += 1
            raise ConnectionError("tracking server down")

    out = io.StringIO()
    seen = []
    router = MetricsRouter(_progress.LineRenderer(stream=out), mlflow=Broken(), callbacks=[seen.append])
    for m in METRICS:
        router("metrics", 0, json.dumps(m), None, 0, "")
    assert Broken.calls == 1 and seen == METRICS
    text = out.getvalue()
    assert text.count("MLflow: logging failed (tracking server down)") == 1 and "step 4" in text


LAUNCHER_ENV = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.4", "MASTER_PORT": "29500"}
DIST_VARS = (*LAUNCHER_ENV, "FERROTUNE_DIST_TIMEOUT")


def test_a_launcher_environment_makes_a_data_parallel_worker(fake_native, tmp_path, monkeypatch):
    for k, v in LAUNCHER_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FERROTUNE_DIST_TIMEOUT", "60")
    seen = []
    res = ferrotune.finetune("m", tmp_path / "t.jsonl", output_dir=tmp_path / "o", progress="lines", report_to="mlflow",
                             callbacks=seen.append)
    (config,) = fake_native.configs
    assert config["distributed"] == {
        "rank": 2, "world_size": 4, "local_rank": 0, "master_addr": "10.0.0.4", "master_port": 29500, "timeout_s": 60.0,
    }
    # rank 0 reports for the group: a worker shows no progress and logs nothing to MLflow or callbacks
    assert seen == [] and isinstance(res, FinetuneResult)


@pytest.mark.parametrize("world", ["1", "", None])
def test_without_a_group_nothing_changes(fake_native, tmp_path, monkeypatch, world):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    ferrotune.finetune("m", tmp_path / "t.jsonl", output_dir=tmp_path / "o", progress=False, report_to="none")
    assert "distributed" not in fake_native.configs[0]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 says this is one of several data-parallel processes, but RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_PORT is not set"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "29500"}, "MASTER_ADDR is not set"),
        ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_PORT": "1", "MASTER_ADDR": "h"}, r"RANK=5 is outside 0\.\.1"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "70000", "MASTER_ADDR": "h"}, "MASTER_PORT=70000 is not a TCP port"),
        (dict(LAUNCHER_ENV, FERROTUNE_DIST_TIMEOUT="0"), "FERROTUNE_DIST_TIMEOUT='0' must be a positive number"),
    ],
)
def test_a_broken_launcher_environment_is_a_clear_error(fake_native, tmp_path, monkeypatch, env, message):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InvalidArgumentError, match=message):
        ferrotune.finetune("m", tmp_path / "t.jsonl", output_dir=tmp_path / "o", progress=False, report_to="none")
    assert fake_native.configs == []

