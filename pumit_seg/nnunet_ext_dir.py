"""Where nnU-Net finds our trainers: `export nnUNet_extTrainer=$(pumit_nnunet_ext)`.

nnU-Net imports every module of each `nnUNet_extTrainer` folder as a *top-level*
module. The folder therefore holds one tiny re-export module and is not a package
itself; pointing the variable at `pumit_seg/trainers` would import our trainer classes
twice under two module names.
"""

from pathlib import Path


def nnunet_ext_dir() -> str:
    """Absolute path of the folder to put into the `nnUNet_extTrainer` environment variable."""
    return str(Path(__file__).resolve().parent / "nnunet_ext")


def main() -> None:
    print(nnunet_ext_dir())


if __name__ == "__main__":
    main()
