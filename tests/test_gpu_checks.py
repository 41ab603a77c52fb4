"""tests/gpu/run.sh without CUDA, and the assertion every GPU check makes (metrics agree with predictions)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

REPO = Path(__file__).resolve().parents[1]


def load_checks():
    spec = importlib.util.spec_from_file_location("gpu_checks", REPO / "tests" / "gpu" / "checks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_checks"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


checks = load_checks()


def test_run_sh_without_cuda_reports_every_check_skipped_with_the_reason_and_exits_0(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine
    env.pop("GPU_CHECKS_DEVICE", None)
    result = subprocess.run(["bash", "tests/gpu/run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "gpu-checks.md").read_text(encoding="utf-8").splitlines()
    assert table[0] == "| check | status | seconds | figure |"
    rows = [line.strip("|").split(" | ") for line in table[2:]]
    assert [row[0].strip() for row in rows] == [check.name for check in checks.CHECKS]
    assert {"fp32", "bf16", "fp16", "--compile", "gradient_checkpointing", "torchrun", "sweep.py --jobs", "predict.py on cuda", "LoRA bf16",
            "bert-base model-only", "bert-base full loop"} <= {row[0].strip() for row in rows}  # fmt: skip
    for row in rows:
        assert row[1] == "skipped" and "no CUDA device" in row[3] and "torch.cuda.is_available() is False" in row[3], row
    assert "\n".join(table) in result.stdout  # the table ends the output
    assert result.stdout.rstrip().endswith(table[-1])
    assert (tmp_path / "gpu-checks.log").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["gpu-checks.log", "gpu-checks.md"]


def test_run_sh_where_torch_cannot_be_imported_says_why_and_exits_0(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "torch.py").write_text("raise ImportError('torch is broken here')\n", encoding="utf-8")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(broken)}
    for name in ("GPU_CHECKS_DEVICE", "OUT"):
        env.pop(name, None)
    result = subprocess.run(["bash", "tests/gpu/run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and " | skipped | " in line]
    assert len(rows) == len(checks.CHECKS)
    assert all(f"torch cannot be imported by {sys.executable}: ImportError: torch is broken here" in row for row in rows), rows


def test_verify_run_accepts_a_finished_run_and_rejects_metrics_that_disagree(finished_run: Path, tmp_path: Path) -> None:
    metrics = checks.verify_run(finished_run)
    assert metrics == json.loads((finished_run / "test-metrics.json").read_text(encoding="utf-8"))

    run = shutil.copytree(finished_run, tmp_path / "run", ignore=shutil.ignore_patterns("model"))
    (run / "test-metrics.json").write_text(json.dumps({**metrics, "f1": metrics["f1"] + 0.01}), encoding="utf-8")
    with pytest.raises(checks.CheckFailed, match=r"test-metrics.json: f1 .* from the 27 predictions"):
        checks.verify_run(run)

    (run / "test-metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    rows = [json.loads(line) for line in (run / "test-predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    rows[3]["pred"] = (rows[3]["pred"] + 1) % len(rows[3]["probs"])  # no longer the most probable class
    (run / "test-predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    with pytest.raises(checks.CheckFailed, match=r"test-predictions.jsonl:4: probs sum to 1.0000 and peak at"):
        checks.verify_run(run)

    (run / "test-metrics.json").unlink()
    with pytest.raises(checks.CheckFailed, match="test-metrics.json missing: the run did not finish"):
        checks.verify_run(run)


def test_recomputed_metrics_equal_sklearns_with_absent_classes() -> None:
    rng = random.Random(0)
    num_labels = 6
    rows = []
    for _ in range(50):
        label = rng.choice([0, 1, 2, 4])  # 3 and 5 never occur as labels; 5 is never predicted either
        probs = [rng.random() for _ in range(num_labels - 1)] + [0.0]
        total = sum(probs)
        probs = [p / total for p in probs]
        rows.append({"label": label, "pred": max(range(num_labels), key=probs.__getitem__), "probs": probs})
    ours = checks.recompute_metrics(rows)
    labels, preds = [r["label"] for r in rows], [r["pred"] for r in rows]
    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, labels=list(range(num_labels)), average="macro", zero_division=0)
    assert ours["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)
    assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((precision, recall, f1), abs=1e-12)
