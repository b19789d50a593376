"""Damaged image files are refused, never read as zeros.

ITK fills the voxels of a truncated NIfTI file (``.nii`` or ``.nii.gz``) with zeros without an error,
and it reads a gzip or zlib stream only as far as the voxels go, so the stream's checksum is never
looked at. Every reader of a user's file in this project goes through ``volume_io.read_image``,
which calls the two checks here:

- ``check_sizes(path)`` before ITK reads: the header (NIfTI-1/2, MetaImage, NRRD) gives the voxel
  bytes; a raw data region must hold exactly that many bytes, a zlib region exactly its
  ``CompressedDataSize``, a gzip stream must end with a length field equal to it. Headers and file
  sizes only, so ``predict.py`` runs it on every input before its first forward.
- ``check_voxels(path, image, layout)`` after ITK has read: the checksum that ends the compressed
  stream (gzip CRC-32, zlib Adler-32) is compared with the one of the voxels ITK returned (a pass over
  memory, about 5 % of a read). Where ITK's buffer is not the stored bytes (NIfTI intensity scaling,
  big-endian data) or the stream has several gzip members, the whole stream is decompressed and
  checked instead.

A raw NIfTI-1 file of plain numbers in this machine's byte order (the common ``.nii``) is read once,
by ``read_image`` itself: ITK reads its header geometry, the voxels are read into an array, looked at
for NaN, and copied into the image (ITK's NIfTI reader would have turned NaN into zeros, so a check
after ITK would have to read the file a second time).

An uncompressed file carries no checksum: a changed byte inside its voxels, or in a spacing or origin
written in its header, reads as a valid value and cannot be found (docs/own_data.md).
"""
import contextlib
import math
import os
import re
import struct
import sys
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:  # zlib-ng's CRC-32 and Adler-32 run about 3.5x faster than the C library's (bench/README.md)
    from zlib_ng import zlib_ng as checksums
except ImportError:  # the same values, slower
    checksums = zlib

CHUNK = 1 << 22
PARALLEL_CRC = 1 << 25  # bytes per thread of a CRC-32 on several threads (below 32 MiB, one is faster)
_THREADS = {"pool": None, "pid": None, "lock": threading.Lock()}  # a forked child makes its own pool


class DamagedFile(ValueError):
    """An image file whose header and data disagree, or whose compressed data is damaged."""


@dataclass
class Layout:
    """Where a file's voxels lie: ``data_path`` from byte ``offset``; ``encoding`` raw, gzip or zlib;
    ``nbytes`` the voxel bytes once decompressed; ``stored_size`` the compressed length when the header
    gives it; ``prefix`` the bytes a gzip stream holds before the voxels (the NIfTI header);
    ``dtype`` the stored element type with its byte order (None when unknown); ``scaled`` when ITK
    returns other values than the stored ones (NIfTI slope/intercept); ``nifti``: ITK's NIfTI reader
    turns NaN and infinite voxels into zeros, so they are looked for in the stored data."""
    data_path: Path
    offset: int
    nbytes: int
    encoding: str
    stored_size: int = None
    prefix: int = 0
    dtype: np.dtype = None
    scaled: bool = False
    nifti: bool = False
    version: int = 1  # NIfTI-1 or NIfTI-2 (other formats: 1)
    head: bytes = None  # a NIfTI file's first 540 bytes (decompressed; for gzip, when they hold the prefix)
    trailer: tuple = None  # (CRC-32, length) at the end of a gzip stream, once read
    io: str = ""  # the ITK ImageIO that reads this format ("": ITK chooses)

    @property
    def reads_itself(self):
        """Whether ``read_image`` reads the voxels itself: a raw NIfTI-1 file of plain numbers in this
        machine's byte order, unscaled (ITK would return the stored bytes, only with NaN turned into 0)."""
        return (self.nifti and self.encoding == "raw" and self.version == 1 and self.dtype is not None
                and not self.scaled and self.dtype.isnative and self.dtype.kind in "uif")


def _fail(path, what):
    raise DamagedFile(f"{path}: damaged or truncated file ({what})")


def _unreadable(path, what):
    raise DamagedFile(f"{path}: not a readable image ({what})")


def _voxel_bytes(dims, item_size, path):
    """Bytes of ``dims`` voxels of ``item_size`` bytes; 'not a readable image' for sizes no file has."""
    total = item_size
    for d in dims:
        total *= int(d)
        if total > 2 ** 50:
            _unreadable(path, f"dimensions {[int(v) for v in dims]}: more voxels than any image file holds")
    return int(total)


# ---------------------------------------------------------------- NIfTI

NIFTI_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8",
               1280: "u8", 32: "c8", 1792: "c16", 128: None, 2304: None, 1536: None, 2048: None}


def _nifti_fields(head, path):
    """(vox_offset, voxel bytes, element dtype or None, scaled, version) from the first 540 bytes of a
    NIfTI file."""
    if len(head) < 348:
        _unreadable(path, f"NIfTI header of {len(head)} bytes, expected at least 348")
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        if size in (348, 540):
            break
    else:
        _unreadable(path, "no NIfTI header size (348 or 540) in its first 4 bytes")
    if size == 540:
        if len(head) < 540:
            _unreadable(path, f"NIfTI-2 header of {len(head)} bytes, expected 540")
        datatype, bitpix = struct.unpack(order + "hh", head[12:16])
        dims = struct.unpack(order + "8q", head[16:80])
        pixdim = struct.unpack(order + "8d", head[104:168])
        vox_offset = struct.unpack(order + "q", head[168:176])[0]
        slope, inter = struct.unpack(order + "dd", head[176:192])
    else:
        pixdim = struct.unpack(order + "8f", head[76:108])
        dims = struct.unpack(order + "8h", head[40:56])
        datatype, bitpix = struct.unpack(order + "hh", head[70:74])
        vox_offset = struct.unpack(order + "f", head[108:112])[0]
        vox_offset = int(vox_offset) if math.isfinite(vox_offset) and abs(vox_offset) < 2 ** 62 else -1
        if vox_offset >= 2 ** 31:  # ITK's NIfTI-1 reader keeps it in 32 bits and would read other bytes
            _unreadable(path, f"NIfTI-1 voxel offset {vox_offset}; expected below 2 GiB")
        slope, inter = struct.unpack(order + "ff", head[112:120])
    if not 1 <= dims[0] <= 7 or any(d < 1 for d in dims[1:dims[0] + 1]):
        _fail(path, f"NIfTI dimensions {list(dims[:dims[0] + 1]) if 0 <= dims[0] <= 7 else dims[0]}")
    if bitpix not in (8, 16, 24, 32, 64, 128, 256) or datatype not in NIFTI_TYPES:
        _fail(path, f"NIfTI datatype {datatype} with {bitpix} bits per voxel")
    code = NIFTI_TYPES[datatype]
    if code is not None and np.dtype(code).itemsize * 8 != bitpix:
        _fail(path, f"NIfTI datatype {datatype} does not have {bitpix} bits per voxel")
    sizes = pixdim[1:min(dims[0], 3) + 1]
    if not all(math.isfinite(v) and v != 0 for v in sizes):
        raise ValueError(f"{path}: voxel size {[float(v) for v in sizes]} in its NIfTI header (pixdim); expected "
                         f"positive finite sizes (ITK would read 0 or NaN as 1 mm)")
    if vox_offset < size + 4:
        _fail(path, f"NIfTI voxel offset {vox_offset}, expected at least {size + 4}")
    nbytes = _voxel_bytes(dims[1:dims[0] + 1], bitpix / 8, path)
    scaled = slope not in (0.0, 1.0) or inter != 0.0  # ITK reads slope 0 as 1 and adds the intercept
    return vox_offset, nbytes, (None if code is None else np.dtype(order + code)), scaled, 1 if size == 348 else 2


def _nifti_layout(path, gz):
    with open(path, "rb") as f:
        head = f.read(540)
    if not (gz and head[:2] == b"\x1f\x8b"):  # ITK also reads a '.nii.gz' that is not compressed
        offset, nbytes, dtype, scaled, version = _nifti_fields(head, path)
        return Layout(path, offset, nbytes, "raw", dtype=dtype, scaled=scaled, nifti=True, version=version,
                      io="NiftiImageIO", head=head)
    head = _gunzip_head(path, 1024)
    offset, nbytes, dtype, scaled, version = _nifti_fields(head, path)
    return Layout(path, 0, nbytes, "gzip", prefix=offset, dtype=dtype, scaled=scaled, nifti=True, version=version,
                  head=head if len(head) >= offset else None, io="NiftiImageIO")


def _gunzip_head(path, n):
    """The first ``n`` decompressed bytes of a gzip file, across its members (fewer if the stream is
    shorter)."""
    inflater, out, pending, step = zlib.decompressobj(31), b"", b"", 1 << 12  # a header: its first 4 KiB
    try:
        with open(path, "rb") as f:
            while len(out) < n:
                chunk = pending or f.read(step)
                step = 1 << 16
                pending = b""
                if not chunk:
                    break
                out += inflater.decompress(chunk, n - len(out))
                pending = inflater.unconsumed_tail
                if inflater.eof:
                    pending = inflater.unused_data
                    if not pending.strip(b"\0"):
                        pending = f.read(1 << 16) if len(out) < n else b""
                        if not pending.strip(b"\0"):
                            break
                    inflater = zlib.decompressobj(31)  # the next gzip member
    except zlib.error as err:
        _unreadable(path, f"gzip stream: {err}")
    return out


def _int(fields, key, path):
    """The integer header field ``key`` (0 when absent); 'not a readable image' naming it otherwise."""
    try:
        return int(fields.get(key, "0") or 0)
    except ValueError:
        _unreadable(path, f"header field {key} = {fields[key]!r}, expected an integer")


# ---------------------------------------------------------------- MetaImage

MET_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
             "MET_UINT": "u4", "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8",
             "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def _text_header(path, is_end, limit=1 << 16):
    """(lines, byte offset after the line for which ``is_end(line)`` holds, or None when the file
    ends first) of a text header."""
    with open(path, "rb") as f:
        data = f.read(limit)
    lines, pos = [], 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 and len(data) < limit else end
        if end < 0:
            break
        lines.append(data[pos:end].decode("latin-1").rstrip("\r"))
        pos = end + 1
        if is_end(lines[-1]):
            return lines, pos
    if len(data) < limit:
        return lines, None
    _unreadable(path, f"header does not end within its first {len(data)} bytes")


def _metaimage_layout(path):
    lines, end = _text_header(path, lambda line: line.split("=")[0].strip() == "ElementDataFile")
    if end is None:
        _unreadable(path, "MetaImage header without an ElementDataFile line")
    fields = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in lines)}
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        code = MET_TYPES[fields["ElementType"]]
    except (KeyError, ValueError):
        _unreadable(path, "MetaImage header without a valid DimSize, ElementType or ElementNumberOfChannels")
    if not dims or any(d < 1 for d in dims) or channels < 1:
        _fail(path, f"MetaImage DimSize {dims}")
    if str(len(dims)) != fields.get("NDims", "").strip():
        _fail(path, f"MetaImage DimSize {dims} for NDims {fields.get('NDims')!r}")
    if fields.get("BinaryData", "True").lower() != "true":
        raise ValueError(f"{path}: MetaImage BinaryData = {fields['BinaryData']} (voxels as text) is not read; "
                         f"expected binary voxel data")
    msb = (fields.get("BinaryDataByteOrderMSB") or fields.get("ElementByteOrderMSB") or "False").lower() == "true"
    nbytes = _voxel_bytes(dims, channels * np.dtype(code).itemsize, path)
    compressed = fields.get("CompressedData", "False").lower() == "true"
    source = fields["ElementDataFile"]
    if source == "LOCAL":
        if _int(fields, "HeaderSize", path):
            raise ValueError(f"{path}: HeaderSize with LOCAL (embedded) data is not read; expected the voxels "
                             f"right after the header")
        data_path, offset = path, end
    elif " " in source or source.upper() == "LIST" or "%" in source or "\0" in source:
        raise ValueError(f"{path}: ElementDataFile {source!r}: only LOCAL or one data file is read")
    else:
        data_path, offset = path.parent / source, _int(fields, "HeaderSize", path)
        if offset < 0:  # -1: the data are the last bytes of the file
            offset = _size(data_path, path) - nbytes
    stored = _int(fields, "CompressedDataSize", path) if compressed and "CompressedDataSize" in fields else None
    return Layout(data_path, offset, nbytes, "zlib" if compressed else "raw", stored_size=stored,
                  dtype=np.dtype((">" if msb else "<") + code), io="MetaImageIO")


# ---------------------------------------------------------------- NRRD

NRRD_TYPES = {
    "i1": ("signed char", "int8", "int8_t"), "u1": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "i2": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "u2": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "i4": ("int", "signed int", "int32", "int32_t"), "u4": ("uint", "unsigned int", "uint32", "uint32_t"),
    "i8": ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
           "int64_t"),
    "u8": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    "f4": ("float",), "f8": ("double",)}
NRRD_CODE = {name: code for code, names in NRRD_TYPES.items() for name in names}


def _nrrd_layout(path):
    lines, end = _text_header(path, lambda line: line.strip() == "")
    if not lines or not lines[0].startswith("NRRD"):
        _unreadable(path, "no NRRD magic line")
    fields = {}
    for line in lines[1:]:
        if line.startswith("#") or ":=" in line or not line.strip():
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        code = NRRD_CODE[fields["type"].lower()]
    except (KeyError, ValueError):
        _unreadable(path, "NRRD header without valid sizes or type")
    if not sizes or any(s < 1 for s in sizes):
        _fail(path, f"NRRD sizes {sizes}")
    _check_nrrd_spacing(fields, path)
    encoding = {"raw": "raw", "gzip": "gzip", "gz": "gzip"}.get(fields.get("encoding", "").lower())
    if encoding is None:
        raise ValueError(f"{path}: NRRD encoding {fields.get('encoding')!r}: only raw and gzip are read "
                         "(damage cannot be checked in the others)")
    if _int(fields, "byte skip", path) or _int(fields, "line skip", path):
        raise ValueError(f"{path}: NRRD 'byte skip'/'line skip' are not read")
    source = fields.get("data file") or fields.get("datafile")
    if source and (" " in source or source.upper().startswith("LIST")):
        raise ValueError(f"{path}: NRRD data file {source!r}: only one data file is read")
    if not source and end is None:
        _unreadable(path, "NRRD header without the blank line before its data")
    data_path, offset = (path.parent / source, 0) if source else (path, end)
    little = fields.get("endian", "little").lower() == "little"
    nbytes = _voxel_bytes(sizes, np.dtype(code).itemsize, path)
    return Layout(data_path, offset, nbytes, encoding, dtype=np.dtype(("<" if little else ">") + code),
                  io="NrrdImageIO")


def _check_nrrd_spacing(fields, path):
    """ValueError for a NaN, infinite or zero voxel size in ``spacings`` or ``space directions`` (ITK
    would read a NaN spacing as 1 mm)."""
    for key in ("spacings", "space directions"):
        value = fields.get(key)
        if value is None:
            continue
        groups = re.findall(r"\(([^)]*)\)", value) if key == "space directions" else value.split()
        for group in groups:
            try:
                numbers = [float(v) for v in re.split(r"[,\s]+", group.strip()) if v]
            except ValueError:
                _unreadable(path, f"NRRD {key} {value!r}")
            if numbers and (not all(math.isfinite(v) for v in numbers) or not any(v != 0 for v in numbers)):
                raise ValueError(f"{path}: NRRD {key} {value!r}: expected positive finite voxel sizes (ITK would "
                                 f"read a NaN as 1 mm)")


# ---------------------------------------------------------------- checks

def read_image(path):
    """A SimpleITK image from ``path``, checked whole: ``check_sizes`` before ITK reads and
    ``check_voxels`` after (or, for a file ``_itk_read`` reads itself, ``_read_nifti_voxels`` as it reads).
    FileNotFoundError / ValueError (DamagedFile) naming the file otherwise."""
    path = require_file(path)
    lay = check_sizes(path)
    image, checked, failure = None, False, None
    with held_stderr() as printed:
        try:
            image, checked = _itk_read(path, lay)
        except RuntimeError as err:
            failure = err
    if failure is not None:  # its cause read once what ITK printed has been collected
        raise ValueError(f"{path}: not a readable image ({itk_cause(failure, printed, lay)})") from None
    if not checked:
        check_voxels(path, image, lay)
    check_grid(path, image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    report_itk_output(path, printed)
    return image


PIXEL_IDS = {"u1": "sitkUInt8", "i1": "sitkInt8", "u2": "sitkUInt16", "i2": "sitkInt16", "u4": "sitkUInt32",
             "i4": "sitkInt32", "u8": "sitkUInt64", "i8": "sitkInt64", "f4": "sitkFloat32", "f8": "sitkFloat64"}


def require_file(path):
    """``path`` as a Path; FileNotFoundError naming it unless it is a regular file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    return path


def itk_reader(path, lay):
    """An ITK ``ImageFileReader`` for ``path`` with the ImageIO of its format named (ITK then does not
    ask every reader whether it knows the file)."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(lay.io)
    return reader


def _itk_read(path, lay):
    """(image, whether its voxels are checked) for ``path``, read by the ImageIO of its format. The
    voxels of a raw NIfTI file that ITK would return as stored are read once, here, and checked
    (``_read_nifti_voxels``): ITK reads only the header's geometry. Anything else (scaling, another
    byte order, vectors, more than three axes) is read by ITK; ``read_image`` then runs ``check_voxels``."""
    import SimpleITK as sitk
    reader = itk_reader(path, lay)
    if not lay.reads_itself:
        return reader.Execute(), False
    reader.ReadImageInformation()
    size, item = reader.GetSize(), lay.dtype.itemsize
    if (reader.GetDimension() > 3 or math.prod(size) * item != lay.nbytes  # ITK and the header agree
            or reader.GetPixelID() != getattr(sitk, PIXEL_IDS[lay.dtype.str[1:]])):
        return reader.Execute(), False
    try:
        image = sitk.GetImageFromArray(_read_nifti_voxels(path, lay).reshape(size[::-1]))
    except MemoryError:  # the voxels, then their copy in the image
        _unreadable(path, f"its {lay.nbytes} bytes of voxels, held twice while read, do not fit in memory")
    spacing, direction = np.array(reader.GetSpacing()), np.array(reader.GetDirection()).reshape(len(size), -1)
    direction[:, spacing < 0] *= -1  # as ITK's ImageFileReader: a negative voxel size turns its axis
    image.SetOrigin(reader.GetOrigin())
    image.SetSpacing(np.abs(spacing).tolist())
    image.SetDirection(direction.ravel().tolist())
    return image, True


def _read_nifti_voxels(path, lay):
    """The stored voxels of a raw NIfTI file (``lay.reads_itself``), as a flat array; DamagedFile when
    the file changed since ``check_sizes`` (another header, fewer bytes), ValueError for NaN or infinite
    values (which ITK's NIfTI reader would have returned as zeros)."""
    voxels = np.empty(lay.nbytes // lay.dtype.itemsize, dtype=lay.dtype)
    target, got = memoryview(voxels).cast("B"), 0
    try:
        f = open(lay.data_path, "rb", buffering=0)
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot be read ({err.strerror or err})") from None
    with f:
        if f.read(348) != lay.head[:348]:
            _fail(path, "its header changed while it was read")
        f.seek(lay.offset)
        while got < lay.nbytes:  # one read of at most 2 GiB at a time (Linux)
            n = f.readinto(target[got:])
            if not n:
                _fail(path, f"the header gives {lay.nbytes} bytes of voxel data, read {got}")
            got += n
    if lay.dtype.kind == "f":
        _refuse_nonfinite(path, _count_nonfinite(voxels))
    return voxels


def check_grid(path, spacing, origin, direction):
    """ValueError naming ``path`` unless its voxel sizes are positive and finite and its origin and
    direction finite."""
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"{path}: voxel spacing {list(spacing)}; expected positive finite sizes")
    if not all(math.isfinite(v) for v in (*origin, *direction)):
        raise ValueError(f"{path}: origin {list(origin)} / direction {list(direction)}; expected finite values")


def report_itk_output(path, printed):
    """Print what ITK wrote to stderr about a file that passed every check, once, naming the file."""
    for line in dict.fromkeys(line.strip() for line in printed["text"].splitlines() if line.strip()):
        print(f"{path}: ITK says: {line} (its voxels passed the checks)", file=sys.stderr)


_HELD = {"file": None}


@contextlib.contextmanager
def held_stderr():
    """Hold what C code prints to the process's stderr (ITK's readers print there, e.g. MetaIO's
    "Uncompress failed" for a file it then returns as if whole) in ``out["text"]``, so that a damaged
    file ends in one line; the caller prints it when the file passed its checks. One temporary file
    per process is reused (emptied before each use)."""
    out = {"text": ""}
    if _HELD["file"] is None:
        _HELD["file"] = tempfile.TemporaryFile()
    held = _HELD["file"]
    held.seek(0)
    held.truncate()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(held.fileno(), 2)
    try:
        yield out
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        held.seek(0)
        out["text"] = held.read().decode("utf-8", errors="replace")


def itk_cause(err, printed=None, lay=None):
    """What an ITK exception says went wrong, in one line of at most 200 characters: its
    ``itk::ERROR`` line without the object address, and the innermost cause when that line ends in
    a colon (NRRD's reader puts the reason last). Where ITK's exception only says that no reader took
    the file or gives a wrong errno, what its reader printed (``printed``, from ``held_stderr``) or
    the file's kind (a NIfTI-2 header) says more."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = next((line for line in lines if "itk::ERROR" in line or "ITK ERROR" in line or "Unable" in line),
                 lines[-1] if lines else "")
    first = re.sub(r"(itk::ERROR|ITK ERROR): \w+\(0x[0-9a-f]+\): ", "", first)
    if first.endswith(":") and lines and lines[-1] not in first:
        first = f"{first} {lines[-1]}"
    if lay is not None and lay.version == 2:  # ITK's words differ with the ImageIO named or not
        first = "a NIfTI-2 file, which this SimpleITK does not read: save it as NIfTI-1"
    said = [line.strip() for line in (printed or {}).get("text", "").splitlines() if line.strip()]
    if said and any(vague in " ".join(lines) for vague in ("No such file or directory", "Unable to determine")):
        first = said[0]
    return first[:200]


def layout(path):
    """The ``Layout`` of an image file, from its header; DamagedFile / ValueError naming the file."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return _nifti_layout(path, gz=True)
    if name.endswith(".nii"):
        return _nifti_layout(path, gz=False)
    if name.endswith((".mha", ".mhd")):
        return _metaimage_layout(path)
    if name.endswith((".nrrd", ".nhdr")):
        return _nrrd_layout(path)
    raise ValueError(f"{path}: not a NIfTI, MetaImage or NRRD file")


def _size(data_path, header_path):
    """The size of ``data_path`` (the file itself or a header's data file); errors name the header."""
    try:
        if not data_path.is_file():
            raise FileNotFoundError(f"{header_path}: its data file {data_path} does not exist" if not
                                    data_path.exists() else f"{header_path}: its data file {data_path} is not a file")
        return data_path.stat().st_size
    except (OSError, ValueError) as err:  # a path through a file, an embedded NUL byte, no permission
        if isinstance(err, FileNotFoundError) and str(err).startswith(str(header_path)):
            raise
        raise FileNotFoundError(f"{header_path}: its data file {data_path} cannot be read "
                                f"({getattr(err, 'strerror', None) or err})") from None


def check_sizes(path):
    """Compare the voxel bytes the header of ``path`` promises with what its data holds, from the
    header and the file sizes only. Returns the ``Layout``; DamagedFile naming the file otherwise."""
    lay = layout(path)
    available = _size(lay.data_path, path) - lay.offset
    where = "" if lay.data_path == Path(path) else f" in {lay.data_path.name}"
    if lay.encoding == "raw" and available != lay.nbytes:
        _fail(path, f"the header gives {lay.nbytes} bytes of voxel data, found {max(available, 0)}{where}")
    if lay.encoding == "zlib" and lay.stored_size is not None and available != lay.stored_size:
        _fail(path, f"the header gives {lay.stored_size} bytes of compressed data, found {max(available, 0)}{where}")
    if lay.encoding == "gzip":
        if available < 18:
            _fail(path, f"gzip stream of {max(available, 0)} bytes{where}")
        length = _gzip_trailer(lay)[1]
        if length != (lay.prefix + lay.nbytes) % 2 ** 32:
            _verify_stream(path, lay)  # several gzip members, or damage: decide on the whole stream
    return lay


def _gzip_trailer(lay):
    if lay.trailer is None:
        with open(lay.data_path, "rb") as f:
            f.seek(-8, 2)
            lay.trailer = struct.unpack("<II", f.read(8))
    return lay.trailer


def _stored_bytes_of(image, lay):
    """ITK's voxel buffer as bytes when it equals the stored voxels, else None."""
    if lay.dtype is None or lay.scaled or lay.dtype.byteorder == (">" if sys.byteorder == "little" else "<"):
        return None
    import SimpleITK as sitk
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.newbyteorder("=") != lay.dtype.newbyteorder("=") or array.nbytes != lay.nbytes:
        return None
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def check_voxels(path, image, lay):
    """After ITK has read ``image`` from ``path``: ITK returned as many voxels as the header gives; the
    checksum at the end of a compressed stream is that of the voxels ITK returned (the whole stream is
    checked where they cannot be compared); and the voxels are finite, looked for in the stored data
    where ITK's NIfTI reader would have turned NaN into zeros. DamagedFile / ValueError naming the file."""
    array = _itk_array(image)
    if lay.dtype is not None and array.size * lay.dtype.itemsize != lay.nbytes:
        _fail(path, f"ITK read {array.size} voxel values, the header gives {lay.nbytes // lay.dtype.itemsize}")
    stored_floats = lay.nifti and lay.dtype is not None and lay.dtype.kind == "f"
    if lay.encoding == "raw":
        if stored_floats:
            _refuse_nonfinite(path, _stored_nonfinite(lay))
    elif not _checksum_matches(image, lay):
        _verify_stream(path, lay, _stored_bytes_of(image, lay))  # counts a NIfTI stream's NaN too
    if _float_image(image) and (not lay.nifti or lay.scaled):  # ITK keeps these (and scaling can overflow)
        _refuse_nonfinite(path, _count_nonfinite(array))


def _checksum_matches(image, lay):
    """Whether ITK's buffer, as the stored bytes, has the checksum that ends the stream (False where
    the buffer is not the stored bytes: the whole stream is then checked)."""
    voxels = _stored_bytes_of(image, lay)
    if voxels is None:
        return False
    if lay.encoding == "gzip":
        prefix = (lay.head if lay.head is not None else _gunzip_head(lay.data_path, lay.prefix))[: lay.prefix]
        return _gzip_trailer(lay)[0] == crc32(voxels, checksums.crc32(prefix) if lay.prefix else 0)
    if lay.stored_size is None or lay.stored_size < 6:
        return False
    with open(lay.data_path, "rb") as f:
        f.seek(lay.offset + lay.stored_size - 4)
        return struct.unpack(">I", f.read(4))[0] == checksums.adler32(voxels)


def crc32(data, start=0):
    """The CRC-32 of ``data`` continuing ``start``; a large buffer in pieces of at least
    ``PARALLEL_CRC`` bytes on as many threads as ITK may use (zlib-ng's CRC releases the GIL; the
    converter's workers share the cores through ITK's thread count), combined."""
    view = memoryview(data).cast("B")
    pieces = min(len(view) // PARALLEL_CRC, 8) if hasattr(checksums, "crc32_combine") else 1  # zlib: no combine
    if pieces >= 2:
        import SimpleITK as sitk
        pieces = min(pieces, sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
    if pieces < 2:
        return checksums.crc32(view, start)
    bounds = [len(view) * k // pieces for k in range(pieces + 1)]
    parts = _crc_pool().map(lambda k: checksums.crc32(view[bounds[k]:bounds[k + 1]]), range(pieces))
    for k, part in enumerate(parts):
        start = checksums.crc32_combine(start, part, bounds[k + 1] - bounds[k])
    return start


def _crc_pool():
    """This process's thread pool for ``crc32`` (a forked child makes its own: its parent's threads are
    not in it)."""
    from concurrent.futures import ThreadPoolExecutor
    with _THREADS["lock"]:
        if _THREADS["pid"] != os.getpid():
            _THREADS.update(pool=ThreadPoolExecutor(8, thread_name_prefix="crc32"), pid=os.getpid())
        return _THREADS["pool"]


def _float_image(image):
    """Whether a SimpleITK image holds float voxels (SimpleITK is imported only by readers: the
    training path never loads it)."""
    import SimpleITK as sitk
    return image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)


def _itk_array(image):
    import SimpleITK as sitk
    return sitk.GetArrayViewFromImage(image)


def _count_nonfinite(array, block=1 << 24):
    """How many elements of ``array`` are NaN or infinite (in blocks: memory bounded)."""
    flat, count = array.reshape(-1), 0
    for k in range(0, flat.size, block):
        finite = np.isfinite(flat[k:k + block])
        if not finite.all():
            count += int(finite.size - np.count_nonzero(finite))
    return count


def _stored_nonfinite(lay, block=1 << 24):
    """How many of the raw stored voxels of ``lay`` are NaN or infinite, read in blocks of ``block``
    elements into one reused buffer (ITK's NIfTI reader would have returned them as zeros)."""
    items, count = lay.nbytes // lay.dtype.itemsize, 0
    buffer = np.empty(min(items, block), dtype=lay.dtype)
    with open(lay.data_path, "rb", buffering=0) as f:
        f.seek(lay.offset)
        for start in range(0, items, block):
            part = buffer[: min(block, items - start)]
            f.readinto(memoryview(part).cast("B"))
            count += _count_nonfinite(part)
    return count


def _refuse_nonfinite(path, count):
    if count:
        raise ValueError(f"{path}: {count} NaN or infinite voxel(s); expected finite intensities")


def _verify_stream(path, lay, voxels=None):
    """Decompress the whole stream (gzip: every member) and check its checksums and length, that a
    NIfTI float stream holds finite voxels, and, when ``voxels`` (ITK's buffer as stored bytes) is
    given, that they are the voxels the stream holds."""
    wbits = 31 if lay.encoding == "gzip" else 15
    expected = lay.prefix + lay.nbytes
    floats = lay.nifti and lay.dtype is not None and lay.dtype.kind == "f"
    state = {"total": 0, "crc": 0, "carry": b"", "nonfinite": 0}

    def take(data):
        skip = max(0, min(len(data), lay.prefix - state["total"]))
        state["crc"] = checksums.crc32(data[skip:], state["crc"])
        state["total"] += len(data)
        if floats:
            data = state["carry"] + data[skip:]
            whole = len(data) - len(data) % lay.dtype.itemsize
            state["nonfinite"] += _count_nonfinite(np.frombuffer(data[:whole], dtype=lay.dtype))
            state["carry"] = data[whole:]

    inflater = _inflate(path, lay, wbits, take)
    total = state["total"]
    if not inflater.eof and total >= expected:
        _fail(path, f"the {lay.encoding} stream ends before its end marker and checksum")
    if not inflater.eof:
        _fail(path, f"the {lay.encoding} stream ends early, after {total} of {expected} bytes")
    if total != expected:
        _fail(path, f"the {lay.encoding} stream holds {total} bytes, the header gives {expected}")
    _refuse_nonfinite(path, state["nonfinite"])
    if voxels is not None and crc32(voxels) != state["crc"]:
        _fail(path, "ITK returned other voxels than the ones its compressed stream holds")


def _inflate(path, lay, wbits, take):
    """Feed every decompressed piece of the stream to ``take``; returns the last decompressor."""
    inflater, remaining = zlib.decompressobj(wbits), lay.stored_size
    try:
        with open(lay.data_path, "rb") as f:
            f.seek(lay.offset)
            while remaining is None or remaining > 0:
                chunk = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
                if not chunk:
                    break
                remaining = None if remaining is None else remaining - len(chunk)
                while chunk:
                    take(inflater.decompress(chunk))
                    chunk = b""
                    if inflater.eof:
                        chunk = inflater.unused_data
                        if chunk and lay.encoding == "gzip" and chunk.strip(b"\0"):
                            inflater = zlib.decompressobj(wbits)  # next gzip member
                        else:
                            chunk = b""
    except zlib.error as err:
        _fail(path, f"{lay.encoding} stream: {err}")
    return inflater
