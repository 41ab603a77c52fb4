"""aggregate.py on hand-made run folders: grouping, best setting by mean val F1, tables, plot, errors."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import aggregate
import plot
import utils
from conftest import assert_png

REPO = Path(__file__).resolve().parents[1]

BERT = "cl-tohoku/bert-base-japanese-v3"
LUKE = "studio-ousia/luke-japanese-base-lite"
LOCAL = "./models/tiny-bert"  # a local folder model: never linked
NUM_PARAMS = {BERT: 111_207_177, LUKE: 133_864_265, LOCAL: 1_234_567}

# (model, lr) -> per repetition: (val F1, test accuracy, precision, recall, f1).
# BERT: the single best val run (0.99) has lr 1e-5, but the best MEAN is lr 3e-5.
# LUKE: lr 3e-5 and 5e-5 tie exactly on mean val F1 (binary fractions): the lower lr wins.
# LOCAL: repeated over two folds of one seed instead of two seeds.
RESULTS = {
    (BERT, 1e-5): [(0.99, 0.90, 0.91, 0.92, 0.93), (0.80, 0.91, 0.92, 0.93, 0.94)],
    (BERT, 3e-5): [(0.95, 0.961, 0.955, 0.952, 0.96), (0.94, 0.951, 0.945, 0.948, 0.95)],
    (BERT, 5e-5): [(0.90, 0.99, 0.99, 0.99, 0.99), (0.91, 0.99, 0.99, 0.99, 0.99)],
    (LUKE, 1e-5): [(0.5, 0.99, 0.99, 0.99, 0.99), (0.5, 0.99, 0.99, 0.99, 0.99)],
    (LUKE, 3e-5): [(0.875, 0.98, 0.975, 0.97, 0.972), (0.625, 0.97, 0.965, 0.96, 0.968)],
    (LUKE, 5e-5): [(0.75, 0.50, 0.50, 0.50, 0.50), (0.75, 0.50, 0.50, 0.50, 0.50)],
    (LOCAL, 1e-5): [(0.70, 0.80, 0.80, 0.80, 0.80), (0.70, 0.80, 0.80, 0.80, 0.80)],
    (LOCAL, 3e-5): [(0.96, 0.962, 0.958, 0.957, 0.961), (0.95, 0.958, 0.950, 0.951, 0.957)],
    (LOCAL, 5e-5): [(0.60, 0.99, 0.99, 0.99, 0.99), (0.60, 0.99, 0.99, 0.99, 0.99)],
}
BEST_LR = {BERT: 3e-5, LUKE: 3e-5, LOCAL: 3e-5}
CATEGORIES = ["sports-watch", "dokujo-tsushin", "it-life-hack"]  # the runs' order, not alphabetical
CATEGORY_OFFSETS = [0.01, -0.02, 0.005]
ALL_COLUMNS = [
    "model_name", "lr", "seed", "dataset", "best-val-epoch", "best-val-f1",
    "loss", "accuracy", "precision", "recall", "f1", "num_params", "num_encoder_params", "run_dir",
]  # fmt: skip


def make_run(
    root: Path,
    model_name: str,
    lr: float,
    seed: int,
    dataset_dir: str = "datasets/livedoor",
    scores: tuple[float, float, float, float, float] = (0.9, 0.9, 0.9, 0.9, 0.9),
    finished: bool = True,
    **overrides: object,
) -> Path:
    """A run folder as train.py writes it; `scores` are (val F1, test accuracy, precision, recall, f1)."""
    run_id = len(list(root.glob("*/*/*")))  # runs made so far under root: unique folder names
    run_dir = root / model_name.replace("/", "__") / "2025-01-01" / f"12-00-00.{run_id:06d}"
    run_dir.mkdir(parents=True)
    config = {
        "model_name": model_name,
        "dataset_dir": dataset_dir,
        "output_root": str(root),
        "batch_size": 16,
        # Execution fields differ between repetitions: they must not split a setting.
        "eval_batch_size": 32 + run_id % 2,
        "epochs": 20,
        "lr": lr,
        "num_warmup_epochs": 2,
        "max_seq_len": 512,
        "weight_decay": 0.01,
        "gradient_accumulation_steps": 1,
        "max_grad_norm": 1.0,
        "gradient_checkpointing": False,
        "device": ["cuda", "cpu"][run_id % 2],
        "dtype": "auto",
        "compile": bool(run_id % 2),
        "num_workers": run_id % 3,
        "seed": seed,
        "save_model": bool(run_id % 2),
        "num_params": NUM_PARAMS.get(model_name, 1000),
        "num_labels": 9,
        # As train.py wrote it on another machine: aggregate must report where the run is now.
        "run_dir": f"/cluster/{run_dir.relative_to(root.parent)}",
        "environment": {"torch": "2.9.0", "device_name": f"GPU {run_id}", "git_commit": "abc", "world_size": 1},
        **overrides,
    }
    utils.save_json(config, run_dir / "config.json")
    utils.save_json({"epoch": 1}, run_dir / "model" / "config.json")  # a saved model's config: not a run
    val_f1, accuracy, precision, recall, f1 = scores
    # Val F1 by epoch rises to the run's best at epoch 3; test F1 by category spreads around its F1.
    log = "".join(f"{epoch},{1.0 - epoch / 10},{val_f1 * epoch / 3}\n" for epoch in range(4))
    (run_dir / "log.csv").write_text("epoch,loss,f1\n" + log, encoding="utf-8")
    per_class = [(category, f1 + offset) for category, offset in zip(CATEGORIES, CATEGORY_OFFSETS)]
    utils.save_csv(["category", "f1", "support"], ([c, v, 10] for c, v in per_class), run_dir / "test-per-class.csv")
    val_metrics = {"best-epoch": 3, "loss": 0.2, **{m: val_f1 for m in ["accuracy", "precision", "recall", "f1"]}}
    utils.save_json(val_metrics, run_dir / "val-metrics.json")
    if finished:
        test_metrics = {"loss": 0.1 + lr, "accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}
        utils.save_json(test_metrics, run_dir / "test-metrics.json")
    return run_dir


def make_grid(root: Path) -> None:
    """The 18 finished runs of RESULTS: 3 models x 3 lrs x 2 repetitions."""
    for (model_name, lr), repetitions in RESULTS.items():
        for i, values in enumerate(repetitions):
            if model_name == LOCAL:
                make_run(root, model_name, lr, seed=42, dataset_dir=f"datasets/livedoor/folds/{i}", scores=values)
            else:
                make_run(root, model_name, lr, seed=i + 1, scores=values)


def run_aggregate(input_dir: Path, output_dir: Path) -> None:
    aggregate.main(aggregate.Args().parse_args(["--input_dir", str(input_dir), "--output_dir", str(output_dir)]))


@pytest.fixture
def results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str, str, Path, Path]:
    """The grid plus one unfinished and one corrupt run, aggregated; returns (results dir, stdout, stderr, ...)."""
    outputs = tmp_path / "outputs"
    make_grid(outputs)
    unfinished = make_run(outputs, BERT, 3e-5, seed=3, finished=False)
    corrupt = make_run(outputs, LUKE, 3e-5, seed=3)
    (corrupt / "val-metrics.json").write_text('{"best-epoch": 3, "f1": ', encoding="utf-8")
    run_aggregate(outputs, tmp_path / "results")
    out, err = capsys.readouterr()
    return tmp_path / "results", out, err, unfinished, corrupt


def expected(model_name: str, column: int) -> tuple[float, float]:
    """Mean and sample std (ddof=1) over the repetitions of the model's best lr."""
    values = [run[column] for run in RESULTS[(model_name, BEST_LR[model_name])]]
    return statistics.mean(values), statistics.stdev(values)


def test_all_csv_has_one_row_per_finished_run(results: tuple) -> None:
    results_dir, *_ = results
    all_runs = pd.read_csv(results_dir / "all.csv")
    assert list(all_runs.columns) == ALL_COLUMNS  # nothing but lr varies: no extra columns
    assert len(all_runs) == 18
    keys = ["model_name", "lr", "dataset", "seed"]
    assert all_runs[keys].values.tolist() == all_runs.sort_values(keys)[keys].values.tolist()
    assert sorted(set(all_runs["model_name"])) == sorted([BERT, LUKE, LOCAL])
    local = all_runs[all_runs["model_name"] == LOCAL]
    assert set(local["dataset"]) == {"datasets/livedoor/folds/0", "datasets/livedoor/folds/1"}
    assert set(local["seed"]) == {42}
    for run_dir in all_runs["run_dir"]:
        assert (Path(run_dir) / "test-metrics.json").is_file()
    row = all_runs[(all_runs["model_name"] == BERT) & (all_runs["lr"] == 1e-5) & (all_runs["seed"] == 1)].iloc[0]
    assert row["best-val-f1"] == pytest.approx(0.99)
    assert row["best-val-epoch"] == 3
    assert row["f1"] == pytest.approx(0.93)
    assert row["num_params"] == NUM_PARAMS[BERT]


def test_best_csv_picks_best_mean_val_f1_and_reports_mean_std(results: tuple) -> None:
    results_dir, *_ = results
    best = pd.read_csv(results_dir / "best.csv")
    assert list(best.columns) == [
        "model_name", "lr", "num_params", "num_encoder_params", "n_runs", "best-val-f1", "loss",
        "accuracy", "accuracy_std", "precision", "precision_std",
        "recall", "recall_std", "f1", "f1_std",
    ]  # fmt: skip
    # Sorted by mean test F1, descending (neither alphabetical nor the order of the folders).
    assert list(best["model_name"]) == [LUKE, LOCAL, BERT]
    assert list(best["f1"]) == sorted(best["f1"], reverse=True)
    for row in best.to_dict("records"):
        model_name = row["model_name"]
        assert row["lr"] == BEST_LR[model_name], model_name  # by mean val F1, not the best single run
        assert row["n_runs"] == 2  # device, num_workers, compile, ... differ but do not split settings
        assert row["num_params"] == NUM_PARAMS[model_name]
        assert row["best-val-f1"] == pytest.approx(expected(model_name, 0)[0])
        assert row["loss"] == pytest.approx(0.1 + BEST_LR[model_name])
        for column, score in enumerate(["accuracy", "precision", "recall", "f1"], start=1):
            mean, std = expected(model_name, column)
            assert row[score] == pytest.approx(mean), (model_name, score)
            assert row[f"{score}_std"] == pytest.approx(std), (model_name, score)


def test_best_md_is_the_reference_table(results: tuple) -> None:
    results_dir, out, *_ = results
    table = (results_dir / "best.md").read_text(encoding="utf-8")
    assert table == (
        "| Model | Params | LR | Accuracy | Precision | Recall | F1 | n |\n"
        "| ----- | -----: | -: | :------: | :-------: | :----: | :-: | -: |\n"
        f"| [{LUKE}](https://huggingface.co/{LUKE}) | 133 M | 3e-05 | 97.50 ± 0.71 | 97.00 ± 0.71 "
        "| 96.50 ± 0.71 | **97.00** ± 0.28 | 2 |\n"
        f"| {LOCAL} | 1.2 M | 3e-05 | 96.00 ± 0.28 | 95.40 ± 0.57 | 95.40 ± 0.42 | 95.90 ± 0.28 | 2 |\n"
        f"| [{BERT}](https://huggingface.co/{BERT}) | 111 M | 3e-05 | 95.60 ± 0.71 | 95.00 ± 0.71 "
        "| 95.00 ± 0.28 | 95.50 ± 0.71 | 2 |\n"
    )
    assert table in out  # the summary prints the table


def test_results_figures_are_pngs(results: tuple) -> None:
    results_dir, *_ = results
    for name in ("best.png", "curves.png", "per-class.png"):
        assert_png(results_dir / name)


def test_per_class_csv_is_the_mean_over_the_best_settings_runs(results: tuple) -> None:
    results_dir, *_ = results
    per_class = pd.read_csv(results_dir / "per-class.csv")
    assert list(per_class.columns) == ["model_name", "n_runs", *CATEGORIES]
    assert list(per_class["model_name"]) == [LUKE, LOCAL, BERT]  # best.csv's order
    for row in per_class.to_dict("records"):
        assert row["n_runs"] == 2
        test_f1 = expected(row["model_name"], 4)[0]
        for category, offset in zip(CATEGORIES, CATEGORY_OFFSETS):
            assert row[category] == pytest.approx(test_f1 + offset), (row["model_name"], category)


def spy_on_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[pd.DataFrame, object]]:
    """Record the table each results figure of plot.py is drawn from, and the figure itself, by function name."""
    drawn: dict[str, tuple[pd.DataFrame, object]] = {}
    for name in ("best_figure", "model_curves_figure", "per_class_figure"):
        def spy(table: pd.DataFrame, draw=getattr(plot, name), name: str = name) -> object:
            drawn[name] = (table.copy(), draw(table))
            return drawn[name][1]

        monkeypatch.setattr(plot, name, spy)
    return drawn


def test_figures_draw_the_best_settings_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = spy_on_figures(monkeypatch)
    make_grid(tmp_path / "outputs")
    run_aggregate(tmp_path / "outputs", tmp_path / "results")
    models = [LUKE, LOCAL, BERT]

    # curves.png: mean and std (ddof=1) of val F1 by epoch over the 2 runs of each best setting.
    curves, figure = drawn["model_curves_figure"]
    assert list(dict.fromkeys(curves["model_name"])) == models
    axes = figure.axes[0]
    for model, line in zip(models, axes.lines):
        rows = curves[curves["model_name"] == model]
        assert list(rows["epoch"]) == [0, 1, 2, 3]
        assert list(rows["n_runs"]) == [2, 2, 2, 2]
        val_f1 = [run[0] for run in RESULTS[(model, BEST_LR[model])]]
        for epoch, mean, std in rows[["epoch", "f1", "f1_std"]].itertuples(index=False):
            assert mean == pytest.approx(statistics.mean(v * epoch / 3 for v in val_f1))
            assert std == pytest.approx(statistics.stdev(v * epoch / 3 for v in val_f1))
        np.testing.assert_allclose(line.get_ydata(), rows["f1"] * 100)
        assert line.get_label() == f"{model} (n=2)"
    assert len(axes.collections) == 3  # a ±std band per model

    # per-class.png: the table written to per-class.csv, in percent.
    per_class, figure = drawn["per_class_figure"]
    pd.testing.assert_frame_equal(per_class, pd.read_csv(tmp_path / "results" / "per-class.csv"), check_dtype=False)
    np.testing.assert_allclose(figure.axes[0].images[0].get_array(), per_class[CATEGORIES].to_numpy() * 100)
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == CATEGORIES

    # best.png: bars from 0 on a 0-100 axis, each with its value, std and number of runs.
    best, figure = drawn["best_figure"]
    axes = figure.axes[0]
    assert axes.get_xlim() == (0, 100)
    assert [bar.get_x() for bar in axes.patches] == [0, 0, 0]
    np.testing.assert_allclose([bar.get_width() for bar in axes.patches], best["f1"] * 100)
    assert [t.get_text() for t in axes.texts] == ["97.00 ± 0.28  (n=2)", "95.90 ± 0.28  (n=2)", "95.50 ± 0.71  (n=2)"]
    (error_bars,) = axes.containers[1:]
    whiskers = error_bars.lines[2][0].get_segments()
    np.testing.assert_allclose([segment[:, 0] for segment in whiskers], [[96.72, 97.28], [95.62, 96.18], [94.79, 96.21]], atol=0.01)


def test_a_single_run_has_no_band_and_no_error_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = spy_on_figures(monkeypatch)
    make_run(tmp_path / "outputs", BERT, 3e-5, seed=1, scores=(0.6, 0.6348, 0.6, 0.6, 0.6348))
    run_aggregate(tmp_path / "outputs", tmp_path / "results")
    curves, figure = drawn["model_curves_figure"]
    assert curves["f1_std"].isna().all() and not figure.axes[0].collections
    _, figure = drawn["best_figure"]
    axes = figure.axes[0]
    # The reference's single model at 63.48 on a 0-100 axis, not a 62-65 one.
    assert axes.get_xlim() == (0, 100)
    assert [t.get_text() for t in axes.texts] == ["63.48  (n=1)"]
    (error_bars,) = axes.containers[1:]
    assert not error_bars.lines[2][0].get_segments()


def test_runs_without_figure_files_are_left_out_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs, results_dir = tmp_path / "outputs", tmp_path / "results"
    old = make_run(outputs, BERT, 3e-5, seed=1)
    new = make_run(outputs, BERT, 3e-5, seed=2)
    (old / "test-per-class.csv").unlink()  # made before train.py wrote the per-class report
    (new / "log.csv").write_text("epoch,loss\n0,1.0\n", encoding="utf-8")
    run_aggregate(outputs, results_dir)
    _, err = capsys.readouterr()
    assert err.splitlines() == [
        f"left out of per-class.csv: {old / 'test-per-class.csv'} is missing",
        f"left out of curves.png: {new / 'log.csv'}: missing column(s) f1",
    ]
    assert pd.read_csv(results_dir / "per-class.csv")["n_runs"].tolist() == [1]

    (new / "test-per-class.csv").unlink()
    (old / "log.csv").unlink()
    shutil.rmtree(results_dir)
    run_aggregate(outputs, results_dir)
    out, _ = capsys.readouterr()
    assert "no readable log.csv in the best settings' runs: curves.png not written" in out
    assert "no readable test-per-class.csv in the best settings' runs: per-class.csv and per-class.png not written" in out
    assert sorted(p.name for p in results_dir.iterdir()) == ["all.csv", "best.csv", "best.md", "best.png"]


def test_unfinished_and_corrupt_runs_are_skipped_and_reported(results: tuple) -> None:
    results_dir, out, err, unfinished, corrupt = results
    assert "read 18 finished runs" in out
    assert "skipped 1 unfinished, 1 unreadable" in out
    assert f"skipped {corrupt}: val-metrics.json: line 1: not valid JSON" in err
    assert str(unfinished) not in err
    run_dirs = set(pd.read_csv(results_dir / "all.csv")["run_dir"])
    assert str(unfinished) not in run_dirs and str(corrupt) not in run_dirs
    assert not list(results_dir.glob(".*"))  # no temporary files left behind


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        (lambda d: (d / "val-metrics.json").unlink(), "val-metrics.json is missing"),
        (lambda d: utils.save_json({"f1": 0.9}, d / "test-metrics.json"), "test-metrics.json: missing loss, accuracy"),
        (lambda d: utils.save_json([1, 2], d / "val-metrics.json"), "val-metrics.json: expected a JSON object"),
        (lambda d: _edit_config(d, num_params="111M"), "config.json: num_params is '111M', expected int"),
        (lambda d: _edit_config(d, model_name=None), "config.json: model_name is None"),
    ],
)
def test_each_kind_of_corrupt_run_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], breakage, reason: str
) -> None:
    good = make_run(tmp_path / "outputs", BERT, 3e-5, seed=1)
    bad = make_run(tmp_path / "outputs", BERT, 3e-5, seed=2)
    breakage(bad)
    run_aggregate(tmp_path / "outputs", tmp_path / "results")
    out, err = capsys.readouterr()
    assert f"skipped {bad}: {reason}" in err
    assert "read 1 finished runs" in out and "0 unfinished, 1 unreadable" in out
    assert list(pd.read_csv(tmp_path / "results" / "all.csv")["run_dir"]) == [str(good)]


def _edit_config(run_dir: Path, **changes: object) -> None:
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    utils.save_json({**config, **changes}, run_dir / "config.json")


def test_other_varying_hyperparameter_splits_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = tmp_path / "outputs"
    make_grid(outputs)
    # Same model and lr as BERT's best-mean setting, but batch 32: a setting of its own, and the best one.
    make_run(outputs, BERT, 3e-5, seed=1, scores=(0.99, 0.97, 0.97, 0.97, 0.97), batch_size=32)
    make_run(outputs, BERT, 3e-5, seed=2, scores=(0.97, 0.96, 0.96, 0.96, 0.96), batch_size=32)
    run_aggregate(outputs, tmp_path / "results")
    out, _ = capsys.readouterr()
    assert "settings differ in: lr, batch_size (beyond model_name)" in out

    all_runs = pd.read_csv(tmp_path / "results" / "all.csv")
    assert list(all_runs.columns) == [*ALL_COLUMNS[:2], "batch_size", *ALL_COLUMNS[2:]]
    assert len(all_runs) == 20
    assert all_runs["batch_size"].value_counts().to_dict() == {16: 18, 32: 2}

    best = pd.read_csv(tmp_path / "results" / "best.csv").set_index("model_name")
    assert list(best.columns[:2]) == ["lr", "batch_size"]
    assert best.loc[BERT, "lr"] == 3e-5
    assert best.loc[BERT, "batch_size"] == 32
    assert best.loc[BERT, "n_runs"] == 2  # 4 if batch sizes were merged
    assert best.loc[BERT, "best-val-f1"] == pytest.approx(0.98)
    assert best.loc[BERT, "f1"] == pytest.approx(0.965)
    assert best.loc[LUKE, "batch_size"] == 16


def test_unknown_argument_splits_settings_and_single_runs_have_no_std(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = tmp_path / "outputs"
    make_run(outputs, BERT, 3e-5, seed=1, scores=(0.90, 0.90, 0.90, 0.90, 0.90))
    # A newer train.py with an argument the older run lacks: not the same experiment.
    make_run(outputs, BERT, 3e-5, seed=2, scores=(0.95, 0.96, 0.96, 0.96, 0.96), label_smoothing=0.1)
    make_run(outputs, LOCAL, 1e-5, seed=1, scores=(0.95, 0.91, 0.91, 0.91, 0.91))
    run_aggregate(outputs, tmp_path / "results")
    out, _ = capsys.readouterr()
    assert "settings differ in: lr, label_smoothing (beyond model_name)" in out

    best_text = (tmp_path / "results" / "best.csv").read_text(encoding="utf-8")
    best = pd.read_csv(tmp_path / "results" / "best.csv")
    assert list(best["model_name"]) == [BERT, LOCAL]
    assert list(best["n_runs"]) == [1, 1]
    assert best.loc[0, "label_smoothing"] == 0.1
    assert best.loc[0, "f1"] == pytest.approx(0.96)
    assert best[["accuracy_std", "precision_std", "recall_std", "f1_std"]].isna().all().all()
    assert best_text.splitlines()[1].endswith(",0.96,")  # NaN std: an empty cell
    table = (tmp_path / "results" / "best.md").read_text(encoding="utf-8")
    assert "±" not in table
    assert f"| [{BERT}](https://huggingface.co/{BERT}) | 111 M | 3e-05 | 96.00 | 96.00 | 96.00 | **96.00** | 1 |" in table
    assert f"| {LOCAL} | 1.2 M | 1e-05 | 91.00 | 91.00 | 91.00 | 91.00 | 1 |" in table
    # The figures find the runs of each best setting, also where a setting field is missing (NaN).
    per_class = pd.read_csv(tmp_path / "results" / "per-class.csv")
    assert list(per_class["model_name"]) == [BERT, LOCAL] and list(per_class["n_runs"]) == [1, 1]
    assert per_class.loc[1, CATEGORIES[0]] == pytest.approx(0.91 + CATEGORY_OFFSETS[0])


def test_no_finished_run_is_an_error(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    make_run(outputs, BERT, 3e-5, seed=1, finished=False)
    with pytest.raises(utils.InputError, match=f"no finished run under {outputs}; run src/train.py first"):
        run_aggregate(outputs, tmp_path / "results")
    assert not (tmp_path / "results").exists()
    with pytest.raises(utils.InputError, match="run src/train.py first"):
        run_aggregate(tmp_path / "missing", tmp_path / "results")


def test_command_line_error_has_no_traceback(tmp_path: Path) -> None:
    outputs, results = tmp_path / "outputs", tmp_path / "results"
    outputs.mkdir()
    command = [sys.executable, "src/aggregate.py", "--input_dir", str(outputs), "--output_dir", str(results)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == f"error: no finished run under {outputs}; run src/train.py first\n"
    assert not results.exists()


@pytest.mark.parametrize(
    ("model_name", "linked"),
    [
        (BERT, True),
        ("bert-base-multilingual-cased", True),
        ("xlm-roberta-large", True),
        ("./models/tiny-bert", False),
        ("/models/tiny-bert", False),
        ("../tiny-bert", False),
        ("models/a/b", False),
        ("C:\\models\\bert", False),
    ],
)
def test_only_hub_ids_are_linked(model_name: str, linked: bool) -> None:
    assert aggregate.is_hub_id(model_name) is linked


def test_a_local_folder_named_like_a_hub_id_is_not_linked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert aggregate.is_hub_id("models/tiny-bert")
    (tmp_path / "models" / "tiny-bert").mkdir(parents=True)
    assert not aggregate.is_hub_id("models/tiny-bert")


@pytest.mark.parametrize(
    ("num_params", "text"),
    [
        (111_207_177, "111 M"), (559_890_432, "559 M"), (177_853_440, "177 M"), (10_000_000, "10 M"),
        # Below 10 M: two significant digits, also rounded down (README: "floored").
        (9_990_000, "9.9 M"), (1_234_567, "1.2 M"), (999_999, "0.99 M"), (812_345, "0.81 M"), (52_000, "0.052 M"),
    ],  # fmt: skip
)
def test_format_params(num_params: int, text: str) -> None:
    assert aggregate.format_params(num_params) == text


def test_process_count_splits_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """4 processes of batch 16 are an effective batch of 64: not a repetition of the 1-process run."""
    outputs = tmp_path / "outputs"
    environment = {"torch": "2.9.0", "git_commit": "abc"}
    # An older train.py: the process count only under environment.
    make_run(outputs, BERT, 3e-5, seed=1, scores=(0.90, 0.90, 0.90, 0.90, 0.90), environment={**environment, "world_size": 1})
    # The current train.py: a top-level world_size (1 here: the same setting as the run above).
    make_run(outputs, BERT, 3e-5, seed=2, scores=(0.92, 0.92, 0.92, 0.92, 0.92), world_size=1, environment={**environment, "world_size": 1})
    make_run(outputs, BERT, 3e-5, seed=1, scores=(0.95, 0.80, 0.80, 0.80, 0.80), world_size=4, environment={**environment, "world_size": 4})
    make_run(outputs, BERT, 3e-5, seed=2, scores=(0.93, 0.82, 0.82, 0.82, 0.82), environment={**environment, "world_size": 4})
    run_aggregate(outputs, tmp_path / "results")
    out, _ = capsys.readouterr()
    assert "settings differ in: world_size (beyond model_name)" in out

    all_runs = pd.read_csv(tmp_path / "results" / "all.csv")
    assert list(all_runs.columns) == [*ALL_COLUMNS[:2], "world_size", *ALL_COLUMNS[2:]]
    assert sorted(zip(all_runs["world_size"], all_runs["seed"])) == [(1, 1), (1, 2), (4, 1), (4, 2)]
    best = pd.read_csv(tmp_path / "results" / "best.csv")
    assert len(best) == 1 and best.loc[0, "world_size"] == 4 and best.loc[0, "n_runs"] == 2  # not 4 runs averaged
    assert best.loc[0, "f1"] == pytest.approx(0.81)


@pytest.mark.parametrize(
    ("config", "world_size"),
    [({"world_size": 2, "environment": {"world_size": 8}}, 2), ({"environment": {"world_size": 8}}, 8), ({}, 1), ({"environment": None}, 1)],
)
def test_world_size_of_older_configs(config: dict, world_size: int) -> None:
    assert aggregate.world_size_of(config) == world_size
    assert aggregate.setting_of({"lr": 1e-5, **config})["world_size"] == world_size


def test_runtime_options_come_from_the_config_or_else_the_old_list() -> None:
    """A run lists its runtime options in config.json; runs made before that fall back to the old list."""
    fields = {"lr": 1e-5, "device": "cpu", "eval_batch_size": 32, "profile_dir": "x", "seed": 1, "num_params": 10}
    listed = aggregate.setting_of({**fields, "runtime_options": ["device", "profile_dir"]})
    older = {**aggregate.OLDER_SETTINGS, "lora_target_modules": "[]"}  # settings these configs predate, at the value they had (lists as JSON)
    assert listed == {**older, "lr": 1e-5, "eval_batch_size": 32, "world_size": 1}  # no runtime_options column either
    assert aggregate.setting_of(fields) == {**older, "lr": 1e-5, "profile_dir": "x", "world_size": 1}
    assert aggregate.setting_of(fields, repetitions=False) == {**older, "lr": 1e-5, "profile_dir": "x", "seed": 1, "world_size": 1}


def test_a_listed_runtime_option_does_not_split_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = tmp_path / "outputs"
    for seed, profile_dir in ((1, "a"), (2, "b")):
        make_run(outputs, BERT, 3e-5, seed=seed, profile_dir=profile_dir, runtime_options=[*aggregate.OLD_RUNTIME_OPTIONS, "profile_dir"])
    run_aggregate(outputs, tmp_path / "results")
    assert "settings differ in: nothing" in capsys.readouterr().out
    best = pd.read_csv(tmp_path / "results" / "best.csv")
    assert list(best["n_runs"]) == [2] and "profile_dir" not in best.columns and "runtime_options" not in best.columns


def test_truncation_is_a_setting_and_older_runs_kept_the_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--truncation and --head_tokens change what a run learns; runs made before them truncated the head."""
    outputs = tmp_path / "outputs"
    make_run(outputs, BERT, 3e-5, seed=1, scores=(0.90, 0.90, 0.90, 0.90, 0.90))  # an older train.py: no truncation fields
    report = {"train": {"examples": 5895, "truncated": 4000, "truncated_share": 0.6785, "mean_tokens_dropped_per_truncated_example": 600.0}}
    make_run(outputs, BERT, 3e-5, seed=2, scores=(0.92, 0.92, 0.92, 0.92, 0.92), truncation="head", head_tokens=None, truncation_report=report)
    for seed, head_tokens, val_f1 in ((1, 128, 0.95), (2, 128, 0.95), (1, 64, 0.85)):
        report = {"train": {**report["train"], "truncated": 4000 + seed}}  # a fact of each run, not a setting
        scores = (val_f1, 0.8, 0.8, 0.8, 0.8)
        make_run(outputs, BERT, 3e-5, seed=seed, scores=scores, truncation="head_tail", head_tokens=head_tokens, truncation_report=report)
    run_aggregate(outputs, tmp_path / "results")
    assert "settings differ in: truncation, head_tokens (beyond model_name)" in capsys.readouterr().out
    all_runs = pd.read_csv(tmp_path / "results" / "all.csv", keep_default_na=False)
    assert sorted(zip(all_runs["truncation"], all_runs["head_tokens"].astype(str))) == [
        ("head", ""), ("head", ""), ("head_tail", "128"), ("head_tail", "128"), ("head_tail", "64"),
    ]
    assert "truncation_report" not in all_runs.columns
    best = pd.read_csv(tmp_path / "results" / "best.csv")
    assert best.loc[0, "truncation"] == "head_tail" and best.loc[0, "head_tokens"] == 128 and best.loc[0, "n_runs"] == 2


# --- copies and tasks -------------------------------------------------------------------------


def description(name: str, source: str, split: str, labels: list[str], fold: int | None = 0) -> dict:
    """The dataset.json of prepare.py, as train.py records it in config.json."""
    return {"name": name, "source": f"sha256:{source * 64}"[:71], "split": f"sha256:{split * 64}"[:71], "fold": fold, "labels": labels}


def finish_at(run_dir: Path, seconds: int) -> None:
    """Pretend the run finished at `seconds` (test-metrics.json's time)."""
    os.utime(run_dir / "test-metrics.json", ns=(seconds * 10**9, seconds * 10**9))


def test_copies_of_a_run_count_once_the_newest_finished(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = tmp_path / "outputs"
    livedoor = description("livedoor", "a", "0", CATEGORIES)
    # A run, its copy (rerun by hand, copied back from a cluster) that finished later, and a run of another seed.
    old = make_run(outputs, BERT, 3e-5, seed=1, scores=(0.9, 0.80, 0.80, 0.80, 0.80), dataset=livedoor)
    new = make_run(outputs, BERT, 3e-5, seed=1, scores=(0.9, 0.90, 0.90, 0.90, 0.90), dataset=livedoor, device="cpu")
    other_seed = make_run(outputs, BERT, 3e-5, seed=2, scores=(0.9, 0.92, 0.92, 0.92, 0.92), dataset=livedoor)
    # The same split under another folder (the default split and folds/0): a copy too.
    fold_0 = make_run(outputs, BERT, 3e-5, seed=2, scores=(0.9, 0.5, 0.5, 0.5, 0.5), dataset_dir="datasets/livedoor/folds/0", dataset=livedoor)
    for seconds, run in enumerate((old, new, fold_0, other_seed), start=1000):
        finish_at(run, seconds)
    run_aggregate(outputs, tmp_path / "results")
    out = capsys.readouterr().out
    assert f"set aside {old}: a copy of {new} (same setting, seed and split; that one finished later)" in out
    assert f"set aside {fold_0}: a copy of {other_seed}" in out
    all_runs = pd.read_csv(tmp_path / "results" / "all.csv")
    assert sorted(all_runs["run_dir"]) == sorted([str(new), str(other_seed)])
    best = pd.read_csv(tmp_path / "results" / "best.csv")
    assert best.loc[0, "n_runs"] == 2 and best.loc[0, "f1"] == pytest.approx(0.91)  # not n=4


def test_different_tasks_are_never_averaged_but_folds_are(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = tmp_path / "outputs"
    for fold in (0, 1):  # two folds of livedoor: repetitions of one task
        make_run(outputs, BERT, 3e-5, seed=42, dataset_dir=f"datasets/livedoor/folds/{fold}", scores=(0.9, 0.9, 0.9, 0.9, 0.9 + fold / 100),
                 dataset=description("livedoor", "a", str(fold), CATEGORIES, fold))  # fmt: skip
    make_run(outputs, BERT, 3e-5, seed=42, dataset_dir="datasets/reviews", scores=(0.6, 0.6, 0.6, 0.6, 0.6), num_labels=2,
             dataset=description("reviews", "b", "c", ["neg", "pos"]))  # fmt: skip
    run_aggregate(outputs, tmp_path / "results")
    out = capsys.readouterr().out
    assert "settings differ in: task (beyond model_name)" in out
    best = pd.read_csv(tmp_path / "results" / "best.csv", keep_default_na=False)
    assert list(best["task"]) == ["livedoor (3 labels, aaaaaaaa)", "reviews (2 labels, bbbbbbbb)"]
    assert list(best["n_runs"]) == [2, 1] and list(best["f1"]) == pytest.approx([0.905, 0.6])  # not 80.33 ± 17.32, n 3
    table = (tmp_path / "results" / "best.md").read_text(encoding="utf-8")
    assert table.splitlines()[0] == "| Task | Model | Params | LR | Accuracy | Precision | Recall | F1 | n |"
    assert f"| reviews (2 labels, bbbbbbbb) | [{BERT}](https://huggingface.co/{BERT}) | 111 M | 3e-05 | 60.00 | 60.00 | 60.00 | **60.00** | 1 |" in table
    per_class = pd.read_csv(tmp_path / "results" / "per-class.csv")
    assert list(per_class["model_name"]) == [f"{BERT} [livedoor (3 labels, aaaaaaaa)]", f"{BERT} [reviews (2 labels, bbbbbbbb)]"]


def test_runs_of_older_datasets_are_told_apart_by_their_label2id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No dataset.json recorded: the dataset folder's label2id.json, as it is now, names the task."""
    outputs = tmp_path / "outputs"
    for name, labels in (("livedoor", CATEGORIES), ("reviews", ["neg", "pos"])):
        utils.save_json({label: i for i, label in enumerate(labels)}, tmp_path / name / "label2id.json")
        make_run(outputs, BERT, 3e-5, seed=1, dataset_dir=str(tmp_path / name))
    make_run(outputs, BERT, 3e-5, seed=2, dataset_dir=str(tmp_path / "livedoor"))
    run_aggregate(outputs, tmp_path / "results")
    best = pd.read_csv(tmp_path / "results" / "best.csv").set_index("task")
    assert best.loc[f"labels: {', '.join(CATEGORIES)}", "n_runs"] == 2 and best.loc["labels: neg, pos", "n_runs"] == 1


def test_category_names_that_look_like_numbers_or_missing_values_stay_names(tmp_path: Path) -> None:
    names = ["0", "1.0", "True", "NA", "null", "nan", "None"]
    run = make_run(tmp_path / "outputs", BERT, 3e-5, seed=1)
    utils.save_csv(["category", "f1", "support"], ([name, i / 10, 3] for i, name in enumerate(names)), run / "test-per-class.csv")
    run_aggregate(tmp_path / "outputs", tmp_path / "results")
    header = (tmp_path / "results" / "per-class.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "model_name,n_runs," + ",".join(names)  # NA used to drop out, 0 and 1.0 became numbers
    per_class = pd.read_csv(tmp_path / "results" / "per-class.csv", dtype=str, keep_default_na=False)
    assert [float(per_class.loc[0, name]) for name in names] == pytest.approx([i / 10 for i in range(len(names))])


def test_multi_label_runs_add_micro_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Micro precision/recall/F1 of multi-label runs become columns (mean and std); a single-label model has none ("-")."""
    outputs = tmp_path / "outputs"
    for seed, micro_f1 in ((1, 0.80), (2, 0.90)):
        run_dir = make_run(outputs, LUKE, 3e-5, seed=seed, dataset_dir="datasets/multi", problem_type="multi_label_classification")
        metrics = utils.load_json(run_dir / "test-metrics.json")
        utils.save_json({**metrics, "micro_precision": 0.7, "micro_recall": 0.6, "micro_f1": micro_f1}, run_dir / "test-metrics.json")
    make_run(outputs, BERT, 3e-5, seed=1, dataset_dir="datasets/multi")
    run_aggregate(outputs, tmp_path / "results")
    out = capsys.readouterr().out
    assert "settings differ in: nothing" in out  # problem_type is a fact of the dataset, not a setting
    all_runs = pd.read_csv(tmp_path / "results" / "all.csv")
    assert {"micro_precision", "micro_recall", "micro_f1"} <= set(all_runs.columns)
    best = pd.read_csv(tmp_path / "results" / "best.csv").set_index("model_name")
    assert best.loc[LUKE, "micro_f1"] == pytest.approx(0.85) and best.loc[LUKE, "micro_f1_std"] == pytest.approx(0.0707, abs=1e-4)
    assert np.isnan(best.loc[BERT, "micro_f1"])
    table = (tmp_path / "results" / "best.md").read_text(encoding="utf-8").splitlines()
    assert table[0] == "| Model | Params | LR | Accuracy | Precision | Recall | F1 | Micro-F1 | n |"
    assert table[1] == "| ----- | -----: | -: | :------: | :-------: | :----: | :-: | :------: | -: |"
    rows = {line.split(" | ")[0]: line for line in table[2:]}
    assert rows[f"| [{LUKE}](https://huggingface.co/{LUKE})"].endswith("| 85.00 ± 7.07 | 2 |")
    assert rows[f"| [{BERT}](https://huggingface.co/{BERT})"].endswith("| - | 1 |")


def test_a_bad_micro_score_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = tmp_path / "outputs"
    make_run(outputs, BERT, 3e-5, seed=1)
    bad = make_run(outputs, BERT, 3e-5, seed=2)
    utils.save_json({**utils.load_json(bad / "test-metrics.json"), "micro_f1": "high"}, bad / "test-metrics.json")
    run_aggregate(outputs, tmp_path / "results")
    assert f"skipped {bad}: test-metrics.json: micro_f1 is 'high', expected int or float" in capsys.readouterr().err


# train.py's settings when runs first recorded them (main at a651005, before resume, truncation modes, LoRA and the
# multi-label options): every setting added since must say, in aggregate.OLDER_SETTINGS, what runs before it did.
FIRST_SETTINGS = {
    "model_name", "text_fields", "batch_size", "epochs", "lr", "num_warmup_epochs", "max_seq_len", "weight_decay",
    "gradient_accumulation_steps", "max_grad_norm", "gradient_checkpointing", "dtype", "reinit_head",
}  # fmt: skip


def test_settings_older_runs_lack_take_train_pys_defaults() -> None:
    """A run made before a setting existed trained as its default does: the same setting as a new default run."""
    import train_options

    defaults = train_options.Args().parse_args([]).as_dict()
    settings = {name for name in defaults if name not in train_options.RUNTIME_OPTIONS and name not in aggregate.REPETITION_FIELDS}
    assert settings - FIRST_SETTINGS == set(aggregate.OLDER_SETTINGS)  # a new setting without an entry would split old and new runs
    assert {name: defaults[name] for name in aggregate.OLDER_SETTINGS} == aggregate.OLDER_SETTINGS
    new_default_run = {"lr": 1e-5, **aggregate.OLDER_SETTINGS}
    assert aggregate.setting_of({"lr": 1e-5}) == aggregate.setting_of(new_default_run)
    assert aggregate.setting_of({"lr": 1e-5}) != aggregate.setting_of({**new_default_run, "class_weights": "balanced"})
