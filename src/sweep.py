"""Run train.py over models x learning rates x seeds x datasets (folds), then aggregate the results.

    poetry run python src/sweep.py                          # the reference's table: 17 models x 3 lrs
    poetry run python src/sweep.py --models cl-tohoku/bert-base-japanese-v3 --lrs 3e-5 \
        --seeds 1 2 3 --dataset_dirs datasets/livedoor/folds/{0..9} --epochs 10
    poetry run python src/sweep.py ... --dry_run            # print the plan only

Every other option (--epochs 10 above) goes to every train.py run unchanged. Each run is a fresh
train.py process, so a crash, an out-of-memory error or a CUDA error ends that run only, and the
GPU memory is freed before the next one. A combination that already has a finished run under
OUTPUT_ROOT with the same settings is skipped: after an interruption or a failure, run the same
command again. At the end, aggregate.py writes RESULTS_DIR from every finished run under
OUTPUT_ROOT; if any run failed, the failures are listed and the exit code is 1.
"""

from __future__ import annotations

import itertools
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tap import Tap

import aggregate
import train
import utils
from utils import InputError

TRAIN_PY = Path(__file__).resolve().with_name("train.py")

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
PRESETS = {"reference": REFERENCE_MODELS, "modern": MODERN_MODELS}

# train.py options that the sweep sets itself for each run, with the sweep option to use instead.
AXES = {
    "model_name": "--models",
    "lr": "--lrs",
    "seed": "--seeds",
    "dataset_dir": "--dataset_dirs",
    "output_root": "--output_root",
}

# A finished run counts for a combination when its config matches in every field but these:
# aggregate.py's execution-only fields (device, num_workers, eval_batch_size, ...). Seed and
# dataset_dir, which aggregate.py averages over, are axes of the sweep, so they must match too.
IGNORED_FIELDS = aggregate.NOT_SETTING_FIELDS - set(aggregate.REPETITION_FIELDS)


class Args(Tap):
    """Run src/train.py for every combination of models x lrs x seeds x dataset_dirs, skipping those
    already finished under OUTPUT_ROOT, then aggregate. Any other option (e.g. --epochs 3
    --batch_size 32; see `python src/train.py -h`) is passed to every train.py run unchanged."""

    models: list[str] | None = None  # models to fine-tune (hub names or local folders); default: those of --preset
    preset: Literal["reference", "modern"] = "reference"  # model list when --models is not given: reference (its 17 models) or modern (ModernBERT-ja, llm-jp-modernbert, DeBERTa-v3-ja)
    lrs: list[float] = [1e-5, 3e-5, 5e-5]  # learning rates tried for each model (best by mean val F1 in best.csv)
    seeds: list[int] = [42]  # seeds: several give a mean and std per setting in best.csv
    dataset_dirs: list[Path] = [Path("datasets/livedoor")]  # datasets, e.g. datasets/livedoor/folds/{0..9} for 10-fold cross-validation
    output_root: Path = Path("outputs")  # train.py writes runs here; finished runs found here are skipped
    results_dir: Path = Path("results")  # aggregate.py writes all.csv, best.csv, best.md and best.png here
    dry_run: bool = False  # print the plan (and each train.py command) and exit without running anything

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: `--lr 1e-5` must not silently mean `--lrs 1e-5`, nor `--seed` `--seeds`.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, known_only: bool = True, **kwargs: Any) -> Args:
        """Parse the sweep's own options; the others are kept in `extra_args`, for train.py."""
        return super().parse_args(args, known_only=known_only, **kwargs)

    def process_args(self) -> None:
        if self.models is None:
            self.models = list(PRESETS[self.preset])
        for name in ("models", "lrs", "seeds", "dataset_dirs"):
            values = getattr(self, name)
            if not values:
                self.error(f"--{name} needs at least one value")
            duplicates = sorted({str(v) for v in values if values.count(v) > 1})
            if duplicates:
                self.error(f"--{name} lists {', '.join(duplicates)} more than once")
        check_forwarded(self.extra_args, self.error)


def train_options() -> set[str]:
    return {f"--{name}" for name in train.Args().class_variables}


def check_forwarded(forwarded: Sequence[str], error: Callable[[str], Any]) -> None:
    """Refuse the sweep's axes and anything that is not a train.py option written in full; then let
    train.py's own parser check the values, so that a typo stops the sweep before its first run."""
    options = train_options()
    for token in forwarded:
        if not token.startswith("--"):
            continue  # a value; train.py's parser below says if it belongs to no option
        option = token.split("=", 1)[0]
        if option[2:] in AXES:
            error(f"{option} is set by the sweep for each run: use {AXES[option[2:]]} instead")
        if option not in options:
            error(f"{option} is an option of neither sweep.py nor train.py (write options in full, without abbreviation)")
    train.Args(prog="train.py").parse_args(list(forwarded))  # exits with train.py's usage on a bad value


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

    def __str__(self) -> str:
        return f"{self.model_name} lr={self.lr:g} seed={self.seed} dataset={self.dataset_dir}"


def setting_key(config: dict[str, Any]) -> frozenset[tuple[str, Any]]:
    """What a run learned, as a hashable value: the config without the execution-only fields."""
    return frozenset(aggregate.setting_of(config, IGNORED_FIELDS).items())


def finished_settings(output_root: Path) -> set[frozenset[tuple[str, Any]]]:
    """The settings of the finished runs under `output_root`; unfinished or unreadable runs do not count."""
    found = set()
    for run_dir in aggregate.find_run_dirs(output_root):
        if not aggregate.is_finished(run_dir):
            continue
        try:
            config = utils.load_json(run_dir / "config.json")
        except InputError:
            continue  # aggregate.py reports it
        if isinstance(config, dict):
            found.add(setting_key(config))
    return found


def combination_configs(combinations: list[Combination], output_root: Path, forwarded: Sequence[str]) -> list[dict[str, Any]]:
    """The config of each combination, as train.py would parse its arguments.

    train.py's parser is built once (building it takes ~15 ms, and a full sweep has thousands of
    combinations); each combination then sets its own axes, with the types train.Args gives them.
    """
    base = train.args_to_json(train.Args().parse_args(combinations[0].train_argv(output_root, forwarded)))
    return [
        {**base, "model_name": c.model_name, "lr": float(c.lr), "seed": int(c.seed), "dataset_dir": str(c.dataset_dir), "output_root": str(output_root)}
        for c in combinations
    ]


def command_line(argv: Sequence[str]) -> str:
    """The train.py command of a run, to copy and run by hand (from the current folder)."""
    try:
        script = TRAIN_PY.relative_to(Path.cwd())
    except ValueError:
        script = TRAIN_PY
    return shlex.join(["python", str(script), *argv])


def describe_exit(code: int) -> str:
    if code < 0:  # killed by a signal, e.g. SIGKILL from the out-of-memory killer
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_subprocess(argv: list[str]) -> int:
    """Run train.py with these arguments in a new Python process; return its exit code."""
    return subprocess.run([sys.executable, str(TRAIN_PY), *argv], check=False).returncode


Runner = Callable[[list[str]], int]  # train.py arguments -> exit code (0: success)


class RunsFailed(InputError):
    """Some runs failed; the message lists them. The sweep still ran every other one and aggregated."""

    def __init__(self, failures: list[tuple[Combination, list[str], int]], total: int) -> None:
        lines = [f"{len(failures)} of {total} runs failed; run the same sweep command again to retry them (finished runs are skipped):"]
        for combination, argv, code in failures:
            lines.append(f"  {combination}: {describe_exit(code)}")
            lines.append(f"    {command_line(argv)}")
        super().__init__("\n".join(lines))
        self.failures = failures


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def main(args: Args, run: Runner = run_subprocess) -> None:
    """Run the combinations not finished yet, one after another with `run`; then aggregate."""
    missing = [d for d in args.dataset_dirs if not d.is_dir()]
    if missing:
        raise InputError(
            f"dataset folder(s) not found: {', '.join(map(str, missing))}; run `poetry run python src/prepare.py` "
            f"first (with --num_folds 10 for datasets/livedoor/folds/0..9)"
        )

    combinations = [Combination(*c) for c in itertools.product(args.models, args.lrs, args.seeds, args.dataset_dirs)]
    done = finished_settings(args.output_root)
    configs = combination_configs(combinations, args.output_root, args.extra_args)
    todo = [c for c, config in zip(combinations, configs) if setting_key(config) not in done]
    shape = f"{len(args.models)} models x {len(args.lrs)} lrs x {len(args.seeds)} seeds x {len(args.dataset_dirs)} datasets"
    print(
        f"sweep: {len(combinations)} combinations ({shape}), {len(combinations) - len(todo)} already done, "
        f"{len(todo)} to run; outputs in {args.output_root}",
        flush=True,
    )

    failures: list[tuple[Combination, list[str], int]] = []
    for i, combination in enumerate(todo, start=1):
        argv = combination.train_argv(args.output_root, args.extra_args)
        print(f"[{i}/{len(todo)}] {combination}\n  {command_line(argv)}", flush=True)
        if args.dry_run:
            continue
        start = time.perf_counter()
        code = run(argv)
        status = "done" if code == 0 else f"FAILED ({describe_exit(code)})"
        print(f"[{i}/{len(todo)}] {status} in {format_seconds(time.perf_counter() - start)}: {combination}", flush=True)
        if code != 0:
            failures.append((combination, argv, code))
    if args.dry_run:
        return

    aggregate_args = aggregate.Args().parse_args(["--input_dir", str(args.output_root), "--output_dir", str(args.results_dir)])
    if not failures:
        aggregate.main(aggregate_args)
        return
    try:
        aggregate.main(aggregate_args)
    except InputError as e:  # e.g. no finished run at all: still report the failures below
        print(f"aggregate: {e}", file=sys.stderr)
    raise RunsFailed(failures, len(todo))


if __name__ == "__main__":
    utils.run_cli(main, Args().parse_args())
