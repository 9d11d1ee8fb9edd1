"""Data: synthetic phantoms and (as they arrive) the pre-training store, sampling and crops,
MedMNIST loading. Free of nnU-Net."""
