"""The command line: every command, --after every pass, drawing, and the bad-file contract."""

from __future__ import annotations

import subprocess
import sys

import pytest

from memdsl.cli import main
from memdsl.passes import PASS_NAMES


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ir_titans_is_readable(capsys):
    code, out, _ = run(capsys, "ir", "rules/titans.mem")
    assert code == 0
    assert "params     W1:f32[4*d,d] init normal(std=0.02)  W2:f32[d,4*d] init normal(std=0.02)" in out
    assert "loss = { lambda W1:f32[4*d,d] W2:f32[d,4*d] k:f32[d] v:f32[d]. let" in out
    assert "algorithm  anchored" in out


def test_grad_titans_and_yaad_piecewise(capsys):
    code, out, _ = run(capsys, "grad", "rules/titans.mem")
    assert code == 0 and "grad.W1=" in out and "grad.W2=" in out and "vjp_read" in out
    code, out, _ = run(capsys, "grad", "rules/yaad.mem")
    assert code == 0 and "Piecewise" in out and "sign(" in out


@pytest.mark.parametrize("name", PASS_NAMES)
def test_ir_after_each_pass(capsys, name):
    code, out, _ = run(capsys, "ir", "rules/ttt_linear.mem", "--after", name)
    assert code == 0
    assert out.split("passes     ")[1].split("\n")[0].split()[-1] == name
    assert ("grad_loss = {" in out) == (PASS_NAMES.index(name) >= PASS_NAMES.index("autodiff"))


def test_passes_lists_the_pipeline(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == 0
    assert [line.split()[0] for line in out.strip().splitlines()] == ["parse", *PASS_NAMES]


def test_dot_and_png(capsys, tmp_path):
    dot, png = tmp_path / "g.dot", tmp_path / "g.png"
    code, out, _ = run(capsys, "ir", "rules/deltanet.mem", "--dot", str(dot), "--png", str(png))
    assert code == 0
    assert dot.read_text().startswith("digraph memdsl {")
    assert png.exists() or "matplotlib is not installed" in out


def test_parse_format_prints_canonical_source(capsys):
    code, out, _ = run(capsys, "parse", "rules/deltanet.mem", "--format")
    assert code == 0 and out.startswith("memory deltanet {")


def test_missing_file_exits_2(capsys):
    code, out, err = run(capsys, "ir", "rules/nope.mem")
    assert code == 2 and out == "" and "no such rule file" in err


def test_bad_file_in_a_subprocess_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.mem"
    bad.write_text("memory m {\n  param W : [d, d]\n  model M(x) = W @ x\n  loss sum((M(k) - w)^2)\n"
                   "  optim gd(lr = 1)\n  read M(q)\n}\n")
    res = subprocess.run([sys.executable, "-m", "memdsl.cli", "ir", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == ""
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert lines[0].startswith(f"{bad}:4:20: error[E110]")
    assert lines[2].index("^") == lines[1].index("w)")
    assert lines[-1].startswith("hint:")


def test_help_on_each_command():
    for cmd in ("parse", "ir", "grad", "passes"):
        res = subprocess.run([sys.executable, "-m", "memdsl.cli", cmd, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "usage: memdsl" in res.stdout


def test_kernel_command_prints_generated_kernels_and_tiles(capsys):
    from memdsl.cli import main
    assert main(["kernel", "rules/ttt_linear.mem", "--sizes", "d=16"]) == 0
    assert "def memdsl_chunk_fwd(" in capsys.readouterr().out
    assert main(["kernel", "rules/gated_deltanet.mem", "--sizes", "d=16", "--backward"]) == 0
    out = capsys.readouterr().out
    assert "def memdsl_chunk_bwd(" in out and "for t" in out  # the WY inverse's substitution loop
    assert main(["kernel", "rules/titans.mem", "--sizes", "d=16", "--tiles"]) == 0
    assert "= dot(" in capsys.readouterr().out
    assert main(["kernel", "rules/atlas.mem"]) == 2
    assert "no Triton kernel" in capsys.readouterr().err
