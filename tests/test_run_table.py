"""Tests for experiments/run_table.py: the commands it prints with --dry_run, resuming (evaluated runs are
skipped, trained ones only evaluated), failures reported with a non-zero exit, and flag checks. The
trainer and test script are replaced by a fake runner that writes what they would write."""
import csv
import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
run_table = load_script("experiments/run_table.py")

PASS = ["--image_size", "32", "--batch_size", "8", "--labeled_bs", "4", "--pre_iterations", "20"]
CLASSES = ("RV", "Myo", "LV")


def expected_commands(out, method, seed, split="val"):
    run = out / "runs" / f"ACDC_{method}_1_s{seed}"
    train = [sys.executable, "code/train_ACDC_SSCD.py", "--method", method, "--labelnum", "1", "--seed", str(seed),
             "--save_dir", str(run), *PASS]
    test = [sys.executable, "code/test_ACDC.py", "--checkpoint", str(run / "best.pth"), "--split", split,
            "--out", str(run / f"eval_{split}"), "--no_predictions"]
    return shlex.join(train), shlex.join(test)


def argv(out, *extra):
    return ["--dataset", "ACDC", "--methods", "labeled_only", "sscd", "--labelnums", "1", "--seeds", "1", "2",
            "--out", str(out), *extra, "--", *PASS]


def test_dry_run_prints_the_commands(tmp_path, capsys):
    out = tmp_path / "table"
    assert run_table.main(argv(out, "--dry_run")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    expected = []
    for method in ("labeled_only", "sscd"):
        for seed in (1, 2):
            expected += expected_commands(out, method, seed)
    assert lines == expected
    assert not out.exists()  # a dry run writes nothing


def test_dry_run_root_device_and_comma_lists(tmp_path, capsys):
    out = tmp_path / "t"
    root = tmp_path / "acdc"
    run_table.main(["--methods", "bcp,abd", "--labelnums", "3", "--seeds", "7", "--root_path", str(root),
                    "--device", "cpu", "--split", "test", "--out", str(out), "--dry_run"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    train, test = shlex.split(lines[0]), shlex.split(lines[1])
    assert train[1:8] == ["code/train_ACDC_SSCD.py", "--method", "bcp", "--labelnum", "3", "--seed", "7"]
    assert train[-4:] == ["--root_path", str(root), "--device", "cpu"]
    run = out / "runs" / "ACDC_bcp_3_s7"
    assert test == [sys.executable, "code/test_ACDC.py", "--checkpoint", str(run / "best.pth"), "--split", "test",
                    "--out", str(run / "eval_test"), "--no_predictions", "--root_path", str(root), "--device", "cpu"]
    assert "--method abd" in lines[2]


def test_dry_run_skips_evaluated_runs(tmp_path, capsys):
    out = tmp_path / "table"
    done = out / "runs" / "ACDC_sscd_1_s1" / "eval_val"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    trained = out / "runs" / "ACDC_labeled_only_1_s2"
    trained.mkdir()
    (trained / "best.pth").write_bytes(b"")
    (trained / run_table.launch.TRAINED_FILE).write_text("")
    run_table.main(argv(out, "--dry_run"))
    printed = capsys.readouterr().out
    assert f"# skip ACDC_sscd_1_s1: {done / 'summary.json'} exists" in printed
    assert "ACDC_sscd_1_s1 " not in printed.replace("# skip ACDC_sscd_1_s1", "")
    train, test = expected_commands(out, "labeled_only", 2)
    assert train not in printed and test in printed  # trained: evaluation only
    for method, seed in (("labeled_only", 1), ("sscd", 2)):
        assert all(c in printed for c in expected_commands(out, method, seed))


class FakeRunner:
    """Stands in for the subprocesses: the trainer writes config.yaml + best.pth, the test script
    summary.json + cases.csv (Dice 0.5 + seed / 10 for every class and case). ``fail`` names
    (run, step) pairs that exit 1."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, command, log_path, env=None):
        self.calls.append(command)
        step = "train" if "code/train_ACDC_SSCD.py" in command else "test"
        if step == "train":
            run = Path(command[command.index("--save_dir") + 1])
            seed = int(command[command.index("--seed") + 1])
            method = command[command.index("--method") + 1]
            if (run.name, step) in self.fail:
                Path(log_path).write_text("Traceback: boom\n")
                return 1
            run.mkdir(parents=True, exist_ok=True)
            (run / "config.yaml").write_text(yaml.safe_dump({"method": method, "seed": seed, "labelnum": 1,
                                                             "image_size": 32, "total_iterations": 20}))
            (run / "best.pth").write_bytes(b"weights")
            history = [{"phase": "pretrain", "iteration": it, "total_iteration": it, "dice": 0.1 * it + seed / 100}
                       for it in (0, 5, 10)]
            (run / "validations.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            return 0
        out = Path(command[command.index("--out") + 1])
        run = out.parent
        if (run.name, step) in self.fail:
            return 2
        seed = yaml.safe_load((run / "config.yaml").read_text())["seed"]
        dice = 0.5 + seed / 10
        out.mkdir(parents=True, exist_ok=True)
        summary = {"split": "val", "cases": 2}
        values = {"dice": dice, "jaccard": dice - 0.1, "hd95": 2.0, "asd": 1.0}
        for m, v in values.items():
            summary[m] = {"per_class": [v] * 3, "mean": v}
        (out / "summary.json").write_text(json.dumps(summary))
        with open(out / "cases.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case"] + [f"{m}_{c}" for c in CLASSES for m in values] + ["mean_dice"])
            for case in ("a", "b"):
                w.writerow([case] + [values[m] for c in CLASSES for m in values] + [dice])
        return 0

    def runs_called(self, step):
        script = "code/train_ACDC_SSCD.py" if step == "train" else "code/test_ACDC.py"
        flag = "--save_dir" if step == "train" else "--checkpoint"
        return [Path(c[c.index(flag) + 1]).name if step == "train" else Path(c[c.index(flag) + 1]).parent.name
                for c in self.calls if script in c]


def test_failures_reported_and_resume(tmp_path, capsys):
    out = tmp_path / "table"
    first = FakeRunner(fail={("ACDC_sscd_1_s2", "train"), ("ACDC_labeled_only_1_s2", "test")})
    assert run_table.main(argv(out), runner=first) == 1
    assert first.runs_called("train") == ["ACDC_labeled_only_1_s1", "ACDC_labeled_only_1_s2", "ACDC_sscd_1_s1",
                                          "ACDC_sscd_1_s2"]
    assert first.runs_called("test") == ["ACDC_labeled_only_1_s1", "ACDC_labeled_only_1_s2", "ACDC_sscd_1_s1"]
    err = capsys.readouterr().err
    assert "ACDC_sscd_1_s2] train FAILED (exit code 1)" in err and "Traceback: boom" in err
    failed = json.loads((out / "runs" / "ACDC_sscd_1_s2" / "FAILED.json").read_text())
    assert failed["step"] == "train" and failed["returncode"] == 1
    assert failed["command"] == expected_commands(out, "sscd", 2)[0]
    md = (out / "results.md").read_text()
    missing = md.split("## Missing or failed runs")[1]
    assert "`ACDC_sscd_1_s2` (val): failed (train step, exit code 1)" in missing
    assert "`ACDC_labeled_only_1_s2` (val): failed (test step, exit code 2)" in missing
    assert "| ACDC | sscd | 1 | 1 | val | 60.00 ± – |" in md
    assert "quoted †" in md  # ACDC: published rows by default
    assert json.loads((out / "runs" / "expected_runs.json").read_text())["runs"] == [
        "ACDC_labeled_only_1_s1", "ACDC_labeled_only_1_s2", "ACDC_sscd_1_s1", "ACDC_sscd_1_s2"]

    # second invocation: evaluated runs are skipped, the trained one is only evaluated, the failed one retrained
    second = FakeRunner()
    assert run_table.main(argv(out), runner=second) == 0
    assert second.runs_called("train") == ["ACDC_sscd_1_s2"]
    assert second.runs_called("test") == ["ACDC_labeled_only_1_s2", "ACDC_sscd_1_s2"]
    assert not list((out / "runs").glob("*/FAILED.json"))
    md = (out / "results.md").read_text()
    assert "| ACDC | sscd | 1 | 2 | val | 65.00 ± 7.07 |" in md  # Dice 60 and 70: sample std 7.07
    assert "| ACDC | labeled_only | 1 | 2 | val | 65.00 ± 7.07 |" in md
    assert md.split("## Missing or failed runs")[1].strip() == "None."

    # third: nothing left to do
    third = FakeRunner()
    assert run_table.main(argv(out), runner=third) == 0 and third.calls == []


def test_success_without_best_pth_is_a_failure(tmp_path):
    def silent(command, log_path, env=None):
        return 0  # exits 0 but writes nothing
    out = tmp_path / "t"
    assert run_table.main(["--methods", "sscd", "--labelnums", "1", "--seeds", "1", "--out", str(out)],
                          runner=silent) == 1
    failed = json.loads((out / "runs" / "ACDC_sscd_1_s1" / "FAILED.json").read_text())
    assert failed["step"] == "train" and "wrote no best.pth" in failed["problem"]


@pytest.mark.parametrize("bad, message", [
    (["--methods", "fixmatch"], "expected any of"),
    (["--seeds", "1", "1"], "repeated value"),
    (["--", "--seed", "3"], "set by run_table itself"),
    (["--", "--save_dir=x"], "set by run_table itself"),
    (["--", "--root_path", "x"], "set by run_table itself"),
    (["--dataset", "PROMISE12"], "--root_path is required for PROMISE12"),  # no synthetic prostate data
])
def test_bad_flags_are_refused(tmp_path, capsys, bad, message):
    own, rest = run_table.split_passthrough(bad)
    with pytest.raises(SystemExit) as exc:
        run_table.main(["--out", str(tmp_path / "t"), *own, "--dry_run"] + (["--", *rest] if "--" in bad else []))
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_jobs_run_everything_and_the_report_draws_learning_curves(tmp_path):
    out = tmp_path / "table"
    runner = FakeRunner()
    assert run_table.main(argv(out, "--jobs", "2"), runner=runner) == 0
    assert sorted(runner.runs_called("train")) == sorted(f"ACDC_{m}_1_s{s}" for m in ("labeled_only", "sscd")
                                                         for s in (1, 2))
    png = out / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000


def test_stage_iterations_refused_for_methods_with_different_stage_counts(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_table.main(["--methods", "bcp", "sscd", "--out", str(tmp_path), "--", "--stage_iterations", "10"])
    assert "give --max_iterations" in capsys.readouterr().err
    assert run_table.main(["--methods", "labeled_only", "sscd", "--out", str(tmp_path), "--dry_run", "--",
                           "--stage_iterations", "10"]) == 0
    config = tmp_path / "stages.yaml"
    config.write_text("image_size: 64\nstage_iterations: 10\n")
    for flags in (["--config", str(config)], [f"--config={config}"]):
        with pytest.raises(SystemExit):
            run_table.main(["--methods", "bcp", "sscd", "--out", str(tmp_path), "--", *flags])
        assert f"--config {config} (its stage_iterations) gives bcp, sscd different budgets" in capsys.readouterr().err
    config.write_text("image_size: 64\n")  # a config without the key passes
    assert run_table.main(["--methods", "bcp", "sscd", "--out", str(tmp_path), "--dry_run", "--",
                           "--config", str(config)]) == 0


def test_compare_acdc_is_run_table_with_cpu_scale_flags(tmp_path, capsys):
    compare = load_script("experiments/compare_acdc.py")
    runner = FakeRunner()
    compare.main(["--root_path", str(tmp_path), "--out", str(tmp_path / "cmp"), "--seeds", "1", "2",
                  "--labelnums", "1"], runner=runner)
    train = [c for c in runner.calls if "code/train_ACDC_SSCD.py" in c]
    assert len(train) == 4
    for command in train:  # one budget and one validation schedule for every method
        text = shlex.join(command)
        assert "--max_iterations 600" in text and "--pre_iterations 600" in text and "--val_interval 40" in text
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # FakeRunner: Dice 0.5 + seed / 10 -> seeds 1, 2: mean 0.65, sample std 0.0707
    assert result["sscd_1"]["mean"] == pytest.approx(0.65) and result["sscd_1"]["std"] == pytest.approx(0.0707, abs=1e-4)
    assert result["iterations"] == 1200
