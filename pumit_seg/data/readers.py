"""The one reader path for medical images: every tool reads NIfTI / NRRD / MHA, DICOM series and PNG here.

Each reader either returns data that is really in the file or raises `ImageReadError` naming the file and
the problem. What a plain ``SimpleITK.ReadImage`` lets through and is refused here:

* a truncated or corrupt compressed file: ITK's NIfTI reader fills the missing part of a ``.nii`` or
  ``.nii.gz`` with zeros and returns normally, so gzip streams are decompressed once more (CRC and end of
  stream checked) and the NIfTI data size is compared with what the header announces;
* non-finite voxels (NaN, inf) unless the caller passes ``allow_nonfinite=True``;
* spacing that is zero, negative or non-finite, and an origin / direction that is non-finite or singular;
* more than 3 spatial dimensions (a 4D time series is not an image these tools understand);
* DICOM series whose slices do not lie on one regular grid: the slice geometry comes from every slice's
  ImagePositionPatient projected on the slice normal (ImageOrientationPatient), so a missing slice or uneven
  spacing is an error naming the series and the gap, never an average step; multi-frame DICOM (one file
  holding a volume, e.g. Enhanced CT / MR) is read with its per-frame positions, and layouts that cannot be
  placed correctly (Siemens mosaic, multi-frame files without frame positions, colour frames) are refused.

FreeSurfer ``.mgh`` / ``.mgz`` files, which SimpleITK does not read, are read with nibabel under the same
checks (completeness of the data, non-finite voxels, geometry).

`ImageReadError.reason` is one short fixed keyword (see `REASONS`) so callers and tests can branch on it;
``str(error)`` is ``"PATH: problem in words"``.
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "REASONS",
    "ImageReadError",
    "MedicalImage",
    "read_image",
    "read_image_header",
    "read_dicom_series",
    "dicom_series_geometry",
    "dicom_folder_series",
    "DicomSeriesFiles",
    "is_dicom_file",
    "slice_step_along_normal",
    "read_png",
    "check_raw_dataset",
]

REASONS = (
    "missing",  # the file or folder does not exist
    "unreadable",  # no reader understands it, or the reader failed
    "truncated",  # fewer data bytes than the header announces (or a gzip stream cut short)
    "corrupt",  # damaged compressed data (bad CRC, invalid deflate stream) or inconsistent files
    "non-finite",  # NaN or inf voxels
    "4D",  # more than 3 spatial dimensions
    "no spacing",  # spacing zero, negative or non-finite
    "bad geometry",  # origin / direction non-finite or direction singular, DICOM positions inconsistent
    "too large",  # the header announces more voxels than `max_bytes` allows (refused before allocating)
    "missing slice",  # a DICOM series with a gap of one or more slice steps between two slices
    "uneven spacing",  # a DICOM series whose slice steps differ (beyond rounding) without being a gap
    "unsupported",  # a DICOM layout these readers cannot place correctly (mosaic, frames without positions)
)
GZIP_MAGIC = b"\x1f\x8b"
READ_CHUNK_BYTES = 1 << 20
NIFTI_HEADER_BYTES = 544  # large enough for a NIfTI-1 (348) or NIfTI-2 (540) header
ITK_MESSAGE_CHARS = 300
DIRECTION_MIN_ABS_DET = 1e-6  # a direction matrix this close to singular has no meaningful geometry
MAX_IMAGE_BYTES = 16 * 2**30  # a larger decoded image is a damaged header or not a medical image
# slice steps of a DICOM series may differ by rounding of the written positions, never by more than this
SLICE_STEP_RELATIVE_TOLERANCE = 0.01
SLICE_STEP_ABSOLUTE_TOLERANCE_MM = 1e-3
MGH_SUFFIXES = (".mgh", ".mgz")
MGH_HEADER_BYTES = 284  # FreeSurfer MGH: a 284-byte big-endian header, then the voxels (x fastest)
MGH_DTYPES = {0: ">u1", 1: ">i4", 3: ">f4", 4: ">i2"}


class ImageReadError(ValueError):
    """A medical image that cannot be used as it is; `path` names the file, `reason` is one of `REASONS`."""

    def __init__(self, path: str | os.PathLike, reason: str, problem: str):
        if reason not in REASONS:
            raise ValueError(f"unknown ImageReadError reason {reason!r}; one of {REASONS}")
        self.path = os.fspath(path)
        self.reason = reason
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # keep path / reason when the error crosses a process boundary (multiprocessing)
        return (type(self), (self.path, self.reason, self.problem))


@dataclass
class MedicalImage:
    """Voxels and geometry of one image, in array axis order (SimpleITK's z, y, x; 2D: y, x)."""

    array: np.ndarray  # spatial axes (z, y, x), plus a trailing channel axis for vector (e.g. RGB) pixels
    spacing: tuple[float, ...]  # per spatial array axis
    origin: tuple[float, ...]  # per spatial array axis (ITK's origin reversed)
    direction: np.ndarray  # ITK's (dim, dim) direction matrix as ITK stores it (columns = x, y, z axes)
    num_channels: int = 1
    path: str = ""
    sitk_image: object | None = field(default=None, repr=False)  # SimpleITK image to write back with geometry

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.array.shape[: len(self.spacing)]


def _missing(path: str) -> ImageReadError:
    return ImageReadError(path, "missing", "file does not exist")


class _NonFiniteCounter:
    """Counts NaN and inf values of a float data block at [start, start + num_bytes) of a byte stream fed
    in chunks, so the completeness pass over a NIfTI file also finds the NaN voxels ITK would turn into 0."""

    def __init__(self, start: int, num_bytes: int, dtype: np.dtype):
        self.start, self.end, self.dtype = start, start + num_bytes, dtype
        self.position = 0
        self.carry = b""  # bytes of a value split between two chunks
        self.nan = self.inf = 0

    def feed(self, chunk: bytes) -> None:
        begin, self.position = self.position, self.position + len(chunk)
        low, high = max(self.start - begin, 0), min(self.end - begin, len(chunk))
        if low >= high:
            return
        data = self.carry + chunk[low:high]
        usable = len(data) - len(data) % self.dtype.itemsize
        self.carry = data[usable:]
        values = np.frombuffer(data[:usable], dtype=self.dtype)
        finite = np.isfinite(values)
        if not finite.all():
            nan = int(np.isnan(values).sum())
            self.nan += nan
            self.inf += int(values.size - finite.sum()) - nan


def _stream_size(path: str, compressed: bool, consumer: _NonFiniteCounter | None = None) -> int:
    """Bytes of the file's content (decompressed for gzip), feeding them to `consumer`; raises
    ImageReadError when a gzip stream is cut short or damaged.

    Concatenated gzip members are followed as gzip does; bytes after the last member that do not start a
    new member are ignored (as zlib-based readers do)."""
    if not compressed:
        if consumer is None:
            return os.path.getsize(path)
        total = 0
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK_BYTES):
                consumer.feed(chunk)
                total += len(chunk)
        return total
    total = 0
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    member_complete = False
    pending = b""
    with open(path, "rb") as f:
        while True:
            chunk = pending or f.read(READ_CHUNK_BYTES)
            pending = b""
            if not chunk:
                break
            if member_complete:
                if not chunk.startswith(GZIP_MAGIC):
                    break
                decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                member_complete = False
            try:
                data = decompressor.decompress(chunk)
            except zlib.error as error:
                raise ImageReadError(path, "corrupt", f"damaged gzip data ({error})") from None
            total += len(data)
            if consumer is not None:
                consumer.feed(data)
            if decompressor.eof:
                member_complete = True
                pending = decompressor.unused_data
    if not member_complete:
        raise ImageReadError(path, "truncated", "compressed file is cut short (the gzip stream has no end)")
    return total


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _read_head(path: str, compressed: bool, num_bytes: int, format_name: str) -> bytes:
    """The first `num_bytes` of a (possibly gzipped) file; a file cut inside them is ImageReadError "truncated"."""
    import gzip

    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            return f.read(num_bytes)
    except (OSError, EOFError) as error:
        raise ImageReadError(
            path, "truncated", f"file is truncated: cannot read its {format_name} header ({error})"
        ) from None


def _nifti_layout(path: str, compressed: bool) -> tuple[int, int, np.dtype] | None:
    """(vox_offset, data bytes, stored dtype) announced by a NIfTI header, None when not single-file NIfTI."""
    import nibabel as nib

    head = _read_head(path, compressed, NIFTI_HEADER_BYTES, "NIfTI")
    for header_class in (nib.Nifti1Header, nib.Nifti2Header):
        if len(head) < header_class.sizeof_hdr:
            continue
        try:
            header = header_class.from_fileobj(io.BytesIO(head), check=False)
        except Exception:  # noqa: BLE001 -- not this NIfTI version; the next one or ITK will say
            continue
        if header["sizeof_hdr"] != header_class.sizeof_hdr:
            continue
        magic = bytes(header["magic"]).rstrip(b"\x00")
        if magic not in (b"n+1", b"n+2"):
            return None  # a .hdr/.img pair: data lives in another file
        dtype = header.get_data_dtype()
        num_bytes = int(np.prod(header.get_data_shape(), dtype=np.int64)) * dtype.itemsize
        return int(header.get_data_offset()), num_bytes, dtype
    return None


def _mgh_layout(path: str, compressed: bool) -> tuple[int, int, np.dtype]:
    """(data offset, data bytes, stored dtype) announced by a FreeSurfer MGH header (``.mgh``, ``.mgz``)."""
    import struct

    head = _read_head(path, compressed, MGH_HEADER_BYTES, "MGH")
    if len(head) < MGH_HEADER_BYTES:
        raise ImageReadError(
            path, "truncated", f"file is truncated: {len(head)} bytes, an MGH header has 284"
        )
    version, width, height, depth, frames, kind = struct.unpack(">6i", head[:24])
    if version != 1 or min(width, height, depth, frames) < 1 or kind not in MGH_DTYPES:
        raise ImageReadError(
            path,
            "unreadable",
            f"not a FreeSurfer MGH file (version {version}, size {width}x{height}x{depth}x{frames}, type {kind})",
        )
    dtype = np.dtype(MGH_DTYPES[kind])
    return MGH_HEADER_BYTES, width * height * depth * frames * dtype.itemsize, dtype


def _read_mgh(path: str, allow_nonfinite: bool, max_bytes: int) -> MedicalImage:
    """A FreeSurfer ``.mgh`` / ``.mgz`` volume through nibabel (SimpleITK has no MGH reader), with ITK's
    (LPS) geometry and the checks of `read_image`."""
    import nibabel as nib
    import SimpleITK as sitk

    offset, num_bytes, dtype = _mgh_layout(path, _is_gzip(path))
    if num_bytes > max_bytes:
        raise ImageReadError(
            path,
            "too large",
            f"header announces {num_bytes / 2**30:.1f} GiB of voxels (more than {max_bytes / 2**30:.1f})",
        )
    check_file_complete(path)
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)
    except Exception as error:  # noqa: BLE001 -- nibabel raises many types for damaged files
        raise ImageReadError(
            path, "unreadable", f"not a readable MGH file ({type(error).__name__}: {error})"
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise ImageReadError(path, "4D", f"image has {data.ndim} dimensions {data.shape}; 2D or 3D expected")
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=float)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    affine = np.asarray(image.affine, dtype=float)
    direction = ras_to_lps @ affine[:3, :3] / zooms  # columns: the x, y, z index axes
    origin_xyz = ras_to_lps @ affine[:3, 3]
    _check_geometry(path, zooms, origin_xyz, direction, 3)
    array = np.ascontiguousarray(data.transpose(2, 1, 0), dtype=data.dtype.newbyteorder("="))  # (z, y, x)
    if not allow_nonfinite:
        check_finite(path, array)
    sitk_image = sitk.GetImageFromArray(array)
    sitk_image.SetSpacing([float(z) for z in zooms])
    sitk_image.SetOrigin([float(o) for o in origin_xyz])
    sitk_image.SetDirection([float(v) for v in direction.ravel()])
    return MedicalImage(
        array=array,
        spacing=tuple(float(z) for z in reversed(zooms)),
        origin=tuple(float(o) for o in reversed(origin_xyz)),
        direction=direction,
        num_channels=1,
        path=path,
        sitk_image=sitk_image,
    )


def check_file_complete(path: str | os.PathLike) -> tuple[int, int]:
    """Refuse truncated or damaged files that ITK would silently complete with zeros (gzip, NIfTI).

    Returns (NaN count, inf count) of a float NIfTI's stored values, found in the same pass (ITK's NIfTI
    reader turns them into 0, so they must be counted here); (0, 0) for other files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _missing(path)
    compressed = _is_gzip(path)
    layout = None
    if path.lower().endswith((".nii", ".nii.gz")):
        layout = _nifti_layout(path, compressed)
    elif path.lower().endswith(MGH_SUFFIXES):
        layout = _mgh_layout(path, compressed)
    counter = None
    if layout is not None and np.issubdtype(layout[2], np.floating):
        counter = _NonFiniteCounter(*layout)
    available = _stream_size(path, compressed, counter)
    if layout is not None and available < layout[0] + layout[1]:
        raise ImageReadError(
            path,
            "truncated",
            f"file is truncated: the header announces {layout[0] + layout[1]} bytes, it holds {available}",
        )
    return (counter.nan, counter.inf) if counter is not None else (0, 0)


def _check_geometry(path: str, spacing, origin, direction, dimension: int) -> None:
    spacing = np.asarray(spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ImageReadError(path, "no spacing", f"spacing {spacing.tolist()} is not positive and finite")
    if not np.all(np.isfinite(np.asarray(origin, dtype=float))):
        raise ImageReadError(path, "bad geometry", f"origin {list(origin)} is not finite")
    matrix = np.asarray(direction, dtype=float).reshape(dimension, dimension)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < DIRECTION_MIN_ABS_DET:
        raise ImageReadError(
            path, "bad geometry", f"direction {matrix.ravel().tolist()} is singular or not finite"
        )


def check_finite(path: str, array: np.ndarray) -> None:
    """Raise ImageReadError (reason "non-finite") when a float array holds NaN or inf voxels."""
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        finite = np.isfinite(array)
        if not finite.all():
            nan = int(np.isnan(array).sum())
            inf = int(array.size - finite.sum()) - nan
            raise ImageReadError(
                path,
                "non-finite",
                f"{nan} NaN and {inf} infinite voxels (of {array.size}); the image is damaged",
            )


def read_image_header(path: str | os.PathLike):
    """SimpleITK ImageFileReader with the header read (size, spacing, ...), checked like `read_image`.

    For tools that copy files without decoding them: the file is still checked to be complete (and a
    float NIfTI to hold no NaN / inf)."""
    path = os.fspath(path)
    reader, (nan, inf) = _checked_header(path)
    if nan or inf:
        raise ImageReadError(path, "non-finite", f"{nan} NaN and {inf} infinite voxels; the image is damaged")
    return reader


def _checked_header(path: str):
    """(ImageFileReader with the header read, (NaN, inf) counts of a float NIfTI), checked as `read_image`."""
    import SimpleITK as sitk

    nonfinite = check_file_complete(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ImageReadError(path, "unreadable", f"not a readable image ({_itk_message(error)})") from None
    dimension = reader.GetDimension()
    if dimension > 3:
        raise ImageReadError(
            path, "4D", f"image has {dimension} dimensions {reader.GetSize()}; 2D or 3D expected"
        )
    _check_geometry(path, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), dimension)
    return reader, nonfinite


def _itk_message(error: Exception) -> str:
    """ITK's own words from an exception (dropping the C++ source location line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    words = [line for line in lines if not line.startswith("Exception thrown in SimpleITK")]
    return " ".join(words or lines)[:ITK_MESSAGE_CHARS] or type(error).__name__


def _nifti_nonfinite(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(mask, values) in array axis order (z, y, x) of NaN / inf voxels of a float NIfTI, else None.

    ITK's NIfTI reader turns NaN and inf into 0, so the check reads the stored values with nibabel."""
    import nibabel as nib

    try:
        proxy = nib.load(path).dataobj
        if not np.issubdtype(proxy.dtype, np.floating):
            return None
        raw = np.asarray(proxy.get_unscaled())
    except Exception:  # noqa: BLE001 -- nibabel cannot read it; ITK read it, so leave the check to ITK's data
        return None
    finite = np.isfinite(raw)
    if finite.all():
        return None
    raw = raw.reshape(raw.shape[:3] if raw.ndim > 3 else raw.shape)
    axes = tuple(reversed(range(raw.ndim)))
    return ~finite.reshape(raw.shape).transpose(axes), raw.transpose(axes)


def read_image(
    path: str | os.PathLike, *, allow_nonfinite: bool = False, max_bytes: int = MAX_IMAGE_BYTES
) -> MedicalImage:
    """Read NIfTI / NRRD / MHA / anything SimpleITK reads, refusing damaged files (see the module doc).

    The header is read first: an image whose decoded size would exceed `max_bytes` is refused before
    anything is allocated."""
    import SimpleITK as sitk

    path = os.fspath(path)
    if path.lower().endswith(MGH_SUFFIXES):
        if not os.path.isfile(path):
            raise _missing(path)
        return _read_mgh(path, allow_nonfinite, max_bytes)
    header, (nan, inf) = _checked_header(path)
    num_bytes = int(np.prod(header.GetSize(), dtype=np.int64)) * header.GetNumberOfComponents()
    num_bytes *= np.dtype(
        sitk.GetArrayViewFromImage(sitk.Image([1] * header.GetDimension(), header.GetPixelID())).dtype
    ).itemsize
    if num_bytes > max_bytes:
        raise ImageReadError(
            path,
            "too large",
            f"header announces {header.GetSize()} voxels, {num_bytes / 2**30:.1f} GiB decoded "
            f"(more than {max_bytes / 2**30:.1f} GiB): a damaged header or not an image for these tools",
        )
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as error:
        raise ImageReadError(path, "unreadable", f"not a readable image ({_itk_message(error)})") from None
    dimension = image.GetDimension()
    size = image.GetSize()
    if dimension > 3:
        raise ImageReadError(path, "4D", f"image has {dimension} dimensions {size}; 2D or 3D expected")
    _check_geometry(path, image.GetSpacing(), image.GetOrigin(), image.GetDirection(), dimension)
    array = sitk.GetArrayFromImage(image)
    if nan or inf:  # ITK turned them into 0: refuse, or put them back for a caller that allows them
        if not allow_nonfinite:
            raise ImageReadError(
                path,
                "non-finite",
                f"{nan} NaN and {inf} infinite voxels (of {array.size}); the image is damaged",
            )
        restored = _nifti_nonfinite(path)
        if (
            restored is not None
            and restored[0].shape == array.shape
            and np.issubdtype(array.dtype, np.floating)
        ):
            array[restored[0]] = restored[1][restored[0]]
    if not allow_nonfinite:
        check_finite(path, array)
    return MedicalImage(
        array=array,
        spacing=tuple(float(s) for s in reversed(image.GetSpacing())),
        origin=tuple(float(o) for o in reversed(image.GetOrigin())),
        direction=np.asarray(image.GetDirection(), dtype=float).reshape(dimension, dimension),
        num_channels=int(image.GetNumberOfComponentsPerPixel()),
        path=path,
        sitk_image=image,
    )


def _dicom_floats(dataset, path: str, tag: str, count: int) -> np.ndarray:
    value = dataset.get(tag)
    if value is None:
        raise ImageReadError(path, "bad geometry", f"DICOM file has no {tag}")
    try:
        array = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        raise ImageReadError(path, "bad geometry", f"DICOM {tag} {value!r} is not numeric") from None
    if array.size != count or not np.all(np.isfinite(array)):
        raise ImageReadError(path, "bad geometry", f"DICOM {tag} {value!r} is not {count} finite numbers")
    return array


def slice_step_along_normal(offsets, names: list[str], series: str) -> float:
    """The regular slice step (mm) of slices at `offsets` along the slice normal, in stack order.

    Every consecutive pair must step the same distance in the same direction (within
    `SLICE_STEP_RELATIVE_TOLERANCE` of the step, or `SLICE_STEP_ABSOLUTE_TOLERANCE_MM`): otherwise
    ImageReadError naming `series` and the pair of slices (`names`) at the gap, with reason "bad geometry"
    (two slices at one position, or positions going back and forth), "missing slice" (gaps that are whole
    multiples of the step) or "uneven spacing". Returns |last - first| / (n - 1), 1.0 for a single slice."""
    offsets = np.asarray(offsets, dtype=float)
    if offsets.size < 2:
        return 1.0
    steps = np.diff(offsets)
    lengths = np.abs(steps)
    same = np.flatnonzero(lengths <= SLICE_STEP_ABSOLUTE_TOLERANCE_MM)
    if same.size:
        i = int(same[0])
        raise ImageReadError(
            series,
            "bad geometry",
            f"{names[i]} and {names[i + 1]} lie at the same position ({offsets[i]:.4g} mm along the slice "
            "normal): two slices in one place (a repeated acquisition or several series in one folder)",
        )
    if not (np.all(steps > 0) or np.all(steps < 0)):
        i = int(np.flatnonzero(np.sign(steps) != np.sign(steps[0]))[0])
        raise ImageReadError(
            series,
            "bad geometry",
            f"slice positions go back and forth in this order: {names[i]} -> {names[i + 1]} steps "
            f"{steps[i]:+.4g} mm along the slice normal, {names[0]} -> {names[1]} {steps[0]:+.4g} mm",
        )
    step = float(np.median(lengths[lengths < 1.5 * lengths.min()]))  # the regular step: gaps are longer
    tolerance = max(SLICE_STEP_RELATIVE_TOLERANCE * step, SLICE_STEP_ABSOLUTE_TOLERANCE_MM)
    off = np.flatnonzero(np.abs(lengths - step) > tolerance)
    if off.size:
        i = int(off[0])
        multiples = lengths[off] / step
        whole = np.all(multiples >= 1.5) and np.all(
            np.abs(multiples - np.round(multiples)) * step <= tolerance
        )
        if whole:
            missing = int(np.sum(np.round(multiples) - 1))
            raise ImageReadError(
                series,
                "missing slice",
                f"{missing} slice(s) missing: a gap of {lengths[i]:.4g} mm between {names[i]} and "
                f"{names[i + 1]} where the series steps {step:.4g} mm ({off.size} gap(s) in {offsets.size} slices)",
            )
        low, high = int(np.argmin(lengths)), int(np.argmax(lengths))
        raise ImageReadError(
            series,
            "uneven spacing",
            f"uneven slice spacing: steps from {lengths[low]:.4g} mm ({names[low]} -> {names[low + 1]}) to "
            f"{lengths[high]:.4g} mm ({names[high]} -> {names[high + 1]}); no single spacing fits",
        )
    return float(abs(offsets[-1] - offsets[0]) / (offsets.size - 1))


def _plane_geometry(positions: np.ndarray, orientation: np.ndarray, pixel_spacing: np.ndarray, names, series):
    """Geometry dict (see `dicom_series_geometry`) of slices at `positions` (n, 3) in stack order."""
    column_direction, row_direction = orientation[:3], orientation[3:]  # along a row, along a column
    normal = np.cross(column_direction, row_direction)
    offsets = positions @ normal
    step = slice_step_along_normal(offsets, list(names), series)
    if len(positions) > 1:
        slice_vector = (positions[-1] - positions[0]) / (len(positions) - 1)
        slice_direction = normal if offsets[-1] >= offsets[0] else -normal
    else:  # a single slice: the step is never used for distances
        slice_direction, slice_vector = normal, normal
    spacing = (step, float(pixel_spacing[0]), float(pixel_spacing[1]))
    direction = np.stack([column_direction, row_direction, slice_direction], axis=1)
    _check_geometry(series, spacing, positions[0], direction, 3)
    return {
        "spacing": spacing,
        "origin_xyz": positions[0],
        "direction": direction,
        "slice_vector": np.asarray(slice_vector, dtype=float),
        "pixel_spacing": pixel_spacing,
        "orientation": orientation,
        "offsets": offsets,
    }


def dicom_series_geometry(headers: list, paths: list[str]) -> dict:
    """Geometry of a series of one-slice files stacked in the given order, from every file's header.

    `headers` are pydicom datasets (pixels not needed), `paths` their files. Each slice's
    ImagePositionPatient is projected on the slice normal (the cross product of ImageOrientationPatient's
    two directions); the steps between consecutive slices must be equal (`slice_step_along_normal`):
    a missing slice or uneven spacing raises ImageReadError naming the series folder and the gap, never
    an average. Orientation and PixelSpacing must agree across the files.

    Returns ``spacing`` (slice step along the normal, PixelSpacing row, column), ``origin_xyz`` (first
    ImagePositionPatient), ``direction`` (ITK 3x3: columns = along a row, along a column, slice normal
    signed along the stack order), ``slice_vector`` (the full step between consecutive files,
    (last - first) / (n - 1), which the CHAOS evaluation code uses even when it is tilted against the
    normal), ``pixel_spacing``, ``orientation`` (the 6 direction cosines) and ``offsets`` (mm along the
    normal per slice)."""
    series = os.path.dirname(paths[0]) or paths[0]
    pixel_spacing = _dicom_floats(headers[0], paths[0], "PixelSpacing", 2)
    orientation = _dicom_floats(headers[0], paths[0], "ImageOrientationPatient", 6)
    positions = []
    for header, path in zip(headers, paths, strict=True):
        positions.append(_dicom_floats(header, path, "ImagePositionPatient", 3))
        if header is headers[0]:
            continue
        # every slice of one series lies in the same plane orientation with the same pixel spacing
        for tag, first, count, tolerance in (
            ("ImageOrientationPatient", orientation, 6, {"atol": 1e-4}),
            ("PixelSpacing", pixel_spacing, 2, {"rtol": 1e-4}),
        ):
            other = _dicom_floats(header, path, tag, count)
            if not np.allclose(other, first, **tolerance):
                raise ImageReadError(
                    path,
                    "bad geometry",
                    f"{tag} {other.tolist()} differs from {os.path.basename(paths[0])}'s {first.tolist()} "
                    "in the same series",
                )
    names = [os.path.basename(p) for p in paths]
    return _plane_geometry(np.stack(positions), orientation, pixel_spacing, names, series)


def _num_frames(dataset) -> int:
    try:
        return int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _unsupported_layout(dataset, path: str) -> None:
    """Refuse DICOM layouts whose pixels cannot be placed as slices of a volume here."""
    image_type = [str(v).upper() for v in (dataset.get("ImageType") or [])]
    mosaic_count = dataset.get((0x0019, 0x100A))  # Siemens NumberOfImagesInMosaic
    if "MOSAIC" in image_type or mosaic_count is not None:
        raise ImageReadError(
            path,
            "unsupported",
            "a Siemens mosaic (several slices tiled in one frame) cannot be read as a volume here; "
            "convert the series with a mosaic-aware tool (e.g. dcm2niix) and use the NIfTI",
        )
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise ImageReadError(
            path,
            "unsupported",
            f"{samples} samples per pixel ({dataset.get('PhotometricInterpretation', '?')}): colour DICOM "
            "is not read as a grey volume",
        )


def _functional_item(dataset, frame: int, sequence: str):
    """The first item of a functional group `sequence` for `frame`: per-frame, else shared, else None."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = dataset.get(groups)
        if items is not None and len(items) > index:
            found = items[index].get(sequence)
            if found is not None and len(found):
                return found[0]
    return None


def _multiframe_geometry(dataset, path: str) -> tuple[np.ndarray, dict, np.ndarray, np.ndarray]:
    """(frame order, geometry, slopes, intercepts) of a multi-frame file from its functional groups."""
    frames = _num_frames(dataset)
    positions, slopes, intercepts = [], [], []
    orientation = pixel_spacing = None
    for frame in range(frames):
        plane = _functional_item(dataset, frame, "PlanePositionSequence")
        if plane is None:
            raise ImageReadError(
                path,
                "unsupported",
                f"multi-frame DICOM ({frames} frames) without per-frame positions (PlanePositionSequence in "
                "PerFrameFunctionalGroupsSequence): the frames cannot be placed as slices",
            )
        positions.append(_dicom_floats(plane, path, "ImagePositionPatient", 3))
        plane_orientation = _functional_item(dataset, frame, "PlaneOrientationSequence")
        frame_orientation = _dicom_floats(plane_orientation or dataset, path, "ImageOrientationPatient", 6)
        measures = _functional_item(dataset, frame, "PixelMeasuresSequence")
        frame_spacing = _dicom_floats(measures or dataset, path, "PixelSpacing", 2)
        if orientation is None:
            orientation, pixel_spacing = frame_orientation, frame_spacing
        elif not np.allclose(frame_orientation, orientation, atol=1e-4) or not np.allclose(
            frame_spacing, pixel_spacing, rtol=1e-4
        ):
            raise ImageReadError(
                path,
                "unsupported",
                f"frame {frame + 1} has another orientation or pixel spacing than frame 1: several stacks in "
                "one multi-frame file",
            )
        transform = _functional_item(dataset, frame, "PixelValueTransformationSequence") or dataset
        slopes.append(float(transform.get("RescaleSlope", 1.0)))
        intercepts.append(float(transform.get("RescaleIntercept", 0.0)))
    positions = np.stack(positions)
    normal = np.cross(orientation[:3], orientation[3:])
    order = np.argsort(positions @ normal, kind="stable")  # frames need not be stored in position order
    if np.all(np.diff(positions @ normal) < 0):
        order = np.arange(frames)  # stored top-down: keep the file's order
    names = [f"frame {k + 1}" for k in order]
    geometry = _plane_geometry(positions[order], orientation, pixel_spacing, names, path)
    return order, geometry, np.asarray(slopes)[order], np.asarray(intercepts)[order]


def _read_dicom_file(path: str, stop_before_pixels: bool = False):
    import pydicom

    if not os.path.isfile(path):
        raise _missing(path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except Exception as error:  # noqa: BLE001 -- pydicom raises many types for damaged files
        raise ImageReadError(
            path, "unreadable", f"not a readable DICOM file ({type(error).__name__}: {error})"
        ) from None


def _dicom_pixels(dataset, path: str) -> np.ndarray:
    try:
        return np.asarray(dataset.pixel_array, dtype=np.float32)
    except Exception as error:  # noqa: BLE001 -- pydicom's pixel handlers raise many types
        raise ImageReadError(
            path, "unreadable", f"not a readable DICOM file ({type(error).__name__}: {error})"
        ) from None


def _dicom_image(array: np.ndarray, geometry: dict, path: str) -> MedicalImage:
    """A grey DICOM volume (depth first) with the geometry read from its headers."""
    return MedicalImage(
        array=array,
        spacing=geometry["spacing"],
        origin=tuple(float(v) for v in reversed(geometry["origin_xyz"])),
        direction=geometry["direction"],
        num_channels=1,
        path=path,
    )


def _read_multiframe(path: str, dataset) -> MedicalImage:
    """A multi-frame DICOM file (Enhanced CT / MR / PET ...) as the volume it holds, frames by position."""
    _unsupported_layout(dataset, path)
    order, geometry, slopes, intercepts = _multiframe_geometry(dataset, path)
    pixels = _dicom_pixels(dataset, path)
    if pixels.ndim != 3 or pixels.shape[0] != len(order):
        raise ImageReadError(
            path,
            "unsupported",
            f"pixel data of shape {pixels.shape} for {len(order)} frames of one grey plane",
        )
    array = pixels[order] * slopes[:, None, None].astype(np.float32) + intercepts[:, None, None].astype(
        np.float32
    )
    check_finite(path, array)
    return _dicom_image(array, geometry, path)


def is_dicom_file(path: str) -> bool:
    """Whether `path` starts like a DICOM Part 10 file (the "DICM" marker after a 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


@dataclass
class DicomSeriesFiles:
    """One image of a DICOM folder: a series of one-slice files, or one multi-frame file."""

    uid: str  # SeriesInstanceUID ("" when absent)
    files: list[str]  # names in the folder: slices ordered along the normal, or the one multi-frame file
    multiframe: bool = False


def dicom_folder_series(folder: str | os.PathLike, names: list[str]) -> list[DicomSeriesFiles]:
    """The images of DICOM files `names` in `folder`, from their headers: every multi-frame file on its
    own, the one-slice files grouped by SeriesInstanceUID and ordered by position along the slice normal
    (geometry not checked yet: `read_dicom_series` does). A header that cannot be read raises
    ImageReadError naming the file."""
    folder = os.fspath(folder)
    grouped: dict[str, list[tuple[float, str]]] = {}
    images = []
    for name in sorted(names):
        path = os.path.join(folder, name)
        header = _read_dicom_file(path, stop_before_pixels=True)
        uid = str(header.get("SeriesInstanceUID", "") or "")
        if _num_frames(header) > 1:
            images.append(DicomSeriesFiles(uid, [name], multiframe=True))
            continue
        if header.get("ImagePositionPatient") is None or header.get("ImageOrientationPatient") is None:
            offset = float(header.get("InstanceNumber", 0) or 0)  # read_dicom_series reports the missing tag
        else:
            position = _dicom_floats(header, path, "ImagePositionPatient", 3)
            orientation = _dicom_floats(header, path, "ImageOrientationPatient", 6)
            offset = float(position @ np.cross(orientation[:3], orientation[3:]))
        grouped.setdefault(uid, []).append((offset, name))
    for uid, entries in sorted(grouped.items()):
        images.append(DicomSeriesFiles(uid, [name for _, name in sorted(entries)]))
    return sorted(images, key=lambda s: (s.files[0], s.uid))


def read_dicom_series(folder: str | os.PathLike, files: list[str] | None = None) -> MedicalImage:
    """One DICOM series as a (slices, rows, columns) float32 MedicalImage, slice k = file k.

    `files` are names inside `folder` in the order wanted; by default every ``*.dcm`` in sorted file-name
    order (the CHAOS rule: never sorted by position). RescaleSlope / Intercept are applied. Geometry
    (`dicom_series_geometry`): every slice's position projected on the slice normal; the steps must be
    regular (a missing slice or uneven spacing is an error naming the series and the gap); spacing
    (slice step, PixelSpacing row, column); the direction's slice column is the image-plane normal,
    signed along the file order. A single multi-frame file is read as the volume it holds (its frames
    ordered by position). Any unreadable or inconsistent file raises ImageReadError naming that file.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ImageReadError(folder, "missing", "DICOM folder does not exist")
    if files is None:
        files = sorted(n for n in os.listdir(folder) if n.lower().endswith(".dcm") and not n.startswith("."))
        if not files:
            raise ImageReadError(folder, "missing", "no *.dcm files in the DICOM folder")
    slices, datasets, paths = [], [], []
    for name in files:
        path = os.path.join(folder, name)
        dataset = _read_dicom_file(path)
        if _num_frames(dataset) > 1:
            if len(files) == 1:
                return _read_multiframe(path, dataset)
            raise ImageReadError(
                path,
                "unsupported",
                f"a multi-frame file ({_num_frames(dataset)} frames) among {len(files)} files of one series",
            )
        _unsupported_layout(dataset, path)
        pixels = _dicom_pixels(dataset, path)
        if pixels.ndim != 2:
            raise ImageReadError(
                path,
                "4D" if pixels.ndim > 2 else "unreadable",
                f"holds a {pixels.ndim}D pixel array; one 2D slice per file expected",
            )
        if slices and pixels.shape != slices[0].shape:
            raise ImageReadError(
                path, "corrupt", f"has {pixels.shape} pixels, {files[0]} in the same series {slices[0].shape}"
            )
        slope = float(dataset.get("RescaleSlope", 1.0))
        intercept = float(dataset.get("RescaleIntercept", 0.0))
        slices.append(pixels * slope + intercept)
        datasets.append(dataset)
        paths.append(path)
    array = np.stack(slices)
    for path, pixels in zip(paths, slices, strict=True):
        check_finite(path, pixels)
    return _dicom_image(array, dicom_series_geometry(datasets, paths), folder)


def read_png(path: str | os.PathLike, as_grey: bool = False) -> np.ndarray:
    """PNG or JPEG pixels: (rows, columns) for grey, (rows, columns, 3) for RGB(A, alpha dropped).

    Palette PNGs are read as grey: the palette colours' luminance (0.299 R + 0.587 G + 0.114 B), as the
    official CHAOS evaluation code's ``cv2.imread(path, 0)`` does, not as palette indices. 16-bit grey stays
    16-bit. With `as_grey` colour images are turned into grey the same way (luminance), as OpenCV's
    ``IMREAD_GRAYSCALE`` does."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _missing(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(image)
            elif mode in ("1", "P", "PA"):
                # palette -> colours -> luminance (ITU-R 601-2), as OpenCV's IMREAD_GRAYSCALE in the CHAOS code
                array = np.asarray(image.convert("L"))
            elif mode == "LA":
                array = np.asarray(image.getchannel(0))
            else:
                array = np.asarray(image.convert("L" if as_grey else "RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        problem = f"not a readable PNG / JPEG ({error})"
        reason = "truncated" if "truncated" in str(error).lower() else "unreadable"
        raise ImageReadError(path, reason, problem) from None
    if np.issubdtype(array.dtype, np.floating):
        check_finite(path, array)
    return array


def check_raw_dataset(dataset_folder: str | os.PathLike, folders=("imagesTr", "labelsTr", "imagesTs")) -> int:
    """Read every image of an nnU-Net raw dataset through `read_image`; returns how many were checked.

    For tools that hand a dataset to nnU-Net's own readers (the planner), which would take a truncated
    ``.nii.gz`` as zeros and NaN voxels as 0: the first damaged file raises ImageReadError naming it."""
    import json

    dataset_folder = os.fspath(dataset_folder)
    dataset_json = os.path.join(dataset_folder, "dataset.json")
    if not os.path.isfile(dataset_json):
        raise ImageReadError(dataset_json, "missing", "dataset.json does not exist")
    with open(dataset_json) as f:
        file_ending = json.load(f).get("file_ending", ".nii.gz")
    checked = 0
    for sub in folders:
        folder = os.path.join(dataset_folder, sub)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(file_ending) and not name.startswith("."):
                read_image(os.path.join(folder, name))
                checked += 1
    return checked
