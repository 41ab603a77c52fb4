"""Run train.py over models x learning rates x seeds x datasets (folds), then aggregate the results.

    poetry run python src/sweep.py                          # the reference's table: 17 models x 3 lrs
    poetry run python src/sweep.py --models cl-tohoku/bert-base-japanese-v3 --lrs 3e-5 \
        --seeds 1 2 3 --dataset_dirs datasets/livedoor/folds/{0..9} --epochs 10
    poetry run python src/sweep.py ... --jobs 4             # 4 runs at once, one GPU each
    poetry run python src/sweep.py ... --launcher slurm --slurm_partition gpu   # a Slurm job array
    poetry run python src/sweep.py ... --dry_run            # print the plan only

Every other option (--epochs 10 above) goes to every train.py run unchanged. Each run is a fresh
train.py process (torchrun with --gpus_per_run above 1), so a crash, an out-of-memory error or a
CUDA error ends that run only. Its output goes to its own log file,
OUTPUT_ROOT/sweep-logs/<YYYY-MM-DD_HH-MM-SS>/<run>.log; the terminal shows one progress line.
A combination that already has a finished run under OUTPUT_ROOT with the same settings (the
process count included) is skipped, and one with an unfinished run that has a checkpoint resumes
it (train.py --resume): after an interruption, a failure or a cancelled Slurm array, run the same
command again. Ctrl-C or SIGTERM is passed on to every running train.py, which stops with its
checkpoint; the sweep waits for them and exits with 130 or 143. At the end, aggregate.py writes
RESULTS_DIR from every finished run under OUTPUT_ROOT; if any run failed, the failures are listed
with their logs and the exit code is 1.

Any number of sweep processes with the same grid share it (the same command in every task of a PBS
or Grid Engine array, several Slurm jobs, ssh on several nodes): each claims a combination in
OUTPUT_ROOT/sweep-claims before it runs it (src/claims.py), takes over claims whose holder is gone,
ends when nothing is left to claim, and aggregates in turn with the others, so that the process that
ends last writes the complete results.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO

import submitit
import torch
from submitit.core.utils import pickle_load
from tap import Tap

import aggregate
import claims
import runs
import train_options  # train.py's command line (its Args), which the sweep checks and forwards
import utils
from launch import (
    RUNNING, TRAIN_PY, Launch, Slot, SlurmRun, Stopping, command_line, has_option, run_logged, select_options, thread_slot, train_command,
)  # fmt: skip
from utils import InputError

# The models of the reference's results table, in its order.
REFERENCE_MODELS = [
    "cl-tohoku/bert-base-japanese-v3",
    "cl-tohoku/bert-base-japanese-v2",
    "cl-tohoku/bert-base-japanese",
    "cl-tohoku/bert-base-japanese-whole-word-masking",
    "cl-tohoku/bert-base-japanese-char",
    "cl-tohoku/bert-base-japanese-char-v2",
    "cl-tohoku/bert-base-japanese-char-v3",
    "bert-base-multilingual-cased",
    "studio-ousia/luke-japanese-base-lite",
    "studio-ousia/luke-japanese-large-lite",
    "cl-tohoku/bert-large-japanese",
    "cl-tohoku/bert-large-japanese-v2",
    "cl-tohoku/bert-large-japanese-char-v2",
    "xlm-roberta-base",
    "xlm-roberta-large",
    "studio-ousia/mluke-base-lite",
    "studio-ousia/mluke-large-lite",
]

# Newer Japanese encoders (names checked against their model cards). ModernBERT reads up to 8192
# tokens (rotary positions): pass a longer --max_seq_len to use it; see README for each one's needs.
MODERN_MODELS = [
    "sbintuitions/modernbert-ja-30m",
    "sbintuitions/modernbert-ja-70m",
    "sbintuitions/modernbert-ja-130m",
    "sbintuitions/modernbert-ja-310m",
    "llm-jp/llm-jp-modernbert-base",
    "ku-nlp/deberta-v3-base-japanese",
]
# Japanese-capable decoder LLMs from 0.5 to 8 B parameters, trained as classifiers with LoRA (README: the
# memory each needs, and the model card each name was checked against). Llama-architecture: sarashina2.2,
# llm-jp-3, Swallow; then Qwen2.5, Qwen3 (119 languages), Gemma 3 (text-only 1B; 4B with a vision tower that
# text-only classification leaves unused) and Gemma 2 (Japanese-tuned).
LLM_MODELS = [
    "Qwen/Qwen2.5-0.5B-Instruct",
    "google/gemma-3-1b-it",
    "sbintuitions/sarashina2.2-1b",
    "Qwen/Qwen3-1.7B",
    "llm-jp/llm-jp-3-1.8b",
    "google/gemma-2-2b-jpn-it",
    "sbintuitions/sarashina2.2-3b",
    "llm-jp/llm-jp-3-3.7b",
    "google/gemma-3-4b-it",
    "tokyotech-llm/Llama-3.1-Swallow-8B-v0.5",
    "Qwen/Qwen3-8B",
]
PRESETS = {"reference": REFERENCE_MODELS, "modern": MODERN_MODELS, "llm": LLM_MODELS}
# A preset's own learning rates and train.py options (used where --lrs or the option is not given).
# llm: hppRC/llm-lora-classification's set-up on livedoor (LoRA r 32, alpha 16, dropout 0.1; batch 32,
# 10 epochs, 1 warm-up epoch, gradient checkpointing; lrs 1e-4 to 1e-3, 5e-4 best for its 3.6 B model).
DEFAULT_LRS = [1e-5, 3e-5, 5e-5]
PRESET_LRS = {"llm": [1e-4, 3e-4, 5e-4, 1e-3]}
PRESET_TRAIN_OPTIONS = {
    "llm": {
        "--lora_r": "32", "--lora_alpha": "16", "--lora_dropout": "0.1", "--batch_size": "32", "--epochs": "10",
        "--num_warmup_epochs": "1", "--gradient_checkpointing": None,
    },
}  # fmt: skip

# train.py options that the sweep sets itself for each run, with the sweep option to use instead.
AXES = {
    "model_name": "--models",
    "lr": "--lrs",
    "seed": "--seeds",
    "dataset_dir": "--dataset_dirs",
    "output_root": "--output_root",
}

class Args(Tap):
    """Run src/train.py for every combination of models x lrs x seeds x dataset_dirs, skipping those
    already finished under OUTPUT_ROOT, then aggregate. Any other option (e.g. --epochs 3
    --batch_size 32; see `python src/train.py -h`) is passed to every train.py run unchanged."""

    models: list[str] | None = None  # models to fine-tune (hub names or local folders); default: those of --preset
    preset: Literal["reference", "modern", "llm"] = "reference"  # model list when --models is not given: reference (its 17 models), modern (ModernBERT-ja, llm-jp-modernbert, DeBERTa-v3-ja) or llm (decoder LLMs of 0.5-8 B with LoRA, hppRC/llm-lora-classification's lrs and options unless given)
    lrs: list[float] | None = None  # learning rates tried for each model (best by mean val F1 in best.csv); default 1e-5 3e-5 5e-5 (--preset llm: 1e-4 3e-4 5e-4 1e-3)
    seeds: list[int] = [42]  # seeds: several give a mean and std per setting in best.csv
    dataset_dirs: list[Path] = [Path("datasets/livedoor")]  # datasets, e.g. datasets/livedoor/folds/{0..9} for 10-fold cross-validation
    output_root: Path = Path("outputs")  # train.py writes runs here; finished runs found here are skipped
    results_dir: Path = Path("results")  # aggregate.py writes all.csv, best.csv, best.md, per-class.csv and the figures (best.png, curves.png, per-class.png) here
    dry_run: bool = False  # print the plan (and each train.py command) and exit without running anything
    jobs: int = 1  # train.py runs at once on this machine: each gets its own GPU(s) through CUDA_VISIBLE_DEVICES, or on CPU an equal share of the cores
    gpus_per_run: int = 1  # processes of each run, one GPU each; above 1 the run is launched with torchrun --nproc_per_node (on CPU: that many gloo processes). The process count is part of a run's setting
    launcher: Literal["local", "slurm"] = "local"  # local: run here (--jobs at once); slurm: submit a Slurm job array through submitit and wait for it
    slurm_partition: str | None = None  # Slurm partition of the array (default: the cluster's default partition)
    slurm_time: int = 1440  # Slurm time limit of each run, in minutes; a run stopped by it is not requeued (a preempted one is)
    slurm_cpus_per_run: int | None = None  # CPUs that Slurm gives each run (default: the cluster's default); train.py's threads and tokeniser workers use them
    slurm_array_parallelism: int = 256  # at most this many runs of the array at once (the %%M of Slurm's --array=0-N%%M)
    slurm_option: list[str] = []  # any other sbatch option as KEY=VALUE (or KEY for a flag), repeatable: --slurm_option account=abc --slurm_option qos=high
    no_wait: bool = False  # with --launcher slurm: submit, print the job id and return (rerun the same command later to aggregate)
    claim_timeout: float = 600.0  # with --launcher local: seconds without a heartbeat after which another sweep process's claim on a combination is stale and taken over (a dead process on this host is noticed at once); the hosts' clocks must agree to well within it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: `--lr 1e-5` must not silently mean `--lrs 1e-5`, nor `--seed` `--seeds`.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def configure(self) -> None:
        # Repeatable: each --slurm_option adds to the list (and one may take several KEY=VALUEs).
        self.add_argument("--slurm_option", action="extend", nargs="+")

    def parse_args(self, args: Sequence[str] | None = None, known_only: bool = True, **kwargs: Any) -> Args:
        """Parse the sweep's own options; the others are kept in `extra_args`, for train.py."""
        return super().parse_args(args, known_only=known_only, **kwargs)

    def process_args(self) -> None:
        if self.models is None:
            self.models = list(PRESETS[self.preset])
        if self.lrs is None:
            self.lrs = list(PRESET_LRS.get(self.preset, DEFAULT_LRS))
        for option, value in PRESET_TRAIN_OPTIONS.get(self.preset, {}).items():
            if not has_option(self.extra_args, option):  # forwarded to train.py like the user's own options; the user's win
                self.extra_args += [option] if value is None else [option, value]
        for name in ("models", "lrs", "seeds", "dataset_dirs"):
            values = getattr(self, name)
            if not values:
                self.error(f"--{name} needs at least one value")
            duplicates = sorted({str(v) for v in values if values.count(v) > 1})
            if duplicates:
                self.error(f"--{name} lists {', '.join(duplicates)} more than once")
        for name in ("jobs", "gpus_per_run", "slurm_time", "slurm_array_parallelism"):
            if getattr(self, name) < 1:
                self.error(f"--{name} must be at least 1")
        if not self.claim_timeout > 0:
            self.error("--claim_timeout must be above 0 seconds")
        if self.slurm_cpus_per_run is not None and self.slurm_cpus_per_run < 1:
            self.error("--slurm_cpus_per_run must be at least 1")
        if self.launcher == "local":
            slurm_set = [f"--{name}" for name in ("slurm_partition", "slurm_cpus_per_run", "no_wait") if getattr(self, name)]
            slurm_set += ["--slurm_option"] if self.slurm_option else []
            if slurm_set:
                self.error(f"{', '.join(slurm_set)} only apply with --launcher slurm")
        elif self.jobs != 1:
            self.error("--jobs is for --launcher local; with Slurm, --slurm_array_parallelism limits the runs at once")
        try:
            sbatch_options(self.slurm_option)
        except ValueError as e:
            self.error(str(e))
        check_forwarded(self.extra_args, self.error)


def train_flags() -> set[str]:
    """train.py's options as written on its command line (--name)."""
    return {f"--{name}" for name in train_options.Args().class_variables}


def check_forwarded(forwarded: Sequence[str], error: Callable[[str], Any]) -> None:
    """Refuse the sweep's axes and anything that is not a train.py option written in full; then let
    train.py's own parser check the values, so that a typo stops the sweep before its first run."""
    options = train_flags()
    for token in forwarded:
        if not token.startswith("--"):
            continue  # a value; train.py's parser below says if it belongs to no option
        option = token.split("=", 1)[0]
        if option == "--resume":
            error("--resume is for one run (python src/train.py --resume RUN_DIR); the sweep resumes every unfinished run that has a checkpoint by itself")
        if option[2:] in AXES:
            error(f"{option} is set by the sweep for each run: use {AXES[option[2:]]} instead")
        if option not in options:
            error(f"{option} is an option of neither sweep.py nor train.py (write options in full, without abbreviation)")
    train_options.Args(prog="train.py").parse_args(list(forwarded))  # exits with train.py's usage on a bad value


@dataclass(frozen=True)
class Combination:
    model_name: str
    lr: float
    seed: int
    dataset_dir: Path

    def train_argv(self, output_root: Path, forwarded: Sequence[str]) -> list[str]:
        """The arguments of train.py for this combination (axes first, then the forwarded options)."""
        return [
            "--model_name", self.model_name, "--lr", repr(self.lr), "--seed", str(self.seed),
            "--dataset_dir", str(self.dataset_dir), "--output_root", str(output_root), *forwarded,
        ]  # fmt: skip

    def slug(self) -> str:
        """The combination in a file name: model (as its run folders name it), lr, seed, dataset."""
        model = runs.run_dir_name(self.model_name, datetime.now()).parts[0]
        name = f"{model}_lr={self.lr:g}_seed={self.seed}_{'_'.join(self.dataset_dir.parts[-2:])}"
        return re.sub(r"[^\w.=+-]+", "_", name)

    def log_name(self, index: int) -> str:
        """A unique file name that tells the run: its number, then its slug."""
        return f"{index:03d}_{self.slug()}.log"

    def __str__(self) -> str:
        return f"{self.model_name} lr={self.lr:g} seed={self.seed} dataset={self.dataset_dir}"


def setting_key(config: dict[str, Any]) -> frozenset[tuple[str, Any]]:
    """What a run learned, as a hashable value: the config without its runtime options (device,
    num_workers, eval_batch_size, ...) and facts. Seed and dataset_dir, which aggregate.py averages
    over, are axes of the sweep, so they must match too."""
    return frozenset(aggregate.setting_of(config, repetitions=False).items())


def run_configs(root: Path, wanted: Callable[[Path], bool]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(run folder, its config.json) of the runs under `root` that `wanted` accepts; unreadable configs are skipped (aggregate.py reports them)."""
    for run_dir in aggregate.find_run_dirs(root) if root.is_dir() else []:
        if not wanted(run_dir):
            continue
        try:
            config = utils.load_json(run_dir / "config.json")
        except InputError:
            continue
        if isinstance(config, dict):
            yield run_dir, config


def finished_settings(output_root: Path) -> set[frozenset[tuple[str, Any]]]:
    """The settings of the finished runs under `output_root`; unfinished or unreadable runs do not count."""
    return {setting_key(config) for _, config in run_configs(output_root, utils.is_finished)}


def claim_name(combination: Combination, config: dict[str, Any]) -> str:
    """The name of a combination's claim: readable, and the same in every sweep process with the same
    setting (a digest of it: two sweeps that differ in a forwarded setting claim different names)."""
    setting = sorted(aggregate.setting_of(config, repetitions=False).items())
    digest = hashlib.sha256(utils.to_json(setting).encode("utf-8")).hexdigest()[:12]
    return f"{combination.slug()[:150]}-{digest}"


def resumable_run(output_root: Path, combination: Combination, key: frozenset[tuple[str, Any]]) -> Path | None:
    """The newest RESUMABLE run folder of this setting under `output_root` (config.json and checkpoint.pt,
    no test-metrics.json), or None. Only the model's own folder is searched."""
    model_dir = output_root / runs.run_dir_name(combination.model_name, datetime.now()).parts[0]
    found = [run_dir for run_dir, config in run_configs(model_dir, utils.is_resumable) if setting_key(config) == key]
    return max(found, key=lambda d: (d / utils.CHECKPOINT).stat().st_mtime, default=None)


def resume_argv(run_dir: Path, forwarded: Sequence[str]) -> list[str] | None:
    """train.py's arguments to continue `run_dir`: --resume, and the forwarded options that are runtime
    options (its settings come from its config.json). None when this train.py has no --resume."""
    if "--resume" not in train_flags():
        return None
    config = utils.load_json(run_dir / "config.json")
    runtime = aggregate.not_setting_fields(config, repetitions=False) - set(aggregate.RUN_FACTS)
    return ["--resume", str(run_dir), *select_options(forwarded, runtime)]


def setting_id(config: dict[str, Any]) -> str:
    """A combination's setting as text (JSON), by which a later sweep recognises the run in Slurm's queue."""
    return utils.to_json(sorted(setting_key(config), key=lambda item: item[0]))


def runtime_options(forwarded: Sequence[str]) -> list[str]:
    """The forwarded options that do not change what a run learns (--device, --num_workers, ...): what
    `train.py --resume` takes besides the run folder, whose config.json holds the settings."""
    return select_options(forwarded, set(train_options.RUNTIME_OPTIONS))


def combination_configs(
    combinations: list[Combination], output_root: Path, forwarded: Sequence[str], world_size: int = 1
) -> list[dict[str, Any]]:
    """The config of each combination, as train.py would parse its arguments and run it with
    `world_size` processes.

    train.py's parser is built once (building it takes ~15 ms, and a full sweep has thousands of
    combinations); each combination then sets its own axes, with the types train_options.Args gives them.
    """
    base = runs.args_to_json(train_options.Args().parse_args(combinations[0].train_argv(output_root, forwarded)))
    return [
        {
            **base, "model_name": c.model_name, "lr": float(c.lr), "seed": int(c.seed), "dataset_dir": str(c.dataset_dir),
            "output_root": str(output_root), "runtime_options": list(train_options.RUNTIME_OPTIONS), "world_size": world_size,
        }
        for c in combinations
    ]


def describe_exit(code: int) -> str:
    if code < 0:  # killed by a signal, e.g. SIGKILL from the out-of-memory killer
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def sbatch_options(options: Sequence[str]) -> dict[str, str | bool]:
    """--slurm_option KEY=VALUE (or KEY alone, for a flag such as `requeue`) as submitit's additional_parameters."""
    parsed: dict[str, str | bool] = {}
    for option in options:
        key, has_value, value = option.partition("=")
        key = key.strip().removeprefix("--")
        if not key or (has_value and not value):
            raise ValueError(f"--slurm_option {option!r}: write KEY=VALUE (an sbatch option without its --), or KEY for a flag")
        parsed[key] = value if has_value else True
    return parsed


# --- where runs execute on this machine -----------------------------------------------------------


def gpu_slots(visible: Sequence[str], jobs: int, gpus_per_run: int, thread_share: Slot) -> list[Slot]:
    """`jobs` disjoint groups of `gpus_per_run` GPUs, each run seeing only its own through CUDA_VISIBLE_DEVICES."""
    if jobs * gpus_per_run > len(visible):
        raise InputError(
            f"--jobs {jobs} x --gpus_per_run {gpus_per_run} needs {jobs * gpus_per_run} GPUs, but this machine shows "
            f"{len(visible)} ({','.join(visible) or 'none'}); lower --jobs"
        )
    groups = [list(visible[i * gpus_per_run : (i + 1) * gpus_per_run]) for i in range(jobs)]
    return [
        Slot(env={**thread_share.env, "CUDA_VISIBLE_DEVICES": ",".join(g)}, train_argv=thread_share.train_argv, label=f"GPU {','.join(g)}")
        for g in groups
    ]


def visible_gpus(environ: Mapping[str, str], device_count: int) -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set (ids or UUIDs), else all of them."""
    if environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [gpu for gpu in environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    return [str(i) for i in range(device_count)]


def wants_gpus(device: str) -> bool:
    """Whether train.py's --device asks for CUDA GPUs where there are some (auto or cuda)."""
    return device == "auto" or device.startswith("cuda")


def local_slots(args: Args, device: str, device_count: int, cores: int, environ: Mapping[str, str]) -> list[Slot]:
    """One slot per run at once: its GPUs on CUDA, else its share of the CPU cores."""
    share = thread_slot(cores, args.jobs, args.gpus_per_run, args.extra_args)
    if device_count == 0 or not wants_gpus(device):
        return [share] * args.jobs
    if device not in ("auto", "cuda"):
        raise InputError(f"--device {device}: the sweep gives each run its GPU(s) through CUDA_VISIBLE_DEVICES; use --device cuda (or auto)")
    return gpu_slots(visible_gpus(environ, device_count), args.jobs, args.gpus_per_run, share)


Runner = Callable[[Launch, Slot], "int | None"]  # a run in its slot -> exit code (0: success), None: not run here (claimed elsewhere)


# --- progress and failures ----------------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def progress_line(total: int, done: int, failed: int, running: int, elapsed: float) -> str:
    """The sweep's one status line; the ETA assumes the remaining runs take as long as the finished ones."""
    finished = done + failed
    eta = format_seconds(elapsed / finished * (total - finished)) if finished else "?"
    return f"sweep: {done}/{total} done, {running} running, {failed} failed, {format_seconds(elapsed)} elapsed, ETA {eta}"


class Progress:
    """The progress line: rewritten in place on a terminal, else printed every `interval` seconds
    and whenever a run ends. Messages (a run that ended) go on lines of their own above it; the last
    line states the final counts."""

    def __init__(self, total: int, stream: TextIO | None = None, interval: float = 60.0) -> None:
        self.total, self.done, self.failed, self.running = total, 0, 0, 0
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.interval = interval
        self.start = self.last = time.monotonic()
        self.shown: tuple[int, int, int] | None = None  # the counts of the last line printed (off a terminal)

    def line(self) -> str:
        return progress_line(self.total, self.done, self.failed, self.running, time.monotonic() - self.start)

    def show(self, force: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
        elif force or time.monotonic() - self.last >= self.interval:
            self.stream.write(self.line() + "\n")
            self.last, self.shown = time.monotonic(), (self.done, self.failed, self.running)
        self.stream.flush()

    def note(self, message: str) -> None:
        """A message on a line of its own, above the progress line."""
        self.stream.write(("\r\033[K" if self.tty else "") + message + "\n")
        self.show(force=True)

    def ended(self, message: str, ok: bool) -> None:
        """A run ended: count it and say so."""
        self.done, self.failed = self.done + ok, self.failed + (not ok)
        self.note(message)

    def close(self) -> None:
        if self.tty:
            self.show()
            self.stream.write("\n")
        elif self.shown != (self.done, self.failed, self.running):
            self.show(force=True)
        self.stream.flush()


@dataclass
class Failure:
    launch: Launch
    reason: str  # e.g. "exit code 1", "killed by SIGKILL", "cancelled by Slurm"


class RunsFailed(InputError):
    """Some runs failed; the message lists them. The sweep still ran every other one and aggregated."""

    def __init__(self, failures: list[Failure], total: int) -> None:
        lines = [f"{len(failures)} of {total} runs failed; run the same sweep command again to retry them (finished runs are skipped):"]
        for failure in failures:
            lines.append(f"  {failure.launch.title}: {failure.reason}")
            lines.append(f"    log: {failure.launch.log_path}")
            lines.append(f"    {command_line(train_command(failure.launch.argv, failure.launch.nproc))}")
        super().__init__("\n".join(lines))
        self.failures = failures


# --- the local runner ----------------------------------------------------------------------------


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name + (" (Ctrl-C)" if signum == signal.SIGINT else "")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalRelay:
    """While local runs execute: the first SIGINT, SIGTERM or SIGHUP starts no new run and is passed
    on to every running train.py (each in its own process group, see launch.ProcessGroups), which
    stops with its checkpoint; a second one kills them."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.reached = 0

    def handle(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        if len(self.received) == 1:
            self.reached = RUNNING.stop(signum)
        else:
            RUNNING.kill()

    @contextlib.contextmanager
    def installed(self) -> Iterator[SignalRelay]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            yield self
            return
        previous = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def run_local(launches: list[Launch], slots: list[Slot], run: Runner, progress: Progress) -> list[Failure]:
    """Run `launches` at most len(slots) at a time, each in a free slot; return the failures.

    A thread per slot waits on its train.py process; this thread keeps the progress line. A signal
    stops the sweep (see SignalRelay): it waits for the running runs, then raises utils.Interrupted.
    """
    free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
    for slot in slots:
        free.put(slot)
    lock = threading.Lock()
    started: dict[int, float] = {}
    not_started: list[int] = []
    RUNNING.reset()

    def work(index: int) -> int | None:
        """The run's exit code, or None: run elsewhere (another sweep process holds its claim), or not
        started because the sweep is stopping (then counted in not_started)."""
        slot = free.get()  # never blocks: as many threads as slots
        try:
            with lock:
                if RUNNING.stop_signal is not None:
                    not_started.append(index)
                    return None
                started[index] = time.monotonic()
                progress.running += 1
            try:
                return run(launches[index], slot)
            except Stopping:
                with lock:
                    not_started.append(index)
                return None
            finally:
                with lock:
                    progress.running -= 1
        finally:
            free.put(slot)

    failures: list[Failure] = []
    stopped, told = 0, 0
    pool = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="sweep-run")
    with SignalRelay().installed() as relay:
        try:
            futures: dict[Future[int | None], int] = {pool.submit(work, i): i for i in range(len(launches))}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                if len(relay.received) > told:
                    told = len(relay.received)
                    name = signal_name(relay.received[-1])
                    progress.note(
                        f"sweep: got {name}: passed it on to the {relay.reached} running train.py run(s), which stop and keep their "
                        f"checkpoints; waiting for them (a second signal kills them)"
                        if told == 1 else f"sweep: got {name} again: killed the running train.py run(s)"
                    )
                for future in sorted(finished, key=futures.__getitem__):
                    index = futures[future]
                    launch, code = launches[index], future.result()
                    if code is None:
                        if index not in not_started:  # another sweep process holds its claim: not a run of this process
                            progress.total -= 1
                        continue
                    seconds = format_seconds(time.monotonic() - started[index])
                    if relay.received and code != 0:
                        stopped += 1
                        progress.note(f"[{index + 1}/{len(launches)}] stopped ({describe_exit(code)}) after {seconds}: {launch.title}  (log: {launch.log_path})")
                        continue
                    status = "done" if code == 0 else f"FAILED ({describe_exit(code)})"
                    progress.ended(f"[{index + 1}/{len(launches)}] {status} in {seconds}: {launch.title}  (log: {launch.log_path})", code == 0)
                    if code != 0:
                        failures.append(Failure(launch, describe_exit(code)))
                progress.show()
        finally:
            # An error here: start nothing more, and wait for the running runs.
            pool.shutdown(wait=True, cancel_futures=True)
            progress.close()
    if relay.received:
        raise utils.Interrupted(
            relay.received[0],
            f"{stopped} run(s) stopped, {len(not_started)} not started, no train.py left running; run the same command again to "
            f"continue (a stopped run resumes from its last checkpoint)",
        )
    return failures


# --- claims: any number of sweep processes share one grid ---------------------------------------

CLAIMS_FOLDER = "sweep-claims"  # under OUTPUT_ROOT, seen by every process of the grid
# Exit codes of a run stopped by a signal (train.py: 130 on SIGINT, 143 on SIGTERM, its folder resumable):
# its claim is given back, free for the next process, rather than recorded as a failure.
INTERRUPTED = frozenset([130, 143, -signal.SIGINT, -signal.SIGTERM, -signal.SIGHUP])


@dataclass(frozen=True)
class Planned:
    """A combination to run, as the claims see it: its claim's name and its setting."""

    combination: Combination
    claim: str
    key: frozenset[tuple[str, Any]]


class ClaimingRunner:
    """Runs a launch only when this process wins its combination's claim, and ends the claim with the
    run's outcome. Returns None, running nothing, when another sweep process holds the claim or settled
    the combination while this one ran. A combination run again resumes its run folder when that has a
    checkpoint (a stale claim taken over, an interrupted sweep run again) and train.py can resume."""

    def __init__(self, run: Runner, held: claims.Claims, planned: dict[str, Planned], output_root: Path, forwarded: Sequence[str]) -> None:
        self.run, self.held, self.planned = run, held, planned
        self.output_root, self.forwarded = output_root, list(forwarded)
        self.note: Callable[[str], None] = print
        self.ran: dict[str, int] = {}  # title -> exit code, for the runs of this process
        self.elsewhere: dict[str, claims.Record] = {}  # title -> the claim that kept it from this process

    def __call__(self, launch: Launch, slot: Slot) -> int | None:
        plan = self.planned[launch.title]
        got = self.held.claim(plan.claim, launch.title, str(launch.log_path))
        if isinstance(got, claims.Record):
            self.elsewhere[launch.title] = got
            return None
        self.elsewhere.pop(launch.title, None)
        if got.stale_reason and got.previous is not None:
            self.note(f"sweep: taking over {launch.title} from {got.previous.holder}: {got.stale_reason}")
        try:
            self.resume(launch, plan)
            code = self.run(launch, slot)
        except BaseException:
            self.held.release(got, claims.RELEASED, "given back unfinished")
            raise
        state = claims.DONE if code == 0 else claims.RELEASED if code in INTERRUPTED else claims.FAILED
        self.held.release(got, state, "" if code == 0 else describe_exit(code))
        self.ran[launch.title] = code
        return code

    def resume(self, launch: Launch, plan: Planned) -> None:
        """Continue the combination's resumable run folder, if it has one, instead of starting again."""
        run_dir = resumable_run(self.output_root, plan.combination, plan.key)
        if run_dir is None:
            return
        argv = resume_argv(run_dir, self.forwarded)
        if argv is None:
            self.note(f"sweep: {launch.title}: {run_dir} has a checkpoint, but this train.py cannot resume; the run starts again")
            return
        launch.argv = argv
        self.note(f"sweep: {launch.title}: resuming {run_dir}")


def run_claimed(launches: list[Launch], slots: list[Slot], runner: ClaimingRunner, progress: Progress) -> list[Failure]:
    """Run, `len(slots)` at a time, the launches whose claims this process wins; return the failures.

    Claims are taken one at a time, as slots free up. What another process held is tried again after a
    pass that ran something (its holder may have ended, or died, meanwhile); the process ends after a
    pass that ran nothing: nothing is left to claim.
    """
    failures: list[Failure] = []
    pending = launches
    while pending:
        runner.note = progress.note
        ran_before = len(runner.ran)
        failures += run_local(pending, slots, runner, progress)
        if len(runner.ran) == ran_before:
            break
        pending = [launch for launch in pending if launch.title in runner.elsewhere and runner.elsewhere[launch.title].state == claims.RUNNING]
        progress = Progress(len(pending))
    return failures


def report_claims(runner: ClaimingRunner, total: int) -> int:
    """When other sweep processes shared the grid: what this one ran, what they ran or still run.
    Returns how many runs still run elsewhere."""
    if not runner.elsewhere:
        return 0
    now, snapshot = time.time(), runner.held.snapshot()
    records = [snapshot.get(runner.planned[title].claim, record) for title, record in runner.elsewhere.items()]
    by_state: dict[str, list[claims.Record]] = {}
    for record in records:
        by_state.setdefault(record.state, []).append(record)
    done_by: dict[str, int] = {}
    for record in by_state.get(claims.DONE, []):
        done_by[record.holder] = done_by.get(record.holder, 0) + 1
    failed_here = sum(code != 0 for code in runner.ran.values())
    running = by_state.get(claims.RUNNING, [])
    print(
        f"sweep: this process ({claims.HOST} pid {os.getpid()}) ran {len(runner.ran)} of the {total} combinations to run "
        f"({len(runner.ran) - failed_here} done, {failed_here} failed); other sweep processes: "
        f"{len(by_state.get(claims.DONE, []))} done, {len(by_state.get(claims.FAILED, []))} failed, {len(running)} still running",
        flush=True,
    )
    if done_by:
        print("  done elsewhere: " + ", ".join(f"{holder}: {count}" for holder, count in sorted(done_by.items())), flush=True)
    for record in [*by_state.get(claims.FAILED, []), *running, *by_state.get(claims.RELEASED, [])]:
        print(f"  {claims.describe(record, now)}", flush=True)
    if running:
        print(f"sweep: {len(running)} run(s) still running elsewhere: the sweep process that ends last aggregates them too", flush=True)
    return len(running)


def say_claimed(held: claims.Claims, planned: dict[str, Planned]) -> None:
    """Say how many combinations to run other sweep processes hold now (they are left to them)."""
    snapshot = held.snapshot()
    now = time.time()
    holders = [
        record.holder for plan in planned.values()
        if (record := snapshot.get(plan.claim)) is not None and record.state == claims.RUNNING and record.stale_reason(held.timeout, now) is None
    ]  # fmt: skip
    if holders:
        print(
            f"sweep: {len(holders)} of them are running in other sweep processes ({', '.join(sorted(set(holders)))}): "
            f"this process takes the others",
            flush=True,
        )


def aggregate_lock(results_dir: Path) -> str:
    """The name of the lock that orders the aggregations into `results_dir`."""
    return "aggregate-" + hashlib.sha256(str(results_dir.resolve()).encode("utf-8")).hexdigest()[:12]


# --- the Slurm launcher (submitit) ---------------------------------------------------------------


SIGNAL_DELAY_S = 90  # submitit's USR2 comes this long before a task's time limit (sbatch --signal USR2@90)


def slurm_parameters(args: Args, gpus: bool, src_dir: Path = TRAIN_PY.parent) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for the array: one task per run, its GPUs, time, partition and the rest."""
    parameters: dict[str, Any] = {
        "job_name": "sweep",
        "time": args.slurm_time,
        "array_parallelism": args.slurm_array_parallelism,
        "ntasks_per_node": 1,
        "stderr_to_stdout": True,
        "signal_delay_s": SIGNAL_DELAY_S,
        # The task unpickles SlurmRun, whose module imports train and utils from src/.
        "setup": [f"export PYTHONPATH={shlex.quote(str(src_dir))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        # Requeueable even where the cluster's default is not (JobRequeue=0): a preempted task, or one
        # on a failed node, runs again and resumes its run.
        "additional_parameters": {"requeue": True, **sbatch_options(args.slurm_option)},
    }
    if "no-requeue" in parameters["additional_parameters"]:
        del parameters["additional_parameters"]["requeue"]
    if args.slurm_partition:
        parameters["partition"] = args.slurm_partition
    if args.slurm_cpus_per_run:
        parameters["cpus_per_task"] = args.slurm_cpus_per_run
    if gpus:
        parameters["gpus_per_node"] = args.gpus_per_run
    return parameters


def require_slurm() -> None:
    missing = [command for command in ("sbatch", "squeue") if shutil.which(command) is None]
    if missing:
        raise InputError(
            f"--launcher slurm: no Slurm here ({' and '.join(missing)} not on PATH); run the sweep on a login node of "
            f"the cluster, or without --launcher slurm to run it on this machine"
        )


# sbatch's refusals, by what they mention, and what usually fixes them.
SBATCH_HINTS = [
    (("gres", "generic resource"), "if the partition has no GPUs, pass --device cpu (the runs then ask Slurm for none); else choose a GPU partition with --slurm_partition (`sinfo -o '%P %G'` lists them)"),
    (("account", "qos", "association"), "check --slurm_option account=... and qos=... (`sacctmgr show assoc user=$USER` lists yours)"),
    (("partition",), "`sinfo -s` lists the partitions: pass one with --slurm_partition"),
    (("time limit", "time specification"), "lower --slurm_time (minutes) to the partition's limit (`sinfo -o '%P %l'`)"),
]


def sbatch_error(stderr: str) -> str:
    """sbatch's refusal in one line, with the likely fix."""
    errors = [line.split("error:", 1)[1].strip().removeprefix("Batch job submission failed: ") for line in stderr.splitlines() if "error:" in line]
    said = errors[0] if errors else (stderr.strip().splitlines() or ["no message"])[-1].strip()
    lowered = " ".join(errors).lower() or said.lower()
    hint = next((hint for words, hint in SBATCH_HINTS if any(word in lowered for word in words)), "check --slurm_partition and --slurm_option against `man sbatch`")
    return f"sbatch refused the job: {said}; {hint}"


def submit(args: Args, launches: list[Launch], folder: Path, gpus: bool) -> list[submitit.Job]:
    """Submit the runs as one Slurm job array (submitit's map_array; a single run is a plain job)."""
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)  # 0: a time-out is not requeued, a preemption is
    executor.update_parameters(**slurm_parameters(args, gpus))
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # submitit prints sbatch's refusal; it is said once, below
            return executor.map_array(SlurmRun(SIGNAL_DELAY_S), launches)
    except submitit.core.utils.FailedJobError as e:
        raise InputError(sbatch_error(str(e) or said.getvalue())) from None


ACTIVE_SLURM_STATES = frozenset(
    ["PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED"]
)
WAITING_AGAIN_STATES = frozenset(["PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED"])


def queue_states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]] | None:
    """State and start time of each job or array task (JOBID or JOBID_TASK) still known to Slurm, or None
    if squeue did not answer. A task that Slurm ran again (requeued) has a new start time.

    squeue, not sacct: it needs no accounting database, which small clusters often lack.
    """
    base_ids = sorted({job_id.split("_")[0] for job_id in job_ids})
    result = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(base_ids), "-o", "%i %T %S"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {} if "Invalid job id" in result.stderr else None  # a finished job is forgotten after MinJobAge
    return {parts[0]: (parts[1], parts[2] if len(parts) > 2 else "") for line in result.stdout.splitlines() if len(parts := line.split()) >= 2}


@dataclass
class Queued:
    """A run that an earlier sweep submitted into the same OUTPUT_ROOT and that is still in Slurm's queue."""

    job: submitit.Job
    launch: Launch


def queued_runs(output_root: Path) -> dict[str, Queued]:
    """The runs of earlier sweeps into `output_root` still in Slurm's queue, by setting (Launch.setting).

    squeue names each job's batch script, which submitit keeps in the sweep's log folder
    (OUTPUT_ROOT/sweep-logs/<date_time>/slurm/); the task's pickled Launch there says which run it is.
    """
    result = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T %o"], capture_output=True, text=True, check=False)
    logs = (output_root / "sweep-logs").resolve()
    found: dict[str, Queued] = {}
    for line in result.stdout.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) < 3 or parts[1] not in ACTIVE_SLURM_STATES:
            continue
        job_id, script = parts[0], Path(parts[2])
        if not script.is_absolute() or script.parent.resolve().parent.parent != logs:
            continue
        job: submitit.Job = submitit.SlurmJob(folder=script.parent, job_id=job_id)
        try:
            delayed = pickle_load(job.paths.submitted_pickle)
            launch = delayed.args[0]
        except Exception:  # noqa: BLE001 (not a task of a sweep, or a file of another version)
            continue
        if isinstance(launch, Launch) and launch.setting:
            found[launch.setting] = Queued(job, launch)
    return found


def task_outcome(job: submitit.Job, launch: Launch) -> Failure | None:
    """The outcome of a task that left the queue: None when its run succeeded, else why it failed."""
    if not job.paths.result_pickle.exists():
        return Failure(launch, f"stopped by Slurm before it ended (cancelled, or the node failed); Slurm log: {job.paths.stdout}")
    outcome, value = pickle_load(job.paths.result_pickle)
    if outcome != "success":  # e.g. the time limit: the last line of the error says why
        reason = str(value).strip().splitlines()[-1] if str(value).strip() else "error"
        reason = re.sub(r"^[\w.]+(Error|Stopped): ", "", reason)  # launch.TaskStopped: stopped by the Slurm time limit
        return Failure(launch, f"{reason}; Slurm log: {job.paths.stdout}")
    return None if value == 0 else Failure(launch, describe_exit(value))


def wait_slurm(jobs: list[submitit.Job], launches: list[Launch], progress: Progress, poll_s: float = 5.0) -> list[Failure]:
    """Wait until every task has left Slurm's queue; return the failures.

    A task that is pending, or requeued after a preemption, is waited for: only its result file or
    its leaving the queue ends it.
    """
    pending = set(range(len(jobs)))
    started: dict[int, str] = {}  # the start time of each task seen running: a task seen waiting again, or started anew, was requeued
    failures: list[Failure] = []
    try:
        while pending:
            states = queue_states([jobs[i].job_id for i in pending])  # before the result files: a task writes its result, then leaves
            if states is not None:
                ended, requeued = [], []
                for index in sorted(pending):
                    state, start = states.get(jobs[index].job_id, ("", ""))
                    if not jobs[index].paths.result_pickle.exists() and state in ACTIVE_SLURM_STATES:
                        if index in started and (state in WAITING_AGAIN_STATES or (state == "RUNNING" and start != started[index])):
                            del started[index]
                            requeued.append(index)
                        if state == "RUNNING":
                            started[index] = start
                        continue
                    pending.discard(index)
                    ended.append(index)
                progress.running = sum(states.get(jobs[i].job_id, ("",))[0] == "RUNNING" for i in pending)
                for index in requeued:
                    progress.note(f"[{index + 1}/{len(jobs)}] requeued by Slurm (preempted, or scontrol requeue); it resumes from its checkpoint: {launches[index].title}")
                for index in ended:
                    failure = task_outcome(jobs[index], launches[index])
                    status = "done" if failure is None else f"FAILED ({failure.reason})"
                    progress.ended(f"[{index + 1}/{len(jobs)}] {status}: {launches[index].title}  (log: {launches[index].log_path})", failure is None)
                    if failure is not None:
                        failures.append(failure)
            progress.show()
            if pending:
                time.sleep(poll_s)
    finally:
        progress.close()
    return failures


def base_job_ids(jobs: list[submitit.Job]) -> list[str]:
    return sorted({job.job_id.split("_")[0] for job in jobs}, key=int)


def describe_jobs(jobs: list[submitit.Job]) -> str:
    """"Slurm job 12" (a single run is a plain job), "Slurm job array 12", or "Slurm jobs 12, 15"."""
    ids = base_job_ids(jobs)
    if len(ids) > 1:
        return f"Slurm jobs {', '.join(ids)}"
    return f"Slurm job array {ids[0]}" if "_" in jobs[0].job_id else f"Slurm job {ids[0]}"


def run_slurm(args: Args, launches: list[Launch], queued: list[Queued], folder: Path, gpus: bool, progress: Progress) -> list[Failure] | None:
    """Submit the runs as one Slurm job array and wait for it, and for the `queued` runs of earlier
    sweeps; return the failures (None with --no_wait). The sbatch script and the Slurm logs go to `folder`."""
    jobs, waited = [q.job for q in queued], [q.launch for q in queued]
    if queued:
        print(f"sweep: {len(queued)} run(s) still in Slurm's queue from an earlier sweep ({describe_jobs(jobs)}): waiting for them, not submitting them again", flush=True)
    if launches:
        print(f"sweep: submitting {len(launches)} run(s) ({args.gpus_per_run if gpus else 0} GPU(s) per run)", flush=True)
        submitted = submit(args, launches, folder, gpus)
        what = describe_jobs(submitted)
        if len(submitted) == 1:
            print(f"sweep: {what} (one run: a plain job, not an array)", flush=True)
        else:
            print(f"sweep: {what} ({len(submitted)} tasks, at most {args.slurm_array_parallelism} at once)", flush=True)
        jobs, waited = jobs + submitted, waited + launches
    every = describe_jobs(jobs)
    if args.no_wait:
        print(
            f"sweep: not waiting (--no_wait). Follow it with `squeue -j {','.join(base_job_ids(jobs))}`; run this "
            f"same command again to wait for it and aggregate (it submits only what is neither finished nor queued), or run "
            f"`python src/aggregate.py --input_dir {args.output_root} --output_dir {args.results_dir}` once it has left the queue",
            flush=True,
        )
        return None
    try:
        return wait_slurm(jobs, waited, progress)
    except (KeyboardInterrupt, utils.Interrupted) as e:
        signum = e.signum if isinstance(e, utils.Interrupted) else signal.SIGINT
        raise utils.Interrupted(signum, f"{every} keeps running: run this same command again to wait for it and aggregate, or `scancel` it") from None


# --- the sweep ------------------------------------------------------------------------------------


def aggregate_and_report(args: Args, failures: list[Failure], total: int, held: claims.Claims | None = None, running_elsewhere: int = 0) -> None:
    """aggregate.py over OUTPUT_ROOT; then, if any run failed, the list of failures (exit code 1).

    With `held`, one process aggregates at a time (a lock in the claims folder): each reads every run
    finished when its turn comes, so the process that ends last writes the complete results.
    """
    aggregate_args = aggregate.Args().parse_args(["--input_dir", str(args.output_root), "--output_dir", str(args.results_dir)])
    lock = held.exclusive(aggregate_lock(args.results_dir), f"aggregating into {args.results_dir}") if held else contextlib.nullcontext()
    try:
        with lock:
            aggregate.main(aggregate_args)
    except InputError as e:  # e.g. no finished run at all: still report the failures below
        if not failures and not running_elsewhere:
            raise
        print(f"aggregate: {e}", file=sys.stderr)
    if failures:
        raise RunsFailed(failures, total)


def oversubscription(jobs: int, nproc: int, cores: int) -> str | None:
    """A warning when more train.py processes run at once on CPUs than there are cores, saying what each gets."""
    processes = jobs * nproc
    if processes <= cores:
        return None
    return (
        f"sweep: warning: --jobs {jobs} x {nproc} process(es) = {processes} train.py processes on {cores} CPU core(s): each "
        f"gets 1 thread and about {cores / processes:.2g} of a core, so every run is slower; --jobs {max(1, cores // nproc)} "
        f"gives each process a core of its own"
    )


def main(args: Args, run: Runner = run_logged) -> None:
    """Run (or submit) the combinations not finished yet, resuming those with a checkpoint, then aggregate."""
    missing = [d for d in args.dataset_dirs if not d.is_dir()]
    if missing:
        raise InputError(
            f"dataset folder(s) not found: {', '.join(map(str, missing))}; run `poetry run python src/prepare.py` "
            f"first (with --num_folds 10 for datasets/livedoor/folds/0..9)"
        )
    slurm = args.launcher == "slurm" and not args.dry_run
    if slurm:
        require_slurm()

    # What is done: every combination whose setting (process count included) has a finished run.
    combinations = [Combination(*c) for c in itertools.product(args.models, args.lrs, args.seeds, args.dataset_dirs)]
    done = finished_settings(args.output_root)
    configs = combination_configs(combinations, args.output_root, args.extra_args, world_size=args.gpus_per_run)
    todo = [(c, config) for c, config in zip(combinations, configs) if setting_key(config) not in done]
    # What is on its way: a run that an earlier sweep submitted and that is still in Slurm's queue.
    in_queue = queued_runs(args.output_root) if slurm else {}
    queued = [in_queue[setting_id(config)] for _, config in todo if setting_id(config) in in_queue]
    todo = [(c, config) for c, config in todo if setting_id(config) not in in_queue]

    # Each run's output goes to its own log file, in a folder per sweep invocation. A combination with
    # an unfinished run that has a checkpoint resumes it (its settings are in its config.json): on Slurm as
    # planned here; locally when this process wins its claim (ClaimingRunner.resume), as things are then.
    log_dir = args.output_root / "sweep-logs" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    runtime = runtime_options(args.extra_args)
    launches, resumes = [], {}
    for i, (c, config) in enumerate(todo, start=1):
        launch = Launch(str(c), c.train_argv(args.output_root, args.extra_args), args.gpus_per_run, log_dir / c.log_name(i), runtime, setting_id(config))
        run_dir = resumable_run(args.output_root, c, setting_key(config))
        argv = resume_argv(run_dir, args.extra_args) if run_dir is not None else None
        if argv is not None:
            resumes[launch.title] = run_dir
            if args.launcher == "slurm" or args.dry_run:
                launch.argv = argv
        launches.append(launch)

    shape = f"{len(args.models)} models x {len(args.lrs)} lrs x {len(args.seeds)} seeds x {len(args.dataset_dirs)} datasets"
    print(
        f"sweep: {len(combinations)} combinations ({shape}), {len(combinations) - len(todo) - len(queued)} already done, "
        f"{len(todo)} to run" + (f" ({len(resumes)} of them resume a run from its checkpoint)" if resumes else "")
        + (f", {len(queued)} still in Slurm's queue" if queued else "") + f"; outputs in {args.output_root}",
        flush=True,
    )  # fmt: skip
    held = claims.Claims(args.output_root / CLAIMS_FOLDER, args.claim_timeout)
    planned = {str(c): Planned(c, claim_name(c, config), setting_key(config)) for c, config in todo}
    if args.launcher == "local":
        say_claimed(held, planned)
    if args.dry_run:
        for i, launch in enumerate(launches, start=1):
            resuming = f" (resuming {resumes[launch.title]})" if launch.title in resumes else ""
            print(f"[{i}/{len(launches)}] {launch.title}{resuming}\n  {command_line(train_command(launch.argv, launch.nproc))}", flush=True)
        return

    device = configs[0]["device"]
    progress = Progress(len(launches) + len(queued))
    with held:  # its heartbeat lasts until the aggregation is written
        running_elsewhere = 0
        if not launches and not queued:
            failures: list[Failure] | None = []
        elif slurm:
            for title, run_dir in resumes.items():
                print(f"sweep: {title}: resuming {run_dir}", flush=True)
            # The submitting machine may have no GPU: --device says what the runs need.
            failures = run_slurm(args, launches, queued, log_dir / "slurm", wants_gpus(device), progress)
            if failures is None:  # --no_wait
                return
        else:
            cores = utils.available_cpus()
            slots = local_slots(args, device, torch.cuda.device_count(), cores, os.environ)
            print(f"sweep: {len(slots)} run(s) at once ({', '.join(dict.fromkeys(s.label for s in slots))}); logs in {log_dir}", flush=True)
            if "CUDA_VISIBLE_DEVICES" not in slots[0].env and (warning := oversubscription(args.jobs, args.gpus_per_run, cores)):
                print(warning, file=sys.stderr, flush=True)
            # Any number of sweep processes with this grid share it: each runs what it claims first.
            runner = ClaimingRunner(run, held, planned, args.output_root, args.extra_args)
            failures = run_claimed(launches, slots, runner, progress)
            running_elsewhere = report_claims(runner, len(launches))

        aggregate_and_report(args, failures, len(launches) + len(queued), held, running_elsewhere)


def cli(argv: Sequence[str] | None = None) -> None:
    """sweep.py's command line. Stopped by a signal (Ctrl-C, kill, a closed terminal), it ends in one line with
    exit code 128 + the signal (130, 143, 129), never a traceback; while runs execute here, see SignalRelay."""
    signal.signal(signal.SIGHUP, utils.raise_interrupted)
    utils.run_cli(main, Args().parse_args(argv), catch_sigterm=True)


if __name__ == "__main__":
    cli()
