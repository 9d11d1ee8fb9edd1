"""pumit-seg: the Pre-trained Universal Medical Image Transformer (PUMIT) in nnU-Net v2.

Layers, each importing only those below it (checked by import-linter in ``make test``):

* application: `pumit_seg.app` (the demo, its report, tours);
* integration: `pumit_seg.planners`, `pumit_seg.trainers`, `pumit_seg.evaluation` and the synthetic data
  writers `pumit_seg.phantoms`, which may import nnU-Net;
* library: `pumit_seg.models`, `pumit_seg.data` and the small shared modules (`weights`, `atomic`,
  `cli_checks`, `plotting`), which never import nnU-Net.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
