"""Synthetic abdomen-like phantoms written as nnU-Net raw datasets.

Each case is a body cross-section (an elliptic cylinder along the depth axis) holding
four labelled organs of different shapes and intensities, plus an unlabelled spine as a
bright distractor:

    1 liver    large ellipsoid, patient right (image left)
    2 spleen   small ellipsoid, patient left
    3 kidneys  two flattened ellipsoids either side of the spine
    4 aorta    tube along the whole depth

Cases differ by a random in-plane rotation, scale, translation, per-organ size jitter,
shape (depth and in-plane size jitter) and origin; contrast is CT-like (Hounsfield
units, air background) or MR-like (arbitrary units, smooth bias field, optional second
channel with a different contrast). The spacing is chosen per dataset, so datasets of
different degrees of anisotropy are one argument apart. A 2D variant writes 2D images.

Everything is seeded and small by default (a 12-case dataset takes about a second).

    pumit_make_phantoms -o $nnUNet_raw -d 501 --spacing 3 0.75 0.75
"""

import argparse
import os
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pumit_seg.atomic import atomic_folder
from pumit_seg.cli_checks import exit_on_bad_input, float_in_range, int_in_range

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3, "aorta": 4}

# Mean intensity of each tissue per contrast. CT in Hounsfield units; MR channels in arbitrary units
# with deliberately different orderings (T1-like: liver bright; T2-like: spleen and kidneys bright).
TISSUE_INTENSITIES = {
    "CT": {
        "air": -1000.0,
        "body": -60.0,
        "spine": 700.0,
        "liver": 60.0,
        "spleen": 110.0,
        "kidneys": 180.0,
        "aorta": 260.0,
    },
    "T1": {
        "air": 0.0,
        "body": 180.0,
        "spine": 60.0,
        "liver": 420.0,
        "spleen": 280.0,
        "kidneys": 330.0,
        "aorta": 40.0,
    },
    "T2": {
        "air": 0.0,
        "body": 150.0,
        "spine": 40.0,
        "liver": 120.0,
        "spleen": 380.0,
        "kidneys": 440.0,
        "aorta": 260.0,
    },
}
NOISE_STD = {"CT": 15.0, "T1": 15.0, "T2": 15.0}
CHANNELS_BY_MODALITY = {"CT": ["CT", "CT"], "MR": ["T1", "T2"]}
# Largest phantom (voxels of one case, before the per-case jitter) the generator builds: working memory is
# about 60 bytes per voxel (coordinate grids, organ masks), so this caps one case near 2 GiB.
MAX_PHANTOM_VOXELS = 2**25
MAX_CASES = 100_000  # per split; more is a typo, not a dataset


@dataclass
class PhantomConfig:
    """Geometry and contrast of one phantom dataset. Shapes are (D, H, W) voxels, spacing (s_d, s_h, s_w) mm."""

    shape: tuple[int, int, int] = (24, 80, 80)
    spacing: tuple[float, float, float] = (3.0, 0.8, 0.8)
    modality: str = "CT"  # "CT" or "MR"
    num_channels: int = 1  # 1 or 2 (MR: T1 + T2; CT: the same scan twice with different noise)
    two_d: bool = False  # write 2D images (H, W); shape[0] and spacing[0] are ignored
    shape_jitter: float = 0.1  # relative per-case jitter of each axis length

    def __post_init__(self):
        if self.modality not in CHANNELS_BY_MODALITY:
            raise ValueError(f"modality must be one of {sorted(CHANNELS_BY_MODALITY)}, got {self.modality!r}")
        if self.num_channels not in (1, 2):
            raise ValueError(f"num_channels must be 1 or 2, got {self.num_channels}")
        if len(self.shape) != 3 or len(self.spacing) != 3:
            raise ValueError(
                f"shape and spacing need three values (D, H, W), got {self.shape} and {self.spacing}"
            )
        if not all(np.isfinite(self.spacing)) or min(self.spacing) <= 0 or min(self.shape) < 1:
            raise ValueError(f"shape and spacing must be positive, got {self.shape} and {self.spacing}")
        voxels = int(np.prod([1 if self.two_d else self.shape[0], *self.shape[1:]], dtype=np.int64))
        if voxels > MAX_PHANTOM_VOXELS:
            raise ValueError(
                f"shape {tuple(self.shape)} has {voxels} voxels per case, more than the {MAX_PHANTOM_VOXELS} "
                "a phantom may have (--shape); phantoms are meant to be small"
            )

    @property
    def channel_names(self) -> list[str]:
        return CHANNELS_BY_MODALITY[self.modality][: self.num_channels]


def _ellipsoid(z, y, x, center, radii, exponent=2.0):
    """Boolean mask of a (super-)ellipsoid in normalised coordinates."""
    distance = sum(
        np.abs((c - c0) / r) ** exponent for c, c0, r in zip((z, y, x), center, radii, strict=True)
    )
    return distance <= 1.0


def make_phantom(
    rng: np.random.Generator, config: PhantomConfig
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """One random phantom. Returns image (C, D, H, W) float32, label (D, H, W) uint8 and its shape.

    For `config.two_d` the depth is 1. Geometry lives in normalised coordinates [-1, 1] per axis,
    so organs cover the same fraction of the image whatever the voxel count.
    """
    depth = 1 if config.two_d else config.shape[0]
    jitter = lambda n: max(int(round(n * rng.uniform(1 - config.shape_jitter, 1 + config.shape_jitter))), 1)  # noqa: E731
    shape = (depth if config.two_d else jitter(depth), jitter(config.shape[1]), jitter(config.shape[2]))
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) if n > 1 else np.zeros(1) for n in shape], indexing="ij")

    # Random in-plane pose of the whole body (rotation, scale, translation), applied to coordinates.
    angle = np.deg2rad(rng.uniform(-12, 12))
    scale = rng.uniform(0.9, 1.1)
    shift_y, shift_x = rng.uniform(-0.05, 0.05, size=2)
    y, x = (
        (np.cos(angle) * (y - shift_y) - np.sin(angle) * (x - shift_x)) / scale,
        (np.sin(angle) * (y - shift_y) + np.cos(angle) * (x - shift_x)) / scale,
    )
    z = z / scale

    def size():
        return rng.uniform(0.85, 1.15)

    body = (y / 0.72) ** 2 + (x / 0.92) ** 2 <= 1.0
    spine = (y - 0.5) ** 2 + x**2 <= 0.11**2
    organs = {
        "liver": _ellipsoid(
            z, y, x, (0.15, -0.08, -0.38), (0.75 * size(), 0.42 * size(), 0.36 * size()), 2.5
        ),
        "spleen": _ellipsoid(z, y, x, (0.25, 0.12, 0.52), (0.4 * size(), 0.2 * size(), 0.15 * size())),
        "kidneys": _ellipsoid(z, y, x, (-0.2, 0.33, 0.34), (0.35 * size(), 0.13 * size(), 0.1 * size()))
        | _ellipsoid(z, y, x, (-0.25, 0.33, -0.34), (0.35 * size(), 0.13 * size(), 0.1 * size())),
        "aorta": (y - 0.28) ** 2 + (x - 0.06) ** 2 <= (0.065 * size()) ** 2,
    }

    label = np.zeros(shape, dtype=np.uint8)
    for name, mask in organs.items():  # later organs win where shapes overlap
        label[mask & body & ~spine] = LABELS[name]

    channels = []
    for channel_name in config.channel_names:
        intensities = TISSUE_INTENSITIES[channel_name]
        image = np.full(shape, intensities["air"], dtype=np.float32)
        image[body] = intensities["body"]
        image[spine] = intensities["spine"]
        for name in organs:
            image[label == LABELS[name]] = intensities[name] * rng.uniform(0.95, 1.05)
        if config.modality == "MR":  # smooth multiplicative bias field, as in real MR
            image *= 1.0 + 0.15 * y * rng.uniform(-1, 1) + 0.15 * x * rng.uniform(-1, 1)
        image += rng.normal(0.0, NOISE_STD[channel_name], size=shape).astype(np.float32)
        channels.append(image)
    return np.stack(channels).astype(np.float32), label, shape


def _write_image(array: np.ndarray, path: str, spacing_dhw, origin_xyz, two_d: bool) -> None:
    """Write a (D, H, W) array (or (H, W) when two_d) with nnU-Net's geometry conventions via SimpleITK."""
    image = sitk.GetImageFromArray(array[0] if two_d else array)
    image.SetSpacing([float(s) for s in spacing_dhw[::-1]][: 2 if two_d else 3])
    image.SetOrigin([float(o) for o in origin_xyz][: 2 if two_d else 3])
    sitk.WriteImage(image, path, True)


def write_phantom_dataset(
    raw_folder: str,
    dataset_id: int,
    name: str = "Phantoms",
    num_training: int = 8,
    num_test: int = 2,
    config: PhantomConfig | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Write `Dataset{id:03d}_{name}` (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json) under `raw_folder`.

    The dataset is built in a temporary sibling folder and renamed into place, so an interrupted
    run never leaves a half-written dataset. Returns the dataset folder.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    config = config or PhantomConfig()
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be in 1..999 (nnU-Net uses three digits), got {dataset_id}")
    dataset_folder = os.path.join(raw_folder, f"Dataset{dataset_id:03d}_{name}")
    if os.path.exists(dataset_folder) and not overwrite:
        raise FileExistsError(f"{dataset_folder} exists; pass overwrite=True (--overwrite) to replace it")

    with atomic_folder(dataset_folder) as tmp_folder:
        rng = np.random.default_rng(seed)
        cases = [("Tr", f"case_{i:03d}") for i in range(num_training)]
        cases += [("Ts", f"case_{num_training + i:03d}") for i in range(num_test)]
        for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            os.makedirs(os.path.join(tmp_folder, folder))
        for split, case in cases:
            image, label, _ = make_phantom(rng, config)
            origin = rng.uniform(-150, 150, size=3)
            for c in range(image.shape[0]):
                path = os.path.join(tmp_folder, f"images{split}", f"{case}_{c:04d}.nii.gz")
                _write_image(image[c], path, config.spacing, origin, config.two_d)
            _write_image(
                label,
                os.path.join(tmp_folder, f"labels{split}", f"{case}.nii.gz"),
                config.spacing,
                origin,
                config.two_d,
            )

        generate_dataset_json(
            tmp_folder,
            channel_names={i: n for i, n in enumerate(config.channel_names)},
            labels=LABELS,
            num_training_cases=num_training,
            file_ending=".nii.gz",
            dataset_name=f"Dataset{dataset_id:03d}_{name}",
            description=f"pumit-seg synthetic abdomen phantoms: {config}, seed {seed}",
            license="CC0 (synthetic)",
            converted_by="pumit_make_phantoms",
        )
    return dataset_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write an nnU-Net raw dataset of synthetic abdomen-like phantoms."
    )
    parser.add_argument("-o", "--output", required=True, help="nnU-Net raw folder (the dataset goes inside)")
    parser.add_argument(
        "-d", "--dataset_id", type=int_in_range(1, 999), required=True, help="nnU-Net dataset id (1..999)"
    )
    parser.add_argument("--name", default="Phantoms", help="dataset name after the id (default: Phantoms)")
    parser.add_argument(
        "--num_train", type=int_in_range(1, MAX_CASES), default=8, help="training cases (default: 8)"
    )
    parser.add_argument(
        "--num_test",
        type=int_in_range(0, MAX_CASES),
        default=2,
        help="test cases in imagesTs/labelsTs (default: 2)",
    )
    parser.add_argument(
        "--shape", type=int_in_range(1), nargs=3, default=[24, 80, 80], metavar=("D", "H", "W")
    )
    parser.add_argument(
        "--spacing",
        type=float_in_range(0.0, None, low_open=True),
        nargs=3,
        default=[3.0, 0.8, 0.8],
        metavar=("SD", "SH", "SW"),
    )
    parser.add_argument("--modality", choices=sorted(CHANNELS_BY_MODALITY), default="CT")
    parser.add_argument("--channels", type=int, choices=(1, 2), default=1, help="image channels (default: 1)")
    parser.add_argument("--2d", dest="two_d", action="store_true", help="write 2D images (H, W)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    args = parser.parse_args(argv)
    try:  # refuse an absurd --shape here, before anything is allocated
        config = PhantomConfig(
            tuple(args.shape), tuple(args.spacing), args.modality, args.channels, args.two_d
        )
    except ValueError as error:
        parser.error(str(error))
    with exit_on_bad_input(parser):
        folder = write_phantom_dataset(
            args.output,
            args.dataset_id,
            args.name,
            args.num_train,
            args.num_test,
            config,
            args.seed,
            args.overwrite,
        )
    print(folder)


if __name__ == "__main__":
    main()
