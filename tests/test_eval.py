"""memdsl.eval: task generators (shapes, answer positions, determinism) and a smoke run of `memdsl eval`."""

from __future__ import annotations

import csv
import importlib.util

import numpy as np
import pytest
import torch

from memdsl.cli import main
from memdsl.eval.compare import load, paired
from memdsl.eval.compare import main as compare_main
from memdsl.eval.corpus import load_corpus, split_corpus
from memdsl.eval.model import EvalModel, ModelConfig, ModelSpec, lr_gates, parse_spec
from memdsl.eval.plots import replot
from memdsl.eval.runner import _mean_std
from memdsl.eval.tasks import IGNORE, MQAR, NIAH, lm_batch
from memdsl.eval.train import train
from memdsl.tnt import TNTSchedule
from tests.conftest import ROOT

RULES = ROOT / "rules"


def test_mqar_answers_are_the_values_of_earlier_keys():
    task = MQAR(vocab=32, pairs=4, seq_len=40)
    x, y = task.sample(16, np.random.default_rng(0))
    assert x.shape == y.shape == (16, 40)
    assert ((y != IGNORE).sum(1) == 4).all()  # every key is queried once
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        context = {row_x[2 * i]: row_x[2 * i + 1] for i in range(4)}
        assert len(context) == 4 and all(1 <= k < 16 <= v < 32 for k, v in context.items())
        scored = [t for t, label in enumerate(row_y) if label != IGNORE]
        assert all(t >= 8 and context[row_x[t]] == row_y[t] for t in scored)


def test_mqar_is_deterministic_by_seed_and_checks_its_sizes():
    task = MQAR(vocab=32, pairs=4, seq_len=40)
    a, b, c = (task.sample(4, np.random.default_rng(s)) for s in (1, 1, 2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="seq_len"):
        MQAR(vocab=32, pairs=8, seq_len=20)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_niah_needle_sits_at_its_depth_and_the_last_position_is_scored(depth):
    task = NIAH()
    text = split_corpus()[1]
    x, y = task.sample(8, 50, np.random.default_rng(3), text, depth=depth)
    assert x.shape == y.shape == (8, 50)
    assert (y[:, :-1] == IGNORE).all()
    at = round(depth * 45)
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        assert row_x[at] == task.needle and row_x[-2] == task.query
        assert row_x[at + 1] == row_x[-1]  # the query asks for the needle's key
        assert row_y[-1] == row_x[at + 2] >= 258 + task.keys  # ... and the answer is its value
        assert row_x.count(task.needle) == 1 and max(row_x) < task.vocab
    again = task.sample(8, 50, np.random.default_rng(3), text, depth=depth)
    assert torch.equal(x, again[0])


def test_corpus_and_lm_batches():
    data = load_corpus()
    assert len(data) > 300_000 and int(data.max()) < 256
    train_part, valid_part = split_corpus()
    assert len(train_part) + len(valid_part) == len(data)
    x, y = lm_batch(train_part, 4, 32, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_specs_and_learning_rate_gates():
    tnt = TNTSchedule(16, ((4, 16),))
    assert parse_spec(str(RULES / "titans.mem"), tnt, 2) == ModelSpec(str(RULES / "titans.mem"))
    assert parse_spec(f"{RULES}/titans.mem@8", tnt, 2).chunk == 8
    s2 = parse_spec(f"tnt2:{RULES}/titans.mem", tnt, 2)
    assert s2.tnt == tnt and s2.stage_two_chunk == 2 and "+S2" in s2.label
    with pytest.raises(FileNotFoundError):
        parse_spec("rules/nope.mem", tnt, 2)
    assert lr_gates(str(RULES / "titans.mem")) == {"theta"}
    assert lr_gates(str(RULES / "ttt_linear.mem")) == set()  # `lr = eta / d`: the rule scales its own rate


def test_stage_two_switches_the_local_chunk_late_in_training():
    spec = ModelSpec(str(RULES / "titans.mem"), tnt=TNTSchedule(8, ((4, 8),)), stage_two_chunk=2)
    torch.manual_seed(0)
    model = EvalModel(spec, ModelConfig(vocab=16, width=16, heads=2, layers=1))

    def batches():
        while True:
            x = torch.randint(0, 16, (2, 16))
            yield x, x

    res = train(model, batches(), steps=10, max_seconds=600, quiet=True)
    assert res.steps == 10 and res.stage_two_step == 9
    assert model.blocks[0].mixer.tnt.locals == ((2, 8),)


def test_set_chunk_changes_an_anchored_model_and_refuses_tnt():
    torch.manual_seed(0)
    model = EvalModel(ModelSpec(str(RULES / "titans.mem")), ModelConfig(vocab=16, width=16, heads=2, layers=1))
    x = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        model.set_chunk(2)
        small = model(x)
        model.set_chunk(16)
        large = model(x)
    assert not torch.allclose(small, large, rtol=0, atol=1e-7)  # for an anchored rule, C is part of the function
    tnt = EvalModel(ModelSpec(str(RULES / "titans.mem"), tnt=TNTSchedule(8, ((4, 8),))), ModelConfig(vocab=16,
                    width=16, heads=2, layers=1))
    with pytest.raises(ValueError, match="finetune_schedule"):
        tnt.set_chunk(2)


def test_table_cells_count_diverged_runs():
    assert _mean_std([1.0, 2.0], 1) == "1.5 ± 0.7"
    assert _mean_std([float("nan"), 1.0, 2.0], 1) == "1.5 ± 0.7 (1 non-finite)"
    assert _mean_std([float("inf")], 1) == "nan (1 non-finite)"


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_eval_command_smoke(tmp_path, capsys):
    common = ["--steps", "4", "--seeds", "1", "--widths", "16", "--heads", "2", "--layers", "1", "--batch", "4",
              "--budget-minutes", "0.5", "--quiet", "--out", str(tmp_path)]
    assert main(["eval", f"{RULES}/gated_deltanet.mem", f"tnt2:{RULES}/titans.mem", "--task", "mqar",
                 "--vocab", "16", "--pairs", "2", "--seq-len", "16", "--tnt", "8,4,8", *common]) == 0
    rows = _rows(tmp_path / "mqar.csv")
    assert [r["model"] for r in rows] == ["gated_deltanet", "tnt-titans G8 L{4} +S2 L{2}"]
    assert all(0 <= float(r["value"]) <= 1 and r["steps"] == "4" for r in rows)
    assert "| gated_deltanet |" in (tmp_path / "mqar.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        (tmp_path / "mqar.png").unlink()
        assert replot(tmp_path, "mqar")[0].exists()
    assert main(["eval", f"{RULES}/titans.mem", "--task", "chunk", "--seq-len", "16", "--train-chunk", "4",
                 "--eval-chunks", "2,4,16", *common]) == 0
    rows = _rows(tmp_path / "chunk.csv")
    assert [r["x"] for r in rows] == ["2", "4", "16"] and rows[0]["model"] == "titans@4"
    assert all(np.isfinite(float(r["value"])) for r in rows)
    assert "wrote" in capsys.readouterr().out


def test_paired_comparison_matches_seeds_and_columns(tmp_path):
    def row(model, seed, x, value):
        return {"model": model, "seed": str(seed), "metric": "acc", "x": str(x), "value": str(value)}
    a = [row("m", 0, 64, 0.9), row("m", 1, 64, 0.5), row("m", 2, 64, 0.7), row("m", 0, 128, 0.1)]
    b = [row("c", 1, 64, 0.6), row("c", 0, 64, 0.4), row("c", 0, 128, 0.3)]
    p = paired(a, "m", b, "c")
    assert p.x == "64" and p.seeds == (0, 1)  # seed 2 has no partner
    assert p.diffs == pytest.approx((0.5, -0.1))
    assert "A higher in 1/2" in p.line()
    assert paired(a, "m", b, "c", x="128").diffs == pytest.approx((-0.2,))
    with pytest.raises(ValueError, match="no rows for model"):
        paired(a, "nope", b, "c")
    with pytest.raises(ValueError, match="no rows at x"):
        paired(a, "m", b, "c", x="512")
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(a[0]))
        w.writeheader()
        w.writerows(a + b)
    assert load(str(path))[1]["value"] == "0.5"
    compare_main([f"{path}:m", f"{path}:c"])
    with pytest.raises(SystemExit):  # a missing model is a usage error, not a traceback
        compare_main([f"{path}:m", f"{path}:nope"])
