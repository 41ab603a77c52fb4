"""Sweep processes sharing one grid on a real Grid Engine (tests/gridengine/start-cluster.sh starts a
one-node Son of Grid Engine, the family of TSUBAME's scheduler): a `qsub -t 1-2` array of one sweep
command runs each combination once, and a job killed while it holds a claim leaves a stale claim that
the next sweep process takes over.

Without a cluster these tests skip with the reason; where GRIDENGINE_TESTS=required (.ci/run sets it),
a missing cluster is a failure instead.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import claims
import sweep
import utils
from conftest import need_cluster, wait_for
from test_sweep import FORWARDED, finished_runs, in_process, plan, sweep_args

pytestmark = pytest.mark.slow

SRC = Path(__file__).resolve().parent.parent / "src"
# Where Debian's packages put the cell (what start-cluster.sh starts); the environment's own values win.
SGE_ENV = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}


def sge_env() -> dict[str, str]:
    return {**SGE_ENV, **os.environ}


def cluster_problem() -> str | None:
    """Why the Grid Engine tests cannot run here, or None when a queue takes jobs."""
    if shutil.which("qsub") is None or shutil.which("qstat") is None:
        return "no Grid Engine client (qsub, qstat) on PATH; start one with `sudo tests/gridengine/start-cluster.sh`"
    result = subprocess.run(["qstat", "-f"], capture_output=True, text=True, check=False, env=sge_env())
    # A queue instance line: NAME@HOST QTYPE RESV/USED/TOT LOAD ARCH [STATES]; no states: it takes jobs.
    open_queues = [line for line in result.stdout.splitlines() if "@" in line.split(" ", 1)[0] and len(line.split()) == 5]
    if result.returncode != 0 or not open_queues:
        answer = (result.stdout + result.stderr).strip() or "no answer"
        return f"no Grid Engine queue takes jobs (qstat -f: {answer}); run `sudo tests/gridengine/start-cluster.sh`"
    return None


@pytest.fixture(scope="module", autouse=True)
def gridengine_cluster() -> None:
    need_cluster(cluster_problem(), "GRIDENGINE_TESTS")


def job_script(root: Path, sweep_argv: list[str]) -> Path:
    """A job script as a user writes one: every task runs the same sweep command."""
    script = root / "job.sh"
    command = shlex.join([sys.executable, str(SRC / "sweep.py"), *sweep_argv])
    script.write_text(f"#!/bin/bash\n#$ -S /bin/bash\nexport OMP_NUM_THREADS=1\nexec {command}\n", encoding="utf-8")
    return script


def grid_argv(root: Path, tiny_model_dir: Path, dataset_dir: Path, lrs: list[str], seeds: list[str]) -> list[str]:
    return [
        "--models", str(tiny_model_dir), "--lrs", *lrs, "--seeds", *seeds, "--dataset_dirs", str(dataset_dir),
        "--output_root", str(root / "outputs"), "--results_dir", str(root / "results"), *FORWARDED,
    ]  # fmt: skip


def qsub(*argv: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    # -V: the job gets this environment (HF_HUB_OFFLINE and the rest), as users' scripts often ask.
    return subprocess.run(["qsub", "-V", "-j", "y", *argv], capture_output=True, text=True, check=False, env=sge_env(), timeout=timeout)


def test_an_array_of_one_sweep_command_runs_each_combination_once(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    script = job_script(tmp_path, grid_argv(tmp_path, tiny_model_dir, dataset_dir, ["5e-3", "1e-3"], ["1", "2"]))
    result = qsub("-sync", "y", "-t", "1-2", "-N", "sweep-array", "-o", str(tmp_path), str(script), timeout=900)
    logs = sorted(tmp_path.glob("sweep-array.o*.*"))
    outs = [log.read_text(encoding="utf-8") for log in logs]
    assert result.returncode == 0, (result.stdout, result.stderr, outs)
    job = re.search(r"job-array (\d+)\.1-2:1", result.stdout).group(1)
    assert f"Job {job}.1 exited with exit code 0." in result.stdout and f"Job {job}.2 exited with exit code 0." in result.stdout

    # Both tasks planned the whole grid, then shared it through the claims.
    assert len(outs) == 2 and all(plan(out)[0] == 4 for out in outs)
    ran = [re.search(r"^sweep: this process \(\S+ pid (\d+)\) ran (\d) of the \d combinations to run \(\2 done, 0 failed\)", out, re.MULTILINE) for out in outs]
    assert all(ran), outs
    assert sum(int(m.group(2)) for m in ran) == 4 and all(int(m.group(2)) >= 1 for m in ran), outs
    runs = finished_runs(tmp_path / "outputs")
    settings = sorted((utils.load_json(r / "config.json")["lr"], utils.load_json(r / "config.json")["seed"]) for r in runs)
    assert settings == [(1e-3, 1), (1e-3, 2), (5e-3, 1), (5e-3, 2)]  # each once
    records = [utils.load_json(p) for p in (tmp_path / "outputs" / sweep.CLAIMS_FOLDER).glob("*.claim") if not p.name.startswith("aggregate-")]
    assert sorted(r["state"] for r in records) == ["done"] * 4
    assert {r["pid"] for r in records} == {int(m.group(1)) for m in ran}
    # The task that ended last aggregated every run.
    assert len(pd.read_csv(tmp_path / "results" / "all.csv")) == 4


def test_a_job_killed_while_holding_a_claim_is_taken_over(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    script = job_script(tmp_path, grid_argv(tmp_path, tiny_model_dir, dataset_dir, ["5e-3"], ["1"]))
    result = qsub("-N", "sweep-killed", "-o", str(tmp_path), str(script))
    assert result.returncode == 0, result.stderr
    job = re.search(r"Your job (\d+) ", result.stdout).group(1)
    folder = tmp_path / "outputs" / sweep.CLAIMS_FOLDER
    try:
        wait_for(lambda: list(folder.glob("*.0.claim")), 300, "the job to claim its combination")
    finally:
        subprocess.run(["qdel", job], capture_output=True, check=False, env=sge_env())  # SIGKILL to the whole job
    wait_for(lambda: subprocess.run(["qstat", "-j", job], capture_output=True, check=False, env=sge_env()).returncode != 0, 120, f"job {job} to leave the queue")
    (claim_file,) = folder.glob("*.0.claim")
    held = utils.load_json(claim_file)
    assert held["state"] == "running" and held["host"] == claims.HOST
    assert not claims.process_alive(held["pid"], held["pid_start"])

    # The next sweep process sees the holder gone at once (same host: its pid is dead), takes the claim
    # over and runs the combination; the killed job's run folder, unfinished, does not count.
    sweep.main(sweep_args(tmp_path, tiny_model_dir, dataset_dir, "--lrs", "5e-3", "--seeds", "1", "--claim_timeout", "600"), run=in_process)
    out = capsys.readouterr().out
    assert plan(out) == (1, 0, 1)
    assert f"sweep: taking over {held['title']} from {claims.HOST} pid {held['pid']}: its process {held['pid']} on {claims.HOST} is gone" in out
    assert len(finished_runs(tmp_path / "outputs")) == 1
    assert utils.load_json(claim_file.with_name(claim_file.name.replace(".0.claim", ".1.claim")))["state"] == "done"
    assert len(pd.read_csv(tmp_path / "results" / "all.csv")) == 1
