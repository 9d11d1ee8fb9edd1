"""nnU-Net experiment planners for PUMIT networks (`pumit_plan_and_preprocess`)."""

from pumit_seg.planners.presets import PAPER_PRESETS, PaperPreset
from pumit_seg.planners.pumit_planner import (
    MEMORY_MODEL_TOLERANCE,
    PRETRAINED_WEIGHTS_PLANS_KEY,
    PUMIT_PLANS_NAME,
    MemoryModel,
    PUMITPlanner,
    check_patch_size,
    choose_aniso_d,
    estimate_training_memory,
    memory_units,
)

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
