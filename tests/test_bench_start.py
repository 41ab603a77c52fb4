"""Smoke test of tests/benchmarks/bench_start.py (tiny settings), and of its patch of the reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

import bench_start  # noqa: E402
from utils import InputError  # noqa: E402


def test_bench_start_prints_the_breakdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = bench_start.Args().parse_args(
        ["--train_examples", "18", "--eval_examples", "9", "--epochs", "1", "--max_seq_len", "32", "--work_dir", str(tmp_path)]
    )
    bench_start.main(args)
    out = capsys.readouterr().out
    assert "18/9/9 examples, 1 epochs at 32 tokens" in out
    for phase in ("before tokenisation", "tokenise", "train + evaluate", "write results", "exit after the last line", "whole run"):
        (line,) = [line for line in out.splitlines() if line.startswith(f"{phase}  ")]
        assert float(line.split()[-1]) >= 0
    assert [len(bench_start.utils.load_jsonl(tmp_path / "dataset" / f"{split}.jsonl")) for split in ("train", "val", "test")] == [18, 9, 9]


def fake_reference(tmp_path: Path, train_py: str) -> Path:
    repo = tmp_path / "reference"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "train.py").write_text(train_py, encoding="utf-8")
    (repo / "src" / "utils.py").write_text("", encoding="utf-8")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "reference"], check=True)
    return repo


def test_the_reference_is_patched_to_run_on_cpu(tmp_path: Path) -> None:
    original = "\n".join(old for _, old, _ in bench_start.REFERENCE_PATCH) + "\n"
    patched = bench_start.extract_reference(fake_reference(tmp_path, original), tmp_path / "extracted")
    text = (patched / "src" / "train.py").read_text(encoding="utf-8")
    assert text == "\n".join(new for _, _, new in bench_start.REFERENCE_PATCH) + "\n"
    assert (patched / "src" / "__init__.py").read_text(encoding="utf-8") == ""  # src.utils imports as a package


def test_a_changed_reference_is_reported(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="the CPU patch no longer applies"):
        bench_start.extract_reference(fake_reference(tmp_path, "import torch\n"), tmp_path / "extracted")
