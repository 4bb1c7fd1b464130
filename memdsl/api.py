"""`memdsl.compile`: a rule file becomes a callable, cached, torch-backed memory layer.

The compiled artefact is the generated module text (codegen/module.py) — the same file
`memdsl compile -o` writes. It is cached on disk by content hash (atomic writes; a corrupted
entry is detected by its checksum line and rebuilt) and in memory per process.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import linecache
import os
import sys
import tempfile
import threading
import types
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .driver import load, read_source

if TYPE_CHECKING:
    from .twod import Rule2D

_MEMO: dict[str, CompiledRule] = {}
_LOCK = threading.Lock()
_HEADER = "# memdsl-cache sha256="
# backend="auto" on CPU tensors that need a gradient takes the torch-printed tile programs (codegen/tile_torch.py,
# a generated backward) for dual-form rules at chunks up to this size, the torch chunk path above it (0: never).
# Measured side by side (tiles / torch chunk program, fwd+bwd, cpu-small, 2 threads, medians of 7-9, load 1.5;
# since the backward computes only the gradients asked for, tile_torch_kernel): titans 0.69 (C=16), 0.81 (C=32),
# 0.92-0.93 (C=64) with every gradient, 0.76 / 0.88 / 0.96 with q, k, v only; at C=64 titans_linear 0.90-0.92,
# linear_attention 0.87, ttt_mlp 0.77-0.81, yaad 0.85-0.91 (one thread, process time: the same order, titans at
# C=64 0.94-0.99). Larger chunks are not measured. Where the time goes: the per-chunk state passes (GEMMs with K or
# M = C, <state, cotangent> products), not the decay algebra (a few % of it).
TILES_UP_TO_CHUNK = 64


def cache_dir() -> Path:
    root = os.environ.get("MEMDSL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "memdsl")
    return Path(root)


@functools.cache
def _compiler_fingerprint() -> str:
    """A hash of memdsl's own code: a new compiler never reuses an old compiler's cache entries."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(__version__.encode())
    for folder in ("memdsl", "codegen", "grammar"):
        for f in sorted((root / folder).glob("*.*")):
            if f.suffix in (".py", ".lark"):
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _key(source: str, schedule: dict) -> str:
    text = f"{_compiler_fingerprint()}\n{sorted(schedule.items())!r}\n{source}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_cached(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # unreadable or not text at all: rebuild
        return None
    first, _, body = text.partition("\n")
    if not first.startswith(_HEADER) or first[len(_HEADER):] != hashlib.sha256(body.encode()).hexdigest():
        return None  # partial or corrupted: rebuild
    return body


def _write_atomic(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"{_HEADER}{hashlib.sha256(body.encode()).hexdigest()}\n{body}"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def module_source(path_or_source: str, **schedule) -> tuple[str, str]:
    """The generated module text for a rule (from the cache when possible) and its cache key. A 2-D rule
    gets its own standalone module (codegen/module_2d.py; schedule: tile, semantics)."""
    source, _ = read_source(path_or_source)
    return _module_source(source, path_or_source, _is_2d(source, path_or_source), schedule)


def _module_source(source: str, path_or_source: str, two_d: bool, schedule: dict) -> tuple[str, str]:
    if two_d:
        _check_2d_options(source, path_or_source, schedule)
    key = _key(source, {**schedule, "2d": True} if two_d else schedule)
    path = cache_dir() / f"{key}.py"
    body = _read_cached(path)
    if body is None:
        if two_d:
            from codegen.module_2d import generate_2d

            from .twod import program_2d
            body = generate_2d(program_2d(path_or_source, schedule.get("tile"), schedule.get("semantics")))
        else:
            from codegen.module import generate
            body = generate(load(path_or_source, schedule=schedule))
        try:
            _write_atomic(path, body)
        except OSError:
            pass  # a read-only cache is not an error: compile in memory
    return body, key


def _is_2d(source: str, path_or_source: str) -> bool:
    """A 2-D rule has its own runtime (memdsl/twod.py): the 1-D module would silently drop its axes."""
    from .parse import parse
    from .twod import is_2d
    return is_2d(parse(source, path_or_source if source != path_or_source else "<rule>"))


def _check_2d_options(source: str, path_or_source: str, schedule: dict) -> None:
    """A 2-D rule is scheduled in tiles: 1-D options (chunk, ...) are refused, not silently dropped."""
    extra = sorted(set(schedule) - {"tile", "semantics"})
    if extra:
        from .parse import parse
        name = parse(source, path_or_source if source != path_or_source else "<rule>").memory.name
        raise ValueError(f"rule {name} is 2-D (axes time, variate): {', '.join(extra)} is a 1-D option; a 2-D "
                         "rule takes tile=(T, V) and semantics='exact' | 'anchored'")


def _on_gpu(q) -> bool:
    """Inputs the Triton kernels run on (CUDA tensors); CPU tensors take the torch programs."""
    return bool(getattr(q, "is_cuda", False))


_MODULE_LOCK = threading.Lock()


def new_module(name: str) -> types.ModuleType:
    """An empty module for generated code, registered in sys.modules under a name no other module has:
    torch.compile (dynamo) finds a function's globals by importing its module's name, so an unregistered
    module fails it (`ModuleNotFoundError`) instead of compiling or breaking the graph."""
    with _MODULE_LOCK:
        unique, n = name, 1
        while unique in sys.modules:
            n += 1
            unique = f"{name}_{n}"
        mod = types.ModuleType(unique)
        sys.modules[unique] = mod
    return mod


class CompiledRule:
    """A compiled rule: call it, `init_state`, `step`; `print` it to see what was compiled."""

    def __init__(self, source_text: str, key: str):
        self.module_source = source_text
        self.key = key
        mod = new_module(f"memdsl_rule_{key}")
        filename = f"<memdsl rule {key}>"
        linecache.cache[filename] = (len(source_text), None, source_text.splitlines(True), filename)
        exec(builtins.compile(source_text, filename, "exec"), mod.__dict__)
        self.module = mod
        self.spec = mod.SPEC
        self.impl = mod.RULE
        self._triton_reasons: dict[str, str | None] = {}
        self._tiles_reasons: dict[tuple, str | None] = {}
        self._kernel_failures: dict[tuple, str] = {}  # (sizes, chunk, order, dtype) -> the kernels' error
        self._module_class: type | None = None
        self._eager = None  # __call__ outside torch.compile's tracing

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def algorithm(self) -> str:
        return self.spec["algorithm"]

    @property
    def chunk(self) -> int:
        return self.spec["chunk"]

    def __call__(self, q, k, v, gates=None, params=None, state=None, *, backend: str = "auto",
                 cu_seqlens=None, **kw):
        """y, state = rule(q, k, v, gates, params, state). With `cu_seqlens` (flash-linear-attention's
        convention: B = 1, sequence i is tokens cu[i]..cu[i+1]) every packed sequence runs from its own
        state ([N, H, ...]); y is [1, T, H, Dv] and the state has one entry per sequence.
        Under torch.compile the call is one graph break: it runs eagerly — its programs are generated
        already (Triton kernels, tile programs), and tracing into the generator would cost minutes."""
        if self._eager is None:
            import torch
            self._eager = torch.compiler.disable(self._dispatch)
        with self.module.no_autocast(q):  # the programs choose their own precision (frontend_torch.no_autocast)
            return self._eager(q, k, v, gates, params, state, backend=backend, cu_seqlens=cu_seqlens, **kw)

    def _dispatch(self, q, k, v, gates=None, params=None, state=None, *, backend: str = "auto",
                  cu_seqlens=None, **kw):
        from codegen.triton_launch import check_cu_seqlens, run_packed
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, q)
        read_order = kw.get("read_order")
        unknown = set(kw) - {"chunk", "read_order"}  # options only the torch paths have (sizes, check_finite)
        if isinstance(state, dict) and any(key.startswith("hist.") for key in state):
            unknown.add("state with window history (hist.*)")  # the kernels start windows fresh
        if backend == "triton" or (backend == "auto" and not unknown and self._auto_triton(q, k, v, kw.get("chunk"),
                                                                                          read_order)):
            from codegen import triton_run
            from codegen.triton_launch import raised_by_triton
            if self.triton_reason(read_order) is not None:
                raise ValueError(f"rule {self.name} has no Triton kernel yet: {self.triton_reason(read_order)}")
            if unknown:
                raise ValueError(f"the Triton path does not take {sorted(unknown)} yet: use a torch backend")
            def backward_failed(err: Exception) -> None:
                self._kernel_failed(q, k, v, kw.get("chunk"), read_order, err)
            try:
                return triton_run.run_triton(self, q, k, v, gates, params, state, kw.get("chunk"), cu_seqlens,
                                             read_order, on_backward_failure=None if backend == "triton"
                                             else backward_failed)
            except Exception as err:
                # a generated kernel that Triton cannot compile or launch here (e.g. out of shared memory on
                # this GPU): "auto" records it and takes the torch program; backend="triton" raises
                if backend == "triton" or not raised_by_triton(err):
                    raise
                self._kernel_failed(q, k, v, kw.get("chunk"), read_order, err)
        def init_state():
            return self.impl.init_state(1, q.shape[2], sizes=self.impl.sizes(k=k, v=v, q=q), device=q.device,
                                        params=params)
        if backend == "tiles" or (backend == "auto" and self._tiles_by_default(q, k, v, gates, params, state, unknown,
                                                                               kw.get("chunk"), read_order)):
            return self._run_tiles(q, k, v, gates, params, state, kw.get("chunk"), read_order, unknown, cu_seqlens,
                                   init_state)
        if cu_seqlens is not None:
            return run_packed(self.impl, init_state, q, k, v, gates, params, state, cu_seqlens, backend=backend, **kw)
        return self.impl(q, k, v, gates, params, state, backend=backend, **kw)

    def _auto_triton(self, q, k, v, chunk, read_order) -> bool:
        """backend="auto" takes the Triton kernels: CUDA inputs, kernels that fit, and no earlier failure of
        the kernels at these sizes in this process."""
        if not _on_gpu(q) or not self._kernels_fit(q, k, v, chunk, read_order):
            return False
        return self._failure_key(q, k, v, chunk, read_order) not in self._kernel_failures

    def _failure_key(self, q, k, v, chunk, read_order) -> tuple:
        sizes, c = self._call_sizes(q, k, v, chunk) or ({}, chunk)
        return tuple(sorted(sizes.items())), c, read_order or self.spec["read_order"], str(q.dtype)

    def _kernel_failed(self, q, k, v, chunk, read_order, err: Exception) -> None:
        """Remember (per process) that the kernels failed at these sizes, and say so once. The backward kernel,
        compiled at the first backward, reports here too (codegen/triton_run.py: that backward then runs the
        torch tile program on the same buffers)."""
        import warnings
        self._kernel_failures[self._failure_key(q, k, v, chunk, read_order)] = repr(err)
        warnings.warn(f"memdsl: the Triton kernels of rule {self.name} failed here ({type(err).__name__}: {err}); "
                      "backend='auto' runs the torch program at these sizes from now on (backend='triton' raises "
                      "the error)", RuntimeWarning, stacklevel=3)

    def _kernels_fit(self, q, k, v, chunk, read_order) -> bool:
        """backend="auto" on CUDA: the Triton kernels when the rule has them AND they can be generated at these
        sizes and chunk (not, say, ATLAS's per-position tiles at d = 64: those would raise at the first call);
        otherwise the torch paths. A malformed call goes to the frontend, which says why."""
        if self.triton_reason(read_order) is not None:
            return False
        from codegen.triton_run import kernel_reason
        found = self._call_sizes(q, k, v, chunk)
        return found is not None and kernel_reason(self, *found, read_order) is None

    def _call_sizes(self, q, k, v, chunk) -> tuple[dict[str, int], int] | None:
        """The sizes and chunk of a call, for the automatic dispatch; None for a malformed call (the frontend
        then raises the helpful error)."""
        try:
            sizes = {n: int(x) for n, x in self.impl.sizes(k=k, v=v, q=q).items()}
            return sizes, int(self.spec["chunk"] if chunk is None else chunk)
        except Exception:  # noqa: BLE001 - any malformed input: the frontend says what is wrong
            return None

    def _run_tiles(self, q, k, v, gates, params, state, chunk, read_order, unknown, cu_seqlens, init_state):
        from codegen.tile_torch_kernel import run_tiles
        from codegen.triton_launch import run_packed
        if unknown:
            raise ValueError(f"the tile programs do not take {sorted(unknown)} yet: use backend='chunk'")
        chunk = self.spec["chunk"] if chunk is None else chunk
        if isinstance(chunk, (bool, str, bytes)) or not hasattr(chunk, "__index__") or int(chunk) < 1:
            raise ValueError(f"chunk must be an integer ≥ 1, got {chunk!r}")
        sz = self.impl.sizes(k=k, v=v, q=q)
        shapes = self.impl.fns["shapes"](sz)
        self.impl._check_tokens(q, k, v, shapes)  # the frontend's own checks: the same messages on every path
        extra = sorted(set(params or {}) - set(self.spec["outers"]) - set(self.spec["params"]))
        if extra:
            raise ValueError(f"unknown params {extra}; rule {self.name} takes outers {list(self.spec['outers'])} "
                             f"and initial memories {list(self.spec['params'])}")
        if state is not None:
            self.impl._check_state(state, len(cu_seqlens) - 1 if cu_seqlens is not None else q.shape[0], q.shape[2],
                                   shapes, q.device)
        why = self.tiles_reason(read_order, {n: int(x) for n, x in sz.items()}, int(chunk))
        if why is not None:
            raise ValueError(f"rule {self.name} has no tile program: {why}")

        def call(q, k, v, gates, params, state):
            return run_tiles(self, q, k, v, gates, params, state, int(chunk), read_order)
        if cu_seqlens is not None:
            return run_packed(call, init_state, q, k, v, gates, params, state, cu_seqlens)
        return call(q, k, v, gates, params, state)

    def _tiles_by_default(self, q, k, v, gates, params, state, unknown, chunk, read_order) -> bool:
        """backend="auto" on CPU tensors takes the tile programs (a generated backward) when a gradient is
        needed and they cover the rule at these sizes; fp32/bf16/fp16 inputs only (they compute in fp32:
        float64 stays on the torch chunk path). Anything malformed goes to the frontend, which says why."""
        import torch
        if TILES_UP_TO_CHUNK < 1 or unknown or not isinstance(q, torch.Tensor) or q.is_cuda \
                or q.dtype == torch.float64 or not torch.is_grad_enabled():
            return False
        dicts = [{} if d is None else d for d in (gates, params, state)]  # not `d or {}`: d may be a tensor
        tensors = [q, k, v, *(t for d in dicts for t in d.values())] if all(isinstance(d, dict) for d in dicts) else []
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
            return False
        found = self._call_sizes(q, k, v, chunk)
        # measured for the dual-form rules only (titans, titans_linear): the WY rules keep their torch algorithm
        dual = self.spec["dual"] and self.spec["algorithm"] != "wy"
        return dual and found is not None and 1 <= found[1] <= TILES_UP_TO_CHUNK and q.dim() == 4 \
            and self.tiles_reason(read_order, *found) is None

    def tiles_reason(self, read_order: str | None = None, sizes: dict[str, int] | None = None,
                     chunk: int | None = None) -> str | None:
        """None when the torch-printed tile programs (backend="tiles") cover this rule (read at `read_order`;
        with sizes and chunk: at those sizes, both directions generated); else why the torch chunk path runs."""
        read_order = read_order or self.spec["read_order"]
        key = (read_order, tuple(sorted((sizes or {}).items())), chunk)
        if key not in self._tiles_reasons:
            from codegen.tile_torch_kernel import Unsupported, kernel_for
            why = self.triton_reason(read_order)  # the same slice: the tile graphs the Triton kernels print
            if why is None and sizes is not None:
                try:
                    for direction in ("fwd", "bwd"):
                        kernel_for(self, sizes, int(chunk or self.chunk), direction, read_order)
                except Unsupported as err:
                    why = str(err)
            self._tiles_reasons[key] = why
        return self._tiles_reasons[key]

    def triton_reason(self, read_order: str | None = None) -> str | None:
        """None when the generated Triton kernels cover this rule (read at `read_order`); else why not."""
        read_order = read_order or self.spec["read_order"]
        if read_order not in self._triton_reasons:
            from codegen.triton_gen import supported
            self._triton_reasons[read_order] = supported(load(self.module.RULE_SOURCE), self.spec, read_order)
        return self._triton_reasons[read_order]

    def init_state(self, B: int, H: int, d: int | None = None, **kw):
        return self.impl.init_state(B, H, d, **kw)

    def step(self, q, k, v, gates=None, state=None, params=None, **kw):
        return self.impl.step(q, k, v, gates, state, params, **kw)

    def module_class(self) -> type:
        """The rule as an nn.Module class (outer constants and initial memory as Parameters) whose forward runs
        through this compiled rule: the Triton kernels on CUDA, the tile programs for CPU training, else the
        torch chunk program — what `rule(...)` itself picks (the generated module's own forward knows only
        its torch paths). It also takes `cu_seqlens` (packed sequences)."""
        if self._module_class is None:
            rule = self

            class Memory(self.module.Memory):
                def forward(self, q, k, v, gates=None, state=None, chunk=None, backend="auto", cu_seqlens=None):
                    return rule(q, k, v, gates, self.params(), state, chunk=chunk, backend=backend,
                                cu_seqlens=cu_seqlens, **self.size_kw())

            Memory.__qualname__ = Memory.__name__ = f"Memory_{self.name}"
            self._module_class = Memory
        return self._module_class

    def __deepcopy__(self, memo) -> CompiledRule:
        """Itself: a compiled rule is immutable and shared (copy.deepcopy of a model — EMA, SWA's AveragedModel —
        copies the layers' parameters, not their compiled rules; a module object cannot be copied anyway)."""
        return self

    def __repr__(self) -> str:
        sig = ("y, state = rule(q[B,T,H,Dk], k[B,T,H,Dk], v[B,T,H,Dv], gates={"
               + ", ".join(f"{g}: [B,T,H{',n' if info['channels'] else ''}]" for g, info in self.spec["gates"].items())
               + "}, params={" + ", ".join(self.spec["outers"]) + "}, state=None)")
        return f"CompiledRule {self.name}\n  {sig}\n" + self.module.SUMMARY + self._cpu_path()

    def _cpu_path(self) -> str:
        """Which program CPU training runs under backend="auto", and whether the tile programs cover the rule
        (checked at d = 16, chunk 16 when the rule's sizes follow from d alone)."""
        try:
            why = self.tiles_reason(None, {n: int(x) for n, x in self.impl.sizes(sizes={"d": 16}).items()}, 16)
        except ValueError:  # sizes other than d: the coverage check without sizes
            why = self.tiles_reason()
        except Exception as err:  # noqa: BLE001 - printing a rule must not fail
            why = f"{type(err).__name__}: {err}"
        tiles = "covered" if why is None else f"not covered: {why}"
        dual = self.spec["dual"] and self.spec["algorithm"] != "wy"
        auto = f"tile programs at chunk ≤ {TILES_UP_TO_CHUNK}, else torch chunk program" \
            if TILES_UP_TO_CHUNK >= 1 and dual and why is None else "torch chunk program"
        return f"\n  CPU training (backend='auto'): {auto}; backend='tiles' {tiles}"


def compile(path_or_source: str, chunk: int | None = None, **schedule) -> CompiledRule | Rule2D:  # noqa: A001
    """Compile a rule file (path or text). Schedule overrides: chunk, semantics. A 2-D rule (`axes time,
    variate`) returns memdsl.twod.compile_2d's Rule2D; its overrides are tile=(T, V) and semantics, and a
    1-D option such as chunk is an error. (2-D rules are kept per process by source text, not on disk:
    compiling one takes 20-150 ms.)"""
    opts = {k: v for k, v in {"chunk": chunk, **schedule}.items() if v is not None}
    source, _ = read_source(path_or_source)
    key = _key(source, opts)
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
    if _is_2d(source, path_or_source):
        from .twod import compile_2d
        _check_2d_options(source, path_or_source, opts)
        return compile_2d(path_or_source, tile=opts.get("tile"), semantics=opts.get("semantics"))
    body, key = _module_source(source, path_or_source, False, opts)
    rule = CompiledRule(body, key)
    with _LOCK:
        _MEMO[key] = rule
    return rule
