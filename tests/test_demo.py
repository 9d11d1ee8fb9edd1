"""`pumit_demo --setting smallest` end to end, every artifact checked, and the report in headless Chromium.

The demo runs once per module (a few minutes on 2 CPU cores); the tests read what it wrote. Steps whose
command is not part of the installation yet must be reported as "not available", never faked.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from pumit_seg.app import demo
from pumit_seg.app.browser import check_in_browser, find_chromium
from pumit_seg.app.report import referenced_files
from pumit_seg.phantoms.chaos import GREY, ChaosPhantomConfig, write_chaos_phantoms

DEMO_TIMEOUT_S = 1800  # the smallest setting takes minutes alone on 2 cores; far more beside other jobs


def run_demo(output: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "pumit_seg.app.demo",
        "--output",
        str(output),
        "--setting",
        "smallest",
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    # PUMIT_DEMO_TEST_OUTPUT: run (resume) the demo in this folder instead of a new one, e.g. to finish
    # and check a run that an earlier test session was stopped in
    given = os.environ.get("PUMIT_DEMO_TEST_OUTPUT")
    output = Path(given) if given else tmp_path_factory.mktemp("demo") / "out"
    start = time.time()
    result = run_demo(output)
    assert result.returncode == 0, f"demo failed:\n{result.stdout[-6000:]}\n{result.stderr[-4000:]}"
    return output, result.stdout, time.time() - start


def steps_by_key(output: Path) -> dict:
    with open(output / "steps.json") as f:
        return {s["key"]: s for s in json.load(f)["steps"]}


def paths_of(output: Path) -> dict:
    with open(output / "demo_settings.json") as f:
        return json.load(f)["paths"]


@pytest.mark.e2e  # runs the demo (minutes): left out by -m 'not e2e'
def test_every_step_ran_or_is_honestly_unavailable(demo_run):
    output, stdout, _ = demo_run
    steps = steps_by_key(output)
    expected = {
        "seg_phantoms", "seg_plan", "seg_train_scratch", "seg_predict_scratch", "seg_evaluate_scratch",
        "chaos_phantoms", "chaos_convert_train", "chaos_convert_test", "chaos_plan", "chaos_train",
        "chaos_predict", "chaos_export", "chaos_score", "report",
    }  # fmt: skip
    assert expected <= set(steps)
    for key, step in steps.items():
        if step["status"] == "not available":
            # only a command whose module is really missing may be reported so
            assert key.startswith("pretrain_"), step
            module = (
                demo.CORPUS_MODULE
                if key == "pretrain_corpus"
                else demo.PRETRAIN_MODULES[key[len("pretrain_") :]]
            )
            assert importlib.util.find_spec(module) is None, f"{module} exists but {key} did not run"
        elif step["status"] == "skipped":
            # skipped only because a pre-training step it needs is not available
            assert any(
                steps[k]["status"] != "done" for k in re.findall(r"[a-z_]+", step["reason"]) if k in steps
            )
            assert key.startswith("pretrain_") or key.endswith("_pretrained"), step
        else:
            assert step["status"] == "done", step
            assert step["wall_s"] >= 0
            # the printed tutorial: every command shown before it ran
            assert f"$ {step['command']}" in stdout
            if key != "report":
                assert (output / "steps" / f"{key}.json").is_file()
    all_pretraining_present = all(
        importlib.util.find_spec(m) is not None for m in [demo.CORPUS_MODULE, *demo.PRETRAIN_MODULES.values()]
    )
    if all_pretraining_present:
        assert all(s["status"] == "done" for s in steps.values()), steps


@pytest.mark.e2e  # runs the demo (minutes): left out by -m 'not e2e'
def test_segmentation_predictions_and_metrics(demo_run):
    output, _, _ = demo_run
    paths, steps = paths_of(output), steps_by_key(output)
    dataset = Path(paths["seg_dataset"])
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    organ_values = sorted(v for v in labels.values() if v > 0)
    arms = [
        arm
        for arm in ("pretrained", "scratch")
        if steps.get(f"seg_evaluate_{arm}", {}).get("status") == "done"
    ]
    assert "scratch" in arms
    for arm in arms:
        predictions = Path(paths[f"seg_predictions_{arm}"])
        references = sorted((dataset / "labelsTs").glob("*.nii.gz"))
        assert references
        for reference_file in references:
            reference = sitk.ReadImage(str(reference_file))
            prediction = sitk.ReadImage(str(predictions / reference_file.name))
            assert prediction.GetSize() == reference.GetSize()
            assert np.allclose(prediction.GetSpacing(), reference.GetSpacing())
            values = np.unique(sitk.GetArrayFromImage(prediction))
            assert set(values.tolist()) <= {0, *organ_values}
        summary = json.loads((predictions / "summary.json").read_text())
        assert {str(v) for v in organ_values} <= set(summary["mean"])
        for label in organ_values:
            metrics = summary["mean"][str(label)]
            assert 0.0 <= metrics["Dice"] <= 1.0
            for distance in ("ASSD", "HD95", "HD"):  # NaN / inf only for an organ missed everywhere
                assert np.isnan(metrics[distance]) or metrics[distance] >= 0
        assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
        # No Dice threshold here: the smallest setting trains 20 iterations (PUMITTrainer_smoke) to check
        # the wiring, and learning is asserted where the budget allows it (test_nnunet_e2e.py, the
        # MIM / tokenizer tests). A liver Dice of 0.17 and 0.3 were both seen after 20 iterations.


@pytest.mark.e2e  # runs the demo (minutes): left out by -m 'not e2e'
def test_chaos_submission_and_score(demo_run):
    output, _, _ = demo_run
    paths = paths_of(output)
    reference = Path(paths["chaos_reference"])
    with zipfile.ZipFile(paths["chaos_zip"]) as archive:
        names = archive.namelist()
        assert archive.testzip() is None
    for task in ("Task3", "Task5"):
        for case in sorted((reference / "MR").iterdir()):
            for sequence in ("T2SPIR",):
                results = [n for n in names if n.startswith(f"{task}/MR/{case.name}/{sequence}/Results/")]
                dicoms = sorted((case / sequence / "DICOM_anon").glob("*.dcm"))
                assert len(results) == len(dicoms) > 0  # one PNG per DICOM slice
    task5 = Path(paths["chaos_submission"]) / "Task5" / "MR"
    for png in task5.rglob("*.png"):
        grey = np.asarray(Image.open(png))
        assert grey.dtype == np.uint8
        assert set(np.unique(grey).tolist()) <= {0, *GREY.values()}
    scores = json.loads(Path(paths["chaos_scores"]).read_text())
    assert set(scores) == {"Task3", "Task5"}
    for result in scores.values():
        assert 0.0 <= result["score"] <= 100.0
        assert 0.0 <= result["mean"]["DICE"] <= 1.0


@pytest.mark.e2e  # runs the demo (minutes): left out by -m 'not e2e'
def test_report_references_only_existing_images(demo_run):
    output, _, _ = demo_run
    page = output / "report.html"
    text = page.read_text()
    files = referenced_files(page)
    assert files, "the report shows no picture"
    for path in files:
        assert path.is_file(), f"report references missing {path}"
        with Image.open(path) as image:
            image.verify()
    names = {p.name for p in files}
    assert {"segmentation_overlays.png", "chaos_overlay.png", "seg_fold_scratch_progress.png"} <= names
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    steps = steps_by_key(output)
    for step in steps.values():  # the commands and their wall times
        assert step["command"].split(" ")[0] in text
    for key in ("Dice", "ASSD", "HD95", "Task5"):
        assert key in text
    # every section says what it shows and what it cannot; the CHAOS one names the series without results
    assert text.count("What it cannot show") >= 3
    assert "T1DUAL" in text and "SPEC" not in text
    if steps.get("pretrain_prepare", {}).get("status") == "done":
        assert "pretraining_corpus_overview.png" in names  # the store's overview of the corpus
    if steps.get("pretrain_tokenizer", {}).get("status") == "done":
        assert "pretraining_loss_curves.png" in names
        assert any(n.startswith("tokenizer_reconstruction") for n in names)
    else:
        assert "not available" in text or "did not run" in text


@pytest.mark.e2e  # runs the demo (minutes): left out by -m 'not e2e'
def test_printed_paths_exist(demo_run):
    """The demo prints folders to repeat a step by hand: only ones that exist."""
    _, stdout, _ = demo_run
    printed = re.findall(r"^\s+(?:export )?nnUNet_\w+=(\S+)", stdout, flags=re.M)
    assert printed
    for path in printed:
        assert Path(path).is_dir(), path


@pytest.mark.e2e  # runs the demo (minutes): left out by -m 'not e2e'
def test_report_loads_in_headless_chromium(demo_run, tmp_path):
    if find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium: make test installs Debian's chromium package")
        pytest.skip("no Chromium here (make test installs it: apt-get install -y chromium)")
    output, _, _ = demo_run
    check = check_in_browser(output / "report.html", screenshot=tmp_path / "report.png")
    assert check.errors == []
    assert len(check.images) == len(referenced_files(output / "report.html"))
    not_loaded = [i for i in check.images if not i["loaded"]]
    assert not_loaded == []
    assert all(i["width"] > 100 and i["height"] > 50 for i in check.images)
    with Image.open(check.screenshot) as shot:
        assert shot.width >= 1000 and shot.height > 1500  # the whole page, not one screen


@pytest.mark.e2e  # runs the demo (minutes): left out by -m 'not e2e'
def test_rerun_skips_finished_steps(demo_run):
    output, _, _ = demo_run
    work = sum(s.get("wall_s") or 0.0 for s in steps_by_key(output).values() if s["status"] == "done")
    start = time.time()
    result = run_demo(output, "--quiet")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    again = steps_by_key(output)
    for key, step in again.items():
        if key == "report" or step["status"] != "done":
            continue
        assert step.get("resumed"), f"{key} ran again"
        assert "already done" in result.stdout
    assert time.time() - start < work / 2


def test_chaos_phantoms_round_trip(tmp_path):
    """Ground truth exported as a submission scores 100; the kidneys lie on their anatomical sides."""
    from pumit_seg.evaluation import chaos
    from pumit_seg.evaluation.chaos_io import read_png_stack

    config = ChaosPhantomConfig(shape=(8, 40, 40), sequences=("T2SPIR", "T1DUAL"))
    folders = write_chaos_phantoms(str(tmp_path / "sets"), num_train=1, num_test=1, config=config, seed=1)
    ground, _ = read_png_stack(os.path.join(folders["Train_Sets"], "MR", "1", "T2SPIR", "Ground"))
    columns = np.arange(ground.shape[-1])
    for organ, side in (("right_kidney", "left"), ("left_kidney", "right"), ("liver", "left")):
        mask = ground == GREY[organ]
        assert mask.any(), organ
        centre = (mask.sum(axis=(0, 1)) * columns).sum() / mask.sum()
        assert (centre < ground.shape[-1] / 2) == (side == "left"), organ  # image left = patient right
    # the test set has no ground truth; its reference copy has the same DICOMs and a ground truth
    assert not os.path.isdir(os.path.join(folders["Test_Sets"], "MR", "2", "T2SPIR", "Ground"))
    assert os.path.isdir(os.path.join(folders["Test_Sets_reference"], "MR", "2", "T2SPIR", "Ground"))
    raw = tmp_path / "raw"
    chaos.main(["convert", folders["Test_Sets_reference"], str(raw)])
    for sequence_id in (301, 302):
        dataset = next(raw.glob(f"Dataset{sequence_id}_*"))
        predictions = tmp_path / f"pred{sequence_id}"
        predictions.mkdir()
        for label_file in (dataset / "labelsTr").glob("*.nii.gz"):
            (predictions / label_file.name).write_bytes(label_file.read_bytes())
    chaos.main(
        ["export", str(tmp_path / "sub"), "--pred", str(next(raw.glob("Dataset301_*"))), str(tmp_path / "pred301"),
         "--pred", str(next(raw.glob("Dataset302_*"))), str(tmp_path / "pred302")]
    )  # fmt: skip
    scores = chaos.score_results(str(tmp_path / "sub"), folders["Test_Sets_reference"])
    assert scores["Task5"]["score"] == pytest.approx(100.0)
    assert len(scores["Task5"]["series"]) == 8  # 4 organs x (T1DUAL, T2SPIR)
