"""The universal visual tokenizer (docs/method.md, section 3): a SAC VQ-VAE with soft tokens.

Encoder (in-plane stride 16): SAC downsampling convs ``start_stride`` (4), 2, 2, each with a
channel LayerNorm and GELU, then two SAC 3x3x3 convs with GroupNorm + LeakyReLU. Quantizer:
``logits = proj(z)`` over K codes, ``p = softmax(logits)``; the soft token is the expected
code embedding ``z_q = sum_k p_k e_k`` (deterministic). ``hard`` (nearest code, commitment
loss, straight-through) and ``gumbel`` (Gumbel-softmax while training) are options. Decoder:
two SAC 3x3x3 convs, SAC transposed-conv upsamplings by 2 (each followed by a 3x3x3 conv),
and a final SAC transposed conv by ``start_stride`` back to the input channels.

Parameter names follow the authors' ``SimpleVQTokenizer`` (docs/weights.md): ``encoder.0``,
``encoder.1.1`` (LayerNorm inside a channel-LayerNorm wrapper), ..., ``quantize.proj``,
``quantize.embedding``, ``decoder.0``, ..., ``decoder.6.transposed_conv``,
``decoder.6.conv.0``, ..., ``decoder.8``; parameter-free activations keep their indices.

Inputs are (B, C, D, H, W) in [-1, 1] with the batch's ``aniso_d`` (2D images: D = 1,
``aniso_d = 5``). The token grid is (D / depth factor, H / 16, W / 16).

`prior_regularization` is the extended prior term over the *global* batch: the mean token
distribution is all-gathered over ranks, and the gradient flows through the local part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pumit_seg.models.sac import SACConv3d, SACDownsample, SACUpsample

__all__ = [
    "QUANTIZER_MODES",
    "ChannelLayerNorm",
    "UpsampleBlock",
    "Quantizer",
    "TokenizerOutput",
    "VisualTokenizer",
    "prior_regularization",
    "mean_token_entropy",
    "perplexity",
    "tokenizer_tiny",
    "tokenizer_paper",
]

QUANTIZER_MODES = ("soft", "hard", "gumbel")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, ...); the LayerNorm sits at index 1 (the authors' keys)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.add_module("1", nn.LayerNorm(channels, eps=eps))

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self, "1")(x.movedim(1, -1)).movedim(-1, 1)


class UpsampleBlock(nn.Module):
    """SAC transposed conv (kernel = stride) then a SAC 3x3x3 conv, GroupNorm, LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, num_groups: int):
        super().__init__()
        self.transposed_conv = SACUpsample(in_channels, out_channels, stride)
        self.conv = nn.Sequential(
            SACConv3d(out_channels, out_channels, 3),
            nn.GroupNorm(num_groups, out_channels),
            nn.LeakyReLU(inplace=True),
        )
        self.level_change = int(math.log2(stride))

    def forward(self, x: Tensor, aniso_d: int, num_downsamples: int) -> Tensor:
        x = self.transposed_conv(x, aniso_d, num_downsamples)
        level = num_downsamples - self.level_change
        return _run_sequential(self.conv, x, aniso_d, level)


def _run_sequential(layers: nn.Sequential, x: Tensor, aniso_d: int, num_downsamples: int) -> Tensor:
    """Run plain layers as they are and SAC 3x3x3 convs with the current (aniso_d, level)."""
    for layer in layers:
        x = layer(x, aniso_d, num_downsamples) if isinstance(layer, SACConv3d) else layer(x)
    return x


class Quantizer(nn.Module):
    """Logits over K codes and the token embedding; ``mode`` soft (default), hard or gumbel.

    * soft: ``z_q = p @ E`` with ``p = softmax(logits)``.
    * hard: nearest code to the encoder feature (``logits = -squared distance``), commitment
      loss ``|sg(e) - z|^2 + beta |e - sg(z)|^2``, straight-through gradient. ``proj`` is unused
      (the feature itself is compared with the codebook), so it is not created.
    * gumbel: ``gumbel_softmax(logits, temperature, hard)`` while training, ``p`` in eval.
    """

    def __init__(
        self,
        in_channels: int,
        num_codes: int,
        code_dim: int,
        mode: str = "soft",
        commitment: float = 0.25,
        gumbel_hard: bool = True,
    ):
        super().__init__()
        if mode not in QUANTIZER_MODES:
            raise ValueError(f"quantizer mode must be one of {QUANTIZER_MODES}, got {mode!r}")
        if mode == "hard" and in_channels != code_dim:
            raise ValueError(
                f"hard quantizer: encoder width {in_channels} must equal the code dim {code_dim}"
            )
        self.mode = mode
        self.num_codes = num_codes
        self.commitment = commitment
        self.gumbel_hard = gumbel_hard
        self.temperature = 1.0  # Gumbel temperature, set by the trainer's schedule
        if mode != "hard":
            self.proj = nn.Linear(in_channels, num_codes)
        self.embedding = nn.Embedding(num_codes, code_dim)
        # uniform +-1/K in every mode, as the authors' tokenizer (and VQGAN); trained without weight decay
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)

    def logits(self, features: Tensor) -> Tensor:
        """(B, C, d, h, w) encoder features -> (B, K, d, h, w) logits."""
        z = features.movedim(1, -1)
        if self.mode == "hard":
            codes = self.embedding.weight
            distance = (z.pow(2).sum(-1, keepdim=True) - 2 * z @ codes.t() + codes.pow(2).sum(-1)).float()
            return (-distance).movedim(-1, 1)
        return self.proj(z).movedim(-1, 1)

    def embed(self, weights: Tensor) -> Tensor:
        """(B, K, d, h, w) code weights (probabilities or one-hot) -> (B, code_dim, d, h, w)."""
        return (weights.movedim(1, -1).to(self.embedding.weight.dtype) @ self.embedding.weight).movedim(-1, 1)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> (z_q, probs, logits, quantization loss (0 unless hard))."""
        logits = self.logits(features)
        probs = logits.float().softmax(dim=1)
        loss = features.new_zeros((), dtype=torch.float32)
        if self.mode == "soft":
            z_q = self.embed(probs)
        elif self.mode == "gumbel":
            weights = (
                F.gumbel_softmax(logits.float(), tau=self.temperature, hard=self.gumbel_hard, dim=1)
                if self.training
                else probs
            )
            z_q = self.embed(weights)
        else:
            one_hot = F.one_hot(logits.argmax(dim=1), self.num_codes).movedim(-1, 1)
            codes = self.embed(one_hot)
            loss = F.mse_loss(features.float(), codes.detach().float()) * self.commitment + F.mse_loss(
                codes.float(), features.detach().float()
            )
            z_q = features + (codes - features).detach()  # straight-through
        return z_q, probs, logits, loss


@dataclass
class TokenizerOutput:
    reconstruction: Tensor  # (B, C, D, H, W), same scale as the input ([-1, 1])
    probs: Tensor  # (B, K, d, h, w) token distributions (softmax of the logits, fp32)
    logits: Tensor  # (B, K, d, h, w)
    z_q: Tensor  # (B, code_dim, d, h, w) token embeddings fed to the decoder
    quant_loss: Tensor  # commitment loss of the hard quantizer, else 0


class VisualTokenizer(nn.Module):
    """SAC VQ-VAE tokenizer with the authors' ``SimpleVQTokenizer`` parameter layout."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        start_stride: int = 4,
        down_channels: Sequence[int] = (128, 256, 512),
        up_channels: Sequence[int] = (128, 256, 512),
        num_codes: int = 1024,
        code_dim: int = 512,
        quantizer: str = "soft",
        commitment: float = 0.25,
        num_groups: int = 8,
    ):
        super().__init__()
        down_channels, up_channels = [int(c) for c in down_channels], [int(c) for c in up_channels]
        if start_stride < 2 or start_stride & (start_stride - 1):
            raise ValueError(f"start_stride must be a power of two >= 2, got {start_stride}")
        if not down_channels or not up_channels:
            raise ValueError("down_channels and up_channels must not be empty")
        self.config = {
            "in_channels": in_channels,
            "start_stride": start_stride,
            "down_channels": down_channels,
            "up_channels": up_channels,
            "num_codes": num_codes,
            "code_dim": code_dim,
            "quantizer": quantizer,
            "commitment": float(commitment),
            "num_groups": num_groups,
        }
        self.stride = start_stride << (len(down_channels) - 1)  # in-plane stride of the token grid
        self.token_level = int(math.log2(self.stride))
        output_stride = self.stride >> (len(up_channels) - 1)
        feature_dim = code_dim if quantizer == "hard" else down_channels[-1]

        encoder: list[nn.Module] = []
        for i, channels in enumerate(down_channels):
            stride = start_stride if i == 0 else 2
            encoder += [
                SACDownsample(in_channels if i == 0 else down_channels[i - 1], channels, stride),
                ChannelLayerNorm(channels),
                nn.GELU(),
            ]
        encoder += [
            SACConv3d(down_channels[-1], down_channels[-1], 3),
            nn.GroupNorm(num_groups, down_channels[-1]),
            nn.LeakyReLU(inplace=True),
            SACConv3d(down_channels[-1], feature_dim, 3),
            nn.GroupNorm(num_groups, feature_dim),
            nn.LeakyReLU(inplace=True),
        ]
        self.encoder = nn.Sequential(*encoder)
        self.quantize = Quantizer(feature_dim, num_codes, code_dim, quantizer, commitment)
        self.decoder = nn.Sequential(
            SACConv3d(code_dim, up_channels[-1], 3),
            nn.GroupNorm(num_groups, up_channels[-1]),
            nn.LeakyReLU(inplace=True),
            SACConv3d(up_channels[-1], up_channels[-1], 3),
            nn.GroupNorm(num_groups, up_channels[-1]),
            nn.LeakyReLU(inplace=True),
            *[
                UpsampleBlock(up_channels[i + 1], up_channels[i], 2, num_groups)
                for i in reversed(range(len(up_channels) - 1))
            ],
            SACUpsample(up_channels[0], in_channels, output_stride),
        )

    @property
    def num_codes(self) -> int:
        return self.quantize.num_codes

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay besides biases and norms: the codebook, as the authors'."""
        return {"quantize.embedding.weight"}

    # ---- the three stages -----------------------------------------------------------

    def encode_features(self, x: Tensor, aniso_d: int) -> Tensor:
        """(B, C, D, H, W) in [-1, 1] -> encoder features on the token grid."""
        if x.dim() != 5:
            raise ValueError(f"VisualTokenizer expects (B, C, D, H, W); got shape {tuple(x.shape)}")
        level = 0
        for layer in self.encoder:
            if isinstance(layer, SACDownsample):
                x = layer(x, aniso_d, level)
                level += int(math.log2(layer.sac_stride))
            elif isinstance(layer, SACConv3d):
                x = layer(x, aniso_d, level)
            else:
                x = layer(x)
        return x

    def encode(self, x: Tensor, aniso_d: int) -> Tensor:
        """-> logits (B, K, d, h, w)."""
        return self.quantize.logits(self.encode_features(x, aniso_d))

    def quantize_logits(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """logits -> (z_q, probs). Hard mode embeds the argmax code (no straight-through path)."""
        probs = logits.float().softmax(dim=1)
        if self.quantize.mode == "hard":
            one_hot = F.one_hot(logits.argmax(dim=1), self.num_codes).movedim(-1, 1)
            return self.quantize.embed(one_hot), probs
        return self.quantize.embed(probs), probs

    def decode(self, z_q: Tensor, aniso_d: int) -> Tensor:
        """Token embeddings (B, code_dim, d, h, w) -> reconstruction (B, C, D, H, W)."""
        level = self.token_level
        x = z_q
        for layer in self.decoder:
            if isinstance(layer, UpsampleBlock):
                x = layer(x, aniso_d, level)
                level -= layer.level_change
            elif isinstance(layer, SACUpsample):
                x = layer(x, aniso_d, level)
                level -= int(math.log2(layer.sac_stride))
            elif isinstance(layer, SACConv3d):
                x = layer(x, aniso_d, level)
            else:
                x = layer(x)
        return x

    def forward(self, x: Tensor, aniso_d: int) -> TokenizerOutput:
        features = self.encode_features(x, aniso_d)
        z_q, probs, logits, quant_loss = self.quantize(features)
        return TokenizerOutput(self.decode(z_q, aniso_d), probs, logits, z_q, quant_loss)

    # ---- what MIM uses --------------------------------------------------------------

    @torch.no_grad()
    def token_distribution(self, x: Tensor, aniso_d: int) -> Tensor:
        """Target token distributions for MIM: softmax(logits), (B, K, d, h, w), fp32."""
        return self.encode(x, aniso_d).float().softmax(dim=1)

    def decode_probs(self, probs: Tensor, aniso_d: int) -> Tensor:
        """Picture a distribution over codes (e.g. MIM predictions): decode its expected embedding."""
        return self.decode(self.quantize.embed(probs), aniso_d)


# --------------------------------------------------------------------------------------
# Codebook statistics and the prior regularisation
# --------------------------------------------------------------------------------------


def _per_position(probs: Tensor) -> Tensor:
    """(B, K, ...) -> (N, K) with one row per token position."""
    return probs.movedim(1, -1).reshape(-1, probs.shape[1])


def mean_token_entropy(probs: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean over positions of H(p) = -sum_k p_k log p_k (nats)."""
    p = _per_position(probs.float())
    return -(p * (p + eps).log()).sum(-1).mean()


def perplexity(mean_probs: Tensor, eps: float = 1e-12) -> Tensor:
    """exp(H(p_bar)) of a mean token distribution (K for uniform use, 1 for a single code)."""
    p = mean_probs.float()
    return torch.exp(-(p * (p + eps).log()).sum())


def prior_regularization(probs: Tensor, group=None, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Extended prior term ``sum_k p_bar_k log p_bar_k`` over the global batch -> (loss, p_bar).

    ``p_bar`` is the mean of ``probs`` over every position of every sample on every rank
    (all-gathered; ranks may hold different numbers of positions). Its value is the global
    mean; its gradient flows through this rank's positions only, scaled by the world size:
    DDP averages gradients over ranks, so the sum of the local paths, which is the gradient
    of the global term, is what reaches the parameters, exactly as one process on the whole
    batch would get it.
    """
    p = _per_position(probs.float())
    local_sum = p.sum(0)
    local_count = torch.tensor([float(p.shape[0])], device=p.device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size(group)
    if world_size == 1:
        p_bar = local_sum / local_count
    else:
        packed = torch.cat([local_sum.detach(), local_count])
        gathered = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(gathered, packed, group=group)
        total = torch.stack(gathered).sum(0)
        global_mean = total[:-1] / total[-1]
        local_part = local_sum / total[-1]
        p_bar = global_mean + world_size * (local_part - local_part.detach())
    loss = (p_bar * (p_bar + eps).log()).sum()
    return loss, p_bar


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------


def tokenizer_paper(**overrides) -> VisualTokenizer:
    """The authors' configuration: channels 128, 256, 512; 1024 codes of dim 512."""
    return VisualTokenizer(**overrides)


def tokenizer_tiny(**overrides) -> VisualTokenizer:
    """CPU test size: channels 8, 16, 16; 32 codes of dim 16."""
    return VisualTokenizer(
        **{
            "down_channels": (8, 16, 16),
            "up_channels": (8, 16, 16),
            "num_codes": 32,
            "code_dim": 16,
            **overrides,
        }
    )
