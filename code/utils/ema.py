"""Teacher update: exponential moving average of a student (the paper's EMA teacher)."""
import torch


@torch.no_grad()
def ema_update(teacher, student, alpha=0.99):
    """In place: ``t = alpha * t + (1 - alpha) * s`` for every floating parameter and buffer
    (BatchNorm running statistics included); integer buffers (``num_batches_tracked``) are copied.
    ``alpha = 1`` leaves the teacher frozen."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    t_state, s_state = teacher.state_dict(), student.state_dict()
    if t_state.keys() != s_state.keys():
        raise ValueError("teacher and student have different state keys")
    for key, t in t_state.items():
        s = s_state[key]
        if t.is_floating_point():
            t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
        else:
            t.copy_(s)
