"""Claims (src/claims.py): sweep processes with the same grid share it, each combination run once; a
stale claim is taken over; aggregations take turns. The Grid Engine tests (test_gridengine.py) do the
same through a real scheduler."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import claims
import sweep
import utils
from test_sweep import FORWARDED, LRS, SEEDS, finished_runs, in_process, plan, sweep_args

SRC = Path(__file__).resolve().parent.parent / "src"


def dead_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def plant(folder: Path, name: str, generation: int = 0, **fields) -> claims.Record:
    """A claim file as another process would have written it."""
    now = time.time()
    record = claims.Record(**{"title": name, "host": "node-b", "pid": 4242, "pid_start": None, "claimed": now, "heartbeat": now, "token": "other", **fields})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.{generation}.claim").write_text(record.to_json(), encoding="utf-8")
    return record


# --- the claim files ----------------------------------------------------------------------------


def test_one_of_many_racing_processes_wins_a_claim(tmp_path: Path) -> None:
    racers = [claims.Claims(tmp_path, timeout=60) for _ in range(8)]
    start = threading.Barrier(len(racers))
    results: list[claims.Claim | claims.Record] = [None] * len(racers)  # type: ignore[list-item]

    def race(i: int) -> None:
        start.wait()
        results[i] = racers[i].claim("combo", "the combination")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(racers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [r for r in results if isinstance(r, claims.Claim)]
    assert len(won) == 1
    assert all(r.token == won[0].record.token and r.state == claims.RUNNING for r in results if isinstance(r, claims.Record))
    # One complete file, no temporary file left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["combo.0.claim"]
    record = utils.load_json(tmp_path / "combo.0.claim")
    assert (record["host"], record["pid"], record["state"], record["title"]) == (claims.HOST, os.getpid(), "running", "the combination")
    for racer in racers:
        racer.close()


def test_a_live_claim_is_left_and_an_outcome_is_kept_for_this_process_only(tmp_path: Path) -> None:
    a, b = claims.Claims(tmp_path, timeout=60), claims.Claims(tmp_path, timeout=60)
    claim = a.claim("combo", "X", log="run.log")
    assert isinstance(claim, claims.Claim) and claim.previous is None
    busy = b.claim("combo", "X")
    assert isinstance(busy, claims.Record) and busy.holder == f"{claims.HOST} pid {os.getpid()}" and busy.log == "run.log"

    a.release(claim, claims.FAILED, "exit code 1")
    settled = b.claim("combo", "X")  # failed while b ran: b does not run it again
    assert isinstance(settled, claims.Record) and (settled.state, settled.outcome) == (claims.FAILED, "exit code 1")
    # A sweep process started later (the same command run again) retries it, in the claim's next generation.
    later = claims.Claims(tmp_path, timeout=60)
    retry = later.claim("combo", "X")
    assert isinstance(retry, claims.Claim) and retry.generation == 1 and retry.stale_reason is None
    assert retry.previous is not None and retry.previous.state == claims.FAILED
    assert claims.describe(later.current("combo")).startswith(f"X: running on {claims.HOST} pid {os.getpid()} (claimed 0s ago")

    # A claim given back unfinished (an interrupted sweep) is free at once.
    later.close()
    assert later.current("combo").state == claims.RELEASED
    again = b.claim("combo", "X")
    assert isinstance(again, claims.Claim) and again.generation == 2
    b.close()
    a.close()


@pytest.mark.parametrize(
    ("holder", "timeout", "reason"),
    [
        # A dead process on this host is noticed at once, whatever the timeout.
        ("dead process here", 3600, r"its process \d+ on .* is gone"),
        # So is a pid now used by another process (it started at another time).
        ("reused pid here", 3600, r"its process \d+ on .* is gone"),
        # Another host's process: by its heartbeat only.
        ("silent elsewhere", 10, r"no heartbeat from node-b pid 4242 for 3\ds \(--claim_timeout 10 s\)"),
    ],
)
def test_a_stale_claim_is_taken_over_by_one_process(tmp_path: Path, holder: str, timeout: float, reason: str) -> None:
    fields = {
        "dead process here": {"host": claims.HOST, "pid": dead_pid()},
        "reused pid here": {"host": claims.HOST, "pid": os.getpid(), "pid_start": "1"},
        "silent elsewhere": {"heartbeat": time.time() - 30},
    }[holder]
    plant(tmp_path, "combo", **fields)
    takers = [claims.Claims(tmp_path, timeout=timeout) for _ in range(4)]
    start = threading.Barrier(len(takers))
    results = []

    def take(taker: claims.Claims) -> None:
        start.wait()
        results.append(taker.claim("combo", "X"))

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (won,) = [r for r in results if isinstance(r, claims.Claim)]
    assert won.generation == 1 and re.fullmatch(reason, won.stale_reason)
    assert won.previous.pid == fields.get("pid", 4242)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["combo.0.claim", "combo.1.claim"]  # the old record is kept
    for taker in takers:
        taker.close()


def test_a_live_holder_on_another_host_keeps_its_claim(tmp_path: Path) -> None:
    plant(tmp_path, "combo", heartbeat=time.time() - 5)
    with claims.Claims(tmp_path, timeout=10) as taker:
        busy = taker.claim("combo", "X")
    assert isinstance(busy, claims.Record) and busy.holder == "node-b pid 4242"


def test_an_unreadable_claim_ages_by_its_file(tmp_path: Path) -> None:
    (tmp_path / "combo.0.claim").write_text('{"title": "cut sh', encoding="utf-8")
    with claims.Claims(tmp_path, timeout=10) as taker:
        assert taker.claim("combo", "X").holder == "(unreadable claim) pid 0"
        old = time.time() - 60
        os.utime(tmp_path / "combo.0.claim", (old, old))
        taken = taker.claim("combo", "X")
    assert isinstance(taken, claims.Claim) and taken.stale_reason.startswith("no heartbeat from (unreadable claim) pid 0 for ")


def test_the_heartbeat_advances_and_a_lost_claim_is_noticed(tmp_path: Path, capsys) -> None:
    held = claims.Claims(tmp_path, timeout=60, heartbeat_s=0.05)
    claim = held.claim("combo", "X")
    time.sleep(0.4)
    first = held.current("combo")
    assert first.heartbeat > first.claimed
    # Another process took it over (this process's heartbeat had been late).
    plant(tmp_path, "combo", generation=1)
    deadline = time.monotonic() + 10
    while claim.lost_to is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert claim.lost_to is not None and claim.lost_to.holder == "node-b pid 4242"
    assert "warning: node-b pid 4242 took over X" in capsys.readouterr().out
    held.release(claim, claims.DONE)
    held.close()
    assert held.current("combo").holder == "node-b pid 4242" and utils.load_json(tmp_path / "combo.0.claim")["state"] == "running"


def test_aggregations_take_turns(tmp_path: Path) -> None:
    inside, overlaps = [0], []
    lock = threading.Lock()

    def aggregate() -> None:
        with claims.Claims(tmp_path, timeout=60) as held, held.exclusive("aggregate", "aggregating", poll_s=0.01):
            with lock:
                inside[0] += 1
                overlaps.append(inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=aggregate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [1, 1, 1, 1]
    assert len(list(tmp_path.glob("aggregate.*.claim"))) == 4


def test_a_claim_folder_without_hard_links_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    def no_links(src: str, dst: str) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with claims.Claims(tmp_path, timeout=60) as held, pytest.raises(utils.InputError, match=r"^cannot create the claim .*combo\.0\.claim: this filesystem has no hard links"):
        held.claim("combo", "X")
    assert list(tmp_path.iterdir()) == []


# --- sweep.py with claims ---------------------------------------------------------------------


def grid_claim_names(root: Path, tiny_model_dir: Path, dataset_dir: Path, *argv: str) -> dict[str, str]:
    """Combination title -> claim name, as the sweep of these arguments names its claims."""
    args = sweep_args(root, tiny_model_dir, dataset_dir, *argv)
    combinations = [sweep.Combination(*c) for c in itertools.product(args.models, args.lrs, args.seeds, args.dataset_dirs)]
    configs = sweep.combination_configs(combinations, args.output_root, args.extra_args)
    return {str(c): sweep.claim_name(c, config) for c, config in zip(combinations, configs)}


HOLDER = """
import sys, time
import claims
claims.HOST = "node-b"  # as if on another node: only its heartbeat tells whether it lives
held = claims.Claims(__import__("pathlib").Path(sys.argv[1]), timeout=60, heartbeat_s=0.1)
held.claim(sys.argv[2], sys.argv[3])
print("claimed", flush=True)
time.sleep(600)
"""


def test_a_sigkilled_holder_is_taken_over_after_the_claim_timeout(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    grid = ["--lrs", "5e-3", "--seeds", "1"]  # 1 run
    ((title, name),) = grid_claim_names(tmp_path, tiny_model_dir, dataset_dir, *grid).items()
    folder = tmp_path / "outputs" / sweep.CLAIMS_FOLDER
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), name, title], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert holder.stdout.readline() == "claimed\n"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    killed_at = time.time()

    # Its heartbeat is younger than --claim_timeout: the claim stands; this process has nothing to do.
    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, *grid, "--claim_timeout", "600"), run=in_process)
    captured = capsys.readouterr()
    out = captured.out
    assert plan(out) == (1, 0, 1)
    assert f"sweep: 1 of them are running in other sweep processes (node-b pid {holder.pid}): this process takes the others" in out
    assert f"sweep: this process ({claims.HOST} pid {os.getpid()}) ran 0 of the 1 combinations to run (0 done, 0 failed); other sweep processes: 0 done, 0 failed, 1 still running" in out
    assert re.search(rf"^  {re.escape(title)}: running on node-b pid {holder.pid} \(claimed \d+s ago, heartbeat \d+s ago\)$", out, re.MULTILINE)
    assert "the sweep process that ends last aggregates them too" in out
    assert "aggregate: no finished run" in captured.err  # not an error while another process runs
    assert finished_runs(tmp_path / "outputs") == []

    # Once its heartbeat is older than --claim_timeout, the next process takes it over and says so.
    time.sleep(max(0.0, killed_at + 1.5 - time.time()))
    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, *grid, "--claim_timeout", "1"), run=in_process)
    out = capsys.readouterr().out
    assert plan(out) == (1, 0, 1)
    assert re.search(rf"^sweep: taking over {re.escape(title)} from node-b pid {holder.pid}: no heartbeat from node-b pid {holder.pid} for \d+s \(--claim_timeout 1 s\)$", out, re.MULTILINE)
    assert "other sweep processes" not in out  # it shared the grid with nobody
    assert len(finished_runs(tmp_path / "outputs")) == 1
    assert len(pd.read_csv(tmp_path / "results" / "all.csv")) == 1
    record = utils.load_json(folder / f"{name}.1.claim")
    assert (record["host"], record["state"]) == (claims.HOST, "done")


def test_a_run_interrupted_gives_its_claim_back_and_a_failure_is_recorded(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    names = grid_claim_names(tmp_path, tiny_model_dir, dataset_dir, "--seeds", "1")
    codes = iter([130, 3])  # SIGINT'd train.py (folder resumable), then a crash

    def runner(launch: sweep.Launch, slot: sweep.Slot) -> int:
        return next(codes)

    with pytest.raises(sweep.RunsFailed):
        sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--seeds", "1"), run=runner)
    folder = tmp_path / "outputs" / sweep.CLAIMS_FOLDER
    states = [utils.load_json(folder / f"{name}.0.claim") for name in names.values()]
    assert [(s["state"], s["outcome"]) for s in states] == [("released", "exit code 130"), ("failed", "exit code 3")]
    assert "aggregate: no finished run" in capsys.readouterr().err


def test_a_claimed_run_resumes_its_checkpointed_folder(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    args = sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--lrs", "5e-3", "--seeds", "1")
    combination = sweep.Combination(str(tiny_model_dir), 5e-3, 1, dataset_dir)
    (config,) = sweep.combination_configs([combination], args.output_root, args.extra_args)
    run_dir = tmp_path / "outputs" / "tiny-bert" / "2025-01-01" / "00-00-00.000000"
    run_dir.mkdir(parents=True)
    utils.save_json(config, run_dir / "config.json")
    (run_dir / "checkpoint.pt").write_bytes(b"")
    assert sweep.resumable_run(args.output_root, combination, sweep.setting_key(config)) == run_dir
    argvs = []

    def runner(launch: sweep.Launch, slot: sweep.Slot) -> int:
        argvs.append(launch.argv)
        return 3

    # A train.py without --resume (an older one): the run starts again, and says why.
    monkeypatch.setattr(sweep, "train_flags", lambda: {"--model_name"})
    with pytest.raises(sweep.RunsFailed):
        sweep.main(args, run=runner)
    assert argvs.pop()[:2] == ["--model_name", str(tiny_model_dir)]
    assert f"sweep: {combination}: {run_dir} has a checkpoint, but this train.py cannot resume; the run starts again" in capsys.readouterr().out
    monkeypatch.undo()

    # A train.py with --resume continues the folder, with the forwarded runtime options only.
    args = sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--lrs", "5e-3", "--seeds", "1")
    monkeypatch.setattr(sweep, "train_flags", lambda: {"--resume"})
    with pytest.raises(sweep.RunsFailed):
        sweep.main(args, run=runner)
    assert argvs.pop() == ["--resume", str(run_dir), "--num_workers", "1", "--device", "cpu", "--tokenized_cache", "off"]
    assert f"sweep: {combination}: resuming {run_dir}" in capsys.readouterr().out
    # A config that lists its runtime options (train.py's contract) is followed.
    utils.save_json({**config, "runtime_options": ["device"]}, run_dir / "config.json")
    assert sweep.resume_argv(run_dir, args.extra_args) == ["--resume", str(run_dir), "--device", "cpu"]
    # Once finished, the folder is no longer resumable.
    utils.save_json(config, run_dir / "config.json")
    (run_dir / "test-metrics.json").write_text("{}", encoding="utf-8")
    assert sweep.resumable_run(args.output_root, combination, sweep.setting_key(config)) is None


@pytest.mark.slow
def test_two_sweep_processes_share_a_grid(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    """A `sweep.py` command and this test's process, on one 4-run grid at once: each combination runs once.

    This process trains in-process (fast); before its first run it waits until the other has claimed one,
    so that the two really share the grid.
    """
    argv = [
        sys.executable, str(SRC / "sweep.py"), "--models", str(tiny_model_dir), "--lrs", *LRS, "--seeds", *SEEDS,
        "--dataset_dirs", str(dataset_dir), "--output_root", str(tmp_path / "outputs"), "--results_dir", str(tmp_path / "results"), *FORWARDED,
    ]  # fmt: skip
    other = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    folder = tmp_path / "outputs" / sweep.CLAIMS_FOLDER

    def other_claimed() -> bool:
        return any(utils.load_json(p)["pid"] == other.pid for p in folder.glob("*.claim"))

    def runner(launch: sweep.Launch, slot: sweep.Slot) -> int:
        deadline = time.monotonic() + 300
        while not other_claimed() and other.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        return in_process(launch, slot)

    try:
        sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir), run=runner)
        other_out = other.communicate(timeout=600)[0]
    finally:
        other.kill()
    outs = [capsys.readouterr().out, other_out]
    assert other.returncode == 0, other_out
    ran = [re.search(r"^sweep: this process \(\S+ pid (\d+)\) ran (\d) of the 4 combinations to run \(\2 done, 0 failed\)", out, re.MULTILINE) for out in outs]
    assert all(ran), outs
    assert [int(m.group(1)) for m in ran] == [os.getpid(), other.pid]
    assert sum(int(m.group(2)) for m in ran) == 4 and all(int(m.group(2)) >= 1 for m in ran), outs
    runs = finished_runs(tmp_path / "outputs")
    settings = sorted((utils.load_json(r / "config.json")["lr"], utils.load_json(r / "config.json")["seed"]) for r in runs)
    assert settings == [(1e-3, 1), (1e-3, 2), (5e-3, 1), (5e-3, 2)]  # each once
    records = [utils.load_json(p) for p in folder.glob("*.claim") if not p.name.startswith("aggregate-")]
    assert sorted(r["state"] for r in records) == ["done"] * 4 and {r["pid"] for r in records} == {os.getpid(), other.pid}
    assert len(pd.read_csv(tmp_path / "results" / "all.csv")) == 4  # the process that ended last aggregated every run
