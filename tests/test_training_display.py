"""How training shows itself to a data scientist: the live HTML table in Jupyter (rendered from
metrics events, updated in place through a display handle), ``FinetuneResult.plot()`` with and
without matplotlib, and a real notebook kernel running a tiny training (nbclient)."""

from __future__ import annotations

import builtins
import json
import os
import re
import sys
from importlib import resources
from pathlib import Path

import pytest

import ferrotune
from ferrotune import FinetuneResult, MissingDependencyError, _core, _progress
from ferrotune._progress import NotebookTrainingTable, format_duration

# ---------------------------------------------------------------------------------------
# The table, from a sequence of metrics events
# ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingDisplay:
    """Stands in for IPython's ``display(..., display_id=True)``: records what is shown and
    every in-place update of the handle it returns."""

    def __init__(self) -> None:
        self.calls: list = []  # ("show" | "update", html)

    def __call__(self, html: str):
        self.calls.append(("show", html))
        display = self

        class Handle:
            def update(self, text: str) -> None:
                display.calls.append(("update", text))

        return Handle()


def cells(html: str) -> list:
    """The table's rows as lists of cell texts."""
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "00:00"), (59.4, "00:59"), (61, "01:01"), (3599, "59:59"), (3600, "1:00:00"), (3 * 3600 + 62, "3:01:02"),
     (None, ""), (float("nan"), ""), (-1, "")],
)
def test_eta_formatting(seconds, text):
    assert format_duration(seconds) == text


def test_table_renders_every_column_and_updates_in_place():
    clock, shown, others = FakeClock(), RecordingDisplay(), []
    table = NotebookTrainingTable(lambda *event: others.append(event), show=shown, clock=clock)

    # tasks that are not training steps, and messages, go to the other renderer
    table("start", 1, "train.jsonl", 100, 0, "rows")
    table("advance", 1, "", None, 100, "")
    table("message", 0, "note: apply_deepspeed: not needed", None, 0, "")
    assert [e[0] for e in others] == ["start", "advance", "message"] and shown.calls == []

    table("start", 2, "train", 10, 0, "steps")
    assert [c[0] for c in shown.calls] == ["show"]  # displayed once, then only updated
    assert "<th>Step</th><th>Training Loss</th><th>Validation Loss</th><th>Learning Rate</th><th>Tokens/s</th><th>ETA</th>" \
        in shown.calls[0][1]
    assert "<progress value='0' max='10'" in shown.calls[0][1]

    clock.now += 5.0
    table("advance", 2, "", None, 1, "")  # the first report: the speed is measured from here
    clock.now += 4.0
    table("advance", 2, "", None, 1, "")  # step 2: 4 s per step, 8 steps left
    table("metrics", 0, json.dumps({"step": 2, "epoch": 0.2, "loss": 2.3456789, "learning_rate": 1.5e-5,
                                     "grad_norm": 0.5, "tokens_per_second": 12345.6}), None, 0, "")
    table("metrics", 0, json.dumps({"step": 2, "epoch": 0.2, "eval_loss": 2.125, "eval_perplexity": 8.37}), None, 0, "")
    clock.now += 8.0
    table("advance", 2, "", None, 2, "")  # step 4 (two steps in one report)
    table("metrics", 0, json.dumps({"step": 4, "loss": 1.5, "learning_rate": 1e-5, "tokens_per_second": 999.4}),
          None, 0, "")
    clock.now += 0.1
    table("advance", 2, "", None, 1, "")  # progress alone, 0.1 s later: not redrawn yet
    n_before = len(shown.calls)
    clock.now += 1.0
    table("advance", 2, "", None, 1, "")  # now it is
    assert len(shown.calls) == n_before + 1

    kinds = [c[0] for c in shown.calls]
    assert kinds[0] == "show" and set(kinds[1:]) == {"update"} and len(kinds) >= 4
    html = shown.calls[-1][1]
    assert cells(html) == [
        ["2", "2.345679", "2.125000", "1.500e-05", "12,346", "00:32"],
        ["4", "1.500000", "", "1.000e-05", "999", "00:24"],
    ]
    assert "<progress value='6' max='10'" in html and "[6/10 00:18 &lt; 00:10]" in html  # 13.1 s for 5 steps, 4 left

    table("finish", 2, "", None, 0, "")
    final = shown.calls[-1]
    assert final[0] == "update" and "[6/10 00:18]" in final[1]  # no ETA once finished
    # the end of training: later events are another task's again
    table("start", 3, "merged", 5, 0, "B")
    assert others[-1][:2] == ("start", 3)


def test_table_of_a_resumed_run_measures_speed_from_this_run():
    clock, shown = FakeClock(), RecordingDisplay()
    table = NotebookTrainingTable(None, show=shown, clock=clock)
    table("start", 1, "train", 100, 0, "steps")
    table("advance", 1, "", None, 50, "")  # resumed at step 50: reported at once
    clock.now += 10.0
    table("advance", 1, "", None, 5, "")  # 2 s per step from here
    assert table.eta() == pytest.approx(90.0)  # 45 steps left


def test_table_escapes_and_ignores_non_numbers():
    shown = RecordingDisplay()
    table = NotebookTrainingTable(None, show=shown, clock=FakeClock())
    table.add_metrics({"step": 1, "loss": "<b>", "learning_rate": True, "tokens_per_second": None})
    table.add_metrics({"loss": 1.0})  # no step: not a row
    assert cells(table.html()) == [["1", "", "", "", "", ""]]


def test_finetune_chooses_the_table_in_a_notebook_and_lines_elsewhere(monkeypatch):
    monkeypatch.setattr(_progress, "_in_notebook", lambda: True)
    r = _progress.make_renderer(True, training=True)
    assert isinstance(r, NotebookTrainingTable) and isinstance(r._other, _progress.TqdmRenderer)
    assert isinstance(_progress.make_renderer("auto", training=True), NotebookTrainingTable)
    # other long calls (downloads, tokenizing) keep their bars; "lines"/"bar" are what they say
    assert isinstance(_progress.make_renderer(True), _progress.TqdmRenderer)
    assert isinstance(_progress.make_renderer("lines", training=True), _progress.LineRenderer)
    assert isinstance(_progress.make_renderer("bar", training=True), _progress.TqdmRenderer)
    monkeypatch.setattr(_progress, "_in_notebook", lambda: False)
    assert isinstance(_progress.make_renderer(True, training=True), _progress.LineRenderer)  # a log


# ---------------------------------------------------------------------------------------
# FinetuneResult.plot()
# ---------------------------------------------------------------------------------------

RESULT = FinetuneResult.from_summary(
    {"global_step": 4, "step_losses": [2.5, 2.25, 2.0, 1.75], "adapter_dir": "o/adapter", "merged_dir": None,
     "eval": [{"step": 2, "eval_loss": 2.1}, {"step": 4, "eval_loss": 1.9}]},
    output_dir="o",
)


def test_plot_draws_training_and_validation_loss_against_the_step():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = RESULT.plot()
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["training loss"].get_xdata()) == [1, 2, 3, 4]
    assert list(lines["training loss"].get_ydata()) == [2.5, 2.25, 2.0, 1.75]
    assert list(lines["validation loss"].get_xdata()) == [2, 4]
    assert list(lines["validation loss"].get_ydata()) == [2.1, 1.9]
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "loss"
    # into a given Axes
    import matplotlib.pyplot as plt

    fig2, ax2 = plt.subplots()
    assert RESULT.plot(ax=ax2) is fig2 and len(ax2.get_lines()) == 2
    plt.close("all")
    # without any evaluation: the training curve alone
    no_eval = FinetuneResult.from_summary({"global_step": 1, "step_losses": [1.0], "adapter_dir": "a"}, output_dir="o")
    assert [line.get_label() for line in no_eval.plot().axes[0].get_lines()] == ["training loss"]
    plt.close("all")


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(MissingDependencyError, match=r"needs matplotlib.*pip install matplotlib") as e:
        RESULT.plot()
    assert isinstance(e.value, ImportError) and isinstance(e.value, ferrotune.FerrotuneError)


# ---------------------------------------------------------------------------------------
# A real notebook kernel: a tiny training shows the table and updates it
# ---------------------------------------------------------------------------------------

NOTEBOOK_CELL = """
import json, ferrotune
result = ferrotune.finetune(MODEL, TRAIN, output_dir=OUT, report_to="none", device="cpu", max_steps=6,
                            logging_steps=2, evaluation_strategy="steps", eval_steps=3, per_device_train_batch_size=2,
                            max_seq_length=96, lora_r=4, lora_alpha=16, learning_rate=1e-2, save_strategy="no",
                            merge_lora_weights=False)
print("steps", result.global_step)
"""


def _execute_recording(nb, tmp_path: Path, run_dir: Path) -> list:
    """Runs ``nb`` in a real kernel of this interpreter (nbclient); returns the display
    messages as they came: ``(cell index, msg_type, display_id, html)``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    seen: list = []

    class Recording(NotebookClient):
        def process_message(self, msg, cell, cell_index):
            if msg["msg_type"] in ("display_data", "update_display_data"):
                content = msg["content"]
                seen.append((cell_index, msg["msg_type"], (content.get("transient") or {}).get("display_id"),
                             content.get("data", {}).get("text/html", "")))
            return super().process_message(msg, cell, cell_index)

    spec_dir = tmp_path / "kernels" / "ferrotune-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ferrotune test kernel", "language": "python",
    }))
    km = KernelManager(kernel_name="ferrotune-test",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")],
                                                             ensure_native_kernel=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_")) and k != "MPLBACKEND"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    Recording(nb, km=km, timeout=600, resources={"metadata": {"path": str(run_dir)}}).execute(env=env)
    return seen


def test_a_notebook_shows_the_training_table_and_updates_it(tmp_path):
    pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    if not hasattr(_core, "finetune"):
        pytest.skip("ferrotune._core has no finetune")
    from tests.support import chatgen

    tokenizer = resources.files("ferrotune") / "_sample" / "phi3-tokenizer"
    model = _core.create_random_model(str(tmp_path / "model"), {"hidden_size": 64, "intermediate_size": 128,
                                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4},
                                      seed=0, tokenizer=str(tokenizer))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chatgen.conversations(30, 2, system=True)),
                     encoding="utf-8")
    setup = f"MODEL, TRAIN, OUT = {str(model)!r}, {str(train)!r}, {str(tmp_path / 'out')!r}"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup), nbformat.v4.new_code_cell(NOTEBOOK_CELL),
                                         nbformat.v4.new_code_cell("result.plot()")])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    seen = _execute_recording(nb, tmp_path, run_dir)

    outputs = nb.cells[1]["outputs"]
    assert not [o for o in outputs if o["output_type"] == "error"], outputs
    assert "steps 6" in "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    # the table was displayed once, then updated in place under the same display id
    training = [m for m in seen if m[0] == 1 and "ferrotune-training" in m[3]]
    assert training[0][1] == "display_data" and training[0][2], training[:1]
    updates = [m for m in training[1:] if m[1] == "update_display_data"]
    assert updates and len(updates) == len(training) - 1, [m[1] for m in training]
    assert {m[2] for m in training} == {training[0][2]}
    assert cells(training[0][3]) == []  # at the start: no rows yet
    # the notebook keeps one output: the final table
    shown = [o for o in outputs if o["output_type"] == "display_data"]
    assert len(shown) == 1 and shown[0]["data"]["text/html"] == training[-1][3]
    html = training[-1][3]
    for column in NotebookTrainingTable.COLUMNS:
        assert f"<th>{column}</th>" in html
    rows = cells(html)
    assert [r[0] for r in rows] == ["2", "3", "4", "6"], rows  # logged steps and evaluated steps
    logged = {r[0]: r for r in rows}
    assert all(logged[s][1] and logged[s][3] and logged[s][4] for s in ("2", "4", "6"))  # loss, lr, tokens/s
    assert logged["3"][2] and logged["6"][2] and not logged["2"][2]  # validation loss where evaluated
    assert "<progress value='6' max='6'" in html
    # no plain metric lines in a notebook: the table is the display
    stderr = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream" and o["name"] == "stderr")
    assert not re.search(r"step \d+/\d+\s+loss", stderr), stderr

    plotted = nb.cells[2]["outputs"]
    assert not [o for o in plotted if o["output_type"] == "error"], plotted
    images = [o for o in plotted if "image/png" in o.get("data", {})]
    assert len(images) == 1, plotted  # the returned figure, shown once
