"""pumit-seg: the Pre-trained Universal Medical Image Transformer (PUMIT) in nnU-Net v2.

The core package (`pumit_seg`) never imports nnU-Net; the nnU-Net integration lives in
`pumit_seg.planners` and `pumit_seg.trainers`, evaluation in `pumit_seg.evaluation`.
"""

from pumit_seg.nnunet_ext_dir import nnunet_ext_dir

__version__ = "0.1.0"
__all__ = ["nnunet_ext_dir", "__version__"]
