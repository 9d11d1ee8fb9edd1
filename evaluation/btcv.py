"""BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen) -> nnU-Net raw dataset, with the paper's split.

    pumit_btcv convert RAWDATA_FOLDER NNUNET_RAW [--dataset_id 300] [--preprocessed NNUNET_PREPROCESSED]

``RAWDATA_FOLDER`` is the unpacked ``RawData`` folder: ``Training/img/img00NN.nii.gz``,
``Training/label/label00NN.nii.gz`` and ``Testing/img/img00NN.nii.gz``. The dataset gets 13 organ labels
(docs/evaluation.md, "BTCV") and a ``splits_final.json`` whose fold 0 is the paper's 21 training / 9 validation split.
nnU-Net reads splits from ``nnUNet_preprocessed/DatasetXXX_BTCV/``: pass ``--preprocessed`` to put the file
there as well (it is always written into the raw dataset folder). Images are copied as they are, after
each was read once through the project's reader (a truncated file or NaN voxels stop the conversion naming
the file); each label must share its image's size, spacing, origin and direction and hold BTCV labels only.
The dataset is built beside its folder and swapped in when complete.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil

import numpy as np
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

from pumit_seg.atomic import atomic_folder, atomic_path, write_json_atomic
from pumit_seg.cli_checks import check_output_path, exit_on_bad_input, int_in_range
from pumit_seg.data.readers import MedicalImage, read_image

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


def check_same_geometry(image: MedicalImage, label: MedicalImage) -> None:
    for what in ("spatial_shape", "spacing", "origin", "direction"):
        a, b = (np.asarray(getattr(x, what), dtype=float) for x in (image, label))
        if a.shape != b.shape or not np.allclose(a, b, rtol=GEOMETRY_TOLERANCE, atol=GEOMETRY_TOLERANCE):
            raise ValueError(
                f"{label.path} has {what} {b.ravel().tolist()}, its image {image.path} has {a.ravel().tolist()}"
            )


def check_label_map(label: MedicalImage) -> None:
    values = np.unique(label.array)
    unknown = [v for v in values.tolist() if v not in LABELS.values()]
    if unknown:
        raise ValueError(
            f"{label.path} holds values {unknown[:10]} that are not BTCV labels (0..{max(LABELS.values())})"
        )


def _copy(source: str, target: str) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def paper_split(case_numbers: list[str]) -> list[dict]:
    """nnU-Net splits with fold 0 = the paper's split (validation: the paper's nine cases)."""
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
    testing_folder = os.path.join(raw_data, "Testing", "img")
    testing = _numbered(testing_folder, "img") if os.path.isdir(testing_folder) else {}
    folder = os.path.join(nnunet_raw, f"Dataset{dataset_id:03d}_{DATASET_NAME}")
    # built beside its place and swapped in when complete: a damaged case leaves nnUNet_raw as it was,
    # and a re-conversion replaces the dataset without leaving files of the earlier one
    with atomic_folder(folder) as building:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            os.makedirs(os.path.join(building, sub))
        for number, image_file in tqdm(images.items(), desc="BTCV training cases", unit="case"):
            # every file is decoded once: truncated files and NaN voxels are refused, not copied
            image, label = read_image(image_file), read_image(labels[number])
            check_same_geometry(image, label)
            check_label_map(label)
            del image, label
            _copy(image_file, os.path.join(building, "imagesTr", f"{case_name(number)}_0000{FILE_ENDING}"))
            _copy(labels[number], os.path.join(building, "labelsTr", f"{case_name(number)}{FILE_ENDING}"))
        for number, image_file in tqdm(testing.items(), desc="BTCV test cases", unit="case"):
            read_image(image_file)
            _copy(image_file, os.path.join(building, "imagesTs", f"{case_name(number)}_0000{FILE_ENDING}"))
        generate_dataset_json(  # nnU-Net's own writer, inside the folder being built
            building,
            channel_names={"0": "CT"},
            labels=LABELS,
            num_training_cases=len(images),
            file_ending=FILE_ENDING,
            dataset_name=DATASET_NAME,
            reference="https://www.synapse.org/#!Synapse:syn3193805",
            description="BTCV abdomen, 13 organs; splits_final.json fold 0 = the PUMIT paper's 21/9 split",
            license="see the dataset's terms on Synapse",
            converted_by="pumit_btcv convert",
        )
        write_json_atomic(os.path.join(building, "splits_final.json"), splits)
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
    p.add_argument(
        "--dataset_id",
        type=int_in_range(1, 999),
        default=DEFAULT_DATASET_ID,
        help=f"default {DEFAULT_DATASET_ID}",
    )
    p.add_argument(
        "--preprocessed",
        default=None,
        help="nnUNet_preprocessed folder: also write splits_final.json there (where nnU-Net reads it)",
    )
    args = parser.parse_args(argv)
    with exit_on_bad_input(parser):
        # nnUNet_raw (and nnUNet_preprocessed) are continued; they must be writable and not the RawData folder
        check_output_path(
            args.nnunet_raw, is_dir=True, overwrite=True, inputs=[args.raw_data], option="NNUNET_RAW"
        )
        if args.preprocessed:
            check_output_path(
                args.preprocessed,
                is_dir=True,
                overwrite=True,
                inputs=[args.raw_data],
                option="--preprocessed",
            )
        folder = convert(args.raw_data, args.nnunet_raw, args.dataset_id, args.preprocessed)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
