"""nnU-Net trainers for PUMIT networks (fine-tuning).

nnU-Net finds them through ``export nnUNet_extTrainer=$(pumit_nnunet_ext)``, whose folder re-exports
everything in ``__all__``.
"""

from pumit_seg.trainers.pumit_trainer import (
    PUMITTrainer,
    PUMITTrainer_5epochs,
    PUMITTrainer_demo,
    PUMITTrainer_scratch,
    PUMITTrainer_test,
    WarmupCosineLRScheduler,
)

__all__ = [
    "PUMITTrainer",
    "PUMITTrainer_5epochs",
    "PUMITTrainer_demo",
    "PUMITTrainer_scratch",
    "PUMITTrainer_test",
    "WarmupCosineLRScheduler",
]
