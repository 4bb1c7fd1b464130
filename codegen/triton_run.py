"""Generated Triton kernels for compiled rules: generate on first use, cache on disk, launch.

The launch itself (autograd.Function, layouts, packed sequences) lives in triton_launch.py, which
standalone modules carry verbatim; this file adds what needs the compiler: generating the kernel
sources from the rule's program.
"""

from __future__ import annotations

from .triton_gen import Unsupported, generate_backward, generate_forward
from .triton_launch import launch, load_kernel, raised_by_triton

_KERNELS: dict[str, object] = {}
_REASONS: dict[str, str | None] = {}


def program_for(rule):
    """The rule's program with its gradient factors exposed (what the kernel generators read)."""
    from memdsl.driver import load

    from .module import factor_outputs
    program = load(rule.module.RULE_SOURCE, schedule={"chunk": rule.chunk} if rule.chunk else None)
    factor_outputs(program)
    return program


def kernel_for(rule, sizes: dict[str, int], chunk: int, direction: str = "fwd", read_order: str | None = None):
    """The forward ("fwd") or backward ("bwd") kernel for this rule, sizes, chunk and read order,
    generated on first use (the backward only when a gradient is asked for) and cached on disk."""
    read_order = read_order or rule.spec["read_order"]
    key = f"{rule.key}-{sorted(sizes.items())}-{chunk}-{direction}-{read_order}"
    if key not in _KERNELS:
        generate = generate_forward if direction == "fwd" else generate_backward
        source = generate(program_for(rule), rule.spec, sizes, chunk, read_order=read_order)
        _KERNELS[key] = load_kernel(source, f"memdsl_chunk_{direction}")
    return _KERNELS[key]


def kernel_reason(rule, sizes: dict[str, int], chunk: int, read_order: str | None = None) -> str | None:
    """None when kernels can be generated for these sizes and chunk; else why not — what `rule.triton_reason()`
    cannot know without sizes: token widths or a chunk that are not powers of two ≥ 16, per-position state
    tiles or any other printed tensor past Triton's largest (ATLAS's per-position W2 at d = 32, windowed
    polynomial features at d = 64). An automatic dispatch should ask this before it chooses the Triton path: a
    kernel that cannot be generated raises Unsupported at the first call."""
    read_order = read_order or rule.spec["read_order"]
    key = f"{rule.key}-{sorted(sizes.items())}-{chunk}-{read_order}"
    if key not in _REASONS:
        try:  # the backward graph holds the larger tiles (adjoints of the forward's): generating it checks both
            generate_backward(program_for(rule), rule.spec, sizes, chunk, read_order=read_order)
            _REASONS[key] = None
        except Unsupported as why:
            _REASONS[key] = str(why)
    return _REASONS[key]


def kernel_sources(rule, sizes: dict[str, int], chunk: int) -> tuple[str, str]:
    """The generated (forward, backward) Triton sources, for reading and for standalone modules."""
    program = program_for(rule)
    return generate_forward(program, rule.spec, sizes, chunk), generate_backward(program, rule.spec, sizes, chunk)


class BackwardWithFallback:
    """A backward kernel that, when Triton cannot compile or launch it here (the backward is compiled at the
    first backward, after its forward ran: a larger kernel, e.g. out of shared memory), reports the failure
    and runs the torch-printed tile program instead — same calling convention, same buffers, so autograd
    never sees the difference. Only `backend="auto"` asks for this; packed sequences and rules without a tile
    program raise as before."""

    def __init__(self, kernel, rule, sizes: dict[str, int], chunk: int, read_order: str | None, on_failure):
        self.kernel, self.rule, self.sizes, self.chunk = kernel, rule, sizes, chunk
        self.read_order, self.on_failure = read_order, on_failure

    def __getitem__(self, grid):
        def run(*args, **kw):
            try:
                return self.kernel[grid](*args, **kw)
            except Exception as err:
                if not raised_by_triton(err) or kw.get("VARLEN") or \
                        self.rule.tiles_reason(self.read_order, self.sizes, self.chunk) is not None:
                    raise
                self.on_failure(err)
            from .tile_torch_kernel import kernel_for as tiles_for
            return tiles_for(self.rule, self.sizes, self.chunk, "bwd", self.read_order)[grid](*args, **kw)
        return run


def run_triton(rule, q, k, v, gates, params, state, chunk, cu_seqlens=None, read_order=None,
               on_backward_failure=None):
    """The Triton path of a compiled rule: [B, T, H, D] in, (y, state) out, differentiable. With
    `on_backward_failure(err)`, a backward kernel Triton cannot run here falls back (BackwardWithFallback)."""
    def get_kernel(direction: str, sizes: dict[str, int], c: int):
        kernel = kernel_for(rule, sizes, c, direction, read_order)
        if direction == "bwd" and on_backward_failure is not None:
            return BackwardWithFallback(kernel, rule, sizes, c, read_order, on_backward_failure)
        return kernel
    return launch(rule.impl, rule.spec, get_kernel, q, k, v, gates, params, state, chunk or rule.chunk, cu_seqlens)


__all__ = ["BackwardWithFallback", "Unsupported", "kernel_for", "kernel_reason", "kernel_sources", "program_for",
           "run_triton"]
