"""The paper's fine-tuning settings for BTCV and CHAOS MR, as planner presets (docs/finetuning_nnunet.md).

``pumit_plan_and_preprocess --preset btcv`` (or ``chaos``) plans exactly these; each value can still be
overridden by its own flag, and the command prints what it overrode. Read off the authors' reference
configuration (``conf/downstream/{btcv,chaos}/*.yaml``) and the paper:

* target spacing (depth, in-plane, in-plane) in mm, mapped onto the dataset's axis order (the
  lowest-resolution axis of the fingerprint is depth);
* patch size (depth first) and batch size;
* foreground oversampling: BTCV crops foreground : random as 3 : 1 (``crop_weight: [1, 3]``), i.e. 75 %
  foreground patches; CHAOS keeps nnU-Net's 33 % (the reference's CHAOS crops are not weighted);
* CT intensity window [-175, 250] HU scaled to [-1, 1] (BTCV); MR images are z-scored per image
  (nnU-Net's default for non-CT channels), as the reference;
* ViT-B with pyramid blocks [3, 5, 7, 11], the position grid re-parameterised to the patch's token grid
  (12x12x12 for BTCV, 8x12x12 for CHAOS), LayerNorm eps 1e-5 (the authors' ViT; EVA-02 uses 1e-6: the
  planner reads the eps from the weights file's header when it has one);
* sliding-window overlap 0.75 at inference: ``nnUNetv2_predict -step_size 0.25`` (printed by the command).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pumit_seg.models.pumit_checkpoint import AUTHORS_NORM_EPS
from pumit_seg.models.vit import EVA02_NORM_EPS

__all__ = ["PaperPreset", "PAPER_PRESETS", "AUTHORS_NORM_EPS", "EVA02_NORM_EPS"]


@dataclass(frozen=True)
class PaperPreset:
    name: str
    target_spacing_dhw: tuple[float, float, float]
    patch_size_3d: tuple[int, int, int]
    batch_size: int
    oversample_foreground_percent: float
    ct_window: tuple[float, float] | None
    model: str = "base"
    pyramid_blocks: tuple[int, ...] = (3, 5, 7, 11)
    norm_eps: float = AUTHORS_NORM_EPS
    predict_step_size: float = 0.25  # nnU-Net's step = 1 - overlap; the paper's overlap is 0.75
    configurations: tuple[str, ...] = ("3d_fullres",)
    notes: tuple[str, ...] = field(default_factory=tuple)


PAPER_PRESETS = {
    "btcv": PaperPreset(
        name="btcv",
        target_spacing_dhw=(3.0, 0.75, 0.75),
        patch_size_3d=(48, 192, 192),
        batch_size=4,
        oversample_foreground_percent=0.75,
        ct_window=(-175.0, 250.0),
        notes=(
            "paper: BTCV validation Dice 87.31, ASSD 0.74, HD 13.12 (9 validation cases, fold 0 of pumit_btcv)",
        ),
    ),
    "chaos": PaperPreset(
        name="chaos",
        target_spacing_dhw=(9.0, 1.62109, 1.62109),
        patch_size_3d=(32, 192, 192),
        batch_size=8,
        oversample_foreground_percent=0.33,
        ct_window=None,
        notes=(
            "paper: one MR model on T1DUAL (in / out phase) and T2SPIR (replicated to 2 channels), 40 series: "
            "convert with `pumit_chaos convert --joint_mr`",
            "paper: CHAOS MR hidden test Dice 92.09, ASSD 1.54, HD 19.85",
        ),
    ),
}
