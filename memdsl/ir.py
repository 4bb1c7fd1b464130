"""The IR: a networkx DAG of immutable `Node` payloads, with named inputs and outputs.

Node ids are ints; edge `(a, b, key=i)` says that `a` is operand `i` of `b`. The graph is
hash-consed (adding an op that already exists returns the existing node), which is common
subexpression elimination for free. Printed like a jaxpr: typed binders, sorted params.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import networkx as nx
import sympy as sp

from .ops import ELEMENTWISE, OPS, Kind, OpShapeError, Shape, fmt_shape, same


@dataclass(frozen=True)
class Node:
    op: str
    dtype: str
    shape: Shape
    attrs: tuple[tuple[str, Any], ...] = ()

    def attr(self, key: str, default: Any = None) -> Any:
        return next((v for k, v in self.attrs if k == key), default)

    @property
    def kind(self) -> Kind:
        return OPS[self.op].kind


class Graph:
    """A DAG of nodes. Built by `add`; passes build new graphs rather than mutating old ones."""

    def __init__(self) -> None:
        self.g = nx.MultiDiGraph()
        self.inputs: dict[str, int] = {}
        self.outputs: dict[str, int] = {}
        self._memo: dict[tuple, int] = {}
        self._ids = itertools.count()

    # ---- building ------------------------------------------------------------------------------
    def add(self, op: str, operands: Iterable[int] = (), dtype: str = "f32", **attrs: Any) -> int:
        operands = tuple(operands)
        d = OPS[op]
        if d.arity is not None and len(operands) != d.arity:
            raise OpShapeError(f"{op} takes {d.arity} operands, got {len(operands)}")
        shape = tuple(sp.sympify(s) for s in d.shape(tuple(self.node(o).shape for o in operands), attrs))
        node = Node(op, dtype, shape, tuple(sorted(attrs.items())))
        key = (node, operands)
        if key in self._memo:
            return self._memo[key]
        nid = next(self._ids)
        self.g.add_node(nid, node=node)
        for i, o in enumerate(operands):
            self.g.add_edge(o, nid, key=i)
        self._memo[key] = nid
        return nid

    def add_input(self, name: str, shape: Shape, role: str, dtype: str = "f32") -> int:
        nid = self.add("input", (), dtype, name=name, role=role, shape=tuple(shape))
        self.inputs[name] = nid
        return nid

    def const(self, value: Any, shape: Shape = ()) -> int:
        return self.add("const", (), value=sp.sympify(value), shape=tuple(shape))

    # ---- reading -------------------------------------------------------------------------------
    def node(self, nid: int) -> Node:
        return self.g.nodes[nid]["node"]

    def operands(self, nid: int) -> tuple[int, ...]:
        edges = sorted(self.g.in_edges(nid, keys=True), key=lambda e: e[2])
        return tuple(e[0] for e in edges)

    def users(self, nid: int) -> list[int]:
        return sorted({b for _, b in self.g.out_edges(nid)})

    def topo(self, roots: Iterable[int] | None = None) -> list[int]:
        """Nodes in a deterministic topological order (creation order among the ready)."""
        if roots is None:
            keep = set(self.g.nodes)
        else:
            keep = set()
            for r in roots:
                keep |= nx.ancestors(self.g, r) | {r}
        return list(nx.lexicographical_topological_sort(self.g.subgraph(keep)))

    def input_name(self, nid: int) -> str | None:
        n = self.node(nid)
        return n.attr("name") if n.op == "input" else None

    def depends_on(self, nid: int, names: Iterable[str]) -> bool:
        wanted = {self.inputs[n] for n in names if n in self.inputs}
        return bool(wanted & (nx.ancestors(self.g, nid) | {nid}))

    def __len__(self) -> int:
        return self.g.number_of_nodes()


# ---- verification ------------------------------------------------------------------------------

class VerifyError(Exception):
    pass


def verify(graph: Graph) -> None:
    """Structural invariants: acyclic, known ops, arities, shapes recomputed and equal, outputs exist."""
    if not nx.is_directed_acyclic_graph(graph.g):
        raise VerifyError("the graph has a cycle")
    for nid in graph.g.nodes:
        node = graph.node(nid)
        if node.op not in OPS:
            raise VerifyError(f"node {nid}: unknown op {node.op}")
        d = OPS[node.op]
        operands = graph.operands(nid)
        keys = sorted(k for _, _, k in graph.g.in_edges(nid, keys=True))
        if keys != list(range(len(operands))):
            raise VerifyError(f"node {nid}: operand slots {keys} are not 0..n-1")
        if d.arity is not None and len(operands) != d.arity:
            raise VerifyError(f"node {nid} ({node.op}): {len(operands)} operands, expected {d.arity}")
        try:
            shape = d.shape(tuple(graph.node(o).shape for o in operands), dict(node.attrs))
        except OpShapeError as e:
            raise VerifyError(f"node {nid} ({node.op}): {e}") from None
        if len(shape) != len(node.shape) or not all(same(a, b) for a, b in zip(shape, node.shape, strict=True)):
            raise VerifyError(f"node {nid} ({node.op}): shape {fmt_shape(node.shape)} != rule {fmt_shape(shape)}")
        if node.op == "ewise":
            free = {s.name for s in node.attr("expr").free_symbols}
            allowed = {f"x{i}" for i in range(len(operands))}
            if not {f for f in free if f.startswith("x") and f[1:].isdigit()} <= allowed:
                raise VerifyError(f"node {nid}: ewise expression uses symbols beyond its operands")
    for name, nid in graph.outputs.items():
        if nid not in graph.g.nodes:
            raise VerifyError(f"output {name} points at a missing node")


# ---- printing ----------------------------------------------------------------------------------

def _names() -> Iterable[str]:
    for n in itertools.count(1):
        for tup in itertools.product(string.ascii_lowercase, repeat=n):
            yield "".join(tup)


def _type(node: Node) -> str:
    dims = fmt_shape(node.shape) if node.shape else "[]"
    return f"{node.dtype}{dims}"


def _attr_text(key: str, value: Any) -> str:
    if isinstance(value, tuple):
        value = fmt_shape(value)
    return f"{key}={str(value).replace(' ', '')}" if key != "expr" else f"{key}={value}"


def print_function(graph: Graph, outputs: dict[str, int], title: str) -> str:
    """Print the part of `graph` that computes `outputs`, like a jaxpr."""
    order = graph.topo(outputs.values())
    input_ids = [n for n in order if graph.node(n).op == "input"]
    taken = set(graph.inputs)
    fresh = (n for n in _names() if n not in taken)
    names: dict[int, str] = {n: graph.input_name(n) for n in input_ids}
    lines = []
    for nid in order:
        node = graph.node(nid)
        if node.op == "input":
            continue
        if node.op == "const" and not node.shape:
            names[nid] = str(node.attr("value")).replace(" ", "")
            continue
        names[nid] = next(fresh)
        params = [(k, v) for k, v in node.attrs if not (node.op == "const" and k == "shape")]
        ptxt = "[" + " ".join(_attr_text(k, v) for k, v in params) + "]" if params else ""
        args = " ".join(names[o] for o in graph.operands(nid))
        lines.append(f"    {names[nid]}:{_type(node)} = {node.op}{ptxt} {args}".rstrip())
    binders = " ".join(f"{names[n]}:{_type(graph.node(n))}" for n in input_ids)
    outs = ", ".join(f"{k}={names[v]}" for k, v in outputs.items())
    return f"{title} = {{ lambda {binders}. let\n" + "\n".join(lines) + f"\n  in ({outs}) }}"


def is_elementwise(node: Node) -> bool:
    return node.op in ELEMENTWISE
