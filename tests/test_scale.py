"""Scale and speed: DDP with torchrun on CPU processes, gradient accumulation, precision flags."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from sklearn.metrics import f1_score

import data
import modeling
import tokenization
import train
import utils
from conftest import TINY_TRAINING, read_csv
from utils import InputError

REPO = Path(__file__).resolve().parents[1]


def test_torchrun_with_two_cpu_processes(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "src" / "train.py"),
        "--model_name", str(tiny_model_dir), "--dataset_dir", str(dataset_dir), "--output_root", str(tmp_path),
        *TINY_TRAINING, "--batch_size", "4",  # 4 per process x 2 processes: the usual effective batch of 8
        "--save_model", "--tokenized_cache", "on", "--tokenized_cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    (run_dir,) = tmp_path.glob("*/*/*")  # one run folder, written by rank 0 only (the cache entry is at cache/*)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # both ranks read one cache entry, written once
    assert result.stdout.count("run folder:") == 1
    assert "effective batch 4 x 1 accumulation x 2 process(es) = 8" in result.stdout
    assert utils.load_json(run_dir / "config.json")["environment"]["world_size"] == 2

    # 27 test examples over 2 processes: each predicted exactly once, none padded in twice.
    predictions = utils.load_jsonl(run_dir / "test-predictions.jsonl")
    assert [p["id"] for p in predictions] == [r["id"] for r in utils.load_jsonl(dataset_dir / "test.jsonl")]
    metrics = utils.load_json(run_dir / "test-metrics.json")
    labels, preds = [p["label"] for p in predictions], [p["pred"] for p in predictions]
    assert metrics["accuracy"] == pytest.approx(sum(a == b for a, b in zip(labels, preds)) / len(labels))
    assert metrics["f1"] == pytest.approx(f1_score(labels, preds, labels=list(range(9)), average="macro", zero_division=0))
    assert metrics["loss"] == pytest.approx(sum(-math.log(p["probs"][p["label"]]) for p in predictions) / len(predictions), rel=1e-5)
    assert metrics["accuracy"] >= 0.6  # it learns under DDP too
    with safe_open(run_dir / "model" / "model.safetensors", "pt") as f:  # saved without DDP's module. prefix
        assert "classifier.weight" in f.keys() and not [k for k in f.keys() if k.startswith("module.")]


def test_accumulated_gradient_equals_one_batch(tiny_model_dir: Path, dataset_dir: Path) -> None:
    label2id = data.load_label2id(dataset_dir)
    tokenizer, model = modeling.load_model(str(tiny_model_dir), label2id)
    model.eval()  # no dropout, so the two ways see the same function
    rows = data.load_split(dataset_dir, "train", ["title", "body"], 9)[:8]
    layout = tokenization.InputLayout(("title", "body"), 64)
    examples = tokenization.SlowEncoder(tokenizer, "test")(tokenization.texts_of(rows, layout.text_fields), layout, True).examples([r["label"] for r in rows])
    autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def gradients(window_sizes: list[int]) -> list[torch.Tensor]:
        model.zero_grad()
        starts = [sum(window_sizes[:i]) for i in range(len(window_sizes))]
        window = [data.collate(examples[s : s + n], tokenizer.pad_token_id) for s, n in zip(starts, window_sizes)]
        train.accumulate_gradients(model, window, sum(window_sizes), torch.device("cpu"), autocast, scaler, world_size=1)
        return [p.grad.clone() for p in model.parameters()]

    # Unequal micro-batches (5 + 3) give the gradient of the batch of 8.
    for accumulated, whole in zip(gradients([5, 3]), gradients([8])):
        torch.testing.assert_close(accumulated, whole, atol=1e-6, rtol=1e-4)


def test_accumulation_keeps_the_optimizer_steps_and_schedule(make_train_args, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole = train.main(make_train_args(tmp_path / "a", "--epochs", "2", "--batch_size", "10"))
    assert "effective batch 10 x 1 accumulation x 1 process(es) = 10; 22 optimizer steps per epoch" in capsys.readouterr().out
    halves = train.main(make_train_args(tmp_path / "b", "--epochs", "2", "--batch_size", "5", "--gradient_accumulation_steps", "2"))
    # 216 examples: 22 batches of 10, or 44 of 5 taken 2 at a time (the last step of an epoch is partial).
    assert "effective batch 5 x 2 accumulation x 1 process(es) = 10; 22 optimizer steps per epoch" in capsys.readouterr().out
    lrs = [[row["lr"] for row in read_csv(run / "log.csv")] for run in (whole, halves)]
    assert lrs[0] == lrs[1]
    assert float(lrs[0][1]) == pytest.approx(5e-3)  # end of the warm-up epoch: the peak


def test_low_precision_checkpointing_and_accumulation_together_on_cpu(make_train_args, tmp_path: Path) -> None:
    for dtype in ("bf16", "fp16"):
        run_dir = train.main(make_train_args(
            tmp_path / dtype, "--epochs", "1", "--dtype", dtype, "--gradient_checkpointing", "--gradient_accumulation_steps", "2",
        ))  # fmt: skip
        config = utils.load_json(run_dir / "config.json")
        assert config["environment"]["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
        assert (run_dir / "test-metrics.json").exists()


def test_compiled_model_trains_and_saves_without_prefixes(make_train_args, tmp_path: Path) -> None:
    run_dir = train.main(make_train_args(tmp_path, "--epochs", "1", "--compile", "--save_model"))
    assert (run_dir / "test-metrics.json").exists()
    with safe_open(run_dir / "model" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "classifier.weight" in keys
    assert not [k for k in keys if k.startswith(("_orig_mod.", "module."))]


def test_unavailable_device_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=r"--device cuda: CUDA is not available on this machine; use --device auto or cpu"):
        modeling.resolve_device("cuda")
