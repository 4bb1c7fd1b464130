"""Pictures of the IR: Graphviz DOT text (always), PNG through matplotlib (when installed)."""

from __future__ import annotations

import networkx as nx

from .ir import Graph
from .ops import fmt_shape


def _label(g: Graph, nid: int) -> str:
    n = g.node(nid)
    if n.op == "input":
        return f"{n.attr('name')}\\n{fmt_shape(n.shape)}"
    if n.op == "const":
        return str(n.attr("value"))
    return f"{n.op}\\n{fmt_shape(n.shape)}"


def to_dot(g: Graph) -> str:
    outs = {v: k for k, v in g.outputs.items()}
    lines = ["digraph memdsl {", "  rankdir=TB; node [shape=box, fontname=monospace, fontsize=10];"]
    for nid in g.topo():
        style = ', style=filled, fillcolor="#dde8ff"' if g.node(nid).op == "input" else ""
        style = ', style=filled, fillcolor="#ffe4c4"' if nid in outs else style
        label = _label(g, nid) + (f"\\n=> {outs[nid]}" if nid in outs else "")
        lines.append(f'  n{nid} [label="{label}"{style}];')
    for a, b, k in g.g.edges(keys=True):
        lines.append(f'  n{a} -> n{b} [label="{k}", fontsize=8];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_png(g: Graph, path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG written (pip install matplotlib)"
    for layer, nodes in enumerate(nx.topological_generations(g.g)):
        for n in nodes:
            g.g.nodes[n]["layer"] = layer
    pos = nx.multipartite_layout(g.g, subset_key="layer", align="horizontal")
    pos = {k: (x, -y) for k, (x, y) in pos.items()}
    fig, ax = plt.subplots(figsize=(max(8, len(g) * 0.35), 10))
    labels = {n: _label(g, n).replace("\\n", "\n") for n in g.g.nodes}
    nx.draw_networkx(g.g, pos, ax=ax, labels=labels, node_size=900, node_color="#dde8ff", font_size=6,
                     arrows=True, arrowsize=8)
    ax.axis("off")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"wrote {path}"
