"""Pre-training crops, augmentation and the multi-process loader.

See docs/pretraining.md for the commands and docs/store_format.md for the store the crops come from.

A training batch is ``{"image": FloatTensor (B, 3, D, H, W) in [0, 1], "aniso_d": int, "keys": [...]}``:
every sample of a batch shares one aniso_d (`pumit_seg.data.sampler.AnisoBatchSampler`), grey images
are replicated to 3 channels, and the crop is ``in_plane`` pixels square by
``depth_units * max(16 >> aniso_d, 1)`` slices (1 slice for 2D images).

Per sample (`PretrainCropDataset`), with randomness derived from (seed, batch index, position) only, so
a batch is the same whenever it is drawn again (exact resume):

1. zoom (in-plane factor, and a depth factor for 3D images) and in-plane rotation are drawn; the
   spacing after zoom is ``spacing / zoom`` and its aniso_d is kept equal to the batch's by limiting
   the depth factor (the paper: "use the spacing after any zoom augmentation");
2. only the source region under the rotated, zoomed crop is read from the store (blosc2 reads only
   the blocks it touches), and resampled into the crop in one trilinear ``grid_sample`` (zeros
   outside the image); without zoom and rotation the crop is an exact integer-indexed copy;
3. flips and intensity scale / contrast / gamma come from batchgeneratorsv2 (the transforms nnU-Net
   trains with), then values are clipped to [0, 1].

Whole-image spatial transforms (batchgenerators' ``SpatialTransform``, MONAI's ``RandAffine``) need the
whole image in memory, which a 300x512x512 CT would cost at every draw; step 2 is the store-aware
equivalent. Workers are torch ``DataLoader`` worker processes, each building whole batches.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pumit_seg.data.sampler import AnisoBatchSampler, SampleRef
from pumit_seg.data.store import PretrainStore
from pumit_seg.models.sac import ANISO_D_2D, aniso_d_from_spacing

__all__ = [
    "CropConfig",
    "PretrainCropDataset",
    "PretrainLoader",
    "build_pretrain_loader",
    "validation_batches",
    "crop_depth",
]

IMAGE_CHANNELS = 3  # pre-training images are always fed as RGB (grey replicated), as the authors' weights


@dataclass
class CropConfig:
    """Crop size and augmentation of pre-training samples. Ranges are (low, high); p are probabilities.

    The paper names the augmentations (zoom, in-plane rotation, flips, intensity scale / contrast /
    gamma) but not their numbers; the defaults are nnU-Net's data augmentation settings.
    """

    in_plane: int = 128  # tokenizer 128, MIM 160
    depth_units: int = 4  # tokenizer 4, MIM 5: crop depth = depth_units * max(16 >> aniso_d, 1)
    patch_stride: int = 16  # tokenizer / ViT in-plane stride
    augment: bool = True
    zoom_p: float = 0.2
    zoom_range: tuple[float, float] = (0.7, 1.4)  # in-plane magnification
    depth_zoom_range: tuple[float, float] = (0.7, 1.4)  # 3D images, limited to keep the batch's aniso_d
    rotate_p: float = 0.2
    rotate_max_deg: float = 30.0  # in-plane rotation in [-30, 30] degrees
    flip_p: float = 0.5  # per axis (in-plane axes; depth too for 3D images)
    brightness_p: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)  # intensity scale
    contrast_p: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    gamma_p: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)

    def __post_init__(self):
        if self.in_plane < 1 or self.depth_units < 1 or self.patch_stride < 1:
            raise ValueError(f"crop sizes must be positive: {self}")
        for name in ("zoom_range", "depth_zoom_range", "brightness_range", "contrast_range", "gamma_range"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"CropConfig.{name} must be 0 < low <= high, got {(low, high)}")
        for name in ("zoom_p", "rotate_p", "flip_p", "brightness_p", "contrast_p", "gamma_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"CropConfig.{name} must be a probability, got {getattr(self, name)}")


def crop_depth(crop: CropConfig, aniso_d: int, two_d: bool) -> int:
    """Slices of a crop: depth_units * max(stride >> aniso_d, 1), 1 for 2D images."""
    return 1 if two_d else crop.depth_units * max(crop.patch_stride >> aniso_d, 1)


def _aniso_ratio_bounds(aniso_d: int) -> tuple[float, float]:
    """Range of s_d / min(s_h, s_w) that gives `aniso_d` (half-open above; 0 and 5 open-ended)."""
    low = 0.0 if aniso_d == 0 else 2.0**aniso_d
    high = math.inf if aniso_d >= ANISO_D_2D else 2.0 ** (aniso_d + 1)
    return low, high


@contextlib.contextmanager
def _seeded_global_rngs(seed: int):
    """batchgeneratorsv2 draws from the global numpy / torch generators: seed them for one sample only."""
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


class PretrainCropDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by `SampleRef`: one augmented crop (3, D, H, W) per reference."""

    def __init__(self, store: PretrainStore, crop: CropConfig, seed: int = 0, augment: bool | None = None):
        self.store, self.crop, self.seed = store, crop, seed
        self.augment = crop.augment if augment is None else augment
        table = store.table
        self.keys = table.key.to_numpy()
        self.shapes = table[["shape_d", "shape_h", "shape_w"]].to_numpy(dtype=np.int64)
        self.spacings = table[["spacing_d", "spacing_h", "spacing_w"]].to_numpy(dtype=np.float64)
        self._intensity = None

    def _intensity_transforms(self):
        if self._intensity is None:  # built lazily: batchgeneratorsv2 is imported in the worker only
            from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
            from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
            from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
            from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
            from batchgeneratorsv2.transforms.utils.random import RandomTransform

            c = self.crop
            # channels move together: an RGB image keeps its colours
            self._intensity = ComposeTransforms(
                [
                    RandomTransform(
                        MultiplicativeBrightnessTransform(c.brightness_range, synchronize_channels=True),
                        c.brightness_p,
                    ),
                    RandomTransform(
                        ContrastTransform(
                            BGContrast(c.contrast_range), preserve_range=True, synchronize_channels=True
                        ),
                        c.contrast_p,
                    ),
                    RandomTransform(
                        GammaTransform(
                            c.gamma_range,
                            p_invert_image=0,
                            synchronize_channels=True,
                            p_per_channel=1,
                            p_retain_stats=1,
                        ),
                        c.gamma_p,
                    ),
                ]
            )
        return self._intensity

    def __getitem__(self, ref: SampleRef) -> dict:
        row, aniso_d = int(ref.row), int(ref.aniso_d)
        shape, spacing = self.shapes[row], self.spacings[row]
        two_d = shape[0] == 1
        out_size = np.array([crop_depth(self.crop, aniso_d, two_d), self.crop.in_plane, self.crop.in_plane])
        rng = np.random.default_rng([self.seed, ref.batch_index, ref.position])
        zoom, angle = np.ones(3), 0.0
        if self.augment:
            zoom, angle = self._draw_spatial(rng, spacing, aniso_d, two_d)
        image = self._crop(self.keys[row], shape, out_size, zoom, angle, rng)
        if self.augment:
            image = self._augment(image, rng, two_d)
        if image.shape[0] == 1:
            image = image.expand(IMAGE_CHANNELS, *image.shape[1:])
        return {"image": image.contiguous(), "aniso_d": aniso_d, "key": str(self.keys[row])}

    def _draw_spatial(self, rng, spacing, aniso_d, two_d) -> tuple[np.ndarray, float]:
        c = self.crop
        zoom_hw = rng.uniform(*c.zoom_range) if rng.random() < c.zoom_p else 1.0
        zoom_d = 1.0
        if not two_d:
            zoom_d = rng.uniform(*c.depth_zoom_range) if rng.random() < c.zoom_p else 1.0
            # spacing after zoom = spacing / zoom: keep its aniso_d equal to the batch's
            ratio = spacing[0] / min(spacing[1], spacing[2]) * zoom_hw
            low, high = _aniso_ratio_bounds(aniso_d)
            zoom_d = float(np.clip(zoom_d, ratio / (high * (1 - 1e-6)), ratio / low if low > 0 else np.inf))
            after = (spacing[0] / zoom_d, spacing[1] / zoom_hw, spacing[2] / zoom_hw)
            assert aniso_d_from_spacing(after) == aniso_d, (spacing, zoom_hw, zoom_d, aniso_d)
        angle = (
            math.radians(rng.uniform(-c.rotate_max_deg, c.rotate_max_deg))
            if rng.random() < c.rotate_p
            else 0.0
        )
        return np.array([zoom_d, zoom_hw, zoom_hw]), angle

    def _crop(self, key, shape, out_size, zoom, angle, rng) -> torch.Tensor:
        """(C, *out_size) float32: the crop under the zoom / rotation, zeros outside the image."""
        cos, sin = abs(math.cos(angle)), abs(math.sin(angle))
        extent = out_size / zoom  # source voxels the crop covers, before rotation
        extent = np.array([extent[0], cos * extent[1] + sin * extent[2], sin * extent[1] + cos * extent[2]])
        # random centre so that the crop lies inside the image where it fits, else image centre +- slack
        centre = np.empty(3)
        for ax in range(3):
            free = shape[ax] - extent[ax]
            u = rng.random()
            centre[ax] = extent[ax] / 2 + u * free if free >= 0 else shape[ax] / 2 + (u - 0.5) * -free
        if np.all(zoom == 1) and angle == 0:
            start = np.floor(centre - out_size / 2 + 0.5).astype(np.int64)
            return self._integer_crop(key, shape, start, out_size)
        low = np.maximum(np.floor(centre - extent / 2) - 1, 0).astype(np.int64)
        high = np.minimum(np.ceil(centre + extent / 2) + 2, shape).astype(np.int64)
        if np.any(high <= low):
            return torch.zeros((self._channels(key), *out_size), dtype=torch.float32)
        region = torch.from_numpy(
            self.store.read(key, tuple(slice(a, b) for a, b in zip(low, high, strict=True)))
        )
        return _resample(region, low, centre, out_size, zoom, angle)

    def _channels(self, key) -> int:
        return int(self.store.table.at[key, "channels"])

    def _integer_crop(self, key, shape, start, out_size) -> torch.Tensor:
        src_low, src_high = np.maximum(start, 0), np.minimum(start + out_size, shape)
        out = torch.zeros((self._channels(key), *out_size.tolist()), dtype=torch.float32)
        if np.all(src_high > src_low):
            values = self.store.read(key, tuple(slice(a, b) for a, b in zip(src_low, src_high, strict=True)))
            dst = tuple(slice(a - s, b - s) for a, b, s in zip(src_low, src_high, start, strict=True))
            out[(slice(None), *dst)] = torch.from_numpy(values)
        return out

    def _augment(self, image: torch.Tensor, rng, two_d: bool) -> torch.Tensor:
        axes = [1, 2] if two_d else [0, 1, 2]
        flips = [a + 1 for a in axes if rng.random() < self.crop.flip_p]
        if flips:
            image = torch.flip(image, flips)
        with _seeded_global_rngs(int(rng.integers(2**31))):
            image = self._intensity_transforms()(image=image.clone())["image"]
        return image.clamp_(0.0, 1.0)


def _resample(region: torch.Tensor, region_low, centre, out_size, zoom, angle) -> torch.Tensor:
    """Trilinear resampling of `region` (C, d, h, w), whose voxel 0 is source voxel `region_low`, onto the
    crop grid: crop voxel o maps to source centre + R(angle) diag(1/zoom) (o - (out_size - 1) / 2), in
    continuous coordinates where voxel i covers [i, i + 1)."""
    # one voxel of zeros around the region: the image fades to zero outside, and a single-slice region
    # (a 2D image) still has neighbours to interpolate with
    region = F.pad(region, (1, 1, 1, 1, 1, 1))
    region_low = np.asarray(region_low, dtype=np.float64) - 1
    n_in = np.array(region.shape[1:], dtype=np.float64)
    n_out = np.asarray(out_size, dtype=np.float64)
    cos, sin = math.cos(angle), math.sin(angle)
    rotate_zoom = np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]]) @ np.diag(1 / np.asarray(zoom, float))
    # grid_sample's normalised coordinates (align_corners=True: -1 and 1 are the first and last voxel
    # centres): output o = (n_out - 1) / 2 * (u + 1), input index = (n_in - 1) / 2 * (v + 1)
    to_input = np.diag(2 / (n_in - 1))
    linear = to_input @ rotate_zoom @ np.diag((n_out - 1) / 2)
    offset = to_input @ (np.asarray(centre, float) - 0.5 - region_low) - 1
    # affine_grid orders axes (x, y, z) = (w, h, d)
    # the grid as broadcast sums of per-axis terms (affine_grid's general matrix product is ~5x slower)
    axes = [torch.linspace(-1, 1, int(n)) if n > 1 else torch.zeros(1) for n in out_size]
    shapes = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
    components = []
    for row in (2, 1, 0):  # grid_sample wants (x, y, z) = (w, h, d)
        value = torch.full((1, 1, 1), float(offset[row]))
        for col in range(3):
            if linear[row, col] != 0:
                value = value + float(linear[row, col]) * axes[col].view(shapes[col])
        components.append(value.expand(*[int(n) for n in out_size]))
    grid = torch.stack(components, dim=-1)[None]
    return F.grid_sample(region[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def collate_batch(samples: list[dict]) -> dict:
    """Stack one batch (all samples share one aniso_d by construction of the sampler)."""
    aniso = {s["aniso_d"] for s in samples}
    if len(aniso) != 1:
        raise ValueError(f"a batch mixes aniso_d {sorted(aniso)}")
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "aniso_d": aniso.pop(),
        "keys": [s["key"] for s in samples],
    }


class PretrainLoader:
    """Infinite iterable of training batches from a torch DataLoader, with exact-resume state.

    `state_dict()` holds the index of the next global batch to hand out (batches prefetched by the
    workers but not yet consumed are drawn again after a resume), so training resumed from a
    checkpoint sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(
        self, dataset: PretrainCropDataset, sampler: AnisoBatchSampler, num_workers: int, pin_memory: bool
    ):
        self.dataset, self.sampler = dataset, sampler
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.consumed = sampler.next_batch

    def __iter__(self):
        self.sampler.next_batch = self.consumed
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            pin_memory=self.pin_memory,
            worker_init_fn=_worker_init,
            persistent_workers=False,
        )
        for batch in loader:
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict() | {"next_batch": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.consumed = self.sampler.next_batch


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers run in parallel already; one thread each avoids oversubscription
    import blosc2

    blosc2.set_nthreads(1)


def _split_table(store: PretrainStore, split: str):
    table = store.table
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not (table.split == split).any():
        raise ValueError(f"{store.root}: the store has no {split!r} images")
    return table


def build_pretrain_loader(
    store: PretrainStore,
    crop: CropConfig,
    batch_size: int,
    *,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    split: str = "train",
    pin_memory: bool | None = None,
) -> PretrainLoader:
    """The rank-aware training loader: infinite weighted batches of one aniso_d each (see module doc).

    ``split="val"`` samples the held-out images the same way (augmented); for deterministic validation
    crops use `validation_batches`."""
    table = _split_table(store, split)
    weights = np.where(table.split.to_numpy() == split, table.weight.to_numpy(dtype=np.float64), 0.0)
    sampler = AnisoBatchSampler(
        weights,
        table.aniso_d.to_numpy(),
        table.shape_d.to_numpy() == 1,
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    dataset = PretrainCropDataset(store, crop, seed=seed)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return PretrainLoader(dataset, sampler, num_workers, pin)


def validation_batches(store: PretrainStore, crop: CropConfig, batch_size: int) -> list[dict]:
    """Deterministic centre crops (no augmentation) of every held-out image, batched by aniso_d
    (2D images apart), in key order; empty when the store holds no held-out image (every dataset a
    single image)."""
    table = store.table
    val = table[table.split == "val"]
    dataset = PretrainCropDataset(store, crop, seed=0, augment=False)
    row_of = {k: i for i, k in enumerate(table.key)}
    batches = []
    groups = val.groupby([val.aniso_d, val.shape_d == 1], sort=True)
    for (aniso_d, _), group in groups:
        keys = sorted(group.key)
        for start in range(0, len(keys), batch_size):
            samples = []
            for key in keys[start : start + batch_size]:
                row = row_of[key]
                shape = dataset.shapes[row]
                out_size = np.array(
                    [crop_depth(crop, int(aniso_d), shape[0] == 1), crop.in_plane, crop.in_plane]
                )
                begin = (shape - out_size) // 2
                image = dataset._integer_crop(key, shape, begin, out_size)
                if image.shape[0] == 1:
                    image = image.expand(IMAGE_CHANNELS, *image.shape[1:])
                samples.append({"image": image.contiguous(), "aniso_d": int(aniso_d), "key": key})
            batches.append(collate_batch(samples))
    return batches
