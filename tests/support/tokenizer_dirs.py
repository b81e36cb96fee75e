"""Tokenizer folders for the chat tests, built from the Phi-3 fixture (tests/fixtures/phi3-tokenizer).

Every function takes a parent directory, writes one folder under it and returns its path. Each
folder (except :func:`broken_template`) loads with ``transformers==5.24.0``'s
``AutoTokenizer.from_pretrained`` and its ``apply_chat_template`` works; that is what the
ferrotune tests compare with. What transformers 5.24 builds from each (checked when writing
these helpers):

- :func:`phi3`: the fixture as is. ``tokenizer_class`` LlamaTokenizer with ``legacy: false`` ->
  transformers rebuilds the pipeline with a Metaspace pre-tokenizer ``prepend_scheme="first"`` and
  no normalizer: ``"<|user|>\\nHello"`` -> ``[32010, 10994]``. It keeps tokenizer.json's
  post-processor, so ``encode(text)`` (add_special_tokens=True) prepends ``<s>`` (1) even though
  tokenizer_config says ``add_bos_token: false``.
- :func:`phi3_with_model_config`: + config.json with ``model_type: phi3`` -> transformers loads
  tokenizer.json as is (TokenizersBackend; normalizer Prepend("▁") + Replace(" ", "▁")):
  ``"<|user|>\\nHello"`` -> ``[32010, 15043]``.
- :func:`phi3_legacy`: ``legacy: true`` -> Metaspace ``prepend_scheme="always"``.
- :func:`chatml`: + ``<|im_start|>`` (32011) / ``<|im_end|>`` (32012), ChatML template with a
  default system prompt, ``eos_token`` ``<|im_end|>``.
- :func:`strict_template`: a Llama-2 style ``[INST]`` template (raise_exception, loop.index0 /
  loop.first / loop.last, namespace(), .strip() / .startswith(), whitespace control, trim_blocks
  and lstrip_blocks sensitive layout), ``eos_token`` ``</s>``.
- :func:`broken_template`: a chat_template with a Jinja syntax error (transformers only fails when
  the template is used; ferrotune must fail in from_pretrained).
- :func:`mlflow_model`: an Azure ML MLflow model folder (``MLmodel``, ``data/tokenizer/``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = [
    "FIXTURE",
    "phi3",
    "phi3_with_model_config",
    "phi3_legacy",
    "chatml",
    "strict_template",
    "broken_template",
    "mlflow_model",
    "CHATML_DEFAULT_SYSTEM",
    "STRICT_ALTERNATION_ERROR",
    "ALL_LOADABLE",
]

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "phi3-tokenizer"

#: The system prompt the ChatML template injects when the first message is not a system message.
CHATML_DEFAULT_SYSTEM = "You are a helpful assistant."

#: The text strict_template's raise_exception() call carries.
STRICT_ALTERNATION_ERROR = "Conversation roles must alternate user/assistant/user/assistant/..."


def _read_json(p: Path) -> dict:
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def _write_json(p: Path, obj: dict) -> None:
    with open(p, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def _copy_fixture(dest: Path) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(FIXTURE / name, dest / name)
    return dest


def _edit_config(folder: Path, **changes) -> None:
    cfg = _read_json(folder / "tokenizer_config.json")
    cfg.update(changes)
    _write_json(folder / "tokenizer_config.json", cfg)


def phi3(tmp: Path) -> Path:
    """A plain copy of the Phi-3 fixture."""
    return _copy_fixture(Path(tmp) / "phi3")


#: A minimal Phi-3 model config.json (the fields that matter: model_type, max_position_embeddings,
#: the special token ids the real microsoft/Phi-3-mini-4k-instruct config carries).
PHI3_MODEL_CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "vocab_size": 32064,
    "hidden_size": 3072,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "torch_dtype": "bfloat16",
}


def phi3_with_model_config(tmp: Path) -> Path:
    """The fixture plus a config.json with model_type "phi3" (transformers 5.24 then loads
    tokenizer.json as is instead of rebuilding a LlamaTokenizer)."""
    d = _copy_fixture(Path(tmp) / "phi3-with-config")
    _write_json(d / "config.json", PHI3_MODEL_CONFIG)
    return d


def phi3_legacy(tmp: Path) -> Path:
    """The fixture with ``legacy: true`` (Metaspace prepend_scheme "always" under transformers 5.24)."""
    d = _copy_fixture(Path(tmp) / "phi3-legacy")
    _edit_config(d, legacy=True)
    return d


# Qwen2-style ChatML with a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + CHATML_DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml(tmp: Path) -> Path:
    """Same vocabulary plus ``<|im_start|>`` / ``<|im_end|>`` as added special tokens (ids 32011,
    32012), a ChatML template that injects ``CHATML_DEFAULT_SYSTEM`` when the first message is
    not a system message, and ``eos_token`` ``<|im_end|>``."""
    d = _copy_fixture(Path(tmp) / "chatml")
    tj = _read_json(d / "tokenizer.json")
    next_id = max(t["id"] for t in tj["added_tokens"]) + 1
    assert next_id == 32011, next_id
    new = {}
    for i, content in enumerate(("<|im_start|>", "<|im_end|>")):
        tok = {
            "id": next_id + i,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        tj["added_tokens"].append(tok)
        new[str(next_id + i)] = {k: v for k, v in tok.items() if k != "id"}
    _write_json(d / "tokenizer.json", tj)
    cfg = _read_json(d / "tokenizer_config.json")
    cfg["added_tokens_decoder"].update(new)
    cfg["chat_template"] = CHATML_TEMPLATE
    cfg["eos_token"] = "<|im_end|>"
    cfg["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>"]
    _write_json(d / "tokenizer_config.json", cfg)
    stm = _read_json(d / "special_tokens_map.json")
    stm["eos_token"] = {
        "content": "<|im_end|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }
    stm["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>"]
    _write_json(d / "special_tokens_map.json", stm)
    return d


# Llama-2-chat style, written the way multi-line Hub templates are (indentation, newlines between
# tags, {%- -%}), so it only renders like transformers with trim_blocks + lstrip_blocks. Uses
# raise_exception, loop.index0 / loop.first / loop.last, namespace(), str.strip() and
# str.startswith(), a slice (messages[1:]) and the `is defined` test.
STRICT_TEMPLATE = """\
{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% set system_message = messages[0]['content'] %}
{% else %}
    {% set loop_messages = messages %}
    {% set system_message = false %}
{% endif %}
{% set ns = namespace(turns=0, last_role='') %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('""" + STRICT_ALTERNATION_ERROR + """') }}
    {% endif %}
    {% if loop.first and system_message != false %}
        {% set content = '<<SYS>>\\n' + system_message.strip() + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + content.strip() + ' [/INST]' -}}
    {% elif message['role'] == 'assistant' %}
        {% set ns.turns = ns.turns + 1 %}
        {% if content.strip().startswith('#') %}
            {{- ' (heading) ' -}}
        {% endif %}
        {{- ' ' + content.strip() + ' ' + eos_token -}}
    {% endif %}
    {% set ns.last_role = message['role'] %}
    {% if loop.last and message['role'] == 'assistant' %}
        {# a trailing marker after the final reply that depends on the namespace, so a wrong
           namespace shows (only after an assistant turn: the rendering of the messages before
           any assistant turn, with add_generation_prompt, stays a prefix of the whole) #}
        {{- '\\n' if ns.turns > 1 else '' -}}
    {% endif %}
{% endfor %}
{% if add_generation_prompt is defined and add_generation_prompt and ns.last_role == 'user' %}
    {{- ' ' -}}
{% endif %}
"""


def strict_template(tmp: Path) -> Path:
    """The fixture with a Llama-2 style ``[INST]`` template that raises
    ``STRICT_ALTERNATION_ERROR`` when roles do not alternate; ``eos_token`` ``</s>``."""
    d = _copy_fixture(Path(tmp) / "strict-template")
    _edit_config(d, chat_template=STRICT_TEMPLATE, eos_token="</s>")
    stm = _read_json(d / "special_tokens_map.json")
    stm["eos_token"] = {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _write_json(d / "special_tokens_map.json", stm)
    return d


#: A template with a Jinja syntax error (unclosed ``{{``).
BROKEN_TEMPLATE = "{% for message in messages %}{{ message['content'] }{% endfor %}"


def broken_template(tmp: Path) -> Path:
    """The fixture with a chat_template that does not compile."""
    d = _copy_fixture(Path(tmp) / "broken-template")
    _edit_config(d, chat_template=BROKEN_TEMPLATE)
    return d


MLMODEL = """\
artifact_path: mlflow_model_folder
flavors:
  python_function:
    env:
      conda: conda.yaml
      virtualenv: python_env.yaml
    loader_module: mlflow.transformers
    python_version: 3.10.13
  transformers:
    code: null
    components:
    - tokenizer
    framework: pt
    instance_type: TextGenerationPipeline
    model_binary: model
    pipeline_model_type: Phi3ForCausalLM
    source_model_name: microsoft/Phi-3-mini-4k-instruct
    task: text-generation
    tokenizer_type: LlamaTokenizerFast
    torch_dtype: torch.bfloat16
    transformers_version: 4.40.0
metadata:
  azureml.base_image: mcr.microsoft.com/azureml/curated/foundation-model-inference:latest
mlflow_version: 2.12.1
model_size_bytes: 7642159290
model_uuid: 0d3cbd8a3bbf4bb5a8b1b1d9b1b1a0c4
utc_time_created: '2024-05-01 00:00:00.000000'
"""


def mlflow_model(tmp: Path) -> Path:
    """An Azure ML MLflow model folder: ``MLmodel``, ``conda.yaml`` and ``data/tokenizer/`` with
    the Phi-3 tokenizer files (no weights)."""
    root = Path(tmp) / "mlflow_model_folder"
    tok_dir = root / "data" / "tokenizer"
    _copy_fixture(tok_dir)
    (root / "MLmodel").write_text(MLMODEL, encoding="utf-8")
    (root / "conda.yaml").write_text(
        "channels:\n- conda-forge\ndependencies:\n- python=3.10.13\n- pip:\n  - mlflow==2.12.1\n"
        "  - transformers==4.40.0\nname: mlflow-env\n",
        encoding="utf-8",
    )
    return root


#: name -> builder, for the folders that transformers loads and renders with.
ALL_LOADABLE = {
    "phi3": phi3,
    "phi3_with_model_config": phi3_with_model_config,
    "phi3_legacy": phi3_legacy,
    "chatml": chatml,
    "strict_template": strict_template,
}
