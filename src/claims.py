"""Claims: which sweep process runs which combination, as small files in a folder that all of them see.

Any number of sweep.py processes with the same grid (a PBS or Grid Engine array, several Slurm jobs,
commands over ssh) share it through OUTPUT_ROOT/sweep-claims:

- Before a process starts a combination it creates the claim file NAME.0.claim. The file is written
  whole under a name of its own, then hard-linked to NAME.0.claim, which fails when that name exists:
  one process wins, on a local disk, NFS or Lustre alike (the recipe open(2) gives for NFS). flock
  is not used: NFS and Lustre need not honour it across nodes.
- The claim names its holder (host, pid, the pid's start time) and carries a heartbeat, rewritten
  every timeout/5 seconds while the run lasts.
- When the run ends, the holder writes its outcome into the claim (done or failed); a claim given back
  unfinished (the process was interrupted) is marked released, free for the next process.
- A claim is stale when its holder is gone: its pid is dead on this host, or its heartbeat is older
  than `timeout` seconds (another host, or a hung process). The next process takes it over by winning
  NAME.1.claim, the same create-once race: two processes never both take over one claim. Files are
  never deleted, so the generation numbers only grow and a late reader never wins an old number.

Kept free of torch: the standard library and utils only.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import utils
from utils import InputError

HOST = socket.gethostname()
RUNNING, DONE, FAILED, RELEASED = "running", "done", "failed", "released"
SUFFIX = ".claim"


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, field 22 of /proc/PID/stat), to tell it from a
    later process that got the same pid; None where there is no /proc (or no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else None  # a zombie has ended


def process_alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` of this host still runs, and is the one that started at `start` (when known)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    now = process_start(pid)
    if now is None:
        return not Path("/proc/self/stat").exists()  # with /proc, no start time means gone or a zombie
    return start is None or now == start


def ago(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    return f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class Record:
    """What a claim file says: the combination, its holder, its heartbeat and, once it ended, its outcome."""

    title: str  # the combination, for messages
    host: str
    pid: int
    pid_start: str | None  # process_start(pid) on the holder's host
    claimed: float  # time.time() of the claim
    heartbeat: float  # time.time() of the holder's last sign of life
    token: str  # the holding Claims object (a process may hold claims through several)
    state: str = RUNNING  # running, then done, failed or released
    ended: float | None = None
    outcome: str = ""  # e.g. "exit code 1"
    log: str = ""  # the run's log file
    generation: int = field(default=0, compare=False)  # from the file name, not stored in the file

    @property
    def holder(self) -> str:
        return f"{self.host} pid {self.pid}"

    def stale_reason(self, timeout: float, now: float) -> str | None:
        """Why this running claim's holder is taken for gone, or None while it counts as alive."""
        if self.state != RUNNING:
            return None
        if self.host == HOST and not process_alive(self.pid, self.pid_start):
            return f"its process {self.pid} on {self.host} is gone"
        if now - self.heartbeat > timeout:
            return f"no heartbeat from {self.holder} for {ago(now - self.heartbeat)} (--claim_timeout {timeout:g} s)"
        return None

    def to_json(self) -> str:
        return utils.to_json({k: v for k, v in asdict(self).items() if k != "generation"})


@dataclass
class Claim:
    """A claim this process won: its file's generation and, on a takeover, the record it replaced."""

    name: str
    generation: int
    record: Record
    previous: Record | None = None  # the claim's former record: stale, released, or ended before this process started
    stale_reason: str | None = None  # why the previous holder was taken for gone, on a takeover
    lost_to: Record | None = None  # set when another process took this claim over (its heartbeat was late)


class Claims:
    """The claims of one process in `folder`, with one heartbeat thread for all it holds.

    A record that ended (done or failed) after this object was made is left alone: the combination was
    settled while this process ran (a failure is not retried by every process of an array). An older
    one is claimed again: a new sweep command retries what failed before it.
    """

    def __init__(self, folder: Path, timeout: float, heartbeat_s: float | None = None) -> None:
        self.folder = Path(folder)
        self.timeout = timeout
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else timeout / 5
        self.started = time.time()
        self.token = f"{HOST}-{os.getpid()}-{secrets.token_hex(6)}"
        self.held: dict[str, Claim] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path(self, name: str, generation: int) -> Path:
        return self.folder / f"{name}.{generation}{SUFFIX}"

    # --- reading ---------------------------------------------------------------------------------

    def generations(self) -> dict[str, list[int]]:
        """Every claim name in the folder with its generations, newest first."""
        found: dict[str, list[int]] = {}
        try:
            entries = os.listdir(self.folder)
        except FileNotFoundError:
            return found
        for entry in entries:
            if entry.startswith(".") or not entry.endswith(SUFFIX):
                continue
            name, _, generation = entry[: -len(SUFFIX)].rpartition(".")
            if name and generation.isdigit():
                found.setdefault(name, []).append(int(generation))
        return {name: sorted(gens, reverse=True) for name, gens in found.items()}

    def read(self, name: str, generation: int) -> Record:
        path = self.path(name, generation)
        try:
            data = utils.load_json(path)
            record = Record(**{k: v for k, v in data.items() if k in Record.__dataclass_fields__})
        except (InputError, TypeError, AttributeError):
            # Unreadable (damaged by hand or by a disk): its holder is unknown, its age is the file's.
            mtime = path.stat().st_mtime
            record = Record(title=name, host="(unreadable claim)", pid=0, pid_start=None, claimed=mtime, heartbeat=mtime, token="")
        record.generation = generation
        return record

    def newest(self, name: str) -> int | None:
        """The newest generation of claim `name`, or None if it was never claimed. Generations run from 0
        without gaps (none is deleted), so a few lookups find it, however many claims the folder holds."""
        generation = -1
        while self.path(name, generation + 1).exists():
            generation += 1
        return generation if generation >= 0 else None

    def current(self, name: str) -> Record | None:
        """The record of the newest generation of claim `name`, or None if it was never claimed."""
        generation = self.newest(name)
        return None if generation is None else self.read(name, generation)

    def snapshot(self) -> dict[str, Record]:
        """The current record of every claim in the folder (one listing, for reports)."""
        found = {}
        for name, generations in self.generations().items():
            try:
                found[name] = self.read(name, generations[0])
            except FileNotFoundError:  # removed by hand meanwhile
                continue
        return found

    def settled_here(self, record: Record) -> bool:
        """Whether `record` ended (done or failed) while this process ran: not to be run again by it."""
        return record.state in (DONE, FAILED) and (record.ended or 0) >= self.started

    # --- claiming --------------------------------------------------------------------------------

    def claim(self, name: str, title: str, log: str = "") -> Claim | Record:
        """Claim `name` for this process: the Claim if it won, else the record that stands in its way (a
        live holder, or an outcome settled while this process ran)."""
        current = self.current(name)
        stale = None
        if current is not None:
            if current.state == RUNNING:
                stale = current.stale_reason(self.timeout, time.time())
                if stale is None:
                    return current
            elif self.settled_here(current):
                return current
        generation = 0 if current is None else current.generation + 1
        now = time.time()
        record = Record(title, HOST, os.getpid(), process_start(os.getpid()), now, now, self.token, log=log, generation=generation)
        if not self.create(self.path(name, generation), record.to_json()):
            winner = self.current(name)  # another process won this generation
            assert winner is not None
            return winner
        claim = Claim(name, generation, record, current, stale)
        with self.lock:
            self.held[name] = claim
        self.start_heartbeat()
        return claim

    def create(self, path: Path, text: str) -> bool:
        """Create `path` with `text` unless it exists; True if this call created it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{self.token}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 less the umask
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                # NFS may answer EEXIST to a retried link that did succeed: then tmp has 2 links.
                return os.stat(tmp).st_nlink == 2
            except OSError as e:
                if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                    raise InputError(f"cannot create the claim {path}: this filesystem has no hard links ({e.strerror}); put --output_root on a local disk, NFS or Lustre") from e
                raise
        finally:
            tmp.unlink(missing_ok=True)

    def write(self, claim: Claim) -> None:
        """Rewrite this process's claim file (atomically: readers see the old record or the new one)."""
        with utils.atomic_path(self.path(claim.name, claim.generation)) as tmp:
            tmp.write_text(claim.record.to_json(), encoding="utf-8")

    def release(self, claim: Claim, state: str, outcome: str = "") -> None:
        """End a claim: done, failed (with why) or released (given back unfinished, free for the next process)."""
        with self.lock:
            self.held.pop(claim.name, None)
            claim.record.state, claim.record.outcome, claim.record.ended = state, outcome, time.time()
            if claim.lost_to is None:
                self.write(claim)

    # --- heartbeat -------------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self.beat_forever, name="claims-heartbeat", daemon=True)
                self.thread.start()

    def beat_forever(self) -> None:
        while not self.stop.wait(self.heartbeat_s):
            self.beat()

    def beat(self) -> None:
        """Refresh the heartbeat of every claim held; notice the ones another process took over."""
        with self.lock:
            for claim in list(self.held.values()):
                newer = self.current(claim.name)
                if newer is not None and newer.generation > claim.generation:
                    claim.lost_to = newer
                    del self.held[claim.name]
                    print(
                        f"sweep: warning: {newer.holder} took over {claim.record.title} (this process's heartbeat came "
                        f"later than --claim_timeout allows); both runs go on, and a copy counts once",
                        flush=True,
                    )
                    continue
                claim.record.heartbeat = time.time()
                try:
                    self.write(claim)
                except OSError as e:  # a full or unreachable disk: try again at the next beat
                    print(f"sweep: warning: cannot refresh the claim {self.path(claim.name, claim.generation)}: {e}", flush=True)

    def close(self) -> None:
        """Stop the heartbeat; give back (released) every claim still held, e.g. after an interruption."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        for claim in list(self.held.values()):
            try:
                self.release(claim, RELEASED, "given back unfinished")
            except OSError:
                pass  # a stale claim then: the next process takes it over after --claim_timeout

    @contextmanager
    def exclusive(self, name: str, title: str, poll_s: float = 0.5) -> Iterator[Claim]:
        """Hold lock `name` for the block, waiting while another live process holds it (a stale one is taken over)."""
        said = False
        while True:
            got = self.claim(name, title)
            if isinstance(got, Claim):
                break
            if not said:
                print(f"sweep: waiting for {got.holder} to finish {got.title}", flush=True)
                said = True
            time.sleep(poll_s)
        if got.stale_reason:
            print(f"sweep: took over {title} from {got.previous.holder}: {got.stale_reason}", flush=True)
        try:
            yield got
        finally:
            self.release(got, RELEASED)


def describe(record: Record, now: float | None = None) -> str:
    """One line about a claim's record, for reports."""
    now = time.time() if now is None else now
    if record.state == RUNNING:
        return f"{record.title}: running on {record.holder} (claimed {ago(now - record.claimed)} ago, heartbeat {ago(now - record.heartbeat)} ago)"
    what = record.state + (f" ({record.outcome})" if record.outcome else "")
    return f"{record.title}: {what} on {record.holder}" + (f"; log: {record.log}" if record.log else "")

