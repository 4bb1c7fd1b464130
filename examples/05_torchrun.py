"""Multi-process training of a TNT byte-level LM: data parallel (DDP or FSDP2) × context parallel.

    torchrun --standalone --nproc_per_node 4 examples/05_torchrun.py --context 2 --parallel fsdp

The ranks form a (data, context) mesh. Each global batch is cut along the batch axis across the data
ranks and along time across the context ranks; the memory layers pass their states from one time
shard to the next (memdsl.distributed), and DDP/FSDP2 average the gradients over all ranks. One GPU
per process with NCCL when CUDA is there, else gloo on the CPU. Rank 0 prints the loss of every step
(the mean over all tokens of the global batch, the same number a single process would get).
"""

from __future__ import annotations

import argparse
import gzip
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from memdsl.distributed import data_parallel, enable_context_parallel, make_mesh, segment_multiple, shard_batch
from memdsl.models import TinyLM
from memdsl.tnt import TNTSchedule

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "text" / "shakespeare.txt.gz"


def corpus() -> torch.Tensor:
    if CORPUS.exists():
        with gzip.open(CORPUS, "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
    text = b"".join(f"{i} times {j} is {i * j}. ".encode() for i in range(1, 40) for j in range(1, 40))
    return torch.tensor(list(text))  # no corpus: a small text with something to learn


def global_batch(data: torch.Tensor, step: int, batch: int, seq: int) -> torch.Tensor:
    """The same [batch, seq + 1] window on every rank (seeded by the step)."""
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=torch.Generator().manual_seed(step))
    return torch.stack([data[s: s + seq + 1] for s in starts])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", default=str(ROOT / "rules" / "titans.mem"))
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--context", type=int, default=2, help="ranks per sequence (the rest are data parallel)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--global-chunk", type=int, default=32)
    ap.add_argument("--local-chunk", type=int, default=8)
    ap.add_argument("--reset", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device_type = "cuda" if cuda else "cpu"
    device = torch.device(device_type, torch.cuda.current_device()) if cuda else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = make_mesh(args.context, device_type)

    torch.manual_seed(0)  # the same initial weights on every rank
    schedule = TNTSchedule(args.global_chunk, ((args.local_chunk, args.reset),))
    model = TinyLM(args.rule, args.d_model, args.layers, heads=4, tnt=schedule).to(device)
    granule = args.context * segment_multiple(model)
    if args.seq % granule:
        raise SystemExit(f"--seq {args.seq} must be a multiple of {granule} (context × lcm(C_G, S_L))")
    enable_context_parallel(model, mesh.get_group("context"))
    model = data_parallel(model, args.parallel, device_type)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)

    data = corpus()
    curve, t0 = [], time.time()
    for step in range(args.steps):
        tokens = global_batch(data, step, args.batch, args.seq)
        x, y = (shard_batch(t, mesh).to(device) for t in (tokens[:, :-1], tokens[:, 1:]))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the memories' gates need it early on
        opt.step()
        report = loss.detach().clone()
        dist.all_reduce(report)  # equal shards: the mean of the ranks' means is the mean over all tokens
        curve.append(report.item() / world)
        if rank == 0:
            print(f"step {step}: loss {curve[-1]:.4f}", flush=True)
    seconds = time.time() - t0
    if rank == 0:
        data_ranks = world // args.context
        print(f"{args.parallel} on {world} ranks ({data_ranks} data x {args.context} context, {device_type}): "
              f"{args.steps} steps, {args.steps * args.batch * args.seq / seconds:.0f} tokens/s, "
              f"loss {curve[0]:.3f} -> {curve[-1]:.3f}")
    assert all(torch.isfinite(torch.tensor(curve))), "the loss is not finite"
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
