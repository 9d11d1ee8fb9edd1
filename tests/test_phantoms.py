"""Synthetic phantom datasets: nnU-Net raw layout, geometry, labels, contrasts, seeding, 2D variant."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from pumit_seg.phantoms.abdomen import (
    LABELS,
    TISSUE_INTENSITIES,
    PhantomConfig,
    main,
    make_phantom,
    write_phantom_dataset,
)


def test_dataset_layout_and_geometry(tmp_path):
    config = PhantomConfig(shape=(12, 48, 40), spacing=(3.0, 0.75, 0.7))
    folder = write_phantom_dataset(
        str(tmp_path), 7, "Abdomen", num_training=3, num_test=2, config=config, seed=1
    )
    assert folder == str(tmp_path / "Dataset007_Abdomen")
    dataset_json = json.loads((tmp_path / "Dataset007_Abdomen" / "dataset.json").read_text())
    assert dataset_json["labels"] == LABELS and dataset_json["numTraining"] == 3
    assert dataset_json["channel_names"] == {"0": "CT"} and dataset_json["file_ending"] == ".nii.gz"
    names = {
        kind: sorted(p.name for p in (tmp_path / "Dataset007_Abdomen" / kind).iterdir())
        for kind in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
    }
    assert names["imagesTr"] == ["case_000_0000.nii.gz", "case_001_0000.nii.gz", "case_002_0000.nii.gz"]
    assert names["labelsTr"] == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]
    assert names["labelsTs"] == ["case_003.nii.gz", "case_004.nii.gz"] and len(names["imagesTs"]) == 2
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary build folder was renamed away

    image = sitk.ReadImage(str(tmp_path / "Dataset007_Abdomen" / "imagesTr" / "case_000_0000.nii.gz"))
    label = sitk.ReadImage(str(tmp_path / "Dataset007_Abdomen" / "labelsTr" / "case_000.nii.gz"))
    np.testing.assert_allclose(image.GetSpacing(), (0.7, 0.75, 3.0), rtol=1e-6)  # SimpleITK order: x, y, z
    assert image.GetSize() == label.GetSize() and image.GetOrigin() == label.GetOrigin()
    depth, height, width = sitk.GetArrayFromImage(label).shape
    assert abs(depth - 12) <= 2 and abs(height - 48) <= 5 and abs(width - 40) <= 4  # 10 % shape jitter


def test_organs_and_ct_contrast():
    image, label, shape = make_phantom(np.random.default_rng(0), PhantomConfig(shape=(24, 80, 80)))
    assert image.shape == (1, *shape) and label.shape == shape and label.dtype == np.uint8
    assert set(np.unique(label)) == set(LABELS.values())
    means = {name: image[0][label == value].mean() for name, value in LABELS.items() if value}
    for name, mean in means.items():
        assert abs(mean - TISSUE_INTENSITIES["CT"][name]) < 25, (name, mean)
    # every organ is distinguishable from the others by intensity
    assert len({round(m, -1) for m in means.values()}) == 4
    assert image[0][0, 0, 0] < -900  # air outside the body


def test_seeded_and_varied(tmp_path):
    config = PhantomConfig(shape=(8, 32, 32))
    a = make_phantom(np.random.default_rng(5), config)
    b = make_phantom(np.random.default_rng(5), config)
    c = make_phantom(np.random.default_rng(6), config)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] != c[2] or not np.array_equal(a[1], c[1])


def test_mr_two_channels_and_2d(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    config = PhantomConfig(
        shape=(1, 64, 56), spacing=(1.0, 0.9, 0.9), modality="MR", num_channels=2, two_d=True
    )
    write_phantom_dataset(str(tmp_path), 8, "MR2D", num_training=2, num_test=0, config=config)
    folder = tmp_path / "Dataset008_MR2D"
    assert json.loads((folder / "dataset.json").read_text())["channel_names"] == {"0": "T1", "1": "T2"}
    files = [str(folder / "imagesTr" / f"case_000_{c:04d}.nii.gz") for c in range(2)]
    assert sitk.ReadImage(files[0]).GetDimension() == 2
    images, properties = SimpleITKIO().read_images(files)  # nnU-Net's view: (C, 1, H, W)
    assert images.shape[:2] == (2, 1)
    label, _ = SimpleITKIO().read_seg(str(folder / "labelsTr" / "case_000.nii.gz"))
    # the two MR contrasts order the organs differently (T1: liver brightest, T2: kidneys)
    means = [[images[c][label[0] == v].mean() for v in (1, 2, 3)] for c in range(2)]
    assert np.argmax(means[0]) == 0 and np.argmax(means[1]) == 2


def test_overwrite_protection_and_cli(tmp_path, capsys):
    main(["-o", str(tmp_path), "-d", "9", "--num_train", "1", "--num_test", "0", "--shape", "4", "32", "32"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "Dataset009_Phantoms")
    with pytest.raises(SystemExit) as exit_info:
        main(["-o", str(tmp_path), "-d", "9", "--num_train", "1"])
    assert exit_info.value.code == 1 and "Dataset009_Phantoms exists" in capsys.readouterr().err
    main(
        [
            "-o",
            str(tmp_path),
            "-d",
            "9",
            "--num_train",
            "2",
            "--num_test",
            "0",
            "--shape",
            "4",
            "32",
            "32",
            "--overwrite",
        ]
    )
    assert len(list((tmp_path / "Dataset009_Phantoms" / "labelsTr").iterdir())) == 2
    with pytest.raises(ValueError, match="modality"):
        PhantomConfig(modality="PET")
