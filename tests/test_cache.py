"""The compile cache: content-keyed, atomic, safe under concurrent processes, self-repairing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import memdsl
from memdsl import api
from tests.conftest import ROOT

COMPILE_AND_RUN = """
import sys, torch, memdsl
from memdsl.checking import make_inputs
rule = memdsl.compile(sys.argv[1])
tok, gates, params = make_inputs(rule, T=6, D=3)
y, _ = rule(tok["q"], tok["k"], tok["v"], gates, params)
print(rule.key, f"{y.double().sum().item():.12e}")
"""


def test_concurrent_processes_share_one_cache(tmp_path):
    env = {"MEMDSL_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    rules = ["rules/titans.mem", "rules/deltanet.mem"] * 4
    procs = [subprocess.Popen([sys.executable, "-c", COMPILE_AND_RUN, r], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in rules]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    results = {}
    for rule, (out, _) in zip(rules, outs, strict=True):
        results.setdefault(rule, set()).add(out.strip())
    assert all(len(v) == 1 for v in results.values()), results  # identical keys and results per rule
    files = sorted(tmp_path.glob("*.py"))
    assert len(files) == 2 and not list(tmp_path.glob(".tmp-*"))
    for f in files:
        assert api._read_cached(f) is not None  # complete, checksummed entries


def test_corrupted_entry_is_detected_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDSL_CACHE_DIR", str(tmp_path))
    text, key = api.module_source("rules/deltanet.mem")
    path = Path(tmp_path) / f"{key}.py"
    assert api._read_cached(path) == text
    path.write_text(path.read_text()[:-200])  # a torn write
    assert api._read_cached(path) is None
    again, _ = api.module_source("rules/deltanet.mem")
    assert again == text and api._read_cached(path) == text


def test_schedule_overrides_are_part_of_the_key():
    a, b = memdsl.compile("rules/titans.mem", chunk=8), memdsl.compile("rules/titans.mem", chunk=32)
    assert a.key != b.key and (a.chunk, b.chunk) == (8, 32)
    assert memdsl.compile("rules/titans.mem", chunk=8) is a


def test_printing_a_compiled_rule_shows_signature_algorithm_and_passes():
    text = repr(memdsl.compile("rules/gated_deltanet.mem"))
    assert "y, state = rule(q[B,T,H,Dk]" in text and "gates={beta: [B,T,H], alpha: [B,T,H]}" in text
    assert "algorithm  wy" in text and "passes     build verify autodiff fuse dce classify" in text


CORRUPTIONS = {
    "torn write": lambda b: b[:-200],
    "flipped byte in the code": lambda b: b[:-50] + bytes([b[-50] ^ 1]) + b[-49:],
    "code swapped under a valid header": lambda b: b.split(b"\n", 1)[0] + b"\nraise SystemExit('stale')\n",
    "header gone": lambda b: b.split(b"\n", 1)[1],
    "empty file": lambda b: b"",
    "not text": lambda b: b"\xff\xfe\x00" + b[:100],
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_every_kind_of_corruption_is_detected_and_rebuilt(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("MEMDSL_CACHE_DIR", str(tmp_path))
    text, key = api.module_source("rules/titans_linear.mem")
    path = Path(tmp_path) / f"{key}.py"
    path.write_bytes(CORRUPTIONS[kind](path.read_bytes()))
    assert api._read_cached(path) is None
    again, _ = api.module_source("rules/titans_linear.mem")
    assert again == text and api._read_cached(path) == text
    api.CompiledRule(again, key)  # the rebuilt entry runs; the corrupted one was never executed
