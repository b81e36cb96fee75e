"""Loading a ChatTokenizer from a Hub model repo (the fake Hub) and from the HF cache when
offline: same ids as the same files loaded from a folder, and typed errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import ferrotune
from tests.support import tokenizer_dirs
from tests.support.chatgen import conversations

REPO = "tiny-org/phi3-chat"


@pytest.fixture
def phi3_repo(hub, hf_env, tmp_path):
    """The Phi-3 fixture with the model's config.json, served as a model repo."""
    folder = tokenizer_dirs.phi3_with_model_config(tmp_path / "src")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [32000, 32007]}))
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    hub.add_repo(REPO, files, repo_type="model", lfs_min_size=1024 * 1024)
    return folder


def test_hub_repo_gives_the_folders_ids(phi3_repo, hub, monkeypatch):
    from_hub = ferrotune.ChatTokenizer.from_pretrained(REPO)
    from_dir = ferrotune.ChatTokenizer.from_pretrained(phi3_repo)
    assert from_hub.eos_token_ids == [32000, 32007]
    assert from_hub.default_max_seq_length == 4096
    for conv in conversations(50, seed=3):
        assert from_hub.encode_chat(conv)["input_ids"].tolist() == from_dir.encode_chat(conv)["input_ids"].tolist()
    assert hub.find_requests(path_contains="tokenizer.json"), "tokenizer.json came over HTTP"

    # Offline, the files come from the HF cache the first call filled.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = ferrotune.ChatTokenizer.from_pretrained(REPO)
    conv = conversations(1, seed=4)[0]
    assert offline.encode_chat(conv)["labels"].tolist() == from_dir.encode_chat(conv)["labels"].tolist()


def test_tokenize_dataset_takes_a_repo_id(phi3_repo, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(20, seed=5)))
    stats = ferrotune.tokenize_dataset(REPO, data, tmp_path / "out.parquet", progress=False)
    assert stats.rows_out == 20 and stats.max_seq_length == 4096


def test_unknown_repo_is_a_typed_error(hub, hf_env):
    with pytest.raises(ferrotune.RepositoryNotFoundError):
        ferrotune.ChatTokenizer.from_pretrained("tiny-org/no-such-model")


def test_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        ferrotune.ChatTokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ferrotune.ChatTokenizer.from_pretrained(tmp_path / "empty")


def test_folder_without_template_loads_but_cannot_render(tmp_path):
    d = tokenizer_dirs.phi3(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = ferrotune.ChatTokenizer.from_pretrained(d)
    assert tok.chat_template is None
    assert tok.encode("Hello").tolist() == [15043]  # "▁Hello": Metaspace prepends at the start
    with pytest.raises(ferrotune.ChatTemplateError, match="no chat_template"):
        tok.render([{"role": "user", "content": "hi"}])


def test_chat_template_jinja_file_is_used(tmp_path):
    d = tokenizer_dirs.phi3(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    template = cfg.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text(template)
    tok = ferrotune.ChatTokenizer.from_pretrained(d)
    assert tok.render([{"role": "user", "content": "hi"}]) == "<|user|>\nhi<|end|>\n<|endoftext|>"


def test_corrupt_tokenizer_json_is_a_data_format_error(tmp_path):
    d = tokenizer_dirs.phi3(tmp_path)
    shutil.copyfile(d / "tokenizer_config.json", d / "tokenizer.json")
    with pytest.raises(ferrotune.DataFormatError, match="tokenizer.json"):
        ferrotune.ChatTokenizer.from_pretrained(d)
