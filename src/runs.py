"""The run folder and its records: its name, config.json, log.csv, the checkpoint and the test outputs.

A run folder is OUTPUT_ROOT/<model>/<YYYY-MM-DD>/<HH-MM-SS.ffffff>/. It is FINISHED when it has
test-metrics.json (written last), and RESUMABLE when it has config.json and checkpoint.pt but no
test-metrics.json: `train.py --resume RUN_DIR` continues it from the end of its last complete epoch.
"""

from __future__ import annotations

import os
import pickle
import platform
import random
import subprocess
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tap import Tap

import utils
from evaluation import Objective, confusion_matrix, per_label_report
from utils import CHECKPOINT, InputError

LABEL_COUNTS_FILE = "test-label-counts.csv"  # multi-label runs: per label, the test examples counted as TP, FP, FN, TN


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
    """The arguments as config.json stores them: paths as strings, everything else with its JSON type,
    in the order the Args classes declare them (Tap's as_dict order follows set iteration, which varies)."""
    values = args.as_dict()
    return {key: str(values[key]) if isinstance(values[key], Path) else values[key] for key in args.class_variables if key in values}


def slurm_ids(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The Slurm job (and array task) that ran this process, or None outside Slurm."""
    if "SLURM_JOB_ID" not in environ:
        return None
    names = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID"}
    return {key: environ[name] for key, name in names.items() if name in environ}


def run_config(
    args: Tap, runtime_options: Sequence[str], num_params: int, num_encoder_params: int, num_labels: int, run_dir: Path,
    device: torch.device, dtype: torch.dtype, world_size: int, dataset: dict[str, Any], problem_type: str = "single_label_classification",
    num_trainable_params: int | None = None,
) -> dict:
    """Every argument with its JSON type, the names of those that are runtime options (not settings),
    plus what is needed to read the run later: among it the dataset's description (data.load_description),
    by which aggregate.py tells tasks apart, and the task type its labels gave (problem_type).

    The process count is a setting, not an environment detail: it multiplies the effective batch
    and divides the optimizer steps, so runs with different counts are different experiments.
    """
    # Settings first, then runtime options, each in declaration order; then the derived fields.
    config = dict(sorted(args_to_json(args).items(), key=lambda item: item[0] in runtime_options))
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
        "num_encoder_params": num_encoder_params, "num_trainable_params": num_params if num_trainable_params is None else num_trainable_params,
        "num_labels": num_labels, "problem_type": problem_type, "dataset": dataset, "run_dir": str(run_dir), "environment": environment,
    }  # fmt: skip


def record_in_config(run_dir: Path, **facts: Any) -> None:
    """Add what the run found (e.g. truncation_report) to its config.json, rewritten atomically.

    These are facts, not settings: aggregate.py lists them in RUN_FACTS.
    """
    path = run_dir / "config.json"
    utils.save_json({**utils.load_json(path), **facts}, path)


def save_log(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """log.csv, a row per evaluation so far; rewritten whole (atomically), so it never ends in half a row."""
    header = list(rows[0])
    utils.save_csv(header, ([row[key] for key in header] for row in rows), run_dir / "log.csv")


def write_test_outputs(run_dir: Path, predictions: list[dict], rows: list[dict], id2label: dict[int, str], objective: Objective) -> None:
    """Per-example predictions (with probabilities), the per-class report, and the confusion matrix
    (single-label) or the per-label counts TP/FP/FN/TN (multi-label), with category names."""
    names = [id2label[i] for i in range(len(id2label))]
    utils.save_jsonl(
        (
            {"id": row["id"], "label": p["label"], "pred": p["pred"], "probs": objective.probabilities(p["logits"]).tolist()}
            for row, p in zip(rows, predictions)
        ),
        run_dir / "test-predictions.jsonl",
    )
    labels, preds = [p["label"] for p in predictions], [p["pred"] for p in predictions]
    report = per_label_report(labels, preds, len(names))
    columns = ("precision", "recall", "f1", "support")
    utils.save_csv(
        ["category", *columns], zip(names, *(report[c].tolist() for c in columns)), run_dir / "test-per-class.csv",
    )
    if objective.multi_label:
        counts = ("tp", "fp", "fn", "tn")
        utils.save_csv(["category", *counts], zip(names, *(report[c].tolist() for c in counts)), run_dir / LABEL_COUNTS_FILE)
        return
    matrix = confusion_matrix(labels, preds, len(names))
    utils.save_csv(
        ["true \\ predicted", *names],
        ([name, *counts] for name, counts in zip(names, matrix.tolist())),
        run_dir / "test-confusion-matrix.csv",
    )


# --- checkpoint and resume ----------------------------------------------------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random number generators: Python's, NumPy's, torch's and the accelerator's.

    Plain types and tensors only, so that the checkpoint loads with torch.load(weights_only=True).
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what rng_state saved (the accelerator's too, where this run has the same kind)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def frozen_names(model: torch.nn.Module) -> set[str]:
    """Parameters that training never changes (a LoRA run's base model, LUKE's unreachable entity queries)."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}  # tied aliases too


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without its frozen parameters: what a checkpoint and the best epoch's weights keep
    (megabytes for a LoRA run, not its base model). Load it with strict=False (load_trained_state)."""
    frozen = frozen_names(model)
    return {key: value for key, value in model.state_dict().items() if key not in frozen}


def checkpoint_state(
    epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler, best_epoch: int, best_f1: float, best_model: dict[str, torch.Tensor], log_rows: list[dict[str, Any]],
    rng: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything the epochs after `epoch` depend on: the weights and the optimizer's moments, the schedule, the fp16
    loss scale, the best epoch so far with its weights, the log rows, and each process's random generators (`rng`,
    in rank order). The training order needs nothing more: the sampler derives it from the seed and the epoch.

    Frozen parameters (a LoRA run's base model, LUKE's unreachable entity queries) never change: they are left out,
    and a resumed run has them from --model_name again (load_trained_state)."""
    return {
        "epoch": epoch, "model": trained_state(model),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "best_epoch": best_epoch, "best_f1": best_f1, "best_model": best_model, "log": log_rows, "rng": rng,
    }  # fmt: skip


def load_trained_state(model: torch.nn.Module, state: dict[str, torch.Tensor], run_dir: Path) -> None:
    """Put a checkpoint's weights back into the model: every one but the frozen, which the model loaded already has."""
    loaded = model.load_state_dict(state, strict=False)
    frozen = frozen_names(model)
    unfit = [*loaded.unexpected_keys, *(key for key in loaded.missing_keys if key not in frozen)]
    if unfit:
        raise InputError(
            f"{run_dir / CHECKPOINT} does not fit this model ({len(unfit)} weights, e.g. {unfit[0]}): was --model_name changed? "
            f"start the run again without --resume"
        )


def save_checkpoint(run_dir: Path, checkpoint: dict[str, Any]) -> None:
    """RUN_DIR/checkpoint.pt, written beside it and renamed into place: it replaces the previous one
    only once complete, so a kill at any moment leaves the last complete checkpoint."""
    with utils.atomic_path(run_dir / CHECKPOINT) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """What save_checkpoint wrote, on the CPU. Memory-mapped (privately: writes never reach the file), so
    tensors are read as they are copied into the model and optimizer, and torchrun processes share the pages."""
    path = run_dir / CHECKPOINT
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise InputError(f"{path} cannot be read ({type(e).__name__}: {utils.first_line(e)}); start the run again without --resume") from None


def remove_checkpoint(run_dir: Path) -> None:
    (run_dir / CHECKPOINT).unlink(missing_ok=True)


def resumable_config(run_dir: Path) -> dict[str, Any]:
    """config.json of a run folder that --resume can continue; otherwise an InputError saying what to do."""
    if not (run_dir / "config.json").is_file():
        raise InputError(f"--resume {run_dir}: not a run folder of train.py (no config.json); pass one such as outputs/<model>/<date>/<time>")
    if utils.is_finished(run_dir):
        raise InputError(f"--resume {run_dir}: this run already finished (it has test-metrics.json); to train again, start a new run without --resume")
    if not (run_dir / CHECKPOINT).is_file():
        raise InputError(
            f"--resume {run_dir}: no {CHECKPOINT} (the run stopped before the end of its first epoch, or ran with --checkpoint off); "
            f"start it again without --resume"
        )
    config = utils.load_json(run_dir / "config.json")
    if not isinstance(config, dict):
        raise InputError(f"{run_dir / 'config.json'}: expected a JSON object, got {type(config).__name__}")
    return config
