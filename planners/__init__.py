"""nnU-Net experiment planners for PUMIT networks (`pumit_plan_and_preprocess`)."""

from pumit_seg.planners.pumit_planner import (
    PRETRAINED_WEIGHTS_PLANS_KEY,
    PUMIT_PLANS_NAME,
    MemoryModel,
    PUMITPlanner,
    check_patch_size,
    estimate_training_memory,
)

__all__ = [
    "PRETRAINED_WEIGHTS_PLANS_KEY",
    "PUMIT_PLANS_NAME",
    "MemoryModel",
    "PUMITPlanner",
    "check_patch_size",
    "estimate_training_memory",
]
