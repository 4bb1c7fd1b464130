import os
import pathlib

import torch

if not torch.cuda.is_available():  # Triton kernels run in Triton's numpy interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _is_2d(path: pathlib.Path) -> bool:
    from memdsl.parse import parse
    from memdsl.twod import is_2d
    return is_2d(parse(path.read_text(), str(path)))


# 1-D rules run through every 1-D backend (chunk, dual, WY, TNT, Triton); 2-D rules (`axes time, variate`)
# have their own runtime and tests (tests/test_twod.py). Both get golden files.
RULES = [p for p in sorted((ROOT / "rules").glob("*.mem")) if not _is_2d(p)]
RULE_IDS = [p.stem for p in RULES]
RULES_2D = [p for p in sorted((ROOT / "rules").glob("*.mem")) if _is_2d(p)]
RULE_2D_IDS = [p.stem for p in RULES_2D]


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch):
    """Paths in messages and golden files are relative to the repository root."""
    monkeypatch.chdir(ROOT)


def rel(path: pathlib.Path) -> str:
    return os.path.relpath(path, ROOT)
