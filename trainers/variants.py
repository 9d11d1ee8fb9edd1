"""Variants of `PUMITTrainer` that change one thing each, kept apart from the real trainers as
nnU-Net keeps its ``variants/``: short schedules for checking a set-up, the demo and the CPU tests.

nnU-Net finds them by class name like any trainer (``-tr PUMITTrainer_5epochs``).
"""

from __future__ import annotations

from pumit_seg.trainers.pumit_trainer import PUMITTrainer

__all__ = ["PUMITTrainer_5epochs", "PUMITTrainer_demo", "PUMITTrainer_test", "PUMITTrainer_smoke"]


class PUMITTrainer_5epochs(PUMITTrainer):
    """5 epochs of 250 iterations, for checking plans and set-ups."""

    NUM_EPOCHS = 5


class PUMITTrainer_demo(PUMITTrainer):
    """`make demo`: 30 epochs x 25 iterations (the demo's expected times: `pumit_seg.app.demo.EXPECTED_MINUTES`).
    A higher learning rate (3e-3, warm-up 1 epoch) because the demo trains a tiny ViT
    from scratch for a few hundred steps only: at 1e-3 the spleen was not learnt in 500 steps, and at
    3e-3 an organ sometimes starts late (the kidneys once stayed at Dice 0 for 500 steps)."""

    NUM_EPOCHS = 30
    NUM_ITERATIONS_PER_EPOCH = 25
    NUM_VAL_ITERATIONS_PER_EPOCH = 5
    INITIAL_LR = 3e-3
    WARMUP_FRACTION = 1 / 30
    SAVE_EVERY = 1000  # only the final checkpoint (and nnU-Net's best one)


class PUMITTrainer_test(PUMITTrainer):
    """CPU tests: 10 epochs x 25 iterations, 2 validation iterations, learning rate 3e-3 for a tiny
    network from scratch (with 4 epochs at 1e-3 half the runs had not yet learnt the 3D phantoms; a
    5-step warm-up sometimes collapsed to one class; the warm-up is 25 steps), and no mirroring (neither as
    augmentation nor at validation / inference, where it would cost 4-8 forward passes)."""

    NUM_EPOCHS = 10
    NUM_ITERATIONS_PER_EPOCH = 25
    NUM_VAL_ITERATIONS_PER_EPOCH = 2
    INITIAL_LR = 3e-3
    SAVE_EVERY = 1000

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        # as nnU-Net's nnUNetTrainerNoMirroring
        rotation, dummy_2d, initial_patch_size, _ = (
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


class PUMITTrainer_smoke(PUMITTrainer_test):
    """Smoke runs (the demo's smallest setting in CI): 2 epochs x 10 iterations, 1 validation iteration.
    Checks that every step runs and writes what it should; learns next to nothing."""

    NUM_EPOCHS = 2
    NUM_ITERATIONS_PER_EPOCH = 10
    NUM_VAL_ITERATIONS_PER_EPOCH = 1
