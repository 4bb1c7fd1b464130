"""Every example runs and checks itself."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_inspect_example_runs_and_checks_itself():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "01_inspect.py"), "rules/yaad.mem"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip().endswith("ok")
    assert "grad_loss = {" in res.stdout and "Piecewise" in res.stdout
