"""nnU-Net experiment planning for PUMIT networks (`pumit_plan_and_preprocess`): the planner, its
training-memory model, the paper's presets and the names written into plans files."""

from pumit_seg.planners.memory_model import (
    MEMORY_MODEL_TOLERANCE,
    MemoryModel,
    estimate_training_memory,
    memory_units,
)
from pumit_seg.planners.plans_keys import PRETRAINED_WEIGHTS_PLANS_KEY, PUMIT_PLANS_NAME
from pumit_seg.planners.presets import PAPER_PRESETS, PaperPreset
from pumit_seg.planners.pumit_planner import PUMITPlanner, check_patch_size, choose_aniso_d

__all__ = [
    "MEMORY_MODEL_TOLERANCE",
    "PAPER_PRESETS",
    "PRETRAINED_WEIGHTS_PLANS_KEY",
    "PUMIT_PLANS_NAME",
    "MemoryModel",
    "PUMITPlanner",
    "PaperPreset",
    "check_patch_size",
    "choose_aniso_d",
    "estimate_training_memory",
    "memory_units",
]
