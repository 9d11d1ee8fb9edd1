"""A small heterogeneous pre-training corpus written as real image files, plus its dataset config.

What `pumit_pretrain prepare` meets in the wild, in miniature (docs/pretraining.md): 2D and 3D images,
CT-like (Hounsfield units) and MR-like (arbitrary units, bias field), grey and RGB, every degree of
anisotropy 0..5, the depth axis first in the file or not, and the formats NIfTI, NRRD, MHA, DICOM
series, PNG and JPEG. The bodies come from `pumit_seg.phantoms.abdomen.make_phantom`; 2D images are
X-ray-like grey PNGs and fundus-like RGB JPEGs / PNGs.

    python -m pumit_seg.phantoms.pretrain -o /tmp/corpus     # writes /tmp/corpus/datasets.json

`write_pretrain_corpus(root)` returns the config path, ready for ``pumit_pretrain prepare CONFIG``.
With ``broken=True`` a folder of unusable files joins the corpus (4D, truncated gzip, NaN voxels, all
zero, too small, not an image), each of which `prepare` must report with its reason.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from PIL import Image

from pumit_seg.atomic import atomic_path, write_json_atomic
from pumit_seg.phantoms.abdomen import PhantomConfig, make_phantom
from pumit_seg.phantoms.dicom import write_dicom_series

__all__ = ["CorpusDataset", "DEFAULT_DATASETS", "write_pretrain_corpus", "main"]

CONFIG_NAME = "datasets.json"


@dataclass(frozen=True)
class CorpusDataset:
    """One phantom dataset of the corpus.

    `spacing` is (s_d, s_h, s_w) mm of the depth-first volume; `depth_axis_in_file` says which
    array axis (numpy order z, y, x of the written file) holds depth, so a dataset can be written
    "sagittally" (depth last) and `prepare` must find and move it. `kind` is "volume" (3D via
    SimpleITK, extension from `file_format`), "dicom" (one folder of slices per image), "xray"
    (2D grey) or "fundus" (2D RGB).
    """

    name: str
    kind: str
    file_format: str  # ".nii.gz", ".nrrd", ".mha", "dicom", ".png", ".jpg"
    modality: str  # "CT", "MR", "XR", "RGB"
    num_images: int
    shape: tuple[int, int, int] = (24, 72, 72)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    depth_axis_in_file: int = 0
    weight: float = 1.0
    config_extra: dict = field(default_factory=dict)  # e.g. {"depth_axis": "x"}: given in the config


# aniso_d = floor(log2(clip(s_d / min(s_h, s_w), 1, 32))): the spacings below cover 0..4; 2D is 5.
DEFAULT_DATASETS: tuple[CorpusDataset, ...] = (
    CorpusDataset("ct_iso", "volume", ".nii.gz", "CT", 3, (40, 64, 64), (1.0, 0.9, 0.9)),  # aniso_d 0
    CorpusDataset("ct_dicom", "dicom", "dicom", "CT", 2, (16, 64, 64), (2.5, 0.75, 0.75)),  # 1
    # depth stored along the file's x axis (a sagittal acquisition), found from the spacing: aniso_d 2
    CorpusDataset("mr_sagittal", "volume", ".nii.gz", "MR", 2, (12, 64, 56), (4.0, 0.9, 0.9), 2),
    CorpusDataset("mr_nrrd", "volume", ".nrrd", "MR", 2, (8, 64, 64), (7.0, 0.8, 0.8), weight=0.5),  # 3
    # depth along the file's y axis, given in the config (spacing alone would also find it): aniso_d 4
    CorpusDataset(
        "ct_mha_thick",
        "volume",
        ".mha",
        "CT",
        2,
        (6, 56, 64),
        (12.0, 0.7, 0.7),
        1,
        config_extra={"depth_axis": "y"},
    ),
    CorpusDataset("xray_png", "xray", ".png", "XR", 4, (1, 96, 80), (1.0, 0.3, 0.3), weight=2.0),  # 2D: 5
    CorpusDataset("fundus_jpg", "fundus", ".jpg", "RGB", 3, (1, 80, 88), (1.0, 0.02, 0.02)),
    CorpusDataset("fundus_png", "fundus", ".png", "RGB", 2, (1, 72, 72), (1.0, 0.02, 0.02)),
)


def _volume_image(array_zyx: np.ndarray, spacing_zyx, origin_xyz=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    image.SetOrigin([float(o) for o in origin_xyz])
    return image


def _body_volume(rng: np.random.Generator, dataset: CorpusDataset) -> np.ndarray:
    """A depth-first (D, H, W) float32 phantom in the dataset's contrast (CT: HU, MR: arbitrary units)."""
    config = PhantomConfig(shape=dataset.shape, spacing=dataset.spacing, modality=dataset.modality)
    image, _, _ = make_phantom(rng, config)
    return image[0]


def _to_file_axes(volume_dhw: np.ndarray, spacing_dhw, depth_axis: int):
    """Move depth from axis 0 to `depth_axis` of the written array (numpy z, y, x order)."""
    array = np.moveaxis(volume_dhw, 0, depth_axis)
    spacing = list(spacing_dhw[1:])
    spacing.insert(depth_axis, spacing_dhw[0])
    return np.ascontiguousarray(array), tuple(spacing)


def _write_dicom_series(volume_dhw: np.ndarray, spacing_dhw, folder: str) -> None:
    """One CT slice file per depth index (Hounsfield units stored as uint16 with RescaleIntercept -1024),
    with the geometry tags ITK / pydicom read spacing from."""
    hounsfield = np.clip(np.round(volume_dhw), -1024, 3071)
    write_dicom_series(
        folder,
        (hounsfield + 1024).astype(np.uint16),
        positions=[(0.0, 0.0, float(k * spacing_dhw[0])) for k in range(hounsfield.shape[0])],
        names=[f"slice_{k:03d}.dcm" for k in range(hounsfield.shape[0])],
        modality="CT",
        pixel_spacing=(float(spacing_dhw[1]), float(spacing_dhw[2])),
        intercept=-1024.0,
        slice_thickness=float(spacing_dhw[0]),
    )


def _xray(rng: np.random.Generator, shape_hw) -> np.ndarray:
    """A chest-X-ray-like 8-bit grey image: bright body, darker lungs, a spine, noise, black border."""
    h, w = shape_hw
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    body = (y / 0.95) ** 2 + (x / rng.uniform(0.8, 0.9)) ** 2 <= 1
    lungs = ((y + 0.05) / 0.6) ** 2 + ((np.abs(x) - 0.4) / 0.28) ** 2 <= 1
    image = np.zeros((h, w), np.float32)
    image[body] = rng.uniform(150, 190)
    image[lungs & body] = rng.uniform(50, 80)
    image[np.abs(x) < 0.07] += 50
    image += rng.normal(0, 6, size=(h, w))
    image[~body] = 0
    return np.clip(image, 0, 255).astype(np.uint8)


def _fundus(rng: np.random.Generator, shape_hw) -> np.ndarray:
    """A fundus-photo-like RGB image: orange disc on black, bright optic disc, dark vessel arcs."""
    h, w = shape_hw
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    disc = x**2 + y**2 <= 0.9**2
    cx, cy = rng.uniform(0.25, 0.45) * rng.choice([-1, 1]), rng.uniform(-0.1, 0.1)
    optic = (x - cx) ** 2 + (y - cy) ** 2 <= 0.12**2
    vessels = np.zeros_like(disc)
    for _ in range(4):
        curvature = rng.uniform(0.5, 1.5)
        offset = rng.uniform(-0.3, 0.3)
        vessels |= np.abs((y - cy) - curvature * (x - cx) ** 2 * np.sign(rng.uniform(-1, 1)) - offset) < 0.02
    base = np.array([rng.uniform(170, 210), rng.uniform(70, 100), rng.uniform(20, 40)], np.float32)
    image = np.zeros((h, w, 3), np.float32)
    image[disc] = base
    image[disc & vessels] = base * 0.55
    image[disc & optic] = [250, 220, 150]
    image += rng.normal(0, 4, size=image.shape)
    image[~disc] = 0
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_pil(array: np.ndarray, path: str) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, quality=95) if path.endswith(".jpg") else Image.fromarray(
            array
        ).save(tmp)


def _write_dataset(root: str, dataset: CorpusDataset, rng: np.random.Generator) -> None:
    folder = os.path.join(root, dataset.name)
    os.makedirs(folder, exist_ok=True)
    for i in range(dataset.num_images):
        stem = f"{dataset.name}_{i:03d}"
        if dataset.kind == "volume":
            volume, spacing = _to_file_axes(
                _body_volume(rng, dataset), dataset.spacing, dataset.depth_axis_in_file
            )
            pixel_type = np.int16 if dataset.modality == "CT" else np.float32
            image = _volume_image(volume.astype(pixel_type), spacing, rng.uniform(-100, 100, size=3))
            with atomic_path(os.path.join(folder, stem + dataset.file_format)) as tmp:
                sitk.WriteImage(image, tmp, True)
        elif dataset.kind == "dicom":
            _write_dicom_series(_body_volume(rng, dataset), dataset.spacing, os.path.join(folder, stem))
        elif dataset.kind == "xray":
            _write_pil(_xray(rng, dataset.shape[1:]), os.path.join(folder, stem + dataset.file_format))
        elif dataset.kind == "fundus":
            _write_pil(_fundus(rng, dataset.shape[1:]), os.path.join(folder, stem + dataset.file_format))
        else:
            raise ValueError(f"unknown corpus dataset kind {dataset.kind!r}")


def write_broken_files(folder: str, rng: np.random.Generator | None = None) -> dict[str, str]:
    """Write one unusable file per failure `prepare` must report; returns {file name: expected reason}."""
    rng = rng or np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    ct = np.clip(rng.normal(0, 300, size=(12, 40, 40)), -1000, 2000).astype(np.int16)
    expected = {}

    four_d = sitk.JoinSeries([_volume_image(ct, (2.0, 1.0, 1.0)) for _ in range(3)])
    sitk.WriteImage(four_d, os.path.join(folder, "four_d.nii.gz"), True)
    expected["four_d.nii.gz"] = "4D"

    good = os.path.join(folder, ".good_for_truncation.nii.gz")
    sitk.WriteImage(_volume_image(ct, (2.0, 1.0, 1.0)), good, True)
    with open(good, "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "truncated.nii.gz"), "wb") as f:
        f.write(data[: len(data) // 2])
    os.remove(good)
    expected["truncated.nii.gz"] = "truncated"

    with_nan = ct.astype(np.float32)
    with_nan[3, 10:20, 10:20] = np.nan
    sitk.WriteImage(_volume_image(with_nan, (2.0, 1.0, 1.0)), os.path.join(folder, "with_nan.nii.gz"), True)
    expected["with_nan.nii.gz"] = "non-finite"

    zeros = np.zeros((40, 48), np.uint8)
    Image.fromarray(zeros).save(os.path.join(folder, "all_black.png"))
    expected["all_black.png"] = "empty after crop"

    Image.fromarray(rng.integers(1, 255, size=(6, 5), dtype=np.uint8)).save(os.path.join(folder, "tiny.png"))
    expected["tiny.png"] = "too small"

    with gzip.open(os.path.join(folder, "not_an_image.nii.gz"), "wb") as f:
        f.write(b"this is not a NIfTI file" * 20)
    expected["not_an_image.nii.gz"] = "unreadable"
    return expected


def write_pretrain_corpus(
    root: str,
    *,
    datasets: tuple[CorpusDataset, ...] = DEFAULT_DATASETS,
    seed: int = 0,
    broken: bool = False,
    overwrite: bool = False,
) -> str:
    """Write the corpus under `root` (one folder per dataset) and `root/datasets.json`; return its path.

    The corpus is built in a temporary sibling folder and moved into place, so an interrupted run
    leaves nothing half-written. With `broken=True` a dataset "broken" of unusable files is added
    (its expected reasons are in ``broken_expected.json``).
    """
    root = os.path.abspath(root)
    if os.path.exists(root) and os.listdir(root) and not overwrite:
        raise FileExistsError(
            f"{root} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    tmp_root = os.path.join(os.path.dirname(root), f".{os.path.basename(root)}.tmp{os.getpid()}")
    shutil.rmtree(tmp_root, ignore_errors=True)
    os.makedirs(tmp_root)
    rng = np.random.default_rng(seed)
    entries = []
    for dataset in datasets:
        _write_dataset(tmp_root, dataset, rng)
        entries.append(
            {
                "name": dataset.name,
                "path": dataset.name,
                "modality": dataset.modality,
                "weight": dataset.weight,
            }
            | dataset.config_extra
        )
    if broken:
        expected = write_broken_files(os.path.join(tmp_root, "broken"), rng)
        write_json_atomic(os.path.join(tmp_root, "broken_expected.json"), expected)
        entries.append({"name": "broken", "path": "broken", "modality": "CT", "weight": 1.0})
    write_json_atomic(os.path.join(tmp_root, CONFIG_NAME), {"datasets": entries})
    if os.path.exists(root):
        shutil.rmtree(root)
    os.replace(tmp_root, root)
    return os.path.join(root, CONFIG_NAME)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a small heterogeneous pre-training phantom corpus.")
    parser.add_argument(
        "-o", "--output", required=True, help="corpus folder (datasets.json is written inside)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--broken", action="store_true", help="add a dataset of unusable files")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    args = parser.parse_args(argv)
    try:
        print(
            write_pretrain_corpus(args.output, seed=args.seed, broken=args.broken, overwrite=args.overwrite)
        )
    except FileExistsError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
