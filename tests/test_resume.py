"""A run that is killed or interrupted continues from its last complete epoch (train.py --resume RUN_DIR) to the
results an uninterrupted run gets; Ctrl-C and SIGTERM end train.py in one line and leave the run resumable."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runs
import train
import train_options
import utils
from conftest import REPO, read_csv, train_argv
from utils import InputError

METRIC_COLUMNS = ("epoch", "train_loss", "loss", "accuracy", "precision", "recall", "f1", "lr")  # log.csv less its timing columns
RESULT_FILES = ("val-metrics.json", "test-metrics.json", "test-predictions.jsonl", "test-per-class.csv", "test-confusion-matrix.csv")


def interrupted_run(signal_name: str, epoch: int, argv: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    """train.py's command line, sent `signal_name` just before it writes the checkpoint of `epoch` (tests/interrupt_train.py)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command = [*launcher, str(REPO / "tests" / "interrupt_train.py"), signal_name, str(epoch), *argv]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)


def metric_rows(run_dir: Path) -> list[list[str]]:
    return [[row[column] for column in METRIC_COLUMNS] for row in read_csv(run_dir / "log.csv")]


def assert_same_results(resumed: Path, uninterrupted: Path) -> None:
    assert metric_rows(resumed) == metric_rows(uninterrupted)  # every epoch once, with the same losses and scores
    for name in RESULT_FILES:
        assert (resumed / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def test_a_run_killed_after_epoch_2_resumes_to_the_results_of_an_uninterrupted_run(
    finished_run: Path, tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = interrupted_run("SIGKILL", 3, train_argv(tiny_model_dir, dataset_dir, tmp_path))
    assert result.returncode == -9, result.stderr[-3000:]
    (run_dir,) = tmp_path.glob("*/*/*")
    # Killed after logging epoch 3 but before its checkpoint: the checkpoint is epoch 2's, log.csv one row ahead.
    assert [row[0] for row in metric_rows(run_dir)] == ["0", "1", "2", "3"]
    assert runs.load_checkpoint(run_dir)["epoch"] == 2
    assert not (run_dir / "test-metrics.json").exists()
    config = (run_dir / "config.json").read_bytes()

    assert train.main(train_options.Args().parse_args(["--resume", str(run_dir)])) == run_dir  # the runtime options of the run, too
    assert f"resumed {run_dir} from epoch 2 of 10" in capsys.readouterr().out
    assert_same_results(run_dir, finished_run)  # the uninterrupted run: the same settings (and --save_model)
    assert (run_dir / "config.json").read_bytes() == config
    assert not (run_dir / runs.CHECKPOINT).exists()  # --checkpoint last: removed once the run finished


@pytest.mark.parametrize(("signal_name", "exit_code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_and_sigterm_end_in_one_line_and_leave_the_run_resumable(
    signal_name: str, exit_code: int, tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    result = interrupted_run(signal_name, 2, train_argv(tiny_model_dir, dataset_dir, tmp_path))
    (run_dir,) = tmp_path.glob("*/*/*")
    assert result.returncode == exit_code
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"interrupted by {signal_name}: {run_dir} resumes from its last complete epoch with: python src/train.py --resume {run_dir}"
    )
    assert not (run_dir / "test-metrics.json").exists()
    assert runs.load_checkpoint(run_dir)["epoch"] == 1
    assert runs.resumable_config(run_dir)["seed"] == 42


def test_resume_refuses_what_it_cannot_continue(finished_run: Path, tmp_path: Path) -> None:
    def resume(run_dir: Path, *extra: str) -> None:
        train.main(train_options.Args().parse_args(["--resume", str(run_dir), *extra]))

    with pytest.raises(InputError, match=rf"^--resume {tmp_path / 'none'}: not a run folder of train.py \(no config.json\)"):
        resume(tmp_path / "none")
    with pytest.raises(InputError, match=rf"^--resume {finished_run}: this run already finished \(it has test-metrics.json\); to train again, start a new run"):
        resume(finished_run)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(finished_run / "config.json", unfinished)
    with pytest.raises(InputError, match=rf"^--resume {unfinished}: no checkpoint.pt \(the run stopped before the end of its first epoch, or ran with --checkpoint off\); start it again without --resume$"):
        resume(unfinished)
    (unfinished / runs.CHECKPOINT).write_bytes(b"half a checkpoint")
    with pytest.raises(InputError, match=r"^--resume .*: --lr 0.1 differs from the run's own setting \(lr 0.005 in its config.json\): a resumed run keeps its settings; drop --lr"):
        resume(unfinished, "--lr", "0.1")
    # A setting equal to the run's own passes (a sweep may repeat the whole command line); the file itself is then refused.
    with pytest.raises(InputError, match=rf"^{unfinished / runs.CHECKPOINT} cannot be read \(.*\); start the run again without --resume$"):
        resume(unfinished, "--lr", "5e-3", "--eval_batch_size", "7")


def test_resumed_args_keep_the_settings_and_take_runtime_options_given_anew(finished_run: Path) -> None:
    config = utils.load_json(finished_run / "config.json")
    args = train_options.Args().parse_args(["--resume", str(finished_run), "--num_work", "3", "--device", "auto", "--epochs", "10"])
    assert train_options.given_options(args) == {"resume", "num_workers", "device", "epochs"}  # an abbreviation counts as given
    resumed = train_options.resumed_args(args, config)
    assert (resumed.num_workers, resumed.device) == (3, "auto")  # given anew
    assert resumed.save_model is True and resumed.tokenized_cache == "off"  # the run's own, not the defaults
    assert (resumed.lr, resumed.epochs, resumed.max_seq_len) == (5e-3, 10, 64)
    assert resumed.dataset_dir == Path(config["dataset_dir"]) and isinstance(resumed.tokenized_cache_dir, Path)
    assert resumed.resume == finished_run


def test_checkpoint_keep_leaves_the_last_one_and_off_writes_none(make_train_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = train.main(make_train_args(tmp_path / "keep", "--epochs", "2", "--checkpoint", "keep"))
    checkpoint = runs.load_checkpoint(run_dir)
    assert checkpoint["epoch"] == 2 and len(checkpoint["rng"]) == 1  # one process
    assert [row["epoch"] for row in checkpoint["log"]] == [0, 1, 2] == [int(row["epoch"]) for row in read_csv(run_dir / "log.csv")]
    assert checkpoint["best_epoch"] == utils.load_json(run_dir / "val-metrics.json")["best-epoch"]
    assert set(checkpoint) >= {"model", "optimizer", "scheduler", "scaler", "best_model", "best_f1"}
    assert checkpoint["optimizer"]["state"] and checkpoint["scheduler"]["last_epoch"] == 2 * 27  # 216 examples / batch 8, 2 epochs
    assert all(isinstance(value, torch.Tensor) for value in checkpoint["best_model"].values())

    saved: list[int] = []
    monkeypatch.setattr(runs, "save_checkpoint", lambda run_dir, checkpoint: saved.append(checkpoint["epoch"]))
    run_dir = train.main(make_train_args(tmp_path / "off", "--epochs", "1", "--checkpoint", "off"))
    assert saved == [] and not (run_dir / runs.CHECKPOINT).exists()


def test_the_checkpoint_leaves_out_frozen_weights_and_a_resumed_model_keeps_its_own(tmp_path: Path) -> None:
    """Frozen weights (a LoRA base, LUKE's entity queries) never change: not saved, and not overwritten on resume."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = runs.checkpoint_state(1, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), 1, 0.5, {}, [], [])
    assert set(state["model"]) == {"0.bias", "1.weight", "1.bias"}

    resumed = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    resumed[0].weight.requires_grad_(False)
    frozen = resumed[0].weight.detach().clone()
    runs.load_trained_state(resumed, state["model"], tmp_path)
    assert torch.equal(resumed[1].weight, model[1].weight) and torch.equal(resumed[0].weight, frozen)
    with pytest.raises(InputError, match=r"checkpoint.pt does not fit this model \(3 weights, e.g. 1.weight\): was --model_name changed\?"):
        runs.load_trained_state(torch.nn.Sequential(torch.nn.Linear(4, 4)), state["model"], tmp_path)


def test_early_stopping_ends_before_the_checkpoint_of_its_last_epoch(make_train_args, tmp_path: Path) -> None:
    """A run resumed from the last checkpoint trains the stopping epoch again and stops there again, instead of going on."""
    run_dir = train.main(make_train_args(tmp_path, "--checkpoint", "keep", "--early_stopping_patience", "1"))
    last = int(read_csv(run_dir / "log.csv")[-1]["epoch"])
    assert last < 10  # it stopped early
    assert runs.load_checkpoint(run_dir)["epoch"] == last - 1


@pytest.mark.slow  # three torchrun launches of 2 processes
def test_under_torchrun_every_rank_resumes_and_rank_0_writes(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    """2 gloo processes: rank 0 killed (SIGKILL) before the checkpoint of epoch 2, resumed, compared with an uninterrupted run."""
    killed = interrupted_run("SIGKILL", 2, train_argv(tiny_model_dir, dataset_dir, tmp_path / "killed", "--epochs", "3"), nproc=2)
    assert killed.returncode != 0
    (run_dir,) = (tmp_path / "killed").glob("*/*/*")
    checkpoint = runs.load_checkpoint(run_dir)
    assert checkpoint["epoch"] == 1 and len(checkpoint["rng"]) == 2  # each rank's own generators
    two_processes = tmp_path / "two-processes"  # for the last check
    two_processes.mkdir()
    for name in ("config.json", runs.CHECKPOINT):
        shutil.copy(run_dir / name, two_processes)

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "src" / "train.py")]
    resumed = subprocess.run([*torchrun, "--resume", str(run_dir)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count(f"resumed {run_dir} from epoch 1 of 3") == 1  # rank 0 prints (and writes)
    whole = subprocess.run(
        [*torchrun, *train_argv(tiny_model_dir, dataset_dir, tmp_path / "whole", "--epochs", "3")], capture_output=True, cwd=REPO, timeout=600
    )
    assert whole.returncode == 0
    (uninterrupted,) = (tmp_path / "whole").glob("*/*/*")
    assert_same_results(run_dir, uninterrupted)
    # The process count is part of the setting (it changes the effective batch): a resumed run keeps it.
    with pytest.raises(InputError, match=r"the run had 2 process\(es\), this is 1; resume it with torchrun --nproc_per_node 2 src/train.py$"):
        train.main(train_options.Args().parse_args(["--resume", str(two_processes)]))
