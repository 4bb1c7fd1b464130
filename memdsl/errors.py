"""Every error a rule file can cause. Each one knows where it happened and how to fix it.

A `MemDSLError` renders as::

    rules/bad.mem:7:30: error[E201] shape mismatch in `@`: W1 is [4*d, d] but x is [2*d]
        7 |   model M(x) = x + W2 @ gelu(W1 @ x)
          |                              ^^^^^^
    hint: the right operand of `@` must have as many rows as W1 has columns (d)

The CLI prints that and exits with code 2; nothing else about a bad rule reaches the user.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A region of a source file; lines and columns are 1-based, `end_col` is exclusive."""

    line: int
    col: int
    end_line: int
    end_col: int


class MemDSLError(Exception):
    """Base class. `code` is stable and documented in docs/errors.md."""

    code = "E000"
    title = "error"

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None,
                 source: str | None = None, path: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint
        self.source = source
        self.path = path

    def attach(self, source: str, path: str) -> MemDSLError:
        """Give the error the text it points into (done once, by the driver)."""
        if self.source is None:
            self.source = source
        if self.path is None:
            self.path = path
        return self

    def render(self) -> str:
        where = self.path or "<rule>"
        if self.span is not None:
            where += f":{self.span.line}:{self.span.col}"
        out = [f"{where}: error[{self.code}] {self.title}: {self.message}"]
        if self.span is not None and self.source is not None:
            lines = self.source.splitlines()
            if 1 <= self.span.line <= len(lines):
                text = lines[self.span.line - 1].expandtabs(1)
                width = (self.span.end_col - self.span.col) if self.span.end_line == self.span.line else 1
                width = max(1, min(width, len(text) - self.span.col + 1))
                gutter = f"{self.span.line:>5} | "
                out.append(gutter + text)
                out.append(" " * (len(gutter) - 2) + "| " + " " * (self.span.col - 1) + "^" * width)
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


class MemSyntaxError(MemDSLError):
    code, title = "E100", "syntax error"


class UnknownNameError(MemDSLError):
    code, title = "E110", "unknown name"


class DuplicateNameError(MemDSLError):
    code, title = "E111", "duplicate name"


class ArityError(MemDSLError):
    code, title = "E120", "wrong arguments"


class ShapeError(MemDSLError):
    code, title = "E200", "shape mismatch"


class DependencyError(MemDSLError):
    code, title = "E300", "missing dependency"


class MissingClauseError(MemDSLError):
    code, title = "E310", "missing clause"


class UnsupportedError(MemDSLError):
    code, title = "E400", "unsupported combination"


class ValueRangeError(MemDSLError):
    code, title = "E500", "value out of range"


class ScheduleError(MemDSLError):
    code, title = "E600", "invalid schedule"


ALL_ERRORS: tuple[type[MemDSLError], ...] = (
    MemSyntaxError, UnknownNameError, DuplicateNameError, ArityError, ShapeError,
    DependencyError, MissingClauseError, UnsupportedError, ValueRangeError, ScheduleError,
)
