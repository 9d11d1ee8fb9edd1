"""Networks: SAC layers, 3D RoPE, the universal ViT, the segmentation network, the tokenizer, the MIM
model and the classifier. One model family per file."""
