"""The project's table of broken inputs: every public command, run as a user runs it.

Each row runs a console script from ``.venv/bin`` as a subprocess on a broken input and asserts:

* a non-zero exit code;
* a message (stdout + stderr) matching the row's regex, which names the file or the option at fault;
* no Python traceback (a clear message, not a crash), unless the row sets ``traceback_ok=True``;
* every path the row watches is byte-for-byte what it was before the call (a hash of the whole tree:
  names and contents), so a failure leaves no half-written dataset, submission or summary behind.

HOW TO ADD A ROW (keep it a small targeted edit; one row per bug found):

1. If no builder below makes your input, add a ``def build_...(tmp: Path) -> dict`` function in the
   BUILDERS section. It writes the broken input under ``tmp`` (keep images tiny: the whole module must stay
   fast on 2 cores) and returns ``{placeholder: value}``; values are paths or strings.
2. Append a ``Case(...)`` to ``CASES`` (at the end of this file, or of your block): ``command`` is the
   console script and its arguments, where ``{placeholder}`` is replaced by the builder's values; ``message``
   is a regex searched in stdout + stderr, with ``{placeholder}`` replaced by the ``re.escape``d value (write
   literal braces as ``{{`` ``}}``); ``watch`` names the placeholders of the folders / files that must be
   unchanged (output folders, and inputs the command must not touch).
3. Run ``.venv/bin/pytest tests/test_broken_inputs.py -k YOUR_ROW_NAME``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

# end-to-end: every row runs a console script in a subprocess; `pytest -m "not e2e"` leaves them out
pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent  # the console scripts live beside the interpreter (.venv/bin)
TIMEOUT_S = 180


@dataclass(frozen=True)
class Case:
    name: str  # pytest id: what is broken, e.g. "evaluate-truncated-prediction"
    command: list[str]  # console script, then its arguments with {placeholders}
    build: Callable[[Path], dict]  # writes the input under tmp, returns {placeholder: value}
    message: str  # regex that must occur in stdout + stderr; {placeholders} are re.escape'd values
    watch: tuple[str, ...] = ()  # placeholders of paths that must be unchanged by the failed call
    traceback_ok: bool = False  # True only for commands whose clean error path is not there yet
    env: dict = field(default_factory=dict)  # extra environment variables, may use {placeholders}


def tree_hash(path: str | os.PathLike) -> str:
    """Hash of a file or a whole folder tree: relative names, kinds and contents ('absent' if missing)."""
    path = Path(path)
    if not path.exists():
        return "absent"
    digest = hashlib.sha256()
    entries = [path] if path.is_file() else sorted(path.rglob("*"))
    for entry in entries:
        digest.update(str(entry.relative_to(path) if entry != path else ".").encode())
        if entry.is_file():
            digest.update(b"F" + entry.read_bytes())
        else:
            digest.update(b"D")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- BUILDERS


def write_image(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 2.5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: array.ndim])
    sitk.WriteImage(image, str(path), True)
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def write_nan_nifti(path: Path, shape=(6, 10, 12)) -> Path:
    """A float NIfTI with NaN and inf voxels (written by nibabel: SimpleITK's reader would zero them)."""
    import nibabel as nib

    array = np.zeros(shape, np.float32)
    array[1, 2, 3], array[2, 3, 4] = np.nan, np.inf
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), np.diag([0.8, 0.8, 2.5, 1.0])), str(path))
    return path


def blob_labels(seed: int, shape=(6, 10, 12)) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(seed)
    z, y, x = (int(rng.integers(1, max(s - 4, 2))) for s in shape)
    labels[z : z + 3, y : y + 4, x : x + 4] = 1
    labels[1:3, 1:3, 1:3] = 2
    return labels


def build_evaluate_folders(tmp: Path, cases=("case_a", "case_b")) -> dict:
    """labels/ (references), pred/ (predictions) and dataset.json of a 2-label dataset."""
    for k, case in enumerate(cases):
        write_image(tmp / "labels" / f"{case}.nii.gz", blob_labels(k))
        write_image(tmp / "pred" / f"{case}.nii.gz", blob_labels(k + 10))
    dataset = {
        "labels": {"background": 0, "a": 1, "b": 2},
        "file_ending": ".nii.gz",
        "channel_names": {"0": "CT"},
    }
    (tmp / "dataset.json").write_text(json.dumps(dataset))
    return {"ref": tmp / "labels", "pred": tmp / "pred", "dj": tmp / "dataset.json"}


def build_evaluate_truncated_prediction(tmp: Path) -> dict:
    values = build_evaluate_folders(tmp)
    truncate(values["pred"] / "case_b.nii.gz")
    return {**values, "bad": values["pred"] / "case_b.nii.gz"}


def build_evaluate_nan_reference(tmp: Path) -> dict:
    values = build_evaluate_folders(tmp)
    write_nan_nifti(values["ref"] / "case_a.nii.gz")
    return {**values, "bad": values["ref"] / "case_a.nii.gz"}


def build_evaluate_dataset_json_without_labels(tmp: Path) -> dict:
    values = build_evaluate_folders(tmp)
    (tmp / "labels_only.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    return values


def build_evaluate_missing_prediction(tmp: Path) -> dict:
    values = build_evaluate_folders(tmp)
    (values["pred"] / "case_b.nii.gz").unlink()
    return values


def build_chaos_train(tmp: Path) -> dict:
    from pumit_seg.phantoms.chaos import tiny_chaos_series, write_chaos_tree

    return {
        "chaos": write_chaos_tree(str(tmp / "Train_Sets"), tiny_chaos_series()),
        "raw": tmp / "nnUNet_raw",
    }


def build_chaos_missing_outphase(tmp: Path) -> dict:
    import shutil

    values = build_chaos_train(tmp)
    shutil.rmtree(Path(values["chaos"]) / "MR" / "1" / "T1DUAL" / "DICOM_anon" / "OutPhase")
    return values


def build_chaos_corrupt_dicom(tmp: Path) -> dict:
    values = build_chaos_train(tmp)
    bad = Path(values["chaos"]) / "MR" / "1" / "T2SPIR" / "DICOM_anon" / "IMG-0002-00003.dcm"
    truncate(bad, 0.3)
    return {**values, "bad": bad}


def build_chaos_missing_ground_png(tmp: Path) -> dict:
    values = build_chaos_train(tmp)
    (Path(values["chaos"]) / "CT" / "2" / "Ground" / "liver_GT_002.png").unlink()
    return values


def build_chaos_converted(tmp: Path) -> dict:
    """A CHAOS test set (no Ground) converted to nnU-Net, and predictions for its cases."""
    from pumit_seg.evaluation import chaos
    from pumit_seg.phantoms.chaos import tiny_chaos_series, write_chaos_tree

    root = write_chaos_tree(str(tmp / "Test_Sets"), tiny_chaos_series(ct_ids=()), with_ground=False)
    raw = tmp / "nnUNet_raw"
    folders = chaos.convert(root, str(raw))
    predictions = {}
    for sequence, folder in folders.items():
        prediction_folder = tmp / f"pred_{sequence}"
        prediction_folder.mkdir()
        for name in sorted(os.listdir(Path(folder) / "imagesTs")):
            if name.endswith("_0000.nii.gz"):
                image = sitk.ReadImage(str(Path(folder) / "imagesTs" / name))
                labels = sitk.Cast(image > 400, sitk.sitkUInt8)
                sitk.WriteImage(labels, str(prediction_folder / name.replace("_0000.nii.gz", ".nii.gz")))
        predictions[sequence] = (folder, prediction_folder)
    t1_folder, t1_pred = predictions["T1DUAL"]
    t2_folder, t2_pred = predictions["T2SPIR"]
    return {"raw": raw, "t1": t1_folder, "t1_pred": t1_pred, "t2": t2_folder, "t2_pred": t2_pred}


def build_chaos_export_missing_prediction(tmp: Path) -> dict:
    values = build_chaos_converted(tmp)
    (values["t2_pred"] / "CHAOS_001.nii.gz").unlink()
    return {**values, "out": tmp / "submission"}


def build_chaos_export_into_used_folder(tmp: Path) -> dict:
    """A submission folder from an earlier export, then a prediction that breaks the new export."""
    from pumit_seg.evaluation import chaos

    values = build_chaos_converted(tmp)
    out = tmp / "submission"
    pred = [(str(values["t1"]), str(values["t1_pred"])), (str(values["t2"]), str(values["t2_pred"]))]
    chaos.export_submission(pred, str(out), str(tmp / "submission.zip"))
    truncate(values["t2_pred"] / "CHAOS_001.nii.gz")
    return {
        **values,
        "out": out,
        "zip": tmp / "submission.zip",
        "bad": values["t2_pred"] / "CHAOS_001.nii.gz",
    }


def build_chaos_score_missing_series(tmp: Path) -> dict:
    """A results tree (the ground truths as results) lacking the T2SPIR series of patient 1."""
    import shutil

    from pumit_seg.phantoms.chaos import tiny_chaos_series, write_chaos_tree

    root = Path(write_chaos_tree(str(tmp / "Train_Sets"), tiny_chaos_series(ct_ids=())))
    for sequence in ("T1DUAL",):  # T2SPIR left out
        shutil.copytree(
            root / "MR" / "1" / sequence / "Ground",
            tmp / "results" / "Task5" / "MR" / "1" / sequence / "Results",
        )
    return {"chaos": root, "results": tmp / "results", "scores": tmp / "scores.json"}


def build_btcv_raw(tmp: Path, num_cases: int = 30) -> dict:
    """A BTCV RawData folder of tiny training cases numbered as the real ones (0001-0010, 0021-0040)."""
    raw = tmp / "RawData"
    numbers = [f"{n:04d}" for n in list(range(1, 11)) + list(range(21, 41))][:num_cases]
    for k, number in enumerate(numbers):
        labels = blob_labels(k, shape=(4, 6, 6))
        write_image(raw / "Training" / "img" / f"img{number}.nii.gz", (labels * 100).astype(np.int16))
        write_image(raw / "Training" / "label" / f"label{number}.nii.gz", labels)
    return {
        "rawdata": raw,
        "raw": tmp / "nnUNet_raw",
        "last_image": raw / "Training" / "img" / f"img{numbers[-1]}.nii.gz",
    }


def build_btcv_truncated_last_case(tmp: Path) -> dict:
    values = build_btcv_raw(tmp)
    truncate(values["last_image"])
    return values


def build_btcv_nan_label(tmp: Path) -> dict:
    values = build_btcv_raw(tmp)
    bad = Path(values["rawdata"]) / "Training" / "label" / "label0040.nii.gz"
    write_nan_nifti(bad, shape=(4, 6, 6))
    return {**values, "bad": bad}


def build_chaos_reconvert_corrupt(tmp: Path) -> dict:
    """Datasets converted from a good CHAOS folder, then a DICOM of that folder damaged before converting again."""
    from pumit_seg.evaluation import chaos

    values = build_chaos_train(tmp)
    chaos.convert(values["chaos"], str(values["raw"]))
    bad = Path(values["chaos"]) / "CT" / "2" / "DICOM_anon" / "i0002,0000b.dcm"
    truncate(bad, 0.3)
    return {**values, "bad": bad}


def build_phantom_dataset(tmp: Path) -> dict:
    from pumit_seg.phantoms.abdomen import PhantomConfig, write_phantom_dataset

    write_phantom_dataset(
        str(tmp / "out"), 501, num_training=1, num_test=0, config=PhantomConfig(shape=(4, 16, 16))
    )
    return {"out": tmp / "out", "dataset": tmp / "out" / "Dataset501_Phantoms"}


def build_empty(tmp: Path) -> dict:
    return {"out": tmp / "out"}


def build_corrupt_weights(tmp: Path) -> dict:
    (tmp / "out").mkdir()
    bad = tmp / "out" / "encoder.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return {"out": tmp / "out", "bad": bad, "missing": tmp / "out" / "missing.safetensors"}


def build_medmnist(tmp: Path) -> dict:
    """A small MedMNIST-layout file (3D, 3 classes) and the place of a run folder (pumit_classify)."""
    from pumit_seg.data.medmnist import write_synthetic_medmnist

    write_synthetic_medmnist(tmp / "organ.npz", samples=(6, 3, 3))
    return {"npz": tmp / "organ.npz", "run": tmp / "run"}


def build_medmnist_truncated(tmp: Path) -> dict:
    values = build_medmnist(tmp)
    truncate(values["npz"])
    return values


def build_medmnist_missing_keys(tmp: Path) -> dict:
    values = build_medmnist(tmp)
    with np.load(values["npz"]) as npz:
        kept = {key: npz[key] for key in npz.files if not key.startswith("val_")}
    np.savez(values["npz"], **kept)
    return values


def build_medmnist_stale_run(tmp: Path) -> dict:
    """A run folder of another configuration (another learning rate)."""
    values = build_medmnist(tmp)
    values["run"].mkdir()
    (values["run"] / "config.json").write_text(json.dumps({"data": str(values["npz"]), "lr": 0.5}))
    return values


def build_pumit_checkpoints(tmp: Path) -> dict:
    """The authors' ViT layout (docs/weights_format.md) at width 64 with one block: a good Lightning checkpoint, a
    truncated copy, one missing a key (the pickled-object refusal is tested in test_pumit_import)."""
    import torch

    width, hidden = 64, 170
    state = {"patch_embed.proj.weight": torch.zeros(width, 3, 16, 16, 16), "patch_embed.proj.bias": torch.zeros(width),
             "cls_token": torch.zeros(1, 1, width), "pos_embed": torch.zeros(1, width, 5, 10, 10)}  # fmt: skip
    shapes = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.q_proj.weight": (width, width),
              "attn.k_proj.weight": (width, width), "attn.v_proj.weight": (width, width), "attn.q_bias": (width,),
              "attn.v_bias": (width,), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
              "norm2.weight": (width,), "norm2.bias": (width,), "mlp.w1.weight": (hidden, width),
              "mlp.w1.bias": (hidden,), "mlp.w2.weight": (hidden, width), "mlp.w2.bias": (hidden,),
              "mlp.ffn_ln.weight": (hidden,), "mlp.ffn_ln.bias": (hidden,), "mlp.w3.weight": (width, hidden),
              "mlp.w3.bias": (width,)}  # fmt: skip
    state.update({f"blocks.0.{name}": torch.full(shape, 0.01) for name, shape in shapes.items()})
    state.update({"norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)})
    torch.save({"state_dict": state, "epoch": 1}, tmp / "good.ckpt")
    data = (tmp / "good.ckpt").read_bytes()
    (tmp / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    without_key = {k: v for k, v in state.items() if k != "blocks.0.norm1.weight"}
    torch.save({"state_dict": without_key}, tmp / "missing.ckpt")
    (tmp / "existing.safetensors").write_bytes(b"an earlier import")
    return {name: tmp / f"{name}.ckpt" for name in ("good", "truncated", "missing")} | {
        "folder": tmp,
        "out": tmp / "vit.safetensors",
        "existing": tmp / "existing.safetensors",
    }


def build_mim_inputs(tmp: Path) -> dict:
    """`pumit_pretrain mim` inputs: a tiny tokenizer file, a truncated copy, a ViT file (not a tokenizer),
    a store path (the errors come before the store is opened) and an output folder that must stay absent."""
    import torch

    from pumit_seg.models.tokenizer import tokenizer_tiny
    from pumit_seg.models.vit import universal_vit_tiny
    from pumit_seg.weights import save_model

    torch.manual_seed(0)
    save_model(tokenizer_tiny(), tmp / "tokenizer.safetensors")
    (tmp / "truncated.safetensors").write_bytes((tmp / "tokenizer.safetensors").read_bytes()[:1000])
    save_model(universal_vit_tiny(), tmp / "vit.safetensors")
    return {"tokenizer": tmp / "tokenizer.safetensors", "truncated": tmp / "truncated.safetensors",
            "vit": tmp / "vit.safetensors", "missing": tmp / "missing.safetensors", "store": tmp / "store",
            "out": tmp / "run"}  # fmt: skip


MIM_TINY = ["pumit_pretrain", "mim", "--store", "{store}", "-o", "{out}", "--preset", "tiny"]


def build_tokenizer_inputs(tmp: Path) -> dict:
    """`pumit_pretrain tokenizer` / `export` inputs: a run folder with a truncated checkpoint, an LPIPS
    heads file without the VGG16 weights, a store path (errors come before the store is opened) and an
    output folder that must stay absent."""
    import torch

    torch.save(
        {"format": 1, "kind": "tokenizer", "step": 3, "model": {"w": torch.zeros(64, 64)}}, tmp / "ckpt.pt"
    )
    (tmp / "run_truncated").mkdir()
    data = (tmp / "ckpt.pt").read_bytes()
    (tmp / "run_truncated" / "checkpoint_last.pt").write_bytes(data[: len(data) // 2])
    (tmp / "run_truncated" / "log.csv").write_text("step,loss\n1,0.5\n")
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, tmp / "vgg.pth")
    return {"store": tmp / "store", "out": tmp / "run", "run_truncated": tmp / "run_truncated",
            "truncated": tmp / "run_truncated" / "checkpoint_last.pt", "heads": tmp / "vgg.pth",
            "exported": tmp / "tokenizer.safetensors"}  # fmt: skip


def build_pretrain_corpus(tmp: Path) -> dict:
    from pumit_seg.phantoms.pretrain import DEFAULT_DATASETS, write_pretrain_corpus

    config = write_pretrain_corpus(str(tmp / "corpus"), datasets=DEFAULT_DATASETS[-2:])
    return {"config": config, "out": tmp / "store"}


def build_pretrain_missing_folder(tmp: Path) -> dict:
    values = build_pretrain_corpus(tmp)
    content = json.loads(Path(values["config"]).read_text())
    content["datasets"].append({"name": "gone", "path": "no_such_folder", "modality": "CT"})
    Path(values["config"]).write_text(json.dumps(content))
    return values | {"bad": "no_such_folder"}


def build_pretrain_foreign_output(tmp: Path) -> dict:
    values = build_pretrain_corpus(tmp)
    values["out"].mkdir()
    (values["out"] / "notes.txt").write_text("not a store")
    return values


def build_demo_inputs(tmp: Path) -> dict:
    """pumit_demo / report / chaos_phantoms: an output folder that must stay absent, and broken inputs."""
    (tmp / "not_a_dataset").mkdir()
    (tmp / "encoder.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    (tmp / "a_file").write_text("not a folder")
    return {
        "out": tmp / "demo_out",
        "missing": tmp / "no_such_folder",
        "not_a_dataset": tmp / "not_a_dataset",
        "encoder": tmp / "encoder.safetensors",
        "a_file": tmp / "a_file",
    }


# unknown labels and outputs: builders


def _skip_if_root() -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the read-only case needs a non-root user")


def build_evaluate_unknown_prediction_label(tmp: Path) -> dict:
    values = build_evaluate_folders(tmp)
    labels = blob_labels(11)
    labels[4, 6:8, 6:8] = 7  # dataset.json knows 0, 1, 2
    write_image(values["pred"] / "case_b.nii.gz", labels)
    return {**values, "bad": values["pred"] / "case_b.nii.gz"}


def build_evaluate_unknown_reference_label(tmp: Path) -> dict:
    values = build_evaluate_folders(tmp)
    labels = blob_labels(0)
    labels[4, 6:8, 6:8] = 5
    write_image(values["ref"] / "case_a.nii.gz", labels)
    return {**values, "bad": values["ref"] / "case_a.nii.gz"}


def build_evaluate_earlier_summary(tmp: Path) -> dict:
    """Prediction folders with a summary.json of an earlier evaluation (the default output and -o)."""
    values = build_evaluate_folders(tmp)
    (values["pred"] / "summary.json").write_text("{}")
    (tmp / "summary.json").write_text("{}")
    return {**values, "summary": tmp / "summary.json"}


def build_outputs_under_a_file(tmp: Path) -> dict:
    """A regular file standing where an output folder's parent should be, and a read-only folder."""
    (tmp / "a_file").write_text("a regular file, not a folder")
    (tmp / "read_only").mkdir()
    (tmp / "read_only").chmod(0o555)
    return {"a_file": tmp / "a_file", "read_only": tmp / "read_only"}


def build_evaluate_output_under_file(tmp: Path) -> dict:
    return build_evaluate_folders(tmp) | build_outputs_under_a_file(tmp)


def build_evaluate_output_read_only(tmp: Path) -> dict:
    _skip_if_root()
    return build_evaluate_output_under_file(tmp)


def _write_prediction(path: Path, labels: np.ndarray) -> Path:
    """Overwrite a CHAOS prediction with `labels`, keeping its geometry."""
    reference = sitk.ReadImage(str(path))
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))
    return path


def build_chaos_export_unknown_label(tmp: Path) -> dict:
    values = build_chaos_converted(tmp)
    bad = values["t2_pred"] / "CHAOS_001.nii.gz"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(bad)))
    labels[0, :2, :2] = 9  # MR organs are 1..4
    _write_prediction(bad, labels.astype(np.uint8))
    return {**values, "out": tmp / "submission", "bad": bad}


def build_chaos_export_fractional_label(tmp: Path) -> dict:
    values = build_chaos_converted(tmp)
    bad = values["t1_pred"] / "CHAOS_001.nii.gz"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(bad))).astype(np.float32)
    labels[0, :2, :2] = 1.5
    _write_prediction(bad, labels)
    return {**values, "out": tmp / "submission", "bad": bad}


def build_chaos_export_earlier(tmp: Path) -> dict:
    """A submission folder and zip of an earlier export (complete predictions)."""
    from pumit_seg.evaluation import chaos

    values = build_chaos_converted(tmp)
    out = tmp / "submission"
    pred = [(str(values["t1"]), str(values["t1_pred"])), (str(values["t2"]), str(values["t2_pred"]))]
    chaos.export_submission(pred, str(out), str(tmp / "submission.zip"))
    return {**values, "out": out, "zip": tmp / "submission.zip", "new_out": tmp / "submission2"}


def build_chaos_export_output_under_file(tmp: Path) -> dict:
    return build_chaos_converted(tmp) | build_outputs_under_a_file(tmp) | {"out": tmp / "submission"}


def build_chaos_train_output_under_file(tmp: Path) -> dict:
    return build_chaos_train(tmp) | build_outputs_under_a_file(tmp)


def build_medmnist_label_99(tmp: Path, metadata: bool = False, name: str = "organ.npz") -> dict:
    """A 3-class MedMNIST-layout file (not an official name) with one training label 99."""
    from pumit_seg.data.medmnist import write_synthetic_medmnist

    path = tmp / name
    write_synthetic_medmnist(path, samples=(6, 3, 3))
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["train_labels"][2, 0] = 99
    if metadata:
        arrays["num_classes"] = np.array(3)
    else:
        arrays.pop("num_classes", None)
    np.savez(path, **arrays)
    return {"npz": path, "run": tmp / "run"}


def build_medmnist_label_99_with_metadata(tmp: Path) -> dict:
    return build_medmnist_label_99(tmp, metadata=True)


def build_medmnist_output_under_file(tmp: Path) -> dict:
    return build_medmnist(tmp) | build_outputs_under_a_file(tmp)


def build_classify_evaluate_earlier_output(tmp: Path) -> dict:
    """`pumit_classify evaluate` inputs (the weights are never read: the output is refused first)."""
    values = build_medmnist(tmp)
    (tmp / "best_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp / "metrics.json").write_text("{}")
    return {**values, "weights": tmp / "best_model.safetensors", "metrics": tmp / "metrics.json"}


def build_classify_evaluate_output_under_file(tmp: Path) -> dict:
    return build_classify_evaluate_earlier_output(tmp) | build_outputs_under_a_file(tmp)


def build_export_run(tmp: Path) -> dict:
    """A tokenizer run folder with a real checkpoint_last.pt (tiny tokenizer) and an earlier export."""
    import torch

    from pumit_seg.models.tokenizer import tokenizer_tiny

    torch.manual_seed(0)
    model = tokenizer_tiny()
    run = tmp / "run"
    run.mkdir()
    checkpoint = {
        "format": 1,
        "kind": "tokenizer",
        "step": 3,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_config": model.config,
        "model": model.state_dict(),
    }
    torch.save(checkpoint, run / "checkpoint_last.pt")
    (run / "log.csv").write_text("step,loss\n1,0.5\n")
    (run / "config.json").write_text(json.dumps({"kind": "tokenizer"}))
    torch.save(checkpoint, tmp / "standalone.pt")
    (tmp / "earlier.safetensors").write_bytes(b"an earlier export")
    return {
        "run": run,
        "checkpoint": run / "checkpoint_last.pt",
        "standalone": tmp / "standalone.pt",
        "earlier": tmp / "earlier.safetensors",
    } | build_outputs_under_a_file(tmp)


def build_pumit_checkpoints_output_under_file(tmp: Path) -> dict:
    return build_pumit_checkpoints(tmp) | build_outputs_under_a_file(tmp)


def build_pumit_checkpoints_read_only(tmp: Path) -> dict:
    _skip_if_root()
    return build_pumit_checkpoints_output_under_file(tmp)


def build_tokenizer_output_under_file(tmp: Path) -> dict:
    return build_tokenizer_inputs(tmp) | build_outputs_under_a_file(tmp)


def build_mim_output_under_file(tmp: Path) -> dict:
    return build_mim_inputs(tmp) | build_outputs_under_a_file(tmp)


def build_pretrain_output_under_file(tmp: Path) -> dict:
    return build_pretrain_corpus(tmp) | build_outputs_under_a_file(tmp)


def build_demo_output_read_only(tmp: Path) -> dict:
    _skip_if_root()
    return build_demo_inputs(tmp) | build_outputs_under_a_file(tmp)


def build_btcv_output_under_file(tmp: Path) -> dict:
    return build_btcv_raw(tmp, num_cases=2) | build_outputs_under_a_file(tmp)


# stores, real-world images, planning


def _prepare(config, out, settings: dict | None = None, **options) -> None:
    from pumit_seg.data.prepare import PrepareConfig, prepare_store

    prepare_store(str(config), str(out), config=PrepareConfig(**(settings or {})), progress=False, **options)


def build_pretrain_store(tmp: Path) -> dict:
    """A store prepared with the default settings from the small 2D corpus."""
    values = build_pretrain_corpus(tmp)
    _prepare(values["config"], values["out"])
    return values


def build_pretrain_parts_of_other_settings(tmp: Path) -> dict:
    """Part 0 of 2 prepared with the defaults; part 1, by a job started at the same time into another
    folder, with --max-in-plane 32; its journal and arrays then copied into the store."""
    import shutil

    values = build_pretrain_corpus(tmp)
    _prepare(values["config"], values["out"], part=0, num_parts=2, merge=False)
    other = tmp / "other_job"
    _prepare(values["config"], other, {"max_in_plane": 32}, part=1, num_parts=2, merge=False)
    for path in (other / "parts").iterdir():
        if path.name.startswith("part-1-of-2"):
            shutil.copy(path, values["out"] / "parts" / path.name)
    shutil.copytree(other / "images", values["out"] / "images", dirs_exist_ok=True)
    return values


def _add_dataset(values: dict, entry: dict) -> None:
    content = json.loads(Path(values["config"]).read_text())
    content["datasets"].append(entry)
    Path(values["config"]).write_text(json.dumps(content))


def build_pretrain_empty_dataset(tmp: Path) -> dict:
    values = build_pretrain_corpus(tmp)
    (Path(values["config"]).parent / "empty_folder").mkdir()
    _add_dataset(values, {"name": "empty", "path": "empty_folder", "modality": "CT"})
    return values


def build_pretrain_label_folders_only(tmp: Path) -> dict:
    """A dataset whose folder holds only CHAOS-style label folders (any case): Segmentation, ground."""
    from PIL import Image

    values = build_pretrain_corpus(tmp)
    root = Path(values["config"]).parent / "chaos_like"
    for folder in ("Segmentation", "ground"):
        (root / "1" / folder).mkdir(parents=True)
        mask = np.zeros((40, 40), np.uint8)
        mask[10:30, 12:28] = 63
        Image.fromarray(mask).save(root / "1" / folder / "liver_000.png")
    _add_dataset(values, {"name": "chaos_gt", "path": "chaos_like", "modality": "MR"})
    return values


def _chaos_ct_series(values: dict) -> tuple[Path, list[str], Path, list[str]]:
    series = Path(values["chaos"]) / "CT" / "2" / "DICOM_anon"
    ground = Path(values["chaos"]) / "CT" / "2" / "Ground"
    return series, sorted(p.name for p in series.iterdir()), ground, sorted(p.name for p in ground.iterdir())


def build_chaos_missing_slice(tmp: Path) -> dict:
    """CT series 2 without its second DICOM file (and that slice's ground truth): a 5 mm gap in 2.5 mm."""
    values = build_chaos_train(tmp)
    series, names, ground, ground_names = _chaos_ct_series(values)
    (series / names[1]).unlink()
    (ground / ground_names[1]).unlink()
    return {**values, "series": series, "before": names[0], "after": names[2]}


def build_chaos_uneven_spacing(tmp: Path) -> dict:
    """CT series 2 with its third slice moved 1 mm: steps 2.5, 3.5 and 1.5 mm."""
    import pydicom

    values = build_chaos_train(tmp)
    series, names, _, _ = _chaos_ct_series(values)
    dataset = pydicom.dcmread(series / names[2])
    dataset.ImagePositionPatient = [float(v) for v in dataset.ImagePositionPatient[:2]] + [
        float(dataset.ImagePositionPatient[2]) - 1.0
    ]
    dataset.save_as(series / names[2])
    return {**values, "series": series}


def build_chaos_two_slices_one_position(tmp: Path) -> dict:
    """CT series 2 with its third slice written at the position of its second."""
    import pydicom

    values = build_chaos_train(tmp)
    series, names, _, _ = _chaos_ct_series(values)
    second = pydicom.dcmread(series / names[1])
    third = pydicom.dcmread(series / names[2])
    third.ImagePositionPatient = second.ImagePositionPatient
    third.save_as(series / names[2])
    return {**values, "series": series, "second": names[1], "third": names[2]}


def build_plan_raw(tmp: Path, channels: int = 1) -> dict:
    """nnUNet_raw/Dataset502_Tiny: two tiny training cases with `channels` image channels, 2 labels."""
    folder = tmp / "raw" / "Dataset502_Tiny"
    rng = np.random.default_rng(0)
    for k, case in enumerate(("case_a", "case_b")):
        labels = blob_labels(k)
        for c in range(channels):
            image = labels * 100.0 + rng.normal(0, 10, labels.shape) + 10 * c
            write_image(folder / "imagesTr" / f"{case}_{c:04d}.nii.gz", image.astype(np.int16))
        write_image(folder / "labelsTr" / f"{case}.nii.gz", labels)
    dataset = {
        "channel_names": {str(c): f"MR{c}" for c in range(channels)},
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return {
        "raw": tmp / "raw",
        "pre": tmp / "preprocessed",
        "results": tmp / "results",
        "image": folder / "imagesTr" / "case_b_0000.nii.gz",
    }


def build_plan_truncated_image(tmp: Path) -> dict:
    values = build_plan_raw(tmp)
    truncate(values["image"])
    return values


def build_plan_nan_image(tmp: Path) -> dict:
    values = build_plan_raw(tmp)
    write_nan_nifti(values["image"])
    return values


def build_plan_missing_channel(tmp: Path) -> dict:
    values = build_plan_raw(tmp, channels=2)
    missing = Path(str(values["image"]).replace("_0000.nii.gz", "_0001.nii.gz"))
    missing.unlink()
    return {**values, "missing": missing}


def build_plan_missing_label(tmp: Path) -> dict:
    values = build_plan_raw(tmp)
    label = Path(values["raw"]) / "Dataset502_Tiny" / "labelsTr" / "case_a.nii.gz"
    label.unlink()
    return {**values, "missing": label}


# run health and resumed options


def build_nan_checkpoint(tmp: Path) -> dict:
    """The tokenizer run of `build_export_run` whose checkpoint weights hold NaN (a diverged run)."""
    import torch

    values = build_export_run(tmp)
    checkpoint = torch.load(values["checkpoint"], weights_only=True)
    name = next(k for k, v in checkpoint["model"].items() if v.is_floating_point())
    checkpoint["model"][name].view(-1)[0] = float("nan")
    torch.save(checkpoint, values["checkpoint"])
    return {**values, "exported": tmp / "exported.safetensors"}


def _stopped_run(tmp: Path, kind: str, config) -> dict:
    """A run folder stopped at step 3: a checkpoint recording the run's options (`config`) and its config.json.
    The weights are left out: the options are compared before anything else is read."""
    import dataclasses

    import torch

    run = Path(config.output_dir)
    run.mkdir()
    options = dataclasses.asdict(config)
    torch.save({"format": 1, "kind": kind, "step": 3, "config": options}, run / "checkpoint_last.pt")
    (run / "config.json").write_text(json.dumps({"kind": kind, **options}))
    return {"run": run}


def build_tokenizer_run(tmp: Path) -> dict:
    """A `pumit_pretrain tokenizer --preset tiny --store {store} -o {run}` run stopped at step 3."""
    from pumit_seg.trainers.pretrain_base import config_from_args
    from pumit_seg.trainers.tokenizer_trainer import TokenizerConfig

    options = {"preset": "tiny", "store": str(tmp / "store"), "output_dir": str(tmp / "run")}
    config = config_from_args(TokenizerConfig, options)
    return {"store": tmp / "store"} | _stopped_run(tmp, "tokenizer", config)


def build_mim_run(tmp: Path) -> dict:
    """A `pumit_pretrain mim --preset tiny --store {store} --tokenizer {tokenizer} -o {run}` run stopped at step 3."""
    from pumit_seg.trainers.mim_trainer import MIMConfig
    from pumit_seg.trainers.pretrain_base import config_from_args

    values = build_mim_inputs(tmp)
    options = {"preset": "tiny", "store": str(values["store"]), "output_dir": str(tmp / "mim_run"),
               "tokenizer": str(values["tokenizer"])}  # fmt: skip
    return values | _stopped_run(tmp, "mim", config_from_args(MIMConfig, options))


TOKENIZER_TINY = ["pumit_pretrain", "tokenizer", "--preset", "tiny", "--store", "{store}", "-o", "{out}"]
TOKENIZER_RUN = ["pumit_pretrain", "tokenizer", "--preset", "tiny", "--store", "{store}", "-o", "{run}"]
MIM_RUN = ["pumit_pretrain", "mim", "--preset", "tiny", "--store", "{store}", "--tokenizer", "{tokenizer}",
           "-o", "{run}"]  # fmt: skip


def build_plan_label_shape_mismatch(tmp: Path) -> dict:
    values = build_plan_raw(tmp)
    label = Path(values["raw"]) / "Dataset502_Tiny" / "labelsTr" / "case_b.nii.gz"
    write_image(label, blob_labels(3, shape=(6, 10, 11)))
    return values


def build_plan_extra_channel_file(tmp: Path) -> dict:
    values = build_plan_raw(tmp)
    extra = Path(str(values["image"]).replace("_0000.nii.gz", "_0001.nii.gz"))
    write_image(extra, blob_labels(4).astype(np.int16))
    return values


# ------------------------------------------------------------------------------------------------ CASES

CASES = [
    # pumit_evaluate
    Case(
        "evaluate-truncated-prediction",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{dj}", "-np", "1"],
        build_evaluate_truncated_prediction,
        "{bad}.*truncated|{bad}.*cut short",
        watch=("pred", "ref"),
    ),
    Case(
        "evaluate-nan-reference",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{dj}", "-np", "1"],
        build_evaluate_nan_reference,
        "{bad}.*NaN",
        watch=("pred", "ref"),
    ),
    Case(
        "evaluate-missing-prediction",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{dj}", "-np", "1"],
        build_evaluate_missing_prediction,
        "case_b",
        watch=("pred",),
    ),
    Case(
        "evaluate-np-zero",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{dj}", "-np", "0"],
        build_evaluate_folders,
        "argument -np: .*\\[1,",
        watch=("pred",),
    ),
    Case(
        "evaluate-negative-nsd-tolerance",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{dj}", "--nsd_tolerance", "-1"],
        build_evaluate_folders,
        "argument --nsd_tolerance",
        watch=("pred",),
    ),
    Case(
        "evaluate-dataset-json-without-labels",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{ref}/../labels_only.json", "-np", "1"],
        build_evaluate_dataset_json_without_labels,
        "labels_only.json has no labels",
        watch=("pred",),
    ),
    # pumit_chaos convert
    Case(
        "chaos-convert-missing-t1dual-phase",
        ["pumit_chaos", "convert", "{chaos}", "{raw}"],
        build_chaos_missing_outphase,
        "OutPhase",
        watch=("raw", "chaos"),
    ),
    Case(
        "chaos-convert-corrupt-dicom",
        ["pumit_chaos", "convert", "{chaos}", "{raw}"],
        build_chaos_corrupt_dicom,
        "{bad}",
        watch=("raw", "chaos"),
    ),
    Case(
        "chaos-convert-missing-ground-png",
        ["pumit_chaos", "convert", "{chaos}", "{raw}"],
        build_chaos_missing_ground_png,
        "Ground",
        watch=("raw",),
    ),
    Case(
        "chaos-convert-np-zero",
        ["pumit_chaos", "convert", "{chaos}", "{raw}", "-np", "0"],
        build_chaos_train,
        "argument -np",
        watch=("raw",),
    ),
    Case(
        "chaos-reconvert-corrupt-dicom-keeps-datasets",
        ["pumit_chaos", "convert", "{chaos}", "{raw}"],
        build_chaos_reconvert_corrupt,
        "{bad}",
        watch=("raw",),
    ),
    # pumit_chaos export
    Case(
        "chaos-export-missing-prediction",
        ["pumit_chaos", "export", "{out}", "--pred", "{t1}", "{t1_pred}", "--pred", "{t2}", "{t2_pred}"],
        build_chaos_export_missing_prediction,
        "CHAOS_001",
        watch=("out", "raw"),
    ),
    Case(
        "chaos-export-into-used-folder-fails",
        [
            "pumit_chaos",
            "export",
            "{out}",
            "--pred",
            "{t1}",
            "{t1_pred}",
            "--pred",
            "{t2}",
            "{t2_pred}",
            "--zip",
            "{zip}",
            "--overwrite",
        ],
        build_chaos_export_into_used_folder,
        "{bad}",
        watch=("out", "zip"),
    ),
    # pumit_chaos score
    Case(
        "chaos-score-missing-series",
        ["pumit_chaos", "score", "{results}", "{chaos}", "-o", "{scores}"],
        build_chaos_score_missing_series,
        "T2SPIR",
        watch=("scores",),
    ),
    # pumit_btcv convert
    Case(
        "btcv-convert-truncated-last-case",
        ["pumit_btcv", "convert", "{rawdata}", "{raw}"],
        build_btcv_truncated_last_case,
        "{last_image}",
        watch=("raw",),
    ),
    Case(
        "btcv-convert-nan-label",
        ["pumit_btcv", "convert", "{rawdata}", "{raw}"],
        build_btcv_nan_label,
        "{bad}.*NaN",
        watch=("raw",),
    ),
    Case(
        "btcv-convert-dataset-id-out-of-range",
        ["pumit_btcv", "convert", "{rawdata}", "{raw}", "--dataset_id", "1000"],
        build_btcv_raw,
        "argument --dataset_id",
        watch=("raw",),
    ),
    # pumit_make_phantoms
    Case(
        "phantoms-existing-dataset-without-overwrite",
        ["pumit_make_phantoms", "-o", "{out}", "-d", "501", "--shape", "4", "16", "16"],
        build_phantom_dataset,
        "{dataset} exists.*--overwrite",
        watch=("out",),
    ),
    Case(
        "phantoms-zero-training-cases",
        ["pumit_make_phantoms", "-o", "{out}", "-d", "501", "--num_train", "0"],
        build_empty,
        "argument --num_train",
        watch=("out",),
    ),
    Case(
        "phantoms-negative-spacing",
        ["pumit_make_phantoms", "-o", "{out}", "-d", "501", "--spacing", "3", "-0.8", "0.8"],
        build_empty,
        "argument --spacing",
        watch=("out",),
    ),
    Case(
        "phantoms-absurd-shape",
        ["pumit_make_phantoms", "-o", "{out}", "-d", "501", "--shape", "4000", "4000", "4000"],
        build_empty,
        "--shape",
        watch=("out",),
    ),
    Case(
        "phantoms-dataset-id-out-of-range",
        ["pumit_make_phantoms", "-o", "{out}", "-d", "0"],
        build_empty,
        "argument -d",
        watch=("out",),
    ),
    # pumit_plan_and_preprocess (parse-time checks and weights checked before any fingerprint is written)
    Case(
        "plan-np-zero",
        ["pumit_plan_and_preprocess", "-d", "501", "-np", "0"],
        build_empty,
        "argument -np: .*\\[1,",
        watch=("out",),
    ),
    Case(
        "plan-negative-target-spacing",
        ["pumit_plan_and_preprocess", "-d", "501", "--target_spacing", "3", "-0.75", "0.75"],
        build_empty,
        "argument --target_spacing",
        watch=("out",),
    ),
    Case(
        "plan-inverted-ct-window",
        ["pumit_plan_and_preprocess", "-d", "501", "--ct_window", "250", "-175"],
        build_empty,
        "argument --ct_window",
        watch=("out",),
    ),
    Case(
        "plan-unknown-preset",
        ["pumit_plan_and_preprocess", "-d", "501", "--preset", "msd"],
        build_empty,
        "argument --preset",
        watch=("out",),
    ),
    Case(
        "plan-missing-pretrained-weights",
        ["pumit_plan_and_preprocess", "-d", "501", "--pretrained_weights", "{missing}"],
        build_corrupt_weights,
        "{missing}",
        watch=("out",),
        env={"nnUNet_raw": "{out}", "nnUNet_preprocessed": "{out}", "nnUNet_results": "{out}"},
    ),
    Case(
        "plan-corrupt-pretrained-weights",
        ["pumit_plan_and_preprocess", "-d", "501", "--pretrained_weights", "{bad}"],
        build_corrupt_weights,
        "{bad}: not a readable safetensors file",
        watch=("out",),
        env={"nnUNet_raw": "{out}", "nnUNet_preprocessed": "{out}", "nnUNet_results": "{out}"},
    ),
    Case(
        "classify-truncated-npz",
        ["pumit_classify", "train", "--data", "{npz}", "-o", "{run}", "--model", "tiny"],
        build_medmnist_truncated,
        "{npz}: cannot read it as a .npz file",
        watch=("run", "npz"),
    ),
    Case(
        "classify-missing-keys",
        ["pumit_classify", "train", "--data", "{npz}", "-o", "{run}", "--model", "tiny"],
        build_medmnist_missing_keys,
        "{npz}: not a MedMNIST file: missing key\\(s\\) val_images, val_labels",
        watch=("run", "npz"),
    ),
    Case(
        "classify-stale-output-folder",
        ["pumit_classify", "train", "--data", "{npz}", "-o", "{run}", "--input-size", "32"],
        build_medmnist_stale_run,
        "{run}: holds a run of another configuration .*--lr 0.5 -> 1e-05",
        watch=("run", "npz"),
    ),
    Case(
        "classify-input-size-out-of-range",
        ["pumit_classify", "train", "--data", "{npz}", "-o", "{run}", "--input-size", "40"],
        build_medmnist,
        "--input-size 40 must be a multiple of the weights' patch size 16",
        watch=("run", "npz"),
    ),
    # pumit_pretrain import: the authors' checkpoints
    Case(
        "import-truncated-checkpoint",
        ["pumit_pretrain", "import", "{truncated}", "-o", "{out}"],
        build_pumit_checkpoints,
        "{truncated}: not a readable torch checkpoint",
        watch=("folder",),
    ),
    Case(
        "import-missing-key",
        ["pumit_pretrain", "import", "{missing}", "-o", "{out}"],
        build_pumit_checkpoints,
        "{missing}: .*missing key 'blocks.0.norm1.weight'",
        watch=("folder",),
    ),
    Case(
        "import-existing-output",
        ["pumit_pretrain", "import", "{good}", "-o", "{existing}"],
        build_pumit_checkpoints,
        "{existing} exists: pass --overwrite",
        watch=("folder",),
    ),
    Case(
        "import-norm-eps-out-of-range",
        ["pumit_pretrain", "import", "{good}", "-o", "{out}", "--norm-eps", "0"],
        build_pumit_checkpoints,
        "argument --norm-eps: must be a finite number in \\(0.0, 1.0\\]",
        watch=("folder",),
    ),
    # pumit_pretrain mim
    Case(
        "mim-missing-tokenizer",
        [*MIM_TINY, "--tokenizer", "{missing}"],
        build_mim_inputs,
        "--tokenizer {missing}: no such file",
        watch=("out",),
    ),
    Case(
        "mim-truncated-tokenizer",
        [*MIM_TINY, "--tokenizer", "{truncated}"],
        build_mim_inputs,
        "{truncated}: not a readable safetensors file",
        watch=("out", "truncated"),
    ),
    Case(
        "mim-tokenizer-is-a-vit",
        [*MIM_TINY, "--tokenizer", "{vit}"],
        build_mim_inputs,
        "--tokenizer {vit}: a UniversalViT has no token_distribution\\(\\); not a tokenizer",
        watch=("out",),
    ),
    Case(
        "mim-mask-ratio-out-of-range",
        [*MIM_TINY, "--tokenizer", "{tokenizer}", "--mask-ratio", "1.5"],
        build_mim_inputs,
        "--mask-ratio must lie strictly between 0 and 1, got 1.5",
        watch=("out",),
    ),
    # pumit_pretrain tokenizer / export
    Case(
        "tokenizer-truncated-checkpoint-in-run-folder",
        ["pumit_pretrain", "tokenizer", "--preset", "tiny", "--store", "{store}", "-o", "{run_truncated}"],
        build_tokenizer_inputs,
        "{truncated}: not a readable training checkpoint",
        watch=("run_truncated",),
    ),
    Case(
        "tokenizer-lpips-file-without-vgg",
        [
            "pumit_pretrain",
            "tokenizer",
            "--preset",
            "tiny",
            "--store",
            "{store}",
            "-o",
            "{out}",
            "--lpips-weights",
            "{heads}",
        ],  # fmt: skip
        build_tokenizer_inputs,
        "LPIPS weights from .*vgg.pth.* lack 26 entries",
        watch=("out", "heads"),
    ),
    Case(
        "tokenizer-missing-store",
        ["pumit_pretrain", "tokenizer", "--preset", "tiny", "--store", "{store}", "-o", "{out}"],
        build_tokenizer_inputs,
        "{store}/table.csv: no store table here",
        watch=("out",),
    ),
    Case(
        "tokenizer-crop-out-of-range",
        [
            "pumit_pretrain",
            "tokenizer",
            "--preset",
            "tiny",
            "--store",
            "{store}",
            "-o",
            "{out}",
            "--crop-in-plane",
            "40",
        ],
        build_tokenizer_inputs,
        "--crop-in-plane must be a multiple of 16, got 40",
        watch=("out",),
    ),
    Case(
        "export-truncated-checkpoint",
        ["pumit_pretrain", "export", "{truncated}", "-o", "{exported}"],
        build_tokenizer_inputs,
        "{truncated}: not a readable training checkpoint",
        watch=("exported", "run_truncated"),
    ),
    # pumit_pretrain prepare
    Case(
        "prepare-config-folder-missing",
        ["pumit_pretrain", "prepare", "{config}", "-o", "{out}", "--num-workers", "0"],
        build_pretrain_missing_folder,
        "datasets.json.*'gone'.*{bad}",
        watch=("out",),
    ),
    Case(
        "prepare-into-foreign-folder",
        ["pumit_pretrain", "prepare", "{config}", "-o", "{out}", "--num-workers", "0"],
        build_pretrain_foreign_output,
        "{out}.*not a pre-training store",
        watch=("out",),
    ),
    Case(
        "prepare-part-out-of-range",
        ["pumit_pretrain", "prepare", "{config}", "-o", "{out}", "--part", "2", "--num-parts", "2"],
        build_pretrain_corpus,
        "--part",
        watch=("out",),
    ),
    # pumit_demo, its report and the CHAOS phantom writer: refused before anything is written
    Case(
        "demo-truncated-encoder",
        ["pumit_demo", "--output", "{out}", "--encoder", "{encoder}"],
        build_demo_inputs,
        "--encoder.*{encoder}.*not a readable safetensors",
        watch=("out",),
    ),
    Case(
        "demo-missing-seg-dataset",
        ["pumit_demo", "--output", "{out}", "--seg_dataset", "{missing}"],
        build_demo_inputs,
        "--seg_dataset {missing} does not exist",
        watch=("out",),
    ),
    Case(
        "demo-seg-dataset-not-nnunet",
        ["pumit_demo", "--output", "{out}", "--seg_dataset", "{not_a_dataset}"],
        build_demo_inputs,
        "--seg_dataset {not_a_dataset}.*DatasetXXX_Name",
        watch=("out",),
    ),
    Case(
        "demo-output-is-a-file",
        ["pumit_demo", "--output", "{a_file}"],
        build_demo_inputs,
        "--output {a_file} exists and is not a folder",
        watch=("a_file",),
    ),
    Case(
        "demo-unknown-setting",
        ["pumit_demo", "--output", "{out}", "--setting", "huge"],
        build_demo_inputs,
        "--setting.*huge",
        watch=("out",),
    ),
    Case(
        "report-missing-output-folder",
        ["python", "-m", "pumit_seg.app.report", "{missing}"],
        build_demo_inputs,
        "{missing} does not exist",
        watch=("missing",),
    ),
    Case(
        "chaos-phantoms-zero-shape",
        ["python", "-m", "pumit_seg.phantoms.chaos", "{out}", "--shape", "0", "8", "8"],
        build_demo_inputs,
        "--shape|shape and spacing need three positive values",
        watch=("out",),
    ),
    # unknown labels and outputs
    Case(
        "evaluate-unknown-predicted-label",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{dj}", "-np", "1"],
        build_evaluate_unknown_prediction_label,
        "{bad}.*label 7, not defined in .*dataset.json.*--allow_unknown_labels",
        watch=("pred",),
    ),
    Case(
        "evaluate-unknown-reference-label",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{dj}", "-np", "1"],
        build_evaluate_unknown_reference_label,
        "{bad}.*label 5, ",
        watch=("pred",),
    ),
    Case(
        "evaluate-unknown-label-in-worker",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{dj}", "-np", "2"],
        build_evaluate_unknown_prediction_label,
        "{bad}.*label 7, ",
        watch=("pred",),
    ),
    Case(
        "evaluate-existing-default-summary",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{dj}", "-np", "1"],
        build_evaluate_earlier_summary,
        "{pred}/summary.json exists: pass --overwrite",
        watch=("pred",),
    ),
    Case(
        "evaluate-existing-output",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{dj}", "-np", "1", "-o", "{summary}"],
        build_evaluate_earlier_summary,
        "-o {summary} exists: pass --overwrite",
        watch=("pred", "summary"),
    ),
    Case(
        "evaluate-output-is-dataset-json",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{dj}", "-np", "1", "-o", "{dj}", "--overwrite"],
        build_evaluate_folders,
        "-o {dj} is also an input",
        watch=("pred", "dj"),
    ),
    Case(
        "evaluate-output-under-a-file",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{dj}", "-np", "1", "-o", "{a_file}/summary.json"],
        build_evaluate_output_under_file,
        "{a_file}/summary.json cannot be created: {a_file} is a file",
        watch=("pred", "a_file"),
    ),
    Case(
        "evaluate-output-in-read-only-folder",
        ["pumit_evaluate", "{ref}", "{pred}", "-djfile", "{dj}", "-np", "1", "-o", "{read_only}/s.json"],
        build_evaluate_output_read_only,
        "{read_only}/s.json cannot be written",
        watch=("pred", "read_only"),
    ),
    Case(
        "chaos-export-unknown-label",
        ["pumit_chaos", "export", "{out}", "--pred", "{t1}", "{t1_pred}", "--pred", "{t2}", "{t2_pred}"],
        build_chaos_export_unknown_label,
        "{bad}.*label 9, .*--allow_unknown_labels",
        watch=("out", "t2_pred"),
    ),
    Case(
        "chaos-export-fractional-label",
        ["pumit_chaos", "export", "{out}", "--pred", "{t1}", "{t1_pred}", "--pred", "{t2}", "{t2_pred}"],
        build_chaos_export_fractional_label,
        "{bad}.*1.5",
        watch=("out", "t1_pred"),
    ),
    Case(
        "chaos-export-existing-folder",
        ["pumit_chaos", "export", "{out}", "--pred", "{t1}", "{t1_pred}", "--pred", "{t2}", "{t2_pred}"],
        build_chaos_export_earlier,
        "{out} exists and is not empty: pass --overwrite",
        watch=("out", "zip"),
    ),
    Case(
        "chaos-export-existing-zip",
        [
            "pumit_chaos",
            "export",
            "{new_out}",
            "--pred",
            "{t1}",
            "{t1_pred}",
            "--pred",
            "{t2}",
            "{t2_pred}",
            "--zip",
            "{zip}",
        ],  # fmt: skip
        build_chaos_export_earlier,
        "--zip {zip} exists: pass --overwrite",
        watch=("new_out", "zip"),
    ),
    Case(
        "chaos-export-onto-prediction-folder",
        [
            "pumit_chaos",
            "export",
            "{t2_pred}",
            "--pred",
            "{t1}",
            "{t1_pred}",
            "--pred",
            "{t2}",
            "{t2_pred}",
            "--overwrite",
        ],  # fmt: skip
        build_chaos_converted,
        "{t2_pred} is also an input",
        watch=("t2_pred", "t1_pred"),
    ),
    Case(
        "chaos-export-output-holds-predictions",
        [
            "pumit_chaos",
            "export",
            "{raw}/..",
            "--pred",
            "{t1}",
            "{t1_pred}",
            "--pred",
            "{t2}",
            "{t2_pred}",
            "--overwrite",
        ],  # fmt: skip
        build_chaos_converted,
        "replaced as a whole but holds the input",
        watch=("raw", "t1_pred", "t2_pred"),
    ),
    Case(
        "chaos-export-output-under-a-file",
        [
            "pumit_chaos",
            "export",
            "{a_file}/sub",
            "--pred",
            "{t1}",
            "{t1_pred}",
            "--pred",
            "{t2}",
            "{t2_pred}",
        ],
        build_chaos_export_output_under_file,
        "{a_file}/sub cannot be created: {a_file} is a file",
        watch=("a_file",),
    ),
    Case(
        "chaos-export-zip-under-a-file",
        [
            "pumit_chaos",
            "export",
            "{out}",
            "--pred",
            "{t1}",
            "{t1_pred}",
            "--pred",
            "{t2}",
            "{t2_pred}",
            "--zip",
            "{a_file}/s.zip",
        ],  # fmt: skip
        build_chaos_export_output_under_file,
        "--zip {a_file}/s.zip cannot be created",
        watch=("out", "a_file"),
    ),
    Case(
        "chaos-convert-output-under-a-file",
        ["pumit_chaos", "convert", "{chaos}", "{a_file}/raw"],
        build_chaos_train_output_under_file,
        "{a_file}/raw cannot be created: {a_file} is a file",
        watch=("a_file", "chaos"),
    ),
    Case(
        "chaos-convert-into-the-chaos-folder",
        ["pumit_chaos", "convert", "{chaos}", "{chaos}"],
        build_chaos_train,
        "{chaos} is also an input",
        watch=("chaos",),
    ),
    Case(
        "chaos-score-output-under-a-file",
        ["pumit_chaos", "score", "{results}", "{chaos}", "-o", "{a_file}/scores.json", "--allow_missing"],
        lambda tmp: build_chaos_score_missing_series(tmp) | build_outputs_under_a_file(tmp),
        "{a_file}/scores.json cannot be created",
        watch=("a_file",),
    ),
    Case(
        "btcv-convert-output-under-a-file",
        ["pumit_btcv", "convert", "{rawdata}", "{a_file}/raw"],
        build_btcv_output_under_file,
        "{a_file}/raw cannot be created: {a_file} is a file",
        watch=("a_file",),
    ),
    Case(
        "classify-label-99-without-class-count",
        [
            "pumit_classify",
            "train",
            "--data",
            "{npz}",
            "-o",
            "{run}",
            "--model",
            "tiny",
            "--input-size",
            "32",
            "--epochs",
            "1",
        ],  # fmt: skip
        build_medmnist_label_99,
        "{npz}: .*99.*--num-classes",
        watch=("run", "npz"),
    ),
    Case(
        "classify-label-99-outside-file-metadata",
        [
            "pumit_classify",
            "train",
            "--data",
            "{npz}",
            "-o",
            "{run}",
            "--model",
            "tiny",
            "--input-size",
            "32",
            "--epochs",
            "1",
        ],  # fmt: skip
        build_medmnist_label_99_with_metadata,
        "{npz}: train_labels.*label 99.*0\\.\\.2",
        watch=("run", "npz"),
    ),
    Case(
        "classify-label-99-outside-num-classes",
        [
            "pumit_classify",
            "train",
            "--data",
            "{npz}",
            "-o",
            "{run}",
            "--model",
            "tiny",
            "--input-size",
            "32",
            "--epochs",
            "1",
            "--num-classes",
            "3",
        ],  # fmt: skip
        build_medmnist_label_99,
        "{npz}: train_labels.*label 99.*0\\.\\.2",
        watch=("run", "npz"),
    ),
    Case(
        "classify-num-classes-contradicts-official-name",
        [
            "pumit_classify",
            "train",
            "--data",
            "{npz}",
            "-o",
            "{run}",
            "--model",
            "tiny",
            "--num-classes",
            "4",
        ],
        lambda tmp: build_medmnist_label_99(tmp, name="organmnist3d.npz"),
        "{npz}: the class counts disagree: --num-classes 4; organmnist3d has 11 classes",
        watch=("run", "npz"),
    ),
    Case(
        "classify-train-output-under-a-file",
        ["pumit_classify", "train", "--data", "{npz}", "-o", "{a_file}/run", "--model", "tiny"],
        build_medmnist_output_under_file,
        "{a_file}/run cannot be created: {a_file} is a file",
        watch=("a_file", "npz"),
    ),
    Case(
        "classify-train-output-is-the-data",
        ["pumit_classify", "train", "--data", "{npz}", "-o", "{npz}", "--model", "tiny"],
        build_medmnist,
        "{npz} is also an input",
        watch=("npz",),
    ),
    Case(
        "classify-evaluate-existing-output",
        ["pumit_classify", "evaluate", "--weights", "{weights}", "--data", "{npz}", "-o", "{metrics}"],
        build_classify_evaluate_earlier_output,
        "{metrics} exists: pass --overwrite",
        watch=("metrics",),
    ),
    Case(
        "classify-evaluate-output-is-the-weights",
        [
            "pumit_classify",
            "evaluate",
            "--weights",
            "{weights}",
            "--data",
            "{npz}",
            "-o",
            "{weights}",
            "--overwrite",
        ],  # fmt: skip
        build_classify_evaluate_earlier_output,
        "{weights} is also an input",
        watch=("weights",),
    ),
    Case(
        "classify-evaluate-output-under-a-file",
        ["pumit_classify", "evaluate", "--weights", "{weights}", "--data", "{npz}", "-o", "{a_file}/m.json"],
        build_classify_evaluate_output_under_file,
        "{a_file}/m.json cannot be created",
        watch=("a_file",),
    ),
    Case(
        "export-onto-its-own-checkpoint",
        ["pumit_pretrain", "export", "{checkpoint}", "-o", "{checkpoint}"],
        build_export_run,
        "{checkpoint} is also an input",
        watch=("run",),
    ),
    Case(
        "export-onto-its-own-checkpoint-with-overwrite",
        ["pumit_pretrain", "export", "{standalone}", "-o", "{standalone}", "--overwrite"],
        build_export_run,
        "{standalone} is also an input",
        watch=("standalone",),
    ),
    Case(
        "export-onto-a-run-file",
        ["pumit_pretrain", "export", "{standalone}", "-o", "{run}/log.csv", "--overwrite"],
        build_export_run,
        "{run}/log.csv is a file of the training run",
        watch=("run",),
    ),
    Case(
        "export-existing-output",
        ["pumit_pretrain", "export", "{checkpoint}", "-o", "{earlier}"],
        build_export_run,
        "{earlier} exists: pass --overwrite",
        watch=("earlier", "run"),
    ),
    Case(
        "export-output-under-a-file",
        ["pumit_pretrain", "export", "{checkpoint}", "-o", "{a_file}/t.safetensors"],
        build_export_run,
        "{a_file}/t.safetensors cannot be created: {a_file} is a file",
        watch=("a_file", "run"),
    ),
    Case(
        "import-report-onto-the-checkpoint",
        ["pumit_pretrain", "import", "{good}", "-o", "{out}", "--report", "{good}"],
        build_pumit_checkpoints,
        "--report {good} is also an input",
        watch=("folder",),
    ),
    Case(
        "import-output-under-a-file",
        ["pumit_pretrain", "import", "{good}", "-o", "{a_file}/vit.safetensors"],
        build_pumit_checkpoints_output_under_file,
        "{a_file}/vit.safetensors cannot be created: {a_file} is a file",
        watch=("folder",),
    ),
    Case(
        "import-output-in-read-only-folder",
        ["pumit_pretrain", "import", "{good}", "-o", "{read_only}/vit.safetensors"],
        build_pumit_checkpoints_read_only,
        "{read_only}/vit.safetensors cannot be written",
        watch=("folder",),
    ),
    Case(
        "tokenizer-output-under-a-file",
        ["pumit_pretrain", "tokenizer", "--preset", "tiny", "--store", "{store}", "-o", "{a_file}/run"],
        build_tokenizer_output_under_file,
        "{a_file}/run cannot be created: {a_file} is a file",
        watch=("a_file",),
    ),
    Case(
        "tokenizer-output-is-the-store",
        [
            "pumit_pretrain",
            "tokenizer",
            "--preset",
            "tiny",
            "--store",
            "{run_truncated}",
            "-o",
            "{run_truncated}",
        ],
        build_tokenizer_inputs,
        "{run_truncated} is also an input",
        watch=("run_truncated",),
    ),
    Case(
        "mim-output-under-a-file",
        [*MIM_TINY[:5], "{a_file}/run", *MIM_TINY[6:], "--tokenizer", "{tokenizer}"],
        build_mim_output_under_file,
        "{a_file}/run cannot be created: {a_file} is a file",
        watch=("a_file",),
    ),
    Case(
        "mim-output-is-the-tokenizer",
        [*MIM_TINY[:5], "{tokenizer}", *MIM_TINY[6:], "--tokenizer", "{tokenizer}"],
        build_mim_inputs,
        "{tokenizer} is also an input",
        watch=("tokenizer",),
    ),
    Case(
        "prepare-output-under-a-file",
        ["pumit_pretrain", "prepare", "{config}", "-o", "{a_file}/store", "--num-workers", "0"],
        build_pretrain_output_under_file,
        "{a_file}/store cannot be created: {a_file} is a file",
        watch=("a_file",),
    ),
    Case(
        "demo-output-under-a-file",
        ["pumit_demo", "--output", "{a_file}/demo"],
        build_demo_inputs,
        "--output {a_file}/demo cannot be created: {a_file} is a file",
        watch=("a_file",),
    ),
    Case(
        "demo-output-in-read-only-folder",
        ["pumit_demo", "--output", "{read_only}/demo"],
        build_demo_output_read_only,
        "--output {read_only}/demo cannot be written",
        watch=("read_only",),
    ),
    Case(
        "chaos-phantoms-nan-spacing",
        ["python", "-m", "pumit_seg.phantoms.chaos", "{out}", "--spacing", "nan", "1", "1"],
        build_demo_inputs,
        "argument --spacing",
        watch=("out",),
    ),
    # stores, real-world images, planning
    Case(
        "prepare-rerun-other-max-in-plane",
        [
            "pumit_pretrain",
            "prepare",
            "{config}",
            "-o",
            "{out}",
            "--num-workers",
            "0",
            "--max-in-plane",
            "32",
        ],
        build_pretrain_store,
        "{out}.*prepared with other settings.*--max-in-plane: 512 then, 32 now.*--reprocess",
        watch=("out",),
    ),
    Case(
        "prepare-rerun-other-clip-percentiles",
        [
            "pumit_pretrain",
            "prepare",
            "{config}",
            "-o",
            "{out}",
            "--num-workers",
            "0",
            "--clip-percentiles",
            "1",
            "99",
        ],
        build_pretrain_store,
        "prepared with other settings.*--clip-percentiles: \\[0.5, 99.5\\] then, \\[1.0, 99.0\\] now",
        watch=("out",),
    ),
    Case(
        "prepare-merge-parts-of-other-settings",
        ["pumit_pretrain", "prepare", "{config}", "-o", "{out}", "--merge"],
        build_pretrain_parts_of_other_settings,
        "prepared with other settings than the store's.*--max-in-plane: 32 then, 512 now",
        watch=("out",),
    ),
    Case(
        "prepare-empty-dataset-folder",
        ["pumit_pretrain", "prepare", "{config}", "-o", "{out}", "--num-workers", "0"],
        build_pretrain_empty_dataset,
        "dataset 'empty': no image file in .*empty_folder",
        watch=("out",),
    ),
    Case(
        "prepare-dataset-of-label-folders-only",
        ["pumit_pretrain", "prepare", "{config}", "-o", "{out}", "--num-workers", "0"],
        build_pretrain_label_folders_only,
        "dataset 'chaos_gt': no image file .*2 label folder",
        watch=("out",),
    ),
    Case(
        "chaos-convert-missing-slice",
        ["pumit_chaos", "convert", "{chaos}", "{raw}"],
        build_chaos_missing_slice,
        "{series}: 1 slice\\(s\\) missing: a gap of 5 mm between {before} and {after}",
        watch=("raw", "chaos"),
    ),
    Case(
        "chaos-convert-uneven-spacing",
        ["pumit_chaos", "convert", "{chaos}", "{raw}"],
        build_chaos_uneven_spacing,
        "{series}: uneven slice spacing",
        watch=("raw", "chaos"),
    ),
    Case(
        "plan-truncated-image",
        ["pumit_plan_and_preprocess", "-d", "502", "-npfp", "1", "--model", "tiny", "--no_pp"],
        build_plan_truncated_image,
        "{image}: compressed file is cut short",
        watch=("pre", "raw"),
        env={"nnUNet_raw": "{raw}", "nnUNet_preprocessed": "{pre}", "nnUNet_results": "{results}"},
    ),
    Case(
        "plan-truncated-image-verify-integrity",
        [
            "pumit_plan_and_preprocess",
            "-d",
            "502",
            "-npfp",
            "1",
            "--model",
            "tiny",
            "--no_pp",
            "--verify_dataset_integrity",
        ],
        build_plan_truncated_image,
        "{image}: compressed file is cut short",
        watch=("pre", "raw"),
        env={"nnUNet_raw": "{raw}", "nnUNet_preprocessed": "{pre}", "nnUNet_results": "{results}"},
    ),
    Case(
        "plan-nan-image",
        ["pumit_plan_and_preprocess", "-d", "502", "-npfp", "1", "--model", "tiny", "--no_pp"],
        build_plan_nan_image,
        "{image}: 1 NaN and 1 infinite voxels",
        watch=("pre", "raw"),
        env={"nnUNet_raw": "{raw}", "nnUNet_preprocessed": "{pre}", "nnUNet_results": "{results}"},
    ),
    Case(
        "plan-missing-channel-file",
        ["pumit_plan_and_preprocess", "-d", "502", "-npfp", "1", "--model", "tiny", "--no_pp"],
        build_plan_missing_channel,
        "case case_b: missing {missing}",
        watch=("pre", "raw"),
        env={"nnUNet_raw": "{raw}", "nnUNet_preprocessed": "{pre}", "nnUNet_results": "{results}"},
    ),
    Case(
        "plan-missing-label",
        ["pumit_plan_and_preprocess", "-d", "502", "-npfp", "1", "--model", "tiny", "--no_pp"],
        build_plan_missing_label,
        "case case_a: missing {missing}",
        watch=("pre", "raw"),
        env={"nnUNet_raw": "{raw}", "nnUNet_preprocessed": "{pre}", "nnUNet_results": "{results}"},
    ),
    Case(
        "chaos-convert-two-slices-one-position",
        ["pumit_chaos", "convert", "{chaos}", "{raw}"],
        build_chaos_two_slices_one_position,
        "{series}: {second} and {third} lie at the same position",
        watch=("raw", "chaos"),
    ),
    Case(
        "plan-label-shape-mismatch",
        ["pumit_plan_and_preprocess", "-d", "502", "-npfp", "1", "--model", "tiny", "--no_pp"],
        build_plan_label_shape_mismatch,
        "case case_b: its images and label differ in shape .*case_b.nii.gz \\(6, 10, 11\\)",
        watch=("pre", "raw"),
        env={"nnUNet_raw": "{raw}", "nnUNet_preprocessed": "{pre}", "nnUNet_results": "{results}"},
    ),
    Case(
        "plan-extra-channel-file",
        ["pumit_plan_and_preprocess", "-d", "502", "-npfp", "1", "--model", "tiny", "--no_pp"],
        build_plan_extra_channel_file,
        "case case_b: channel file\\(s\\) \\['case_b_0001.nii.gz'\\] beyond the 1 channel",
        watch=("pre", "raw"),
        env={"nnUNet_raw": "{raw}", "nnUNet_preprocessed": "{pre}", "nnUNet_results": "{results}"},
    ),
    # run health and resumed options
    Case(
        "tokenizer-prior-weight-nan",
        [*TOKENIZER_TINY, "--prior-weight", "nan"],
        build_tokenizer_inputs,
        "argument --prior-weight: must be a finite number, got 'nan'",
        watch=("out",),
    ),
    Case(
        "tokenizer-entropy-weight-inf",
        [*TOKENIZER_TINY, "--entropy-weight", "inf"],
        build_tokenizer_inputs,
        "argument --entropy-weight: must be a finite number, got 'inf'",
        watch=("out",),
    ),
    Case(
        "tokenizer-gan-weight-nan",
        [*TOKENIZER_TINY, "--gan-weight", "nan"],
        build_tokenizer_inputs,
        "argument --gan-weight: must be a finite number, got 'nan'",
        watch=("out",),
    ),
    Case(
        "export-nan-checkpoint",
        ["pumit_pretrain", "export", "{checkpoint}", "-o", "{exported}"],
        build_nan_checkpoint,
        "{checkpoint}: the weights of step 3 are not finite .*--allow-non-finite",
        watch=("run", "exported"),
    ),
    Case(
        "tokenizer-resume-with-other-lr",
        [*TOKENIZER_RUN, "--lr", "0.01"],
        build_tokenizer_run,
        "{run} holds a run \\(at step 3\\) started with other options: --lr [0-9.e-]+ -> 0.01\\..*--allow-option-change",
        watch=("run",),
    ),
    Case(
        "tokenizer-resume-with-other-quantizer",
        [*TOKENIZER_RUN, "--quantizer", "hard"],
        build_tokenizer_run,
        "{run} holds a run \\(at step 3\\) started with other options: --quantizer 'soft' -> 'hard'",
        watch=("run",),
    ),
    Case(
        "mim-resume-with-other-mask-ratio",
        [*MIM_RUN, "--mask-ratio", "0.3"],
        build_mim_run,
        "{run} holds a run \\(at step 3\\) started with other options: --mask-ratio 0.55 -> 0.3",
        watch=("run", "tokenizer"),
    ),
]

# Rows whose bug is not fixed yet: expected to fail (strict, so a fix must remove the name from this set).
KNOWN_FAILING: set[str] = set()


def _fill(text: str, values: dict, escape: bool = False) -> str:
    return text.format(**{k: re.escape(str(v)) if escape else str(v) for k, v in values.items()})


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True)] if c.name in KNOWN_FAILING else [])
        for c in CASES
    ],
)
def test_broken_input(case: Case, tmp_path: Path):
    values = case.build(tmp_path)
    before = {name: tree_hash(values[name]) for name in case.watch}
    command = [str(BIN / case.command[0]), *(_fill(a, values) for a in case.command[1:])]
    env = {
        **os.environ,
        "nnUNet_raw": str(tmp_path / "env_raw"),
        "nnUNet_preprocessed": str(tmp_path / "env_preprocessed"),
        "nnUNet_results": str(tmp_path / "env_results"),
        **{k: _fill(v, values) for k, v in case.env.items()},
    }
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"exit code 0 on a broken input:\n{output}"
    assert re.search(_fill(case.message, values, escape=True), output, re.DOTALL), output
    if not case.traceback_ok:
        assert "Traceback (most recent call last)" not in output, output
    for name in case.watch:
        assert tree_hash(values[name]) == before[name], (
            f"{values[name]} changed by the failed call:\n{output}"
        )


def test_tree_hash_sees_names_and_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("1")
    first = tree_hash(tmp_path / "a")
    (tmp_path / "a" / "x.txt").write_text("2")
    second = tree_hash(tmp_path / "a")
    (tmp_path / "a" / "x.txt").rename(tmp_path / "a" / "y.txt")
    assert len({first, second, tree_hash(tmp_path / "a"), tree_hash(tmp_path / "absent")}) == 4
