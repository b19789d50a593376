"""experiments/selection_rules.py: the val Dice of the final model under each selection rule, re-read
from hand-made validation logs."""
import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import selection_rules  # noqa: E402


def record(phase, iteration, total, dice):
    return {"phase": phase, "iteration": iteration, "total_iteration": total, "dice": dice}


def sscd_history(pre_best, stage_1, stage_2):
    """pre-training validated at 40 and 80, two 80-iteration stages validated at 0, 40, 80 (each
    stage's start = the previous phase's best, as the trainer does)."""
    pre = [record("pretrain", 40, 40, pre_best - 0.1), record("pretrain", 80, 80, pre_best)]
    s1 = [record("stage_1", i, 80 + i, d) for i, d in zip((0, 40, 80), (pre_best, *stage_1))]
    s1_best = max(pre_best, *stage_1)
    s2 = [record("stage_2", i, 160 + i, d) for i, d in zip((0, 40, 80), (s1_best, *stage_2))]
    return pre + s1 + s2


def test_rules_on_a_run_whose_stages_never_beat_pretraining():
    scores = selection_rules.rule_scores(sscd_history(0.70, (0.60, 0.65), (0.55, 0.62)))
    assert scores["best_stage"] == scores["last_stage"] == scores["pretrain"] == pytest.approx(0.70)
    assert scores["reference"] == pytest.approx(0.62)  # the last stage after its start
    assert scores["best_phase"] == "pretrain"  # ties go to the earliest record


def test_rules_when_a_middle_stage_is_best():
    scores = selection_rules.rule_scores(sscd_history(0.60, (0.66, 0.75), (0.70, 0.71)))
    assert scores["best_stage"] == scores["last_stage"] == pytest.approx(0.75)
    assert scores["reference"] == pytest.approx(0.71) and scores["pretrain"] == pytest.approx(0.60)
    assert scores["best_phase"] == "stage_1"


def test_single_phase_baseline_has_no_pretrain_rule():
    scores = selection_rules.rule_scores([record("supervised", 40, 40, 0.5), record("supervised", 80, 80, 0.4)])
    assert scores == {"best_stage": 0.5, "best_phase": "supervised", "last_stage": 0.5, "reference": 0.5}
    with pytest.raises(ValueError):
        selection_rules.rule_scores([])


def write_run(runs, name, config, history, finished=True):
    folder = runs / name
    by_phase = {}
    for rec in history:
        by_phase.setdefault(rec["phase"], []).append(rec)
    for phase, recs in by_phase.items():
        sub = folder if phase == "supervised" else folder / phase
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "validations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if finished:
        (folder / "best.pth").write_bytes(b"final model")  # only its presence is read


def test_table_mean_std_over_seeds(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, (pre, s1, s2) in {1: (0.70, (0.60, 0.65), (0.55, 0.62)),
                                2: (0.60, (0.66, 0.75), (0.70, 0.71))}.items():
        write_run(runs, f"sscd_{seed}", {"method": "sscd", "labelnum": 3, "seed": seed}, sscd_history(pre, s1, s2))
    for seed, best in ((1, 0.8), (2, 0.6)):
        write_run(runs, f"lo_{seed}", {"method": "labeled_only", "labelnum": 3, "seed": seed},
                  [record("supervised", 40, 40, best), record("supervised", 80, 80, best - 0.2)])
    (runs / "empty").mkdir()  # no config: ignored
    write_run(runs, "sscd_3", {"method": "sscd", "labelnum": 3, "seed": 3}, sscd_history(0.9, (0.9,), ()),
              finished=False)  # still training: left out
    assert selection_rules.main(["--table", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "left out, not finished (no final best.pth): sscd_3"
    rows = {r["method"]: r for r in json.loads(out[-1])}
    assert rows["sscd"]["best_stage"] == pytest.approx([72.5, 3.54], abs=0.01)  # 70, 75: sd = 5/sqrt(2)
    assert rows["sscd"]["reference"] == pytest.approx([66.5, 6.36], abs=0.01)  # 62, 71
    assert rows["sscd"]["pretrain"] == pytest.approx([65.0, 7.07], abs=0.01)
    assert rows["sscd"]["best_phases"] == ["pretrain", "stage_1"] and rows["sscd"]["seeds"] == [1, 2]
    assert rows["labeled_only"]["best_stage"] == pytest.approx([70.0, 14.14], abs=0.01)
    assert "pretrain" not in rows["labeled_only"]


def test_table_without_runs_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        selection_rules.main(["--table", str(tmp_path)])
    assert "no runs/ folder" in capsys.readouterr().err
