"""What one training step of a network costs, measured without a GPU and without allocating (issue 12).

Networks are built on the meta device and materialised as fake tensors (`torch._subclasses.FakeTensorMode`):
shapes and dtypes are real, storage is not, so the paper's ViT-B at 48x192x192 x 4 is measured on a laptop.

* FLOPs: `torch.utils.flop_counter.FlopCounterMode` around the forward pass and, separately, around the
  backward pass (matmuls, convolutions and attention; element-wise ops are not counted, PyTorch's
  convention). `pumit_part_flops` measures the parts of `PUMITSegNet` (encoder, full-resolution branch,
  pyramid, decoder) each in isolation, forward and backward, because the counter's module attribution
  of backward FLOPs is unreliable.
* Peak memory: `torch.distributed._tools.mem_tracker.MemTracker` over two AdamW steps (the second has the
  optimiser state, as every later step): parameters, gradients, optimiser state, activations and
  temporaries, in bytes, under an optional CPU autocast dtype (bf16 stands in for CUDA's bf16 autocast:
  the same op lists cast convolutions and matmuls). CUDA's context, cuDNN workspaces and allocator
  fragmentation are not in it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

__all__ = [
    "fake_module",
    "step_flops",
    "step_peak_memory",
    "activation_peak_memory",
    "pumit_part_flops",
    "nnunet_default_network",
]


def fake_module(factory: Callable[[], nn.Module], fake_mode) -> nn.Module:
    """Build `factory()` on the meta device, then give it fake (shape-only) CPU storage."""
    with torch.device("meta"):
        module = factory()
    try:
        with fake_mode:
            return module.to_empty(device="cpu")
    except RuntimeError:
        # some third-party modules keep weak references to their parameters, which to_empty cannot swap;
        # their initialisation runs on fake tensors directly (ours does not: trunc_normal_ reads values)
        with fake_mode:
            return factory()


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _loss(output) -> torch.Tensor:
    outputs = output if isinstance(output, list | tuple) else [output]
    return sum(o.float().mean() for o in outputs)


def _autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()


def step_flops(
    factory: Callable[[], nn.Module], input_shape, autocast_dtype: torch.dtype | None = None
) -> dict[str, float]:
    """{"forward": FLOPs, "backward": FLOPs} of one training step on an input of `input_shape`."""
    from torch.utils.flop_counter import FlopCounterMode

    mode = _fake_mode()
    network = fake_module(factory, mode).train()
    with mode:
        x = torch.empty(*input_shape)
        forward_counter, backward_counter = FlopCounterMode(display=False), FlopCounterMode(display=False)
        with forward_counter, _autocast(autocast_dtype):
            loss = _loss(network(x))
        with backward_counter:
            loss.backward()
    return {
        "forward": float(forward_counter.get_total_flops()),
        "backward": float(backward_counter.get_total_flops()),
    }


def step_peak_memory(
    factory: Callable[[], nn.Module], input_shape, autocast_dtype: torch.dtype | None = None, steps: int = 2
) -> dict[str, float]:
    """Peak bytes of `steps` AdamW training steps, by kind (Parameter, Gradient, Optstate, Activation, Temp,
    Total), measured on fake tensors."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mode = _fake_mode()
    network = fake_module(factory, mode).train()
    with mode:
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, foreach=False)
        x = torch.empty(*input_shape)
        tracker = MemTracker()
        tracker.track_external(network, optimizer, x)
        with tracker:
            for step in range(steps):
                if step:
                    tracker.reset_mod_stats()  # per-module stats only; the device peak is kept
                with _autocast(autocast_dtype):
                    loss = _loss(network(x))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        peak = tracker.get_tracker_snapshot("peak")
    (device_peak,) = peak.values()
    return {getattr(kind, "value", kind): float(value) for kind, value in device_peak.items()}


def activation_peak_memory(
    factory: Callable[[], nn.Module], input_shape, autocast_dtype: torch.dtype | None = None
) -> float:
    """Peak bytes of activations and temporaries of one forward + backward pass (parameters and gradients
    left out), on fake tensors: what the memory model's per-element constants describe. (With an optimiser
    the overall peak of a small patch can be the optimiser step instead, which `step_peak_memory` sees.)"""
    from torch.distributed._tools.mem_tracker import MemTracker

    mode = _fake_mode()
    network = fake_module(factory, mode).train()
    with mode:
        x = torch.empty(*input_shape)
        tracker = MemTracker()
        tracker.track_external(network, x)
        with tracker:
            with _autocast(autocast_dtype):
                loss = _loss(network(x))
            loss.backward()
        peak = tracker.get_tracker_snapshot("peak")
    (device_peak,) = peak.values()
    kinds = {getattr(kind, "value", kind): float(value) for kind, value in device_peak.items()}
    return kinds["Total"] - kinds["Parameter"] - kinds["Gradient"] - kinds.get("Buffer", 0.0)


def pumit_part_flops(
    arch_kwargs: dict, input_channels: int, num_classes: int, input_shape
) -> dict[str, dict]:
    """Forward / backward FLOPs of PUMITSegNet's encoder, full-resolution branch, pyramid and decoder, each
    measured in isolation (parameters and, except for the raw input, inputs requiring gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pumit_seg.models.seg_net import PUMITSegNet
    from pumit_seg.models.vit import tokens_to_grid

    mode = _fake_mode()
    network = fake_module(lambda: PUMITSegNet(input_channels, num_classes, True, **arch_kwargs), mode).train()
    aniso_d = network.aniso_d
    with mode:
        x = torch.empty(*input_shape)
        if network.spatial_dims == 2:
            x = x.unsqueeze(2)

        def encoder(x):
            encoded = network.encoder(x, aniso_d, return_blocks=tuple(network.pyramid_blocks))
            return [tokens_to_grid(t[:, 1:], encoded.grid) for t in encoded.block_outputs]

        with torch.no_grad():
            features = encoder(x)
            skips = network.full_res_branch(x, aniso_d) + network.pyramid(features, aniso_d)

        def grad_inputs(tensors):
            return [t.detach().requires_grad_(True) for t in tensors]

        parts = {
            "encoder": lambda: encoder(x),
            "full_res_branch": lambda: network.full_res_branch(x, aniso_d),
            "pyramid": lambda: network.pyramid(grad_inputs(features), aniso_d),
            "decoder": lambda: network.decoder(grad_inputs(skips), aniso_d),
        }
        result = {}
        for name, run in parts.items():
            forward_counter, backward_counter = FlopCounterMode(display=False), FlopCounterMode(display=False)
            with forward_counter:
                loss = _loss(run())
            with backward_counter:
                loss.backward()
            result[name] = {
                "forward": float(forward_counter.get_total_flops()),
                "backward": float(backward_counter.get_total_flops()),
            }
    return result


def nnunet_default_network(
    patch_size, spacing, input_channels: int, num_classes: int, deep_supervision: bool = True
) -> nn.Module:
    """nnU-Net's default 3D network (`PlainConvUNet`) as its `ExperimentPlanner` configures it for this patch
    and spacing: topology from `get_pool_and_conv_props`, 32 features doubling to 320, two convs per
    stage, InstanceNorm, LeakyReLU."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, pool_op_kernel_sizes, conv_kernel_sizes, _, _ = get_pool_and_conv_props(
        list(spacing), list(patch_size), 4, 999999
    )
    num_stages = len(conv_kernel_sizes)
    return PlainConvUNet(
        input_channels=input_channels,
        n_stages=num_stages,
        features_per_stage=[min(32 * 2**i, 320) for i in range(num_stages)],
        conv_op=nn.Conv3d,
        kernel_sizes=conv_kernel_sizes,
        strides=pool_op_kernel_sizes,
        n_conv_per_stage=[2] * num_stages,
        num_classes=num_classes,
        n_conv_per_stage_decoder=[2] * (num_stages - 1),
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=deep_supervision,
    )
