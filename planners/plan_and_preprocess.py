"""`pumit_plan_and_preprocess`: fingerprint, PUMIT planning and nnU-Net preprocessing in one command.

nnU-Net's own ``nnUNetv2_plan_and_preprocess -pl`` only finds planners inside the nnunetv2 package,
so this command runs the same three steps through nnU-Net's API with `PUMITPlanner`:

    pumit_plan_and_preprocess -d 501 --model base
    nnUNetv2_train 501 3d_fullres 0 -tr PUMITTrainer -p PUMITPlans

Afterwards the stock commands (``nnUNetv2_preprocess -plans_name PUMITPlans``, ``nnUNetv2_train -p
PUMITPlans``, ``nnUNetv2_predict -p PUMITPlans``) work on the plans as usual.
"""

import argparse

from pumit_seg.planners.pumit_planner import PUMIT_PLANS_NAME, PUMITPlanner

DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres")


def plan_and_preprocess(
    dataset_ids: list[int],
    configurations=DEFAULT_CONFIGURATIONS,
    num_processes=None,
    num_processes_fingerprint: int | None = None,
    plans_name: str = PUMIT_PLANS_NAME,
    gpu_memory_target_in_gb: float = 8,
    overwrite_target_spacing=None,
    verify_dataset_integrity: bool = False,
    clean: bool = False,
    skip_preprocessing: bool = False,
    verbose: bool = False,
    **planner_kwargs,
) -> str:
    """Extract fingerprints, plan with `PUMITPlanner(**planner_kwargs)` and preprocess `configurations`.

    `num_processes` is one number or one per configuration (nnU-Net's default: 8 for 2d, 4 for
    3d_fullres, or ``nnUNet_def_n_proc``). Returns the plans identifier.
    """
    # nnU-Net's API is imported here so `--help` stays fast and paths are read at call time.
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess

    extract_fingerprints(
        dataset_ids,
        num_processes=num_processes_fingerprint or default_num_processes,
        check_dataset_integrity=verify_dataset_integrity,
        clean=clean,
        verbose=verbose,
    )
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="nnU-Net fingerprint extraction, PUMIT experiment planning (plans 'PUMITPlans': 2d and "
        "3d_fullres for pumit_seg.models.seg_net.PUMITSegNet) and nnU-Net preprocessing."
    )
    parser.add_argument("-d", nargs="+", type=int, required=True, help="dataset id(s)")
    parser.add_argument(
        "-c",
        nargs="+",
        default=list(DEFAULT_CONFIGURATIONS),
        help="configurations to preprocess (default: 2d 3d_fullres)",
    )
    parser.add_argument(
        "-np",
        nargs="+",
        type=int,
        default=None,
        help="preprocessing processes: one number or one per configuration (default: 8 4)",
    )
    parser.add_argument(
        "-npfp", type=int, default=None, help="fingerprint processes (default: nnUNet_def_n_proc or 8)"
    )
    parser.add_argument(
        "--model", choices=("tiny", "base", "large"), default="base", help="ViT size (default: base)"
    )
    parser.add_argument(
        "-gpu_memory_target",
        type=float,
        default=8,
        help="GPU memory budget in GB for patch and batch size (default: 8)",
    )
    parser.add_argument(
        "--patch_size_3d",
        type=int,
        nargs=3,
        default=None,
        metavar=("D", "H", "W"),
        help="fix the 3d_fullres patch size (checked)",
    )
    parser.add_argument(
        "--patch_size_2d",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="fix the 2d patch size (checked)",
    )
    parser.add_argument(
        "--batch_size", type=int, default=None, help="fix the batch size instead of the memory model's"
    )
    parser.add_argument(
        "--decoder_channels",
        type=int,
        nargs=4,
        default=None,
        help="decoder widths at 1/4..1/32 (default: 128 256 512 512)",
    )
    parser.add_argument(
        "--full_res_channels",
        type=int,
        nargs=2,
        default=None,
        help="full-resolution branch widths at 1/1, 1/2 (default: 32 64)",
    )
    parser.add_argument(
        "--pyramid_channels",
        type=int,
        nargs=2,
        default=None,
        help="pyramid widths at 1/4, 1/8 (default: the ViT width)",
    )
    parser.add_argument(
        "--grad_checkpointing", action="store_true", help="gradient checkpointing in the ViT blocks"
    )
    parser.add_argument(
        "--pretrained_weights",
        default=None,
        help="encoder weights written to the plans as pumit_pretrained_weights",
    )
    parser.add_argument(
        "-overwrite_plans_name", default=PUMIT_PLANS_NAME, help=f"plans name (default: {PUMIT_PLANS_NAME})"
    )
    parser.add_argument(
        "-overwrite_target_spacing",
        type=float,
        nargs="+",
        default=None,
        help="3d_fullres target spacing (nnU-Net's option)",
    )
    parser.add_argument("--verify_dataset_integrity", action="store_true")
    parser.add_argument("--clean", action="store_true", help="recompute an existing fingerprint")
    parser.add_argument("--no_pp", action="store_true", help="plan only, no preprocessing")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    plan_and_preprocess(
        args.d,
        configurations=args.c,
        num_processes=args.np,
        num_processes_fingerprint=args.npfp,
        plans_name=args.overwrite_plans_name,
        gpu_memory_target_in_gb=args.gpu_memory_target,
        overwrite_target_spacing=args.overwrite_target_spacing,
        verify_dataset_integrity=args.verify_dataset_integrity,
        clean=args.clean,
        skip_preprocessing=args.no_pp,
        verbose=args.verbose,
        model=args.model,
        patch_size_2d=args.patch_size_2d,
        patch_size_3d=args.patch_size_3d,
        batch_size=args.batch_size,
        decoder_channels=args.decoder_channels,
        full_res_channels=args.full_res_channels,
        pyramid_channels=args.pyramid_channels,
        vit_overrides={"grad_checkpointing": True} if args.grad_checkpointing else None,
        pretrained_weights=args.pretrained_weights,
    )


if __name__ == "__main__":
    main()
