"""Tests for reporting/report.py on hand-made run folders whose means and standard deviations are
computed by hand: aggregation over seeds, per-class columns, mm columns, the quoted published rows,
and missing / failed / inconsistent runs being reported."""
import csv
import json

import numpy as np
import pytest
import yaml

from reporting import report

CLASSES = ("RV", "Myo", "LV")
METRICS = ("dice", "jaccard", "hd95", "asd")


def write_run(runs, name, cases, config=None, split="val", mm=None, summary_override=None):
    """A run folder as the trainer + test script leave it. ``cases``: {case: {metric: [RV, Myo, LV]}};
    ``mm``: {case: {"hd95": [...], "asd": [...]}} for the optional mm columns."""
    folder = runs / name
    out = folder / f"eval_{split}"
    out.mkdir(parents=True)
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "best.pth").write_bytes(b"")
    header = ["case"] + [f"{m}_{c}" for c in CLASSES for m in METRICS]
    if mm:
        header += [f"{m}_mm_{c}" for c in CLASSES for m in ("hd95", "asd")]
    header.append("mean_dice")
    with open(out / "cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for case, vals in cases.items():
            row = [case] + [f"{vals[m][k]:.6f}" for k in range(3) for m in METRICS]
            if mm:
                row += [f"{mm[case][m][k]:.6f}" for k in range(3) for m in ("hd95", "asd")]
            w.writerow(row + [f"{np.mean(vals['dice']):.6f}"])
    summary = {"split": split, "cases": len(cases), "classes": list(CLASSES)}
    for m in METRICS:
        per_class = [float(np.mean([v[m][k] for v in cases.values()])) for k in range(3)]
        summary[m] = {"per_class": per_class, "mean": float(np.mean(per_class))}
    summary.update(summary_override or {})
    (out / "summary.json").write_text(json.dumps(summary))
    return folder


def sscd_cases(seed):
    """Seed 1/2/3: per-seed Dice 0.80/0.90/0.85 (RV 0.70/0.80/0.75), Jaccard 0.5/0.6/0.7,
    HD95 2/4/6, ASD 1/1/1; the two cases differ but average to these values."""
    d = {1: 0.0, 2: 0.1, 3: 0.05}[seed]
    j = {1: 0.5, 2: 0.6, 3: 0.7}[seed]
    h = {1: 2.0, 2: 4.0, 3: 6.0}[seed]
    return {
        "p1_frame01": {"dice": [0.6 + d, 0.8 + d, 0.9 + d], "jaccard": [j - 0.1, j, j + 0.1],
                       "hd95": [h - 1, h, h + 1], "asd": [1.0, 0.5, 1.5]},
        "p1_frame02": {"dice": [0.8 + d, 0.8 + d, 0.9 + d], "jaccard": [j + 0.1, j, j - 0.1],
                       "hd95": [h + 1, h, h - 1], "asd": [1.0, 1.5, 0.5]},
    }


CONFIG = {"image_size": 32, "batch_size": 8, "labeled_bs": 4, "total_iterations": 100, "max_iterations": None,
          "root_path": "data/synthetic_ACDC"}


@pytest.fixture
def runs(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    mm = {c: {"hd95": [3.0, 3.0, 3.0], "asd": [1.5, 1.5, 1.5]} for c in sscd_cases(1)}
    for seed in (1, 2, 3):
        write_run(runs, f"ACDC_sscd_1_s{seed}", sscd_cases(seed), {**CONFIG, "method": "sscd", "seed": seed,
                                                                  "labelnum": 1}, mm=mm)
    write_run(runs, "ACDC_labeled_only_1_s1", sscd_cases(1), {**CONFIG, "method": "labeled_only", "seed": 1,
                                                              "labelnum": 1})
    # a failed run (run_table's marker), an unevaluated one, an inconsistent one, an expected one never started
    failed = runs / "ACDC_labeled_only_1_s2"
    failed.mkdir()
    (failed / report.FAILED_FILE).write_text(json.dumps({"step": "train", "returncode": 3, "log": "x.log"}))
    (runs / "ACDC_labeled_only_1_s3").mkdir()
    write_run(runs, "ACDC_bcp_1_s1", sscd_cases(1), {**CONFIG, "method": "bcp", "seed": 1, "labelnum": 1},
              summary_override={"dice": {"per_class": [0.1, 0.1, 0.1], "mean": 0.1}})
    (runs / report.EXPECTED_FILE).write_text(json.dumps({"split": "val", "runs": [
        "ACDC_sscd_1_s1", "ACDC_sscd_1_s2", "ACDC_sscd_1_s3", "ACDC_labeled_only_1_s1", "ACDC_labeled_only_1_s2",
        "ACDC_labeled_only_1_s3", "ACDC_abd_1_s1"]}))
    return runs


def test_aggregation_by_hand(runs, tmp_path):
    rows, problems = report.build_report(runs, tmp_path / "out", split="val")
    assert [(r["method"], r["labelnum"], r["n_seeds"]) for r in rows] == [("labeled_only", 1, 1), ("sscd", 1, 3)]
    sscd = rows[1]
    assert sscd["seeds"] == [1, 2, 3] and sscd["classes"] == list(CLASSES) and sscd["n_cases"] == [2]
    # mean +- sample std (ddof=1) of the per-seed means, by hand
    assert sscd["mean"]["dice"] == pytest.approx(0.85) and sscd["std"]["dice"] == pytest.approx(0.05)
    assert sscd["mean"]["jaccard"] == pytest.approx(0.6) and sscd["std"]["jaccard"] == pytest.approx(0.1)
    assert sscd["mean"]["hd95"] == pytest.approx(4.0) and sscd["std"]["hd95"] == pytest.approx(2.0)
    assert sscd["mean"]["asd"] == pytest.approx(1.0) and sscd["std"]["asd"] == pytest.approx(0.0, abs=1e-9)
    assert sscd["class_mean"]["dice"] == pytest.approx([0.75, 0.85, 0.95])
    assert sscd["class_std"]["dice"] == pytest.approx([0.05, 0.05, 0.05])
    assert sscd["mm_mean"] == pytest.approx({"hd95": 3.0, "asd": 1.5})
    assert sscd["budget"] == "32², 100 it, batch 8/4 labeled"
    lonely = rows[0]
    assert lonely["mean"]["dice"] == pytest.approx(0.8) and np.isnan(lonely["std"]["dice"])
    assert lonely["mm_mean"] == {}

    with open(tmp_path / "out" / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(t["kind"], t["method"]) for t in table] == [("ours", "labeled_only"), ("ours", "sscd")]
    t = table[1]
    assert float(t["dice_pct_mean"]) == pytest.approx(85.0) and float(t["dice_pct_std"]) == pytest.approx(5.0)
    assert float(t["hd95_vox_mean"]) == pytest.approx(4.0) and float(t["hd95_vox_std"]) == pytest.approx(2.0)
    assert float(t["dice_pct_RV_mean"]) == pytest.approx(75.0) and float(t["dice_pct_LV_std"]) == pytest.approx(5.0)
    assert float(t["jaccard_pct_Myo_mean"]) == pytest.approx(60.0)
    assert float(t["hd95_mm_mean"]) == pytest.approx(3.0) and t["n_seeds"] == "3" and t["split"] == "val"
    assert table[0]["dice_pct_std"] == "" and table[0]["hd95_mm_mean"] == ""

    md = (tmp_path / "out" / "results.md").read_text()
    assert "| ACDC | sscd | 1 | 3 | val | 85.00 ± 5.00 | 60.00 ± 10.00 | 4.00 ± 2.00 | 1.00 ± 0.00 | ours |" in md
    assert "| ACDC | labeled_only | 1 | 1 | val | 80.00 ± – |" in md
    assert "†" not in md and "quoted" not in md


def test_missing_and_failed_runs_are_reported(runs, tmp_path):
    _, problems = report.build_report(runs, tmp_path / "out", split="val")
    by_run = {p["run"]: p["problem"] for p in problems}
    assert set(by_run) == {"ACDC_labeled_only_1_s2", "ACDC_labeled_only_1_s3", "ACDC_bcp_1_s1", "ACDC_abd_1_s1"}
    assert by_run["ACDC_labeled_only_1_s2"].startswith("failed (train step, exit code 3)")
    assert by_run["ACDC_labeled_only_1_s3"].startswith("missing: no eval_val/summary.json")
    assert "does not match cases.csv" in by_run["ACDC_bcp_1_s1"]
    assert by_run["ACDC_abd_1_s1"] == "missing: the run folder does not exist"
    md = (tmp_path / "out" / "results.md").read_text()
    section = md.split("## Missing or failed runs")[1]
    for name in by_run:
        assert f"`{name}`" in section
    # the CLI exits 1 with --strict, 0 without
    assert report.main(["--runs", str(runs), "--out", str(tmp_path / "cli"), "--strict"]) == 1
    assert report.main(["--runs", str(runs), "--out", str(tmp_path / "cli")]) == 0


def test_published_rows_are_quoted(runs, tmp_path):
    report.build_report(runs, tmp_path / "out", published=True, split="val")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| ACDC | SSCD † | 7 | paper | test (published) | 90.91 | 83.73 | 1.11 | 0.28 | quoted † |" in md
    assert "| ACDC | BCP † | 3 | paper | test (published) | 87.59 | 78.67 | 1.90 | 0.67 | quoted † |" in md
    assert "| ACDC | U-Net (labeled only) † | 3 | paper | test (published) | 47.83 | 37.01 | 31.16 | 12.62 |" in md
    assert "| ACDC | β-FFT † | 7 | paper | test (published) | 90.50 | 83.12 | 1.78 | 0.55 |" in md
    assert "| ACDC | ABD † | 3 | paper | test (published) | 88.96 | 80.70 | 1.57 | 0.52 |" in md
    assert "Quoted from the papers, not run here" in md and report.PUBLISHED_PROTOCOL in md
    assert "haung-hangdian/SSCD figure/results.png" in md
    # our protocol is read from the runs' config.yaml
    assert "| sscd | 1 | val | 2 | 1, 2, 3 | 32², 100 it, batch 8/4 labeled | data/synthetic_ACDC |" in md
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    quoted = [t for t in table if t["kind"] == "published"]
    assert len(quoted) == 10 and all(t["source"].startswith("quoted: ") for t in quoted)
    assert {(t["method"], t["labelnum"]) for t in quoted} == {
        (m, n) for m in ("labeled_only", "bcp", "abd", "beta_fft", "sscd") for n in ("3", "7")}
    abd7 = next(t for t in quoted if t["method"] == "abd" and t["labelnum"] == "7")
    assert [float(abd7[k]) for k in ("dice_pct_mean", "jaccard_pct_mean", "hd95_vox_mean", "asd_vox_mean")] == \
        [89.81, 81.95, 1.46, 0.49]
    assert abd7["dice_pct_std"] == ""


def test_run_identity_and_cases_parsing(tmp_path):
    assert report.parse_run_name("ACDC_labeled_only_7_s1337") == {
        "dataset": "ACDC", "method": "labeled_only", "labelnum": 7, "seed": 1337}
    assert report.parse_run_name("PROMISE12_sscd_3_s2")["dataset"] == "PROMISE12"
    assert report.parse_run_name("not_a_run") is None
    assert report.run_name("ACDC", "bcp", 3, 2) == "ACDC_bcp_3_s2"
    # a folder without config.yaml takes its identity from its name; the split is recorded
    runs = tmp_path / "runs"
    write_run(runs, "PROMISE12_sscd_2_s5", {"c1": {m: [0.5, 0.5, 0.5] for m in METRICS}}, split="test")
    rows, problems = report.build_report(runs, tmp_path / "out")
    assert problems == [] and len(rows) == 1
    assert (rows[0]["dataset"], rows[0]["method"], rows[0]["labelnum"], rows[0]["seeds"], rows[0]["split"]) == \
        ("PROMISE12", "sscd", 2, [5], "test")
    assert rows[0]["budget"] == "no config.yaml"
    # the mm columns are parsed as mm, not as a class named 'mm_RV'
    path = runs / "PROMISE12_sscd_2_s5" / "eval_test" / "cases.csv"
    path.write_text("case,dice_RV,jaccard_RV,hd95_RV,asd_RV,hd95_mm_RV,asd_mm_RV,mean_dice\n"
                    "c1,0.5,0.4,3,1,4.5,1.5,0.5\nc2,0.7,0.6,5,2,7.5,3.0,0.7\n")
    cases, classes, values, mm = report.read_cases(path)
    assert cases == ["c1", "c2"] and classes == ["RV"]
    assert values["dice"][:, 0].tolist() == [0.5, 0.7] and mm["hd95"][:, 0].tolist() == [4.5, 7.5]
