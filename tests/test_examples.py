"""Every example runs and checks itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_inspect_example_runs_and_checks_itself():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "01_inspect.py"), "rules/yaad.mem"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip().endswith("ok")
    assert "grad_loss = {" in res.stdout and "Piecewise" in res.stdout


def test_custom_rule_example_checks_itself():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "02_custom_rule.py")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip().endswith("ok")


CORPUS = ROOT.parent / "shared" / "data" / "text" / "shakespeare.txt.gz"


@pytest.mark.skipif(not CORPUS.exists(), reason="needs ../shared/data/text/shakespeare.txt.gz")
@pytest.mark.parametrize("rule", ["titans", "gated_deltanet"])
def test_tiny_lm_loss_falls(rule):
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "03_tiny_lm.py"), "--rule", f"rules/{rule}.mem",
                          "--steps", "30", "--seq", "64", "--batch", "8", "--d-model", "32"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "validation loss" in res.stdout


@pytest.mark.skipif(not CORPUS.exists(), reason="needs ../shared/data/text/shakespeare.txt.gz")
def test_tnt_stage_two_example_runs():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "04_tnt_stage_two.py"), "--steps", "20",
                          "--stage2-steps", "5", "--seq", "64", "--batch", "8", "--d-model", "32", "--global-chunk",
                          "32", "--reset", "32", "--local-chunk", "8", "--stage2-chunk", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "stage 2" in res.stdout


def test_torchrun_example_trains_fsdp_with_context_parallel_shards():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "05_torchrun.py"), "--parallel", "fsdp", "--context", "2", "--steps", "2",
           "--batch", "2", "--seq", "64", "--d-model", "16", "--layers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "step 1: loss" in res.stdout and "1 data x 2 context" in res.stdout
