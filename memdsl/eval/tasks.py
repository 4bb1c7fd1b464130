"""Task generators: MQAR (Zoology), single-needle NIAH (RULER S-NIAH style), byte-level text.

Every generator draws from a `numpy.random.Generator`, so a seed fixes the whole stream.
Labels use -100 (PyTorch's ignore index) everywhere except the positions that are scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100


@dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall as Zoology's `multiquery_ar` (Arora et al., 2023).

    The sequence opens with `pairs` key-value pairs (keys from the lower half of the vocabulary,
    values from the upper half, keys distinct); the rest holds each key once more at a
    power-law-distributed distance (exponent `power_a`) and random filler. The model must emit
    the key's value at the position of the key's second occurrence.
    """

    vocab: int = 64
    pairs: int = 8
    seq_len: int = 64
    power_a: float = 0.01

    def __post_init__(self):
        if self.seq_len < 4 * self.pairs:
            raise ValueError(f"MQAR needs seq_len ≥ 4·pairs, got {self.seq_len} < {4 * self.pairs}")
        if self.vocab // 2 - 1 < self.pairs:
            raise ValueError(f"MQAR needs vocab/2 - 1 ≥ pairs distinct keys, got vocab {self.vocab}")

    def sample(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [n, seq_len], labels [n, seq_len]); labels are values at query positions, else -100."""
        N, half = self.pairs, self.vocab // 2
        ctx = 2 * N
        space = (self.seq_len - ctx) // 2
        p = self.power_a * np.arange(1, space + 1, dtype=np.float64) ** (self.power_a - 1)
        p /= p.sum()
        seq = np.zeros((n, self.seq_len + 1), dtype=np.int64)
        labels = np.full((n, self.seq_len + 1), IGNORE, dtype=np.int64)
        for i in range(n):
            keys = rng.choice(np.arange(1, half), N, replace=False)
            values = rng.choice(np.arange(half, self.vocab), N, replace=True)
            seq[i, 0:ctx:2], seq[i, 1:ctx:2] = keys, values
            gaps = rng.choice(space, N, replace=False, p=p)
            seq[i, ctx + 2 * gaps] = keys
            labels[i, ctx + 2 * gaps + 1] = values
        filler = rng.integers(0, self.vocab, seq.shape)
        seq = np.where(seq == 0, filler, seq)
        # position t predicts token t+1: the label of the query key is its value
        return torch.from_numpy(seq[:, :-1]), torch.from_numpy(labels[:, 1:])


@dataclass(frozen=True)
class NIAH:
    """Single needle in a haystack, after RULER's S-NIAH (Hsieh et al., 2024), on tokens.

    Tokens 0–255 are haystack bytes (real text, as RULER's essay haystack, or uniform noise);
    then a needle marker, a query marker, `keys` key tokens and `values` value tokens. A sequence
    is haystack with one needle `[NEEDLE, key, value]` at a chosen depth and ends with
    `[QUERY, key]`; the last position must predict the value (chance 1/values). With one key
    (the default) it is RULER's passkey form (S-NIAH-1): the query names the one needle; more keys
    make the model match the key as well.
    """

    keys: int = 1
    values: int = 16

    @property
    def needle(self) -> int:
        return 256

    @property
    def query(self) -> int:
        return 257

    @property
    def vocab(self) -> int:
        return 258 + self.keys + self.values

    def sample(self, n: int, seq_len: int, rng: np.random.Generator, text: torch.Tensor | None = None,
               depth: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [n, seq_len], labels [n, seq_len]); `depth` in [0, 1] places the needle (random if None).

        `text` (bytes as an int tensor) is the haystack source; None gives uniform noise bytes."""
        hay_len = seq_len - 5
        if hay_len < 1:
            raise ValueError(f"NIAH needs seq_len ≥ 6, got {seq_len}")
        if text is None:
            hay = rng.integers(0, 256, (n, hay_len))
        else:
            starts = rng.integers(0, len(text) - hay_len, n)
            src = text.numpy()
            hay = np.stack([src[s:s + hay_len] for s in starts]).astype(np.int64)
        keys = rng.integers(0, self.keys, n) + 258
        values = rng.integers(0, self.values, n) + 258 + self.keys
        at = (np.full(n, round(depth * hay_len)) if depth is not None else rng.integers(0, hay_len + 1, n))
        seq = np.empty((n, seq_len), dtype=np.int64)
        for i in range(n):
            needle = [self.needle, keys[i], values[i]]
            seq[i] = np.concatenate([hay[i, :at[i]], needle, hay[i, at[i]:], [self.query, keys[i]]])
        labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
        labels[:, -1] = values
        return torch.from_numpy(seq), torch.from_numpy(labels)


def lm_batch(data: torch.Tensor, batch: int, seq_len: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """Random windows of a byte corpus: (inputs [batch, seq_len], next-byte targets [batch, seq_len])."""
    starts = rng.integers(0, len(data) - seq_len - 1, batch)
    win = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
    return win[:, :-1], win[:, 1:]
