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
``largest_spacing`` picks the axis with the largest voxel spacing, ties going to z, then y.
"""
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dataloaders.preprocess_promise12 import preprocess_arrays
from utils.geometry import check_shape, resize_slices

# file endings SimpleITK reads that this project accepts (longest first, so .nii.gz wins over .gz)
IMAGE_ENDINGS = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")
AXES = {"x": 0, "y": 1, "z": 2}
SLICE_AXIS_RULES = ("largest_spacing", "x", "y", "z")
NORMALIZATIONS = ("percentile_minmax", "minmax", "promise12_slice")
DEFAULT_PERCENTILES = (0.5, 99.5)


def image_ending(name):
    """The accepted image ending of a file name ('.nii.gz', '.mha', ...), or None."""
    lower = str(name).lower()
    return next((e for e in IMAGE_ENDINGS if lower.endswith(e)), None)


def read_image(path):
    """A SimpleITK image from ``path``; ValueError naming the file when SimpleITK cannot read it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = next((line for line in lines if "itk::ERROR" in line or "Unable" in line), lines[-1] if lines else "")
        raise ValueError(f"{path}: not a readable image ({cause[:200]})") from None


def check_image_header(path):
    """Read only the header of ``path``: ValueError unless a readable 3-D single-channel image."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        read_image(path)  # raises the one-line error naming the file
        raise
    check_shape(reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize(), path)


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


def slice_axis(spacing, rule):
    """The through-plane axis (SimpleITK index: x 0, y 1, z 2) for ``spacing`` (x, y, z) under ``rule``."""
    if rule != "largest_spacing":
        return AXES[rule]
    spacing = [float(s) for s in spacing]
    return max(range(3), key=lambda k: (spacing[k], k))


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


def preprocess_image(image, recipe):
    """``(volume, axis)``: the float32 (D, H, W) slice stack the network sees (before its own nearest
    resize to the network size) for a SimpleITK ``image``, and the slice axis used."""
    check_recipe(recipe)
    axis = slice_axis(image.GetSpacing(), recipe["slice_axis"])
    slices = to_slices(sitk.GetArrayViewFromImage(image), axis)
    method, size = recipe["normalization"], recipe.get("size")
    if method == "percentile_minmax":
        return _percentile_minmax_slices(slices, recipe.get("percentiles", DEFAULT_PERCENTILES), size), axis
    if method == "minmax":
        volume = np.asarray(slices, dtype=np.float64)
        lo, hi = volume.min(), volume.max()
        volume = ((volume - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros(volume.shape, np.float32)
        return (resize_slices(volume, (size, size), order=1).astype(np.float32) if size else volume), axis
    # promise12_slice: the PROMISE12 preprocessing itself (resize, per-slice percentiles, CLAHE)
    volume, _ = preprocess_arrays(np.asarray(slices), np.zeros(slices.shape, np.uint8), size,
                                  bool(recipe.get("clahe", False)))
    return volume, axis


def preprocess_label(label_array, axis, size):
    """A (z, y, x) label array as the uint8 (D, S, S) stack matching ``preprocess_image``."""
    slices = to_slices(np.asarray(label_array), axis)
    return (resize_slices(slices, (size, size), order=0) if size else np.array(slices)).astype(np.uint8)


def geometry_meta(image, axis):
    """What ``utils.geometry.write_label_image`` needs to write a stored-grid prediction back onto
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
