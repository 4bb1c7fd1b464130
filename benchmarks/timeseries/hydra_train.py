"""Hydra on ETTh1: train the same forecaster twice, with the 2-D chunkwise program (tiles) and with the exact
2-D recurrence (the anti-diagonal wavefront, the fastest exact form), in lockstep in one process: one step of
each in turn, the same initial weights and the same batches, so machine load hits both alike. Prints the
median seconds per training step of each, their ratio, and both test MSE/MAE (the full test split).

    nice python benchmarks/timeseries/hydra_train.py --steps 300 --horizon 96

Also times the floor of any schedule that computes every cell's gradient: Hydra's per-cell gradient and read
on all cells in one batched call (forward + backward), at the same shapes. Appends one JSON line to --out.
Skips when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import ltsf  # noqa: E402


def floor_seconds(rule, B, T, V, H, D, repeat=5):
    """fwd + bwd of the per-cell gradient and read over every cell at once: what no schedule can skip."""
    g = torch.Generator().manual_seed(0)
    rt = rule.runtime
    cells = {n: torch.randn(B, H, T * V, D, generator=g).requires_grad_() for n in ("q", "k", "v")}
    cells.update({n: (torch.rand(B, H, T * V, generator=g) * 0.3 + 0.05).requires_grad_()
                  for n in rule.spec1d["gates"]})
    W = {p: (torch.randn(B, H, T * V, D, D, generator=g) * 0.1).requires_grad_() for p in rt.params}
    lr = cells["eta"].unsqueeze(-1)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        st = rt._steps(W, cells, lr, {}, {"d": D})
        rt._read({p: W[p] + st[p] for p in W}, cells, {}, {"d": D}).square().mean().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--horizon", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=8)
    ap.add_argument("--tile", default="16x8", help="the chunkwise model's tile (hydra.mem's schedule: 16x8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results.jsonl"))
    args = ap.parse_args()
    if ltsf.data_path("ETTh1") is None:
        print("skipped: ../shared/data/ltsf/ETTh1.csv.gz is absent")
        return 0
    torch.set_num_threads(args.threads)
    L, Hz = 96, args.horizon
    splits = ltsf.load_splits("ETTh1", L)
    tile = tuple(int(x) for x in args.tile.split("x"))
    torch.manual_seed(args.seed)
    models = {"tiles": ltsf.build_model("hydra", L, Hz, 7, d_model=args.d_model, tile=tile, backend="tiles")}
    models["exact"] = ltsf.build_model("hydra", L, Hz, 7, d_model=args.d_model, tile=tile, backend="wavefront")
    models["exact"].load_state_dict(models["tiles"].state_dict())  # the same initial weights
    xtr, ytr = ltsf.windows(splits["train"], L, Hz)
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
              for k, o in opts.items()}
    gen = torch.Generator().manual_seed(args.seed)
    times = {k: [] for k in models}
    for step in range(args.steps):
        idx = torch.randint(len(xtr), (args.batch,), generator=gen)
        for k, m in models.items():
            m.train()
            t0 = time.perf_counter()
            loss = nn.functional.mse_loss(m(xtr[idx]), ytr[idx])
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
            scheds[k].step()
            times[k].append(time.perf_counter() - t0)
            if step % max(1, args.steps // 5) == 0:
                print(f"  step {step:4d} {k:5s} train mse {loss.item():.4f}  {times[k][-1]:.3f}s/step", flush=True)
    res = {}
    for k, m in models.items():
        t0 = time.perf_counter()
        mse, mae = ltsf.evaluate(m, splits["test"], L, Hz)
        res[k] = {"s_per_step": statistics.median(times[k]), "mse": mse, "mae": mae,
                  "eval_s": time.perf_counter() - t0}
    rule = models["tiles"].mixers[0].rule
    H = models["tiles"].mixers[0].H
    floor = floor_seconds(rule, args.batch, L, 7, H, args.d_model // H)
    ratio = res["exact"]["s_per_step"] / res["tiles"]["s_per_step"]
    gap = res["tiles"]["mse"] / res["exact"]["mse"] - 1
    print(f"Hydra ETTh1 lookback {L} horizon {Hz}, B={args.batch} d_model={args.d_model} H={H}, tile {args.tile}, "
          f"{args.steps} steps, seed {args.seed}, torch {torch.__version__}, {args.threads} thread(s)")
    print("| training | median s / step | test MSE | test MAE |\n| --- | ---: | ---: | ---: |")
    for k, r in res.items():
        print(f"| {k} | {r['s_per_step']:.4f} | {r['mse']:.4f} | {r['mae']:.4f} |")
    print(f"speed ratio exact / tiles: {ratio:.2f}x; MSE of tiles vs exact: {100 * gap:+.2f}%; "
          f"floor (per-cell gradient + read, all cells in one call, fwd+bwd): {floor:.4f}s")
    row = {"bench": "hydra_train", "horizon": Hz, "steps": args.steps, "batch": args.batch, "d_model": args.d_model,
           "tile": args.tile, "seed": args.seed, "threads": args.threads, **{f"{k}_{f}": v for k, r in res.items()
                                                                           for f, v in r.items()},
           "ratio": ratio, "mse_gap": gap, "floor_s": floor, "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
