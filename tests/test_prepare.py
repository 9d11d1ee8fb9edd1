"""`pumit_pretrain prepare`: the store holds the right images with the right geometry, bad files are
reported with their reasons, reruns do nothing, parts merge to one run, crops equal the source."""

import dataclasses
import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from PIL import Image

from pumit_seg.data.prepare import ConfigError, PrepareConfig, load_dataset_config, prepare_store
from pumit_seg.data.store import PretrainStore
from pumit_seg.models.sac import aniso_d_from_spacing
from pumit_seg.phantoms.pretrain import DEFAULT_DATASETS, write_pretrain_corpus

# small versions of the corpus datasets: every format, orientation and aniso_d, two images each
SMALL = tuple(
    dataclasses.replace(d, num_images=2, shape=(max(d.shape[0] // 2, 1), 40, 44)) for d in DEFAULT_DATASETS
)
EXPECTED = {  # dataset -> (aniso_d, depth_axis, depth_axis_from, channels)
    "ct_iso": (0, 0, "spacing", 1),
    "ct_dicom": (1, 0, "metadata", 1),
    "mr_sagittal": (2, 2, "spacing", 1),
    "mr_nrrd": (3, 0, "spacing", 1),
    "ct_mha_thick": (4, 1, "config", 1),
    "xray_png": (5, 0, "2D", 1),
    "fundus_jpg": (5, 0, "2D", 3),
    "fundus_png": (5, 0, "2D", 3),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "corpus"
    config = write_pretrain_corpus(str(root), datasets=SMALL, broken=True)
    # a large grey PNG: its shorter side (1024) is resized to 512 by 2x2 area averaging
    big = np.random.default_rng(0).integers(1, 255, size=(1024, 1536), dtype=np.uint8)
    os.makedirs(root / "large")
    Image.fromarray(big).save(root / "large" / "big.png")
    content = json.loads(open(config).read())
    content["datasets"].append({"name": "large", "path": "large", "modality": "XR"})
    with open(config, "w") as f:
        json.dump(content, f)
    return config


@pytest.fixture(scope="module")
def store_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "store"
    summary = prepare_store(corpus, str(out), progress=False)
    assert summary["merged"] and summary["processed"] == summary["sources"]
    assert Image.open(summary["overview"]).size[0] > 500  # the picture of the store
    return out


def test_images_land_with_geometry(store_dir):
    table = PretrainStore(store_dir).table
    assert set(table.dataset) == set(EXPECTED) | {"large"}
    for dataset, (aniso_d, depth_axis, axis_from, channels) in EXPECTED.items():
        rows = table[table.dataset == dataset]
        assert len(rows) == 2, dataset
        assert (rows.aniso_d == aniso_d).all(), (dataset, rows.aniso_d.tolist())
        assert (rows.depth_axis == depth_axis).all() and (rows.depth_axis_from == axis_from).all(), dataset
        assert (rows.channels == channels).all(), dataset
        spec = next(d for d in SMALL if d.name == dataset)
        for row in rows.itertuples():
            assert aniso_d_from_spacing(row.spacing) == aniso_d
            if aniso_d < 5:  # 3D: spacing moved with the depth axis
                np.testing.assert_allclose(row.spacing, spec.spacing, rtol=1e-5)
                assert row.shape[0] <= max(spec.shape[0] * 1.2, 2)  # the depth axis came first
            else:
                assert row.shape[0] == 1 and np.isinf(row.spacing[0])
    # one held-out image per dataset of two or more images, weights share the dataset weight
    held_out = table.groupby("dataset", observed=True).split.apply(lambda s: (s == "val").sum())
    assert held_out.drop("large").eq(1).all() and held_out["large"] == 0
    train = table[table.split == "train"]
    weights = {d.name: d.weight for d in SMALL} | {"large": 1.0}
    sums = train.groupby("dataset", observed=True).weight.sum()
    for name, total in sums.items():
        assert total == pytest.approx(weights[name])


def test_bad_files_reported_with_reasons(corpus, store_dir):
    report = pd.read_csv(store_dir / "report.csv")
    expected = json.loads(open(os.path.join(os.path.dirname(corpus), "broken_expected.json")).read())
    got = {os.path.basename(s): r for s, r in zip(report.source, report.reason, strict=True)}
    assert got == expected
    assert all(os.path.basename(s) in m for s, m in zip(report.source, report.message, strict=True))
    assert not PretrainStore(store_dir).table.source.str.contains("/broken/").any()


def test_second_run_does_nothing(corpus, store_dir):
    files = sorted(p for p in store_dir.rglob("*.b2nd"))
    stamps = [p.stat().st_mtime_ns for p in files]
    table_before = (store_dir / "table.csv").read_text()
    summary = prepare_store(corpus, str(store_dir), progress=False)
    assert summary["processed"] == 0 and summary["skipped"] == summary["sources"]
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert (store_dir / "table.csv").read_text() == table_before


def test_two_parts_merged_equal_one_run(corpus, store_dir, tmp_path):
    out = tmp_path / "parts"
    first = prepare_store(corpus, str(out), part=1, num_parts=2, progress=False)
    assert not first["merged"] and not (out / "table.csv").exists()
    second = prepare_store(corpus, str(out), part=0, num_parts=2, progress=False)
    assert second["merged"]
    one, two = pd.read_csv(store_dir / "table.csv"), pd.read_csv(out / "table.csv")
    pd.testing.assert_frame_equal(one.drop(columns="source_mtime"), two.drop(columns="source_mtime"))
    assert (store_dir / "report.csv").read_text() == (out / "report.csv").read_text()
    a, b = PretrainStore(store_dir), PretrainStore(out)
    for key in a.table.key:
        np.testing.assert_array_equal(a.read(key), b.read(key))


def test_crop_equals_preprocessed_source(store_dir):
    """A crop of the sagittal NIfTI, preprocessed independently (nibabel, numpy), equals the store's."""
    store = PretrainStore(store_dir)
    row = store.table[store.table.dataset == "mr_sagittal"].iloc[0]
    volume = np.asarray(nib.load(row.source).dataobj, dtype=np.float64)  # (x, y, z); x has 4 mm
    volume = volume.transpose(0, 2, 1)  # depth first, then SimpleITK's (z, y) order
    threshold = np.percentile(volume, 0.5)
    mask = volume > threshold
    box = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    volume = volume[tuple(slice(b[0], b[-1] + 1) for b in box)]
    low, high = np.percentile(volume, [0.5, 99.5])
    expected = np.clip((volume - low) / (high - low), 0, 1)
    assert row["shape"] == expected.shape
    crop = (slice(1, 5), slice(5, 30), slice(11, 40))
    got = store.read(row.key, crop)
    assert got.shape == (1, 4, 25, 29) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], expected[crop], atol=1.0 / 65535)

    rgb = store.table[store.table.dataset == "fundus_png"].iloc[0]
    pixels = np.asarray(Image.open(rgb.source).convert("RGB")).transpose(2, 0, 1)[:, None] / 255.0
    box = [int(v) for part in rgb.crop.split(",") for v in part.split(":")]
    assert (pixels[:, :, : box[2]] == 0).all()  # the crop removed only black border
    np.testing.assert_allclose(store.read(rgb.key), pixels[:, :, box[2] : box[3], box[4] : box[5]], atol=1e-7)


def test_large_image_area_downsized(store_dir):
    store = PretrainStore(store_dir)
    row = store.table[store.table.dataset == "large"].iloc[0]
    assert row["shape"] == (1, 512, 768) and row["spacing"][1:] == pytest.approx((2.0, 2.0))
    source = np.asarray(Image.open(row.source), dtype=np.float64)
    area = source.reshape(512, 2, 768, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(store.read(row.key)[0, 0], np.round(area) / 255, atol=1e-7)


def test_store_read_touches_only_needed_blocks(store_dir):
    """Chunks are crop-sized and blocks small, so a crop is a small part of what a whole read decodes."""
    from pumit_seg.data.store import open_image_array

    store = PretrainStore(store_dir)
    row = store.table[store.table.dataset == "ct_iso"].iloc[0]
    array = open_image_array(os.path.join(store.root, row.file))
    assert array.chunks[0] == 1 and array.blocks[1:] <= array.chunks[1:]
    assert np.prod(array.blocks) * array.dtype.itemsize <= PrepareConfig().chunks.max_block_bytes


def test_config_and_output_errors(corpus, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"datasets": [{"name": "a", "path": "nowhere", "modality": "CT"}]}))
    with pytest.raises(ConfigError, match=r"bad.json.*'a'.*does not exist"):
        load_dataset_config(str(bad))
    bad.write_text(json.dumps({"datasets": [{"name": "a", "path": ".", "modality": "CT", "weight": -1}]}))
    with pytest.raises(ConfigError, match="weight must be a positive"):
        load_dataset_config(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_dataset_config(str(bad))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a pre-training store"):
        prepare_store(corpus, str(stranger), progress=False)
    assert os.listdir(stranger) == ["notes.txt"]


def test_nifti_slice_dim_metadata(tmp_path):
    """With NIfTI's slice_dim set, the depth axis comes from the metadata even against the spacing."""
    volume = np.random.default_rng(0).normal(100, 20, size=(20, 30, 36)).astype(np.float32)  # (x, y, z)
    image = nib.Nifti1Image(volume, np.diag([1.0, 1.0, 3.0, 1.0]))
    image.header.set_dim_info(slice=1)  # the y axis (j) was acquired slice by slice
    (tmp_path / "data").mkdir()
    nib.save(image, tmp_path / "data" / "a.nii.gz")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"datasets": [{"name": "d", "path": "data", "modality": "MR"}]}))
    prepare_store(str(config), str(tmp_path / "store"), progress=False)
    row = PretrainStore(tmp_path / "store").table.iloc[0]
    assert row.depth_axis_from == "metadata" and row.depth_axis == 1  # numpy (z, y, x): y is axis 1
    assert row["spacing"] == pytest.approx((1.0, 3.0, 1.0))
    assert sitk.ReadImage(str(tmp_path / "data" / "a.nii.gz")).GetSize() == (20, 30, 36)


def test_cli(corpus, tmp_path, capsys):
    from pumit_seg.trainers.pretrain_cli import main

    out = tmp_path / "cli_store"
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", corpus, "-o", str(out), "--part", "2", "--num-parts", "2"])
    assert exit_info.value.code == 2 and "--part" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", corpus, "-o", str(out), "--merge"])
    assert exit_info.value.code == 1 and "not processed yet" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", corpus, "-o", str(out), "--num-workers", "2", "--quiet", "--max-in-plane", "256"])
    assert exit_info.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["merged"] and summary["unusable"] == 6
    table = PretrainStore(out).table
    assert table.loc[table.dataset == "large", "shape"].iloc[0] == (1, 256, 384)  # --max-in-plane


def test_single_slice_volume_is_2d(tmp_path):
    """A 3D file with one slice (here along x, 5 mm thick) is a 2D image: depth first, aniso_d 5."""
    (tmp_path / "data").mkdir()
    pixels = np.random.default_rng(1).normal(300, 50, size=(30, 40, 1)).astype(np.float32)  # (z, y, x)
    image = sitk.GetImageFromArray(pixels)
    image.SetSpacing((5.0, 0.7, 0.7))
    sitk.WriteImage(image, str(tmp_path / "data" / "one.nrrd"))
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"datasets": [{"name": "d", "path": "data", "modality": "MR"}]}))
    prepare_store(str(config), str(tmp_path / "store"), progress=False)
    row = PretrainStore(tmp_path / "store").table.iloc[0]
    assert row.depth_axis_from == "2D" and row.aniso_d == 5 and np.isinf(row.spacing_d)
    assert row["shape"][0] == 1 and row["spacing"][1:] == pytest.approx((0.7, 0.7))


def test_killed_run_continues(corpus, store_dir, tmp_path):
    """A torn journal line (killed while writing) and a missing array are redone; nothing else is."""
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    journal = copy / "parts" / "part-0-of-1.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    table = pd.read_csv(copy / "table.csv")
    (copy / table.file.iloc[0]).unlink()
    (copy / "table.csv").unlink()
    summary = prepare_store(corpus, str(copy), progress=False)
    assert summary["processed"] == 2 and summary["merged"]
    pd.testing.assert_frame_equal(table, pd.read_csv(copy / "table.csv"))


def _noise_png(path, seed, size=(24, 28)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(1, 255, size=size, dtype=np.uint8)).save(path)


def _write_config(path, datasets):
    path.write_text(json.dumps({"datasets": datasets}))
    return str(path)


def test_store_knows_sources_and_settings(tmp_path):
    """Other settings, a changed source, a changed dataset entry: every array is redone or refused."""
    for k in range(3):
        _noise_png(tmp_path / "data" / f"x{k}.png", k, size=(40, 44))
    config = _write_config(tmp_path / "c.json", [{"name": "d", "path": "data", "modality": "XR"}])
    store = tmp_path / "store"
    prepare_store(config, str(store), progress=False)
    first = pd.read_csv(store / "table.csv")
    assert first.settings.nunique() == 1 and (first.source_files.astype(str) == "1").all()

    def arrays():
        return {p: p.read_bytes() for p in sorted(store.rglob("*.b2nd"))}

    before, table_before = arrays(), (store / "table.csv").read_text()
    with pytest.raises(ConfigError, match=r"--max-in-plane: 512 then, 32 now.*--reprocess"):
        prepare_store(config, str(store), config=PrepareConfig(max_in_plane=32), progress=False)
    assert arrays() == before and (store / "table.csv").read_text() == table_before  # refused untouched

    summary = prepare_store(
        config, str(store), config=PrepareConfig(max_in_plane=32), reprocess=True, progress=False
    )
    assert summary["processed"] == 3 and summary["reprocessed_settings"] == 3
    second = PretrainStore(store).table
    assert all(min(shape[1:]) == 32 for shape in second["shape"]) and second.settings.nunique() == 1
    assert set(second.settings) != set(first.settings)
    assert json.loads((store / "store.json").read_text())["settings"]["max_in_plane"] == 32

    _noise_png(tmp_path / "data" / "x1.png", 99, size=(40, 50))  # the source changed: prepared again
    summary = prepare_store(config, str(store), config=PrepareConfig(max_in_plane=32), progress=False)
    assert summary["processed"] == 1 and summary["changed_sources"] == 1
    assert PretrainStore(store).table.loc["d/x1.png", "shape"] == (1, 32, 40)

    _write_config(
        tmp_path / "c.json", [{"name": "d", "path": "data", "modality": "XR", "intensity": "percentile"}]
    )
    with pytest.raises(
        ConfigError, match="3 source.*other settings.*dataset intensity: None then, 'percentile' now"
    ):
        prepare_store(config, str(store), config=PrepareConfig(max_in_plane=32), progress=False)
    summary = prepare_store(
        config, str(store), config=PrepareConfig(max_in_plane=32), reprocess=True, progress=False
    )
    assert summary["processed"] == 3 and set(PretrainStore(store).table.intensity) == {"percentile"}


def test_keys_unique_whatever_the_names(tmp_path):
    """Two datasets with files of the same name, one folder in two datasets, odd characters: all kept."""
    names = ["a.png", "A.png", "with space #1.png", "ünï cödé.png", "x" * 120 + ".png"]
    for k, name in enumerate(names):
        _noise_png(tmp_path / "one" / name, k)
    _noise_png(tmp_path / "two" / "a.png", 10)
    _noise_png(tmp_path / "two" / "sub:dir" / "a.png", 11)
    config = _write_config(
        tmp_path / "c.json",
        [
            {"name": "one", "path": "one", "modality": "XR"},
            {"name": "one again", "path": "one", "modality": "XR"},  # the same folder, another dataset
            {"name": "two ü", "path": "two", "modality": "XR"},
        ],
    )
    summary = prepare_store(config, str(tmp_path / "store"), progress=False)
    table = PretrainStore(tmp_path / "store").table
    assert summary["images"] == 2 * len(names) + 2 and table.key.is_unique
    assert table.file.str.lower().is_unique  # distinct on case-insensitive file systems too
    assert table.groupby("dataset", observed=True).size().to_dict() == {"one": 5, "one again": 5, "two ü": 2}
    again = prepare_store(config, str(tmp_path / "store"), progress=False)  # stable: nothing to redo
    assert again["processed"] == 0
    pd.testing.assert_frame_equal(table, PretrainStore(tmp_path / "store").table)


def test_label_folders_maps_and_other_files_are_reported(tmp_path):
    """Label folders (any case) are not entered, label-map images and files of no image type are
    reported: everything seen is in the table or the report. FreeSurfer .mgz files are read."""
    data = tmp_path / "data"
    _noise_png(data / "img.png", 0)
    for folder in ("Segmentation", "GROUND", "labelsTr"):
        _noise_png(data / "case" / folder / "mask.png", 1)
    mask = np.zeros((8, 24, 24), np.uint8)
    mask[2:6, 5:15, 5:20], mask[3:5, 8:12, 8:12] = 1, 2
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(data / "case" / "liver_mask.nii.gz"))
    (data / "README.txt").write_text("not an image")
    volume = np.random.default_rng(0).normal(100, 20, size=(20, 24, 6)).astype(np.float32)  # (x, y, z)
    nib.save(nib.MGHImage(volume, np.diag([1.0, 1.0, 3.0, 1.0])), data / "brain.mgz")
    config = _write_config(tmp_path / "c.json", [{"name": "d", "path": "data", "modality": "MR"}])
    summary = prepare_store(config, str(tmp_path / "store"), progress=False)
    table = PretrainStore(tmp_path / "store").table
    assert sorted(table.key) == ["d/brain.mgz", "d/img.png"]
    assert table.loc["d/brain.mgz", "spacing"] == pytest.approx((3.0, 1.0, 1.0))  # z (3 mm) first
    report = pd.read_csv(tmp_path / "store" / "report.csv")
    reasons = {os.path.relpath(s, data): r for s, r in zip(report.source, report.reason, strict=True)}
    assert reasons == {
        "case/Segmentation": "label folder",
        "case/GROUND": "label folder",
        "case/labelsTr": "label folder",
        "case/liver_mask.nii.gz": "label map",
        "README.txt": "not an image file",
    }
    assert summary["unusable"] == 5 and summary["datasets_without_images"] == []


def test_dataset_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    _noise_png(tmp_path / "data" / "a.png", 0)
    config = _write_config(
        tmp_path / "c.json",
        [{"name": "d", "path": "data", "modality": "XR"}, {"name": "e", "path": "empty", "modality": "CT"}],
    )
    with pytest.raises(ConfigError, match="dataset 'e': no image file in .*empty"):
        prepare_store(config, str(tmp_path / "store"), progress=False)
    assert not (tmp_path / "store").exists()
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "empty" / "black.png")  # only unusable
    summary = prepare_store(config, str(tmp_path / "store"), progress=False)
    assert summary["datasets_without_images"] == ["e"] and summary["images"] == 1


def _dicom_volume(seed: int, depth: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(300, 60, size=(depth, 20, 24)).clip(0, 4000)).astype(np.uint16)


def test_a_bad_series_does_not_lose_the_good_one_in_its_folder(tmp_path):
    """Two series in one DICOM folder, one with a missing slice: the good one is stored, the bad one is
    in the report with its reason, and no array is left without its table row."""
    from pumit_seg.phantoms.dicom import write_dicom_series

    study = tmp_path / "data" / "study"
    write_dicom_series(
        str(study), _dicom_volume(0), [(0, 0, 2.5 * k) for k in range(4)], [f"a{k}.dcm" for k in range(4)]
    )
    write_dicom_series(
        str(study),
        _dicom_volume(1),
        [(0, 0, z) for z in (0.0, 2.5, 7.5, 10.0)],
        [f"b{k}.dcm" for k in range(4)],
    )
    config = _write_config(tmp_path / "c.json", [{"name": "d", "path": "data", "modality": "CT"}])
    summary = prepare_store(config, str(tmp_path / "store"), progress=False)
    table = PretrainStore(tmp_path / "store").table
    assert summary["images"] == 1 and summary["unusable"] == 1
    assert table.loc[table.index[0], "spacing"][0] == pytest.approx(2.5)
    report = pd.read_csv(tmp_path / "store" / "report.csv")
    assert len(report) == 1 and "missing" in report.message[0]
    stored = {str(p.relative_to(tmp_path / "store")) for p in (tmp_path / "store").rglob("*.b2nd")}
    assert stored == set(table.file)
    assert prepare_store(config, str(tmp_path / "store"), progress=False)["processed"] == 0  # stable


def test_patterns_select_dicom_series_by_their_folder(tmp_path):
    from pumit_seg.phantoms.dicom import write_dicom_series

    for name in ("keep", "other"):
        folder = tmp_path / "data" / name
        write_dicom_series(
            str(folder), _dicom_volume(2), [(0, 0, 2.0 * k) for k in range(4)], [f"{k}.dcm" for k in range(4)]
        )
    config = _write_config(
        tmp_path / "c.json", [{"name": "d", "path": "data", "modality": "CT", "exclude": ["other"]}]
    )
    prepare_store(config, str(tmp_path / "store"), progress=False)
    assert [k.split("/")[1] for k in PretrainStore(tmp_path / "store").table.key] == ["keep"]
