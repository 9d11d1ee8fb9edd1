# Re-export of pumit-seg's nnU-Net trainers, found by nnU-Net through nnUNet_extTrainer.
from pumit_seg.trainers import *  # noqa: F401,F403
