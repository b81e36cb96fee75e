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
def _parquet_to_jsonl(src: str, dst: str) -> int: ...
