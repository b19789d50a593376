"""--data_cache: the pool read from disk per batch gives the numbers of the in-memory pool, start-up
reads no slice, a slice that goes bad mid-run stops it after last.pth and --resume continues, and
auto never keeps a pool in memory that does not fit (issue 36)."""
import shutil

import h5py
import numpy as np
import pytest
import torch

import train_ACDC_SSCD
import train_PROMISE12_SSCD
from common.checkpoint import load_checkpoint
from conftest import skip_without_real_data
from dataloaders import dataset as dataset_module
from dataloaders import slice_index
from dataloaders.dataset import (ACDC_LABELED_SLICES, DiskSlices, SliceCache, SliceReadError, TrainData,
                                 TwoStreamSampler, read_list, resolve_data_cache)
from dataloaders.preprocess_promise12 import preprocess_promise12
from dataloaders.synthetic import make_synthetic_acdc

COMMON = ["--image_size", "32", "--batch_size", "4", "--labeled_bs", "2", "--device", "cpu", "--log_interval", "1",
          "--amp", "off", "--channels_last", "off", "--pre_iterations", "3", "--hca_weights", "1,0,0,0",
          "--stage_iterations", "2", "--patch_size", "8", "--val_interval", "3"]
FLAGS = [*COMMON, "--labelnum", "3"]


def weights_of(run):
    """Every tensor of every checkpoint of a run folder."""
    out = {}
    for path in sorted(run.rglob("*.pth")):
        state = load_checkpoint(path)
        for group in [state["model"]] + [state.get("models", {})[k] for k in sorted(state.get("models", {}))]:
            for key, value in group.items():
                out[f"{path.relative_to(run)}:{len(out)}:{key}"] = value
    return out


def assert_same_weights(a, b):
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys() and len(wa) > 100
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return make_synthetic_acdc(tmp_path_factory.mktemp("cache") / "acdc", n_patients=12, n_val=2, n_test=1,
                               slices_per_volume=4, size=(40, 36))


# ------------------------------------------------------------------ same numbers

@pytest.mark.parametrize("aug_device, workers", [("device", 0), ("device", 2), ("loader", 0)])
def test_disk_batches_equal_memory_batches(small_root, aug_device, workers):
    streams, rng = [], []
    for cache in ("memory", "disk"):
        data = TrainData(small_root, 3, 32, 4, data_cache=cache)
        torch.manual_seed(0)  # the loader path draws from the global RNG
        stream = data.stream(2, 2, "cpu", aug_device, workers if cache == "disk" else 0, seed=5)
        streams.append([next(stream) for _ in range(6)])
        rng.append(torch.get_rng_state())  # what dropout draws next: untouched by the disk path's reader
    assert torch.equal(*rng)
    for first, second in zip(*streams):
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), key


def test_disk_read_is_the_cached_slice_resized(small_root):
    ids = read_list(small_root, "train_slices.list")
    memory, disk = SliceCache(small_root, ids, 24, 4), DiskSlices(small_root, ids, 24, 4)
    picks = [0, 7, len(ids) - 1, 7]
    images, labels = disk.read(picks)
    assert images.shape == (4, 1, 24, 24) and labels.dtype == torch.uint8
    assert torch.equal(images, memory.images[picks]) and torch.equal(labels, memory.labels[picks])


def test_disk_path_trains_the_memory_path_weights_on_acdc(acdc_root, tmp_path):
    """On the real ACDC when SSCD_SHARED_DATA is set (the synthetic layout otherwise): pre-training and
    one SSCD stage, bit for bit."""
    for cache in ("memory", "disk"):
        train_ACDC_SSCD.main(["--root_path", str(acdc_root), "--save_dir", str(tmp_path / cache), *FLAGS,
                              "--data_cache", cache, "--num_workers", "2" if cache == "disk" else "0"])
        assert f"--data_cache {cache}: {cache} (" in (tmp_path / cache / "log.txt").read_text()
    assert_same_weights(tmp_path / "memory", tmp_path / "disk")


def test_disk_path_trains_the_memory_path_weights_on_promise12(real_prostate_root, tmp_path):
    skip_without_real_data(real_prostate_root, "real prostate data")
    root = tmp_path / "promise12"
    preprocess_promise12(real_prostate_root, root, image_size=32, cases=["Case00", "Case01", "Case02"])
    assert (root / "slice_index.npz").is_file()
    for cache in ("memory", "disk"):
        train_PROMISE12_SSCD.main(["--root_path", str(root), "--save_dir", str(tmp_path / cache), *COMMON,
                                   "--labelnum", "1", "--data_cache", cache, "--num_workers", "0"])
    assert_same_weights(tmp_path / "memory", tmp_path / "disk")


# ------------------------------------------------------------------ start-up reads no slice

def test_disk_start_up_reads_the_index_not_the_slices(small_root, monkeypatch):
    assert (small_root / "slice_index.npz").is_file()  # written by the generator, as by every preprocessor
    reads = []
    real = dataset_module._read_slice
    monkeypatch.setattr(dataset_module, "_read_slice", lambda *a: reads.append(a[0]) or real(*a))
    monkeypatch.setattr(slice_index.h5py, "File", None)  # building an index would need it
    data = TrainData(small_root, 3, 32, 4, data_cache="disk")
    assert reads == [] and data.absent_in_labeled == [] and len(data.cache) == len(read_list(small_root,
                                                                                              "train_slices.list"))
    with pytest.raises(ValueError, match=r"class\(es\) \[4\] occur in none of the"):
        TrainData(small_root, 3, 32, 5, data_cache="disk")
    with pytest.raises(ValueError, match=r"slice_\d+\.h5: label values >= 3, expected \[0, 3\)"):
        TrainData(small_root, 3, 32, 3, data_cache="disk")


def test_a_folder_without_index_gets_one_built_once_into_the_cache(small_root, tmp_path, monkeypatch):
    root = tmp_path / "acdc"
    shutil.copytree(small_root, root)
    (root / "slice_index.npz").unlink()  # as the processed ACDC release: not written by this project
    monkeypatch.setenv("SSCD_CACHE_DIR", str(tmp_path / "cache"))
    first = TrainData(root, 3, 32, 4, data_cache="disk")
    assert len(list((tmp_path / "cache").glob("index-*.npz"))) == 1 and not (root / "slice_index.npz").exists()
    monkeypatch.setattr(slice_index.h5py, "File", None)  # the second start reads the cached index only
    second = TrainData(root, 3, 32, 4, data_cache="disk")
    assert second.absent_in_labeled == first.absent_in_labeled == []
    ids = read_list(root, "train_slices.list")
    (root / "train_slices.list").write_text("".join(f"{i}\n" for i in ids[:-1]))  # another list: stale
    monkeypatch.undo()
    monkeypatch.setenv("SSCD_CACHE_DIR", str(tmp_path / "cache"))
    TrainData(root, 3, 32, 4, data_cache="disk")
    assert len(list((tmp_path / "cache").glob("index-*.npz"))) == 2


def test_the_index_counts_every_label_value_of_every_slice(small_root):
    ids = read_list(small_root, "train_slices.list")
    index = slice_index.read_index(small_root / "slice_index.npz", slice_index.list_digest(small_root), len(ids))
    for row in (0, 5, len(ids) - 1):
        with h5py.File(small_root / "data" / "slices" / f"{ids[row]}.h5", "r") as f:
            label = f["label"][()]
        expected = np.bincount(label.ravel(), minlength=index.counts.shape[1])
        assert index.counts[row].tolist() == expected.tolist()
    assert index.labeled.all() and index.counts.sum() == len(ids) * 40 * 36


def test_a_damaged_index_is_named(small_root, tmp_path):
    root = tmp_path / "acdc"
    shutil.copytree(small_root, root)
    (root / "slice_index.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match=r"slice_index\.npz: not a readable slice index .*delete it"):
        TrainData(root, 3, 32, 4, data_cache="disk")


# ------------------------------------------------------------------ bad input found late

def first_batch_with(sampler, index, limit=50):
    return next(k for k in range(limit) if index in sampler.batch(k))


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_slice_gone_bad_mid_run_stops_after_last_pth_and_resume_continues(small_root, tmp_path, damage):
    """Labeled-only training (the supervised trainer's stream): the slice first drawn in batch 2 <= k <= 4 is
    damaged; the run stops at iteration k + 1 naming it, last.pth holds iteration k; once the file is
    back, --resume ends with the weights of an undamaged run."""
    root = tmp_path / "acdc"
    shutil.copytree(small_root, root)
    flags = [*FLAGS, "--method", "labeled_only", "--data_cache", "disk", "--num_workers", "0", "--pre_iterations",
             "6", "--val_interval", "6"]
    train_ACDC_SSCD.main(["--root_path", str(root), "--save_dir", str(tmp_path / "clean"), *flags])
    data = TrainData(root, 3, 32, 4, ACDC_LABELED_SLICES, data_cache="disk")  # as the trainer: the ACDC table
    sampler = TwoStreamSampler(data.labeled, data.unlabeled, 2, 0, 1337)
    victim = next(i for i in data.labeled if 2 <= first_batch_with(sampler, i) <= 4)
    k = first_batch_with(sampler, victim)
    path = root / "data" / "slices" / f"{data.cache.ids[victim]}.h5"
    saved = path.read_bytes()
    path.unlink() if damage == "missing" else path.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(SystemExit) as info:
        train_ACDC_SSCD.main(["--root_path", str(root), "--save_dir", str(tmp_path / "run"), *flags])
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert message.endswith(f"{tmp_path / 'run' / 'last.pth'} holds iteration {k}: repair or replace the file, then "
                            f"rerun with --resume")
    assert load_checkpoint(tmp_path / "run" / "last.pth")["iteration"] == k
    path.write_bytes(saved)
    train_ACDC_SSCD.main(["--root_path", str(root), "--save_dir", str(tmp_path / "run"), *flags, "--resume"])
    assert_same_weights(tmp_path / "clean", tmp_path / "run")


def test_read_errors_come_through_loader_workers_as_one_line(small_root, tmp_path):
    root = tmp_path / "acdc"
    shutil.copytree(small_root, root)
    for path in (root / "data" / "slices").glob("*.h5"):
        path.write_bytes(b"\x89HDF\r\n\x1a\n damaged")
    for aug_device in ("device", "loader"):
        stream = TrainData(root, 3, 32, 4, data_cache="disk").stream(2, 2, "cpu", aug_device, 2, seed=1)
        with pytest.raises(SliceReadError, match=r"^\S+\.h5: not a readable h5 file") as info:
            next(stream)
        assert "\n" not in str(info.value) and stream.batches == 0


# ------------------------------------------------------------------ what auto picks

def test_auto_keeps_the_pool_in_memory_only_where_it_fits(monkeypatch):
    monkeypatch.setattr(dataset_module, "available_host_bytes", lambda: 10 * 2**30)
    per_rank = dataset_module.cache_bytes(40000, 256)  # 12.2 GiB: more than half of 10 GiB
    assert per_rank == 40000 * 256 * 256 * 5
    assert resolve_data_cache("auto", 40000, 256, "cpu", "device")[0] == "disk"
    assert resolve_data_cache("auto", 1312, 256, "cpu", "device")[0] == "memory"
    assert resolve_data_cache("auto", 1312, 256, "cpu", "device", local_ranks=64)[0] == "disk"  # 26 GiB in all
    assert resolve_data_cache("disk", 10, 32, "cpu", "device")[0] == "disk"
    with pytest.raises(SystemExit, match=r"--data_cache memory: the pool does not fit \(40000 slices at 256x256: "
                                         r"12\.21 GiB per rank"):
        resolve_data_cache("memory", 40000, 256, "cpu", "device")
    assert resolve_data_cache("memory", 30000, 256, "cpu", "device")[0] == "memory"  # 9.2 GiB: asked for, fits


def test_available_memory_is_positive_and_at_most_the_machine():
    import os
    free = dataset_module.available_host_bytes()
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
