"""experiments/compare_arms.py: arms from several table folders, on hand-made run folders."""
import json

import pytest
import yaml

from conftest import load_script

arms = load_script("experiments/compare_arms.py")


def record(phase, iteration, total, dice):
    return {"phase": phase, "iteration": iteration, "total_iteration": total, "dice": dice}


def write_run(table, name, method, seed, final, history, labelnum=7):
    folder = table / "runs" / name
    for phase in dict.fromkeys(r["phase"] for r in history):
        sub = folder if phase == "supervised" else folder / phase
        sub.mkdir(parents=True, exist_ok=True)
        sub.joinpath("validations.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in history if r["phase"] == phase))
    (folder / "config.yaml").write_text(yaml.safe_dump(
        {"method": method, "labelnum": labelnum, "seed": seed, "pre_iterations": 80, "stage_iterations": [80],
         "hca_weights": "0,0,0,1"} if method != "labeled_only" else
        {"method": method, "labelnum": labelnum, "seed": seed}))
    (folder / "eval_val").mkdir()
    (folder / "eval_val" / "summary.json").write_text(json.dumps({"dice": {"mean": final}, "split": "val"}))


def sscd(pre, start, after):
    """pre-training validated at 40, 80; one stage validated at its start (= ``start``) and at 40, 80."""
    return [record("pretrain", 40, 40, pre[0]), record("pretrain", 80, 80, pre[1]),
            record("stage_1", 0, 80, start), record("stage_1", 40, 120, after[0]), record("stage_1", 80, 160, after[1])]


@pytest.fixture()
def tables(tmp_path):
    base, variant = tmp_path / "base", tmp_path / "variant"
    for seed, final, values in ((1, 0.70, (0.5, 0.6, 0.7, 0.8)), (2, 0.74, (0.4, 0.7, 0.6, 0.7))):
        write_run(base, f"ACDC_labeled_only_7_s{seed}", "labeled_only", seed, final,
                  [record("supervised", 40 * (k + 1), 40 * (k + 1), v) for k, v in enumerate(values)])
    write_run(base, "ACDC_sscd_7_s1", "sscd", 1, 0.72, sscd((0.3, 0.5), 0.5, (0.6, 0.7)))
    write_run(base, "ACDC_sscd_7_s2", "sscd", 2, 0.66, sscd((0.3, 0.6), 0.6, (0.5, 0.6)))
    write_run(base, "ACDC_sscd_3_s1", "sscd", 1, 0.10, sscd((0.1, 0.1), 0.1, (0.1, 0.1)), labelnum=3)
    write_run(variant, "ACDC_sscd_7_s1", "sscd", 1, 0.78, sscd((0.3, 0.5), 0.5, (0.8, 0.9)))
    write_run(variant, "ACDC_sscd_7_s2", "sscd", 2, 0.80, sscd((0.3, 0.6), 0.6, (0.7, 0.7)))
    write_run(variant, "ACDC_sscd_7_s3", "sscd", 3, 0.76, sscd((0.3, 0.6), 0.6, (0.7, 0.8)))
    return base, variant


def test_window_mean_leaves_out_stage_starts():
    history = sscd((0.3, 0.5), 0.5, (0.6, 0.7))
    assert arms.window_mean(history, 80) == pytest.approx((0.5 + 0.6 + 0.7) / 3)  # the start 0.5 at 80 is left out
    assert arms.window_mean(history, 0) == pytest.approx((0.3 + 0.5 + 0.6 + 0.7) / 4)
    assert arms.window_mean(history, 200) != arms.window_mean(history, 200)  # NaN: nothing left


def test_arms_side_by_side(tables, tmp_path, capsys):
    base, variant = tables
    figure = tmp_path / "curves.png"
    assert arms.main(["--labelnum", "7", "--reference", "LO", "SSCD", "--window_from", "80", "--figure", str(figure),
                      "--arm", f"LO={base}:labeled_only", "--arm", f"SSCD={base}:sscd",
                      "--arm", f"variant={variant}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = {r["arm"]: r for r in strict_json(out[-1])}
    assert rows["LO"]["seeds"] == [1, 2] and rows["LO"]["final"] == pytest.approx([72.0, 2.828], abs=1e-3)
    # labeled-only from it 80: seed 1 (0.6, 0.7, 0.8) = 0.7, seed 2 (0.7, 0.6, 0.7) = 0.6667
    assert rows["LO"]["window"][0] == pytest.approx(100 * (0.7 + 2 / 3) / 2)
    assert list(rows["LO"]["paired"]) == ["SSCD"] and rows["LO"]["paired"]["SSCD"]["diff"][0] == pytest.approx(3.0)
    # SSCD from it 80 without its stage start: seed 1 (0.5, 0.6, 0.7) = 0.6, seed 2 (0.6, 0.5, 0.6)
    assert rows["SSCD"]["window"][0] == pytest.approx(100 * (0.6 + 1.7 / 3) / 2)
    to_lo = rows["SSCD"]["paired"]["LO"]
    assert to_lo["diff"] == pytest.approx([-3.0, 7.071], abs=1e-3)  # +2, -8
    assert to_lo["ahead"] == 1 and to_lo["seeds"] == [1, 2] and list(rows["SSCD"]["paired"]) == ["LO"]
    # seed 3 has no labeled-only partner: it counts in the arm's mean, not in the pairing
    assert rows["variant"]["final"][0] == pytest.approx(78.0)
    to_lo, to_sscd = rows["variant"]["paired"]["LO"], rows["variant"]["paired"]["SSCD"]
    assert to_lo["seeds"] == [1, 2] and to_lo["diff"][0] == pytest.approx(7.0) and to_lo["ahead"] == 2
    assert to_sscd["diff"] == pytest.approx([10.0, 5.657], abs=1e-3) and to_sscd["ahead"] == 2  # +6, +14
    # from it 80 without the stage starts: (0.5, 0.8, 0.9), (0.6, 0.7, 0.7), (0.6, 0.7, 0.8)
    assert rows["variant"]["window"] == pytest.approx([70.0, 3.333], abs=1e-3)
    line = ("| variant | 3 | 78.0 ± 2.0 | s1 78.0, s2 80.0, s3 76.0 | 70.0 ± 3.3 | +7.0 ± 1.4, 2 of 2 | "
            "+10.0 ± 5.7, 2 of 2 |")
    assert line in "\n".join(out)
    assert figure.stat().st_size > 0


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_one_seed_arm_has_no_std_and_strict_json(tables, capsys):
    base, variant = tables
    assert arms.main(["--labelnum", "3", "--window_from", "500", "--arm", f"three={base}:sscd"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    (row,) = strict_json(out[-1])  # NaN (one seed; no validation from it 500) is written as null
    assert row["final"] == [10.0, None] and row["window"] == [None, None] and row["per_seed"] == {"1": 10.0}
    assert "| three | 1 | 10.0 | s1 10.0 | — |" in out[2]


def test_bad_arms_are_named(tables, tmp_path, capsys):
    base, variant = tables
    with pytest.raises(SystemExit):
        arms.main(["--labelnum", "7", "--arm", "no equals sign"])
    assert "expected LABEL=TABLE[:METHOD]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        arms.main(["--labelnum", "7", "--arm", f"all={base}"])  # labeled-only and SSCD share seed 1
    assert "two runs with seed 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        arms.main(["--labelnum", "5", "--arm", f"v={variant}"])
    assert "no evaluated run with --labelnum 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        arms.main(["--labelnum", "7", "--arm", f"v={tmp_path / 'nowhere'}"])
    assert "no runs/ folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        arms.main(["--labelnum", "7", "--arm", f"v={variant}", "--reference", "LO"])
    assert "--reference 'LO': not one of the arm labels" in capsys.readouterr().err
