"""Unknown labels allowed by their flag are listed; --overwrite replaces what it may and nothing else.

(The refusals themselves are rows of tests/test_broken_inputs.py.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from test_broken_inputs import build_chaos_converted, build_export_run

from pumit_seg.evaluation import chaos
from pumit_seg.trainers.pretrain_cli import main as pumit_pretrain


def test_chaos_export_allowed_unknown_labels_are_listed_and_exported_as_background(tmp_path, capsys):
    values = build_chaos_converted(tmp_path)
    bad = values["t2_pred"] / "CHAOS_001.nii.gz"
    image = sitk.ReadImage(str(bad))
    labels = sitk.GetArrayFromImage(image)
    labels[0] = 0
    labels[0, :2, :2] = 9  # no MR organ has label 9
    written = sitk.GetImageFromArray(labels)
    written.CopyInformation(image)
    sitk.WriteImage(written, str(bad))
    out = tmp_path / "submission"
    arguments = ["export", str(out), "--pred", str(values["t1"]), str(values["t1_pred"]),
                 "--pred", str(values["t2"]), str(values["t2_pred"])]  # fmt: skip
    with pytest.raises(SystemExit):
        chaos.main(arguments)
    assert f"{bad} holds label 9" in capsys.readouterr().err and not out.exists()
    chaos.main([*arguments, "--allow_unknown_labels"])
    assert str(bad) in capsys.readouterr().out
    summary = json.loads((out / "export_summary.json").read_text())
    assert summary["unknown_labels"] == {str(bad): [9]}
    first = sorted((out / "Task5" / "MR" / "1" / "T2SPIR" / "Results").glob("*.png"))[0]
    assert not np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(first)))).any()  # 9 -> background
    # a second export replaces the folder only with --overwrite
    with pytest.raises(SystemExit):
        chaos.main([*arguments, "--allow_unknown_labels"])
    assert "exists and is not empty: pass --overwrite" in capsys.readouterr().err
    chaos.main([*arguments, "--allow_unknown_labels", "--overwrite"])


def test_pretrain_export_overwrite_replaces_only_outputs(tmp_path, capsys):
    values = build_export_run(tmp_path)
    checkpoint, earlier = values["checkpoint"], values["earlier"]
    with pytest.raises(SystemExit) as exit_info:
        pumit_pretrain(["export", str(checkpoint), "-o", str(earlier)])
    assert exit_info.value.code != 0 and earlier.read_bytes() == b"an earlier export"
    assert f"{earlier} exists: pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        pumit_pretrain(["export", str(checkpoint), "-o", str(earlier), "--overwrite"])
    assert exit_info.value.code == 0 and earlier.read_bytes() != b"an earlier export"
    before = checkpoint.read_bytes()
    for target in (checkpoint, values["run"] / "config.json"):
        with pytest.raises(SystemExit) as exit_info:
            pumit_pretrain(["export", str(checkpoint), "-o", str(target), "--overwrite"])
        assert exit_info.value.code != 0
    assert checkpoint.read_bytes() == before
    # a new name inside the run folder is fine
    with pytest.raises(SystemExit) as exit_info:
        pumit_pretrain(["export", str(checkpoint), "-o", str(values["run"] / "step3.safetensors")])
    assert exit_info.value.code == 0
