"""A raw NIfTI-1 file is read once (issue 37, "cheap"): ``read_image`` reads its voxels itself and asks
ITK only for the header's geometry. The image must be the one ``sitk.ReadImage`` gives, voxel for
voxel and in every geometry field, for each header form ITK reads differently (qform, sform, neither,
a negative qfac, two axes, a trailing axis of one voxel, a late voxel offset); the files ITK would not
return as stored (big-endian, scaled, four axes) must go through ITK's own read."""
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from dataloaders import image_check
from dataloaders.image_check import read_image

NIFTI_CODES = {"u1": 2, "i2": 4, "i4": 8, "f4": 16, "f8": 64, "i1": 256, "u2": 512, "u4": 768, "i8": 1024,
               "u8": 1280}
QUATERN = (0.1, -0.2, 0.3)  # an oblique rotation (b, c, d); a = sqrt(1 - b² - c² - d²)


def rotation(b, c, d):
    a = np.sqrt(1.0 - b * b - c * c - d * d)
    return np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                     [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                     [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])


def nifti1(array, path, order="<", qform=1, sform=1, qfac=1.0, spacing=(0.7, 0.9, 2.5), dims=None,
           vox_offset=352, slope=0.0, inter=0.0, intent=0):
    """Write ``array`` (numpy order z, y, x) as a NIfTI-1 file with the header fields given; ``dims``
    overrides the header's dim[0..]."""
    shape = array.shape[::-1]
    dims = list(dims or [len(shape), *shape])
    pixdim = ([qfac, *spacing[:len(shape)]] + [1.0] * 7)[:8]
    affine = rotation(*QUATERN) * np.array(spacing[:3]) * np.array([1.0, 1.0, qfac])
    offset = (-12.5, 30.25, 7.0)
    header = bytearray(348)

    def put(at, fmt, *values):
        header[at:at + struct.calcsize(order + fmt)] = struct.pack(order + fmt, *values)

    code = array.dtype.str[1:]
    put(0, "i", 348)
    put(40, "8h", *dims, *[1] * (8 - len(dims)))
    put(68, "h", intent)
    put(70, "hh", NIFTI_CODES[code], array.dtype.itemsize * 8)
    put(76, "8f", *pixdim)
    put(108, "f", float(vox_offset))
    put(112, "ff", slope, inter)
    put(123, "B", 2 + 8)  # mm, s
    put(252, "hh", qform, sform)
    put(256, "6f", *QUATERN, *offset)
    for row in range(3):
        put(280 + 16 * row, "4f", *affine[row], offset[row])
    header[344:348] = b"n+1\0"
    padding = bytes(vox_offset - 348)
    path.write_bytes(bytes(header) + padding + array.astype(array.dtype.newbyteorder(order)).tobytes())
    return path


def same_image(ours, itk):
    assert ours.GetPixelID() == itk.GetPixelID()
    assert ours.GetSize() == itk.GetSize()
    assert ours.GetSpacing() == itk.GetSpacing()
    assert ours.GetOrigin() == itk.GetOrigin()
    assert ours.GetDirection() == itk.GetDirection()
    assert np.array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(itk))


@pytest.fixture
def reads(monkeypatch):
    """How many files ``read_image`` read itself since the test began."""
    count = {"n": 0}
    original = image_check._read_nifti_voxels

    def counted(path, lay):
        count["n"] += 1
        return original(path, lay)

    monkeypatch.setattr(image_check, "_read_nifti_voxels", counted)
    return count


def volume(dtype, shape=(5, 7, 9), seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100.0, 40.0, size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -30000), min(info.max, 30000), size=shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("code", sorted(NIFTI_CODES))
def test_every_plain_element_type_is_read_once_as_itk_reads_it(tmp_path, reads, code):
    path = nifti1(volume(code), tmp_path / f"{code}.nii")
    same_image(read_image(path), sitk.ReadImage(str(path)))
    assert reads["n"] == 1


HEADERS = {
    "qform and sform": {},
    "sform only": {"qform": 0},
    "qform only": {"sform": 0},
    "neither (pixdim only)": {"qform": 0, "sform": 0},
    "qform, negative qfac": {"sform": 0, "qfac": -1.0},
    "late voxel offset": {"vox_offset": 480},
    # old FSL/SPM files: ITK's ImageFileReader turns a negative voxel size into a turned axis
    "qform, negative pixdim": {"sform": 0, "spacing": (-0.7, 0.9, 2.5)},
    "neither, negative pixdim": {"qform": 0, "sform": 0, "spacing": (0.7, -0.9, -2.5)},
}


@pytest.mark.parametrize("form", list(HEADERS))
def test_each_header_geometry_form_is_the_one_itk_reads(tmp_path, reads, form):
    path = nifti1(volume("i2", seed=1), tmp_path / "v.nii", **HEADERS[form])
    ours, itk = read_image(path), sitk.ReadImage(str(path))
    same_image(ours, itk)
    assert reads["n"] == 1
    assert ours.GetDirection() != (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0) or form == "neither (pixdim only)"
    assert min(ours.GetSpacing()) > 0


def test_two_axes_and_a_trailing_axis_of_one_voxel(tmp_path, reads):
    flat = volume("f4", shape=(7, 9), seed=2)
    path = nifti1(flat, tmp_path / "two.nii", spacing=(0.7, 0.9, 1.0))
    ours = read_image(path)
    same_image(ours, sitk.ReadImage(str(path)))
    assert ours.GetDimension() == 2
    one = nifti1(flat[None], tmp_path / "one.nii", dims=[3, 9, 7, 1])
    same_image(read_image(one), sitk.ReadImage(str(one)))
    time_of_one = nifti1(volume("i2", seed=2), tmp_path / "t1.nii", dims=[4, 9, 7, 5, 1])  # ITK: three axes
    same_image(read_image(time_of_one), sitk.ReadImage(str(time_of_one)))
    assert reads["n"] == 3


@pytest.mark.parametrize("case", ["big-endian", "scaled", "scaled float", "intercept only", "four axes", "vector"])
def test_files_itk_returns_otherwise_than_stored_are_read_by_itk(tmp_path, reads, case):
    """(A scaled float file keeps its element type: only the scaling flag sends it to ITK. ITK reads a
    slope of 0 as 1 and still adds the intercept.)"""
    shape = {"four axes": (2, 5, 7, 9), "vector": (3, 1, 5, 7, 9)}.get(case, (5, 7, 9))
    array = volume("f4" if case in ("scaled float", "intercept only", "vector") else "i2", shape=shape, seed=3)
    kwargs = {"big-endian": {"order": ">"}, "scaled": {"slope": 2.0, "inter": -5.0},
              "scaled float": {"slope": 2.0, "inter": -5.0}, "intercept only": {"slope": 0.0, "inter": 5.0},
              "four axes": {"dims": [4, 9, 7, 5, 2]},
              "vector": {"dims": [5, 9, 7, 5, 1, 3], "intent": 1007}}[case]  # a displacement field
    path = nifti1(array, tmp_path / "v.nii", **kwargs)
    ours = read_image(path)
    same_image(ours, sitk.ReadImage(str(path)))
    assert reads["n"] == 0
    if case == "vector":
        assert ours.GetNumberOfComponentsPerPixel() == 3 and ours.GetSize() == (9, 7, 5)
        return
    expected = {"scaled": array * np.float32(2.0) - np.float32(5.0), "intercept only": array + np.float32(5.0)}.get(
        case.replace(" float", ""), array)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(ours).reshape(array.shape), expected, rtol=1e-6)


def test_nan_in_a_file_read_once_is_counted_and_refused(tmp_path, reads):
    array = volume("f4", seed=4)
    array[1, 2, 3], array[4, 0, 0], array[0, 6, 8] = np.nan, np.inf, -np.inf
    path = nifti1(array, tmp_path / "nan.nii")
    assert (sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))[1, 2, 3]) == 0  # what ITK alone returns
    with pytest.raises(ValueError, match=r"nan\.nii: 3 NaN or infinite voxel\(s\); expected finite intensities"):
        read_image(path)
    assert reads["n"] == 1


def test_a_file_cut_after_its_size_was_checked_is_refused(tmp_path):
    """The file changed between ``check_sizes`` and the read (another process truncating it)."""
    path = nifti1(volume("i2", seed=5), tmp_path / "cut.nii")
    lay = image_check.check_sizes(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"cut\.nii: damaged or truncated file \(the header gives {lay.nbytes} "
                                         rf"bytes of voxel data, read {lay.nbytes - 10}\)"):
        image_check._read_nifti_voxels(path, lay)


def test_a_file_changed_or_removed_after_its_size_was_checked_is_refused_naming_it(tmp_path):
    path = nifti1(volume("f4", seed=6), tmp_path / "moved.nii")
    lay = image_check.check_sizes(path)
    nifti1(volume("f4", seed=6)[:, :, :8], path, vox_offset=352 + 5 * 7 * 4)  # same size, other header
    with pytest.raises(ValueError, match=r"moved\.nii: damaged or truncated file \(its header changed while it "):
        image_check._read_nifti_voxels(path, lay)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"^\S*moved\.nii: cannot be read \(No such file or directory\)$"):
        image_check._read_nifti_voxels(path, lay)


def test_a_voxel_offset_itk_would_cut_to_32_bits_is_refused(tmp_path):
    """ITK's NIfTI-1 reader keeps vox_offset in 32 bits: past 2 GiB it reads other bytes (a sparse file)."""
    path = nifti1(volume("i2", seed=7), tmp_path / "far.nii")
    data = path.read_bytes()
    with open(path, "r+b") as f:
        f.seek(108)
        f.write(struct.pack("<f", 2.0 ** 31 + 1024))
        f.truncate(2 ** 31 + 1024)
        f.seek(2 ** 31 + 1024)
        f.write(data[352:])
    with pytest.raises(ValueError, match=r"far\.nii: not a readable image \(NIfTI-1 voxel offset 2147484672; "
                                         r"expected below 2 GiB\)"):
        read_image(path)


def test_voxels_that_do_not_fit_in_memory_end_in_one_line(tmp_path, monkeypatch):
    path = nifti1(volume("i2", seed=8), tmp_path / "huge.nii")

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate")

    monkeypatch.setattr(image_check, "_read_nifti_voxels", no_memory)
    with pytest.raises(ValueError, match=rf"^\S*huge\.nii: not a readable image \(its {5 * 7 * 9 * 2} bytes of voxels, "
                                         r"held twice while read, do not fit in memory\)$"):
        read_image(path)


def test_a_folder_or_fifo_named_like_an_image_is_not_called_missing(tmp_path):
    import os
    (tmp_path / "dir.nii").mkdir()
    os.mkfifo(tmp_path / "pipe.nii")
    from dataloaders.volume_io import check_image_header
    for check in (read_image, check_image_header):  # predict checks every header first
        for name in ("dir.nii", "pipe.nii"):
            with pytest.raises(FileNotFoundError, match=rf"{name}: not a regular file$"):
                check(tmp_path / name)
        with pytest.raises(FileNotFoundError, match=r"gone\.nii: no such file$"):
            check(tmp_path / "gone.nii")


def test_an_intercept_without_slope_in_a_gzip_file_is_not_called_damaged(tmp_path):
    """The same scaling compressed: ITK's buffer is then not the stored bytes, so the whole stream is
    checked instead of refusing the file as damaged."""
    import gzip
    raw = nifti1(volume("f4", seed=9), tmp_path / "i.nii", slope=0.0, inter=5.0)
    packed = tmp_path / "i.nii.gz"
    packed.write_bytes(gzip.compress(raw.read_bytes()))
    same_image(read_image(packed), sitk.ReadImage(str(packed)))
