"""Trainers: nnU-Net fine-tuning (`pumit_trainer`, its short-schedule `variants`), pre-training
(`pretrain_base`, `tokenizer_trainer`, `mim_trainer`, the `pumit_pretrain` CLI), classification
(`classification`) and the nnU-Net glue (`nnunet_ext_dir`: where nnU-Net finds these trainers).

nnU-Net finds the fine-tuning trainers through ``export nnUNet_extTrainer=$(pumit_nnunet_ext)``, whose
folder re-exports everything in ``__all__``. They are imported lazily (PEP 562), so the pre-training and
classification commands start without loading nnU-Net.
"""

import importlib

# trainer class -> the module that defines it
_TRAINER_MODULES = {
    "PUMITTrainer": "pumit_seg.trainers.pumit_trainer",
    "PUMITTrainer_scratch": "pumit_seg.trainers.pumit_trainer",
    "PUMITTrainer_5epochs": "pumit_seg.trainers.variants",
    "PUMITTrainer_demo": "pumit_seg.trainers.variants",
    "PUMITTrainer_test": "pumit_seg.trainers.variants",
    "PUMITTrainer_smoke": "pumit_seg.trainers.variants",
}
__all__ = sorted(_TRAINER_MODULES)


def __getattr__(name: str):
    if name in _TRAINER_MODULES:
        return getattr(importlib.import_module(_TRAINER_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
