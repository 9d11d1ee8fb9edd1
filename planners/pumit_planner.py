"""nnU-Net experiment planner for `pumit_seg.models.seg_net.PUMITSegNet` (plans named ``PUMITPlans``).

What it keeps from nnU-Net's `ExperimentPlanner`: the dataset fingerprint, the target spacing rules
(median, or the 10th percentile on a very anisotropic axis), the axis transposition (lowest
resolution axis first, so nnU-Net's first spatial axis is our depth axis), normalisation and
resampling choices, the 5 % dataset-coverage cap on the batch size and the plans file layout.

What it changes, because the network is a ViT and not a conv U-Net:

* Only ``2d`` and ``3d_fullres`` are planned (no 3d_lowres / cascade).
* ``aniso_d`` (docs/method.md, "Degree of anisotropy and SAC") comes from the configuration's target spacing in nnU-Net's transposed
  order (depth first); the 2D configuration is a one-slice volume with ``aniso_d = 5``. Near a power of
  two it is robust (`choose_aniso_d`): a depth / in-plane ratio within ``aniso_log2_tolerance`` (0.1 in
  log2, i.e. at least 93 % of the power of two) rounds up instead of down, so nnU-Net's BTCV target
  spacing (about 3 x 0.76 x 0.76 mm, ratio 3.94) gives aniso_d 2 and a 4x16x16 patch as the paper's
  3 x 0.75 x 0.75, not 1 and 8x16x16. The choice and its reason are printed and stored in the plan
  (``pumit_aniso_d_choice``). A plan whose first axis is not the lowest-resolution one (nnU-Net's
  ``suppress_transpose``) is refused when that changes aniso_d.
* ``target_spacing_dhw`` (``--target_spacing D H W``) sets the 3d_fullres target spacing depth first,
  mapped onto the dataset's axis order; paper presets (`pumit_seg.planners.presets`) set it and the rest.
* The ViT's position grid is re-parameterised to the patch's token grid (the reference's 12x12x12 for
  BTCV): pre-trained grids are resampled once, at load, instead of at every forward pass.
* ``ct_window`` (e.g. [-175, 250]) replaces the CT channels' intensity statistics in the plans, so that
  nnU-Net's own ``CTNormalization`` (clip to [p0.5, p99.5], subtract the mean, divide by the std) clips
  to the window and maps it onto [-1, 1], in preprocessing and prediction alike.
* The patch size is a multiple of what the network needs exactly
  (`pumit_seg.models.seg_net.required_patch_divisor`: in-plane 32, depth ``2 ** max(5 - aniso_d, 0)``),
  starting from nnU-Net's aspect-ratio rule capped by the median image shape and shrunk until a batch
  of two fits the memory budget. A user-given patch size is checked against the divisors.
* The batch size comes from `estimate_training_memory`, a simple activation model of the ViT, the
  feature pyramid and the conv decoder (nnU-Net's conv feature-map estimate does not apply).
* ``architecture`` names our network by dotted path with every size in ``arch_kwargs``
  (`pumit_seg.models.seg_net.build_arch_kwargs`), and ``strides`` are the network's deep-supervision
  strides, so nnU-Net's deep-supervision targets match the network's outputs.
* An optional ``pumit_pretrained_weights`` key per configuration names the encoder weights that
  `pumit_seg.trainers.PUMITTrainer` loads.
"""

import json
import math
import os
from copy import deepcopy

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from pumit_seg.models.pumit_checkpoint import norm_eps_from_weights
from pumit_seg.models.sac import ANISO_D_2D, aniso_d_from_spacing
from pumit_seg.models.seg_net import build_arch_kwargs, required_patch_divisor
from pumit_seg.planners.memory_model import (  # re-exported: the planner's public names
    MemoryModel,
    count_parameters,
    estimate_training_memory,
    token_grid,
)
from pumit_seg.planners.plans_keys import (
    ANISO_D_CHOICE_PLANS_KEY,
    CT_WINDOW_PLANS_KEY,
    FINGERPRINT_INTENSITY_PLANS_KEY,
    MEMORY_ESTIMATE_PLANS_KEY,
    MODEL_PLANS_KEY,
    NETWORK_CLASS_NAME,
    NORM_EPS_CHOICE_PLANS_KEY,
    OVERSAMPLE_PLANS_KEY,
    PREDICT_STEP_SIZE_PLANS_KEY,
    PRESET_PLANS_KEY,
    PRETRAINED_WEIGHTS_PLANS_KEY,
    PUMIT_PLANS_NAME,
)

# A depth / in-plane spacing ratio within this distance (in log2) below a power of two rounds up to it.
ANISO_LOG2_TOLERANCE = 0.1
CT_NORMALIZATION = "CTNormalization"


def choose_aniso_d(spacing_dhw, log2_tolerance: float = ANISO_LOG2_TOLERANCE) -> tuple[int, str]:
    """(aniso_d, explanation) for a depth-first spacing, robust near powers of two.

    The paper's ``floor(log2(ratio))`` falls off a cliff just below a power of two (ratio 3.94 gives 1, 4.0
    gives 2); a ratio within `log2_tolerance` below a power of two is rounded up to it.
    """
    if not 0 <= log2_tolerance < 1:
        raise ValueError(f"aniso_log2_tolerance must be in [0, 1), got {log2_tolerance}")
    aniso_d = aniso_d_from_spacing(spacing_dhw, log_tolerance=max(log2_tolerance, 1e-6))
    strict = aniso_d_from_spacing(spacing_dhw)
    ratio = float(spacing_dhw[0]) / min(float(spacing_dhw[1]), float(spacing_dhw[2]))
    text = (
        f"aniso_d {aniso_d} from target spacing {[round(float(s), 5) for s in spacing_dhw]} "
        f"(depth / in-plane ratio {ratio:.3f}, log2 {math.log2(max(ratio, 1e-12)):.3f})"
    )
    if aniso_d != strict:
        text += (
            f": within {log2_tolerance} of log2 = {aniso_d}, rounded up instead of floor's {strict} "
            f"(patch depth {16 >> min(aniso_d, 4)} instead of {16 >> min(strict, 4)} slices per token)"
        )
    return aniso_d, text


def check_patch_size(patch_size, aniso_d: int) -> list[int]:
    """Return `patch_size` as a list of ints, or raise a ValueError naming the required divisors."""
    depth_divisor, inplane_divisor = required_patch_divisor(aniso_d)
    divisors = (
        [inplane_divisor, inplane_divisor]
        if len(patch_size) == 2
        else [depth_divisor, inplane_divisor, inplane_divisor]
    )
    patch_size = [int(p) for p in patch_size]
    if any(p <= 0 or p % d for p, d in zip(patch_size, divisors, strict=True)):
        axes = "(H, W)" if len(patch_size) == 2 else "(D, H, W)"
        raise ValueError(
            f"patch size {patch_size} does not fit PUMITSegNet at aniso_d={aniso_d}: every axis {axes} must be a "
            f"positive multiple of {divisors} (in-plane: the ViT patch 16 and the 1/32 pyramid level; depth: "
            f"2 ** max(5 - aniso_d, 0))"
        )
    return patch_size


class PUMITPlanner(ExperimentPlanner):
    """Plans ``2d`` and ``3d_fullres`` configurations for `PUMITSegNet`.

    Args beyond nnU-Net's: `model` ("tiny", "base", "large"); `patch_size_2d` / `patch_size_3d` fix the
    patch sizes (checked); `decoder_channels`, `full_res_channels`, `pyramid_channels` change the conv
    widths (e.g. smaller for CPU runs); `vit_overrides` changes single ViT arguments (e.g.
    ``{"grad_checkpointing": True}``); `pretrained_weights` is written to each configuration as
    ``pumit_pretrained_weights`` (absolute path); `batch_size` fixes the batch size; `memory_model`
    replaces the default memory model. `gpu_memory_target_in_gb` is the memory budget (nnU-Net's
    default: 8).
    """

    def __init__(
        self,
        dataset_name_or_id,
        gpu_memory_target_in_gb: float = 8,
        preprocessor_name: str = "DefaultPreprocessor",
        plans_name: str = PUMIT_PLANS_NAME,
        overwrite_target_spacing=None,
        suppress_transpose: bool = False,
        *,
        model: str = "base",
        patch_size_2d=None,
        patch_size_3d=None,
        decoder_channels=None,
        full_res_channels=None,
        pyramid_channels=None,
        vit_overrides: dict | None = None,
        pretrained_weights: str | None = None,
        batch_size: int | None = None,
        memory_model: MemoryModel | None = None,
        target_spacing_dhw=None,
        aniso_log2_tolerance: float = ANISO_LOG2_TOLERANCE,
        pyramid_blocks=None,
        ct_window=None,
        oversample_foreground_percent: float | None = None,
        predict_step_size: float | None = None,
        default_norm_eps: float | None = None,
        fixed_kernels: bool = True,
        preset: str | None = None,
    ):
        super().__init__(
            dataset_name_or_id,
            gpu_memory_target_in_gb,
            preprocessor_name,
            plans_name,
            overwrite_target_spacing,
            suppress_transpose,
        )
        self.model = model
        self.patch_size_2d = patch_size_2d
        self.patch_size_3d = patch_size_3d
        self.decoder_channels = decoder_channels
        self.full_res_channels = full_res_channels
        self.pyramid_channels = pyramid_channels
        self.vit_overrides = vit_overrides
        if pretrained_weights is not None and not os.path.isfile(pretrained_weights):
            raise FileNotFoundError(f"pretrained weights file {pretrained_weights} does not exist")
        self.pretrained_weights = os.path.abspath(pretrained_weights) if pretrained_weights else None
        self.fixed_batch_size = batch_size
        self.memory_model = memory_model or MemoryModel()
        if target_spacing_dhw is not None:
            if overwrite_target_spacing is not None:
                raise ValueError(
                    "give either target_spacing_dhw (--target_spacing) or overwrite_target_spacing"
                )
            if len(target_spacing_dhw) != 3 or not all(float(v) > 0 for v in target_spacing_dhw):
                raise ValueError(
                    f"--target_spacing needs 3 positive values (depth, in-plane, in-plane), got {target_spacing_dhw}"
                )
        self.target_spacing_dhw = [float(v) for v in target_spacing_dhw] if target_spacing_dhw else None
        self.aniso_log2_tolerance = aniso_log2_tolerance
        choose_aniso_d((1.0, 1.0, 1.0), aniso_log2_tolerance)  # validates the tolerance
        self.pyramid_blocks = list(pyramid_blocks) if pyramid_blocks is not None else None
        if ct_window is not None and not (len(ct_window) == 2 and float(ct_window[0]) < float(ct_window[1])):
            raise ValueError(f"ct_window must be [low, high] with low < high, got {ct_window}")
        self.ct_window = [float(v) for v in ct_window] if ct_window is not None else None
        if oversample_foreground_percent is not None and not 0 <= oversample_foreground_percent <= 1:
            raise ValueError(
                f"oversample_foreground_percent must be in [0, 1], got {oversample_foreground_percent}"
            )
        self.oversample_foreground_percent = oversample_foreground_percent
        if predict_step_size is not None and not 0 < predict_step_size <= 1:
            raise ValueError(f"predict_step_size must be in (0, 1], got {predict_step_size}")
        self.predict_step_size = predict_step_size
        self.fixed_kernels = fixed_kernels
        self.preset = preset
        self.norm_eps_choice = self.choose_norm_eps(default_norm_eps)
        self._parameter_counts = {}  # arch_kwargs (json) -> number of parameters
        self.lowres_creation_threshold = 0  # never plan 3d_lowres: the ViT plans are fullres only

    def choose_norm_eps(self, default_norm_eps: float | None) -> tuple[float | None, str]:
        """LayerNorm eps of the encoder: an explicit ``vit_overrides["norm_eps"]`` wins, then the eps of the
        pre-trained weights (their header or key layout), then `default_norm_eps` (a preset's), else the
        preset model's own default (None)."""
        if self.vit_overrides and "norm_eps" in self.vit_overrides:
            return float(self.vit_overrides["norm_eps"]), "given explicitly"
        if self.pretrained_weights is not None:
            eps, how = norm_eps_from_weights(self.pretrained_weights)
            if eps is not None:
                return eps, f"from {how} ({self.pretrained_weights})"
        if default_norm_eps is not None:
            return float(default_norm_eps), "the preset's (the authors' ViT)"
        return None, "the model preset's default"

    def build_arch_kwargs(self, spatial_dims: int, aniso_d: int) -> dict:
        vit_overrides = dict(self.vit_overrides or {})
        if self.norm_eps_choice[0] is not None:
            vit_overrides["norm_eps"] = self.norm_eps_choice[0]
        return build_arch_kwargs(
            self.model,
            spatial_dims,
            aniso_d,
            decoder_channels=self.decoder_channels,
            full_res_channels=self.full_res_channels,
            pyramid_channels=self.pyramid_channels,
            pyramid_blocks=self.pyramid_blocks,
            vit_overrides=vit_overrides,
            fixed_kernels=self.fixed_kernels,
        )

    def determine_fullres_target_spacing(self) -> np.ndarray:
        """nnU-Net's rule, or `target_spacing_dhw` (depth first) placed onto the dataset's axes: depth goes to
        the axis with the largest median spacing in the fingerprint (the one nnU-Net transposes first)."""
        if self.target_spacing_dhw is None:
            return super().determine_fullres_target_spacing()
        median_spacing = np.median(np.vstack(self.dataset_fingerprint["spacings"]), 0)
        if len(median_spacing) != 3:
            raise ValueError(
                f"{self.dataset_name}: --target_spacing needs 3D images, the fingerprint has 2D spacings"
            )
        depth_axis = int(np.argmax(median_spacing))
        spacing = np.full(3, self.target_spacing_dhw[1])
        spacing[depth_axis] = self.target_spacing_dhw[0]
        inplane_axes = [a for a in range(3) if a != depth_axis]
        spacing[inplane_axes[1]] = self.target_spacing_dhw[2]
        return spacing

    def estimate_memory(self, arch_kwargs: dict, patch_size, batch_size: int) -> float:
        num_classes = len(self.dataset_json["labels"])
        key = json.dumps(arch_kwargs, sort_keys=True)
        if key not in self._parameter_counts:
            self._parameter_counts[key] = count_parameters(
                arch_kwargs, self.num_input_channels(), num_classes
            )
        return estimate_training_memory(
            arch_kwargs, self._parameter_counts[key], num_classes, patch_size, batch_size, self.memory_model
        )

    def num_input_channels(self) -> int:
        return len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))

    def determine_patch_size(self, spacing, median_shape, arch_kwargs: dict) -> list[int]:
        """nnU-Net's aspect-ratio start (256**3 voxels in 3D, 2048**2 in 2D) capped by the median shape, rounded
        up to the network's divisors, then shrunk (the axis largest relative to the median first) until a
        batch of two fits the memory budget."""
        aniso_d = arch_kwargs["aniso_d"]
        depth_divisor, inplane_divisor = required_patch_divisor(aniso_d)
        divisors = (
            [inplane_divisor] * 2 if len(spacing) == 2 else [depth_divisor, inplane_divisor, inplane_divisor]
        )
        inverse_spacing = 1 / np.asarray(spacing, dtype=float)
        start_volume = 256**3 if len(spacing) == 3 else 2048**2
        start = inverse_spacing * (start_volume / np.prod(inverse_spacing)) ** (1 / len(spacing))
        start = np.minimum(start, median_shape[: len(spacing)])
        patch_size = [int(max(math.ceil(s / d), 1) * d) for s, d in zip(start, divisors, strict=True)]

        budget = self.UNet_vram_target_GB * 1e9
        while self.estimate_memory(arch_kwargs, patch_size, self.UNet_min_batch_size) > budget:
            reducible = [i for i in range(len(patch_size)) if patch_size[i] > divisors[i]]
            if not reducible:
                raise RuntimeError(
                    f"{self.dataset_name}: even the smallest patch {patch_size} with batch size "
                    f"{self.UNet_min_batch_size} needs more than the memory budget of {self.UNet_vram_target_GB} GB; "
                    f"raise -gpu_memory_target or pick a smaller model"
                )
            axis = max(reducible, key=lambda i: patch_size[i] / median_shape[i])
            patch_size[axis] -= divisors[axis]
        return patch_size

    def determine_batch_size(self, arch_kwargs: dict, patch_size, approximate_n_voxels_dataset: float) -> int:
        """As many samples as the memory budget holds, capped so that one batch sees at most 5 % of the
        dataset's voxels (nnU-Net's rule), and never below nnU-Net's minimum of 2."""
        if self.fixed_batch_size is not None:
            return int(self.fixed_batch_size)
        budget = self.UNet_vram_target_GB * 1e9
        fixed = self.estimate_memory(arch_kwargs, patch_size, 0)
        per_sample = self.estimate_memory(arch_kwargs, patch_size, 1) - fixed
        batch_size = int((budget - fixed) // per_sample)
        coverage_cap = round(
            approximate_n_voxels_dataset * self.max_dataset_covered / np.prod(patch_size, dtype=np.float64)
        )
        return max(min(batch_size, coverage_cap), self.UNet_min_batch_size)

    def get_plans_for_configuration(
        self, spacing, median_shape, data_identifier: str, approximate_n_voxels_dataset: float, _cache: dict
    ) -> dict:
        if not all(s > 0 for s in spacing):
            raise ValueError(f"{self.dataset_name}: spacing must be positive, got {spacing}")
        spatial_dims = len(spacing)
        if spatial_dims == 2:
            aniso_d, aniso_d_choice = ANISO_D_2D, f"aniso_d {ANISO_D_2D}: 2D configuration (one slice)"
        else:
            aniso_d, aniso_d_choice = choose_aniso_d(spacing, self.aniso_log2_tolerance)
            coarsest = int(np.argmax(spacing))
            if coarsest != 0:
                moved = [spacing[coarsest]] + [s for i, s in enumerate(spacing) if i != coarsest]
                if choose_aniso_d(moved, self.aniso_log2_tolerance)[0] != aniso_d:
                    raise ValueError(
                        f"{self.dataset_name}: the first axis of the 3d_fullres spacing {list(spacing)} is not the "
                        f"lowest-resolution axis (axis {coarsest} is), but PUMITSegNet treats the first axis as depth. "
                        "Do not suppress nnU-Net's transposition (suppress_transpose), or give a target spacing "
                        "whose coarsest axis comes first"
                    )
                aniso_d_choice += (
                    f"; axis {coarsest} is slightly coarser than axis 0, same aniso_d either way"
                )
        print(f"{self.dataset_name} {'2d' if spatial_dims == 2 else '3d_fullres'}: {aniso_d_choice}")
        arch_kwargs = self.build_arch_kwargs(spatial_dims, aniso_d)

        fixed_patch_size = self.patch_size_2d if spatial_dims == 2 else self.patch_size_3d
        if fixed_patch_size is not None:
            if len(fixed_patch_size) != spatial_dims:
                raise ValueError(
                    f"the {spatial_dims}D patch size needs {spatial_dims} values, got {list(fixed_patch_size)}"
                )
            patch_size = check_patch_size(fixed_patch_size, aniso_d)
        else:
            patch_size = self.determine_patch_size(spacing, median_shape, arch_kwargs)
        check_patch_size(patch_size, aniso_d)
        if not (self.vit_overrides and "pos_grid_shape" in self.vit_overrides):
            # the reference re-parameterises the position grid to the fine-tuning token grid, once, at load
            arch_kwargs["vit"]["pos_grid_shape"] = token_grid(patch_size, aniso_d)
        batch_size = self.determine_batch_size(arch_kwargs, patch_size, approximate_n_voxels_dataset)

        resampling_data, resampling_data_kwargs, resampling_seg, resampling_seg_kwargs = (
            self.determine_resampling()
        )
        resampling_softmax, resampling_softmax_kwargs = self.determine_segmentation_softmax_export_fn()
        normalization_schemes, mask_is_used_for_norm = (
            self.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        )

        plan = {
            "data_identifier": data_identifier,
            "preprocessor_name": self.preprocessor_name,
            "batch_size": batch_size,
            "patch_size": patch_size,
            "median_image_size_in_voxels": median_shape,
            "spacing": spacing,
            "normalization_schemes": normalization_schemes,
            "use_mask_for_norm": mask_is_used_for_norm,
            "resampling_fn_data": resampling_data.__name__,
            "resampling_fn_seg": resampling_seg.__name__,
            "resampling_fn_data_kwargs": resampling_data_kwargs,
            "resampling_fn_seg_kwargs": resampling_seg_kwargs,
            "resampling_fn_probabilities": resampling_softmax.__name__,
            "resampling_fn_probabilities_kwargs": resampling_softmax_kwargs,
            "architecture": {
                "network_class_name": NETWORK_CLASS_NAME,
                "arch_kwargs": arch_kwargs,
                "_kw_requires_import": [],
            },
            MODEL_PLANS_KEY: self.model,
            ANISO_D_CHOICE_PLANS_KEY: aniso_d_choice,
            NORM_EPS_CHOICE_PLANS_KEY: self.norm_eps_choice[1],
            MEMORY_ESTIMATE_PLANS_KEY: round(
                self.estimate_memory(arch_kwargs, patch_size, batch_size) / 1e9, 2
            ),
        }
        if self.pretrained_weights is not None:
            plan[PRETRAINED_WEIGHTS_PLANS_KEY] = self.pretrained_weights
        if self.oversample_foreground_percent is not None:
            plan[OVERSAMPLE_PLANS_KEY] = self.oversample_foreground_percent
        if self.predict_step_size is not None:
            plan[PREDICT_STEP_SIZE_PLANS_KEY] = self.predict_step_size
        if self.preset is not None:
            plan[PRESET_PLANS_KEY] = self.preset
        return deepcopy(plan)

    def save_plans(self, plans):
        """Apply the CT window to the plans' intensity statistics (read by nnU-Net's CTNormalization), then save."""
        if self.ct_window is not None:
            self.apply_ct_window(plans)
        super().save_plans(plans)

    def apply_ct_window(self, plans: dict) -> None:
        low, high = self.ct_window
        channels = {
            str(i)
            for configuration in plans["configurations"].values()
            for i, scheme in enumerate(configuration.get("normalization_schemes", []))
            if scheme == CT_NORMALIZATION
        }
        if not channels:
            raise ValueError(
                f"{self.dataset_name}: a CT window was asked for, but no channel of dataset.json's channel_names is "
                "'CT' (nnU-Net normalises only channels named CT with CTNormalization)"
            )
        properties = plans["foreground_intensity_properties_per_channel"]
        plans[FINGERPRINT_INTENSITY_PLANS_KEY] = deepcopy(properties)
        for channel in sorted(channels):
            # clip to [low, high], then (x - centre) / half-width: the window becomes [-1, 1]
            properties[channel] = {
                **properties[channel],
                "percentile_00_5": low,
                "percentile_99_5": high,
                "mean": (low + high) / 2,
                "std": (high - low) / 2,
            }
        plans[CT_WINDOW_PLANS_KEY] = {"window": [low, high], "channels": sorted(channels, key=int)}
        print(
            f"{self.dataset_name}: CT window [{low}, {high}] -> [-1, 1] for channel(s) {sorted(channels)} through "
            "nnU-Net's CTNormalization (fingerprint statistics kept under 'pumit_fingerprint_intensity_properties')"
        )
