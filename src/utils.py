"""Small helpers shared by the stages: JSON/JSONL I/O, atomic writes, seeding, logging."""

from __future__ import annotations

import atexit
import csv
import json
import os
import random
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from tqdm import tqdm


class InputError(Exception):
    """Bad input the user can fix; the scripts print its message and exit without a traceback."""


def current_umask() -> int:
    """The process's umask, read without changing it where the OS says it (Linux: /proc/self/status).

    Elsewhere os.umask must set a value to return the old one: a short window in which another
    thread creating a file would get the temporary mask.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk, so that a rename never publishes a file whose data was lost."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash therefore never leaves a half-written file under the final name. The file gets the
    mode a plain open() would give it (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; swap it into place only if the block succeeds.

    An existing folder at `path` is replaced as a whole, so readers see either the old
    contents or the new ones, never a mixture; if the swap fails half-way, the old folder is put
    back. Its folders and files get the modes of a plain mkdir() and open() (0777 and 0666 less
    the umask), not mkdtemp's private 0700 nor the 0600 that some writers (safetensors) use, and
    the files written in it are on the disk before it appears.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        umask = current_umask()
        os.chmod(tmp, 0o777 & ~umask)
        for entry in tmp.rglob("*"):
            if entry.is_symlink():
                continue
            if entry.is_dir():
                os.chmod(entry, 0o777 & ~umask)
            else:
                executable = entry.stat().st_mode & 0o111
                os.chmod(entry, (0o777 if executable else 0o666) & ~umask)
                fsync_file(entry)
        swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_into_place(new: Path, path: Path) -> None:
    """Rename folder `new` to `path`, replacing a folder there; on failure, the old one is back at `path`."""
    if not path.exists():
        os.replace(new, path)
        return
    backup_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    backup = backup_dir / path.name
    swapped = False
    try:
        os.replace(path, backup)
        try:
            os.replace(new, path)
            swapped = True
        except BaseException:
            os.replace(backup, path)  # put the old folder back
            raise
    finally:
        # backup_dir now holds the old folder after a swap (delete it), nothing once the old folder is
        # back (delete it), or the old folder if it could not be put back (keep it: the only copy).
        if swapped or not backup.exists():
            shutil.rmtree(backup_dir, ignore_errors=True)


def to_json(data: Any) -> str:
    """One JSON document in UTF-8 text (no \\u escapes), as every file of the project has it."""
    return json.dumps(data, ensure_ascii=False)


def save_json(data: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def load_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def save_jsonl(rows: Iterable[dict], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(to_json(row) + "\n")


def load_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file; a malformed line raises InputError naming the file and line number."""
    path = Path(path)
    rows = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}: line {line_no}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                raise InputError(f"{path}: line {line_no}: empty line (JSONL needs one object per line)")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def check_rows(rows: list[dict], text_fields: Sequence[str], source: str, other_fields: Sequence[str] = (), hint: str = "") -> list[dict]:
    """Every row has `other_fields` and each text field, and every text field is a string.

    JSON null, numbers and true/false are refused rather than turned into the text "None" or "1".
    `hint` follows the list of missing fields (what the reader needs them for).
    """
    for line_no, row in enumerate(rows, start=1):
        missing = [field for field in (*other_fields, *text_fields) if field not in row]
        if missing:
            raise InputError(f"{source}: line {line_no}: missing field(s) {', '.join(missing)}{hint}")
        for field in text_fields:
            if not isinstance(row[field], str):
                raise InputError(f"{source}: line {line_no}: {field} must be a string, got {to_json(row[field])}")
    return rows


def save_csv(header: list[str], rows: Iterable[Iterable[Any]], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def available_cpus() -> int:
    """CPU cores this process may run on: its affinity (Slurm, cgroups, taskset), else all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    import torch  # imported here so that torch-free stages (prepare.py) start fast

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds the CUDA and MPS generators


# --- run folders, as train.py leaves them (runs.py); read here by the stages that do not import torch ---------

CHECKPOINT = "checkpoint.pt"  # a run's state at the end of its last complete epoch (train.py --resume)
# The line with which train.py names its run folder in its output: a requeued Slurm task finds its run in its log by it.
RUN_FOLDER_LINE = "run folder: "


def is_finished(run_dir: Path) -> bool:
    """A run folder whose run finished: train.py writes test-metrics.json last."""
    return (run_dir / "test-metrics.json").is_file()


def is_resumable(run_dir: Path) -> bool:
    """An unfinished run with a checkpoint: `train.py --resume RUN_DIR` continues it from its last epoch."""
    return (run_dir / "config.json").is_file() and (run_dir / CHECKPOINT).is_file() and not is_finished(run_dir)


def is_main_process() -> bool:
    """Whether this process writes and prints: rank 0 under torchrun, and any process outside a process group.

    Looked up in sys.modules so that torch-free stages never import torch for it: a process that
    has not imported torch.distributed cannot have joined a group.
    """
    dist = sys.modules.get("torch.distributed")
    return dist is None or not dist.is_initialized() or dist.get_rank() == 0


def show_progress() -> bool:
    """Progress bars only on rank 0 and on a terminal: a log file or a pipe (sweep.py --jobs logs, Slurm, `| tee`)
    gets the one line per epoch and per evaluation that the stages log anyway, not bar frames (\\r, ESC[A)."""
    return is_main_process() and sys.stderr.isatty()


def log(message: str) -> None:
    """Print a line on rank 0 only (every torchrun process runs the same code), above any progress bar."""
    if is_main_process():
        tqdm.write(message)


def first_line(error: BaseException) -> str:
    """An exception's message in one line (its first), for one-line errors; its repr if it has no message."""
    return (str(error).strip().splitlines() or [repr(error)])[0]


def exit_now(code: int = 0) -> NoReturn:
    """End the process once its work is done and written: the atexit handlers (logging, multiprocessing, tempfile
    finalizers) run, the streams are flushed, then os._exit skips the interpreter's teardown.

    That teardown (clearing thousands of torch and transformers modules, garbage-collecting what they hold)
    took 1.5 s or more after a run's last line, for nothing: every file is already closed and on disk.
    Only for the end of a command-line stage, never inside a library call or a test.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (e.g. `| head`) has nothing left to receive
            pass
    os._exit(code)


class Interrupted(BaseException):
    """A stop signal: SIGINT (Ctrl-C) or SIGTERM (kill, Slurm preemption, the end of a job's time).

    Raised in the main thread by run_cli's signal handlers. A BaseException, as KeyboardInterrupt
    is, so that no `except Exception` swallows it; progress bars and temporary files close on the
    way out. `note` is what the stage adds to its one line (train.py: how to resume the run).
    """

    def __init__(self, signum: int, note: str = "") -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.note = signum, note


def raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def run_cli(main: Callable[[Any], object], args: Any, catch_sigterm: bool = False) -> None:
    """Run a stage's main(args) and exit at once (exit_now); user errors end in one clear line on stderr and exit code 1.

    Ctrl-C (SIGINT) ends in one line too, with exit code 130; with `catch_sigterm`, so does SIGTERM,
    with 143 (128 + the signal's number, as a shell reports a process killed by it).
    """
    signal.signal(signal.SIGINT, raise_interrupted)
    if catch_sigterm:
        signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        main(args)
        exit_now(0)
    except InputError as e:
        # One write of the whole line: under torchrun every rank reports at once on a shared stderr,
        # and print()'s separate write of the newline would let their lines run together.
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        sys.exit(1)
    except Interrupted as e:
        sys.stderr.write(f"interrupted by {e}{f': {e.note}' if e.note else ''}\n")
        sys.stderr.flush()
        sys.exit(128 + e.signum)
