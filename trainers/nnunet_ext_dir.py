"""Where nnU-Net finds our trainers: `export nnUNet_extTrainer=$(pumit_nnunet_ext)`.

nnU-Net imports every module of each `nnUNet_extTrainer` folder as a *top-level*
module. The folder therefore holds one tiny re-export module and is not a package
itself; pointing the variable at `pumit_seg/trainers` would import our trainer classes
twice under two module names.
"""

import os
from pathlib import Path

# nnU-Net settings that keep its worker processes sane on small CPU machines (2 cores): one
# preprocessing / data-augmentation worker each and no torch.compile (CUDA-only in nnU-Net).
CPU_NNUNET_SETTINGS = {"nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1", "nnUNet_compile": "f"}


def nnunet_ext_dir() -> str:
    """Absolute path of the folder to put into the `nnUNet_extTrainer` environment variable."""
    return str(Path(__file__).resolve().parent / "nnunet_ext")


def nnunet_environment(root: str | os.PathLike, cpu: bool = True) -> dict[str, str]:
    """Environment for nnU-Net subprocesses working under `root` (raw / preprocessed / results folders).

    Our trainers are found through `nnUNet_extTrainer`; pre-trained weights a user's shell may name
    are ignored (`PUMIT_PRETRAINED_WEIGHTS` set empty). With `cpu`, `CPU_NNUNET_SETTINGS` apply
    unless the caller's environment already sets them.
    """
    root = Path(root).resolve()
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(root / "nnUNet_raw"),
        nnUNet_preprocessed=str(root / "nnUNet_preprocessed"),
        nnUNet_results=str(root / "nnUNet_results"),
        nnUNet_extTrainer=nnunet_ext_dir(),
        PUMIT_PRETRAINED_WEIGHTS="",
    )
    if cpu:
        env.update({key: os.environ.get(key, value) for key, value in CPU_NNUNET_SETTINGS.items()})
    return env


def main() -> None:
    print(nnunet_ext_dir())


if __name__ == "__main__":
    main()
