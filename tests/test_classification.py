"""MedMNIST v2 classification (docs/classification.md): metrics against scikit-learn, loading checks, a tiny fine-tuning run."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.metrics import accuracy_score, roc_auc_score

from pumit_seg.data.medmnist import (
    TASK_BINARY,
    TASK_MULTI_CLASS,
    TASK_MULTI_LABEL,
    TASK_ORDINAL,
    PreprocessConfig,
    evaluate_scores,
    load_medmnist,
    medmnist_acc,
    medmnist_auc,
    prepare_batch,
    write_synthetic_medmnist,
)
from pumit_seg.models.classifier import ViTClassifier
from pumit_seg.models.mim import IMAGENET_MEAN, IMAGENET_STD
from pumit_seg.models.vit import build_universal_vit
from pumit_seg.trainers import classification as clf
from pumit_seg.weights import load_model, read_header, save_model

# A tiny ViT at 32^3 (8 tokens): fast on 2 CPU cores.
TINY = ["--model", "tiny", "--input-size", "32", "--in-channels", "1", "--batch-size", "16"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is as fast, and far faster when other jobs share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- metrics


def test_binary_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(200, 1))
    # rounded scores: many ties, and positive scores exactly at the 0.5 threshold
    scores = np.round(softmax(rng.normal(size=(200, 2)) + 0.8 * np.eye(2)[labels[:, 0]]), 1)
    assert np.any(scores[:, 1] == 0.5)
    assert medmnist_auc(labels, scores, TASK_BINARY) == pytest.approx(
        roc_auc_score(labels[:, 0], scores[:, 1]), abs=1e-12
    )
    reference_acc = accuracy_score(labels[:, 0], scores[:, 1] > 0.5)
    assert medmnist_acc(labels, scores, TASK_BINARY) == pytest.approx(reference_acc, abs=1e-12)


@pytest.mark.parametrize("task", [TASK_MULTI_CLASS, TASK_ORDINAL])
def test_multiclass_metrics_equal_sklearn(task):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=(300, 1))
    scores = softmax(rng.normal(size=(300, 5)) + 1.5 * np.eye(5)[labels[:, 0]])
    reference_auc = np.mean([roc_auc_score(labels[:, 0] == k, scores[:, k]) for k in range(5)])
    assert medmnist_auc(labels, scores, task) == pytest.approx(reference_auc, abs=1e-12)
    # the same number through sklearn's own one-vs-rest macro average
    assert reference_auc == pytest.approx(
        roc_auc_score(labels[:, 0], scores, multi_class="ovr", average="macro")
    )
    reference_acc = accuracy_score(labels[:, 0], scores.argmax(axis=1))
    assert medmnist_acc(labels, scores, task) == pytest.approx(reference_acc, abs=1e-12)


def test_multilabel_metrics_equal_sklearn():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=(150, 6))
    scores = np.round(1 / (1 + np.exp(-(rng.normal(size=(150, 6)) + 1.2 * (2 * labels - 1)))), 1)
    assert np.any(scores == 0.5)  # the official code counts a score at the threshold as positive
    reference_auc = roc_auc_score(labels, scores, average="macro")
    reference_acc = np.mean([accuracy_score(labels[:, i], scores[:, i] >= 0.5) for i in range(6)])
    metrics = evaluate_scores(labels, scores, TASK_MULTI_LABEL)
    assert metrics["auc"] == pytest.approx(reference_auc, abs=1e-12)
    assert metrics["acc"] == pytest.approx(reference_acc, abs=1e-12)


def test_auc_of_an_absent_class():
    scores = softmax(np.random.default_rng(3).normal(size=(40, 3)))
    labels = np.array([0, 1] * 20)[:, None]  # class 2 never occurs: left out of the mean
    expected = np.mean([roc_auc_score(labels[:, 0] == k, scores[:, k]) for k in range(2)])
    assert medmnist_auc(labels, scores, TASK_MULTI_CLASS) == pytest.approx(expected)
    with pytest.raises(ValueError, match="only one class"):
        medmnist_auc(np.zeros((10, 1)), scores[:10, :2], TASK_BINARY)


# ----------------------------------------------------------------------------- loading and batches


def test_load_3d_and_2d_layouts(tmp_path):
    write_synthetic_medmnist(tmp_path / "a.npz", TASK_MULTI_CLASS, 4, samples=(8, 4, 4))
    data = load_medmnist(tmp_path / "a.npz")
    assert (data.task, data.num_classes, data.spatial_dims, data.aniso_d) == (TASK_MULTI_CLASS, 4, 3, 0)
    assert (
        data.splits["train"].images.shape == (8, 1, 28, 28, 28)
        and data.splits["train"].images.dtype == torch.uint8
    )

    write_synthetic_medmnist(
        tmp_path / "chestmnist.npz", TASK_MULTI_LABEL, 14, spatial_dims=2, samples=(8, 4, 4)
    )
    data = load_medmnist(tmp_path / "chestmnist.npz")
    assert (data.name, data.task, data.num_classes, data.spatial_dims, data.aniso_d) == (
        "chestmnist", TASK_MULTI_LABEL, 14, 2, 5,
    )  # fmt: skip
    assert data.splits["val"].images.shape == (4, 1, 1, 28, 28) and data.splits["val"].labels.shape == (4, 14)

    rgb = {f"{s}_images": np.full((3, 28, 28, 3), 7, np.uint8) for s in ("train", "val", "test")}
    np.savez(
        tmp_path / "rgb.npz",
        **rgb,
        **{f"{s}_labels": np.array([[0], [1], [2]]) for s in ("train", "val", "test")},
    )
    data = load_medmnist(tmp_path / "rgb.npz", num_classes=3)  # not an official name, no num_classes entry
    assert data.channels == 3 and data.splits["test"].images.shape == (3, 3, 1, 28, 28)


def _arrays(n=4, size=28, num_classes=3):
    return {
        **{f"{s}_images": np.zeros((n, size, size, size), np.uint8) for s in ("train", "val", "test")},
        **{f"{s}_labels": (np.arange(n) % num_classes)[:, None] for s in ("train", "val", "test")},
    }


def test_load_errors_name_the_file_and_key(tmp_path):
    arrays = _arrays()
    del arrays["val_labels"], arrays["test_images"]
    np.savez(tmp_path / "keys.npz", **arrays)
    with pytest.raises(
        ValueError, match=r"keys\.npz: not a MedMNIST file: missing key\(s\) val_labels, test_images"
    ):
        load_medmnist(tmp_path / "keys.npz")

    write_synthetic_medmnist(tmp_path / "whole.npz", samples=(8, 4, 4))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:500])
    with pytest.raises(ValueError, match=r"cut\.npz: cannot read it as a \.npz file"):
        load_medmnist(tmp_path / "cut.npz")
    damaged = bytearray((tmp_path / "whole.npz").read_bytes())
    damaged[len(damaged) // 3 : len(damaged) // 3 + 64] = b"x" * 64
    (tmp_path / "damaged.npz").write_bytes(damaged)
    with pytest.raises(ValueError, match=r"damaged\.npz: cannot read it as a \.npz file"):
        load_medmnist(tmp_path / "damaged.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match=r"text\.npz: not a \.npz file"):
        load_medmnist(tmp_path / "text.npz")
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_medmnist(tmp_path / "absent.npz")

    arrays = _arrays()
    arrays["val_labels"] = arrays["val_labels"][:3]
    np.savez(tmp_path / "count.npz", **arrays)
    with pytest.raises(
        ValueError, match=r"count\.npz: val_labels: labels of shape \(3, 1\) do not fit 4 images"
    ):
        load_medmnist(tmp_path / "count.npz")

    arrays = _arrays()
    arrays["test_labels"][0, 0] = 11  # organmnist3d has classes 0..10
    np.savez(tmp_path / "organmnist3d.npz", **arrays)
    with pytest.raises(
        ValueError, match=r"organmnist3d\.npz: test_labels holds label 11, outside the class indices 0\.\.10"
    ):
        load_medmnist(tmp_path / "organmnist3d.npz")

    np.savez(
        tmp_path / "nodulemnist3d.npz",
        **{k: v[:, 0] if k.endswith("images") else v for k, v in _arrays().items()},
    )
    with pytest.raises(
        ValueError, match=r"nodulemnist3d\.npz: train_images: shape \(4, 28, 28\) does not fit"
    ):
        load_medmnist(tmp_path / "nodulemnist3d.npz")


def test_class_count_comes_from_name_metadata_or_option(tmp_path):
    arrays = _arrays(n=6, num_classes=3)
    np.savez(tmp_path / "plain.npz", **arrays)
    # a multi-class file whose name and content do not tell the class count is refused, naming its labels
    with pytest.raises(
        ValueError,
        match=r"plain\.npz: the number of classes is unknown \(labels found: 0, 1, 2\).*--num-classes",
    ):
        load_medmnist(tmp_path / "plain.npz")
    assert load_medmnist(tmp_path / "plain.npz", num_classes=4).num_classes == 4  # class 3 absent: fine
    assert load_medmnist(tmp_path / "plain.npz", default_num_classes=3).num_classes == 3
    np.savez(tmp_path / "meta.npz", **arrays, num_classes=np.array(5))
    assert load_medmnist(tmp_path / "meta.npz").num_classes == 5
    with pytest.raises(
        ValueError,
        match=r"meta\.npz: the class counts disagree: --num-classes 3; its num_classes entry \(5\)",
    ):
        load_medmnist(tmp_path / "meta.npz", num_classes=3)
    np.savez(tmp_path / "bad_meta.npz", **arrays, num_classes=np.array([3, 4]))
    with pytest.raises(ValueError, match=r"bad_meta\.npz: num_classes must be one positive integer"):
        load_medmnist(tmp_path / "bad_meta.npz")
    # a label outside the classes names the file, the split and the label, whatever gave the count
    arrays["val_labels"][1, 0] = 99
    np.savez(tmp_path / "label99.npz", **arrays)
    with pytest.raises(ValueError, match=r"label99\.npz: .*99.*--num-classes"):
        load_medmnist(tmp_path / "label99.npz")
    with pytest.raises(
        ValueError,
        match=r"label99\.npz: val_labels holds label 99, outside the class indices 0\.\.2 \(--num-classes 3\)",
    ):
        load_medmnist(tmp_path / "label99.npz", num_classes=3)
    with pytest.raises(ValueError, match=r"val_labels holds label 99, outside .*the model's 3 classes"):
        load_medmnist(tmp_path / "label99.npz", default_num_classes=3)
    np.savez(tmp_path / "organmnist3d.npz", **arrays)
    with pytest.raises(
        ValueError, match=r"organmnist3d\.npz: val_labels holds label 99, outside the class indices 0\.\.10"
    ):
        load_medmnist(tmp_path / "organmnist3d.npz")
    with pytest.raises(
        ValueError, match=r"the class counts disagree: --num-classes 4; organmnist3d has 11 classes"
    ):
        load_medmnist(tmp_path / "organmnist3d.npz", num_classes=4)
    arrays["val_labels"][1, 0] = -1
    np.savez(tmp_path / "negative.npz", **arrays)
    with pytest.raises(ValueError, match=r"negative\.npz: val_labels holds label -1, outside"):
        load_medmnist(tmp_path / "negative.npz", num_classes=3)
    # binary (labels 0 / 1) and multi-label (one column per label) files tell their count themselves
    binary = _arrays(n=4, num_classes=2)
    np.savez(tmp_path / "binary.npz", **binary)
    assert load_medmnist(tmp_path / "binary.npz").num_classes == 2
    # every synthetic file carries its count
    write_synthetic_medmnist(tmp_path / "syn.npz", TASK_MULTI_CLASS, 4, samples=(8, 4, 4))
    with np.load(tmp_path / "syn.npz") as npz:
        assert int(npz["num_classes"]) == 4


def test_classify_cli_label_outside_classes_and_outputs(tmp_path, capsys):
    arrays = _arrays(n=6, num_classes=3)
    arrays["train_labels"][2, 0] = 99
    np.savez(tmp_path / "d.npz", **arrays)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        clf.main(
            [
                "train",
                "--data",
                str(tmp_path / "d.npz"),
                "-o",
                str(run),
                "--model",
                "tiny",
                "--num-classes",
                "3",
            ]
        )
    assert exit_info.value.code == 1 and not run.exists()
    assert "train_labels holds label 99" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit):
        clf.main(["train", "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "a_file" / "run")])
    assert "a_file is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit):
        clf.main(["evaluate", "--weights", str(tmp_path / "w.safetensors"), "--data", str(tmp_path / "d.npz"),
                             "-o", str(tmp_path / "metrics.json")])  # fmt: skip
    assert "metrics.json exists: pass --overwrite" in capsys.readouterr().err


def test_prepare_batch_resizes_replicates_normalises_and_augments():
    images = torch.full((2, 1, 28, 28, 28), 255, dtype=torch.uint8)
    images[1] = 0
    config = PreprocessConfig(spatial_dims=3, in_channels=3, input_size=40)
    x = prepare_batch(images, config, "cpu")
    assert x.shape == (2, 3, 40, 40, 40)
    expected = (torch.tensor([1.0, 0.0]).view(2, 1) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    torch.testing.assert_close(x.amax(dim=(2, 3, 4)), expected)
    torch.testing.assert_close(x.amin(dim=(2, 3, 4)), expected)

    two_d = prepare_batch(
        images[:, :, :1], PreprocessConfig(spatial_dims=2, in_channels=1, input_size=32), "cpu"
    )
    assert two_d.shape == (2, 1, 1, 32, 32)

    ramp = torch.arange(28, dtype=torch.uint8).view(1, 1, 1, 1, 28).expand(3, 1, 28, 28, 28)
    plain = PreprocessConfig(in_channels=1, input_size=28, input_norm="none")
    flipped = prepare_batch(
        ramp, PreprocessConfig(**{**plain.to_dict(), "flip_prob": 1.0}), "cpu", train=True
    )
    torch.testing.assert_close(flipped, prepare_batch(ramp, plain, "cpu").flip(2, 3, 4))
    scaled = PreprocessConfig(**{**plain.to_dict(), "intensity_scale": "random"})
    torch.testing.assert_close(prepare_batch(ramp, scaled, "cpu"), 0.5 * prepare_batch(ramp, plain, "cpu"))
    first = prepare_batch(ramp, scaled, "cpu", train=True, generator=torch.Generator().manual_seed(5))
    again = prepare_batch(ramp, scaled, "cpu", train=True, generator=torch.Generator().manual_seed(5))
    factors = first.amax(dim=(1, 2, 3, 4)) / prepare_batch(ramp, plain, "cpu").amax(dim=(1, 2, 3, 4))
    assert (
        torch.equal(first, again)
        and torch.all((factors >= 0) & (factors <= 1))
        and factors.unique().numel() == 3
    )


# ----------------------------------------------------------------------------- model, weights, schedule


def test_classifier_round_trip_and_2d_input(tmp_path):
    torch.manual_seed(0)
    model = ViTClassifier(5, build_universal_vit("tiny", in_channels=3, depth=2)).eval()
    x3, x2 = torch.randn(2, 3, 32, 32, 32), torch.randn(2, 3, 1, 32, 32)
    save_model(model, tmp_path / "clf.safetensors")
    loaded = load_model(tmp_path / "clf.safetensors").eval()
    with torch.no_grad():
        for x, aniso_d in ((x3, 0), (x2, 5)):
            logits = model(x, aniso_d)
            assert logits.shape == (2, 5)
            torch.testing.assert_close(loaded(x, aniso_d), logits, rtol=0, atol=0)
            # the head reads the final normed CLS token
            torch.testing.assert_close(logits, model.head(model.encoder(x, aniso_d).tokens[:, 0]))


def test_pretrained_encoder_fills_the_classifier(tmp_path):
    write_synthetic_medmnist(tmp_path / "d.npz", samples=(8, 4, 4))
    data = load_medmnist(tmp_path / "d.npz")
    torch.manual_seed(1)
    encoder = build_universal_vit("tiny", in_channels=1, depth=2, norm_eps=1e-5)
    save_model(encoder, tmp_path / "encoder.safetensors")
    config = clf.ClassificationConfig(data="d", output_dir="o", model="base", pretrained=str(tmp_path / "encoder.safetensors"), input_size=32)  # fmt: skip
    model, report = clf._build_model(config, data)
    # the architecture comes from the file's header (not --model base), LayerNorm eps and channels included
    assert model.encoder.config["depth"] == 2 and model.encoder.config["norm_eps"] == 1e-5
    assert model.encoder.config["in_channels"] == 1
    assert "pos_embed" in report and model.num_classes == 3
    for name, tensor in encoder.state_dict().items():
        if name != "pos_embed":  # resampled from 5x10x10 to the 2x2x2 token grid
            torch.testing.assert_close(model.encoder.state_dict()[name], tensor, rtol=0, atol=0)

    # a pickled checkpoint is refused unless the user trusts it, and the refusal names the flag
    complete = build_universal_vit("tiny", in_channels=3).state_dict()
    torch.save({"state_dict": complete, "hyper_parameters": argparse.Namespace(lr=1)}, tmp_path / "e.ckpt")
    config.pretrained = str(tmp_path / "e.ckpt")
    with pytest.raises(ValueError, match=r"e\.ckpt: cannot read the checkpoint.*add --trust-pickle"):
        clf._build_model(config, data)
    config.trust_pickle, config.model = True, "tiny"
    trusted, _ = clf._build_model(config, data)  # no header: the preset's architecture
    assert trusted.encoder.config["depth"] == 4
    torch.testing.assert_close(
        trusted.encoder.state_dict()["blocks.3.mlp.w3.weight"], complete["blocks.3.mlp.w3.weight"]
    )

    # a file without a header (the preset decides the architecture) that lacks a few tensors
    save_file(
        {k: v for k, v in complete.items() if ".ffn_ln." not in k}, str(tmp_path / "partial.safetensors")
    )
    config.pretrained, config.model, config.norm_eps = str(tmp_path / "partial.safetensors"), "tiny", None
    with pytest.raises(ValueError, match=r"partial\.safetensors: leaves 8 encoder parameter\(s\) unfilled"):
        clf._build_model(config, data)


def test_input_normalisation_follows_the_weights_header():
    imported = {"input": {"value_range": [0.0, 1.0], "normalization": "imagenet"}}  # `pumit_pretrain import`
    assert clf.resolve_input_norm("auto", imported) == "imagenet"
    assert clf.resolve_input_norm("auto", {"input": {"value_range": [0.0, 1.0]}}) == "none"
    assert clf.resolve_input_norm("auto", None) == "imagenet"  # EVA-02 / random initialisation (docs/method.md, MIM inputs)
    assert clf.resolve_input_norm("none", imported) == "none"


def test_lr_schedule_and_best_epoch_selection():
    lrs = [clf.lr_at_epoch(1e-3, epoch, 100) for epoch in range(100)]
    assert lrs[49] == 1e-3 and lrs[50] == pytest.approx(1e-4) and lrs[74] == pytest.approx(1e-4)
    assert lrs[75] == pytest.approx(1e-5) and lrs[99] == pytest.approx(1e-5)
    assert clf.select_best_epoch([0.5, 0.7, 0.7, 0.6]) == 1  # the first of equal bests, as the official loop
    assert clf.select_best_epoch([0.9, 0.2, 0.95]) == 2


# ----------------------------------------------------------------------------- training runs


def test_tiny_model_learns_and_keeps_the_best_validation_epoch(tmp_path, capsys):
    write_synthetic_medmnist(tmp_path / "syn.npz", TASK_MULTI_CLASS, 3, samples=(64, 32, 48))
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "syn.npz"), "-o", str(run), *TINY, "--epochs", "6"]
    assert clf.main([*args, "--lr", "3e-4"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["test_auc"] > 0.9  # chance is 0.5
    log = np.genfromtxt(run / "log.csv", delimiter=",", names=True)
    assert len(log) == 6 and log["lr"][-1] == pytest.approx(3e-6)  # x0.1 after 50 % and 75 % of the epochs
    assert log["train_loss"][-1] < 0.8 < np.log(3)  # it learnt: chance-level cross entropy is ln 3
    assert results["best_epoch"] == int(np.argmax(log["val_auc"]))
    assert read_header(run / "best_model.safetensors")["epoch"] == results["best_epoch"]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the saved best model reproduces the logged validation AUC of its epoch, and the test numbers
    capsys.readouterr()
    weights = str(run / "best_model.safetensors")
    assert (
        clf.main(["evaluate", "--weights", weights, "--data", str(tmp_path / "syn.npz"), "--split", "val"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["auc"] == pytest.approx(
        log["val_auc"][results["best_epoch"]], abs=1e-6
    )
    out = tmp_path / "test.json"
    assert (
        clf.main(["evaluate", "--weights", weights, "--data", str(tmp_path / "syn.npz"), "-o", str(out)]) == 0
    )
    assert json.loads(out.read_text())["auc"] == pytest.approx(results["test_auc"], abs=1e-6)

    # the same folder with another configuration is refused, and left as it was
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    with pytest.raises(SystemExit, match="1"):
        clf.main([*args, "--lr", "1e-3"])
    assert "holds a run of another configuration (--lr 0.0003 -> 0.001)" in capsys.readouterr().err
    assert before == {p.name: p.stat().st_mtime_ns for p in run.iterdir()}


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    write_synthetic_medmnist(tmp_path / "b.npz", TASK_BINARY, samples=(32, 16, 16))
    common = dict(data=str(tmp_path / "b.npz"), model="tiny", input_size=32, in_channels=1, batch_size=16,
                  epochs=3, lr=3e-4, flip_prob=0.5, intensity_scale="random")  # fmt: skip
    whole = clf.train_classifier(clf.ClassificationConfig(output_dir=str(tmp_path / "whole"), **common))

    real_plot, calls = clf._plot_curves, []

    def interrupt_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_plot(*args, **kwargs)

    monkeypatch.setattr(clf, "_plot_curves", interrupt_in_second_epoch)
    config = clf.ClassificationConfig(output_dir=str(tmp_path / "cut"), **common)
    with pytest.raises(KeyboardInterrupt):
        clf.train_classifier(config)
    assert read_header(tmp_path / "cut" / "checkpoint_last.safetensors")["completed_epochs"] == 1
    resumed = clf.train_classifier(config)
    assert resumed["test_auc"] == whole["test_auc"] and resumed["best_epoch"] == whole["best_epoch"]
    a = load_model(tmp_path / "whole" / "checkpoint_last.safetensors").state_dict()
    b = load_model(tmp_path / "cut" / "checkpoint_last.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [
        np.genfromtxt(tmp_path / name / "log.csv", delimiter=",", names=True) for name in ("whole", "cut")
    ]
    for column in ("lr", "train_loss", "val_loss", "val_auc", "val_acc"):
        assert np.array_equal(logs[0][column], logs[1][column])


def test_multilabel_2d_and_lr_sweep(tmp_path):
    write_synthetic_medmnist(tmp_path / "ml.npz", TASK_MULTI_LABEL, 4, spatial_dims=2, samples=(32, 16, 16))
    config = clf.ClassificationConfig(data=str(tmp_path / "ml.npz"), output_dir=str(tmp_path / "sweep"), model="tiny",
                                      input_size=32, in_channels=1, batch_size=16, epochs=2, lr_sweep=(1e-4, 1e-3))  # fmt: skip
    results = clf.fit_classifier(config)
    sweep = {run["lr"]: run for run in results["sweep"]}
    assert set(sweep) == {1e-4, 1e-3} and os.path.isdir(tmp_path / "sweep" / "lr_0.001")
    assert results["chosen_lr"] == max(sweep, key=lambda lr: (sweep[lr]["val_auc"], -lr))
    assert results["task"] == TASK_MULTI_LABEL and 0 <= results["test_acc"] <= 1


def test_benchmark_tabulates_beside_the_paper(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_medmnist", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_medmnist.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "table.md"
    common = ["--data-dir", str(tmp_path / "data"), "--results", str(results), "-o", str(tmp_path / "runs")]
    assert bench.main(common) == 1  # no files: it says it cannot run, and why
    assert "cannot run here" in capsys.readouterr().err and not results.exists()

    write_synthetic_medmnist(tmp_path / "data" / "nodulemnist3d.npz", TASK_BINARY, samples=(32, 16, 16))
    assert bench.main([*common, *TINY, "--epochs", "1", "--lr-sweep", "1e-4", "1e30"]) == 0
    table = results.read_text()
    ours = json.loads(results.with_suffix(".json").read_text())["ours"]["nodulemnist3d"]
    assert ours["chosen_lr"] == 1e-4 and "loss became nan" in ours["diverged_lrs"]["1e+30"]  # left out
    row = next(line for line in table.splitlines() if line.startswith("| pumit-seg"))
    assert row.split("|")[4:6] == [f" {100 * ours['test_auc']:.1f} ", f" {100 * ours['test_acc']:.1f} "]
    assert "| PUMIT (paper) | 99.8 | 95.6 | 94.3 | 88.4 |" in table and "92.2 | 84.6 |" in table
    assert "Not run: organmnist3d, fracturemnist3d, adrenalmnist3d, vesselmnist3d, synapsemnist3d" in table
