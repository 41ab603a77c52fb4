"""sweep.py on the tiny model: every combination run once, finished runs skipped, failures reported."""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

import sweep
import train
import utils
from conftest import TINY_TRAINING
from utils import InputError

# The tiny model's settings, for 1 epoch, without --lr: the learning rate is an axis of the sweep.
_TINY = dict(zip(TINY_TRAINING[::2], TINY_TRAINING[1::2]))
del _TINY["--lr"]
FORWARDED = [token for option, value in {**_TINY, "--epochs": "1"}.items() for token in (option, value)]
LRS = ["5e-3", "1e-3"]
SEEDS = ["1", "2"]


def in_process(argv: list[str]) -> int:
    """A runner that trains in this process (fast: torch is already imported); exit code as train.py's."""
    try:
        train.main(train.Args().parse_args(argv))
    except InputError:
        return 1
    return 0


def never(argv: list[str]) -> int:
    pytest.fail(f"nothing should run, but the sweep ran train.py {argv}")


def sweep_args(root: Path, tiny_model_dir: Path, dataset_dir: Path, *argv: str) -> sweep.Args:
    """Sweep arguments for the tiny model under `root`; later flags override earlier ones."""
    base = [
        "--models", str(tiny_model_dir), "--lrs", *LRS, "--seeds", *SEEDS, "--dataset_dirs", str(dataset_dir),
        "--output_root", str(root / "outputs"), "--results_dir", str(root / "results"), *FORWARDED,
    ]  # fmt: skip
    return sweep.Args().parse_args([*base, *argv])


def plan(out: str) -> tuple[int, int, int]:
    """(combinations, already done, to run) from the sweep's plan line."""
    match = re.search(r"^sweep: (\d+) combinations \(.*\), (\d+) already done, (\d+) to run", out, re.MULTILINE)
    assert match, out
    return tuple(map(int, match.groups()))  # type: ignore[return-value]


def finished_runs(output_root: Path) -> list[Path]:
    return sorted(d for d in output_root.glob("*/*/*") if (d / "test-metrics.json").is_file())


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, dataset_dir: Path) -> tuple[Path, str]:
    """One sweep of 1 model x 2 lrs x 2 seeds; returns its root folder and what it printed."""
    root = tmp_path_factory.mktemp("sweep")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sweep.main(sweep_args(root, tiny_model_dir, dataset_dir), run=in_process)
    return root, out.getvalue()


# --- a sweep, then its rerun -----------------------------------------------------------------


def test_every_combination_runs_once_and_is_aggregated(swept: tuple[Path, str], tiny_model_dir: Path) -> None:
    root, out = swept
    assert plan(out) == (4, 0, 4)
    assert "(1 models x 2 lrs x 2 seeds x 1 datasets)" in out
    assert out.count("] done in ") == 4 and "[4/4] done" in out
    first = re.search(r"^\[1/4\] (.*)\n  (.*)$", out, re.MULTILINE)
    assert first and first.group(1).startswith(f"{tiny_model_dir} lr=0.005 seed=1 dataset=")
    assert first.group(2).startswith("python ") and "train.py --model_name" in first.group(2) and "--epochs 1" in first.group(2)

    runs = finished_runs(root / "outputs")
    configs = [utils.load_json(run / "config.json") for run in runs]
    assert sorted((c["lr"], c["seed"]) for c in configs) == [(1e-3, 1), (1e-3, 2), (5e-3, 1), (5e-3, 2)]
    assert {(c["epochs"], c["model_name"], c["batch_size"]) for c in configs} == {(1, str(tiny_model_dir), 8)}

    assert len(pd.read_csv(root / "results" / "all.csv")) == 4
    best = pd.read_csv(root / "results" / "best.csv")
    assert len(best) == 1 and best.loc[0, "n_runs"] == 2
    assert (root / "results" / "best.md").is_file()


def test_a_rerun_skips_every_finished_run(swept: tuple[Path, str], tiny_model_dir: Path, dataset_dir: Path, capsys) -> None:
    root, _ = swept
    sweep.main(sweep_args(root, tiny_model_dir, dataset_dir), run=never)
    out = capsys.readouterr().out
    assert plan(out) == (4, 4, 0)
    assert len(finished_runs(root / "outputs")) == 4
    assert len(pd.read_csv(root / "results" / "all.csv")) == 4  # aggregated again


@pytest.mark.parametrize(
    ("argv", "done"),
    [
        ([], 4),
        # Execution-only fields do not change what a run learns.
        (["--num_workers", "2", "--eval_batch_size", "7", "--save_model", "--device", "cpu"], 4),
        # A forwarded setting does.
        (["--epochs", "2"], 0),
        (["--weight_decay", "0"], 0),
        (["--text_fields", "body"], 0),
        # New axis values are new combinations; the old ones stay done.
        (["--lrs", "5e-3", "1e-4"], 2),
        (["--seeds", "1", "2", "3"], 4),
    ],
)
def test_what_counts_as_done(swept: tuple[Path, str], tiny_model_dir: Path, dataset_dir: Path, argv: list[str], done: int, capsys) -> None:
    root, _ = swept
    args = sweep_args(root, tiny_model_dir, dataset_dir, *argv, "--dry_run")
    sweep.main(args, run=never)
    out = capsys.readouterr().out
    total = len(args.models) * len(args.lrs) * len(args.seeds)
    assert plan(out) == (total, done, total - done)
    assert len(re.findall(r"^\[\d+/\d+\] ", out, re.MULTILINE)) == total - done  # the dry run lists what it would run
    assert len(finished_runs(root / "outputs")) == 4  # and runs nothing


def test_unfinished_and_unreadable_runs_are_not_done(swept: tuple[Path, str], tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    root, _ = swept
    run = finished_runs(root / "outputs")[0]
    copy = tmp_path / "outputs" / run.relative_to(root / "outputs")
    shutil.copytree(run, copy)

    def count_done() -> int:
        sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--dry_run"), run=never)
        return plan(capsys.readouterr().out)[1]

    assert count_done() == 1
    config = (copy / "config.json").read_text(encoding="utf-8")
    (copy / "config.json").write_text(config[:20], encoding="utf-8")  # cut short
    assert count_done() == 0
    (copy / "config.json").write_text(config, encoding="utf-8")
    (copy / "test-metrics.json").unlink()  # crashed before the end
    assert count_done() == 0


# --- failures ---------------------------------------------------------------------------------


def test_failures_do_not_stop_the_sweep(swept: tuple[Path, str], tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    root, _ = swept
    shutil.copytree(root / "outputs", tmp_path / "outputs")  # the 4 finished runs: lr 5e-3 and 1e-3
    calls = []

    def runner(argv: list[str]) -> int:
        calls.append(argv)
        if argv[argv.index("--lr") + 1] == repr(1e-4):
            return 3  # e.g. a crash of this learning rate only
        return in_process(argv)  # a model that cannot be loaded fails for real (exit code 1)

    models = ["--models", "no-such-org/no-such-model", str(tiny_model_dir)]
    args = sweep_args(tmp_path, tiny_model_dir, dataset_dir, *models, "--lrs", "5e-3", "1e-4", "--seeds", "1")
    with pytest.raises(sweep.RunsFailed) as e:
        sweep.main(args, run=runner)
    out = capsys.readouterr().out
    assert plan(out) == (4, 1, 3)
    assert len(calls) == 3  # the first run failed, the others still ran
    assert [code for _, _, code in e.value.failures] == [1, 3, 3]
    message = str(e.value)
    assert message.startswith("3 of 3 runs failed; run the same sweep command again to retry them")
    assert "\n  no-such-org/no-such-model lr=0.005 seed=1 dataset=" in message and ": exit code 1\n" in message
    assert f"\n  {tiny_model_dir} lr=0.0001 seed=1 dataset=" in message and message.count(": exit code 3\n") == 2
    assert "\n    python " in message and "--model_name no-such-org/no-such-model --lr 0.005" in message
    assert "[3/3] FAILED (exit code 3)" in out
    # Aggregated before the error is raised.
    assert len(pd.read_csv(tmp_path / "results" / "all.csv")) == 4


def test_failures_are_reported_even_when_nothing_finished(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    args = sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--models", "no-such-org/no-such-model", "--lrs", "1e-3", "--seeds", "1")
    with pytest.raises(sweep.RunsFailed, match=r"^1 of 1 runs failed"):
        sweep.main(args, run=in_process)
    assert "aggregate: " in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(("code", "text"), [(1, "exit code 1"), (-9, "killed by SIGKILL"), (-6, "killed by SIGABRT")])
def test_exit_codes_are_described(code: int, text: str) -> None:
    assert sweep.describe_exit(code) == text


# --- axes -------------------------------------------------------------------------------------


def test_folds_are_distinct_combinations(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    folds = [str(dataset_dir / "folds" / "0"), str(dataset_dir / "folds" / "1")]
    argv = ["--lrs", "5e-3", "--seeds", "1", "--dataset_dirs", *folds]
    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, *argv), run=in_process)
    assert plan(capsys.readouterr().out) == (2, 0, 2)
    runs = finished_runs(tmp_path / "outputs")
    assert sorted(utils.load_json(run / "config.json")["dataset_dir"] for run in runs) == folds
    best = pd.read_csv(tmp_path / "results" / "best.csv")
    assert len(best) == 1 and best.loc[0, "n_runs"] == 2  # aggregate averages over the folds

    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, *argv, "--dry_run"), run=never)
    assert plan(capsys.readouterr().out) == (2, 2, 0)
    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, *argv[:4], "--dry_run"), run=never)
    assert plan(capsys.readouterr().out) == (1, 0, 1)  # the whole dataset is not fold 0's folder


def test_combination_configs_are_what_train_parses(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    args = sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--models", str(tiny_model_dir), "other/model", "--epochs", "3")
    combinations = [sweep.Combination(*c) for c in itertools.product(args.models, args.lrs, args.seeds, args.dataset_dirs)]
    assert len(combinations) == 8
    configs = sweep.combination_configs(combinations, args.output_root, args.extra_args)
    for combination, config in zip(combinations, configs):
        parsed = train.Args().parse_args(combination.train_argv(args.output_root, args.extra_args))
        assert config == train.args_to_json(parsed)


def test_defaults_are_the_reference_grid(tmp_path: Path) -> None:
    args = sweep.Args().parse_args([])
    assert len(args.models) == 17 and args.models[0] == "cl-tohoku/bert-base-japanese-v3"
    assert args.lrs == [1e-5, 3e-5, 5e-5]
    assert args.seeds == [42]
    assert args.dataset_dirs == [Path("datasets/livedoor")]
    assert (args.output_root, args.results_dir, args.dry_run, args.extra_args) == (Path("outputs"), Path("results"), False, [])


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--lr", "1e-5"], ": error: --lr is set by the sweep for each run: use --lrs instead"),
        (["--lr=1e-5"], ": error: --lr is set by the sweep for each run: use --lrs instead"),
        (["--model_name", "x"], ": error: --model_name is set by the sweep for each run: use --models instead"),
        (["--seed", "1"], ": error: --seed is set by the sweep for each run: use --seeds instead"),
        (["--dataset_dir", "d"], ": error: --dataset_dir is set by the sweep for each run: use --dataset_dirs instead"),
        # No abbreviations: train.py would read --model as --model_name.
        (["--model", "x"], ": error: --model is an option of neither sweep.py nor train.py"),
        (["--epoch", "3"], ": error: --epoch is an option of neither sweep.py nor train.py"),
        # Values are checked by train.py's parser before any run.
        (["--epochs", "x"], "train.py: error: argument --epochs: invalid int value: 'x'"),
        (["--num_warmup_epochs", "-1"], "train.py: error: --num_warmup_epochs cannot be negative"),
        (["--lrs"], ": error: --lrs needs at least one value"),
        (["--seeds", "1", "2", "1"], ": error: --seeds lists 1 more than once"),
    ],
)
def test_bad_arguments_are_refused(argv: list[str], error: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        sweep.Args().parse_args(argv)
    assert e.value.code == 2
    assert error in capsys.readouterr().err


def test_missing_dataset_folder_is_refused_before_any_run(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    argv = ["--dataset_dirs", str(dataset_dir / "folds" / "0"), str(dataset_dir / "folds" / "10")]
    with pytest.raises(InputError, match=r"dataset folder\(s\) not found: .*folds/10; run `poetry run python src/prepare.py`"):
        sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, *argv), run=never)


# --- the default runner: a real train.py process -----------------------------------------------


def test_default_runner_trains_in_a_subprocess(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capfd) -> None:
    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--lrs", "5e-3", "--seeds", "1"))
    out = capfd.readouterr().out
    assert plan(out) == (1, 0, 1)
    assert "[1/1] done in " in out
    (run,) = finished_runs(tmp_path / "outputs")
    assert f"wrote {run}" in out  # train.py's own last line, from the child process
    config = utils.load_json(run / "config.json")
    assert (config["lr"], config["seed"], config["epochs"]) == (5e-3, 1, 1)
    assert len(pd.read_csv(tmp_path / "results" / "all.csv")) == 1
