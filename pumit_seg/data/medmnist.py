"""MedMNIST v2 for classification fine-tuning: loading, batches, the official metrics.

See docs/classification.md and docs/method.md, "Classification head".

Users bring the official ``.npz`` files (``organmnist3d.npz``, ``organmnist3d_64.npz``, ...;
nothing is downloaded here). A file holds ``{train,val,test}_images`` (uint8; 2D
``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB, 3D ``(N, D, H, W)``) and ``{train,val,test}_labels``
(``(N, 1)`` class indices, or ``(N, L)`` 0/1 for the multi-label ChestMNIST). A file may also hold
``num_classes`` (a 0-d integer array, metadata that `write_synthetic_medmnist` writes): the number of
classes (or labels) its labels belong to.

* `load_medmnist` reads and checks a file (every problem names the file and the key) and
  keeps the images as uint8 ``(N, C, D, H, W)`` tensors, a 2D image being ``D = 1``.
* `prepare_batch` turns a uint8 batch into model input on the model's device: [0, 1] like the
  official ``MedMNIST3D`` dataset, the training augmentations, channels as the weights need
  (grey replicated to 3, as the authors do), resizing to the model's input size (trilinear for
  volumes, bicubic in-plane for 2D images, as the authors' script) and the input normalisation
  of pre-training. Resizing after the upload keeps the CPU work at 28^3.
* `medmnist_auc` / `medmnist_acc` / `evaluate_scores` equal the official ``medmnist.Evaluator``
  (``getAUC`` / ``getACC``); AUC is computed from ranks (Mann-Whitney), so no scikit-learn is
  needed at run time.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import Tensor

from pumit_seg.atomic import atomic_path
from pumit_seg.models.mim import IMAGENET_MEAN, IMAGENET_STD  # the ViT's input normalisation
from pumit_seg.models.sac import ANISO_D_2D

__all__ = [
    "TASK_BINARY",
    "TASK_MULTI_CLASS",
    "TASK_MULTI_LABEL",
    "TASK_ORDINAL",
    "TASKS",
    "SPLITS",
    "DatasetInfo",
    "MEDMNIST_INFO",
    "MEDMNIST_3D",
    "MedMNISTSplit",
    "MedMNISTData",
    "load_medmnist",
    "dataset_name_from_path",
    "PreprocessConfig",
    "prepare_batch",
    "INTENSITY_SCALE_MODES",
    "INPUT_NORMS",
    "scores_from_logits",
    "medmnist_auc",
    "medmnist_acc",
    "evaluate_scores",
    "write_synthetic_medmnist",
]

TASK_BINARY = "binary-class"
TASK_MULTI_CLASS = "multi-class"
TASK_MULTI_LABEL = "multi-label, binary-class"
TASK_ORDINAL = "ordinal-regression"  # RetinaMNIST; trained and scored as multi-class, like the official code
TASKS = (TASK_BINARY, TASK_MULTI_CLASS, TASK_MULTI_LABEL, TASK_ORDINAL)
SPLITS = ("train", "val", "test")

# aniso_d of MedMNIST inputs (docs/method.md, "Classification head"): the 3D volumes are isotropic, a 2D image is D = 1.
ANISO_D_3D = 0

INPUT_NORMS = ("imagenet", "none")

# The official MedMNIST baselines' "shape transform" for the mask-like Adrenal and Vessel volumes
# (the authors' script enables it for exactly these two): training voxels x U(0, 1), evaluation x 0.5.
INTENSITY_SCALE_MODES = ("auto", "none", "random")
INTENSITY_SCALE_DATASETS = ("adrenalmnist3d", "vesselmnist3d")
EVAL_INTENSITY_SCALE = 0.5


@dataclass(frozen=True)
class DatasetInfo:
    """Facts of one official dataset (medmnist's ``INFO``), used to check a user's file."""

    task: str
    num_classes: int
    spatial_dims: int
    channels: int


MEDMNIST_INFO: dict[str, DatasetInfo] = {
    "pathmnist": DatasetInfo(TASK_MULTI_CLASS, 9, 2, 3),
    "chestmnist": DatasetInfo(TASK_MULTI_LABEL, 14, 2, 1),
    "dermamnist": DatasetInfo(TASK_MULTI_CLASS, 7, 2, 3),
    "octmnist": DatasetInfo(TASK_MULTI_CLASS, 4, 2, 1),
    "pneumoniamnist": DatasetInfo(TASK_BINARY, 2, 2, 1),
    "retinamnist": DatasetInfo(TASK_ORDINAL, 5, 2, 3),
    "breastmnist": DatasetInfo(TASK_BINARY, 2, 2, 1),
    "bloodmnist": DatasetInfo(TASK_MULTI_CLASS, 8, 2, 3),
    "tissuemnist": DatasetInfo(TASK_MULTI_CLASS, 8, 2, 1),
    "organamnist": DatasetInfo(TASK_MULTI_CLASS, 11, 2, 1),
    "organcmnist": DatasetInfo(TASK_MULTI_CLASS, 11, 2, 1),
    "organsmnist": DatasetInfo(TASK_MULTI_CLASS, 11, 2, 1),
    "organmnist3d": DatasetInfo(TASK_MULTI_CLASS, 11, 3, 1),
    "nodulemnist3d": DatasetInfo(TASK_BINARY, 2, 3, 1),
    "adrenalmnist3d": DatasetInfo(TASK_BINARY, 2, 3, 1),
    "fracturemnist3d": DatasetInfo(TASK_MULTI_CLASS, 3, 3, 1),
    "vesselmnist3d": DatasetInfo(TASK_BINARY, 2, 3, 1),
    "synapsemnist3d": DatasetInfo(TASK_BINARY, 2, 3, 1),
}
# The paper's six (Table 2 order).
MEDMNIST_3D = (
    "organmnist3d",
    "nodulemnist3d",
    "fracturemnist3d",
    "adrenalmnist3d",
    "vesselmnist3d",
    "synapsemnist3d",
)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


@dataclass
class MedMNISTSplit:
    images: Tensor  # uint8 (N, C, D, H, W); D = 1 for 2D images
    labels: Tensor  # int64 (N,) class indices, or (N, L) 0/1 for multi-label

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class MedMNISTData:
    path: str
    name: str  # dataset name from the file name ("organmnist3d"), "" when not an official one
    task: str
    num_classes: int  # model outputs: classes (2 for binary, as the official baselines) or labels
    spatial_dims: int
    channels: int
    splits: dict[str, MedMNISTSplit] = field(default_factory=dict)

    @property
    def aniso_d(self) -> int:
        return ANISO_D_3D if self.spatial_dims == 3 else ANISO_D_2D

    def describe(self) -> str:
        sizes = ", ".join(f"{split} {len(self.splits[split])}" for split in self.splits)
        shape = "x".join(map(str, self.splits["train"].images.shape[2:]))
        return (
            f"{self.path}: {self.name or 'unnamed'}, {self.spatial_dims}D {shape}, {self.channels} channel(s), "
            f"task {self.task!r}, {self.num_classes} outputs; {sizes}"
        )


def dataset_name_from_path(path: str | os.PathLike) -> str:
    """``.../OrganMNIST3D_64.npz`` -> ``organmnist3d`` (size suffixes of MedMNIST+ dropped)."""
    stem = Path(path).name.lower()
    stem = stem[: -len(".npz")] if stem.endswith(".npz") else stem
    return re.sub(r"_\d+$", "", stem)


ZIP_MAGIC = b"PK\x03\x04"  # a .npz file is a zip archive of .npy files


METADATA_NUM_CLASSES = "num_classes"  # optional .npz entry: the class count of the file's labels


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such MedMNIST file")
    wanted = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
    with open(path, "rb") as handle:
        if handle.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            raise ValueError(f"{path}: not a .npz file (it does not start like a zip archive)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not a .npz archive of named arrays")
        with loaded as npz:
            missing = [key for key in wanted if key not in npz.files]
            present = sorted(npz.files)
            arrays = {} if missing else {key: npz[key] for key in wanted}
            if not missing and METADATA_NUM_CLASSES in npz.files:
                arrays[METADATA_NUM_CLASSES] = npz[METADATA_NUM_CLASSES]
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as error:
        raise ValueError(
            f"{path}: cannot read it as a .npz file (truncated or not an npz?): {error}"
        ) from error
    if missing:
        raise ValueError(
            f"{path}: not a MedMNIST file: missing key(s) {', '.join(missing)} "
            f"(it has: {', '.join(present) or 'nothing'}; expected train/val/test _images and _labels)"
        )
    return arrays


def _images_to_tensor(images: np.ndarray, spatial_dims: int, channels: int, where: str) -> Tensor:
    """(N, H, W) / (N, H, W, C) / (N, D, H, W) -> uint8 (N, C, D, H, W) in [0, 255]."""
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating) or images.size == 0:
            raise ValueError(f"{where}: images must be uint8 (or float in [0, 1]), found {images.dtype}")
        low, high = float(images.min()), float(images.max())
        if low < 0 or high > 1:
            raise ValueError(f"{where}: float images must lie in [0, 1], found [{low:g}, {high:g}]")
        images = np.round(images * 255).astype(np.uint8)
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if spatial_dims == 2:
        if tensor.dim() == 3:
            tensor = tensor.unsqueeze(-1)
        return tensor.permute(0, 3, 1, 2).unsqueeze(2).contiguous()  # (N, C, 1, H, W)
    return tensor.unsqueeze(1)  # (N, 1, D, H, W)


def _layout(images: np.ndarray, where: str, info: DatasetInfo | None) -> tuple[int, int]:
    """(spatial_dims, channels) of an images array."""
    if images.ndim == 3:
        layout = (2, 1)
    elif images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
        layout = (2, 3)
    elif images.ndim == 4:
        layout = (3, 1)
    else:
        raise ValueError(
            f"{where}: images of shape {images.shape} are neither 2D (N, H, W[, 3]) nor 3D (N, D, H, W)"
        )
    if info is not None and layout != (info.spatial_dims, info.channels):
        raise ValueError(
            f"{where}: shape {images.shape} does not fit this dataset "
            f"({info.spatial_dims}D, {info.channels} channel(s) expected)"
        )
    return layout


def _labels_to_tensor(labels: np.ndarray, count: int, where: str) -> np.ndarray:
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] != count:
        raise ValueError(
            f"{where}: labels of shape {labels.shape} do not fit {count} images (expected ({count}, 1))"
        )
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError(f"{where}: labels must be integers, found {labels.dtype} with fractions")
    return labels.astype(np.int64)


def _metadata_num_classes(arrays: dict, path: Path) -> int | None:
    if METADATA_NUM_CLASSES not in arrays:
        return None
    value = arrays[METADATA_NUM_CLASSES]
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer) or int(value) < 1:
        raise ValueError(
            f"{path}: {METADATA_NUM_CLASSES} must be one positive integer, found {value.dtype} {value.tolist()}"
        )
    return int(value)


def _shown(values) -> str:
    values = [int(v) for v in values]
    return ", ".join(map(str, values[:10])) + (", ..." if len(values) > 10 else "")


def load_medmnist(
    path: str | os.PathLike,
    task: str | None = None,
    num_classes: int | None = None,
    default_num_classes: int | None = None,
) -> MedMNISTData:
    """Read and check a MedMNIST v2 ``.npz`` file (see the module docstring for the layout).

    The number of classes (labels, for multi-label) comes from `num_classes` (``--num-classes``), the
    file's ``num_classes`` entry or the official dataset table when the file name is an official one
    (``organmnist3d.npz``, ``organmnist3d_64.npz``); sources that disagree are an error. Without any,
    several label columns mean multi-label (one label per column), labels 0 / 1 binary, and
    `default_num_classes` (a trained model's outputs) is used if given; otherwise a multi-class file is
    refused (its labels cannot tell how many classes there are). The task comes from `task`, else the
    official table, else the class count and the labels. A label outside the classes is an error naming
    the file, the split and the label; so are images and labels of different counts and splits of
    different image shapes.
    """
    path = Path(path)
    arrays = _read_npz(path)
    name = dataset_name_from_path(path)
    info = MEDMNIST_INFO.get(name)
    sources = {}  # where the class count comes from -> count
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"--num-classes must be >= 1, got {num_classes}")
        sources[f"--num-classes {num_classes}"] = num_classes
    metadata = _metadata_num_classes(arrays, path)
    if metadata is not None:
        sources[f"its {METADATA_NUM_CLASSES} entry ({metadata})"] = metadata
    if info is not None:
        sources[f"{name} has {info.num_classes} classes"] = info.num_classes
    if len(set(sources.values())) > 1:
        raise ValueError(f"{path}: the class counts disagree: {'; '.join(sources)}")
    count_source, count = next(iter(sources.items()), (None, None))
    if task is not None and task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    task = task or (info.task if info else None)

    layout = None
    labels_np: dict[str, np.ndarray] = {}
    images_t: dict[str, Tensor] = {}
    for split in SPLITS:
        images = arrays[f"{split}_images"]
        where = f"{path}: {split}_images"
        split_layout = _layout(images, where, info)
        if layout is None:
            layout = split_layout
        elif split_layout != layout or images.shape[1:] != arrays["train_images"].shape[1:]:
            raise ValueError(
                f"{where}: shape {images.shape} differs from train_images {arrays['train_images'].shape}"
            )
        if images.shape[0] == 0:
            raise ValueError(f"{where}: no images")
        labels_np[split] = _labels_to_tensor(
            arrays[f"{split}_labels"], images.shape[0], f"{path}: {split}_labels"
        )
        images_t[split] = _images_to_tensor(images, *split_layout, where)
    spatial_dims, channels = layout

    columns = {labels.shape[1] for labels in labels_np.values()}
    if len(columns) != 1:
        raise ValueError(f"{path}: the splits' labels have different numbers of columns {sorted(columns)}")
    columns = columns.pop()
    all_labels = np.concatenate(list(labels_np.values()))
    if task is None:
        if columns > 1:
            task = TASK_MULTI_LABEL
        elif count is not None:
            task = TASK_BINARY if count == 2 else TASK_MULTI_CLASS
        elif all_labels.min() >= 0 and all_labels.max() <= 1:
            task = TASK_BINARY
        else:
            task = TASK_MULTI_CLASS
    if task == TASK_MULTI_LABEL:
        outputs = columns
        if count is not None and count != columns:
            raise ValueError(f"{path}: the labels have {columns} columns, but {count_source}")
        for split, labels in labels_np.items():
            if not np.isin(labels, (0, 1)).all():
                raise ValueError(
                    f"{path}: {split}_labels must be 0 or 1 for task {task!r}; "
                    f"found label {_shown(np.setdiff1d(np.unique(labels), (0, 1)))}"
                )
    else:
        if columns != 1:
            raise ValueError(
                f"{path}: task {task!r} needs one label per image, the labels have {columns} columns"
            )
        if task == TASK_BINARY:
            if count is not None and count != 2:
                raise ValueError(f"{path}: task {task!r} has 2 classes, but {count_source}")
            outputs, count_source = 2, count_source or f"task {task!r}"
        elif count is not None:
            outputs = count
        elif default_num_classes is not None:
            outputs, count_source = default_num_classes, f"the model's {default_num_classes} classes"
        else:
            raise ValueError(
                f"{path}: the number of classes is unknown (labels found: {_shown(np.unique(all_labels))}): "
                f"{name!r} is not an official MedMNIST name and the file has no {METADATA_NUM_CLASSES} entry; "
                "pass --num-classes"
            )
        for split, labels in labels_np.items():
            outside = np.unique(labels[(labels < 0) | (labels >= outputs)])
            if outside.size:
                raise ValueError(
                    f"{path}: {split}_labels holds label {_shown(outside)}, outside the class indices "
                    f"0..{outputs - 1} ({count_source})"
                )
    if task != TASK_MULTI_LABEL and outputs < 2:
        raise ValueError(f"{path}: a classifier needs at least 2 classes, the labels give {outputs}")

    splits = {}
    for split in SPLITS:
        labels = torch.from_numpy(labels_np[split])
        splits[split] = MedMNISTSplit(images_t[split], labels if task == TASK_MULTI_LABEL else labels[:, 0])
    return MedMNISTData(str(path), name if info else "", task, outputs, spatial_dims, channels, splits)


# --------------------------------------------------------------------------------------
# Batches: [0, 1], augmentation, channels, resizing, normalisation
# --------------------------------------------------------------------------------------


@dataclass
class PreprocessConfig:
    """How a uint8 MedMNIST batch becomes model input. Stored in the classifier's weight file."""

    spatial_dims: int = 3
    in_channels: int = 3  # the model's input channels (3 for PUMIT / EVA-02 weights: grey replicated)
    input_size: int = 160  # the paper: the pre-training input size (160^3; 160^2 for 2D images)
    input_norm: str = "imagenet"  # "imagenet": as in the ViT's pre-training; "none": [0, 1] as is
    intensity_scale: str = "none"  # "random": official shape transform (train x U(0,1), eval x 0.5)
    flip_prob: float = 0.0  # probability of a random flip per spatial axis in training

    def check(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.input_size < 1:
            raise ValueError(f"--input-size must be >= 1, got {self.input_size}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"--input-norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        if self.intensity_scale not in ("none", "random"):
            raise ValueError(
                f"--intensity-scale must be 'none' or 'random' here, got {self.intensity_scale!r}"
            )
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"--flip-prob must lie in [0, 1], got {self.flip_prob}")
        if self.input_norm == "imagenet" and self.in_channels not in (1, len(IMAGENET_MEAN)):
            raise ValueError(
                f"ImageNet normalisation needs 1 or 3 input channels, the model has {self.in_channels}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_intensity_scale(mode: str, dataset_name: str) -> str:
    """``auto`` -> ``random`` for Adrenal / Vessel (official baselines, the authors' script), else ``none``."""
    if mode not in INTENSITY_SCALE_MODES:
        raise ValueError(f"--intensity-scale must be one of {INTENSITY_SCALE_MODES}, got {mode!r}")
    if mode == "auto":
        return "random" if dataset_name in INTENSITY_SCALE_DATASETS else "none"
    return mode


def _match_channels(x: Tensor, channels: int) -> Tensor:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, *x.shape[2:])  # grey replicated (the authors' as_rgb)
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    raise ValueError(f"cannot feed {x.shape[1]}-channel images to a model with {channels} input channels")


def prepare_batch(
    images: Tensor,
    config: PreprocessConfig,
    device: torch.device | str,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """uint8 (B, C, D, H, W) -> float model input (B, in_channels, S, S, S) (2D: (B, C, 1, S, S)).

    Augmentations (``train`` only) draw from `generator` (a CPU generator, so runs repeat
    exactly on any device): random flips per sample and axis, and the official intensity
    scaling when ``config.intensity_scale == "random"`` (evaluation then scales by 0.5).
    """
    batch = images.shape[0]
    x = images.to(device=device, non_blocking=True).float().div_(255.0)
    spatial_axes = (2, 3, 4) if config.spatial_dims == 3 else (3, 4)
    if config.intensity_scale == "random":
        if train:
            scale = torch.rand(batch, generator=generator).to(device)
            x = x * scale.view(-1, 1, 1, 1, 1)
        else:
            x = x * EVAL_INTENSITY_SCALE
    if train and config.flip_prob > 0:
        flips = torch.rand(batch, len(spatial_axes), generator=generator) < config.flip_prob
        for axis_index, axis in enumerate(spatial_axes):
            chosen = flips[:, axis_index].to(device).view(-1, 1, 1, 1, 1)
            x = torch.where(chosen, x.flip(axis), x)
    x = _match_channels(x, config.in_channels)
    size = config.input_size
    if config.spatial_dims == 3:
        if tuple(x.shape[2:]) != (size,) * 3:
            x = F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)
    elif tuple(x.shape[3:]) != (size, size):
        x = F.interpolate(x[:, :, 0], size=(size, size), mode="bicubic", align_corners=False).unsqueeze(2)
    if config.input_norm == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=x.device)
        std = torch.tensor(IMAGENET_STD, device=x.device)
        if config.in_channels == 1:  # one grey channel: the channels' average statistics
            mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
        x = (x - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    return x.contiguous()


# --------------------------------------------------------------------------------------
# Metrics: the official MedMNIST evaluator
# --------------------------------------------------------------------------------------


def scores_from_logits(logits: Tensor, task: str) -> Tensor:
    """Model outputs -> the scores the official evaluator takes: sigmoid for multi-label, else softmax."""
    logits = logits.float()
    return torch.sigmoid(logits) if task == TASK_MULTI_LABEL else torch.softmax(logits, dim=1)


def _binary_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC from ranks (ties averaged): equals sklearn's roc_auc_score; NaN when one class is absent."""
    positive = y_true.astype(bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(y_score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _as_arrays(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true.cpu() if isinstance(y_true, Tensor) else y_true)
    y_score = np.asarray(y_score.cpu() if isinstance(y_score, Tensor) else y_score, dtype=np.float64)
    if y_score.ndim != 2 or y_true.shape[0] != y_score.shape[0]:
        raise ValueError(f"scores {y_score.shape} must be (N, classes) for {y_true.shape[0]} labels")
    if not np.isfinite(y_score).all():
        raise ValueError("the scores hold NaN or inf (a diverged model?)")
    return y_true, y_score


def _mean_defined(values: Sequence[float], what: str) -> float:
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        raise ValueError(f"AUC is undefined: no {what} has both positive and negative samples")
    return float(np.mean(defined))


def medmnist_auc(y_true, y_score, task: str) -> float:
    """The official ``getAUC``: binary on the last column, multi-class one-vs-rest mean, multi-label mean.

    Where the official code would fail (a class or label without positives or without negatives,
    e.g. in a small validation split) that class is left out of the mean instead.
    """
    y_true, y_score = _as_arrays(y_true, y_score)
    if task == TASK_BINARY:
        auc = _binary_auc(y_true.reshape(-1), y_score[:, -1])
        if math.isnan(auc):
            raise ValueError("AUC is undefined: the labels hold only one class")
        return auc
    if task == TASK_MULTI_LABEL:
        return _mean_defined(
            [_binary_auc(y_true[:, i], y_score[:, i]) for i in range(y_score.shape[1])], "label"
        )
    labels = y_true.reshape(-1)
    return _mean_defined([_binary_auc(labels == i, y_score[:, i]) for i in range(y_score.shape[1])], "class")


def medmnist_acc(y_true, y_score, task: str, threshold: float = 0.5) -> float:
    """The official ``getACC``: binary ``score[:, -1] > threshold``, multi-label per-label mean, else argmax."""
    y_true, y_score = _as_arrays(y_true, y_score)
    if task == TASK_MULTI_LABEL:
        predicted = y_score >= threshold  # the official code: below threshold -> 0, else 1
        return float(np.mean((predicted == y_true.astype(bool)).mean(axis=0)))
    labels = y_true.reshape(-1)
    if task == TASK_BINARY:
        return float(np.mean((y_score[:, -1] > threshold) == labels.astype(bool)))
    return float(np.mean(np.argmax(y_score, axis=1) == labels))


def evaluate_scores(y_true, y_score, task: str) -> dict[str, float]:
    return {"auc": medmnist_auc(y_true, y_score, task), "acc": medmnist_acc(y_true, y_score, task)}


# --------------------------------------------------------------------------------------
# Synthetic files in the official layout (tests, the benchmark's code path, trying the CLI)
# --------------------------------------------------------------------------------------


def write_synthetic_medmnist(
    path: str | os.PathLike,
    task: str = TASK_MULTI_CLASS,
    num_classes: int = 3,
    spatial_dims: int = 3,
    size: int = 28,
    samples: Sequence[int] = (96, 32, 64),
    seed: int = 0,
) -> None:
    """Write a ``.npz`` in MedMNIST layout whose classes a simple intensity cue separates.

    Each image is noise plus a ball (disc in 2D) at a random place; the class sets the brightness
    of both (multi-class / binary). For multi-label, label i puts a bright ball in region i.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    rng = np.random.default_rng(seed)
    shape = (size,) * spatial_dims
    grid = np.stack(np.meshgrid(*[np.arange(size)] * spatial_dims, indexing="ij"), axis=-1)
    radius = size / 3
    arrays = {}
    for split, count in zip(SPLITS, samples, strict=True):
        images = rng.normal(40, 12, size=(count, *shape))
        if task == TASK_MULTI_LABEL:
            labels = rng.integers(0, 2, size=(count, num_classes))
            for index in range(count):
                for label in np.flatnonzero(labels[index]):
                    centre = np.full(spatial_dims, size / 2)
                    centre[label % spatial_dims] = size * (0.25 if label < spatial_dims else 0.75)
                    inside = np.linalg.norm(grid - centre, axis=-1) < radius / 2
                    images[index][inside] += 160
        else:
            classes = 2 if task == TASK_BINARY else num_classes
            # every class appears in every split (the official evaluator needs it)
            labels = (np.arange(count) % classes)[rng.permutation(count)][:, None]
            for index in range(count):
                level = labels[index, 0] / max(classes - 1, 1)
                centre = rng.uniform(radius + 1, size - radius - 1, size=spatial_dims)
                inside = np.linalg.norm(grid - centre, axis=-1) < radius
                images[index] += 50 * level
                images[index][inside] += 60 + 120 * level
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    arrays[METADATA_NUM_CLASSES] = np.array(2 if task == TASK_BINARY else num_classes)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
