"""Teacher update: exponential moving average of a student (the paper's EMA teacher)."""
import torch


@torch.no_grad()
def ema_update(teacher, student, alpha=0.99):
    """In place: ``t = alpha * t + (1 - alpha) * s`` for every floating parameter and buffer
    (BatchNorm running statistics included); integer buffers (``num_batches_tracked``) are copied.
    ``alpha = 1`` leaves the teacher frozen.

    The ~300 tensors of the U-Net are updated with ``torch._foreach_*`` (a few multi-tensor
    kernels on CUDA instead of two launches per tensor; the same ``mul_`` then ``add_(alpha=)``
    arithmetic as a loop over the tensors, bit for bit: tests/test_ema.py)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    floats, integers = _paired_tensors(teacher, student)
    if floats[0]:
        torch._foreach_mul_(floats[0], alpha)
        torch._foreach_add_(floats[0], floats[1], alpha=1.0 - alpha)
    if integers[0]:
        torch._foreach_copy_(integers[0], integers[1])


def _paired_tensors(teacher, student):
    """``((teacher floats, student floats), (teacher integers, student integers))``: the tensors of
    the two state dicts, key by key (ValueError when their keys differ)."""
    t_state, s_state = teacher.state_dict(), student.state_dict()
    if t_state.keys() != s_state.keys():
        raise ValueError("teacher and student have different state keys")
    floats, integers = ([], []), ([], [])
    for key, t in t_state.items():
        pair = floats if t.is_floating_point() else integers
        pair[0].append(t)
        pair[1].append(s_state[key].detach())
    return floats, integers
