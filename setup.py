"""pumit-seg: PUMIT (Pre-trained Universal Medical Image Transformer) inside nnU-Net v2.

`planners/`, `trainers/` and `evaluation/` sit at the repository root and are linked into the
package folder (`pumit_seg/planners` -> `../planners`, ...), so they install as `pumit_seg.*`
and every tool (linters, the import-contract checker, editors) sees one package. Nothing generic
like `evaluation` lands in site-packages as a top-level module.
"""

from setuptools import setup

setup(
    name="pumit-seg",
    version="0.1.0",
    description="PUMIT universal medical image transformer for nnU-Net v2",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "pumit_seg",
        "pumit_seg.models",
        "pumit_seg.data",
        "pumit_seg.phantoms",
        "pumit_seg.app",
        "pumit_seg.planners",
        "pumit_seg.trainers",
        "pumit_seg.evaluation",
        # The nnUNet_extTrainer folder (`pumit_nnunet_ext` prints its path). nnU-Net imports its one module
        # as a top-level module; that module only re-exports pumit_seg.trainers, so the classes are the
        # same objects under either name. Listed as a package (not package data) so setuptools installs it
        # without a warning.
        "pumit_seg.trainers.nnunet_ext",
    ],
    package_dir={"pumit_seg": "pumit_seg"},  # the subpackages are found through the links
    install_requires=[
        # torch is installed first by the Makefile and pinned by a constraint file,
        # so this range never pulls a second (CUDA) build on a CPU machine.
        "torch>=2.1",
        "nnunetv2>=2.8,<2.9",
        "monai>=1.6,<1.7",
        "SimpleITK>=2.2",
        "batchgenerators>=0.25",
        "acvl-utils>=0.2",
        "scipy>=1.10",
        "safetensors>=0.4",
        "numpy",
        "pydicom>=2.4",
        "nibabel",  # FreeSurfer .mgh / .mgz and the NIfTI completeness checks of pumit_seg.data.readers
        "pillow",
        "matplotlib",
        "tqdm",
    ],
    extras_require={"test": ["pytest>=7", "ruff", "import-linter>=2.1", "scikit-learn"]},
    entry_points={
        "console_scripts": [
            "pumit_nnunet_ext=pumit_seg.trainers.nnunet_ext_dir:main",
            "pumit_plan_and_preprocess=pumit_seg.planners.plan_and_preprocess:main",
            "pumit_make_phantoms=pumit_seg.phantoms.abdomen:main",
            "pumit_evaluate=pumit_seg.evaluation.evaluate_folder:main",
            "pumit_chaos=pumit_seg.evaluation.chaos:main",
            "pumit_btcv=pumit_seg.evaluation.btcv:main",
            "pumit_pretrain=pumit_seg.trainers.pretrain_cli:main",
            "pumit_classify=pumit_seg.trainers.classification:main",
            "pumit_demo=pumit_seg.app.demo:main",
        ],
    },
)
