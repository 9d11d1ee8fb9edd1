"""`make demo`: the whole nnU-Net workflow with PUMIT on synthetic abdomen phantoms.

1. (if present) `pumit_seg.models.vit_demo`: one universal ViT on 2D images and volumes of different spacings;
2. write a phantom dataset (CT-like, 3 x 0.75 x 0.75 mm) in nnU-Net's raw layout;
3. ``pumit_plan_and_preprocess``: fingerprint, PUMIT plans (tiny ViT, small decoder), preprocessing;
4. ``nnUNetv2_train ... -tr PUMITTrainer_demo -p PUMITPlans`` (a few hundred iterations);
5. ``nnUNetv2_predict`` on the test cases;
6. per-organ Dice with nnU-Net's ``compute_metrics_on_folder``, and ``overlay.png``: the slice of a test
   case with the most foreground, reference and predicted organ contours side by side.

Everything goes under ``./demo_output`` (``nnUNet_raw``/``_preprocessed``/``_results`` are set for the
subprocesses only). The GPU is used when there is one; on CPU the run takes a few minutes on 2 cores.
The tiny ViT starts from random initialisation: the demo shows the pipeline, not PUMIT's accuracy.

    python -m pumit_seg.demo [--output demo_output]
"""

import argparse
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pumit_seg.atomic import atomic_path
from pumit_seg.data.synthetic import LABELS, PhantomConfig, write_phantom_dataset
from pumit_seg.nnunet_ext_dir import nnunet_environment

DATASET_ID = 990
DATASET_NAME = "DemoPhantoms"
CONFIGURATION = "3d_fullres"
TRAINER = "PUMITTrainer_demo"
PHANTOMS = PhantomConfig(shape=(24, 80, 80), spacing=(3.0, 0.75, 0.75))
NUM_TRAINING, NUM_TEST = 10, 3
# A small plan that trains in minutes on 2 CPU cores: patch 16 x 64 x 64 at aniso_d 2.
PLAN_ARGS = [
    "--model", "tiny",
    "--patch_size_3d", "16", "64", "64",
    "--decoder_channels", "16", "32", "32", "32",
    "--full_res_channels", "8", "16",
    "--batch_size", "2",
]  # fmt: skip


def console_script(name: str) -> str:
    """A console script of this environment (beside the running interpreter), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"console script {name} not found beside {sys.executable} nor on PATH")
    return found


def run_step(title: str, command: list[str], env: dict, log_file: Path) -> None:
    """Run one pipeline step, its output going to `log_file`; on failure show the log's tail."""
    print(
        f"\n== {title}\n   $ {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(command))}",
        flush=True,
    )
    start = time.time()
    with open(log_file, "w") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log_file.read_text()[-5000:]
        raise RuntimeError(f"{title} failed (exit code {result.returncode}); log {log_file}:\n{tail}")
    print(f"   done in {time.time() - start:.0f} s (log: {log_file})", flush=True)


def save_overlay(
    image_file: Path, reference_file: Path, prediction_file: Path, output_png: Path, dice: dict
) -> None:
    """The slice with the most reference foreground: image, reference and prediction contours."""
    import matplotlib
    import matplotlib.lines

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_file)))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_file)))
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_file)))
    z = int(np.argmax((reference > 0).sum(axis=(1, 2))))
    names = {v: k for k, v in LABELS.items()}

    colours = plt.cm.tab10(np.arange(len(LABELS)))
    figure, axes = plt.subplots(1, 2, figsize=(10, 5.6))
    for axis, labels, title in [(axes[0], reference, "reference"), (axes[1], prediction, "PUMIT prediction")]:
        axis.imshow(image[z], cmap="gray", vmin=-250, vmax=350)
        for value in range(1, len(LABELS)):
            if (labels[z] == value).any():
                axis.contour(labels[z] == value, levels=[0.5], colors=[colours[value]], linewidths=1.5)
        axis.set_title(f"{title}, slice {z}")
        axis.axis("off")
    handles = [
        matplotlib.lines.Line2D([], [], color=colours[v], label=f"{names[v]} (Dice {dice[v]:.2f})")
        for v in sorted(dice)
    ]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    figure.suptitle(
        f"{image_file.name.replace('_0000.nii.gz', '')}: synthetic CT phantom, PUMIT (tiny ViT) in nnU-Net"
    )
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic_path(output_png) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)


def run_phantom_demo(output_dir: str = "demo_output") -> dict:
    """Run steps 2-6 under `output_dir`; returns nnU-Net's metrics dict of the test predictions."""
    import torch
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    root = Path(output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    on_gpu = torch.cuda.is_available()
    env = nnunet_environment(root, cpu=not on_gpu)  # the demo trains from scratch: no pretrained weights
    device = [] if on_gpu else ["-device", "cpu"]
    print(f"pumit-seg demo: output in {root}, device {'cuda' if on_gpu else 'cpu'}")

    dataset_folder = Path(
        write_phantom_dataset(
            env["nnUNet_raw"],
            DATASET_ID,
            DATASET_NAME,
            NUM_TRAINING,
            NUM_TEST,
            PHANTOMS,
            seed=0,
            overwrite=True,
        )
    )
    print(
        f"\n== phantoms: {NUM_TRAINING} training + {NUM_TEST} test cases, spacing {PHANTOMS.spacing} mm -> {dataset_folder}"
    )
    for stale in (root / "nnUNet_results" / dataset_folder.name, root / "predictions"):
        shutil.rmtree(stale, ignore_errors=True)  # a previous run's model would be continued / mixed in

    run_step(
        "plan and preprocess (PUMITPlans)",
        [
            console_script("pumit_plan_and_preprocess"),
            "-d",
            str(DATASET_ID),
            "-c",
            CONFIGURATION,
            "-np",
            "1",
            "-npfp",
            "1",
            "--clean",
            *PLAN_ARGS,
        ],
        env,
        logs / "plan_and_preprocess.log",
    )
    run_step(
        f"train ({TRAINER})",
        [
            console_script("nnUNetv2_train"),
            str(DATASET_ID),
            CONFIGURATION,
            "0",
            "-tr",
            TRAINER,
            "-p",
            "PUMITPlans",
            *device,
        ],
        env,
        logs / "train.log",
    )
    predictions = root / "predictions"
    run_step(
        "predict the test cases",
        [console_script("nnUNetv2_predict"), "-i", str(dataset_folder / "imagesTs"), "-o", str(predictions),
         "-d", str(DATASET_ID), "-c", CONFIGURATION, "-f", "0", "-tr", TRAINER, "-p", "PUMITPlans",
         "-npp", "1", "-nps", "1", *([] if on_gpu else ["--disable_tta"]), *device],
        env,
        logs / "predict.log",
    )  # fmt: skip

    organ_labels = [v for v in LABELS.values() if v > 0]
    metrics = compute_metrics_on_folder(
        str(dataset_folder / "labelsTs"),
        str(predictions),
        str(predictions / "summary.json"),
        SimpleITKIO(),
        ".nii.gz",
        organ_labels,
        num_processes=1,
    )
    names = {v: k for k, v in LABELS.items()}
    print("\n== Dice on the test cases (nnU-Net's compute_metrics_on_folder)")
    for label in organ_labels:
        print(f"   {names[label]:<8} {metrics['mean'][label]['Dice']:.3f}")
    print(f"   {'mean':<8} {metrics['foreground_mean']['Dice']:.3f}")

    first = metrics["metric_per_case"][0]
    reference_file = Path(first["reference_file"])
    case_dice = {label: first["metrics"][label]["Dice"] for label in organ_labels}
    overlay = root / "overlay.png"
    save_overlay(
        dataset_folder / "imagesTs" / reference_file.name.replace(".nii.gz", "_0000.nii.gz"),
        reference_file,
        Path(first["prediction_file"]),
        overlay,
        case_dice,
    )
    print(f"\noverlay of a test case: {overlay}\nsummary: {predictions / 'summary.json'}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="PUMIT + nnU-Net demo on synthetic abdomen phantoms.")
    parser.add_argument("--output", default="demo_output", help="output folder (default: ./demo_output)")
    args = parser.parse_args(argv)
    start = time.time()
    if importlib.util.find_spec("pumit_seg.models.vit_demo") is not None:
        from pumit_seg.models.vit_demo import run_vit_demo

        print("== universal ViT on images of different spacings")
        run_vit_demo()
    run_phantom_demo(args.output)
    print(f"\ndemo finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
