"""Optimisation pieces shared by every PUMIT trainer (fine-tuning, pre-training, classification).

Free of nnU-Net, so the pre-training and classification trainers import it without nnU-Net.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import _LRScheduler

# Parameters without weight decay besides every bias and 1-D (norm) parameter.
NO_WEIGHT_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")


def weight_decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on weights, none on biases, norms and embeddings/tokens.

    A model may name more parameters to leave undecayed with a ``no_weight_decay()`` method (the timm
    convention; the tokenizer's codebook).
    """
    skip = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if (
            parameter.ndim <= 1
            or name.endswith(".bias")
            or name.split(".")[-1] in NO_WEIGHT_DECAY_NAMES
            or name in skip
        ):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosineLRScheduler(_LRScheduler):
    """Linear warm-up from ``initial_lr / warmup_steps`` to ``initial_lr``, then cosine decay to ``final_lr``.

    Like nnU-Net's `PolyLRScheduler`, ``step(current_step)`` sets the rate for an explicit step,
    which makes resuming from a checkpoint exact.
    """

    def __init__(self, optimizer, initial_lr: float, final_lr: float, warmup_steps: int, max_steps: int):
        self.initial_lr = initial_lr
        self.final_lr = final_lr
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.max_steps - self.warmup_steps, 1), 1.0)
        return self.final_lr + 0.5 * (self.initial_lr - self.final_lr) * (1 + math.cos(math.pi * progress))

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


# Devices with PyTorch's fused (single-kernel) AdamW; other devices keep the default implementation.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_adamw(model: nn.Module, lr: float, weight_decay: float, **adamw_kwargs) -> torch.optim.AdamW:
    """AdamW over `weight_decay_param_groups`, fused where every parameter is on a CPU or CUDA device.

    The fused AdamW does the same update in one kernel per parameter group instead of a loop over
    parameters (4x faster optimiser step of the tiny network on the CPU, ``benchmarks/results/training_cpu.md``).
    ``fused=False`` or ``foreach`` in `adamw_kwargs` keeps the caller's choice.
    """
    groups = weight_decay_param_groups(model, weight_decay)
    parameters = [p for group in groups for p in group["params"]]
    if "fused" not in adamw_kwargs and "foreach" not in adamw_kwargs:
        adamw_kwargs["fused"] = bool(parameters) and all(
            p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in parameters
        )
    return torch.optim.AdamW(groups, lr=lr, **adamw_kwargs)
