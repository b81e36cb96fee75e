"""The notebook ``notebooks/finetune_phi3_ultrachat.ipynb`` runs top to bottom in its local,
offline mode (bundled sample, tiny random Phi-3) in a real Jupyter kernel, and stays clean in
git (no outputs)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "finetune_phi3_ultrachat.ipynb"


def _load(path: Path = NOTEBOOK):
    import nbformat

    return nbformat.read(path, as_version=4)


def _stdout(cell) -> str:
    return "".join(o["text"] for o in cell.get("outputs", []) if o["output_type"] == "stream" and o["name"] == "stdout")


def _kernel_env(tmp_path: Path, workdir: Path) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "AZUREML_", "MLFLOW_", "FERROTUNE_NOTEBOOK_")) and k != "MPLBACKEND"
    }
    env.update(
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",  # nothing listens there: any request would fail
        HF_HOME=str(tmp_path / "hf-home"),
        FERROTUNE_NOTEBOOK_WORKDIR=str(workdir),
    )
    return env


def _execute(nb, tmp_path: Path, run_dir: Path, workdir: Path) -> None:
    """Executes ``nb`` in place in a kernel of this interpreter, with cwd ``run_dir``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    # A kernel spec for exactly this interpreter (the venv with ferrotune), in a private folder.
    spec_dir = tmp_path / "kernels" / "ferrotune-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ferrotune test kernel",
        "language": "python",
    }))
    km = KernelManager(
        kernel_name="ferrotune-test",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False),
    )

    client = NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(run_dir)}})
    client.execute(env=_kernel_env(tmp_path, workdir))


def _workspace_config_above(folder: Path):
    for f in (folder, *folder.parents):
        for sub in ("", ".azureml", "aml_config"):
            for name in ("config.json", "project.json"):
                if (f / sub / name).is_file():
                    return f / sub / name
    return None


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Runs the whole notebook once; returns (cells by id, workdir, seconds)."""
    import time

    tmp_path = tmp_path_factory.mktemp("notebook")
    run_dir = tmp_path / "run"  # the kernel's cwd: no config.json here or above
    workdir = tmp_path / "work"
    run_dir.mkdir()
    found = _workspace_config_above(run_dir)
    if found is not None:
        pytest.skip(f"an Azure ML workspace config at {found} would switch the notebook to Azure mode")
    nb = _load()
    t0 = time.perf_counter()
    _execute(nb, tmp_path, run_dir, workdir)
    seconds = time.perf_counter() - t0
    print(f"notebook executed in {seconds:.1f} s")
    return {c["id"]: c for c in nb.cells}, workdir, seconds


def test_notebook_runs_locally_offline(executed):
    cells, workdir, seconds = executed
    code = [c for c in cells.values() if c["cell_type"] == "code"]

    # every code cell ran, none errored
    assert all(c.get("execution_count") for c in code)
    errors = [(c["id"], o) for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, errors
    assert seconds < 300, seconds

    # local mode, and why Azure is skipped: no workspace config found
    setup = _stdout(cells["setup"])
    assert "mode: local (offline: bundled sample, tiny model)" in setup, setup
    assert "Azure cells are skipped: no Azure ML workspace config found" in setup, setup
    assert str(workdir) in setup
    azure = [c for c in code if "azure" in c["metadata"].get("tags", [])]
    assert len(azure) >= 8
    for c in azure:
        out = _stdout(c)
        assert out.startswith("[Azure] ") and "skipped, local mode" in out, (c["id"], out)

    # data: the bundled sample through download_dataset, 25 % of each split
    data = workdir / "ultrachat_200k_dataset"
    assert "train_sft      50 of    200 rows" in _stdout(cells["data"])
    for split, rows in (("train_sft", 50), ("test_sft", 12), ("train_gen", 50), ("test_gen", 12)):
        assert (data / f"{split}.jsonl").read_text(encoding="utf-8").count("\n") == rows, split
    assert "<table" in "".join(o["data"].get("text/html", "") for o in cells["data-view"]["outputs"] if "data" in o)

    # parameters: the notebook's dict plus the tiny model's overrides; a typo caught
    params = _stdout(cells["params"])
    assert "'apply_deepspeed': 'true'" in params and "'deepspeed_stage': 2" in params
    assert "did you mean 'learning_rate'" in _stdout(cells["params-typo"])

    # training: the loss fell, on the steps and on the held-out evaluation
    summary = json.loads((workdir / "outputs" / "train_summary.json").read_text())
    losses = summary["step_losses"]
    assert len(losses) >= 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    evals = [e["eval_loss"] for e in summary["eval"]]
    assert len(evals) == 3 and evals[-1] < evals[0], evals
    assert "Trained" in _stdout(cells["run-local"])

    # the loss plot is an image
    images = [o for o in cells["plot-local"]["outputs"] if o["output_type"] == "display_data" and "image/png" in o["data"]]
    assert len(images) == 1
    assert "eval after step" in _stdout(cells["plot-local"])

    # streaming generation printed a reply
    gen = _stdout(cells["generate-local"])
    assert "assistant: " in gen and gen.split("assistant: ", 1)[1].strip()

    # the MLflow folder
    packaged = workdir / "mlflow_model"
    for name in ("MLmodel", "score.py", "conda.yaml", "data/model/config.json", "data/tokenizer/tokenizer.json"):
        assert (packaged / name).is_file(), name
    assert "fits on Standard_NC6s_v3" in _stdout(cells["deploy-local"])

    # scoring: the notebook's request (a whole test_gen row) through score.py, and a reply
    request = json.loads((data / "sample_score.json").read_text(encoding="utf-8"))
    conv = request["input_data"]["input_string"]
    assert len(conv) == 1 and conv[0][-1]["role"] == "assistant"
    assert request["input_data"]["parameters"]["temperature"] == 0.6 and request["params"] == {}
    test_gen = [json.loads(line)["messages"] for line in (data / "test_gen.jsonl").read_text(encoding="utf-8").splitlines()]
    assert conv[0] in test_gen
    scored = _stdout(cells["score-local"])
    assert "reply:" in scored and scored.split("reply:", 1)[1].strip(), scored

    # clean-up lists what was written
    assert str(packaged) in _stdout(cells["cleanup-local"])


def test_notebook_is_saved_without_outputs():
    nb = _load()
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c["cell_type"] == "code"]
    assert code
    for c in code:
        assert c["outputs"] == [] and c["execution_count"] is None, c["id"]
    raw = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert all("outputs" not in c or c["outputs"] == [] for c in raw["cells"])


def test_a_workspace_config_switches_to_azure_or_says_what_is_missing(tmp_path):
    """With a config.json beside the notebook, the set-up cell picks Azure mode when the Azure ML
    SDK is installed, and otherwise stays local saying how to install it (no exception)."""
    import importlib.util

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(
        {"subscription_id": "00000000-0000-0000-0000-000000000000", "resource_group": "rg", "workspace_name": "ws"}
    ))
    nb = _load()
    nb.cells = [c for c in nb.cells if c.get("id") in ("parameters", "setup")]
    assert len(nb.cells) == 2
    _execute(nb, tmp_path, run_dir, tmp_path / "work")
    out = _stdout(nb.cells[1])

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:  # the parent package is missing
            return False

    if installed("azure.ai.ml") and installed("azure.identity"):
        assert "mode: Azure" in out, out
    else:
        assert "mode: local" in out and 'pip install "ferrotune[azure]"' in out, out
