"""nnU-Net trainers for PUMIT networks (fine-tuning) and the pre-training trainers."""
