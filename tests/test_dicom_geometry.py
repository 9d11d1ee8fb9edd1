"""DICOM geometry from every slice: gaps and uneven steps are refused, reversed series and multi-frame files
are read as the volumes they are, layouts that cannot be placed (mosaic, frames without positions) refused."""

import json

import numpy as np
import pytest

from pumit_seg.data.readers import ImageReadError, dicom_folder_series, read_dicom_series
from pumit_seg.evaluation.chaos_io import read_dicom_geometry
from pumit_seg.phantoms.dicom import write_dicom_multiframe, write_dicom_series

ROWS, COLUMNS = 6, 7


def series(folder, z_positions, names=None):
    """One-slice files at z (axial), named s0.dcm, s1.dcm, ... in the order given; slice k holds k + 1."""
    names = names or [f"s{k}.dcm" for k in range(len(z_positions))]
    volume = np.stack([np.full((ROWS, COLUMNS), k + 1) for k in range(len(z_positions))])
    write_dicom_series(str(folder), volume, [(0.0, 0.0, z) for z in z_positions], names)
    return names


def test_regular_series_spacing_from_positions_not_slice_thickness(tmp_path):
    series(tmp_path, [10.0, 12.5, 15.0, 17.5])  # SliceThickness is a misleading 99 in these files
    image = read_dicom_series(tmp_path)
    assert image.spacing == pytest.approx((2.5, 0.9, 0.8))
    assert image.origin[0] == pytest.approx(10.0) and image.direction[2, 2] == 1


def test_missing_slice_is_refused_naming_the_gap(tmp_path):
    series(tmp_path, [0.0, 2.5, 7.5, 10.0])  # 5.0 missing: the average step would be 3.33 mm
    with pytest.raises(
        ImageReadError, match=r"1 slice\(s\) missing: a gap of 5 mm between s1.dcm and s2.dcm"
    ) as error:
        read_dicom_series(tmp_path)
    assert error.value.reason == "missing slice" and error.value.path == str(tmp_path)
    with pytest.raises(ImageReadError, match="missing"):  # the CHAOS tools read the same geometry
        read_dicom_geometry(str(tmp_path))


def test_first_and_last_only_would_average_a_missing_slice(tmp_path):
    series(tmp_path, [0.0, 5.0, 7.5])  # 2.5 missing: first and last give 3.75 mm, never stored
    with pytest.raises(
        ImageReadError, match="gap of 5 mm between s0.dcm and s1.dcm where the series steps 2.5 mm"
    ):
        read_dicom_series(tmp_path)


def test_uneven_spacing_is_refused(tmp_path):
    series(tmp_path, [0.0, 2.5, 6.0, 7.5])
    with pytest.raises(
        ImageReadError,
        match=r"uneven slice spacing: steps from 1.5 mm \(s2.dcm -> s3.dcm\) to 3.5 mm \(s1.dcm -> s2.dcm\)",
    ) as error:
        read_dicom_series(tmp_path)
    assert error.value.reason == "uneven spacing"


def test_rounding_of_positions_is_not_uneven(tmp_path):
    series(tmp_path, [0.0, 2.5004, 4.9998, 7.5003])
    assert read_dicom_series(tmp_path).spacing[0] == pytest.approx(2.5, abs=1e-3)


def test_two_slices_at_one_position_are_refused(tmp_path):
    series(tmp_path, [0.0, 2.5, 2.5, 5.0])
    with pytest.raises(ImageReadError, match="s1.dcm and s2.dcm lie at the same position") as error:
        read_dicom_series(tmp_path)
    assert error.value.reason == "bad geometry"


def test_reversed_series_keeps_file_order_and_true_geometry(tmp_path):
    names = series(tmp_path, [7.5, 5.0, 2.5, 0.0])  # s0 lies highest: file-name order runs downwards
    image = read_dicom_series(tmp_path)
    assert image.array[:, 0, 0].tolist() == [1, 2, 3, 4]  # slice k = file k (the CHAOS rule)
    assert image.spacing[0] == pytest.approx(2.5) and image.direction[2, 2] == -1
    assert image.origin[0] == pytest.approx(7.5)
    # the pre-training reader orders a series by position instead
    (found,) = dicom_folder_series(tmp_path, names)
    assert found.files == names[::-1] and not found.multiframe


def test_multiframe_file_is_read_as_its_volume(tmp_path):
    volume = np.stack([np.full((ROWS, COLUMNS), k + 1) for k in range(4)])
    order = [2, 0, 3, 1]  # frames stored out of position order
    write_dicom_multiframe(
        str(tmp_path / "enhanced.dcm"),
        volume[order],
        [(0.0, 0.0, 3.0 * k) for k in order],
        pixel_spacing=(0.7, 0.6),
    )
    image = read_dicom_series(tmp_path, ["enhanced.dcm"])
    assert image.array[:, 0, 0].tolist() == [1, 2, 3, 4]  # frames by position
    assert image.spacing == pytest.approx((3.0, 0.7, 0.6))  # from the frame positions and PixelMeasures
    (found,) = dicom_folder_series(tmp_path, ["enhanced.dcm"])
    assert found.multiframe and found.files == ["enhanced.dcm"]


def test_multiframe_with_a_missing_frame_is_refused(tmp_path):
    volume = np.ones((3, ROWS, COLUMNS))
    write_dicom_multiframe(str(tmp_path / "m.dcm"), volume, [(0.0, 0.0, z) for z in (0.0, 3.0, 9.0)])
    with pytest.raises(ImageReadError, match="gap of 6 mm between frame 2 and frame 3") as error:
        read_dicom_series(tmp_path, ["m.dcm"])
    assert error.value.reason == "missing slice"


@pytest.mark.parametrize(
    "options, message",
    [({"with_positions": False}, "without per-frame positions"), ({"mosaic": True}, "Siemens mosaic")],
)
def test_layouts_that_cannot_be_placed_are_refused(tmp_path, options, message):
    write_dicom_multiframe(
        str(tmp_path / "m.dcm"), np.ones((3, ROWS, COLUMNS)), [(0, 0, z) for z in (0, 2, 4)], **options
    )
    with pytest.raises(ImageReadError, match=message) as error:
        read_dicom_series(tmp_path, ["m.dcm"])
    assert error.value.reason == "unsupported"


def test_prepare_reports_gaps_and_reads_multiframe_and_extensionless_files(tmp_path):
    """A store takes the regular series and the multi-frame file, reports the series with a gap."""
    import pandas as pd

    from pumit_seg.data.prepare import prepare_store
    from pumit_seg.data.store import PretrainStore

    rng = np.random.default_rng(0)
    data = tmp_path / "data"

    def noisy(count):
        return rng.integers(100, 1000, size=(count, 20, 20))

    write_dicom_series(
        str(data / "good"), noisy(4), [(0, 0, 2.5 * k) for k in range(4)], ["IM1", "IM2", "IM3", "IM4"]
    )
    write_dicom_series(
        str(data / "gap"), noisy(4), [(0, 0, z) for z in (0, 2.5, 7.5, 10)], [f"g{k}.dcm" for k in range(4)]
    )
    write_dicom_multiframe(
        str(data / "enhanced" / "volume.dcm"), noisy(3), [(0, 0, 4.0 * k) for k in range(3)]
    )
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"datasets": [{"name": "d", "path": "data", "modality": "MR"}]}))
    summary = prepare_store(str(config), str(tmp_path / "store"), progress=False)
    table = PretrainStore(tmp_path / "store").table
    assert len(table) == 2 and summary["unusable"] == 1
    spacing = {key.split("/")[1]: row.spacing_d for key, row in table.iterrows()}
    assert spacing == pytest.approx({"good": 2.5, "enhanced": 4.0})
    report = pd.read_csv(tmp_path / "store" / "report.csv")
    assert report.reason.tolist() == ["missing slice"] and "g1.dcm and g2.dcm" in report.message[0]
