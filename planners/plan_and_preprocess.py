"""`pumit_plan_and_preprocess`: fingerprint, PUMIT planning and nnU-Net preprocessing in one command.

nnU-Net's own ``nnUNetv2_plan_and_preprocess -pl`` only finds planners inside the nnunetv2 package,
so this command runs the same three steps through nnU-Net's API with `PUMITPlanner`:

    pumit_plan_and_preprocess -d 501 --model base
    nnUNetv2_train 501 3d_fullres 0 -tr PUMITTrainer -p PUMITPlans

    pumit_plan_and_preprocess -d 300 --preset btcv --pretrained_weights pumit-b.safetensors

Before nnU-Net's fingerprint reads anything, every training image and label is read through the
project's validated reader (`pumit_seg.data.readers.read_image`, the one ``pumit_evaluate`` uses): a
truncated file, NaN / inf voxels, a missing channel file (``_0001``) or label, or channels of different
shapes stop the command with an error naming the case and the file (`check_raw_training_cases`), where
nnU-Net would plan from a zero-filled volume or crash with an ``IndexError``.

``--preset btcv|chaos`` plans the paper's configuration (`pumit_seg.planners.presets`) and prints the
matching ``nnUNetv2_train`` / ``nnUNetv2_predict`` lines. A fingerprint that no longer matches the raw
images is recomputed, and the command says so (`pumit_seg.planners.fingerprint_state`).

Afterwards the stock commands (``nnUNetv2_preprocess -plans_name PUMITPlans``, ``nnUNetv2_train -p
PUMITPlans``, ``nnUNetv2_predict -p PUMITPlans``) work on the plans as usual.
"""

import argparse
import os

from pumit_seg.cli_checks import exit_on_bad_input, float_in_range, int_in_range
from pumit_seg.planners.plans_keys import PUMIT_PLANS_NAME
from pumit_seg.planners.presets import PAPER_PRESETS
from pumit_seg.planners.pumit_planner import PUMITPlanner

DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres")
DEFAULT_MODEL = "base"
DEFAULT_GPU_MEMORY_GB = 8.0
MAX_PROCESSES = 256
MAX_PATCH_SIZE = 4096
MAX_BATCH_SIZE = 4096
MAX_CHANNELS = 16384
MAX_SPACING_MM = 1000.0
MAX_GPU_MEMORY_GB = 4096.0


def _training_cases(raw_folder: str, dataset_json: dict) -> dict[str, dict]:
    """Case -> {"images": [channel files], "label": file, "problems": [missing files, extra channels]}."""
    ending = dataset_json.get("file_ending", ".nii.gz")
    channels = dataset_json.get("channel_names", dataset_json.get("modality")) or {}
    num_channels = len(channels)
    if "dataset" in dataset_json:  # explicit file lists, as nnU-Net allows
        cases = {}
        for case, entry in dataset_json["dataset"].items():
            images = [os.path.join(raw_folder, os.path.expandvars(i)) for i in entry.get("images", [])]
            label = os.path.join(raw_folder, os.path.expandvars(entry.get("label", "")))
            problems = [f"missing {f}" for f in [*images, label] if not os.path.isfile(f)]
            if len(images) != num_channels:
                problems.append(f"{len(images)} image file(s) listed for {num_channels} channel(s)")
            cases[case] = {"images": images, "label": label, "problems": problems}
        return cases
    images_folder = os.path.join(raw_folder, "imagesTr")
    if not os.path.isdir(images_folder):
        raise FileNotFoundError(f"{images_folder} does not exist: no training images to plan from")
    names = sorted(n for n in os.listdir(images_folder) if n.endswith(ending) and not n.startswith("."))
    cases = {}
    for name in names:
        stem = name[: -len(ending)]
        if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            raise ValueError(
                f"{os.path.join(images_folder, name)}: not named CASE_XXXX{ending} (XXXX: the 4-digit channel)"
            )
        cases.setdefault(stem[:-5], set()).add(int(stem[-4:]))
    result = {}
    for case, present in cases.items():
        images = [os.path.join(images_folder, f"{case}_{c:04d}{ending}") for c in range(num_channels)]
        label = os.path.join(raw_folder, "labelsTr", case + ending)
        problems = [f"missing {f}" for f in [*images, label] if not os.path.isfile(f)]
        extra = sorted(c for c in present if c >= num_channels)
        if extra:
            problems.append(
                f"channel file(s) {[f'{case}_{c:04d}{ending}' for c in extra]} beyond the "
                f"{num_channels} channel(s) of dataset.json"
            )
        result[case] = {"images": images, "label": label, "problems": problems}
    return result


def _check_case(case: str, images: list[str], label: str) -> None:
    from pumit_seg.data.readers import read_image

    shapes = {}
    for file in [*images, label]:
        shapes[file] = read_image(file).spatial_shape  # ImageReadError names the file and the problem
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{os.path.basename(f)} {s}" for f, s in shapes.items())
        raise ValueError(f"case {case}: its images and label differ in shape ({listed})")


def check_raw_training_cases(raw_dataset_folder: str, num_processes: int = 1) -> int:
    """Read every training image and label of a raw nnU-Net dataset through the validated reader.

    Raises (naming the case and the file) on a missing channel file or label, a damaged image (truncated,
    NaN / inf, no spacing: `pumit_seg.data.readers.ImageReadError`, the evaluator's errors) or channels /
    label of different shapes. Returns the number of cases checked."""
    import json
    from concurrent.futures import ProcessPoolExecutor

    dataset_json_file = os.path.join(raw_dataset_folder, "dataset.json")
    if not os.path.isfile(dataset_json_file):
        raise FileNotFoundError(f"{dataset_json_file} does not exist")
    with open(dataset_json_file) as f:
        dataset_json = json.load(f)
    cases = _training_cases(raw_dataset_folder, dataset_json)
    if not cases:
        raise FileNotFoundError(f"{raw_dataset_folder}: no training case in imagesTr")
    incomplete = {case: entry["problems"] for case, entry in cases.items() if entry["problems"]}
    if incomplete:
        lines = [f"case {case}: {', '.join(problems)}" for case, problems in sorted(incomplete.items())]
        raise FileNotFoundError(
            f"{raw_dataset_folder}: {len(incomplete)} training case(s) incomplete: " + "; ".join(lines[:10])
        )
    arguments = [(case, entry["images"], entry["label"]) for case, entry in cases.items()]
    if num_processes > 1 and len(arguments) > 1:
        with ProcessPoolExecutor(max_workers=min(num_processes, len(arguments))) as pool:
            for future in [pool.submit(_check_case, *a) for a in arguments]:
                future.result()
    else:
        for a in arguments:
            _check_case(*a)
    return len(cases)


def check_fingerprints(dataset_ids: list[int], verbose: bool = False) -> list[int]:
    """Dataset ids whose existing fingerprint is stale (printed with the reason); they are recomputed."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from pumit_seg.planners.fingerprint_state import fingerprint_staleness

    stale = []
    for dataset_id in dataset_ids:
        name = maybe_convert_to_dataset_name(dataset_id)
        reason = fingerprint_staleness(
            os.path.join(nnUNet_raw, name), os.path.join(nnUNet_preprocessed, name)
        )
        if reason is not None:
            print(f"{name}: the existing fingerprint is stale ({reason}); recomputing it")
            stale.append(dataset_id)
        elif verbose:
            print(f"{name}: the fingerprint (if any) matches the raw data")
    return stale


def plan_and_preprocess(
    dataset_ids: list[int],
    configurations=DEFAULT_CONFIGURATIONS,
    num_processes=None,
    num_processes_fingerprint: int | None = None,
    plans_name: str = PUMIT_PLANS_NAME,
    gpu_memory_target_in_gb: float = DEFAULT_GPU_MEMORY_GB,
    overwrite_target_spacing=None,
    verify_dataset_integrity: bool = False,
    clean: bool = False,
    skip_preprocessing: bool = False,
    verbose: bool = False,
    **planner_kwargs,
) -> str:
    """Extract fingerprints (recomputing stale ones), plan with `PUMITPlanner(**planner_kwargs)` and preprocess
    `configurations`.

    `num_processes` is one number or one per configuration (nnU-Net's default: 8 for 2d, 4 for
    3d_fullres, or ``nnUNet_def_n_proc``). Returns the plans identifier.
    """
    # nnU-Net's API is imported here so `--help` stays fast and paths are read at call time.
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from pumit_seg.planners.fingerprint_state import record_fingerprint_sources

    for dataset_id in dataset_ids:  # before any fingerprint: nnU-Net's readers zero-fill damaged files
        checked = check_raw_training_cases(
            os.path.join(nnUNet_raw, maybe_convert_to_dataset_name(dataset_id)),
            num_processes_fingerprint or 1,
        )
        if verbose:
            print(f"dataset {dataset_id}: {checked} training case(s) read and checked")
    stale = [] if clean else check_fingerprints(dataset_ids, verbose)
    for dataset_id in dataset_ids:
        extract_fingerprints(
            [dataset_id],
            num_processes=num_processes_fingerprint or default_num_processes,
            check_dataset_integrity=verify_dataset_integrity,
            clean=clean or dataset_id in stale,
            verbose=verbose,
        )
        name = maybe_convert_to_dataset_name(dataset_id)
        record_fingerprint_sources(os.path.join(nnUNet_raw, name), os.path.join(nnUNet_preprocessed, name))
    for dataset_id in dataset_ids:
        planner = PUMITPlanner(
            dataset_id,
            gpu_memory_target_in_gb,
            plans_name=plans_name,
            overwrite_target_spacing=[float(s) for s in overwrite_target_spacing]
            if overwrite_target_spacing
            else None,
            **planner_kwargs,
        )
        planner.plan_experiment()
    if not skip_preprocessing:
        if num_processes is None:
            defaults = {"2d": 8, "3d_fullres": 4}
            num_processes = [defaults.get(c, default_num_processes) for c in configurations]
        elif isinstance(num_processes, int):
            num_processes = [num_processes]
        preprocess(
            dataset_ids,
            plans_name,
            configurations=list(configurations),
            num_processes=list(num_processes),
            verbose=verbose,
        )
    return plans_name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pumit_plan_and_preprocess",
        description="nnU-Net fingerprint extraction, PUMIT experiment planning (plans 'PUMITPlans': 2d and "
        "3d_fullres for pumit_seg.models.seg_net.PUMITSegNet) and nnU-Net preprocessing.",
    )
    processes = int_in_range(1, MAX_PROCESSES)
    patch = int_in_range(1, MAX_PATCH_SIZE)
    channels = int_in_range(1, MAX_CHANNELS)
    spacing = float_in_range(0.0, MAX_SPACING_MM, low_open=True)
    parser.add_argument("-d", nargs="+", type=int_in_range(1, 999), required=True, help="dataset id(s)")
    parser.add_argument(
        "-c",
        nargs="+",
        default=None,
        help="configurations to preprocess (default: 2d 3d_fullres; a preset: 3d_fullres)",
    )
    parser.add_argument(
        "-np", nargs="+", type=processes, default=None,
        help="preprocessing processes: one number or one per configuration (default: 8 4)",
    )  # fmt: skip
    parser.add_argument(
        "-npfp", type=processes, default=None, help="fingerprint processes (default: nnUNet_def_n_proc or 8)"
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PAPER_PRESETS),
        default=None,
        help="the paper's fine-tuning configuration for BTCV or CHAOS MR (spacing, patch, batch, foreground "
        "oversampling, CT window, ViT-B, position grid, LayerNorm eps, inference overlap); the flags below "
        "override single settings",
    )
    parser.add_argument(
        "--model", choices=("tiny", "base", "large"), default=None, help="ViT size (default: base)"
    )
    parser.add_argument(
        "-gpu_memory_target",
        type=float_in_range(0.0, MAX_GPU_MEMORY_GB, low_open=True),
        default=DEFAULT_GPU_MEMORY_GB,
        help=f"GPU memory budget in GB for patch and batch size (default: {DEFAULT_GPU_MEMORY_GB:g})",
    )
    parser.add_argument(
        "--patch_size_3d", type=patch, nargs=3, default=None, metavar=("D", "H", "W"),
        help="fix the 3d_fullres patch size (checked)",
    )  # fmt: skip
    parser.add_argument(
        "--patch_size_2d",
        type=patch,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="fix the 2d patch size (checked)",
    )
    parser.add_argument(
        "--batch_size", type=int_in_range(1, MAX_BATCH_SIZE), default=None,
        help="fix the batch size instead of the memory model's",
    )  # fmt: skip
    parser.add_argument(
        "--decoder_channels", type=channels, nargs=4, default=None,
        help="decoder widths at 1/4..1/32 (default: 128 256 512 512)",
    )  # fmt: skip
    parser.add_argument(
        "--full_res_channels", type=channels, nargs=2, default=None,
        help="full-resolution branch widths at 1/1, 1/2 (default: 32 64)",
    )  # fmt: skip
    parser.add_argument(
        "--pyramid_channels", type=channels, nargs=2, default=None,
        help="pyramid widths at 1/4, 1/8 (default: the ViT width)",
    )  # fmt: skip
    parser.add_argument(
        "--pyramid_blocks", type=int_in_range(0, 1023), nargs=4, default=None,
        help="ViT blocks feeding the pyramid (default: the model's, [3, 5, 7, 11] for base)",
    )  # fmt: skip
    parser.add_argument(
        "--grad_checkpointing", action="store_true", help="gradient checkpointing in the ViT blocks"
    )
    parser.add_argument(
        "--adaptive_kernels",
        action="store_true",
        help="keep isotropic SAC kernels pooled at every step instead of storing the shapes this plan uses "
        "(not the reference: Adam then moves pooled kernels 2^k times faster)",
    )
    parser.add_argument(
        "--norm_eps", type=float_in_range(0.0, 1.0, low_open=True), default=None,
        help="ViT LayerNorm eps (default: read from the weights file, else the preset's 1e-5, else 1e-6)",
    )  # fmt: skip
    parser.add_argument(
        "--pretrained_weights",
        default=None,
        help="encoder weights written to the plans as pumit_pretrained_weights",
    )
    parser.add_argument(
        "-overwrite_plans_name", default=PUMIT_PLANS_NAME, help=f"plans name (default: {PUMIT_PLANS_NAME})"
    )
    parser.add_argument(
        "--target_spacing", type=spacing, nargs=3, default=None, metavar=("D", "H", "W"),
        help="3d_fullres target spacing in mm, depth (the lowest-resolution axis) first; mapped onto the "
        "dataset's axis order",
    )  # fmt: skip
    parser.add_argument(
        "-overwrite_target_spacing", type=spacing, nargs=3, default=None,
        help="3d_fullres target spacing in nnU-Net's axis order (nnU-Net's option)",
    )  # fmt: skip
    parser.add_argument(
        "--aniso_log2_tolerance", type=float_in_range(0.0, 0.5), default=None,
        help="a depth / in-plane ratio this close (in log2) below a power of two rounds up to it (default 0.1)",
    )  # fmt: skip
    parser.add_argument(
        "--ct_window", type=float_in_range(-1e5, 1e5), nargs=2, default=None, metavar=("LOW", "HIGH"),
        help="clip CT channels to [LOW, HIGH] and scale to [-1, 1] (through nnU-Net's CTNormalization)",
    )  # fmt: skip
    parser.add_argument(
        "--oversample_foreground", type=float_in_range(0.0, 1.0), default=None,
        help="share of foreground-centred patches in a batch (nnU-Net: 0.33)",
    )  # fmt: skip
    parser.add_argument("--verify_dataset_integrity", action="store_true")
    parser.add_argument("--clean", action="store_true", help="recompute an existing fingerprint")
    parser.add_argument("--no_pp", action="store_true", help="plan only, no preprocessing")
    parser.add_argument("--verbose", action="store_true")
    return parser


def resolve_settings(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Planner keyword arguments from the flags and the preset; flags win. Returns (kwargs, notes)."""
    preset = PAPER_PRESETS[args.preset] if args.preset else None
    notes = []

    def pick(flag_value, preset_value, default, name):
        if flag_value is not None:
            if preset is not None and preset_value is not None and flag_value != preset_value:
                notes.append(f"--{name} {flag_value} overrides the {preset.name} preset's {preset_value}")
            return flag_value
        return preset_value if preset is not None and preset_value is not None else default

    if args.ct_window is not None and args.ct_window[0] >= args.ct_window[1]:
        raise ValueError(f"argument --ct_window: LOW must be below HIGH, got {args.ct_window}")
    if args.pretrained_weights is not None:
        # checked before any fingerprint or plan is written, so a bad file leaves the folders untouched
        from pumit_seg.models.pumit_checkpoint import norm_eps_from_weights

        if not os.path.isfile(args.pretrained_weights):
            raise FileNotFoundError(
                f"argument --pretrained_weights: {args.pretrained_weights} does not exist"
            )
        norm_eps_from_weights(args.pretrained_weights)  # raises naming the file when it is not readable
    if args.target_spacing is not None and args.overwrite_target_spacing is not None:
        raise ValueError("give either --target_spacing or -overwrite_target_spacing, not both")
    vit_overrides = {}
    if args.grad_checkpointing:
        vit_overrides["grad_checkpointing"] = True
    if args.norm_eps is not None:
        vit_overrides["norm_eps"] = args.norm_eps
    kwargs = {
        "model": pick(args.model, preset.model if preset else None, DEFAULT_MODEL, "model"),
        "patch_size_2d": args.patch_size_2d,
        "patch_size_3d": pick(
            args.patch_size_3d, list(preset.patch_size_3d) if preset else None, None, "patch_size_3d"
        ),
        "batch_size": pick(args.batch_size, preset.batch_size if preset else None, None, "batch_size"),
        "decoder_channels": args.decoder_channels,
        "full_res_channels": args.full_res_channels,
        "pyramid_channels": args.pyramid_channels,
        "pyramid_blocks": pick(
            args.pyramid_blocks, list(preset.pyramid_blocks) if preset else None, None, "pyramid_blocks"
        ),
        "vit_overrides": vit_overrides or None,
        "pretrained_weights": args.pretrained_weights,
        "target_spacing_dhw": None
        if args.overwrite_target_spacing is not None
        else pick(
            args.target_spacing, list(preset.target_spacing_dhw) if preset else None, None, "target_spacing"
        ),
        "ct_window": pick(
            args.ct_window, list(preset.ct_window) if preset and preset.ct_window else None, None, "ct_window"
        ),
        "oversample_foreground_percent": pick(
            args.oversample_foreground,
            preset.oversample_foreground_percent if preset else None,
            None,
            "oversample_foreground",
        ),
        "predict_step_size": preset.predict_step_size if preset else None,
        "default_norm_eps": preset.norm_eps if preset else None,
        "fixed_kernels": not args.adaptive_kernels,
        "preset": preset.name if preset else None,
    }
    if args.aniso_log2_tolerance is not None:
        kwargs["aniso_log2_tolerance"] = args.aniso_log2_tolerance
    return kwargs, notes


def paper_commands(dataset_id: int, preset_name: str, plans_name: str) -> list[str]:
    """The commands that train and predict a preset's configuration as the paper did."""
    preset = PAPER_PRESETS[preset_name]
    return [
        f"nnUNetv2_train {dataset_id} 3d_fullres 0 -tr PUMITTrainer -p {plans_name}",
        f"nnUNetv2_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d {dataset_id} -c 3d_fullres -f 0 -tr PUMITTrainer "
        f"-p {plans_name} -step_size {preset.predict_step_size:g}   # overlap {1 - preset.predict_step_size:g}, "
        "mirroring on (the paper's test-time augmentation)",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with exit_on_bad_input(parser):
        planner_kwargs, notes = resolve_settings(args)
        for note in notes:
            print(f"note: {note}")
        configurations = args.c or (list(PAPER_PRESETS[args.preset].configurations) if args.preset else None)
        plan_and_preprocess(
            args.d,
            configurations=configurations or list(DEFAULT_CONFIGURATIONS),
            num_processes=args.np,
            num_processes_fingerprint=args.npfp,
            plans_name=args.overwrite_plans_name,
            gpu_memory_target_in_gb=args.gpu_memory_target,
            overwrite_target_spacing=args.overwrite_target_spacing,
            verify_dataset_integrity=args.verify_dataset_integrity,
            clean=args.clean,
            skip_preprocessing=args.no_pp,
            verbose=args.verbose,
            **planner_kwargs,
        )
        if args.preset:
            print(f"\nThe paper's {args.preset} configuration is planned. Train and predict with:")
            for dataset_id in args.d:
                for command in paper_commands(dataset_id, args.preset, args.overwrite_plans_name):
                    print(f"  {command}")
            for note in PAPER_PRESETS[args.preset].notes:
                print(f"  ({note})")


if __name__ == "__main__":
    main()
