"""How the sweep starts one train.py run: its command, its share of the machine, its log file.

Shared by sweep.py's local runner and by each task of a Slurm job array. Kept free of torch and
transformers (standard library, submitit and utils), so that a Slurm task starts in a fraction of a
second before its train.py process pays for those imports.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import FrameType

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


def has_option(argv: Sequence[str], option: str) -> bool:
    """Whether `argv` sets `option` (e.g. "--num_workers"), written `--option value` or `--option=value`."""
    return any(token == option or token.startswith(f"{option}=") for token in argv)


def option_groups(argv: Sequence[str]) -> list[list[str]]:
    """`argv` cut into its options, each with its values: `--a 1 2 --b=3 --c` -> [--a 1 2], [--b=3], [--c]."""
    groups: list[list[str]] = []
    for token in argv:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def select_options(argv: Sequence[str], names: set[str] | frozenset[str]) -> list[str]:
    """The options of `argv` (with their values, in either form) whose name, without its --, is in `names`."""
    return [token for group in option_groups(argv) if group[0].split("=", 1)[0].removeprefix("--") in names for token in group]


@dataclass
class Launch:
    """One train.py run as the sweep starts it: what it is, its train.py arguments, processes and log file."""

    title: str  # what the run is, for messages (its combination)
    argv: list[str]
    nproc: int
    log_path: Path
    runtime_argv: list[str] = field(default_factory=list)  # the runtime options among argv: what a resumption passes on
    setting: str = ""  # the run's setting (JSON), by which a rerun of the sweep recognises it in Slurm's queue


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
    over the cores. A --num_workers that the user forwarded (in either form) wins.
    """
    per_process = max(1, cores // (runs_at_once * nproc))
    env = {name: str(per_process) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    train_argv = [] if has_option(forwarded, "--num_workers") else ["--num_workers", str(per_process)]
    return Slot(env=env, train_argv=train_argv, label=f"{per_process} thread(s) per process")


class Stopping(Exception):
    """The sweep is stopping (it got a signal): no new run starts."""


class ProcessGroups:
    """The running train.py processes of the local runner, each in a process group of its own.

    Ctrl-C in a terminal then reaches the sweep only, and the sweep passes a signal on to each run
    exactly once, torchrun's workers included (they share their launcher's group).
    """

    def __init__(self) -> None:
        # Taken by the runner threads and by the sweep's signal handler (reentrant: a second signal may
        # interrupt the handler of the first, in the same thread).
        self._lock = threading.RLock()
        self._running: set[subprocess.Popen] = set()
        self.stop_signal: int | None = None

    @contextmanager
    def started(self, command: Sequence[str], **popen: object) -> Iterator[subprocess.Popen]:
        with self._lock:
            if self.stop_signal is not None:
                raise Stopping
            process = subprocess.Popen(command, start_new_session=True, **popen)  # type: ignore[call-overload]
            self._running.add(process)
        try:
            yield process
        finally:
            with self._lock:
                self._running.discard(process)

    def stop(self, signum: int) -> int:
        """Start no new run, and send `signum` to every running one; the number of runs it reached."""
        with self._lock:
            self.stop_signal = signum
            return sum(send(process, signum) for process in self._running)

    def kill(self) -> int:
        with self._lock:
            return sum(send(process, signal.SIGKILL) for process in self._running)

    def reset(self) -> None:
        with self._lock:
            self.stop_signal = None


def send(process: subprocess.Popen, signum: int) -> bool:
    """Send `signum` to the process group of `process`; whether it was still there."""
    try:
        os.killpg(process.pid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


RUNNING = ProcessGroups()  # the local runner's train.py processes (one sweep per Python process)


def run_logged(launch: Launch, slot: Slot, own_group: bool = True) -> int:
    """Run train.py (or torchrun) for `launch` in `slot`, its output appended to its log file; the exit code.

    own_group: start it in a process group of its own, registered in RUNNING, to which the sweep
    passes SIGINT and SIGTERM on (the local runner). A Slurm task keeps it in its own group instead:
    Slurm signals the whole task, and train.py must not die of submitit's USR2 (see SlurmRun).
    """
    command = train_command([*launch.argv, *slot.train_argv], launch.nproc)
    launch.log_path.parent.mkdir(parents=True, exist_ok=True)
    with launch.log_path.open("a", encoding="utf-8") as log:
        log.write(f"# {datetime.now().isoformat(timespec='seconds')} {slot.label}: {command_line(command)}\n")
        log.flush()
        # Unbuffered: the log is current for `tail -f`, and the run folder line is there even after a SIGKILL.
        popen = {"stdout": log, "stderr": subprocess.STDOUT, "env": {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1"}}
        if own_group:
            with RUNNING.started(command, **popen) as process:
                return process.wait()
        with subprocess.Popen(command, preexec_fn=ignore_usr2, **popen) as process:  # type: ignore[call-overload]
            try:
                return process.wait()
            except BaseException:
                # The task is going (e.g. submitit's requeue): train.py stops as on SIGTERM, with its checkpoint.
                process.terminate()
                process.wait()
                raise


def ignore_usr2() -> None:
    """In train.py's process before it starts: Slurm's USR2 (submitit's early warning, sent to every process of the task) is for the task only."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def last_run_folder(log_path: Path) -> Path | None:
    """The run folder that the latest train.py of this log made, if it said so."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    folders = [line.removeprefix(utils.RUN_FOLDER_LINE).strip() for line in lines if line.startswith(utils.RUN_FOLDER_LINE)]
    return Path(folders[-1]) if folders else None


# --- one task of a Slurm job array ---------------------------------------------------------------------


def slurm_seconds_left(job_id: str) -> float | None:
    """Seconds before the Slurm job's time limit, as squeue tells it (%L: [days-][hours:]minutes:seconds); None if unknown."""
    try:
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = result.stdout.strip()
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(part) for part in clock.split(":")]
        seconds = sum(value * 60**i for i, value in enumerate(reversed(parts)))
        return seconds + 86400 * int(days or 0)
    except ValueError:
        return None  # INVALID, UNLIMITED, NOT_SET or no answer


class TaskStopped(Exception):
    """The task was stopped by its time limit: the sweep reports the run as failed, with this message."""


class SlurmRun(submitit.helpers.Checkpointable):
    """One task of the job array: train.py (or torchrun) as a subprocess, as the local runner starts it.

    Preemption, `scontrol requeue` and scancel send SIGTERM to every process of the task: train.py
    stops and keeps its last epoch's checkpoint, and this task ends without a result, so that the
    sweep keeps waiting. Slurm then runs the task again (preemption, requeue) and the task resumes
    the run folder that its earlier attempt made; or the task leaves the queue (scancel) and the
    sweep reports it. submitit's USR2 comes `signal_delay_s` before the time limit: the run is then
    reported as stopped by it (not requeued: it would only run out of time again; a rerun of the
    sweep resumes it). A USR2 earlier than that is a preemption notice: the task requeues itself.
    """

    signal_delay_s = 90  # the class's value for tasks pickled before it was an argument

    def __init__(self, signal_delay_s: int = 90) -> None:
        self.signal_delay_s = signal_delay_s

    def __call__(self, launch: Launch) -> int:
        job_id = os.environ.get("SLURM_JOB_ID", "")
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
        signals = TaskSignals(job_id, self.signal_delay_s)
        with signals.handled():
            # An earlier attempt of this task (before a requeue) may have finished its run, or left it resumable.
            earlier = last_run_folder(launch.log_path)
            if earlier is not None and utils.is_finished(earlier):
                note(launch.log_path, f"{earlier} is finished (by an earlier attempt of this task)")
                return 0
            if earlier is not None and utils.is_resumable(earlier):
                note(launch.log_path, f"task requeued: resuming {earlier} from its checkpoint")
                launch = replace(launch, argv=["--resume", str(earlier), *launch.runtime_argv])
            # Slurm sets CUDA_VISIBLE_DEVICES to the task's GPUs; the task's CPUs are shared by its processes.
            cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or utils.available_cpus())
            slot = thread_slot(cpus, 1, launch.nproc, launch.argv)
            slot.label = f"Slurm job {job_id}, {slot.label}"
            code = None if signals.terminated else run_logged(launch, slot, own_group=False)
        if code == 0:
            return 0
        if signals.timed_out:
            folder = last_run_folder(launch.log_path)
            resumable = f"; {folder} keeps its last checkpoint: run the sweep again to resume it" if folder and utils.is_resumable(folder) else ""
            raise TaskStopped(f"stopped by the Slurm time limit (raise --slurm_time){resumable}")
        if signals.terminated:
            # Preempted, requeued or cancelled: no result, so the sweep waits while Slurm runs the task again.
            sys.exit(128 + signal.SIGTERM)
        return code  # type: ignore[return-value]


def note(log_path: Path, message: str) -> None:
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"# {datetime.now().isoformat(timespec='seconds')} {message}\n")


class TaskSignals:
    """What the task was told by Slurm while its train.py ran: SIGTERM, or USR2 before the time limit."""

    def __init__(self, job_id: str, signal_delay_s: int) -> None:
        self.job_id, self.signal_delay_s = job_id, signal_delay_s
        self.terminated = self.timed_out = False

    def time_limit_near(self) -> bool:
        """USR2 is submitit's warning `signal_delay_s` before the time limit, or a preemption notice (any earlier)."""
        left = slurm_seconds_left(self.job_id)
        return left is None or left <= 2 * self.signal_delay_s + 60

    def on_term(self, signum: int, frame: FrameType | None) -> None:
        self.terminated = True  # train.py got it too (Slurm signals the whole task) and stops

    def on_usr2(self, signum: int, frame: FrameType | None) -> None:
        if self.time_limit_near():
            self.timed_out = True  # train.py goes on until the limit's SIGTERM; its last checkpoint stays
            return
        # A preemption notice: requeue now (Slurm then sends SIGTERM); the next attempt resumes the run.
        subprocess.run(["scontrol", "requeue", self.job_id], check=False, timeout=60)

    @contextmanager
    def handled(self) -> Iterator[None]:
        previous = {signum: signal.signal(signum, handler) for signum, handler in ((signal.SIGTERM, self.on_term), (signal.SIGUSR2, self.on_usr2))}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
