"""What one training step of a network costs, measured without a GPU and without allocating.

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
* Cost cuts (`COST_CUTS`): what was done to make a step cheaper, each with a way to build the network
  without it (`network_without_cut`), so that ``benchmarks/bench_training.py`` shows it before and after.
  `INFERENCE_CUTS` are the same for prediction (no autograd), undone by `without_inference_cut` and measured
  by ``benchmarks/bench_predict.py``.
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
    "adamw_for_tracking",
    "nnunet_sgd",
    "activation_peak_memory",
    "pumit_part_flops",
    "nnunet_default_network",
    "COST_CUTS",
    "network_without_cut",
    "INFERENCE_CUTS",
    "without_inference_cut",
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


def adamw_for_tracking(parameters) -> torch.optim.Optimizer:
    """AdamW as the PUMIT trainers use it, in the per-parameter form that fake tensors support (the fused
    kernel keeps the same two moments per parameter)."""
    return torch.optim.AdamW(parameters, lr=1e-4, foreach=False)


def nnunet_sgd(parameters) -> torch.optim.Optimizer:
    """nnUNetTrainer's optimiser: SGD with Nesterov momentum 0.99 and weight decay 3e-5."""
    return torch.optim.SGD(parameters, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)


def step_peak_memory(
    factory: Callable[[], nn.Module],
    input_shape,
    autocast_dtype: torch.dtype | None = None,
    steps: int = 2,
    make_optimizer: Callable = adamw_for_tracking,
) -> dict[str, float]:
    """Peak bytes of `steps` training steps with `make_optimizer(parameters)`, by kind (Parameter, Gradient,
    Optstate, Activation, Temp, Total), measured on fake tensors."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mode = _fake_mode()
    network = fake_module(factory, mode).train()
    with mode:
        optimizer = make_optimizer(network.parameters())
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
    patch_size,
    spacing,
    input_channels: int,
    num_classes: int,
    deep_supervision: bool = True,
    base_features: int = 32,
    max_features: int = 320,
) -> nn.Module:
    """nnU-Net's default 3D network (`PlainConvUNet`) as its `ExperimentPlanner` configures it for this patch
    and spacing: topology from `get_pool_and_conv_props`, 32 features doubling to 320, two convs per
    stage, InstanceNorm, LeakyReLU. `base_features` / `max_features` shrink it for smoke runs only."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, pool_op_kernel_sizes, conv_kernel_sizes, _, _ = get_pool_and_conv_props(
        list(spacing), list(patch_size), 4, 999999
    )
    num_stages = len(conv_kernel_sizes)
    return PlainConvUNet(
        input_channels=input_channels,
        n_stages=num_stages,
        features_per_stage=[min(base_features * 2**i, max_features) for i in range(num_stages)],
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


# What makes a PUMITSegNet training step cheaper than a literal transcription of the method, and what each
# saves is measured by undoing it (`network_without_cut`) in benchmarks/bench_training.py.
COST_CUTS = {
    "inplace_activation": "LeakyReLU in place after each InstanceNorm, as nnU-Net: one feature map fewer kept "
    "per conv-norm-act for the backward pass",
    "concat_free_skips": "decoder stages convolve the upsampled map and the skip with their kernel slices and "
    "add, instead of keeping the concatenation of both for the backward pass",
    "fused_attention": "scaled_dot_product_attention's fused kernels instead of softmax(QK^T)V, which keeps an "
    "L x L matrix per head",
    "fixed_kernels": "SAC kernels stored at the plan's aniso_d instead of sum-pooled at every step "
    "(a fidelity fix, #7)",
    "fused_adamw": "fused AdamW (one kernel per parameter group) instead of a loop over parameters",
}


class _ConcatenatedInput(nn.Module):
    """A decoder stage that gets the concatenation of its inputs (how the decoder was before `concat_free_skips`)."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x, aniso_d: int, level: int):
        return self.stage(torch.cat(list(x), dim=1) if isinstance(x, list | tuple) else x, aniso_d, level)


class _MathAttention(nn.Module):
    """Runs the wrapped network with PyTorch's explicit (math) attention instead of its fused kernels."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return self.network(x)


def network_without_cut(
    cut: str | None, arch_kwargs: dict, input_channels: int, num_classes: int
) -> tuple[Callable[[], nn.Module], dict]:
    """(network factory, AdamW keyword arguments) of `PUMITSegNet` with the cost cut `cut` undone; ``None``
    gives the network as it is. The factory's module computes the same function (up to float rounding)."""
    from pumit_seg.models.seg_net import PUMITSegNet

    if cut is not None and cut not in COST_CUTS:
        raise ValueError(f"unknown cost cut {cut!r}; known: {sorted(COST_CUTS)}")
    if cut == "fixed_kernels":
        arch_kwargs = {**arch_kwargs, "fixed_kernels": False}

    def factory() -> nn.Module:
        network = PUMITSegNet(input_channels, num_classes, True, **arch_kwargs)
        if cut == "inplace_activation":
            for module in network.modules():
                if isinstance(module, nn.LeakyReLU):
                    module.inplace = False
        elif cut == "concat_free_skips":
            network.decoder.stages = nn.ModuleList(_ConcatenatedInput(s) for s in network.decoder.stages)
        elif cut == "fused_attention":
            return _MathAttention(network)
        return network

    return factory, ({"fused": False} if cut == "fused_adamw" else {})


# What makes PUMITSegNet's prediction (a forward pass without autograd) cheaper; each is undone on a built
# network by `without_inference_cut` and measured by benchmarks/bench_predict.py.
INFERENCE_CUTS = {
    "concat_without_grad": "decoder stages convolve the concatenation of the upsampled map and the skip once "
    "when no gradient is recorded, instead of one convolution per part (kernel-slice copies) and their sum",
    "fold_level2_lateral": "the decoder's level-2 lateral 1x1x1 conv (768 -> 128 channels) folded into the "
    "pyramid's last level-2 transposed conv (768 -> 768): one transposed conv to 128 channels with the product "
    "kernel, kept while the weights stay the same",
}


def without_inference_cut(network: nn.Module, cut: str) -> nn.Module:
    """`network` (a `PUMITSegNet`, changed in place and returned) with the inference cost cut `cut` undone; the
    function it computes stays the same (up to float rounding)."""
    from pumit_seg.models.seg_net import ConvNormAct

    if cut not in INFERENCE_CUTS:
        raise ValueError(f"unknown inference cost cut {cut!r}; known: {sorted(INFERENCE_CUTS)}")
    if cut == "concat_without_grad":
        for module in network.modules():
            if isinstance(module, ConvNormAct):
                module.concat_without_grad = False
    elif cut == "fold_level2_lateral":
        network.fold_level2_lateral = False
    return network
