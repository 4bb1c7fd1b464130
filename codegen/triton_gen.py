"""IR → a Triton kernel: the anchored chunk program in dual form, one program per (batch, head).

The per-token functions of a rule (its gradients and its read) are lowered to *tile* code: a
per-token value of IR shape () becomes a [C, 1] tile, a vector a [C, n] tile, a chunk constant
(a state matrix, an outer constant) a [m, n] or [1, n] tile; `W @ x` becomes `tl.dot`, a sum over a
vector `tl.sum(axis=1)`, an elementwise expression one Triton expression printed from sympy.
Gradients come out as rank-1 factors a b^T and reads use the dual form, so no per-token weight
is ever built. The code fills the insertion points of templates/chunk_dual_fwd.py.tmpl.

Coverage of this first Triton slice (anything else runs on the torch path): a single memory
block of matrices and vectors, `gd` or `momentum` (with an optional position scale), a scalar
`decay` retention, window 1, read after write, scalar gates, and power-of-two sizes ≥ 16.
"""

from __future__ import annotations

import re
from pathlib import Path

import sympy as sp

from memdsl.ir import Graph
from memdsl.ops import ELEMENTWISE, sympy_form
from memdsl.program import Program

from .sympy_print import TritonPrinter

TEMPLATE = Path(__file__).resolve().parent / "templates" / "chunk_dual_fwd.py.tmpl"
TOKEN_ROLES = ("token", "gate", "model_input", "cotangent", "position")


class Unsupported(Exception):
    """This rule (or these sizes) is outside the Triton slice: the caller uses the torch path."""


class _Printer(TritonPrinter):
    def __init__(self, names: dict[str, str]):
        super().__init__()
        self.names = names

    def _print_Symbol(self, expr):
        if expr.name not in self.names:
            raise ValueError(f"unexpected symbol {expr.name!r}")
        return self.names[expr.name]


def _ident(name: str) -> str:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
        raise ValueError(f"not an identifier: {name!r}")
    return name


def supported(p: Program, spec: dict) -> str | None:
    """None if the Triton slice covers this rule; otherwise why not."""
    if not spec.get("dual") or spec["algorithm"] not in ("anchored", "linear"):
        return f"algorithm {spec['algorithm']} without the dual form"
    if spec["window"] != 1 or spec["window_weight"] is not None:
        return "an Omega window"
    if spec.get("clip") is not None:
        return "gradient clipping (optim clip)"
    if spec["read_order"] != "after":
        return "read before write"
    if any(r["kind"] != "decay" for r in spec["retain"]) or spec["grad_at_decayed"]:
        return "a retention other than a plain decay"
    if any(info["channels"] for info in spec["gates"].values()):
        return "per-channel gates"
    ops = {p.graph.node(n).op for n in p.graph.g.nodes}
    if ops & {"concat", "kron", "slice", "unflatten", "flatten"}:
        return "feature maps built with concat/kron (polynomial features)"
    return None


class _Tiles:
    """Emits tile code for a set of graph outputs, given how each input is bound."""

    def __init__(self, graph: Graph, sizes: dict, prefix: str, bind: dict[str, tuple[str, str]]):
        # bind: input name -> (variable, kind) with kind in tok | const | dual
        self.g, self.sizes, self.prefix, self.bind = graph, sizes, prefix, bind
        self.lines: list[str] = []
        self.names: dict[int, str] = {}
        self.kind: dict[int, str] = {}
        self.count = 0

    def value(self, e) -> int:
        return int(sp.sympify(e).subs(self.sizes))

    def const_text(self, v) -> str:
        return repr(float(sp.sympify(v).subs(self.sizes)))

    def emit(self, outputs: list[int]) -> dict[int, str]:
        for nid in self.g.topo(outputs):
            self.node(nid)
        return {o: self.names[o] for o in outputs}

    def fresh(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count}"

    def node(self, nid: int) -> None:
        g = self.g
        n = g.node(nid)
        ops = g.operands(nid)
        if n.op == "input":
            name = n.attr("name")
            if n.attr("role") == "size":
                self.names[nid], self.kind[nid] = self.const_text(sp.Symbol(name)), "const"
                return
            if name not in self.bind:
                raise Unsupported(f"input {name} is not available inside the kernel")
            self.names[nid], self.kind[nid] = self.bind[name]
            return
        if n.op == "const":
            self.names[nid], self.kind[nid] = f"({self.const_text(n.attr('value'))})", "const"
            return
        kinds = [self.kind[o] for o in ops]
        kind = "tok" if "tok" in kinds else "const"
        var = self.fresh()
        args = [self.names[o] for o in ops]
        if n.op in ELEMENTWISE:
            syms = [sp.Symbol(f"x{i}", real=True) for i in range(len(ops))]
            expr = sympy_form(n.op, syms, dict(n.attrs)).subs(self.sizes)
            rhs = _Printer({f"x{i}": a for i, a in enumerate(args)}).doprint(expr)
        elif n.op in ("sum", "norm"):
            x = args[0]
            if len(g.node(ops[0]).shape) != 1:
                raise Unsupported("a reduction over a matrix")
            inner = f"{x} * {x}" if n.op == "norm" else x
            rhs = f"tl.sum({inner}, axis=1)[:, None]"
            if n.op == "norm":
                rhs = f"tl.sqrt({rhs})"
        elif n.op == "matvec":
            w, x = args
            if kinds[0] == "dual":
                rhs = f"{w}({x})"  # a dual weight is bound to a code template
                rhs = self.bind_dual(w, x)
            elif kinds[1] == "tok":
                rhs = f"tl.dot({x}, tl.trans({w}), input_precision=PRECISION)"
            else:
                rhs = f"tl.sum({w} * {x}, axis=1)[None, :]"
        elif n.op == "matvec_t":
            w, x = args
            if kinds[0] != "const" or kinds[1] != "tok":
                raise Unsupported("a transposed product outside the gradient")
            rhs = f"tl.dot({x}, {w}, input_precision=PRECISION)"
        elif n.op == "broadcast":
            width = self.value(n.shape[0]) if n.shape else 1
            rhs = f"tl.zeros([C, {width}], dtype=tl.float32) + {args[0]}"
            kind = "tok"
        elif n.op == "outer":
            self.names[nid], self.kind[nid] = f"OUTER({args[0]}, {args[1]})", "outer"
            return
        else:
            raise Unsupported(f"op {n.op}")
        self.lines.append(f"{var} = {rhs}")
        self.names[nid], self.kind[nid] = var, kind

    def bind_dual(self, w: str, x: str) -> str:
        return self.dual[w](x)


def _outer_factors(g: Graph, nid: int) -> list[tuple[int, int]]:
    n = g.node(nid)
    if n.op == "outer":
        return [tuple(g.operands(nid))]
    return [tuple(g.operands(o)) for o in g.operands(nid)]


def generate_kernel(p: Program, spec: dict, sizes: dict[str, int], chunk: int) -> str:
    """The Triton source of the forward kernel for this rule at these sizes."""
    why = supported(p, spec)
    if why:
        raise Unsupported(why)
    sym_sizes = {sp.Symbol(k, positive=True, integer=True): v for k, v in sizes.items()}
    for name, v in sizes.items():
        if v < 16 or v & (v - 1):
            raise Unsupported(f"size {name}={v} is not a power of two ≥ 16")
    if chunk < 16 or chunk & (chunk - 1):
        raise Unsupported(f"chunk {chunk} is not a power of two ≥ 16")
    g = p.graph
    params = [t for t in p.params]
    mats = [t.name for t in params if len(t.shape) == 2]
    vecs = [t.name for t in params if len(t.shape) == 1]
    shape = {t.name: [int(sp.sympify(s).subs(sym_sizes)) for s in t.shape] for t in p.tensors.values()}
    momentum = spec["optim"] == "momentum"
    has_keep = bool(spec["retain"])
    has_scale = spec["scale"] is not None

    sig = ["Q, K, V, Y, HYP_LR, HYP_MU, HYP_KEEP, HYP_SCALE,"]
    sig += [f"G_{_ident(n)}," for n in spec["gates"]]
    sig += [f"O_{_ident(n)}," for n in spec["outers"]]
    order = [t.name for t in params]  # declaration order: the launcher passes states in this order
    sig += [f"A_{_ident(n)}," for n in order]
    if momentum:
        sig += [f"S_{_ident(n)}," for n in order]

    def idx(name: str) -> str:  # offsets of a per-head state tile
        m, *rest = shape[name]
        if rest:
            return f"tl.arange(0, {m})[:, None] * {rest[0]} + tl.arange(0, {rest[0]})[None, :]"
        return f"tl.arange(0, {m})[None, :]"

    def size_of(name: str) -> int:
        total = 1
        for v in shape[name]:
            total *= v
        return total

    load_state, store_state = [], []
    for n in order:
        base = f"(pid_b * H + pid_h) * {size_of(n)}"
        load_state.append(f"{n}_A = tl.load(A_{n} + {base} + {idx(n)})")
        store_state.append(f"tl.store(A_{n} + {base} + {idx(n)}, {n}_A)")
        if momentum:
            load_state.append(f"{n}_S = tl.load(S_{n} + {base} + {idx(n)})")
            store_state.append(f"tl.store(S_{n} + {base} + {idx(n)}, {n}_S)")
    for n in spec["outers"]:
        load_state.append(f"out_{n} = tl.load(O_{n} + pid_h * {size_of(n)} + {idx(n)})")

    dk, dv, dq = shape["k"][0], shape["v"][0], shape["q"][0]
    tok = []
    for name, d in (("q", dq), ("k", dk), ("v", dv)):
        ptr = name.upper()
        tok.append(f"tok_{name} = tl.load({ptr} + ((pid_b * T + rows[:, None]) * H + pid_h) * {d} + "
                   f"tl.arange(0, {d})[None, :], mask=valid[:, None], other=0.0)")
    hyp_off = "(pid_b * H + pid_h) * T + rows"
    tok.append(f"lr = tl.load(HYP_LR + {hyp_off}, mask=valid, other=0.0)")
    tok.append(f"mu = tl.load(HYP_MU + {hyp_off}, mask=valid, other=1.0)" if momentum else "mu = lr * 0.0 + 1.0")
    tok.append(f"keep = tl.load(HYP_KEEP + {hyp_off}, mask=valid, other=1.0)" if has_keep else "keep = lr * 0.0 + 1.0")
    tok.append(f"scale = tl.load(HYP_SCALE + {hyp_off}, mask=valid, other=0.0)" if has_scale else "scale = lr")
    for n in spec["gates"]:
        tok.append(f"tok_{n} = tl.load(G_{n} + ((pid_b * T + rows) * H + pid_h), mask=valid, other=0.0)[:, None]")

    # ---- gradients at the chunk-start state: rank-1 factors for matrices, rows for vectors ----------
    bind = {"q": ("tok_q", "tok"), "k": ("tok_k", "tok"), "v": ("tok_v", "tok")}
    bind.update({n: (f"tok_{n}", "tok") for n in spec["gates"]})
    bind.update({n: (f"out_{n}", "const") for n in spec["outers"]})
    grad_bind = {**bind, **{n: (f"{n}_A", "const") for n in mats + vecs}}
    gt = _Tiles(g, sym_sizes, "g", grad_bind)
    outs = {n: g.outputs[f"grad.{n}"] for n in mats + vecs}
    factors = {n: _outer_factors(g, outs[n]) for n in mats}
    needed = [x for n in mats for pair in factors[n] for x in pair] + [outs[n] for n in vecs]
    names = gt.emit(needed)
    grads = list(gt.lines)
    # padded rows of a ragged last chunk have lr = 0, but 0 * NaN is NaN: zero their factors
    for x in dict.fromkeys(names[i] for i in needed if gt.kind.get(i) == "tok"):
        grads.append(f"{x} = tl.where(valid[:, None], {x}, 0.0)")
    for n in vecs:
        grads.append(f"u_{n} = {names[outs[n]]}")

    coef = [
        "lk = tl.log(tl.maximum(keep, 1e-30))",
        "cum = tl.cumsum(lk, axis=0)",
        "D = tl.where(lower, tl.exp(cum[:, None] - cum[None, :]), 0.0)",
        "abar = tl.exp(cum)",
    ]
    if has_scale:
        coef += ["Kc = tl.where(lower, scale[:, None] * lr[None, :], 0.0)", "f = abar * 0.0"]
    elif momentum:
        coef += [
            "cm = tl.cumsum(tl.log(tl.maximum(mu, 1e-30)), axis=0)",
            "Mmu = tl.where(lower, tl.exp(cm[:, None] - cm[None, :]), 0.0)",
            "mbar = tl.exp(cm)",
            "Kc = tl.dot(D, Mmu, input_precision=PRECISION) * lr[None, :]",
            "Ks = Mmu * lr[None, :]",
            "f = tl.sum(D * mbar[None, :], axis=1)",
        ]
    else:
        coef += ["Kc = D * lr[None, :]", "f = abar * 0.0"]

    # ---- the read, every matrix as a dual weight ------------------------------------------------
    read_bind = {**bind}
    duals = {}
    for n in mats:
        read_bind[n] = (f"{n}_A", "dual")
        pairs = [(names[a], names[b]) for a, b in factors[n]]

        def dual(x, n=n, pairs=pairs):
            terms = [f"abar[:, None] * tl.dot({x}, tl.trans({n}_A), input_precision=PRECISION)"]
            if momentum:
                terms.append(f"f[:, None] * tl.dot({x}, tl.trans({n}_S), input_precision=PRECISION)")
            for a, b in pairs:
                terms.append(f"- tl.dot(Kc * tl.dot({x}, tl.trans({b}), input_precision=PRECISION), {a}, "
                             "input_precision=PRECISION)")
            return " + ".join(terms).replace("+ -", "-")
        duals[f"{n}_A"] = dual
    read = []
    for n in vecs:
        rows = f"abar[:, None] * {n}_A" + (f" + f[:, None] * {n}_S" if momentum else "")
        read.append(f"r_{n} = {rows} - tl.dot(Kc, u_{n}, input_precision=PRECISION)")
        read_bind[n] = (f"r_{n}", "tok")
    rt = _Tiles(g, sym_sizes, "r", read_bind)
    rt.dual = duals
    y = rt.emit([g.outputs["read"]])[g.outputs["read"]]
    read += rt.lines
    read.append(f"tl.store(Y + ((pid_b * T + rows[:, None]) * H + pid_h) * {dv} + tl.arange(0, {dv})[None, :], "
                f"{y}, mask=valid[:, None])")

    upd = ["a_last = tl.sum(tl.where(ii == last, abar, 0.0), axis=0)",
           "f_last = tl.sum(tl.where(ii == last, f, 0.0), axis=0)",
           "k_last = _row(Kc, ii, last)"]
    if momentum:
        upd += ["m_last = tl.sum(tl.where(ii == last, mbar, 0.0), axis=0)", "ks_last = _row(Ks, ii, last)"]
    for n in mats:
        pairs = [(names[a], names[b]) for a, b in factors[n]]
        dA = " + ".join(f"tl.dot(tl.trans({a} * k_last[:, None]), {b}, input_precision=PRECISION)" for a, b in pairs)
        new_a = f"a_last * {n}_A" + (f" + f_last * {n}_S" if momentum else "") + f" - ({dA})"
        if momentum:
            dS = " + ".join(f"tl.dot(tl.trans({a} * ks_last[:, None]), {b}, input_precision=PRECISION)"
                            for a, b in pairs)
            upd.append(f"{n}_S_new = m_last * {n}_S - ({dS})")
        upd.append(f"{n}_A = {new_a}")
        if momentum:
            upd.append(f"{n}_S = {n}_S_new")
    for n in vecs:
        new_a = f"a_last * {n}_A" + (f" + f_last * {n}_S" if momentum else "")
        upd.append(f"{n}_A_new = {new_a} - tl.sum(k_last[:, None] * u_{n}, axis=0)[None, :]")
        if momentum:
            upd.append(f"{n}_S = m_last * {n}_S - tl.sum(ks_last[:, None] * u_{n}, axis=0)[None, :]")
        upd.append(f"{n}_A = {n}_A_new")

    text = TEMPLATE.read_text()
    fill = {
        "SIGNATURE": "\n    ".join(sig),
        "LOAD_STATE": _indent(load_state, 4),
        "LOAD_TOKENS": _indent(tok, 8),
        "GRADS": _indent(grads, 8),
        "COEFFICIENTS": _indent(coef, 8),
        "READ": _indent(read, 8),
        "UPDATE_STATE": _indent(upd, 8),
        "STORE_STATE": _indent(store_state, 4),
    }
    for key, value in fill.items():
        text = text.replace(f"@@{key}@@", value.lstrip() if key == "SIGNATURE" else value)
    header = (f"# generated by memdsl for rule `{p.name}`; sizes {sizes}, chunk {chunk}\n"
              "PRECISION = tl.constexpr(\"ieee\")\n")
    return text.replace("import triton.language as tl\n", "import triton.language as tl\n\n" + header, 1)


def _indent(lines: list[str], n: int) -> str:
    return "\n".join(" " * n + line for line in lines)
