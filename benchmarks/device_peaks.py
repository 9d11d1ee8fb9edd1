"""Dense bf16 tensor-core peaks (no sparsity) of the GPUs we may be lent, by CUDA device name, for model-FLOPs
utilisation (MFU). One table for every benchmark.

CUDA names do not always say the form factor: an H100 SXM reports itself as ``NVIDIA H100 80GB HBM3``, a PCIe
card as ``NVIDIA H100 PCIe``, an H200 as ``NVIDIA H200``. The rules below are tried in order, most specific
first; an unknown name gives None (MFU left blank, never guessed).
"""

from __future__ import annotations

# (every word that must appear in the name, bf16 dense peak in TFLOP/s, what it is)
BF16_PEAK_RULES: list[tuple[tuple[str, ...], float, str]] = [
    (("H200", "NVL"), 835.0, "H200 NVL"),
    (("H200",), 989.0, "H200 SXM"),
    (("H100", "PCIe"), 756.0, "H100 PCIe"),
    (("H100", "NVL"), 835.0, "H100 NVL"),
    (("H100",), 989.0, "H100 SXM (named 'H100 80GB HBM3' by CUDA)"),
    (("A100",), 312.0, "A100"),
    (("L40S",), 362.0, "L40S"),
    (("A10",), 125.0, "A10"),
]


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of the GPU called `device_name`, or None when the name is unknown."""
    words = device_name.replace("-", " ").split()
    for required, peak, _ in BF16_PEAK_RULES:
        if all(word in words for word in required):
            return peak
    return None
