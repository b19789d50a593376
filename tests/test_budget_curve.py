"""experiments/budget_curve.py: the tables it runs per budget and method (through compare_acdc and
run_table, with a fake runner in place of the trainer and test script), the rates it gives each method,
and the analysis (paired differences, run times, figures) on the runs the fake runner wrote."""
import json
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import load_script

curve = load_script("experiments/budget_curve.py")

BONUS = {"labeled_only": 0.0, "bcp": 0.02, "sscd": 0.03}


def fake_dice(method, budget, seed):
    """What the fake evaluation reports: grows with the budget, SSCD's gap grows faster."""
    growth = {"labeled_only": 0.0, "bcp": 0.5, "sscd": 1.0}[method]
    return 0.6 + BONUS[method] + growth * budget / 100000 + seed / 1000


class BudgetRunner:
    """Writes what the trainer (config.yaml, best.pth, validations.jsonl) and the test script
    (summary.json) would, for the labelnum, method, seed and budget of each command."""

    def __init__(self):
        self.calls = []

    def __call__(self, command, log_path, env=None):
        self.calls.append(command)
        value = lambda flag: command[command.index(flag) + 1]  # noqa: E731
        if "code/train_ACDC_SSCD.py" in command:
            run = Path(value("--save_dir"))
            run.mkdir(parents=True, exist_ok=True)
            budget = int(value("--pre_iterations")) + int(value("--max_iterations"))
            config = {"method": value("--method"), "seed": int(value("--seed")), "labelnum": int(value("--labelnum")),
                      "budget": budget}
            (run / "config.yaml").write_text(yaml.safe_dump(config))
            (run / "best.pth").write_bytes(b"weights")
            history = [{"phase": "supervised", "iteration": it, "total_iteration": it, "dice": 0.5} for it in (40, 80)]
            (run / "validations.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            return 0
        out = Path(value("--out"))
        config = yaml.safe_load((out.parent / "config.yaml").read_text())
        out.mkdir(parents=True, exist_ok=True)
        dice = fake_dice(config["method"], config["budget"], config["seed"])
        values = {"dice": dice, "jaccard": dice - 0.1, "hd95": 2.0, "asd": 1.0}
        summary = {"split": "val", "cases": 2, **{m: {"per_class": [v] * 3, "mean": v} for m, v in values.items()}}
        (out / "summary.json").write_text(json.dumps(summary))
        header = ["case"] + [f"{m}_{c}" for c in ("RV", "Myo", "LV") for m in values] + ["mean_dice"]
        rows = [[case] + [values[m] for _ in range(3) for m in values] + [dice] for case in ("a", "b")]
        (out / "cases.csv").write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
        return 0


def test_rates_follow_the_acceptance_table_and_overrides():
    assert curve.stage_lrs(["labeled_only", "bcp", "sscd"], 7, []) == {"labeled_only": None, "bcp": None, "sscd": 0.01}
    assert curve.stage_lrs(["bcp"], 3, []) == {"bcp": 0.01}
    assert curve.stage_lrs(["bcp", "sscd"], 7, ["sscd=none", "bcp=0.02"]) == {"bcp": 0.02, "sscd": None}
    for bad in ("sscd", "abd=0.01", "sscd=fast"):
        with pytest.raises(ValueError, match="--stage_lr"):
            curve.stage_lrs(["sscd"], 7, [bad])


def test_runs_every_budget_with_half_pre_training_then_analyses(tmp_path, capsys):
    out = tmp_path / "budget"
    runner = BudgetRunner()
    status = curve.main(["--root_path", str(tmp_path / "acdc"), "--out", str(out), "--budgets", "4800", "2400",
                         "--seeds", "1", "2", "--jobs", "1"], runner=runner)
    assert status == 0
    trains = [shlex.join(c) for c in runner.calls if "code/train_ACDC_SSCD.py" in c]
    assert len(trains) == 2 * 3 * 2  # budgets x methods x seeds
    assert all("--pre_iterations 1200 --max_iterations 1200" in t for t in trains[:6])  # 2400 first
    assert all("--pre_iterations 2400 --max_iterations 2400" in t for t in trains[6:])
    assert all(("--stage_lr 0.01" in t) == ("--method sscd" in t) for t in trains)  # 7 labeled: only SSCD at 0.01
    assert all(f"{out}/it" in t and "--labelnum 7" in t and "--val_interval 40" in t for t in trains)
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by = {(r["budget"], r["arm"]): r for r in rows}
    assert set(by) == {(b, m) for b in (2400, 4800) for m in ("labeled_only", "bcp", "sscd")}
    for (budget, method), row in by.items():
        expected = [100 * fake_dice(method, budget, s) for s in (1, 2)]
        assert row["final"][0] == pytest.approx(sum(expected) / 2)
        assert row["minutes"] == [pytest.approx(0.0, abs=0.1)] * 2  # run_table timed both steps
    # SSCD - labeled-only per seed: 3 points + 1 point per 100k iterations of budget
    assert by[(2400, "sscd")]["paired"]["labeled_only"]["diff"][0] == pytest.approx(3 + 2400 / 1000)
    assert by[(4800, "sscd")]["paired"]["labeled_only"]["diff"][0] == pytest.approx(3 + 4800 / 1000)
    assert by[(4800, "sscd")]["paired"]["bcp"]["ahead"] == 2
    assert "labeled_only" not in by[(2400, "labeled_only")]["paired"]
    table = (out / "budget_curve.md").read_text()
    assert "| 4800 | sscd | 2 |" in table and "+7.8 ± 0.0, 2 of 2" in table
    assert all((out / name).stat().st_size > 0 for name in
               ("budget_curve.png", "learning_curves_2400.png", "learning_curves_4800.png"))
    machine = json.loads((out / "machines.jsonl").read_text().splitlines()[0])
    assert machine["threads_per_run"] == 1 and machine["cpu_model"]


def test_resumed_command_runs_nothing_twice_and_analyse_alone(tmp_path, capsys):
    out = tmp_path / "b"
    argv = ["--root_path", str(tmp_path), "--out", str(out), "--budgets", "2400", "--methods", "labeled_only", "sscd",
            "--seeds", "1", "--jobs", "1"]
    first = BudgetRunner()
    curve.main(argv, runner=first)
    again = BudgetRunner()
    curve.main(argv, runner=again)
    assert len(first.calls) == 4 and again.calls == []  # evaluated runs are skipped
    capsys.readouterr()
    assert curve.main(["--out", str(out), "--budgets", "2400", "--methods", "labeled_only", "sscd", "--analyse"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["arm"] for r in rows] == ["labeled_only", "sscd"]


def test_bad_budget_and_missing_root_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        curve.main(["--root_path", str(tmp_path), "--out", str(tmp_path), "--budgets", "2401"])
    assert "--budgets 2401: expected a positive even number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        curve.main(["--out", str(tmp_path)])
    assert "--root_path: required unless --analyse" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        curve.main(["--out", str(tmp_path / "empty"), "--analyse"])
    assert "no evaluated run under it<B>/<method>/runs" in capsys.readouterr().err


def test_recorded_point_joins_table_and_figure_with_its_source(tmp_path, capsys):
    out = tmp_path / "b"
    curve.main(["--root_path", str(tmp_path), "--out", str(out), "--budgets", "4800", "--methods", "labeled_only",
                "sscd", "--seeds", "1", "2", "--jobs", "1"], runner=BudgetRunner())
    resumed = out / "it4800" / "sscd" / "runs" / "ACDC_sscd_7_s2" / "TRAINED"
    resumed.write_text(resumed.read_text().strip() + " --resume\n")  # as run_table writes it for a resumed run
    record = tmp_path / "xeon.json"
    record.write_text(json.dumps({"budget": 2400, "source": "recorded: other CPU",
                                  "dice": {"labeled_only": {"1": 70.0, "2": 71.0}, "sscd": {"1": 73.0, "2": 70.0},
                                           "abd": {"1": 1.0}}, "minutes": {"sscd": {"1": 20.5}}}))
    capsys.readouterr()
    assert curve.main(["--out", str(out), "--budgets", "4800", "--methods", "labeled_only", "sscd", "--analyse",
                       "--recorded", str(record)]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by = {(r["budget"], r["arm"]): r for r in rows}
    assert set(by) == {(b, m) for b in (2400, 4800) for m in ("labeled_only", "sscd")}  # abd: not a chosen method
    old = by[(2400, "sscd")]
    assert old["recorded"] and old["machine"] == "recorded: other CPU" and old["final"][0] == pytest.approx(71.5)
    assert old["paired"]["labeled_only"]["diff"][0] == pytest.approx(1.0)  # (+3 - 1) / 2
    assert old["paired"]["labeled_only"]["ahead"] == 1 and old["minutes"] == [20.5, None]
    new = by[(4800, "sscd")]
    assert not new["recorded"] and new["resumed"] == [False, True] and "(" in new["machine"]
    table = (out / "budget_curve.md").read_text()
    assert "| 2400 | sscd | 2 | 71.5 ± 2.1 | s1 73.0, s2 70.0 | 20.5, ? |" in table
    assert "recorded: other CPU |" in table and "* resumed after an interruption" in table
    assert (out / "budget_curve.png").stat().st_size > 0


def test_recorded_file_errors_name_the_file(tmp_path, capsys):
    out = tmp_path / "b"
    curve.main(["--root_path", str(tmp_path), "--out", str(out), "--budgets", "2400", "--methods", "sscd",
                "--seeds", "1", "--jobs", "1"], runner=BudgetRunner())
    bad = tmp_path / "bad.json"
    for text, expected in [('{"budget": 2400, "source": "x", "dice": {"sscd": {"1": 70}}}', "already measured"),
                           ('{"budget": 1200, "dice": {"sscd": {"1": 70}}}', "expected {\"budget\""),
                           ('{"budget": 1200, "source": "x", "dice": {"bcp": {"1": 70}}}', "no method of")]:
        bad.write_text(text)
        with pytest.raises(SystemExit):
            curve.main(["--out", str(out), "--budgets", "2400", "--methods", "sscd", "--analyse", "--recorded", str(bad)])
        err = capsys.readouterr().err
        assert f"--recorded {bad}" in err and expected in err
    with pytest.raises(SystemExit):
        curve.main(["--out", str(out), "--budgets", "2400", "--methods", "sscd", "--analyse", "--recorded",
                    str(tmp_path / "missing.json")])
    assert "missing.json: no such file" in capsys.readouterr().err


def test_machines_name_the_cpu_of_each_budget_started(tmp_path):
    entries = [{"cpu_model": "CPU A", "cpu_capability": "AVX2", "argv": ["--out", "o", "--budgets", "4800", "--jobs", "1"]},
               {"cpu_model": "CPU B", "cpu_capability": "AVX512", "argv": ["--out", "o"]}]  # the default budgets
    (tmp_path / "machines.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert curve.machines(tmp_path) == {2400: "CPU B (AVX512)", 4800: "CPU A (AVX2), CPU B (AVX512)",
                                        9600: "CPU B (AVX512)"}
    assert curve.machines(tmp_path / "none") == {}


def test_attempt_seconds_span_each_attempt_and_midnight():
    log = "\n".join(["[23:59:50] save_dir: runs/x", "[23:59:55] [pretrain] it 50/100 loss=1.0",
                     "[00:00:20] [pretrain] it 100/100 loss=0.9", "Traceback (most recent call last):",
                     "[00:05:00] save_dir: runs/x", "[00:05:40] [stage_1] it 50/50 loss=0.5"])
    assert curve.attempt_seconds(log) == [30, 40]  # 23:59:50 -> 00:00:20 passes midnight
    assert curve.attempt_seconds("[10:00:00] save_dir: y\n[09:00:00] later\n") == [23 * 3600]
    assert curve.attempt_seconds("no stamp\n") == []


def test_resumed_run_time_sums_its_logged_attempts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / curve.TIMES_FILE).write_text('{"step": "train", "seconds": 50.0}\n{"step": "test", "seconds": 10.0}\n')
    (run / curve.launch.TRAINED_FILE).write_text("python train.py --seed 1\n")
    (run / "log.txt").write_text("[12:00:00] save_dir: run\n[12:00:30] it 2/4\n"
                                 "[12:10:00] save_dir: run\n[12:10:40] it 4/4\n")
    assert curve.run_seconds(run) == 60.0  # not resumed: the recorded steps as they are
    (run / curve.launch.TRAINED_FILE).write_text("python train.py --seed 1 --resume\n")
    assert curve.run_seconds(run) == 80.0  # 30 + 40 s of logged attempts, then the 10 s test


def test_figure_gives_each_method_its_learning_curve_colour(tmp_path, monkeypatch):
    """Method k is drawn in colour Ck, as in the learning-curve figures, also after a recorded point
    (whose open marker once advanced the colour cycle and gave the next method the wrong colour)."""
    import matplotlib
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    row = lambda budget, arm, recorded: {"budget": budget, "arm": arm, "final": [70.0, 1.0],  # noqa: E731
                                         "recorded": recorded}
    rows = [row(b, m, b == 2400) for m in ("labeled_only", "bcp", "sscd") for b in (2400, 4800)]
    curve.plot(rows, tmp_path / "f.png", 7)
    ax = saved[0].axes[0]
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["labeled_only", "bcp", "sscd"]
    cycle = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
    assert [to_hex(h[0].get_color()) for h in handles] == [to_hex(c) for c in cycle[:3]]
    open_markers = [line for line in ax.lines if line.get_markerfacecolor() == "white"]
    assert [to_hex(line.get_markeredgecolor()) for line in open_markers] == [to_hex(c) for c in cycle[:3]]
