"""``ferrotune demo``, the README's first command: the notebook's whole flow offline on the
bundled sample — download, tokenize + pack, a tiny random Phi-3, LoRA fine-tuning whose loss
falls, evaluation, merge, generation, packaging and one request through the packaged
``score.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ferrotune


def test_demo_runs_the_whole_flow_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AZUREML_", "MLFLOW_"))}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: any request would fail
    r = subprocess.run([sys.executable, "-m", "ferrotune.cli", "demo", "--workdir", str(tmp_path), "--quiet"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())

    # 1. download: 25 % of the 200/50-row sample splits, half-to-even rounding
    data = tmp_path / "ultrachat_200k_dataset"
    assert (data / "train_sft.jsonl").read_text().count("\n") == 50
    assert (data / "test_sft.jsonl").read_text().count("\n") == 12  # 12.5 -> 12
    # 2. tokenize + pack with the bundled Phi-3 tokenizer
    ds = ferrotune.load_tokenized(tmp_path / "train_sft.tokenized.parquet")
    assert ds.metadata["max_seq_length"] == 1024 and ds.metadata["mode"] == "pack"
    assert "50 conversations kept" in r.stdout
    # 3-4. training: the loss falls, on the training steps and on the held-out 20 %
    losses = summary["train"]["step_losses"]
    assert len(losses) >= 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 2.0, (first, last)
    evals = [e["eval_loss"] for e in summary["train"]["eval"]]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.5, evals
    merged = Path(summary["train"]["merged"])
    assert (merged / "config.json").is_file() and (Path(summary["train"]["adapter"]) / "adapter_config.json").is_file()
    # 5. generation with the merged model
    assert summary["generate"]["reply"].strip()
    # 6. the MLflow folder
    packaged = Path(summary["package"])
    for name in ("MLmodel", "score.py", "conda.yaml", "requirements.txt", "data/model/config.json", "data/tokenizer/tokenizer.json"):
        assert (packaged / name).is_file(), name
    # 7. the notebook's request through score.py: one conversation in a list -> a list of one text
    assert summary["score"]["status"] == 200
    out = summary["score"]["response"]["output"]
    assert isinstance(out, list) and len(out) == 1 and out[0].strip()
    request = json.loads((tmp_path / "sample_score.json").read_text())
    assert request["input_data"]["input_string"][0][-1]["role"] == "assistant"  # a whole test_gen row
    assert "Traceback" not in r.stderr
