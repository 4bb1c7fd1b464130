"""From a path or source text to a Program: parse, build, run the pipeline."""

from __future__ import annotations

import dataclasses
import os

from . import ast as A
from .build import build
from .errors import MemDSLError, ValueRangeError
from .parse import parse
from .passes import run_pipeline
from .program import Program, ScheduleSpec

SCHEDULE_KEYS = ("chunk", "semantics")


def override_schedule(base: ScheduleSpec, overrides: dict) -> ScheduleSpec:
    unknown = sorted(set(overrides) - set(SCHEDULE_KEYS))
    if unknown:
        raise ValueError(f"unknown schedule option(s) {unknown}; known: {list(SCHEDULE_KEYS)}")
    values = {k: v for k, v in overrides.items() if v is not None}
    if "chunk" in values and (not isinstance(values["chunk"], int) or not 1 <= values["chunk"] <= 1 << 16):
        raise ValueError(f"chunk must be an integer from 1 to 65536, got {values['chunk']!r}")
    if "semantics" in values and values["semantics"] not in ("exact", "anchored"):
        raise ValueError(f"semantics must be 'exact' or 'anchored', got {values['semantics']!r}")
    return dataclasses.replace(base, **values)


def read_source(path_or_source: str) -> tuple[str, str]:
    """Accept a rule file path or rule text; return (source, display path)."""
    if "\n" not in path_or_source and ("{" not in path_or_source or os.path.isfile(path_or_source)):
        if not os.path.exists(path_or_source):
            raise FileNotFoundError(f"no such rule file: {path_or_source}")
        with open(path_or_source, encoding="utf-8", errors="replace") as f:
            return f.read(), path_or_source
    return path_or_source, "<rule>"


def load_ast(path_or_source: str) -> tuple[A.RuleFile, str, str]:
    source, path = read_source(path_or_source)
    return parse(source, path), source, path


def load(path_or_source: str, stop_after: str | None = None, check: bool = False,
         schedule: dict | None = None) -> Program:
    """Parse, check and run the pipeline (optionally stopping after a named pass).

    `schedule` overrides the file's schedule block (e.g. ``{"chunk": 64, "semantics": "anchored"}``).
    """
    tree, source, path = load_ast(path_or_source)
    program = build(tree, source, path)
    if schedule:
        program.schedule = override_schedule(program.schedule, schedule)
    try:
        return run_pipeline(program, stop_after=stop_after, check=check)
    except RecursionError:
        raise ValueRangeError("an expression is nested too deeply", tree.memory.span,
                              "split it into helper functions (`fn`)").attach(source, path) from None
    except MemDSLError as err:
        raise err.attach(source, path) from None
