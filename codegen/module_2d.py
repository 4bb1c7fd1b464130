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
import math
import pprint

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


def kernel_table_2d(rule, size_sets: list[dict[str, int]]) -> dict[tuple, dict]:
    """For each size set: the generated 2-D Triton kernels (fwd / bwd, one variate chunk / several) at the tile
    the kernels run for grids at least one tile large (triton_2d.kernel_tile), with what the launch needs.
    rule: a Rule2D. Raises ValueError when the kernels do not cover the rule at those sizes."""
    from .chunk_tiles import Unsupported, tile_shape_of
    from .tile2d_tiles import tile_sizes
    from .triton_2d import kernel_source, kernel_tile, reason
    big = 1 << 16  # a grid larger than every tile: the kernel tile is then the full one
    table = {}
    for given in size_sets:
        sz = {n: int(x) for n, x in rule.fns["sizes"](given).items()}
        why = reason(rule, sz, big, big, rule.tile)
        if why is not None:
            raise ValueError(f"rule {rule.name}: no 2-D Triton kernel for sizes {sz}, tile {rule.tile}: {why}")
        Tc, Vc, Tp, Vp = tile_sizes(kernel_tile(rule, rule.tile, big, big), big, big)
        shapes = rule.fns["shapes"](sz)
        entry = {"tile": (Tc, Vc, Tp), "widths": tuple(math.prod(tile_shape_of(list(shapes[p])))
                                                       for p in rule.spec2d["params"])}
        try:
            for direction in ("fwd", "bwd"):
                for rows in (False, True):
                    entry[f"{direction}{'_rows' if rows else ''}"] = kernel_source(rule, sz, (Tp, Vp), direction, rows)
        except Unsupported as err:
            raise ValueError(f"rule {rule.name}: no 2-D Triton kernel for sizes {sz}: {err}") from None
        table[tuple(sorted(sz.items()))] = entry
    return table


_DISPATCH_2D = '''
KERNELS_2D = {table}
_LOADED = {{}}


def _kernel(key, direction, rows):
    name = direction + ("_rows" if rows else "")
    if (key, name) not in _LOADED:
        _LOADED[key, name] = import_kernel(KERNELS_2D[key][name], f"memdsl_tile2d_{{direction}}", "triton2d")
    return _LOADED[key, name]


class Call2DTriton(Kernels2D):
    """The carried kernels (Kernels2D's backend="triton" and auto), for calls at a carried size set, at the
    module's tile, over a grid at least one kernel tile large."""

    def _kernel_reason(self, sz, T, V, tile):
        entry = KERNELS_2D.get(tuple(sorted((n, int(x)) for n, x in sz.items())))
        if self.algorithm == "wavefront":
            return "the exact wavefront (semantics exact) has no tile kernel"
        if entry is None:
            return f"no kernel carried for sizes {{dict(sz)}}; carried: {{[dict(k) for k in KERNELS_2D]}}"
        if tuple(tile) != self.tile:
            return f"the kernels run the module's tile {{self.tile}}, not {{tuple(tile)}}"
        if T < entry["tile"][0] or V < entry["tile"][1]:
            return f"a grid of {{T}} x {{V}} cells, smaller than the kernel tile {{entry['tile'][:2]}}"
        return None

    def _run_kernels(self, args, tile, torch_backward=None):
        tok, kt, kv, lr, outers, sz, left, top = args
        if lr.shape[-1] != 1:
            raise ValueError("the carried 2-D kernels take a scalar learning rate, not a per-channel one")
        key = tuple(sorted((n, int(x)) for n, x in sz.items()))
        (Tc, Vc, Tp), widths = KERNELS_2D[key]["tile"], KERNELS_2D[key]["widths"]
        gates, outer_names = list(self.spec1d["gates"]), list(self.spec1d["outers"])

        def f32(x):
            return x.to(torch.float32).contiguous()

        tensors = [f32(tok[x]) for x in ("q", "k", "v")] + [f32(tok[g]) for g in gates]
        tensors += [f32(kt), f32(kv), f32(lr[..., 0])] + [f32(outers[o]) for o in outer_names]
        for p in self.spec2d["params"]:
            tensors += [f32(left[p]), f32(top[p])]
        save = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)

        def get_kernel(direction, rows):
            return _kernel(key, direction, rows)

        y, *last = Tile2D.apply(get_kernel, (Tc, Vc, Tp), len(gates), len(outer_names), widths, save,
                                torch_backward, *tensors)
        return y.to(kt.dtype), {{p: c.to(kt.dtype) for p, c in zip(self.spec2d["params"], last, strict=True)}}
'''


def add_kernels_2d(body: str, table: dict[tuple, dict]) -> str:
    """A standalone 2-D module that also carries generated Triton kernels (kernel_table_2d): RULE becomes a
    Call2DTriton. Kernel sources are string constants, imported (and compiled by Triton) on first use; the
    module still imports without triton installed."""
    from memdsl import twod

    from . import triton_2d, triton_launch
    marker = "# ---- entry points "
    configs = ", ".join(str(dict(k)) for k in table)
    carried = "\n\n".join(inspect.getsource(f) for f in (triton_launch.kernel_cache_dir, triton_launch.import_kernel,
                                                         triton_launch.raised_by_triton, triton_2d.Tile2D,
                                                         twod.Kernels2D))
    section = (f"# ---- generated 2-D Triton kernels ({configs}); triton_launch.py, triton_2d.py " + "-" * 10
               + "\n" + carried + "\n\n" + _DISPATCH_2D.format(table=pprint.pformat(table, width=120)) + "\n\n")
    body = body.replace(marker, section + marker, 1).replace("RULE = Call2D(", "RULE = Call2DTriton(", 1)
    imports = "import hashlib\nimport importlib.util\nimport os\nimport warnings\nfrom pathlib import Path\n"
    body = body.replace("import math\n\nimport torch\n", f"{imports}import math\n\nimport torch\n", 1)
    body = body.replace("backends auto, wavefront, tiles, anchored_loop.",
                        "backends auto, wavefront, tiles, anchored_loop, triton (the carried kernels).", 1)
    return body.replace("Standalone: needs torch only.",
                        "Standalone: needs torch (and triton for the carried kernels).", 1)
