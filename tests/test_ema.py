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


def _loop_update(teacher, student, alpha):
    """The per-tensor update the foreach version replaced: ``t.mul_(alpha).add_(s, alpha=1 - alpha)``."""
    with torch.no_grad():
        s_state = student.state_dict()
        for key, t in teacher.state_dict().items():
            if t.is_floating_point():
                t.mul_(alpha).add_(s_state[key], alpha=1.0 - alpha)
            else:
                t.copy_(s_state[key])


def test_foreach_update_is_bit_identical_to_the_per_tensor_loop():
    """On the U-Net (every parameter and BatchNorm buffer), several updates in a row."""
    from networks.unet import build_model
    torch.manual_seed(0)
    teacher, student = build_model(4), build_model(4)
    reference = build_model(4)
    reference.load_state_dict(teacher.state_dict())
    student.train()(torch.randn(2, 1, 32, 32))  # BatchNorm statistics and batch counters move
    for alpha in (0.99, 0.5, 0.999):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema_update(teacher, student, alpha)
        _loop_update(reference, student, alpha)
        for key, value in reference.state_dict().items():
            assert torch.equal(teacher.state_dict()[key], value), key
    assert int(teacher.state_dict()["in_conv.1.num_batches_tracked"]) == 1  # integer buffers copied
