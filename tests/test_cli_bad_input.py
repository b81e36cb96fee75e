"""Bad input to the ``ferrotune`` commands: every case ends with exit status 2 and exactly one
line on stderr, ``error: ...``, before any work starts — no traceback, nothing written.

Also here: the generation parameters of the Python API (typed errors naming the parameter and
its range), "did you mean" for a mistyped flag of every subcommand, help text for every
option, the warning for splits that round to 0 rows, singular/plural counts, no ``done``
line for a failed task, and the folders a failed command must not leave behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

import ferrotune
from ferrotune import Generator, InvalidArgumentError, cli
from ferrotune._text import plural, singular_unit

TOKENIZER = str(resources.files("ferrotune") / "_sample" / "phi3-tokenizer")
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "original_max_position_embeddings": 512,
}
CHAT = [{"role": "user", "content": "What is LoRA?"}]


def _conv(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """Inputs of every kind: a good and an empty JSONL file, a folder, an empty "model"
    folder (the commands must fail before they would load it), a plain file."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "good.jsonl").write_text("".join(json.dumps(_conv(i)) + "\n" for i in range(4)), encoding="utf-8")
    (root / "empty.jsonl").write_text("\n", encoding="utf-8")
    (root / "folder").mkdir()
    (root / "model").mkdir()
    (root / "file.txt").write_text("not a folder\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    """The demo's bundled sample dataset, laid out as a Hugging Face cache."""
    from ferrotune.demo import seed_cache

    cache = tmp_path_factory.mktemp("hf-cache")

    seed_cache(cache)
    return cache


@pytest.fixture
def offline(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    return {"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Phi-3 with the bundled Phi-3 tokenizer."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    return Path(ferrotune.create_random_model(str(out), TINY, seed=0, tokenizer=TOKENIZER))


def run_cli(argv, capsys) -> tuple:
    """``(status, stdout, stderr)`` of ``ferrotune ARGV`` in this process."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_usage_error(status, out, err, expect) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (status, out, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err and out == "", (out, err)
    assert expect.lower() in lines[0].lower(), (expect, lines[0])


# (id, arguments with {d} for the inputs folder, a piece of the message)
CASES = [
    # the command itself
    ("no-command", [], "required: COMMAND"),
    ("unknown-command", ["finetun"], "did you mean 'finetune'"),
    ("unknown-top-flag", ["--helpp"], "did you mean --help"),
    # download-dataset
    ("dd-pc-zero", ["download-dataset", "--dataset", "ferrotune/ultrachat_sample", "--download_dir", "{d}/dd", "--dataset_split_pc", "0"], "--dataset_split_pc"),
    ("dd-pc-negative", ["download-dataset", "--download_dir", "{d}/dd", "--dataset_split_pc=-5"], "greater than 0"),
    ("dd-pc-over-100", ["download-dataset", "--download_dir", "{d}/dd", "--dataset_split_pc", "101"], "at most 100"),
    ("dd-pc-text", ["download-dataset", "--download_dir", "{d}/dd", "--dataset_split_pc", "five"], "expected a percentage"),
    ("dd-pc-missing-value", ["download-dataset", "--download_dir", "{d}/dd", "--dataset_split_pc"], "expected one argument"),
    ("dd-dir-is-file", ["download-dataset", "--dataset", "ferrotune/ultrachat_sample", "--download_dir", "{d}/file.txt"], "is a file"),
    ("dd-dir-under-file", ["download-dataset", "--dataset", "ferrotune/ultrachat_sample", "--download_dir", "{d}/file.txt/x"], "is a file, not a folder"),
    ("dd-empty-dataset", ["download-dataset", "--dataset", " ", "--download_dir", "{d}/dd"], "--dataset is empty"),
    ("dd-split-twice", ["download-dataset", "--dataset", "ferrotune/ultrachat_sample", "--download_dir", "{d}/dd", "--splits", "test_sft", "test_sft"], "twice"),
    ("dd-unknown-split", ["download-dataset", "--dataset", "ferrotune/ultrachat_sample", "--download_dir", "{d}/dd", "--splits", "nope"], "split 'nope' not found"),
    ("dd-not-cached", ["download-dataset", "--dataset", "nobody/nothing", "--download_dir", "{d}/dd", "--quiet"], "HF_HUB_OFFLINE"),
    ("dd-format", ["download-dataset", "--download_dir", "{d}/dd", "--format", "csv"], "invalid choice"),
    ("dd-typo", ["download-dataset", "--dowload_dir", "{d}/dd"], "did you mean --download_dir"),
    # tokenize
    ("tok-seq-zero", ["tokenize", "--tokenizer", TOKENIZER, "--train-file", "{d}/good.jsonl", "--output", "{d}/o.parquet", "--max-seq-length", "0"], "at least 1"),
    ("tok-seq-negative", ["tokenize", "--tokenizer", TOKENIZER, "--train-file", "{d}/good.jsonl", "--output", "{d}/o.parquet", "--max-seq-length", "-1"], "at least 1"),
    ("tok-seq-text", ["tokenize", "--tokenizer", TOKENIZER, "--train-file", "{d}/good.jsonl", "--output", "{d}/o.parquet", "--max-seq-length", "long"], "expected an integer"),
    ("tok-threads-zero", ["tokenize", "--tokenizer", TOKENIZER, "--train-file", "{d}/good.jsonl", "--output", "{d}/o.parquet", "--num-threads", "0"], "--num-threads"),
    ("tok-threads-negative", ["tokenize", "--tokenizer", TOKENIZER, "--train-file", "{d}/good.jsonl", "--output", "{d}/o.parquet", "--num-threads", "-2"], "at least 1"),
    ("tok-input-missing", ["tokenize", "--tokenizer", TOKENIZER, "--train-file", "{d}/nope.jsonl", "--output", "{d}/o.parquet"], "no such file"),
    ("tok-input-folder", ["tokenize", "--tokenizer", TOKENIZER, "--train-file", "{d}/folder", "--output", "{d}/o.parquet"], "is a folder"),
    ("tok-output-folder", ["tokenize", "--tokenizer", TOKENIZER, "--train-file", "{d}/good.jsonl", "--output", "{d}/folder"], "is a folder"),
    ("tok-output-is-input", ["tokenize", "--tokenizer", TOKENIZER, "--train-file", "{d}/good.jsonl", "--output", "{d}/good.jsonl"], "is also an input"),
    ("tok-output-suffix", ["tokenize", "--tokenizer", TOKENIZER, "--train-file", "{d}/good.jsonl", "--output", "{d}/o.txt"], ".parquet or .arrow"),
    ("tok-output-under-file", ["tokenize", "--tokenizer", TOKENIZER, "--train-file", "{d}/good.jsonl", "--output", "{d}/file.txt/o.parquet"], "is a file, not a folder"),
    ("tok-tokenizer-missing", ["tokenize", "--tokenizer", "{d}/nope", "--train-file", "{d}/good.jsonl", "--output", "{d}/o.parquet"], "no such folder"),
    ("tok-tokenizer-file", ["tokenize", "--tokenizer", "{d}/file.txt", "--train-file", "{d}/good.jsonl", "--output", "{d}/o.parquet"], "is a file"),
    ("tok-mode", ["tokenize", "--tokenizer", TOKENIZER, "--train-file", "{d}/good.jsonl", "--output", "{d}/o.parquet", "--mode", "pak"], "invalid choice"),
    ("tok-output-required", ["tokenize", "--tokenizer", TOKENIZER, "--train-file", "{d}/good.jsonl"], "required: --output"),
    ("tok-typo", ["tokenize", "--tokenzier", TOKENIZER], "did you mean --tokenizer"),
    # finetune
    ("ft-typo", ["finetune", "--model", "{d}/model", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/out", "--learnig_rate", "3"], "did you mean --learning_rate"),
    ("ft-typo-before-required", ["finetune", "--learnig_rate", "3"], "did you mean --learning_rate"),
    ("ft-max-steps-zero", ["finetune", "--model", "{d}/model", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/out", "--max_steps", "0"], "max_steps"),
    ("ft-max-steps-negative", ["finetune", "--model", "{d}/model", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/out", "--max-steps", "-5"], "max_steps"),
    ("ft-epochs-zero", ["finetune", "--model", "{d}/model", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/out", "--num_train_epochs", "0"], "num_train_epochs"),
    ("ft-batch-zero", ["finetune", "--model", "{d}/model", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/out", "--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
    ("ft-lr-text", ["finetune", "--model", "{d}/model", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/out", "--learning-rate", "fast"], "learning_rate='fast'"),
    ("ft-param-form", ["finetune", "--model", "{d}/model", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/out", "--param", "lora_r"], "NAME=VALUE"),
    ("ft-param-typo", ["finetune", "--model", "{d}/model", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/out", "--param", "learning_rat=1"], "did you mean 'learning_rate'"),
    ("ft-params-json", ["finetune", "--model", "{d}/model", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/out", "--params-json", "{not json"], "not valid JSON"),
    ("ft-train-missing", ["finetune", "--model", "{d}/model", "--train-file", "{d}/nope.jsonl", "--output-dir", "{d}/out"], "--train-file"),
    ("ft-train-folder", ["finetune", "--model", "{d}/model", "--train-file", "{d}/folder", "--output-dir", "{d}/out"], "is a folder"),
    ("ft-validation-missing", ["finetune", "--model", "{d}/model", "--train-file", "{d}/good.jsonl", "--validation-file", "{d}/nope.jsonl", "--output-dir", "{d}/out"], "--validation-file"),
    ("ft-output-is-file", ["finetune", "--model", "{d}/model", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/file.txt"], "is a file"),
    ("ft-model-missing", ["finetune", "--model", "{d}/nope", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/out"], "no such folder"),
    ("ft-model-file", ["finetune", "--model", "{d}/file.txt", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/out"], "is a file"),
    ("ft-resume-missing", ["finetune", "--model", "{d}/model", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/out", "--resume", "{d}/no-checkpoint"], "--resume"),
    ("ft-full-finetuning", ["finetune", "--model", "{d}/model", "--train-file", "{d}/good.jsonl", "--output-dir", "{d}/out", "--apply_lora", "false"], "LoRA adapters only"),
    ("ft-required", ["finetune", "--model", "{d}/model"], "required"),
    # generate
    ("gen-max-new-negative", ["generate", "--model", "{d}/model", "--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens must be an integer >= 1"),
    ("gen-max-new-zero", ["generate", "--model", "{d}/model", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("gen-top-k-negative", ["generate", "--model", "{d}/model", "--prompt", "hi", "--top-k", "-1"], "--top-k must be an integer >= 0"),
    ("gen-seed-negative", ["generate", "--model", "{d}/model", "--prompt", "hi", "--seed", "-1"], "--seed must be an integer in [0, 2**64)"),
    ("gen-seed-too-big", ["generate", "--model", "{d}/model", "--prompt", "hi", "--seed", str(2**64)], "--seed"),
    ("gen-temperature-negative", ["generate", "--model", "{d}/model", "--prompt", "hi", "--temperature", "-1"], "--temperature must be a number > 0"),
    ("gen-temperature-nan", ["generate", "--model", "{d}/model", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    ("gen-temperature-zero-sampling", ["generate", "--model", "{d}/model", "--prompt", "hi", "--do-sample", "--temperature", "0"], "when sampling"),
    ("gen-top-p-over-1", ["generate", "--model", "{d}/model", "--prompt", "hi", "--top-p", "2"], "--top-p must be a number in (0, 1]"),
    ("gen-top-p-zero", ["generate", "--model", "{d}/model", "--prompt", "hi", "--top-p", "0", "--do-sample"], "--top-p"),
    ("gen-repetition-zero", ["generate", "--model", "{d}/model", "--prompt", "hi", "--repetition-penalty", "0"], "--repetition-penalty must be a number > 0"),
    ("gen-int-text", ["generate", "--model", "{d}/model", "--prompt", "hi", "--top-k", "many"], "invalid int value"),
    ("gen-batch-zero", ["generate", "--model", "{d}/model", "--input", "{d}/good.jsonl", "--batch-size", "0"], "at least 1"),
    ("gen-batch-with-prompt", ["generate", "--model", "{d}/model", "--prompt", "hi", "--batch-size", "2"], "--batch-size goes with --input"),
    ("gen-output-with-prompt", ["generate", "--model", "{d}/model", "--prompt", "hi", "--output", "{d}/replies.jsonl"], "--output goes with --input"),
    ("gen-system-with-input", ["generate", "--model", "{d}/model", "--input", "{d}/good.jsonl", "--system", "be brief"], "--system goes with --prompt"),
    ("gen-prompt-and-input", ["generate", "--model", "{d}/model", "--prompt", "hi", "--input", "{d}/good.jsonl"], "not allowed with"),
    ("gen-no-prompt", ["generate", "--model", "{d}/model"], "required"),
    ("gen-empty-prompt", ["generate", "--model", "{d}/model", "--prompt", "  "], "--prompt is empty"),
    ("gen-input-missing", ["generate", "--model", "{d}/model", "--input", "{d}/nope.jsonl"], "no such file"),
    ("gen-input-folder", ["generate", "--model", "{d}/model", "--input", "{d}/folder"], "is a folder"),
    ("gen-input-empty", ["generate", "--model", "{d}/model", "--input", "{d}/empty.jsonl"], "no conversations"),
    ("gen-output-folder", ["generate", "--model", "{d}/model", "--input", "{d}/good.jsonl", "--output", "{d}/folder"], "is a folder"),
    ("gen-output-is-input", ["generate", "--model", "{d}/model", "--input", "{d}/good.jsonl", "--output", "{d}/good.jsonl"], "is also an input"),
    ("gen-model-missing", ["generate", "--model", "{d}/nope", "--prompt", "hi"], "--model"),
    ("gen-adapter-missing", ["generate", "--model", "{d}/model", "--adapter", "{d}/no-adapter", "--prompt", "hi"], "--adapter"),
    ("gen-typo", ["generate", "--model", "{d}/model", "--prompt", "hi", "--temprature", "0.5"], "did you mean --temperature"),
    # package
    ("pkg-source-missing", ["package", "{d}/nope", "{d}/pkg"], "no such folder"),
    ("pkg-source-file", ["package", "{d}/file.txt", "{d}/pkg"], "is a file"),
    ("pkg-out-file", ["package", "{d}/model", "{d}/file.txt"], "is a file"),
    ("pkg-source-not-a-model", ["package", "{d}/model", "{d}/pkg", "--progress", "none"], "is not a fine-tuning output folder"),
    ("pkg-missing-out", ["package", "{d}/model"], "required: OUT_DIR"),
    ("pkg-typo", ["package", "{d}/model", "{d}/pkg", "--overwrit"], "did you mean --overwrite"),
    # demo
    ("demo-max-steps-zero", ["demo", "--workdir", "{d}/demo", "--max-steps", "0"], "--max-steps"),
    ("demo-max-steps-negative", ["demo", "--workdir", "{d}/demo", "--max-steps", "-1"], "at least 1"),
    ("demo-max-seq-zero", ["demo", "--workdir", "{d}/demo", "--max-seq-length", "0"], "at least 1"),
    ("demo-split-pc", ["demo", "--workdir", "{d}/demo", "--split-pc", "200"], "at most 100"),
    ("demo-device", ["demo", "--workdir", "{d}/demo", "--device", "gpu9"], "device='gpu9'"),
    ("demo-workdir-file", ["demo", "--workdir", "{d}/file.txt"], "is a file"),
    ("demo-model-missing", ["demo", "--workdir", "{d}/demo", "--model", "{d}/nope"], "no such folder"),
    ("demo-empty-dataset", ["demo", "--workdir", "{d}/demo", "--dataset", ""], "--dataset is empty"),
    ("demo-typo", ["demo", "--workdir", "{d}/demo", "--mxa-steps", "3"], "did you mean --max-steps"),
]


@pytest.mark.parametrize("argv, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_with_status_2_and_leaves_nothing(d, offline, capsys, argv, expect):
    before = tree(d)
    status, out, err = run_cli([a.replace("{d}", str(d)) for a in argv], capsys)
    assert_usage_error(status, out, err, expect)
    assert tree(d) == before, "the command left something behind"


# one case of every command again, in a real process: the same single line, status 2
SUBPROCESS = ["unknown-command", "dd-pc-zero", "tok-threads-negative", "ft-typo", "gen-max-new-negative",
              "gen-seed-too-big", "pkg-out-file", "demo-max-steps-zero"]


@pytest.mark.parametrize("case", SUBPROCESS)
def test_bad_input_in_a_real_process(d, offline, case):
    argv, expect = next(c[1:] for c in CASES if c[0] == case)
    before = tree(d)
    r = subprocess.run([sys.executable, "-m", "ferrotune.cli", *[a.replace("{d}", str(d)) for a in argv]],
                       capture_output=True, text=True, timeout=120, env={**os.environ, **offline})
    assert_usage_error(r.returncode, r.stdout, r.stderr, expect)
    assert tree(d) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_input_file(d, capsys, tmp_path):
    locked = tmp_path / "locked.jsonl"
    locked.write_text((d / "good.jsonl").read_text())
    locked.chmod(0)
    status, out, err = run_cli(["tokenize", "--tokenizer", TOKENIZER, "--train-file", locked, "--output", tmp_path / "o.parquet"], capsys)
    assert_usage_error(status, out, err, "not readable")


# ---------------------------------------------------------------------------------------
# Generation parameters in the Python API
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(max_new_tokens=-3), "max_new_tokens must be an integer >= 1, got -3"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=2.0), "max_new_tokens must be an integer"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
        (dict(top_k=-1), r"top_k must be an integer >= 0"),
        (dict(top_k=1.5), r"top_k must be an integer >= 0"),
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*64\)"),
        (dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*64\)"),
        (dict(seed="7"), r"seed must be an integer"),
        (dict(temperature=-1), r"temperature must be a number > 0"),
        (dict(temperature=float("inf")), r"temperature must be a number > 0"),
        (dict(do_sample=True, temperature=0.0), r"temperature must be a number > 0 when sampling"),
        (dict(top_p=2), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=float("nan")), r"top_p"),
        (dict(repetition_penalty=0), r"repetition_penalty must be a number > 0"),
        (dict(repetition_penalty=-2.0), r"repetition_penalty"),
        (dict(do_sample="yes"), r"do_sample must be True or False"),
    ],
)
def test_generate_rejects_out_of_range_parameters(model_dir, kw, message):
    gen = Generator.load(model_dir, device="cpu", progress=False)
    with pytest.raises(InvalidArgumentError, match=message):
        gen.generate(CHAT, **kw)
    with pytest.raises(InvalidArgumentError, match=message):  # the token-id loop too
        gen.generate_ids([[1, 2, 3]], **{"max_new_tokens": 2, **kw})


def test_generate_accepts_the_edges_of_every_range(model_dir):
    gen = Generator.load(model_dir, device="cpu", progress=False)
    edges = [
        dict(max_new_tokens=1),
        dict(top_k=0, top_p=1.0, do_sample=True, temperature=1e-3, seed=0),
        dict(seed=2**64 - 1, do_sample=True),
        dict(temperature=0.0),  # greedy: 0 is the usual way to say so
        dict(max_new_tokens=np.int64(2), top_k=np.int32(5), seed=np.uint64(3), do_sample=np.bool_(True),
             temperature=np.float32(0.7), top_p=np.float64(0.9), repetition_penalty=np.float32(1.2)),
    ]
    for kw in edges:
        out = gen.generate(CHAT, **{"max_new_tokens": 2, **kw})
        assert len(out) == 1 and 1 <= len(out[0].token_ids) <= kw.get("max_new_tokens", 2), kw
    with pytest.raises(InvalidArgumentError, match="unknown parameters: max_new_token"):
        gen.generate_ids([[1, 2]], max_new_token=2)


def test_check_parameters_names_flags_for_the_command_line():
    from ferrotune._generate import check_parameters

    with pytest.raises(InvalidArgumentError, match="^--top-p must be"):
        check_parameters(top_p=1.5, name=lambda p: "--" + p.replace("_", "-"))
    assert check_parameters(max_new_tokens=np.int64(3), seed=np.uint64(5)) == dict(
        max_new_tokens=3, do_sample=False, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0, seed=5
    )


def test_tokenize_dataset_rejects_negative_counts(d, tmp_path):
    for kw, name in ((dict(max_seq_length=-1), "max_seq_length"), (dict(num_threads=-1), "num_threads"),
                     (dict(pack_window=0), "pack_window")):
        with pytest.raises(InvalidArgumentError, match=name):
            ferrotune.tokenize_dataset(TOKENIZER, d / "good.jsonl", tmp_path / "o.parquet", progress=False, **kw)
    assert not (tmp_path / "o.parquet").exists()


# ---------------------------------------------------------------------------------------
# Did you mean, help text
# ---------------------------------------------------------------------------------------


def _typo(flag: str) -> str:
    """A flag with two letters in the middle swapped (a classic typo)."""
    body = flag[2:]
    i = max(1, len(body) // 2)
    return "--" + body[: i - 1] + body[i] + body[i - 1] + body[i + 1 :]


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_subcommand_suggests_the_closest_flag(command, capsys):
    sub = cli.subparsers(cli.build_parser())[command]
    flags = [f for f in _option_flags(sub) if len(f) > 6]
    assert flags
    for flag in flags:
        typo = _typo(flag)
        if typo in flags:
            continue
        status, out, err = run_cli([command, typo, "1"], capsys)
        assert status == 2 and out == "", err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: ferrotune {command}: unrecognized option {typo}"), err
        suggested = lines[0].split("did you mean ")[1].split("?")[0]
        assert suggested in flags, (typo, lines[0])
        # the suggestion is the flag itself or its other spelling (--max-steps / --max_steps)
        assert suggested.replace("_", "-") == flag.replace("_", "-"), (typo, suggested, flag)


def test_the_standalone_modules_suggest_too(capsys):
    import importlib

    # import_module: the package attribute `ferrotune.download_dataset` is the function
    dd = importlib.import_module("ferrotune.download_dataset")
    with pytest.raises(SystemExit) as e:
        dd.main(["--dataset_splt_pc", "5"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: python -m ferrotune.download_dataset: unrecognized option --dataset_splt_pc; "
                          "did you mean --dataset_split_pc?")


def _option_flags(parser: argparse.ArgumentParser) -> list:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_option_has_help_text(command, capsys):
    sub = cli.subparsers(cli.build_parser())[command]
    assert sub.description and len(sub.description) > 40, f"{command} has no description"
    missing = [a.option_strings or a.dest for a in sub._actions if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, f"options of {command} without help=: {missing}"
    status, out, err = run_cli([command, "--help"], capsys)
    assert status == 0 and err == ""
    text = " ".join(out.split())
    assert " ".join(sub.description.split())[:60] in text
    for a in sub._actions:
        words = " ".join((a.help % {"default": a.default, "prog": sub.prog}).split()[:4])
        assert words in text, (command, a.option_strings, words)


def test_the_top_level_help_lists_every_command(capsys):
    status, out, _ = run_cli(["--help"], capsys)
    assert status == 0
    for command in cli.COMMANDS:
        assert f"    {command} " in out or f"    {command}\n" in out, command


# ---------------------------------------------------------------------------------------
# Messages: empty splits, plurals, no "done" for a failed task
# ---------------------------------------------------------------------------------------


def test_a_split_that_rounds_to_zero_rows_is_warned_about(offline, tmp_path, capsys):
    # the sample's splits hold 200, 50, 200 and 50 rows: 1 % keeps 2, 0 (0.5 rounds to even), 2, 0
    status, out, err = run_cli(["download-dataset", "--dataset", "ferrotune/ultrachat_sample", "--download_dir",
                                tmp_path / "one", "--dataset_split_pc", "1", "--quiet"], capsys)
    assert status == 0, err
    assert err.strip().splitlines() == [
        "warning: --dataset_split_pc 1 keeps 0 rows of test_sft (50 rows), test_gen (50 rows); their files are "
        "empty (a larger --dataset_split_pc keeps some)"
    ]
    assert "test_sft: 0 of 50 rows" in out and "train_sft: 2 of 200 rows" in out
    assert (tmp_path / "one" / "test_sft.jsonl").read_bytes() == b""

    status, out, err = run_cli(["download-dataset", "--dataset", "ferrotune/ultrachat_sample", "--download_dir",
                                tmp_path / "tiny", "--dataset_split_pc", "0.0001", "--quiet", "--splits", "train_sft"], capsys)
    assert status == 0
    assert err.strip() == ("warning: --dataset_split_pc 0.0001 keeps 0 rows of train_sft (200 rows); its file is empty "
                           "(a larger --dataset_split_pc keeps some)")

    status, out, err = run_cli(["download-dataset", "--dataset", "ferrotune/ultrachat_sample", "--download_dir",
                                tmp_path / "some", "--dataset_split_pc", "10", "--quiet"], capsys)
    assert status == 0 and err == ""


def test_counts_are_singular_when_one(d, model_dir, tmp_path, capsys, monkeypatch):
    assert [plural(n, "row") for n in (0, 1, 2)] == ["0 rows", "1 row", "2 rows"]
    assert plural(1, "conversation") == "1 conversation" and plural(3, "query", "queries") == "3 queries"
    assert [singular_unit(n, "files") for n in (1, 2)] == ["1 file", "2 files"] and singular_unit(1, "B") == "1 B"

    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(_conv(0)) + "\n", encoding="utf-8")
    stats = ferrotune.tokenize_dataset(model_dir, one, tmp_path / "one.parquet", progress=False)
    assert stats.summary().startswith("1 row read, 1 conversation kept (dropped: none; 0 truncated to 512); ")
    assert "; 1 row written, " in stats.summary()

    # the command's log lines (stderr is not a terminal here): "1 row", "1 file"
    status, out, err = run_cli(["tokenize", "--tokenizer", model_dir, "--train-file", one, "--output", tmp_path / "cli.parquet"], capsys)
    assert status == 0, err
    assert "[ferrotune] tokenize: done (1 row)" in err and "1 row read" in out
    status, out, err = run_cli(["finetune", "--model", model_dir, "--train-file", d / "good.jsonl", "--output-dir",
                                tmp_path / "ft", "--max_steps", "1", "--progress", "lines", "--report-to", "none"], capsys)
    assert status == 0, err
    assert "(1 file to do)" in err and "done (1 file)" in err and "files" not in err, err
    assert out.startswith("Trained 1 optimizer step (")


def test_a_failed_task_prints_no_done_line(d, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_conv(0)) + "\n{broken\n", encoding="utf-8")
    status, out, err = run_cli(["tokenize", "--tokenizer", TOKENIZER, "--train-file", bad, "--output", tmp_path / "o.parquet"], capsys)
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "line 2" in lines[-1]
    assert not any("done" in line for line in lines), err
    assert "[ferrotune] tokenize: started" in lines[0]  # the progress lines are on
    assert not (tmp_path / "o.parquet").exists()


# ---------------------------------------------------------------------------------------
# Outputs a failed command must not leave behind
# ---------------------------------------------------------------------------------------


def _no_assistant(path: Path) -> Path:
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hello?"}]}) + "\n", encoding="utf-8")
    return path


def test_a_failed_finetune_removes_the_output_folder_it_created(model_dir, tmp_path, capsys):
    train = _no_assistant(tmp_path / "no_assistant.jsonl")
    out = tmp_path / "runs" / "a" / "outputs"
    status, _, err = run_cli(["finetune", "--model", model_dir, "--train-file", train, "--output-dir", out,
                              "--progress", "none", "--report-to", "none"], capsys)
    assert status == 2 and err.strip().splitlines()[-1].startswith("error: ") and "no trainable tokens" in err
    assert not (tmp_path / "runs").exists(), "the folders this call created are still there"


def test_a_failed_finetune_never_removes_a_folder_that_existed(model_dir, tmp_path, capsys):
    train = _no_assistant(tmp_path / "no_assistant.jsonl")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    status, _, err = run_cli(["finetune", "--model", model_dir, "--train-file", train, "--output-dir", out,
                              "--progress", "none", "--report-to", "none"], capsys)
    assert status == 2
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_failed_generate_leaves_no_output_file(model_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(CHAT) + "\n" + json.dumps([{"role": "robot", "content": "beep"}]) + "\n", encoding="utf-8")
    out = tmp_path / "new" / "replies.jsonl"
    status, stdout, err = run_cli(["generate", "--model", model_dir, "--input", src, "--output", out, "--batch-size", "1",
                                   "--max-new-tokens", "2", "--device", "cpu", "--quiet"], capsys)
    assert status == 2 and "robot" in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists()
    # and when it works, the file is there, complete, with ordinary permissions
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(CHAT) + "\n" + json.dumps({"messages": CHAT}) + "\n", encoding="utf-8")
    status, stdout, err = run_cli(["generate", "--model", model_dir, "--input", good, "--output", out, "--batch-size", "1",
                                   "--max-new-tokens", "2", "--device", "cpu", "--quiet"], capsys)
    assert status == 0, err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and all(r["completion_tokens"] <= 2 for r in rows)
    assert sorted(p.name for p in out.parent.iterdir()) == ["replies.jsonl"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_tokenize_removes_the_folder_it_created(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n", encoding="utf-8")
    status, _, err = run_cli(["tokenize", "--tokenizer", TOKENIZER, "--train-file", bad, "--output",
                              tmp_path / "new" / "deeper" / "o.parquet", "--no-progress"], capsys)
    assert status == 2 and "line 1" in err
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------
# The set-up script and the README's two commands
# ---------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup.sh"


def _setup(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash"), str(SETUP), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, cwd=ROOT)


def test_setup_installs_the_test_extra_only_when_asked():
    demo = _setup("--dry-run")
    assert demo.returncode == 0, demo.stderr
    build = [line for line in demo.stdout.splitlines() if "maturin develop" in line]
    assert len(build) == 1 and build[0].endswith("maturin develop --release -q"), demo.stdout
    assert "--extras" not in demo.stdout and "next: .venv/bin/ferrotune demo" in demo.stdout

    test = _setup("--test", "--dry-run")
    assert test.returncode == 0, test.stderr
    build = [line for line in test.stdout.splitlines() if "maturin develop" in line]
    # the test build carries the emulated GPU, so the tests run the GPU code path too
    assert len(build) == 1 and build[0].endswith("maturin develop --release -q --extras test --features extension-module,gpu-emu,cuda"), test.stdout
    assert "next: .venv/bin/python -m pytest" in test.stdout


def test_setup_explains_its_options_and_refuses_others():
    h = _setup("--help")
    assert h.returncode == 0 and "--test" in h.stdout and "--dry-run" in h.stdout and "PYTHON=" in h.stdout
    bad = _setup("--tests")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown option '--tests' (use --test, --dry-run or --help)"


def test_setup_checks_its_prerequisites_before_it_creates_anything(tmp_path):
    had_venv = (ROOT / ".venv").exists()
    r = _setup("--dry-run", PYTHON=str(tmp_path / "no-python"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Python >= 3.10" in r.stderr and r.stdout == ""
    old = tmp_path / "python2"
    old.write_text("#!/bin/sh\nif [ \"$1\" = -c ]; then case \"$2\" in *version_info*\\<*) exit 1;; esac; "
                   "echo /usr/bin/python2 2.7.18; fi\n")
    old.chmod(0o755)
    r = _setup("--dry-run", PYTHON=str(old))
    assert r.returncode == 2 and "is too old; ferrotune needs Python >= 3.10" in r.stderr, r.stderr
    # no cargo on the PATH: only the tools the script itself uses (python3 comes from PYTHON=)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "sed"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    r = _setup("--dry-run", PYTHON=sys.executable, PATH=str(bin_dir))
    assert r.returncode == 2 and "cargo not found" in r.stderr, r.stderr
    assert (ROOT / ".venv").exists() == had_venv


def test_the_readme_has_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n", 1)[1].strip() for b in section.split("```bash")[1:]]
    blocks = [b.split("```")[0].strip() for b in blocks]
    assert blocks == ["bash scripts/setup.sh && .venv/bin/ferrotune demo",
                      "bash scripts/setup.sh --test && .venv/bin/python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash scripts/setup.sh --test\n.venv/bin/python -m pytest" in ci
