"""The CUDA suite (marker ``cuda``; skipped without a GPU, as in CI): what only a GPU can show.
bench/device_check.py runs it first (``python3 -m pytest -q -m cuda tests/test_cuda.py``, well
under 2 minutes on an H100 at these sizes). docs/gpu.md lists what it covers; none of it had run
on a GPU when it was written (no device was lent to that session).
"""
import socket

import pytest
import torch

from common.checkpoint import save_checkpoint
from networks.unet import build_model
from training import device as devmod
from training import distributed
from training.config import base_parser, parse_args
from training.engine import GeneratorState, ScalerState, _state, restore
from training.run import Forward, Run
from training.sscd_train import PRESETS, add_sscd_args, check_sscd_args, pretrain_step, stage_step
from utils.sscd import largest_component_per_class, largest_component_per_class_device, pseudo_labels

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
SIZE, CLASSES = 64, 4


def _step(model, opt, forward, x, y, scaler=None):
    """One SGD step of cross entropy through ``forward``; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(forward(x), y)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return loss.detach()


def _batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, SIZE, SIZE, generator=g).to(CUDA),
            torch.randint(0, CLASSES, (n, SIZE, SIZE), generator=g).to(CUDA))


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, fused=True)


def test_fused_sgd_step_and_resume_with_another_memory_format(tmp_path):
    """A fused-SGD run resumed with --channels_last changed continues like the uninterrupted one."""
    torch.manual_seed(0)
    model = build_model(CLASSES).to(CUDA).eval()  # no dropout: both runs' steps see the same network
    opt = _sgd(model)
    x, y = _batch()
    _step(model, opt, model, x, y)
    save_checkpoint(_state({"model": model}, {"model": opt}, 1, (0.0, 1), {}, False), tmp_path / "last.pth")
    again = build_model(CLASSES).to(CUDA).to(memory_format=torch.channels_last).eval()
    opt2 = _sgd(again)
    restore(tmp_path / "last.pth", {"model": again}, {"model": opt2})
    for p in again.parameters():
        if p in opt2.state:
            assert opt2.state[p]["momentum_buffer"].stride() == p.stride()
    x2, y2 = _batch(1)
    _step(model, opt, model, x2, y2)
    _step(again, opt2, again, x2.contiguous(memory_format=torch.channels_last), y2)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), name


def test_cuda_generator_save_restore_and_a_cpu_state():
    gen = torch.Generator(device=CUDA).manual_seed(3)
    torch.rand(5, device=CUDA, generator=gen)
    saved = GeneratorState(gen).state_dict()
    assert saved["state"].numel() == 16
    expected = torch.rand(5, device=CUDA, generator=gen)
    other = GeneratorState(torch.Generator(device=CUDA).manual_seed(9))
    assert other.load_state_dict(saved) is None
    assert torch.equal(torch.rand(5, device=CUDA, generator=other.generator), expected)
    from_cpu = GeneratorState(torch.Generator(device=CUDA))
    note = from_cpu.load_state_dict(GeneratorState(torch.Generator().manual_seed(1)).state_dict())
    assert "5056-byte" in note and "16 bytes" in note


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_steps_and_the_scaler_state(amp):
    torch.manual_seed(0)
    model = build_model(CLASSES).to(CUDA).to(memory_format=torch.channels_last)
    opt = _sgd(model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    forward = Forward(model, dtype, channels_last=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    losses = [_step(model, opt, forward, *_batch(k), scaler=scaler) for k in range(3)]
    assert all(torch.isfinite(v) for v in losses)
    assert forward(_batch()[0]).dtype == torch.float32  # the losses are computed in float32
    saved = ScalerState(scaler).state_dict()
    fresh = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    ScalerState(fresh).load_state_dict(saved)
    if amp == "fp16":
        assert fresh.get_scale() == scaler.get_scale() and fresh._get_growth_tracker() == 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_nccl_ddp_step(monkeypatch):
    """DDP with this torch's buffer keyword (``buffer_sync_kwargs``) on NCCL, one rank."""
    import torch.distributed as dist
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    try:
        torch.manual_seed(0)
        model = build_model(CLASSES).to(CUDA)
        reference = build_model(CLASSES).to(CUDA)
        reference.load_state_dict(model.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(
            distributed._Holder([model]), device_ids=[CUDA], find_unused_parameters=True,
            **distributed.buffer_sync_kwargs())
        x, y = _batch()
        opt, opt_ref = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)
        loss = ddp(lambda: torch.nn.functional.cross_entropy(model(x), y))
        loss.backward()
        opt.step()
        _step(reference, opt_ref, reference, x, y)
        for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-5), name
    finally:
        dist.destroy_process_group()


def test_foreach_ema_matches_the_per_tensor_loop_on_cuda():
    """The multi-tensor kernels of ``ema_update`` against ``t.mul_(a).add_(s, alpha=1 - a)`` per
    tensor, bit for bit (as on the CPU: tests/test_ema.py)."""
    from utils.ema import ema_update
    torch.manual_seed(0)
    teacher, student = build_model(CLASSES).to(CUDA), build_model(CLASSES).to(CUDA)
    reference = build_model(CLASSES).to(CUDA)
    reference.load_state_dict(teacher.state_dict())
    ema_update(teacher, student, 0.99)
    with torch.no_grad():
        s_state = student.state_dict()
        for key, t in reference.state_dict().items():
            if t.is_floating_point():
                t.mul_(0.99).add_(s_state[key], alpha=1.0 - 0.99)
            else:
                t.copy_(s_state[key])
    for key, value in reference.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), key


def test_compile_matches_eager():
    torch.manual_seed(0)
    model = build_model(CLASSES).to(CUDA).eval()
    compiled = Forward(model, torch.bfloat16, channels_last=False, compile=True)
    eager = Forward(model, torch.bfloat16, channels_last=False, compile=False)
    x = _batch()[0]
    with torch.no_grad():
        out_c, out_e = compiled(x), eager(x)
    assert compiled.compiled is not None  # no fallback to eager
    assert torch.allclose(out_c, out_e, atol=0.05, rtol=0.05)


def test_device_lcc_equals_scipy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, CLASSES, SIZE, SIZE, generator=g)
    logits = torch.nn.functional.avg_pool2d(logits, 5, 1, 2)  # blobs of several components per class
    labels = logits.argmax(1)
    device = largest_component_per_class_device(labels.to(CUDA), CLASSES)
    assert torch.equal(device.cpu(), largest_component_per_class(labels, CLASSES))
    assert torch.equal(pseudo_labels(logits.to(CUDA), CLASSES, lcc_impl="device").cpu(),
                       pseudo_labels(logits, CLASSES, lcc_impl="scipy"))


def _run(root, tmp_path, *extra):
    parser = add_sscd_args(base_parser("cuda test", "ACDC", num_classes=CLASSES, labelnum=1))
    args = parse_args(parser, ["--root_path", str(root), "--save_dir", str(tmp_path / "run"), "--image_size",
                               str(SIZE), "--batch_size", "4", "--labeled_bs", "2", "--labelnum", "3",
                               "--device", "cuda", "--patch_size", "16", "--num_workers", "0", *extra], PRESETS)
    check_sscd_args(parser, args)
    return Run(args, "ACDC")


def test_aug_device_batches_on_the_gpu(synthetic_root, tmp_path):
    run = _run(synthetic_root, tmp_path, "--aug_device", "device")
    try:
        data = run.train_data()
        batches = [next(run.stream(data, 2, 2, strong=True, seed=5)) for _ in range(2)]
        for key, value in batches[0].items():
            tensors = value if isinstance(value, (list, tuple)) else [value]
            assert all(t.device.type == "cuda" for t in tensors if isinstance(t, torch.Tensor)), key
        assert torch.equal(batches[0]["image"], batches[1]["image"])  # the seed decides the draws
    finally:
        run.close()


def test_no_host_sync_in_training_steps_but_the_documented_one(synthetic_root, tmp_path, monkeypatch):
    """Pre-training and self-training steps under ``set_sync_debug_mode('error')``: the only host
    read allowed is the device LCC's convergence check (utils.sscd, documented there)."""
    import utils.sscd as sscd
    run = _run(synthetic_root, tmp_path, "--lcc", "device", "--amp", "fp16")
    real_lcc = sscd.largest_component_per_class_device

    def lcc_allowed_to_sync(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real_lcc(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")
    monkeypatch.setattr(sscd, "largest_component_per_class_device", lcc_allowed_to_sync)
    try:
        data = run.train_data()
        pre, models, _ = pretrain_step(run, data)
        weights = (1.0, 0.0, 0.0, 0.0)
        stage = stage_step(run, 1, weights, models["model"].state_dict(), "test", data)[0]
        for step, it in ((pre, 1), (pre, run.args.sda_start + 1), (stage, 1)):
            step(it)  # warm-up: allocations, cuDNN autotuning
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step(it + 1)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        run.close()
        devmod.apply_backend_flags(devmod.backend_flags(0, "bf16", "cuda"))


def test_dropout_on_cuda_is_torch_fused_dropout_seeded_by_the_cuda_generator():
    """networks/dropout.py on CUDA: torch's dropout (masks from the CUDA generator), x * mask / keep,
    the same masks again after re-seeding, and the CPU generator left untouched."""
    from networks.dropout import portable_dropout
    x = torch.randn(4, 16, 32, 32, device=CUDA)
    cpu_state = torch.get_rng_state()
    torch.cuda.manual_seed(3)
    a = portable_dropout(x, 0.3, training=True)
    torch.cuda.manual_seed(3)
    b = portable_dropout(x, 0.3, training=True)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), cpu_state)
    kept = a != 0
    torch.testing.assert_close(a[kept], x[kept] / 0.7)
    assert 0.65 < kept.float().mean().item() < 0.75
