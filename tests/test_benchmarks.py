"""Every benchmark of tests/benchmarks runs end to end at tiny settings, so that a stale import or name fails here.

The figures are not checked (they are measurements, README reports them): only that each benchmark
runs to its report and that the report holds what it promises.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def test_every_benchmark_has_a_smoke_test() -> None:
    tested = {name.removeprefix("test_").removesuffix("_smoke") for name in globals() if name.startswith("test_bench_") and name.endswith("_smoke")}
    # A benchmark with a test file of its own (tests/test_bench_start.py) is tested there.
    own_files = {path.stem.removeprefix("test_") for path in Path(__file__).parent.glob("test_bench_*.py")}
    assert tested | own_files == {path.stem for path in BENCHMARKS.glob("bench_*.py")} - {"bench_env"}


def test_bench_lora_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_lora

    bench_lora.main(bench_lora.Args().parse_args(["--hidden_size", "32", "--num_layers", "1", "--batch_size", "2", "--seq_len", "16", "--steps", "2"]))
    out = capsys.readouterr().out
    assert re.search(r"^full +[\d,]+ .* 1\.00x$", out, re.MULTILINE) and re.search(r"^lora +[\d,]+ ", out, re.MULTILINE)
    assert re.search(r"AdamW state, full / lora: [\d.]+x", out)


def test_bench_checkpoint_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_checkpoint

    results = bench_checkpoint.main(bench_checkpoint.Args().parse_args(["--models", "tiny-bert", "tiny-luke"]))
    assert "== bench_checkpoint ==" in capsys.readouterr().out
    bert, luke = results["tiny-bert"], results["tiny-luke"]
    assert bert["trainable"] == bert["params"] and luke["trainable"] < luke["params"]  # LUKE's entity queries are frozen
    # fp32 weights and best weights, two AdamW moments per trainable parameter: 16 bytes each, plus a little.
    for m in (bert, luke):
        assert 16 * m["trainable"] < m["bytes"] < 16 * m["trainable"] + 200_000


def test_bench_input_smoke(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import bench_input

    args = bench_input.Args().parse_args(["--model_name", str(tiny_model_dir), "--documents", "12", "--max_seq_lens", "32", "--epochs", "2", "--batch_size", "4"])
    results = bench_input.main(args)
    out = capsys.readouterr().out
    assert "== bench_input ==" in out and "| 32 | reference: tokenise every batch in collate, every epoch |" in out
    assert results[32]["same_ids"]["value"] == 1.0  # the fast path and the tokenizer's own code agree
    assert all(results[32][key]["first"] > 0 for key in bench_input.NAMES)


@pytest.mark.slow  # a sweep: train.py in a process of its own
def test_bench_sweep_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_sweep

    args = bench_sweep.Args().parse_args(["--jobs", "1", "--runs", "1", "--rounds", "1", "--epochs", "1", "--articles_per_category", "4"])
    seconds = bench_sweep.main(args)
    assert list(seconds) == [1] and len(seconds[1]) == 1 and seconds[1][0] > 0
    assert "| 1 | 1 | 1 |" in capsys.readouterr().out


def test_bench_sweep_alternates_the_order_of_the_jobs_values() -> None:
    import bench_sweep

    assert [bench_sweep.round_order([1, 2], i) for i in range(3)] == [[1, 2], [2, 1], [1, 2]]
    with pytest.raises(SystemExit):
        bench_sweep.Args().parse_args(["--jobs", "1", "1"])


def test_bench_tokenize_smoke(tiny_model_dir: Path, dataset_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import bench_tokenize

    bench_tokenize.main(bench_tokenize.Args().parse_args(["--model_name", str(tiny_model_dir), "--dataset_dir", str(dataset_dir), "--max_seq_len", "64"]))
    out = capsys.readouterr().out
    assert "== bench_tokenize ==" in out and "usable CPU cores" in out
    assert re.search(r"fast / slow: .* identical ids.*: yes\n", out), out  # the two paths agree


@pytest.mark.slow  # two measurements, each in a process of its own
def test_bench_train_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_train

    bench_train.main(bench_train.Args().parse_args([
        "--articles_per_category", "5", "--num_examples", "8", "--eval_examples", "4", "--batch_size", "4", "--max_seq_len", "32",
        "--epochs", "1", "--steps", "2", "--warmup_steps", "1", "--device", "cpu", "--num_workers", "1", "--repeat_body", "1",
    ]))  # fmt: skip
    out = capsys.readouterr().out
    assert "== bench_train ==" in out and "full loop / model-only step time:" in out


def test_bench_unused_smoke(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import bench_unused

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    threads = torch.get_num_threads()
    try:
        bench_unused.main(bench_unused.Args().parse_args(["--hidden_size", "16", "--num_layers", "1", "--batch_size", "2", "--max_seq_len", "16", "--steps", "1"]))
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "luke      find_unused" in out and "bert-word plain" in out
