"""Padded batches for `MemoryLayer`: an attention mask (1 = token, 0 = padding, Hugging Face's convention)
never lets padding reach what a row computes. Two layouts (`Aligned`):

* tokens first (`tokens_first=True`), when no cache is returned (training, scoring): every row's tokens move,
  in order, to the start of the row, padding (zeroed) after them; the rule runs once over the whole batch.
  Every rule is causal and a row's chunks start where its tokens start, so each token's output is the row's
  own; what the padding does to the memory after the last token is never read.
* tokens last, when the cache is returned (prompts before decoding): the state after each row's last token
  is needed, so the rule gets packed sequences (`cu_seqlens`, one per row); a row's short-conv cache goes
  right before its first token (`conv_input`), and a row whose mask is all zeros (a finished row while
  others decode) leaves its cache untouched.

A mask with holes is read like flash-linear-attention reads it: a row's tokens are its unmasked positions,
taken as one sequence.
"""

from __future__ import annotations

import torch


def check_mask(attention_mask: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """The mask of the current tokens ([B, T] bool) from a [B, S ≥ T] mask (S > T while decoding: past + new)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[0] != B \
            or attention_mask.shape[1] < T:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask: expected [B, S] = [{B}, ≥ {T}] (1 = token, 0 = padding), got {got}")
    mask = attention_mask[:, -T:]
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask: expected 0 (padding) and 1 (token) only")
        mask = mask != 0
    return mask


class Aligned:
    """The permutation of each row that puts its tokens (in order) last, or first with `tokens_first`."""

    def __init__(self, mask: torch.Tensor, tokens_first: bool = False):
        self.B, self.T = mask.shape
        self.tokens_first = tokens_first
        key = (~mask if tokens_first else mask).to(torch.int8)  # stable sort: tokens keep their order
        flags, self.perm = torch.sort(key, dim=1, stable=True)
        self.inv = torch.argsort(self.perm, dim=1)
        self.mask = ~flags.bool() if tokens_first else flags.bool()  # [B, T]: where the tokens are now
        self.lengths = self.mask.sum(1)
        self.rows, self.cols = self.mask.nonzero(as_tuple=True)  # row-major: row 0's tokens, then row 1's, ...

    def cu_seqlens(self) -> torch.Tensor:
        return torch.cat([self.lengths.new_zeros(1), self.lengths.cumsum(0)])

    @staticmethod
    def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.gather(1, index.view(*index.shape, *(1,) * (x.dim() - 2)).expand_as(x))

    def align(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] in the caller's layout -> aligned (each row's tokens last, or first)."""
        return self._take(x, self.perm.to(x.device))

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Aligned [B, T, ...] -> the caller's layout."""
        return self._take(x, self.inv.to(x.device))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Aligned [B, T, ...] -> [1, N, ...]: the tokens of every row, row after row."""
        return x[self.rows, self.cols].unsqueeze(0)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, N, ...] -> aligned [B, T, ...], zero at padding."""
        out = x.new_zeros(self.B, self.T, *x.shape[2:])
        return out.index_put((self.rows, self.cols), x[0])


def conv_input(x: torch.Tensor, cache: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """The sequence a causal conv of width K reads: [B, K - 1 + T, C] from x [B, T, C] and the cache of the
    K - 1 inputs before it. Rows with their tokens last (`lengths` given): row b's cache goes right before its first
    token (position T - lengths[b] of the result), over padding, so no token ever reads padding."""
    full = torch.cat([torch.zeros_like(cache) if lengths is not None else cache, x], dim=1)
    if lengths is None or cache.shape[1] == 0:
        return full
    K1, C = cache.shape[1], x.shape[2]
    pos = (x.shape[1] - lengths.to(x.device))[:, None] + torch.arange(K1, device=x.device)
    return full.scatter(1, pos[..., None].expand(-1, -1, C), cache)


__all__ = ["Aligned", "check_mask", "conv_input"]
