"""The reference's defaults (no gradient clipping, TF32 matmuls), a warm-up longer than training, the Params column."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
import utils
from conftest import read_csv


def test_defaults_are_the_references() -> None:
    args = train.Args().parse_args([])
    assert args.max_grad_norm == 0  # the reference has no gradient clipping
    assert (args.epochs, args.num_warmup_epochs, args.batch_size, args.weight_decay) == (20, 2, 16, 0.01)


def test_one_epoch_with_the_default_warm_up_never_reaches_the_peak(
    make_train_args, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The reference accepts --epochs 1 with its 2 warm-up epochs; the learning rate only rises.
    args = make_train_args(tmp_path, "--epochs", "1", "--num_warmup_epochs", "2")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        run_dir = train.main(args)
        precision = torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision(previous)
    out = capsys.readouterr().out
    assert "note: the warm-up (2 epochs) is longer than the training (1): the learning rate rises all along and never reaches its peak --lr 0.005" in out
    rows = read_csv(run_dir / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    # 216 examples / batch 8 = 27 steps of the 54 warm-up steps: half the peak.
    assert float(rows[1]["lr"]) == pytest.approx(5e-3 * 27 / 54)
    assert (run_dir / "test-metrics.json").exists()
    # TF32 matmuls, as the reference's utils.init sets them, and recorded.
    assert precision == "high"
    config = utils.load_json(run_dir / "config.json")
    assert config["environment"]["float32_matmul_precision"] == "high"
    assert config["max_grad_norm"] == 0


@pytest.mark.parametrize("flag", ["--num_warmup_epochs", "--max_grad_norm"])
def test_negative_warm_up_or_clipping_is_refused(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train.Args().parse_args([flag, "-1"])
    assert f"{flag} cannot be negative" in capsys.readouterr().err
