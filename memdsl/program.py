"""What the middle end knows about a rule: declarations, the IR graph and the chosen execution plan.

A `Program` is produced by `build.py` from the AST and then refined by the passes in `passes.py`
(autodiff adds gradient outputs, classify picks the chunk algorithm). Backends read only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import sympy as sp

from .errors import Span
from .ir import Graph
from .ops import Shape, fmt_shape


@dataclass(frozen=True)
class Init:
    """How an initial value is drawn: zeros, ones, eye, normal(std), taylor(p)."""

    kind: str
    args: tuple[tuple[str, Fraction], ...] = ()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: Shape
    role: str  # "param" (fast weight), "outer" (outer-learned constant), "token" (q/k/v), "gate"
    init: Init | None = None
    activation: str | None = None  # gates only
    span: Span | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        extra = f" {self.activation}" if self.activation else ""
        if self.init:
            args = ",".join(f"{k}={float(v):g}" for k, v in self.init.args)
            extra += f" init {self.init.kind}" + (f"({args})" if args else "")
        return f"{self.role} {self.name}:f32{fmt_shape(self.shape) if self.shape else '[]'}{extra}"


@dataclass(frozen=True)
class OptimSpec:
    kind: str                 # gd | momentum | muon
    lr: str                   # graph output names
    decay: str | None = None  # momentum decay (momentum, muon)
    scale: str | None = None  # reading-position step scale (TTT's 1/i)
    ns_steps: int = 0         # Newton–Schulz iterations (muon)
    clip: Fraction | None = None  # per-token gradient norm bound (each param separately)


@dataclass(frozen=True)
class RetainSpec:
    kind: str                          # decay | l2 | lq | softmax | elastic
    values: tuple[tuple[str, str], ...] = ()     # role -> graph output name
    numbers: tuple[tuple[str, Fraction], ...] = ()  # role -> constant
    grad_at: str = "anchor"            # decay only: "anchor" (Titans) or "decayed" (gated delta rule)

    def value(self, key: str) -> str | None:
        return dict(self.values).get(key)

    def number(self, key: str) -> Fraction | None:
        return dict(self.numbers).get(key)


@dataclass(frozen=True)
class LocalSpec:
    chunk: int
    reset: int


@dataclass(frozen=True)
class ScheduleSpec:
    chunk: int = 16
    global_chunk: int | None = None
    locals: tuple[LocalSpec, ...] = ()
    qk_projection: bool = True
    tile: tuple[int, int] | None = None
    semantics: str | None = None  # None: chosen by the classify pass

    @property
    def is_tnt(self) -> bool:
        return self.global_chunk is not None


@dataclass(frozen=True)
class AxesSpec:
    """A 2-D rule over time × variate (memdsl/twod.py): per-axis keep factors, as graph output names."""

    keep_time: tuple[str, ...]
    keep_variate: tuple[str, ...]
    bidirectional: bool = False  # also run the variate axis backwards and add the two reads


@dataclass
class Program:
    name: str
    path: str
    source: str
    dims: dict[str, sp.Expr | None]
    tensors: dict[str, TensorSpec]
    graph: Graph
    optim: OptimSpec
    retain: tuple[RetainSpec, ...]
    window: int = 1
    window_weight: str | None = None
    read_order: str = "after"
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    axes: AxesSpec | None = None        # set for 2-D rules only
    algorithm: str | None = None        # set by the classify pass
    algorithm_reason: str | None = None
    passes_run: list[str] = field(default_factory=list)
    read_span: Span | None = field(default=None, compare=False, repr=False)  # for errors found after folding

    def of_role(self, role: str) -> list[TensorSpec]:
        return [t for t in self.tensors.values() if t.role == role]

    @property
    def params(self) -> list[TensorSpec]:
        return self.of_role("param")

    @property
    def gates(self) -> list[TensorSpec]:
        return self.of_role("gate")

    @property
    def outers(self) -> list[TensorSpec]:
        return self.of_role("outer")
