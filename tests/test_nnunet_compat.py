"""nnU-Net's whole workflow with a PUMIT trainer, through nnU-Net's own command-line tools.

One test on a tiny phantom dataset (the plan of `test_nnunet_e2e.py`), a few iterations per fold
(`PUMITTrainer_smoke`): 5-fold cross-validation of 3d_fullres and two folds of 2d with ``--npz``,
``nnUNetv2_find_best_configuration`` (all folds of 3d_fullres, then 2d + 3d_fullres on folds 0 1 with
ensembling), ``nnUNetv2_predict`` and ``nnUNetv2_predict_from_modelfolder`` with probabilities,
``nnUNetv2_ensemble`` and ``nnUNetv2_apply_postprocessing`` as the printed inference instructions say.
On the way, nnU-Net's ``-pretrained_weights`` is given a PUMIT encoder file (fold 0) and an nnU-Net
checkpoint of a PUMIT model (fold 1): both must load, each by its own loader.

Minutes on 2 CPU cores (7 trainings): marked e2e, ``pytest -m "not e2e"`` leaves it out.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pumit_seg.phantoms.abdomen import PhantomConfig, write_phantom_dataset
from pumit_seg.trainers.nnunet_ext_dir import nnunet_environment

sys.path.insert(0, str(Path(__file__).parent))
from test_nnunet_e2e import BIN, TINY_PLAN_ARGS, run  # noqa: E402

DATASET_ID = 963
DATASET_NAME = f"Dataset{DATASET_ID:03d}_CompatPhantoms"
TRAINER = "PUMITTrainer_smoke"  # 2 epochs x 10 iterations: checks the wiring, learns next to nothing
PLANS = "PUMITPlans"
FOLDS = ["0", "1", "2", "3", "4"]
ENSEMBLE_FOLDS = ["0", "1"]
CPU_PREDICT = ["--disable_tta", "-npp", "1", "-nps", "1", "-device", "cpu"]


def train(env: dict, configuration: str, fold: str, *extra: str) -> str:
    return run(
        [str(BIN / "nnUNetv2_train"), str(DATASET_ID), configuration, fold, "-tr", TRAINER, "-p", PLANS,
         "-device", "cpu", "--npz", *extra],
        env,
    )  # fmt: skip


def model_folder(root: Path, configuration: str) -> Path:
    return root / "nnUNet_results" / DATASET_NAME / f"{TRAINER}__{PLANS}__{configuration}"


@pytest.mark.e2e
def test_cross_validation_best_configuration_ensemble_and_model_folder(tmp_path):
    from pumit_seg.models.vit import universal_vit_tiny
    from pumit_seg.weights import save_model

    root = tmp_path
    env = nnunet_environment(root, cpu=True)  # ignores a PUMIT_PRETRAINED_WEIGHTS of the shell
    write_phantom_dataset(
        env["nnUNet_raw"], DATASET_ID, "CompatPhantoms", num_training=5, num_test=2,
        config=PhantomConfig(shape=(16, 64, 64), spacing=(3.0, 0.75, 0.75)), seed=5,
    )  # fmt: skip
    run([str(BIN / "pumit_plan_and_preprocess"), "-d", str(DATASET_ID), "-np", "1", "-npfp", "1",
         *TINY_PLAN_ARGS], env)  # fmt: skip

    # 5-fold cross-validation; fold 0 from a PUMIT encoder file, fold 1 from fold 0's nnU-Net checkpoint,
    # both through nnU-Net's own -pretrained_weights
    torch.manual_seed(0)
    encoder_file = root / "encoder.safetensors"
    save_model(universal_vit_tiny(in_channels=1), encoder_file)
    train(env, "3d_fullres", "0", "-pretrained_weights", str(encoder_file))
    folder_3d = model_folder(root, "3d_fullres")
    log = "".join(p.read_text() for p in (folder_3d / "fold_0").glob("training_log_*.txt"))
    assert f"Pretrained encoder weights from {encoder_file} (nnUNetv2_train -pretrained_weights)" in log
    train(env, "3d_fullres", "1", "-pretrained_weights", str(folder_3d / "fold_0" / "checkpoint_final.pth"))
    for fold in FOLDS[2:]:
        train(env, "3d_fullres", fold)
    for fold in FOLDS:
        assert (folder_3d / f"fold_{fold}" / "validation" / "summary.json").is_file(), fold
    for fold in ENSEMBLE_FOLDS:
        train(env, "2d", fold)

    # the best configuration: 3d_fullres over all folds, then 2d + 3d_fullres with ensembling
    best = [str(BIN / "nnUNetv2_find_best_configuration"), str(DATASET_ID), "-tr", TRAINER, "-p", PLANS, "-np", "1"]
    run([*best, "-c", "3d_fullres"], env)
    assert (folder_3d / "crossval_results_folds_0_1_2_3_4" / "summary.json").is_file()
    run([*best, "-c", "2d", "3d_fullres", "-f", *ENSEMBLE_FOLDS], env)
    results = root / "nnUNet_results" / DATASET_NAME
    assert list((results / "ensembles").glob("ensemble___*___*___0_1/summary.json"))
    information = json.loads((results / "inference_information.json").read_text())
    postprocessing = information["best_model_or_ensemble"]["postprocessing_file"]
    plans_file = information["best_model_or_ensemble"]["some_plans_file"]

    # the printed inference: each member with probabilities (one from the model folder), ensemble, postprocess
    raw = root / "nnUNet_raw" / DATASET_NAME
    out_2d, out_3d, out_ensemble, out_pp = (root / name for name in ("pred_2d", "pred_3d", "ensemble", "pp"))
    run([str(BIN / "nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(out_2d), "-d", str(DATASET_ID),
         "-c", "2d", "-f", *ENSEMBLE_FOLDS, "-tr", TRAINER, "-p", PLANS, "--save_probabilities", *CPU_PREDICT], env)
    run([str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(raw / "imagesTs"), "-o", str(out_3d),
         "-m", str(folder_3d), "-f", *FOLDS, "--save_probabilities", *CPU_PREDICT], env)  # fmt: skip
    run([str(BIN / "nnUNetv2_ensemble"), "-i", str(out_2d), str(out_3d), "-o", str(out_ensemble), "-np", "1"], env)
    run([str(BIN / "nnUNetv2_apply_postprocessing"), "-i", str(out_ensemble), "-o", str(out_pp),
         "-pp_pkl_file", postprocessing, "-np", "1", "-plans_json", plans_file], env)  # fmt: skip

    labels = set(json.loads((raw / "dataset.json").read_text())["labels"].values())
    references = sorted((raw / "labelsTs").glob("*.nii.gz"))
    assert references
    for folder in (out_2d, out_3d, out_ensemble, out_pp):
        for reference_file in references:
            reference = sitk.ReadImage(str(reference_file))
            prediction = sitk.ReadImage(str(folder / reference_file.name))
            assert prediction.GetSize() == reference.GetSize(), folder
            np.testing.assert_allclose(prediction.GetSpacing(), reference.GetSpacing(), rtol=1e-5)
            assert set(np.unique(sitk.GetArrayFromImage(prediction)).tolist()) <= labels, folder


def test_nnunet_checkpoints_are_told_from_encoder_files(tmp_path):
    """What `-pretrained_weights` hands to nnU-Net's loader (nnU-Net checkpoints) and what to the encoder loader."""
    from safetensors.torch import save_file

    from pumit_seg.trainers.pumit_trainer import is_nnunet_checkpoint

    weights = {"blocks.0.weight": torch.zeros(2, 2)}
    torch.save({"network_weights": weights, "trainer_name": "PUMITTrainer"}, tmp_path / "checkpoint_final.pth")
    torch.save({"state_dict": weights}, tmp_path / "lightning.ckpt")
    save_file(weights, tmp_path / "encoder.safetensors")
    assert is_nnunet_checkpoint(str(tmp_path / "checkpoint_final.pth"))
    assert not is_nnunet_checkpoint(str(tmp_path / "lightning.ckpt"))
    assert not is_nnunet_checkpoint(str(tmp_path / "encoder.safetensors"))
