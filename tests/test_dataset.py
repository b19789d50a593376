"""Tests for dataloaders.dataset: labeled split, sampler, both batch paths, and bad input."""
import itertools

import h5py
import numpy as np
import pytest
import torch

from conftest import skip_without_real_data
from dataloaders.dataset import (
    ACDC_LABELED_SLICES,
    BatchStream,
    SliceCache,
    TrainData,
    TwoStreamSampler,
    labeled_slice_count,
    load_volumes,
    read_list,
)

SIZE = 32


# ------------------------------------------------------------------ labeled split


def test_acdc_table_matches_real_slice_list(real_acdc_root):
    skip_without_real_data(real_acdc_root, "real ACDC data")
    ids = read_list(real_acdc_root, "train_slices.list")
    assert len(ids) == 1312
    assert ACDC_LABELED_SLICES == {1: 32, 3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 70: 1312}
    for n, count in ACDC_LABELED_SLICES.items():
        assert labeled_slice_count(ids, n, None) == count, n
        assert labeled_slice_count(ids, n, ACDC_LABELED_SLICES) == count


def test_count_without_table_follows_cases():
    ids = ["pA_frame01_slice_1", "pA_frame01_slice_2", "pA_frame02_slice_1",
           "pB_frame01_slice_1", "pB_frame02_slice_1",
           "pC_frame01_slice_1", "pC_frame01_slice_2", "pC_frame01_slice_3", "pC_frame02_slice_1"]
    assert [labeled_slice_count(ids, n) for n in (1, 2, 3)] == [3, 5, 9]
    for bad in (0, 4, -1):
        with pytest.raises(ValueError, match="--labelnum"):
            labeled_slice_count(ids, bad)


@pytest.mark.parametrize("labelnum", [2, 5, 0, 100])
def test_labelnum_not_in_table_rejected(labelnum):
    ids = [f"patient{i:03d}_frame01_slice_1" for i in range(2000)]
    with pytest.raises(ValueError, match=rf"--labelnum {labelnum}: expected one of \[1, 3, 7"):
        labeled_slice_count(ids, labelnum, ACDC_LABELED_SLICES)


def test_table_count_larger_than_list_rejected():
    ids = [f"p{i}_frame01_slice_1" for i in range(40)]
    with pytest.raises(ValueError, match="--labelnum 3 needs 68 slices, the list has 40"):
        labeled_slice_count(ids, 3, ACDC_LABELED_SLICES)


@pytest.fixture(scope="module")
def train_data(synthetic_root):
    return TrainData(synthetic_root, 1, SIZE, 4, ACDC_LABELED_SLICES)


def test_train_data_split_and_cache(train_data, synthetic_root):
    ids = read_list(synthetic_root, "train_slices.list")
    n = len(ids)
    assert train_data.labeled == list(range(32))
    assert train_data.unlabeled == list(range(32, n))  # every remaining slice, not a half
    cache = train_data.cache
    assert cache.ids == ids
    assert cache.images.shape == (n, 1, SIZE, SIZE) and cache.images.dtype == torch.float32
    assert cache.labels.shape == (n, SIZE, SIZE) and cache.labels.dtype == torch.uint8
    assert cache.images.min() >= 0 and cache.images.max() <= 1
    assert int(cache.labels.max()) == 3
    # slice i of the cache is file i of the list, resized by nearest neighbour
    with h5py.File(synthetic_root / "data" / "slices" / f"{ids[5]}.h5", "r") as f:
        label = torch.from_numpy(f["label"][:])
    expected = torch.nn.functional.interpolate(label[None, None].float(), size=(SIZE, SIZE), mode="nearest")
    assert torch.equal(cache.labels[5], expected[0, 0].to(torch.uint8))


def test_cases_split_without_table(synthetic_root):
    data = TrainData(synthetic_root, 2, SIZE, 4, None)
    ids = read_list(synthetic_root, "train_slices.list")
    first_two = list(dict.fromkeys(i.split("_")[0] for i in ids))[:2]
    assert [ids[i].split("_")[0] in first_two for i in data.labeled] == [True] * len(data.labeled)
    assert all(ids[i].split("_")[0] not in first_two for i in data.unlabeled)
    assert len(data.labeled) + len(data.unlabeled) == len(ids)


def test_no_unlabeled_slice_left_is_an_error_naming_labelnum(synthetic_root):
    ids = read_list(synthetic_root, "train_slices.list")
    cases = len(dict.fromkeys(i.split("_")[0] for i in ids))
    data = TrainData(synthetic_root, cases, SIZE, 4, None)
    assert data.unlabeled == [] and len(data.labeled) == len(ids)
    with pytest.raises(ValueError, match=f"^--labelnum {cases}: every slice of .*train_slices.list is then labeled"):
        data.stream(2, 2, "cpu")
    batch = next(iter(data.stream(2, 0, "cpu")))  # labeled-only needs no unlabeled slice
    assert batch["image"].shape[0] == 2 and batch["label"].shape[0] == 2


# ------------------------------------------------------------------ sampler


def test_two_stream_sampler_layout_and_no_repeats():
    labeled, unlabeled = list(range(10)), list(range(10, 40))
    sampler = TwoStreamSampler(labeled, unlabeled, 2, 3, seed=1)
    batches = list(itertools.islice(iter(sampler), 10))
    assert all(len(b) == 5 for b in batches)
    lab = [b[:2] for b in batches]
    unl = [b[2:] for b in batches]
    assert all(i in labeled for b in lab for i in b)
    assert all(i in unlabeled for b in unl for i in b)
    # one pass of the labeled stream is 5 batches: no repeats within it
    for p in range(2):
        seen = [i for b in lab[5 * p:5 * p + 5] for i in b]
        assert sorted(seen) == labeled
    seen_u = [i for b in unl for i in b]
    assert sorted(seen_u) == unlabeled  # 10 batches = one unlabeled pass
    # reshuffled between passes, and reproducible for a seed
    assert lab[:5] != lab[5:]
    again = list(itertools.islice(iter(TwoStreamSampler(labeled, unlabeled, 2, 3, seed=1)), 10))
    assert again == batches


def test_two_stream_sampler_labeled_only():
    sampler = TwoStreamSampler(list(range(7)), [], 3, 0)
    batches = list(itertools.islice(iter(sampler), 4))
    assert all(len(b) == 3 and set(b) <= set(range(7)) for b in batches)
    assert len(set(batches[0] + batches[1])) == 6  # 2 batches per pass (remainder dropped)


def test_two_stream_sampler_starts_at_position():
    """A sampler set to position k yields exactly the batches k, k+1, ... of a fresh one."""
    full = list(itertools.islice(iter(TwoStreamSampler(list(range(10)), list(range(10, 40)), 2, 3, seed=4)), 13))
    later = TwoStreamSampler(list(range(10)), list(range(10, 40)), 2, 3, seed=4)
    later.position = 7
    assert list(itertools.islice(iter(later), 6)) == full[7:]
    assert later.batch(12) == full[12]


@pytest.mark.parametrize("aug_device", ["device", "loader"])
def test_batch_stream_state_round_trip(train_data, aug_device):
    """A stream restored from state_dict() after 3 batches continues at batch 4 (its sampler
    position; with on-device augmentation also the same augmented tensors)."""
    make = lambda: train_data.stream(2, 3, "cpu", aug_device=aug_device, num_workers=0, strong=True, seed=5)
    first = make()
    for _ in range(3):
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(2)]
    second = make()
    second.load_state_dict(state)
    assert second.batches == second.sampler.position == 3
    got = [next(second) for _ in range(2)]
    assert all(same_slices(e, g) for e, g in zip(expected, got))  # batches 4 and 5
    if aug_device == "device":  # and the same augmentation draws
        for e, g in zip(expected, got):
            assert all(torch.equal(e[k], g[k]) for k in e)
    with pytest.raises(RuntimeError, match="before the first batch"):
        second.load_state_dict(state)


def test_two_stream_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="--labeled_bs 5"):
        TwoStreamSampler(list(range(4)), list(range(10)), 5, 1)
    with pytest.raises(ValueError, match="--labeled_bs 0"):
        TwoStreamSampler(list(range(4)), list(range(10)), 0, 1)
    with pytest.raises(ValueError, match="unlabeled batch 11"):
        TwoStreamSampler(list(range(4)), list(range(10)), 2, 11)


# ------------------------------------------------------------------ batch streams


def slice_signature(batch):
    """Per sample, the class counts of its label: quarter turns and flips keep them, a free rotation
    (nearest resampling) moves a few pixels at the borders; other slices differ by far more."""
    return [torch.bincount(label.flatten(), minlength=4) for label in batch["label"]]


def same_slices(a, b, tolerance=0.03):
    """Whether two batches hold the same slices in the same order: every sample's class counts agree
    within ``tolerance`` of its pixels."""
    pixels = a["label"][0].numel()
    return all(int((x - y).abs().max()) <= tolerance * pixels for x, y in zip(slice_signature(a), slice_signature(b)))


def _first_batches(data, aug_device, strong, n=2):
    stream = data.stream(2, 3, "cpu", aug_device=aug_device, num_workers=0, strong=strong, seed=3)
    return list(itertools.islice(iter(stream), n))


@pytest.mark.parametrize("strong", [True, False])
def test_batch_stream_paths_agree(train_data, strong):
    device_batches = _first_batches(train_data, "device", strong)
    loader_batches = _first_batches(train_data, "loader", strong)
    keys = {"image", "label"} | ({"image_strong", "label_strong", "cutout"} if strong else set())
    assert all(same_slices(d, l) for d, l in zip(device_batches, loader_batches))  # same slices, same order
    assert not same_slices(device_batches[0], device_batches[1])  # the check tells other slices apart
    for d, l in zip(device_batches, loader_batches):
        assert set(d) == set(l) == keys
        for k in keys:
            assert d[k].shape == l[k].shape, k
            assert d[k].dtype == l[k].dtype, k
            assert d[k].device == l[k].device == torch.device("cpu")
        assert d["image"].shape == (5, 1, SIZE, SIZE) and d["image"].dtype == torch.float32
        assert d["label"].shape == (5, SIZE, SIZE) and d["label"].dtype == torch.int64
        for batch in (d, l):
            assert batch["image"].min() >= 0 and batch["image"].max() <= 1
            assert batch["label"].min() >= 0 and batch["label"].max() < 4


@pytest.mark.parametrize("aug_device", ["device", "loader"])
def test_batch_stream_uses_sampled_slices(synthetic_root, aug_device):
    """Labeled slices all 0, unlabeled all 2: each batch part must come from its own pool."""
    data = TrainData(synthetic_root, 1, SIZE, 4, ACDC_LABELED_SLICES)
    data.cache.labels.zero_()
    data.cache.labels[data.unlabeled] = 2
    stream = iter(data.stream(2, 3, "cpu", aug_device=aug_device, num_workers=0, strong=False, seed=0))
    for _ in range(3):
        batch = next(stream)
        assert set(batch["label"][:2].unique().tolist()) == {0}
        assert set(batch["label"][2:].unique().tolist()) <= {0, 2}  # 0 only in padded corners
        assert (batch["label"][2:] == 2).flatten(1).any(1).all()


def test_batch_stream_rejects_unknown_aug_device(train_data):
    sampler = TwoStreamSampler(train_data.labeled, [], 2, 0)
    with pytest.raises(ValueError, match="--aug_device 'gpu'"):
        BatchStream(train_data.cache, sampler, "cpu", aug_device="gpu")


# ------------------------------------------------------------------ bad input


def _write(path, image=None, label=None, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if image is not None:
            f.create_dataset("image", data=image)
        if label is not None:
            f.create_dataset("label", data=label)
        for k, v in extra.items():
            f.create_dataset(k, data=v)
    return path


def _mini_root(tmp_path):
    """Two patients, two slices each, and one val volume: a valid root to break."""
    root = tmp_path / "root"
    ids = [f"patient00{p}_frame01_slice_{s}" for p in (1, 2) for s in (1, 2)]
    rng = np.random.default_rng(0)
    for sid in ids:
        _write(root / "data" / "slices" / f"{sid}.h5", rng.random((20, 24), dtype=np.float32),
               rng.integers(0, 4, (20, 24), dtype=np.uint8))
    _write(root / "data" / "patient003_frame01.h5", rng.random((3, 20, 24), dtype=np.float32),
           rng.integers(0, 4, (3, 20, 24), dtype=np.uint8))
    (root / "train_slices.list").write_text("\n".join(ids) + "\n")
    (root / "val.list").write_text("patient003_frame01\n")
    return root, ids


def test_mini_root_is_valid(tmp_path):
    root, ids = _mini_root(tmp_path)
    cache = SliceCache(root, ids, 16, 4)
    assert cache.images.shape == (4, 1, 16, 16)
    vols = load_volumes(root, "val", 4)
    assert [v["case"] for v in vols] == ["patient003_frame01"] and vols[0]["image"].shape == (3, 20, 24)
    data = TrainData(root, 1, 16, 4, None)
    assert data.labeled == [0, 1] and data.unlabeled == [2, 3]


def test_missing_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"--root_path .*nope: no such dataset folder"):
        TrainData(missing, 1, 16, 4)
    with pytest.raises(FileNotFoundError, match="--root_path"):
        load_volumes(missing, "val", 4)


@pytest.mark.parametrize("name", ["train_slices.list", "val.list"])
def test_missing_list(tmp_path, name):
    root, _ = _mini_root(tmp_path)
    (root / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{name}: list file not found"):
        if name == "val.list":
            load_volumes(root, "val", 4)
        else:
            TrainData(root, 1, 16, 4)


def test_test_list_missing_names_it(tmp_path):
    root, _ = _mini_root(tmp_path)
    with pytest.raises(FileNotFoundError, match="test.list"):
        load_volumes(root, "test", 4)


def test_empty_list(tmp_path):
    root, _ = _mini_root(tmp_path)
    (root / "train_slices.list").write_text("\n\n")
    with pytest.raises(ValueError, match="train_slices.list: the list is empty"):
        TrainData(root, 1, 16, 4)


def test_listed_slice_without_file(tmp_path):
    root, ids = _mini_root(tmp_path)
    with open(root / "train_slices.list", "a") as f:
        f.write("patient002_frame01_slice_9\n")
    with pytest.raises(FileNotFoundError, match=r"patient002_frame01_slice_9\.h5: listed but not found"):
        TrainData(root, 1, 16, 4)


def test_listed_volume_without_file(tmp_path):
    root, _ = _mini_root(tmp_path)
    (root / "val.list").write_text("patient003_frame01\npatient004_frame01\n")
    with pytest.raises(FileNotFoundError, match=r"patient004_frame01\.h5: listed but not found"):
        load_volumes(root, "val", 4)


@pytest.mark.parametrize("missing", ["image", "label"])
def test_h5_without_dataset(tmp_path, missing):
    root, ids = _mini_root(tmp_path)
    path = root / "data" / "slices" / f"{ids[1]}.h5"
    arrays = {"image": np.zeros((20, 24), np.float32), "label": np.zeros((20, 24), np.uint8)}
    arrays[missing] = None
    _write(path, arrays["image"], arrays["label"], other=np.zeros(3))
    with pytest.raises(KeyError, match=rf"{ids[1]}\.h5: missing dataset\(s\) \['{missing}'\]"):
        TrainData(root, 1, 16, 4)


def test_image_label_shape_mismatch(tmp_path):
    root, ids = _mini_root(tmp_path)
    _write(root / "data" / "slices" / f"{ids[2]}.h5", np.zeros((20, 24), np.float32), np.zeros((20, 23), np.uint8))
    with pytest.raises(ValueError, match=rf"{ids[2]}\.h5: image \(20, 24\) and label \(20, 23\) must be equal 2-D"):
        TrainData(root, 1, 16, 4)


def test_volume_with_wrong_dimensionality(tmp_path):
    root, _ = _mini_root(tmp_path)
    _write(root / "data" / "patient003_frame01.h5", np.zeros((20, 24), np.float32), np.zeros((20, 24), np.uint8))
    with pytest.raises(ValueError, match=r"patient003_frame01\.h5: .*must be equal 3-D shapes"):
        load_volumes(root, "val", 4)


@pytest.mark.parametrize("bad, dtype", [(4, np.uint8), (255, np.uint8), (-1, np.int16)])
def test_labels_outside_class_range(tmp_path, bad, dtype):
    root, ids = _mini_root(tmp_path)
    label = np.zeros((20, 24), dtype)
    label[3, 4] = bad
    _write(root / "data" / "slices" / f"{ids[0]}.h5", np.zeros((20, 24), np.float32), label)
    with pytest.raises(ValueError, match=rf"{ids[0]}\.h5: label values in \[.*\], expected \[0, 4\)"):
        TrainData(root, 1, 16, 4)


def test_labels_outside_range_in_volume(tmp_path):
    root, _ = _mini_root(tmp_path)
    _write(root / "data" / "patient003_frame01.h5", np.zeros((3, 20, 24), np.float32),
           np.full((3, 20, 24), 2, np.uint8))
    with pytest.raises(ValueError, match=r"patient003_frame01\.h5: label values in \[2, 2\], expected \[0, 2\)"):
        load_volumes(root, "val", 2)


def test_corrupt_h5_names_file(tmp_path):
    root, ids = _mini_root(tmp_path)
    (root / "data" / "slices" / f"{ids[3]}.h5").write_bytes(b"this is not an hdf5 file" * 10)
    with pytest.raises(OSError, match=rf"{ids[3]}\.h5: not a readable h5 file"):
        TrainData(root, 1, 16, 4)


def test_labelnum_not_in_table_on_data(tmp_path):
    root, _ = _mini_root(tmp_path)
    with pytest.raises(ValueError, match=r"--labelnum 2: expected one of \[1, 3, 7, 14, 21, 28, 35, 70\]"):
        TrainData(root, 2, 16, 4, ACDC_LABELED_SLICES)


def test_bad_split_rejected(tmp_path):
    root, _ = _mini_root(tmp_path)
    with pytest.raises(ValueError, match="--split 'train'"):
        load_volumes(root, "train", 4)


def test_check_integral_accepts_whole_numbers_and_names_one_odd_value():
    from dataloaders.slice_index import check_integral
    for label in (np.array([True, False]), np.array([0, 3], np.int16), np.array([0.0, 2.0, -1.0], np.float32)):
        assert check_integral(label, "x.h5") is label  # negatives are the callers' to judge (their ranges differ)
    for label, odd in ((np.array([0.0, 1.5, 2.5]), "1.5"), (np.array([1.0, np.nan]), "nan"),
                       (np.array([np.inf, 0.0]), "inf")):
        with pytest.raises(ValueError, match=rf"^x\.h5: label holds non-integer values \(e\.g\. {odd}\); expected"):
            check_integral(label, "x.h5")
    with pytest.raises(ValueError, match=r"^x\.h5: label of type <U1, expected integer class indices"):
        check_integral(np.array(["a"]), "x.h5")
