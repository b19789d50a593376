"""The slice index of a data root: what start-up needs from every training slice, without reading it.

    <root>/slice_index.npz   written by convert_dataset.py, preprocess_promise12.py, preprocess_acdc.py
                             and the synthetic generator, beside train_slices.list:
        list_sha256  the SHA-256 of train_slices.list it describes (a changed list makes it stale)
        labeled      (N,) bool: the slice has a 'label' on disk (False: an unlabeled case's slice)
        counts       (N, K) int64: pixels of each label value 0..K-1 in the stored slice
        shape        (2,) int64: the stored slice size (H, W)

The trainers check the classes (every class occurs somewhere, which are absent from the labeled
slices) from ``counts`` and size the in-memory cache from ``shape``, so start-up time does not grow
with the pool. A folder this project did not write (the processed ACDC release) gets its index built
once, from its labels, into the cache folder (``$SSCD_CACHE_DIR``, default ``~/.cache/sscd``), keyed by
the folder and its list; the data folder itself is never written.
"""
import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import h5py
import numpy as np

INDEX_NAME = "slice_index.npz"
LIST_NAME = "train_slices.list"
LOGGER = logging.getLogger("slice_index")


class SliceIndex:
    """``labeled`` (N,) bool, ``counts`` (N, K) int64 pixels per label value, ``shape`` (H, W)."""

    def __init__(self, labeled, counts, shape):
        self.labeled = np.asarray(labeled, dtype=bool)
        self.counts = np.asarray(counts, dtype=np.int64).reshape(len(self.labeled), -1)
        self.shape = tuple(int(v) for v in shape)

    def __len__(self):
        return len(self.labeled)

    def class_totals(self, rows, num_classes):
        """Pixels of each class 0..num_classes-1 over the labeled slices among ``rows`` (indices)."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[self.labeled[rows]] if rows.size else rows
        totals = self.counts[rows].sum(axis=0) if rows.size else np.zeros(self.counts.shape[1], np.int64)
        out = np.zeros(num_classes, dtype=np.int64)
        out[: min(num_classes, totals.size)] = totals[:num_classes]
        return out

    def values_beyond(self, num_classes):
        """Index of the first labeled slice holding a label value >= ``num_classes``, or None."""
        if self.counts.shape[1] <= num_classes:
            return None
        bad = np.flatnonzero(self.labeled & (self.counts[:, num_classes:].sum(axis=1) > 0))
        return int(bad[0]) if bad.size else None


def label_counts(label):
    """Pixels of each value 0..max of an integer label array (what one row of ``counts`` holds)."""
    return np.bincount(np.asarray(label, dtype=np.int64).ravel())


def stack_counts(rows):
    """(N, K) int64 from per-slice ``label_counts`` rows of any lengths (None: an unlabeled slice)."""
    width = max([len(r) for r in rows if r is not None] + [1])
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        if r is not None:
            out[i, : len(r)] = r
    return out


def index_folder(root):
    """Write ``root``/slice_index.npz for a folder just written (every listed slice labeled), from its
    slices' labels: what the preprocessing scripts call last."""
    ids = [line.strip() for line in (Path(root) / LIST_NAME).read_text().splitlines() if line.strip()]
    index = build_index(root, ids)
    return write_root_index(root, index.labeled, index.counts, index.shape)


def list_digest(root):
    """SHA-256 of ``root``/train_slices.list (the list an index describes)."""
    return hashlib.sha256((Path(root) / LIST_NAME).read_bytes()).hexdigest()


def write_index(path, digest, labeled, counts, shape):
    """Write an index atomically (a temporary file beside ``path``, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        arrays = {"list_sha256": np.array(digest), "labeled": np.asarray(labeled, dtype=bool),
                  "counts": np.asarray(counts, dtype=np.int64), "shape": np.asarray(shape, dtype=np.int64)}
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w") as z:  # np.savez's layout, without time stamps:
            for name, array in arrays.items():  # the same index is the same bytes
                with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_root_index(root, labeled, counts, shape):
    """The index of ``root`` (whose train_slices.list is written) at ``root``/slice_index.npz."""
    return write_index(Path(root) / INDEX_NAME, list_digest(root), labeled, counts, shape)


def read_index(path, digest, n_slices):
    """The index at ``path`` if it describes the list of SHA-256 ``digest`` (``n_slices`` slices), else
    None (absent or stale); ValueError naming the file if it is damaged."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["list_sha256"]) != digest:
                return None
            index = SliceIndex(f["labeled"], f["counts"], f["shape"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable slice index ({type(err).__name__}: {err}); delete it, it is "
                         f"rebuilt from the slices") from None
    if len(index) != n_slices or len(index.shape) != 2:
        raise ValueError(f"{path}: describes {len(index)} slices of shape {index.shape}, the list has "
                         f"{n_slices}; delete it, it is rebuilt from the slices")
    return index


def cache_dir():
    """Where indexes of folders this project did not write are kept ($SSCD_CACHE_DIR or ~/.cache/sscd)."""
    return Path(os.environ.get("SSCD_CACHE_DIR") or Path.home() / ".cache" / "sscd")


def cached_index_path(root, digest):
    key = hashlib.sha256(f"{Path(root).resolve()}\0{digest}".encode()).hexdigest()[:24]
    return cache_dir() / f"index-{key}.npz"


def load_index(root, ids, unlabeled=(), logger=None):
    """The index of the training slices ``ids`` of ``root`` (in train_slices.list order): the root's
    own, else the cached one, else built once from the slices' labels and cached."""
    root, digest = Path(root), list_digest(root)
    for path in (root / INDEX_NAME, cached_index_path(root, digest)):
        index = read_index(path, digest, len(ids))
        if index is not None:
            return index
    (logger or LOGGER).info(f"{root}: no slice index; reading the labels of its {len(ids)} training slices once "
                            f"(cached in {cache_dir()})")
    index = build_index(root, ids, unlabeled)
    try:
        write_index(cached_index_path(root, digest), digest, index.labeled, index.counts, index.shape)
    except OSError as err:
        (logger or LOGGER).warning(f"cannot cache the slice index in {cache_dir()} ({err}); it is rebuilt next time")
    return index


def build_index(root, ids, unlabeled=()):
    """Read every slice's label (and the image's shape) of ``ids``: the index of a folder without one."""
    unlabeled, rows, shape = set(unlabeled), [], None
    for sid in ids:
        path = Path(root) / "data" / "slices" / f"{sid}.h5"
        try:
            with h5py.File(path, "r") as f:
                shape = shape or tuple(f["image"].shape[-2:])
                rows.append(None if sid in unlabeled or "label" not in f else label_counts(_integer(f["label"][()], path)))
        except (OSError, KeyError) as err:
            raise ValueError(f"{path}: not a readable slice ({type(err).__name__}: {err})") from None
    return SliceIndex([r is not None for r in rows], stack_counts(rows), shape or (0, 0))


def check_integral(label, path):
    """``label`` unchanged when it can hold class indices (booleans, integers, or floats that are whole
    numbers); ValueError naming ``path`` and one odd value otherwise."""
    if label.dtype.kind not in "biuf":
        raise ValueError(f"{path}: label of type {label.dtype}, expected integer class indices")
    if label.dtype.kind == "f":
        odd = ~np.isfinite(label) | (label != np.round(label))
        if odd.any():
            raise ValueError(f"{path}: label holds non-integer values (e.g. {float(label[odd].flat[0]):g}); "
                             f"expected class indices")
    return label


def _integer(label, path):
    check_integral(label, path)
    if label.size and label.min() < 0:
        raise ValueError(f"{path}: label holds negative values; expected class indices")
    return label
