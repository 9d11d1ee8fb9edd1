"""BTCV RawData -> nnU-Net raw dataset with the paper's 21 / 9 split as fold 0."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from pumit_seg.evaluation import btcv

TRAINING = [f"{n:04d}" for n in [*range(1, 11), *range(21, 41)]]  # the 30 BTCV training cases
TESTING = [f"{n:04d}" for n in [*range(11, 21), *range(61, 64)]]


def write(path, array, spacing=(0.8, 0.8, 3.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, path)


@pytest.fixture
def raw_data(tmp_path):
    root = tmp_path / "RawData"
    for sub in ("Training/img", "Training/label", "Testing/img"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for number in TRAINING:
        write(
            str(root / "Training" / "img" / f"img{number}.nii.gz"),
            rng.integers(-1000, 1000, (3, 4, 5)).astype(np.int16),
        )
        write(
            str(root / "Training" / "label" / f"label{number}.nii.gz"),
            rng.integers(0, 14, (3, 4, 5)).astype(np.uint8),
        )
    for number in TESTING:
        write(str(root / "Testing" / "img" / f"img{number}.nii.gz"), np.zeros((3, 4, 5), np.int16))
    return root


def test_convert(raw_data, tmp_path):
    btcv.main(["convert", str(raw_data), str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pre")])
    folder = tmp_path / "raw" / "Dataset300_BTCV"
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["numTraining"] == 30 and dataset["channel_names"] == {"0": "CT"}
    assert len(dataset["labels"]) == 14 and dataset["labels"]["left_adrenal_gland"] == 13
    splits = json.loads((folder / "splits_final.json").read_text())
    assert splits == json.loads((tmp_path / "pre" / "Dataset300_BTCV" / "splits_final.json").read_text())
    train, val = splits[0]["train"], splits[0]["val"]
    assert len(train) == 21 and len(val) == 9 and not set(train) & set(val)
    assert val == [
        f"BTCV_{n}" for n in ("0029", "0030", "0031", "0032", "0034", "0036", "0037", "0039", "0040")
    ]
    assert sorted(os.listdir(folder / "imagesTr")) == [f"BTCV_{n}_0000.nii.gz" for n in TRAINING]
    assert sorted(os.listdir(folder / "labelsTr")) == [f"BTCV_{n}.nii.gz" for n in TRAINING]
    assert len(os.listdir(folder / "imagesTs")) == len(TESTING)
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(raw_data / "Training" / "label" / "label0031.nii.gz")))
    copied = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "BTCV_0031.nii.gz")))
    np.testing.assert_array_equal(source, copied)


def test_geometry_mismatch_and_missing_cases(raw_data, tmp_path):
    label = raw_data / "Training" / "label" / "label0005.nii.gz"
    write(str(label), np.zeros((3, 4, 5), np.uint8), spacing=(0.8, 0.8, 2.0))
    with pytest.raises(ValueError, match="label0005.nii.gz has spacing"):
        btcv.convert(str(raw_data), str(tmp_path / "raw"))
    label.unlink()
    with pytest.raises(FileNotFoundError, match="images without labels \\['0005'\\]"):
        btcv.convert(str(raw_data), str(tmp_path / "raw"))
    (raw_data / "Training" / "img" / "img0005.nii.gz").unlink()
    (raw_data / "Training" / "img" / "img0036.nii.gz").unlink()
    (raw_data / "Training" / "label" / "label0036.nii.gz").unlink()
    with pytest.raises(ValueError, match="validation cases \\['0036'\\]"):
        btcv.convert(str(raw_data), str(tmp_path / "raw"))


def test_failed_reconversion_leaves_the_dataset_and_a_new_one_replaces_it(raw_data, tmp_path):
    folder = tmp_path / "raw" / "Dataset300_BTCV"
    btcv.convert(str(raw_data), str(tmp_path / "raw"))
    (folder / "imagesTr" / "stale_0000.nii.gz").write_bytes(b"from an earlier run")
    before = sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*") if p.is_file())
    image = raw_data / "Training" / "img" / "img0040.nii.gz"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # truncated: SimpleITK alone would read it as zeros
    with pytest.raises(ValueError, match="img0040.nii.gz"):
        btcv.convert(str(raw_data), str(tmp_path / "raw"))
    assert sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*") if p.is_file()) == before
    image.write_bytes(data)
    btcv.convert(str(raw_data), str(tmp_path / "raw"))
    assert not (folder / "imagesTr" / "stale_0000.nii.gz").exists()
    assert sorted(os.listdir(tmp_path / "raw")) == ["Dataset300_BTCV"]
