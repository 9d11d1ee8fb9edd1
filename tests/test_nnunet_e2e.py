"""End to end through nnU-Net's own command-line tools (subprocesses), 2d and 3d_fullres:

pumit_plan_and_preprocess -> nnUNetv2_train -tr PUMITTrainer_test -p PUMITPlans -> nnUNetv2_predict,
then: predictions have the reference geometry, and their foreground Dice beats an untrained network's.

Tiny on purpose (CPU, 2 cores): a tiny ViT, small conv widths, patch 8x64x64 at aniso_d 2, 250 iterations.
`test_nnunet_compat.py` reuses this module's plan and helpers for nnU-Net's cross-validation, best
configuration, ensembling and model-folder prediction.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pumit_seg.phantoms.abdomen import LABELS, PhantomConfig, write_phantom_dataset
from pumit_seg.trainers.nnunet_ext_dir import nnunet_environment

pytestmark = pytest.mark.e2e  # minutes on 2 CPU cores; `pytest -m "not e2e"` leaves them out

DATASET_ID = 961
DATASET_NAME = f"Dataset{DATASET_ID:03d}_E2EPhantoms"
TRAINER = "PUMITTrainer_test"
BIN = Path(sys.executable).parent
TINY_PLAN_ARGS = [
    "--model", "tiny",
    "--patch_size_3d", "8", "64", "64",
    "--patch_size_2d", "64", "64",
    "--decoder_channels", "16", "32", "32", "32",
    "--full_res_channels", "8", "16",
    "--batch_size", "2",
]  # fmt: skip


COMMAND_TIMEOUT_S = 600  # ~1 min each on an idle 2-core machine; generous for a shared, loaded one


def run(command: list[str], env: dict) -> str:
    # own process group: on a timeout, nnU-Net's data-augmentation workers die with the trainer
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result.stdout


def foreground_dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Mean Dice over the organ labels (nnU-Net's 'foreground_mean')."""
    scores = []
    for label in range(1, len(LABELS)):
        p, r = prediction == label, reference == label
        denominator = p.sum() + r.sum()
        scores.append(2.0 * np.logical_and(p, r).sum() / denominator if denominator else 1.0)
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_environment(root, cpu=True)  # also ignores a PUMIT_PRETRAINED_WEIGHTS of the shell
    config = PhantomConfig(shape=(16, 64, 64), spacing=(3.0, 0.75, 0.75))
    write_phantom_dataset(
        env["nnUNet_raw"], DATASET_ID, "E2EPhantoms", num_training=6, num_test=2, config=config, seed=3
    )
    run(
        [
            str(BIN / "pumit_plan_and_preprocess"),
            "-d",
            str(DATASET_ID),
            "-np",
            "1",
            "-npfp",
            "1",
            *TINY_PLAN_ARGS,
        ],
        env,
    )
    return root, env


def test_plans_written_by_our_planner(nnunet_env):
    root, _ = nnunet_env
    plans = json.loads((root / "nnUNet_preprocessed" / DATASET_NAME / "PUMITPlans.json").read_text())
    assert plans["experiment_planner_used"] == "PUMITPlanner"
    assert sorted(plans["configurations"]) == ["2d", "3d_fullres"]
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["aniso_d"] == 2  # 3 / 0.75 = 4
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [8, 64, 64]


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_train_predict_through_nnunet_cli(nnunet_env, configuration, tmp_path):
    root, env = nnunet_env
    run(
        [
            str(BIN / "nnUNetv2_train"),
            str(DATASET_ID),
            configuration,
            "0",
            "-tr",
            TRAINER,
            "-p",
            "PUMITPlans",
            "-device",
            "cpu",
        ],
        env,
    )
    model_folder = root / "nnUNet_results" / DATASET_NAME / f"{TRAINER}__PUMITPlans__{configuration}"
    assert (model_folder / "fold_0" / "checkpoint_final.pth").is_file()

    raw = root / "nnUNet_raw" / DATASET_NAME
    output = tmp_path / "predictions"
    run(
        [str(BIN / "nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(output), "-d", str(DATASET_ID),
         "-c", configuration, "-f", "0", "-tr", TRAINER, "-p", "PUMITPlans", "--disable_tta",
         "-npp", "1", "-nps", "1", "-device", "cpu"],
        env,
    )  # fmt: skip

    references = sorted((raw / "labelsTs").glob("*.nii.gz"))
    assert references and sorted(p.name for p in output.glob("*.nii.gz")) == [p.name for p in references]
    trained_dice, untrained_dice = [], []
    untrained = untrained_predictor(model_folder, configuration)
    for reference_file in references:
        reference = sitk.ReadImage(str(reference_file))
        prediction = sitk.ReadImage(str(output / reference_file.name))
        assert prediction.GetSize() == reference.GetSize()
        np.testing.assert_allclose(prediction.GetSpacing(), reference.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(prediction.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(prediction.GetDirection(), reference.GetDirection(), atol=1e-6)
        reference_array = sitk.GetArrayFromImage(reference)
        trained_dice.append(foreground_dice(sitk.GetArrayFromImage(prediction), reference_array))
        image_file = raw / "imagesTs" / reference_file.name.replace(".nii.gz", "_0000.nii.gz")
        untrained_dice.append(foreground_dice(untrained(image_file), reference_array))
    assert np.mean(trained_dice) > np.mean(untrained_dice) + 0.05, (trained_dice, untrained_dice)


def untrained_predictor(model_folder: Path, configuration: str):
    """Predict with a randomly initialised network of the same plans through nnU-Net's predictor."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from pumit_seg.trainers import PUMITTrainer_test

    plans_manager = PlansManager(str(model_folder / "plans.json"))
    configuration_manager = plans_manager.get_configuration(configuration)
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    label_manager = plans_manager.get_label_manager(dataset_json)
    torch.manual_seed(0)
    network = PUMITTrainer_test.build_network_architecture(
        plans_manager, configuration_manager, 1, label_manager.num_segmentation_heads, False
    )
    predictor = nnUNetPredictor(
        use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False
    )
    predictor.manual_initialization(
        network, plans_manager, configuration_manager, [network.state_dict()], dataset_json, TRAINER, None
    )

    def predict(image_file: Path) -> np.ndarray:
        image, properties = SimpleITKIO().read_images([str(image_file)])
        return predictor.predict_single_npy_array(image, properties)

    return predict
