"""ETTh1 long-term forecasting with memdsl rules (protocol: ../shared/data/README.md; code: ltsf.py).

    nice python benchmarks/timeseries/forecast.py --runs linear:96,192,336,720 chimera:96 --steps 80

Appends one JSON line per (model, horizon) to --out; benchmarks/TIMESERIES.md holds the table.
Skips when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import ltsf  # noqa: E402


def plot(model, splits, horizon, title, path, window=0):
    """The lookback, the truth and the forecast of one test window, for the target channel OT and one load."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x, y = ltsf.windows(splits["test"], 96, horizon)
    rows = ltsf.window_rows(splits["test"], 96, horizon, splits["starts"]["test"])
    model.eval()
    with torch.no_grad():
        p = model(x[window:window + 1], rows[window:window + 1])[0]
    fig, axes = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    for ax, ch, label in zip(axes, (6, 0), ("OT (oil temperature)", "HUFL (high useful load)"), strict=True):
        ax.plot(range(96), x[window, :, ch], color="0.4", label="lookback")
        ax.plot(range(96, 96 + horizon), y[window, :, ch], color="k", label="truth")
        ax.plot(range(96, 96 + horizon), p[:, ch], color="tab:red", label="forecast")
        ax.set_ylabel(label + "\n(normalised)")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[0].set_title(f"ETTh1 test window {window}, horizon {horizon}: {title}", fontsize=10)
    axes[1].set_xlabel("hour")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=["linear:96", "chimera:96"],
                    help="MODEL:H1,H2,... with MODEL one of " + ", ".join(ltsf.MODELS))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--linear-steps", type=int, default=300, help="steps for the linear-only model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0, help="initial weights and training batches")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout on the head's input features")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (0: Adam)")
    ap.add_argument("--val-every", type=int, default=0, help="validate every N steps and test the best weights "
                    "(0: test the last weights)")
    ap.add_argument("--patience", type=int, default=0, help="with --val-every: stop after this many validations "
                    "without a better one (0: run every step)")
    ap.add_argument("--mixer-lr", type=float, default=None, help="learning rate of everything but the linear path "
                    "and the cycle (default: --lr)")
    ap.add_argument("--head-rank", type=int, default=0, help="project each cell's features to this many before the "
                    "head (0: the full head on all d_model features)")
    ap.add_argument("--zero-head", action="store_true", help="the head starts at zero (the model starts as the "
                    "linear path alone)")
    ap.add_argument("--two-stage", action="store_true", help="train the linear path and cycle first, then (those "
                    "frozen, from a zero head) the mixers and head at --mixer-lr (ltsf.train_two_stage)")
    ap.add_argument("--layers", type=int, default=1, help="stacked blocks (rule mixer [+ per-cell MLP])")
    ap.add_argument("--mlp", type=int, default=0, help="per-cell MLP after each mixer, hidden = MLP * d_model "
                    "(0: none; the embed_head control keeps it)")
    ap.add_argument("--ema", type=float, default=0.0, help="validate/test an EMA of the weights with this decay "
                    "(0: the raw weights)")
    ap.add_argument("--dt-bias", default=None, help="the two heads' Δ1 gate biases before softplus, e.g. -4,0 "
                    "(default: the model's, MODELS in ltsf.py)")
    ap.add_argument("--cycle", type=int, default=0, help="CycleNet's residual cycle forecasting with a learned "
                    "cycle of this many steps, e.g. 24 for hourly ETTh1 (0: off)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 threads on 2 busy cores is slower)")
    ap.add_argument("--tile", default=None, help="override the 2-D rule's tile, e.g. 8x8 (scan2d rules are exact for "
                    "every tile: only the speed changes; for hydra it changes the model)")
    ap.add_argument("--plot", default=None, help="folder for a PNG of each run's forecast of test window 0")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results.jsonl"))
    args = ap.parse_args()
    if ltsf.data_path("ETTh1") is None:
        print("skipped: ../shared/data/ltsf/ETTh1.csv.gz is absent")
        return 0
    torch.set_num_threads(args.threads)
    splits = ltsf.load_splits("ETTh1", 96)
    for run in args.runs:
        name, horizons = run.split(":")
        for h in (int(x) for x in horizons.split(",")):
            torch.manual_seed(args.seed)
            tile = tuple(int(x) for x in args.tile.split("x")) if args.tile else None
            gate_bias = {"dt": [float(x) for x in args.dt_bias.split(",")]} if args.dt_bias else None
            model = ltsf.build_model(name, 96, h, splits["train"].shape[1], d_model=args.d_model, tile=tile,
                                     dropout=args.dropout, layers=args.layers, mlp=args.mlp, gate_bias=gate_bias,
                                     cycle=args.cycle, head_rank=args.head_rank,
                                     zero_head=args.zero_head or args.two_stage)
            steps = args.linear_steps if name == "linear" else args.steps
            print(f"{name} horizon {h}: {steps} steps, batch {args.batch}", flush=True)
            common = dict(seed=args.seed, log=lambda s: print(s, flush=True), val_every=args.val_every,
                          weight_decay=args.weight_decay, ema=args.ema, patience=args.patience)
            if args.two_stage:
                res = ltsf.train_two_stage(model, splits, 96, h, steps, args.batch, args.lr,
                                           args.mixer_lr or args.lr, **common)
            else:
                res = ltsf.train_and_test(model, splits, 96, h, steps, args.batch, lr=args.lr,
                                          mixer_lr=args.mixer_lr, **common)
            row = {"model": name, "horizon": h, "steps": steps, "batch": args.batch, "d_model": args.d_model,
                   "tile": args.tile, "threads": args.threads,
                   "seed": args.seed, "lr": args.lr, "dropout": args.dropout, "weight_decay": args.weight_decay,
                   **({"layers": args.layers} if args.layers != 1 else {}), **({"mlp": args.mlp} if args.mlp else {}),
                   **({"dt_bias": args.dt_bias} if args.dt_bias else {}),
                   **({"cycle": args.cycle} if args.cycle else {}),
                   **({"patience": args.patience} if args.patience else {}),
                   **({"mixer_lr": args.mixer_lr} if args.mixer_lr is not None else {}),
                   **({"head_rank": args.head_rank} if args.head_rank else {}),
                   **({"zero_head": True} if args.zero_head else {}),
                   **({"two_stage": True} if args.two_stage else {}),
                   "params": sum(p.numel() for p in model.parameters()), **res,
                   "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                   "date": time.strftime("%Y-%m-%d %H:%M")}
            print(json.dumps(row), flush=True)
            if args.plot:
                plot(model, splits, h, f"{name}, {steps} steps: test MSE {res['mse']:.3f}",
                     pathlib.Path(args.plot) / f"etth1_{name}_h{h}.png")
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
