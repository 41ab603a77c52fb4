"""sweep.py --launcher slurm on a real Slurm cluster (tests/slurm/start-cluster.sh starts a one-node one).

Without a cluster these tests skip with the reason; where SLURM_TESTS=required (.ci/run sets it),
a missing cluster is a failure instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import sweep
import utils
from conftest import need_cluster, wait_for
from test_sweep import FORWARDED, finished_runs, plan

TINY_LRS = ["5e-3", "1e-3"]


def cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here, or None when a node takes jobs."""
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        return "no Slurm client (sbatch, squeue) on PATH; start one with `sudo tests/slurm/start-cluster.sh`"
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, check=False)
    states = result.stdout.split()
    if result.returncode != 0 or not any(s.rstrip("*") in ("idle", "mix", "alloc") for s in states):
        return f"no Slurm node takes jobs (sinfo: {(result.stdout + result.stderr).strip() or 'no answer'}); run `sudo tests/slurm/start-cluster.sh`"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    need_cluster(cluster_problem(), "SLURM_TESTS")


def slurm_args(root: Path, models: list[str], dataset_dir: Path, *argv: str) -> sweep.Args:
    base = [
        "--launcher", "slurm", "--models", *models, "--lrs", *TINY_LRS, "--seeds", "1", "--dataset_dirs", str(dataset_dir),
        "--output_root", str(root / "outputs"), "--results_dir", str(root / "results"), "--slurm_cpus_per_run", "1",
        "--slurm_time", "10", *FORWARDED,
    ]  # fmt: skip
    return sweep.Args().parse_args([*base, *argv])


def squeue(comment: str) -> list[str]:
    """Ids (JOBID_TASK) of the queued tasks whose job carries this comment."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %k"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1:] == [comment]]


@pytest.fixture(scope="module")
def slurm_swept(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, dataset_dir: Path) -> tuple[Path, str, sweep.RunsFailed]:
    """One array of 4 tasks: the tiny model at 2 lrs, and a model that cannot load (2 failing runs)."""
    root = tmp_path_factory.mktemp("slurm")
    args = slurm_args(root, [str(tiny_model_dir), "no-such-org/no-such-model"], dataset_dir)
    with pytest.raises(sweep.RunsFailed) as failed:
        sweep.main(args)
    return root, failed.value


def test_a_slurm_sweep_runs_every_combination_and_aggregates(slurm_swept, capfd) -> None:
    root, _ = slurm_swept
    runs = finished_runs(root / "outputs")
    assert len(runs) == 2
    assert len(pd.read_csv(root / "results" / "all.csv")) == 2
    # Each run records the Slurm job and array task that ran it.
    ids = [utils.load_json(run / "config.json")["environment"]["slurm"] for run in runs]
    assert len({i["array_job_id"] for i in ids}) == 1 and sorted(i["array_task_id"] for i in ids) == ["0", "1"]
    assert all(re.fullmatch(r"\d+", i["job_id"]) for i in ids)
    # Each run's output went to its own log, in the sweep's log folder.
    logs = sorted((root / "outputs" / "sweep-logs").glob("*/*.log"))
    assert len(logs) == 4
    for run in runs:
        assert [log for log in logs if f"wrote {run}" in log.read_text(encoding="utf-8")]


def test_failing_runs_are_listed_with_their_logs(slurm_swept) -> None:
    _, failed = slurm_swept
    message = str(failed)
    assert message.startswith("2 of 4 runs failed; run the same sweep command again")
    assert [f.reason for f in failed.failures] == ["exit code 1", "exit code 1"]
    for failure in failed.failures:
        assert failure.launch.title.startswith("no-such-org/no-such-model lr=")
        assert f"    log: {failure.launch.log_path}\n" in message
        assert "cannot load model 'no-such-org/no-such-model'" in failure.launch.log_path.read_text(encoding="utf-8")


def test_a_rerun_submits_nothing(slurm_swept, tiny_model_dir: Path, dataset_dir: Path, capsys) -> None:
    root, _ = slurm_swept
    sweep.main(slurm_args(root, [str(tiny_model_dir)], dataset_dir))
    out = capsys.readouterr().out
    assert plan(out) == (2, 2, 0)
    assert "submitting" not in out and "Slurm job array" not in out
    assert len(pd.read_csv(root / "results" / "all.csv")) == 2  # aggregated again


def test_a_cancelled_array_is_reported_and_a_rerun_submits_only_what_is_missing(
    slurm_swept, tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys
) -> None:
    root, _ = slurm_swept
    shutil.copytree(root / "outputs", tmp_path / "outputs")  # the 2 finished runs
    comment = f"cancel-test-{os.getpid()}"
    # A third learning rate, held back (it would start in an hour), then cancelled while the sweep waits.
    args = slurm_args(tmp_path, [str(tiny_model_dir)], dataset_dir, "--lrs", *TINY_LRS, "1e-4", "--slurm_option", "begin=now+3600", f"comment={comment}")
    outcome: list[BaseException] = []

    def waiting_sweep() -> None:
        try:
            sweep.main(args)
        except BaseException as e:  # noqa: BLE001: handed to the test thread
            outcome.append(e)

    thread = threading.Thread(target=waiting_sweep)
    thread.start()
    queued = wait_for(lambda: squeue(comment), 60, "the sweep's task in Slurm's queue")
    assert len(queued) == 1  # only the missing lr was submitted
    time.sleep(2)
    assert thread.is_alive()  # the sweep waits for a task that is still queued
    subprocess.run(["scancel", queued[0].split("_")[0]], check=True)
    thread.join(timeout=120)
    assert not thread.is_alive()

    (failed,) = outcome
    assert isinstance(failed, sweep.RunsFailed)
    (failure,) = failed.failures
    assert failure.launch.title.startswith(f"{tiny_model_dir} lr=0.0001 ")
    assert failure.reason.startswith("stopped by Slurm before it ended (cancelled, or the node failed); Slurm log: ")
    out = capsys.readouterr().out
    assert plan(out) == (3, 2, 1)

    sweep.main(slurm_args(tmp_path, [str(tiny_model_dir)], dataset_dir, "--lrs", *TINY_LRS, "1e-4", "--dry_run"))
    assert plan(capsys.readouterr().out) == (3, 2, 1)  # the cancelled run is the one still missing


def test_no_wait_submits_and_returns_and_a_rerun_submits_nothing_twice(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    comment = f"no-wait-test-{os.getpid()}"
    argv = ["--lrs", "1e-4", "--slurm_option", "begin=now+3600", f"comment={comment}", "--no_wait"]
    sweep.main(slurm_args(tmp_path, [str(tiny_model_dir)], dataset_dir, *argv))
    out = capsys.readouterr().out
    # One combination is submitted as a plain job, not an array: said so.
    job = re.search(r"^sweep: Slurm job (\d+) \(one run: a plain job, not an array\)$", out, re.MULTILINE)
    assert job and f"Follow it with `squeue -j {job.group(1)}`" in out and "run this same command again to wait for it" in out
    assert "job array" not in out
    assert squeue(comment) == [job.group(1)]  # still queued: the sweep did not wait
    try:
        # A rerun while it is queued recognises its run there and submits nothing.
        sweep.main(slurm_args(tmp_path, [str(tiny_model_dir)], dataset_dir, *argv))
        out = capsys.readouterr().out
        assert plan(out) == (1, 0, 0) and ", 1 still in Slurm's queue;" in out
        assert f"sweep: 1 run(s) still in Slurm's queue from an earlier sweep (Slurm job {job.group(1)}): waiting for them, not submitting them again" in out
        assert "sweep: submitting" not in out
        assert squeue(comment) == [job.group(1)]
        # A rerun that waits for it, stopped by Ctrl-C: the job keeps running, and the sweep says so in one line.
        timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(utils.Interrupted) as stopped:
            sweep.main(slurm_args(tmp_path, [str(tiny_model_dir)], dataset_dir, *argv[:-1]))
        timer.join()
        assert stopped.value.signum == signal.SIGINT
        assert stopped.value.note == f"Slurm job {job.group(1)} keeps running: run this same command again to wait for it and aggregate, or `scancel` it"
        assert squeue(comment) == [job.group(1)]
        assert "sweep: submitting" not in capsys.readouterr().out
        # Another setting of the same grid is not that run.
        sweep.main(slurm_args(tmp_path, [str(tiny_model_dir)], dataset_dir, *argv, "--epochs", "2"))
        assert plan(capsys.readouterr().out) == (1, 0, 1) and len(squeue(comment)) == 2
    finally:
        subprocess.run(["scancel", *{i.split("_")[0] for i in squeue(comment)}], check=True)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        # The test cluster has no GPUs: --device auto asks Slurm for one per run.
        (["--device", "auto"], "sbatch refused the job: Invalid generic resource (gres) specification; if the partition has no GPUs, pass --device cpu"),
        (["--slurm_partition", "no-such-partition"], "sbatch refused the job: invalid partition specified: no-such-partition; `sinfo -s` lists the partitions"),
    ],
)
def test_sbatch_refusals_are_one_line(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, argv: list[str], said: str, capsys) -> None:
    with pytest.raises(utils.InputError) as e:
        sweep.main(slurm_args(tmp_path, [str(tiny_model_dir)], dataset_dir, *argv))
    assert str(e.value).startswith(said) and "\n" not in str(e.value)
    assert capsys.readouterr().err == ""  # sbatch's own lines are not printed on top


def run_folder_of_task(output_root: Path, task: str) -> Path | None:
    for config in output_root.glob("*/*/*/config.json"):
        slurm = utils.load_json(config)["environment"]["slurm"]
        if slurm.get("array_task_id") == task:
            return config.parent
    return None


def state_of(task: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", task, "-o", "%T"], capture_output=True, text=True, check=False).stdout.strip()


def test_requeued_tasks_resume_their_runs(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    """While both tasks train: task 0 is requeued as a preemption does it (`scontrol requeue`: SIGTERM, back to
    pending), task 1 gets a preemption notice (USR2 long before its time limit) and requeues itself. The sweep
    waits, each task runs again and resumes its run folder, and the sweep ends with both runs finished, once each."""
    comment = f"requeue-test-{os.getpid()}"
    args = slurm_args(tmp_path, [str(tiny_model_dir)], dataset_dir, "--epochs", "12", "--slurm_option", f"comment={comment}")
    outcome: list[BaseException | None] = []

    def waiting_sweep() -> None:
        try:
            sweep.main(args)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001: handed to the test thread
            outcome.append(e)

    thread = threading.Thread(target=waiting_sweep)
    thread.start()
    try:
        # Once each run has the checkpoint of an epoch (and still trains).
        deadline = time.monotonic() + 240

        def checkpointed_runs() -> list[Path]:
            found = [run_folder_of_task(tmp_path / "outputs", task) for task in "01"]
            return found if None not in found and all((run / "checkpoint.pt").exists() for run in found) else []

        folders = wait_for(checkpointed_runs, 240, "a checkpoint in each task's run", interval=0.2, alive=thread.is_alive)
        tasks = sorted(squeue(comment))
        subprocess.run(["scontrol", "requeue", tasks[0]], check=True)
        subprocess.run(["scancel", "--signal=USR2", tasks[1]], check=True)
        # Slurm holds a requeued job for a couple of minutes (BeginTime): let them start again at once.
        for task in tasks:
            wait_for(lambda: state_of(task) == "PENDING", deadline - time.monotonic(), f"{task} to go back to pending", interval=0.2)  # noqa: B023
            subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)
        thread.join(timeout=300)
    finally:
        if thread.is_alive():
            subprocess.run(["scancel", *{i.split("_")[0] for i in squeue(comment)}], check=False)
            thread.join(timeout=60)
    assert outcome == [None]  # no failure: the sweep exits 0
    out = capsys.readouterr().out
    for index in (1, 2):
        assert re.search(rf"^\[{index}/2\] requeued by Slurm \(preempted, or scontrol requeue\); it resumes from its checkpoint: ", out, re.MULTILINE)
    progress_lines = re.findall(r"^sweep: \d+/2 done, .*$", out, re.MULTILINE)
    assert progress_lines[-1].startswith("sweep: 2/2 done, 0 running, 0 failed, ")  # the last one states the final counts

    runs = finished_runs(tmp_path / "outputs")
    assert sorted(runs) == sorted(folders)  # each task finished the run folder it began
    all_runs = pd.read_csv(tmp_path / "results" / "all.csv")
    assert sorted(all_runs["run_dir"]) == sorted(map(str, runs)) and sorted(all_runs["lr"]) == sorted(map(float, TINY_LRS))
    for run, log in zip(folders, sorted((tmp_path / "outputs" / "sweep-logs").glob("*/00[12]_*.log"))):
        text = log.read_text(encoding="utf-8")
        assert f"task requeued: resuming {run} from its checkpoint" in text
        assert re.search(rf"^resumed {re.escape(str(run))} from epoch \d+ of 12", text, re.MULTILINE)  # train.py says so
        epochs = pd.read_csv(run / "log.csv")["epoch"].tolist()
        assert epochs == list(range(13))  # epochs 0-12, each once
