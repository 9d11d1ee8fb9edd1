"""`pumit_pretrain mim`: masked image modelling of the universal ViT (docs/method.md, section 4).

    pumit_pretrain mim --store STORE --tokenizer RUN/tokenizer.safetensors -o RUN_MIM [--preset tiny]
    torchrun --nproc_per_node 8 -m pumit_seg.trainers.pretrain_cli mim ...      # DDP, one GPU per rank

The frozen tokenizer (a `save_model` file of `pumit_pretrain tokenizer`, loaded with `load_model`)
gives the soft targets; `pumit_seg.models.mim.MIMModel` is trained on the shared trainer base
(`pumit_seg.trainers.pretrain_base`: DDP via torchrun, bf16 autocast on CUDA, warm-up + cosine,
atomic checkpoints with exact resume, log.csv / TensorBoard, progress bar). The run folder ends with
``encoder.safetensors``: the `UniversalViT` alone (patch embedding, position grid, CLS token, blocks,
final norm) with its architecture header, what `PUMITTrainer` loads through
`load_pretrained_encoder`.

Masks do not come from a per-rank random stream: sample ``i`` of the global batch at step ``s`` is
masked by a generator seeded from ``(seed, s, i)``, so a run on N ranks masks exactly what one process
with the same global batch masks, and a resumed run masks what the uninterrupted one did.

Validation (main rank, every ``--val-every`` steps, held-out images): the loss and masked-token
accuracy (head argmax == tokenizer argmax) with fixed masks, next to the majority-code baseline
(always guessing the most frequent target code) and the number of codes the targets and the
predictions use (`pumit_seg.trainers.pretrain_health`); a run whose accuracy does not beat that
baseline, or whose head guesses one code, prints ``WARNING: MIM stalled ...`` (or ``collapsed``) on
stderr and into ``health.json``, and ``--stop-on-collapse`` ends it (exit status 3). A picture
``pictures/step_N.png``:
the input with its masked patches blanked, the tokenizer's reconstruction of its own tokens, and its
reconstruction of the tokens the ViT predicted at the masked positions (the tokenizer's elsewhere).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from pumit_seg.atomic import atomic_path
from pumit_seg.models.mim import MASK_COUNT_RULES, MIMModel, mim_step, random_token_mask
from pumit_seg.models.pumit_checkpoint import norm_eps_from_weights
from pumit_seg.models.vit import VIT_SIZES, UniversalViT, build_universal_vit, load_pretrained_encoder
from pumit_seg.trainers.pretrain_base import (
    PretrainConfig,
    PretrainTrainer,
    add_config_arguments,
    run_pretraining,
)
from pumit_seg.trainers.pretrain_health import MIMHealth, mim_verdict, record_health
from pumit_seg.weights import TRUST_PICKLE_FLAG, load_model, load_state_dict_file, save_model

__all__ = [
    "MIMConfig",
    "MIMTrainer",
    "encoder_for_export",
    "export_encoder",
    "export_mim_checkpoint",
    "add_arguments",
    "run",
]

EXPORT_KIND = "mim_encoder"  # header "kind" of the exported encoder file
MASK_GREY = 0.5  # masked patches in the validation pictures


@dataclass
class MIMConfig(PretrainConfig):
    """MIM options; defaults are the paper's (docs/method.md, section 4): AdamW 2e-5, 10K warm-up, 300K steps, batch 84,
    grad-norm clip 0.5, crops of 160 in-plane x 5 depth units (a 5x10x10 token grid)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # CPU-sized: a 2x4x4 token grid, a tiny ViT, a few hundred steps at a high rate
        "tiny": {
            "model": "tiny", "max_steps": 200, "batch_size": 4, "lr": 1e-3, "warmup_steps": 20,
            "crop_in_plane": 64, "crop_depth_units": 2, "num_workers": 0, "log_every": 10,
            "val_every": 100, "ckpt_every": 50, "val_batch_size": 4, "val_max_batches": 8,
        },
    }  # fmt: skip

    tokenizer: str = field(
        default="", metadata={"help": "tokenizer file (pumit_pretrain tokenizer's export)"}
    )
    model: str = field(default="base", metadata={"help": f"ViT size: {', '.join(VIT_SIZES)}"})
    eva02_weights: str = field(
        default="",
        metadata={
            "help": "initialise the ViT from these EVA-02 (or our) weights; a MIM file (pumit_pretrain import "
            "--kind mim) also gives the mask token and head; '' = random"
        },
    )
    trust_pickle: bool = field(
        default=False,
        metadata={
            "help": "read a pickled --eva02-weights checkpoint with full unpickling, which can RUN CODE "
            "from the file: only for files you trust",
            "hidden_aliases": ("--eva02-allow-pickle",),
        },
    )
    mask_ratio: float = field(default=0.55, metadata={"help": "share of patch tokens masked per sample"})
    mask_count_rule: str = field(
        default="round",
        metadata={"help": "round: round(r L) masked; reference: L - int((1 - r) L) as the authors' code"},
    )
    patch_embed_grad_scale: float = field(
        default=0.1, metadata={"help": "factor on the gradient reaching the patch embedding"}
    )
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward"})
    val_pictures: int = field(default=1, metadata={"help": "samples pictured per validation"})
    stop_on_collapse: bool = field(
        default=False,
        metadata={"help": "end the run (exit status 3) when a validation finds it collapsed or stalled"},
    )
    # the paper's values for the common fields
    max_steps: int = field(default=300_000, metadata={"help": "optimisation steps"})
    batch_size: int = field(default=84, metadata={"help": "global batch size (split over ranks)"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=10_000, metadata={"help": "linear warm-up steps"})
    grad_clip: float = field(default=0.5, metadata={"help": "gradient-norm clip; 0 = off"})
    crop_in_plane: int = field(default=160, metadata={"help": "crop size in-plane (pixels)"})
    crop_depth_units: int = field(
        default=5, metadata={"help": "crop depth = units * max(16 >> aniso_d, 1) slices (1 slice in 2D)"}
    )

    def check(self) -> None:
        super().check()
        if not self.tokenizer:
            raise ValueError("--tokenizer is required (the file written by `pumit_pretrain tokenizer`)")
        if not Path(self.tokenizer).is_file():
            raise ValueError(f"--tokenizer {self.tokenizer}: no such file")
        if self.eva02_weights and not Path(self.eva02_weights).is_file():
            raise ValueError(f"--eva02-weights {self.eva02_weights}: no such file")
        if self.model not in VIT_SIZES:
            raise ValueError(f"--model must be one of {sorted(VIT_SIZES)}, got {self.model!r}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"--mask-ratio must lie strictly between 0 and 1, got {self.mask_ratio}")
        if self.mask_count_rule not in MASK_COUNT_RULES:
            raise ValueError(
                f"--mask-count-rule must be one of {MASK_COUNT_RULES}, got {self.mask_count_rule!r}"
            )
        if not self.patch_embed_grad_scale >= 0.0:
            raise ValueError(f"--patch-embed-grad-scale must be >= 0, got {self.patch_embed_grad_scale}")
        if self.val_pictures < 0:
            raise ValueError(f"--val-pictures must be >= 0, got {self.val_pictures}")

    @property
    def pos_grid_shape(self) -> tuple[int, int, int]:
        """The token grid of a 3D crop: depth units x in-plane patches (5x10x10 by default)."""
        side = self.crop_in_plane // 16
        return (self.crop_depth_units, side, side)


TRAIN_MASKS, VALIDATION_MASKS = 0, 1  # mask streams


def sample_mask_seed(seed: int, step: int, sample_index: int, stream: int = TRAIN_MASKS) -> int:
    """Seed of one sample's mask: a function of (run seed, stream, step, index in the global batch) only."""
    return int(np.random.SeedSequence([seed, stream, step, sample_index]).generate_state(1)[0])


def batch_masks(
    batch_size: int,
    num_tokens: int,
    num_masked: int,
    *,
    seed: int,
    step: int,
    first_index: int,
    stream: int = TRAIN_MASKS,
) -> Tensor:
    """(B, L) masks of samples ``first_index .. first_index + B - 1`` of the global batch at `step`."""
    rows = [
        random_token_mask(
            1,
            num_tokens,
            num_masked,
            generator=torch.Generator().manual_seed(sample_mask_seed(seed, step, i, stream)),
        )
        for i in range(first_index, first_index + batch_size)
    ]
    return torch.cat(rows)


def load_tokenizer(path: str | os.PathLike, device: torch.device) -> nn.Module:
    """The frozen tokenizer: rebuilt from its file's header, eval mode, no gradients."""
    tokenizer = load_model(path)
    for method in ("token_distribution", "decode_probs"):
        if not callable(getattr(tokenizer, method, None)):
            raise ValueError(
                f"--tokenizer {path}: a {type(tokenizer).__name__} has no {method}(); not a tokenizer"
            )
    tokenizer.requires_grad_(False)
    return tokenizer.eval().to(device)


def encoder_for_export(encoder: UniversalViT) -> UniversalViT:
    """A copy of the encoder with gradient checkpointing switched off (a training-time setting)."""
    clean = UniversalViT(**{**encoder.config, "grad_checkpointing": False})
    clean.load_state_dict(encoder.state_dict())
    return clean


def export_encoder(encoder: UniversalViT, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Save the encoder alone with its architecture header (``kind: mim_encoder``)."""
    save_model(encoder_for_export(encoder), path, extra={"kind": EXPORT_KIND, **(extra or {})})


def export_mim_checkpoint(model: MIMModel, checkpoint: dict) -> tuple[UniversalViT, dict]:
    """`pumit_pretrain export` of a ``mim`` checkpoint: (the encoder to save, extra header entries)."""
    return encoder_for_export(model.encoder), {"kind": EXPORT_KIND, "step": int(checkpoint["step"])}


class MIMTrainer(PretrainTrainer):
    kind: ClassVar[str] = "mim"
    export_name: ClassVar[str] = "encoder.safetensors"
    config: MIMConfig

    def build_model(self) -> MIMModel:
        config = self.config
        self.tokenizer = load_tokenizer(config.tokenizer, self.device)
        codebook_size = self._check_tokenizer()
        # LayerNorm eps of the initial weights where their file tells it (the authors' weights: 1e-5, EVA-02 and
        # our presets: 1e-6): a ViT trained with one eps is not the same function with another
        init_eps, init_eps_source = (
            norm_eps_from_weights(config.eva02_weights) if config.eva02_weights else (None, "")
        )
        eps_override = {} if init_eps is None else {"norm_eps": init_eps}
        with torch.device("meta"):  # the preset's constructor arguments only; MIMModel builds the ViT
            encoder_config = build_universal_vit(
                config.model,
                pos_grid_shape=config.pos_grid_shape,
                grad_checkpointing=config.grad_checkpointing,
                **eps_override,
            ).config
        model = MIMModel(
            encoder=encoder_config,
            codebook_size=codebook_size,
            mask_ratio=config.mask_ratio,
            mask_count_rule=config.mask_count_rule,
            patch_embed_grad_scale=config.patch_embed_grad_scale,
        )
        if config.eva02_weights:
            # read once: the encoder and, from a MIM file (e.g. `pumit_pretrain import --kind mim` of the authors'
            # pumit.ckpt), the mask token and head, so that MIM continues instead of starting with a random head
            source = load_state_dict_file(
                config.eva02_weights,
                allow_pickle=config.trust_pickle,
                allow_pickle_hint=f"add {TRUST_PICKLE_FLAG}",
            )
            report = load_pretrained_encoder(model.encoder, source, source_name=config.eva02_weights)
            extras = model.load_mask_token_and_head(source, config.eva02_weights)
            eps_line = (
                f"LayerNorm eps {init_eps} (from {init_eps_source})"
                if init_eps is not None
                else f"LayerNorm eps {encoder_config['norm_eps']} of --model {config.model} ({init_eps_source})"
            )
            self.init_report = (
                f"ViT initialised from {config.eva02_weights}\n{report.summary()}\n"
                + "\n".join([*extras, eps_line])
                + "\n"
            )
            if self.dist.is_main:
                print(self.init_report, flush=True)
        return model

    def fit(self) -> Path:
        # written here, not in build_model, so that a run refused at start leaves its folder untouched
        if getattr(self, "init_report", None) and self.dist.is_main:
            with atomic_path(self.output_dir / "init_weights.txt") as tmp:
                Path(tmp).write_text(self.init_report)
        return super().fit()

    def _check_tokenizer(self) -> int:
        """Codebook size K; the tokenizer's stride must equal the ViT's patch size (16)."""
        probe = torch.zeros(1, 3, 1, 32, 32, device=self.device)
        with torch.no_grad():
            probs = self.tokenizer.token_distribution(probe, 5)
        if probs.dim() != 5 or tuple(probs.shape[2:]) != (1, 2, 2):
            raise ValueError(
                f"--tokenizer {self.config.tokenizer}: a 32x32 image gives a token grid of "
                f"{tuple(probs.shape[2:])}; MIM needs the tokenizer's stride to equal the patch size 16"
            )
        return int(probs.shape[1])

    def masks_for(self, batch_size: int, num_tokens: int, step: int, first_index: int, stream: int) -> Tensor:
        return batch_masks(
            batch_size, num_tokens, self.model.num_masked(num_tokens), seed=self.config.seed, step=step,
            first_index=first_index, stream=stream,
        ).to(self.device)  # fmt: skip

    def step_result(
        self,
        model: nn.Module,
        image: Tensor,
        aniso_d: int,
        step: int,
        first_index: int,
        stream: int = TRAIN_MASKS,
    ):
        grid = self.model.token_grid(image.shape[2:], aniso_d)
        mask = self.masks_for(image.shape[0], int(np.prod(grid)), step, first_index, stream)
        with self.autocast():
            return mim_step(model, self.tokenizer, image, aniso_d, mask=mask)

    def training_step(self, batch: dict, step: int) -> dict[str, float]:
        image = batch["image"]
        result = self.step_result(
            self.train_model, image, int(batch["aniso_d"]), step, self.dist.rank * image.shape[0]
        )
        grad_norm = self.backward_and_step(result.loss, "model", self.model)
        return {"loss": result.loss.item(), "accuracy": result.accuracy.item(), "grad_norm": grad_norm}

    health_stop: str | None = None  # why --stop-on-collapse ends the run

    def stop_requested(self) -> str | None:
        return self.health_stop

    def validate(self, step: int) -> dict[str, float]:
        total_loss = total_masked = 0.0
        health = MIMHealth(self.model.codebook_size)
        pictures = []
        # fixed masks (their own stream, "step" = batch index): every validation sees the same ones
        for index, batch in enumerate(self.validation_batches()):
            batch = self.to_device(batch)
            image, aniso_d = batch["image"], int(batch["aniso_d"])
            result = self.step_result(self.model, image, aniso_d, index, 0, VALIDATION_MASKS)
            masked = int(result.mask.sum())
            total_loss += result.loss.item() * masked
            total_masked += masked
            health.add(result.masked_logits, result.target_probs[result.mask])
            if len(pictures) < self.config.val_pictures:
                pictures.append((image[:1], aniso_d, result, batch.get("keys", ["?"])[0]))
        if not total_masked:
            return {}
        metrics = {"loss": total_loss / total_masked, **health.metrics()}
        verdict = mim_verdict(metrics)
        metrics["healthy"] = float(verdict.healthy)
        record_health(self.output_dir, "MIM", step, verdict, metrics)
        if self.config.stop_on_collapse and not verdict.healthy:
            self.health_stop = f"--stop-on-collapse: {verdict.message('MIM', step)}"
        if pictures:
            self.write_pictures(step, pictures, metrics)
        return metrics

    # ---- pictures ------------------------------------------------------------------

    def predicted_probs(self, result) -> Tensor:
        """Sample 0's token distributions with the head's prediction at its masked positions, (1, K, d, h, w)."""
        probs = result.target_probs[:1].clone()
        count = int(result.mask[0].sum())
        probs[0, result.mask[0]] = torch.softmax(result.masked_logits[:count].float(), dim=-1)
        return probs.transpose(1, 2).reshape(1, -1, *result.grid)

    def write_pictures(self, step: int, pictures: list, metrics: dict | None = None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(pictures), 3, figsize=(9, 3.1 * len(pictures)), squeeze=False)
        patch = self.model.encoder.patch_size
        for row, (image, aniso_d, result, key) in enumerate(pictures):
            target = result.target_probs[:1].transpose(1, 2).reshape(1, -1, *result.grid)
            with self.autocast():
                tokens_rec = self.tokenizer.decode_probs(target.to(self.device), aniso_d)
                predicted_rec = self.tokenizer.decode_probs(
                    self.predicted_probs(result).to(self.device), aniso_d
                )
            depth_patch = image.shape[2] // result.grid[0]
            token_mask = result.mask[0].reshape(result.grid).float()
            pixel_mask = token_mask.repeat_interleave(depth_patch, 0).repeat_interleave(patch, 1)
            pixel_mask = pixel_mask.repeat_interleave(patch, 2)
            middle = image.shape[2] // 2
            masked_input = image[0, :, middle] * (1 - pixel_mask[middle]) + MASK_GREY * pixel_mask[middle]
            panels = [
                (masked_input, f"masked input ({int(token_mask.sum())} of {token_mask.numel()} tokens)"),
                ((tokens_rec[0, :, middle] + 1) / 2, "tokenizer: its own tokens"),
                ((predicted_rec[0, :, middle] + 1) / 2, "tokenizer: predicted tokens"),
            ]
            for ax, (panel, title) in zip(axes[row], panels, strict=True):
                ax.imshow(panel.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
                ax.set_title(title, fontsize=8)
                ax.axis("off")
            axes[row][0].set_ylabel(str(key), fontsize=7)
        title = f"MIM validation, step {step}"
        if metrics:
            title += (
                f": masked-token accuracy {metrics['accuracy']:.3f} "
                f"(majority-code baseline {metrics['accuracy_majority']:.3f})"
            )
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        with atomic_path(self.output_dir / "pictures" / f"step_{step:07d}.png") as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)

    # ---- export --------------------------------------------------------------------

    def export(self, path: str | os.PathLike) -> None:
        export_encoder(self.model.encoder, path, extra={"step": self.step, "source": str(self.output_dir)})


def add_arguments(parser) -> None:
    add_config_arguments(parser, MIMConfig)


def run(args) -> int:
    return run_pretraining(MIMTrainer, MIMConfig, args, "mim")
