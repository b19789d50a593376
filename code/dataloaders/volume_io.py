"""Reading a user's image files and the preprocessing recipe shared by ``convert_dataset.py`` and
``predict.py``: the converter writes what ``preprocess_image`` returns, and prediction replays the
very same function on a new scan, so a model sees at prediction time exactly what it was trained on.

A recipe is a plain dict (stored in ``dataset.json`` and in every checkpoint trained on the data)::

    {"normalization": "percentile_minmax" | "minmax" | "promise12_slice",
     "percentiles": [0.5, 99.5],          # percentile_minmax / promise12_slice
     "clahe": false,                      # promise12_slice only
     "slice_axis": "largest_spacing" | "x" | "y" | "z",
     "size": 256 | null}                  # stored slice size S (bilinear), or null: native size

- ``percentile_minmax`` (converted data sets): clip the whole volume to its percentiles, map to [0, 1]
  (a constant volume becomes zeros), then resize every slice to S x S (bilinear).
- ``minmax`` (ACDC): ``(v - min) / (max - min)`` per volume, slices kept at their native size.
- ``promise12_slice`` (PROMISE12 layout): ``preprocess_promise12.preprocess_arrays`` (resize, then
  per-slice percentiles, optional CLAHE).

``slice_axis``: the through-plane axis, in SimpleITK index order (x = 0, y = 1, z = 2);
``largest_spacing`` picks the axis with the largest voxel spacing (within 0.1 %), ties going to z, then y;
an axis of one voxel is always the slice axis.
"""
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common.geometry import check_shape, resize_slices
from dataloaders.image_check import (check_grid, check_sizes, held_stderr, itk_cause, itk_reader,  # noqa: F401
                                     read_image, require_file)  # read_image: re-exported
from dataloaders.preprocess_promise12 import preprocess_arrays

# file endings SimpleITK reads that this project accepts (longest first, so .nii.gz wins over .gz)
IMAGE_ENDINGS = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")
AXES = {"x": 0, "y": 1, "z": 2}
SLICE_AXIS_RULES = ("largest_spacing", "x", "y", "z")
NORMALIZATIONS = ("percentile_minmax", "minmax", "promise12_slice")
DEFAULT_PERCENTILES = (0.5, 99.5)
SPACING_TIE = 1e-3  # spacings within this fraction of the largest count as equal (slice_axis)


def image_ending(name):
    """The accepted image ending of a file name ('.nii.gz', '.mha', ...), or None."""
    lower = str(name).lower()
    return next((e for e in IMAGE_ENDINGS if lower.endswith(e)), None)


def check_image_header(path):
    """Read only the header of ``path`` (and its data file's size): ValueError unless a readable 3-D
    single-channel image whose data are as long as its header says. Returns the ``ImageFileReader``
    (``GetSize``, ``GetSpacing``, ``GetOrigin``, ``GetDirection`` as an image's)."""
    path = require_file(path)
    lay = check_sizes(path)
    reader = itk_reader(path, lay)
    failure = None
    with held_stderr() as printed:  # what ITK prints about it is shown once, when the file is read
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            failure = err
    if failure is not None:
        raise ValueError(f"{path}: not a readable image ({itk_cause(failure, printed, lay)})") from None
    check_shape(reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize(), path)
    check_grid(path, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    return reader


def check_recipe(recipe):
    """ValueError unless ``recipe`` names a known normalisation, slice-axis rule and size."""
    if recipe.get("normalization") not in NORMALIZATIONS:
        raise ValueError(f"preprocessing normalization {recipe.get('normalization')!r}: expected one of "
                         f"{list(NORMALIZATIONS)}")
    if recipe.get("slice_axis") not in SLICE_AXIS_RULES:
        raise ValueError(f"preprocessing slice_axis {recipe.get('slice_axis')!r}: expected one of "
                         f"{list(SLICE_AXIS_RULES)}")
    size = recipe.get("size")
    if size is not None and (not isinstance(size, int) or size < 8):
        raise ValueError(f"preprocessing size {size!r}: expected an integer >= 8 or null")
    return recipe


def slice_axis(spacing, rule, size=None):
    """The through-plane axis (SimpleITK index: x 0, y 1, z 2) for ``spacing`` (x, y, z) under ``rule``.

    ``largest_spacing``: the axis of largest spacing, where spacings within ``SPACING_TIE`` (relative)
    of the largest count as equal and ties go to z, then y (so 1 and 1.0000001 mm cut alike). With
    ``size`` (x, y, z) given, an axis of fewer than 2 voxels is always the slice axis: a slice needs two
    voxels in each direction. ValueError when no axis fits or a spacing is not positive and finite."""
    spacing = [float(s) for s in spacing]
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"voxel spacing {spacing}: expected positive finite sizes")
    thin = [k for k in range(3) if size is not None and int(size[k]) < 2]
    if rule != "largest_spacing":
        if any(k != AXES[rule] for k in thin):
            raise ValueError(f"slice axis {rule}: the image has {int(size[thin[0]])} voxel(s) along "
                             f"{'xyz'[thin[0]]}; a slice needs at least 2 in each in-plane direction")
        return AXES[rule]
    if len(thin) > 1:
        raise ValueError(f"size {list(size)}: fewer than 2 voxels along {len(thin)} axes; expected a 3-D volume")
    if thin:
        return thin[0]
    top = max(spacing)
    return max(k for k in range(3) if spacing[k] >= top * (1 - SPACING_TIE))


def to_slices(array, axis):
    """View of a SimpleITK-order array (z, y, x) with the slices of ``axis`` (x 0, y 1, z 2) first."""
    return np.moveaxis(array, 2 - axis, 0)


def from_slices(array, axis):
    """Inverse of ``to_slices``: back to (z, y, x)."""
    return np.moveaxis(array, 0, 2 - axis)


def _percentile_minmax_slices(slices, percentiles, size):
    """Clip the volume to its percentiles, map to [0, 1] and resize every slice to ``size`` (bilinear),
    one slice at a time in float64 (memory: the output plus one slice); float32 (D, S, S)."""
    low, high = (float(v) for v in np.percentile(slices, percentiles))
    depth = slices.shape[0]
    shape = (depth, size, size) if size else slices.shape
    out = np.empty(shape, dtype=np.float32)
    for k in range(depth):
        x = slices[k].astype(np.float64)
        x = (np.clip(x, low, high) - low) / (high - low) if high > low else np.zeros_like(x)
        out[k] = resize_slices(x[None], (size, size), order=1)[0] if size else x
    return out


def preprocess_image(image, recipe, path="image"):
    """``(volume, axis)``: the float32 (D, H, W) slice stack the network sees (before its own nearest
    resize to the network size) for a SimpleITK ``image``, and the slice axis used. ValueError naming
    ``path`` when the normalisation overflows (an intensity range near the float64 limits)."""
    check_recipe(recipe)
    try:
        axis = slice_axis(image.GetSpacing(), recipe["slice_axis"], image.GetSize())
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    slices = to_slices(sitk.GetArrayViewFromImage(image), axis)
    method, size = recipe["normalization"], recipe.get("size")
    with np.errstate(over="ignore", invalid="ignore"):
        if method == "percentile_minmax":
            volume = _percentile_minmax_slices(slices, recipe.get("percentiles", DEFAULT_PERCENTILES), size)
        elif method == "minmax":
            volume = np.asarray(slices, dtype=np.float64)
            lo, hi = volume.min(), volume.max()
            volume = ((volume - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros(volume.shape, np.float32)
            volume = resize_slices(volume, (size, size), order=1).astype(np.float32) if size else volume
        else:  # promise12_slice: the PROMISE12 preprocessing itself (resize, per-slice percentiles, CLAHE)
            volume, _ = preprocess_arrays(np.asarray(slices), np.zeros(slices.shape, np.uint8), size,
                                          bool(recipe.get("clahe", False)))
    if not np.isfinite(volume).all():
        raise ValueError(f"{path}: its intensities ({float(slices.min()):g} .. {float(slices.max()):g}) overflow the "
                         f"normalisation; expected a finite range")
    return volume, axis


def preprocess_label(label_array, axis, size):
    """A (z, y, x) label array as the uint8 (D, S, S) stack matching ``preprocess_image``."""
    slices = to_slices(np.asarray(label_array), axis)
    return (resize_slices(slices, (size, size), order=0) if size else np.array(slices)).astype(np.uint8)


def blank_reason(image, volume):
    """Why the preprocessed ``volume`` of ``image`` carries no information, or None: a constant image,
    or an intensity range that the normalisation maps to one value (equal percentiles)."""
    if volume.size == 0 or volume.min() != volume.max():
        return None
    array = sitk.GetArrayViewFromImage(image)
    low, high = array.min(), array.max()
    if low == high:
        return f"constant image (every voxel {float(low):g})"
    return "its intensities normalise to one value (equal low and high percentiles)"


def geometry_meta(image, axis):
    """What ``common.geometry.write_label_image`` needs to write a stored-grid prediction back onto
    ``image``'s grid (size, spacing, origin, direction, slice axis)."""
    return {"orig_size": tuple(int(v) for v in image.GetSize()),
            "orig_spacing": tuple(float(v) for v in image.GetSpacing()),
            "origin": tuple(float(v) for v in image.GetOrigin()),
            "direction": tuple(float(v) for v in image.GetDirection()),
            "slice_axis": int(axis)}


def export_h5_volume(h5_path, out_path, key="image"):
    """Write dataset ``key`` of a processed volume (``data/<case>.h5``) as an image file, with the
    geometry the test scripts give its predictions: the stored ``spacing`` attribute (array order,
    reversed for SimpleITK) when present, else 1 mm; origin 0 and identity direction. Used to hand the
    processed ACDC volumes (no stored geometry) to ``predict.py``."""
    import h5py
    with h5py.File(h5_path, "r") as f:
        array = np.asarray(f[key])
        spacing = tuple(float(s) for s in reversed(np.asarray(f.attrs["spacing"]).ravel())) \
            if "spacing" in f.attrs else (1.0, 1.0, 1.0)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(out_path), True)
    return Path(out_path)
