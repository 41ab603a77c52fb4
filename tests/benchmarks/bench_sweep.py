"""How much does `sweep.py --jobs N` gain? The same small sweep run with --jobs 1, then with --jobs 2 (or others).

    poetry run python tests/benchmarks/bench_sweep.py                  # 4 tiny runs, --jobs 1 vs 2, on CPU
    poetry run python tests/benchmarks/bench_sweep.py --jobs 1 2 4 --runs 8 --device cuda   # a GPU node

A benchmark, not a test (pytest does not collect it). It builds the fixture corpus and a tiny BERT,
then runs one sweep per --jobs value, each into a fresh output folder, with the default runner (a
train.py process per run, its output in its log), and prints the wall time of each and its ratio to
the first, measured side by side in one invocation. On CPU the cores are shared out among the runs at
once, so the gain comes from overlapping what a run does not parallelise (Python start-up, the
imports of torch and transformers, tokenisation, evaluation); on GPUs each run gets its own device.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import tempfile
import time
from pathlib import Path

import bench_env  # noqa: F401 (first: src/ and tests/ on the path, the environment set)

from tap import Tap  # noqa: E402

import prepare  # noqa: E402
import sweep  # noqa: E402
from fake_corpus import write_corpus  # noqa: E402
from tiny_bert import build_tiny_bert, read_texts  # noqa: E402


class Args(Tap):
    jobs: list[int] = [1, 2]  # --jobs values compared, each on the same sweep (the first is the reference of the ratios)
    runs: int = 4  # runs per sweep: learning rates x seed 1 (at least 4 for a fair --jobs 2)
    epochs: int = 2  # epochs of each tiny run
    device: str = "cpu"  # train.py --device of the runs (cuda on a GPU node: one GPU per run)
    articles_per_category: int = 30  # size of the fixture corpus (9 categories)

    def process_args(self) -> None:
        if self.runs < 1 or not self.jobs or min(self.jobs) < 1:
            self.error("--runs and every --jobs must be at least 1")


def time_sweep(jobs: int, lrs: list[str], model_dir: Path, dataset_dir: Path, work_dir: Path, args: Args) -> float:
    """Wall seconds of one sweep with --jobs `jobs`, from its start to its aggregated results."""
    argv = [
        "--models", str(model_dir), "--lrs", *lrs, "--seeds", "1", "--dataset_dirs", str(dataset_dir),
        "--output_root", str(work_dir / f"jobs-{jobs}" / "outputs"), "--results_dir", str(work_dir / f"jobs-{jobs}" / "results"),
        "--jobs", str(jobs), "--epochs", str(args.epochs), "--num_warmup_epochs", "1", "--batch_size", "8",
        "--max_seq_len", "64", "--device", args.device,
    ]  # fmt: skip
    sweep_args = sweep.Args().parse_args(argv)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        sweep.main(sweep_args)
    return time.perf_counter() - start


def main(args: Args) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work_dir = Path(tmp)
        corpus = write_corpus(work_dir / "text", args.articles_per_category)
        dataset_dir = work_dir / "datasets" / "livedoor"
        with contextlib.redirect_stdout(io.StringIO()):
            prepare.main(prepare.Args().parse_args(["--input_dir", str(corpus), "--output_dir", str(dataset_dir)]))
        model_dir = build_tiny_bert(read_texts(dataset_dir), work_dir / "models" / "tiny-bert")
        lrs = [f"{5e-3 / (i + 1):.3g}" for i in range(args.runs)]

        cores = len(os.sched_getaffinity(0))
        print(f"sweep benchmark: {args.runs} tiny runs ({args.epochs} epochs each) on {args.device}, {cores} CPU cores, {platform.processor() or platform.machine()}")
        seconds = {jobs: time_sweep(jobs, lrs, model_dir, dataset_dir, work_dir, args) for jobs in args.jobs}
        reference = seconds[args.jobs[0]]
        print("| --jobs | wall time | per run | speed-up vs --jobs %d |" % args.jobs[0])
        print("| -----: | --------: | ------: | ------: |")
        for jobs, wall in seconds.items():
            print(f"| {jobs} | {wall:.1f} s | {wall / args.runs:.1f} s | {reference / wall:.2f}x |")


if __name__ == "__main__":
    main(Args().parse_args())
