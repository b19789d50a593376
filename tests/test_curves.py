"""Learning curves and stage selection: validations logged by train_loop (stage starts included),
read back in total-iteration order, the final model over stages, and the figure."""
import json

import pytest
import torch
import yaml

import train_ACDC_SSCD
from common.checkpoint import load_checkpoint, save_checkpoint
from conftest import load_script
from reporting.curves import mean_curves, plot_learning_curves, plot_mean_curves, read_history, stage_boundaries
from training.engine import train_loop
from training.sscd_train import best_stage_checkpoint


class Tiny(torch.nn.Module):
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_validate_start_keeps_the_start_when_no_step_improves(tmp_path):
    scores = iter([0.9, 0.5, 0.4])
    model = Tiny()
    state = train_loop(save_dir=tmp_path, iterations=4, step=lambda it: {"loss": model.w.sum() * 0 + 1},
                       models={"model": model}, optimizers={}, validate=lambda: (next(scores), {}), config={},
                       val_interval=2, log_interval=2, validate_start=True, offset=100, name="stage_2")
    assert (state["best_dice"], state["best_iteration"]) == (0.9, 0)
    assert load_checkpoint(tmp_path / "best.pth")["iteration"] == 0
    records = [json.loads(line) for line in (tmp_path / "validations.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["iteration"], r["total_iteration"], r["dice"]) for r in records] == [
        ("stage_2", 0, 100, 0.9), ("stage_2", 2, 102, 0.5), ("stage_2", 4, 104, 0.4)]


def test_read_history_orders_by_total_iteration_and_keeps_the_later_repeat(tmp_path):
    (tmp_path / "stage_1").mkdir()
    (tmp_path / "pretrain").mkdir()
    lines = [{"phase": "stage_1", "iteration": 0, "total_iteration": 10, "dice": 0.5},
             {"phase": "stage_1", "iteration": 5, "total_iteration": 15, "dice": 0.6},
             {"phase": "stage_1", "iteration": 5, "total_iteration": 15, "dice": 0.7}]  # repeated by a resume
    (tmp_path / "stage_1" / "validations.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "pretrain" / "validations.jsonl").write_text(
        json.dumps({"phase": "pretrain", "iteration": 10, "total_iteration": 10, "dice": 0.5}) + "\n\n")
    history = read_history(tmp_path)
    assert [(h["phase"], h["total_iteration"], h["dice"]) for h in history] == [
        ("pretrain", 10, 0.5), ("stage_1", 10, 0.5), ("stage_1", 15, 0.7)]
    (tmp_path / "pretrain" / "validations.jsonl").write_text('{"phase": "pretrain"}\n')
    with pytest.raises(ValueError, match=r"pretrain/validations.jsonl:1: not a validation record"):
        read_history(tmp_path)


def test_stage_boundaries_from_the_config():
    assert stage_boundaries({"method": "sscd", "pre_iterations": 600, "stage_iterations": [120, 120, 121]}) == [600, 720, 840]
    assert stage_boundaries({"method": "bcp", "pre_iterations": 600, "stage_iterations": [600]}) == [600]
    assert stage_boundaries({"method": "labeled_only", "pre_iterations": 600, "stage_iterations": [600]}) == []
    assert stage_boundaries({}) == []


def test_best_stage_checkpoint_picks_the_highest_and_the_earliest_on_ties(tmp_path):
    paths = []
    for k, dice in enumerate([0.5, 0.7, 0.7, 0.6]):
        paths.append(tmp_path / f"s{k}.pth")
        save_checkpoint({"model": {}, "best_dice": dice}, paths[-1])
    assert best_stage_checkpoint(paths, "default") == paths[1]
    assert best_stage_checkpoint([tmp_path / "none.pth"], "default") == "default"


def test_plot_learning_curves_writes_a_png(tmp_path):
    runs = [{"method": m, "labelnum": n, "seed": s, "config": {"method": m, "pre_iterations": 4, "stage_iterations": [2, 2]},
             "history": [{"total_iteration": i, "dice": 0.1 * i + s / 100} for i in range(0, 9, 2)]}
            for m in ("labeled_only", "sscd") for n in (3, 7) for s in (1, 2)]
    out = plot_learning_curves(runs, tmp_path / "c.png", order=("labeled_only", "sscd"))
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot_learning_curves([{**runs[0], "history": []}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


TINY = ["--image_size", "32", "--batch_size", "4", "--labeled_bs", "2", "--patch_size", "8", "--device", "cpu",
        "--num_workers", "0", "--log_interval", "1", "--labelnum", "3", "--pre_iterations", "2",
        "--hca_weights", "1,0,0,0;0,0,0,1", "--stage_iterations", "2", "--val_interval", "2"]


@pytest.mark.parametrize("final", ["best_stage", "last_stage"])
def test_each_stage_validates_its_start_and_the_final_model_is_selected_over_stages(synthetic_root, tmp_path, final):
    save = tmp_path / "run"
    train_ACDC_SSCD.main(["--root_path", str(synthetic_root), "--save_dir", str(save), *TINY, "--final", final,
                          "--stage_init", "best"])
    history = read_history(save)
    assert [(h["phase"], h["iteration"], h["total_iteration"]) for h in history] == [
        ("pretrain", 2, 2), ("stage_1", 0, 2), ("stage_1", 2, 4), ("stage_2", 0, 4), ("stage_2", 2, 6)]
    by = {(h["phase"], h["iteration"]): h["dice"] for h in history}
    pre = load_checkpoint(save / "pretrain" / "best.pth")["best_dice"]
    s1 = load_checkpoint(save / "stage_1" / "best.pth")["best_dice"]
    assert by[("stage_1", 0)] == pytest.approx(pre, abs=1e-12)  # a stage starts from the previous best
    assert by[("stage_2", 0)] == pytest.approx(s1, abs=1e-12)
    stage_bests = [load_checkpoint(save / f"stage_{k}" / "best.pth")["best_dice"] for k in (1, 2)]
    assert stage_bests[1] >= stage_bests[0] >= pre  # never below the start: the start is a candidate
    assert load_checkpoint(save / "best.pth")["best_dice"] == max(stage_bests)
    off = tmp_path / "off"
    train_ACDC_SSCD.main(["--root_path", str(synthetic_root), "--save_dir", str(off), *TINY, "--final", final,
                          "--validate_stage_start", "off", "--stage_init", "best"])
    assert [h["iteration"] for h in read_history(off)] == [2, 2, 2]
    bests = [load_checkpoint(off / phase / "best.pth")["best_dice"] for phase in ("pretrain", "stage_1", "stage_2")]
    expected = max(bests) if final == "best_stage" else bests[2]
    assert load_checkpoint(off / "best.pth")["best_dice"] == expected


@pytest.mark.parametrize("final", ["best_stage", "last_stage"])
def test_stage_init_last_continues_from_the_last_weights(synthetic_root, tmp_path, final):
    save = tmp_path / "run"
    train_ACDC_SSCD.main(["--root_path", str(synthetic_root), "--save_dir", str(save), *TINY, "--pre_iterations", "4",
                          "--stage_init", "last", "--final", final])
    history = read_history(save)
    by = {(h["phase"], h["iteration"]): h["dice"] for h in history}
    assert list(by) == [("pretrain", 2), ("pretrain", 4), ("stage_1", 0), ("stage_1", 2), ("stage_2", 0),
                        ("stage_2", 2)]
    # each stage starts where the previous phase stopped, not from its best
    assert by[("pretrain", 2)] != by[("pretrain", 4)]  # otherwise best and last could not be told apart
    assert by[("stage_1", 0)] == pytest.approx(by[("pretrain", 4)], abs=1e-12)
    assert by[("stage_2", 0)] == pytest.approx(by[("stage_1", 2)], abs=1e-12)
    log = (save / "log.txt").read_text()
    assert f"init {save / 'pretrain' / 'last.pth'}," in log and f"init {save / 'stage_1' / 'last.pth'}," in log
    final_dice = load_checkpoint(save / "best.pth")["best_dice"]
    if final == "best_stage":  # the best of every validation, pre-training included
        assert final_dice == pytest.approx(max(by.values()), abs=1e-12)
    else:
        assert final_dice == pytest.approx(max(by[("stage_2", 0)], by[("stage_2", 2)]), abs=1e-12)


def test_ablate_stage_runs_each_variant_from_one_checkpoint(synthetic_root, tmp_path, capsys):
    ablate = load_script("experiments/ablate_stage.py")
    pre = tmp_path / "pre"
    train_ACDC_SSCD.main(["--root_path", str(synthetic_root), "--save_dir", str(pre), *TINY])
    status = ablate.main(["--root_path", str(synthetic_root), "--init_checkpoint", str(pre / "pretrain" / "best.pth"),
                          "--out", str(tmp_path / "abl"), "--seeds", "1", "--variants", "published", "cross_rampup 0.5", "one student (BCP stage)",
                          "--labelnum", "3", "--image_size", "32", "--stage_iterations", "2", "--val_interval", "1",
                          "--amp", "off"])
    assert status == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    start = load_checkpoint(pre / "pretrain" / "best.pth")["best_dice"]
    for variant in ("published", "cross_rampup 0.5", "one student (BCP stage)"):
        curve = result["variants"][variant]["curves"][0]
        assert len(curve) == 3 and curve[0] == pytest.approx(start, abs=1e-4)  # both start from the checkpoint
    for folder, rampup, students in (("published_s1", 0.0, 2), ("cross_rampup_0.5_s1", 0.5, 2),
                                     ("one_student_BCP_stage_s1", 0.0, 1)):
        config = yaml.safe_load((tmp_path / "abl" / folder / "config.yaml").read_text())
        assert (config["cross_rampup"], config["students"], config["start_stage"]) == (rampup, students, 1)


def test_mean_curves_average_matching_validations_over_seeds(tmp_path):
    def run(seed, values, phases):
        history = [{"phase": ph, "iteration": it, "total_iteration": tot, "dice": v}
                   for (ph, it, tot), v in zip(phases, values)]
        return {"method": "sscd", "labelnum": 3, "seed": seed, "history": history,
                "config": {"method": "sscd", "pre_iterations": 4, "stage_iterations": [4]}}
    phases = [("pretrain", 2, 2), ("pretrain", 4, 4), ("stage_1", 0, 4), ("stage_1", 4, 8)]
    runs = [run(1, (0.1, 0.3, 0.3, 0.5), phases),
            run(2, (0.3, 0.5, 0.5, 0.9), phases),
            run(3, (0.2, 0.4, 0.4), phases[:3])]  # unfinished: the last point is not averaged
    (x, mean, std, n), = mean_curves(runs).values()
    assert x == [2, 4, 4] and n == 3  # the stage start and the validation before it stay two points
    assert list(mean) == pytest.approx([0.2, 0.4, 0.4]) and list(std) == pytest.approx([0.1, 0.1, 0.1])
    out = plot_mean_curves(runs, tmp_path / "m.png", order=("sscd",))
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot_mean_curves([{**runs[0], "history": []}], tmp_path / "none.png") is None
