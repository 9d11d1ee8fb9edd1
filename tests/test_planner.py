"""PUMITPlanner on phantom datasets of different spacings: valid plans (patch divisible, aniso_d from the
transposed target spacing, strides = the network's deep-supervision strides, arch_kwargs rebuild the
network and its outputs match nnU-Net's deep-supervision scales), patch-size checks, memory model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pumit_seg.data.synthetic import LABELS, PhantomConfig, write_phantom_dataset
from pumit_seg.models.sac import aniso_d_from_spacing

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
    weights = tmp_path / "encoder.safetensors"
    weights.write_bytes(b"")
    plans = planner_factory(971, pretrained_weights=str(weights)).plan_experiment()
    for configuration in plans["configurations"].values():
        assert configuration["pumit_pretrained_weights"] == str(weights.resolve())
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        planner_factory(971, pretrained_weights=str(tmp_path / "missing.safetensors"))
