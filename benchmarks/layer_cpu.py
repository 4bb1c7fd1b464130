"""CPU benchmark of `memdsl.nn.MemoryLayer` training steps: the layer's rule call through each backend.

    python benchmarks/layer_cpu.py [--repeat 7] [--out benchmarks/RESULTS.md]

One training step = the layer's forward and backward (every parameter's gradient: projections, conv,
gates, learned initial memory, norms). Executions, interleaved round by round so that load changes hit
all alike, medians over the rounds:
  chunk  the torch chunk program (`backend="chunk"`: what the layer ran before 99cb1ed, whatever the device)
  auto   what `backend="auto"` picks: on CPU, for training, the tile programs (a generated backward)
  auto, padded  `auto` with an attention mask that pads a quarter of the rows to half their length (the
         rule then runs packed sequences: one call per sequence on CPU)
Configurations: the tiny language model of examples/03_tiny_lm.py (B 16, T 128, d_model 64, 4 heads of 16)
and cpu-small's shape (BENCH.md: B 2, T 2048, 4 heads of 64, d_model 256).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import reexec_with_allocator_settings, report  # noqa: E402

reexec_with_allocator_settings()

import torch  # noqa: E402

from memdsl.nn import MemoryLayer  # noqa: E402

CONFIGS = {  # name: (B, T, d_model, heads, chunk)
    "tiny LM (examples/03)": (16, 128, 64, 4, 16),
    "cpu-small": (2, 2048, 256, 4, 16),
}


def step(layer: MemoryLayer, x: torch.Tensor, mask: torch.Tensor | None) -> float:
    t0 = time.perf_counter()
    out, _, _ = layer(x, attention_mask=mask)
    out.square().mean().backward()
    layer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", default="titans,titans_linear")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    rows = []
    for rule in args.rules.split(","):
        for cname, (B, T, d_model, heads, chunk) in CONFIGS.items():
            torch.manual_seed(0)
            layer = MemoryLayer(str(ROOT / "rules" / f"{rule}.mem"), d_model=d_model, n_heads=heads, chunk=chunk)
            x = torch.randn(B, T, d_model)
            mask = torch.ones(B, T, dtype=torch.long)
            mask[: max(1, B // 4), : T // 2] = 0  # a quarter of the rows left-padded to half their length
            runs = {"chunk": ("chunk", None), "auto": ("auto", None), "auto, padded": ("auto", mask)}
            for backend, m in runs.values():  # warm-up (generation, caches)
                layer.backend = backend
                step(layer, x, m)
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeat):
                for name, (backend, m) in runs.items():
                    layer.backend = backend
                    times[name].append(step(layer, x, m))
            med = {name: statistics.median(t) for name, t in times.items()}
            print(f"{rule} {cname}: " + ", ".join(f"{n} {1e3 * t:.0f} ms" for n, t in med.items()), file=sys.stderr,
                  flush=True)
            rows.append((rule, cname, B, T, d_model, heads, chunk, med))
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    lines = [f"\n### CPU, {datetime.date.today()} — {cpu or platform.processor()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}\n",
             f"Command: `python benchmarks/layer_cpu.py --rules {args.rules} --repeat {args.repeat}` (fp32; a "
             f"training step: forward and backward of the layer, every parameter's gradient; medians of "
             f"{args.repeat} interleaved rounds; glibc allocator variables of BENCH.md set).\n",
             "| rule | configuration | B × T, d_model, heads × d_head, C | chunk ms | auto ms | chunk / auto "
             "| auto, padded ms | padded / auto |", "|---|---|---|---|---|---|---|---|"]
    for rule, cname, B, T, d_model, heads, chunk, med in rows:
        lines.append(f"| {rule} | {cname} | {B} × {T}, {d_model}, {heads} × {d_model // heads}, {chunk} "
                     f"| {1e3 * med['chunk']:.0f} | {1e3 * med['auto']:.0f} | {med['chunk'] / med['auto']:.2f}x "
                     f"| {1e3 * med['auto, padded']:.0f} | {med['auto, padded'] / med['auto']:.2f}x |")
    report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
