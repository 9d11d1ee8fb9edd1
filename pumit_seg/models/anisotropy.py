"""The degree of anisotropy (aniso_d) of a voxel spacing: the one place its rule is written.

Free of torch, so the pre-training store and its preparation workers can use it without loading torch.
`pumit_seg.models.sac` re-exports it (docs/method.md, "Degree of anisotropy and SAC").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["ANISO_D_2D", "MAX_ANISO_D", "aniso_d_from_spacing"]

# aniso_d is clipped to 0..MAX_ANISO_D; a 2D image is a one-slice volume with aniso_d = ANISO_D_2D.
MAX_ANISO_D = 5
ANISO_D_2D = MAX_ANISO_D


def aniso_d_from_spacing(spacing_dhw: Sequence[float], log_tolerance: float = 1e-6) -> int:
    """Degree of anisotropy: ``floor(log2(clip(s_d / min(s_h, s_w), 1, 32)))``, in 0..5.

    The one place this rule is written. A depth spacing of ``inf`` marks a 2D image (one slice,
    no depth neighbour) and gives `ANISO_D_2D`. `log_tolerance` absorbs floating-point noise in
    the spacing ratio (2.4 / 0.3 is 7.999999999999999 in binary floating point, which must still
    give 3); the planner passes a larger one to round ratios just below a power of two up.
    """
    if len(spacing_dhw) != 3:
        raise ValueError(f"spacing must be (s_d, s_h, s_w), got {tuple(spacing_dhw)}")
    s_d, s_h, s_w = (float(s) for s in spacing_dhw)
    if min(s_d, s_h, s_w) <= 0 or not all(math.isfinite(s) for s in (s_h, s_w)) or math.isnan(s_d):
        raise ValueError(f"spacing must be positive and finite (depth may be inf for 2D), got {tuple(spacing_dhw)}")
    if math.isinf(s_d):
        return ANISO_D_2D
    ratio = min(max(s_d / min(s_h, s_w), 1.0), 2.0**MAX_ANISO_D)
    return min(int(math.floor(math.log2(ratio) + log_tolerance)), MAX_ANISO_D)
