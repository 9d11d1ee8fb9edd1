"""Trainers: nnU-Net fine-tuning (`pumit_trainer`), pre-training (`pretrain_base`, `tokenizer_trainer`,
`mim_trainer`, the `pumit_pretrain` CLI) and classification (`classification`).

nnU-Net finds the fine-tuning trainers through ``export nnUNet_extTrainer=$(pumit_nnunet_ext)``, whose
folder re-exports everything in ``__all__``. They are imported lazily (PEP 562), so the pre-training and
classification commands start without loading nnU-Net.
"""

import importlib

__all__ = [
    "PUMITTrainer",
    "PUMITTrainer_5epochs",
    "PUMITTrainer_demo",
    "PUMITTrainer_scratch",
    "PUMITTrainer_smoke",
    "PUMITTrainer_test",
]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("pumit_seg.trainers.pumit_trainer"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
