"""Malformed rule files: each one fails with the right error class, at the right place, with a hint.

Every `tests/bad/*.mem` file holds one mistake, described by its first-line comment. The table below
says which `MemDSLError` subclass it must raise, where (1-based line and column of the offending
token or expression), and a piece of the hint. The same files are the examples of docs/errors.md,
whose pasted messages are checked against what memdsl prints today.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

import memdsl
from memdsl.cli import main
from memdsl.errors import (
    ALL_ERRORS,
    ArityError,
    DependencyError,
    DuplicateNameError,
    MemDSLError,
    MemSyntaxError,
    MissingClauseError,
    ScheduleError,
    ShapeError,
    UnknownNameError,
    UnsupportedError,
    ValueRangeError,
)

# Built from this file's location, not imported from tests.conftest, so that the file also runs under a
# bare `pytest` (which does not put the repository root on sys.path). conftest's autouse fixture makes
# the repository root the working directory, so relative paths below resolve there.
ROOT = pathlib.Path(__file__).resolve().parent.parent
BAD = ROOT / "tests" / "bad"
DOCS = ROOT / "docs" / "errors.md"

# (file name without .mem, error class, line, column, a substring of the hint)
CASES = [
    # E100 syntax error
    ("unexpected_token", MemSyntaxError, 4, 20, "expected '(', '-', a name, a number"),
    ("bad_character", MemSyntaxError, 4, 8, "ASCII names"),
    ("missing_equals", MemSyntaxError, 4, 14, "expected '='"),
    ("unclosed_paren", MemSyntaxError, 6, 3, "expected ')'"),
    ("keyword_twice", MemSyntaxError, 6, 20, "remove one of them"),
    ("positional_after_keyword", MemSyntaxError, 8, 32, "put positional arguments first"),
    ("qk_projection_not_a_switch", MemSyntaxError, 12, 17, "'on' or 'off'"),
    ("two_memory_blocks", MemSyntaxError, 9, 1, "its own file"),
    ("two_schedule_blocks", MemSyntaxError, 12, 1, "merge them into one"),
    # E110 unknown name
    ("unknown_name", UnknownNameError, 7, 10, "did you mean `q`?"),
    ("unknown_size", UnknownNameError, 3, 17, "`dim e`"),
    ("unknown_function", UnknownNameError, 4, 20, "did you mean `gelu`?"),
    ("unknown_initializer", UnknownNameError, 3, 25, "one of: zeros, ones, eye, normal, taylor"),
    ("unknown_optimizer", UnknownNameError, 6, 9, "did you mean `gd`?"),
    ("unknown_retention", UnknownNameError, 8, 10, "one of: decay, l2, lq, softmax, elastic"),
    ("fn_reads_param", UnknownNameError, 4, 13, "`W` cannot be used in `f`"),
    ("loss_reads_query", UnknownNameError, 5, 15, "`q` cannot be used in the loss"),
    ("param_in_loss", UnknownNameError, 5, 13, "`W` cannot be used in the loss"),
    ("model_reads_pos", UnknownNameError, 4, 16, "`pos` cannot be used in `M`"),
    # E111 duplicate name
    ("duplicate_param", DuplicateNameError, 4, 3, "rename one of them"),
    ("builtin_as_name", DuplicateNameError, 4, 3, "choose another name"),
    ("redeclare_d", DuplicateNameError, 3, 3, "rename"),
    ("gate_named_like_token", DuplicateNameError, 4, 3, "rename"),
    ("two_loss_clauses", DuplicateNameError, 6, 3, "keep exactly one"),
    ("two_models", DuplicateNameError, 5, 3, "keep exactly one"),
    ("duplicate_retention", DuplicateNameError, 9, 3, "merge the two keep factors"),
    # E120 wrong arguments
    ("function_not_called", ArityError, 7, 8, "write `M(...)`"),
    ("normal_without_std", ArityError, 3, 25, "`normal(std = ...)`"),
    ("optim_missing_lr", ArityError, 6, 9, "`gd(lr = theta)`"),
    ("optim_positional_argument", ArityError, 7, 12, "`gd(lr = ...)`"),
    # E200 shape mismatch
    ("matmul_shape_mismatch", ShapeError, 6, 30, "4*d entries"),
    ("vector_at_vector", ShapeError, 5, 24, "`dot(a, b)`"),
    ("matrix_at_matrix", ShapeError, 5, 17, "apply the matrices one after the other"),
    ("elementwise_shape_mismatch", ShapeError, 6, 21, "equal shapes"),
    ("loss_not_scalar", ShapeError, 5, 8, "reduce it"),
    ("size_with_minus", ShapeError, 3, 14, "`[4*d, d]`"),
    ("where_compares_vectors", ShapeError, 5, 14, "reduce with `norm`, `sum` or `dot`"),
    ("channel_gate_wrong_size", ShapeError, 8, 17, "use a scalar gate"),
    # E300 missing dependency
    ("loss_without_memory", DependencyError, 5, 8, "use the model"),
    ("read_without_memory", DependencyError, 7, 8, "read through the model"),
    ("read_folds_to_constant", DependencyError, 7, 8, "read through the model"),
    # E310 missing clause (reported at the `memory` block)
    ("missing_loss", MissingClauseError, 2, 1, "`loss sum((M(k) - v)^2)`"),
    ("missing_read", MissingClauseError, 2, 1, "`read M(q)`"),
    ("missing_optim", MissingClauseError, 2, 1, "`optim gd(lr = eta)`"),
    ("missing_model", MissingClauseError, 2, 1, "`model M(x) = W @ x`"),
    ("missing_param", MissingClauseError, 2, 1, "`param W : [d, d]`"),
    # E400 unsupported combination
    ("comparison_outside_where", UnsupportedError, 5, 29, "`where(a <= b, x, y)`"),
    ("where_without_comparison", UnsupportedError, 5, 14, "where(norm(e) <= delta, a, b)"),
    ("adam_optimizer", UnsupportedError, 6, 9, "use gd, momentum or muon"),
    ("muon_with_bias_vector", UnsupportedError, 7, 9, "use momentum"),
    ("softmax_with_momentum", UnsupportedError, 8, 3, "`optim gd(lr = eta)`"),
    ("two_nonlinear_retentions", UnsupportedError, 8, 3, "at most one nonlinear retention"),
    ("elastic_with_decay", UnsupportedError, 8, 3, "drop `decay`"),
    ("scale_with_gate", UnsupportedError, 7, 28, "into `lr`"),
    ("recursive_fn", UnsupportedError, 4, 13, "cannot be recursive"),
    ("recursive_model", UnsupportedError, 4, 20, "cannot be recursive"),
    # E500 value out of range
    ("huge_literal", ValueRangeError, 5, 28, "limited to 40 digits"),
    ("huge_exponent", ValueRangeError, 5, 28, "limited to ±30"),
    ("chunk_huge_literal", ValueRangeError, 10, 9, "limited to 40 digits"),
    ("clip_not_positive", ValueRangeError, 7, 29, "`clip = 1.0`"),
    # E600 invalid schedule
    ("local_reset_not_multiple", ScheduleError, 11, 3, "whole chunks"),
    ("reset_shorter_than_chunk", ScheduleError, 11, 3, "whole chunks"),
    ("qk_projection_without_locals", ScheduleError, 11, 3, "`local chunk 16 reset 2048`"),
    ("tile_on_1d_rule", ScheduleError, 10, 3, "`chunk N`"),
    # 2-D rules (memdsl/twod.py)
    ("axes_not_time_variate_2d", UnsupportedError, 3, 3, "write `axes time, variate`"),
    ("axis_retain_without_axes_2d", MissingClauseError, 8, 3, "add `axes time, variate`"),
    ("missing_variate_retain_2d", MissingClauseError, 3, 3, "`retain variate decay("),
    ("momentum_2d", UnsupportedError, 9, 3, "1-D only for now"),
    ("lq_along_axis_2d", UnsupportedError, 9, 32, "2-D retention is linear"),
    ("channel_keep_2d", ShapeError, 10, 21, "a scalar gate"),
    ("chunk_on_2d_rule", ScheduleError, 14, 3, "`tile time T variate V`"),
]
IDS = [c[0] for c in CASES]

# A handful of representative files also run through a real subprocess (one per phase: parse, names,
# shapes, clauses, semantics, schedule); the rest call the CLI in-process.
SUBPROCESS = {"unexpected_token", "unknown_name", "matmul_shape_mismatch", "missing_loss",
              "softmax_with_momentum", "local_reset_not_multiple"}


def bad_path(name: str) -> str:
    """The file's path relative to the repository root (conftest makes that the working directory)."""
    return os.path.relpath(BAD / f"{name}.mem", ROOT)


@pytest.mark.parametrize(("name", "cls", "line", "col", "hint"), CASES, ids=IDS)
def test_bad_file_raises_positioned_error(name, cls, line, col, hint):
    path = bad_path(name)
    with pytest.raises(MemDSLError) as info:
        memdsl.load(path)
    err = info.value
    assert type(err) is cls, f"{name}: {type(err).__name__} instead of {cls.__name__}: {err.message}"
    assert err.span is not None, f"{name}: the error has no position"
    assert (err.span.line, err.span.col) == (line, col), err.render()
    assert err.hint is not None and hint in err.hint, err.render()

    text = err.render()
    lines = text.splitlines()
    assert lines[0].startswith(f"{path}:{line}:{col}: error[{cls.code}] {cls.title}: "), text
    gutter = f"{line:>5} | "
    source_line = (BAD / f"{name}.mem").read_text().splitlines()[line - 1]
    assert lines[1] == gutter + source_line.expandtabs(1), text
    carets = lines[2]
    assert re.fullmatch(r" +\| +\^+", carets), text
    assert carets.index("^") == len(gutter) + col - 1, text
    assert lines[-1] == f"hint: {err.hint}"


@pytest.mark.parametrize(("name", "cls", "line", "col"), [c[:4] for c in CASES], ids=IDS)
def test_cli_reports_bad_file(capsys, name, cls, line, col):
    path = bad_path(name)
    if name in SUBPROCESS:
        res = subprocess.run([sys.executable, "-m", "memdsl.cli", "ir", path], capture_output=True,
                             text=True, cwd=ROOT, timeout=120)
        code, out, err = res.returncode, res.stdout, res.stderr
    else:
        code = main(["ir", path])
        captured = capsys.readouterr()
        out, err = captured.out, captured.err
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err and "internal error" not in err
    assert err.startswith(f"{path}:{line}:{col}: error[{cls.code}]"), err


def test_table_covers_every_file_and_every_error_class_twice():
    files = sorted(p.stem for p in BAD.glob("*.mem"))
    assert sorted(IDS) == files, "every tests/bad file is in CASES, and every case has a file"
    assert len(set(IDS)) == len(IDS)
    assert len(CASES) >= 30
    for cls in ALL_ERRORS:
        assert sum(c[1] is cls for c in CASES) >= 2, f"{cls.code} {cls.__name__} needs at least two cases"


def test_each_bad_file_starts_with_a_comment():
    for path in BAD.glob("*.mem"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 10, path.name


# ---- docs/errors.md ---------------------------------------------------------------------------------

def _docs() -> str:
    return DOCS.read_text(encoding="utf-8")


def test_docs_name_existing_bad_files_and_every_code():
    text = _docs()
    named = set(re.findall(r"tests/bad/([A-Za-z0-9_]+)\.mem", text))
    assert named, "docs/errors.md names no tests/bad file"
    for name in sorted(named):
        assert (BAD / f"{name}.mem").is_file(), f"docs/errors.md names a missing file tests/bad/{name}.mem"
    for cls in ALL_ERRORS:
        assert cls.code in text, f"{cls.code} is not documented"
        assert f"## {cls.code} `{cls.__name__}` — {cls.title}" in text, f"{cls.code} has no section"


def test_docs_examples_are_verbatim(capsys):
    """The bad files and the messages pasted into docs/errors.md are what the repository holds today."""
    text = _docs()
    copies = re.findall(r"`(tests/bad/\w+\.mem)`:\n\n```mem\n(.*?)```", text, re.S)
    outputs = re.findall(r"```console\n\$ memdsl ir (tests/bad/\w+\.mem)\n(.*?)```", text, re.S)
    assert len(copies) >= len(ALL_ERRORS) and len(outputs) >= len(ALL_ERRORS)
    for path, body in copies:
        assert (ROOT / path).read_text() == body, f"the copy of {path} in docs/errors.md is stale"
    for path, body in outputs:
        code = main(["ir", path])
        err = capsys.readouterr().err
        assert code == 2
        assert err == body, f"the message pasted for {path} in docs/errors.md is stale"
