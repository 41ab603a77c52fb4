"""How much does `sweep.py --jobs N` gain? The same small sweep run with --jobs 1 and with --jobs 2 (or others), in both orders.

    poetry run python tests/benchmarks/bench_sweep.py                  # 4 tiny runs, --jobs 1 vs 2, on CPU
    poetry run python tests/benchmarks/bench_sweep.py --jobs 1 2 4 --runs 8 --device cuda   # a GPU node

A benchmark, not a test (pytest only runs it once at tiny settings, in test_benchmarks.py). It builds
the fixture corpus and a tiny BERT, then runs one sweep per --jobs value and round, each into fresh
output and tokenised-cache folders, with the default runner (a train.py process per run, its output in
its log), and prints the wall time of each and its ratio to the first --jobs value of the same round,
measured side by side in one invocation. Rounds take the --jobs values in turn forward and reversed
(1 2, then 2 1): whichever sweep runs first on a cold machine (files not yet in the page cache) is
slower, which would otherwise always count against --jobs 1. On CPU the cores are shared out among
the runs at once, so the gain comes from overlapping what a run does not parallelise (Python start-up,
the imports of torch and transformers, tokenisation, evaluation); on GPUs each run gets its own device.
"""

from __future__ import annotations

import contextlib
import io
import platform
import tempfile
import time
from pathlib import Path

import bench_env  # noqa: F401 (first: src/ and tests/ on the path, the environment set)

from tap import Tap  # noqa: E402

import prepare  # noqa: E402
import sweep  # noqa: E402
import utils  # noqa: E402
from fake_corpus import write_corpus  # noqa: E402
from tiny_bert import build_tiny_bert, read_texts  # noqa: E402


class Args(Tap):
    jobs: list[int] = [1, 2]  # --jobs values compared, each on the same sweep (the first is the reference of the ratios)
    rounds: int = 2  # sweeps per --jobs value; odd rounds take the --jobs values in order, even rounds reversed
    runs: int = 4  # runs per sweep: learning rates x seed 1 (at least 4 for a fair --jobs 2)
    epochs: int = 2  # epochs of each tiny run
    device: str = "cpu"  # train.py --device of the runs (cuda on a GPU node: one GPU per run)
    articles_per_category: int = 30  # size of the fixture corpus (9 categories)

    def process_args(self) -> None:
        if self.runs < 1 or self.rounds < 1 or not self.jobs or min(self.jobs) < 1:
            self.error("--runs, --rounds and every --jobs must be at least 1")
        if len(set(self.jobs)) != len(self.jobs):
            self.error("--jobs: each value once")


def round_order(jobs: list[int], round_index: int) -> list[int]:
    """The --jobs values of round `round_index` (0-based): as given in even rounds, reversed in odd ones."""
    return list(jobs) if round_index % 2 == 0 else list(reversed(jobs))


def time_sweep(jobs: int, lrs: list[str], model_dir: Path, dataset_dir: Path, folder: Path, args: Args) -> float:
    """Wall seconds of one sweep with --jobs `jobs`, from its start to its aggregated results, all of it in FOLDER."""
    argv = [
        "--models", str(model_dir), "--lrs", *lrs, "--seeds", "1", "--dataset_dirs", str(dataset_dir),
        "--output_root", str(folder / "outputs"), "--results_dir", str(folder / "results"),
        "--jobs", str(jobs), "--epochs", str(args.epochs), "--num_warmup_epochs", "1", "--batch_size", "8",
        "--max_seq_len", "64", "--device", args.device, "--tokenized_cache_dir", str(folder / "cache"),
    ]  # fmt: skip
    sweep_args = sweep.Args().parse_args(argv)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        sweep.main(sweep_args)
    return time.perf_counter() - start


def main(args: Args) -> dict[int, list[float]]:
    """Print the table; return the wall seconds of each --jobs value, round by round."""
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work_dir = Path(tmp)
        corpus = write_corpus(work_dir / "text", args.articles_per_category)
        dataset_dir = work_dir / "datasets" / "livedoor"
        with contextlib.redirect_stdout(io.StringIO()):
            prepare.main(prepare.Args().parse_args(["--input_dir", str(corpus), "--output_dir", str(dataset_dir)]))
        model_dir = build_tiny_bert(read_texts(dataset_dir), work_dir / "models" / "tiny-bert")
        lrs = [f"{5e-3 / (i + 1):.3g}" for i in range(args.runs)]

        cores = utils.available_cpus()
        print(
            f"sweep benchmark: {args.runs} tiny runs ({args.epochs} epochs each) on {args.device}, {cores} CPU cores, "
            f"{platform.processor() or platform.machine()}; {args.rounds} round(s), the --jobs order reversed every other round"
        )
        seconds: dict[int, list[float]] = {jobs: [] for jobs in args.jobs}
        reference = args.jobs[0]
        print(f"| round | order | --jobs | wall time | per run | speed-up vs --jobs {reference} |")
        print("| ----: | :---- | -----: | --------: | ------: | ------: |")
        for round_index in range(args.rounds):
            order = round_order(args.jobs, round_index)
            walls = {}
            for jobs in order:
                walls[jobs] = time_sweep(jobs, lrs, model_dir, dataset_dir, work_dir / f"round-{round_index + 1}" / f"jobs-{jobs}", args)
                seconds[jobs].append(walls[jobs])
            for jobs in args.jobs:
                print(
                    f"| {round_index + 1} | {' then '.join(map(str, order))} | {jobs} | {walls[jobs]:.1f} s | {walls[jobs] / args.runs:.1f} s | "
                    f"{walls[reference] / walls[jobs]:.2f}x |"
                )
        if args.rounds > 1:
            total = {jobs: sum(walls) for jobs, walls in seconds.items()}
            ratios = ", ".join(f"--jobs {jobs} {total[reference] / total[jobs]:.2f}x" for jobs in args.jobs[1:])
            print(f"all rounds: {', '.join(f'--jobs {jobs} {total[jobs]:.1f} s' for jobs in args.jobs)}; speed-up vs --jobs {reference}: {ratios}")
        print("note: wall-clock times; the machine's other load changes them, so compare the rounds of one invocation")
    return seconds


if __name__ == "__main__":
    main(Args().parse_args())
