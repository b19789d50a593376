"""Image geometry helpers: in-plane resizing, volume metadata, label-image checks, writing predictions back.

Processed volumes (``<out>/data/<case>.h5``, see ``dataloaders.preprocess_promise12``) store an
array of shape (D, S, S): every axial slice of the source image resized to S x S. They carry
these attributes:

- ``spacing``      (sz, sy, sx) voxel spacing of the stored (D, S, S) grid, in ARRAY axis order;
- ``orig_spacing`` (x, y, z) spacing of the source image, SimpleITK order;
- ``orig_size``    (x, y, z) size of the source image, SimpleITK order;
- ``origin``       (x, y, z) origin of the source image;
- ``direction``    9 floats, row-major direction matrix of the source image;
- ``slice_axis``   (optional, converted data sets) the source axis the slices run along, SimpleITK
                   index x 0, y 1, z 2 (default z): the stored stack is the source array with that
                   axis moved first (``dataloaders.volume_io.to_slices``).

The resize maps pixel centres to pixel centres (``scipy.ndimage.zoom`` with ``grid_mode=True``,
identical to ``torch.nn.functional.interpolate(..., align_corners=False)``), so an in-plane pixel of
the stored grid covers exactly ``orig_spacing * orig_extent / S`` millimetres.
"""
from pathlib import Path

import h5py
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

META_KEYS = ("spacing", "orig_spacing", "origin", "direction", "orig_size", "slice_axis")


def resize_slices(volume, out_hw, order):
    """Resize every slice of a (D, H, W) array to (D, out_h, out_w).

    ``order`` 1 = bilinear (images), 0 = nearest (labels). Pixel centres are aligned
    (``grid_mode=True``), edges replicate. The depth axis is left untouched.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"resize_slices expects a (D, H, W) array, got shape {volume.shape}")
    out_h, out_w = (int(v) for v in out_hw)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"resize_slices: output size must be positive, got {out_hw}")
    if order not in (0, 1):
        raise ValueError(f"resize_slices: order must be 0 (nearest) or 1 (bilinear), got {order}")
    _, h, w = volume.shape
    if (h, w) == (out_h, out_w):
        return volume.copy()
    factors = (1.0, out_h / h, out_w / w)
    resized = ndimage.zoom(volume, factors, order=order, grid_mode=True, mode="nearest")
    expected = (volume.shape[0], out_h, out_w)
    if resized.shape != expected:
        raise RuntimeError(f"resize_slices produced {resized.shape}, expected {expected}")
    return resized


def resized_spacing(orig_spacing, orig_size, out_hw):
    """Spacing (sz, sy, sx) in array order of a volume whose slices were resized to out_hw.

    ``orig_spacing`` and ``orig_size`` are in SimpleITK order (x, y, z).
    """
    sx, sy, sz = (float(v) for v in orig_spacing)
    nx, ny, _ = (int(v) for v in orig_size)
    out_h, out_w = (int(v) for v in out_hw)
    return (sz, sy * ny / out_h, sx * nx / out_w)


def load_volume_meta(h5_path):
    """Geometry attributes of a processed volume file, as Python tuples.

    Returns a dict holding whichever of ``spacing``, ``orig_spacing``, ``origin``, ``direction``
    (floats) and ``orig_size`` (ints) the file carries; an empty dict for files without metadata
    (e.g. the processed ACDC release).
    """
    path = Path(h5_path)
    if not path.is_file():
        raise FileNotFoundError(f"load_volume_meta: no such file {path}")
    with h5py.File(path, "r") as f:
        meta = {}
        for key in META_KEYS:
            if key in f.attrs:
                values = np.asarray(f.attrs[key]).ravel()
                cast = int if key in ("orig_size", "slice_axis") else float
                meta[key] = int(values[0]) if key == "slice_axis" else tuple(cast(v) for v in values)
    return meta


def _check_meta_lengths(meta):
    """Raise if a metadata entry has the wrong number of values."""
    expected = {"spacing": 3, "orig_spacing": 3, "origin": 3, "direction": 9, "orig_size": 3}
    for key, n in expected.items():
        if key in meta and len(meta[key]) != n:
            raise ValueError(f"meta[{key!r}] must have {n} values, got {len(meta[key])}")


def restore_original_geometry(pred, meta):
    """Inverse of the preprocessing resize for a label volume: (D, S, S) -> (D, orig_y, orig_x).

    Nearest-neighbour interpolation, so label values are preserved. ``meta`` must hold
    ``orig_size`` (x, y, z); D must equal its z entry.
    """
    pred = np.asarray(pred)
    if pred.ndim != 3:
        raise ValueError(f"restore_original_geometry expects a (D, S, S) array, got shape {pred.shape}")
    if "orig_size" not in meta:
        raise ValueError("restore_original_geometry: meta has no 'orig_size' (x, y, z)")
    _check_meta_lengths(meta)
    axis = int(meta.get("slice_axis", 2))
    if axis not in (0, 1, 2):
        raise ValueError(f"meta['slice_axis'] must be 0, 1 or 2, got {axis}")
    nx, ny, nz = meta["orig_size"]
    shape = [nz, ny, nx]
    depth = shape.pop(2 - axis)
    height, width = shape
    if pred.shape[0] != depth:
        raise ValueError(
            f"restore_original_geometry: prediction has {pred.shape[0]} slices, "
            f"meta['orig_size'] {meta['orig_size']} says {depth} along axis {axis}")
    return np.moveaxis(resize_slices(pred, (height, width), order=0), 0, 2 - axis)


def write_label_image(pred, meta, path):
    """Write a (D, H, W) label volume as an image file (e.g. ``.nii.gz``) with SimpleITK.

    - ``meta`` with ``orig_size``: the prediction is restored to the original grid and written with
      the original size, spacing, origin and direction, so it overlays the source image.
    - ``meta`` with only ``spacing`` (array order, e.g. ACDC): written as is with that spacing.
    - ``meta`` None or empty: identity geometry, spacing 1.
    Labels are stored as uint8. Returns the written path.
    """
    pred = np.asarray(pred)
    if pred.ndim != 3:
        raise ValueError(f"write_label_image expects a (D, H, W) array, got shape {pred.shape}")
    if pred.size and (pred.min() < 0 or pred.max() > 255 or not np.array_equal(pred, np.round(pred))):
        raise ValueError("write_label_image: labels must be integers in [0, 255]")
    meta = dict(meta or {})
    _check_meta_lengths(meta)
    if "orig_size" in meta:
        array = restore_original_geometry(pred, meta)
    else:
        array = pred
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    if "orig_size" in meta:
        for key in ("orig_spacing", "origin", "direction"):
            if key not in meta:
                raise ValueError(f"write_label_image: meta has 'orig_size' but no {key!r}")
        image.SetSpacing(meta["orig_spacing"])
        image.SetOrigin(meta["origin"])
        image.SetDirection(meta["direction"])
    elif "spacing" in meta:
        image.SetSpacing(tuple(reversed(meta["spacing"])))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def check_shape(dimension, channels, size, path):
    """ValueError naming ``path`` unless the image is 3-D with one channel per voxel."""
    if channels != 1:
        raise ValueError(f"{path}: {channels} channels per voxel (RGB or vector image); expected a single-channel "
                         f"3-D image (multi-channel input is not supported, see docs/own_data.md)")
    if dimension != 3:
        raise ValueError(f"{path}: a {dimension}-D image of size {tuple(size)}; expected a 3-D single-channel "
                         f"image (split 4-D series into one file per volume)")


def check_single_channel_3d(image, path):
    """ValueError naming ``path`` unless ``image`` is a 3-D scalar image (one channel)."""
    check_shape(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize(), path)


GEOMETRY_TOLERANCE = 1e-3  # spacing, origin and direction of a label may differ from its image's by this much


def check_geometry(image, label, image_path, label_path):
    """ValueError naming the label file if its size, spacing, origin or direction differ from the image's
    (beyond ``GEOMETRY_TOLERANCE``)."""
    if image.GetSize() != label.GetSize():
        raise ValueError(f"{label_path}: size {label.GetSize()} differs from the image's {image.GetSize()} "
                         f"({image_path})")
    for prop in ("Spacing", "Origin", "Direction"):
        a, b = np.asarray(getattr(image, f"Get{prop}")()), np.asarray(getattr(label, f"Get{prop}")())
        if a.shape != b.shape or not np.max(np.abs(a - b)) <= GEOMETRY_TOLERANCE:  # NaN never agrees
            raise ValueError(f"{label_path}: {prop.lower()} {_show(b)} differs from the image's {_show(a)} "
                             f"(tolerance {GEOMETRY_TOLERANCE}; {image_path})")


def _show(values):
    """'(0.8, 0.9, 3)': a vector with 6 significant digits."""
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"
