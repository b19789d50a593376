"""The case-by-case work of ``convert_dataset.py``: parallel, resumable, one case in memory per process.

A conversion writes into ``.<out>.partial`` beside ``--out`` (swapped in when every case is done). Each
case is converted by one process (``--workers``): its image and label are read and checked voxel by
voxel, preprocessed, written, and then its *record* ``.cases/<case>.json`` is written last: the source
files' sizes and modification times, every written file's size and CRC-32, the slice ids, their label
counts (the slice index) and the label values. An interrupted conversion leaves the partial folder; a
rerun with the same preprocessing keeps every case whose record still matches its sources and whose
files still match their CRCs (checked in the workers), and converts the rest. ``settings.json`` in the
partial folder holds the preprocessing it was made with; a rerun with another is refused, and an
exclusive lock on the folder keeps two conversions from writing it at once.
"""
import fcntl
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import h5py
import numpy as np
import SimpleITK as sitk

from common.geometry import check_geometry, check_single_channel_3d, resized_spacing
from dataloaders.image_check import checksums, read_image
from dataloaders.slice_index import check_integral, label_counts
from dataloaders.volume_io import blank_reason, geometry_meta, preprocess_image, preprocess_label

RECORDS = ".cases"
SETTINGS_FILE = "settings.json"


def file_crc(path):
    """(size, CRC-32) of a file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc, size = checksums.crc32(chunk, crc), size + len(chunk)
    return size, crc


def source_stamp(path):
    """What identifies a source file's version cheaply: [path, size, mtime in ns]."""
    if path is None:
        return None
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


def write_json(path, data):
    """Write JSON atomically."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def write_slice_h5(path, image, label=None, attrs=None):
    """Write 'image' (and 'label' when given: unlabeled slices have none) atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image)
        if label is not None:
            f.create_dataset("label", data=label)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    os.replace(tmp, path)


def stored_attrs(image, axis, size):
    """Geometry attributes of a stored volume (``common.geometry``): the source grid, the slice axis
    and the spacing (array order) of the stored (D, S, S) grid."""
    meta = geometry_meta(image, axis)
    zyx = list(reversed(meta["orig_spacing"]))
    depth_spacing = zyx.pop(2 - axis)
    size_zyx = list(reversed(meta["orig_size"]))
    size_zyx.pop(2 - axis)
    in_plane = resized_spacing((zyx[1], zyx[0], depth_spacing), (size_zyx[1], size_zyx[0], 1), (size, size))
    attrs = {k: np.asarray(v, dtype=np.int64 if k in ("orig_size", "slice_axis") else np.float64)
             for k, v in meta.items()}
    attrs.update({"spacing": np.asarray(in_plane, dtype=np.float64), "image_size": np.int64(size)})
    return attrs


def describe_change(key, before, after):
    """'preprocessing.size: 32 there, 64 now' (the differing entries of a dict setting, else the values)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        return ", ".join(f"{key}.{k}: {before.get(k)!r} there, {after.get(k)!r} now" for k in keys)
    return f"{key}: {before!r} there, {after!r} now"


def label_values(label, path):
    """The sorted distinct values of a label image; ValueError unless they are integers in 0..255."""
    values = check_integral(np.unique(sitk.GetArrayViewFromImage(label)), path)
    if values.size and values.min() < 0:
        raise ValueError(f"{path}: label holds negative values ({values.min():g}); expected class indices >= 0")
    if values.size and values.max() > 255:
        raise ValueError(f"{path}: label holds the value {values.max():g}; expected class indices 0..255")
    return values.astype(np.int64)


def read_case(entry):
    """(image, label array or None, label values or None, warnings) of one case, checked voxel by voxel."""
    image, warnings = read_image(entry["image"]), []
    check_single_channel_3d(image, entry["image"])
    array = sitk.GetArrayViewFromImage(image)
    constant = bool(array.size and array.min() == array.max())
    label_array, values = None, None
    if entry["label"] is not None:
        label = read_image(entry["label"])
        check_single_channel_3d(label, entry["label"])
        check_geometry(image, label, entry["image"], entry["label"])
        values = label_values(label, entry["label"])
        if constant and values.max(initial=0) > 0:
            raise ValueError(f"{entry['image']}: constant image (every voxel {float(array.min()):g}) with foreground "
                             f"in {entry['label']}; expected an image with contrast for a labeled case")
        label_array = sitk.GetArrayFromImage(label)
    if constant:
        warnings.append(f"{entry['image']}: constant image (every voxel {float(array.min()):g}): its slices are zeros "
                        f"and carry no information")
    return image, label_array, values, warnings


def convert_case(job):
    """Convert one case into ``job['folder']`` (or keep it when ``job['record']`` still verifies);
    returns its record. Runs in a worker process."""
    if job.get("record") is not None and record_holds(job["folder"], job["record"], job):
        return {**job["record"], "kept": True}
    folder, case, entry, split, recipe = Path(job["folder"]), job["case"], job["entry"], job["split"], job["recipe"]
    image, label_array, values, warnings = read_case(entry)
    volume, axis = preprocess_image(image, recipe, entry["image"])
    blank = blank_reason(image, volume)
    if blank and not blank.startswith("constant"):  # constant images were named by read_case
        warnings.append(f"{entry['image']}: {blank}: its slices are zeros and carry no information")
    size, files, labels = recipe["size"], [], None
    if label_array is not None:
        labels = preprocess_label(label_array, axis, size)
        files.append(f"data/{case}.h5")
        write_slice_h5(folder / files[-1], volume, labels, stored_attrs(image, axis, size))
    slices, counts = [], []
    if split in ("train", "unlabeled"):
        for k in range(volume.shape[0]):
            slices.append(f"{case}_slice_{k}")
            files.append(f"data/slices/{slices[-1]}.h5")
            write_slice_h5(folder / files[-1], volume[k], None if labels is None else labels[k])
            counts.append(None if labels is None else label_counts(labels[k]).tolist())
    record = {"case": case, "split": split, "recipe": recipe, "axis": int(axis), "warnings": warnings,
              "sources": [source_stamp(entry["image"]), source_stamp(entry["label"])],
              "values": None if values is None else values.tolist(), "slices": slices, "counts": counts,
              "files": {name: file_crc(folder / name) for name in files}}
    write_json(folder / RECORDS / f"{case}.json", record)
    return {**record, "kept": False}


def record_holds(folder, record, job):
    """True when a case's record is of this job (split, recipe, unchanged sources) and every file it
    names still has its size and CRC-32."""
    entry = job["entry"]
    try:
        if (record.get("split") != job["split"] or record.get("recipe") != job["recipe"]
                or record.get("sources") != [source_stamp(entry["image"]), source_stamp(entry["label"])]):
            return False
        return all(list(file_crc(Path(folder) / name)) == list(stamp) for name, stamp in record["files"].items())
    except (OSError, KeyError, TypeError, ValueError):
        return False


def read_records(folder):
    """{case: record} of the records in a partial folder (unreadable ones are ignored: reconverted)."""
    records = {}
    for path in sorted((Path(folder) / RECORDS).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            records[record["case"]] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


class PartialFolder:
    """``.<out>.partial`` beside ``out``, locked while this conversion writes it (``flock`` on the
    folder: released by the kernel if the process dies). ``records``: the cases an interrupted
    conversion with the same ``settings`` finished; one with other settings is refused unless
    ``discard`` (--overwrite)."""

    def __init__(self, out, settings, discard=False):
        out = Path(out)
        self.path = out.parent / f".{out.name}.partial"
        self.path.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise FileExistsError(f"--out {out}: another conversion is writing it ({self.path}); wait for it to "
                                  f"end") from None
        saved = self._saved_settings()
        if saved is not None and saved != settings and not discard:
            self.release()
            changed = "; ".join(describe_change(k, saved.get(k), settings.get(k)) for k in sorted(settings)
                                if saved.get(k) != settings.get(k))
            raise FileExistsError(f"--out {out}: an interrupted conversion with other settings ({changed}) is in "
                                  f"{self.path}; rerun with its settings to finish it, or pass --overwrite to "
                                  f"discard it")
        if saved != settings:
            self._empty()
        (self.path / RECORDS).mkdir(parents=True, exist_ok=True)
        (self.path / "data" / "slices").mkdir(parents=True, exist_ok=True)
        write_json(self.path / SETTINGS_FILE, settings)
        self.records = read_records(self.path)

    def _saved_settings(self):
        try:
            return json.loads((self.path / SETTINGS_FILE).read_text())
        except (OSError, ValueError):
            return None

    def _empty(self):
        for entry in self.path.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def finish(self, keep_files):
        """Delete the records, the settings and every file of data/ not in ``keep_files`` (a case
        dropped since the interruption, a write cut short); the folder is then the conversion."""
        shutil.rmtree(self.path / RECORDS)
        (self.path / SETTINGS_FILE).unlink()
        keep = set(keep_files)
        for path in list((self.path / "data").rglob("*")):
            if path.is_file() and path.relative_to(self.path).as_posix() not in keep:
                path.unlink()

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def run_jobs(jobs, workers, on_done=None):
    """``convert_case`` over ``jobs`` in ``workers`` processes (in this one for 1); returns the records
    by case. On the first error the jobs not started are cancelled, the running ones finish (their
    records make them resumable) and the error is raised."""
    records = {}
    if workers <= 1:
        for job in jobs:
            records[job["case"]] = convert_case(job)
            if on_done:
                on_done(records[job["case"]])
        return records
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                             initializer=_worker_init, initargs=(workers,)) as pool:
        futures = [pool.submit(convert_case, job) for job in jobs]
        try:
            for future in as_completed(futures):
                record = future.result()
                records[record["case"]] = record
                if on_done:
                    on_done(record)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return records


def _worker_init(workers):
    """Share the cores: each worker's ITK uses its part of them."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, (os.cpu_count() or 1) // workers))
