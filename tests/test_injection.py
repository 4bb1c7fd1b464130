"""A rule file is data: no text from it may reach generated code as code.

Attempts through identifiers (Python builtins, dunders, the generated module's own names), comments
(quotes and docstring terminators), numbers (huge, long, odd spellings) and file paths (quotes,
braces, backslashes). The generated module must parse, contain no identifier from the rule
unmangled, import only torch and math, call nothing dangerous, and compute exactly what the
unrenamed rule computes."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys

import pytest
import torch

from codegen.module import generate
from memdsl.api import CompiledRule
from memdsl.checking import make_inputs
from memdsl.driver import load
from memdsl.errors import MemDSLError, MemSyntaxError, ValueRangeError
from tests.conftest import ROOT, RULE_IDS, RULES

TITANS = (ROOT / "rules" / "titans.mem").read_text()
DANGEROUS = {"exec", "eval", "compile", "__import__", "open", "getattr", "setattr", "delattr", "globals", "locals",
             "vars", "breakpoint", "input", "os", "sys", "subprocess", "importlib", "builtins"}


def identifiers(tree: ast.AST) -> set[str]:
    """Every name the module binds or reads as code (string literals excluded)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            out.add(node.arg)
        elif isinstance(node, ast.alias):
            out.add(node.asname or node.name)
    return out


def assert_safe_module(text: str) -> ast.Module:
    tree = ast.parse(text)
    imports = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               for a in n.names}
    assert imports <= {"math", "torch"}, imports
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not called & DANGEROUS, called & DANGEROUS
    return tree


@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_shipped_modules_import_and_call_nothing_dangerous(path):
    assert_safe_module(generate(load(str(path))))


# Each hostile name takes the place of one identifier of rules/titans.mem.
RENAMES = [("W1", "__import__"), ("W2", "exec"), ("theta", "eval"), ("eta", "torch"), ("alpha", "env"),
           ("h", "sz"), ("M", "__builtins__"), ("titans", "__class__"), ("x", "self")]


def renamed(text: str, pairs) -> str:
    body = text[text.index("\nmemory") + 1:]  # past the header comment
    for old, new in pairs:
        body = re.sub(rf"\b{old}\b", new, body)
    return body


def test_hostile_identifiers_are_mangled_and_change_nothing():
    src = renamed(TITANS, RENAMES)
    text = generate(load(src))
    names = identifiers(assert_safe_module(text))
    # every identifier the renaming adds to the module is a mangled one (v_<name>, sz_<name>)
    added = names - identifiers(ast.parse(generate(load(TITANS))))
    assert added and all(n.startswith(("v_", "sz_")) for n in added), added
    assert {"v___import__", "v_exec", "v_eval", "sz_sz"} <= added
    # the same numbers as the original, with the renamed tensors passed under their new names
    orig, hostile = CompiledRule(generate(load(TITANS)), "a"), CompiledRule(text, "b")
    tok, gates, params = make_inputs(orig, B=1, T=6, H=2, D=3)
    new_of = dict(RENAMES)
    y0, s0 = orig(tok["q"], tok["k"], tok["v"], gates, params)
    y1, s1 = hostile(tok["q"], tok["k"], tok["v"], {new_of.get(n, n): g for n, g in gates.items()},
                     {new_of.get(n, n): p for n, p in params.items()})
    assert torch.equal(y0, y1)
    assert torch.equal(s0["A.W1"], s1["A.__import__"]) and torch.equal(s0["S.W2"], s1["S.exec"])


@pytest.mark.parametrize("comment", ['"""', "'''", '"""\nraise SystemExit("injected")\n"""', "\\", "\\n", "{!r}",
                                     "\x00", "\u202e evil", "'; import os; os.system('false') #", "}}{{"])
def test_comments_are_never_code(comment):
    comment = "MARK7 " + comment
    src = "# " + comment.replace("\n", "\n# ") + "\n" + TITANS.replace("read M(q)", f"read M(q)  # {comment}"
                                                                          .replace("\n", " "))
    text = generate(load(src))
    assert_safe_module(text)
    rule = CompiledRule(text, "c")  # executing it runs nothing from the comment
    assert rule.module.RULE_SOURCE == src
    assert "MARK7" not in text.replace(repr(src), "", 1)  # the only copy is the RULE_SOURCE literal


def _emitted(text: str) -> str:
    """The emitted functions and SPEC: everything generated from the IR, nothing copied from the source."""
    return text[text.index("# ---- emitted from the rule's IR"):]


@pytest.mark.parametrize("number, canonical", [("1.50000000000000000000000000000000000000", "1.5"),
                                               ("0.000000000000000000000000000001", "1e-30"),
                                               ("3E+2", "300"), ("7.", "7"), (".25", "0.25"), ("2.5e-1", "0.25")])
def test_numbers_are_printed_from_their_values(number, canonical):
    def code(num):
        return _emitted(generate(load(TITANS.replace("loss sum((M(k) - v)^2)", f"loss sum((M(k) - v)^2) * {num}"))))
    spelled, plain = code(number), code(canonical)
    assert spelled == plain  # the spelling is gone: only the parsed value reaches the code
    assert number not in spelled or number == canonical or number in plain

@pytest.mark.parametrize("number, error", [("1e999", ValueRangeError), ("9" * 41, ValueRangeError),
                                           ("1e31", ValueRangeError), ("0x10", MemSyntaxError),
                                           ("1_000", MemSyntaxError), ("inf", MemDSLError), ("NaN", MemDSLError),
                                           ("1e-31", ValueRangeError)])
def test_numbers_outside_the_language_are_errors(number, error):
    src = TITANS.replace("loss sum((M(k) - v)^2)", f"loss sum((M(k) - v)^2) * {number}")
    with pytest.raises(error) as err:
        load(src)
    assert err.value.span is not None


@pytest.mark.parametrize("name", ['it\'s "odd".mem', "a{b}.mem", 'x"""y.mem', "back\\slash.mem", "sp ace.mem"])
def test_odd_file_paths_compile_and_stay_strings(tmp_path, name):
    path = tmp_path / name
    shutil.copy(ROOT / "rules" / "deltanet.mem", path)
    program = load(str(path))
    text = generate(program)
    assert_safe_module(text)
    rule = CompiledRule(text, "p")
    assert str(path) in rule.module.SUMMARY  # shown to the user, as data


def test_cli_writes_a_safe_module_from_an_odd_path(tmp_path):
    path = tmp_path / 'it\'s {"odd"} \\ """.mem'
    shutil.copy(ROOT / "rules" / "deltanet.mem", path)
    out = tmp_path / "out 'x'.py"
    res = subprocess.run([sys.executable, "-m", "memdsl.cli", "compile", str(path), "-o", str(out)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert_safe_module(text)
    mod = {}
    exec(compile(text, str(out), "exec"), mod)  # the standalone module runs
    y, _ = mod["memory"](*(torch.randn(1, 3, 1, 4) for _ in range(3)), {"beta": torch.rand(1, 3, 1)})
    assert y.shape == (1, 3, 1, 4) and torch.isfinite(y).all()
