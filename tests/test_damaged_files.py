"""Damaged image and label files (issue 37): every reader refuses a file whose voxel data are shorter
than its header says or whose compressed stream is damaged, with one line naming the file, and writes
nothing for it. A seeded, bounded fuzz test cuts and flips files of every accepted format and runs
the converter and predict.py on them."""
import gzip
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import predict
from common.errors import run_cli
from conftest import load_script
from dataloaders import convert_dataset, image_check, preprocess_acdc, preprocess_promise12
from dataloaders.volume_io import read_image
from own_data import phantom, random_custom_checkpoint

SHAPE, SPACING = (4, 20, 24), (0.8, 0.8, 3.0)
# (ending, compressed): every format the project accepts, with and without compression
FORMATS = [(".nii.gz", True), (".nii", False), (".mha", False), (".mha", True), (".mhd", False), (".mhd", True),
           (".nrrd", False), (".nrrd", True), (".nhdr", False), (".nhdr", True)]
IDS = [f"{e[1:]}{'-z' if c else ''}" for e, c in FORMATS]


def write(array, path, compressed):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin((1.0, -2.0, 3.5))
    sitk.WriteImage(image, str(path), compressed)
    return Path(path)


def data_file(path):
    """The file holding the voxels of ``path`` (itself, or a detached header's data file)."""
    return image_check.layout(path).data_path


def one_line_error(main, argv):
    """The message a script ends with, or None when it succeeded."""
    try:
        run_cli(main, argv)
    except SystemExit as stop:
        message = str(stop.code)
        assert "\n" not in message, message
        return message
    return None


# ------------------------------------------------------------------ the size and checksum checks

@pytest.mark.parametrize("ending,compressed", FORMATS, ids=IDS)
def test_intact_files_pass_and_read_the_written_voxels(tmp_path, ending, compressed):
    image, label = phantom(SHAPE, seed=1)
    for array in (image, label):
        path = write(array, tmp_path / f"v{ending}", compressed)
        assert np.array_equal(sitk.GetArrayFromImage(read_image(path)), array)
        lay = image_check.check_sizes(path)
        assert lay.nbytes == array.nbytes and lay.encoding == (
            "raw" if not compressed else "zlib" if ending in (".mha", ".mhd") else "gzip")


@pytest.mark.parametrize("ending,compressed", FORMATS, ids=IDS)
def test_a_file_one_byte_short_is_refused_naming_it(tmp_path, ending, compressed):
    path = write(phantom(SHAPE, seed=2)[0], tmp_path / f"v{ending}", compressed)
    target = data_file(path)
    target.write_bytes(target.read_bytes()[:-1])
    with pytest.raises(ValueError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: damaged or truncated file (") and "\n" not in message
    if not compressed:
        assert f"the header gives {SHAPE[0] * SHAPE[1] * SHAPE[2] * 2} bytes of voxel data, found " \
               f"{SHAPE[0] * SHAPE[1] * SHAPE[2] * 2 - 1}" in message


def test_truncated_nifti_gz_that_itk_reads_as_zeros_is_refused(tmp_path):
    """The case of the issue: ITK returns the lost half of a cut .nii.gz as zeros, without an error."""
    image = np.random.default_rng(0).integers(0, 1000, size=(8, 64, 64)).astype(np.int16)
    path = write(image, tmp_path / "half.nii.gz", True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    read_by_itk = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert (read_by_itk == 0).mean() > 0.3  # what ITK alone gives
    with pytest.raises(ValueError, match=r"half\.nii\.gz: damaged or truncated file \(the gzip stream ends early, "
                                         r"after \d+ of 65888 bytes\)"):
        read_image(path)


def test_longer_data_than_the_header_says_is_refused(tmp_path):
    path = write(phantom(SHAPE, seed=3)[0], tmp_path / "v.nii", False)
    path.write_bytes(path.read_bytes() + b"\0\0")
    with pytest.raises(ValueError, match=r"the header gives 3840 bytes of voxel data, found 3842"):
        read_image(path)


@pytest.mark.parametrize("ending,compressed", [f for f in FORMATS if f[1]], ids=[i for i, f in zip(IDS, FORMATS) if f[1]])
def test_the_stream_checksum_is_compared_with_the_voxels_itk_returned(tmp_path, ending, compressed):
    """Voxels that ITK returned from a stream whose checksum does not match them are refused: here
    the stored checksum (gzip CRC-32, zlib Adler-32) is changed after ITK read the intact file."""
    path = write(phantom(SHAPE, seed=4)[0], tmp_path / f"v{ending}", compressed)
    image = sitk.ReadImage(str(path))
    lay = image_check.check_sizes(path)
    image_check.check_voxels(path, image, lay)  # intact: passes
    target = lay.data_path
    raw = bytearray(target.read_bytes())
    end = len(raw) - 4 if lay.encoding == "gzip" else lay.offset + lay.stored_size
    raw[end - 4] ^= 1
    target.write_bytes(bytes(raw))
    lay = image_check.check_sizes(path)  # the sizes still agree: only the checksum tells
    with pytest.raises(ValueError, match=rf"v\{ending}: damaged or truncated file \({lay.encoding} stream: .*"
                                         r"incorrect data check"):
        image_check.check_voxels(path, image, lay)


def test_scaled_and_multi_member_gzip_files_are_checked_on_the_whole_stream(tmp_path):
    """Where ITK's buffer is not the stored bytes (NIfTI slope/intercept) or the gzip file has two
    members (bgzip, concatenation), the whole stream is decompressed: intact files pass, cut ones fail."""
    plain = write(phantom(SHAPE, seed=5)[0], tmp_path / "p.nii", False)
    header = bytearray(plain.read_bytes())
    header[112:120] = struct.pack("<ff", 2.0, 10.0)  # scl_slope, scl_inter
    data = bytes(header)
    scaled = tmp_path / "s.nii.gz"
    scaled.write_bytes(gzip.compress(data))
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(plain))) * 2.0 + 10.0
    np.testing.assert_allclose(sitk.GetArrayFromImage(read_image(scaled)), expected)
    two = tmp_path / "m.nii.gz"
    two.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    assert np.array_equal(sitk.GetArrayFromImage(read_image(two)), sitk.GetArrayFromImage(read_image(scaled)))
    two.write_bytes(two.read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"m\.nii\.gz: damaged or truncated file"):
        read_image(two)


def test_uncompressed_gz_name_and_unchecked_encodings(tmp_path):
    """A '.nii.gz' that is not compressed is read as ITK reads it; an NRRD encoding whose damage
    cannot be checked is refused with the file named."""
    plain = write(phantom(SHAPE, seed=6)[0], tmp_path / "p.nii", False)
    misnamed = tmp_path / "misnamed.nii.gz"
    shutil.copy(plain, misnamed)
    assert np.array_equal(sitk.GetArrayFromImage(read_image(misnamed)), sitk.GetArrayFromImage(read_image(plain)))
    nrrd = write(phantom(SHAPE, seed=6)[0], tmp_path / "b.nrrd", False)
    nrrd.write_bytes(nrrd.read_bytes().replace(b"encoding: raw", b"encoding: bzip2"))
    with pytest.raises(ValueError, match=r"b\.nrrd: NRRD encoding 'bzip2': only raw and gzip are read"):
        read_image(nrrd)


def test_missing_data_file_is_named_by_the_header_check(tmp_path):
    path = write(phantom(SHAPE, seed=7)[0], tmp_path / "v.mhd", False)
    (tmp_path / "v.raw").unlink()
    with pytest.raises(FileNotFoundError, match=r"v\.mhd: its data file .*v\.raw does not exist"):
        image_check.check_sizes(path)


# ------------------------------------------------------------------ every reader refuses

def test_preprocess_scripts_refuse_a_truncated_file(tmp_path):
    raw = tmp_path / "acdc" / "patient001"
    raw.mkdir(parents=True)
    image, label = phantom(SHAPE, seed=8)
    for frame in ("01", "12"):
        write(image, raw / f"patient001_frame{frame}.nii.gz", True)
        write(label.clip(0, 3), raw / f"patient001_frame{frame}_gt.nii.gz", True)
    cut = raw / "patient001_frame12_gt.nii.gz"
    cut.write_bytes(cut.read_bytes()[:-5])
    message = one_line_error(preprocess_acdc.main, ["--raw", str(tmp_path / "acdc"), "--out", str(tmp_path / "out")])
    assert message.startswith(f"error: {cut}: damaged or truncated file"), message
    prostate = tmp_path / "prostate"
    prostate.mkdir()
    write(image, prostate / "Case00.mhd", False)
    write(label.clip(0, 1), prostate / "Case00_segmentation.mhd", False)
    (prostate / "Case00.raw").write_bytes((prostate / "Case00.raw").read_bytes()[:100])
    message = one_line_error(preprocess_promise12.main, ["--raw", str(prostate), "--out", str(tmp_path / "p12")])
    assert message.startswith(f"error: {prostate / 'Case00.mhd'}: damaged or truncated file"), message


# ------------------------------------------------------------------ the fuzz test

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_custom_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pth", 16)


def damages(size, rng, flips=5):
    """Seeded damages of a file of ``size`` bytes: cuts inside the header, inside the data and one
    byte short, and single-bit flips at random offsets."""
    cuts = [("cut", n) for n in sorted({min(20, size - 1), size // 2, size - 1})]
    return cuts + [("flip", int(rng.integers(0, size)), int(rng.integers(0, 8))) for _ in range(flips)]


def apply(target, original, damage):
    if damage[0] == "cut":
        target.write_bytes(original[: damage[1]])
    else:
        changed = bytearray(original)
        changed[damage[1]] ^= 1 << damage[2]
        target.write_bytes(bytes(changed))


def header_reading(path):
    """What the header says that no check can tell from a true value: geometry and NIfTI scaling."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    scaling = tuple(reader.GetMetaData(k) for k in ("scl_slope", "scl_inter") if reader.HasMetaDataKey(k))
    return reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), scaling


def undetectable(header, lay, original_header, damage, target):
    """A changed result without an error is allowed only where nothing can tell the damage from true
    data: a flipped bit in raw (uncompressed, checksum-free) voxel data, or in a header outside any
    compressed stream that then reads as another valid geometry or intensity scaling. Inside a gzip
    or zlib stream (a .nii.gz header included) every flip must be caught."""
    if damage[0] != "flip":
        return False
    in_stream = target == lay.data_path and damage[1] >= lay.offset
    if in_stream:
        return lay.encoding == "raw"
    return header_reading(header) != original_header


def two_cases(raw, ending, compressed, seed):
    """A plain images/ + labels/ folder of two labeled phantoms c0, c1 in one format."""
    for sub in ("images", "labels"):
        (raw / sub).mkdir(parents=True)
    for k in range(2):
        image, label = phantom(SHAPE, seed=seed + k)
        write(image, raw / "images" / f"c{k}{ending}", compressed)
        write(label, raw / "labels" / f"c{k}{ending}", compressed)
    return raw


def outputs(folder):
    """Every file a run wrote, by relative path (predict's run and case records, which name the -o folder
    and the input's checksum, left out)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name not in ("predict.json", "predict_cases.jsonl")}


@pytest.mark.parametrize("ending,compressed", FORMATS, ids=IDS)
def test_fuzz_cut_and_flipped_files_give_an_error_or_the_same_output(tmp_path, checkpoint, ending, compressed):
    rng = np.random.default_rng(FORMATS.index((ending, compressed)))
    raw = two_cases(tmp_path / "raw", ending, compressed, seed=10)
    convert = ["--input", str(raw), "--image_size", "16", "--val_cases", "c1"]
    assert one_line_error(convert_dataset.main, [*convert, "--out", str(tmp_path / "ref")]) is None
    reference = outputs(tmp_path / "ref")
    predict_args = ["-i", str(raw / "images" / f"c0{ending}"), "--checkpoint", str(checkpoint), "--device", "cpu"]
    assert one_line_error(predict.main, [*predict_args, "-o", str(tmp_path / "pref")]) is None
    predicted = outputs(tmp_path / "pref")
    counts = {"error": 0, "same": 0, "undetectable": 0}
    for kind in ("images", "labels"):
        header = raw / kind / f"c0{ending}"
        lay, head = image_check.layout(header), header_reading(header)
        for target in sorted({header, lay.data_path}):
            original = target.read_bytes()
            for n, damage in enumerate(damages(len(original), rng)):
                apply(target, original, damage)
                runs = [("convert", convert_dataset.main, [*convert, "--out", str(tmp_path / f"o{n}")],
                         tmp_path / f"o{n}", reference)]
                if kind == "images":
                    runs.append(("predict", predict.main, [*predict_args, "-o", str(tmp_path / f"p{n}")],
                                 tmp_path / f"p{n}", predicted))
                for name, main, argv, out, expected in runs:
                    message = one_line_error(main, argv)
                    if message is not None:
                        assert header.name in message or target.name in message, (name, damage, message)
                        assert not out.exists() or not any(out.rglob("*.h5")), (name, damage, "wrote output")
                        counts["error"] += 1
                    elif outputs(out) == expected:
                        counts["same"] += 1
                    else:
                        assert undetectable(header, lay, head, damage, target), \
                            f"{name}: {target.name} {damage} changed the output without an error"
                        counts["undetectable"] += 1
                    shutil.rmtree(out, ignore_errors=True)
                target.write_bytes(original)
    assert counts["error"] >= 6 * (2 if ending in (".mhd", ".nhdr") else 1)  # every cut, of every file
    print(ending, "compressed" if compressed else "raw", counts)


def test_bench_read_times_the_three_paths_on_every_set(acdc_root, tmp_path):
    bench = load_script("bench/bench_read.py")
    results = bench.main(["--acdc_root", str(acdc_root), "--large_size", "24", "20", "4", "--repeats", "1",
                          "--out", str(tmp_path / "r.json")])
    names = [row["set"] for row in results["sets"]]
    volumes = len((acdc_root / "val.list").read_text().split())
    assert names == [f"ACDC val ({volumes} volumes) .nii.gz", f"ACDC val ({volumes} volumes) .nii",
                     "24x20x4 int16 .nii", "24x20x4 int16 .nii.gz"]
    for row in results["sets"]:
        assert row["itk_seconds"] > 0 and row["named_seconds"] > 0 and row["checked_seconds"] > 0
        assert row["ratio"] == row["checked_seconds"] / row["itk_seconds"]
        assert row["ratio_named"] == row["checked_seconds"] / row["named_seconds"]
    assert (tmp_path / "r.json").is_file()


def test_constant_images_are_named_in_a_warning_or_refused_when_labeled(tmp_path, checkpoint, caplog, capsys):
    raw = two_cases(tmp_path / "raw", ".nii.gz", True, seed=20)
    blank = write(np.full(SHAPE, 7, np.int16), raw / "images" / "u0.nii.gz", True)  # unlabeled
    convert = ["--input", str(raw), "--image_size", "16", "--val_cases", "c1"]
    with caplog.at_level("WARNING"):
        assert one_line_error(convert_dataset.main, [*convert, "--out", str(tmp_path / "out")]) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{blank}: constant image (every voxel 7): its slices are zeros and carry no information"]
    capsys.readouterr()
    assert one_line_error(predict.main, ["-i", str(blank), "-o", str(tmp_path / "p"), "--checkpoint",
                                         str(checkpoint), "--device", "cpu"]) is None
    err = capsys.readouterr().err
    assert f"warning: {blank}: constant image (every voxel 7): its slices carry no information" in err
    assert (tmp_path / "p" / "u0.nii.gz").is_file()
    write(np.full(SHAPE, 7, np.int16), raw / "images" / "c0.nii.gz", True)  # labeled, with foreground
    message = one_line_error(convert_dataset.main, [*convert, "--out", str(tmp_path / "out2")])
    assert message == (f"error: {raw / 'images' / 'c0.nii.gz'}: constant image (every voxel 7) with foreground in "
                       f"{raw / 'labels' / 'c0.nii.gz'}; expected an image with contrast for a labeled case")


def test_the_fast_checksums_equal_zlibs():
    import zlib
    data = np.random.default_rng(1).integers(0, 256, size=100_003, dtype=np.uint8).tobytes()
    assert image_check.checksums.crc32(data) == zlib.crc32(data)
    assert image_check.checksums.crc32(data[50:], image_check.checksums.crc32(data[:50])) == zlib.crc32(data)
    assert image_check.checksums.adler32(data) == zlib.adler32(data)


def test_a_large_crc_is_computed_in_pieces_on_threads_and_combined(monkeypatch):
    import types
    import zlib
    if not hasattr(image_check.checksums, "crc32_combine"):
        pytest.skip("zlib-ng is not installed (requirements.txt): the CRC runs on one thread")
    pieces = []
    fake = types.SimpleNamespace(crc32=lambda data, start=0: pieces.append(len(data)) or zlib.crc32(data, start),
                                 crc32_combine=image_check.checksums.crc32_combine)
    monkeypatch.setattr(image_check, "checksums", fake)
    monkeypatch.setattr(image_check, "PARALLEL_CRC", 1000)
    threads = {"itk": 3}
    monkeypatch.setattr(sitk.ProcessObject, "GetGlobalDefaultNumberOfThreads", staticmethod(lambda: threads["itk"]))
    data = np.random.default_rng(2).integers(0, 256, size=4500, dtype=np.uint8)
    assert image_check.crc32(data, 77) == zlib.crc32(data, 77)
    assert sorted(pieces) == [1500, 1500, 1500]  # ITK's three threads, each on at least PARALLEL_CRC bytes
    pieces.clear()
    assert image_check.crc32(data[:1999], 5) == zlib.crc32(data[:1999], 5) and pieces == [1999]  # one piece
    pieces.clear()
    threads["itk"] = 1  # e.g. a converter worker's share of the cores
    assert image_check.crc32(data, 77) == zlib.crc32(data, 77) and pieces == [4500]
    threads["itk"] = 3
    if hasattr(os, "fork"):  # a forked child cannot use its parent's pool: the pool's threads are not in it
        parents = image_check._THREADS["pool"]
        pid = os.fork()
        if pid == 0:
            right = image_check.crc32(data, 77) == zlib.crc32(data, 77)
            os._exit(0 if right and image_check._THREADS["pool"] is not parents else 1)
        deadline, status = time.monotonic() + 60, None
        while status is None:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(code)
            elif time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the forked child's CRC never finished")
            else:
                time.sleep(0.05)
        assert status == 0


# ------------------------------------------------------------------ found by an attack on the readers (review)

def edited(path, old, new):
    path.write_bytes(path.read_bytes().replace(old, new, 1))
    return path


def packed(data, *fields):
    """``data`` with each ``(offset, struct format, values)`` of ``fields`` written over it."""
    data = bytearray(data)
    for offset, fmt, values in fields:
        data[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    return bytes(data)


def test_header_fields_that_would_misplace_or_miscount_the_voxels_are_refused(tmp_path):
    image = phantom(SHAPE, seed=30)[0]
    nii = write(image, tmp_path / "v.nii", False)
    nii.write_bytes(packed(nii.read_bytes(), (108, "<f", [0.0])))  # vox_offset 0: ITK reads 4 bytes early
    with pytest.raises(ValueError, match=r"v\.nii: damaged or truncated file \(NIfTI voxel offset 0, expected at "
                                         r"least 352\)"):
        read_image(nii)
    mha = edited(write(image, tmp_path / "h.mha", False), b"ElementDataFile", b"HeaderSize = 100\nElementDataFile")
    with pytest.raises(ValueError, match=r"h\.mha: HeaderSize with LOCAL \(embedded\) data is not read"):
        read_image(mha)
    extra = edited(write(image, tmp_path / "d.mha", True), b"DimSize = 24 20 4", b"DimSize = 24 20 2 2")
    with pytest.raises(ValueError, match=r"d\.mha: damaged or truncated file \(MetaImage DimSize \[24, 20, 2, 2\] for "
                                         r"NDims '3'\)"):
        read_image(extra)
    text = edited(write(image, tmp_path / "t.mha", False), b"BinaryData = True", b"BinaryData = False")
    with pytest.raises(ValueError, match=r"t\.mha: MetaImage BinaryData = False \(voxels as text\) is not read"):
        read_image(text)
    huge = tmp_path / "big.nrrd"
    huge.write_bytes(b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 99999999999999999999 1 1\nencoding: raw\n\n")
    with pytest.raises(ValueError, match=r"big\.nrrd: not a readable image \(dimensions .*: more voxels than any "):
        read_image(huge)


def test_an_intensity_scaling_that_overflows_is_refused_compressed_or_not(tmp_path):
    image = phantom(SHAPE, seed=31)[0]
    raw = packed(write(image, tmp_path / "p.nii", False).read_bytes(), (112, "<f", [1e36]))  # scl_slope overflows
    for path, data in ((tmp_path / "s.nii", raw), (tmp_path / "s.nii.gz", gzip.compress(raw))):
        path.write_bytes(data)
        with pytest.raises(ValueError, match=rf"{path.name}: \d+ NaN or infinite voxel\(s\)"):
            read_image(path)


def test_non_finite_geometry_is_refused_in_every_format(tmp_path):
    image = phantom(SHAPE, seed=32)[0]
    nii = write(image, tmp_path / "o.nii", False)
    nii.write_bytes(packed(nii.read_bytes(), (252, "<hh", [0, 1]),  # qform_code 0, sform_code 1: the sform rules
                           (280, "<12f", [0.8, 0, 0, float("nan"), 0, 0.8, 0, 0, 0, 0, 3, 0])))  # a NaN offset
    with pytest.raises(ValueError, match=r"o\.nii: origin \[nan, .*expected finite values"):
        read_image(nii)
    nrrd = tmp_path / "n.nrrd"
    nrrd.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 24 20 4\nspacings: NaN 0.8 3\nendian: little\n"
                     b"encoding: raw\n\n" + image.astype("<i2").tobytes())
    with pytest.raises(ValueError, match=r"n\.nrrd: NRRD spacings 'NaN 0\.8 3': expected positive finite voxel "):
        read_image(nrrd)
    from common.geometry import check_geometry
    a, b = sitk.GetImageFromArray(image), sitk.GetImageFromArray(image)
    b.SetOrigin((float("nan"), 0.0, 0.0))
    with pytest.raises(ValueError, match="origin"):
        check_geometry(a, b, "image", "label")  # NaN never agrees


def test_valid_files_the_first_checks_misread(tmp_path):
    """A gzip whose first member is smaller than the NIfTI header; a data path errors name the header."""
    plain = write(phantom(SHAPE, seed=33)[0], tmp_path / "p.nii", False)
    data = plain.read_bytes()
    split = tmp_path / "split.nii.gz"
    split.write_bytes(gzip.compress(data[:100]) + gzip.compress(b"") + gzip.compress(data[100:]))
    assert np.array_equal(sitk.GetArrayFromImage(read_image(split)), sitk.GetArrayFromImage(read_image(plain)))
    mhd = write(phantom(SHAPE, seed=33)[0], tmp_path / "h.mhd", False)
    (tmp_path / "h.raw").unlink()
    (tmp_path / "h.raw").mkdir()
    with pytest.raises(FileNotFoundError, match=r"h\.mhd: its data file .*h\.raw is not a file"):
        read_image(mhd)
