"""experiments/stage_networks.py: the three networks of each stage's last.pth scored as the trainer validates."""
import json

import pytest
import torch
import yaml

from common.checkpoint import FORMAT, save_checkpoint
from conftest import load_script
from dataloaders.dataset import load_volumes
from evaluation.inference import Validator
from networks.unet import build_model

networks = load_script("experiments/stage_networks.py")
SIZE = 32


def weights(seed):
    torch.manual_seed(seed)
    return build_model(4).state_dict()


@pytest.fixture()
def run(synthetic_root, tmp_path):
    folder = tmp_path / "ACDC_sscd_7_s1"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(
        {"num_classes": 4, "image_size": SIZE, "amp": "off", "channels_last": "off", "root_path": str(synthetic_root)}))
    for stage, (s1, s2) in {1: (1, 2), 2: (3, 4)}.items():
        (folder / f"stage_{stage}").mkdir()
        # the teacher is a copy of student 1: its score must equal student 1's exactly
        save_checkpoint({"format": FORMAT, "model": weights(s1),
                         "models": {"model_2": weights(s2), "teacher": weights(s1)}},
                        folder / f"stage_{stage}" / "last.pth")
    (folder / "stage_3").mkdir()  # an unfinished stage without last.pth is not scored
    return folder


def direct_score(root, seed):
    model = build_model(4).eval()
    model.load_state_dict(weights(seed))
    return Validator(load_volumes(root, "val", 4), 4, SIZE, "cpu")(model)[0]


def test_each_network_is_scored_like_the_trainer(run, synthetic_root, capsys):
    assert networks.main(["--runs", str(run)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stages = out["runs"][str(run)]
    assert list(stages) == ["stage_1", "stage_2"]
    assert stages["stage_1"]["student_1"] == pytest.approx(direct_score(synthetic_root, 1), abs=1e-12)
    assert stages["stage_2"]["student_2"] == pytest.approx(direct_score(synthetic_root, 4), abs=1e-12)
    assert stages["stage_2"]["teacher"] == stages["stage_2"]["student_1"]
    teacher_gap, positive, count = out["gaps"]["teacher"]
    assert (teacher_gap, positive, count) == (0.0, 0, 2)
    expected = 100 * sum(stages[s]["student_2"] - stages[s]["student_1"] for s in stages) / 2
    assert out["gaps"]["student_2"][0] == pytest.approx(expected)


def test_one_student_run_and_bad_folders(run, tmp_path, capsys):
    state = {"format": FORMAT, "model": weights(1), "models": {"teacher": weights(5)}}
    save_checkpoint(state, run / "stage_1" / "last.pth")
    assert networks.stage_weights(state).keys() == {"student_1", "teacher"}
    assert networks.main(["--runs", str(run)]) == 0
    out = capsys.readouterr().out
    assert "—" in out  # no student 2 at stage 1
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["runs"][str(run)]["stage_1"]) == {"student_1", "teacher"}
    assert result["gaps"]["student_2"][2] == 1 and result["gaps"]["teacher"][2] == 2  # stage ends compared
    assert set(result["means"]["stage_1"]) == {"student_1", "teacher"}
    with pytest.raises(SystemExit):
        networks.main(["--runs", str(tmp_path / "nowhere")])
    assert "no config.yaml" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text(yaml.safe_dump({"num_classes": 4, "image_size": SIZE}))
    with pytest.raises(SystemExit):
        networks.main(["--runs", str(empty)])
    assert "no stage_<k>/last.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        networks.main(["--runs", str(run), "--threads", "0"])
    assert "--threads 0: expected 1 or more" in capsys.readouterr().err
