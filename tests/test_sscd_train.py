"""SSCD trainer: the curriculum hand-over, every flag's effect, presets, resume, and an end-to-end
run on the real ACDC data (synthetic data when SSCD_SHARED_DATA is unset)."""
import json
import re

import pytest
import torch
import yaml

import train_ACDC_SSCD
import test_ACDC
from common.checkpoint import load_checkpoint
from training import sscd_train
from training.config import base_parser, parse_args

TINY = ["--image_size", "32", "--batch_size", "4", "--labeled_bs", "2", "--patch_size", "8", "--top_num", "4",
        "--device", "cpu", "--num_workers", "0", "--log_interval", "1", "--labelnum", "3"]


def train(root, save_dir, *flags):
    return train_ACDC_SSCD.main(["--root_path", str(root), "--save_dir", str(save_dir), *TINY, *flags])


@pytest.fixture(scope="module")
def pretrained(synthetic_root, tmp_path_factory):
    """A tiny pre-trained checkpoint every stage test starts from."""
    out = tmp_path_factory.mktemp("pre")
    train(synthetic_root, out, "--pre_iterations", "3", "--hca_weights", "0,0,0,1", "--stage_iterations", "1",
          "--val_interval", "3")
    return out / "pretrain" / "best.pth"


def stage_weights(root, tmp_path, init, *flags):
    """All weights (students and teacher) after two iterations of one curriculum stage."""
    out = tmp_path / "_".join(f.strip("-") for f in flags) if flags else tmp_path / "base"
    train(root, out, "--start_stage", "1", "--init_checkpoint", str(init), "--hca_weights", "1,0,0,0",
          "--stage_iterations", "2", "--val_interval", "2", *flags)
    state = load_checkpoint(out / "stage_1" / "last.pth")
    tensors = [state["model"]] + [state["models"][k] for k in sorted(state["models"])]
    return torch.cat([t.float().flatten() for sd in tensors for t in sd.values()])


STAGE_FLAGS = [
    ("--u_weight", "1.0"), ("--ds_weight", "0"), ("--hca_weights", "0,0,0,1"), ("--rank_by", "contrast"), ("--patch_size", "16"), ("--cgsr_kl_prob", "1.0"), ("--teacher", "frozen"),
    ("--ema_decay", "0.5"), ("--center_disc_stages", "0"), ("--displacement", "abd"), ("--displacement", "none"),
    ("--base_lr", "0.05"), ("--seed", "7"), ("--mix_dice", "region"),
]


def test_every_stage_flag_changes_the_trained_weights(synthetic_root, tmp_path, pretrained):
    base = stage_weights(synthetic_root, tmp_path, pretrained)
    again = stage_weights(synthetic_root, tmp_path / "again", pretrained)
    assert torch.equal(base, again), "the baseline must be deterministic for this test to mean anything"
    for flag, value in STAGE_FLAGS:
        changed = stage_weights(synthetic_root, tmp_path, pretrained, flag, value)
        assert not torch.equal(base, changed), f"{flag} {value} had no effect"


def test_hca_combine_changes_the_weights_when_heads_are_mixed(synthetic_root, tmp_path, pretrained):
    mixed = ("--hca_weights", ".5,.5,0,0")
    paper = stage_weights(synthetic_root, tmp_path, pretrained, *mixed)
    again = stage_weights(synthetic_root, tmp_path / "again", pretrained, *mixed)
    code = stage_weights(synthetic_root, tmp_path, pretrained, *mixed, "--hca_combine", "logits")
    assert torch.equal(paper, again), "the same flags twice must train the same weights"
    assert not torch.equal(paper, code)


def test_top_num_changes_the_kl_choice(synthetic_root, tmp_path, pretrained):
    one = stage_weights(synthetic_root, tmp_path, pretrained, "--cgsr_kl_prob", "1", "--top_num", "1")
    again = stage_weights(synthetic_root, tmp_path / "again", pretrained, "--cgsr_kl_prob", "1", "--top_num", "1")
    many = stage_weights(synthetic_root, tmp_path, pretrained, "--cgsr_kl_prob", "1", "--top_num", "16")
    assert torch.equal(one, again), "the same flags twice must train the same weights"
    assert not torch.equal(one, many)


def test_one_student_bcp_stage_has_no_second_model(synthetic_root, tmp_path, pretrained):
    out = tmp_path / "bcp"
    train(synthetic_root, out, "--start_stage", "1", "--init_checkpoint", str(pretrained), "--students", "1",
          "--displacement", "none", "--hca_weights", "0,0,0,1", "--stage_iterations", "2", "--val_interval", "2")
    state = load_checkpoint(out / "stage_1" / "last.pth")
    assert sorted(state["models"]) == ["teacher"] and sorted(state["optimizers"]) == ["model"]


def pretrain_weights(root, tmp_path, *flags):
    out = tmp_path / ("pre_" + "_".join(f.strip("-") for f in flags))
    train(root, out, "--pre_iterations", "3", "--hca_weights", "0,0,0,1", "--stage_iterations", "1",
          "--val_interval", "3", "--sda_start", "0", *flags)
    sd = load_checkpoint(out / "pretrain" / "last.pth")["model"]
    return torch.cat([t.float().flatten() for t in sd.values()])


def test_every_pretraining_flag_changes_the_weights(synthetic_root, tmp_path):
    base = pretrain_weights(synthetic_root, tmp_path)
    assert torch.equal(base, pretrain_weights(synthetic_root, tmp_path / "again")), "must be deterministic"
    for flags in (("--sda", "off"), ("--sda_alpha", "0.5"), ("--sda_start", "2"), ("--mix_dice", "region")):
        assert not torch.equal(base, pretrain_weights(synthetic_root, tmp_path, *flags)), f"{flags} had no effect"


def test_curriculum_stage_k_uses_kth_weights_and_previous_best(synthetic_root, tmp_path, monkeypatch):
    calls = []
    original = sscd_train.self_train_stage

    def spy(run, stage, weights, init_path, save_dir, iterations, data, volumes):
        calls.append((stage, tuple(weights), str(init_path), iterations))
        return original(run, stage, weights, init_path, save_dir, iterations, data, volumes)

    monkeypatch.setattr(sscd_train, "self_train_stage", spy)
    schedule = "1,0,0,0;0,1,0,0;0,0,0,1"
    final = train(synthetic_root, tmp_path, "--pre_iterations", "2", "--max_iterations", "7",
                  "--hca_weights", schedule, "--val_interval", "1", "--stage_init", "best")
    assert [c[1] for c in calls] == [(1.0, 0, 0, 0), (0, 1.0, 0, 0), (0, 0, 0, 1.0)]
    assert [c[2] for c in calls] == [str(tmp_path / "pretrain" / "best.pth"), str(tmp_path / "stage_1" / "best.pth"),
                                     str(tmp_path / "stage_2" / "best.pth")]
    assert [c[3] for c in calls] == [2, 2, 3]  # 7 iterations split over 3 stages
    # the stage's first weights are the previous stage's best: its teacher is frozen at them
    frozen = tmp_path / "frozen"
    train(synthetic_root, frozen, "--start_stage", "3", "--init_checkpoint", str(tmp_path / "stage_2" / "best.pth"),
          "--hca_weights", schedule, "--stage_iterations", "1", "--val_interval", "1", "--teacher", "frozen")
    prev = load_checkpoint(tmp_path / "stage_2" / "best.pth")["model"]
    teacher = load_checkpoint(frozen / "stage_3" / "last.pth")["models"]["teacher"]
    assert all(torch.equal(prev[k], teacher[k]) for k in prev)
    state = load_checkpoint(final)
    assert state["config"]["hca_stage_weights"] == [0.0, 0.0, 0.0, 1.0]
    for k in (1, 2, 3):
        assert load_checkpoint(tmp_path / f"stage_{k}" / "best.pth")["config"]["stage"] == k


def test_resume_skips_finished_stages(synthetic_root, tmp_path):
    flags = ["--pre_iterations", "2", "--stage_iterations", "2", "--hca_weights", "1,0,0,0;0,0,0,1",
             "--val_interval", "2"]
    train(synthetic_root, tmp_path, *flags)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.pth")}
    train(synthetic_root, tmp_path, *flags, "--resume")
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.pth")}
    changed = [str(p.relative_to(tmp_path)) for p in before if before[p] != after[p]]
    assert changed == ["best.pth"]  # only the final copy is rewritten


def test_presets_set_flags_and_stay_overridable(synthetic_root, tmp_path):
    parser = sscd_train.add_sscd_args(base_parser("t", "ACDC", 4, 7))
    args = parse_args(parser, ["--method", "bcp"], sscd_train.PRESETS)
    assert (args.students, args.displacement, args.sda, args.hca_weights) == (1, "none", "off", "0,0,0,1")
    assert args.stage_init == "best"  # the peers' self-training starts from the pre-training's best
    args = parse_args(parser, ["--method", "abd", "--patch_size", "16"], sscd_train.PRESETS)
    assert (args.displacement, args.patch_size, args.students, args.stage_init) == ("abd", 16, 2, "best")
    args = parse_args(parser, ["--method", "sscd"], sscd_train.PRESETS)  # the same parser: no preset left on it
    assert (args.stage_init, args.students, args.displacement, args.sda) == ("last", 2, "cgsr", "on")
    sscd_train.check_sscd_args(parser, args)
    assert args.cross_rampup == 0.5
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"method": "bcp", "ds_weight": 0.25}))
    args = parse_args(parser, ["--config", str(config)], sscd_train.PRESETS)
    assert (args.method, args.students, args.ds_weight) == ("bcp", 1, 0.25)  # YAML beats the preset
    assert parse_args(parser, [], sscd_train.PRESETS).ds_weight == 0.5  # nor a YAML value


@pytest.mark.parametrize("method, size, patch", [("sscd", 256, 32), ("sscd", 64, 8), ("bcp", 128, 16),
                                                 ("abd", 256, 64), ("abd", 64, 16), ("abd", 32, 8)])
def test_preset_region_sizes_follow_the_image_size(method, size, patch):
    parser = sscd_train.add_sscd_args(base_parser("t", "ACDC", 4, 7))
    args = parse_args(parser, ["--method", method, "--image_size", str(size)], sscd_train.PRESETS)
    sscd_train.check_sscd_args(parser, args)  # "--method abd --image_size 64" used to stop on --top_num
    assert args.patch_size == patch and (size // patch) ** 2 >= args.top_num
    args = parse_args(parser, ["--method", method, "--image_size", str(size), "--patch_size", "4"],
                      sscd_train.PRESETS)
    sscd_train.check_sscd_args(parser, args)
    assert args.patch_size == 4  # given on the command line: kept


def test_bad_sscd_flags_are_refused(synthetic_root, tmp_path, capsys):
    for flags, word in ((["--batch_size", "6"], "--batch_size"), (["--patch_size", "12"], "--patch_size"),
                        (["--students", "1"], "--displacement"), (["--start_stage", "9"], "--start_stage"),
                        (["--hca_weights", "1,0,0"], "--hca_weights")):
        with pytest.raises(SystemExit):
            train(synthetic_root, tmp_path, *flags)
        assert word in capsys.readouterr().err


def test_end_to_end_on_acdc_every_stage_then_test_script(acdc_root, tmp_path):
    final = train(acdc_root, tmp_path, "--image_size", "64", "--patch_size", "16", "--labelnum", "1" if
                  "synthetic" not in str(acdc_root) else "3", "--pre_iterations", "4", "--stage_iterations", "2",
                  "--val_interval", "2")
    assert final == tmp_path / "best.pth"
    for stage in ["pretrain"] + [f"stage_{k}" for k in range(1, 6)]:
        folder = tmp_path / stage
        assert (folder / "best.pth").is_file() and (folder / "last.pth").is_file(), stage
        assert list((folder / "tb").glob("events.out.tfevents.*")), stage
        assert load_checkpoint(folder / "last.pth")["finished"]
    log = (tmp_path / "log.txt").read_text()
    assert log.count("[stage 5]") == 1
    # the last line: the final model's path and its val metrics (the score it was selected with)
    m = re.search(r"final model: (\S+) \(val Dice ([\d.]+): class 1 [\d.]+, class 2 [\d.]+, class 3 [\d.]+\)", log)
    assert m and m.group(1) == str(final)
    assert float(m.group(2)) == pytest.approx(load_checkpoint(final)["best_dice"], abs=1e-4)
    summary = test_ACDC.main(["--checkpoint", str(final), "--split", "val", "--out", str(tmp_path / "eval"),
                         "--workers", "0", "--no_predictions", "--device", "cpu"])
    saved = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert saved["split"] == "val" and saved["cases"] == len((acdc_root / "val.list").read_text().split())
    assert len(saved["dice"]["per_class"]) == 3 and 0 <= summary["dice"]["mean"] <= 1


def test_frozen_bn_statistics_keeps_running_stats_but_normalises_by_batch():
    bn = torch.nn.BatchNorm2d(1).train()
    x = torch.randn(4, 1, 3, 3) * 5 + 3
    with sscd_train.frozen_bn_statistics(bn):
        y = bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(1)) and torch.equal(bn.running_var, torch.ones(1))
    assert abs(float(y.detach().mean())) < 1e-5  # batch statistics were used
    assert bn.momentum == 0.1
    bn(x)
    assert not torch.equal(bn.running_mean, torch.zeros(1))


def _all_weights(path):
    state = load_checkpoint(path)
    return torch.cat([t.float().flatten() for sd in [state["model"], *state["models"].values()] for t in sd.values()])


def test_interrupted_stage_resumes_exactly(synthetic_root, tmp_path, pretrained, monkeypatch):
    """Killed after the iteration-2 checkpoint and resumed: the batches, the boxes and CGSR draws
    continue where they stopped, so every weight equals the uninterrupted run's."""
    flags = ("--start_stage", "1", "--init_checkpoint", str(pretrained), "--hca_weights", "1,0,0,0",
             "--stage_iterations", "4", "--val_interval", "2")
    train(synthetic_root, tmp_path / "full", *flags)
    original = sscd_train.stage_step

    def crashing(*args, **kwargs):
        step, *rest = original(*args, **kwargs)

        def step_or_die(it):
            if it == 3:
                raise KeyboardInterrupt  # the process dies here
            return step(it)
        return (step_or_die, *rest)

    monkeypatch.setattr(sscd_train, "stage_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(synthetic_root, tmp_path / "cut", *flags)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut" / "stage_1" / "last.pth")["iteration"] == 2
    torch.manual_seed(123)  # a fresh process: different RNG until the checkpoint restores it
    train(synthetic_root, tmp_path / "cut", *flags, "--resume")
    assert torch.equal(_all_weights(tmp_path / "cut" / "stage_1" / "last.pth"),
                       _all_weights(tmp_path / "full" / "stage_1" / "last.pth"))


def test_stage_lr_is_the_curriculum_stages_rate_and_labeled_only_switches_after_pre_training(
        synthetic_root, tmp_path, monkeypatch):
    """--stage_lr: the SGD rate of every student in a curriculum stage, not of the pre-training
    (--base_lr); labeled-only gets the same rate per iteration, from --pre_iterations + 1 on."""
    from test_speed_paths import make_run
    from networks.unet import build_model
    init = build_model(4).state_dict()
    for flags, stage_rate in (([], 0.02), (["--stage_lr", "0.003"], 0.003)):
        run = make_run(synthetic_root, tmp_path / str(stage_rate), "--base_lr", "0.02", *flags)
        data = run.train_data()
        _, _, opts, _ = sscd_train.stage_step(run, 1, (1.0, 0.0, 0.0, 0.0), init, "init", data)
        assert sorted(opts) == ["model", "model_2"]
        assert all(g["lr"] == stage_rate for o in opts.values() for g in o.param_groups)
        _, _, pre_opts = sscd_train.pretrain_step(run, data)
        assert [g["lr"] for g in pre_opts["model"].param_groups] == [0.02]
        run.close()
    rates = []  # the rate of each labeled-only optimizer step
    plain_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: (rates.append(self.param_groups[0]["lr"]),
                                                                        plain_step(self, *a, **k))[1])
    train(synthetic_root, tmp_path / "lo", "--method", "labeled_only", "--pre_iterations", "2", "--hca_weights",
          "0,0,0,1", "--stage_iterations", "2", "--val_interval", "4", "--base_lr", "0.02", "--stage_lr", "0.003")
    assert rates == [0.02, 0.02, 0.003, 0.003]


@pytest.mark.parametrize("value", ["0", "-0.01", "nan", "inf"])
def test_bad_stage_lr_is_refused(synthetic_root, tmp_path, capsys, value):
    with pytest.raises(SystemExit):
        train(synthetic_root, tmp_path, "--stage_lr", value)
    assert "--stage_lr" in capsys.readouterr().err
