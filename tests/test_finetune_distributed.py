"""Data-parallel training: real processes started as a launcher (Azure ML's
``PyTorchDistribution``, ``torchrun``) starts them, with ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT`` set, on 127.0.0.1.

The reference is ferrotune itself in one process: two processes with
``gradient_accumulation_steps=g`` must train what one process with ``2 g`` trains (same rows
per optimizer step, same dropout draws), up to float summation order. That one-process
training is checked against transformers + peft in ``test_finetune_train.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ferrotune
from ferrotune import _core

if not hasattr(_core, "finetune"):
    pytest.skip("ferrotune._core has no finetune yet", allow_module_level=True)

pytest.importorskip("torch")
pytest.importorskip("peft")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from tests.support import chatgen  # noqa: E402
from tests.support import tiny_phi3 as tp  # noqa: E402

BASE = dict(
    lora_r=4,
    lora_alpha=16.0,
    lora_dropout=0.1,  # each micro-batch's dropout draw must not depend on which rank runs it
    shuffle=True,
    device="cpu",
    precision="32",
    seed=3,
    learning_rate=1e-2,
    lr_scheduler_type="cosine",
    warmup_steps=1,
    weight_decay=0.01,
    max_grad_norm=1.0,
    per_device_train_batch_size=2,
    per_device_eval_batch_size=2,
    logging_steps=1,
    max_seq_length=96,
    merge_lora_weights=False,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, convs) -> Path:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for c in convs:
            f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
    return path


def read_adapter(folder: Path) -> dict:
    return safetensors_numpy.load_file(str(Path(folder) / "adapter_model.safetensors"))


def launch(tmp: Path, model_dir: Path, train: Path, out: Path, params: dict, *, world: int, port: int,
           ranks=None, env_extra=None, tag: str = "", rank_env=None) -> list:
    """Starts the CLI once per rank, as a launcher would; returns [(rank, Popen, log path)].
    ``rank_env``: {rank: {VAR: value}} on top (e.g. another node's LOCAL_RANK and TMPDIR)."""
    procs = []
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    for rank in ranks if ranks is not None else range(world):
        p = params[rank] if isinstance(params, list) else params
        pfile = tmp / f"params{tag}-{rank}.json"
        pfile.write_text(json.dumps(p), encoding="utf-8")
        env = dict(os.environ, WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=str(scratch),
                   RAYON_NUM_THREADS="1", **(env_extra or {}))
        env.update((rank_env or {}).get(rank, {}))
        log = tmp / f"rank{tag}-{rank}.log"
        cmd = [sys.executable, "-m", "ferrotune.cli", "finetune", "--model", str(model_dir), "--train-file", str(train),
               "--output-dir", str(out), "--params-json", str(pfile), "--progress", "lines", "--report-to", "none"]
        with open(log, "wb") as f:
            procs.append((rank, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log))
    return procs


def wait_all(procs, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    out = {}
    for rank, proc, log in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for _, p, _ in procs:
                p.kill()
            pytest.fail(f"rank {rank} still running after {timeout} s (a hang?):\n" + log.read_text(errors="replace")[-3000:])
        out[rank] = (proc.returncode, log.read_text(errors="replace"))
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finetune-dp")


@pytest.fixture(scope="module")
def model_dir(work) -> Path:
    return tp.make_tiny_phi3(work / "model", hidden=64, layers=2, heads=4, intermediate=128, seed=1)


@pytest.fixture(scope="module")
def train_file(work) -> Path:
    # 40 conversations: the last 8 are the validation split; the rest pack into rows of 96
    # tokens whose count does not fill the last optimizer step, so in the last step some
    # rank has fewer micro-batches (or none) than the other.
    return write_jsonl(work / "train.jsonl", chatgen.conversations(40, 11, tricky=True, system=True))


def test_two_processes_train_what_one_process_with_twice_the_accumulation_trains(tmp_path, model_dir, train_file):
    one = ferrotune.finetune(
        str(model_dir), str(train_file), output_dir=str(tmp_path / "one"), progress=False, report_to="none",
        **BASE, gradient_accumulation_steps=4, num_train_epochs=2, evaluation_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2,
    )
    assert one.world_size == 1 and one.global_step >= 3

    params = dict(BASE, gradient_accumulation_steps=2, num_train_epochs=2, evaluation_strategy="steps", eval_steps=2,
                  save_strategy="steps", save_steps=2)
    out = tmp_path / "two"
    res = wait_all(launch(tmp_path, model_dir, train_file, out, params, world=2, port=free_port()))
    for rank, (code, log) in res.items():
        assert code == 0, f"rank {rank} failed:\n{log[-4000:]}"
        assert f"data-parallel: rank {rank} of 2 joined (tcp transport)" in log, log[-2000:]
    # one node: its LOCAL_RANK 0 (rank 0) tokenized the train and validation conversations,
    # once each; rank 1 read those rows instead of tokenizing them again
    assert {rank: log.count("conversations kept") for rank, (_, log) in res.items()} == {0: 2, 1: 0}
    assert res[1][1].count("read the rows tokenized by this node's LOCAL_RANK 0") == 2

    two = json.loads((out / "train_summary.json").read_text())
    assert two["world_size"] == 2 and two["rank"] == 0
    assert two["global_step"] == one.global_step and two["total_steps"] == one.total_steps
    assert two["train_tokens"] == one.train_tokens
    np.testing.assert_allclose(two["step_losses"], one.step_losses, rtol=2e-5, atol=0)
    got_eval = [(e["step"], e["eval_loss"]) for e in two["eval"]]
    want_eval = [(e["step"], e["eval_loss"]) for e in one.eval]
    assert [s for s, _ in got_eval] == [s for s, _ in want_eval]
    np.testing.assert_allclose([v for _, v in got_eval], [v for _, v in want_eval], rtol=2e-5)
    # the adapters agree to float32 summation order (the ranks add their micro-batches'
    # gradients in another order than one process does; AdamW's m / sqrt(v) turns a 1e-7
    # difference of a near-zero gradient element into up to ~1e-4 of a parameter ~0.1)
    a, b = read_adapter(tmp_path / "one" / "adapter"), read_adapter(out / "adapter")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-4, err_msg=k)
    assert np.any(b[sorted(b)[1]] != 0), "lora_B still zero: nothing was trained"
    # rank 0 alone wrote the checkpoints, the adapter and the summary; rank 1 left no scratch
    # copy of its tokenized data behind
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one").iterdir()), names
    assert list((tmp_path / "scratch").iterdir()) == []
    rank1_summary = res[1][1]
    assert "Adapter:" in rank1_summary  # rank 1's CLI printed its summary line too


def test_ranks_with_different_settings_are_refused_at_the_start(tmp_path, model_dir, train_file):
    p0 = dict(BASE, gradient_accumulation_steps=1, max_steps=3, evaluation_strategy="no", save_strategy="no")
    p1 = dict(p0, learning_rate=5e-3)
    res = wait_all(launch(tmp_path, model_dir, train_file, tmp_path / "out", [p0, p1], world=2, port=free_port()), timeout=120)
    code0, log0 = res[0]
    code1, log1 = res[1]
    assert code0 != 0 and code1 != 0
    what = "rank 1 computed a different training plan than rank 0 (learning_rate: 0.005 on rank 1, 0.01 on rank 0)"
    assert what in log0, log0[-2000:]
    assert "error: data-parallel: rank 0 refused rank 1: " + what in log1, log1[-2000:]
    for log in (log0, log1):
        assert "Traceback" not in log and "panicked" not in log
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_rank_that_never_comes_is_reported_after_the_timeout(tmp_path, model_dir, train_file):
    p = dict(BASE, gradient_accumulation_steps=1, max_steps=3, evaluation_strategy="no", save_strategy="no")
    t0 = time.monotonic()
    res = wait_all(launch(tmp_path, model_dir, train_file, tmp_path / "out", p, world=3, port=free_port(), ranks=[0, 2],
                          env_extra={"FERROTUNE_DIST_TIMEOUT": "4"}), timeout=120)
    assert time.monotonic() - t0 < 90
    code0, log0 = res[0]
    code2, log2 = res[2]
    assert code0 != 0 and "rank(s) 1 did not join within 4 s" in log0, log0[-2000:]
    assert code2 != 0 and "rank 0 refused rank 2" in log2, log2[-2000:]


def test_a_rank_killed_mid_run_stops_the_others_instead_of_hanging(tmp_path, model_dir, train_file):
    p = dict(BASE, gradient_accumulation_steps=1, max_steps=400, evaluation_strategy="no", save_strategy="steps",
             save_steps=1, save_total_limit=2)
    out = tmp_path / "out"
    procs = launch(tmp_path, model_dir, train_file, out, p, world=2, port=free_port())
    deadline = time.monotonic() + 120
    try:
        while not (out / "checkpoint-2").exists():
            for rank, proc, log in procs:
                if proc.poll() is not None:
                    pytest.fail(f"rank {rank} ended early ({proc.returncode}):\n" + log.read_text(errors="replace")[-3000:])
            assert time.monotonic() < deadline, "no checkpoint-2 after 120 s"
            time.sleep(0.01)
        os.kill(procs[1][1].pid, signal.SIGKILL)
    finally:
        if procs[1][1].poll() is None:
            procs[1][1].kill()
    res = wait_all(procs[:1], timeout=60)
    code0, log0 = res[0]
    assert code0 != 0
    assert "data-parallel:" in log0 and "rank 1" in log0 and "failed or was stopped" in log0, log0[-2000:]
    assert "Traceback" not in log0 and "panicked" not in log0
    assert not (out / "train_summary.json").exists()
    # the checkpoints rank 0 wrote are whole: training can resume from them
    assert (out / "checkpoint-2" / "trainer_state.json").exists()


def test_rank_zero_resumes_the_group_from_its_checkpoint(tmp_path, model_dir, train_file):
    """A two-process run taken back to its checkpoint 4 resumes, on both ranks, to the same
    curve and adapter as the uninterrupted run."""
    common = dict(BASE, gradient_accumulation_steps=1, evaluation_strategy="no", save_strategy="steps", save_steps=2,
                  lr_scheduler_type="constant")
    full = wait_all(launch(tmp_path, model_dir, train_file, tmp_path / "full", dict(common, max_steps=6), world=2,
                           port=free_port(), tag="f"))
    assert all(code == 0 for code, _ in full.values()), full
    # the same run, taken back to checkpoint-4 (as if stopped after it)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    for name in ("checkpoint-6", "adapter", "train_summary.json"):
        target = part / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    resumed = wait_all(launch(tmp_path, model_dir, train_file, part, dict(common, max_steps=6, resume_from_checkpoint=True),
                              world=2, port=free_port(), tag="r"))
    for rank, (code, log) in resumed.items():
        assert code == 0, log[-3000:]
        assert "resuming from" in log and "(step 4)" in log, log[-2000:]
    a = json.loads((tmp_path / "full" / "train_summary.json").read_text())
    b = json.loads((part / "train_summary.json").read_text())
    assert b["step_losses"] == a["step_losses"]
    ra, rb = read_adapter(tmp_path / "full" / "adapter"), read_adapter(part / "adapter")
    for k in ra:
        assert np.array_equal(ra[k], rb[k]), k


def test_package_on_a_worker_rank_leaves_the_folder_to_rank_zero(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    out = tmp_path / "pkg"
    r = subprocess.run([sys.executable, "-m", "ferrotune.cli", "package", str(tmp_path / "missing"), str(out)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "rank 1 of 2: packaging is rank 0's job; nothing to do" in r.stderr
    assert not out.exists()
    # rank 0 does package (and so fails here: there is nothing trained to package)
    env["RANK"] = "0"
    r = subprocess.run([sys.executable, "-m", "ferrotune.cli", "package", str(tmp_path / "missing"), str(out)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "missing" in r.stderr


def tokenized_here(log: str) -> int:
    return log.count("conversations kept")


def test_each_node_tokenizes_once_for_its_processes(tmp_path, model_dir, train_file):
    """Two nodes of one process each (both LOCAL_RANK 0, each with its own TMPDIR): each
    tokenizes for itself; the one that is not rank 0 works in its TMPDIR and cleans up."""
    p = dict(BASE, gradient_accumulation_steps=1, max_steps=2, evaluation_strategy="no", save_strategy="no")
    node2_tmp = tmp_path / "node2-tmp"
    node2_tmp.mkdir()
    res = wait_all(launch(tmp_path, model_dir, train_file, tmp_path / "out", p, world=2, port=free_port(),
                          rank_env={1: {"LOCAL_RANK": "0", "TMPDIR": str(node2_tmp)}}))
    for rank, (code, log) in res.items():
        assert code == 0, f"rank {rank} failed:\n{log[-4000:]}"
        assert tokenized_here(log) == 1, log[-2000:]
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["global_step"] == 2
    assert list(node2_tmp.iterdir()) == [] and list((tmp_path / "scratch").iterdir()) == []


def test_a_node_whose_tokenizing_fails_stops_the_group_with_the_reason(tmp_path, model_dir, train_file):
    p = dict(BASE, gradient_accumulation_steps=1, max_steps=2, evaluation_strategy="no", save_strategy="no")
    not_a_dir = tmp_path / "tmp-is-a-file"
    not_a_dir.write_text("")
    # told at once: wait_all fails the test long before FERROTUNE_DIST_TIMEOUT would end a wait
    res = wait_all(launch(tmp_path, model_dir, train_file, tmp_path / "out", p, world=2, port=free_port(),
                          rank_env={1: {"LOCAL_RANK": "0", "TMPDIR": str(not_a_dir)}},
                          env_extra={"FERROTUNE_DIST_TIMEOUT": "900"}), timeout=150)
    (code0, log0), (code1, log1) = res[0], res[1]
    assert code1 == 2 and "error: " in log1 and str(not_a_dir) in log1, log1[-2000:]
    assert code0 == 2, log0[-2000:]
    assert ("error: data-parallel: preparing the data failed on rank(s) 1 (LOCAL_RANK 0 of a node, which tokenizes "
            "for its node); that rank's log has the cause") in log0, log0[-2000:]
    for log in (log0, log1):
        assert "Traceback" not in log and "panicked" not in log
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_reader_waits_for_its_node_and_fails_clearly_when_the_node_has_no_writer(tmp_path, model_dir, train_file):
    """Rank 1 says LOCAL_RANK 1 but sits on another "node" (its own TMPDIR) with no LOCAL_RANK 0
    there: it finds no tokenized data and says why; rank 0 stops too."""
    p = dict(BASE, gradient_accumulation_steps=1, max_steps=2, evaluation_strategy="no", save_strategy="no")
    lonely = tmp_path / "lonely-tmp"
    lonely.mkdir()
    res = wait_all(launch(tmp_path, model_dir, train_file, tmp_path / "out", p, world=2, port=free_port(),
                          rank_env={1: {"TMPDIR": str(lonely)}}, env_extra={"FERROTUNE_DIST_TIMEOUT": "900"}),
                   timeout=150)
    (code0, log0), (code1, log1) = res[0], res[1]
    assert code1 == 2 and "rank 1 cannot find its node's tokenized data: no folder of this run in" in log1, log1[-2000:]
    assert "every node needs a process with LOCAL_RANK 0" in log1
    assert code0 == 2 and "rank(s) 1 could not read their node's tokenized data" in log0, log0[-2000:]


# ---------------------------------------------------------------------------------------
# SIGTERM: every rank gets it from the launcher before preemption or cancel
# ---------------------------------------------------------------------------------------

SIGTERM_RUN = dict(BASE, gradient_accumulation_steps=2, max_steps=300, lr_scheduler_type="constant", warmup_steps=0,
                   evaluation_strategy="no", save_strategy="no")


def wait_for_line(log: Path, pattern: str, procs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text(errors="replace")):
        for rank, proc, path in procs:
            if proc.poll() is not None:
                pytest.fail(f"rank {rank} ended early ({proc.returncode}):\n" + path.read_text(errors="replace")[-3000:])
        assert time.monotonic() < deadline, f"no {pattern!r} after {timeout} s"
        time.sleep(0.01)


def test_sigterm_to_every_rank_saves_one_checkpoint_and_the_group_resumes_bit_exact(tmp_path, model_dir, train_file):
    ck = tmp_path / "ck"
    params = dict(SIGTERM_RUN, checkpoint_dir=str(ck))
    full = wait_all(launch(tmp_path, model_dir, train_file, tmp_path / "full", dict(SIGTERM_RUN), world=2,
                           port=free_port(), tag="f"))
    assert all(code == 0 for code, _ in full.values()), full

    procs = launch(tmp_path, model_dir, train_file, tmp_path / "out", params, world=2, port=free_port(), tag="i")
    try:
        wait_for_line(procs[0][2], r"\bstep 3/300\b", procs)
        for _, proc, _ in procs:  # the launcher signals every process
            proc.send_signal(signal.SIGTERM)
        res = wait_all(procs, timeout=120)
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
    steps = sorted(int(p.name.split("-")[1]) for p in ck.iterdir() if p.name.startswith("checkpoint-"))
    assert len(steps) == 1 and 3 <= steps[0] < 300, steps
    n = steps[0]
    assert (ck / f"checkpoint-{n}" / "trainer_state.json").is_file()
    assert not [p.name for p in ck.iterdir() if p.name.startswith(".")]
    for rank, (code, log) in res.items():
        assert code == 143, f"rank {rank}: {code}\n{log[-3000:]}"
        assert f"stopped by SIGTERM: checkpoint {ck / f'checkpoint-{n}'} (step {n})" in log.strip().splitlines()[-1], \
            log[-2000:]
        assert "Traceback" not in log and "panicked" not in log
    assert not (tmp_path / "out" / "train_summary.json").exists()

    resumed = wait_all(launch(tmp_path, model_dir, train_file, tmp_path / "out",
                              dict(params, resume_from_checkpoint=True), world=2, port=free_port(), tag="r"))
    for rank, (code, log) in resumed.items():
        assert code == 0, log[-3000:]
        assert f"resuming from {ck / f'checkpoint-{n}'} (step {n})" in log, log[-2000:]
    a = json.loads((tmp_path / "full" / "train_summary.json").read_text())
    b = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert b["step_losses"] == a["step_losses"]
    ra, rb = read_adapter(tmp_path / "full" / "adapter"), read_adapter(tmp_path / "out" / "adapter")
    for k in ra:
        assert np.array_equal(ra[k], rb[k]), k


def test_sigterm_to_one_rank_stops_the_others_with_rank_0_saving(tmp_path, model_dir, train_file):
    """A rank that stops early does not leave the others waiting for its share of the step:
    they learn of it at the step's next exchange, rank 0 saves, and all end."""
    ck = tmp_path / "ck"
    procs = launch(tmp_path, model_dir, train_file, tmp_path / "out", dict(SIGTERM_RUN, checkpoint_dir=str(ck)),
                   world=2, port=free_port(), env_extra={"FERROTUNE_DIST_TIMEOUT": "900"})
    try:
        wait_for_line(procs[0][2], r"\bstep 3/300\b", procs)
        procs[1][1].send_signal(signal.SIGTERM)
        res = wait_all(procs, timeout=120)  # far below FERROTUNE_DIST_TIMEOUT: no rank waited it out
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
    (code0, log0), (code1, log1) = res[0], res[1]
    assert code1 == 143, log1[-2000:]
    assert code0 == 2 and "training stopped because another rank was stopped" in log0, log0[-2000:]
    steps = [p.name for p in ck.iterdir() if p.name.startswith("checkpoint-")]
    assert len(steps) == 1 and (ck / steps[0] / "trainer_state.json").is_file()
