"""Hydra: one training step (forward + backward) of the 2-D chunkwise program against the exact 2-D recurrence,
side by side in one run, at the ETTh1 setting (lookback 96, 7 variates); every execution runs once per round,
in turn, and the table shows medians over the rounds.

    nice python benchmarks/timeseries/hydra_speed.py --batch 32 --repeat 3

Executions: `tiles` (the anchored 2-D chunkwise program, the rule's tile), `wavefront` (the exact recurrence,
anti-diagonal by anti-diagonal: T + V - 1 sequential steps, each batched over a diagonal) and `cell loop`
(the exact recurrence cell by cell: tile 1 x 1 of the token-serial oracle, T * V sequential steps); `--floor`
adds the per-cell work alone (hydra_train.floor_seconds).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import pathlib
import statistics
import subprocess
import sys
import time
import types

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from memdsl.twod import compile_2d  # noqa: E402


def step_time(rule, inputs, backend, tile, repeat):
    q, k, v, gates = inputs
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        y, _ = rule(q, k, v, gates, backend=backend, tile=tile)
        y.square().mean().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _compiled_step(fn, inputs):
    q, k, v, gates = inputs
    t0 = time.perf_counter()
    y, _ = fn(q, k, v, gates)
    y.square().mean().backward()
    return time.perf_counter() - t0


def runtime_at(rev):
    """Runtime2D from codegen/runtime_2d.py at a git revision."""
    root = pathlib.Path(__file__).resolve().parents[2]
    text = subprocess.run(["git", "show", f"{rev}:codegen/runtime_2d.py"], capture_output=True, text=True, cwd=root,
                          check=True).stdout
    mod = types.ModuleType(f"runtime_2d_{rev}")
    exec(compile(text, f"<runtime_2d.py at {rev}>", "exec"), mod.__dict__)  # our own file, from our own history
    return mod.Runtime2D


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--d-head", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cell-loop", action="store_true", help="also time the cell-by-cell loop (slow)")
    ap.add_argument("--tiles", nargs="*", default=[], help="more tiles to time, e.g. 32x8 96x8 (each a different "
                    "anchored model: the tile is semantic)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--floor", action="store_true", help="also time the per-cell gradient + read over every cell in "
                    "one batched call (materialised states, no recurrence): a bound no schedule of these ops beats")
    ap.add_argument("--compile", action="store_true", help="also time tiles and wavefront under torch.compile "
                    "(inductor; compiling the wavefront's 102 steps takes minutes): the fused per-cell work")
    ap.add_argument("--against-rev", default=None, help="also time the tiles of codegen/runtime_2d.py as of this git "
                    "revision (the same model: a before/after of the runtime)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rule = compile_2d(str(pathlib.Path(__file__).resolve().parents[2] / "rules" / "hydra.mem"))
    B, T, V, H, D = args.batch, 96, 7, args.heads, args.d_head
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.nn.functional.normalize(torch.randn(B, T, V, H, D, generator=g), dim=-1).requires_grad_()
               for _ in range(3))
    gates = {n: (torch.rand(B, T, V, H, generator=g) * 0.3 + 0.05).requires_grad_() for n in rule.spec1d["gates"]}
    inputs = (q, k, v, gates)
    # every execution runs once per round, in turn, so a change of machine load hits all of them alike
    runs = [("tiles " + "x".join(map(str, rule.tile)), lambda: step_time(rule, inputs, "tiles", rule.tile, 1)),
            ("wavefront (exact)", lambda: step_time(rule, inputs, "wavefront", None, 1))]
    for text in args.tiles:
        tile = tuple(int(x) for x in text.split("x"))
        runs.append((f"tiles {text}", lambda tile=tile: step_time(rule, inputs, "tiles", tile, 1)))
    if args.floor:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        from hydra_train import floor_seconds
        runs.append(("floor: per-cell gradient + read, all cells at once",
                     lambda: floor_seconds(rule, B, T, V, H, D, 1)))
    if args.compile:
        # a rule call is a graph break under torch.compile (Rule2D.__call__ is torch.compiler.disable'd): compile
        # the undecorated call itself, so inductor fuses the per-cell ops of both schedules
        call = functools.partial(type(rule).__call__.__wrapped__, rule)
        for backend, tile in (("tiles", rule.tile), ("wavefront", None)):
            fn = torch.compile(lambda q, k, v, g, backend=backend, tile=tile: call(q, k, v, g, backend=backend,
                                                                                   tile=tile))
            t0 = time.perf_counter()
            y, _ = fn(q, k, v, gates)
            y.square().mean().backward()
            print(f"torch.compile of {backend}: {time.perf_counter() - t0:.0f} s (first call, compiling)",
                  file=sys.stderr, flush=True)
            runs.append((f"{backend} under torch.compile", lambda fn=fn: _compiled_step(fn, inputs)))
    if args.against_rev:
        old = compile_2d(str(pathlib.Path(__file__).resolve().parents[2] / "rules" / "hydra.mem"))
        old = copy.copy(old)
        old.runtime = runtime_at(args.against_rev)(old.runtime.spec, {"grads": old.runtime.grads_fn,
                                                                       "read": old.runtime.read_fn})
        runs.append((f"tiles {'x'.join(map(str, rule.tile))}, runtime of {args.against_rev}",
                     lambda: step_time(old, inputs, "tiles", rule.tile, 1)))
    if args.cell_loop:
        runs.append(("cell loop (exact)", lambda: step_time(rule, inputs, "anchored_loop", (1, 1), 1)))
    for _, fn in runs:  # warm-up
        fn()
    times = {name: [] for name, _ in runs}
    for _ in range(args.repeat):
        for name, fn in runs:
            if name.startswith("cell loop") and times[name]:
                continue  # one timing of the slow loop is enough
            times[name].append(fn())
    rows = [(name, statistics.median(times[name])) for name, _ in runs]
    base = rows[0][1]
    print(f"Hydra fwd+bwd, B={B} T={T} V={V} H={H} d={D}, torch {torch.__version__}, {args.threads} thread(s), "
          f"medians of {args.repeat} interleaved rounds, load average {os.getloadavg()[0]:.1f}")
    print("| execution | s / step | vs tiles |\n| --- | ---: | ---: |")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {t / base:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
