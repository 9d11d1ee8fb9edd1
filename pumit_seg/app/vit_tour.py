"""Show one universal ViT handling 2D images and volumes of different spacings.

Run: ``python -m pumit_seg.app.vit_tour``. For each example it prints the image shape and
spacing, the degree of anisotropy, the patch kernel SAC actually applies, and the token
grid; then the parameter counts of the presets (base / large counted on the meta device,
so nothing is allocated).
"""

from __future__ import annotations

import torch

from pumit_seg.models.sac import ANISO_D_2D, aniso_d_from_spacing, depth_downsample_stride
from pumit_seg.models.vit import universal_vit_base, universal_vit_large, universal_vit_tiny

# (name, (D, H, W), spacing (s_d, s_h, s_w) in mm); a 2D image is D = 1 with aniso_d 5.
EXAMPLES = [
    ("2D X-ray", (1, 128, 128), None),
    ("CT, 2.5 x 0.8 x 0.8 mm", (32, 128, 128), (2.5, 0.8, 0.8)),
    ("MR, 5 x 1 x 1 mm", (16, 128, 128), (5.0, 1.0, 1.0)),
    ("isotropic 1 mm", (64, 64, 64), (1.0, 1.0, 1.0)),
]
BATCH_SIZE = 2


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_vit_tour(seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = universal_vit_tiny().eval()
    patch = model.patch_size
    print(f"universal ViT (tiny): width {model.embed_dim}, {len(model.blocks)} blocks, patch {patch}")
    for name, shape, spacing in EXAMPLES:
        aniso_d = ANISO_D_2D if spacing is None else aniso_d_from_spacing(spacing)
        grey = torch.randn(BATCH_SIZE, 1, *shape)
        image = grey.expand(-1, model.config["in_channels"], -1, -1, -1)  # grey replicated to RGB
        kernel_depth = depth_downsample_stride(patch, aniso_d, 0)
        with torch.no_grad():
            output = model(image, aniso_d)
        spacing_text = "2D" if spacing is None else " x ".join(f"{s:g}" for s in spacing) + " mm"
        print(
            f"  {name:<24} shape {'x'.join(map(str, shape)):<11} spacing {spacing_text:<18} "
            f"aniso_d {aniso_d}  patch kernel {kernel_depth}x{patch}x{patch}  "
            f"token grid {'x'.join(map(str, output.grid))}  tokens {tuple(output.tokens.shape)}"
        )
    print(f"parameters: tiny {count_parameters(model):,}", end="")
    with torch.device("meta"):
        for preset_name, preset in (("base", universal_vit_base), ("large", universal_vit_large)):
            print(f", {preset_name} {count_parameters(preset()):,}", end="")
    print()


if __name__ == "__main__":
    run_vit_tour()
