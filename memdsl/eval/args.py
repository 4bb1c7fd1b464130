"""The arguments of `memdsl eval` (kept apart so that building the CLI parser imports no torch)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("rules", nargs="+", metavar="RULE",
                   help="rule specs: rules/x.mem, rules/x.mem@CHUNK, tnt:rules/x.mem, tnt2:rules/x.mem (stage two)")
    p.add_argument("--task", choices=["mqar", "niah", "lm", "chunk"], required=True)
    p.add_argument("--budget-minutes", type=float, default=10.0, help="training time for the whole table")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/quality")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (the budget may cut them)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--widths", default="64", help="model widths (comma list; mqar plots accuracy against them)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, help="training length (default: mqar 64, others 128)")
    p.add_argument("--pairs", type=int, default=8, help="mqar: key-value pairs")
    p.add_argument("--vocab", type=int, default=64, help="mqar: vocabulary")
    p.add_argument("--eval-lengths", default="128,256,512,1024", help="niah: evaluation lengths")
    p.add_argument("--train-chunk", type=int, default=16, help="chunk: training chunk size")
    p.add_argument("--eval-chunks", default="2,4,8,16,32,64", help="chunk: evaluation chunk sizes")
    p.add_argument("--tnt", default="64,8,64", help="TNT schedule: global chunk, local chunk, local reset")
    p.add_argument("--stage2-chunk", type=int, default=2, help="local chunk of TNT stage two (tnt2: specs)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
