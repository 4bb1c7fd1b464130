"""Golden files: the parse tree, IR and gradient IR of every shipped rule, exactly as printed.

Regenerate with `make golden` (MEMDSL_REGEN_GOLDEN=1) and review the diff before committing.
"""

from __future__ import annotations

import os

import pytest

from memdsl.cli import main
from tests.conftest import ROOT, RULE_2D_IDS, RULE_IDS, RULES, RULES_2D, rel

GOLDEN = ROOT / "tests" / "golden"
REGEN = os.environ.get("MEMDSL_REGEN_GOLDEN") == "1"
STAGES = {"ast": ["parse"], "ir": ["ir"], "grad": ["grad"]}


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("path", RULES + RULES_2D, ids=RULE_IDS + RULE_2D_IDS)
def test_golden(path, stage, capsys):
    assert main([*STAGES[stage], rel(path)]) == 0
    text = capsys.readouterr().out
    golden = GOLDEN / f"{path.stem}.{stage}.txt"
    if REGEN:
        golden.write_text(text)
    assert golden.exists(), f"missing {golden}: run `make golden`"
    assert text == golden.read_text(), f"{golden.name} changed: run `make golden` and review the diff"
