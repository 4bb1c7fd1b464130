"""Program → one standalone, readable Python module (torch only): what `memdsl compile -o` writes
and what `memdsl.compile` executes in-process.

Layout of a generated module: header (rule, file, hash), RULE_SOURCE as a string literal, the
runtime (copied verbatim from `runtime_torch.py` and `frontend_torch.py`), the emitted per-token
functions (`grads`, `read`, `hyper`, `wy_terms`), `SPEC` (plain data), and the public entry
points `memory`, `init_state`, `step` and the `nn.Module` `Memory`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import sympy as sp

from memdsl.ops import same
from memdsl.printer import summary
from memdsl.program import Program

from .torch_emit import PRELUDE, emit_function, size_name

HERE = Path(__file__).resolve().parent
RUNTIME_FILES = ("runtime_torch.py", "frontend_torch.py")


def _strip_imports(text: str) -> str:
    keep = [line for line in text.splitlines() if not line.startswith(("import ", "from "))]
    return "\n".join(keep).strip() + "\n"


def _py_size(expr: sp.Expr) -> str:
    e = sp.sympify(expr)
    return str(e.subs({s: sp.Symbol(size_name(s)) for s in e.free_symbols}, simultaneous=True)).replace(" ", "")


def _sizes_and_shapes(p: Program) -> str:
    free = [n for n, v in p.dims.items() if v is None]
    lines = ["def sizes(sz):", '    """Every size of the rule from the free ones (derived sizes computed)."""']
    for n in free:
        lines.append(f"    {size_name(sp.Symbol(n))} = int(sz[{n!r}])")
    items = [f"{n!r}: {size_name(sp.Symbol(n))}" for n in free]
    items += [f"{n!r}: {_py_size(v)}" for n, v in p.dims.items() if v is not None]
    lines.append(f"    return {{{', '.join(items)}}}\n")
    lines += ["", "def shapes(sz):", '    """Per-head shapes of every state, outer and token tensor."""']
    for n in p.dims:
        lines.append(f"    {size_name(sp.Symbol(n))} = sz[{n!r}]")
    items = [f"{t.name!r}: ({''.join(_py_size(s) + ', ' for s in t.shape)})" for t in p.tensors.values()]
    lines.append(f"    return {{{', '.join(items)}}}\n")
    return "\n".join(lines)


def _channel_axis(p: Program, shape) -> str:
    g = p.graph
    channel = None
    for name, nid in g.outputs.items():
        if name.startswith(("optim.", "retain")) and g.node(nid).shape:
            channel = g.node(nid).shape[0]
    if channel is None or len(shape) == 1:
        return "vec"
    return "row" if same(shape[0], channel) else "col"


def spec_of(p: Program) -> dict:
    params = {t.name: {"shape_rank": [0] * len(t.shape), "channel_axis": _channel_axis(p, t.shape),
                       "init": _init(t)} for t in p.params}
    retain, projection, lq, threshold = [], None, None, None
    for r in p.retain:
        item = {"kind": r.kind}
        if r.value("keep"):
            item["keep"] = r.value("keep")
        if r.value("rate"):
            item["rate"] = r.value("rate")
        retain.append(item)
        if r.kind in ("lq", "softmax", "elastic"):
            projection = r.kind
        if r.kind == "lq":
            lq = float(r.number("q"))
        if r.kind == "elastic":
            threshold = r.value("threshold")
    tokens = {n: [s.name for s in t.shape if isinstance(s, sp.Symbol)] for n, t in p.tensors.items()
              if t.role == "token"}
    size_from = {}
    for n in ("k", "q", "v"):
        shape = p.tensors[n].shape
        if len(shape) == 1 and isinstance(shape[0], sp.Symbol) and shape[0].name not in size_from:
            size_from[shape[0].name] = n
    return {
        "name": p.name, "algorithm": p.algorithm, "chunk": p.schedule.chunk, "params": params,
        "optim": p.optim.kind, "ns_steps": p.optim.ns_steps,
        "clip": None if p.optim.clip is None else float(p.optim.clip), "lr": p.optim.lr, "decay": p.optim.decay,
        "scale": p.optim.scale, "retain": retain, "projection": projection, "lq": lq, "threshold": threshold,
        "window": p.window, "window_weight": p.window_weight, "read_order": p.read_order,
        "lag": projection == "softmax", "grad_at_decayed": any(r.grad_at == "decayed" for r in p.retain),
        "gates": {t.name: {"channels": len(t.shape) > 0, "activation": t.activation} for t in p.gates},
        "outers": {t.name: {"init": _init(t)} for t in p.outers},
        "size_from": size_from, "free_sizes": [n for n, v in p.dims.items() if v is None],
        "tokens": tokens,
        "tnt": None if not p.schedule.is_tnt else {
            "global_chunk": p.schedule.global_chunk,
            "locals": [[loc.chunk, loc.reset] for loc in p.schedule.locals],
            "qk_projection": p.schedule.qk_projection},
    }


def _init(t) -> list | None:
    if t.init is None:
        return None
    return [t.init.kind, {k: float(v) for k, v in t.init.args}]


def factor_outputs(p: Program) -> dict[str, int] | None:
    """Expose each matrix param's gradient as rank-1 factors a b^T (graph outputs `factor.W.i.a/b`).

    Returns {param: number of factor pairs}, or None when some gradient is not a sum of outer
    products (then the dual form does not apply and the chunk program materialises weights)."""
    g = p.graph
    counts = {}
    for t in p.params:
        if len(t.shape) != 2:
            continue
        grad = g.outputs[f"grad.{t.name}"]
        node = g.node(grad)
        if node.op == "outer":
            terms = [grad]
        elif node.op == "ewise" and all(g.node(o).op == "outer" for o in g.operands(grad)) and \
                node.attr("expr") == sum(sp.Symbol(f"x{i}", real=True) for i in range(len(g.operands(grad)))):
            terms = list(g.operands(grad))
        else:
            return None
        counts[t.name] = len(terms)
        for i, term in enumerate(terms):
            a, b = g.operands(term)
            g.outputs[f"factor.{t.name}.{i}.a"] = a
            g.outputs[f"factor.{t.name}.{i}.b"] = b
    return counts


def source_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def emitted_cell_functions(p: Program) -> list[str]:
    """The emitted per-token (per-cell, for a 2-D rule) functions `grads`, `read` and `hyper`, after PRELUDE."""
    g = p.graph
    grads = [f"grad.{t.name}" for t in p.params if f"grad.{t.name}" in g.outputs]
    hyper = [k for k in g.outputs if k.startswith(("optim.", "retain"))]
    return ["# ---- emitted from the rule's IR " + "-" * 50 + PRELUDE,
            emit_function(g, "grads", grads, "d loss / d params at one anchor, per token"),
            emit_function(g, "read", ["read"], "the read y = read(P(A), q), per token"),
            emit_function(g, "hyper", hyper, "learning rates, decays, keeps and scales per token")]


def generate(p: Program) -> str:
    """The whole module text for a compiled Program."""
    g = p.graph
    parts = [
        f'"""memdsl-generated module for rule `{p.name}` (sha256 {source_hash(p.source)[:12]}).\n\n'
        "Standalone: needs torch only. The rule source is in RULE_SOURCE; the algorithm is\n"
        f"`{p.algorithm}` ({p.algorithm_reason}).\n"
        "Entry points: memory(q, k, v, gates, params, state), init_state(...), step(...), Memory (nn.Module).\n"
        '"""\n',
        "import math\n\nimport torch\n",
        f"RULE_SOURCE = {p.source!r}\n",
        f"SUMMARY = {summary(p)!r}\n",
    ]
    for f in RUNTIME_FILES:
        parts.append(f"# ---- {f} " + "-" * 60 + "\n" + _strip_imports((HERE / f).read_text()))
    parts += emitted_cell_functions(p)
    factors = factor_outputs(p)
    spec = spec_of(p)
    spec["factors"] = factors
    spec["dual"] = factors is not None and spec["projection"] is None and spec["optim"] in ("gd", "momentum")
    if spec["dual"]:
        names = [k for k in g.outputs if k.startswith("factor.")]
        names += [f"grad.{t.name}" for t in p.params if len(t.shape) == 1]
        parts.append(emit_function(g, "factors", names, "gradients as rank-1 factors (the dual form)"))
    else:
        parts.append("factors = None\n")
    if p.algorithm == "wy":
        parts.append(emit_function(g, "wy_terms", ["wy.slope", "wy.offset", "wy.key", "wy.query"],
                                   "delta-rule terms: dloss/dy = slope * y + offset; key and query vectors"))
    else:
        parts.append("wy_terms = None\n")
    parts.append(_sizes_and_shapes(p))
    parts.append(f"SPEC = {spec!r}\n")
    parts.append(
        "_FNS = {'grads': grads, 'read': read, 'hyper': hyper, 'wy_terms': wy_terms, 'factors': factors, "
        "'shapes': shapes, 'sizes': sizes}\n"
        "RULE = CompiledRuleModule(SPEC, _FNS)\n"
        "memory, init_state, step = RULE.__call__, RULE.init_state, RULE.step\n\n\n"
        "class Memory(MemoryModule):\n"
        f'    """The `{p.name}` memory as an nn.Module: outers and the initial memory are Parameters."""\n\n'
        "    def __init__(self, n_heads, d, **sizes):\n"
        "        super().__init__(RULE, n_heads, d, **sizes)\n"
    )
    return "\n\n".join(parts)


def add_kernels(body: str, kernels: dict[tuple, dict[str, str]]) -> str:
    """A standalone module that also carries generated Triton kernels.

    kernels: {(sorted (size, value) pairs, chunk): {"fwd": source, "bwd": source}}. The module then
    dispatches CUDA tensors whose sizes and chunk match a carried kernel to it (forward and
    backward), and everything else to its torch paths. Kernel sources are string constants, loaded
    (and compiled by Triton) on first use; the module still imports without triton installed."""
    launcher = _strip_imports((HERE / "triton_launch.py").read_text())
    table = ",\n".join(f"    {key!r}: {{'fwd': {src['fwd']!r},\n             'bwd': {src['bwd']!r}}}"
                       for key, src in kernels.items())
    configs = ", ".join(f"{dict(k[0])} chunk {k[1]}" for k in kernels)
    dispatch = f'''
# ---- generated Triton kernels ({configs}) {"-" * 20}
KERNEL_SOURCES = {{
{table},
}}
_LOADED = {{}}


def _get_kernel(direction, sizes, chunk):
    key = (tuple(sorted(sizes.items())), chunk)
    if (key, direction) not in _LOADED:
        _LOADED[key, direction] = load_kernel(KERNEL_SOURCES[key][direction], f"memdsl_chunk_{{direction}}")
    return _LOADED[key, direction]


def memory(q, k, v, gates=None, params=None, state=None, *, backend="auto", cu_seqlens=None, **kw):
    """y, state = memory(q, k, v, gates, params, state): CUDA tensors at a carried kernel's sizes run the
    Triton kernels; anything else runs the torch paths (backend="loop", "chunk", "dual", ...)."""
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q)
    chunk = int(kw.get("chunk") or SPEC["chunk"])
    key = (tuple(sorted((n, int(x)) for n, x in RULE.sizes(k=k, v=v, q=q).items())), chunk)
    torch_only = set(kw) - {{"chunk"}}  # options only the torch paths have (read orders, check_finite, ...)
    if state is not None and any(n.startswith("hist.") for n in state):
        torch_only.add("state with window history (hist.*)")
    if backend == "triton" or (backend == "auto" and q.is_cuda and key in KERNEL_SOURCES and not torch_only):
        if key not in KERNEL_SOURCES:
            raise ValueError(f"no Triton kernel in this module for sizes {{dict(key[0])}} and chunk {{chunk}}; "
                             f"it carries {{[(dict(k[0]), k[1]) for k in KERNEL_SOURCES]}}")
        if torch_only:
            raise ValueError(f"the carried Triton kernels do not take {{sorted(torch_only)}}: use a torch backend")
        return launch(RULE, SPEC, _get_kernel, q, k, v, gates, params, state, chunk, cu_seqlens)
    if cu_seqlens is not None:
        def init_one():
            return RULE.init_state(1, q.shape[2], sizes=RULE.sizes(k=k, v=v, q=q), device=q.device, params=params)
        return run_packed(RULE, init_one, q, k, v, gates, params, state, cu_seqlens, backend=backend, **kw)
    return RULE(q, k, v, gates, params, state, backend=backend, **kw)


def _memory_forward(self, q, k, v, gates=None, state=None, chunk=None, backend="auto", cu_seqlens=None):
    """Memory's forward through `memory` above: the carried kernels for CUDA tensors at their sizes."""
    return memory(q, k, v, gates, self.params(), state, chunk=chunk, backend=backend, cu_seqlens=cu_seqlens,
                  **self.size_kw())


Memory.forward = _memory_forward
'''
    imports = "import hashlib\nimport importlib.util\nimport itertools\nimport os\nfrom pathlib import Path\n"
    body = body.replace("import math\n\nimport torch\n", f"{imports}import math\n\nimport torch\n", 1)
    body = body.replace("Standalone: needs torch only.",
                        "Standalone: needs torch (and triton for the carried kernels).", 1)
    return body + "\n\n# ---- triton_launch.py " + "-" * 60 + "\n" + launcher + dispatch
