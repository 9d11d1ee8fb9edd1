"""The demo's report: one self-contained HTML page and its PNGs, checked in a real headless browser.

    python -m pumit_seg.app.report OUTPUT                 # OUTPUT/report.html + OUTPUT/report/*.png
    python -m pumit_seg.app.report OUTPUT --check [--screenshot [FILE]]   # default FILE: OUTPUT/report_screenshot.png

The page (no scripts, no style sheets or fonts from elsewhere; every picture a PNG beside it) shows
what `pumit_demo` wrote under OUTPUT: the commands run and their wall times (``steps.json``), the
tokenizer's reconstructions and codebook usage, the pre-training loss curves (from each run's
``log.csv``), nnU-Net's ``progress.png`` of every training, overlays of predictions against the
reference on test slices, the metrics table (Dice, ASSD, HD, HD95 per organ, pre-trained vs scratch,
from ``pumit_evaluate``'s ``summary.json``) and the CHAOS scores (``pumit_chaos score``). What a step
did not produce is said on the page, never drawn from made-up numbers.

`check_in_browser(html)` loads the page in headless Chromium through the DevTools protocol on a pipe
(``--remote-debugging-pipe``: no network port, no extra package) and returns every image's load state,
the page's errors (script exceptions, console errors, failed loads) and, on request, a full-page
screenshot.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from pumit_seg.app.browser import check_in_browser
from pumit_seg.atomic import atomic_path
from pumit_seg.plotting import pyplot, save_figure

REPORT_NAME = "report.html"
ASSETS_FOLDER = "report"  # PNGs of the page, beside it
SCREENSHOT_NAME = "report_screenshot.png"  # `--check --screenshot` without a file name: inside OUTPUT
MAX_OVERLAY_CASES = 3
ORGAN_COLOURS = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#999999"]
TABLE_METRICS = ("Dice", "ASSD", "HD", "HD95")
# ================================================================================================ data


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _save_figure(figure, path: Path) -> None:
    save_figure(figure, path, dpi=90)


def read_log_csv(path: Path) -> dict[str, np.ndarray]:
    """Numeric columns of a trainer's ``log.csv`` (non-numeric cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = float("nan")
            columns.setdefault(key, []).append(number)
    return {k: np.asarray(v) for k, v in columns.items() if not np.isnan(v).all()}


def plot_loss_curves(runs: dict[str, Path], output: Path) -> list[str]:
    """One panel per run with every ``*loss*`` column of its log.csv against the step; returns the runs drawn."""
    logs = {name: read_log_csv(path) for name, path in runs.items() if path.is_file()}
    logs = {name: log for name, log in logs.items() if "step" in log and any("loss" in k for k in log)}
    if not logs:
        return []
    plt = pyplot()
    figure, axes = plt.subplots(1, len(logs), figsize=(6 * len(logs), 3.6), squeeze=False)
    for axis, (name, log) in zip(axes[0], logs.items(), strict=True):
        for key in sorted(k for k in log if "loss" in k):
            values = log[key]
            keep = ~np.isnan(values)
            if keep.sum():
                axis.plot(log["step"][keep], values[keep], marker="." if keep.sum() < 30 else None, label=key)
        axis.set_xlabel("training step")
        axis.set_ylabel("loss (log.csv columns)")
        axis.set_title(f"{name} (log.csv)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    _save_figure(figure, output)
    return list(logs)


def _window(image: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(image, [1, 99])
    return float(low), float(max(high, low + 1e-6))


def _draw_labels(axis, labels: np.ndarray, label_values: list[int]) -> None:
    from matplotlib.colors import to_rgba

    overlay = np.zeros((*labels.shape, 4))
    for value in label_values:
        mask = labels == value
        if mask.any():
            colour = to_rgba(ORGAN_COLOURS[(value - 1) % len(ORGAN_COLOURS)])
            overlay[mask] = (*colour[:3], 0.45)
            axis.contour(mask, levels=[0.5], colors=[colour], linewidths=1.0)
    axis.imshow(overlay, interpolation="nearest")


def plot_overlays(
    image_slices: list[np.ndarray],
    label_columns: dict[str, list[np.ndarray]],
    row_titles: list[str],
    label_names: dict[int, str],
    output: Path,
    aspect: float = 1.0,
) -> None:
    """Rows of test slices: the image, then one column per label map (reference, predictions)."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    columns = ["image", *label_columns]
    figure, axes = plt.subplots(
        len(image_slices),
        len(columns),
        figsize=(2.6 * len(columns), 2.7 * len(image_slices) + 0.5),
        squeeze=False,
    )
    values = sorted(label_names)
    for row, image in enumerate(image_slices):
        low, high = _window(image)
        for col, name in enumerate(columns):
            axis = axes[row][col]
            axis.imshow(image, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
            if name != "image":
                _draw_labels(axis, label_columns[name][row], values)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=10)
            if col == 0:
                axis.set_ylabel(row_titles[row], fontsize=8)
    handles = [
        Line2D([], [], color=ORGAN_COLOURS[(v - 1) % len(ORGAN_COLOURS)], lw=3, label=label_names[v])
        for v in values
    ]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    _save_figure(figure, output)


def _read_volume(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    from pumit_seg.data.readers import read_image  # the project's one reader: damaged files are refused

    image = read_image(path)
    return image.array, image.spacing


def _slice(volume: np.ndarray, z: int | None) -> np.ndarray:
    return volume if z is None else volume[z]


def segmentation_overlays(dataset: Path, predictions: dict[str, Path], output: Path) -> bool:
    """Test slices with the most reference foreground: image, reference and each arm's prediction."""
    dataset_json = _read_json(dataset / "dataset.json") or {}
    ending = dataset_json.get("file_ending", ".nii.gz")
    label_names = {
        int(v): k for k, v in dataset_json.get("labels", {}).items() if isinstance(v, int) and v > 0
    }
    references = sorted((dataset / "labelsTs").glob(f"*{ending}")) if (dataset / "labelsTs").is_dir() else []
    cases = [r for r in references if all((folder / r.name).is_file() for folder in predictions.values())]
    if not cases or not label_names:
        return False
    images, columns, titles = [], {"reference": [], **{f"{arm} prediction": [] for arm in predictions}}, []
    for reference_file in cases[:MAX_OVERLAY_CASES]:
        reference, spacing = _read_volume(reference_file)
        image, _ = _read_volume(dataset / "imagesTs" / reference_file.name.replace(ending, f"_0000{ending}"))
        z = (
            int(np.argmax((reference > 0).reshape(len(reference), -1).sum(axis=1)))
            if reference.ndim == 3
            else None
        )
        images.append(_slice(image, z))
        columns["reference"].append(_slice(reference, z))
        for arm, folder in predictions.items():
            columns[f"{arm} prediction"].append(_slice(_read_volume(folder / reference_file.name)[0], z))
        titles.append(f"{reference_file.name.replace(ending, '')}, slice {z}")
    aspect = spacing[-2] / spacing[-1] if len(spacing) >= 2 else 1.0
    plot_overlays(images, columns, titles, label_names, output, aspect)
    return True


def chaos_overlay(submission: Path, reference_root: Path, output: Path) -> bool:
    """A CHAOS test slice: DICOM image, ground-truth PNG and submitted PNG (Task 5, all organs)."""
    from pumit_seg.evaluation.chaos_io import MR_ORGANS, grey_to_labels, read_dicom_series, read_png_stack

    task = submission / "Task5" / "MR"
    if not task.is_dir():
        return False
    rows, titles = {"image": [], "ground truth": [], "submission": []}, []
    for chaos_id in sorted(p.name for p in task.iterdir() if p.is_dir())[:MAX_OVERLAY_CASES]:
        for sequence in sorted(p.name for p in (task / chaos_id).iterdir() if p.is_dir()):
            base = reference_root / "MR" / chaos_id / sequence
            dicom = base / "DICOM_anon" / ("InPhase" if sequence == "T1DUAL" else "")
            results = task / chaos_id / sequence / "Results"
            if not (base / "Ground").is_dir() or not results.is_dir():
                continue
            image, _ = read_dicom_series(str(dicom))
            ground = grey_to_labels(read_png_stack(str(base / "Ground"))[0], "MR")
            result = grey_to_labels(read_png_stack(str(results))[0], "MR")
            z = int(np.argmax((ground > 0).reshape(len(ground), -1).sum(axis=1)))
            rows["image"].append(image[z])
            rows["ground truth"].append(ground[z])
            rows["submission"].append(result[z])
            titles.append(f"MR {chaos_id} {sequence}, PNG {z}")
            break  # one sequence per case
    if not titles:
        return False
    names = {label: organ.replace("_", " ") for organ, (label, *_) in MR_ORGANS.items()}
    plot_overlays(rows["image"], {k: v for k, v in rows.items() if k != "image"}, titles, names, output)
    return True


# ================================================================================================ page


def _e(value) -> str:
    return html.escape(str(value))


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    value = float(value)
    if np.isnan(value):
        return "NaN"
    if np.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _image(assets: Path, path: Path, caption: str, css_class: str = "") -> str:
    relative = f"{assets.name}/{path.name}"
    attribute = f' class="{css_class}"' if css_class else ""
    return (
        f'<figure{attribute}><img src="{_e(relative)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption>'
        "</figure>"
    )


def _copy_asset(source: Path, assets: Path, name: str) -> Path | None:
    if not source.is_file():
        return None
    target = assets / name
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
padding:16px 24px;color:#1d1d1f;background:#fff}
h1{font-size:26px;margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{margin-top:22px}.sub{color:#555;margin-top:0}
table{border-collapse:collapse;margin:8px 0 16px;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f2f2f2}td.l,th.l{text-align:left}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;background:#f6f6f6;padding:1px 3px;
word-break:break-all}
.done{color:#0a7a2f}.failed{color:#b00020;font-weight:bold}.skipped,.not-available{color:#a15c00}
.missing{color:#a15c00;font-style:italic}.better{font-weight:bold}
figure{display:inline-block;margin:8px 12px 8px 0;vertical-align:top}figcaption{font-size:13px;color:#555}
img{max-width:100%;border:1px solid #ddd}figure.half{width:48%;margin-right:1%}figure.half img{width:100%}
"""


def _steps_section(steps: list[dict]) -> str:
    if not steps:
        return _missing("no steps.json: run pumit_demo first")
    rows = []
    for step in steps:
        status = step.get("status", "?")
        note = step.get("reason", "")
        if step.get("resumed"):
            note = "finished in an earlier run"
        wall = step.get("wall_s")
        rows.append(
            f'<tr><td class="l">{_e(step.get("part", ""))}</td><td class="l">{_e(step.get("title", ""))}<br>'
            f"<code>$ {_e(step.get('command', ''))}</code></td>"
            f'<td class="l {status.replace(" ", "-")}">{_e(status)}{"<br>" + _e(note) if note else ""}</td>'
            f"<td>{_number(wall, 1) if wall is not None else '–'}</td></tr>"
        )
    total = sum(s.get("wall_s") or 0.0 for s in steps if s.get("status") == "done")
    return (
        '<table><tr><th class="l">part</th><th class="l">step and command</th><th class="l">status</th>'
        f"<th>wall time (s)</th></tr>{''.join(rows)}"
        f'<tr><th class="l" colspan="3">total of the finished steps</th><th>{total:.0f}</th></tr></table>'
    )


def _times_by_part(steps: list[dict], setting: str, device: str) -> str:
    """Measured minutes per part (this run; steps finished in an earlier run count with their time then)
    beside what `pumit_seg.app.demo.EXPECTED_MINUTES` expects."""
    from pumit_seg.app.demo import EXPECTED_MINUTES, PARTS, expected_time_text

    device = "gpu" if device == "cuda" else "cpu"
    expected = EXPECTED_MINUTES.get(setting, {}).get(device, {})
    rows = []
    for part in PARTS:
        measured = [s.get("wall_s") for s in steps if s.get("part") == part and s.get("status") == "done"]
        if not measured and part not in expected:
            continue
        rows.append(
            f'<tr><td class="l">{_e(part)}</td><td>{_number(sum(measured) / 60, 1) if measured else "–"}</td>'
            f"<td>{_number(expected.get(part), 1)}</td></tr>"
        )
    note = (
        f"<p>Expected for this setting and device: {_e(expected_time_text(setting, device))}. "
        "The report step itself is still running while it writes this page: its time is not counted.</p>"
        if expected
        else ""
    )
    return (
        '<table><tr><th class="l">part</th><th>measured (min)</th><th>expected (min)</th></tr>'
        f"{''.join(rows)}</table>{note}"
    )


def _label_names(dataset: Path) -> dict[str, str]:
    labels = (_read_json(dataset / "dataset.json") or {}).get("labels", {})
    return {str(v): k for k, v in labels.items() if isinstance(v, int) and v > 0}


def _metrics_table(summaries: dict[str, dict], names: dict[str, str]) -> str:
    """Mean metric per organ and arm; the better arm of each organ and metric in bold."""
    arms = list(summaries)
    labels = [k for k in next(iter(summaries.values()))["mean"] if str(k) not in ("0", "background")]
    header = "".join(
        f'<th colspan="{len(arms)}">{_e(m)}{" (mm)" if m != "Dice" else ""}</th>' for m in TABLE_METRICS
    )
    header2 = "".join(f"<th>{_e(a)}</th>" for _ in TABLE_METRICS for a in arms)
    rows = []
    for label in [*labels, "foreground mean"]:
        cells = []
        for metric in TABLE_METRICS:
            values = []
            for arm in arms:
                table = (
                    summaries[arm]["foreground_mean"]
                    if label == "foreground mean"
                    else summaries[arm]["mean"][label]
                )
                values.append(float(table.get(metric, float("nan"))))
            finite = [v for v in values if np.isfinite(v)]
            best = (max(finite) if metric == "Dice" else min(finite)) if len(finite) > 1 else None
            cells += [
                f'<td class="{"better" if best is not None and v == best else ""}">{_number(v)}</td>'
                for v in values
            ]
        name = names.get(str(label), str(label))
        rows.append(f'<tr><td class="l">{_e(name)}</td>{"".join(cells)}</tr>')
    return f'<table><tr><th class="l" rowspan="2">organ</th>{header}</tr><tr>{header2}</tr>{"".join(rows)}</table>'


def _chaos_table(scores: dict) -> str:
    keys = ("DICE", "RAVD", "ASSD", "MSSD")
    rows = []
    for task, result in scores.items():
        mean = result.get("mean", {})
        rows.append(
            f'<tr><td class="l">{_e(task)}</td><td><b>{_number(result.get("score"), 2)}</b></td>'
            + "".join(
                f"<td>{_number(mean.get(k), 3)}</td><td>{_number(mean.get(k + '_score'), 1)}</td>"
                for k in keys
            )
            + f"<td>{len(result.get('series', []))}</td>"
            + f'<td class="l">{_e(", ".join(result.get("missing", [])) or "none")}</td></tr>'
        )
    head = "".join(
        f"<th>{k}{' (%)' if k == 'RAVD' else ' (mm)' if k != 'DICE' else ''}</th><th>score</th>" for k in keys
    )
    return f'<table><tr><th class="l">task</th><th>score (0-100)</th>{head}<th>organ series</th><th class="l">series without results (not scored)</th></tr>{"".join(rows)}</table>'


def _pictures_in(folder: Path, words: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [
        p
        for p in sorted(folder.rglob("*.png"))
        if any(w in p.name.lower() for w in words) and not any(x in p.name.lower() for x in exclude)
    ]
    return found


def _latest_per_name(pictures: list[Path]) -> list[Path]:
    """Pictures written every validation carry the step in their name: keep the newest of each kind."""
    by_kind: dict[str, tuple[int, Path]] = {}
    for path in pictures:
        numbers = re.findall(r"\d+", path.stem)
        step = int(numbers[-1]) if numbers else -1
        kind = re.sub(r"\d+(?!.*\d)", "#", path.stem)  # only the last number is the step
        if kind not in by_kind or step > by_kind[kind][0]:
            by_kind[kind] = (step, path)
    return [p for _, p in sorted(by_kind.values(), key=lambda item: str(item[1]))]


def _last_validation_table(name: str, val_csv: Path) -> str:
    """The last row of a pre-training run's val.csv (tokenizer: L1, perplexity, token entropy, codes used)."""
    if not val_csv.is_file():
        return ""
    columns = read_log_csv(val_csv)
    if not columns or "step" not in columns:
        return ""
    header = "".join(f"<th>{_e(k)}</th>" for k in columns)
    row = "".join(f"<td>{_number(v[-1], 0 if k == 'step' else 3)}</td>" for k, v in columns.items())
    return f"<p>{_e(name)}, last validation on held-out images:</p><table><tr>{header}</tr><tr>{row}</tr></table>"


def _pretraining_scope(root: Path, paths: dict, assets: Path) -> str:
    """What the pre-training part shows and what it cannot, and the corpus it ran on (the store's overview)."""
    settings = _read_json(root / "demo_settings.json") or {}
    steps = {s.get("key"): s for s in (_read_json(root / "steps.json") or {}).get("steps", [])}
    tokenizer_command = steps.get("pretrain_tokenizer", {}).get("command", "")
    lpips = "--lpips-weights" in tokenizer_command
    parts = [
        "<p><b>What this shows:</b> the pre-training chain running on a small heterogeneous corpus: the "
        "image store, the universal visual tokenizer and masked image modelling of the universal ViT, "
        f"with the <i>tiny</i> presets (CPU-sized networks and crops; {_e(settings.get('tokenizer_steps', '?'))} "
        f"tokenizer and {_e(settings.get('mim_steps', '?'))} MIM steps). <b>What it cannot show:</b> "
        "a tokenizer or encoder of the paper's quality, or that pre-training helps fine-tuning; the "
        "paper's models train for hundreds of thousands of steps on GPUs and millions of images. "
        + (
            "The tokenizer used its perceptual (LPIPS) loss term."
            if lpips
            else "The tokenizer trained <b>without its perceptual (LPIPS) loss term</b>: the demo has no "
            "VGG16 / LPIPS weights (<code>--lpips-weights</code>), so its reconstructions are driven by "
            "the L1 term and are blurrier than the recipe's."
        )
        + "</p>"
    ]
    store = Path(paths.get("store", root / "pretrain" / "store"))
    overview = _copy_asset(store / "overview.png", assets, "pretraining_corpus_overview.png")
    parts.append("<h3>The pre-training corpus (the store's overview)</h3>")
    parts.append(
        _image(assets, overview, "one slice per dataset of the store, and the number of images per aniso_d")
        if overview
        else _missing(f"no {store / 'overview.png'}: the prepare step did not run")
    )
    return "".join(parts)


def _health_table(name: str, run: Path) -> str:
    """Did pre-training learn? The last validation's numbers next to their baselines, and the verdict."""
    health = _read_json(run / "health.json")
    if not health or not health.get("validations"):
        return ""
    last = health["validations"][-1]
    m = last.get("metrics", {})
    if name == "tokenizer":
        rows = [
            ("held-out L1 (lower is better)", m.get("val_l1"),
             f"per-crop mean {_number(m.get('val_l1_crop_mean'))}; token-block average "
             f"{_number(m.get('val_l1_token_blocks'))}"),
            ("input dependence (0: same output for every input)", m.get("val_input_dependence"), "inputs: 1"),
            ("mean token entropy (nats)", m.get("val_token_entropy"),
             f"log K = {_number(m.get('val_log_num_codes'))}"),
            ("codes in use", m.get("val_codes_used"), f"K = {_number(math.exp(m.get('val_log_num_codes') or 0), 0)}"),
        ]  # fmt: skip
    else:
        rows = [
            ("masked-token accuracy", m.get("accuracy"),
             f"majority code {_number(m.get('accuracy_majority'))}"),
            ("codes predicted", m.get("predicted_codes_used"), f"in the targets {_number(m.get('target_codes_used'), 0)}"),
        ]  # fmt: skip
    body = "".join(
        f'<tr><td class="l">{_e(label)}</td><td>{_number(value, 0 if label.startswith("codes") else 3)}</td>'
        f'<td class="l">{_e(baseline)}</td></tr>'
        for label, value, baseline in rows
    )
    status = last.get("status", "?")
    verdict = (
        f'<p class="done">{_e(name)}: healthy at step {last.get("step")}</p>'
        if status == "healthy"
        else f'<p class="failed">WARNING: {_e(name)} {_e(status)} at step {last.get("step")}: '
        f"{_e('; '.join(last.get('reasons', [])))}</p>"
    )
    return (
        f"<p>{_e(name)}: is it learning? Last validation on held-out images against simple baselines "
        "(docs/pretraining_recipe.md):</p>"
        f'<table><tr><th class="l">signal</th><th>value</th><th class="l">baseline</th></tr>{body}</table>'
        + verdict
    )


def _pretraining_section(root: Path, paths: dict, assets: Path) -> str:
    parts = [_pretraining_scope(root, paths, assets)]
    tokenizer_run = Path(paths.get("tokenizer_run", root / "pretrain" / "tokenizer"))
    mim_run = Path(paths.get("mim_run", root / "pretrain" / "mim"))
    parts.append("<h3>Tokenizer: reconstructions and codebook usage (held-out images)</h3>")
    reconstructions = _latest_per_name(_pictures_in(tokenizer_run, ("reconstruction",)))
    codebook = _latest_per_name(_pictures_in(tokenizer_run, ("codebook",)))
    figures = []
    for i, path in enumerate(reconstructions):
        copied = _copy_asset(path, assets, f"tokenizer_reconstruction_{i}.png")
        figures.append(_image(assets, copied, f"tokenizer reconstruction ({path.name})"))
    for i, path in enumerate(codebook):
        copied = _copy_asset(path, assets, f"tokenizer_codebook_{i}.png")
        figures.append(_image(assets, copied, f"codebook usage ({path.name})"))
    parts.append(
        "".join(figures)
        or _missing(f"no tokenizer pictures under {tokenizer_run}: the tokenizer step did not run")
    )
    for name, run in (("tokenizer", tokenizer_run), ("MIM", mim_run)):
        parts.append(_health_table(name, run))
        parts.append(_last_validation_table(name, run / "val.csv"))
    parts.append("<h3>Pre-training loss curves</h3>")
    curves = assets / "pretraining_loss_curves.png"
    drawn = plot_loss_curves({"tokenizer": tokenizer_run / "log.csv", "MIM": mim_run / "log.csv"}, curves)
    parts.append(
        _image(assets, curves, f"loss against step: {', '.join(drawn)}")
        if drawn
        else _missing("no log.csv of a tokenizer or MIM run: the pre-training steps did not run")
    )
    mim_pictures = _latest_per_name(_pictures_in(mim_run / "pictures", ("step",)))
    for i, path in enumerate(mim_pictures):
        copied = _copy_asset(path, assets, f"mim_{i}.png")
        parts.append(_image(assets, copied, f"MIM on held-out images ({path.name})"))
    return "".join(parts)


def _progress(paths: dict, key: str, assets: Path, caption: str) -> str:
    folder = paths.get(key)
    copied = _copy_asset(Path(folder) / "progress.png", assets, f"{key}_progress.png") if folder else None
    return _image(assets, copied, caption, "half") if copied else _missing(f"no progress.png for {caption}")


def _weight_report_line(log_file: Path) -> str:
    """PUMITTrainer's one-line summary of the encoder weights it loaded (from the training log)."""
    if not log_file.is_file():
        return ""
    found = re.search(r"weights: \d+ loaded[^\n]*", log_file.read_text(errors="replace"))
    return f" The trainer reported: <i>{_e(found.group(0))}</i>." if found else ""


def _segmentation_section(root: Path, paths: dict, assets: Path) -> str:
    parts = [
        "<p><b>What this shows:</b> nnU-Net fine-tuning a PUMIT network twice on the same phantom dataset "
        "with the same trainer and budget, once from the encoder pre-trained above and once from random "
        "initialisation, then predicting and scoring the held-out test cases. <b>What it cannot show:</b> "
        "which start is better. The networks are tiny, the training is a few hundred iterations and the "
        "test set a few phantoms: the numbers change from run to run (seeds, thread timing), an organ can "
        "stay at Dice 0 for a whole short run in either arm, and the difference between the arms is within "
        "that spread.</p>"
    ]
    if paths.get("encoder"):
        parts.append(
            f"<p>The pre-trained model starts from <code>{_e(paths['encoder'])}</code>; the scratch model from "
            "random initialisation, with the same trainer (the same budget)."
            + _weight_report_line(root / "logs" / "seg_train_pretrained.log")
            + "</p>"
        )
    parts.append("<h3>Fine-tuning curves (nnU-Net's progress.png)</h3>")
    for arm in ("pretrained", "scratch"):
        parts.append(_progress(paths, f"seg_fold_{arm}", assets, f"{arm}: loss, pseudo Dice, learning rate"))
    summaries = {}
    for arm in ("pretrained", "scratch"):
        predictions = paths.get(f"seg_predictions_{arm}")
        summary = _read_json(Path(predictions) / "summary.json") if predictions else None
        if summary:
            summaries[arm] = summary
    parts.append("<h3>Metrics on the test cases (pumit_evaluate, MONAI convention, mm)</h3>")
    dataset = Path(paths["seg_dataset"]) if paths.get("seg_dataset") else None
    if summaries:
        parts.append(_metrics_table(summaries, _label_names(dataset) if dataset else {}))
        parts.append("<p>Mean over the test cases; the better arm of each organ and metric in bold.</p>")
    else:
        parts.append(_missing("no summary.json: the evaluation steps did not run"))
    parts.append("<h3>Predictions against the reference on test slices</h3>")
    predictions = {
        arm: Path(paths[f"seg_predictions_{arm}"])
        for arm in ("pretrained", "scratch")
        if paths.get(f"seg_predictions_{arm}") and Path(paths[f"seg_predictions_{arm}"]).is_dir()
    }
    overlay = assets / "segmentation_overlays.png"
    if dataset and predictions and segmentation_overlays(dataset, predictions, overlay):
        parts.append(_image(assets, overlay, "slice with the most reference foreground of each test case"))
    else:
        parts.append(_missing("no predictions with references to draw"))
    return "".join(parts)


def _chaos_section(paths: dict, assets: Path) -> str:
    from pumit_seg.app.demo import CHAOS_SEQUENCE

    parts = [
        "<p><b>What this shows:</b> the CHAOS path from DICOM series to a submission in the challenge's "
        "layout and its score with the challenge's metrics, on synthetic MR series. "
        f"<b>What it cannot show:</b> a complete submission. The demo trains one model on the {CHAOS_SEQUENCE} "
        "series only: the other MR sequence has no results, so Tasks 3 and 5 are scored on "
        f"{CHAOS_SEQUENCE} alone (the table lists what is missing) and the zip would be incomplete for the "
        "challenge. Tasks 1, 2 and 4 need CT, which the synthetic set has none of. A full MR submission "
        "trains on both sequences (<code>pumit_chaos convert --joint_mr</code>, see docs/evaluation.md).</p>",
        _progress(paths, "chaos_fold", assets, "CHAOS training: loss, pseudo Dice, learning rate"),
    ]
    scores = _read_json(Path(paths["chaos_scores"])) if paths.get("chaos_scores") else None
    parts.append("<h3>CHAOS score of the submission (official metrics and scores)</h3>")
    if scores:
        parts.append(_chaos_table(scores))
        missing = sorted({m for result in scores.values() for m in result.get("missing", [])})
        if missing:
            parts.append(
                f"<p class=\"missing\">Not scored, no results submitted: {_e(', '.join(missing))}.</p>"
            )
    else:
        parts.append(
            _missing("no scores.json: the CHAOS score step did not run (or the test set has no ground truth)")
        )
    if paths.get("chaos_zip") and Path(paths["chaos_zip"]).is_file():
        parts.append(f"<p>Submission zip: <code>{_e(paths['chaos_zip'])}</code></p>")
    overlay = assets / "chaos_overlay.png"
    if (
        paths.get("chaos_submission")
        and paths.get("chaos_reference")
        and chaos_overlay(Path(paths["chaos_submission"]), Path(paths["chaos_reference"]), overlay)
    ):
        parts.append(_image(assets, overlay, "CHAOS test slices: ground-truth PNG against the submitted PNG"))
    return "".join(parts)


def build_report(root: str | os.PathLike) -> Path:
    """Write ``root/report.html`` and its PNGs in ``root/report/``; returns the page's path."""
    root = Path(root)
    assets = root / ASSETS_FOLDER
    if assets.is_dir():
        shutil.rmtree(assets)  # pictures of an earlier run must not linger
    assets.mkdir(parents=True)
    steps = (_read_json(root / "steps.json") or {}).get("steps", [])
    settings = _read_json(root / "demo_settings.json") or {}
    paths = settings.get("paths", {})
    status = {s["key"]: s for s in steps}
    not_done = [s for s in steps if s.get("status") != "done" and s.get("key") != "report"]
    summary = f"{len([s for s in steps if s.get('status') == 'done'])} of {len(steps)} steps done" + (
        f"; not done: {', '.join(s['key'] + ' (' + s['status'] + ')' for s in not_done)}" if not_done else ""
    )
    sections = [
        "<h2>1. Commands and wall times</h2>",
        _steps_section(steps),
        "<h3>Time per part: measured and expected</h3>",
        _times_by_part(steps, settings.get("setting", ""), settings.get("device", "cpu")),
        "<h2>2. Pre-training</h2>",
        _pretraining_section(root, paths, assets),
        "<h2>3. Segmentation: pre-trained vs from scratch</h2>",
        _segmentation_section(root, paths, assets),
    ]
    if any(k.startswith("chaos") for k in status) or paths.get("chaos_scores"):
        sections += ["<h2>4. CHAOS: from DICOM to a scored submission</h2>", _chaos_section(paths, assets)]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>PUMIT demo report</title><style>{STYLE}</style></head><body>"
        "<h1>PUMIT demo report</h1>"
        f'<p class="sub">setting <b>{_e(settings.get("setting", "?"))}</b>, device {_e(settings.get("device", "?"))}, '
        f"written {_e(time.strftime('%Y-%m-%d %H:%M:%S'))}; {_e(summary)}</p>"
        "<p>Synthetic phantoms and tiny models: the page shows the method's pipeline working end to end, "
        "not the paper's accuracy (the paper's numbers and how to reproduce them are in docs/benchmarks.md "
        "of the repository). Each section says what it shows and what it cannot. Numbers vary from run to "
        "run (docs/demo.md).</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
    output = root / REPORT_NAME
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    return output


def referenced_files(html_file: Path) -> list[Path]:
    """Every local file the page references (src / href), resolved against its folder."""
    text = html_file.read_text(encoding="utf-8")
    references = re.findall(r'(?:src|href)="([^"#]+)"', text)
    return [
        html_file.parent / html.unescape(r)
        for r in references
        if "://" not in r and not r.startswith("data:")
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write (and check) the pumit_demo HTML report.")
    parser.add_argument("output", help="the demo's output folder")
    parser.add_argument(
        "--check", action="store_true", help="load the page in headless Chromium and check it"
    )
    parser.add_argument(
        "--screenshot",
        nargs="?",
        const="",
        metavar="FILE",
        help=f"with --check: save a full-page screenshot (PNG), by default OUTPUT/{SCREENSHOT_NAME}",
    )
    parser.add_argument("--no_build", action="store_true", help="check the existing page only")
    parser.add_argument("--no-build", dest="no_build", action="store_true", help=argparse.SUPPRESS)  # older spelling
    args = parser.parse_args(argv)
    if not Path(args.output).is_dir():
        parser.error(f"output folder {args.output} does not exist (run pumit_demo first)")
    page = Path(args.output) / REPORT_NAME if args.no_build else build_report(args.output)
    print(f"report: {page}")
    missing = [str(p) for p in referenced_files(page) if not p.is_file()]
    if missing:
        raise SystemExit(f"{page} references missing files: {', '.join(missing)}")
    if args.check:
        screenshot = None
        if args.screenshot is not None:
            screenshot = args.screenshot or str(Path(args.output) / SCREENSHOT_NAME)
        check = check_in_browser(page, screenshot)
        loaded = sum(i["loaded"] for i in check.images)
        print(f"browser: {loaded} of {len(check.images)} images loaded, {len(check.errors)} errors")
        for error in check.errors:
            print(f"   {error}")
        if check.screenshot:
            print(f"screenshot: {check.screenshot}")
        if not check.ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
