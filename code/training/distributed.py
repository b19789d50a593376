"""Multi-process training with DistributedDataParallel, and the single-process case as the same API.

``torchrun --nproc_per_node N code/train_ACDC_SSCD.py ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; ``setup`` then joins the process group (nccl on CUDA, gloo on the CPU) and
binds each rank to its GPU. Without those variables (a plain ``python`` run) nothing is
initialised and every helper here is a no-op, so the trainers have one code path.

How a training step uses it (see ``Parallel``): the whole step's computation of all students,
including the second forward on the CGSR images, runs inside ONE forward call of a single DDP
module that holds every student, so DDP sees exactly one forward per backward, whatever the
step does between the network calls. Buffers (BatchNorm running statistics) are not broadcast
by DDP before each forward (``forward_sync_buffers=False``, ``broadcast_buffers=False`` before torch
2.13: ``buffer_sync_kwargs``); instead ``sync_buffers`` averages them over the ranks after each
optimizer step (not needed with --sync_bn, whose running statistics are those of the whole
multi-rank batch on every rank), which keeps every rank's students, and hence the EMA teacher
updated from them, identical (the parameters are identical because DDP averages the gradients and
every rank applies the same optimizer step).

Errors on rank 0 alone (validation, checkpoint writing): ``raise_if_main_failed`` hands rank 0's
one-line error to every rank, so none waits in a collective until the process group's timeout.
"""
import inspect
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def world_size():
    """Number of training processes (1 without a launcher)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def local_world_size():
    """Training processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.is_initialized() else 1


def rank():
    """This process's rank (0 without a launcher)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    """True on the process that validates, logs and writes checkpoints."""
    return rank() == 0


def setup(device):
    """Join the process group when launched by torchrun; returns this rank's torch.device.

    ``device`` is the ``--device`` flag: 'cuda' becomes 'cuda:<LOCAL_RANK>' under a launcher.
    """
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return device


class MainRankFailed(RuntimeError):
    """Rank 0 failed (its one-line error is the message); raised on the other ranks."""
    user_error = True  # the scripts end with its message (common.errors.run_cli)


def raise_if_main_failed(error):
    """Collective over the ranks, after work that rank 0 does alone: rank 0 passes the exception it
    caught (or None). Every rank then learns it: rank 0 re-raises it, the others raise
    ``MainRankFailed`` with its first line. A no-op in a single process (the error is re-raised)."""
    if world_size() > 1:
        message = [None]
        if is_main() and error is not None:
            lines = str(error).strip().splitlines()
            message = [f"rank 0 failed: {type(error).__name__}: {lines[0] if lines else ''}"]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and not is_main():
            raise MainRankFailed(message[0])
    if error is not None:
        raise error


def is_peer_failure(err):
    """Whether ``err`` is a collective's failure because another rank is gone (its process ended:
    the connection closed) rather than an error of this rank's own; rank 0's own failures reach the
    others as ``MainRankFailed``, which is not one."""
    if isinstance(err, MainRankFailed):
        return False
    text = str(err)
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                      "NCCL communicator was aborted", "gloo")))


def gather_to_main(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None on the others (collective); ``[obj]``
    in a single process."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def teardown():
    """Leave the process group (no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce(tensor, op="sum"):
    """In place over the ranks: 'sum' or 'min' (no-op in a single process); returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
    return tensor


@torch.no_grad()
def sync_buffers(modules):
    """Average the floating-point buffers (BatchNorm running mean/var) of ``modules`` over the
    ranks, in one flat all-reduce (no-op in a single process). For the running mean this equals
    the statistic of the whole multi-rank batch; integer buffers are equal on every rank already."""
    if world_size() == 1:
        return
    buffers = [b for m in modules for b in m.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.flatten() for b in buffers])
    dist.all_reduce(flat)
    flat /= world_size()
    for b, value in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(value.view_as(b))


def buffer_sync_kwargs(ddp_class=None):
    """The keyword that stops ``ddp_class`` from broadcasting rank 0's buffers before each forward:
    ``forward_sync_buffers=False`` where the constructor has it (torch 2.13 and later),
    ``broadcast_buffers=False`` on older releases (a TypeError there otherwise). ``ddp_class``:
    default the ``DistributedDataParallel`` that ``Parallel`` builds."""
    params = inspect.signature((ddp_class or DistributedDataParallel).__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class _Holder(torch.nn.Module):
    """The students as one module; ``forward(fn)`` just runs ``fn()`` (which calls them)."""

    def __init__(self, modules):
        super().__init__()
        self.students = torch.nn.ModuleList(modules)

    def forward(self, fn):
        return fn()


class Parallel:
    """Run a training step's forward computation so that gradients are averaged over the ranks.

    ``Parallel(modules, device, find_unused)(fn)`` returns ``fn()``; in a multi-process run it is
    called inside one forward of ``DistributedDataParallel`` over all ``modules``, so the
    backward of the returned loss all-reduces every parameter's gradient once, however many
    times ``fn`` calls each module. ``find_unused`` must be True when some parameters get no
    gradient (e.g. the deep-supervision heads with ``--ds_weight 0`` or in the supervised
    baseline): DDP then marks them ready instead of waiting for them, and leaves their ``.grad``
    as None, as in a single process.
    """

    def __init__(self, modules, device, find_unused):
        self.ddp = None
        if world_size() > 1:
            self.ddp = DistributedDataParallel(
                _Holder(modules), device_ids=[device] if device.type == "cuda" else None,
                find_unused_parameters=find_unused, **buffer_sync_kwargs(DistributedDataParallel))

    def __call__(self, fn):
        return fn() if self.ddp is None else self.ddp(fn)


def convert_sync_bn(model):
    """The model with every BatchNorm replaced by SyncBatchNorm when several ranks train
    (batch statistics over the whole multi-rank batch); unchanged in a single process."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if world_size() > 1 else model
