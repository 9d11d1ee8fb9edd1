"""Networks: SAC layers, 3D RoPE, the universal ViT, the segmentation network (and, as they
arrive, the tokenizer, the MIM model and the classifier). One model family per file."""
