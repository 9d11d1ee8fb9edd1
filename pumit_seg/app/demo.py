"""`pumit_demo` (what `make demo` runs): PUMIT from pre-training to a CHAOS submission, with a report.

Every step runs the console command a user would type, printed before it runs, with its output passed
through live (progress bars, nnU-Net's epoch lines) and kept in ``OUTPUT/logs/``:

1. pre-training: a heterogeneous phantom corpus (2D and 3D, several spacings, CT- and MR-like, grey and
   RGB, as files), ``pumit_pretrain prepare``, ``pumit_pretrain tokenizer`` and ``pumit_pretrain mim``
   (tiny presets), ``pumit_pretrain export`` of the encoder;
2. segmentation: a phantom dataset in nnU-Net's raw layout (``pumit_make_phantoms``),
   ``pumit_plan_and_preprocess``, ``nnUNetv2_train`` from the MIM encoder and from scratch on the same
   budget, ``nnUNetv2_predict`` and ``pumit_evaluate`` for both;
3. CHAOS: a synthetic CHAOS-layout MR set (DICOM series + ground-truth PNGs), ``pumit_chaos convert``,
   plan, train, predict, ``pumit_chaos export`` to a submission zip, ``pumit_chaos score``;
4. the report: ``OUTPUT/report.html`` (``python -m pumit_seg.app.report OUTPUT``).

Resume: a step that finished writes ``OUTPUT/steps/<step>.json`` (command, wall time) atomically; run
the demo again and finished steps are skipped, an interrupted training continues from its checkpoint.
A step whose command is not part of this installation yet is reported as not available (never faked)
and the steps that need its output are skipped. The GPU is used when there is one.

The pre-trained and the scratch model use the same trainer class (the same budget) and differ only in
``PUMIT_PRETRAINED_WEIGHTS`` (the encoder file, or empty for random initialisation); each writes into
its own ``nnUNet_results`` folder, as nnU-Net names results folders by trainer and plans only.

    pumit_demo [--output demo_output] [--setting demo|smallest]
    pumit_demo --encoder my_encoder.safetensors --seg_dataset $nnUNet_raw/Dataset501_X \\
               --chaos_train CHAOS/Train_Sets --chaos_test CHAOS/Test_Sets --plan_args "--model base"
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pumit_seg.atomic import write_json_atomic
from pumit_seg.cli_checks import check_output_path, exit_on_bad_input
from pumit_seg.trainers.nnunet_ext_dir import nnunet_environment

CONFIGURATION = "3d_fullres"
PLANS = "PUMITPlans"
FOLD = "0"
SEG_DATASET_ID = 990
SEG_DATASET_NAME = "DemoPhantoms"
CHAOS_SEQUENCE = "T2SPIR"  # the CHAOS MR sequence the demo trains on (one channel)
CHAOS_DATASET_ID = 302  # pumit_chaos convert's default id for T2SPIR
STEPS_FOLDER = "steps"  # markers of finished steps
LOGS_FOLDER = "logs"
PRETRAIN_MODULES = {
    "prepare": "pumit_seg.data.prepare",
    "tokenizer": "pumit_seg.trainers.tokenizer_trainer",
    "mim": "pumit_seg.trainers.mim_trainer",
    "export": "pumit_seg.trainers.export",
}
CORPUS_MODULE = "pumit_seg.phantoms.pretrain"
MIM_ENCODER_NAME = "encoder.safetensors"  # what `pumit_pretrain mim` exports into its run folder
PRETRAIN_LOG_ROWS = 25  # rows of log.csv per pre-training run (the loss curves' points)
PRETRAIN_VALIDATIONS = 2  # validations (pictures, codebook health) and checkpoints per run
# the tokenizer's first stage (reconstruction alone, then the soft-token regularisers): half its steps,
# measured to keep its reconstructions tied to their inputs (docs/pretraining_recipe.md)
TOKENIZER_RECONSTRUCTION_SHARE = 0.5
PARTS = ("pre-training", "segmentation", "CHAOS", "report")

# Expected wall time of each part in minutes: the one place the banner, the report and docs/demo.md take
# them from. "cpu": the whole run measured on an idle 2-core CPU machine (no GPU) and split by part
# from the step times; a machine shared with other jobs takes several times as long (docs/demo.md,
# "How long it takes"). "gpu": an estimate, not a measurement: the tiny networks leave process
# start-up, data loading and nnU-Net's validation.
# On a CPU the three nnU-Net trainings dominate (about 4 s per epoch of 25 iterations each).
EXPECTED_MINUTES = {
    "demo": {
        "cpu": {"pre-training": 2.5, "segmentation": 3.9, "CHAOS": 1.9, "report": 0.1},
        "gpu": {"pre-training": 0.5, "segmentation": 2.0, "CHAOS": 1.5, "report": 0.5},
    },
    "smallest": {
        "cpu": {"pre-training": 0.3, "segmentation": 1.5, "CHAOS": 0.7, "report": 0.1},
        "gpu": {"pre-training": 0.3, "segmentation": 1.0, "CHAOS": 0.6, "report": 0.1},
    },
}
SLOW_MACHINE_FACTOR = 6  # the most a busy shared 2-core machine was seen to take, against an idle one


def expected_minutes(setting: str, device: str) -> float:
    """Expected wall time of a whole demo run of `setting` on `device` ("cpu" or "gpu"), in minutes."""
    return sum(EXPECTED_MINUTES[setting][device].values())


def expected_time_text(setting: str, device: str) -> str:
    """One line for the banner and the report: total, the parts, and what a busy machine does."""
    parts = EXPECTED_MINUTES[setting][device]
    total = expected_minutes(setting, device)
    if device == "cpu":
        where, basis = "2 idle CPU cores", "the total measured, its split by part estimated"
        busy = f"; a machine busy with other jobs can take up to {SLOW_MACHINE_FACTOR}x as long"
    else:
        where, basis, busy = "a GPU", "an estimate, not measured", ""
    return (
        f"about {total:g} minutes on {where} ({basis}: "
        + ", ".join(f"{part} {minutes:g}" for part, minutes in parts.items())
        + f" min){busy}"
    )


@dataclass(frozen=True)
class DemoSetting:
    """Sizes of one demo setting. Every number the demo uses lives here."""

    description: str
    # pre-training
    corpus_args: tuple[str, ...]  # extra flags of the corpus generator
    tokenizer_steps: int
    mim_steps: int
    pretrain_batch_size: int
    # segmentation phantoms (pumit_make_phantoms)
    seg_shape: tuple[int, int, int]
    seg_spacing: tuple[float, float, float]
    seg_num_train: int
    seg_num_test: int
    seg_plan_args: tuple[str, ...]
    trainer: str  # the same class (the same budget) for the pre-trained and the scratch model
    # CHAOS phantoms
    chaos_num_train: int
    chaos_num_test: int
    chaos_shape: tuple[int, int, int]
    chaos_plan_args: tuple[str, ...]


# A small plan that trains in minutes on 2 CPU cores: tiny ViT, small decoder.
_TINY_NETWORK = (
    "--model", "tiny",
    "--decoder_channels", "16", "32", "32", "32",
    "--full_res_channels", "8", "16",
    "--batch_size", "2",
)  # fmt: skip

SETTINGS = {
    "demo": DemoSetting(
        description="what `make demo` runs",
        corpus_args=(),
        tokenizer_steps=8000,  # 4000 on reconstruction alone, then the regularisers: about 2.5 minutes
        mim_steps=1600,  # masked-token accuracy 0.43 against 0.16 for the majority code (docs/pretraining_recipe.md)
        pretrain_batch_size=4,
        seg_shape=(24, 80, 80),
        seg_spacing=(3.0, 0.75, 0.75),
        seg_num_train=10,
        seg_num_test=3,
        seg_plan_args=(*_TINY_NETWORK, "--patch_size_3d", "8", "64", "64"),
        trainer="PUMITTrainer_demo",
        chaos_num_train=6,
        chaos_num_test=2,
        chaos_shape=(20, 72, 72),
        chaos_plan_args=(*_TINY_NETWORK, "--patch_size_3d", "8", "64", "64"),
    ),
    "smallest": DemoSetting(
        description="every step on the least data (the CI test)",
        corpus_args=(),
        tokenizer_steps=10,
        mim_steps=10,
        pretrain_batch_size=2,
        seg_shape=(16, 48, 48),
        seg_spacing=(3.0, 0.75, 0.75),
        seg_num_train=5,  # nnU-Net's 5-fold split needs 5 cases
        seg_num_test=2,
        # the smallest patch PUMITSegNet takes: two voxels at its 1/32 level (aniso_d 2 pools depth by 8)
        seg_plan_args=(*_TINY_NETWORK, "--patch_size_3d", "16", "32", "32"),
        trainer="PUMITTrainer_smoke",
        chaos_num_train=5,
        chaos_num_test=1,
        chaos_shape=(16, 48, 48),
        chaos_plan_args=(*_TINY_NETWORK, "--patch_size_3d", "16", "32", "32"),
    ),
}


@dataclass
class Step:
    """One command of the demo. `env` holds the variables shown in front of the command."""

    key: str  # file name of the marker, unique
    part: str  # "pre-training", "segmentation", "CHAOS" or "report"
    title: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    requires: list[str] = field(default_factory=list)  # keys of steps whose output this one reads
    unavailable: str | None = None  # why the command does not exist in this installation yet
    continue_flag_if: Path | None = None  # nnUNetv2_train: pass --c when this folder holds a checkpoint
    # a run folder the command resumes by itself (pre-training): emptied when the step is invalidated, so a
    # changed command (e.g. after an update of the demo) starts afresh instead of meeting an older run
    fresh_folder_if_invalidated: Path | None = None

    def display(self) -> str:
        """The command as a user types it: variables first, console scripts by name."""
        words = [Path(self.command[0]).name, *self.command[1:]]
        if words[0] == Path(sys.executable).name:
            words[0] = "python"
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + shlex.join(words)


# ------------------------------------------------------------------------------------------ helpers


def console_script(name: str) -> str:
    """A console script of this environment (beside the running interpreter), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"console script {name} not found beside {sys.executable} nor on PATH")
    return found


def module_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def marker_path(root: Path, key: str) -> Path:
    return root / STEPS_FOLDER / f"{key}.json"


def read_marker(root: Path, key: str) -> dict | None:
    path = marker_path(root, key)
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # a marker is written atomically; an unreadable one means the step is rerun


def has_checkpoint(folder: Path) -> bool:
    return any(
        (folder / name).is_file()
        for name in ("checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth")
    )


def stream_command(command: list[str], env: dict, log_file: Path, quiet: bool) -> int:
    """Run `command`, passing its output (stdout and stderr) through live and into `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = getattr(sys.stdout, "buffer", None)
        while chunk := os.read(process.stdout.fileno(), 65536):
            log.write(chunk)
            if not quiet and out is not None:
                out.write(chunk)
                out.flush()
        process.stdout.close()
        return process.wait()


# ------------------------------------------------------------------------------------------ steps


def pretrain_flags(max_steps: int, batch_size: int) -> list[str]:
    """A short pre-training run: a few log rows and validations (pictures, health) and checkpoints."""
    return [
        "--max-steps", str(max_steps),
        "--batch-size", str(batch_size),
        "--log-every", str(max(max_steps // PRETRAIN_LOG_ROWS, 1)),
        "--val-every", str(max(max_steps // PRETRAIN_VALIDATIONS, 1)),
        "--ckpt-every", str(max(max_steps // PRETRAIN_VALIDATIONS, 1)),
    ]  # fmt: skip


@dataclass
class DemoInputs:
    """Where the data comes from: built-in phantoms unless the user names their own folders."""

    pretrain_config: str | None = None  # a `pumit_pretrain prepare` config of the user's images
    encoder: str | None = None  # ready encoder weights: skips pre-training
    seg_dataset: str | None = None  # an nnU-Net raw dataset folder DatasetXXX_Name (imagesTs, labelsTs)
    chaos_train: str | None = None
    chaos_test: str | None = None
    chaos_reference: str | None = None  # test cases with Ground folders, for a local score
    plan_args: list[str] | None = None  # replaces the setting's plan flags (user data needs other patches)
    parts: tuple[str, ...] = ("pretrain", "segmentation", "chaos")


def _dataset_id_of(folder: str) -> int:
    name = Path(folder).name
    if not (name.startswith("Dataset") and name[7:10].isdigit() and name[10:11] == "_"):
        raise ValueError(
            f"--seg_dataset {folder}: expected an nnU-Net raw dataset folder named DatasetXXX_Name"
        )
    return int(name[7:10])


def build_steps(
    root: Path, setting: DemoSetting, inputs: DemoInputs, on_gpu: bool
) -> tuple[list[Step], dict]:
    """The demo's commands in order, and the paths of what they write (for the report).

    Paths are relative to the working directory when `root` is.
    """
    python = sys.executable
    steps: list[Step] = []
    paths: dict[str, str] = {}
    pretrain = root / "pretrain"
    nnunet_device = [] if on_gpu else ["-device", "cpu"]

    # -------------------------------------------------------------------- pre-training
    encoder = inputs.encoder
    if "pretrain" in inputs.parts and encoder is None:
        missing = {name: module for name, module in PRETRAIN_MODULES.items() if not module_available(module)}

        def unavailable(name: str) -> str | None:
            return (
                f"{PRETRAIN_MODULES[name]} is not part of this installation yet" if name in missing else None
            )

        config = inputs.pretrain_config
        if config is None:
            config = str(pretrain / "corpus" / "datasets.json")
            steps.append(
                Step(
                    "pretrain_corpus",
                    "pre-training",
                    "write a heterogeneous pre-training corpus of phantoms (2D/3D, CT/MR, grey/RGB, several spacings)",
                    [
                        python,
                        "-m",
                        CORPUS_MODULE,
                        "-o",
                        str(pretrain / "corpus"),
                        "--overwrite",
                        *setting.corpus_args,
                    ],
                    unavailable=None
                    if module_available(CORPUS_MODULE)
                    else f"{CORPUS_MODULE} is not part of this installation yet",
                )
            )
        store = str(pretrain / "store")
        paths["store"] = store
        steps.append(
            Step(
                "pretrain_prepare",
                "pre-training",
                "turn the images into a pre-training store",
                [console_script("pumit_pretrain"), "prepare", config, "-o", store],
                requires=["pretrain_corpus"] if inputs.pretrain_config is None else [],
                unavailable=unavailable("prepare"),
            )
        )
        tokenizer_run = str(pretrain / "tokenizer")
        paths["tokenizer_run"] = tokenizer_run
        steps.append(
            Step(
                "pretrain_tokenizer",
                "pre-training",
                "pre-train the universal visual tokenizer (tiny preset)",
                [console_script("pumit_pretrain"), "tokenizer", "--store", store, "-o", tokenizer_run,
                 "--preset", "tiny", *pretrain_flags(setting.tokenizer_steps, setting.pretrain_batch_size),
                 "--reconstruction-steps", str(int(setting.tokenizer_steps * TOKENIZER_RECONSTRUCTION_SHARE))],
                requires=["pretrain_prepare"],
                unavailable=unavailable("tokenizer"),
                fresh_folder_if_invalidated=Path(tokenizer_run),
            )
        )  # fmt: skip
        mim_run = str(pretrain / "mim")
        paths["mim_run"] = mim_run
        steps.append(
            Step(
                "pretrain_mim",
                "pre-training",
                "masked image modelling of the universal ViT (tiny preset)",
                [console_script("pumit_pretrain"), "mim", "--store", store,
                 "--tokenizer", str(Path(tokenizer_run) / "tokenizer.safetensors"), "-o", mim_run,
                 "--preset", "tiny", *pretrain_flags(setting.mim_steps, setting.pretrain_batch_size)],
                requires=["pretrain_tokenizer"],
                unavailable=unavailable("mim"),
                fresh_folder_if_invalidated=Path(mim_run),
            )
        )  # fmt: skip
        encoder = str(pretrain / "encoder.safetensors")
        steps.append(
            Step(
                "pretrain_export",
                "pre-training",
                "export the encoder for fine-tuning",
                [
                    console_script("pumit_pretrain"),
                    "export",
                    str(Path(mim_run) / "checkpoint_last.pt"),
                    "-o",
                    encoder,
                    "--overwrite",  # the file of an earlier run: this step runs again when the MIM run did
                ],
                requires=["pretrain_mim"],
                unavailable=unavailable("export"),
            )
        )
        encoder_steps = ["pretrain_export"]
        if "export" in missing:
            # `pumit_pretrain mim` exports the encoder at its end too: fine-tune from that file
            encoder, encoder_steps = str(Path(mim_run) / MIM_ENCODER_NAME), ["pretrain_mim"]
        paths["encoder"] = encoder
    else:
        encoder_steps = []

    # -------------------------------------------------------------------- segmentation
    if "segmentation" in inputs.parts:
        if inputs.seg_dataset is None:
            dataset_id = SEG_DATASET_ID
            raw = root / "nnUNet_raw"
            dataset = raw / f"Dataset{dataset_id:03d}_{SEG_DATASET_NAME}"
            steps.append(
                Step(
                    "seg_phantoms",
                    "segmentation",
                    "write a phantom segmentation dataset in nnU-Net's raw layout",
                    [console_script("pumit_make_phantoms"), "-o", str(raw), "-d", str(dataset_id),
                     "--name", SEG_DATASET_NAME, "--num_train", str(setting.seg_num_train),
                     "--num_test", str(setting.seg_num_test), "--shape", *map(str, setting.seg_shape),
                     "--spacing", *map(str, setting.seg_spacing), "--overwrite"],
                )
            )  # fmt: skip
            data_steps = ["seg_phantoms"]
        else:
            dataset_id, dataset, data_steps = _dataset_id_of(inputs.seg_dataset), Path(inputs.seg_dataset), []
        paths["seg_dataset"] = str(dataset)
        plan_args = inputs.plan_args if inputs.plan_args is not None else list(setting.seg_plan_args)
        steps.append(
            Step(
                "seg_plan",
                "segmentation",
                "fingerprint, PUMIT plans and preprocessing",
                [console_script("pumit_plan_and_preprocess"), "-d", str(dataset_id), "-c", CONFIGURATION,
                 "-np", "1", "-npfp", "1", "--clean", *plan_args],
                requires=data_steps,
            )
        )  # fmt: skip
        arms = {"pretrained": (encoder, encoder_steps), "scratch": ("", [])}
        for arm, (weights, weight_steps) in arms.items():
            if weights is None:
                continue  # no pre-training part and no --encoder: nothing to compare with
            results = root / f"nnUNet_results_{arm}"
            fold_folder = (
                results / dataset.name / f"{setting.trainer}__{PLANS}__{CONFIGURATION}" / f"fold_{FOLD}"
            )
            arm_env = {"nnUNet_results": str(results), "PUMIT_PRETRAINED_WEIGHTS": weights}
            paths[f"seg_fold_{arm}"] = str(fold_folder)
            steps.append(
                Step(
                    f"seg_train_{arm}",
                    "segmentation",
                    f"fine-tune from the MIM encoder ({setting.trainer})"
                    if arm == "pretrained"
                    else f"train from scratch on the same budget ({setting.trainer}, no pretrained weights)",
                    [console_script("nnUNetv2_train"), str(dataset_id), CONFIGURATION, FOLD,
                     "-tr", setting.trainer, "-p", PLANS, *nnunet_device],
                    env=arm_env,
                    requires=["seg_plan", *weight_steps],
                    continue_flag_if=fold_folder,
                )
            )  # fmt: skip
            predictions = root / "segmentation" / f"predictions_{arm}"
            paths[f"seg_predictions_{arm}"] = str(predictions)
            steps.append(
                Step(
                    f"seg_predict_{arm}",
                    "segmentation",
                    f"predict the test cases ({arm})",
                    [console_script("nnUNetv2_predict"), "-i", str(dataset / "imagesTs"), "-o", str(predictions),
                     "-d", str(dataset_id), "-c", CONFIGURATION, "-f", FOLD, "-tr", setting.trainer, "-p", PLANS,
                     "-npp", "1", "-nps", "1", *([] if on_gpu else ["--disable_tta"]), *nnunet_device],
                    env={"nnUNet_results": str(results)},
                    requires=[f"seg_train_{arm}"],
                )
            )  # fmt: skip
            if inputs.seg_dataset is None or (dataset / "labelsTs").is_dir():
                steps.append(
                    Step(
                        f"seg_evaluate_{arm}",
                        "segmentation",
                        f"Dice, ASSD, HD, HD95 per organ ({arm})",
                        [console_script("pumit_evaluate"), str(dataset / "labelsTs"), str(predictions),
                         "-djfile", str(dataset / "dataset.json"), "-o", str(predictions / "summary.json"),
                         "--convention", "monai", "--overwrite"],  # a re-run replaces its own summary
                        requires=[f"seg_predict_{arm}"],
                    )
                )  # fmt: skip

    # -------------------------------------------------------------------- CHAOS
    if "chaos" in inputs.parts:
        chaos = root / "chaos"
        raw = root / "nnUNet_raw"
        if inputs.chaos_train is None:
            sets = chaos / "sets"
            steps.append(
                Step(
                    "chaos_phantoms",
                    "CHAOS",
                    "write a synthetic CHAOS-layout MR set (DICOM series + ground-truth PNGs)",
                    [python, "-m", "pumit_seg.phantoms.chaos", str(sets),
                     "--num_train", str(setting.chaos_num_train), "--num_test", str(setting.chaos_num_test),
                     "--shape", *map(str, setting.chaos_shape)],
                )
            )  # fmt: skip
            train_set, test_set = str(sets / "Train_Sets"), str(sets / "Test_Sets")
            reference_set: str | None = str(sets / "Test_Sets_reference")
            data_steps = ["chaos_phantoms"]
        else:
            train_set, test_set, reference_set = inputs.chaos_train, inputs.chaos_test, inputs.chaos_reference
            data_steps = []
        dataset = raw / f"Dataset{CHAOS_DATASET_ID:03d}_CHAOS_MR_{CHAOS_SEQUENCE}"
        steps.append(
            Step(
                "chaos_convert_train",
                "CHAOS",
                "convert the CHAOS training set to nnU-Net datasets",
                [console_script("pumit_chaos"), "convert", train_set, str(raw)],
                requires=data_steps,
            )
        )
        if test_set is not None:
            steps.append(
                Step(
                    "chaos_convert_test",
                    "CHAOS",
                    "convert the CHAOS test set (imagesTs of the same datasets)",
                    [console_script("pumit_chaos"), "convert", test_set, str(raw)],
                    requires=["chaos_convert_train"],
                )
            )
        plan_args = inputs.plan_args if inputs.plan_args is not None else list(setting.chaos_plan_args)
        steps.append(
            Step(
                "chaos_plan",
                "CHAOS",
                f"plan and preprocess CHAOS MR {CHAOS_SEQUENCE}",
                [console_script("pumit_plan_and_preprocess"), "-d", str(CHAOS_DATASET_ID), "-c", CONFIGURATION,
                 "-np", "1", "-npfp", "1", "--clean", *plan_args],
                requires=["chaos_convert_train"],
            )
        )  # fmt: skip
        results = root / "nnUNet_results_chaos"
        fold_folder = results / dataset.name / f"{setting.trainer}__{PLANS}__{CONFIGURATION}" / f"fold_{FOLD}"
        paths["chaos_fold"] = str(fold_folder)
        steps.append(
            Step(
                "chaos_train",
                "CHAOS",
                f"train on CHAOS MR {CHAOS_SEQUENCE} ({setting.trainer}, "
                + ("from the MIM encoder)" if encoder else "from scratch: no encoder)"),
                [console_script("nnUNetv2_train"), str(CHAOS_DATASET_ID), CONFIGURATION, FOLD,
                 "-tr", setting.trainer, "-p", PLANS, *nnunet_device],
                env={"nnUNet_results": str(results), "PUMIT_PRETRAINED_WEIGHTS": encoder or ""},
                requires=["chaos_plan", *encoder_steps],
                continue_flag_if=fold_folder,
            )
        )  # fmt: skip
        if test_set is not None:
            predictions = chaos / "predictions"
            paths.update(chaos_submission=str(chaos / "submission"), chaos_zip=str(chaos / "submission.zip"))
            steps.append(
                Step(
                    "chaos_predict",
                    "CHAOS",
                    "predict the CHAOS test cases",
                    [console_script("nnUNetv2_predict"), "-i", str(dataset / "imagesTs"), "-o", str(predictions),
                     "-d", str(CHAOS_DATASET_ID), "-c", CONFIGURATION, "-f", FOLD, "-tr", setting.trainer,
                     "-p", PLANS, "-npp", "1", "-nps", "1", *([] if on_gpu else ["--disable_tta"]), *nnunet_device],
                    env={"nnUNet_results": str(results)},
                    requires=["chaos_train", "chaos_convert_test"],
                )
            )  # fmt: skip
            steps.append(
                Step(
                    "chaos_export",
                    "CHAOS",
                    "export the predictions as a CHAOS submission (Task folders + zip)",
                    [console_script("pumit_chaos"), "export", str(chaos / "submission"),
                     "--pred", str(dataset), str(predictions), "--zip", str(chaos / "submission.zip"), "--overwrite"],
                    requires=["chaos_predict"],
                )
            )  # fmt: skip
            if reference_set is not None:
                paths.update(chaos_reference=reference_set, chaos_scores=str(chaos / "scores.json"))
                steps.append(
                    Step(
                        "chaos_score",
                        "CHAOS",
                        "score the submission with the official CHAOS metrics",
                        [console_script("pumit_chaos"), "score", str(chaos / "submission"), reference_set,
                         "-o", str(chaos / "scores.json"), "--overwrite",
                         "--allow_missing"],  # the demo trains on one sequence: the other has no results
                        requires=["chaos_export"],
                    )
                )  # fmt: skip

    steps.append(
        Step("report", "report", "write the HTML report", [python, "-m", "pumit_seg.app.report", str(root)])
    )
    return steps, paths


# ------------------------------------------------------------------------------------------ running


def write_report_after_failure(root: Path) -> None:
    """The report of what finished, so a failed run still shows where it stopped (best effort)."""
    from pumit_seg.app.report import build_report

    try:
        print(f"report of the steps so far: {build_report(root)}", flush=True)
    except Exception as error:  # the step's own failure is what the user must see
        print(f"(no report: {error})", flush=True)


def run_steps(steps: list[Step], root: Path, base_env: dict, quiet: bool = False) -> list[dict]:
    """Run the steps in order; returns one record per step (also in ``steps.json``).

    A step is skipped when its marker records the same command and none of the steps it needs ran in
    this invocation (as make does). A step without a marker whose inputs are unchanged was interrupted:
    a training then continues from its checkpoint (``--c``); an invalidated one starts afresh.
    """
    records, done, ran = [], set(), set()
    for step in steps:
        planned = step.display()  # what the marker records (without a --c added for an interrupted run)
        record = {"key": step.key, "part": step.part, "title": step.title, "command": planned}
        marker = read_marker(root, step.key)
        started = read_marker(root, f"{step.key}.started")  # the command of the last attempt, finished or not
        blocked = [key for key in step.requires if key not in done]
        invalidated = (
            (marker is not None and marker.get("command") != planned)
            or (marker is None and started is not None and started.get("command") != planned)
            or any(key in ran for key in step.requires)
        )
        if step.key == "report" or invalidated:
            marker = None  # the report always reflects the latest state; an invalidated step reruns
        if marker is not None:
            record.update(status="done", wall_s=marker["wall_s"], resumed=True)
            print(
                f"\n== {step.title}\n   $ {step.display()}\n   already done ({marker['wall_s']:.0f} s), skipped",
                flush=True,
            )
            done.add(step.key)
        elif step.unavailable:
            record.update(status="not available", reason=step.unavailable)
            print(
                f"\n== {step.title}\n   $ {step.display()}\n   NOT AVAILABLE: {step.unavailable}", flush=True
            )
        elif blocked:
            record.update(status="skipped", reason=f"needs {', '.join(blocked)}")
            print(f"\n== {step.title}\n   skipped: needs {', '.join(blocked)}", flush=True)
        else:
            marker_path(root, step.key).unlink(missing_ok=True)  # until this run of the step succeeds
            if invalidated and step.fresh_folder_if_invalidated is not None:
                shutil.rmtree(step.fresh_folder_if_invalidated, ignore_errors=True)
            write_json_atomic(marker_path(root, f"{step.key}.started"), {"command": planned})
            command = list(step.command)
            interrupted = not invalidated and step.continue_flag_if is not None
            if interrupted and has_checkpoint(step.continue_flag_if):
                command.append("--c")  # nnU-Net continues an interrupted training from its checkpoint
                step = Step(**{**asdict(step), "command": command})
                record["command"] = step.display()
            print(f"\n== {step.title}\n   $ {step.display()}", flush=True)
            if step.key == "report":
                write_json_atomic(root / "steps.json", {"steps": records})  # what the report shows
            start = time.time()
            log_file = root / LOGS_FOLDER / f"{step.key}.log"
            returncode = stream_command(command, {**base_env, **step.env}, log_file, quiet)
            wall = time.time() - start
            if returncode != 0:
                tail = log_file.read_text(errors="replace")[-4000:]
                record.update(status="failed", wall_s=wall, log=str(log_file))
                records.append(record)
                write_json_atomic(root / "steps.json", {"steps": records})
                write_report_after_failure(root)
                raise SystemExit(
                    f"\nstep {step.key!r} failed (exit code {returncode}) after {wall:.0f} s; log {log_file}:\n{tail}\n"
                    f"fix the cause and run the demo again: finished steps are skipped"
                )
            record.update(status="done", wall_s=wall, log=str(log_file))
            write_json_atomic(
                marker_path(root, step.key),
                {"command": planned, "wall_s": wall, "finished": time.time()},
            )
            print(f"   done in {wall:.1f} s (log: {log_file})", flush=True)
            done.add(step.key)
            ran.add(step.key)
        records.append(record)
    write_json_atomic(root / "steps.json", {"steps": records})
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="pumit_demo",
        description="PUMIT end to end: pre-training, nnU-Net fine-tuning vs scratch, a CHAOS submission, an HTML report.",
    )
    parser.add_argument("--output", default="demo_output", help="output folder (default: ./demo_output)")
    parser.add_argument(
        "--setting",
        choices=sorted(SETTINGS),
        default="demo",
        help="sizes: "
        + "; ".join(f"{k}: {v.description}, {expected_time_text(k, 'cpu')}" for k, v in SETTINGS.items()),
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("pretrain", "segmentation", "chaos"),
        default=["pretrain", "segmentation", "chaos"],
        help="which parts to run (default: all)",
    )
    parser.add_argument(
        "--pretrain_config",
        help="a `pumit_pretrain prepare` config of your own images (instead of the phantom corpus)",
    )
    parser.add_argument(
        "--encoder",
        help="encoder weights to fine-tune from (e.g. `pumit_pretrain import` of the authors' weights): skips pre-training",
    )
    parser.add_argument(
        "--seg_dataset",
        help="your nnU-Net raw dataset folder DatasetXXX_Name (imagesTr, labelsTr, imagesTs[, labelsTs]) instead of the phantoms",
    )
    parser.add_argument(
        "--chaos_train", help="a CHAOS training folder (MR/<id>/...) instead of the synthetic set"
    )
    parser.add_argument("--chaos_test", help="a CHAOS test folder (no Ground folders) to predict and export")
    parser.add_argument(
        "--chaos_reference",
        help="the test cases with Ground folders, for a local score (the official test set has none)",
    )
    parser.add_argument(
        "--plan_args",
        help='flags for pumit_plan_and_preprocess replacing the setting\'s tiny plan, e.g. "--model base"',
    )
    parser.add_argument(
        "--quiet", action="store_true", help="only the commands and timings; the output goes to OUTPUT/logs/"
    )
    args = parser.parse_args(argv)

    for option in (
        "pretrain_config",
        "encoder",
        "seg_dataset",
        "chaos_train",
        "chaos_test",
        "chaos_reference",
    ):
        value = getattr(args, option)
        if value is not None and not os.path.exists(value):
            parser.error(f"--{option} {value} does not exist")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(f"--output {args.output} exists and is not a folder")
    with exit_on_bad_input(parser):  # the demo continues its folder; it must be writable and not an input
        inputs = [args.pretrain_config, args.encoder, args.seg_dataset, args.chaos_train, args.chaos_test,
                  args.chaos_reference]  # fmt: skip
        check_output_path(args.output, is_dir=True, overwrite=True, inputs=inputs, option="--output")
    if args.encoder and args.encoder.endswith(".safetensors"):
        from pumit_seg.weights import load_state_dict_file

        try:
            load_state_dict_file(args.encoder)  # fail now, not after minutes of data preparation
        except ValueError as error:
            parser.error(f"--encoder: {error}")
    if args.chaos_test and not args.chaos_train:
        parser.error("--chaos_test needs --chaos_train (the model is trained on the training set)")
    if args.seg_dataset:
        try:
            _dataset_id_of(args.seg_dataset)
        except ValueError as error:
            parser.error(str(error))
    inputs = DemoInputs(
        pretrain_config=args.pretrain_config,
        encoder=args.encoder,
        seg_dataset=args.seg_dataset,
        chaos_train=args.chaos_train,
        chaos_test=args.chaos_test if args.chaos_train else None,
        chaos_reference=args.chaos_reference,
        plan_args=shlex.split(args.plan_args) if args.plan_args is not None else None,
        parts=tuple(args.parts),
    )

    import torch

    on_gpu = torch.cuda.is_available()
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    setting = SETTINGS[args.setting]
    base_env = nnunet_environment(root, cpu=not on_gpu)
    if inputs.seg_dataset:
        base_env["nnUNet_raw"] = str(Path(inputs.seg_dataset).resolve().parent)
    base_env["PYTHONUNBUFFERED"] = "1"  # live output of every step
    steps, paths = build_steps(root, setting, inputs, on_gpu)
    write_json_atomic(
        root / "demo_settings.json",
        {
            "setting": args.setting,
            **asdict(setting),
            "device": "cuda" if on_gpu else "cpu",
            "inputs": asdict(inputs),
            "paths": paths,
        },
    )
    device = "gpu" if on_gpu else "cpu"
    print(f"pumit demo ({args.setting}: {setting.description}), device {'cuda' if on_gpu else 'cpu'}, output {root}")
    print(f"expected: {expected_time_text(args.setting, device)}")
    start = time.time()
    records = run_steps(steps, root, base_env, quiet=args.quiet)
    missing = [r for r in records if r["status"] != "done"]
    report = root / "report.html"
    print(f"\ndemo finished in {time.time() - start:.0f} s" + (f"; report: {report}" if report.is_file() else ""))
    for record in missing:
        print(f"   {record['status']}: {record['title']} ({record.get('reason', '')})")
    print_shell_settings(base_env, root)


def print_shell_settings(base_env: dict, root: Path) -> None:
    """The variables to set in a shell to repeat a step's command by hand; only folders that exist."""
    lines = [
        f"   export {key}={base_env[key]}"
        for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_extTrainer")
        if Path(base_env[key]).is_dir()
    ]
    # nnU-Net names results folders by trainer and plans only, so each training has its own nnUNet_results
    results = sorted(p for p in root.glob("nnUNet_results_*") if p.is_dir())
    if not lines and not results:
        return
    print("to repeat a step's command in your shell (each command line above shows the variables it sets):")
    print("\n".join(lines))
    for folder in results:
        print(f"   nnUNet_results={folder}   # the {folder.name.removeprefix('nnUNet_results_')} training")


if __name__ == "__main__":
    main()
