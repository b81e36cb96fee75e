"""Training that survives Azure ML: checkpoints in ``checkpoint_dir`` (an ``rw_mount`` job
output, so a resubmitted job resumes), SIGTERM (what Azure ML sends before preemption or
cancel) stopping training with a checkpoint, and the time-based safety checkpoint
(``save_interval_minutes``).

Everything runs for real on a tiny random Phi-3 (``ferrotune.create_random_model`` with the
bundled Phi-3 tokenizer): the command line in a subprocess, real signals, resumes compared
bit for bit with uninterrupted runs.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

import ferrotune
from ferrotune import _core

if not hasattr(_core, "finetune"):
    pytest.skip("ferrotune._core has no finetune yet", allow_module_level=True)

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from tests.support import chatgen  # noqa: E402

#: what every run here shares: float32 on the CPU, file order, no evaluation, no merge
BASE = dict(
    lora_r=4,
    lora_alpha=16.0,
    device="cpu",
    precision="32",
    seed=1,
    shuffle=True,
    learning_rate=1e-2,
    lr_scheduler_type="linear",
    warmup_steps=2,
    weight_decay=0.01,
    max_grad_norm=1.0,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    max_seq_length=96,
    evaluation_strategy="no",
    merge_lora_weights=False,
    logging_steps=1,
)


# ---------------------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------------------


def write_jsonl(path: Path, convs) -> Path:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for c in convs:
            f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
    return path


def read_adapter(folder) -> dict:
    return safetensors_numpy.load_file(str(Path(folder) / "adapter_model.safetensors"))


def assert_same_adapter(a, b) -> None:
    x, y = read_adapter(a), read_adapter(b)
    assert sorted(x) == sorted(y)
    for k in x:
        assert np.array_equal(x[k], y[k]), k  # bit for bit


def checkpoint_steps(folder) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name))


def run_finetune(model_dir, train_file, output_dir, **params):
    return ferrotune.finetune(
        str(model_dir), str(train_file), output_dir=str(output_dir), progress=False, report_to="none", **params
    )


def cli_command(model_dir, train_file, output_dir, params_file, progress: str = "lines") -> list:
    return [sys.executable, "-m", "ferrotune.cli", "finetune", "--model", str(model_dir), "--train-file", str(train_file),
            "--output-dir", str(output_dir), "--params-json", str(params_file), "--progress", progress,
            "--report-to", "none"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("preemption")


@pytest.fixture(scope="module")
def model_dir(work) -> Path:
    tokenizer = resources.files("ferrotune") / "_sample" / "phi3-tokenizer"
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "initializer_range": 0.2}
    return Path(_core.create_random_model(str(work / "model"), config, seed=0, tokenizer=str(tokenizer)))


@pytest.fixture(scope="module")
def train_file(work) -> Path:
    return write_jsonl(work / "train.jsonl", chatgen.conversations(40, 5, tricky=True, system=True))


# ---------------------------------------------------------------------------------------
# checkpoint_dir
# ---------------------------------------------------------------------------------------


def test_checkpoint_dir_holds_rotates_and_resumes_the_checkpoints(tmp_path, model_dir, train_file):
    params = dict(BASE, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=2)
    ck = tmp_path / "mounted" / "checkpoints"
    out = tmp_path / "out"
    full = run_finetune(model_dir, train_file, out, checkpoint_dir=str(ck), **params)
    assert full.global_step == 6
    # written and rotated there; nothing of the kind in output_dir, whose outputs are as usual
    assert checkpoint_steps(ck) == [4, 6]
    assert checkpoint_steps(out) == []
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "train_summary.json").is_file()
    assert (out / "tokenized").is_dir()

    # a resubmitted job: a fresh output_dir, the same checkpoint_dir, taken back to step 4
    shutil.rmtree(ck / "checkpoint-6")
    again = run_finetune(model_dir, train_file, tmp_path / "out2", checkpoint_dir=str(ck), resume_from_checkpoint=True,
                         **params)
    assert again.resumed_from == str(ck / "checkpoint-4")
    assert again.step_losses == full.step_losses
    assert_same_adapter(tmp_path / "out2" / "adapter", out / "adapter")
    assert checkpoint_steps(ck) == [4, 6] and checkpoint_steps(tmp_path / "out2") == []

    # nothing to resume from yet (a first submission with resume_from_checkpoint=True): step 0
    fresh = tmp_path / "empty-mount"
    messages = []
    first = ferrotune.finetune(str(model_dir), str(train_file), output_dir=str(tmp_path / "out3"), report_to="none",
                               progress=lambda kind, i, name, *rest: messages.append(name) if kind == "message" else None,
                               checkpoint_dir=str(fresh), resume_from_checkpoint=True, **dict(params, max_steps=2))
    assert first.resumed_from is None and first.global_step == 2
    assert any(f"no checkpoint in {fresh} yet: starting from step 0" in m for m in messages), messages
    assert checkpoint_steps(fresh) == [2]


def test_without_checkpoint_dir_checkpoints_stay_in_output_dir(tmp_path, model_dir, train_file):
    out = tmp_path / "out"
    run_finetune(model_dir, train_file, out, **dict(BASE, max_steps=2, save_strategy="steps", save_steps=1))
    assert checkpoint_steps(out) == [1, 2]
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 2
