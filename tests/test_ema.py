import pytest
import torch

from utils.ema import ema_update


def make():
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))


def test_ema_update_params_and_buffers():
    teacher, student = make(), make()
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
    student[1].running_mean.fill_(2.0)
    student[1].num_batches_tracked.fill_(7)
    ema_update(teacher, student, alpha=0.75)
    for p in teacher.parameters():
        assert torch.allclose(p, torch.full_like(p, 1.5))
    assert torch.allclose(teacher[1].running_mean, torch.full((2,), 0.5))
    assert int(teacher[1].num_batches_tracked) == 7


def test_ema_alpha_one_freezes_and_bad_alpha_raises():
    teacher, student = make(), make()
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, alpha=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    with pytest.raises(ValueError):
        ema_update(teacher, student, alpha=1.5)
