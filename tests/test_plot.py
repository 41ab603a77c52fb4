"""plot.py: a run's figures, the data they draw (read back from the figure, not its pixels), redraw and failures."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

import plot
from conftest import assert_png
import train
import utils

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["dokujo-tsushin", "it-life-hack", "kaden-channel", "livedoor-homme", "movie-enter", "peachy", "smax", "sports-watch", "topic-news"]


def copy_run(run_dir: Path, destination: Path) -> Path:
    """A run folder as copied from a cluster: its files, no saved model, no figures."""
    shutil.copytree(run_dir, destination, ignore=shutil.ignore_patterns("model", "*.png"))
    return destination


# --- the figures of a finished run ----------------------------------------------------------


def test_a_finished_run_has_its_figures(finished_run: Path) -> None:
    assert_png(finished_run / "curves.png", min_size=(1200, 500))
    assert_png(finished_run / "test-confusion-matrix.png", min_size=(900, 900))
    assert not list(finished_run.glob(".*"))  # no temporary file left behind


def test_curves_draw_the_log(finished_run: Path) -> None:
    log = pd.read_csv(finished_run / "log.csv")
    best_epoch = utils.load_json(finished_run / "val-metrics.json")["best-epoch"]
    figure = plot.run_figures(finished_run)["curves.png"]
    loss_axes, score_axes = figure.axes
    train_loss, val_loss, kept = loss_axes.lines
    np.testing.assert_array_equal(train_loss.get_xdata(), log["epoch"])
    np.testing.assert_array_equal(train_loss.get_ydata(), log["train_loss"])  # NaN at epoch 0: no point drawn
    assert np.isnan(train_loss.get_ydata()[0])
    np.testing.assert_array_equal(val_loss.get_ydata(), log["loss"])
    accuracy, f1, kept_right = score_axes.lines
    np.testing.assert_allclose(accuracy.get_ydata(), log["accuracy"] * 100)
    np.testing.assert_allclose(f1.get_ydata(), log["f1"] * 100)
    for line in (kept, kept_right):
        assert list(line.get_xdata()) == [best_epoch, best_epoch]
        assert line.get_label() == f"kept epoch ({best_epoch})"
    config = utils.load_json(finished_run / "config.json")
    title = figure.get_suptitle()
    assert title.splitlines()[0] == ".../models0/tiny-bert"  # a local folder: its last parts only
    assert f"lr {config['lr']:g}, seed {config['seed']}, dataset .../" in title


def test_confusion_heatmap_draws_the_matrix_in_percent_of_the_true_category(finished_run: Path) -> None:
    counts = pd.read_csv(finished_run / "test-confusion-matrix.csv", index_col=0)
    figure = plot.run_figures(finished_run)["test-confusion-matrix.png"]
    axes = figure.axes[0]
    drawn = np.asarray(axes.images[0].get_array())
    expected = counts.to_numpy() / counts.to_numpy().sum(axis=1, keepdims=True) * 100
    np.testing.assert_allclose(drawn, expected)
    assert axes.images[0].get_clim() == (0, 100)
    # The counts are written in the cells, row by row, with the percent of the non-zero ones.
    texts = [t.get_text() for t in axes.texts]
    assert [int(t.split("\n")[0]) for t in texts] == counts.to_numpy().ravel().tolist()
    assert texts[0] == f"{counts.iat[0, 0]}\n{expected[0, 0]:.0f}%"
    assert [t.get_text() for t in axes.get_xticklabels()] == CATEGORIES
    assert [t.get_text() for t in axes.get_yticklabels()] == CATEGORIES
    assert f"({counts.to_numpy().sum()} examples)" in figure.get_suptitle()


def test_class_percent_leaves_an_absent_category_at_zero() -> None:
    counts = pd.DataFrame([[3, 1], [0, 0]], index=["a", "b"], columns=["a", "b"])
    np.testing.assert_allclose(plot.class_percent(counts).to_numpy(), [[75, 25], [0, 0]])


def test_run_title_names_model_lr_seed_and_dataset() -> None:
    config = {"model_name": "cl-tohoku/bert-base-japanese-v3", "lr": 3e-5, "seed": 1, "dataset_dir": "datasets/livedoor/folds/3"}
    assert plot.run_title(config) == "cl-tohoku/bert-base-japanese-v3\nlr 3e-05, seed 1, dataset .../livedoor/folds/3"
    assert plot.run_title({"model_name": "x"}) == "x\nlr ?, seed ?, dataset ?"  # an old or hand-written config


@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("cl-tohoku/bert-base-japanese-v3", "cl-tohoku/bert-base-japanese-v3"),
        ("xlm-roberta-large", "xlm-roberta-large"),
        ("/home/me/models/my-bert", ".../models/my-bert"),
        ("datasets/livedoor/folds/3", ".../folds/3"),
    ],
)
def test_short_name(name: str, short: str) -> None:
    assert plot.short_name(name) == short


# --- a plotting failure never loses a run ----------------------------------------------------


def test_a_plotting_failure_does_not_lose_the_run(
    make_train_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(run_dir: Path) -> list[Path]:
        raise RuntimeError("no font\nsecond line of a long message")

    monkeypatch.setattr(plot, "draw_run", broken)
    run_dir = train.main(make_train_args(tmp_path, "--epochs", "1", "--num_warmup_epochs", "0"))
    assert set(utils.load_json(run_dir / "test-metrics.json")) == {"loss", "accuracy", "precision", "recall", "f1"}
    assert not list(run_dir.glob("*.png"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warnings == [
        f"warning: figures not drawn (RuntimeError: no font); redraw them with python src/plot.py --run_dirs {run_dir}"
    ]


# --- redrawing from files alone --------------------------------------------------------------


def test_redraw_a_copied_run_from_its_files(finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = copy_run(finished_run, tmp_path / "from-the-cluster")
    assert not list(copy.glob("*.png"))
    plot.main(plot.Args().parse_args(["--run_dirs", str(copy)]))
    assert capsys.readouterr().out == f"wrote {copy / 'curves.png'}, {copy / 'test-confusion-matrix.png'}\n"
    for name in plot.RUN_FIGURES:
        # The same files give the same figure as the one train.py drew.
        assert (copy / name).read_bytes() == (finished_run / name).read_bytes(), name


def test_redraw_command_reports_each_broken_run_and_fails(finished_run: Path, tmp_path: Path) -> None:
    good = copy_run(finished_run, tmp_path / "good")
    no_log = copy_run(finished_run, tmp_path / "no-log")
    (no_log / "log.csv").unlink()
    no_matrix = copy_run(finished_run, tmp_path / "no-matrix")
    (no_matrix / "test-confusion-matrix.csv").unlink()
    command = [sys.executable, "src/plot.py", "--run_dirs", str(good), str(no_log), str(no_matrix)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"skipped {no_log}: {no_log / 'log.csv'} is missing",
        f"skipped {no_matrix}: {no_matrix / 'test-confusion-matrix.csv'} is missing",
        "error: 2 of 3 finished runs could not be drawn (reasons above)",
    ]
    assert result.stdout == f"wrote {good / 'curves.png'}, {good / 'test-confusion-matrix.png'}\n"
    assert_png(good / "curves.png")
    assert not list(no_log.glob("*.png")) and not list(no_matrix.glob("*.png"))  # all or nothing per run


def test_redraw_after_a_sweep_skips_logs_and_unfinished_runs(finished_run: Path, tmp_path: Path) -> None:
    """outputs/*/*/* also matches the sweep's logs, and a sweep leaves unfinished runs: neither is a failure."""
    outputs = tmp_path / "outputs"
    good = copy_run(finished_run, outputs / "tiny-bert" / "2026-01-01" / "12-00-00.000001")
    unfinished = copy_run(finished_run, outputs / "tiny-bert" / "2026-01-01" / "12-00-01.000002")
    (unfinished / "test-metrics.json").unlink()
    logs = outputs / "sweep-logs" / "2026-01-01_12-00-00"
    (logs / "slurm").mkdir(parents=True)
    (logs / "1_tiny-bert_lr=0.005_seed=42_livedoor.log").write_text("epoch 1\n", encoding="utf-8")
    paths = sorted(outputs.glob("*/*/*"))  # what the shell's outputs/*/*/* gives
    assert len(paths) == 4
    command = [sys.executable, "src/plot.py", "--run_dirs", *map(str, paths)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        "skipped 2 paths that are not run folders (no config.json) and 1 unfinished runs (no test-metrics.json)",
        f"wrote {good / 'curves.png'}, {good / 'test-confusion-matrix.png'}",
    ]
    assert not list(unfinished.glob("*.png"))


def test_redraw_with_no_finished_run_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "sweep-logs").mkdir()
    with pytest.raises(utils.InputError, match=r"^no finished run among the 2 paths given"):
        plot.main(plot.Args().parse_args(["--run_dirs", str(tmp_path / "sweep-logs"), str(tmp_path / "typo")]))


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("log.csv", "epoch,f1\n0,0.1\n", "log.csv: missing column(s) train_loss, loss, accuracy"),
        ("log.csv", "epoch,train_loss,loss,accuracy,f1\n0,,x,0.1,0.1\n", "log.csv: column loss holds something other than numbers"),
        ("test-confusion-matrix.csv", "true \\ predicted,a,b\na,1,0\n", "test-confusion-matrix.csv: expected a square table of counts"),
        ("test-confusion-matrix.csv", "true \\ predicted,a\na,1.5\n", "test-confusion-matrix.csv: expected a square table of counts"),
    ],
)
def test_a_broken_run_file_is_named(finished_run: Path, tmp_path: Path, name: str, text: str, reason: str) -> None:
    copy = copy_run(finished_run, tmp_path / "run")
    (copy / name).write_text(text, encoding="utf-8")
    with pytest.raises(utils.InputError, match="^" + re.escape(f"{copy}/{reason}")):
        plot.draw_run(copy)



# --- category names -------------------------------------------------------------------------

ODD_NAMES = ["0", "1.0", "True", "NA", "null", "nan", "None"]  # pandas would guess numbers, booleans and missing values


def test_names_that_look_like_numbers_or_missing_values_are_names(finished_run: Path, tmp_path: Path) -> None:
    copy = copy_run(finished_run, tmp_path / "run")
    counts = np.eye(len(ODD_NAMES), dtype=int) * 3
    utils.save_csv(["true \\ predicted", *ODD_NAMES], ([name, *row] for name, row in zip(ODD_NAMES, counts.tolist())), copy / "test-confusion-matrix.csv")
    plot.draw_run(copy)  # refused before: the rows 0, 1.0, True were numbers, NA... missing, the columns text
    matrix = plot.read_confusion(copy)
    assert list(matrix.index) == ODD_NAMES and list(matrix.columns) == ODD_NAMES
    axes = plot.run_figures(copy)["test-confusion-matrix.png"].axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ODD_NAMES
    assert [t.get_text() for t in axes.get_yticklabels()] == ODD_NAMES


def draw_png(figure) -> list[str]:
    """Render a figure to PNG bytes in memory; return the messages of the warnings raised while drawing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure.savefig(io.BytesIO(), format="png")
    return [str(w.message) for w in caught]


def test_japanese_names_draw_as_text_with_no_configuration() -> None:
    names = ["スポーツ", "政治・経済", "ＩＴ", "映画"]
    matrix = pd.DataFrame(np.eye(4, dtype=int), index=names, columns=names)
    figure = plot.confusion_figure(matrix, "日本語のタイトル")
    messages = draw_png(figure)
    assert not [m for m in messages if "missing from font" in m], messages  # DejaVu Sans alone: "Glyph 12473 ... missing"
    per_class = pd.DataFrame({"model_name": ["cl-tohoku/bert-base-japanese-v3"], "n_runs": [1], **{n: [0.9] for n in names}})
    assert not [m for m in draw_png(plot.per_class_figure(per_class)) if "missing from font" in m]


def test_latin_names_draw_exactly_as_with_matplotlibs_default_font(tmp_path: Path) -> None:
    """The Japanese font is only a fallback: the livedoor figures are unchanged."""
    matrix = pd.DataFrame([[5, 1], [0, 4]], index=CATEGORIES[:2], columns=CATEGORIES[:2])
    plot.save_png(plot.confusion_figure(matrix, "cl-tohoku/bert-base-japanese-v3"), tmp_path / "fallback.png")
    with matplotlib.rc_context({"font.family": ["sans-serif"]}):  # matplotlib's default
        plot.save_png(plot.confusion_figure(matrix, "cl-tohoku/bert-base-japanese-v3"), tmp_path / "default.png")
    assert (tmp_path / "fallback.png").read_bytes() == (tmp_path / "default.png").read_bytes()


# --- best.png ---------------------------------------------------------------------------------


def test_the_value_of_a_short_bar_is_readable() -> None:
    best = pd.DataFrame({"model_name": ["good", "poor", "poor-spread"], "f1": [0.95, 0.05, 0.10], "f1_std": [np.nan, np.nan, 0.02], "n_runs": [1, 1, 3]})
    axes = plot.best_figure(best).axes[0]
    good, poor, spread = axes.texts
    assert (good.get_position()[0], good.get_color()) == (1, "white")  # inside its bar
    assert (poor.get_position()[0], poor.get_color()) == (pytest.approx(6), "black")  # after the bar, on white
    assert (spread.get_position()[0], spread.get_color()) == (pytest.approx(13), "black")  # after the error bar


# --- a multi-label run ----------------------------------------------------------------------------


def multi_label_run_folder(run_dir: Path) -> Path:
    """The files plot.py reads from a multi-label run (as tests/test_train.py's multi-label run writes them)."""
    run_dir.mkdir(parents=True)
    utils.save_json({"model_name": "m", "lr": 1e-3, "seed": 1, "dataset_dir": "datasets/multi"}, run_dir / "config.json")
    utils.save_json({"best-epoch": 1}, run_dir / "val-metrics.json")
    utils.save_csv(["epoch", "train_loss", "loss", "accuracy", "f1", "micro_f1"], [[0, "nan", 0.7, 0.1, 0.2, 0.3], [1, 0.5, 0.4, 0.6, 0.7, 0.8]], run_dir / "log.csv")
    utils.save_csv(["category", "tp", "fp", "fn", "tn"], [["政治", 8, 2, 2, 28], ["経済", 0, 0, 0, 40], ["group-a", 5, 5, 15, 15]], run_dir / "test-label-counts.csv")
    return run_dir


def test_multi_label_run_draws_counts_per_label(tmp_path: Path) -> None:
    """TP and FN in percent of the examples that have the label (TP% = recall), FP and TN of those that lack it."""
    run_dir = multi_label_run_folder(tmp_path / "run")
    assert [p.name for p in plot.draw_run(run_dir)] == ["curves.png", "test-label-counts.png"]
    assert_png(run_dir / "test-label-counts.png", min_size=(800, 300))
    figure = plot.run_figures(run_dir)["test-label-counts.png"]
    axes = figure.axes[0]
    np.testing.assert_allclose(np.asarray(axes.images[0].get_array()), [[80, 20, 2 / 30 * 100, 28 / 30 * 100], [0, 0, 0, 100], [25, 75, 25, 75]])
    assert [t.get_text() for t in axes.get_yticklabels()] == ["政治", "経済", "group-a"]
    assert [t.get_text().split("\n")[0] for t in axes.get_xticklabels()] == ["TP", "FN", "FP", "TN"]
    assert [t.get_text() for t in axes.texts][:2] == ["8\n80%", "2\n20%"]
    assert "(40 examples)" in figure.get_suptitle()
    _, score_axes = plot.run_figures(run_dir)["curves.png"].axes
    assert score_axes.lines[0].get_label() == "val subset accuracy"


def test_multi_label_counts_must_be_numbers(tmp_path: Path) -> None:
    run_dir = multi_label_run_folder(tmp_path / "run")
    (run_dir / "test-label-counts.csv").write_text("category,tp,fp,fn\na,1,2,3\n", encoding="utf-8")
    with pytest.raises(utils.InputError, match=r"test-label-counts.csv: missing column\(s\) tn"):
        plot.run_figures(run_dir)
