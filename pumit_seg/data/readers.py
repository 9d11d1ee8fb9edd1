"""The one reader path for medical images: every tool reads NIfTI / NRRD / MHA, DICOM series and PNG here.

Each reader either returns data that is really in the file or raises `ImageReadError` naming the file and
the problem. What a plain ``SimpleITK.ReadImage`` lets through and is refused here:

* a truncated or corrupt compressed file: ITK's NIfTI reader fills the missing part of a ``.nii`` or
  ``.nii.gz`` with zeros and returns normally, so gzip streams are decompressed once more (CRC and end of
  stream checked) and the NIfTI data size is compared with what the header announces;
* non-finite voxels (NaN, inf) unless the caller passes ``allow_nonfinite=True``;
* spacing that is zero, negative or non-finite, and an origin / direction that is non-finite or singular;
* more than 3 spatial dimensions (a 4D time series is not an image these tools understand).

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
)
GZIP_MAGIC = b"\x1f\x8b"
READ_CHUNK_BYTES = 1 << 20
NIFTI_HEADER_BYTES = 544  # large enough for a NIfTI-1 (348) or NIfTI-2 (540) header
ITK_MESSAGE_CHARS = 300
DIRECTION_MIN_ABS_DET = 1e-6
MAX_IMAGE_BYTES = (
    16 * 2**30
)  # a larger decoded image is a damaged header or not a medical image  # a direction matrix this close to singular has no meaningful geometry


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


def _nifti_layout(path: str, compressed: bool) -> tuple[int, int, np.dtype] | None:
    """(vox_offset, data bytes, stored dtype) announced by a NIfTI header, None when not single-file NIfTI."""
    import gzip

    import nibabel as nib

    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            head = f.read(NIFTI_HEADER_BYTES)
    except (OSError, EOFError) as error:
        raise ImageReadError(
            path, "truncated", f"file is truncated: cannot read its NIfTI header ({error})"
        ) from None
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


def check_file_complete(path: str | os.PathLike) -> tuple[int, int]:
    """Refuse truncated or damaged files that ITK would silently complete with zeros (gzip, NIfTI).

    Returns (NaN count, inf count) of a float NIfTI's stored values, found in the same pass (ITK's NIfTI
    reader turns them into 0, so they must be counted here); (0, 0) for other files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _missing(path)
    compressed = _is_gzip(path)
    layout = _nifti_layout(path, compressed) if path.lower().endswith((".nii", ".nii.gz")) else None
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


def dicom_series_geometry(first, last, num_files: int, first_path: str, last_path: str) -> dict:
    """Geometry of a series stacked in file order, from the first and last file's headers (pydicom datasets).

    Returns ``spacing`` (slice step, PixelSpacing row, column), ``origin_xyz`` (first ImagePositionPatient),
    ``direction`` (ITK 3x3: columns = along a row, along a column, slice normal signed along the file
    order), ``slice_vector`` (the full step between consecutive files, (last - first) / (n - 1), which the
    CHAOS evaluation code uses even when it is tilted against the normal), ``pixel_spacing`` and
    ``orientation`` (the 6 direction cosines). Slice step = |last - first| / (n - 1), never SliceThickness.
    """
    pixel_spacing = _dicom_floats(first, first_path, "PixelSpacing", 2)
    orientation = _dicom_floats(first, first_path, "ImageOrientationPatient", 6)
    position_first = _dicom_floats(first, first_path, "ImagePositionPatient", 3)
    position_last = _dicom_floats(last, last_path, "ImagePositionPatient", 3)
    column_direction, row_direction = orientation[:3], orientation[3:]  # along a row, along a column
    normal = np.cross(column_direction, row_direction)
    if num_files > 1:
        slice_vector = (position_last - position_first) / (num_files - 1)
        step = float(np.linalg.norm(slice_vector))
        if step == 0:
            raise ImageReadError(last_path, "bad geometry", f"lies at the same position as {first_path}")
        slice_direction = normal if np.dot(slice_vector, normal) >= 0 else -normal
    else:  # a single slice: the step is never used for distances
        step, slice_direction, slice_vector = 1.0, normal, normal
    spacing = (step, float(pixel_spacing[0]), float(pixel_spacing[1]))
    direction = np.stack([column_direction, row_direction, slice_direction], axis=1)
    _check_geometry(first_path, spacing, position_first, direction, 3)
    return {
        "spacing": spacing,
        "origin_xyz": position_first,
        "direction": direction,
        "slice_vector": np.asarray(slice_vector, dtype=float),
        "pixel_spacing": pixel_spacing,
        "orientation": orientation,
    }


def read_dicom_series(folder: str | os.PathLike, files: list[str] | None = None) -> MedicalImage:
    """One DICOM series as a (slices, rows, columns) float32 MedicalImage, slice k = file k.

    `files` are names inside `folder` in the order wanted; by default every ``*.dcm`` in sorted file-name
    order (the CHAOS rule: never sorted by position). RescaleSlope / Intercept are applied. Geometry: spacing
    (slice step, PixelSpacing row, column) with the slice step = |last - first ImagePositionPatient| / (n - 1);
    the direction's slice column is the image-plane normal, signed along the file order. Any unreadable or
    inconsistent file raises ImageReadError naming that file.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ImageReadError(folder, "missing", "DICOM folder does not exist")
    if files is None:
        files = sorted(n for n in os.listdir(folder) if n.lower().endswith(".dcm") and not n.startswith("."))
        if not files:
            raise ImageReadError(folder, "missing", "no *.dcm files in the DICOM folder")
    slices, datasets = [], []
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise _missing(path)
        try:
            dataset = pydicom.dcmread(path)
            pixels = np.asarray(dataset.pixel_array, dtype=np.float32)
        except (
            InvalidDicomError,
            AttributeError,
            KeyError,
            ValueError,
            TypeError,
            OSError,
            EOFError,
        ) as error:
            raise ImageReadError(
                path, "unreadable", f"not a readable DICOM file ({type(error).__name__}: {error})"
            ) from None
        except Exception as error:  # noqa: BLE001 -- pydicom's pixel handlers raise many types
            raise ImageReadError(
                path, "unreadable", f"not a readable DICOM file ({type(error).__name__}: {error})"
            ) from None
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
    array = np.stack(slices)
    for path_name, pixels in zip(files, slices, strict=True):
        check_finite(os.path.join(folder, path_name), pixels)
    geometry = dicom_series_geometry(
        datasets[0], datasets[-1], len(files), os.path.join(folder, files[0]), os.path.join(folder, files[-1])
    )
    spacing, position_first, direction = geometry["spacing"], geometry["origin_xyz"], geometry["direction"]
    return MedicalImage(
        array=array,
        spacing=spacing,
        origin=tuple(float(v) for v in reversed(position_first)),
        direction=direction,
        num_channels=1,
        path=folder,
    )


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
