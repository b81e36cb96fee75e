"""Type stubs of the native module (checked against it by tests/test_api.py)."""

from typing import Callable, Optional

# progress(kind, task_id, name, total, n, unit); see ferrotune._progress
ProgressCallback = Callable[[str, int, str, Optional[int], int, str], None]

__version__: str

def download_dataset(
    dataset: str,
    download_dir: str,
    split_pc: str,
    subset: Optional[str] = None,
    splits: Optional[list[str]] = None,
    revision: str = "main",
    formats: list[str] = ["jsonl"],
    token: Optional[str] = None,
    full_download: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> list[dict]: ...
def split_names(
    dataset: str,
    subset: Optional[str] = None,
    revision: str = "main",
    token: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
) -> list[str]: ...
def hub_download(
    repo_id: str,
    filename: str,
    repo_type: str = "model",
    revision: str = "main",
    token: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
) -> str: ...
def rows_for_split_pc(split_pc: str, n: int) -> int: ...
def _json_string(s: str) -> str: ...
def _group_sum_timings(world: str, floats: int, repeats: int) -> list[float]: ...
def _parquet_to_jsonl(src: str, dst: str) -> int: ...

import numpy as np
import numpy.typing as npt

class ChatTokenizer:
    """A tokenizer and its chat template, loaded as transformers' AutoTokenizer would."""

    @staticmethod
    def from_pretrained(
        source: str,
        revision: str = "main",
        token: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> "ChatTokenizer": ...
    @property
    def chat_template(self) -> Optional[str]: ...
    @property
    def bos_token(self) -> Optional[str]: ...
    @property
    def eos_token(self) -> Optional[str]: ...
    @property
    def unk_token(self) -> Optional[str]: ...
    @property
    def pad_token(self) -> Optional[str]: ...
    @property
    def eos_token_ids(self) -> list[int]: ...
    @property
    def pad_token_id(self) -> Optional[int]: ...
    @property
    def model_max_length(self) -> Optional[int]: ...
    @property
    def default_max_seq_length(self) -> Optional[int]: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def origin(self) -> str: ...
    def token_to_id(self, token: str) -> Optional[int]: ...
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str: ...
    def encode(self, text: str, add_special_tokens: bool = False) -> npt.NDArray[np.int32]: ...
    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[npt.NDArray[np.int32]]: ...
    def encode_chat(
        self, messages: list[dict], train_on: str = "assistant", max_seq_length: Optional[int] = None
    ) -> dict[str, npt.NDArray[np.int32]]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

def tokenize_dataset(
    tokenizer: "ChatTokenizer | str",
    data_files: list[str],
    output: str,
    max_seq_length: Optional[int] = None,
    mode: str = "pack",
    train_on: str = "assistant",
    strict: bool = False,
    num_threads: Optional[int] = None,
    pack_window: int = 8192,
    revision: str = "main",
    token: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
) -> dict: ...
def load_tokenized(path: str) -> dict: ...

class LoraModel:
    """Phi-3 with frozen base weights and LoRA adapters (PEFT names and initialisation)."""

    @staticmethod
    def load(
        model: str,
        *,
        lora_r: int = 8,
        lora_alpha: float = 128.0,
        lora_dropout: float = 0.0,
        target_modules: Optional[list[str]] = None,
        use_rslora: bool = False,
        seed: int = 42,
        device: str = "cpu",
        precision: str = "auto",
        adapter: Optional[str] = None,
        token: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> "LoraModel": ...
    @property
    def config(self) -> dict: ...
    def lora_names(self) -> list[str]: ...
    def get_lora(self) -> dict[str, npt.NDArray[np.float32]]: ...
    def set_lora(self, state: dict[str, npt.ArrayLike]) -> None: ...
    def logits(self, input_ids: npt.ArrayLike, seq_lengths: Optional[list[int]] = None) -> npt.NDArray[np.float32]: ...
    def loss_and_grads(
        self,
        input_ids: npt.ArrayLike,
        labels: npt.ArrayLike,
        seq_lengths: Optional[list[int]] = None,
        recompute: bool = False,
    ) -> tuple[float, int, dict[str, npt.NDArray[np.float32]]]: ...
    def save_adapter(self, path: str, base_model: Optional[str] = None) -> str: ...
    def save_merged(self, path: str, progress: Optional[ProgressCallback] = None) -> str: ...

def finetune(config_json: str, progress: Optional[ProgressCallback] = None) -> str: ...
def cuda_available() -> bool: ...
def gpu_emulator() -> bool: ...
def cuda_build() -> bool: ...
def _emu_allocations() -> int: ...
def _gpu_selfcheck(device: str, precision: str = "auto", full: bool = False, only: Optional[str] = None) -> str: ...
def _gpu_profile(action: str) -> Optional[str]: ...
def create_random_model(out_dir: str, config: Optional[dict] = None, seed: int = 0, tokenizer: Optional[str] = None) -> str: ...

class Generator:
    """A Phi-3 model and its tokenizer, loaded for generation."""

    @staticmethod
    def load(
        model: str,
        *,
        adapter: Optional[str] = None,
        device: str = "auto",
        precision: str = "auto",
        token: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> "Generator": ...
    @property
    def eos_token_ids(self) -> list[int]: ...
    @property
    def max_context(self) -> int: ...
    @property
    def device(self) -> str: ...
    @property
    def model_dir(self) -> str: ...
    def prompt_ids(self, messages: list[dict]) -> list[int]: ...
    def generate(
        self,
        conversations: list[list[dict]],
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stream: bool = False,
        progress: Optional[ProgressCallback] = None,
    ) -> list[dict]: ...
    def generate_ids(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> list[tuple[list[int], str]]: ...
