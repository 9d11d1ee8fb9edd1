"""The one reader path (pumit_seg.data.readers): damaged files are refused with the file and the problem named."""

import gzip
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from pumit_seg.data.readers import ImageReadError, read_dicom_series, read_image, read_png
from pumit_seg.phantoms.dicom import write_dicom_series


def write(path, array, spacing=(0.8, 0.7, 3.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), True)
    return str(path)


def truncate(path, fraction=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * fraction)])


@pytest.fixture
def volume():
    return np.random.default_rng(0).normal(size=(6, 9, 11)).astype(np.float32)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_round_trip_keeps_voxels_and_geometry(tmp_path, volume, ending):
    image = read_image(write(tmp_path / f"a{ending}", volume))
    np.testing.assert_array_equal(image.array, volume)
    assert image.spacing == pytest.approx((3.0, 0.7, 0.8))  # array axis order (z, y, x)
    assert image.num_channels == 1 and image.direction.shape == (3, 3)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_truncated_files_are_refused(tmp_path, volume, ending):
    path = write(tmp_path / f"a{ending}", volume)
    truncate(path)
    # SimpleITK itself returns a zero-filled image for the NIfTI cases: the reason they must be caught here
    with pytest.raises(ImageReadError, match=os.path.basename(path)) as error:
        read_image(path)
    assert error.value.path == path and error.value.reason in ("truncated", "unreadable")


def test_corrupt_gzip_and_concatenated_members(tmp_path, volume):
    path = write(tmp_path / "a.nii.gz", volume)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 : len(data) // 2 + 40] = b"x" * 40
    open(path, "wb").write(bytes(data))
    with pytest.raises(ImageReadError) as error:
        read_image(path)
    assert error.value.reason == "corrupt"
    # a valid file split into two gzip members (as `cat a.gz b.gz` makes) is complete
    raw = gzip.decompress(open(write(tmp_path / "b.nii.gz", volume), "rb").read())
    path = str(tmp_path / "c.nii.gz")
    open(path, "wb").write(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(read_image(path).array, volume)


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
def test_non_finite_voxels(tmp_path, volume, ending):
    import nibabel as nib

    volume[1, 2, 3], volume[2, 3, 4] = np.nan, np.inf
    path = str(tmp_path / f"a{ending}")
    if ending == ".nii.gz":  # written with nibabel: ITK's NIfTI reader would turn NaN into 0 on reading
        nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.eye(4)), path)
    else:
        write(path, volume)
    with pytest.raises(ImageReadError, match="1 NaN and 1 infinite") as error:
        read_image(path)
    assert error.value.reason == "non-finite"
    kept = read_image(path, allow_nonfinite=True).array
    assert np.isnan(kept[1, 2, 3]) and np.isinf(kept[2, 3, 4])


def test_geometry_and_dimension_checks(tmp_path):
    path = str(tmp_path / "t.nii.gz")
    sitk.WriteImage(sitk.Image([4, 5, 6, 2], sitk.sitkUInt8), path)
    with pytest.raises(ImageReadError, match="4 dimensions") as error:
        read_image(path)
    assert error.value.reason == "4D"
    path = str(tmp_path / "s.mha")
    write(path, np.zeros((3, 4, 5), np.uint8))
    text = re.sub(rb"ElementSpacing = [^\n]*", b"ElementSpacing = 0.8 0 3", open(path, "rb").read())
    open(path, "wb").write(text)
    with pytest.raises(ImageReadError) as error:
        read_image(path)
    # ITK refuses zero spacing itself; either way the error names the file and the spacing
    assert error.value.reason in ("no spacing", "unreadable") and str(error.value).startswith(path)
    assert "spacing" in str(error.value)
    with pytest.raises(ImageReadError) as error:
        read_image(tmp_path / "absent.nii.gz")
    assert error.value.reason == "missing"


def test_dicom_series(tmp_path):
    volume = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    names = ["b.dcm", "a.dcm", "c.dcm"]  # file-name order a, b, c: slices 1, 0, 2
    write_dicom_series(str(tmp_path), volume, [(0, 0, 2.5 * k) for k in (1, 0, 2)], names, intercept=-10)
    image = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(image.array, volume[[1, 0, 2]].astype(np.float32) - 10)
    assert image.spacing == pytest.approx((2.5, 0.9, 0.8))
    reverse = read_dicom_series(tmp_path, files=["c.dcm", "b.dcm", "a.dcm"])  # a given order is kept
    np.testing.assert_array_equal(reverse.array, volume[[2, 0, 1]].astype(np.float32) - 10)
    assert reverse.spacing == pytest.approx((2.5, 0.9, 0.8)) and reverse.direction[2, 2] == -1
    with pytest.raises(ImageReadError, match="back and forth") as error:  # 2.5, 0, 5 mm: not a stack
        read_dicom_series(tmp_path, files=names)
    assert error.value.reason == "bad geometry" and error.value.path == str(tmp_path)
    open(tmp_path / "b.dcm", "wb").write(open(tmp_path / "b.dcm", "rb").read()[:200])
    with pytest.raises(ImageReadError, match="b.dcm") as error:
        read_dicom_series(tmp_path)
    assert error.value.path == str(tmp_path / "b.dcm")


def test_png_modes(tmp_path):
    grey = np.array([[0, 63, 126], [189, 252, 7]], np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_png(tmp_path / "l.png"), grey)
    # palette PNG whose palette maps index i to grey 2 * i: read as grey (luminance), not as indices
    palette_image = Image.fromarray(grey // 2, mode="P")
    palette_image.putpalette([v for i in range(256) for v in (min(2 * i, 255),) * 3])
    palette_image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_png(tmp_path / "p.png"), (grey // 2) * 2)
    rgb = np.dstack([grey, grey // 2, grey // 3])
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_png(tmp_path / "rgb.png"), rgb)
    truncate(str(tmp_path / "rgb.png"), 0.6)
    with pytest.raises(ImageReadError, match="rgb.png"):
        read_png(tmp_path / "rgb.png")


def test_absurd_header_is_refused_before_allocating(tmp_path):
    path = str(tmp_path / "huge.mha")
    image = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.uint8))
    sitk.WriteImage(image, path, False)
    text = re.sub(rb"DimSize = [^\n]*", b"DimSize = 4000 4000 4000", open(path, "rb").read())
    open(path, "wb").write(text)  # 60 GiB announced by a 100-byte file
    with pytest.raises(ImageReadError, match="4000, 4000, 4000") as error:
        read_image(path)
    assert error.value.reason == "too large"


def test_check_raw_dataset_names_the_damaged_file(tmp_path, volume):
    import json

    from pumit_seg.data.readers import check_raw_dataset

    (tmp_path / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
        write(tmp_path / sub / "a_0000.nii.gz" if sub == "imagesTr" else tmp_path / sub / "a.nii.gz", volume)
    assert check_raw_dataset(tmp_path) == 2
    truncate(str(tmp_path / "labelsTr" / "a.nii.gz"))
    with pytest.raises(ImageReadError, match="labelsTr/a.nii.gz"):
        check_raw_dataset(tmp_path)
