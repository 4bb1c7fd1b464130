"""Context and data parallelism on gloo: 2 and 4 CPU processes give the single-process results.

Each test launches N worker processes running this file (`python tests/test_distributed.py JOB DIR`);
every rank also computes the single-process reference itself, compares its part, and writes its
errors to DIR/rank<r>.json. Forward outputs, final states and gradients (of q, k, v, gates, params,
initial state, every model parameter) must agree to fp32 rounding (rel. RMS ≤ 1e-6), loss curves of
DDP / FSDP2 training with context-parallel shards to ≤ 1e-5 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TOL, CURVE_TOL = 1e-6, 1e-5
pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def _launch(job: str, n: int, timeout: float = 300) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WORLD_SIZE": str(n)}
        procs = [subprocess.Popen([sys.executable, __file__, job, tmp], cwd=ROOT, env={**env, "RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(n)]
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=timeout)[0])
        finally:
            for p in procs:  # a hung rank must fail the test, not block it
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for r, p in enumerate(procs):
            assert p.returncode == 0, f"rank {r} failed:\n" + "\n".join(logs)[-4000:]
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(n)]


def _check(results: list[dict]) -> None:
    bad = []
    for r, metrics in enumerate(results):
        for name, err in metrics.items():
            limit = CURVE_TOL if name.startswith("curve") else TOL
            if not err <= limit:
                bad.append(f"rank {r} {name}: {err:.3g} > {limit:g}")
    assert results[0], "no comparisons were made"
    assert not bad, "\n".join(bad)


def test_two_ranks_match_one():
    results = _launch("two", 2)
    names = set(results[0]) | set(results[1])
    for want in ("titans.grad.state.A.W1", "gated_deltanet.grad.q", "atlas.state.hist.k", "tnt.grad.local0.W1",
                 "scan.gated_deltanet.grad.state.A.W", "scan.gated_deltanet.grad.gate.beta",
                 "scan.linear_attention.grad.v", "scan.tnt.grad.global.W", "scan.tnt.grad.global.beta",
                 "scan.refuses_titans",
                 "model.plain.grad.blocks.0.mixer.memories.main.init_memory.W1",
                 "curve.ddp.plain", "curve.fsdp.tnt"):
        assert any(n.startswith(want) for n in names), f"{want} was not compared"
    _check(results)


def test_four_ranks_match_one():
    results = _launch("four", 4)
    names = set().union(*results)
    assert {"curve.ddp.tnt", "curve.fsdp.plain", "tnt.state.A.W1", "scan.tnt.state.A.W"} <= names
    assert {"scan.deltanet.y", "scan.deltanet.grad.k", "scan.deltanet.grad.state.A.W"} <= names
    _check(results)


def test_scan_composes_affine_maps_like_the_sequential_pass():
    """The local Hillis–Steele prefix over P affine maps (W ↦ W P + Q) equals applying them one by one."""
    from memdsl.distributed import _compose_prefix

    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4, 5, 8):
        maps = torch.randn(n, 2, 3, 4 + 4, 4, generator=gen, dtype=torch.float64)
        W0 = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
        prefix = _compose_prefix(maps)
        W = W0
        for r in range(n):
            W = W @ maps[r, ..., :4, :] + maps[r, ..., 4:, :]
            assert torch.allclose(W0 @ prefix[r, ..., :4, :] + prefix[r, ..., 4:, :], W, rtol=1e-12, atol=1e-12)


def test_affine_state_accepts_only_rules_linear_in_their_state():
    import memdsl
    from memdsl.distributed import affine_state

    assert all(affine_state(memdsl.compile(f"rules/{n}.mem")) for n in ("gated_deltanet", "deltanet",
                                                                          "linear_attention"))
    assert not any(affine_state(memdsl.compile(f"rules/{n}.mem")) for n in ("titans", "ttt_linear", "moneta"))
    assert not affine_state(lambda *a, **kw: None)


# ---- the worker -----------------------------------------------------------------------------------------------


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _rule_case(name, metrics, group, rank, size, rel_rms, method="sequential"):
    import torch.distributed as dist

    import memdsl
    from memdsl.checking import make_inputs
    from memdsl.distributed import context_parallel, shard

    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params = make_inputs(rule, B=2, T=8 * size, H=2, D=3, dtype=torch.float32, seed=1)
    gen = torch.Generator().manual_seed(2)
    state0 = {k: t + 0.1 * torch.randn(t.shape, generator=gen) for k, t in
              rule.init_state(2, 2, 3, params=params).items()}

    def run(distributed: bool):
        tk, gt, pr, st = ({n: _leaf(t) for n, t in d.items()} for d in (tok, gates, params, state0))
        if not distributed:
            y, fin = rule(tk["q"], tk["k"], tk["v"], gt, pr, st, chunk=4)
            return y, fin, tk, gt, pr, st
        sh = {n: _leaf(shard(t, group)) for n, t in tk.items()}
        gs = {n: _leaf(shard(t, group)) for n, t in gt.items()}
        y, fin = context_parallel(rule, sh["q"], sh["k"], sh["v"], gs, pr, st if rank == 0 else None, group,
                                  method=method, chunk=4)
        return y, fin, sh, gs, pr, st

    y_ref, s_ref, *ref_in = run(False)
    name = name if method == "sequential" else f"{method}.{name}"
    y, s, *cp_in = run(True)
    gen = torch.Generator().manual_seed(3)
    ct = torch.randn(y_ref.shape, generator=gen)
    ct_s = {k: torch.randn(t.shape, generator=gen) for k, t in sorted(s_ref.items())}
    ((y_ref * ct).sum() + sum((s_ref[k] * c).sum() for k, c in ct_s.items())).backward()
    loss = (y * shard(ct, group)).sum()
    if rank == size - 1:
        loss = loss + sum((s[k] * c).sum() for k, c in ct_s.items())
        metrics.update({f"{name}.state.{k}": rel_rms(s[k], s_ref[k]) for k in s_ref})
    loss.backward()
    metrics[f"{name}.y"] = rel_rms(y, shard(y_ref, group))
    for kind, got, ref in zip(("tok", "gate"), cp_in[:2], ref_in[:2], strict=True):
        for n in ref:
            metrics[f"{name}.grad.{n}" if kind == "tok" else f"{name}.grad.gate.{n}"] = rel_rms(
                got[n].grad, shard(ref[n].grad, group))
    for n, p in cp_in[2].items():  # every rank holds part of each parameter's gradient
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=group)
        r = ref_in[2][n].grad  # None: the initial memory, replaced by the explicit initial state
        metrics[f"{name}.grad.param.{n}"] = rel_rms(g, r) if r is not None else g.abs().max().item()
    if rank == 0:
        for k, t in cp_in[3].items():
            metrics[f"{name}.grad.state.{k}"] = rel_rms(t.grad, ref_in[3][k].grad)


def _tnt_case(metrics, group, rank, size, rel_rms, method="sequential"):
    """Titans everywhere (sequential pass), or (scan) a gated delta rule as the global memory — linear in its
    state — over Titans locals."""
    import torch.distributed as dist

    import memdsl
    from memdsl.checking import make_inputs
    from memdsl.distributed import shard, tnt_context_parallel
    from memdsl.tnt import TNTSchedule, tnt_forward

    rule = memdsl.compile("rules/titans.mem")
    schedule = TNTSchedule(8, ((2, 8), (4, 16)))
    tok, gates, params = make_inputs(rule, B=2, T=16 * size, H=2, D=3, dtype=torch.float32, seed=4)
    gates = {**gates, **{f"local0.{n}": g.flip(1) for n, g in gates.items()}}
    params = {**params, **{f"local0.{n}": p * 0.5 for n, p in params.items()}}
    global_rule, key, prefix = rule, "A.W1", "tnt"
    if method == "scan":
        global_rule, key, prefix = memdsl.compile("rules/gated_deltanet.mem"), "A.W", "scan.tnt"
        _, g_gates, g_params = make_inputs(global_rule, B=2, T=16 * size, H=2, D=3, dtype=torch.float32, seed=6)
        gates.update({f"global.{n}": g for n, g in g_gates.items()})
        params.update({f"global.{n}": p for n, p in g_params.items()})
    ref = [{n: _leaf(t) for n, t in d.items()} for d in (tok, gates, params)]
    y_ref, s_ref = tnt_forward(global_rule, [rule, rule], ref[0]["q"], ref[0]["k"], ref[0]["v"], ref[1], ref[2],
                               schedule, return_state=True)
    cp = [{n: _leaf(shard(t, group)) for n, t in d.items()} for d in (tok, gates)] + [
        {n: _leaf(t) for n, t in params.items()}]
    y, s = tnt_context_parallel(global_rule, [rule, rule], cp[0]["q"], cp[0]["k"], cp[0]["v"], cp[1], cp[2],
                                schedule, group=group, method=method)
    ct = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(5))
    ((y_ref * ct).sum() + s_ref[key].sum()).backward()
    loss = (y * shard(ct, group)).sum()
    if rank == size - 1:
        loss = loss + s[key].sum()
        metrics[f"{prefix}.state.{key}"] = rel_rms(s[key], s_ref[key])
    loss.backward()
    metrics[f"{prefix}.y"] = rel_rms(y, shard(y_ref, group))
    for i in (0, 1):
        for n in ref[i]:
            metrics[f"{prefix}.grad.{n}"] = rel_rms(cp[i][n].grad, shard(ref[i][n].grad, group))
    for n, p in cp[2].items():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=group)
        metrics[f"{prefix}.grad.{n}"] = rel_rms(g, ref[2][n].grad)


def _scan_refuses(name, group) -> float:
    """0 when context_parallel(method="scan") refuses a rule that is not linear in its state (before any message)."""
    import memdsl
    from memdsl.checking import make_inputs
    from memdsl.distributed import context_parallel

    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params = make_inputs(rule, B=1, T=8, H=1, D=3, dtype=torch.float32)
    try:
        context_parallel(rule, tok["q"], tok["k"], tok["v"], gates, params, group=group, method="scan", chunk=4)
    except ValueError as err:
        return 0.0 if "affine" in str(err) else 1.0
    return 1.0


def _tiny_lm(tnt: bool):
    from memdsl.models import TinyLM
    from memdsl.tnt import TNTSchedule

    torch.manual_seed(0)
    return TinyLM("rules/titans.mem", d_model=16, layers=2, heads=2, chunk=4,
                  tnt=TNTSchedule(8, ((4, 8),)) if tnt else None)


def _batch(step: int, B: int = 4, T: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (B, T + 1), generator=torch.Generator().manual_seed(100 + step))


def _model_case(kind, metrics, mesh, rel_rms):
    """Context parallelism only: logits and every parameter's gradient of a TinyLM."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from memdsl.distributed import enable_context_parallel, shard_batch

    group = mesh.get_group("context")
    ref, model = _tiny_lm(kind == "tnt"), _tiny_lm(kind == "tnt")
    enable_context_parallel(model, group)
    tokens = _batch(0, B=2, T=8 * dist.get_world_size(group))
    logits_ref = ref(tokens[:, :-1])
    F.cross_entropy(logits_ref.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").backward()
    logits = model(shard_batch(tokens[:, :-1], mesh))
    F.cross_entropy(logits.flatten(0, 1), shard_batch(tokens[:, 1:], mesh).flatten(), reduction="sum").backward()
    metrics[f"model.{kind}.logits"] = rel_rms(logits, shard_batch(logits_ref, mesh))
    with torch.no_grad():  # evaluation: states pass without autograd
        metrics[f"model.{kind}.logits_no_grad"] = rel_rms(model(shard_batch(tokens[:, :-1], mesh)),
                                                          shard_batch(logits_ref, mesh))
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=group)
        metrics[f"model.{kind}.grad.{n}"] = rel_rms(g, ref_params[n].grad)


def _curve(model, mesh, steps: int = 3) -> list[float]:
    import torch.distributed as dist
    import torch.nn.functional as F

    from memdsl.distributed import shard_batch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    curve = []
    for step in range(steps):
        tokens = _batch(step)
        x, y = tokens[:, :-1], tokens[:, 1:]
        if mesh is not None:
            x, y = shard_batch(x, mesh), shard_batch(y, mesh)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        report = loss.detach().clone()
        if mesh is not None:  # equal shards: the mean of the ranks' means is the mean over all tokens
            dist.all_reduce(report)
            report /= dist.get_world_size()
        curve.append(report.item())
    return curve


def _train_case(mode, kind, metrics, context):
    import torch.distributed as dist

    from memdsl.distributed import data_parallel, enable_context_parallel, make_mesh

    mesh = make_mesh(context)
    model = _tiny_lm(kind == "tnt")
    enable_context_parallel(model, mesh.get_group("context"))
    got = _curve(data_parallel(model, mode), mesh)
    if dist.get_rank() == 0:  # every rank reports the same all-reduced curve: one reference is enough
        ref = _curve(_tiny_lm(kind == "tnt"), None)
        assert len(set(ref)) == len(ref), "the reference loss did not move"
        metrics[f"curve.{mode}.{kind}"] = max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True))


def _worker(job: str, out: str) -> None:
    import torch.distributed as dist

    from memdsl.checking import rel_rms
    from memdsl.distributed import make_mesh

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=size,
                            timeout=timedelta(seconds=240))
    metrics: dict[str, float] = {}
    cp_mesh = make_mesh(size)  # every rank holds a time shard
    group = cp_mesh.get_group("context")
    if job == "two":
        for name in ("titans", "gated_deltanet", "atlas"):
            _rule_case(name, metrics, group, rank, size, rel_rms)
        _tnt_case(metrics, group, rank, size, rel_rms)
        for name in ("gated_deltanet", "linear_attention"):
            _rule_case(name, metrics, group, rank, size, rel_rms, method="scan")
        _tnt_case(metrics, group, rank, size, rel_rms, method="scan")
        metrics["scan.refuses_titans"] = _scan_refuses("titans", group)
        for kind in ("plain", "tnt"):
            _model_case(kind, metrics, cp_mesh, rel_rms)
        _train_case("ddp", "plain", metrics, context=2)
        _train_case("fsdp", "tnt", metrics, context=2)
    else:
        _rule_case("titans", metrics, group, rank, size, rel_rms)
        _tnt_case(metrics, group, rank, size, rel_rms)
        _rule_case("deltanet", metrics, group, rank, size, rel_rms, method="scan")
        _tnt_case(metrics, group, rank, size, rel_rms, method="scan")
        _train_case("ddp", "tnt", metrics, context=2)  # 2-D mesh: 2 data × 2 context
        _train_case("fsdp", "plain", metrics, context=2)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(metrics))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
