"""Synthetic data writers: phantoms with known answers for the demo, the tests and the benchmarks.

* `abdomen`: abdomen-like phantoms as nnU-Net raw datasets (``pumit_make_phantoms``);
* `chaos`: CHAOS-layout trees (DICOM series and ground-truth PNGs);
* `pretrain`: a heterogeneous pre-training corpus (2D / 3D, CT / MR / X-ray / fundus, many formats);
* `dicom`: the DICOM writer they share.

Integration layer: these may import nnU-Net (its dataset.json writer); the library never imports them.
"""
