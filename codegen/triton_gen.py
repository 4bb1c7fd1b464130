"""IR → Triton kernels: the anchored chunk program in dual form, forward and backward.

`chunk_tiles.build_chunk_graph` turns a rule into the tile graph of one chunk; this module prints
it into the two kernel templates (templates/chunk_fwd.py.tmpl, chunk_bwd.py.tmpl). The backward
kernel is not written by hand: `tile_grad.backward` differentiates the same chunk graph in reverse
mode, and the one printer (`tile_triton.print_tiles`) emits forward recompute and adjoints.

Layouts the kernels read and write (the launcher in triton_run.py prepares them):
    tokens, y, dy      [B, T, H, d] contiguous          gates      [B, T, H] (per channel [B, T, H, ch])
    lr, mu, keep, scale and their gradients  [B, T, H] (per channel [B, T, H, ch])     outers  [H, *shape]
    state, dstate      [B, H, *shape]                   saved      [B, H, NC, *shape]
    outer gradients    [B, H, *shape] (summed over B by the launcher)
Variable-length batches (`cu_seqlens`, flash-linear-attention's convention): B = 1, sequence i is
tokens cu[i]..cu[i+1]; one program per (sequence, head); state and saved buffers are per sequence.

Coverage of this slice (anything else runs on the torch path; `supported` says why): the anchored
dual form (chunk_tiles.py) — a single memory block of matrices and vectors, `gd` or `momentum` (with
an optional position scale), a scalar `decay` retention, Omega windows up to chunk + 1 tokens,
polynomial features (concat, kron; padded sizes), any read order, scalar gates; per-position states
(state_tiles.py) — `gd` with an ℓq or row-softmax state projection (Memora's lag token) or
per-channel gates, any read order; Muon (muon_tiles.py) — per-position momenta and Newton–Schulz,
Omega windows; and the exact WY algorithm of state-linear rules (wy_tiles.py); power-of-two token
widths and chunks ≥ 16.
"""

from __future__ import annotations

import re
from pathlib import Path

import sympy as sp

from memdsl.program import Program

from .chunk_tiles import Unsupported, build_chunk_graph, tile_shape_of
from .muon_tiles import build_muon_graph
from .state_tiles import MAX_NUMEL, build_state_graph
from .tile_grad import backward
from .tile_ir import TileGraph
from .tile_triton import mask_code, print_tiles, printed_numel
from .wy_tiles import build_wy_graph

TEMPLATES = Path(__file__).resolve().parent / "templates"
HYPER = {"lr": ("LR", 0.0), "mu": ("MU", 1.0), "keep": ("KEEP", 1.0), "scale": ("SCALE", 0.0)}
TOKENS = ("q", "k", "v")


def _ident(name: str) -> str:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
        raise ValueError(f"not an identifier: {name!r}")
    return name


def supported(p: Program, spec: dict, read_order: str | None = None) -> str | None:
    """None if the Triton slice covers this rule (read at `read_order`, default the rule's own)."""
    read_order = read_order or spec["read_order"]
    if spec["algorithm"] == "wy":
        if read_order != "after":  # the torch WY path (the kernel's reference) reads after write only
            return "read before write" if read_order == "before" else "a chunk-start read with the exact WY update"
        if any(info["channels"] for info in spec["gates"].values()):
            return "per-channel gates"
        if any(r["kind"] != "decay" for r in spec["retain"]):
            return "a retention other than a plain decay"
        return None
    if spec["algorithm"] not in ("anchored", "linear"):
        return f"algorithm {spec['algorithm']} without the dual form"
    if spec["optim"] == "muon":
        return _muon_limits(p, spec)
    if per_position(spec):
        return _per_position_limits(p, spec)
    if not spec.get("dual"):
        return f"algorithm {spec['algorithm']} without the dual form ({spec['optim']})"
    if spec["window_weight"] is not None and spec["window_weight"] not in spec["gates"]:
        return "a window weight that is not a gate"
    if spec.get("clip") is not None:
        return "gradient clipping (optim clip)"
    if any(r["kind"] != "decay" for r in spec["retain"]) or spec["grad_at_decayed"]:
        return "a retention other than a plain decay"
    if any(info["channels"] for info in spec["gates"].values()):
        return "per-channel gates"
    # only what the kernel computes: the params' gradients and the read (not, say, d loss / d k)
    roots = [p.graph.outputs[f"grad.{t.name}"] for t in p.params] + [p.graph.outputs["read"]]
    ops = {p.graph.node(n).op for n in p.graph.topo(roots)}
    if ops & {"slice", "unflatten", "flatten"}:
        return "feature maps built with slice/flatten"
    return None


def per_position(spec: dict) -> bool:
    """Whether the kernels build every position's state (state_tiles.py) rather than the dual form:
    a state projection (ℓq, row softmax) or per-channel gates."""
    return spec["projection"] is not None or any(info["channels"] for info in spec["gates"].values())


def _per_position_limits(p: Program, spec: dict) -> str | None:
    """None if state_tiles covers this rule; else what it lacks."""
    if spec["optim"] != "gd":
        return f"per-position states (a state projection or per-channel gates) with optim {spec['optim']}"
    if spec["projection"] not in (None, "lq", "softmax"):
        return f"a {spec['projection']} state projection"
    if spec["window"] > 1 or spec["window_weight"] is not None:
        return "an Omega window with per-position states"
    if spec["scale"] is not None:
        return "a position scale with per-position states"
    if any(r.get("rate") for r in spec["retain"]) or spec["grad_at_decayed"] or spec.get("clip") is not None:
        return "a retention toward the initial state, a decayed anchor or clipping with per-position states"
    if any(len(t.shape) == 2 and t.name not in (spec.get("factors") or {}) for t in p.params):
        return "a gradient that is not a sum of outer products"
    roots = [p.graph.outputs[f"grad.{t.name}"] for t in p.params] + [p.graph.outputs["read"]]
    if {p.graph.node(n).op for n in p.graph.topo(roots)} & {"slice", "unflatten", "flatten"}:
        return "feature maps built with slice/flatten"
    return None


def _muon_limits(p: Program, spec: dict) -> str | None:
    """None if muon_tiles covers this rule; else what it lacks."""
    if per_position(spec):
        return "muon with a state projection or per-channel gates"
    if spec["window_weight"] is not None and spec["window_weight"] not in spec["gates"]:
        return "a window weight that is not a gate"
    if spec["scale"] is not None or any(r.get("rate") for r in spec["retain"]) or spec["grad_at_decayed"] or \
            spec.get("clip") is not None:
        return "muon with a position scale, a retention toward the init, a decayed anchor or clipping"
    if any(len(t.shape) != 2 or t.name not in (spec.get("factors") or {}) for t in p.params):
        return "muon on a vector parameter or a gradient that is not a sum of outer products"
    roots = [p.graph.outputs[f"grad.{t.name}"] for t in p.params] + [p.graph.outputs["read"]]
    if {p.graph.node(n).op for n in p.graph.topo(roots)} & {"slice", "unflatten", "flatten"}:
        return "feature maps built with slice/flatten"
    return None


class _Layout:
    """Shapes and pointer arithmetic shared by the two kernels."""

    def __init__(self, p: Program, spec: dict, sizes: dict[str, int]):
        sym = {sp.Symbol(k, positive=True, integer=True): v for k, v in sizes.items()}
        self.sym = sym
        self.shape = {t.name: [int(sp.sympify(s).subs(sym)) for s in t.shape] for t in p.tensors.values()}
        self.params = [_ident(t.name) for t in p.params]
        self.gates = [_ident(n) for n in spec["gates"]]
        self.outers = [_ident(n) for n in spec["outers"]]
        self.momentum = spec["optim"] in ("momentum", "muon")
        self.window = spec["window"]
        self.states = [f"A_{n}" for n in self.params] + ([f"S_{n}" for n in self.params] if self.momentum else [])

    def tile_of(self, name: str) -> tuple[int, int]:
        return tile_shape_of(self.shape[name])

    def logical(self, name: str) -> tuple[int, int]:
        s = self.shape[name]
        return (s[0], s[1]) if len(s) == 2 else (1, s[0] if s else 1)

    def idx(self, name: str) -> str:
        (pm, pn), (_, n) = self.tile_of(name), self.logical(name)
        return f"tl.arange(0, {pm})[:, None] * {n} + tl.arange(0, {pn})[None, :]"

    def numel(self, name: str) -> int:
        m, n = self.logical(name)
        return m * n

    def bounds(self, name: str) -> str | None:
        """The in-bounds mask of a padded tile (None when the tile is the tensor's exact shape)."""
        (pm, pn), (m, n) = self.tile_of(name), self.logical(name)
        parts = []
        if pm != m:
            parts.append(f"(tl.arange(0, {pm}) < {m})[:, None]")
        if pn != n:
            parts.append(f"(tl.arange(0, {pn}) < {n})[None, :]")
        return " & ".join(parts) or None

    def load(self, address: str, name: str) -> str:
        mask = self.bounds(name)
        return f"tl.load({address}, mask={mask}, other=0.0)" if mask else f"tl.load({address})"

    def store(self, address: str, name: str, value: str) -> str:
        mask = self.bounds(name)
        return f"tl.store({address}, {value}, mask={mask})" if mask else f"tl.store({address}, {value})"

    def state_ptr(self, ptr: str, state: str) -> str:
        p = state[2:]
        return f"{ptr} + (pid_b * H + pid_h) * {self.numel(p)} + {self.idx(p)}"

    def saved_ptr(self, ptr: str, state: str) -> str:
        p = state[2:]
        return f"{ptr} + ((pid_b * H + pid_h) * NC + ci) * {self.numel(p)} + {self.idx(p)}"

    def token_ptr(self, ptr: str, name: str, rows: str = "rows") -> str:
        d = self.shape[name][0]
        return f"{ptr} + ((bos + {rows}[:, None]) * H + pid_h) * {d} + tl.arange(0, {d})[None, :]"

    def gate_ptr(self, ptr: str, rows: str = "rows") -> str:  # gates and hyper-parameters: [B, T, H]
        return f"{ptr} + ((bos + {rows}) * H + pid_h)"

    def load_tokens(self, graph: TileGraph) -> list[str]:
        lines = []
        if "hist_valid" in graph.inputs:  # the Omega window's rows before the chunk: s - Hh .. s - 1
            hh = graph.shape(graph.inputs["hist_valid"])[0]
            lines += [f"rows_h = s - {hh} + tl.arange(0, {hh})",
                      f"hist_valid_r = (rows_h >= 0) & (rows_h > s - {self.window})",
                      "hist_valid = hist_valid_r[:, None]"]
        for prefix, rows, mask in (("tok", "rows", "valid"), ("hist", "rows_h", "hist_valid")):
            for n in TOKENS:
                if f"{prefix}_{n}" in graph.inputs:
                    lines.append(f"{prefix}_{n} = tl.load({self.token_ptr(n.upper(), n, rows)}, mask={mask}, "
                                 "other=0.0)")
            for n in self.gates:
                if f"{prefix}_{n}" in graph.inputs:
                    width = graph.shape(graph.inputs[f"{prefix}_{n}"])[1]
                    lines.append(f"{prefix}_{n} = {self.load_rows('G_' + n, width, rows, mask, '0.0')}")
        for name, (ptr, other) in HYPER.items():
            if name in graph.inputs:
                width = graph.shape(graph.inputs[name])[1]
                lines.append(f"{name} = {self.load_rows(ptr, width, 'rows', 'valid', other)}")
        if "later" in graph.inputs:  # a lag token's second segment: the valid rows after row 0
            lines.append("later = valid & (ii > 0)[:, None]")
        return lines

    def rows_ptr(self, ptr: str, width: int, rows: str = "rows") -> str:
        """Gates and hyper-parameters: [B, T, H] (a [C, 1] tile) or per channel [B, T, H, width]."""
        if width == 1:
            return f"{self.gate_ptr(ptr, rows)}[:, None]"
        return f"{ptr} + ((bos + {rows}[:, None]) * H + pid_h) * {width} + tl.arange(0, {width})[None, :]"

    def load_rows(self, ptr: str, width: int, rows: str, mask: str, other) -> str:
        return f"tl.load({self.rows_ptr(ptr, width, rows)}, mask={mask}, other={other})"

    def load_outers(self) -> list[str]:
        return [f"out_{n} = {self.load(f'O_{n} + pid_h * {self.numel(n)} + {self.idx(n)}', n)}" for n in self.outers]

    def inputs_signature(self) -> list[str]:
        sig = ["Q, K, V, LR, MU, KEEP, SCALE,"]
        sig += [f"G_{n}," for n in self.gates]
        sig += [f"O_{n}," for n in self.outers]
        return sig


def _graph(p: Program, spec: dict, layout: _Layout, chunk: int, read_order: str | None = None) -> TileGraph:
    shapes = {n: layout.shape[n] for n in layout.shape}
    if spec["algorithm"] == "wy":
        build = build_wy_graph
    elif spec["optim"] == "muon":
        build = build_muon_graph
    else:
        build = build_state_graph if per_position(spec) else build_chunk_graph
    return build(p, spec, shapes, layout.sym, chunk, read_order or spec["read_order"])


def _masks(graph: TileGraph) -> list[str]:
    return [mask_code(name, definition) for name, definition in graph.mask_defs.items()]


def _check_tiles(graph: TileGraph, nodes: list[int]) -> None:
    """Every printed tensor within Triton's largest (polynomial features with an Omega window at d = 64: the
    window history's [4, 8192] features times W2^T, a thin product printed as a [4, 8192, 128] broadcast, 2^22
    elements); past it there is no kernel, not a crash at launch."""
    for i in nodes:
        size = printed_numel(graph, i)
        if size > MAX_NUMEL:
            t = graph.nodes[i]
            what = f"tile {t.attrs[0]}" if t.op == "input" else \
                f"{t.op} of {' and '.join(str(list(graph.shape(a))) for a in t.args)}"
            raise Unsupported(f"a {what} holds {size} elements, past Triton's {MAX_NUMEL} per tensor (tiles are "
                              f"padded to powers of two: smaller sizes fit)")


def _check_sizes(layout: _Layout, chunk: int) -> None:
    """Token widths must be powers of two ≥ 16 (tl.dot's minimum); other sizes are padded."""
    for name in TOKENS:
        (v,) = layout.shape[name]
        if v < 16 or v & (v - 1):
            raise Unsupported(f"the width of {name} ({v}) is not a power of two ≥ 16")
    if chunk < 16 or chunk & (chunk - 1):
        raise Unsupported(f"chunk {chunk} is not a power of two ≥ 16")


def _fill(template: str, fill: dict[str, list[str] | str], indent: dict[str, int], header: str) -> str:
    text = (TEMPLATES / template).read_text()
    for key, value in fill.items():
        if key == "SIGNATURE":
            text = text.replace(f"@@{key}@@", "\n    ".join(value))
        else:
            text = text.replace(f"@@{key}@@", "\n".join(" " * indent[key] + line for line in value) or "")
    if "@@" in text:
        raise AssertionError("an insertion point was left unfilled")
    return text.replace("import triton.language as tl\n", "import triton.language as tl\n\n" + header, 1)


def _prepare(p: Program, spec: dict, sizes: dict[str, int], chunk: int, read_order: str | None):
    """The layout and the forward chunk graph both kernels start from (or why there is no kernel)."""
    why = supported(p, spec, read_order)
    if why:
        raise Unsupported(why)
    lay = _Layout(p, spec, sizes)
    _check_sizes(lay, chunk)
    graph = _graph(p, spec, lay, chunk, read_order)
    _check_tiles(graph, list(range(len(graph.nodes))))
    return lay, graph


def _header(p: Program, spec: dict, direction: str, sizes: dict, chunk: int, precision: str,
            read_order: str | None) -> str:
    return (f"# generated by memdsl for rule `{p.name}`: {direction}; sizes {sizes}, chunk {chunk}, "
            f"read {read_order or spec['read_order']}\n"
            f"PRECISION = tl.constexpr({precision!r})\n")


def generate_forward(p: Program, spec: dict, sizes: dict[str, int], chunk: int, precision: str = "ieee",
                     read_order: str | None = None) -> str:
    """The Triton source of the forward kernel for this rule at these sizes."""
    lay, graph = _prepare(p, spec, sizes, chunk, read_order)
    bound = {name: name for name in graph.inputs}
    names: dict[int, str] = {}
    roots = [graph.outputs["y"]] + [graph.outputs[s] for s in lay.states]
    body = print_tiles(graph, bound, graph.live(roots), names)
    sig = lay.inputs_signature() + ["Y,"] + [f"P_{s}," for s in lay.states] + [f"SAVE_{s}," for s in lay.states]
    fill = {
        "SIGNATURE": sig,
        "LOAD_STATE": [f"{s} = {lay.load(lay.state_ptr('P_' + s, s), s[2:])}" for s in lay.states] +
                      lay.load_outers() + _masks(graph),
        "SAVE_STATE": [lay.store(lay.saved_ptr("SAVE_" + s, s), s[2:], s) for s in lay.states],
        "LOAD_TOKENS": lay.load_tokens(graph),
        "BODY": body,
        "STORE_Y": [f"tl.store({lay.token_ptr('Y', 'v')}, {names[graph.outputs['y']]}, mask=valid)"],
        "CARRY_STATE": [f"{s} = {names[graph.outputs[s]]}" for s in lay.states],
        "STORE_STATE": [lay.store(lay.state_ptr("P_" + s, s), s[2:], s) for s in lay.states],
    }
    indent = {"LOAD_STATE": 4, "SAVE_STATE": 12, "LOAD_TOKENS": 8, "BODY": 8, "STORE_Y": 8, "CARRY_STATE": 8,
              "STORE_STATE": 4}
    return _fill("chunk_fwd.py.tmpl", fill, indent, _header(p, spec, "forward", sizes, chunk, precision, read_order))


def backward_graph(p: Program, spec: dict, sizes: dict[str, int], chunk: int, read_order: str | None = None):
    """The backward kernel's graph: the forward chunk graph with its reverse mode appended (tile_grad), seeded
    by the inputs `dy` and `d<state>`. Returns (layout, graph, grad_of: input name -> adjoint node, carries:
    (token, rows, width) of each Omega-window carry). Also what a test evaluates in float64."""
    lay, graph = _prepare(p, spec, sizes, chunk, read_order)
    seeds = [(graph.outputs["y"], graph.input("dy", graph.shape(graph.outputs["y"])))]
    for s in lay.states:
        seeds.append((graph.outputs[s], graph.input(f"d{s}", graph.shape(graph.outputs[s]))))
    token_names = [n for n in (*TOKENS, *lay.gates) if f"tok_{n}" in graph.inputs]
    hist_names = [n for n in (*TOKENS, *lay.gates) if f"hist_{n}" in graph.inputs]
    wrt_names = [f"tok_{n}" for n in token_names] + [f"hist_{n}" for n in hist_names] + [n for n in HYPER] + \
        [f"out_{n}" for n in lay.outers] + lay.states
    wrt_names = [n for n in wrt_names if n in graph.inputs]
    adj = backward(graph, seeds, [graph.inputs[n] for n in wrt_names])
    grad_of = {n: adj[graph.inputs[n]] for n in wrt_names}
    # window history: a token's gradient from the next chunk's window arrives one iteration early
    # (chunks run backwards), carried in registers and added to the last Hh rows of this chunk
    carries = []
    for n in hist_names:
        hh, width = graph.shape(graph.inputs[f"hist_{n}"])
        carry = graph.input(f"carry_{n}", (hh, width))
        if f"tok_{n}" in grad_of:
            place = graph.where(graph.mask("place", chunk - hh, hh, hh, chunk), graph.const(1.0), graph.const(0.0))
            grad_of[f"tok_{n}"] = graph.add2(grad_of[f"tok_{n}"], graph.dot(graph.trans(place), carry))
        grad_of[f"carry_{n}"] = graph.where(graph.inputs["hist_valid"], grad_of.pop(f"hist_{n}"), graph.const(0.0))
        carries.append((n, hh, width))
    return lay, graph, grad_of, carries


def generate_backward(p: Program, spec: dict, sizes: dict[str, int], chunk: int, precision: str = "ieee",
                      read_order: str | None = None) -> str:
    """The Triton source of the backward kernel: reverse mode over the same chunk graph."""
    lay, graph, grad_of, carries = backward_graph(p, spec, sizes, chunk, read_order)
    bound = {name: name for name in graph.inputs}
    names: dict[int, str] = {}
    live = graph.live(list(grad_of.values()))
    _check_tiles(graph, live)
    body = print_tiles(graph, bound, live, names)

    sig = lay.inputs_signature() + [f"SAVE_{s}," for s in lay.states] + ["DY,"] + [f"D{s}," for s in lay.states]
    sig += ["DQ, DK, DV, DLR, DMU, DKEEP, DSCALE,"] + [f"DG_{n}," for n in lay.gates]
    sig += [f"DO_{n}," for n in lay.outers]
    tokens = lay.load_tokens(graph)
    tokens.append(f"dy = tl.load({lay.token_ptr('DY', 'v')}, mask=valid, other=0.0)")
    store = []
    for n in TOKENS:
        if f"tok_{n}" in grad_of:
            store.append(f"tl.store({lay.token_ptr('D' + n.upper(), n)}, {names[grad_of['tok_' + n]]}, mask=valid)")
    for ptr, key in [("DG_" + n, "tok_" + n) for n in lay.gates] + [("D" + p, n) for n, (p, _) in HYPER.items()]:
        if key in grad_of:
            width = graph.shape(graph.inputs[key])[1]
            value = names[grad_of[key]]  # an adjoint may come out broadcast: store the input's own shape
            value = f"tl.sum({value}, axis=1)[:, None]" if width == 1 else \
                f"tl.broadcast_to({value}, [{chunk}, {width}])"
            store.append(f"tl.store({lay.rows_ptr(ptr, width)}, {value}, mask=valid)")
    for n in lay.outers:
        store.append(f"acc_{n} += {names[grad_of['out_' + n]]}")
    fill = {
        "SIGNATURE": sig,
        "LOAD_OUTERS": lay.load_outers() + [f"acc_{n} = tl.zeros([{', '.join(map(str, lay.tile_of(n)))}], "
                                            "dtype=tl.float32)" for n in lay.outers],
        "LOAD_DSTATE": [f"d{s} = {lay.load(lay.state_ptr('D' + s, s), s[2:])}" for s in lay.states] + _masks(graph) +
                       [f"carry_{n} = tl.zeros([{hh}, {w}], dtype=tl.float32)" for n, hh, w in carries],
        "LOAD_STATE": [f"{s} = {lay.load(lay.saved_ptr('SAVE_' + s, s), s[2:])}" for s in lay.states],
        "LOAD_TOKENS": tokens,
        "BODY": body,
        "STORE_GRADS": store,
        "CARRY_DSTATE": [f"d{s} = {names[grad_of[s]]}" for s in lay.states] +
                        [f"carry_{n} = {names[grad_of['carry_' + n]]}" for n, _, _ in carries],
        "STORE_DSTATE": [lay.store(lay.state_ptr("D" + s, s), s[2:], f"d{s}") for s in lay.states] +
                        [lay.store(f"DO_{n} + (pid_b * H + pid_h) * {lay.numel(n)} + {lay.idx(n)}", n, f"acc_{n}")
                         for n in lay.outers],
    }
    indent = {"LOAD_OUTERS": 4, "LOAD_DSTATE": 4, "LOAD_STATE": 8, "LOAD_TOKENS": 8, "BODY": 8, "STORE_GRADS": 8,
              "CARRY_DSTATE": 8, "STORE_DSTATE": 4}
    return _fill("chunk_bwd.py.tmpl", fill, indent, _header(p, spec, "backward", sizes, chunk, precision, read_order))


__all__ = ["Unsupported", "backward_graph", "generate_backward", "generate_forward", "supported"]
