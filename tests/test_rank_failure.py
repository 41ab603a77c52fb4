"""Under torchrun, a failure on one rank stops every rank promptly, each with the one-line error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import train
from conftest import TINY_TRAINING
from utils import InputError

REPO = Path(__file__).resolve().parents[1]
GLOO_DEFAULT_TIMEOUT_S = 30 * 60  # what the other ranks would wait in a collective for a rank that never comes


def torchrun_train(tiny_model_dir: Path, dataset_dir: Path, output_root: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float, list[str]]:
    """train.py under torchrun with 2 gloo processes: the result, its wall time and its `error:` lines."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "src" / "train.py"),
        "--model_name", str(tiny_model_dir), "--dataset_dir", str(dataset_dir), "--output_root", str(output_root),
        *TINY_TRAINING, "--epochs", "1", *extra,
    ]  # fmt: skip
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    # Each rank writes its error line in one piece, but on a shared stderr it may land right after
    # another rank's unfinished progress bar: take every "error: ..." up to its own newline.
    errors = ["error: " + part.splitlines()[0] for part in result.stderr.split("error: ")[1:]]
    return result, time.monotonic() - start, errors


def assert_every_rank_ended_in_one_line(result: subprocess.CompletedProcess, elapsed: float, errors: list[str]) -> None:
    assert result.returncode == 1
    assert elapsed < GLOO_DEFAULT_TIMEOUT_S / 6  # in practice the start-up time of two processes (10-60 s here)
    assert len(errors) == 2 and errors[0] == errors[1], result.stderr[-3000:]  # one line from each rank, the same
    assert not [line for line in result.stderr.splitlines() if line.startswith("[rank")]  # no rank's traceback


def test_rank_0_failing_alone_stops_every_rank_in_one_line(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    """Rank 0 cannot create the run folder while rank 1 waits for it; before, each printed a traceback."""
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where the output folder should be\n")
    result, elapsed, errors = torchrun_train(tiny_model_dir, dataset_dir, blocker / "runs")
    assert_every_rank_ended_in_one_line(result, elapsed, errors)
    assert re.fullmatch(rf"error: cannot create the run folder {re.escape(str(blocker))}/runs/\S+ \(Not a directory\): pass a writable --output_root", errors[0])


def test_a_diverging_loss_stops_every_rank_in_one_line(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    """The step loss is all-reduced, so every rank sees the NaN at the same step and stops there."""
    result, elapsed, errors = torchrun_train(
        tiny_model_dir, dataset_dir, tmp_path, "--lr", "1e20", "--num_warmup_epochs", "0", "--max_grad_norm", "0"
    )
    assert_every_rank_ended_in_one_line(result, elapsed, errors)
    assert re.fullmatch(r"error: the loss became (nan|inf) in epoch 1: lower --lr \(or clip with --max_grad_norm 1.0\)", errors[0])
    (run_dir,) = tmp_path.glob("*/*/*")
    assert not (run_dir / "test-metrics.json").exists()


def test_a_failed_run_leaves_the_process_group(make_train_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def join_a_group_of_one(device) -> tuple[int, int]:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        return 0, 1

    monkeypatch.setattr(train, "init_distributed", join_a_group_of_one)
    with pytest.raises(InputError, match="label2id.json not found"):
        train.main(make_train_args(tmp_path / "out", "--dataset_dir", str(tmp_path / "missing")))
    assert not dist.is_initialized()
