"""The text corpus: CPython's own documentation topics (`pydoc_data/topics.py`, PSF License).

It ships with every CPython installation (it backs `help("topic")`), so it needs no download:
about 0.46 MB of English technical prose — the Python Language Reference and library chapters
that `pydoc` shows. Topics are concatenated in sorted order so the corpus is the same for a
given Python version; the last 10% is held out for validation.

Runs of more than four identical characters (ASCII table borders, underlines, indentation) are
cut to four: an anchored chunk of C identical tokens sums C equal gradients, and a fresh
anchored memory (titans, omeganet) diverges to NaN on the corpus's `+-----+` tables
(benchmarks/QUALITY.md says more).
"""

from __future__ import annotations

import functools
import re

import torch

NAME = "CPython pydoc_data/topics.py (Python documentation topics), PSF License Version 2"


@functools.lru_cache(maxsize=1)
def load_corpus() -> torch.Tensor:
    """All topics as UTF-8 bytes in an int64 tensor."""
    from pydoc_data.topics import topics
    text = re.sub(r"(.)\1{4,}", r"\1\1\1\1", "\n\n".join(topics[k] for k in sorted(topics)))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def split_corpus(valid_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) bytes."""
    data = load_corpus()
    cut = int((1 - valid_fraction) * len(data))
    return data[:cut], data[cut:]
