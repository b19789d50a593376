"""Tests for training.config: YAML defaults < command line, rejected values, saved config."""
import pytest
import yaml

from training.config import base_parser, parse_args, resolve_save_dir, save_config


def parser():
    return base_parser("test", "ACDC", num_classes=4, labelnum=7)


def write_yaml(tmp_path, values, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def test_builtin_defaults():
    args = parse_args(parser(), [])
    assert (args.labelnum, args.num_classes, args.image_size) == (7, 4, 256)
    assert (args.batch_size, args.labeled_bs, args.max_iterations) == (24, 12, 30000)
    assert args.config is None and args.resume is False


@pytest.mark.parametrize("argv, workers", [
    (["--device", "cpu"], 0),                              # workers would only read ahead, on the step's cores
    (["--device", "cpu", "--aug_device", "loader"], 2),   # they augment: the reference's path
    (["--device", "cuda:1"], 2),                           # the step runs on the GPU
    (["--device", "cpu", "--num_workers", "3"], 3),       # given: kept
    (["--device", "cuda", "--num_workers", "0"], 0),
])
def test_num_workers_default_depends_on_where_the_step_runs(argv, workers):
    assert parse_args(parser(), argv).num_workers == workers


def test_yaml_values_are_defaults(tmp_path):
    cfg = write_yaml(tmp_path, {"image_size": 64, "base_lr": 0.05, "labelnum": 3, "exp": "from_yaml",
                                "resume": True, "aug_device": "loader"})
    args = parse_args(parser(), ["--config", str(cfg)])
    assert args.image_size == 64 and args.base_lr == 0.05 and args.labelnum == 3
    assert args.exp == "from_yaml" and args.resume is True and args.aug_device == "loader"
    assert args.batch_size == 24  # untouched by the file


def test_command_line_overrides_yaml(tmp_path):
    cfg = write_yaml(tmp_path, {"image_size": 64, "base_lr": 0.05, "labelnum": 3})
    for argv in (["--config", str(cfg), "--image_size", "128", "--labelnum", "14"],
                 ["--image_size", "128", "--labelnum", "14", "--config", str(cfg)]):
        args = parse_args(parser(), argv)
        assert args.image_size == 128 and args.labelnum == 14  # flag wins wherever it stands
        assert args.base_lr == 0.05  # the file still supplies what the flags do not


def test_unknown_yaml_key_rejected(tmp_path, capsys):
    cfg = write_yaml(tmp_path, {"image_size": 64, "learning_rate": 0.1})
    with pytest.raises(SystemExit) as err:
        parse_args(parser(), ["--config", str(cfg)])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "unknown keys ['learning_rate']" in message and str(cfg) in message


def test_yaml_must_be_a_mapping(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SystemExit):
        parse_args(parser(), ["--config", str(path)])
    assert "expected a mapping" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(parser(), ["--config", str(tmp_path / "absent.yaml")])
    assert "absent.yaml: file not found" in capsys.readouterr().err


def test_yaml_value_outside_choices_rejected(tmp_path, capsys):
    cfg = write_yaml(tmp_path, {"aug_device": "gpu"})
    with pytest.raises(SystemExit):
        parse_args(parser(), ["--config", str(cfg)])
    assert "--aug_device 'gpu': expected one of ['device', 'loader']" in capsys.readouterr().err
    cfg = write_yaml(tmp_path, {"deterministic": 5})
    with pytest.raises(SystemExit):
        parse_args(parser(), ["--config", str(cfg)])
    assert "--deterministic 5" in capsys.readouterr().err
    # a valid file value passes, and the command line may still correct a bad one
    cfg = write_yaml(tmp_path, {"aug_device": "gpu"})
    assert parse_args(parser(), ["--config", str(cfg), "--aug_device", "loader"]).aug_device == "loader"


@pytest.mark.parametrize("argv", [["--labeled_bs", "25"], ["--batch_size", "4", "--labeled_bs", "5"],
                                  ["--labeled_bs", "0"]])
def test_labeled_bs_must_fit_batch(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(parser(), argv)
    assert "--labeled_bs" in capsys.readouterr().err


def test_labeled_bs_from_yaml_checked(tmp_path, capsys):
    cfg = write_yaml(tmp_path, {"batch_size": 4, "labeled_bs": 6})
    with pytest.raises(SystemExit):
        parse_args(parser(), ["--config", str(cfg)])
    assert "--labeled_bs 6 must be in 1..--batch_size (4)" in capsys.readouterr().err
    args = parse_args(parser(), ["--config", str(cfg), "--labeled_bs", "4"])
    assert (args.batch_size, args.labeled_bs) == (4, 4)


@pytest.mark.parametrize("size", ["100", "40", "8"])
def test_image_size_not_divisible_by_16_rejected(size, capsys):
    with pytest.raises(SystemExit):
        parse_args(parser(), ["--image_size", size])
    assert f"--image_size {size} must be divisible by 16" in capsys.readouterr().err


def test_image_size_from_yaml_checked(tmp_path, capsys):
    cfg = write_yaml(tmp_path, {"image_size": 250})
    with pytest.raises(SystemExit):
        parse_args(parser(), ["--config", str(cfg)])
    assert "--image_size 250" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["max_iterations", "val_interval", "log_interval"])
def test_non_positive_intervals_rejected(flag, capsys):
    with pytest.raises(SystemExit):
        parse_args(parser(), [f"--{flag}", "0"])
    assert f"--{flag} 0: expected a positive number" in capsys.readouterr().err


def test_saved_config_round_trips(tmp_path):
    args = parse_args(parser(), ["--image_size", "32", "--labelnum", "3", "--exp", "x"])
    assert resolve_save_dir(args).as_posix() == "model/x_3_labeled"
    saved = save_config(args, tmp_path / "run")
    assert saved == vars(args)
    # the written config.yaml is itself a valid --config file reproducing the run
    again = parse_args(parser(), ["--config", str(tmp_path / "run" / "config.yaml")])
    assert {k: v for k, v in vars(again).items() if k != "config"} == \
           {k: v for k, v in vars(args).items() if k != "config"}


def test_save_dir_flag_wins():
    args = parse_args(parser(), ["--save_dir", "somewhere/else"])
    assert str(resolve_save_dir(args)) == "somewhere/else"


@pytest.mark.parametrize("method, stages, center_disc, patch", [
    ("sscd", [6000] * 5, 3, 32), ("labeled_only", [6000] * 5, 3, 32),
    ("bcp", [30000], 0, 32), ("abd", [30000], 0, 64)])
def test_paper_config_keeps_each_method_preset(method, stages, center_disc, patch):
    """configs/acdc_sscd.yaml sets what the methods share: the presets' stage structure survives it,
    so every method self-trains the same 30k iterations after the same 10k pre-training."""
    from pathlib import Path

    from training.cli import sscd_parser
    from training.sscd_train import PRESETS, check_sscd_args
    config = Path(__file__).resolve().parents[1] / "configs" / "acdc_sscd.yaml"
    p = sscd_parser("ACDC", "test")
    args = parse_args(p, ["--config", str(config), "--method", method], PRESETS)
    check_sscd_args(p, args)
    assert (args.image_size, args.batch_size, args.labeled_bs, args.pre_iterations) == (256, 24, 12, 10000)
    assert args.stage_iterations == stages and args.total_iterations == 40000
    assert args.center_disc_stages == center_disc and args.patch_size == patch
