"""Cost of the checked reader (pumit_seg.data.readers.read_image) against a plain SimpleITK read.

    .venv/bin/python benchmarks/bench_readers.py [--slices 100]

Writes a synthetic CT (slices x 512 x 512, int16 and float32) as .nii.gz into a temporary folder and
prints the best of three wall-clock reads each. The checked reader decompresses gzip once more (to catch
truncated files, which ITK completes with zeros) and counts NaN / inf of float NIfTI data in that pass.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pumit_seg.data.readers import read_image

ROWS = COLUMNS = 512
REPEATS = 3


def best_seconds(read, path: str) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        read(path)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    args = parser.parse_args()
    volume = np.random.default_rng(0).normal(0, 300, (args.slices, ROWS, COLUMNS)).astype(np.int16)
    with tempfile.TemporaryDirectory() as folder:
        for dtype in (np.int16, np.float32):
            path = str(Path(folder) / f"ct_{np.dtype(dtype).name}.nii.gz")
            image = sitk.GetImageFromArray(volume.astype(dtype))
            image.SetSpacing((0.75, 0.75, 3.0))
            sitk.WriteImage(image, path, True)
            plain = best_seconds(lambda p: sitk.GetArrayFromImage(sitk.ReadImage(p)), path)
            checked = best_seconds(lambda p: read_image(p).array, path)
            print(
                f"{np.dtype(dtype).name} {volume.shape}: SimpleITK {plain:.2f} s, read_image {checked:.2f} s"
            )


if __name__ == "__main__":
    main()
