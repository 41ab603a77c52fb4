"""How the sweep starts one train.py run: its command, its share of the machine, its log file.

Shared by sweep.py's local runner and by each task of a Slurm job array. Kept free of torch and
transformers (standard library, submitit and utils), so that a Slurm task starts in a fraction of a
second before its train.py process pays for those imports.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import submitit

import utils

TRAIN_PY = Path(__file__).resolve().with_name("train.py")


def command_line(command: Sequence[str]) -> str:
    """A run's command, to copy and run by hand (from the current folder)."""
    shown = []
    for token in command:
        try:
            shown.append(str(Path(token).relative_to(Path.cwd())) if Path(token).is_absolute() else token)
        except ValueError:
            shown.append(token)
    return shlex.join(shown)


@dataclass
class Launch:
    """One train.py run as the sweep starts it: what it is, its train.py arguments, processes and log file."""

    title: str  # what the run is, for messages (its combination)
    argv: list[str]
    nproc: int
    log_path: Path


@dataclass
class Slot:
    """Where a run executes: environment variables (GPUs, threads) and train.py options for its share of the machine."""

    env: dict[str, str] = field(default_factory=dict)
    train_argv: list[str] = field(default_factory=list)
    label: str = "cpu"


def train_command(argv: Sequence[str], nproc: int, python: str = sys.executable, script: Path = TRAIN_PY) -> list[str]:
    """train.py in a new Python process, or under torchrun (one process per GPU) when nproc > 1."""
    if nproc == 1:
        return [python, str(script), *argv]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script), *argv]


def thread_slot(cores: int, runs_at_once: int, nproc: int, forwarded: Sequence[str]) -> Slot:
    """An equal share of `cores` for one run: its math threads per process and its tokeniser workers.

    Without it, every run would start one thread per core of the machine and N runs would fight
    over the cores. A --num_workers that the user forwarded wins.
    """
    per_process = max(1, cores // (runs_at_once * nproc))
    env = {name: str(per_process) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    train_argv = [] if "--num_workers" in forwarded else ["--num_workers", str(per_process)]
    return Slot(env=env, train_argv=train_argv, label=f"{per_process} thread(s) per process")


def run_logged(launch: Launch, slot: Slot) -> int:
    """Run train.py (or torchrun) for `launch` in `slot`, its output appended to its log file; the exit code."""
    command = train_command([*launch.argv, *slot.train_argv], launch.nproc)
    launch.log_path.parent.mkdir(parents=True, exist_ok=True)
    with launch.log_path.open("a", encoding="utf-8") as log:
        log.write(f"# {datetime.now().isoformat(timespec='seconds')} {slot.label}: {command_line(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **slot.env}, check=False).returncode


class SlurmRun(submitit.helpers.Checkpointable):
    """One task of the job array: train.py (or torchrun) as a subprocess, as the local runner starts it.

    Checkpointable: when Slurm preempts the task, submitit requeues it and the run starts again
    (an unfinished run folder is ignored by the sweep and by aggregate.py). A task stopped by its
    time limit is not requeued: it would only run out of time again.
    """

    def __call__(self, launch: Launch) -> int:
        # Slurm sets CUDA_VISIBLE_DEVICES to the task's GPUs; the task's CPUs are shared by its processes.
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or utils.available_cpus())
        slot = thread_slot(cpus, 1, launch.nproc, launch.argv)
        slot.label = f"Slurm job {os.environ.get('SLURM_JOB_ID')}, {slot.label}"
        return run_logged(launch, slot)


