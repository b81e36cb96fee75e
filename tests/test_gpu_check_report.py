"""scripts/gpu_check_report.py, the last step of the GPU check, on this machine: GPU time is too
short to lose the summary to a report that crashes on a step that failed, timed out or left a
value out. Its inputs are the files the steps write: status.tsv, the self-check's JSON (from the
emulated GPU where this build has one), a JUnit file, and bench JSON with the keys
bench/bench_train_cpu.py and bench/bench_generate.py write (values missing where a contender ran
out of memory, on a CPU, or crashed).
"""

from __future__ import annotations

import json

from ferrotune import _core
from tests.support.gpu_report import run_report

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_gpu" name="test_layer_matches_cpu"/>
<testcase classname="tests.test_gpu" name="test_twenty_steps_vs_peft"><failure message="loss 2.31 vs 2.29"/></testcase>
<testcase classname="tests.test_gpu" name="test_fp16"><skipped message="no sm_70"/></testcase>
</testsuite></testsuites>"""

TRAIN = {
    "runs": [
        {"tool": "peer", "phase": "step", "mfu": 0.21, "gpu_used_peak_minus_baseline_mib": 61000.0,
         "result": {"tokens_per_second": 9100.5}},
        {"tool": "ferrotune", "phase": "step", "mfu": 0.43, "gpu_used_peak_minus_baseline_mib": 30500.0,
         "result": {"tokens_per_second": 18400.2}},
        {"tool": "peer", "phase": "fwd_bwd", "oom": "out of GPU memory at step 1: CUDA out of memory"},
        {"tool": "ferrotune", "phase": "fwd_bwd", "error": "Traceback ... RuntimeError: boom"},
    ],
    "comparison": [{"phase": "step", "speed_ratio_ferrotune_over_peer": 2.0219, "gpu_mem_ratio_ferrotune_over_peer": 0.5,
                    "loss_max_abs_diff": 0.0031},
                   {"phase": "fwd_bwd", "speed_ratio_ferrotune_over_peer": None}],
}

GENERATE = {"rows": [{"batch": 1, "tool": "peer", "prefill_tokens_per_second": 20123.4, "decode_tokens_per_second": 41.25},
                     {"batch": 1, "tool": "ferrotune", "prefill_tokens_per_second": 30555.0, "decode_tokens_per_second": float("nan")},
                     {"batch": 8, "tool": "ferrotune", "prefill_tokens_per_second": None}]}


def selfcheck_json() -> str:
    if _core.gpu_emulator():
        return _core._gpu_selfcheck("emu", "bf16")
    return json.dumps([{"name": "matmul/NN", "dtype": "bf16", "error": 0.001, "tolerance": 0.01, "shapes": "5x7 @ 7x3",
                        "passed": True, "failure": None}])


def test_the_report_sums_up_failed_timed_out_and_partial_steps(tmp_path):
    bad = {"name": "attention/backward 32x96", "dtype": "f16", "error": float("nan"), "tolerance": 0.08,
           "shapes": "segments [4096]", "passed": False, "failure": "NaN in dq"}
    md, report, r = run_report(
        tmp_path, "env\t0\t3\nselfcheck-bf16\t0\t41\nselfcheck-fp16\t1\t12\npytest\t1\t200\ntrain\t124\t330\ngenerate\t-\t0\n",
        work_files={"selfcheck_bf16.json": selfcheck_json(), "selfcheck_fp16.json": json.dumps([bad]), "pytest.xml": JUNIT},
        train=TRAIN, generate=GENERATE, wheel="dist-cuda/ferrotune-0.1.0+cu12-cp310-abi3-manylinux_2_28_x86_64.whl",
        seconds=586)
    assert r.stdout.strip() == md.strip()
    assert "wheel `ferrotune-0.1.0+cu12-cp310-abi3-manylinux_2_28_x86_64.whl`, 586 s in all" in md
    assert "| selfcheck-fp16 | failed (exit 1) | 12 |" in md and "| train | timed out (exit 124) | 330 |" in md
    assert "| generate | skipped (no time left) | 0 |" in md
    n = len(json.loads(selfcheck_json()))
    assert f"## Self-check, precision bf16: {n} of {n} within tolerance" in md
    assert "## Self-check, precision fp16: 0 of 1 within tolerance" in md
    assert "| **FAIL** attention/backward 32x96 | nan | 0.08 | segments [4096] — NaN in dq |" in md
    assert "## pytest -m gpu: 1 passed, 1 failed, 1 skipped" in md
    assert "- tests.test_gpu::test_twenty_steps_vs_peft: loss 2.31 vs 2.29" in md
    assert "| ferrotune | step | 18,400 | 43.0 | 30,500 |" in md
    assert "| peer | fwd_bwd | – | – | – | out of GPU memory at step 1" in md
    assert "- step: speed ferrotune/peer 2.02x, GPU memory ferrotune/peer 0.50, max loss difference 0.0031" in md
    assert "- fwd_bwd: speed ferrotune/peer –x, GPU memory ferrotune/peer –, max loss difference –" in md
    assert "| 1 | peer | 20,123 | 41.2 |" in md and "| 8 | ferrotune | – | – |" in md

    assert [s["result"] for s in report["steps"]] == ["ok", "ok", "failed", "failed", "timed out", "skipped (no time left)"]
    assert report["pytest"]["failed"] == 1 and report["selfcheck"]["fp16"][0]["failure"] == "NaN in dq"
    assert report["train"]["runs"][1]["tokens_per_second"] == 18400.2


def test_the_report_of_a_run_that_stopped_early_still_writes_its_summary(tmp_path):
    # the machine went away after the first step: no self-check, no tests, no benches
    md, report, _ = run_report(tmp_path, "env\t0\t2\n")
    assert "| env | ok (exit 0) | 2 |" in md and "Self-check" not in md and "Training" not in md
    assert report["train"] is None


def test_the_report_says_when_the_training_benchmark_was_stopped_mid_way(tmp_path):
    # gpu_train.py saves its JSON after every run, marked partial until the last one
    partial = {**TRAIN, "runs": TRAIN["runs"][:1], "partial": True}
    md, _, _ = run_report(tmp_path, "train\t124\t300\n", train=partial)
    assert "The benchmark stopped before its last run (the step's time limit): the runs that finished." in md
    assert "| peer | step | 9,100 | 21.0 | 61,000 |" in md
    md, _, _ = run_report(tmp_path / "whole", "train\t0\t200\n", train={**TRAIN, "partial": False})
    assert "stopped before its last run" not in md
