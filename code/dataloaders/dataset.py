"""Datasets in the SSL4MIS layout shared by ACDC and the preprocessed PROMISE12 data.

    <root>/train_slices.list   training slice ids, in the canonical order
    <root>/val.list, test.list volume ids
    <root>/data/slices/<id>.h5 'image' float (H,W) in [0,1], 'label' uint8 (H,W)
    <root>/data/<id>.h5        'image' float (D,H,W), 'label' uint8 (D,H,W), optional attrs

Training slices are read once and kept in memory, resized (nearest neighbour, as the
published protocol) to the network size; augmentation then runs either per sample in
DataLoader workers or batched on the training device (``dataloaders.augment``).
"""
import json
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from dataloaders.augment import augment

# the label of an unlabeled slice in the training cache (it has none on disk)
UNLABELED = 255
# labeled patients -> labeled slices at the head of ACDC's train_slices.list
ACDC_LABELED_SLICES = {1: 32, 3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 70: 1312}


def check_root(root):
    """The dataset root as a Path; FileNotFoundError naming it if it is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root_path {root}: no such dataset folder")
    return root


def declared_size(root):
    """The slice size a preprocessed folder declares in its ``dataset.json`` (``image_size``), or None."""
    info = Path(root) / "dataset.json"
    if not info.is_file():
        return None
    try:
        size = json.loads(info.read_text()).get("image_size")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{info}: not a readable dataset description ({err})") from None
    return None if size is None else int(size)


def read_list(root, name):
    """Ids listed in ``root/name`` (blank lines ignored)."""
    path = Path(root) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: list file not found (expected one id per line)")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{path}: the list is empty")
    return ids


def case_of(slice_id):
    """The patient/case a slice id belongs to: 'patient099_frame01_slice_3' -> 'patient099'."""
    return slice_id.split("_")[0]


def labeled_slice_count(slice_ids, labelnum, table=None, flag="--labelnum"):
    """Number of leading slices belonging to the first ``labelnum`` cases.

    With ``table`` (ACDC), ``labelnum`` must be one of its keys and the table value is used,
    as in every published ACDC split.
    """
    if table is not None:
        if labelnum not in table:
            raise ValueError(f"{flag} {labelnum}: expected one of {sorted(table)} labeled patients")
        count = table[labelnum]
        if count > len(slice_ids):
            raise ValueError(f"{flag} {labelnum} needs {count} slices, the list has {len(slice_ids)}")
        return count
    cases = list(dict.fromkeys(case_of(s) for s in slice_ids))
    if not 1 <= labelnum <= len(cases):
        raise ValueError(f"{flag} {labelnum}: expected 1..{len(cases)} labeled cases")
    keep = set(cases[:labelnum])
    count = 0
    while count < len(slice_ids) and case_of(slice_ids[count]) in keep:
        count += 1
    return count


def load_h5(path, ndim, num_classes, expected_size=None):
    """(image float32, label uint8, attrs dict) from an h5 file, validated: equal shapes, finite
    image values, integer labels in [0, num_classes), and (``expected_size``) S x S slices."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: listed but not found")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise KeyError(f"{path}: missing dataset(s) {missing}; expected 'image' and 'label'")
            image = np.asarray(f["image"], dtype=np.float32)
            label = np.asarray(f["label"])
            attrs = {k: np.asarray(v) for k, v in f.attrs.items()}
    except OSError as err:
        raise OSError(f"{path}: not a readable h5 file ({err})") from err
    if image.ndim != ndim or image.shape != label.shape:
        raise ValueError(f"{path}: image {image.shape} and label {label.shape} must be equal {ndim}-D shapes")
    if not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        raise ValueError(f"{path}: the image holds {bad} NaN/inf value(s); expected finite intensities")
    if label.dtype.kind not in "biuf":
        raise ValueError(f"{path}: label of type {label.dtype}, expected integer class indices")
    if label.dtype.kind == "f" and not (np.isfinite(label).all() and np.array_equal(label, np.round(label))):
        odd = label[~np.isfinite(label) | (label != np.round(label))]
        raise ValueError(f"{path}: label holds non-integer values (e.g. {float(odd.flat[0]):g}); expected class indices")
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"{path}: label values in [{label.min():g}, {label.max():g}], expected [0, {num_classes}) "
                         f"(--num_classes {num_classes})")
    if expected_size is not None and tuple(image.shape[-2:]) != (expected_size, expected_size):
        raise ValueError(f"{path}: slices of {image.shape[-2]}x{image.shape[-1]}, but the folder's dataset.json "
                         f"declares {expected_size}x{expected_size}: the folder mixes preprocessing runs; "
                         f"preprocess it again")
    return image, label.astype(np.uint8), attrs


def load_image_h5(path, ndim, expected_size=None):
    """The float32 'image' of an h5 file that has no label (an unlabeled slice of a converted data
    set), validated: ``ndim``-D, finite, and (``expected_size``) S x S."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: listed but not found")
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise KeyError(f"{path}: missing dataset 'image'")
            image = np.asarray(f["image"], dtype=np.float32)
    except OSError as err:
        raise OSError(f"{path}: not a readable h5 file ({err})") from err
    if image.ndim != ndim:
        raise ValueError(f"{path}: image of shape {image.shape}, expected {ndim}-D")
    if not np.isfinite(image).all():
        raise ValueError(f"{path}: the image holds NaN/inf values; expected finite intensities")
    if expected_size is not None and tuple(image.shape[-2:]) != (expected_size, expected_size):
        raise ValueError(f"{path}: slices of {image.shape[-2]}x{image.shape[-1]}, but the folder's dataset.json "
                         f"declares {expected_size}x{expected_size}")
    return image


def resize_nearest(x, size):
    """Nearest-neighbour resize of the last two axes of a tensor to ``size`` (h, w)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])
    out = F.interpolate(flat.float(), size=tuple(size), mode="nearest")
    return out.reshape(*lead, *size).to(x.dtype)


class SliceCache:
    """All training slices of ``ids`` in memory, resized to ``image_size``: tensors
    ``images`` (N,1,S,S) float32 and ``labels`` (N,S,S) uint8. The slices named in ``unlabeled``
    have no label on disk (converted data sets): only their image is read, and their label is
    ``UNLABELED`` (255) everywhere, a value outside every class range, so a loss given one fails."""

    def __init__(self, root, ids, image_size, num_classes, unlabeled=()):
        root = check_root(root)
        size, declared = (image_size, image_size), declared_size(root)
        images, labels, unlabeled = [], [], set(unlabeled)
        for sid in ids:
            path = root / "data" / "slices" / f"{sid}.h5"
            if sid in unlabeled:  # a slice with no label at all: a placeholder no loss accepts
                image = load_image_h5(path, 2, declared)
                label = np.full(image.shape, UNLABELED, dtype=np.uint8)
            else:
                image, label, _ = load_h5(path, 2, num_classes, declared)
            images.append(resize_nearest(torch.from_numpy(image), size))
            labels.append(resize_nearest(torch.from_numpy(label), size))
        self.ids = list(ids)
        self.images = torch.stack(images)[:, None]
        self.labels = torch.stack(labels)

    def __len__(self):
        return len(self.ids)

    def to(self, device):
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self


class AugmentedSlices(torch.utils.data.Dataset):
    """Per-sample view of a SliceCache for DataLoader workers (the CPU augmentation path)."""

    def __init__(self, cache, strong=True):
        self.cache, self.strong = cache, strong

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, index):
        out = augment(self.cache.images[index:index + 1], self.cache.labels[index:index + 1].long(),
                      strong=self.strong)
        return {k: v[0] for k, v in out.items()}


class TwoStreamSampler:
    """Endless batches of ``primary_bs`` indices from ``primary`` then ``secondary_bs`` from
    ``secondary``; each stream is reshuffled whenever it runs out (no index repeats within
    one pass of its stream).

    Pass ``p`` of stream ``s`` is the permutation drawn from ``default_rng([seed, s, p])``, so
    batch ``k`` is a function of ``k`` alone: iteration starts at ``position`` (a resumed run sets
    it to the number of batches already used and continues the same order).
    """

    def __init__(self, primary, secondary, primary_bs, secondary_bs, seed=0):
        if primary_bs < 1 or primary_bs > len(primary):
            raise ValueError(f"--labeled_bs {primary_bs}: expected 1..{len(primary)} (labeled slices)")
        if secondary_bs < 0 or (secondary_bs and secondary_bs > len(secondary)):
            raise ValueError(f"unlabeled batch {secondary_bs}: expected 0..{len(secondary)} (unlabeled slices)")
        self.streams = [(np.asarray(pool), size) for pool, size in
                        ((primary, primary_bs), (secondary, secondary_bs)) if size]
        self.seed, self.position = seed, 0
        self._orders = {}

    def _order(self, stream, pass_index):
        key = (stream, pass_index)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != stream}  # one pass kept per stream
            pool = self.streams[stream][0]
            self._orders[key] = np.random.default_rng([self.seed, stream, pass_index]).permutation(pool)
        return self._orders[key]

    def batch(self, k):
        """The indices of batch ``k`` (0-based)."""
        parts = []
        for s, (pool, size) in enumerate(self.streams):
            per_pass = len(pool) // size  # the remainder of each pass is dropped
            start = (k % per_pass) * size
            parts.append(self._order(s, k // per_pass)[start:start + size])
        return np.concatenate(parts).tolist()

    def __iter__(self):
        while True:
            yield self.batch(self.position)
            self.position += 1


class BatchStream:
    """Endless augmented training batches (dicts of tensors on ``device``); an iterator.

    ``aug_device='device'`` gathers raw slices from the in-memory cache and augments the whole
    batch on ``device``; ``'loader'`` augments per sample in ``num_workers`` DataLoader workers
    on the CPU and moves the batch afterwards (the paper repositories' path).
    ``state_dict()`` / ``load_state_dict()`` (before the first batch) let a resumed run continue
    the batch order, and with ``'device'`` the augmentation draws too (``'loader'`` draws from the
    global RNG, restored by the checkpoint, in the main process; worker processes are re-seeded).
    """

    def __init__(self, cache, sampler, device, aug_device="device", num_workers=0, strong=True, seed=0):
        if aug_device not in ("device", "loader"):
            raise ValueError(f"--aug_device {aug_device!r}: expected 'device' or 'loader'")
        self.device, self.aug_device, self.strong = torch.device(device), aug_device, strong
        self.sampler, self.batches, self._it = sampler, 0, None
        self.generator = None
        if aug_device == "device":
            self.cache = cache.to(self.device)
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        else:
            self.loader = torch.utils.data.DataLoader(
                AugmentedSlices(cache, strong), batch_sampler=sampler, num_workers=num_workers,
                pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0)

    def state_dict(self):
        return {"batches": self.batches,
                "generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state):
        if self._it is not None:
            raise RuntimeError("BatchStream.load_state_dict must come before the first batch")
        self.batches = self.sampler.position = int(state["batches"])
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = self._batches()
        batch = next(self._it)
        self.batches += 1
        return batch

    def _batches(self):
        if self.aug_device == "loader":
            for batch in self.loader:
                yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            return
        for index in self.sampler:
            idx = torch.as_tensor(index)
            if self.device.type == "cuda":  # a pinned source makes the copy asynchronous (no host sync)
                idx = idx.pin_memory()
            idx = idx.to(self.device, non_blocking=True)
            yield augment(self.cache.images[idx], self.cache.labels[idx].long(), self.generator, self.strong)


def load_volumes(root, split, num_classes):
    """Evaluation volumes of ``split`` ('val' or 'test'): a list of dicts with ``case``,
    ``image`` (D,H,W) float32, ``label`` (D,H,W) uint8 and ``attrs`` (h5 attributes)."""
    if split not in ("val", "test"):
        raise ValueError(f"--split {split!r}: expected 'val' or 'test'")
    root = check_root(root)
    volumes, declared = [], declared_size(root)
    for case in read_list(root, f"{split}.list"):
        image, label, attrs = load_h5(root / "data" / f"{case}.h5", 3, num_classes, declared)
        volumes.append({"case": case, "image": image, "label": label, "attrs": attrs})
    return volumes


def volume_spacing(attrs):
    """Voxel spacing in array axis order (sz, sy, sx) from volume attributes, or None."""
    if "spacing" not in attrs:
        return None
    spacing = tuple(float(s) for s in np.asarray(attrs["spacing"]).ravel())
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"volume attribute 'spacing' {spacing}: expected 3 positive values (sz, sy, sx)")
    return spacing


class TrainData:
    """Training slices of a dataset root: the labeled head of train_slices.list and the rest.

    ``labeled`` / ``unlabeled`` are index lists into ``cache`` (the unlabeled pool is every
    slice after the labeled ones: the reference used only half, its defect D5).
    """

    def __init__(self, root, labelnum, image_size, num_classes, table=None):
        root = check_root(root)
        ids = read_list(root, "train_slices.list")
        count = labeled_slice_count(ids, labelnum, table)
        self.cache = SliceCache(root, ids, image_size, num_classes)
        self.labeled = list(range(count))
        self.unlabeled = list(range(count, len(ids)))
        self.labelnum, self.list_path = labelnum, root / "train_slices.list"
        counts = torch.bincount(self.cache.labels.flatten().long(), minlength=num_classes)
        absent = [k for k in range(num_classes) if counts[k] == 0]
        if absent:
            raise ValueError(f"--num_classes {num_classes}: class(es) {absent} occur in none of the "
                             f"{len(ids)} training slices of {root / 'train_slices.list'}; expected every class "
                             f"0..{num_classes - 1} to occur (is --num_classes right for this data?)")
        labeled = torch.bincount(self.cache.labels[:count].flatten().long(), minlength=num_classes)
        self.absent_in_labeled = [k for k in range(num_classes) if labeled[k] == 0]

    def stream(self, labeled_bs, unlabeled_bs, device, aug_device="device", num_workers=0, strong=True, seed=0):
        if unlabeled_bs and not self.unlabeled:
            raise ValueError(f"--labelnum {self.labelnum}: every slice of {self.list_path} is then labeled, so there is "
                             f"no unlabeled slice for the unlabeled half of the batch; label fewer cases or add "
                             f"unlabeled ones (docs/own_data.md)")
        sampler = TwoStreamSampler(self.labeled, self.unlabeled, labeled_bs, unlabeled_bs, seed)
        return BatchStream(self.cache, sampler, device, aug_device, num_workers, strong, seed)
