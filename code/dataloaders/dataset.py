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
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from common.errors import DataReadError
from dataloaders.augment import augment
from dataloaders.slice_index import SliceIndex, check_integral, label_counts, load_index, stack_counts

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
    ids = [line for line in map(str.strip, path.read_text().splitlines()) if line]
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
    check_integral(label, path)
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


class SliceReadError(DataReadError):
    """A training slice that cannot be read when a batch needs it (``--data_cache disk``): missing,
    damaged, or out of range; the message names the file."""


def _read_slice(path, unlabeled, num_classes, declared):
    """(image float32 (H, W), label uint8 (H, W)) of one slice file; an unlabeled one gets ``UNLABELED``."""
    if unlabeled:  # a slice with no label at all: a placeholder no loss accepts
        image = load_image_h5(path, 2, declared)
        return image, np.full(image.shape, UNLABELED, dtype=np.uint8)
    image, label, _ = load_h5(path, 2, num_classes, declared)
    return image, label


class SliceCache:
    """All training slices of ``ids`` in memory, resized to ``image_size``: tensors
    ``images`` (N,1,S,S) float32 and ``labels`` (N,S,S) uint8 (``--data_cache memory``). The slices
    named in ``unlabeled`` have no label on disk (converted data sets): only their image is read, and
    their label is ``UNLABELED`` (255) everywhere, a value outside every class range, so a loss given
    one fails. ``index``: the ``SliceIndex`` of what was read (label counts before resizing)."""

    def __init__(self, root, ids, image_size, num_classes, unlabeled=()):
        root = check_root(root)
        size, declared, unlabeled = (image_size, image_size), declared_size(root), set(unlabeled)
        self.ids = list(ids)
        self.images = torch.empty(len(self.ids), 1, *size)  # filled in place: no second copy at the end
        self.labels = torch.empty(len(self.ids), *size, dtype=torch.uint8)
        rows, shape = [], (0, 0)
        for i, sid in enumerate(self.ids):
            image, label = _read_slice(root / "data" / "slices" / f"{sid}.h5", sid in unlabeled, num_classes, declared)
            rows.append(None if sid in unlabeled else label_counts(label))
            shape = image.shape
            self.images[i, 0] = resize_nearest(torch.from_numpy(image), size)
            self.labels[i] = resize_nearest(torch.from_numpy(label), size)
        self.index = SliceIndex([r is not None for r in rows], stack_counts(rows), shape)

    def __len__(self):
        return len(self.ids)

    def read(self, indices):
        """(images (B,1,S,S), labels (B,S,S) uint8) of the slices at ``indices``, where the cache is."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        return self.images[idx], self.labels[idx]

    def to(self, device):
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self


class DiskSlices:
    """The training slices of ``ids`` read from their files when a batch needs them
    (``--data_cache disk``): nothing is held in memory, so memory does not grow with the pool. The
    values are those of ``SliceCache`` (same reader, same resize); a file that has become unreadable
    raises ``SliceReadError`` naming it."""

    def __init__(self, root, ids, image_size, num_classes, unlabeled=()):
        self.root = check_root(root)
        self.ids, self.image_size, self.num_classes = list(ids), image_size, num_classes
        self.unlabeled, self.declared = frozenset(unlabeled), declared_size(self.root)

    def __len__(self):
        return len(self.ids)

    def read(self, indices):
        """(images (B,1,S,S) float32, labels (B,S,S) uint8) on the CPU, read from the slice files."""
        size = (self.image_size, self.image_size)
        images = torch.empty(len(indices), 1, *size)
        labels = torch.empty(len(indices), *size, dtype=torch.uint8)
        for k, i in enumerate(indices):
            sid = self.ids[i]
            try:
                image, label = _read_slice(self.root / "data" / "slices" / f"{sid}.h5", sid in self.unlabeled,
                                           self.num_classes, self.declared)
            except (OSError, ValueError, KeyError) as err:
                raise SliceReadError(str(err).strip("'\"")) from None
            images[k, 0] = resize_nearest(torch.from_numpy(image), size)
            labels[k] = resize_nearest(torch.from_numpy(label), size)
        return images, labels

    def to(self, device):
        return self  # batches are moved, not the pool


class AugmentedSlices(torch.utils.data.Dataset):
    """Per-sample view of a slice source for DataLoader workers (the CPU augmentation path); a slice
    that cannot be read comes back as its error message (``collate_or_error``)."""

    def __init__(self, source, strong=True):
        self.source, self.strong = source, strong

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        try:
            images, labels = self.source.read([index])
        except SliceReadError as err:
            return str(err)
        out = augment(images, labels.long(), strong=self.strong)
        return {k: v[0] for k, v in out.items()}


class RawBatches(torch.utils.data.Dataset):
    """Whole raw batches of a slice source, one per sampler entry (a list of indices), for the
    DataLoader workers that read ``--data_cache disk`` ahead of the step; errors come back as text."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, indices):
        try:
            return self.source.read(indices)
        except SliceReadError as err:
            return str(err)


def collate_or_error(samples):
    """``default_collate`` unless a sample is an error message, which is passed on alone."""
    errors = [s for s in samples if isinstance(s, str)]
    return errors[0] if errors else torch.utils.data.default_collate(samples)


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

    ``aug_device='device'`` gathers raw slices and augments the whole batch on ``device``: from the
    in-memory cache moved to ``device`` (``SliceCache``), or read ahead from disk by ``num_workers``
    DataLoader workers (``DiskSlices``; 0: in this process). ``'loader'`` augments per sample in
    ``num_workers`` DataLoader workers on the CPU and moves the batch afterwards (the paper
    repositories' path). ``state_dict()`` / ``load_state_dict()`` (before the first batch) let a resumed
    run continue the batch order, and with ``'device'`` the augmentation draws too (``'loader'`` draws
    from the global RNG, restored by the checkpoint, in the main process; worker processes are
    re-seeded). ``wait_seconds``: time spent waiting for raw batches from disk (the benchmark's batch wait).
    A slice that cannot be read raises ``SliceReadError`` (one line naming the file) from ``next``.
    """

    def __init__(self, cache, sampler, device, aug_device="device", num_workers=0, strong=True, seed=0):
        if aug_device not in ("device", "loader"):
            raise ValueError(f"--aug_device {aug_device!r}: expected 'device' or 'loader'")
        self.device, self.aug_device, self.strong = torch.device(device), aug_device, strong
        self.sampler, self.batches, self._it, self.wait_seconds = sampler, 0, None, 0.0
        self.generator, self.loader = None, None
        pin = self.device.type == "cuda"
        if aug_device == "device":
            self.cache = cache.to(self.device)
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
            if isinstance(cache, DiskSlices):
                self.loader = torch.utils.data.DataLoader(  # its own generator: the global RNG (dropout) is left alone
                    RawBatches(cache), sampler=sampler, batch_size=None, num_workers=num_workers, pin_memory=pin,
                    persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))
        else:
            self.loader = torch.utils.data.DataLoader(
                AugmentedSlices(cache, strong), batch_sampler=sampler, num_workers=num_workers, pin_memory=pin,
                persistent_workers=num_workers > 0, collate_fn=collate_or_error)

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

    def _fetch(self, source):
        """The next item of ``source`` (timed); ``SliceReadError`` for an error message."""
        start = time.perf_counter()
        item = next(source)
        self.wait_seconds += time.perf_counter() - start
        if isinstance(item, str):
            raise SliceReadError(item)
        return item

    def _batches(self):
        if self.aug_device == "loader":
            source = iter(self.loader)
            while True:
                yield {k: v.to(self.device, non_blocking=True) for k, v in self._fetch(source).items()}
        if self.loader is not None:  # raw batches read from disk ahead of the step
            source = iter(self.loader)
            while True:
                images, labels = self._fetch(source)
                yield augment(images.to(self.device, non_blocking=True),
                              labels.to(self.device, non_blocking=True).long(), self.generator, self.strong)
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


DATA_CACHES = ("auto", "memory", "disk")
# --data_cache auto keeps the pool in memory only while it takes at most this share of what is free
HOST_SHARE, DEVICE_SHARE = 0.5, 0.25


def cache_bytes(n_slices, image_size):
    """Bytes of an in-memory pool: a float32 image and a uint8 label per slice at the network size."""
    return int(n_slices) * int(image_size) ** 2 * 5


def available_host_bytes():
    """Memory this process may still take: MemAvailable, capped by the cgroup's limit (a SLURM job,
    a container) minus what the cgroup uses."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (Path("/sys/fs/cgroup") / limit_file).read_text().strip()
            used = int((Path("/sys/fs/cgroup") / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2 ** 60:
            free = min(free, int(limit) - used)
    return max(free, 0)


def resolve_data_cache(choice, n_slices, image_size, device, aug_device, local_ranks=1):
    """``("memory" | "disk", why)`` for ``--data_cache choice``: ``auto`` keeps the pool in memory only
    where it fits (every local rank holds a copy; with ``--aug_device device`` on a GPU, the copy lives
    there); an explicit ``memory`` that cannot fit is refused (SystemExit naming the sizes)."""
    if choice not in DATA_CACHES:
        raise ValueError(f"--data_cache {choice!r}: expected one of {', '.join(DATA_CACHES)}")
    need = cache_bytes(n_slices, image_size)
    host = available_host_bytes()
    on_gpu = torch.device(device).type == "cuda" and aug_device == "device"
    gpu = torch.cuda.mem_get_info(torch.device(device))[0] if on_gpu else None
    what = (f"{n_slices} slices at {image_size}x{image_size}: {need / 2**30:.2f} GiB per rank, {local_ranks} rank(s); "
            f"{host / 2**30:.1f} GiB host memory free" + (f", {gpu / 2**30:.1f} GiB on the GPU" if on_gpu else ""))
    if choice == "disk":
        return "disk", what
    fits = need * local_ranks <= HOST_SHARE * host and (not on_gpu or need <= DEVICE_SHARE * gpu)
    if choice == "auto":
        return ("memory" if fits else "disk"), what
    if need * local_ranks > host or (on_gpu and need > gpu):
        raise SystemExit(f"--data_cache memory: the pool does not fit ({what}); use --data_cache disk or auto")
    return "memory", what


class TrainData:
    """Training slices of a dataset root: the labeled head of train_slices.list and the rest.

    ``labeled`` / ``unlabeled`` are index lists into ``cache`` (the unlabeled pool is every
    slice after the labeled ones: the reference used only half, its defect D5). ``data_cache``
    'memory' reads every slice now (``SliceCache``), 'disk' when a batch needs it (``DiskSlices``; the
    class check then comes from the root's slice index, not from the slices).
    """

    def __init__(self, root, labelnum, image_size, num_classes, table=None, data_cache="memory"):
        root = check_root(root)
        ids = read_list(root, "train_slices.list")
        count = labeled_slice_count(ids, labelnum, table)
        self.cache, index = make_source(root, ids, image_size, num_classes, data_cache)
        self.labeled = list(range(count))
        self.unlabeled = list(range(count, len(ids)))
        self.labelnum, self.list_path = labelnum, root / "train_slices.list"
        check_class_counts(index, num_classes, ids, root, data_cache,
                           f"--num_classes {num_classes}: class(es) {{absent}} occur in none of the {len(ids)} "
                           f"training slices of {root / 'train_slices.list'}; expected every class "
                           f"0..{num_classes - 1} to occur (is --num_classes right for this data?)")
        labeled = index.class_totals(self.labeled, num_classes)
        self.absent_in_labeled = [k for k in range(num_classes) if labeled[k] == 0]

    def stream(self, labeled_bs, unlabeled_bs, device, aug_device="device", num_workers=0, strong=True, seed=0):
        if unlabeled_bs and not self.unlabeled:
            raise ValueError(f"--labelnum {self.labelnum}: every slice of {self.list_path} is then labeled, so there is "
                             f"no unlabeled slice for the unlabeled half of the batch; label fewer cases or add "
                             f"unlabeled ones (docs/own_data.md)")
        sampler = TwoStreamSampler(self.labeled, self.unlabeled, labeled_bs, unlabeled_bs, seed)
        return BatchStream(self.cache, sampler, device, aug_device, num_workers, strong, seed)


def make_source(root, ids, image_size, num_classes, data_cache, unlabeled=(), order=None):
    """(slice source, its ``SliceIndex``) of the slices ``ids`` (train_slices.list) taken in ``order``
    (positions in ``ids``; default as listed): every slice read into memory now, or the files read per
    batch with the index from ``slice_index.load_index``. The index's rows follow the source's."""
    chosen = list(ids) if order is None else [ids[i] for i in order]
    if data_cache == "memory":
        cache = SliceCache(root, chosen, image_size, num_classes, unlabeled)
        return cache, cache.index
    if data_cache != "disk":
        raise ValueError(f"--data_cache {data_cache!r}: resolve 'auto' first (resolve_data_cache)")
    index = load_index(root, ids, unlabeled)
    if order is not None:
        index = SliceIndex(index.labeled[order], index.counts[order], index.shape)
    return DiskSlices(root, chosen, image_size, num_classes, unlabeled), index


def check_class_counts(index, num_classes, ids, root, data_cache, message):
    """ValueError ``message`` (``{absent}`` filled in) when a class occurs in none of the labeled slices
    of ``ids``; with the disk path, also a label value beyond the classes (the memory path has
    refused it while reading)."""
    if data_cache == "disk":
        bad = index.values_beyond(num_classes)
        if bad is not None:
            raise ValueError(f"{root / 'data' / 'slices' / (ids[bad] + '.h5')}: label values >= {num_classes}, "
                             f"expected [0, {num_classes}) (--num_classes {num_classes}; from the slice index)")
    totals = index.class_totals(range(len(ids)), num_classes)
    absent = [k for k in range(num_classes) if totals[k] == 0]
    if absent:
        raise ValueError(message.format(absent=absent))
