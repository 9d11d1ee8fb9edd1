"""BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen) -> nnU-Net raw dataset, with the paper's split.

    pumit_btcv convert RAWDATA_FOLDER NNUNET_RAW [--dataset_id 300] [--preprocessed NNUNET_PREPROCESSED]

``RAWDATA_FOLDER`` is the unpacked ``RawData`` folder: ``Training/img/img00NN.nii.gz``,
``Training/label/label00NN.nii.gz`` and ``Testing/img/img00NN.nii.gz``. The dataset gets 13 organ labels
(SPEC section 11) and a ``splits_final.json`` whose fold 0 is the paper's 21 training / 9 validation split.
nnU-Net reads splits from ``nnUNet_preprocessed/DatasetXXX_BTCV/``: pass ``--preprocessed`` to put the file
there as well (it is always written into the raw dataset folder). Images are copied as they are; each label
must share its image's size, spacing, origin and direction.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil

import numpy as np
import SimpleITK as sitk

from pumit_seg.atomic import atomic_path, write_json_atomic

FILE_ENDING = ".nii.gz"
DEFAULT_DATASET_ID = 300
DATASET_NAME = "BTCV"
LABELS = {
    "background": 0,
    "spleen": 1,
    "right_kidney": 2,
    "left_kidney": 3,
    "gallbladder": 4,
    "esophagus": 5,
    "liver": 6,
    "stomach": 7,
    "aorta": 8,
    "inferior_vena_cava": 9,
    "portal_and_splenic_veins": 10,
    "pancreas": 11,
    "right_adrenal_gland": 12,
    "left_adrenal_gland": 13,
}
VALIDATION_CASES = ("0029", "0030", "0031", "0032", "0034", "0036", "0037", "0039", "0040")
NUM_TRAINING_CASES = 30
GEOMETRY_TOLERANCE = 1e-3


def case_name(number: str) -> str:
    return f"BTCV_{number}"


def _numbered(folder: str, prefix: str) -> dict[str, str]:
    """{'0001': path, ...} of files named <prefix>NNNN.nii.gz."""
    pattern = re.compile(rf"^{prefix}(\d+){re.escape(FILE_ENDING)}$")
    found = {}
    for name in sorted(os.listdir(folder)):
        match = pattern.match(name)
        if match:
            found[match.group(1)] = os.path.join(folder, name)
    return found


def _header(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def check_same_geometry(image_file: str, label_file: str) -> None:
    image, label = _header(image_file), _header(label_file)
    for what in ("Size", "Spacing", "Origin", "Direction"):
        a, b = getattr(image, f"Get{what}")(), getattr(label, f"Get{what}")()
        if not np.allclose(a, b, rtol=GEOMETRY_TOLERANCE, atol=GEOMETRY_TOLERANCE):
            raise ValueError(f"{label_file} has {what.lower()} {b}, its image {image_file} has {a}")


def _copy(source: str, target: str) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def paper_split(case_numbers: list[str]) -> list[dict]:
    """nnU-Net splits with fold 0 = the paper's split (validation: SPEC 11's nine cases)."""
    missing = [n for n in VALIDATION_CASES if n not in case_numbers]
    if missing:
        raise ValueError(f"the BTCV training set lacks the paper's validation cases {missing}")
    return [
        {
            "train": [case_name(n) for n in case_numbers if n not in VALIDATION_CASES],
            "val": [case_name(n) for n in VALIDATION_CASES],
        }
    ]


def convert(
    raw_data: str, nnunet_raw: str, dataset_id: int = DEFAULT_DATASET_ID, preprocessed: str | None = None
) -> str:
    """Write DatasetXXX_BTCV into `nnunet_raw`; returns its folder."""
    images = _numbered(os.path.join(raw_data, "Training", "img"), "img")
    labels = _numbered(os.path.join(raw_data, "Training", "label"), "label")
    if not images:
        raise FileNotFoundError(f"no Training/img/img00NN{FILE_ENDING} files under {raw_data}")
    if set(images) != set(labels):
        raise FileNotFoundError(
            f"{raw_data}: images without labels {sorted(set(images) - set(labels))}, "
            f"labels without images {sorted(set(labels) - set(images))}"
        )
    if len(images) != NUM_TRAINING_CASES:
        print(
            f"warning: {len(images)} BTCV training cases under {raw_data}, the paper has {NUM_TRAINING_CASES}"
        )
    splits = paper_split(sorted(images))
    folder = os.path.join(nnunet_raw, f"Dataset{dataset_id:03d}_{DATASET_NAME}")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for number, image_file in images.items():
        check_same_geometry(image_file, labels[number])
        _copy(image_file, os.path.join(folder, "imagesTr", f"{case_name(number)}_0000{FILE_ENDING}"))
        _copy(labels[number], os.path.join(folder, "labelsTr", f"{case_name(number)}{FILE_ENDING}"))
    testing = os.path.join(raw_data, "Testing", "img")
    if os.path.isdir(testing):
        for number, image_file in _numbered(testing, "img").items():
            _copy(image_file, os.path.join(folder, "imagesTs", f"{case_name(number)}_0000{FILE_ENDING}"))
    write_json_atomic(
        os.path.join(folder, "dataset.json"),
        {
            "channel_names": {"0": "CT"},
            "labels": LABELS,
            "numTraining": len(images),
            "file_ending": FILE_ENDING,
            "name": DATASET_NAME,
            "reference": "https://www.synapse.org/#!Synapse:syn3193805",
            "description": "BTCV abdomen, 13 organs; splits_final.json fold 0 = the PUMIT paper's 21/9 split",
        },
    )
    write_json_atomic(os.path.join(folder, "splits_final.json"), splits)
    if preprocessed:
        target = os.path.join(preprocessed, os.path.basename(folder))
        os.makedirs(target, exist_ok=True)
        write_json_atomic(os.path.join(target, "splits_final.json"), splits)
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="BTCV tools")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "convert", help="BTCV RawData -> nnU-Net raw dataset with the paper's split as fold 0"
    )
    p.add_argument("raw_data", help="the unpacked RawData folder (Training/img, Training/label, Testing/img)")
    p.add_argument("nnunet_raw", help="nnU-Net raw folder (nnUNet_raw)")
    p.add_argument("--dataset_id", type=int, default=DEFAULT_DATASET_ID, help=f"default {DEFAULT_DATASET_ID}")
    p.add_argument(
        "--preprocessed",
        default=None,
        help="nnUNet_preprocessed folder: also write splits_final.json there (where nnU-Net reads it)",
    )
    args = parser.parse_args(argv)
    folder = convert(args.raw_data, args.nnunet_raw, args.dataset_id, args.preprocessed)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
