"""Multi-process training (training.distributed) with 2 CPU ranks on the gloo backend.

* Semantics, exactly: one SGD step of 2 ranks x b samples equals one single-process step on the
  concatenated 2b batch. Only a loss that is a per-sample mean has that property, so the check uses
  cross entropy on a U-Net in eval mode (BatchNorm on its running statistics, no dropout): the
  gradient of the mean over 2b samples is the mean of the two ranks' gradients, which is what DDP
  computes. The step calls the network twice (heads on, then off) inside one ``Parallel`` call, as
  the SSCD step does; with the heads out of the loss (``find_unused``) they must stay untouched.
  Float sums in another order: equal within 1e-6.
* BatchNorm statistics: after ``sync_buffers`` the running mean equals the one a single process
  gets from the 2b batch (exact up to float rounding, the update being linear in the batch mean).
* The trainers under 2 ranks (supervised, pre-training and one SSCD stage, 32x32, --batch_size 8 =
  4 per rank under the default --batch_scope global): every rank ends with bit-identical weights,
  students, teacher and BatchNorm statistics alike; the ranks draw different batches of half the
  flags' size; only rank 0 writes checkpoints and logs.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import train_ACDC_SSCD
import train_ACDC_supervised
from dataloaders.dataset import TrainData
from networks.unet import build_model
from training import distributed
import training.engine
import training.run
import training.sscd_train

B, SIZE, CLASSES = 4, 32, 4


def _free_ports(n):
    """``n`` distinct free ports (the sockets are held open together, so no port comes twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _entry(rank, fn, ports, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", SSCD_TEST_SECOND_PORT=str(ports[1]))
    torch.set_num_threads(1)
    fn(rank, folder)


def spawn(fn, folder):
    """Run ``fn(rank, folder)`` in 2 processes that torchrun would have started. A worker that
    joins a second process group in the same processes moves MASTER_PORT to
    ``SSCD_TEST_SECOND_PORT`` first: a rank that left the first group early could otherwise
    reach rank 0's first store while rank 0 is still closing it."""
    mp.spawn(_entry, args=(fn, _free_ports(2), str(folder)), nprocs=2, join=True)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2 * B, 1, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (2 * B, SIZE, SIZE), generator=g)


def frozen_model():
    torch.manual_seed(0)
    return build_model(CLASSES).eval()  # BatchNorm on running statistics, dropout off


def two_forward_loss(model, x1, y1, x2, y2, heads_in_loss):
    """The shape of the SSCD step: a forward with heads, then a second forward without."""
    logits, heads = model(x1, heads=True)
    loss = F.cross_entropy(logits, y1) + F.cross_entropy(model(x2), y2)
    return loss + sum(F.cross_entropy(h, y1) for h in heads) if heads_in_loss else loss


def sgd_step(model, loss_fn, parallel=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    loss = parallel(loss_fn) if parallel else loss_fn()
    loss.backward()
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _semantics_worker(rank, folder):
    distributed.setup("cpu")
    (x1, y1), (x2, y2) = batch(1), batch(2)
    mine = slice(rank * B, (rank + 1) * B)
    out = {}
    for heads_in_loss in (True, False):
        model = frozen_model()
        parallel = distributed.Parallel([model], torch.device("cpu"), find_unused=not heads_in_loss)
        out[heads_in_loss] = sgd_step(model, lambda: two_forward_loss(
            model, x1[mine], y1[mine], x2[mine], y2[mine], heads_in_loss), parallel)
    bn = torch.nn.BatchNorm2d(3)
    bn(torch.randn(2 * B, 3, 5, 5, generator=torch.Generator().manual_seed(3))[mine])
    distributed.sync_buffers([bn])
    out["running_mean"] = bn.running_mean.clone()
    out["sync_bn"] = any(isinstance(m, torch.nn.SyncBatchNorm) for m in distributed.convert_sync_bn(frozen_model()).modules())
    torch.save(out, f"{folder}/rank{rank}.pt")
    distributed.teardown()


def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    spawn(_semantics_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    (x1, y1), (x2, y2) = batch(1), batch(2)
    for heads_in_loss in (True, False):
        model = frozen_model()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        single = sgd_step(model, lambda: two_forward_loss(model, x1, y1, x2, y2, heads_in_loss))
        for key, value in single.items():
            assert torch.equal(r0[heads_in_loss][key], r1[heads_in_loss][key]), key
            assert torch.allclose(r0[heads_in_loss][key], value, rtol=1e-5, atol=1e-6), key
        moved = {k for k in single if not torch.equal(single[k], before[k])}
        assert any(k.startswith("heads.") for k in moved) == heads_in_loss
    assert any(not torch.equal(r0[True][k], r0[False][k]) for k in r0[True])  # the heads' loss mattered
    bn = torch.nn.BatchNorm2d(3)
    bn(torch.randn(2 * B, 3, 5, 5, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(r0["running_mean"], r1["running_mean"])
    assert torch.allclose(r0["running_mean"], bn.running_mean, atol=1e-6)
    assert r0["sync_bn"] and r1["sync_bn"]  # --sync_bn converts under torchrun ...
    model = frozen_model()
    assert distributed.convert_sync_bn(model) is model  # ... and is a no-op in a single process


TINY = ["--image_size", "32", "--batch_size", "8", "--labeled_bs", "4", "--device", "cpu", "--num_workers", "0",
        "--labelnum", "3", "--log_interval", "1", "--val_interval", "2"]


def _record(folder, rank):
    """Spy on train_loop (final weights of every model, per run name) and on the stream seeds."""
    real_loop, real_stream = training.engine.train_loop, TrainData.stream
    seeds = []

    def loop(**kw):
        state = real_loop(**kw)
        torch.save({k: m.state_dict() for k, m in kw["models"].items()}, f"{folder}/{kw['name']}_rank{rank}.pt")
        return state

    def stream(self, *args, **kw):
        seeds.append((kw["seed"], args[:2]))  # and (labeled, unlabeled) slices per batch
        return real_stream(self, *args, **kw)

    training.run.train_loop = training.sscd_train.train_loop = loop
    TrainData.stream = stream
    return seeds


def _trainers_worker(rank, folder):
    root = os.environ["SSCD_TEST_ROOT"]
    seeds = _record(folder, rank)
    train_ACDC_supervised.main(["--root_path", root, "--save_dir", f"{folder}/sup", *TINY, "--max_iterations", "3"])
    os.environ["MASTER_PORT"] = os.environ["SSCD_TEST_SECOND_PORT"]  # a second process group (see spawn)
    train_ACDC_SSCD.main(["--root_path", root, "--save_dir", f"{folder}/sscd", *TINY, "--patch_size", "8",
                          "--pre_iterations", "3", "--stage_iterations", "3", "--hca_weights", "1,0,0,0"])
    torch.save(seeds, f"{folder}/seeds_rank{rank}.pt")


def test_trainers_under_two_ranks_end_with_identical_weights(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SSCD_TEST_ROOT", str(synthetic_root))
    spawn(_trainers_worker, tmp_path)
    for name in ("supervised", "pretrain", "stage_1"):
        r0, r1 = (torch.load(tmp_path / f"{name}_rank{r}.pt") for r in (0, 1))
        assert sorted(r0) == sorted(r1)
        for model in r0:
            for key, value in r0[model].items():
                assert torch.equal(value, r1[model][key]), f"{name}/{model}/{key} differs between ranks"
    stage = torch.load(tmp_path / "stage_1_rank0.pt")
    assert sorted(stage) == ["model", "model_2", "teacher"]
    assert not torch.equal(stage["teacher"]["out_conv.weight"], stage["model"]["out_conv.weight"])  # EMA moved
    s0, s1 = (torch.load(tmp_path / f"seeds_rank{r}.pt") for r in (0, 1))
    assert len(s0) == 3 and all(a[0] != b[0] for a, b in zip(s0, s1))  # each rank draws its own batches
    # --batch_scope global: each rank draws half of --batch_size 8 / --labeled_bs 4
    assert [a[1] for a in s0] == [a[1] for a in s1] == [(2, 0), (2, 0), (2, 2)]
    for run in ("sup", "sscd"):
        logs = list((tmp_path / run).rglob("log.txt"))
        assert len(logs) == 1 and "(2 ranks)" in logs[0].read_text()
    assert {p.name for p in (tmp_path / "sup").glob("*.pth")} == {"best.pth", "last.pth"}
    assert (tmp_path / "sscd" / "best.pth").is_file()


def test_sync_bn_is_refused_off_cuda(synthetic_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_ACDC_supervised.main(["--root_path", str(synthetic_root), "--save_dir", str(tmp_path), *TINY,
                                    "--sync_bn"])
    assert "--sync_bn: SyncBatchNorm needs CUDA" in capsys.readouterr().err
