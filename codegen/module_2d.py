"""A 2-D rule (memdsl/twod.py) → one standalone, readable Python module (torch only): what
`memdsl compile rules/hydra.mem -o hydra_mem.py` writes.

Layout of a generated 2-D module: header (rule, algorithm, tile), RULE_SOURCE, the 2-D runtime (copied
verbatim from `runtime_2d.py`), `make_init` (from `frontend_torch.py`), the emitted per-cell functions
(`grads`, `read`, `hyper`: the same ones Rule2D runs), `sizes`/`shapes`, SPEC and SPEC2D (plain data),
the call (`Call2D`, `Memory2D`, copied verbatim from memdsl/twod.py) and the public entry points
`memory`, `RULE` and the nn.Module `Memory`.
"""

from __future__ import annotations

import inspect

from memdsl.printer import summary
from memdsl.program import Program

from .frontend_torch import make_init
from .module import HERE, _sizes_and_shapes, _strip_imports, emitted_cell_functions, source_hash, spec_of


def generate_2d(p: Program) -> str:
    """The whole module text for a checked 2-D Program (memdsl.twod.program_2d)."""
    from memdsl import twod
    tile = p.schedule.tile
    spec = spec_of(p)
    parts = [
        f'"""memdsl-generated module for the 2-D rule `{p.name}` (sha256 {source_hash(p.source)[:12]}).\n\n'
        "Standalone: needs torch only. The rule source is in RULE_SOURCE; the algorithm is\n"
        f"`{p.algorithm}` ({p.algorithm_reason}); tile time {tile[0]} variate {tile[1]}"
        f"{', bidirectional' if p.axes.bidirectional else ''}.\n"
        "Entry points: memory(q, k, v, gates, params, state, backend=, tile=) with tokens [B, T, V, H, D] and\n"
        "gates [B, T, V, H]; backends auto, wavefront, tiles, anchored_loop. Memory (nn.Module).\n"
        '"""\n',
        "import math\n\nimport torch\n",
        f"RULE_SOURCE = {p.source!r}\n",
        f"SUMMARY = {summary(p)!r}\n",
        "# ---- runtime_2d.py " + "-" * 60 + "\n" + _strip_imports((HERE / "runtime_2d.py").read_text()),
        "# ---- frontend_torch.py: make_init " + "-" * 45 + "\n" + inspect.getsource(make_init),
        *emitted_cell_functions(p),
        _sizes_and_shapes(p),
        f"SPEC = {spec!r}\n",
        f"SPEC2D = {twod.spec_2d(p, spec)!r}\n",
        "# ---- memdsl/twod.py: the call " + "-" * 49 + "\n" + inspect.getsource(twod.Call2D),
        inspect.getsource(twod.Memory2D),
        "# ---- entry points " + "-" * 60 + "\n"
        "RULE = Call2D(SPEC2D, {'SPEC': SPEC, 'grads': grads, 'read': read, 'hyper': hyper, 'sizes': sizes,\n"
        "                       'shapes': shapes, 'make_init': make_init})\n\n\n"
        "def memory(q, k, v, gates=None, params=None, state=None, *, backend='auto', tile=None, sizes=None):\n"
        '    """y, state = memory(q, k, v, gates, params, state): tokens [B, T, V, H, D], gates [B, T, V, H];\n'
        "    y [B, T, V, H, Dv]; state {'A.<param>': [B, H, V, *shape]} (and 'Ab.<param>' when bidirectional).\"\"\"\n"
        "    return RULE(q, k, v, gates, params, state, backend=backend, tile=tile, sizes=sizes)\n\n\n"
        "class Memory(Memory2D):\n"
        f'    """The `{p.name}` memory as an nn.Module: outers and the initial memory are Parameters."""\n\n'
        "    def __init__(self, n_heads, d, **sizes):\n"
        "        super().__init__(RULE, n_heads, d, **sizes)\n",
    ]
    return "\n\n".join(parts)
