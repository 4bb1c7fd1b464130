import os
import pathlib

import torch

if not torch.cuda.is_available():  # Triton kernels run in Triton's numpy interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULES = sorted((ROOT / "rules").glob("*.mem"))
RULE_IDS = [p.stem for p in RULES]


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch):
    """Paths in messages and golden files are relative to the repository root."""
    monkeypatch.chdir(ROOT)


def rel(path: pathlib.Path) -> str:
    return os.path.relpath(path, ROOT)
