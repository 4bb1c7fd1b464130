"""A new memory rule in ten lines, compiled and checked against its own exact loop.

    python examples/02_custom_rule.py

The rule: a two-layer memory trained at test time on a Huber loss (robust to outlier values),
with momentum and a per-token forget gate — a combination no shipped model has.
"""

from __future__ import annotations

import torch

import memdsl
from memdsl.checking import check_rule, make_inputs

RULE = """
memory robust_titans {
  dim h = 2*d
  param W1 : [h, d] init normal(std = 0.1)
  param W2 : [d, h] init normal(std = 0.1)
  model M(x) = x + W2 @ silu(W1 @ x)
  gate lr : scalar sigmoid
  gate mom : scalar sigmoid
  gate forget : scalar sigmoid
  gate delta : scalar softplus
  loss sum(huber(M(k) - v, delta))
  optim momentum(lr = 0.1 * lr, decay = mom)
  retain decay(1 - forget)
  read M(q)
}
schedule { chunk 8 }
"""


def main() -> None:
    rule = memdsl.compile(RULE)
    print(rule)

    # call it like any flash-linear-attention op: [B, T, H, D]
    tok, gates, params = make_inputs(rule, B=2, T=32, H=4, D=16, dtype=torch.float32)
    y, state = rule(tok["q"], tok["k"], tok["v"], gates)
    print(f"\ny: {tuple(y.shape)}; state: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in state.items()))

    # the chunk program against the token loops, outputs and every gradient, in float64
    worst = 0.0
    for title, errors in check_rule(rule, chunk=8).items():
        err = max(rel for _, rel in errors.values())
        worst = max(worst, err)
        print(f"{title:<45} worst relative RMS {err:.1e}")
    assert worst < 1e-10
    print("ok")


if __name__ == "__main__":
    main()
