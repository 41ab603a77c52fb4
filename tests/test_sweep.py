"""sweep.py on the tiny model: every combination run once, finished runs skipped, failures reported,
several runs at once (--jobs) each with its share of the machine and its own log."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

import launch
import runs
import sweep
import train
import train_options
import utils
from conftest import TINY_TRAINING, wait_for
from utils import InputError

# The tiny model's settings, for 1 epoch, without --lr: the learning rate is an axis of the sweep.
_TINY = dict(zip(TINY_TRAINING[::2], TINY_TRAINING[1::2]))
del _TINY["--lr"]
FORWARDED = [token for option, value in {**_TINY, "--epochs": "1"}.items() for token in (option, value)]
LRS = ["5e-3", "1e-3"]
SEEDS = ["1", "2"]


def in_process(launch: sweep.Launch, slot: sweep.Slot) -> int:
    """A runner that trains in this process (fast: torch is already imported); exit code as train.py's."""
    try:
        train.main(train_options.Args().parse_args([*launch.argv, *slot.train_argv]))
    except InputError:
        return 1
    return 0


def never(launch: sweep.Launch, slot: sweep.Slot) -> int:
    pytest.fail(f"nothing should run, but the sweep ran train.py {launch.argv}")


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
    first = re.search(r"^\[1/4\] done in \d+m\d\ds: (.*)  \(log: (.*)\)$", out, re.MULTILINE)
    assert first and first.group(1).startswith(f"{tiny_model_dir} lr=0.005 seed=1 dataset=")
    log = Path(first.group(2))
    assert log.parent.parent == root / "outputs" / "sweep-logs" and log.name == "001_tiny-bert_lr=0.005_seed=1_datasets0_livedoor.log"
    assert re.search(r"^sweep: 4/4 done, 0 running, 0 failed, \d+m\d\ds elapsed, ETA 0m00s$", out, re.MULTILINE)

    runs = finished_runs(root / "outputs")
    configs = [utils.load_json(run / "config.json") for run in runs]
    assert sorted((c["lr"], c["seed"]) for c in configs) == [(1e-3, 1), (1e-3, 2), (5e-3, 1), (5e-3, 2)]
    assert {(c["epochs"], c["model_name"], c["batch_size"], c["world_size"]) for c in configs} == {(1, str(tiny_model_dir), 8, 1)}

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
        # So does the process count: 2 processes double the effective batch.
        (["--gpus_per_run", "2"], 0),
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

    def runner(launch: sweep.Launch, slot: sweep.Slot) -> int:
        calls.append(launch.argv)
        if launch.argv[launch.argv.index("--lr") + 1] == repr(1e-4):
            return 3  # e.g. a crash of this learning rate only
        return in_process(launch, slot)  # a model that cannot be loaded fails for real (exit code 1)

    models = ["--models", "no-such-org/no-such-model", str(tiny_model_dir)]
    args = sweep_args(tmp_path, tiny_model_dir, dataset_dir, *models, "--lrs", "5e-3", "1e-4", "--seeds", "1")
    with pytest.raises(sweep.RunsFailed) as e:
        sweep.main(args, run=runner)
    out = capsys.readouterr().out
    assert plan(out) == (4, 1, 3)
    assert len(calls) == 3  # the first run failed, the others still ran
    assert [f.reason for f in e.value.failures] == ["exit code 1", "exit code 3", "exit code 3"]
    message = str(e.value)
    assert message.startswith("3 of 3 runs failed; run the same sweep command again to retry them")
    assert "\n  no-such-org/no-such-model lr=0.005 seed=1 dataset=" in message and ": exit code 1\n" in message
    assert f"\n  {tiny_model_dir} lr=0.0001 seed=1 dataset=" in message and message.count(": exit code 3\n") == 2
    assert "train.py --model_name no-such-org/no-such-model --lr 0.005" in message
    logs = re.findall(r"^    log: (.*)$", message, re.MULTILINE)
    assert len(logs) == 3 and all(log.startswith(str(tmp_path / "outputs" / "sweep-logs")) for log in logs)
    assert "[3/3] FAILED (exit code 3) in " in out
    assert "sweep: 0/3 done, 0 running, 3 failed" in out
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
        parsed = train_options.Args().parse_args(combination.train_argv(args.output_root, args.extra_args))
        assert config == {**runs.args_to_json(parsed), "runtime_options": list(train_options.RUNTIME_OPTIONS), "world_size": 1}


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


def copied_run(swept: tuple[Path, str], tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> tuple[Path, dict, Callable[..., int]]:
    """A finished run of the swept grid copied into a fresh outputs folder, its config, and a dry run's count of done combinations."""
    root, _ = swept
    run = finished_runs(root / "outputs")[0]
    copy = tmp_path / "outputs" / run.relative_to(root / "outputs")
    shutil.copytree(run, copy)

    def count_done(*argv: str) -> int:
        sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, *argv, "--dry_run"), run=never)
        return plan(capsys.readouterr().out)[1]

    return copy, utils.load_json(copy / "config.json"), count_done


def test_a_run_with_another_process_count_is_not_done(swept: tuple[Path, str], tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    """A torchrun run (2 processes: twice the effective batch) does not stand for the 1-process combination."""
    copy, config, count_done = copied_run(swept, tiny_model_dir, dataset_dir, tmp_path, capsys)

    assert count_done() == 1
    utils.save_json({**config, "world_size": 2, "environment": {**config["environment"], "world_size": 2}}, copy / "config.json")
    assert (count_done(), count_done("--gpus_per_run", "2")) == (0, 1)
    # A run of an older train.py kept the count only under environment.
    older = {key: value for key, value in config.items() if key != "world_size"}
    utils.save_json({**older, "environment": {**config["environment"], "world_size": 2}}, copy / "config.json")
    assert (count_done(), count_done("--gpus_per_run", "2")) == (0, 1)
    utils.save_json(older, copy / "config.json")
    assert (count_done(), count_done("--gpus_per_run", "2")) == (1, 0)


def test_a_run_with_another_truncation_is_not_done(swept: tuple[Path, str], tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    """--truncation and --head_tokens are settings; a run of a train.py that had no truncation modes kept the head."""
    copy, config, count_done = copied_run(swept, tiny_model_dir, dataset_dir, tmp_path, capsys)

    assert (config["truncation"], config["head_tokens"]) == ("head", None)
    assert (count_done(), count_done("--truncation", "head_tail")) == (1, 0)
    head_tokens = config["max_seq_len"] // 4  # head_tail's default, recorded as a number
    utils.save_json({**config, "truncation": "head_tail", "head_tokens": head_tokens}, copy / "config.json")
    assert count_done() == 0
    assert count_done("--truncation", "head_tail") == count_done("--truncation", "head_tail", "--head_tokens", str(head_tokens)) == 1
    assert count_done("--truncation", "head_tail", "--head_tokens", str(head_tokens + 1)) == 0
    older = {key: value for key, value in config.items() if key not in ("truncation", "head_tokens")}
    utils.save_json(older, copy / "config.json")
    assert (count_done(), count_done("--truncation", "tail")) == (1, 0)


# --- several runs at once ---------------------------------------------------------------------------


def test_jobs_2_runs_two_train_processes_at_once(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capfd) -> None:
    """End to end with the default runner: 2 real train.py processes at once, each with its log; a rerun runs nothing."""
    both_started = threading.Barrier(2, timeout=120)  # broken (a test failure) unless the 2 runs overlap
    slots = []

    def concurrent_runner(launch: sweep.Launch, slot: sweep.Slot) -> int:
        slots.append(slot)
        both_started.wait()
        return sweep.run_logged(launch, slot)

    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--seeds", "1", "--jobs", "2"), run=concurrent_runner)
    out = capfd.readouterr().out
    assert plan(out) == (2, 0, 2)
    cores = utils.available_cpus()
    threads = max(1, cores // 2)
    assert f"sweep: 2 run(s) at once ({threads} thread(s) per process); logs in {tmp_path / 'outputs' / 'sweep-logs'}" in out
    assert [slot.env["OMP_NUM_THREADS"] for slot in slots] == [str(threads)] * 2
    assert out.count("] done in ") == 2

    runs = finished_runs(tmp_path / "outputs")
    assert len(runs) == 2
    logs = sorted((tmp_path / "outputs" / "sweep-logs").glob("*/*.log"))
    assert [log.name.split("_seed")[0] for log in logs] == ["001_tiny-bert_lr=0.005", "002_tiny-bert_lr=0.001"]
    for log in logs:
        text = log.read_text(encoding="utf-8")
        assert text.startswith("# ") and "train.py --model_name" in text.splitlines()[0]
        (run,) = [run for run in runs if f"wrote {run}" in text]  # train.py's own output, in its own log
        assert utils.load_json(run / "config.json")["lr"] == float(log.name.split("_")[2].removeprefix("lr="))
    assert len(pd.read_csv(tmp_path / "results" / "all.csv")) == 2

    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--seeds", "1", "--jobs", "2"), run=never)
    assert plan(capfd.readouterr().out) == (2, 2, 0)


def test_gpus_are_shared_out_through_cuda_visible_devices() -> None:
    share = sweep.thread_slot(cores=16, runs_at_once=2, nproc=2, forwarded=[])
    assert share.env["OMP_NUM_THREADS"] == "4" and share.train_argv == ["--num_workers", "4"]
    slots = sweep.gpu_slots(["0", "1", "2", "3"], jobs=2, gpus_per_run=2, thread_share=share)
    assert [slot.env["CUDA_VISIBLE_DEVICES"] for slot in slots] == ["0,1", "2,3"]
    assert [slot.label for slot in slots] == ["GPU 0,1", "GPU 2,3"]
    with pytest.raises(InputError, match=r"^--jobs 3 x --gpus_per_run 2 needs 6 GPUs, but this machine shows 4 \(0,1,2,3\); lower --jobs$"):
        sweep.gpu_slots(["0", "1", "2", "3"], jobs=3, gpus_per_run=2, thread_share=share)
    # A job scheduler that already restricted the GPUs: only those are shared out.
    assert sweep.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}, device_count=2) == ["2", "5"]
    assert sweep.visible_gpus({}, device_count=3) == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("device", "device_count", "labels"),
    [("auto", 0, ["1 thread(s) per process"] * 2), ("cpu", 4, ["1 thread(s) per process"] * 2), ("auto", 4, ["GPU 0", "GPU 1"]), ("cuda", 2, ["GPU 0", "GPU 1"])],
)
def test_local_slots_follow_the_device(device: str, device_count: int, labels: list[str]) -> None:
    args = sweep.Args().parse_args(["--jobs", "2"])
    assert [s.label for s in sweep.local_slots(args, device, device_count, cores=2, environ={})] == labels


def test_a_fixed_cuda_device_is_refused_with_gpu_slots() -> None:
    args = sweep.Args().parse_args(["--jobs", "2", "--device", "cuda:1"])
    with pytest.raises(InputError, match=r"^--device cuda:1: the sweep gives each run its GPU\(s\) through CUDA_VISIBLE_DEVICES"):
        sweep.local_slots(args, "cuda:1", 2, cores=2, environ={})


@pytest.mark.parametrize("forwarded", [["--num_workers", "3"], ["--num_workers=3"]])
def test_a_forwarded_num_workers_wins(forwarded: list[str]) -> None:
    assert sweep.thread_slot(cores=8, runs_at_once=1, nproc=1, forwarded=forwarded).train_argv == []
    args = sweep.Args().parse_args(["--jobs", "2", *forwarded])
    assert [slot.train_argv for slot in sweep.local_slots(args, "cpu", 0, cores=8, environ={})] == [[], []]
    assert sweep.thread_slot(cores=8, runs_at_once=1, nproc=1, forwarded=["--num_workers_x=3"]).train_argv == ["--num_workers", "8"]


def test_runtime_options_are_found_in_either_form() -> None:
    """What a resumption passes on: the runtime options, written --flag value or --flag=value, with their values."""
    forwarded = ["--epochs", "3", "--device=cpu", "--num_workers", "2", "--save_model", "--batch_size=8", "--eval_batch_size", "64"]
    assert sweep.runtime_options(forwarded) == ["--device=cpu", "--num_workers", "2", "--save_model", "--eval_batch_size", "64"]
    assert launch.option_groups(["--a", "1", "2", "--b=3", "--c"]) == [["--a", "1", "2"], ["--b=3"], ["--c"]]
    assert launch.has_option(["--epochs=3"], "--epochs") and not launch.has_option(["--epochs_x", "3"], "--epochs")


def test_several_gpus_per_run_are_launched_with_torchrun(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    assert sweep.train_command(["--lr", "1"], 1, python="py", script=Path("t.py")) == ["py", "t.py", "--lr", "1"]
    assert sweep.train_command(["--lr", "1"], 2, python="py", script=Path("t.py")) == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "t.py", "--lr", "1",
    ]  # fmt: skip
    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--gpus_per_run", "2", "--dry_run"), run=never)
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 " in capsys.readouterr().out


def test_progress_line() -> None:
    assert sweep.progress_line(10, 0, 0, 2, 30) == "sweep: 0/10 done, 2 running, 0 failed, 0m30s elapsed, ETA ?"
    assert sweep.progress_line(10, 3, 1, 2, 400) == "sweep: 3/10 done, 2 running, 1 failed, 6m40s elapsed, ETA 10m00s"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_rewritten_in_place_on_a_terminal() -> None:
    terminal = FakeTerminal()
    progress = sweep.Progress(2, stream=terminal)
    progress.running = 1
    progress.show()
    progress.ended("[1/2] done in 0m01s: x", ok=True)
    progress.close()
    text = terminal.getvalue()
    assert text.startswith("\r\033[Ksweep: 0/2 done, 1 running, 0 failed, ")
    assert "\r\033[K[1/2] done in 0m01s: x\n\r\033[Ksweep: 1/2 done, 1 running, 0 failed, " in text
    assert text.endswith("\n") and text.count("\n") == 2  # one line per ended run, then the final line


def test_the_last_progress_line_states_the_final_counts() -> None:
    """Off a terminal, the line printed when the last run ended may say 1 running: close() says how it ended."""
    stream = io.StringIO()
    progress = sweep.Progress(1, stream=stream, interval=3600)
    progress.running = 1
    progress.ended("[1/1] done: x", ok=True)
    assert stream.getvalue().splitlines()[-1].startswith("sweep: 1/1 done, 1 running, 0 failed, ")
    progress.running = 0
    progress.close()
    assert stream.getvalue().splitlines()[-1].startswith("sweep: 1/1 done, 0 running, 0 failed, ")
    progress.close()  # nothing new to say: no second line
    assert len(stream.getvalue().splitlines()) == 3


def test_progress_prints_plain_periodic_lines_elsewhere() -> None:
    stream = io.StringIO()
    progress = sweep.Progress(2, stream=stream, interval=3600)
    progress.show()
    progress.show()  # too soon for another line
    progress.ended("[1/2] FAILED (exit code 1) in 0m01s: x", ok=False)
    assert "\r" not in stream.getvalue()
    assert stream.getvalue().splitlines()[0] == "[1/2] FAILED (exit code 1) in 0m01s: x"
    assert stream.getvalue().splitlines()[1].startswith("sweep: 0/2 done, 0 running, 1 failed, ")


# --- Slurm options (the launcher itself is tested on a real cluster in test_slurm.py) ----------------


def test_slurm_options_become_submitit_parameters() -> None:
    args = sweep.Args().parse_args([
        "--launcher", "slurm", "--slurm_partition", "gpu", "--slurm_time", "90", "--slurm_cpus_per_run", "8",
        "--slurm_array_parallelism", "4", "--gpus_per_run", "2",
        "--slurm_option", "account=abc", "--slurm_option", "qos=high", "constraint=a100", "--slurm_option", "exclusive",
    ])  # fmt: skip
    parameters = sweep.slurm_parameters(args, gpus=True, src_dir=Path("/repo/src"))
    assert {k: parameters[k] for k in ("partition", "time", "cpus_per_task", "array_parallelism", "gpus_per_node")} == {
        "partition": "gpu", "time": 90, "cpus_per_task": 8, "array_parallelism": 4, "gpus_per_node": 2,
    }  # fmt: skip
    # Requeueable (a preempted task runs again and resumes), whatever the cluster's default.
    assert parameters["additional_parameters"] == {"requeue": True, "account": "abc", "qos": "high", "constraint": "a100", "exclusive": True}
    assert parameters["signal_delay_s"] == sweep.SIGNAL_DELAY_S == 90
    assert parameters["setup"] == ["export PYTHONPATH=/repo/src${PYTHONPATH:+:$PYTHONPATH}"]
    assert "gpus_per_node" not in sweep.slurm_parameters(args, gpus=False)  # --device cpu asks Slurm for no GPU
    opted_out = sweep.Args().parse_args(["--launcher", "slurm", "--slurm_option", "no-requeue"])
    assert sweep.slurm_parameters(opted_out, gpus=False)["additional_parameters"] == {"no-requeue": True}


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--jobs", "0"], ": error: --jobs must be at least 1"),
        (["--gpus_per_run", "0"], ": error: --gpus_per_run must be at least 1"),
        (["--no_wait"], ": error: --no_wait only apply with --launcher slurm"),
        (["--slurm_partition", "p", "--slurm_option", "a=b"], ": error: --slurm_partition, --slurm_option only apply with --launcher slurm"),
        (["--launcher", "slurm", "--jobs", "2"], ": error: --jobs is for --launcher local; with Slurm, --slurm_array_parallelism"),
        (["--launcher", "slurm", "--slurm_option", "account="], ": error: --slurm_option 'account=': write KEY=VALUE"),
        (["--launcher", "pbs"], 'argument --launcher: Value for variable "launcher" must be one of'),
    ],
)
def test_bad_launcher_arguments_are_refused(argv: list[str], error: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        sweep.Args().parse_args(argv)
    assert e.value.code == 2
    assert error in capsys.readouterr().err


def test_config_records_the_slurm_job_of_a_run() -> None:
    assert runs.slurm_ids({"HOME": "/root"}) is None  # not under Slurm
    assert runs.slurm_ids({"SLURM_JOB_ID": "12"}) == {"job_id": "12"}
    task = {"SLURM_JOB_ID": "15", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "3"}
    assert runs.slurm_ids(task) == {"job_id": "15", "array_job_id": "12", "array_task_id": "3"}


def test_more_processes_than_cores_are_warned_about(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    assert sweep.oversubscription(jobs=2, nproc=1, cores=2) is None
    assert sweep.oversubscription(jobs=4, nproc=1, cores=2) == (
        "sweep: warning: --jobs 4 x 1 process(es) = 4 train.py processes on 2 CPU core(s): each gets 1 thread and about "
        "0.5 of a core, so every run is slower; --jobs 2 gives each process a core of its own"
    )
    assert "--jobs 1 gives" in sweep.oversubscription(jobs=2, nproc=2, cores=3)
    # What the sweep prints before the runs: the share of each, then the warning.
    monkeypatch.setattr(sweep.utils, "available_cpus", lambda: 1)
    monkeypatch.setattr(sweep, "aggregate_and_report", lambda *a: None)
    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--seeds", "1", "--jobs", "2", "--device", "cpu"), run=lambda launch, slot: 0)
    captured = capsys.readouterr()
    assert "sweep: 2 run(s) at once (1 thread(s) per process); logs in " in captured.out
    assert captured.err == sweep.oversubscription(jobs=2, nproc=1, cores=1) + "\n"


# --- resuming unfinished runs ------------------------------------------------------------------------


def make_unfinished(run: Path, copy: Path, checkpoint: bool) -> Path:
    """A copy of a finished run as a run stopped before its end leaves it, with or without its checkpoint."""
    shutil.copytree(run, copy)
    (copy / "test-metrics.json").unlink()
    if checkpoint:
        (copy / "checkpoint.pt").write_bytes(b"a checkpoint")
    return copy


def test_an_unfinished_run_with_a_checkpoint_is_resumed(swept: tuple[Path, str], tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    root, _ = swept
    finished = finished_runs(root / "outputs")
    configs = {run: utils.load_json(run / "config.json") for run in finished}
    seed_1 = [run for run in finished if configs[run]["seed"] == 1]
    resumable = make_unfinished(seed_1[0], tmp_path / "outputs" / seed_1[0].relative_to(root / "outputs"), checkpoint=True)
    make_unfinished(seed_1[1], tmp_path / "outputs" / seed_1[1].relative_to(root / "outputs"), checkpoint=False)
    lr = configs[seed_1[0]]["lr"]

    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--seeds", "1", "--num_workers=1", "--dry_run"), run=never)
    out = capsys.readouterr().out
    assert plan(out) == (2, 0, 2)
    assert "2 to run (1 of them resume a run from its checkpoint)" in out
    # Said in the run's title and command: only the runtime options go with --resume (the settings are in its config.json).
    assert f"] {tiny_model_dir} lr={lr:g} seed=1 dataset={dataset_dir} (resuming {resumable})\n" in out
    assert f"train.py --resume {resumable} --num_workers 1 --device cpu --tokenized_cache off --num_workers=1\n" in out
    assert out.count("--resume") == 1  # the run without a checkpoint starts afresh
    # A setting that differs (here --epochs) does not resume it.
    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--seeds", "1", "--epochs", "2", "--dry_run"), run=never)
    assert "--resume" not in capsys.readouterr().out


def test_resume_is_not_an_option_of_the_sweep(capsys) -> None:
    with pytest.raises(SystemExit):
        sweep.Args().parse_args(["--resume=outputs/x"])
    assert ": error: --resume is for one run (python src/train.py --resume RUN_DIR); the sweep resumes" in capsys.readouterr().err


# --- Slurm without Slurm, and sbatch's refusals ---------------------------------------------------------


def test_launcher_slurm_without_slurm_is_a_one_line_error(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no squeue
    with pytest.raises(InputError) as e:
        sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--launcher", "slurm"), run=never)
    assert str(e.value) == (
        "--launcher slurm: no Slurm here (sbatch and squeue not on PATH); run the sweep on a login node of the cluster, "
        "or without --launcher slurm to run it on this machine"
    )
    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--launcher", "slurm", "--dry_run"), run=never)  # a plan needs no Slurm


@pytest.mark.parametrize(
    ("stderr", "message"),
    [
        (
            "sbatch: error: Invalid generic resource (gres) specification",
            "sbatch refused the job: Invalid generic resource (gres) specification; if the partition has no GPUs, pass --device cpu",
        ),
        (
            "sbatch: error: invalid partition specified: gpu\nsbatch: error: Batch job submission failed: Invalid partition name specified",
            "sbatch refused the job: invalid partition specified: gpu; `sinfo -s` lists the partitions: pass one with --slurm_partition",
        ),
        (
            "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
            "sbatch refused the job: Invalid account or account/partition combination specified; check --slurm_option account=",
        ),
        (
            "sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
            "; lower --slurm_time (minutes) to the partition's limit",
        ),
        ("sbatch: error: Something new", "sbatch refused the job: Something new; check --slurm_partition and --slurm_option"),
    ],
)
def test_sbatch_refusals_are_one_line_with_the_likely_fix(stderr: str, message: str) -> None:
    said = sweep.sbatch_error(stderr)
    assert "\n" not in said and message in said


# --- signals: Ctrl-C and SIGTERM reach every run ----------------------------------------------------------

# A stand-in for train.py that stops as train.py does on SIGINT (130) or SIGTERM (143), saying which.
FAKE_RUN = """
import pathlib, signal, sys, time
said = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    with said.open("a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    sys.exit(128 + signum)
for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, stop)
said.with_suffix(".started").touch()
time.sleep(120)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_is_passed_on_to_every_run_and_stops_the_sweep(signum: int, tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    """2 runs at once, each a real process in its own process group, and a third waiting for a slot."""
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN, encoding="utf-8")
    pids = []
    handlers = {s: signal.getsignal(s) for s in sweep.STOP_SIGNALS}

    def fake_train(launch_: sweep.Launch, slot: sweep.Slot) -> int:
        said = tmp_path / f"{launch_.log_path.stem}.said"
        with sweep.RUNNING.started([sys.executable, str(script), str(said)]) as process:
            pids.append(process.pid)
            return process.wait()

    def send_when_both_run() -> None:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("*.started"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    sender = threading.Thread(target=send_when_both_run)
    sender.start()
    args = sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--lrs", "1e-3", "2e-3", "3e-3", "--seeds", "1", "--jobs", "2", "--device", "cpu")
    with pytest.raises(utils.Interrupted) as e:
        sweep.main(args, run=fake_train)
    sender.join()
    name = signal.Signals(signum).name
    assert e.value.signum == signum
    assert e.value.note.startswith("2 run(s) stopped, 1 not started, no train.py left running; run the same command again")
    # Each run got the signal once, from the sweep (its own process group: not from the terminal), and is gone.
    assert sorted(p.read_text() for p in tmp_path.glob("*.said")) == [f"{name}\n"] * 2
    assert len(pids) == 2 and not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert all(os.getpgid(os.getpid()) != pid for pid in pids)
    out = capsys.readouterr().out
    assert "running train.py run(s), which stop and keep their checkpoints; waiting for them" in out
    assert out.count(f"] stopped (exit code {128 + signum}) after ") == 2
    assert {s: signal.getsignal(s) for s in sweep.STOP_SIGNALS} == handlers  # the sweep's relay is gone: the handlers are restored


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_the_command_line_says_how_it_was_stopped_in_one_line(signum: int, code: int, monkeypatch, capsys) -> None:
    """Stopped outside the runs (planning, waiting for Slurm, aggregating): one line, 128 + the signal."""
    monkeypatch.setattr(sweep, "main", lambda args, run=None: os.kill(os.getpid(), signum))
    previous = {s: signal.getsignal(s) for s in sweep.STOP_SIGNALS}
    try:
        with pytest.raises(SystemExit) as e:
            sweep.cli([])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert e.value.code == code
    assert capsys.readouterr().err == f"interrupted by {signal.Signals(signum).name}\n"


def processes_mentioning(text: str) -> list[int]:
    """The pids of the processes whose command line mentions `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue  # gone meanwhile
    return found


def test_sigterm_to_the_sweep_command_stops_every_train_py_and_a_rerun_resumes_them(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    """End to end, as a scheduler's kill does it: SIGTERM to sweep.py alone, 2 real train.py runs at once;
    then the same sweep again resumes both runs from their checkpoints."""
    argv = [
        "--models", str(tiny_model_dir), "--lrs", *LRS, "--seeds", "1", "--dataset_dirs", str(dataset_dir),
        "--output_root", str(tmp_path / "outputs"), "--results_dir", str(tmp_path / "results"), *FORWARDED, "--epochs", "8", "--batch_size", "32", "--jobs", "2",
    ]  # fmt: skip
    process = subprocess.Popen([sys.executable, sweep.__file__, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Once both runs have finished an epoch (a checkpoint each), they are inside their training.
        def both_checkpoints() -> list[Path]:
            found = list((tmp_path / "outputs").glob("*/*/*/checkpoint.pt"))
            return found if len(found) >= 2 else []

        checkpoints = wait_for(both_checkpoints, 240, "a checkpoint of each run", interval=0.1, alive=lambda: process.poll() is None)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, (out, err)
    assert "Traceback" not in out + err
    assert "sweep: got SIGTERM: passed it on to the 2 running train.py run(s), which stop and keep their checkpoints; waiting for them" in out
    assert out.count("] stopped (exit code 143) after ") == 2  # train.py's own exit on SIGTERM
    assert err.splitlines()[-1].startswith("interrupted by SIGTERM: 2 run(s) stopped, 0 not started, no train.py left running; run the same command again")
    assert processes_mentioning(str(tmp_path)) == []
    runs_ = sorted(checkpoint.parent for checkpoint in checkpoints)

    # The same sweep again resumes both, and says so.
    sweep.main(sweep.Args().parse_args([*argv, "--jobs", "1"]), run=in_process)
    out = capsys.readouterr().out
    assert plan(out) == (2, 0, 2) and "2 to run (2 of them resume a run from its checkpoint)" in out
    for run in runs_:
        assert f": resuming {run}\n" in out and re.search(rf"^resumed {re.escape(str(run))} from epoch \d of 8", out, re.MULTILINE)
        assert pd.read_csv(run / "log.csv")["epoch"].tolist() == list(range(9))  # each epoch once
    assert finished_runs(tmp_path / "outputs") == runs_ and len(pd.read_csv(tmp_path / "results" / "all.csv")) == 2


# --- a Slurm task's decisions (the task itself runs on the real cluster in test_slurm.py) ---------------


@pytest.mark.parametrize(("said", "seconds"), [("1-02:03:04", 93784), ("2:03:04", 7384), ("3:04", 184), ("0:05", 5), ("INVALID", None), ("", None)])
def test_the_time_left_is_read_from_squeue(said: str, seconds: int | None, monkeypatch) -> None:
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=said + "\n", stderr=""))
    assert launch.slurm_seconds_left("12_3") == seconds


@pytest.mark.parametrize(("left", "timed_out", "requeued"), [(150.0, True, False), (None, True, False), (3000.0, False, True)])
def test_usr2_near_the_time_limit_is_a_time_out_and_earlier_a_preemption(left: float | None, timed_out: bool, requeued: bool, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(launch, "slurm_seconds_left", lambda job_id: left)
    monkeypatch.setattr(launch.subprocess, "run", lambda command, **k: calls.append(command))
    signals = launch.TaskSignals("12_3", signal_delay_s=90)
    signals.on_usr2(signal.SIGUSR2, None)
    assert (signals.timed_out, signals.terminated) == (timed_out, False)
    assert calls == ([["scontrol", "requeue", "12_3"]] if requeued else [])
    signals.on_term(signal.SIGTERM, None)
    assert signals.terminated


def test_a_requeued_task_continues_the_run_its_log_names(tmp_path: Path, monkeypatch) -> None:
    """A task that runs again after a requeue: the run folder named in its log is resumed, or left alone if finished."""
    started = []
    monkeypatch.setattr(launch, "run_logged", lambda launch_, slot, own_group: started.append((launch_.argv, own_group)) or 0)
    monkeypatch.setenv("SLURM_JOB_ID", "15")
    log = tmp_path / "001.log"
    task = launch.Launch("x", ["--model_name", "m", "--epochs", "3", "--device", "cpu"], 1, log, runtime_argv=["--device", "cpu"])

    assert launch.SlurmRun()(task) == 0  # a first attempt: a new run
    assert started == [(task.argv, False)]
    run = tmp_path / "outputs" / "run"  # as train.py leaves a run stopped after an epoch
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}", encoding="utf-8")
    (run / "checkpoint.pt").write_bytes(b"a checkpoint")
    log.write_text(f"# header\nrun folder: {run}\nepoch 1 ...\n", encoding="utf-8")
    assert launch.SlurmRun()(task) == 0
    assert started[-1] == (["--resume", str(run), "--device", "cpu"], False)
    assert f"task requeued: resuming {run} from its checkpoint" in log.read_text(encoding="utf-8")
    (run / "test-metrics.json").write_text("{}", encoding="utf-8")  # it finished before Slurm stopped the task
    started.clear()
    assert launch.SlurmRun()(task) == 0 and started == []
    assert f"{run} is finished (by an earlier attempt of this task)" in log.read_text(encoding="utf-8")


def test_a_task_stopped_by_slurm_leaves_no_result(tmp_path: Path, monkeypatch) -> None:
    """SIGTERM (preemption, requeue, scancel): no result, so that the sweep waits; the time limit: a reported failure."""
    log = tmp_path / "001.log"
    task = launch.Launch("x", ["--epochs", "3"], 1, log)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR2)}

    def stopped_by(handler: str):
        def run_logged(launch_: launch.Launch, slot: launch.Slot, own_group: bool) -> int:
            if handler == "on_usr2":
                signal.raise_signal(signal.SIGUSR2)
            signal.raise_signal(signal.SIGTERM)
            return 143
        return run_logged

    monkeypatch.setattr(launch, "run_logged", stopped_by("on_term"))
    with pytest.raises(SystemExit) as e:
        launch.SlurmRun()(task)
    assert e.value.code == 143  # SystemExit is no Exception: submitit writes no result
    monkeypatch.setattr(launch, "run_logged", stopped_by("on_usr2"))
    monkeypatch.setattr(launch, "slurm_seconds_left", lambda job_id: 60.0)
    with pytest.raises(launch.TaskStopped, match=r"^stopped by the Slurm time limit \(raise --slurm_time\)$"):
        launch.SlurmRun()(task)
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers  # the task's handlers are restored
