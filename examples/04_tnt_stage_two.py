"""TNT's two stages (MATH.md §6) on the tiny byte-level LM: train with a global memory (large chunk)
plus a local memory (small chunk, reset every S_L tokens), then switch the local chunk size with
`finetune_schedule` and fine-tune briefly. Prints the validation loss at each step of the story.

    python examples/04_tnt_stage_two.py [--steps 300] [--stage2-steps 60] [--max-lr 0.01]

The memories' inner learning rate is capped (`MemoryLayer.max_lr`, read as max_lr·sigmoid(x)). Without
the cap (`--max-lr 0`: a plain sigmoid, up to 1) `--steps 150 --stage2-steps 30` ended stage one with a
NaN validation loss on this corpus; with the default cap the same run ended at 2.32 nats/byte.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import torch

from memdsl.models import TinyLM
from memdsl.nn import MemoryLayer
from memdsl.tnt import TNTSchedule, finetune_schedule

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("tiny_lm", ROOT / "examples" / "03_tiny_lm.py")
tiny_lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_lm)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", default=str(ROOT / "rules" / "titans.mem"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--stage2-steps", type=int, default=60)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--global-chunk", type=int, default=64)
    ap.add_argument("--local-chunk", type=int, default=16)
    ap.add_argument("--stage2-chunk", type=int, default=4)
    ap.add_argument("--reset", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--max-lr", type=float, default=1e-2, help="inner learning-rate cap (0: none)")
    args = ap.parse_args(argv)
    if not tiny_lm.CORPUS.exists():
        print(f"corpus not found: {tiny_lm.CORPUS} (see the README's Data section)")
        return
    schedule = TNTSchedule(args.global_chunk, ((args.local_chunk, args.reset),))
    common = dict(batch=args.batch, seq=args.seq, d_model=args.d_model, layers=2, heads=4, chunk=None, lr=3e-3)
    torch.manual_seed(0)
    model = TinyLM(args.rule, args.d_model, 2, 4, None, schedule)
    for layer in model.modules():
        if isinstance(layer, MemoryLayer):
            layer.max_lr = args.max_lr or None
    stage1 = tiny_lm.train(args.rule, args.steps, args.minutes, seed=0, model=model, **common)
    corpus = tiny_lm.load_corpus()
    val = corpus[int(0.95 * len(corpus)):]

    def val_loss() -> float:
        return tiny_lm.evaluate(model, val, args.batch, args.seq, torch.Generator().manual_seed(1))

    loss_s1 = val_loss()
    finetune_schedule(model, [args.stage2_chunk], freeze_others=True)
    loss_switched = val_loss()
    stage2 = tiny_lm.train(args.rule, args.stage2_steps, args.minutes, seed=2, model=model,
                           **{**common, "lr": 1e-3})
    loss_s2 = stage2["val_after"]
    print(f"stage 1 (local chunk {args.local_chunk}): {stage1['steps']} steps, validation loss "
          f"{stage1['val_before']:.4f} -> {loss_s1:.4f}")
    print(f"local chunk switched to {args.stage2_chunk} without training: {loss_switched:.4f}")
    print(f"stage 2 ({stage2['steps']} steps, local memories only): {loss_s2:.4f}")
    assert all(map(math.isfinite, (loss_s1, loss_switched, loss_s2))), "a validation loss is not finite"
    assert loss_s1 < stage1["val_before"], "stage one did not learn"


if __name__ == "__main__":
    main()
