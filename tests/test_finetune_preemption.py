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
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
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


# ---------------------------------------------------------------------------------------
# SIGTERM: Azure ML's notice before preemption or cancel
# ---------------------------------------------------------------------------------------

#: long enough that SIGTERM lands mid-run; constant schedule: the interrupted run and the
#: reference agree whatever step the signal lands at
SIGTERM_RUN = dict(BASE, max_steps=300, lr_scheduler_type="constant", warmup_steps=0, gradient_accumulation_steps=4,
                   save_strategy="no")


def read_until(proc, pattern: str, seen: list, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return
        assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n" + "".join(seen[-20:])
    pytest.fail(f"the command ended before {pattern!r}:\n" + "".join(seen[-40:]))


@pytest.fixture(scope="module")
def sigterm_reference(work, model_dir, train_file):
    """The same training without interruption."""
    return run_finetune(model_dir, train_file, work / "sigterm-reference", **SIGTERM_RUN)


def test_sigterm_stops_the_cli_with_a_checkpoint_and_exit_143_and_the_resume_is_bit_exact(
    tmp_path, model_dir, train_file, sigterm_reference
):
    ck, out = tmp_path / "mounted-checkpoints", tmp_path / "out"
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps(dict(SIGTERM_RUN, checkpoint_dir=str(ck))), encoding="utf-8")
    proc = subprocess.Popen(cli_command(model_dir, train_file, out, params_file), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: list = []
    try:
        read_until(proc, r"\bstep 3/300\b", seen)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    output = "".join(seen) + rest
    assert proc.returncode == 143, output[-3000:]
    assert "Traceback" not in output and "panicked" not in output, output[-3000:]
    steps = checkpoint_steps(ck)
    assert len(steps) == 1 and 3 <= steps[0] < 300, (steps, output[-2000:])
    n = steps[0]
    last = output.strip().splitlines()[-1]
    assert last == (f"[ferrotune] stopped by SIGTERM: checkpoint {ck / f'checkpoint-{n}'} (step {n}); to continue, run "
                    "the same training with resume_from_checkpoint=True (ferrotune finetune ... --resume) and the same "
                    "checkpoint_dir"), last
    # nothing half-written, nothing final: a checkpoint in checkpoint_dir and no other
    assert checkpoint_steps(out) == [] and not (out / "train_summary.json").exists() and not (out / "adapter").exists()
    assert not [p.name for p in ck.iterdir() if p.name.startswith(".")]
    state = json.loads((ck / f"checkpoint-{n}" / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == n and state["step_losses"] == sigterm_reference.step_losses[:n]

    # the resubmitted job: the same command with --resume_from_checkpoint true, to the end
    r = subprocess.run(cli_command(model_dir, train_file, out, params_file, progress="lines")
                       + ["--resume_from_checkpoint", "true"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {ck / f'checkpoint-{n}'} (step {n})" in r.stderr
    summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["global_step"] == 300 and summary["resumed_from"] == str(ck / f"checkpoint-{n}")
    assert summary["step_losses"] == sigterm_reference.step_losses
    assert_same_adapter(out / "adapter", sigterm_reference.adapter_dir)


def test_sigterm_in_the_python_api_raises_training_interrupted_and_restores_the_handler(
    tmp_path, model_dir, train_file, sigterm_reference
):
    ck = tmp_path / "ck"
    calls: list = []

    def before(signum, frame):  # the program's own handler, to be restored afterwards
        calls.append(signum)

    handlers_during: list = []

    def on_metrics(m: dict) -> None:
        handlers_during.append(signal.getsignal(signal.SIGTERM))
        if m.get("step") == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what the launcher does

    previous = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(ferrotune.TrainingInterrupted) as info:
            ferrotune.finetune(str(model_dir), str(train_file), output_dir=str(tmp_path / "out"), progress=False,
                               report_to="none", callbacks=[on_metrics], checkpoint_dir=str(ck), **SIGTERM_RUN)
        assert signal.getsignal(signal.SIGTERM) is before  # restored
        assert handlers_during and all(h is not before for h in handlers_during)  # ferrotune's while training
        assert calls == []  # the program's handler did not see the SIGTERM meant for training
    finally:
        signal.signal(signal.SIGTERM, previous)
    e = info.value
    assert not isinstance(e, Exception) and isinstance(e, SystemExit) and e.code == 143
    assert e.step is not None and 3 <= e.step < 300
    assert e.checkpoint == str(ck / f"checkpoint-{e.step}") and checkpoint_steps(ck) == [e.step]
    assert str(e).startswith(f"stopped by SIGTERM: checkpoint {e.checkpoint} (step {e.step})")
    assert not (tmp_path / "out" / "adapter").exists()

    # resume from it, in this process: the uninterrupted run's losses and adapter, exactly
    resumed = run_finetune(model_dir, train_file, tmp_path / "out", checkpoint_dir=str(ck), resume_from_checkpoint=True,
                           **SIGTERM_RUN)
    assert resumed.resumed_from == e.checkpoint and resumed.step_losses == sigterm_reference.step_losses
    assert_same_adapter(resumed.adapter_dir, sigterm_reference.adapter_dir)
    # (save_strategy "no" writes no checkpoint that would replace the SIGTERM one)
    assert checkpoint_steps(ck) == [e.step]


def test_finetune_outside_the_main_thread_leaves_sigterm_alone(tmp_path, model_dir, train_file):
    before = signal.getsignal(signal.SIGTERM)
    box: dict = {}

    def train() -> None:
        try:
            box["result"] = run_finetune(model_dir, train_file, tmp_path / "out", **dict(BASE, max_steps=1,
                                                                                         save_strategy="no"))
        except BaseException as e:  # noqa: BLE001 - reported below
            box["error"] = e

    t = threading.Thread(target=train)
    t.start()
    t.join(timeout=300)
    assert "error" not in box, box.get("error")
    assert box["result"].global_step == 1
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------
# save_interval_minutes: a safety checkpoint between save_strategy's
# ---------------------------------------------------------------------------------------


def interval_saves(messages: list) -> list:
    found = [re.search(r"checkpoint-(\d+) \(save_interval_minutes", m) for m in messages]
    return [int(f[1]) for f in found if f]


def run_recording(model_dir, train_file, out, **params) -> tuple:
    messages: list = []

    def progress(kind, task_id, name, *rest):
        if kind == "message":
            messages.append(name)

    result = ferrotune.finetune(str(model_dir), str(train_file), output_dir=str(out), progress=progress,
                                report_to="none", **params)
    return result, messages


def test_save_interval_adds_safety_checkpoints_that_the_next_one_replaces(tmp_path, model_dir, train_file):
    params = dict(BASE, max_steps=6, save_strategy="steps", save_steps=4, save_total_limit=-1)
    # an interval every step outlasts (about 60 microseconds): a safety checkpoint after each
    # step that save_strategy does not save
    result, messages = run_recording(model_dir, train_file, tmp_path / "often", save_interval_minutes=1e-6, **params)
    assert interval_saves(messages) == [1, 2, 3, 5], messages
    # each replaced by the next checkpoint: save_strategy's stay, as without the interval
    assert checkpoint_steps(tmp_path / "often") == [4, 6]
    state = json.loads((tmp_path / "often" / "checkpoint-6" / "trainer_state.json").read_text())
    assert "unscheduled_checkpoint" not in state
    assert result.global_step == 6

    # the default, 30 minutes, does not come up in a short run; 0 turns the interval off
    for extra in ({}, {"save_interval_minutes": 0}):
        _, messages = run_recording(model_dir, train_file, tmp_path / f"default{len(extra)}", **extra, **params)
        assert interval_saves(messages) == [], messages
        assert checkpoint_steps(tmp_path / f"default{len(extra)}") == [4, 6]
    # save_strategy "no" means no checkpoints at all
    _, messages = run_recording(model_dir, train_file, tmp_path / "no", save_interval_minutes=1e-6,
                                **dict(params, save_strategy="no"))
    assert interval_saves(messages) == [] and checkpoint_steps(tmp_path / "no") == []

