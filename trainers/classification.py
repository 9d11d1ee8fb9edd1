"""`pumit_classify`: fine-tune the universal ViT on MedMNIST v2 and evaluate it.

    pumit_classify train    --data organmnist3d.npz -o RUN [--pretrained encoder.safetensors] [--lr-sweep ...]
    pumit_classify evaluate --weights RUN/best_model.safetensors --data organmnist3d.npz [--split test]

Recipe (the paper's, after the official MedMNIST baselines): the CLS token after the final
LayerNorm -> Linear; AdamW (weight decay 0.01, none on norms, biases, position embedding and
CLS token: `pumit_seg.trainers.optim`), batch 32, 100 epochs, learning rate x0.1 after 50 % and
75 % of the epochs, the model of the epoch with the best validation AUC is kept and scored on
the test split; optionally a sweep over learning rates, choosing by validation AUC. Volumes
are resized to 160^3 (2D images to 160^2, D = 1, aniso_d 5); 3D MedMNIST volumes are isotropic
(aniso_d 0). Cross entropy (binary tasks too, over 2 outputs, as the official baselines), BCE
for multi-label. bf16 autocast on CUDA.

A run folder holds ``config.json``, ``log.csv`` (one row per epoch), ``curves.png``,
``best_model.safetensors`` (the classifier with its preprocessing and task in the header, what
``evaluate`` reads), ``checkpoint_last.safetensors`` + ``checkpoint_state.pt`` (optimizer and
progress, read with ``weights_only=True``) and, when done, ``results.json``. Starting the same
command again resumes exactly where it stopped; a folder of a different configuration is refused.
A step with a NaN / inf loss or gradient is skipped, never applied (counted in ``log.csv``, column
``skipped_steps``); after ``--max-bad-steps`` (5) such steps in a row, or a validation loss that is not
finite, the run stops with exit status 1 and is not scored, its best model and last checkpoint kept; in
an ``--lr-sweep`` that learning rate is left out.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from pumit_seg.atomic import atomic_path, write_json_atomic
from pumit_seg.cli_checks import check_output_path, exit_on_bad_input, int_in_range
from pumit_seg.data.medmnist import (
    INPUT_NORMS,
    INTENSITY_SCALE_MODES,
    TASK_MULTI_LABEL,
    TASKS,
    MedMNISTData,
    PreprocessConfig,
    evaluate_scores,
    load_medmnist,
    prepare_batch,
    resolve_intensity_scale,
    scores_from_logits,
)
from pumit_seg.models.classifier import DEFAULT_PATCH_SIZE, ViTClassifier
from pumit_seg.models.vit import VIT_SIZES, build_universal_vit, load_pretrained_encoder
from pumit_seg.plotting import pyplot, save_figure
from pumit_seg.trainers.optim import build_adamw
from pumit_seg.trainers.pretrain_base import add_config_arguments, config_from_args
from pumit_seg.weights import load_model, load_state_dict_file, read_header, save_model

__all__ = [
    "ClassificationConfig",
    "train_classifier",
    "fit_classifier",
    "sweep_learning_rates",
    "evaluate_classifier",
    "predict",
    "lr_at_epoch",
    "select_best_epoch",
    "TrainingDiverged",
    "main",
]

PRECISIONS = ("auto", "fp32", "bf16")
INPUT_NORM_MODES = ("auto", *INPUT_NORMS)
# How a pumit_classify user lifts load_pretrained_encoder's refusals (only unpickling can be allowed).
WEIGHT_LOAD_HINTS = {
    "allow_pickle": "add --trust-pickle",
    "allow_non_finite": "not offered by pumit_classify: use weights without NaN / inf",
    "allow_partial": "not offered by pumit_classify: give weights of the --model size",
}
DEFAULT_IN_CHANNELS = 3  # the authors' and EVA-02's weights take RGB; grey volumes are replicated
BEST_MODEL = "best_model.safetensors"
LAST_WEIGHTS = "checkpoint_last.safetensors"
LAST_STATE = "checkpoint_state.pt"
RESULTS = "results.json"
CONFIG = "config.json"
LOG = "log.csv"
CURVES = "curves.png"
STATE_FORMAT = 1


class TrainingDiverged(ValueError):
    """--max-bad-steps training steps in a row with a NaN / inf loss or gradient, or a validation loss that
    is not finite (a learning rate too high): the run stops without scoring, its last good epoch kept."""


# Options that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = ("device", "output_dir", "lr_sweep", "trust_pickle", "max_bad_steps")


@dataclass
class ClassificationConfig:
    data: str = field(default="", metadata={"help": "MedMNIST v2 .npz file (e.g. organmnist3d.npz)"})
    output_dir: str = field(
        default="", metadata={"help": "run folder: log, pictures, checkpoints, results", "aliases": ("-o",)}
    )
    model: str = field(default="base", metadata={"help": f"ViT size, one of {sorted(VIT_SIZES)}"})
    pretrained: str | None = field(
        default=None,
        metadata={
            "help": "encoder weights: our safetensors, the authors' or EVA-02 checkpoints; none = random init"
        },
    )
    trust_pickle: bool = field(
        default=False,
        metadata={
            "help": "allow pickled objects in a --pretrained torch checkpoint: unpickling runs code chosen by "
            "the file's author, use only for files you trust",
        },
    )
    norm_eps: float | None = field(
        default=None,
        metadata={"help": "ViT LayerNorm eps; default: the weight file's header, else the preset's (1e-6)"},
    )
    in_channels: int | None = field(
        default=None,
        metadata={
            "help": "model input channels; default: the weight file's header, else 3 (PUMIT / EVA-02 weights "
            "take 3: grey is replicated)"
        },
    )
    input_size: int = field(
        default=160, metadata={"help": "images are resized to this size (S^3, or S^2 for 2D)"}
    )
    input_norm: str = field(
        default="auto",
        metadata={
            "help": f"input normalisation, one of {INPUT_NORM_MODES}; auto: what the weight file's header "
            "names, else imagenet (the ViT's pre-training input)"
        },
    )
    intensity_scale: str = field(
        default="auto",
        metadata={
            "help": "official MedMNIST shape transform (train x U(0,1), eval x 0.5); auto = on for adrenal/vessel"
        },
    )
    flip_prob: float = field(
        default=0.0, metadata={"help": "training augmentation: flip probability per axis"}
    )
    task: str | None = field(default=None, metadata={"help": f"override the task, one of {TASKS}"})
    num_classes: int | None = field(
        default=None,
        metadata={
            "help": "number of classes; default: the official MedMNIST name of --data or the file's num_classes "
            "entry (a label outside the classes is an error)"
        },
    )
    epochs: int = field(default=100, metadata={"help": "training epochs"})
    batch_size: int = field(default=32, metadata={"help": "batch size (training and evaluation)"})
    lr: float = field(default=1e-5, metadata={"help": "learning rate (ignored with --lr-sweep)"})
    lr_sweep: tuple[float, ...] = field(
        default=(), metadata={"help": "learning rates to try, one run each; the best validation AUC wins"}
    )
    lr_milestones: tuple[float, ...] = field(
        default=(0.5, 0.75),
        metadata={"help": "fractions of the epochs after which the lr is multiplied by --lr-gamma"},
    )
    lr_gamma: float = field(default=0.1, metadata={"help": "lr factor at each milestone"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (none on norms/biases)"})
    grad_checkpointing: bool = field(
        default=False, metadata={"help": "recompute ViT blocks in backward (memory)"}
    )
    precision: str = field(
        default="auto", metadata={"help": "auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    seed: int = field(default=0, metadata={"help": "random seed (initialisation, shuffling, augmentation)"})
    max_bad_steps: int = field(
        default=5,
        metadata={
            "help": "stop the run (non-zero exit, nothing scored) after this many steps in a row with a NaN / "
            "inf loss or gradient; such steps are skipped, never applied"
        },
    )

    def check(self) -> None:
        """Raise ValueError naming the option for values that cannot work."""
        if not self.data:
            raise ValueError("--data is required (a MedMNIST v2 .npz file)")
        if not self.output_dir:
            raise ValueError("--output-dir / -o is required")
        if self.model not in VIT_SIZES:
            raise ValueError(f"--model must be one of {sorted(VIT_SIZES)}, got {self.model!r}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"--num-classes must be >= 2, got {self.num_classes}")
        for name in ("epochs", "batch_size", "in_channels", "input_size", "max_bad_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name, value in [("lr", self.lr), *(("lr-sweep", lr) for lr in self.lr_sweep)]:
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"--{name} must be a finite number > 0, got {value}")
        if len(set(self.lr_sweep)) != len(self.lr_sweep):
            raise ValueError(f"--lr-sweep lists a learning rate twice: {list(self.lr_sweep)}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"--lr-gamma must lie in (0, 1], got {self.lr_gamma}")
        if any(not 0 < m < 1 for m in self.lr_milestones) or list(self.lr_milestones) != sorted(
            self.lr_milestones
        ):
            raise ValueError(
                f"--lr-milestones must be increasing fractions in (0, 1), got {list(self.lr_milestones)}"
            )
        if self.input_norm not in INPUT_NORM_MODES:
            raise ValueError(f"--input-norm must be one of {INPUT_NORM_MODES}, got {self.input_norm!r}")
        if self.intensity_scale not in INTENSITY_SCALE_MODES:
            raise ValueError(
                f"--intensity-scale must be one of {INTENSITY_SCALE_MODES}, got {self.intensity_scale!r}"
            )
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"--flip-prob must lie in [0, 1], got {self.flip_prob}")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.norm_eps is not None and not self.norm_eps > 0:
            raise ValueError(f"--norm-eps must be > 0, got {self.norm_eps}")
        if self.pretrained is not None and not Path(self.pretrained).is_file():
            raise ValueError(f"--pretrained {self.pretrained}: no such file")


# --------------------------------------------------------------------------------------
# Pieces: schedule, selection, devices, prediction
# --------------------------------------------------------------------------------------


def lr_at_epoch(base_lr: float, epoch: int, epochs: int, milestones=(0.5, 0.75), gamma: float = 0.1) -> float:
    """Step schedule: ``base_lr * gamma ** k`` where k milestones (fractions of `epochs`) have passed.

    With 100 epochs: epochs 0-49 at lr, 50-74 at 0.1 lr, 75-99 at 0.01 lr (torch's MultiStepLR
    with milestones [50, 75], stepped once per epoch, as the official baselines).
    """
    passed = sum(epoch >= m * epochs for m in milestones)
    return base_lr * gamma**passed


def select_best_epoch(val_aucs) -> int:
    """Index of the first epoch with the highest validation AUC (a later tie does not replace it)."""
    best, best_auc = -1, -math.inf
    for epoch, auc in enumerate(val_aucs):
        if auc > best_auc:
            best, best_auc = epoch, auc
    return best


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _autocast(precision: str, device: torch.device):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _loss_fn(task: str) -> nn.Module:
    return nn.BCEWithLogitsLoss() if task == TASK_MULTI_LABEL else nn.CrossEntropyLoss()


def _targets(labels: Tensor, task: str, device: torch.device) -> Tensor:
    return labels.to(device).float() if task == TASK_MULTI_LABEL else labels.to(device).long()


@torch.inference_mode()
def predict(
    model: ViTClassifier,
    images: Tensor,
    labels: Tensor,
    preprocess: PreprocessConfig,
    task: str,
    aniso_d: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    desc: str | None = None,
) -> tuple[Tensor, float]:
    """Scores (softmax, or sigmoid for multi-label) of every image, and the mean loss."""
    model.eval()
    loss_fn = _loss_fn(task)
    scores, loss_sum = [], 0.0
    starts = range(0, images.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=desc is None):
        x = prepare_batch(images[start : start + batch_size], preprocess, device, train=False)
        with _autocast(precision, device):
            logits = model(x, aniso_d)
        logits = logits.float()
        targets = _targets(labels[start : start + batch_size], task, device)
        loss_sum += loss_fn(logits, targets).item() * x.shape[0]
        scores.append(scores_from_logits(logits, task).cpu())
    return torch.cat(scores), loss_sum / images.shape[0]


def _evaluate_split(model, data: MedMNISTData, split: str, preprocess, batch_size, device, precision) -> dict:
    labels = data.splits[split].labels
    scores, loss = predict(
        model, data.splits[split].images, labels, preprocess, data.task, data.aniso_d, batch_size, device,
        precision, desc=f"{split}",
    )  # fmt: skip
    if not math.isfinite(loss) or not torch.isfinite(scores).all():
        raise TrainingDiverged(
            f"{data.path}: {split} split: the loss became {loss} (the model's outputs are not finite)"
        )
    try:
        metrics = evaluate_scores(labels.numpy(), scores.numpy(), data.task)
    except ValueError as error:
        raise ValueError(f"{data.path}: {split} split: {error}") from error
    return {"loss": loss, **metrics}


# --------------------------------------------------------------------------------------
# Run folder: config, log, pictures, checkpoints
# --------------------------------------------------------------------------------------


def _run_identity(config: ClassificationConfig) -> dict:
    values = dataclasses.asdict(config)
    values["data"] = os.path.abspath(values["data"])
    if values["pretrained"]:
        values["pretrained"] = os.path.abspath(values["pretrained"])
    for name in RESUMABLE_CHANGES:
        values.pop(name)
    return json.loads(json.dumps(values))  # tuples -> lists, as read back from config.json


def _check_run_folder(run_dir: Path, config: ClassificationConfig) -> bool:
    """True when `run_dir` holds this configuration's run; refuse a folder of another one."""
    config_path = run_dir / CONFIG
    if not config_path.exists():
        leftovers = [
            name for name in (LAST_WEIGHTS, LAST_STATE, BEST_MODEL, RESULTS) if (run_dir / name).exists()
        ]
        if leftovers:
            raise ValueError(f"{run_dir}: holds {', '.join(leftovers)} but no {CONFIG}; choose another -o")
        return False
    try:
        saved = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path}: unreadable ({error}); choose another -o") from error
    wanted = _run_identity(config)
    differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differing:
        details = ", ".join(
            f"--{k.replace('_', '-')} {saved.get(k)!r} -> {wanted.get(k)!r}" for k in differing
        )
        raise ValueError(
            f"{run_dir}: holds a run of another configuration ({details}); choose another -o or repeat its options"
        )
    return True


def _write_log(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        # rows of an older run may lack a column
        columns = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _plot_curves(path: Path, rows: list[dict], best_epoch: int, title: str) -> None:
    plt = pyplot()
    epochs = [row["epoch"] for row in rows]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in rows], label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in rows], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_metric.plot(epochs, [row["val_auc"] for row in rows], label="validation AUC")
    ax_metric.plot(epochs, [row["val_acc"] for row in rows], label="validation ACC")
    ax_metric.axvline(best_epoch, color="grey", linestyle="--", label=f"selected epoch {best_epoch}")
    ax_metric.set(xlabel="epoch", ylim=(0, 1.02), title="validation metrics")
    ax_metric.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def _save_checkpoint(run_dir: Path, model: ViTClassifier, optimizer, epoch: int, state: dict) -> None:
    """Weights (safetensors) first, then the optimizer / progress state; both name the epoch they hold."""
    save_model(model, run_dir / LAST_WEIGHTS, extra={"completed_epochs": epoch})
    payload = {
        "format": STATE_FORMAT,
        "completed_epochs": epoch,
        "optimizer": optimizer.state_dict(),
        **state,
    }
    with atomic_path(run_dir / LAST_STATE) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(run_dir: Path, model: ViTClassifier, optimizer) -> dict:
    weights_path, state_path = run_dir / LAST_WEIGHTS, run_dir / LAST_STATE
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types on a broken file
        raise ValueError(f"{state_path}: unreadable checkpoint state ({error}); choose another -o") from error
    header_epoch = read_header(weights_path).get("completed_epochs")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{state_path}: not a checkpoint state of this trainer")
    if header_epoch != state["completed_epochs"]:
        raise ValueError(
            f"{run_dir}: {LAST_WEIGHTS} holds epoch {header_epoch} but {LAST_STATE} epoch "
            f"{state['completed_epochs']} (interrupted while saving?); choose another -o"
        )
    model.load_state_dict(load_state_dict_file(weights_path), strict=True)
    optimizer.load_state_dict(state["optimizer"])
    return state


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _build_model(
    config: ClassificationConfig, data: MedMNISTData, load_weights: bool = True
) -> tuple[ViTClassifier, str | None]:
    """The classifier, and the pretrained weights' report (None for random initialisation).

    The architecture follows ``--pretrained``'s header either way; `load_weights` False (resuming
    from a checkpoint) skips copying its tensors."""
    overrides: dict = {"in_channels": DEFAULT_IN_CHANNELS, "grad_checkpointing": config.grad_checkpointing}
    header_config = _encoder_config(_weights_header(config.pretrained))
    if header_config is not None:
        architecture = ("embed_dim", "depth", "num_heads", "mlp_hidden_dim", "patch_size", "rope_base",
                        "rope_base_depth", "norm_eps", "in_channels")  # fmt: skip
        overrides.update({k: header_config[k] for k in architecture if k in header_config})
    if config.norm_eps is not None:
        overrides["norm_eps"] = config.norm_eps
    if config.in_channels is not None:
        overrides["in_channels"] = config.in_channels
    patch = overrides.get("patch_size", DEFAULT_PATCH_SIZE)
    if config.input_size % patch:
        raise ValueError(
            f"--input-size {config.input_size} must be a multiple of the weights' patch size {patch}"
        )
    side = config.input_size // patch
    # The position grid is learnt at the token grid of the input, as the authors' classifier (10^3 at 160^3).
    overrides["pos_grid_shape"] = (side, side, side) if data.spatial_dims == 3 else (1, side, side)
    torch.manual_seed(config.seed)
    model = ViTClassifier(data.num_classes, build_universal_vit(config.model, **overrides))
    if config.pretrained is None or not load_weights:
        return model, None
    report = load_pretrained_encoder(
        model.encoder, config.pretrained, allow_pickle=config.trust_pickle, hints=WEIGHT_LOAD_HINTS
    )
    if report.missing:
        raise ValueError(
            f"--pretrained {config.pretrained}: leaves {len(report.missing)} encoder parameter(s) unfilled "
            f"({', '.join(report.missing[:5])}{', ...' if len(report.missing) > 5 else ''}); "
            f"is --model {config.model} the size of these weights?\n{report.summary()}"
        )
    return model, report.summary()


def _weights_header(path: str | None) -> dict | None:
    """The header of one of our safetensors files; None for other files (the preset decides then)."""
    if path is None or not str(path).endswith(".safetensors"):
        return None
    try:
        return read_header(path)
    except ValueError:
        return None  # a safetensors file written by someone else


def _encoder_config(header: dict | None) -> dict | None:
    """The ViT architecture in a header: a UniversalViT's config, or the ``encoder`` of a model holding one."""
    if header is None:
        return None
    config = header.get("config", {})
    return config.get("encoder") if isinstance(config.get("encoder"), dict) else config


def resolve_input_norm(mode: str, header: dict | None) -> str:
    """``auto``: the normalisation a weight file's ``input`` header entry names, else ``imagenet``."""
    if mode != "auto":
        return mode
    spec = (header or {}).get("input")
    if isinstance(spec, dict) and "value_range" in spec:
        return "imagenet" if spec.get("normalization") == "imagenet" else "none"
    return "imagenet"


def train_classifier(config: ClassificationConfig, data: MedMNISTData | None = None) -> dict:
    """Train one learning rate in ``config.output_dir`` (resuming it), score the best model; the results."""
    config.check()
    data = data if data is not None else load_medmnist(config.data, config.task, config.num_classes)
    run_dir = Path(config.output_dir)
    resuming = _check_run_folder(run_dir, config)
    if resuming and (run_dir / RESULTS).exists():
        results = json.loads((run_dir / RESULTS).read_text())
        print(
            f"{run_dir}: already trained (test AUC {results['test_auc']:.4f}); delete {RESULTS} to re-score"
        )
        return results

    device = _device(config.device)
    model, report = _build_model(config, data, load_weights=not (run_dir / LAST_STATE).exists())
    preprocess = PreprocessConfig(
        spatial_dims=data.spatial_dims,
        in_channels=model.encoder.config["in_channels"],
        input_size=config.input_size,
        input_norm=resolve_input_norm(config.input_norm, _weights_header(config.pretrained)),
        intensity_scale=resolve_intensity_scale(config.intensity_scale, data.name),
        flip_prob=config.flip_prob,
    )
    preprocess.check()
    model.to(device)
    optimizer = build_adamw(model, lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = _loss_fn(data.task)
    header = {
        "task": data.task,
        "dataset": data.name,
        "aniso_d": data.aniso_d,
        "preprocess": preprocess.to_dict(),
        "lr": config.lr,
    }

    rows: list[dict] = []
    start_epoch = 0
    if resuming and (run_dir / LAST_STATE).exists():
        state = _load_checkpoint(run_dir, model, optimizer)
        start_epoch, rows = state["completed_epochs"], list(state["rows"])
        print(f"{run_dir}: resuming after epoch {start_epoch}")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / CONFIG, _run_identity(config))
        print(data.describe())
        print(report if report is not None else "random initialisation (no --pretrained)")

    train = data.splits["train"]
    diverged, bad_in_a_row = None, 0
    title = f"{data.name or Path(config.data).name}: lr {config.lr:g}"
    for epoch in range(start_epoch, config.epochs):
        lr = lr_at_epoch(config.lr, epoch, config.epochs, config.lr_milestones, config.lr_gamma)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # One generator per epoch, seeded from (seed, epoch): a resumed run shuffles and augments alike.
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(len(train), generator=generator)
        model.train()
        started, loss_sum, applied, skipped = time.time(), 0.0, 0, 0
        batches = tqdm(range(0, len(train), config.batch_size), desc=f"epoch {epoch + 1}/{config.epochs}")
        for start in batches:
            index = order[start : start + config.batch_size]
            x = prepare_batch(train.images[index], preprocess, device, train=True, generator=generator)
            with _autocast(config.precision, device):
                logits = model(x, data.aniso_d)
            loss = loss_fn(logits.float(), _targets(train.labels[index], data.task, device))
            optimizer.zero_grad(set_to_none=True)
            bad = f"the training loss became {loss.item()}" if not torch.isfinite(loss) else None
            if bad is None:
                loss.backward()
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                grad_norm = float(nn.utils.get_total_norm(grads)) if grads else 0.0
                if not math.isfinite(grad_norm):
                    bad = f"the gradient norm became {grad_norm} (loss {loss.item():.4g})"
            if bad is not None:  # never applied: skipped, counted, and the run stops after too many in a row
                optimizer.zero_grad(set_to_none=True)
                skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
                if bad_in_a_row >= config.max_bad_steps:
                    diverged = (
                        f"{bad} in {bad_in_a_row} steps in a row (--max-bad-steps {config.max_bad_steps}), "
                        f"the last in epoch {epoch} at lr {lr:g}; none applied"
                    )
                    break
                continue
            bad_in_a_row = 0
            optimizer.step()
            loss_sum += loss.item() * index.numel()
            applied += index.numel()
            batches.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2g}")
        if diverged:
            batches.close()
            break
        try:
            val = _evaluate_split(model, data, "val", preprocess, config.batch_size, device, config.precision)
        except TrainingDiverged as error:
            diverged = f"after epoch {epoch} at lr {lr:g}, {error}"
            break
        rows.append({
            "epoch": epoch, "lr": lr, "train_loss": loss_sum / max(applied, 1), "val_loss": val["loss"],
            "val_auc": val["auc"], "val_acc": val["acc"], "seconds": round(time.time() - started, 2),
            "skipped_steps": skipped,
        })  # fmt: skip
        best_epoch = select_best_epoch([row["val_auc"] for row in rows])
        if best_epoch == epoch:
            save_model(model, run_dir / BEST_MODEL, extra={**header, "epoch": epoch, "val_auc": val["auc"]})
        print(
            f"epoch {epoch}: train loss {rows[-1]['train_loss']:.4f}, val AUC {val['auc']:.4f} ACC {val['acc']:.4f}"
            f" (best epoch {best_epoch}: {rows[best_epoch]['val_auc']:.4f})"
        )
        _write_log(run_dir / LOG, rows)
        _plot_curves(run_dir / CURVES, rows, best_epoch, title)
        _save_checkpoint(run_dir, model, optimizer, epoch + 1, {"rows": rows})

    if diverged and not rows:
        raise TrainingDiverged(f"{run_dir}: {diverged}, before a first epoch was complete; try a lower --lr")
    if diverged:
        raise TrainingDiverged(
            f"{run_dir}: stopped: {diverged}; not scored. {BEST_MODEL} (epoch "
            f"{select_best_epoch([row['val_auc'] for row in rows])}) and the checkpoint after epoch {len(rows) - 1} "
            "are kept; try a lower --lr"
        )
    best_epoch = select_best_epoch([row["val_auc"] for row in rows])
    best = load_model(run_dir / BEST_MODEL).to(device)
    test = _evaluate_split(best, data, "test", preprocess, config.batch_size, device, config.precision)
    results = {
        "data": str(config.data),
        "dataset": data.name,
        "task": data.task,
        "lr": config.lr,
        "epochs": config.epochs,
        "best_epoch": best_epoch,
        "val_auc": rows[best_epoch]["val_auc"],
        "val_acc": rows[best_epoch]["val_acc"],
        "test_auc": test["auc"],
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "model": str(run_dir / BEST_MODEL),
        "pretrained": config.pretrained,
        "stopped_early": diverged,
    }
    write_json_atomic(run_dir / RESULTS, results)
    print(f"{run_dir}: test AUC {test['auc']:.4f}, ACC {test['acc']:.4f} (epoch {best_epoch})")
    return results


def sweep_learning_rates(config: ClassificationConfig, data: MedMNISTData | None = None) -> dict:
    """One run per learning rate in ``output_dir/lr_<lr>``; the best validation AUC is chosen."""
    config.check()
    data = data if data is not None else load_medmnist(config.data, config.task, config.num_classes)
    runs, diverged = [], {}
    for lr in config.lr_sweep:
        run_dir = str(Path(config.output_dir) / f"lr_{lr:g}")
        run_config = dataclasses.replace(config, lr=lr, lr_sweep=(), output_dir=run_dir)
        try:
            runs.append(train_classifier(run_config, data))
        except TrainingDiverged as error:
            print(f"lr {lr:g} left out: {error}", file=sys.stderr)
            diverged[lr] = str(error)
    if not runs:
        raise TrainingDiverged(f"{config.output_dir}: every learning rate of --lr-sweep diverged")
    chosen = runs[select_best_epoch([run["val_auc"] for run in runs])]
    results = {**chosen, "chosen_lr": chosen["lr"], "diverged_lrs": diverged, "sweep": [
        {k: run[k] for k in ("lr", "best_epoch", "val_auc", "val_acc", "test_auc", "test_acc")} for run in runs
    ]}  # fmt: skip
    write_json_atomic(Path(config.output_dir) / RESULTS, results)
    print("lr sweep (chosen by validation AUC):")
    for run in results["sweep"]:
        mark = " <- chosen" if run["lr"] == chosen["lr"] else ""
        print(f"  lr {run['lr']:g}: val AUC {run['val_auc']:.4f}, test AUC {run['test_auc']:.4f}{mark}")
    return results


def fit_classifier(config: ClassificationConfig, data: MedMNISTData | None = None) -> dict:
    """`sweep_learning_rates` when ``config.lr_sweep`` is given, else `train_classifier`."""
    return sweep_learning_rates(config, data) if config.lr_sweep else train_classifier(config, data)


# --------------------------------------------------------------------------------------
# Evaluation of a saved classifier
# --------------------------------------------------------------------------------------


def evaluate_classifier(
    weights: str | os.PathLike,
    data_path: str | os.PathLike,
    split: str = "test",
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
) -> dict:
    """Metrics of a ``best_model.safetensors`` on one split of a MedMNIST file."""
    header = read_header(weights)
    if "preprocess" not in header or "task" not in header:
        raise ValueError(
            f"{weights}: not a classifier written by `pumit_classify train` (no preprocessing header)"
        )
    model = load_model(weights)
    if not isinstance(model, ViTClassifier):
        raise ValueError(f"{weights}: holds a {type(model).__name__}, not a ViTClassifier")
    preprocess = PreprocessConfig(**header["preprocess"])
    # the model's class count is used when the file itself does not tell it; labels outside it are an error
    data = load_medmnist(data_path, task=header["task"], default_num_classes=model.num_classes)
    if data.num_classes != model.num_classes or data.spatial_dims != preprocess.spatial_dims:
        raise ValueError(
            f"{data_path}: {data.spatial_dims}D data with {data.num_classes} outputs does not fit {weights} "
            f"({preprocess.spatial_dims}D, {model.num_classes} outputs)"
        )
    if split not in data.splits:
        raise ValueError(f"--split must be one of {sorted(data.splits)}, got {split!r}")
    torch_device = _device(device)
    metrics = _evaluate_split(
        model.to(torch_device), data, split, preprocess, batch_size, torch_device, precision
    )
    return {"data": str(data_path), "weights": str(weights), "split": split, "task": data.task, **metrics}


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pumit_classify", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = subparsers.add_parser("train", help="fine-tune on a MedMNIST file (resumes a run folder)")
    add_config_arguments(train, ClassificationConfig)
    evaluate = subparsers.add_parser("evaluate", help="score a trained classifier on one split")
    evaluate.add_argument("--weights", required=True, help="best_model.safetensors of a run")
    evaluate.add_argument("--data", required=True, help="MedMNIST v2 .npz file")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--batch-size", type=int_in_range(1), default=32)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--precision", default="auto", choices=PRECISIONS)
    evaluate.add_argument("-o", "--output", default=None, help="JSON file for the metrics")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with exit_on_bad_input(parser):
        if args.command == "train":
            config = config_from_args(ClassificationConfig, args)
            # a run folder is continued (resumed); ClassificationConfig.check names a missing -o
            if config.output_dir:
                check_output_path(config.output_dir, is_dir=True, overwrite=True,
                                  inputs=[config.data, config.pretrained], option="-o/--output-dir")  # fmt: skip
            fit_classifier(config)
        else:
            if args.output:
                check_output_path(args.output, overwrite=args.overwrite, inputs=[args.weights, args.data],
                                  option="-o/--output")  # fmt: skip
            metrics = evaluate_classifier(
                args.weights, args.data, args.split, args.batch_size, args.device, args.precision
            )
            print(json.dumps(metrics, indent=2))
            if args.output:
                write_json_atomic(args.output, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
