"""pumit_seg.cli_checks: numbers refused at parse time, output paths refused before any work."""

from __future__ import annotations

import argparse
import os

import pytest

from pumit_seg.cli_checks import (
    RUN_FOLDER_MARKERS,
    OutputPathError,
    check_output_path,
    exit_on_bad_input,
    float_in_range,
    int_in_range,
)

NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")


# ------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("text", ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400", "x", ""])
def test_float_in_range_refuses_non_finite_and_non_numbers(text):
    parse = float_in_range(0.0, None, low_open=True)
    with pytest.raises(argparse.ArgumentTypeError, match="finite number"):
        parse(text)


def test_float_in_range_bounds():
    parse = float_in_range(0.0, 1.0, low_open=True)
    assert parse("1") == 1.0 and parse("1e-9") == 1e-9
    for text in ("0", "1.0001", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"\(0.0, 1.0\]"):
            parse(text)
    assert float_in_range(-5.0, 5.0)("-5") == -5.0


def test_float_option_refused_by_argparse(capsys):
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--tol", type=float_in_range(0.0, None, low_open=True))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--tol", "nan"])
    assert exit_info.value.code == 2
    assert "argument --tol: must be a finite number" in capsys.readouterr().err


def test_int_in_range():
    assert int_in_range(1, 3)("3") == 3
    for text in ("0", "4", "1.5", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_in_range(1, 3)(text)


# ------------------------------------------------------------------------------------- output paths


def test_new_file_and_folder_are_accepted(tmp_path):
    assert check_output_path(tmp_path / "a.json") == tmp_path / "a.json"
    # missing parents that can be created are fine
    assert check_output_path(tmp_path / "x" / "y" / "a.json") == tmp_path / "x" / "y" / "a.json"
    assert check_output_path(tmp_path / "run", is_dir=True) == tmp_path / "run"
    (tmp_path / "empty").mkdir()
    check_output_path(tmp_path / "empty", is_dir=True)  # an empty folder holds nothing to lose


def test_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_path("out.json") == tmp_path / "out.json"


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(OutputPathError, match=r"^-o .*a\.json exists: pass --overwrite to replace it$"):
        check_output_path(tmp_path / "a.json")
    check_output_path(tmp_path / "a.json", overwrite=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputPathError, match="full exists and is not empty: pass --overwrite"):
        check_output_path(tmp_path / "full", is_dir=True, option="OUT")
    check_output_path(tmp_path / "full", is_dir=True, overwrite=True)


def test_file_and_folder_kinds(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputPathError, match=r"--output .*f exists and is not a folder"):
        check_output_path(tmp_path / "f", is_dir=True, overwrite=True, option="--output")
    with pytest.raises(OutputPathError, match=r"d is a folder, not a file"):
        check_output_path(tmp_path / "d", overwrite=True)


def test_output_under_a_regular_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    for path, is_dir in [
        (tmp_path / "a_file" / "out.json", False),
        (tmp_path / "a_file" / "deeper" / "out.json", False),
        (tmp_path / "a_file" / "run", True),
    ]:
        with pytest.raises(OutputPathError, match=f"cannot be created: {tmp_path / 'a_file'} is a file"):
            check_output_path(path, is_dir=is_dir, overwrite=True)


@NOT_ROOT
def test_output_in_a_read_only_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        for path, is_dir in [(folder / "out.json", False), (folder / "sub" / "run", True), (folder, True)]:
            with pytest.raises(
                OutputPathError, match=f"cannot be written: the folder {folder} is not writable"
            ):
                check_output_path(path, is_dir=is_dir, overwrite=True)
    finally:
        folder.chmod(0o755)


@NOT_ROOT
def test_replaced_folder_needs_a_writable_parent(tmp_path):
    parent = tmp_path / "parent"
    (parent / "out").mkdir(parents=True)
    parent.chmod(0o555)
    try:
        check_output_path(parent / "out", is_dir=True, overwrite=True)  # written into: fine
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_path(parent / "out", is_dir=True, overwrite=True, replaced=True)
    finally:
        parent.chmod(0o755)


def test_output_that_is_an_input(tmp_path):
    (tmp_path / "in.pt").write_text("x")
    with pytest.raises(OutputPathError, match=r"in\.pt is also an input of this command"):
        check_output_path(tmp_path / "in.pt", overwrite=True, inputs=[tmp_path / "in.pt"])
    # the same file under another name (a symlink, a relative path) is still the input
    os.symlink(tmp_path / "in.pt", tmp_path / "link.pt")
    with pytest.raises(OutputPathError, match="is also an input"):
        check_output_path(tmp_path / "link.pt", overwrite=True, inputs=[str(tmp_path / "in.pt")])
    with pytest.raises(OutputPathError, match="is also an input"):
        check_output_path(tmp_path / "x" / ".." / "in.pt", overwrite=True, inputs=[tmp_path / "in.pt"])
    # None and '' inputs (options not given) are ignored
    check_output_path(tmp_path / "out.pt", inputs=[None, "", tmp_path / "in.pt"])


def test_replaced_folder_must_not_hold_an_input(tmp_path):
    (tmp_path / "pred").mkdir()
    with pytest.raises(OutputPathError, match="replaced as a whole but holds the input"):
        check_output_path(tmp_path, is_dir=True, overwrite=True, replaced=True, inputs=[tmp_path / "pred"])
    # a folder that is only written into may hold inputs (a store inside a run folder)
    check_output_path(tmp_path, is_dir=True, overwrite=True, inputs=[tmp_path / "pred"])


@pytest.mark.parametrize("marker", RUN_FOLDER_MARKERS)
def test_run_files_are_never_replaced(tmp_path, marker):
    run = tmp_path / "run"
    run.mkdir()
    (run / marker).write_bytes(b"state")
    for name in ("checkpoint_last.pt", "log.csv", "config.json", "best_model.safetensors"):
        with pytest.raises(OutputPathError, match=f"{name} is a file of the training run in {run}"):
            check_output_path(run / name, overwrite=True)
    check_output_path(run / "my_export.safetensors")  # another name in a run folder is fine
    check_output_path(tmp_path / "log.csv")  # and a run file's name outside a run folder


def test_message_is_one_line_through_exit_on_bad_input(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    parser = argparse.ArgumentParser(prog="tool")
    with pytest.raises(SystemExit) as exit_info, exit_on_bad_input(parser):
        check_output_path(tmp_path / "a_file" / "o.json", option="-o")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"tool: error: -o {tmp_path / 'a_file' / 'o.json'} cannot")


def test_no_path(tmp_path):
    with pytest.raises(OutputPathError, match="no output path"):
        check_output_path("")
