"""The planner's training-memory model of `PUMITSegNet`: what one training step needs on a GPU.

nnU-Net's planner estimates a conv U-Net's feature maps; ours is a ViT, a feature pyramid and a conv
decoder, so `estimate_training_memory` counts their activations (`memory_units`) and weighs them with
constants fitted on measured peaks (`MemoryModel`). The planner picks patch and batch sizes with it;
``benchmarks/bench_training.py --calibrate`` refits it.
"""

import math
from dataclasses import dataclass

import torch

from pumit_seg.models.sac import depth_downsample_stride
from pumit_seg.models.seg_net import TOKEN_LEVEL, PUMITSegNet, depth_factor

__all__ = [
    "ACTIVATION_TERMS",
    "MEMORY_MODEL_TOLERANCE",
    "MemoryModel",
    "count_parameters",
    "estimate_training_memory",
    "memory_units",
    "token_grid",
]

# Largest relative error of the activation estimate against the peak measured on fake tensors over the
# calibration grid (benchmarks/results/memory_calibration.json: 25 %); tests hold the model to it.
MEMORY_MODEL_TOLERANCE = 0.26


@dataclass
class MemoryModel:
    """Training-memory model of `PUMITSegNet` (bf16 autocast, AdamW), in bytes; see `memory_units`.

    * ViT: ``vit_bytes_per_token_channel`` per token, embedding channel and block whose activations are
      kept (pre-norm EVA-02 block, SwiGLU MLP with sub-LN; attention through SDPA's flash / memory-efficient
      kernels, so no quadratic term); with gradient checkpointing only one block's, plus
      ``vit_checkpoint_bytes_per_token_channel`` for every block's saved input.
    * Conv parts (full-resolution branch, pyramid, decoder): ``conv_bytes_per_voxel_channel`` per voxel and
      channel at each level.
    * ``autocast_bytes_per_parameter``: the bf16 copies of the weights that autocast keeps for the backward
      pass (the fit gives 2.3 B, a bf16 copy being 2 B).
    * Fixed: ``bytes_per_parameter`` (fp32 weights, gradients and AdamW's two moments) plus
      ``overhead_bytes`` for the CUDA context, cuDNN workspaces and allocator fragmentation (an allowance,
      not fitted; nnU-Net's own estimate allows a similar margin).

    The activation constants are the non-negative least-squares fit (relative errors) of the bf16 peak of
    a forward + backward pass measured on fake tensors over 9 configurations (tiny / base ViT, patches
    1x128x128 to 32x128x128, batch 1-4, aniso_d 0, 1, 2, 5, with and without checkpointing):
    ``python benchmarks/bench_training.py --calibrate`` -> ``benchmarks/results/memory_calibration.json``
    (its largest error bounds `MEMORY_MODEL_TOLERANCE`; the checkpointed ViT-B is the one overestimated).
    The fit gives the checkpointed inputs 0 bytes: they are small next to the conv parts on that grid.
    """

    vit_bytes_per_token_channel: float = 26.5
    vit_checkpoint_bytes_per_token_channel: float = 0.0
    conv_bytes_per_voxel_channel: float = 7.54
    autocast_bytes_per_parameter: float = 2.33
    bytes_per_parameter: float = 16.0
    overhead_bytes: float = 1.5e9

    def activation_bytes(self, units: dict) -> float:
        """The activation and temporary part of the estimate for `memory_units` `units`."""
        return sum(units[unit] * getattr(self, constant) for unit, constant in ACTIVATION_TERMS.items())


# memory_units key -> the MemoryModel constant (bytes per unit) that multiplies it in the activation estimate;
# `benchmarks/bench_training.py --calibrate` fits these constants
ACTIVATION_TERMS = {
    "vit_token_channels": "vit_bytes_per_token_channel",
    "vit_checkpoint_token_channels": "vit_checkpoint_bytes_per_token_channel",
    "conv_voxel_channels": "conv_bytes_per_voxel_channel",
    "parameters": "autocast_bytes_per_parameter",
}


def count_parameters(arch_kwargs: dict, input_channels: int, num_classes: int) -> int:
    """Number of parameters of `PUMITSegNet(**arch_kwargs)`, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        network = PUMITSegNet(input_channels, num_classes, True, **arch_kwargs)
    return sum(p.numel() for p in network.parameters())


def memory_units(
    arch_kwargs: dict, num_parameters: int, num_classes: int, patch_size, batch_size: int
) -> dict:
    """The quantities the memory model multiplies by its constants (shared by the estimate and its calibration).

    * ``parameters``;
    * ``vit_token_channels``: tokens x width x blocks whose activations are kept for the backward pass (with
      gradient checkpointing only one block's, recomputed in the backward pass);
    * ``vit_checkpoint_token_channels``: tokens x width x blocks of checkpointed block inputs (0 without);
    * ``conv_voxel_channels``: voxels x channels of the conv parts' feature maps at every level.
    All activation quantities are for the whole batch.
    """
    patch = [1, *patch_size] if len(patch_size) == 2 else list(patch_size)
    aniso_d = arch_kwargs["aniso_d"]
    embed_dim = arch_kwargs["vit"]["embed_dim"]
    vit_depth = arch_kwargs["vit"]["depth"]
    num_tokens = math.prod(token_grid(patch, aniso_d))
    checkpointed = bool(arch_kwargs["vit"].get("grad_checkpointing"))

    pyramid_channels = arch_kwargs.get("pyramid_channels") or [embed_dim, embed_dim]
    level_channels = {
        0: 2 * arch_kwargs["full_res_channels"][0],  # branch + decoder stage
        1: 2 * arch_kwargs["full_res_channels"][1],
        2: arch_kwargs["decoder_channels"][0] + pyramid_channels[0],
        3: arch_kwargs["decoder_channels"][1] + pyramid_channels[1] + embed_dim,  # + level-2 intermediate
        4: arch_kwargs["decoder_channels"][2] + 4 * embed_dim,  # 4 block outputs as maps
        5: arch_kwargs["decoder_channels"][3] + embed_dim,
    }
    conv_units = 0.0
    for level, channels in level_channels.items():
        voxels = (patch[0] / depth_factor(level, aniso_d)) * (patch[1] / 2**level) * (patch[2] / 2**level)
        conv_units += voxels * (channels + num_classes)
    return {
        "parameters": float(num_parameters),
        "vit_token_channels": float(batch_size * num_tokens * embed_dim * (1 if checkpointed else vit_depth)),
        "vit_checkpoint_token_channels": float(
            batch_size * num_tokens * embed_dim * vit_depth if checkpointed else 0
        ),
        "conv_voxel_channels": float(batch_size * conv_units),
    }


def estimate_training_memory(
    arch_kwargs: dict,
    num_parameters: int,
    num_classes: int,
    patch_size,
    batch_size: int,
    memory_model: MemoryModel,
) -> float:
    """Estimated peak GPU memory (bytes) of one training step of `PUMITSegNet` with these arch kwargs.

    `patch_size` is (H, W) for 2D or (D, H, W) for 3D; `num_parameters` from `count_parameters`.
    """
    units = memory_units(arch_kwargs, num_parameters, num_classes, patch_size, batch_size)
    return (
        units["parameters"] * memory_model.bytes_per_parameter
        + memory_model.activation_bytes(units)
        + memory_model.overhead_bytes
    )


def token_grid(patch_size, aniso_d: int) -> list[int]:
    """The ViT token grid (d, h, w) of a (D, H, W) or (H, W) patch."""
    patch = [1, *patch_size] if len(patch_size) == 2 else list(patch_size)
    patch_depth = depth_downsample_stride(2**TOKEN_LEVEL, aniso_d, 0)
    return [patch[0] // patch_depth, patch[1] // 2**TOKEN_LEVEL, patch[2] // 2**TOKEN_LEVEL]
