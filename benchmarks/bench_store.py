"""Pre-training store benchmarks: random crops from a large stored image, and the store table at paper scale.

    python benchmarks/bench_store.py crops [--shape 300 512 512] [--crops 200] [--tag NAME]
    python benchmarks/bench_store.py table [--images 397335] [--datasets 55] [--tag NAME]

``crops``: a CT-like volume of ``--shape`` (int16 Hounsfield units, body ellipse, organs, noise)
is written as NIfTI (.nii.gz), turned into a one-image store by `prepare_store`, and random
tokenizer crops (128 in-plane by 4 x (16 >> aniso_d) slices) are read (i) from the store
(`PretrainStore.read`, memory-mapped blosc2) and (ii) from the source NIfTI, once by reading the whole
file (`pumit_seg.data.readers.read_image`, what any SimpleITK-based loader does) and once through
nibabel's lazy array proxy (which decompresses the gzip stream up to the crop). Both crops of one
position are checked to agree (after the store's intensity scaling).

``table``: a store table of the paper's size (397,335 images: 48,344 3D and 348,991 2D in 55
datasets) is generated and written as table.csv; it is loaded by `PretrainStore`, and an
`AnisoBatchSampler` over its training rows is built. Reported: memory of the table (pandas, deep) and
of the sampler (its arrays), the process's resident memory growth, load time, and draws per second
(global batches of 48, the paper's tokenizer batch).

Results go to ``benchmarks/results/store_<crops|table>_<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np

from pumit_seg.atomic import atomic_path, write_json_atomic
from pumit_seg.cli_checks import float_in_range

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MACHINE = "2-core CPU, no GPU"
PAPER_3D_IMAGES, PAPER_2D_IMAGES = 48_344, 348_991


def _machine() -> str:
    import torch

    return (
        f"{MACHINE} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible), "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}"
    )


def _save(name: str, result: dict, markdown: str) -> None:
    write_json_atomic(os.path.join(RESULTS, f"{name}.json"), result)
    with atomic_path(os.path.join(RESULTS, f"{name}.md")) as tmp, open(tmp, "w") as f:
        f.write(markdown)
    print(markdown)


# ------------------------------------------------------------------------------------------ 5a


def ct_like_volume(shape, seed: int = 0) -> np.ndarray:
    """int16 (D, H, W) CT-like volume: air, body ellipse, a few organs and a spine, noise (cheap to make)."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    y, x = np.ogrid[-1 : 1 : complex(0, h), -1 : 1 : complex(0, w)]
    body = (y / 0.7) ** 2 + (x / 0.9) ** 2 <= 1
    slice_image = np.where(body, -60, -1000).astype(np.int16)
    for cy, cx, r, hu in [
        (-0.1, -0.4, 0.35, 60),
        (0.1, 0.5, 0.15, 110),
        (0.35, 0.3, 0.1, 180),
        (0.5, 0.0, 0.1, 700),
    ]:
        slice_image[(y - cy) ** 2 + (x - cx) ** 2 <= r**2] = hu
    volume = np.empty(shape, np.int16)
    for k in range(d):
        shift = int(10 * np.sin(k / d * np.pi))
        volume[k] = np.roll(slice_image, shift, axis=0)
        volume[k] += rng.normal(0, 15, size=(h, w)).astype(np.int16)
    return volume


def bench_crops(args) -> None:
    import nibabel as nib
    import SimpleITK as sitk

    from pumit_seg.data.prepare import prepare_store
    from pumit_seg.data.pretrain_loader import CropConfig, crop_depth
    from pumit_seg.data.readers import read_image
    from pumit_seg.data.store import PretrainStore

    shape, spacing = tuple(args.shape), tuple(args.spacing)
    crop = CropConfig()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        os.makedirs(os.path.join(tmp, "ct"))
        source = os.path.join(tmp, "ct", "volume.nii.gz")
        start = time.perf_counter()
        image = sitk.GetImageFromArray(ct_like_volume(shape))
        image.SetSpacing(spacing[::-1])
        sitk.WriteImage(image, source, True)
        write_seconds = time.perf_counter() - start
        del image
        config = os.path.join(tmp, "datasets.json")
        write_json_atomic(config, {"datasets": [{"name": "ct", "path": "ct", "modality": "CT"}]})
        start = time.perf_counter()
        prepare_store(config, os.path.join(tmp, "store"), progress=False, config=None)
        prepare_seconds = time.perf_counter() - start
        store = PretrainStore(os.path.join(tmp, "store"))
        row = store.table.iloc[0]
        key = row.key
        stored_shape = row["shape"]
        depth = crop_depth(crop, int(row.aniso_d), False)
        size = np.array([depth, crop.in_plane, crop.in_plane])
        rng = np.random.default_rng(0)
        starts = [rng.integers(0, np.array(stored_shape) - size + 1) for _ in range(args.crops)]
        slices = [tuple(slice(int(a), int(a + n)) for a, n in zip(s, size, strict=True)) for s in starts]

        store.read(key, slices[0])  # open the array once (as a worker does)
        start = time.perf_counter()
        for s in slices:
            store.read(key, s)
        store_seconds = (time.perf_counter() - start) / len(slices)

        # the source: the crop box in the source array = store box + the foreground crop offset
        offset = np.array([int(part.split(":")[0]) for part in row.crop.split(",")])
        low, high = row.intensity_low, row.intensity_high
        n_full = max(1, min(args.source_reads, len(slices)))
        start = time.perf_counter()
        for s in slices[:n_full]:
            src = tuple(slice(a.start + o, a.stop + o) for a, o in zip(s, offset, strict=True))
            full = read_image(source).array[src]
        full_seconds = (time.perf_counter() - start) / n_full
        start = time.perf_counter()
        proxy = nib.load(source).dataobj  # (x, y, z): the store's (z, y, x) reversed
        for s in slices[:n_full]:
            src = tuple(slice(a.start + o, a.stop + o) for a, o in zip(s, offset, strict=True))
            lazy = np.asarray(proxy[src[::-1]]).transpose(2, 1, 0)
        lazy_seconds = (time.perf_counter() - start) / n_full
        assert np.array_equal(full, lazy)
        scaled = np.clip((full.astype(np.float64) - low) / (high - low), 0, 1)
        agree = float(np.abs(store.read(key, slices[n_full - 1])[0] - scaled).max())
        assert agree <= 1 / 65535 + 1e-6, agree
        # what a loader worker delivers: augmented samples (default settings, and zoom + rotation always)
        import torch

        from pumit_seg.data.pretrain_loader import PretrainCropDataset
        from pumit_seg.data.sampler import SampleRef

        torch.set_num_threads(1)  # as in a loader worker (`pretrain_loader._worker_init`)
        sample_rates = {}
        for name, config in (("default", crop), ("zoom_rotate_always", CropConfig(zoom_p=1.0, rotate_p=1.0))):
            dataset = PretrainCropDataset(store, config, seed=0)
            dataset[SampleRef(0, int(row.aniso_d), 0, 0)]
            start = time.perf_counter()
            for i in range(args.samples):
                dataset[SampleRef(0, int(row.aniso_d), i + 1, 0)]
            sample_rates[name] = args.samples / (time.perf_counter() - start)
        store_bytes = sum(
            os.path.getsize(os.path.join(dirpath, f))
            for dirpath, _, files in os.walk(os.path.join(tmp, "store", "images"))
            for f in files
        )
        source_bytes = os.path.getsize(source)

    result = {
        "shape": shape,
        "spacing": spacing,
        "aniso_d": int(row.aniso_d),
        "crop": size.tolist(),
        "crops_timed_store": len(slices),
        "crops_timed_source": n_full,
        "store_crops_per_second": 1 / store_seconds,
        "nifti_full_read_crops_per_second": 1 / full_seconds,
        "nifti_lazy_crops_per_second": 1 / lazy_seconds,
        "augmented_samples_per_second": sample_rates,
        "speedup_vs_full_read": full_seconds / store_seconds,
        "speedup_vs_lazy": lazy_seconds / store_seconds,
        "max_abs_difference_store_vs_source": agree,
        "store_bytes": store_bytes,
        "source_nii_gz_bytes": source_bytes,
        "write_source_seconds": write_seconds,
        "prepare_seconds": prepare_seconds,
        "machine": _machine(),
        "command": "python " + " ".join(sys.argv),
    }
    md = f"""# Store crop reads vs the source NIfTI ({"x".join(map(str, shape))})

CT-like volume {"x".join(map(str, shape))} (depth x rows x columns), int16, spacing {spacing} mm (aniso_d {result["aniso_d"]});
random tokenizer crops of {"x".join(map(str, size))} voxels (128 in-plane by 4 x (16 >> aniso_d) slices).

| reader | crops / s | seconds / crop |
|---|---|---|
| store (`PretrainStore.read`, blosc2 memory-mapped) | {1 / store_seconds:.1f} | {store_seconds:.4f} |
| source .nii.gz, whole file read (`readers.read_image`) then cropped | {1 / full_seconds:.3f} | {full_seconds:.2f} |
| source .nii.gz, nibabel lazy proxy slice | {1 / lazy_seconds:.3f} | {lazy_seconds:.2f} |
| **store speed-up** | **{full_seconds / store_seconds:.0f}x / {lazy_seconds / store_seconds:.0f}x** | |
| one loader worker (1 thread): augmented 3-channel samples (default `CropConfig`) | {sample_rates["default"]:.1f} | {1 / sample_rates["default"]:.4f} |
| the same with zoom + rotation on every sample (trilinear resampling) | {sample_rates["zoom_rotate_always"]:.1f} | {1 / sample_rates["zoom_rotate_always"]:.4f} |

Store crops equal the source crops after the store's intensity scaling (max difference {agree:.2e},
quantisation step 1/65535). Sizes: store {store_bytes / 2**20:.1f} MiB (uint16, blosc2 ZSTD level 1), source .nii.gz
{source_bytes / 2**20:.1f} MiB. Writing the NIfTI took {write_seconds:.1f} s, `prepare` {prepare_seconds:.1f} s.
Timed: {len(slices)} store crops, {n_full} source crops per source reader.

Machine: {result["machine"]}.

Command: `{result["command"]}`
"""
    _save(f"store_crops_{args.tag}", result, md)


# ------------------------------------------------------------------------------------------ 5b


def simulated_table(num_images: int, num_datasets: int, seed: int = 0):
    """A store table of the paper's composition: 55 datasets, 2D and 3D, in TABLE_COLUMNS."""
    import pandas as pd

    from pumit_seg.data.store import TABLE_COLUMNS

    rng = np.random.default_rng(seed)
    share_3d = PAPER_3D_IMAGES / (PAPER_3D_IMAGES + PAPER_2D_IMAGES)
    # dataset sizes: log-normal like real collections (a few huge 2D sets, many small 3D ones)
    sizes = rng.lognormal(8, 1.5, size=num_datasets)
    sizes = np.maximum(np.round(sizes / sizes.sum() * num_images), 1).astype(int)
    sizes[np.argmax(sizes)] += num_images - sizes.sum()
    is_3d_dataset = np.zeros(num_datasets, bool)
    order = np.argsort(sizes)  # 3D datasets are the smaller ones, until the 3D share is reached
    total = 0
    for i in order:
        if total + sizes[i] <= share_3d * num_images * 1.05:
            is_3d_dataset[i] = True
            total += sizes[i]
    dataset = np.repeat(np.arange(num_datasets), sizes)
    three_d = is_3d_dataset[dataset]
    n = len(dataset)
    shape_d = np.where(three_d, rng.integers(20, 400, n), 1)
    shape_h, shape_w = rng.integers(128, 513, n), rng.integers(128, 513, n)
    spacing_h = rng.uniform(0.3, 1.5, n)
    spacing_d = np.where(three_d, spacing_h * 2 ** rng.uniform(0, 5.5, n), np.inf)
    aniso = np.floor(np.log2(np.clip(spacing_d / spacing_h, 1, 32)) + 1e-9).astype(int)
    names = np.array([f"dataset_{i:02d}" for i in range(num_datasets)])
    keys = np.char.add(np.char.add(names[dataset], "/images/case_"), np.arange(n).astype(str))
    keys = np.char.add(keys, np.where(three_d, ".nii.gz", ".png"))
    dataset_weight = rng.uniform(0.5, 2, num_datasets)
    split = np.full(n, "train", dtype=object)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    split[first[sizes > 1]] = "val"
    counts = pd.Series(dataset).groupby([dataset, split]).transform("count").to_numpy()
    table = pd.DataFrame(
        {
            "key": keys,
            "source": np.char.add("/data/raw/", keys),
            "dataset": names[dataset],
            "modality": np.where(three_d, np.where(rng.random(n) < 0.5, "CT", "MR"), "XR"),
            "channels": np.where(three_d, 1, np.where(rng.random(n) < 0.5, 3, 1)),
            "shape_d": shape_d,
            "shape_h": shape_h,
            "shape_w": shape_w,
            "spacing_d": spacing_d,
            "spacing_h": spacing_h,
            "spacing_w": spacing_h,
            "aniso_d": np.where(three_d, aniso, 5),
            "weight": dataset_weight[dataset] / counts,
            "split": split,
            "file": np.char.add(np.char.add("images/", keys), ".b2nd"),
            "scale": np.where(three_d, 65535, 255),
            "intensity": np.where(three_d, "percentile", "divide"),
            "intensity_low": rng.normal(-1000, 10, n),
            "intensity_high": rng.normal(1500, 100, n),
            "depth_axis": 0,
            "depth_axis_from": np.where(three_d, "spacing", "2D"),
            "crop": "0:1,0:256,0:256",
            "source_shape": "1,256,256",
            "source_size": rng.integers(10**4, 10**8, n),
            "source_mtime": 1.7e9 + rng.random(n),
        }
    )
    return table[list(TABLE_COLUMNS)], int(three_d.sum())


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_table(args) -> None:
    import gc

    from pumit_seg.data.sampler import AnisoBatchSampler
    from pumit_seg.data.store import PretrainStore

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        table, n3d = simulated_table(args.images, args.datasets)
        with atomic_path(os.path.join(tmp, "table.csv")) as path:
            table.to_csv(path, index=False)
        csv_bytes = os.path.getsize(os.path.join(tmp, "table.csv"))
        del table
        gc.collect()
        rss_before = _rss_mib()
        start = time.perf_counter()
        store = PretrainStore(tmp)
        table = store.table
        train = (table.split == "train").to_numpy()
        sampler = AnisoBatchSampler(
            np.where(train, table.weight.to_numpy(), 0.0),
            table.aniso_d.to_numpy(),
            table.shape_d.to_numpy() == 1,
            batch_size=args.batch_size,
            seed=0,
        )
        load_seconds = time.perf_counter() - start
        gc.collect()
        rss_after = _rss_mib()
        table_mib = table.memory_usage(deep=True).sum() / 2**20
        sampler_mib = (
            sum(a.nbytes for a in sampler.bucket_rows) + sum(a.nbytes for a in sampler.bucket_cdfs)
        ) / 2**20
        start = time.perf_counter()
        rows = 0
        for index in range(args.draws):
            rows += len(sampler.rank_batch(index))
        draw_seconds = time.perf_counter() - start
        # the draws follow the weights: per-dataset share of many draws vs the expected share
        counts = np.zeros(args.datasets)
        codes = table.dataset.cat.codes.to_numpy()
        for index in range(args.draws, args.draws + 2000):
            counts += np.bincount(codes[sampler.draw(index)[1]], minlength=args.datasets)
        expected = np.bincount(
            codes, weights=np.where(train, table.weight.to_numpy(), 0.0), minlength=args.datasets
        )
        max_share_error = float(np.abs(counts / counts.sum() - expected / expected.sum()).max())

    result = {
        "images": len(table),
        "images_3d": n3d,
        "images_2d": len(table) - n3d,
        "datasets": args.datasets,
        "table_csv_mib": csv_bytes / 2**20,
        "table_memory_mib": table_mib,
        "sampler_memory_mib": sampler_mib,
        "rss_growth_mib": rss_after - rss_before,
        "load_seconds": load_seconds,
        "batch_size": args.batch_size,
        "batches_per_second": args.draws / draw_seconds,
        "images_per_second": rows / draw_seconds,
        "max_dataset_share_error_2000_batches": max_share_error,
        "machine": _machine(),
        "command": "python " + " ".join(sys.argv),
    }
    md = f"""# Store table and sampler at the paper's scale

Simulated store table: {len(table):,} images ({n3d:,} 3D, {len(table) - n3d:,} 2D) in {args.datasets} datasets,
all {len(table.columns) - 2} table.csv columns ({csv_bytes / 2**20:.0f} MiB on disk); loaded by `PretrainStore`, sampled by
`AnisoBatchSampler` (global batch {args.batch_size}).

| | value |
|---|---|
| table in memory (pandas, deep) | {table_mib:.0f} MiB |
| sampler (bucket rows + cumulative weights) | {sampler_mib:.1f} MiB |
| process resident memory growth (table + sampler) | {rss_after - rss_before:.0f} MiB |
| **target** | **< 1 GB** |
| load table.csv + build sampler | {load_seconds:.1f} s |
| draws | {args.draws / draw_seconds:,.0f} batches/s = {rows / draw_seconds:,.0f} images/s |
| largest per-dataset share error over 2,000 batches | {max_share_error:.4f} |

Machine: {result["machine"]}.

Command: `{result["command"]}`
"""
    _save(f"store_table_{args.tag}", result, md)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    crops = sub.add_parser("crops", help="5a: crop reads per second, store vs source NIfTI")
    crops.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512])
    crops.add_argument(
        "--spacing", type=float_in_range(0.0, None, low_open=True), nargs=3, default=[1.25, 0.75, 0.75]
    )
    crops.add_argument("--crops", type=int, default=200, help="store crops timed")
    crops.add_argument("--source-reads", type=int, default=3, help="source crops timed per reader")
    crops.add_argument("--samples", type=int, default=50, help="augmented loader samples timed")
    crops.add_argument("--tag", default="300x512x512")
    table = sub.add_parser("table", help="5b: table + sampler memory and draws per second")
    table.add_argument("--images", type=int, default=PAPER_3D_IMAGES + PAPER_2D_IMAGES)
    table.add_argument("--datasets", type=int, default=55)
    table.add_argument("--batch-size", type=int, default=48)
    table.add_argument("--draws", type=int, default=20000)
    table.add_argument("--tag", default="paper_scale")
    for p in (crops, table):
        p.add_argument("--workdir", default=None, help="temporary files go here (default: the system's)")
    args = parser.parse_args(argv)
    bench_crops(args) if args.bench == "crops" else bench_table(args)


if __name__ == "__main__":
    main()
