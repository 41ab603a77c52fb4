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


def test_rank_0_failing_alone_stops_every_rank_in_one_line(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    """Rank 0 cannot create the run folder while rank 1 waits for it; before, each printed a traceback."""
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where the output folder should be\n")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "src" / "train.py"),
        "--model_name", str(tiny_model_dir), "--dataset_dir", str(dataset_dir), "--output_root", str(blocker / "runs"),
        *TINY_TRAINING, "--epochs", "1",
    ]  # fmt: skip
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    assert elapsed < GLOO_DEFAULT_TIMEOUT_S / 6  # in practice the start-up time of two processes (10-60 s here)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1], result.stderr[-3000:]  # one line from each rank, the same
    assert re.fullmatch(rf"error: cannot create the run folder {re.escape(str(blocker))}/runs/\S+ \(Not a directory\): pass a writable --output_root", errors[0])
    assert not [line for line in result.stderr.splitlines() if line.startswith("[rank")]  # no rank's traceback


def test_a_failed_run_leaves_the_process_group(make_train_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def join_a_group_of_one(device) -> tuple[int, int]:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        return 0, 1

    monkeypatch.setattr(train, "init_distributed", join_a_group_of_one)
    with pytest.raises(InputError, match="label2id.json not found"):
        train.main(make_train_args(tmp_path / "out", "--dataset_dir", str(tmp_path / "missing")))
    assert not dist.is_initialized()
