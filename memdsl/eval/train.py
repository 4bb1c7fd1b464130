"""Training and scoring: one loop for every task (AdamW, warm-up then cosine, gradient clipping).

The learning-rate schedule follows *progress*, the larger of steps done / steps and time used /
time allowed, so a run cut short by its time budget still anneals. TNT stage two starts at 90%
progress (MATH.md §6.4: a short phase, ≈5% of compute in the paper).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..tnt import finetune_schedule
from .tasks import IGNORE

STAGE_TWO_AT = 0.9


@dataclass
class TrainResult:
    steps: int
    seconds: float
    curve: list[float] = field(default_factory=list)  # training loss per step
    stage_two_step: int | None = None
    skipped: int = 0  # steps whose loss or gradient was not finite: no update was made


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def train(model: torch.nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int,
          max_seconds: float, lr: float = 3e-3, desc: str = "", quiet: bool = False) -> TrainResult:
    """Train `model` on `batches` for `steps` steps or `max_seconds`, whichever ends first."""
    stage_two = getattr(getattr(model, "spec", None), "stage_two_chunk", None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    result = TrainResult(0, 0.0)
    t0 = time.time()
    bar = tqdm(total=steps, desc=desc, disable=quiet, file=sys.stderr, mininterval=5, leave=False)
    for step in range(steps):
        progress = max(step / steps, (time.time() - t0) / max_seconds)
        if progress >= 1:
            break
        if stage_two and result.stage_two_step is None and progress >= STAGE_TWO_AT:
            finetune_schedule(model, [stage_two], freeze_others=True)
            result.stage_two_step = step
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * progress))
        x, y = next(batches)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):  # one diverging batch must not poison the weights
            result.skipped += 1
        else:
            opt.step()
        result.curve.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    result.steps, result.seconds = len(result.curve), time.time() - t0
    return result


@torch.no_grad()
def accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch: int = 64) -> float:
    """Fraction of scored positions (label ≠ -100) whose arg-max prediction is the label."""
    model.eval()
    hits = total = 0
    for s in range(0, len(inputs), batch):
        y = labels[s:s + batch]
        pred = model(inputs[s:s + batch]).argmax(-1)
        mask = y != IGNORE
        hits += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
    model.train()
    return hits / max(total, 1)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
              n: int) -> float:
    """Mean cross-entropy (nats per scored token) over `n` batches of a fresh iterator."""
    model.eval()
    it = batches()
    losses = [loss_fn(model(x), y).item() for x, y in (next(it) for _ in range(n))]
    model.train()
    return sum(losses) / len(losses)
