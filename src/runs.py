"""The run folder and its records: its name, config.json, log.csv and the test outputs.

A run folder is OUTPUT_ROOT/<model>/<YYYY-MM-DD>/<HH-MM-SS.ffffff>/; test-metrics.json, written last,
marks it finished.
"""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import transformers
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from tap import Tap

import utils
from utils import InputError


def run_dir_name(model_name: str, now: datetime) -> Path:
    """<model>/<YYYY-MM-DD>/<HH-MM-SS.ffffff>: hub names with / as __, local folders by their name."""
    model = Path(model_name).name if Path(model_name).is_dir() else model_name.replace("/", "__")
    return Path(model, now.strftime("%Y-%m-%d"), now.strftime("%H-%M-%S.%f"))


def make_run_dir(output_root: Path, model_name: str) -> Path:
    """A new folder, never an existing one (exist_ok=False; retried on the rare same-microsecond clash)."""
    while True:
        run_dir = output_root / run_dir_name(model_name, datetime.now())
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            if run_dir.is_dir():  # another run started in the same microsecond: take the next one
                continue
            raise InputError(f"cannot create the run folder {run_dir} (a file is in the way): pass another --output_root") from None
        except OSError as e:  # not a folder, no permission, disk full
            raise InputError(f"cannot create the run folder {run_dir} ({e.strerror}): pass a writable --output_root") from None


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def args_to_json(args: Tap) -> dict[str, Any]:
    """The arguments as config.json stores them: paths as strings, everything else with its JSON type."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in args.as_dict().items()}


def slurm_ids(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The Slurm job (and array task) that ran this process, or None outside Slurm."""
    if "SLURM_JOB_ID" not in environ:
        return None
    names = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID"}
    return {key: environ[name] for key, name in names.items() if name in environ}


def run_config(
    args: Tap, runtime_options: Sequence[str], num_params: int, num_encoder_params: int, num_labels: int, run_dir: Path,
    device: torch.device, dtype: torch.dtype, world_size: int, dataset: dict[str, Any],
) -> dict:
    """Every argument with its JSON type, the names of those that are runtime options (not settings),
    plus what is needed to read the run later: among it the dataset's description (data.load_description),
    by which aggregate.py tells tasks apart.

    The process count is a setting, not an environment detail: it multiplies the effective batch
    and divides the optimizer steps, so runs with different counts are different experiments.
    """
    config = args_to_json(args)
    environment = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(dtype).removeprefix("torch."),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "world_size": world_size,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
        "started_at": datetime.now().isoformat(timespec="seconds"),
        "slurm": slurm_ids(os.environ),
    }
    return {
        **config, "runtime_options": list(runtime_options), "world_size": world_size, "num_params": num_params,
        "num_encoder_params": num_encoder_params, "num_labels": num_labels, "dataset": dataset, "run_dir": str(run_dir),
        "environment": environment,
    }  # fmt: skip


def append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def write_test_outputs(run_dir: Path, predictions: list[dict], rows: list[dict], id2label: dict[int, str]) -> None:
    """Per-example predictions, the per-class report and the confusion matrix (with category names)."""
    names = [id2label[i] for i in range(len(id2label))]
    utils.save_jsonl(
        (
            {"id": row["id"], "label": p["label"], "pred": p["pred"], "probs": torch.softmax(p["logits"], -1).tolist()}
            for row, p in zip(rows, predictions)
        ),
        run_dir / "test-predictions.jsonl",
    )
    labels, preds = [p["label"] for p in predictions], [p["pred"] for p in predictions]
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=list(range(len(names))), zero_division=0)
    utils.save_csv(
        ["category", "precision", "recall", "f1", "support"],
        zip(names, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist()),
        run_dir / "test-per-class.csv",
    )
    matrix = confusion_matrix(labels, preds, labels=list(range(len(names))))
    utils.save_csv(
        ["true \\ predicted", *names],
        ([name, *counts] for name, counts in zip(names, matrix.tolist())),
        run_dir / "test-confusion-matrix.csv",
    )
