"""PUMITPlanner on phantom datasets of different spacings: valid plans (patch divisible, aniso_d from the
transposed target spacing, strides = the network's deep-supervision strides, arch_kwargs rebuild the
network and its outputs match nnU-Net's deep-supervision scales), patch-size checks, memory model."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pumit_seg.models.sac import aniso_d_from_spacing
from pumit_seg.phantoms.abdomen import LABELS, PhantomConfig, write_phantom_dataset

TINY = {"model": "tiny", "decoder_channels": [8, 8, 16, 16], "full_res_channels": [4, 4]}
# dataset id -> (phantom config, aniso_d expected for 3d_fullres or None for a 2D dataset)
DATASETS = {
    971: (PhantomConfig(shape=(20, 64, 64), spacing=(3.0, 0.75, 0.75)), 2),
    972: (PhantomConfig(shape=(40, 40, 40), spacing=(1.0, 1.0, 1.0)), 0),
    973: (PhantomConfig(shape=(12, 96, 96), spacing=(8.0, 0.5, 0.5)), 4),
    # the coarse axis stored last: nnU-Net moves it first, and it must become our depth axis
    974: (PhantomConfig(shape=(64, 64, 20), spacing=(0.75, 0.75, 3.0)), 2),
    975: (
        PhantomConfig(shape=(1, 96, 80), spacing=(1.0, 0.8, 0.8), two_d=True, modality="MR", num_channels=2),
        None,
    ),
}


def write_fingerprint(raw_dataset_folder: Path, preprocessed_dataset_folder: Path) -> None:
    """nnU-Net's fingerprint, computed in-process with its own per-case `analyze_case` (its extractor
    runs the same function in a spawned pool, ~15 s per dataset on 2 cores; the real extractor is
    exercised by the end-to-end tests)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_json = json.loads((raw_dataset_folder / "dataset.json").read_text())
    cases = get_filenames_of_train_images_and_targets(str(raw_dataset_folder), dataset_json).values()
    results = [
        DatasetFingerprintExtractor.analyze_case(c["images"], c["label"], SimpleITKIO, 1000) for c in cases
    ]
    intensities = [
        np.concatenate([r[2][i] for r in results]) for i in range(len(dataset_json["channel_names"]))
    ]
    fingerprint = {
        "spacings": [r[1] for r in results],
        "shapes_after_crop": [r[0] for r in results],
        "foreground_intensity_properties_per_channel": {
            str(i): {
                "mean": float(np.mean(v)),
                "median": float(np.median(v)),
                "std": float(np.std(v)),
                "min": float(np.min(v)),
                "max": float(np.max(v)),
                "percentile_99_5": float(np.percentile(v, 99.5)),
                "percentile_00_5": float(np.percentile(v, 0.5)),
            }
            for i, v in enumerate(intensities)
        },  # fmt: skip
        "median_relative_size_after_cropping": float(np.median([r[4] for r in results])),
    }
    recursive_fix_for_json_export(fingerprint)
    preprocessed_dataset_folder.mkdir(parents=True, exist_ok=True)
    (preprocessed_dataset_folder / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))


@pytest.fixture(scope="module")
def fingerprinted(tmp_path_factory):
    """Phantom datasets with their nnU-Net fingerprints."""
    root = tmp_path_factory.mktemp("planner")
    for dataset_id, (config, _) in DATASETS.items():
        folder = write_phantom_dataset(
            str(root / "raw"),
            dataset_id,
            "PlanPhantoms",
            num_training=3,
            num_test=0,
            config=config,
            seed=dataset_id,
        )
        write_fingerprint(Path(folder), root / "preprocessed" / Path(folder).name)
    return root


@pytest.fixture
def planner_factory(fingerprinted, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(fingerprinted / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(fingerprinted / "preprocessed"))

    def make(dataset_id, **kwargs):
        from pumit_seg.planners import PUMITPlanner

        return PUMITPlanner(dataset_id, **{**TINY, **kwargs})

    return make


@pytest.mark.parametrize("dataset_id", sorted(DATASETS))
def test_plans_are_valid(planner_factory, fingerprinted, dataset_id):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from pumit_seg.models.seg_net import required_patch_divisor, sac_strides

    config, expected_aniso_d = DATASETS[dataset_id]
    planner_factory(dataset_id).plan_experiment()
    saved = json.loads(
        (fingerprinted / "preprocessed" / f"Dataset{dataset_id}_PlanPhantoms" / "PUMITPlans.json").read_text()
    )
    assert saved["plans_name"] == "PUMITPlans" and saved["experiment_planner_used"] == "PUMITPlanner"
    expected_configurations = ["2d"] if expected_aniso_d is None else ["2d", "3d_fullres"]
    assert sorted(saved["configurations"]) == expected_configurations

    for name, configuration in saved["configurations"].items():
        arch = configuration["architecture"]
        assert arch["network_class_name"] == "pumit_seg.models.seg_net.PUMITSegNet"
        kwargs = arch["arch_kwargs"]
        spacing = configuration["spacing"]
        if name == "2d":
            assert kwargs["aniso_d"] == 5 and kwargs["spatial_dims"] == 2
        else:
            assert kwargs["aniso_d"] == expected_aniso_d == aniso_d_from_spacing(spacing)
            assert spacing[0] == max(spacing)  # depth = nnU-Net's first (lowest-resolution) axis
        assert kwargs["strides"] == sac_strides(kwargs["spatial_dims"], kwargs["aniso_d"])
        depth_divisor, inplane_divisor = required_patch_divisor(kwargs["aniso_d"])
        divisors = (
            [inplane_divisor] * 2 if name == "2d" else [depth_divisor, inplane_divisor, inplane_divisor]
        )
        patch_size = configuration["patch_size"]
        assert all(p % d == 0 and p > 0 for p, d in zip(patch_size, divisors, strict=True)), (
            patch_size,
            divisors,
        )
        assert configuration["batch_size"] >= 2

        # nnU-Net rebuilds the network from the plans; its outputs match the deep-supervision scales
        num_classes = len(LABELS)
        channels = config.num_channels
        network = get_network_from_plans(
            arch["network_class_name"],
            kwargs,
            arch["_kw_requires_import"],
            channels,
            num_classes,
            deep_supervision=True,
        )
        with torch.no_grad():
            outputs = network(torch.zeros(1, channels, *patch_size))
        scales = 1 / np.cumprod(np.vstack(kwargs["strides"]), axis=0)[:-1]
        assert len(outputs) == len(scales)
        for output, scale in zip(outputs, scales, strict=True):
            assert list(output.shape[2:]) == [round(p * s) for p, s in zip(patch_size, scale, strict=True)]
            assert output.shape[:2] == (1, num_classes)


def test_transposed_dataset_uses_the_coarse_axis_as_depth(planner_factory):
    plans = planner_factory(974).plan_experiment()
    assert plans["transpose_forward"] == [2, 0, 1]
    assert plans["configurations"]["3d_fullres"]["spacing"][0] == pytest.approx(3.0)


def test_patch_size_override_checked(planner_factory):
    plans = planner_factory(971, patch_size_3d=[8, 64, 96], patch_size_2d=[96, 64]).plan_experiment()
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [8, 64, 96]
    assert plans["configurations"]["2d"]["patch_size"] == [96, 64]
    with pytest.raises(ValueError, match=r"multiple of \[8, 32, 32\]"):
        planner_factory(971, patch_size_3d=[12, 64, 64]).plan_experiment()
    with pytest.raises(ValueError, match=r"multiple of \[32, 32\]"):
        planner_factory(971, patch_size_2d=[64, 48]).plan_experiment()


def test_memory_budget_drives_patch_and_batch_size(planner_factory):
    from pumit_seg.planners import estimate_training_memory

    small = planner_factory(
        971, model="base", decoder_channels=None, full_res_channels=None, gpu_memory_target_in_gb=4
    )
    large = planner_factory(
        971, model="base", decoder_channels=None, full_res_channels=None, gpu_memory_target_in_gb=80
    )
    spacing, median = np.array([3.0, 0.75, 0.75]), np.array([200, 512, 512])
    small_plan = small.get_plans_for_configuration(spacing, median, "x", 1e12, {})
    large_plan = large.get_plans_for_configuration(spacing, median, "x", 1e12, {})
    assert np.prod(small_plan["patch_size"]) < np.prod(large_plan["patch_size"])
    for planner, plan in [(small, small_plan), (large, large_plan)]:
        kwargs = plan["architecture"]["arch_kwargs"]
        assert planner.estimate_memory(kwargs, plan["patch_size"], 2) <= planner.UNet_vram_target_GB * 1e9
        assert plan["pumit_memory_estimate_gb"] <= planner.UNet_vram_target_GB
    # the estimate grows with the batch and the patch
    kwargs = large_plan["architecture"]["arch_kwargs"]
    model = large.memory_model
    one = estimate_training_memory(kwargs, 10**8, 5, [32, 128, 128], 1, model)
    assert estimate_training_memory(kwargs, 10**8, 5, [32, 128, 128], 2, model) > one
    assert estimate_training_memory(kwargs, 10**8, 5, [64, 128, 128], 1, model) > one


def test_pretrained_weights_key(planner_factory, tmp_path):
    from pumit_seg.models.vit import universal_vit_tiny
    from pumit_seg.weights import save_model

    weights = tmp_path / "encoder.safetensors"
    save_model(universal_vit_tiny(in_channels=1, norm_eps=1e-5), weights)
    plans = planner_factory(971, pretrained_weights=str(weights)).plan_experiment()
    for configuration in plans["configurations"].values():
        assert configuration["pumit_pretrained_weights"] == str(weights.resolve())
        # the LayerNorm eps the weights were trained with, read from their header
        assert configuration["architecture"]["arch_kwargs"]["vit"]["norm_eps"] == 1e-5
        assert "header" in configuration["pumit_norm_eps_choice"]
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.safetensors: not a readable safetensors file"):
        planner_factory(971, pretrained_weights=str(tmp_path / "empty.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        planner_factory(971, pretrained_weights=str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [
        ((3.0, 0.76, 0.76), 2),  # nnU-Net's BTCV target spacing: ratio 3.95, floor would give 1
        ((2.99, 0.75, 0.75), 2),
        ((3.0, 0.75, 0.75), 2),  # the paper's
        ((1.9, 1.0, 1.0), 1),
        ((9.0, 1.62109, 1.62109), 2),  # CHAOS: ratio 5.55, not near a power of two
        ((3.5, 1.0, 1.0), 1),  # log2 1.81: too far below 2
        ((1.0, 1.0, 1.0), 0),
    ],
)
def test_aniso_d_is_robust_just_below_powers_of_two(spacing, expected):
    from pumit_seg.planners.pumit_planner import choose_aniso_d

    aniso_d, why = choose_aniso_d(spacing)
    assert aniso_d == expected
    if aniso_d != aniso_d_from_spacing(spacing):
        assert "rounded up instead of floor's" in why


def test_btcv_like_fingerprint_gives_the_paper_aniso_d_and_patch(planner_factory, fingerprinted):
    """A BTCV-like fingerprint (coarse axis 3 mm, in-plane 0.76 mm; nnU-Net's own target spacing gives ratio
    3.95): with and without the preset's target spacing, aniso_d 2 and the paper's 4x16x16 patch kernel."""
    from pumit_seg.planners.presets import PAPER_PRESETS

    folder = fingerprinted / "preprocessed" / "Dataset971_PlanPhantoms"
    fingerprint_file = folder / "dataset_fingerprint.json"
    original = fingerprint_file.read_text()
    fingerprint = json.loads(original)
    fingerprint["spacings"] = [[3.0, 0.76, 0.76], [2.9, 0.76, 0.76], [3.0, 0.77, 0.77]]
    fingerprint_file.write_text(json.dumps(fingerprint))
    try:
        plans = planner_factory(971, patch_size_3d=[48, 192, 192]).plan_experiment()
        config = plans["configurations"]["3d_fullres"]
        assert config["architecture"]["arch_kwargs"]["aniso_d"] == 2
        assert "rounded up" in config["pumit_aniso_d_choice"]

        btcv = PAPER_PRESETS["btcv"]
        plans = planner_factory(
            971,
            model="tiny",
            target_spacing_dhw=btcv.target_spacing_dhw,
            patch_size_3d=btcv.patch_size_3d,
            batch_size=btcv.batch_size,
            ct_window=[-175, 250],
            oversample_foreground_percent=btcv.oversample_foreground_percent,
            predict_step_size=btcv.predict_step_size,
            default_norm_eps=btcv.norm_eps,
            preset="btcv",
        ).plan_experiment()
        config = plans["configurations"]["3d_fullres"]
        kwargs = config["architecture"]["arch_kwargs"]
        assert config["spacing"] == [3.0, 0.75, 0.75] and config["patch_size"] == [48, 192, 192]
        assert kwargs["aniso_d"] == 2 and config["batch_size"] == 4
        assert kwargs["vit"]["pos_grid_shape"] == [12, 12, 12]  # the reference's grid, resampled once at load
        assert kwargs["vit"]["norm_eps"] == 1e-5 and kwargs["fixed_kernels"] is True
        assert (
            config["pumit_oversample_foreground_percent"] == 0.75
            and config["pumit_predict_step_size"] == 0.25
        )
    finally:
        fingerprint_file.write_text(original)


def test_ct_window_becomes_nnunet_ct_normalisation(planner_factory, fingerprinted):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    plans = planner_factory(971, ct_window=[-175, 250]).plan_experiment()
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    properties = plans["foreground_intensity_properties_per_channel"]["0"]
    assert plans["pumit_ct_window"] == {"window": [-175.0, 250.0], "channels": ["0"]}
    # nnU-Net's own normalisation with these properties: the window onto [-1, 1], clipped outside
    image = np.array([-1000.0, -175.0, 37.5, 250.0, 3000.0], dtype=np.float32)
    normalised = CTNormalization(intensityproperties=properties).run(image.copy())
    np.testing.assert_allclose(normalised, [-1, -1, 0, 1, 1], atol=1e-6)
    with pytest.raises(ValueError, match="no channel .* is 'CT'"):
        planner_factory(975, ct_window=[-175, 250]).plan_experiment()  # an MR dataset


def test_target_spacing_is_depth_first_and_suppressed_transpose_is_refused(planner_factory):
    # dataset 974 stores its coarse axis last: the depth-first target spacing lands on that axis
    plans = planner_factory(974, target_spacing_dhw=[2.0, 1.0, 1.0]).plan_experiment()
    assert plans["transpose_forward"] == [2, 0, 1]
    assert plans["configurations"]["3d_fullres"]["spacing"] == [2.0, 1.0, 1.0]
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["aniso_d"] == 1
    with pytest.raises(ValueError, match="not the lowest-resolution axis.*suppress_transpose"):
        planner_factory(974, suppress_transpose=True).plan_experiment()


def test_stale_fingerprint_is_noticed(fingerprinted, monkeypatch):
    from pumit_seg.planners.fingerprint_state import (
        SOURCES_FILE,
        fingerprint_staleness,
        record_fingerprint_sources,
    )

    raw = fingerprinted / "raw" / "Dataset972_PlanPhantoms"
    preprocessed = fingerprinted / "preprocessed" / "Dataset972_PlanPhantoms"
    monkeypatch.setenv("nnUNet_raw", str(fingerprinted / "raw"))
    assert fingerprint_staleness(raw, preprocessed) is None  # no record: compared with the image headers
    image = sorted((raw / "imagesTr").iterdir())[0]
    original = image.read_bytes()
    try:
        itk = sitk.ReadImage(str(image))
        itk.SetSpacing((1.0, 1.0, 2.5))
        sitk.WriteImage(itk, str(image))
        assert "spacing [1.0, 1.0, 1.0] in the fingerprint, [2.5, 1.0, 1.0]" in fingerprint_staleness(
            raw, preprocessed
        )
        record_fingerprint_sources(raw, preprocessed)  # as after a recomputation
        assert fingerprint_staleness(raw, preprocessed) is None
        image.write_bytes(original)
        assert "changed (size or modification time)" in fingerprint_staleness(raw, preprocessed)
    finally:
        image.write_bytes(original)
        (preprocessed / SOURCES_FILE).unlink(missing_ok=True)
