"""nnU-Net trainers that fine-tune `pumit_seg.models.seg_net.PUMITSegNet`.

Use with plans from `pumit_plan_and_preprocess` and nnU-Net's own commands::

    export nnUNet_extTrainer=$(pumit_nnunet_ext)
    nnUNetv2_train DATASET 3d_fullres 0 -tr PUMITTrainer -p PUMITPlans
    nnUNetv2_predict -i IN -o OUT -d DATASET -c 3d_fullres -tr PUMITTrainer -p PUMITPlans

Fine-tuning recipe (the paper's, expressed in nnU-Net epochs): AdamW, lr 1e-4, weight decay 0.05
(none on biases, norm weights, ``pos_embed`` and ``cls_token``), linear warm-up over the first 10 % of
the iterations then cosine decay to 1e-6, gradient-norm clipping at 1, Dice + CE loss with deep
supervision (nnU-Net's), 200 epochs x 250 iterations = 50K steps. The learning rate is set every
iteration from the global step ``current_epoch * num_iterations_per_epoch + i`` (not once per epoch
as nnU-Net's poly schedule), so continuing from a checkpoint resumes the same schedule.
On CUDA the forward pass runs in bf16 autocast (no loss scaling needed; GPUs without bf16 fall back
to nnU-Net's fp16 + GradScaler); on CPU in fp32. Training-time validation and ``nnUNetv2_predict``
use the same precision.

Pre-trained encoder weights are loaded in `initialize()` right after nnU-Net builds the network.
Where the file comes from, first match wins:

1. the environment variable ``PUMIT_PRETRAINED_WEIGHTS`` (a path; an empty value means none),
2. the key ``pumit_pretrained_weights`` of the plans' configuration (written by
   ``pumit_plan_and_preprocess --pretrained_weights``), then the same key at the plans' top level.

Accepted files: our safetensors files (``pumit_pretrain`` encoder exports, whole `PUMITSegNet` or MIM
models: the encoder is found by its prefix) and EVA-02 checkpoints (timm layout), through
`pumit_seg.models.vit.load_pretrained_encoder`, which adapts the patch kernel to the plan's ``aniso_d``
and input channels and resamples the position grid. Pickled checkpoints (e.g. the authors'
``pumit.ckpt``) need ``PUMIT_PRETRAINED_TRUST_PICKLE=1``, the same words as every command's
``--trust-pickle`` (only for files you trust). The report of
loaded / adapted / skipped / missing keys goes to the training log. A missing file is an error, and so
are weights with NaN / inf values (``PUMIT_PRETRAINED_ALLOW_NON_FINITE=1`` loads them anyway) and weights
that fill less than 90 % of the encoder (``PUMIT_PRETRAINED_ALLOW_PARTIAL=1``). The plan fixes
``aniso_d``, so the patch kernel is pooled once, at load, to the shape it is trained in (see
`pumit_seg.models.sac`). Weights are only loaded into a fresh network: whenever nnU-Net restores a
checkpoint (``--c``, ``--val``, prediction) the checkpoint holds them and the file is not needed.
`PUMITTrainer_scratch` ignores both sources: the random-init baseline of the paper.

nnU-Net's own ``nnUNetv2_train ... -pretrained_weights FILE`` works too: an nnU-Net checkpoint of a PUMIT
model (``checkpoint_final.pth``, with ``network_weights``) goes to nnU-Net's loader as usual, any other
file (an encoder from ``pumit_pretrain``, EVA-02, the authors' weights) to the encoder loader above, and
it replaces what the environment variable or the plans named. See `route_nnunet_pretrained_weights`.

Run health: a training step whose loss or gradient norm is NaN / inf is not applied (the optimiser step is
skipped; the epoch's count goes to the training log). After ``MAX_BAD_STEPS`` (5) such steps in a row, or
the value of the environment variable ``PUMIT_MAX_BAD_STEPS``, training stops with `TrainingDiverged`
(non-zero exit) naming the loss / gradient and the step; no checkpoint (latest, best, final) is ever
written from weights holding NaN / inf, so the last good one is kept.

Plans from ``pumit_plan_and_preprocess --preset`` may carry ``pumit_oversample_foreground_percent``
(BTCV: 0.75, the reference's 3 : 1 foreground crops), which replaces nnU-Net's 0.33.

Precision: with CUDA bf16 support the network runs in bf16 in training, validation and
``nnUNetv2_predict`` alike (nnU-Net's predictor opens an fp16 autocast; `PUMITSegNet` switches it to
bf16 inside its forward, see ``PUMITSegNet.prefer_bf16_autocast``).
"""

import os
import sys
import weakref
import zipfile
from contextlib import nullcontext

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn
from torch._dynamo import OptimizedModule

from pumit_seg.models.vit import WeightReport, load_pretrained_encoder
from pumit_seg.planners.plans_keys import (
    NETWORK_CLASS_NAME,
    OVERSAMPLE_PLANS_KEY,
    PRETRAINED_WEIGHTS_PLANS_KEY,
)
from pumit_seg.trainers.optim import WarmupCosineLRScheduler, build_adamw
from pumit_seg.weights import non_finite_tensors

DEFAULT_DEVICE = torch.device("cuda")  # nnU-Net's trainer default
PRETRAINED_WEIGHTS_ENV = "PUMIT_PRETRAINED_WEIGHTS"
# consent to unpickle, in the words of every command's --trust-pickle; the older name is still read
TRUST_PICKLE_ENV = "PUMIT_PRETRAINED_TRUST_PICKLE"
TRUST_PICKLE_ENV_OLD = "PUMIT_PRETRAINED_ALLOW_PICKLE"
ALLOW_NON_FINITE_ENV = "PUMIT_PRETRAINED_ALLOW_NON_FINITE"
ALLOW_PARTIAL_ENV = "PUMIT_PRETRAINED_ALLOW_PARTIAL"
MAX_BAD_STEPS_ENV = "PUMIT_MAX_BAD_STEPS"
TRUE_VALUES = ("1", "true", "yes")
FALSE_VALUES = ("", "0", "false", "no")


def env_flag(name: str) -> bool:
    """A yes / no environment variable; any other value is an error naming the variable."""
    value = os.environ.get(name, "").strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ValueError(
        f"environment variable {name}={os.environ[name]!r}: expected 1 / 0 (or true / false, yes / no)"
    )


def is_nnunet_checkpoint(path: str) -> bool:
    """Whether `path` is a checkpoint written by nnU-Net (a torch zip whose pickle holds ``network_weights``).

    Reads the archive's pickle bytes without unpickling them: safetensors files, EVA-02 / Lightning
    checkpoints and our pre-training checkpoints are not nnU-Net checkpoints.
    """
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(b"network_weights" in archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))


def route_nnunet_pretrained_weights(trainer: "PUMITTrainer") -> None:
    """Make ``nnUNetv2_train -pretrained_weights FILE`` load encoder files into `trainer`'s encoder.

    nnU-Net's runner calls ``load_pretrained_weights(network, FILE)`` (a function of
    ``nnunetv2.run.run_training``) right after ``initialize()``; that function only takes nnU-Net
    checkpoints and fails on an encoder file (``KeyError: 'network_weights'``). The runner's name is
    rebound to a wrapper that hands a file to `PUMITTrainer.load_pretrained_encoder` when the network is
    this trainer's and the file is not an nnU-Net checkpoint; every other call goes to nnU-Net's function.
    """
    run_training = sys.modules.get("nnunetv2.run.run_training")
    if run_training is None or not hasattr(run_training, "load_pretrained_weights"):
        return  # not started by nnU-Net's runner: nothing to route
    original = getattr(
        run_training.load_pretrained_weights, "nnunet_original", run_training.load_pretrained_weights
    )
    owner = weakref.ref(trainer)

    def load_pretrained_weights(network, fname, verbose=False):
        current = owner()
        if (
            current is None
            or current.network is None
            or unwrap_network(network) is not unwrap_network(current.network)
            or is_nnunet_checkpoint(fname)
        ):
            return original(network, fname, verbose=verbose)
        current.load_pretrained_encoder(path=fname, source="nnUNetv2_train -pretrained_weights")

    load_pretrained_weights.nnunet_original = original
    run_training.load_pretrained_weights = load_pretrained_weights


class TrainingDiverged(RuntimeError):
    """Too many training steps in a row with a NaN / inf loss or gradient, or weights holding NaN / inf."""


def env_positive_int(name: str, default: int) -> int:
    """A positive integer from an environment variable (`default` when unset or empty)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"environment variable {name}={os.environ[name]!r}: expected an integer >= 1")
    return int(value)


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DDP and torch.compile wrappers."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


class PUMITTrainer(nnUNetTrainer):
    """Fine-tunes a (pre-trained) PUMIT ViT with nnU-Net's data pipeline, loss and inference.

    The recipe lives in the class attributes below; a variant is a subclass that changes some of them.
    """

    INITIAL_LR = 1e-4
    FINAL_LR = 1e-6
    WEIGHT_DECAY = 0.05
    WARMUP_FRACTION = 0.1  # 5K of the paper's 50K steps
    GRAD_CLIP_NORM = 1.0
    NUM_EPOCHS = 200  # x 250 iterations = the paper's 50K steps
    NUM_ITERATIONS_PER_EPOCH = 250  # nnU-Net's
    NUM_VAL_ITERATIONS_PER_EPOCH = 50  # nnU-Net's
    SAVE_EVERY = 50  # nnU-Net's checkpoint interval (epochs)
    USE_PRETRAINED_WEIGHTS = True
    MAX_BAD_STEPS = 5  # steps in a row with a NaN / inf loss or gradient before training stops

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = DEFAULT_DEVICE,
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.INITIAL_LR
        self.final_lr = self.FINAL_LR
        self.weight_decay = self.WEIGHT_DECAY
        self.warmup_fraction = self.WARMUP_FRACTION
        self.grad_clip_norm = self.GRAD_CLIP_NORM
        self.num_epochs = self.NUM_EPOCHS
        self.num_iterations_per_epoch = self.NUM_ITERATIONS_PER_EPOCH
        self.num_val_iterations_per_epoch = self.NUM_VAL_ITERATIONS_PER_EPOCH
        self.save_every = self.SAVE_EVERY
        self.use_pretrained_weights = self.USE_PRETRAINED_WEIGHTS
        self.pretrained_weight_report: WeightReport | None = None
        self.iteration = 0  # global training step, drives the learning rate
        self.max_bad_steps = env_positive_int(MAX_BAD_STEPS_ENV, self.MAX_BAD_STEPS)
        self.bad_steps_in_a_row = 0
        self.skipped_steps_epoch = 0  # steps of this epoch not applied (non-finite loss or gradient)
        self.restoring_checkpoint = False  # set while nnU-Net restores a checkpoint (it holds the weights)
        oversample = self.configuration_manager.configuration.get(OVERSAMPLE_PLANS_KEY)
        if oversample is not None:
            if not isinstance(oversample, int | float) or not 0 <= oversample <= 1:
                raise ValueError(f"plans key {OVERSAMPLE_PLANS_KEY} must be in [0, 1], got {oversample!r}")
            self.oversample_foreground_percent = float(oversample)

        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            self.autocast_dtype = torch.bfloat16
            self.grad_scaler = None  # bf16 has fp32's range: no loss scaling
        else:
            self.autocast_dtype = torch.float16  # only used on CUDA; nnU-Net's GradScaler stays
        route_nnunet_pretrained_weights(self)  # nnUNetv2_train -pretrained_weights ENCODER_FILE

    # ------------------------------------------------------------------ network and weights
    @staticmethod
    def build_network_architecture(
        plans_manager,
        configuration_manager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """PUMITSegNet from the plans (also used by nnUNetv2_predict); no pretrained weights here."""
        architecture = configuration_manager.network_arch_class_name
        if architecture != NETWORK_CLASS_NAME:
            raise ValueError(
                f"{architecture} is not PUMITSegNet: plan with pumit_plan_and_preprocess and pass -p PUMITPlans"
            )
        return nnUNetTrainer.build_network_architecture(
            plans_manager,
            configuration_manager,
            num_input_channels,
            num_output_channels,
            enable_deep_supervision,
        )

    def initialize(self):
        super().initialize()
        self.load_pretrained_encoder()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # nnU-Net initialises inside load_checkpoint (--c, --val, prediction): the checkpoint holds the encoder,
        # so the pre-trained file must be neither needed nor loaded.
        self.restoring_checkpoint = True
        try:
            super().load_checkpoint(filename_or_checkpoint)
        finally:
            self.restoring_checkpoint = False

    def pretrained_weights_source(self) -> tuple[str | None, str]:
        """(path or None, where it came from): environment variable, then configuration, then plans top level."""
        if PRETRAINED_WEIGHTS_ENV in os.environ:
            path = os.environ[PRETRAINED_WEIGHTS_ENV] or None  # set but empty: explicitly none
            return path, f"environment variable {PRETRAINED_WEIGHTS_ENV}"
        configuration = self.configuration_manager.configuration
        if configuration.get(PRETRAINED_WEIGHTS_PLANS_KEY):
            path = configuration[PRETRAINED_WEIGHTS_PLANS_KEY]
            return path, f"plans configuration {self.configuration_name!r}"
        if self.plans_manager.plans.get(PRETRAINED_WEIGHTS_PLANS_KEY):
            return self.plans_manager.plans[PRETRAINED_WEIGHTS_PLANS_KEY], "plans (top level)"
        return None, ""

    def load_pretrained_encoder(self, path: str | None = None, source: str | None = None) -> None:
        """Load encoder weights: from `path` when given (``-pretrained_weights``), else from
        `pretrained_weights_source`."""
        if path is not None:
            if not self.use_pretrained_weights:
                raise RuntimeError(
                    f"{self.__class__.__name__} trains from random initialisation: drop {source} {path}, "
                    "or fine-tune with PUMITTrainer"
                )
            if self.pretrained_weight_report is not None:
                self.print_to_log_file(f"{source} {path} replaces the encoder weights loaded before")
            self._load_encoder_file(path, source)
            return
        if not self.use_pretrained_weights:
            self.print_to_log_file(
                f"{self.__class__.__name__}: encoder from random initialisation (pretrained weights ignored)"
            )
            return
        path, source = self.pretrained_weights_source()
        if path is None:
            self.print_to_log_file(
                f"No pretrained encoder weights ({PRETRAINED_WEIGHTS_ENV} unset, no '{PRETRAINED_WEIGHTS_PLANS_KEY}' "
                "in the plans): the encoder starts from random initialisation"
            )
            return
        if self.restoring_checkpoint:
            self.print_to_log_file(
                f"Restoring a checkpoint: pretrained weights {path} not loaded (the checkpoint has them)"
            )
            return
        self._load_encoder_file(path, source)

    def _load_encoder_file(self, path: str, source: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained encoder weights {path} (from {source}) do not exist")
        report = load_pretrained_encoder(
            unwrap_network(self.network).encoder,
            path,
            allow_pickle=env_flag(TRUST_PICKLE_ENV) or env_flag(TRUST_PICKLE_ENV_OLD),
            allow_non_finite=env_flag(ALLOW_NON_FINITE_ENV),
            allow_partial=env_flag(ALLOW_PARTIAL_ENV),
            hints={
                "allow_pickle": f"set {TRUST_PICKLE_ENV}=1",
                "allow_non_finite": f"set {ALLOW_NON_FINITE_ENV}=1",
                "allow_partial": f"set {ALLOW_PARTIAL_ENV}=1",
            },
        )
        self.print_to_log_file(f"Pretrained encoder weights from {path} ({source}):\n{report.summary()}")
        if not report.loaded and not report.adapted:
            raise RuntimeError(f"{path}: no key could be loaded into the encoder:\n{report.summary()}")
        self.pretrained_weight_report = report

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = build_adamw(self.network, self.initial_lr, self.weight_decay)
        total_steps = self.num_epochs * self.num_iterations_per_epoch
        lr_scheduler = WarmupCosineLRScheduler(
            optimizer,
            self.initial_lr,
            self.final_lr,
            max(round(self.warmup_fraction * total_steps), 1),
            total_steps,
        )
        return optimizer, lr_scheduler

    def autocast(self):
        """bf16 (or fp16) autocast on CUDA; nothing elsewhere (CPU autocast is slow, MPS unsupported)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return nullcontext()

    def on_train_epoch_start(self):
        # nnU-Net's version steps the schedule by epoch; ours is stepped per iteration in train_step.
        self.network.train()
        self.iteration = self.current_epoch * self.num_iterations_per_epoch
        self.lr_scheduler.step(self.iteration)
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch}")
        self.print_to_log_file(
            f"Current learning rate: {np.round(self.optimizer.param_groups[0]['lr'], decimals=7)}"
        )
        self.logger.log("lrs", self.optimizer.param_groups[0]["lr"], self.current_epoch)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)

        self.lr_scheduler.step(self.iteration)
        self.iteration += 1
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            output = self.network(data)
            loss = self.loss(output, target)

        if self.grad_scaler is not None:  # fp16 on CUDA without bf16 support
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            # inf gradients are the GradScaler's business (it skips the step and lowers its scale)
            if self.step_is_healthy(loss, None):
                self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            if self.step_is_healthy(loss, grad_norm):
                self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def step_is_healthy(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """False for a NaN / inf loss or gradient norm (the step must not be applied); counts such steps and
        raises `TrainingDiverged` after `max_bad_steps` in a row. Every DDP rank takes the same decision."""
        loss_value = float(loss.detach())
        norm_value = float(grad_norm) if grad_norm is not None else 0.0
        bad = not (np.isfinite(loss_value) and np.isfinite(norm_value))
        if self.is_ddp:
            flag = torch.tensor([float(bad)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = bool(flag.item())
        if not bad:
            self.bad_steps_in_a_row = 0
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps_epoch += 1
        self.bad_steps_in_a_row += 1
        what = f"loss {loss_value:g}" + (f", gradient norm {norm_value:g}" if grad_norm is not None else "")
        self.print_to_log_file(f"iteration {self.iteration} (epoch {self.current_epoch}) skipped: {what}")
        if self.bad_steps_in_a_row >= self.max_bad_steps:
            raise TrainingDiverged(
                f"training diverged: {self.bad_steps_in_a_row} steps in a row with a NaN / inf loss or gradient, "
                f"none applied ({self.__class__.__name__}.MAX_BAD_STEPS / {MAX_BAD_STEPS_ENV} = "
                f"{self.max_bad_steps}); at iteration {self.iteration} (epoch {self.current_epoch}): {what}. "
                "The checkpoints written before are kept; checkpoint_final.pth is not written"
            )
        return False

    def on_train_epoch_end(self, train_outputs: list[dict]):
        if self.skipped_steps_epoch:
            self.print_to_log_file(
                f"{self.skipped_steps_epoch} of {len(train_outputs)} training steps skipped this epoch "
                "(NaN / inf loss or gradient)"
            )
        self.skipped_steps_epoch = 0
        return super().on_train_epoch_end(train_outputs)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, refused (`TrainingDiverged`, nothing written) when the weights hold NaN / inf."""
        network = unwrap_network(self.network)
        bad = list(non_finite_tensors(network.state_dict()))
        if bad:
            raise TrainingDiverged(
                f"{filename} not written: the weights hold NaN / inf ({len(bad)} tensor(s), e.g. {bad[:3]}); "
                "the checkpoints written before are kept"
            )
        super().save_checkpoint(filename)

    def validation_step(self, batch: dict) -> dict:
        # nnU-Net's inner autocast inherits the dtype of this outer one (bf16 instead of its fp16)
        with self.autocast():
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        with self.autocast():
            return super().perform_actual_validation(save_probabilities)


class PUMITTrainer_scratch(PUMITTrainer):
    """Same recipe from random initialisation (the paper's baseline); pretrained weights are ignored."""

    USE_PRETRAINED_WEIGHTS = False
