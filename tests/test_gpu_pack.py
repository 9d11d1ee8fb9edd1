"""The GPU measurement pack (benchmarks/gpu_pack.py) keeps working while no GPU is lent: its reduced form runs
every row on the CPU and writes it, and the plain command refuses to start without CUDA in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# end-to-end: the benchmark pack's reduced form, in subprocesses; `pytest -m "not e2e"` leaves them out
pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("train_eager", "predict", "mim", "tokenizer", "train_compiled")


def _environment() -> dict:
    # no GPU for these runs even where one is present: the plain command must refuse, the reduced one stay small
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def test_reduced_pack_writes_every_row_on_the_cpu(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_pack.py"), "--reduced", "--allow-cpu", "--threads", "1",
         "--out-dir", str(tmp_path)],
        env=_environment(), check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (json_file,) = tmp_path.glob("gpu_*_reduced.json")
    assert json_file.with_suffix(".md").is_file()
    result = json.loads(json_file.read_text())
    assert result["reduced"] is True
    for key in (
        "device_name",
        "torch",
        "driver" if result["environment"]["device"] == "cuda" else "cpu_count",
    ):
        assert key in result["environment"]
    assert set(result["rows"]) == set(ROWS)
    for name, row in result["rows"].items():
        assert row["status"] == "ok", (name, row.get("reason"))
    for name in ("train_eager", "train_compiled"):
        row = result["rows"][name]
        for network in ("pumit", "nnunet"):
            assert row[network]["ms_per_step"]["step"] > 0
        assert row["ratio_pumit_over_nnunet"] > 0
    assert result["rows"]["train_eager"]["planner"]["estimate_bytes"] > 0
    for mirroring in ("no_mirroring", "mirroring"):
        times = result["rows"]["predict"]["seconds_per_volume"][mirroring]
        assert times["pumit"] > 0 and times["nnunet"] > 0
    assert result["rows"]["mim"]["tokens_per_s"] > 0
    assert set(result["rows"]["tokenizer"]["runs"]) == {"2D", "3D"}


def test_plain_pack_refuses_to_start_without_cuda(tmp_path):
    process = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_pack.sh"), "--out-dir", str(tmp_path)],
        env=_environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert process.returncode != 0
    lines = (process.stdout + process.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines
    assert not list(tmp_path.iterdir())  # nothing written


def test_peak_table_reads_cuda_device_names():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from device_peaks import bf16_peak_tflops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989  # an SXM card, as CUDA names it
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756
    assert bf16_peak_tflops("NVIDIA H200") == 989
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert bf16_peak_tflops("NVIDIA GeForce RTX 4090") is None
