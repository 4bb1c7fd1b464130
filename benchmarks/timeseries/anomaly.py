"""Anomaly detection on NASA MSL and SMAP telemetry (../shared/data/anomaly/SMAP_MSL.tar.gz) with memdsl rules.

Data (the standard preparation of OmniAnomaly / Anomaly Transformer / Time-Series-Library): the channels of one
spacecraft in the order of `labeled_anomalies.csv`, their train and test series concatenated (MSL: 27 channels,
55 dims, train 58,317 / test 73,729 rows; SMAP: 54 channels with P-2 left out — it is listed twice — 25 dims,
train 135,183 / test 427,617 rows); point labels from the csv's anomaly sequences (inclusive ends); standard
scaling fitted on the training rows.

Detector: a one-step-ahead predictor. A window of L + 1 rows goes in, and at every cell (t, v) the model
predicts x[t + 1, v] (2-D rules are causal along time; Chimera's backward pass runs over variates only). The
anomaly score of a point is the squared prediction error averaged over channels. Test (and train) series are
cut into consecutive windows of L predicted points, each fed with the row before it, so every point is scored
once.

Protocol (as Time-Series-Library's `exp_anomaly_detection` and Anomaly Transformer): threshold = the
(100 - r)-th percentile of the scores of the train and test points together, r = 1 (%); a point is flagged
when its score exceeds it; point adjustment: when any point of a labelled anomaly segment is flagged, every
point of that segment counts as detected; precision, recall and F1 over test points. Point adjustment is known
to inflate F1 (a random score already does well): the `random` control measures that.
"""

from __future__ import annotations

import csv
import io
import math
import pathlib
import tarfile
import time

import ltsf
import numpy as np
import torch
from torch import nn

ARCHIVE = ltsf.ROOT.parent / "shared" / "data" / "anomaly" / "SMAP_MSL.tar.gz"
LEFT_OUT = {"SMAP": {"P-2"}}  # listed twice in labeled_anomalies.csv; the standard sizes leave it out


def data_path() -> pathlib.Path | None:
    return ARCHIVE if ARCHIVE.exists() else None


def load(name: str) -> dict[str, np.ndarray]:
    """{"train": [N, C], "test": [M, C], "labels": [M]} for name in {"MSL", "SMAP"}, scaled on train."""
    if data_path() is None:
        raise FileNotFoundError(f"{ARCHIVE} is missing; see README.md (Data) for the original")
    # members in one sequential pass each (random access into a .tar.gz decompresses from the start every time)
    with tarfile.open(ARCHIVE, "r|gz") as tar:
        table = next(tar.extractfile(m).read() for m in tar if m.name.endswith("labeled_anomalies.csv"))
    rows = [r for r in csv.DictReader(io.StringIO(table.decode()))
            if r["spacecraft"] == name and r["chan_id"] not in LEFT_OUT.get(name, ())]
    wanted = {f"{split}/{r['chan_id']}.npy" for r in rows for split in ("train", "test")}
    arrays = {}
    with tarfile.open(ARCHIVE, "r|gz") as tar:
        for m in tar:
            key = m.name.split("SMAP_MSL/", 1)[-1]
            if key in wanted:
                arrays[key] = np.load(io.BytesIO(tar.extractfile(m).read()))
    train, test, labels = [], [], []
    for r in rows:
        train.append(arrays[f"train/{r['chan_id']}.npy"])
        x = arrays[f"test/{r['chan_id']}.npy"]
        lab = np.zeros(len(x), dtype=np.int8)
        for a, b in _segments(r["anomaly_sequences"]):
            lab[a:b + 1] = 1
        test.append(x)
        labels.append(lab)
    train, test = np.concatenate(train).astype(np.float64), np.concatenate(test).astype(np.float64)
    mean, std = train.mean(0), train.std(0)
    std[std < 1e-8] = 1.0
    return {"train": ((train - mean) / std).astype(np.float32), "test": ((test - mean) / std).astype(np.float32),
            "labels": np.concatenate(labels)}


def _segments(text: str) -> list[tuple[int, int]]:
    nums = [int(x) for x in text.replace("[", " ").replace("]", " ").replace(",", " ").split()]
    return list(zip(nums[0::2], nums[1::2], strict=True))


# ---- the protocol -----------------------------------------------------------------------------------

def point_adjust(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Every labelled segment with at least one flagged point becomes fully flagged."""
    pred = pred.astype(bool).copy()
    edges = np.flatnonzero(np.diff(np.concatenate([[0], gt.astype(np.int8), [0]])))
    for a, b in zip(edges[0::2], edges[1::2], strict=True):
        if pred[a:b].any():
            pred[a:b] = True
    return pred


def scores_to_metrics(train_scores: np.ndarray, test_scores: np.ndarray, labels: np.ndarray,
                      ratio: float = 1.0) -> dict[str, float]:
    threshold = np.percentile(np.concatenate([train_scores, test_scores]), 100 - ratio)
    raw = test_scores > threshold
    out = {}
    for tag, pred in (("pa", point_adjust(labels, raw)), ("raw", raw)):
        tp = float((pred & (labels == 1)).sum())
        p = tp / max(pred.sum(), 1)
        r = tp / max((labels == 1).sum(), 1)
        out.update({f"{tag}_precision": p, f"{tag}_recall": r, f"{tag}_f1": 2 * p * r / max(p + r, 1e-12)})
    return out


# ---- the detector -----------------------------------------------------------------------------------

class Predictor(nn.Module):
    """Cells (t, v) embedded (value, variate) -> one residual mixer (a memdsl rule, or none) -> per-cell head
    predicting x[t + 1, v] as x[t, v] + head(h)."""

    def __init__(self, n_vars: int, d_model: int, rule: str | None, tile: tuple[int, int] | None = None):
        super().__init__()
        self.value = nn.Linear(1, d_model)
        self.var_emb = nn.Parameter(torch.randn(n_vars, d_model) * 0.02)
        path, bias = ltsf.MODELS[rule] if rule else (None, None)
        self.mixer = ltsf.RuleMixer(str(ltsf.ROOT / path), d_model, 2, tile, bias) if path else None
        self.head = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, V] -> predictions of the next rows [B, L, V]
        h = self.value(x.unsqueeze(-1)) + self.var_emb[None, None]
        if self.mixer is not None:
            h = self.mixer(h)
        return x + self.head(h).squeeze(-1)


def windows_for_scoring(series: np.ndarray, L: int) -> torch.Tensor:
    """Consecutive windows of L + 1 rows whose last L rows are the points they score (the first window is fed
    its first row twice), covering the series; the tail is padded by repeating the last row."""
    n = math.ceil(len(series) / L)
    idx = (np.arange(n)[:, None] * L + np.arange(-1, L)[None]).clip(0, len(series) - 1)
    return torch.from_numpy(series[idx])


@torch.no_grad()
def score(model: nn.Module, series: np.ndarray, L: int, batch: int = 64) -> np.ndarray:
    model.eval()
    w = windows_for_scoring(series, L)
    out = []
    for i in range(0, len(w), batch):
        x = w[i:i + batch]
        out.append((model(x[:, :-1]) - x[:, 1:]).pow(2).mean(-1).reshape(-1))
    return torch.cat(out).numpy()[:len(series)]


def train(model: nn.Module, series: np.ndarray, L: int, steps: int, batch: int, lr: float = 1e-3, seed: int = 0,
          log=print) -> float:
    """Adam on random training windows of L + 1 rows; returns the seconds spent."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(series)
    opt, sched = ltsf.cosine_adam(model, lr, steps)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        start = torch.randint(len(series) - L - 1, (batch,), generator=gen)
        x = data[start[:, None] + torch.arange(L + 1)[None]]
        loss = nn.functional.mse_loss(model(x[:, :-1]), x[:, 1:])
        ltsf.optimizer_step(opt, sched, loss)
        if step % max(1, steps // 5) == 0:
            log(f"  step {step:5d}  train mse {loss.item():.4f}  {time.perf_counter() - t0:.0f}s")
    return time.perf_counter() - t0
