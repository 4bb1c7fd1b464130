"""The correctness foundation (MATH.md §1.3, §10): every shipped rule, every torch backend.

* exact token loop == chunk program at C = 1;
* anchored token loop (anchor = chunk-start state) == chunk program at C in {2, 4, 16, 64};
* WY/UT == exact loop for any C, for the delta rules;
— outputs, final state and every input gradient, fp64 to 1e-10 and fp32 to 1e-5 relative RMS,
odd T and D.
"""

from __future__ import annotations

import pytest
import torch

import memdsl
from memdsl.checking import make_inputs, run_with_grads
from tests.conftest import RULE_IDS, RULES
from tests.helpers import rel_rms

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# Sequence lengths: odd, more than one chunk, and short enough that the nonlinear rules' chaotic
# dynamics (moneta's lq normalisation, atlas' Newton–Schulz) do not amplify rounding past the bound:
# the two programs round differently, and that difference grows with T (measured: ~10x per 8 tokens).
LENGTH = {1: 9, 2: 9, 4: 11, 16: 19, 64: 67}
# fp32 bounds above 1e-5, each measured and explained: Newton–Schulz (atlas) multiplies the rounding
# of its input by up to a^5 = 3.4445^5 ≈ 500 on small singular directions; moneta's lq projection
# divides by a sum of fourth powers; memora's state is the logits of a row softmax, whose gradient
# flows back through exp of those logits; yaad's LayerNorm of a small memory output is so conditioned
# that the fp32 token loop itself is 1.4e-5 from the fp64 result (measured). Measured worst cases on
# these inputs: 1.2e-3, 3.4e-5, 1.1e-4, 3e-5.
FP32_TOL = {"atlas": 2e-3, "moneta": 1e-4, "memora": 2e-4, "yaad": 6e-5}


def compare(a, b, tol, what):
    ya, sa, ga = a
    yb, sb, gb = b
    errors = {"y": rel_rms(ya, yb)}
    errors.update({f"state.{k}": rel_rms(sa[k], sb[k]) for k in sb})
    errors.update({f"grad.{k}": rel_rms(ga[k], gb[k]) for k in gb if gb[k].abs().sum() > 0 or ga[k].abs().sum() > 0})
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{what}: {bad}"
    return errors


@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_exact_loop_equals_chunk_program_at_c1(path):
    rule = memdsl.compile(str(path))
    tok, gates, params = make_inputs(rule, T=9, D=3)
    ref = run_with_grads(rule, tok, gates, params, backend="loop")
    got = run_with_grads(rule, tok, gates, params, backend="chunk", chunk=1)
    compare(got, ref, TOL[torch.float64], "C=1")


@pytest.mark.parametrize("chunk", [2, 4, 16])
@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_anchored_loop_equals_chunk_program(path, chunk):
    rule = memdsl.compile(str(path))
    tok, gates, params = make_inputs(rule, T=LENGTH[chunk], D=3)
    ref = run_with_grads(rule, tok, gates, params, backend="anchored_loop", chunk=chunk)
    got = run_with_grads(rule, tok, gates, params, backend="chunk", chunk=chunk)
    compare(got, ref, TOL[torch.float64], f"C={chunk}")


@pytest.mark.slow
@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_anchored_loop_equals_chunk_program_c64(path):
    rule = memdsl.compile(str(path))
    tok, gates, params = make_inputs(rule, T=LENGTH[64], H=1, B=1, D=3, high=0.15)
    ref = run_with_grads(rule, tok, gates, params, backend="anchored_loop", chunk=64)
    got = run_with_grads(rule, tok, gates, params, backend="chunk", chunk=64)
    compare(got, ref, TOL[torch.float64], "C=64")


@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_fp32_anchored_loop_equals_chunk_program(path):
    rule = memdsl.compile(str(path))
    tok, gates, params = make_inputs(rule, T=LENGTH[4], D=5, dtype=torch.float32)
    ref = run_with_grads(rule, tok, gates, params, backend="anchored_loop", chunk=4)
    got = run_with_grads(rule, tok, gates, params, backend="chunk", chunk=4)
    compare(got, ref, FP32_TOL.get(path.stem, TOL[torch.float32]), "fp32 C=4")


DELTA_RULES = [p for p in RULES if memdsl.load(str(p)).algorithm == "wy"]


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
@pytest.mark.parametrize("path", DELTA_RULES, ids=[p.stem for p in DELTA_RULES])
def test_wy_equals_exact_loop_for_any_chunk(path, chunk):
    rule = memdsl.compile(str(path))
    tok, gates, params = make_inputs(rule, T=23, D=5)
    ref = run_with_grads(rule, tok, gates, params, backend="loop")
    got = run_with_grads(rule, tok, gates, params, backend="wy", chunk=chunk)
    compare(got, ref, TOL[torch.float64], f"WY C={chunk}")


def test_delta_rules_are_found():
    assert {p.stem for p in DELTA_RULES} == {"deltanet", "gated_deltanet"}


@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_chunk_size_is_semantic_for_anchored_rules(path):
    """C changes the function for anchored rules; for exact algorithms it must not."""
    rule = memdsl.compile(str(path))
    tok, gates, params = make_inputs(rule, T=16, D=3)
    y2, _ = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=2)
    y8, _ = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=8)
    if rule.algorithm in ("wy", "linear"):
        assert rel_rms(y2, y8) < 1e-10
    else:
        assert rel_rms(y2, y8) > 1e-8


@pytest.mark.parametrize("path", [p for p in RULES if memdsl.compile(str(p)).spec["dual"]],
                         ids=[p.stem for p in RULES if memdsl.compile(str(p)).spec["dual"]])
def test_dual_form_equals_materialized_chunk_program(path):
    rule = memdsl.compile(str(path))
    tok, gates, params = make_inputs(rule, T=LENGTH[4], D=3)
    ref = run_with_grads(rule, tok, gates, params, backend="materialized", chunk=4)
    got = run_with_grads(rule, tok, gates, params, backend="dual", chunk=4)
    compare(got, ref, TOL[torch.float64], "dual vs materialized")


def _variant(name: str, old: str, new: str) -> str:
    text = (RULES[0].parent / f"{name}.mem").read_text()
    assert old in text, (name, old)
    return text.replace(old, new)


VARIANTS = {
    "read_before": _variant("titans", "read M(q)", "read M(q) before"),
    "read_before_window": _variant("omeganet", "read M(phi(q))", "read M(phi(q)) before"),
    "l2_retention": _variant("titans_linear", "retain decay(1 - alpha)", "retain l2(rate = alpha)"),
    "l2_and_decay": _variant("titans", "retain decay(1 - alpha)", "retain decay(1 - eta), l2(rate = alpha)"),
    "elastic": _variant("titans_linear", "retain decay(1 - alpha)", "retain elastic(1 - alpha, threshold = 0.01)")
    .replace("momentum(lr = theta, decay = eta)", "gd(lr = theta)"),
    "channel_momentum": _variant("titans_linear", "gate eta   : scalar sigmoid", "gate eta   : [d] sigmoid"),
    "channel_lr_cols": _variant("deltanet", "param W : [d, d]", "input v : [2*d]\n  param W : [2*d, d]")
    .replace("gate beta : scalar sigmoid", "gate beta : [d] sigmoid"),
    "muon_window": _variant("atlas", "window 4 weight gamma", "window 2"),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_anchored_loop_equals_chunk_program(name):
    rule = memdsl.compile(VARIANTS[name])
    for chunk, T in ((1, 7), (4, LENGTH[4])):
        tok, gates, params = make_inputs(rule, T=T, D=3)
        ref = run_with_grads(rule, tok, gates, params, backend="anchored_loop", chunk=chunk)
        for backend in ("chunk", "materialized"):
            got = run_with_grads(rule, tok, gates, params, backend=backend, chunk=chunk)
            compare(got, ref, TOL[torch.float64], f"{name} {backend} C={chunk}")
        if chunk == 1:
            exact = run_with_grads(rule, tok, gates, params, backend="loop")
            compare(ref, exact, TOL[torch.float64], f"{name} exact")


@pytest.mark.parametrize("cu, has_history", [([0, 7, 7, 20], False), ([0, 2, 20], False), ([0, 9, 20], True)])
def test_packed_windowed_rule_equals_separate_calls(cu, has_history):
    """cu_seqlens on the torch path, a rule with an Omega window: each sequence equals its own call; an
    empty or short sequence has no history of the common length, so the packed state has none (as
    the kernels' launcher), and the memory state is still returned."""
    rule = memdsl.compile("rules/omeganet.mem")
    tok, gates, params = make_inputs(rule, B=1, T=20, H=2, D=8, dtype=torch.float64)
    y, state = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=4, cu_seqlens=torch.tensor(cu))
    for i, (lo, hi) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        if hi == lo:
            continue
        part = {n: g[:, lo:hi] for n, g in gates.items()}
        y_one, s_one = rule(tok["q"][:, lo:hi], tok["k"][:, lo:hi], tok["v"][:, lo:hi], part, params, chunk=4)
        assert rel_rms(y[:, lo:hi], y_one) <= 1e-12
        for n in (n for n in s_one if not n.startswith("hist.")):
            assert rel_rms(state[n][i:i + 1], s_one[n]) <= 1e-12, n
    assert any(n.startswith("hist.") for n in state) == has_history
    assert any(not n.startswith("hist.") for n in state)


def test_auto_dispatch_on_cuda_asks_whether_the_kernels_fit_these_sizes():
    """backend="auto" on CUDA tensors takes the Triton kernels only when they can be generated at the call's
    sizes and chunk; else the torch paths (no GPU here: the decision itself is checked)."""
    atlas, titans = memdsl.compile("rules/atlas.mem"), memdsl.compile("rules/titans.mem")
    x16, x64 = torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 64)
    assert atlas._kernels_fit(x16, x16, x16, 16, None)
    assert not atlas._kernels_fit(x64, x64, x64, 16, None)  # per-position tiles past 2^20 elements
    assert titans._kernels_fit(x64, x64, x64, 16, None)
    assert not titans._kernels_fit(x64, x64, x64, 12, None)  # not a power of two
    x48 = torch.zeros(1, 4, 1, 48)
    assert not titans._kernels_fit(x48, x48, x48, 16, None)  # a width that is not a power of two


def test_auto_falls_back_to_torch_when_a_kernel_fails_on_the_device(monkeypatch):
    """A generated kernel that Triton cannot compile or launch on the device (say, out of shared memory):
    backend="auto" warns once, runs the torch program and does not try those kernels again at these sizes;
    backend="triton" raises; an error that is not Triton's (a bad call) is never swallowed. No GPU here: the
    device check and the launch are replaced."""
    from triton.runtime.errors import OutOfResources

    from codegen import triton_run
    rule = memdsl.compile("rules/titans.mem")
    tok, gates, params = make_inputs(rule, B=1, T=37, H=2, D=16, dtype=torch.float32)
    args = (tok["q"], tok["k"], tok["v"], gates, params)
    with torch.no_grad():
        want, _ = rule(*args)  # the torch program (CPU)
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        raise OutOfResources(262144, 232448, "shared memory")
    monkeypatch.setattr("memdsl.api._on_gpu", lambda q: True)
    monkeypatch.setattr(triton_run, "run_triton", failing)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="failed here.*OutOfResources"):
            got, _ = rule(*args)
        assert torch.equal(got, want) and len(calls) == 1
        again, _ = rule(*args)  # remembered: the kernels are not tried again at these sizes
        assert torch.equal(again, want) and len(calls) == 1
        with pytest.raises(OutOfResources):
            rule(*args, backend="triton")
        rule(*(x[:, :20] for x in args[:3]), {n: g[:, :20] for n, g in gates.items()}, params)
        assert len(calls) == 2  # another length, the same kernels: not tried again
        t32, g32, p32 = make_inputs(rule, B=1, T=21, H=2, D=32, dtype=torch.float32)
        with pytest.warns(RuntimeWarning):  # other widths, other kernels: tried
            rule(t32["q"], t32["k"], t32["v"], g32, p32)
        assert len(calls) == 3

    def bad_call(*a, **kw):
        raise ValueError("not Triton's error")
    monkeypatch.setattr(triton_run, "run_triton", bad_call)
    fresh = memdsl.compile("rules/titans_linear.mem")
    t2, g2, p2 = make_inputs(fresh, B=1, T=21, H=2, D=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="not Triton's error"):
        fresh(t2["q"], t2["k"], t2["v"], g2, p2)


def test_auto_falls_back_when_the_backward_kernel_fails_on_the_device(monkeypatch):
    """The backward kernel is compiled at the first backward, after its forward ran. When Triton cannot run it
    (out of shared memory, say), backend="auto" warns, computes that backward with the torch tile program on
    the same buffers (the gradients equal the torch path's) and runs the torch program at these sizes from
    then on; backend="triton" raises. No GPU: the device check is replaced, the forward kernel runs in
    Triton's interpreter, the backward kernel fails as the device would."""
    from triton.runtime.errors import OutOfResources

    from codegen import triton_run
    rule = memdsl.compile("rules/titans_linear.mem")
    tok, gates, params = make_inputs(rule, B=1, T=37, H=2, D=16, dtype=torch.float32)
    kernel_for = triton_run.kernel_for
    built = []

    class Failing:
        def __getitem__(self, grid):
            def run(*a, **kw):
                raise OutOfResources(262144, 232448, "shared memory")
            return run

    def kernels(rule, sizes, chunk, direction="fwd", read_order=None):
        built.append(direction)
        return Failing() if direction == "bwd" else kernel_for(rule, sizes, chunk, direction, read_order)
    monkeypatch.setattr("memdsl.api._on_gpu", lambda q: True)
    monkeypatch.setattr(triton_run, "kernel_for", kernels)

    def grads(backend):
        leaves = {n: t.clone().requires_grad_() for n, t in {**tok, **gates}.items()}
        y, _ = rule(leaves["q"], leaves["k"], leaves["v"], {n: leaves[n] for n in gates}, params, backend=backend)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return [leaves[n].grad for n in leaves]
    want = grads("chunk")
    with pytest.warns(RuntimeWarning, match="failed here.*OutOfResources"):
        got = grads("auto")
    assert built == ["fwd", "bwd"]
    assert all(rel_rms(a, b) < 1e-5 for a, b in zip(got, want, strict=True))
    grads("auto")  # remembered: the torch program, no kernel built again
    assert built == ["fwd", "bwd"]
    with pytest.raises(OutOfResources):
        grads("triton")


def test_which_errors_count_as_tritons():
    """The fallback above takes Triton's own errors only: its exception classes, or an error raised inside
    the triton package (its compiler passes raise plain RuntimeErrors); never an error of the call."""
    import os

    from triton.runtime.errors import OutOfResources

    from codegen.triton_launch import raised_by_triton

    def raised(code: str, filename: str) -> BaseException:
        try:
            exec(compile(code, filename, "exec"), {})
        except Exception as err:  # noqa: BLE001 - the error is the value under test
            return err
        raise AssertionError("no error")
    assert raised_by_triton(OutOfResources(1, 0, "shared memory"))
    inside = os.path.join(os.sep, "site-packages", "triton", "compiler", "compiler.py")
    assert raised_by_triton(raised("raise RuntimeError('PassManager::run failed')", inside))
    assert not raised_by_triton(raised("raise RuntimeError('a user error')", os.path.join(os.sep, "work", "x.py")))
    assert not raised_by_triton(raised("raise ValueError('bad shapes')", __file__))


def test_wy_backend_with_a_read_order():
    """backend="wy" with read_order="after" is the WY algorithm (it used to switch to the anchored chunk
    program, a different function, whenever any read_order was passed); another order is refused."""
    rule = memdsl.compile("rules/deltanet.mem")
    tok, gates, params = make_inputs(rule, B=1, T=37, H=2, D=8, dtype=torch.float64)
    args = (tok["q"], tok["k"], tok["v"], gates, params)
    y_wy, _ = rule(*args, backend="wy", chunk=16)
    y_after, _ = rule(*args, backend="wy", chunk=16, read_order="after")
    y_exact, _ = rule(*args, backend="loop")
    y_anchored, _ = rule(*args, backend="chunk", chunk=16)
    assert rel_rms(y_after, y_wy) <= 1e-12 and rel_rms(y_after, y_exact) <= 1e-10
    assert rel_rms(y_anchored, y_exact) > 1e-6  # the anchored program is another function: the check can fail
    with pytest.raises(ValueError, match="reads after the write"):
        rule(*args, backend="wy", chunk=16, read_order="before")
