"""One entry point for every rule: memdsl.compile on a 2-D rule is compile_2d's Rule2D, and
`memdsl compile FILE -o` writes a standalone (torch-only) 2-D module equal to the in-process rule."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import memdsl
from memdsl.twod import Rule2D, compile_2d
from tests.conftest import ROOT, RULE_2D_IDS, RULES_2D

B, T, V, H, D = 1, 5, 3, 2, 3


def _inputs(rule, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = [torch.randn(B, T, V, H, D, generator=g, dtype=dtype) for _ in range(3)]
    # gates arrive activated (the layer applies sigmoid/softplus): positive values in the range they take
    gates = {n: torch.rand(B, T, V, H, generator=g, dtype=dtype) * 0.6 + 0.05 for n in sorted(rule.spec1d["gates"])}
    return toks, gates


def _run(call, toks, gates, **kw):
    """y, final state and the gradients of a fixed random functional of both w.r.t. every input."""
    toks = [x.clone().requires_grad_() for x in toks]
    gates = {n: x.clone().requires_grad_() for n, x in gates.items()}
    y, state = call(*toks, gates, **kw)
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum() for _, s in sorted(state.items()))
    grads = torch.autograd.grad(loss, [*toks, *gates.values()])
    return y.detach(), {k: s.detach() for k, s in state.items()}, grads


def _equal(a, b):
    (ya, sa, ga), (yb, sb, gb) = a, b
    assert torch.equal(ya, yb), (ya - yb).abs().max()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))


@pytest.mark.parametrize("path", RULES_2D, ids=RULE_2D_IDS)
def test_memdsl_compile_returns_the_2d_rule(path):
    for tile in (None, (2, 3)):
        rule = memdsl.compile(str(path), tile=tile)
        assert isinstance(rule, Rule2D)
        want = compile_2d(str(path), tile=tile)
        assert rule.tile == want.tile
        toks, gates = _inputs(rule)
        _equal(_run(rule, toks, gates), _run(want, toks, gates))


def test_a_1d_option_on_a_2d_rule_is_refused(tmp_path):
    path = str(RULES_2D[0])
    with pytest.raises(ValueError, match=r"chunk is a 1-D option.*tile=\(T, V\)"):
        memdsl.compile(path, chunk=8)
    res = subprocess.run([sys.executable, "-m", "memdsl.cli", "compile", path, "--chunk", "8"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "chunk is a 1-D option" in res.stderr, res.stderr


def _import_without_memdsl(out, monkeypatch):
    """Import the generated file with memdsl and codegen unimportable: standalone means torch only."""
    with monkeypatch.context() as m:
        for name in [n for n in sys.modules if n.split(".")[0] in ("memdsl", "codegen")]:
            m.delitem(sys.modules, name)
        m.setitem(sys.modules, "memdsl", None)
        m.setitem(sys.modules, "codegen", None)
        with pytest.raises(ImportError):
            importlib.import_module("memdsl.twod")
        spec = importlib.util.spec_from_file_location(f"gen2d_{out.stem}", out)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod


@pytest.mark.parametrize("path", RULES_2D, ids=RULE_2D_IDS)
def test_generated_2d_module_equals_in_process(path, tmp_path, monkeypatch):
    out = tmp_path / f"{path.stem}_mem.py"
    res = subprocess.run([sys.executable, "-m", "memdsl.cli", "compile", str(path), "-o", str(out), "--tile", "2,2"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    imports = [line for line in out.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["import math", "import torch"]  # standalone: torch only
    rule = compile_2d(str(path), tile=(2, 2))
    toks, gates = _inputs(rule)
    want = {b: _run(rule, toks, gates, backend=b) for b in ("wavefront", "tiles", "anchored_loop")}
    layer_in = rule.module_class()(n_heads=H, d=D)
    y_layer_in, _ = layer_in(*(x.float() for x in toks), {n: x.float() for n, x in gates.items()})
    for mod in _import_without_memdsl(out, monkeypatch):  # the calls too: nothing may import memdsl lazily
        assert mod.RULE.tile == (2, 2) and mod.RULE.algorithm == rule.algorithm
        for backend, expected in want.items():
            _equal(_run(mod.memory, toks, gates, backend=backend), expected)
        y_layer, _ = mod.Memory(n_heads=H, d=D)(*(x.float() for x in toks), {n: x.float() for n, x in gates.items()})
        assert torch.equal(y_layer, y_layer_in)
        assert sorted(n for n, _ in mod.Memory(n_heads=H, d=D).named_parameters()) == \
            sorted(n for n, _ in layer_in.named_parameters())


_TRITON_CHECK = r'''
import importlib.util, sys, torch
path, rule_path = sys.argv[1], sys.argv[2]
blocked = {"memdsl": None, "codegen": None}
sys.modules.update(blocked)  # the generated module and its kernels run without memdsl
spec = importlib.util.spec_from_file_location("gen2d_triton", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)


def run(call, V):
    g = torch.Generator().manual_seed(V)
    toks = [torch.randn(1, 5, V, 2, 3, generator=g).requires_grad_() for _ in range(3)]
    gates = {n: (torch.rand(1, 5, V, 2, generator=g) * 0.6 + 0.05).requires_grad_() for n in sorted(mod.SPEC["gates"])}
    y, state = call(*toks, gates, backend="triton")
    w = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=w)).sum() + sum((s * torch.randn(s.shape, generator=w)).sum()
                                                               for _, s in sorted(state.items()))
    return y, state, torch.autograd.grad(loss, [*toks, *gates.values()])


got = {V: run(mod.memory, V) for V in (2, 3)}  # one variate chunk of the 2 x 2 tile, and several
try:
    mod.memory(*[torch.zeros(1, 5, 3, 2, 3)] * 3, {n: torch.ones(1, 5, 3, 2) for n in mod.SPEC["gates"]},
               backend="triton", tile=(4, 4))
    raise SystemExit("a tile other than the module's must be refused")
except ValueError as err:
    assert "module's tile" in str(err), err
for name in blocked:
    del sys.modules[name]
from memdsl.twod import compile_2d
rule = compile_2d(rule_path, tile=(2, 2))
for V, (y, state, grads) in got.items():
    y0, state0, grads0 = run(rule, V)
    assert torch.equal(y, y0), (V, (y - y0).abs().max())
    assert state.keys() == state0.keys() and all(torch.equal(state[k], state0[k]) for k in state)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads0, strict=True)), V
print("ok")
'''


@pytest.mark.parametrize("path", RULES_2D, ids=RULE_2D_IDS)
def test_generated_2d_module_carries_the_triton_kernels(path, tmp_path):
    """--triton d=3: the module's kernels (TRITON_INTERPRET=1) == the in-process Rule2D's backend='triton',
    outputs, final state and every gradient, with one variate chunk and with several."""
    out = tmp_path / f"{path.stem}_mem.py"
    res = subprocess.run([sys.executable, "-m", "memdsl.cli", "compile", str(path), "-o", str(out), "--tile", "2,2",
                          "--triton", "d=3"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    script = tmp_path / "check.py"
    script.write_text(_TRITON_CHECK)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(script), str(out), str(path)], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


def test_generated_2d_module_falls_back_to_its_torch_tiles(tmp_path, monkeypatch):
    """The --triton module's `auto` on a device where Triton cannot compile or launch the carried kernels:
    one warning, the module's torch tiles (the same function), not retried at those sizes; backend="triton"
    raises. No GPU here: auto's choice and the launch are replaced."""
    from triton.runtime.errors import OutOfResources
    path = ROOT / "rules" / "chimera.mem"
    out = tmp_path / "chimera_fallback.py"
    res = subprocess.run([sys.executable, "-m", "memdsl.cli", "compile", str(path), "-o", str(out), "--tile", "2,2",
                          "--triton", f"d={D}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    spec = importlib.util.spec_from_file_location("gen2d_fallback", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    toks, gates = _inputs(compile_2d(str(path)), dtype=torch.float32)
    want = _run(mod.memory, toks, gates, backend="tiles")
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        raise OutOfResources(262144, 232448, "shared memory")
    monkeypatch.setattr(mod.Tile2D, "apply", failing)
    original = mod.Call2DTriton._backend
    monkeypatch.setattr(mod.Call2DTriton, "_backend", lambda self, backend, q, sz, T, V, tile: "triton (auto)"
                        if backend == "auto" else original(self, backend, q, sz, T, V, tile))
    with pytest.warns(RuntimeWarning, match="failed here.*OutOfResources"):
        got = _run(mod.memory, toks, gates)
    _equal(got, want)
    assert len(calls) == 1  # the second direction did not try again
    _run(mod.memory, toks, gates)
    assert len(calls) == 1
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets backend="triton" reach the (replaced) launch on CPU
    with pytest.raises(OutOfResources):
        _run(mod.memory, toks, gates, backend="triton")
