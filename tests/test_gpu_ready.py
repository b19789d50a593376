"""What the CPU can show of the CUDA readiness (issue 27; docs/gpu.md): the DDP keyword on older
torch, generator and RNG states resumed on another device, the momentum layout after a
--channels_last change, --deterministic / TF32 semantics, the fp16 GradScaler in checkpoints, no
buffer averaging with --sync_bn, per-rank streams after a torchrun resume, rank 0's errors on
every rank, the --batch_scope rule, and training without tensorboardX."""
import argparse
import datetime
import logging
import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_ACDC_supervised
from networks.unet import build_model
import training.engine
import training.run
from test_ddp import _free_ports as free_ports
from common.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from training import device as devmod
from training import distributed
from training.config import base_parser, parse_args, per_rank_batch
from training.engine import GeneratorState, ScalerState, load_resumable, restore, train_loop


# ---------------------------------------------------------------- 1: DDP keyword on older torch

class _OldDDP:
    """The constructor of DistributedDataParallel before torch 2.13 (no ``forward_sync_buffers``)."""
    made = []

    def __init__(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True,
                 process_group=None, bucket_cap_mb=None, find_unused_parameters=False):
        self.module, self.kwargs = module, {"broadcast_buffers": broadcast_buffers,
                                            "find_unused_parameters": find_unused_parameters}
        _OldDDP.made.append(self)

    def __call__(self, fn):
        return self.module(fn)


def test_ddp_buffer_keyword_follows_the_constructor(monkeypatch):
    assert distributed.buffer_sync_kwargs(_OldDDP) == {"broadcast_buffers": False}

    class NewDDP:
        def __init__(self, module, broadcast_buffers=True, forward_sync_buffers=True):
            pass
    assert distributed.buffer_sync_kwargs(NewDDP) == {"forward_sync_buffers": False}
    # Parallel under (faked) torchrun on an older torch: no TypeError, buffers not broadcast
    monkeypatch.setattr(distributed, "DistributedDataParallel", _OldDDP)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    model = torch.nn.Linear(2, 2)
    parallel = distributed.Parallel([model], torch.device("cpu"), find_unused=True)
    assert _OldDDP.made[-1].kwargs == {"broadcast_buffers": False, "find_unused_parameters": True}
    assert parallel(lambda: 7) == 7


# ---------------------------------------------------------------- 2: states of another device

def _cuda_sized_state(fill):
    return torch.full((16,), fill, dtype=torch.uint8)  # a CUDA (Philox) generator's state: seed and offset


def test_a_cuda_generator_state_reseeds_the_cpu_generator_deterministically():
    draws = []
    for fill in (3, 3, 4):
        gen = GeneratorState(torch.Generator().manual_seed(0))
        note = gen.load_state_dict({"state": _cuda_sized_state(fill)})
        assert "16-byte generator state was saved on another device type" in note and "5056 bytes" in note
        draws.append(torch.rand(4, generator=gen.generator))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    same = torch.Generator().manual_seed(5)
    saved = GeneratorState(same).state_dict()
    expected = torch.rand(4, generator=same)
    restored = GeneratorState(torch.Generator().manual_seed(9))
    assert restored.load_state_dict(saved) is None  # same device type: restored exactly
    assert torch.equal(torch.rand(4, generator=restored.generator), expected)


def test_the_batch_streams_augmentation_generator_takes_a_cuda_state(synthetic_root):
    from dataloaders.dataset import TrainData
    data = TrainData(synthetic_root, 2, 32, 4)
    stream = data.stream(2, 2, "cpu", "device", 0, strong=True, seed=1)
    state = stream.state_dict()
    state = {**state, "generator": _cuda_sized_state(7), "batches": 3}
    note = load_resumable(stream, state)
    assert note and "re-seeded" in note
    assert stream.batches == 3 and next(stream)["image"].shape[-1] == 32


def test_cuda_rng_states_of_a_machine_with_more_gpus(monkeypatch):
    """set_rng_state restores the GPUs both machines have (set_rng_state_all raised here)."""
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(device, s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("set_rng_state_all"))
    state = rng_state()
    gpus = [_cuda_sized_state(1), _cuda_sized_state(2)]
    set_rng_state({**state, "cuda": gpus})
    assert list(restored) == [0] and torch.equal(restored[0], gpus[0])


# ---------------------------------------------------------------- 3: momentum layout on resume

def _sgd_step(model, seed):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    model(x).square().mean().backward()
    opt.step()
    return opt


def test_momentum_comes_back_in_the_parameters_layout(tmp_path):
    torch.manual_seed(0)
    model = build_model(4)
    opt = _sgd_step(model, 1)
    from training.engine import _state
    save_checkpoint(_state({"model": model}, {"model": opt}, 1, (0.5, 1), {}, False), tmp_path / "last.pth")
    again = build_model(4).to(memory_format=torch.channels_last)  # resumed with --channels_last on
    opt2 = torch.optim.SGD(again.parameters(), lr=0.1, momentum=0.9)
    restore(tmp_path / "last.pth", {"model": again}, {"model": opt2})
    convs = 0
    for p in again.parameters():
        if p in opt2.state:  # the deep-supervision heads got no gradient
            buf = opt2.state[p]["momentum_buffer"]
            assert buf.stride() == p.stride()
            convs += p.dim() == 4 and p.shape[-1] > 1
    assert convs > 10
    for p, q in zip(model.parameters(), again.parameters()):
        if p in opt.state:
            assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    # the conversion itself: only the tensors whose layout differs
    assert devmod.match_state_layout(opt2) == 0
    p = torch.nn.Parameter(torch.randn(3, 2, 4, 4).contiguous(memory_format=torch.channels_last))
    opt3 = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    opt3.state[p]["momentum_buffer"] = torch.arange(96.0).view(3, 2, 4, 4)
    assert devmod.match_state_layout(opt3) == 1
    assert opt3.state[p]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(opt3.state[p]["momentum_buffer"], torch.arange(96.0).view(3, 2, 4, 4))


# ---------------------------------------------------------------- 4, 8, 11: backend flags

@pytest.fixture
def keep_backend_flags():
    before = devmod.current_backend_flags()
    yield
    devmod.apply_backend_flags(before)


def test_deterministic_default_and_flags(keep_backend_flags):
    assert devmod.resolve_deterministic(None, "cuda") == 0 and devmod.resolve_deterministic(None, "cpu") == 1
    assert devmod.resolve_deterministic(1, "cuda") == 1 and devmod.resolve_deterministic(0, "cpu") == 0
    cuda_det = devmod.backend_flags(1, "bf16", "cuda")
    assert cuda_det == {"cudnn_benchmark": False, "cudnn_deterministic": True, "deterministic_algorithms": True,
                        "conv_tf32": True}
    # torch's deterministic algorithms only on CUDA: on the CPU the runs are bit-identical anyway
    assert devmod.backend_flags(1, "bf16", "cpu")["deterministic_algorithms"] is False
    assert devmod.backend_flags(0, "off", "cuda") == {"cudnn_benchmark": True, "cudnn_deterministic": False,
                                                      "deterministic_algorithms": False, "conv_tf32": False}
    for flags in (cuda_det, devmod.backend_flags(0, "off", "cuda")):
        devmod.apply_backend_flags(flags)
        assert devmod.current_backend_flags() == flags
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")  # set with the deterministic algorithms


def test_the_trainer_records_the_resolved_default(synthetic_root, tmp_path, keep_backend_flags):
    from test_engine import tiny_args
    train_ACDC_supervised.main(tiny_args(synthetic_root, tmp_path / "run", 1, 1, 1, "--amp", "off"))
    config = load_checkpoint(tmp_path / "run" / "last.pth")["config"]
    assert config["deterministic"] == 1  # CPU
    assert devmod.current_backend_flags()["conv_tf32"] is False  # --amp off: IEEE fp32 convolutions


def test_tf32_switch_on_both_torch_apis():
    """torch >= 2.9 has ``cudnn.conv.fp32_precision`` (the legacy flag may not be mixed with it);
    older releases only ``cudnn.allow_tf32``."""
    new = types.SimpleNamespace(conv=types.SimpleNamespace(fp32_precision="tf32"))
    devmod.set_conv_tf32(False, new)
    assert new.conv.fp32_precision == "ieee" and not hasattr(new, "allow_tf32")
    assert devmod.conv_tf32_allowed(new) is False
    devmod.set_conv_tf32(True, new)
    assert new.conv.fp32_precision == "tf32" and devmod.conv_tf32_allowed(new) is True
    old = types.SimpleNamespace(allow_tf32=True)
    devmod.set_conv_tf32(False, old)
    assert old.allow_tf32 is False and devmod.conv_tf32_allowed(old) is False


# ---------------------------------------------------------------- 6: the fp16 GradScaler

def test_scaler_state_round_trip():
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    scaler.scale(torch.ones(1))
    scaler.update(new_scale=1024.0)  # as after a few overflowing steps
    saved = ScalerState(scaler).state_dict()
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    ScalerState(fresh).load_state_dict(saved)
    assert fresh.get_scale() == 1024.0
    ScalerState(fresh).load_state_dict({})  # saved by a bf16/off run: a fresh scaler stays as it is
    assert fresh.get_scale() == 1024.0
    off = torch.amp.GradScaler("cpu", enabled=False)
    ScalerState(off).load_state_dict(saved)  # resumed with --amp bf16: nothing to restore
    assert not off.is_enabled()


def test_an_fp16_run_saves_and_resumes_its_scale(synthetic_root, tmp_path, monkeypatch):
    from test_engine import tiny_args
    save = tmp_path / "run"
    train_ACDC_supervised.main(tiny_args(synthetic_root, save, 2, 2, 1, "--amp", "fp16"))
    saved = load_checkpoint(save / "last.pth")["resumables"]["scaler"]
    assert saved["scale"] == 65536.0 and saved["_growth_tracker"] == 2  # two finite steps
    state = load_checkpoint(save / "last.pth")
    save_checkpoint({**{k: v for k, v in state.items() if k != "format"}, "finished": False},
                    save / "last.pth")  # as if interrupted after its validation at iteration 2
    seen = {}
    real = ScalerState.load_state_dict

    def spy(self, state):
        real(self, state)
        seen["scale"], seen["tracker"] = self.scaler.get_scale(), self.scaler._get_growth_tracker()
    monkeypatch.setattr(ScalerState, "load_state_dict", spy)
    train_ACDC_supervised.main(tiny_args(synthetic_root, save, 3, 3, 1, "--amp", "fp16", "--resume"))
    assert seen == {"scale": 65536.0, "tracker": 2}
    assert load_checkpoint(save / "last.pth")["resumables"]["scaler"]["_growth_tracker"] == 3


# ---------------------------------------------------------------- 10: --sync_bn skips sync_buffers

@pytest.mark.parametrize("sync_bn", [False, True])
def test_sync_buffers_only_without_sync_bn(monkeypatch, sync_bn):
    calls = []
    monkeypatch.setattr(distributed, "sync_buffers", lambda modules: calls.append(modules))
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = types.SimpleNamespace(args=argparse.Namespace(sync_bn=sync_bn),
                                scaler=torch.amp.GradScaler("cpu", enabled=False))
    training.run.Run.update(run, model(torch.ones(1, 2)).sum(), [opt], [model])
    assert len(calls) == (0 if sync_bn else 1)


# ---------------------------------------------------------------- 16: --batch_scope

def test_per_rank_batch_rule():
    assert per_rank_batch(24, 12, 1, "global") == (24, 12)
    assert per_rank_batch(24, 12, 2, "global") == (12, 6)
    assert per_rank_batch(24, 12, 2, "rank") == (24, 12)
    with pytest.raises(ValueError, match="--batch_size 24 and --labeled_bs 12 must be divisible by the 5 ranks"):
        per_rank_batch(24, 12, 5, "global")


def test_batch_scope_is_checked_at_parse_time(monkeypatch, capsys):
    from training.sscd_train import PRESETS, add_sscd_args, check_sscd_args
    parser = add_sscd_args(base_parser("t", "ACDC", 4, 7))
    monkeypatch.setenv("WORLD_SIZE", "5")
    with pytest.raises(SystemExit):
        parse_args(parser, ["--device", "cpu"], PRESETS)
    assert "--batch_scope global" in capsys.readouterr().err
    assert parse_args(parser, ["--device", "cpu", "--batch_scope", "rank"], PRESETS).batch_size == 24
    monkeypatch.setenv("WORLD_SIZE", "4")  # 12 labeled over 4 ranks: 3 each, but SSCD mixes pairs
    args = parse_args(parser, ["--device", "cpu", "--pre_iterations", "10"], PRESETS)
    with pytest.raises(SystemExit):
        check_sscd_args(parser, args)
    assert "divisible by 8, or --batch_scope rank" in capsys.readouterr().err


# ---------------------------------------------------------------- tensorboardX is optional

def test_training_without_tensorboardx(synthetic_root, tmp_path, monkeypatch, caplog):
    from test_engine import tiny_args
    monkeypatch.setattr(training.engine, "SummaryWriter", None)
    train_ACDC_supervised.main(tiny_args(synthetic_root, tmp_path / "run", 2, 1, 1))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "neither tensorboardX nor tensorboard is installed" in log and "it 2 val Dice" in log
    assert load_checkpoint(tmp_path / "run" / "last.pth")["iteration"] == 2
    assert not (tmp_path / "run" / "tb").exists()


# ---------------------------------------------------------------- 5 and 15: two gloo ranks

class _Tiny(torch.nn.Module):
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x)


def _join(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))


def _loop(folder, iterations, resume, fail_at=None):
    """train_loop on each rank with a per-rank box generator; returns the draws of every step."""
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(7 + rank)
    draws = {}

    def step(it):
        draws[it] = (torch.rand(2, generator=gen).tolist(), torch.rand(1).item())  # generator and global RNG
        loss = model(torch.ones(1, 3)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    def validate():
        if fail_at is not None:
            raise OSError(f"{folder}/last.pth: no space left on device")
        return 0.5, {}
    train_loop(save_dir=folder, iterations=iterations, step=step, models={"model": model},
               optimizers={"model": opt}, validate=validate, config={}, val_interval=2, log_interval=2,
               resume=resume, resumables={"gen": GeneratorState(gen)}, name="t",
               logger=logging.getLogger("test_gpu_ready"))
    return draws


def _resume_worker(rank, port, folder):
    _join(rank, port)
    full = _loop(f"{folder}/full", 4, False)
    _loop(f"{folder}/cut", 2, False)
    if rank == 0:  # as if interrupted after the validation at iteration 2
        state = load_checkpoint(f"{folder}/cut/last.pth")
        save_checkpoint({**{k: v for k, v in state.items() if k != "format"}, "finished": False},
                        f"{folder}/cut/last.pth")
    dist.barrier()
    resumed = _loop(f"{folder}/cut", 4, True)
    torch.save({"full": full, "resumed": resumed}, f"{folder}/draws{rank}.pt")
    dist.destroy_process_group()


def test_every_rank_resumes_its_own_streams(tmp_path):
    mp.spawn(_resume_worker, args=(free_ports(1)[0], str(tmp_path)), nprocs=2, join=True)
    d0, d1 = (torch.load(tmp_path / f"draws{r}.pt") for r in (0, 1))
    for d in (d0, d1):
        assert sorted(d["resumed"]) == [3, 4]
        assert all(d["resumed"][it] == d["full"][it] for it in (3, 4))  # as if uninterrupted
    assert d0["resumed"][3] != d1["resumed"][3]  # and the ranks still draw differently
    assert len(load_checkpoint(tmp_path / "cut" / "last.pth")["ranks"]) == 1


def _failure_worker(rank, port, folder):
    _join(rank, port)
    try:
        _loop(f"{folder}/fail", 4, False, fail_at=2)
        outcome = ("finished", "")
    except Exception as err:
        outcome = (type(err).__name__, str(err))
    torch.save(outcome, f"{folder}/outcome{rank}.pt")
    dist.destroy_process_group()


def test_an_error_on_rank_0_while_saving_stops_every_rank(tmp_path):
    """Rank 1 would otherwise wait for rank 0 in the next collective until the group's timeout
    (60 s here, then a different error); it must get rank 0's one-line message."""
    mp.spawn(_failure_worker, args=(free_ports(1)[0], str(tmp_path)), nprocs=2, join=True)
    o0, o1 = (torch.load(tmp_path / f"outcome{r}.pt") for r in (0, 1))
    assert o0[0] == "OSError" and "no space left on device" in o0[1]
    assert o1[0] == "MainRankFailed"
    assert o1[1].startswith("rank 0 failed: OSError: ") and "last.pth: no space left on device" in o1[1]
