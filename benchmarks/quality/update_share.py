"""How much of a fresh memory layer's output comes from its in-context update, with and without the 1/C cap.

For each rule: the output of one `MemoryLayer` (width 32, 4 heads, random input of 64 tokens) with
its learning-rate gates as the eval model uses them (capped at sigmoid/C), uncapped (sigmoid), and
switched off (rate 0: the memory is never written, every read sees the initial memory). Printed:
‖y − y_rate0‖ / ‖y‖, the share of the output that the memory's writes account for.

    python benchmarks/quality/update_share.py rules/titans.mem rules/titans_linear.mem rules/omeganet.mem
"""

from __future__ import annotations

import sys

import torch

from memdsl.eval.model import _Scaled, cap_lr_gates, lr_gates
from memdsl.nn import MemoryLayer


def output(rule: str, x: torch.Tensor, mode: str) -> torch.Tensor:
    torch.manual_seed(1)
    layer = MemoryLayer(rule, x.shape[-1], 4)
    if mode == "capped":
        cap_lr_gates(layer, rule)
    elif mode == "off":
        layer.gate_act = dict(layer.gate_act)
        for name in lr_gates(rule):
            layer.gate_act[name] = _Scaled(0.0)
    with torch.no_grad():
        return layer(x)[0]


def main(rules: list[str]) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(2, 64, 32)
    for rule in rules:
        if not lr_gates(rule):
            print(f"{rule}: no sigmoid gate is the whole learning rate; skipped")
            continue
        off = output(rule, x, "off")
        for mode in ("capped", "uncapped"):
            y = output(rule, x, mode)
            print(f"{rule} {mode}: update share {((y - off).norm() / y.norm()).item():.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
