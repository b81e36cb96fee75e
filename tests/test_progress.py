"""The Python side of progress reporting: renderer choice and what each renderer prints."""

from __future__ import annotations

import io

import pytest

from ferrotune import _progress


def test_make_renderer_choices(monkeypatch):
    assert _progress.make_renderer(False) is None
    assert _progress.make_renderer(None) is None
    cb = lambda *a: None  # noqa: E731
    assert _progress.make_renderer(cb) is cb
    assert isinstance(_progress.make_renderer("lines"), _progress.LineRenderer)
    assert isinstance(_progress.make_renderer("bar"), _progress.TqdmRenderer)
    # not a terminal, not a notebook (pytest captures stderr): plain lines for logs
    monkeypatch.setattr(_progress, "_in_notebook", lambda: False)
    assert isinstance(_progress.make_renderer(True), _progress.LineRenderer)
    monkeypatch.setattr(_progress, "_in_notebook", lambda: True)
    assert isinstance(_progress.make_renderer(True), _progress.TqdmRenderer)
    with pytest.raises(ValueError, match="progress must be"):
        _progress.make_renderer("fancy")


def test_line_renderer_prints_start_progress_and_done():
    out = io.StringIO()
    r = _progress.LineRenderer(stream=out, every_s=0.0)
    r("start", 1, "train_sft", 100, 0, "rows")
    r("advance", 1, "", None, 40)
    r("advance", 1, "", None, 60)
    r("message", 0, "reading by byte ranges", None, 0)
    r("finish", 1, "", None, 0)
    r("start", 2, "model.safetensors", 3_000_000, 0, "B")
    r("finish", 2, "", None, 0)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[ferrotune] train_sft: started (100 rows to do)"
    assert "[ferrotune] train_sft: 40 rows (40%)" in lines
    assert "[ferrotune] train_sft: 100 rows (100%)" in lines
    assert "[ferrotune] reading by byte ranges" in lines
    assert "[ferrotune] train_sft: done (100 rows)" in lines
    assert lines[-2:] == ["[ferrotune] model.safetensors: started (3.0 MB to do)", "[ferrotune] model.safetensors: done (0.0 MB)"]


def test_tqdm_renderer_tracks_bars(capsys):
    r = _progress.TqdmRenderer()
    r("start", 7, "data/train-00000.parquet", 2048, 0, "B")
    r("advance", 7, "", None, 1024)
    assert r._bars[7].n == 1024 and r._bars[7].unit == "B"
    r("finish", 7, "", None, 0)
    assert 7 not in r._bars
    r("start", 8, "train_sft", 10, 0, "rows")
    assert r._bars[8].unit == "rows"
    r("finish", 8, "", None, 0)
