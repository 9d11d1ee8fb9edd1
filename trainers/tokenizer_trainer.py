"""`pumit_pretrain tokenizer`: pre-training of the universal visual tokenizer (docs/method.md, section 3).

    pumit_pretrain tokenizer --store STORE -o RUN [--preset tiny] [--lpips-weights VGG LPIPS_HEADS]
    torchrun --nproc_per_node 8 -m pumit_seg.trainers.pretrain_cli tokenizer --store STORE -o RUN

Generator loss = L1 + perceptual (LPIPS on at most 24 random slices per sample)
+ prior (``sum p_bar log p_bar`` over the global batch, weight 1.0) + entropy (mean H(p),
weight 0.2) + quantisation (hard mode) + adversarial (weight 3e-3, only while
``max(EMA of the discriminator loss, last discriminator loss) <= 0.025``). The discriminator
(hinge loss) trains every step with its own AdamW. Every number is a flag with the paper's
default; ``--preset tiny`` runs on a CPU.

Two stages in one run (the authors warm-start their soft-token runs from a tokenizer trained
beforehand): for the first ``--reconstruction-steps`` steps the tokenizer learns to reconstruct
(L1 + perceptual; the prior, the entropy term and the generator's GAN term are off, the
discriminator already trains), then the soft-token regularisers and the GAN term join. From scratch,
prior + entropy alone have a content-free optimum (each token position keeps its own few codes
whatever the image). The stage follows from the step, so a resumed run switches at the same step;
``--reconstruction-steps 0`` (e.g. with ``--init-from`` a tokenizer that already reconstructs) skips
the first stage. See docs/pretraining_recipe.md.

On the held-out images every ``--val-every`` steps: L1 against two baselines (a crop's mean, the
crop averaged over token blocks), input dependence, perplexity of the mean token distribution, mean
token entropy against log K, codes in use (`pumit_seg.trainers.pretrain_health`), PNG grids of input
vs reconstruction (2D and 3D samples) and a codebook-usage plot. A collapsed or stalled run prints a
``WARNING: tokenizer collapsed ...`` line on stderr and into ``health.json``; ``--stop-on-collapse``
ends it instead (exit status 3). The final export is ``tokenizer.safetensors``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pumit_seg.atomic import atomic_path
from pumit_seg.models.discriminator import (
    PatchDiscriminator,
    generator_adversarial_loss,
    hinge_discriminator_loss,
)
from pumit_seg.models.lpips import build_perceptual_loss
from pumit_seg.models.tokenizer import (
    QUANTIZER_MODES,
    VisualTokenizer,
    mean_token_entropy,
    perplexity,
    prior_regularization,
)
from pumit_seg.trainers.pretrain_base import (
    PretrainConfig,
    PretrainTrainer,
    add_config_arguments,
    run_pretraining,
)
from pumit_seg.trainers.pretrain_health import TokenizerHealth, record_health, tokenizer_verdict
from pumit_seg.weights import load_state_dict_file

__all__ = ["TokenizerConfig", "TokenizerTrainer", "add_arguments", "run", "build_tokenizer"]

# CPU size (docs/pretraining_recipe.md: what was measured with it). Widths of 8-16 channels learned too
# slowly to beat the token-block baseline in a few thousand steps; 32-64 cost little more at 32x32 crops.
TINY_PRESET = {
    "down_channels": (32, 64, 64),
    "up_channels": (32, 64, 64),
    "num_codes": 64,
    "code_dim": 32,
    "disc_channels": (16, 16, 16),
    "crop_in_plane": 32,
    "crop_depth_units": 1,
    "batch_size": 4,
    "max_steps": 8000,  # about 2.5 minutes on 2 idle CPU cores; 2000 beat the per-crop mean only
    "reconstruction_steps": 4000,
    "warmup_steps": 100,
    "lr": 1e-3,  # 2e-3 held for long let the 2D path stop depending on its input, even without regularisers
    "disc_lr": 2e-3,
    "num_workers": 0,
    "log_every": 10,
    "val_every": 2000,
    "ckpt_every": 2000,
    "val_batch_size": 4,
    "val_max_batches": 8,
}


# First-stage length of the paper configuration: extrapolated from the CPU-scale runs in
# docs/pretraining_recipe.md (the authors' own first stage, a separate earlier run, is not published).
RECONSTRUCTION_STEPS_PAPER = 50_000


@dataclass
class TokenizerConfig(PretrainConfig):
    """Flags of `pumit_pretrain tokenizer`; defaults are the authors' main run (docs/method.md, section 3)."""

    PRESETS: ClassVar[dict] = {"tiny": TINY_PRESET}

    # the base's run fields (steps, batch, lr, warm-up, crop) already default to the tokenizer's paper run
    # model
    in_channels: int = field(default=3, metadata={"help": "image channels (grey replicated to 3)"})
    start_stride: int = field(default=4, metadata={"help": "stride of the first encoder conv"})
    down_channels: tuple[int, ...] = field(default=(128, 256, 512), metadata={"help": "encoder widths"})
    up_channels: tuple[int, ...] = field(default=(128, 256, 512), metadata={"help": "decoder widths"})
    num_codes: int = field(default=1024, metadata={"help": "codebook size K"})
    code_dim: int = field(default=512, metadata={"help": "code embedding dimension"})
    quantizer: str = field(default="soft", metadata={"help": f"quantizer: one of {QUANTIZER_MODES}"})
    commitment: float = field(default=0.25, metadata={"help": "commitment weight of the hard quantizer"})
    num_groups: int = field(default=8, metadata={"help": "GroupNorm groups in the tokenizer"})
    gumbel_t_max: float = field(default=0.9, metadata={"help": "Gumbel temperature at step 0 (cosine)"})
    gumbel_t_min: float = field(default=1e-6, metadata={"help": "Gumbel temperature at the last step"})
    init_from: str = field(
        default="",
        metadata={
            "help": "warm start: tokenizer weights (safetensors / .pt); one that already reconstructs may "
            "skip the first stage (--reconstruction-steps 0)"
        },
    )
    reconstruction_steps: int = field(
        default=RECONSTRUCTION_STEPS_PAPER,
        metadata={
            "help": "first stage: steps trained on reconstruction alone (prior, entropy and GAN terms off), "
            "then they switch on; 0 = regularised from the first step"
        },
    )
    stop_on_collapse: bool = field(
        default=False,
        metadata={"help": "end the run (exit status 3) when a validation finds it collapsed or stalled"},
    )
    # loss
    prior_weight: float = field(
        default=1.0, metadata={"help": "weight of sum p_bar log p_bar (the 'sharpen' run: -0.1)"}
    )
    entropy_weight: float = field(default=0.2, metadata={"help": "weight of the mean token entropy"})
    quant_weight: float = field(default=1.0, metadata={"help": "weight of the hard quantizer's VQ loss"})
    perceptual_weight: float = field(default=1.0, metadata={"help": "weight of LPIPS"})
    max_perceptual_slices: int = field(
        default=24, metadata={"help": "LPIPS on at most this many slices/sample"}
    )
    lpips_weights: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "files with VGG16 (torchvision vgg16) and LPIPS head (vgg.pth) weights; none: no LPIPS"
        },
    )
    gan_weight: float = field(default=3e-3, metadata={"help": "fixed weight of the generator's GAN term"})
    gan_threshold: float = field(
        default=0.025, metadata={"help": "GAN term on while max(disc-loss EMA, last disc loss) <= this"}
    )
    disc_ema_init: float = field(default=0.1, metadata={"help": "initial EMA of the discriminator loss"})
    disc_ema_momentum: float = field(default=0.9, metadata={"help": "momentum of the discriminator-loss EMA"})
    disc_lr: float = field(default=1e-3, metadata={"help": "discriminator peak learning rate"})
    disc_channels: tuple[int, ...] = field(default=(128, 256, 512), metadata={"help": "discriminator widths"})
    disc_num_groups: int = field(default=16, metadata={"help": "GroupNorm groups in the discriminator"})
    disc_post_convs: int = field(default=1, metadata={"help": "3x3x3 convs after the last downsampling"})
    # health pictures
    picture_samples: int = field(
        default=4, metadata={"help": "2D and 3D samples in each reconstruction grid"}
    )

    def check(self) -> None:
        super().check()
        if self.quantizer not in QUANTIZER_MODES:
            raise ValueError(f"--quantizer must be one of {QUANTIZER_MODES}, got {self.quantizer!r}")
        if self.crop_in_plane % (self.start_stride << (len(self.down_channels) - 1)):
            raise ValueError(
                f"--crop-in-plane {self.crop_in_plane} must be a multiple of the tokenizer stride "
                f"{self.start_stride << (len(self.down_channels) - 1)}"
            )
        for name in ("down_channels", "up_channels"):
            bad = [c for c in getattr(self, name) if c % self.num_groups]
            if bad:
                raise ValueError(
                    f"--{name.replace('_', '-')} {bad} not divisible by --num-groups {self.num_groups}"
                )
        bad = [c for c in self.disc_channels if c % self.disc_num_groups]
        if bad:
            raise ValueError(
                f"--disc-channels {bad} not divisible by --disc-num-groups {self.disc_num_groups}"
            )
        if self.max_perceptual_slices < 1:
            raise ValueError(f"--max-perceptual-slices must be >= 1, got {self.max_perceptual_slices}")
        if self.reconstruction_steps < 0:
            raise ValueError(f"--reconstruction-steps must be >= 0, got {self.reconstruction_steps}")
        if not 0 <= self.disc_ema_momentum < 1:
            raise ValueError(f"--disc-ema-momentum must be in [0, 1), got {self.disc_ema_momentum}")


def build_tokenizer(config: TokenizerConfig) -> VisualTokenizer:
    return VisualTokenizer(
        in_channels=config.in_channels,
        start_stride=config.start_stride,
        down_channels=config.down_channels,
        up_channels=config.up_channels,
        num_codes=config.num_codes,
        code_dim=config.code_dim,
        quantizer=config.quantizer,
        commitment=config.commitment,
        num_groups=config.num_groups,
    )


def _sample_slices(x: Tensor, y: Tensor, max_slices: int) -> tuple[Tensor, Tensor]:
    """(B, C, D, H, W) pair -> (B * s, C, H, W) with the same random s <= max_slices slices per sample."""
    batch, channels, depth, height, width = x.shape
    if depth > max_slices:
        index = torch.stack([torch.randperm(depth, device=x.device)[:max_slices] for _ in range(batch)])
        index = index.view(batch, 1, max_slices, 1, 1).expand(-1, channels, -1, height, width)
        x, y = x.gather(2, index), y.gather(2, index)

    def flat(t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(-1, channels, height, width)

    return flat(x), flat(y)


class TokenizerTrainer(PretrainTrainer):
    kind = "tokenizer"
    export_name = "tokenizer.safetensors"
    config: TokenizerConfig

    def __init__(self, config: TokenizerConfig):
        self.disc_loss_ema = config.disc_ema_init
        self.last_disc_loss = config.disc_ema_init
        self.health_stop: str | None = None  # why --stop-on-collapse ends the run
        config.check()
        # weight files are read before the store is opened, so a bad file fails fast
        perceptual = build_perceptual_loss(config.lpips_weights) if config.perceptual_weight > 0 else None
        super().__init__(config)
        self.perceptual = perceptual.to(self.device) if perceptual is not None else None

    # ---- hooks ---------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        model = build_tokenizer(self.config)
        if self.config.init_from:
            state = load_state_dict_file(self.config.init_from)
            state = {k.removeprefix("tokenizer."): v for k, v in state.items()}
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as error:
                raise ValueError(
                    f"--init-from {self.config.init_from}: weights do not fit the tokenizer built from "
                    f"the flags: {error}"
                ) from error
        return model

    def build_extra_modules(self) -> dict[str, nn.Module]:
        c = self.config
        return {
            "discriminator": PatchDiscriminator(
                c.in_channels, c.disc_channels, c.disc_post_convs, c.disc_num_groups
            )
        }

    def build_optimizers(self):
        return {
            "generator": self.make_optimizer(self.model, self.config.lr),
            "discriminator": self.make_optimizer(self.extra_modules["discriminator"], self.config.disc_lr),
        }

    def extra_checkpoint_state(self) -> dict:
        return {
            "disc_loss_ema": self.disc_loss_ema,
            "last_disc_loss": self.last_disc_loss,
            "reconstruction_steps": self.config.reconstruction_steps,
            "stage": self.stage(self.step),
        }

    def load_extra_checkpoint_state(self, state: dict) -> None:
        self.disc_loss_ema = float(state.get("disc_loss_ema", self.config.disc_ema_init))
        self.last_disc_loss = float(state.get("last_disc_loss", self.config.disc_ema_init))
        saved = int(state.get("reconstruction_steps", 0))
        if saved != self.config.reconstruction_steps and not getattr(
            self.config, "allow_option_change", False
        ):
            raise ValueError(
                f"{self.checkpoint_path} was trained with --reconstruction-steps {saved}, this run asks for "
                f"{self.config.reconstruction_steps}: resume with the same value or use another --output-dir"
            )

    # ---- the two stages --------------------------------------------------------------

    def stage(self, step: int) -> int:
        """1: reconstruction only (steps < --reconstruction-steps), 2: with the soft-token regularisers."""
        return 1 if step < self.config.reconstruction_steps else 2

    def stop_requested(self) -> str | None:
        return self.health_stop

    # ---- one step ------------------------------------------------------------------

    @property
    def gan_enabled(self) -> bool:
        """The GAN term is on while max(EMA, last discriminator loss) <= threshold."""
        return max(self.disc_loss_ema, self.last_disc_loss) <= self.config.gan_threshold

    def gumbel_temperature(self, step: int) -> float:
        c = self.config
        progress = min(step / max(c.max_steps, 1), 1.0)
        return c.gumbel_t_min + 0.5 * (c.gumbel_t_max - c.gumbel_t_min) * (1 + math.cos(math.pi * progress))

    def generator_loss(
        self, x: Tensor, aniso_d: int, use_gan: bool, regularise: bool = True
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The tokenizer's loss on one (local) batch in [-1, 1] -> (loss, reconstruction, terms).

        ``regularise=False`` (the first stage) leaves the prior and entropy terms out of the loss;
        they are still computed and logged.
        """
        c = self.config
        discriminator = self.extra_modules["discriminator"]
        with self.autocast():
            out = self.train_model(x, aniso_d)
            reconstruction = out.reconstruction
            l1 = F.l1_loss(reconstruction.float(), x.float())
            zero = l1.new_zeros(())
            perceptual = zero
            if self.perceptual is not None:
                slices_x, slices_rec = _sample_slices(x, reconstruction, c.max_perceptual_slices)
                perceptual = self.perceptual(slices_x, slices_rec).float()
            adversarial = zero
            if use_gan:
                adversarial = generator_adversarial_loss(discriminator(reconstruction, aniso_d))
        prior, p_bar = prior_regularization(out.probs)
        entropy = mean_token_entropy(out.probs)
        prior_weight, entropy_weight = (c.prior_weight, c.entropy_weight) if regularise else (0.0, 0.0)
        loss = (
            l1
            + c.perceptual_weight * perceptual
            + prior_weight * prior
            + entropy_weight * entropy
            + c.quant_weight * out.quant_loss
            + (c.gan_weight * adversarial if use_gan else 0.0)
        )
        terms = {
            "l1": l1,
            "perceptual": perceptual,
            "prior": prior,
            "entropy": entropy,
            "quant": out.quant_loss,
            "gen_adv": adversarial,
            "batch_perplexity": perplexity(p_bar.detach()),
        }
        return loss, reconstruction, terms

    def training_step(self, batch: dict, step: int) -> dict[str, float]:
        c = self.config
        x = batch["image"] * 2 - 1
        aniso_d = int(batch["aniso_d"])
        if c.quantizer == "gumbel":
            self.model.quantize.temperature = self.gumbel_temperature(step)
        discriminator = self.extra_modules["discriminator"]

        stage = self.stage(step)
        if stage == 2 and step == c.reconstruction_steps and step > 0 and self.dist.is_main:
            print(f"step {step}: first stage done, prior, entropy and GAN terms switch on", flush=True)
        use_gan = self.gan_enabled and stage == 2
        discriminator.requires_grad_(False)  # the generator's GAN term must not touch D's grads / DDP hooks
        loss, reconstruction, terms = self.generator_loss(x, aniso_d, use_gan, regularise=stage == 2)
        self.backward_and_step(loss, "generator", self.model, update_scaler=False)
        discriminator.requires_grad_(True)

        with self.autocast():
            scores = self.train_extra["discriminator"](torch.cat([x, reconstruction.detach()]), aniso_d)
            score_real, score_fake = scores.chunk(2)
            disc_loss = hinge_discriminator_loss(score_real, score_fake)
        self.backward_and_step(disc_loss, "discriminator", discriminator)

        # the gate must agree on every rank: use the loss averaged over ranks
        self.last_disc_loss = self.dist.mean({"disc": disc_loss.item()}, self.device)["disc"]
        m = c.disc_ema_momentum
        self.disc_loss_ema = m * self.disc_loss_ema + (1 - m) * self.last_disc_loss
        metrics = {"loss": loss.item(), **{k: float(v.item()) for k, v in terms.items()}}
        metrics.update(
            {
                "disc": float(disc_loss.item()),
                "disc_ema": self.disc_loss_ema,
                "gan_on": float(use_gan),
                "stage": float(stage),
            }
        )
        return metrics

    # ---- validation ----------------------------------------------------------------

    def validate(self, step: int) -> dict[str, float]:
        batches = self.validation_batches()
        if not batches:
            return {}
        health = TokenizerHealth(self.model.num_codes)
        shown: dict[str, list] = {"2D": [], "3D": []}
        for batch in batches:
            batch = self.to_device(batch)
            x = batch["image"] * 2 - 1
            aniso_d = int(batch["aniso_d"])
            with self.autocast():
                out = self.model(x, aniso_d)
            rec = out.reconstruction.float()
            health.add(x, rec, out.probs)
            kind = "2D" if x.shape[2] == 1 else "3D"
            for i in range(x.shape[0]):
                if len(shown[kind]) < self.config.picture_samples:
                    shown[kind].append(
                        (x[i].cpu(), rec[i].cpu(), batch["keys"][i] if "keys" in batch else "")
                    )
        metrics = health.metrics()
        verdict = tokenizer_verdict(metrics)
        metrics["val_healthy"] = float(verdict.healthy)
        metrics["val_stage"] = float(self.stage(step - 1))
        record_health(self.output_dir, "tokenizer", step, verdict, metrics)
        if self.config.stop_on_collapse and not verdict.healthy:
            self.health_stop = f"--stop-on-collapse: {verdict.message('tokenizer', step)}"
        pictures = self.output_dir / "pictures"
        for kind, samples in shown.items():
            if samples:
                write_reconstruction_grid(
                    samples, pictures / f"reconstruction_{kind}_step{step:07d}.png", kind, step, metrics
                )
        write_codebook_usage(health.p_bar, metrics, pictures / f"codebook_usage_step{step:07d}.png", step)
        return metrics


# --------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------


def _display(volume: Tensor, depth_index: int):
    """(C, D, H, W) in [-1, 1] -> an (H, W) or (H, W, 3) array in [0, 1] for imshow."""
    image = ((volume[:, depth_index] + 1) / 2).clamp(0, 1)
    if image.shape[0] == 1:
        return image[0].numpy()
    return image[:3].permute(1, 2, 0).numpy()


def write_reconstruction_grid(
    samples: list[tuple[Tensor, Tensor, str]], path, kind: str, step: int, metrics: dict | None = None
) -> None:
    """One row per sample: input and reconstruction (3D: three slices each, at 1/4, 1/2, 3/4 depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def slice_ids(depth: int) -> list[int]:
        return [0] if depth == 1 else [depth // 4, depth // 2, (3 * depth) // 4]

    num_slices = max(len(slice_ids(x.shape[1])) for x, _, _ in samples)
    columns = 2 * num_slices
    fig, axes = plt.subplots(
        len(samples), columns, figsize=(1.9 * columns, 1.9 * len(samples)), squeeze=False
    )
    for row, (x, rec, key) in enumerate(samples):
        depth = x.shape[1]
        for j, d in enumerate(slice_ids(depth)):
            for offset, (volume, label) in enumerate(((x, "input"), (rec, "reconstruction"))):
                ax = axes[row, 2 * j + offset]
                image = _display(volume, d)
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
                ax.set_title(f"{label}" + (f" z={d}/{depth}" if depth > 1 else ""), fontsize=6)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(str(key)[-24:], fontsize=6)
    title = f"{kind} held-out samples, step {step}"
    if metrics:
        title += (
            f"\nheld-out L1 {metrics['val_l1']:.3f}; baselines: crop mean {metrics['val_l1_crop_mean']:.3f},"
            f"\ntoken blocks {metrics['val_l1_token_blocks']:.3f}; input dependence "
            f"{metrics['val_input_dependence']:.2f}"
        )
    fig.suptitle(title, fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the title's lines
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def write_codebook_usage(p_bar: Tensor, metrics: dict[str, float], path, step: int) -> None:
    """Every code's share of p_bar, sorted, with the uniform share, perplexity and entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = p_bar.double().sort(descending=True).values.numpy()
    num_codes = len(shares)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(num_codes), shares, width=1.0)
    ax.axhline(1 / num_codes, color="red", lw=0.8, label="uniform 1/K")
    ax.set_yscale("log")
    ax.set_xlabel("code (sorted by share)")
    ax.set_ylabel("share of p_bar")
    ax.set_title(
        f"step {step}: perplexity {metrics['val_perplexity']:.1f} / {num_codes}, token entropy "
        f"{metrics['val_token_entropy']:.3f} nats (max {math.log(num_codes):.2f})",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TokenizerConfig)


def run(args: argparse.Namespace) -> int:
    return run_pretraining(TokenizerTrainer, TokenizerConfig, args, "tokenizer")
