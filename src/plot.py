"""Figures of a run and of results/, drawn from their files only (never by re-running a model).

    poetry run python src/plot.py --run_dirs outputs/*/*/*     # redraw curves.png and test-confusion-matrix.png

Paths that are not run folders (the sweep's logs) and unfinished runs are skipped with a count; the exit
code is 0 when every finished run was drawn.

train.py draws a run's figures when it finishes and aggregate.py draws those of results/, both with
the functions below. This stage redraws a run's figures from its files: for runs made before figures
existed, copied from a cluster, or after a change of style here. It reads config.json, log.csv,
val-metrics.json and test-confusion-matrix.csv. Headless: matplotlib's Agg canvas, no pyplot state.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib_fontja  # noqa: F401 (registers the IPAexGothic font its wheel ships)
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tap import Tap

import utils

RUN_FIGURES = ("curves.png", "test-confusion-matrix.png")  # a multi-label run has test-label-counts.png in place of the confusion matrix
LABEL_COUNTS = ("tp", "fn", "fp", "tn")  # columns of test-label-counts.csv as drawn: the positives, then the negatives
DPI = 150  # sharp enough for slides, small enough for a repository
JAPANESE_FONT = "IPAexGothic"  # the font matplotlib_fontja ships

# matplotlib's default font first, so figures of Latin names are drawn exactly as before; a glyph it lacks
# (Japanese category names) falls back to the Japanese font instead of a box. Set here because
# matplotlib_fontja's import sets IPAexGothic alone, which would change every figure's Latin text.
matplotlib.rcParams["font.family"] = ["sans-serif", JAPANESE_FONT]


class Args(Tap):
    run_dirs: list[Path]  # run folders of train.py whose figures are redrawn (outputs/*/*/* is fine: other folders and unfinished runs are skipped and counted)


# --- reading run files ------------------------------------------------------------------------


def as_numbers(column: pd.Series, kind: type = float) -> pd.Series | None:
    """A column of text cells as numbers of `kind` (float: an empty cell or nan is NaN), or None if a cell is not one."""
    try:
        return column.map(lambda cell: kind(cell) if cell.strip() or kind is not float else np.nan).astype(kind)
    except ValueError:
        return None


def read_table(path: Path, columns: tuple[str, ...], index_col: int | None = None) -> pd.DataFrame:
    """A CSV file of a run with the number columns a figure needs; InputError names the file and what is wrong.

    Every other cell, the index (category names) included, stays the text it is: pandas would read
    the names 0, 1.0 and True as numbers and NA, null, nan and None as missing values.
    """
    if not path.is_file():
        raise utils.InputError(f"{path} is missing")
    try:
        table = pd.read_csv(path, encoding="utf-8", index_col=index_col, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise utils.InputError(f"{path}: not a readable CSV file ({utils.first_line(e)})") from None
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise utils.InputError(f"{path}: missing column(s) {', '.join(missing)}")
    for column in columns:
        numbers = as_numbers(table[column])
        if numbers is None:
            raise utils.InputError(f"{path}: column {column} holds something other than numbers")
        table[column] = numbers
    return table


def read_log(run_dir: Path, columns: tuple[str, ...] = ("epoch", "train_loss", "loss", "accuracy", "f1")) -> pd.DataFrame:
    """log.csv: a row per evaluation (epoch 0 is the model before training; its train_loss is empty)."""
    return read_table(run_dir / "log.csv", columns)[list(columns)]


def read_confusion(run_dir: Path) -> pd.DataFrame:
    """test-confusion-matrix.csv: counts, rows the true category, columns the predicted one."""
    path = run_dir / "test-confusion-matrix.csv"
    matrix = read_table(path, (), index_col=0)
    counts = [as_numbers(matrix[column], int) for column in matrix.columns]
    if list(matrix.index) != list(matrix.columns) or any(c is None for c in counts):
        raise utils.InputError(f"{path}: expected a square table of counts with the same categories as rows and columns")
    return pd.DataFrame(dict(zip(matrix.columns, counts)), index=matrix.index)


def read_label_counts(run_dir: Path) -> pd.DataFrame:
    """test-label-counts.csv (multi-label runs): per category, the test examples counted as TP, FP, FN, TN."""
    table = read_table(run_dir / "test-label-counts.csv", LABEL_COUNTS, index_col=0)
    return table[list(LABEL_COUNTS)].astype(int)


def class_percent(matrix: pd.DataFrame) -> pd.DataFrame:
    """Each row (true category) in percent of its total; a category absent from the test set stays 0."""
    totals = matrix.sum(axis=1).to_numpy(dtype=float)[:, None]
    percent = np.divide(matrix.to_numpy(dtype=float) * 100, totals, out=np.zeros(matrix.shape), where=totals > 0)
    return pd.DataFrame(percent, index=matrix.index, columns=matrix.columns)


def short_name(name: str, keep: int = 2) -> str:
    """A model name or dataset path for a title: its last `keep` parts (hub ids owner/name stay whole)."""
    parts = Path(name).parts
    return name if len(parts) <= keep else ".../" + "/".join(parts[-keep:])


def run_title(config: dict[str, Any]) -> str:
    """Two title lines naming what a run was: model; lr, seed and dataset (a field an old run lacks shows as ?)."""
    lr = config.get("lr")
    lr_text = f"{lr:g}" if isinstance(lr, (int, float)) else "?"
    dataset = short_name(str(config.get("dataset_dir", "?")), keep=3)  # .../livedoor/folds/3
    return f"{short_name(str(config.get('model_name', '?')))}\nlr {lr_text}, seed {config.get('seed', '?')}, dataset {dataset}"


# --- figures ----------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas; constrained layout keeps labels, legends and colour bars apart."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: Path, dpi: int = DPI) -> None:
    with utils.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)


def curves_figure(log: pd.DataFrame, best_epoch: int, title: str, multi_label: bool = False) -> Figure:
    """Losses (left) and val accuracy / macro-F1 in percent (right) by epoch; the kept epoch marked on both."""
    figure = new_figure(10, 4.2)
    loss_axes, score_axes = figure.subplots(1, 2)
    epochs = log["epoch"].to_numpy()
    loss_axes.plot(epochs, log["train_loss"], marker="o", markersize=3, label="train loss")
    loss_axes.plot(epochs, log["loss"], marker="o", markersize=3, label="val loss")
    loss_axes.set_ylabel(f"loss ({'binary ' if multi_label else ''}cross-entropy per example)")
    score_axes.plot(epochs, log["accuracy"] * 100, marker="o", markersize=3, label="val subset accuracy" if multi_label else "val accuracy")
    score_axes.plot(epochs, log["f1"] * 100, marker="o", markersize=3, label="val macro-F1")
    score_axes.set_ylabel("val score (%)")
    for axes in (loss_axes, score_axes):
        axes.axvline(best_epoch, color="gray", linestyle="--", linewidth=1, label=f"kept epoch ({best_epoch})")
        axes.set_xlabel("epoch (0: before training)")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        # Below the plot: a legend inside would cover the curves of some runs.
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, fontsize="small", frameon=False)
    figure.suptitle(title)
    return figure


def confusion_figure(matrix: pd.DataFrame, title: str) -> Figure:
    """Heatmap of the confusion matrix: colour = percent of the true category, cells = counts (and percent)."""
    percent = class_percent(matrix)
    size = len(matrix)
    figure = new_figure(2.5 + 0.75 * size, 1.8 + 0.7 * size)
    axes = figure.subplots()
    image = axes.imshow(percent.to_numpy(), cmap="Blues", vmin=0, vmax=100)
    for (row, column), count in np.ndenumerate(matrix.to_numpy()):
        share = percent.iat[row, column]
        if count:
            axes.text(column, row, f"{count}\n{share:.0f}%", ha="center", va="center", fontsize=8, color="white" if share > 55 else "black")
        else:  # faint: the eye goes to the errors
            axes.text(column, row, "0", ha="center", va="center", fontsize=8, color="0.7")
    names = list(matrix.columns)
    axes.set_xticks(range(size), names, rotation=40, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(size), names)
    axes.set_xlabel("predicted category")
    axes.set_ylabel("true category")
    figure.colorbar(image, ax=axes, shrink=0.8, label="% of the true category")
    figure.suptitle(f"{title}\ntest confusion matrix ({int(matrix.to_numpy().sum())} examples)")
    return figure


def label_counts_figure(counts: pd.DataFrame, title: str) -> Figure:
    """Multi-label: a row per category with its TP, FN (of the examples that have it) and FP, TN (of those
    that do not). Colour = percent of that group, as the confusion matrix's rows: TP% is the recall,
    FP% the false-positive rate; cells = counts (and percent). Precision and F1 are in test-per-class.csv.
    """
    values = counts.to_numpy()
    positives, negatives = values[:, :2].sum(1, keepdims=True), values[:, 2:].sum(1, keepdims=True)
    totals = np.hstack([positives, positives, negatives, negatives]).astype(float)
    percent = np.divide(values * 100.0, totals, out=np.zeros(values.shape), where=totals > 0)
    figure = new_figure(6.5, 1.8 + 0.45 * len(counts))
    axes = figure.subplots()
    image = axes.imshow(percent, cmap="Blues", vmin=0, vmax=100, aspect="auto")
    for (row, column), count in np.ndenumerate(values):
        share = percent[row, column]
        if count:
            axes.text(column, row, f"{count}\n{share:.0f}%", ha="center", va="center", fontsize=8, color="white" if share > 55 else "black")
        else:  # faint, as in the confusion matrix
            axes.text(column, row, "0", ha="center", va="center", fontsize=8, color="0.7")
    axes.set_xticks(range(4), ["TP\n(has it, predicted)", "FN\n(has it, missed)", "FP\n(lacks it, predicted)", "TN\n(lacks it, not predicted)"], fontsize=8)
    axes.set_yticks(range(len(counts)), list(counts.index))
    axes.set_ylabel("category")
    figure.colorbar(image, ax=axes, shrink=0.8, label="% of the examples that have (TP, FN) or lack (FP, TN) the category")
    figure.suptitle(f"{title}\ntest counts per category, multi-label ({int(positives[0, 0] + negatives[0, 0]) if len(counts) else 0} examples)")
    return figure


def best_figure(best: pd.DataFrame) -> Figure:
    """A horizontal bar per model: mean test macro-F1 (%) with ± std error bars where n_runs > 1.

    The axis runs from 0 to 100 so that bar lengths compare honestly; the value labels carry the
    fine differences that such an axis cannot show.
    """
    f1 = best["f1"].to_numpy(dtype=float) * 100
    n_runs = best["n_runs"].to_numpy()
    std = np.where(n_runs > 1, best["f1_std"].to_numpy(dtype=float) * 100, 0.0)  # std is NaN for one run
    y = np.arange(len(best))
    figure = new_figure(9, 1.3 + 0.42 * len(best))
    axes = figure.subplots()
    bars = axes.barh(y, f1, color="tab:blue")
    axes.errorbar(f1[n_runs > 1], y[n_runs > 1], xerr=std[n_runs > 1], fmt="none", ecolor="black", capsize=3)
    labels = []
    for i in y:
        label = f"{f1[i]:.2f}" + (f" ± {std[i]:.2f}" if n_runs[i] > 1 else "") + f"  (n={n_runs[i]})"
        # At the base of the bar: never under an error bar, never past the axis.
        labels.append(axes.text(1, i, label, va="center", ha="left", color="white", fontsize=9, fontweight="bold"))
    axes.set_yticks(y, [short_name(name) for name in best["model_name"]])
    axes.invert_yaxis()  # best model on top, as in best.csv
    axes.set_xlim(0, 100)
    axes.set_xlabel("test macro-F1 (%), mean ± std over runs")
    axes.grid(axis="x", alpha=0.3)
    axes.set_title("best setting per model (by mean val macro-F1)")
    # A label longer than its bar would be white on white: it goes in black after the bar (and its error bar).
    figure.draw_without_rendering()  # lays the figure out, so that sizes on the canvas are known
    renderer = figure.canvas.get_renderer()
    for label, bar, end in zip(labels, bars, f1 + std):
        if label.get_window_extent(renderer).x1 > bar.get_window_extent(renderer).x1:
            label.set(x=end + 1, color="black")
    return figure


def model_curves_figure(curves: pd.DataFrame) -> Figure:
    """Val macro-F1 (%) by epoch, a line per model (mean over runs) with a ±std band where n_runs > 1.

    `curves` has a row per model and epoch: model_name, epoch, f1, f1_std, n_runs.
    """
    models = list(dict.fromkeys(curves["model_name"]))
    figure = new_figure(11, 5)
    axes = figure.subplots()
    colours = colormaps["tab10" if len(models) <= 10 else "tab20"].colors  # distinct colours for up to 20 models
    for i, model in enumerate(models):
        rows = curves[curves["model_name"] == model]
        epochs, mean, std = rows["epoch"].to_numpy(), rows["f1"].to_numpy() * 100, rows["f1_std"].to_numpy() * 100
        colour = colours[i % len(colours)]
        axes.plot(epochs, mean, marker="o", markersize=3, color=colour, label=f"{short_name(model)} (n={rows['n_runs'].max()})")
        band = rows["n_runs"].to_numpy() > 1
        if band.any():
            axes.fill_between(epochs[band], (mean - std)[band], (mean + std)[band], color=colour, alpha=0.2, linewidth=0)
    axes.set_xlabel("epoch (0: before training)")
    axes.set_ylabel("val macro-F1 (%)")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.set_title("val macro-F1 by epoch: best setting per model, mean ± std over runs")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)  # beside the data, not on it
    return figure


def per_class_figure(per_class: pd.DataFrame) -> Figure:
    """Heatmap models x categories of mean test F1 (%), the value in each cell.

    `per_class` has a row per model: model_name, n_runs, then one column per category (F1, 0-1).
    The colour scale starts at the lowest tens below the data and its bar says where.
    """
    scores = per_class.drop(columns=["model_name", "n_runs"]).astype(float) * 100
    low = float(np.floor(np.nanmin(scores.to_numpy()) / 10) * 10) if scores.notna().any().any() else 0.0
    labels = [f"{short_name(m)} (n={n})" for m, n in zip(per_class["model_name"], per_class["n_runs"])]
    label_width = 0.08 * max(map(len, labels))  # inches of the model names beside the heatmap
    figure = new_figure(max(7.0, 2.0 + label_width + 0.85 * scores.shape[1]), max(3.5, 2.2 + 0.45 * len(scores)))
    axes = figure.subplots()
    image = axes.imshow(scores.to_numpy(), cmap="viridis", vmin=min(low, 90.0), vmax=100, aspect="auto")
    middle = (min(low, 90.0) + 100) / 2
    for (row, column), value in np.ndenumerate(scores.to_numpy()):
        text = "-" if np.isnan(value) else f"{value:.1f}"
        axes.text(column, row, text, ha="center", va="center", fontsize=8, color="black" if value > middle else "white")
    axes.set_xticks(range(scores.shape[1]), list(scores.columns), rotation=40, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(len(scores)), labels)
    figure.colorbar(image, ax=axes, label="test F1 (%)")
    figure.suptitle("test F1 per category\nbest setting per model, mean over runs")
    return figure


# --- a run ------------------------------------------------------------------------------------


def run_figures(run_dir: Path) -> dict[str, Figure]:
    """The figures of a run folder, by file name, drawn from its files."""
    config = utils.load_json(run_dir / "config.json")
    best_epoch = utils.load_json(run_dir / "val-metrics.json").get("best-epoch")
    if not isinstance(best_epoch, int):
        raise utils.InputError(f"{run_dir / 'val-metrics.json'}: best-epoch is {best_epoch!r}, expected an integer")
    title = run_title(config)
    if (run_dir / "test-label-counts.csv").is_file():  # a multi-label run
        return {
            "curves.png": curves_figure(read_log(run_dir), best_epoch, title, multi_label=True),
            "test-label-counts.png": label_counts_figure(read_label_counts(run_dir), title),
        }
    return {
        "curves.png": curves_figure(read_log(run_dir), best_epoch, title),
        "test-confusion-matrix.png": confusion_figure(read_confusion(run_dir), title),
    }


def draw_run(run_dir: Path) -> list[Path]:
    """Draw a run's figures into its folder (each file atomically); return their paths."""
    for name in ("config.json", "val-metrics.json"):
        if not (run_dir / name).is_file():
            raise utils.InputError(f"{run_dir / name} is missing")
    figures = run_figures(run_dir)  # all drawn before any is written
    for name, figure in figures.items():
        save_png(figure, run_dir / name)
    return [run_dir / name for name in figures]


def sort_paths(paths: list[Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """(finished runs, unfinished runs, paths that are no run folder) of `paths`, each in the given order.

    A glob such as outputs/*/*/* also matches the sweep's log folders: a run folder holds config.json
    (train.py writes it first) and is finished once it holds test-metrics.json (written last).
    """
    runs = [path for path in paths if (path / "config.json").is_file()]
    finished = [run for run in runs if utils.is_finished(run)]
    unfinished = [run for run in runs if run not in finished]
    return finished, unfinished, [path for path in paths if path not in runs]


def main(args: Args) -> None:
    finished, unfinished, not_runs = sort_paths(args.run_dirs)
    if not_runs or unfinished:
        print(f"skipped {len(not_runs)} paths that are not run folders (no config.json) and {len(unfinished)} unfinished runs (no test-metrics.json)")
    if not finished:
        raise utils.InputError(f"no finished run among the {len(args.run_dirs)} paths given; run folders look like outputs/<model>/<date>/<time>")
    failed = 0
    for run_dir in finished:
        try:
            paths = draw_run(run_dir)
        except utils.InputError as e:
            print(f"skipped {run_dir}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"wrote {', '.join(str(p) for p in paths)}")
    if failed:
        raise utils.InputError(f"{failed} of {len(finished)} finished runs could not be drawn (reasons above)")


if __name__ == "__main__":
    utils.run_cli(main, Args().parse_args())
