"""Hypothesis strategies for `.mem` files, and the property every input must satisfy.

* `rule_files()` draws *valid-looking* rules from the grammar (grammar/memdsl.lark) and the language
  reference (docs/language.md): a model family, gates, a loss built from random elementwise
  expressions and reductions, an optimizer (with clip), retention, window, read and schedule.
  Most of them compile; the rest must be rejected with a positioned error.
* `mutated_files()` damages shipped or generated rules: deletions, swaps, duplicated lines, junk
  tokens, huge and tiny numbers, unicode, deep nesting, truncation, renamed identifiers.
* `check_source(text)` is the property: the text either compiles, its generated module executes and
  `quick_check` (exact loop == chunk program at C=1) holds, or it raises a `MemDSLError` that has a
  position and renders — never another exception, never longer than the time limit.

Used by tests/test_fuzz.py (a short run in CI) and `make fuzz` (the long run, docs/robustness.md).
"""

from __future__ import annotations

import contextlib
import re
import signal
from pathlib import Path

from hypothesis import strategies as st

from codegen.module import generate
from memdsl.api import CompiledRule
from memdsl.checking import quick_check
from memdsl.driver import load
from memdsl.errors import MemDSLError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {p.stem: p.read_text() for p in sorted((ROOT / "rules").glob("*.mem"))}

GATE_NAMES = ("theta", "eta", "alpha", "beta", "gamma", "lam", "g_1", "Mu", "_z")
ACTIVATIONS = ("sigmoid", "softplus", "exp", "identity", "tanh", "silu")
UNARY = ("tanh", "sigmoid", "silu", "gelu", "relu", "elu", "elu1", "softplus", "abs", "sign", "exp", "l2norm")
BOUNDED = ("tanh", "sigmoid", "silu", "gelu", "relu", "elu1", "softplus")


class CaseTimeout(Exception):
    """A case ran past its time limit: a hang, as far as the property is concerned."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def fire(signum, frame):
        raise CaseTimeout(f"a case ran longer than {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_source(text: str, seconds: float = 30.0) -> str:
    """The fuzz property. Returns the outcome ("compiled <algorithm>: <check>" or "rejected E...");
    raises (AssertionError, CaseTimeout or whatever escaped the compiler) when it does not hold."""
    if "\n" not in text:
        text += "\n"  # memdsl.load takes a path or rule text; text without a newline would be a path
    with time_limit(seconds):
        try:
            rule = CompiledRule(generate(load(text)), "fuzz")
        except MemDSLError as err:  # from any stage: parse, build, passes or code generation
            assert err.span is not None, f"{err.code} without a position: {err.message}"
            rendered = err.render()
            assert f"error[{err.code}]" in rendered and "^" in rendered, rendered
            return f"rejected {err.code}"
        return f"compiled {rule.algorithm}: {quick_check(rule)}"


# ---- valid rules from the grammar ----------------------------------------------------------------

def _num(draw, lo=0.01, hi=3.0) -> str:
    x = draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False))
    return draw(st.sampled_from([f"{x:.3g}", f"{x:.2e}", str(round(x, 2))]))


@st.composite
def _hyper(draw, scalars: list[str], channels: list[str], allow_channels: bool = True) -> str:
    """An optimizer / retention argument: gates, numbers, sizes, a value in (0, 1) most of the time."""
    pool = scalars + (channels if allow_channels else [])
    forms = ["num"] + (["g", "1 - g", "0.5 * g", "g / d", "g * g"] if pool else [])
    form = draw(st.sampled_from(forms))
    if form == "num":
        return _num(draw, 0.01, 0.99)
    return form.replace("g", draw(st.sampled_from(pool)), form.count("g"))


@st.composite
def _vexpr(draw, atoms: list[str], gates: list[str], depth: int) -> str:
    """A vector expression of v's shape."""
    if depth <= 0 or draw(st.booleans()):
        return draw(st.sampled_from(atoms))
    kind = draw(st.sampled_from(["unary", "binary", "scaled", "paren"]))
    a = draw(_vexpr(atoms, gates, depth - 1))
    if kind == "unary":
        return f"{draw(st.sampled_from(UNARY))}({a})"
    if kind == "binary":
        b = draw(_vexpr(atoms, gates, depth - 1))
        return f"{a} {draw(st.sampled_from(['+', '-', '*']))} {b}"
    if kind == "scaled":
        s = draw(st.sampled_from(gates + [_num(draw)])) if gates else _num(draw)
        return draw(st.sampled_from([f"{s} * {a}", f"{a} / (1 + {s})", f"({a}) * {s}"]))
    return f"({a})"


@st.composite
def _loss(draw, m: str, gates: list[str]) -> str:
    err = draw(st.sampled_from([f"{m} - v", f"v - {m}", f"{m} - v * 0.5"]))
    inner = draw(_vexpr([f"({err})", f"{m}", "v"], gates, 2))
    if m not in inner:
        inner = f"({inner}) + {m}"
    form = draw(st.sampled_from([
        "sum(({e})^2)", "sum(({e})^2) / 2", "sum(abs({e})^3)", "sqnorm({e})", "mean(({e})^2)",
        "sum(huber({e}, 1))", "-dot({m}, v)", "norm({e})", "dot({e}, {e}) / 2",
        "where(norm({e}) <= 1, sqnorm({e}) / 2, sum(abs({e})))", "sum(({e})^2) * (1 + {g})",
        "sum(({e})^2) + sum({m}) * 0.1"]))
    g = draw(st.sampled_from(gates)) if gates else "0.5"
    return form.format(e=inner, m=m, g=g)


@st.composite
def rule_files(draw) -> str:
    """A rule file drawn from the grammar, most of the time one that compiles."""
    family = draw(st.sampled_from(["linear", "mlp", "bias", "layernorm", "features", "rms"]))
    init = draw(st.sampled_from(["", " init zeros", " init normal(std = 0.02)", " init normal(0.1)",
                                 " init ones", " init eye"]))
    act = draw(st.sampled_from(BOUNDED))
    lines, arg = [], "x"
    if family == "linear":
        lines += [f"param W : [d, d]{init}", "model M(x) = W @ x"]
    elif family == "mlp":
        width = draw(st.sampled_from(["2*d", "d", "d + 1", "4*d", "d^2"]))
        init_mlp = init if "eye" not in init else " init normal(std = 0.02)"
        res = draw(st.sampled_from(["x + ", ""]))
        lines += [f"dim h = {width}", f"param W1 : [h, d]{init_mlp}", f"param W2 : [d, h]{init_mlp}",
                  f"model M(x) = {res}W2 @ {act}(W1 @ x)"]
    elif family == "bias":
        lines += [f"param W : [d, d]{init}", "param b : [d] init zeros", f"model M(x) = {act}(W @ x) + b"]
    elif family == "layernorm":
        lines += ["outer ln_w : [d] init ones", "outer ln_b : [d] init zeros", f"param W : [d, d]{init}",
                  "param b : [d] init zeros", "model M(x) = x + layernorm(W @ x + b, ln_w, ln_b)"]
    elif family == "features":
        lines += ["dim D = 1 + d + d^2", "outer c : [D] init taylor(degree = 2)", "fn phi(x) = c * poly(x, 2)",
                  "param W : [d, D] init zeros", "model M(x) = W @ x"]
        arg = "phi"
    else:
        lines += [f"param W : [d, d]{init}", "model M(x) = rmsnorm(W @ x, eps = 1e-3) + x"]
    vector_params = family in ("bias", "layernorm")
    n_gates = draw(st.integers(0, 4))
    names = draw(st.lists(st.sampled_from(GATE_NAMES), min_size=n_gates, max_size=n_gates, unique=True))
    scalars, channels = [], []
    for name in names:
        per_channel = family != "features" and draw(st.integers(0, 4)) == 0
        (channels if per_channel else scalars).append(name)
        shape = "[d]" if per_channel else "scalar"
        lines.append(f"gate {name} : {shape} {draw(st.sampled_from(ACTIVATIONS))}")
    m_k, m_q = ("M(phi(k))", "M(phi(q))") if arg == "phi" else ("M(k)", "M(q)")
    lines.append(f"loss {draw(_loss(m_k, scalars))}")
    kind = draw(st.sampled_from(["gd", "gd", "momentum"] + ([] if vector_params else ["muon"])))
    args = [f"lr = {draw(_hyper(scalars, channels))}"]
    if kind != "gd":
        args.append(f"decay = {draw(_hyper(scalars, channels))}")
    if kind == "muon" and draw(st.booleans()):
        args.append(f"steps = {draw(st.integers(1, 6))}")
    scale = kind == "gd" and draw(st.integers(0, 4)) == 0
    if scale:
        args.append(draw(st.sampled_from(["scale = 1 / pos", "scale = 1 / (pos + 1)", "scale = 0.5"])))
    if draw(st.integers(0, 3)) == 0:
        args.append(f"clip = {_num(draw, 0.01, 10)}")
    lines.append(f"optim {kind}({', '.join(draw(st.permutations(args)))})")
    if not scale:
        retain = draw(st.sampled_from(["", "decay", "decay_after", "l2", "decay_l2", "lq", "softmax", "elastic"]))
        keep = draw(_hyper(scalars, channels))
        if retain == "decay" or (retain == "decay_after" and kind != "gd"):
            lines.append(f"retain decay({keep})")
        elif retain == "decay_after":
            lines.append(f"retain decay({keep}, grad_at = decayed)")
        elif retain == "l2":
            lines.append(f"retain l2({keep})")
        elif retain == "decay_l2":
            lines.append(f"retain decay({keep}), l2({draw(_hyper(scalars, channels))})")
        elif retain == "lq":
            lines.append(f"retain lq(q = {draw(st.sampled_from(['3', '4', '2.5']))})")
        elif retain == "softmax" and kind == "gd":
            lines.append(f"retain softmax({keep})")
        elif retain == "elastic":
            lines.append(f"retain elastic({keep}, threshold = {_num(draw, 0.001, 0.1)})")
    if draw(st.integers(0, 3)) == 0:
        weight = f" weight {draw(st.sampled_from(scalars))}" if scalars and draw(st.booleans()) else ""
        lines.append(f"window {draw(st.integers(1, 4))}{weight}")
    read = draw(st.sampled_from([m_q, f"{m_q}", f"2 * {m_q}"] + [f"{g} * {m_q}" for g in scalars]))
    lines.append(f"read {read}{draw(st.sampled_from(['', ' before', ' after']))}")
    head = [ln for ln in lines if ln.startswith(("dim", "outer", "fn"))]
    body = draw(st.permutations([ln for ln in lines if ln not in head]))
    name = draw(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True))
    sep = draw(st.sampled_from(["\n  ", "\n    ", " ", "\n  # a comment\n  "]))
    text = f"memory {name} {{{sep}" + sep.join(head + list(body)) + "\n}\n"
    if draw(st.booleans()):
        sched = [f"chunk {draw(st.sampled_from([1, 2, 3, 4, 16, 64]))}"]
        if draw(st.integers(0, 4)) == 0:
            sched.append(f"semantics {draw(st.sampled_from(['exact', 'anchored']))}")
        text += "schedule {\n  " + "\n  ".join(sched) + "\n}\n"
    return text


# ---- damaged rules ---------------------------------------------------------------------------------

JUNK = ("{", "}", "(", ")", "[", "]", ",", "=", ":", "@", "^", "**", "-", "+", "*", "/", "<=", "==", "<", ".",
        "memory", "param", "outer", "gate", "dim", "input", "fn", "model", "loss", "window", "weight", "optim",
        "retain", "read", "before", "schedule", "chunk", "global", "local", "reset", "tile", "semantics",
        "qk_projection", "init", "scalar", "where", "poly", "taylor", "eye", "muon", "adam", "softmax", "lq",
        "d", "q", "k", "v", "pos", "x", "M", "W", "0", "1", "-1", "0.0", "1.", ".5", "1e999", "1e-999", "2^1e30",
        "99999999999999999999999999999999999999999999", "65537", "4097", "1048577", "0x10", "1_000", "NaN",
        "inf", "é", "∑", "λ", "\u202e", "\u200b", "\x00", "\x7f", "\t", "\r", "\n", "#", '"""', "'''", "'", '"',
        "\\", "\\n", "__import__", "__class__", "os.system('ls')", "eval", "exec", "import", "lambda",
        "None", "True", "sum", "norm", "exp", "def", "class")


def _lines(text: str) -> list[str]:
    return text.split("\n")


@st.composite
def _mutate(draw, text: str) -> str:
    op = draw(st.sampled_from(["delete", "delete_line", "dup_line", "swap_lines", "insert", "insert_text",
                               "number", "rename", "nest", "truncate", "replace_char", "case"]))
    n = len(text)
    if op == "delete" and n:
        i = draw(st.integers(0, n - 1))
        return text[:i] + text[i + draw(st.integers(1, 30)):]
    if op in ("delete_line", "dup_line", "swap_lines"):
        lines = _lines(text)
        i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
        if op == "delete_line":
            del lines[i]
        elif op == "dup_line":
            lines.insert(j, lines[i])
        else:
            lines[i], lines[j] = lines[j], lines[i]
        return "\n".join(lines)
    if op == "insert":
        i = draw(st.integers(0, n))
        tok = draw(st.sampled_from(JUNK))
        return text[:i] + draw(st.sampled_from([" ", ""])) + tok + draw(st.sampled_from([" ", ""])) + text[i:]
    if op == "insert_text":
        i = draw(st.integers(0, n))
        return text[:i] + draw(st.text(max_size=12)) + text[i:]
    if op == "number":
        spots = list(re.finditer(r"\b[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?", text))
        if spots:
            m = draw(st.sampled_from(spots))
            big = draw(st.sampled_from(["1e30", "1e31", "1e-30", "1e-31", "0", "00", "0.0", "1" + "0" * 39,
                                        "1" + "0" * 45, "65536", "65537", "4096", "1048576", "1048577", "8", "9",
                                        "3.5", "1e999", str(draw(st.integers(0, 2**70)))]))
            return text[:m.start()] + big + text[m.end():]
        return text
    if op == "rename":
        spots = list(re.finditer(r"\b[A-Za-z_][A-Za-z0-9_]*\b", text))
        if spots:
            m = draw(st.sampled_from(spots))
            new = draw(st.one_of(st.sampled_from(JUNK), st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True),
                                 st.text(min_size=1, max_size=4)))
            return text[:m.start()] + new + text[m.end():]
        return text
    if op == "nest":
        spots = [m for m in re.finditer(r"M\((phi\()?[kq]\)?\)", text)]
        depth = draw(st.sampled_from([2, 10, 50, 70, 200, 1000]))
        wrap = draw(st.sampled_from(["paren", "neg", "call", "bracket"]))
        if not spots:
            return text
        m = draw(st.sampled_from(spots))
        inner = m.group(0)
        if wrap == "paren":
            new = "(" * depth + inner + ")" * depth
        elif wrap == "neg":
            new = "-" * depth + inner
        elif wrap == "call":
            new = "tanh(" * depth + inner + ")" * depth
        else:
            new = "[" * depth + inner + "]" * depth
        return text[:m.start()] + new + text[m.end():]
    if op == "truncate":
        return text[:draw(st.integers(0, n))]
    if op == "replace_char" and n:
        i = draw(st.integers(0, n - 1))
        return text[:i] + draw(st.characters()) + text[i + 1:]
    if op == "case":
        return text.upper() if draw(st.booleans()) else text.swapcase()
    return text


@st.composite
def mutated_files(draw) -> str:
    """A shipped (or generated) rule with one to four mutations."""
    text = draw(st.one_of(st.sampled_from(sorted(SHIPPED.values())), rule_files()))
    for _ in range(draw(st.integers(1, 4))):
        text = draw(_mutate(text))
    return text
