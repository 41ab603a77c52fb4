"""A whole train.py run, start to exit: ours against the reference's, side by side on the same work.

    poetry run python tests/benchmarks/bench_start.py --reference path/to/bert-classification-tutorial
    poetry run python tests/benchmarks/bench_start.py --reference ... --baseline_rev main --repeats 3

A benchmark, not a test (pytest does not collect it). Both scripts run as the user runs them, each in a fresh
process, on the same prepared data (fake livedoor articles lengthened to livedoor's lengths, tests/fake_corpus.py)
and the same tiny BERT (tests/tiny_bert.py): 600/100/100 examples, 5 epochs at 128 tokens, batch 16, by default.
The order of the contenders alternates from one repeat to the next; medians are printed, with the load average.

Ours is split by the times its lines reach this process (unbuffered): before tokenisation (imports, data, model),
tokenise (cold: --tokenized_cache off), train + evaluate, write results (files and figures), and exit (from the
last line, "wrote ...", to the end of the process).

The reference (a clone or bare git folder of hppRC/bert-classification-tutorial; its HEAD is read) cannot start
on a CPU as it is. Its src/ is extracted to a temporary folder with this minimal patch (REFERENCE_PATCH), and
run with --device cpu:
- transformers 5 moved BatchEncoding out of transformers.tokenization_utils: imported from transformers;
- no torch.compile (it compiles whenever --gradient_checkpointing is off; ours does not compile unless asked,
  and compiling on a CPU needs a C++ tool chain and minutes).
Its CUDA autocast and GradScaler turn themselves off without CUDA (with a warning); nothing else changes.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_env  # noqa: F401 (first: src/ and tests/ on the path, the environment set)

from tap import Tap  # noqa: E402

import data  # noqa: E402
import prepare  # noqa: E402
import utils  # noqa: E402
from bench_tokenize import lengthen_bodies  # noqa: E402
from fake_corpus import CATEGORY_WORDS, write_corpus  # noqa: E402
from tiny_bert import build_tiny_bert, read_texts  # noqa: E402
from utils import InputError  # noqa: E402

REFERENCE_PATCH = [  # (file, old, new): each old text must be found once, or the reference has changed
    ("src/train.py", "from transformers.tokenization_utils import BatchEncoding, PreTrainedTokenizer",
     "from transformers import BatchEncoding, PreTrainedTokenizerBase as PreTrainedTokenizer"),
    ("src/train.py", "            self.model = torch.compile(self.model)", "            pass  # bench_start: no torch.compile on CPU"),
]  # fmt: skip
# Ours, split at the first line that starts with each of these (the phase that ends there).
PHASES = [("before tokenisation", "tokenising"), ("tokenise", "tokenised"), ("train + evaluate", "best epoch"), ("write results", "wrote")]


class Args(Tap):
    reference: Path | None = None  # a clone (or bare git folder) of hppRC/bert-classification-tutorial; without it, ours only
    baseline_rev: str | None = None  # also run this project's src/ at this git revision (e.g. main), to compare before/after
    train_examples: int = 600  # training examples
    eval_examples: int = 100  # val and test examples each
    epochs: int = 5  # epochs of both runs
    max_seq_len: int = 128  # tokens per example
    batch_size: int = 16  # examples per step (the reference's default)
    repeats: int = 1  # whole runs of each contender (alternating order); medians are reported
    work_dir: Path | None = None  # keep the data, model and runs here (default: a temporary folder, deleted at the end)


def prepare_data(args: Args, work_dir: Path) -> tuple[Path, Path]:
    """The dataset (train/val/test of the requested sizes, livedoor-length bodies) and the tiny BERT."""
    dataset = work_dir / "dataset"
    if not (dataset / "label2id.json").is_file():
        per_category = -(-(args.train_examples + 2 * args.eval_examples) * 10 // 8 // len(CATEGORY_WORDS)) + 1
        corpus = write_corpus(work_dir / "text", per_category)
        prepared = work_dir / "prepared"
        prepare.main(prepare.Args().parse_args(["--input_dir", str(corpus), "--output_dir", str(prepared)]))
        lengthen_bodies(prepared, (1000, 3000))
        rows = utils.load_jsonl(prepared / "train.jsonl") + utils.load_jsonl(prepared / "val.jsonl") + utils.load_jsonl(prepared / "test.jsonl")
        cut = [args.train_examples, args.train_examples + args.eval_examples, args.train_examples + 2 * args.eval_examples]
        if len(rows) < cut[-1]:
            raise InputError(f"the fake corpus has {len(rows)} articles, fewer than the {cut[-1]} asked for")
        for split, (lo, hi) in zip(data.SPLITS, [(0, cut[0]), (cut[0], cut[1]), (cut[1], cut[2])]):
            utils.save_jsonl(rows[lo:hi], dataset / f"{split}.jsonl")
        shutil.copy(prepared / "label2id.json", dataset / "label2id.json")
    model = work_dir / "tiny-bert"
    if not (model / "vocab.txt").is_file():
        build_tiny_bert(read_texts(dataset), model)
    return dataset, model


def extract_reference(reference: Path, into: Path) -> Path:
    """The reference's src/ (HEAD of its git folder) in INTO/src, patched to run on a CPU (REFERENCE_PATCH)."""
    git_dir = reference / ".git" if (reference / ".git").exists() else reference
    for name in ("src/__init__.py", "src/train.py", "src/utils.py"):
        shown = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{name}"], capture_output=True, text=True)
        if shown.returncode != 0 and name != "src/__init__.py":
            raise InputError(f"--reference {reference}: cannot read {name} ({utils.first_line(Exception(shown.stderr))})")
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        (into / name).write_text(shown.stdout if shown.returncode == 0 else "", encoding="utf-8")
    for name, old, new in REFERENCE_PATCH:
        text = (into / name).read_text(encoding="utf-8")
        if text.count(old) != 1:
            raise InputError(f"the reference's {name} has changed: the CPU patch no longer applies ({old.strip()!r})")
        (into / name).write_text(text.replace(old, new), encoding="utf-8")
    return into


def extract_revision(rev: str, into: Path) -> Path:
    """This project's src/ at git revision REV, in INTO/src."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(bench_env.REPO), "archive", rev, "src"], capture_output=True)
    if archive.returncode != 0:
        raise InputError(f"--baseline_rev {rev}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def timed_run(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, list[tuple[float, str]]]:
    """Run COMMAND; return its wall time and each line of its output with the time it arrived."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    lines = [(time.perf_counter() - start, line.rstrip("\n")) for line in process.stdout]  # type: ignore[union-attr]
    code = process.wait()
    total = time.perf_counter() - start
    if code != 0:
        raise InputError(f"{' '.join(command[:2])} exited with {code}:\n" + "\n".join(line for _, line in lines[-15:]))
    return total, lines


def breakdown(total: float, lines: list[tuple[float, str]]) -> dict[str, float]:
    """Ours' phases from the arrival times of its lines (PHASES), and the exit after the last one."""
    phases, previous = {}, 0.0
    for phase, prefix in PHASES:
        at = next((t for t, line in lines if line.startswith(prefix)), None)
        if at is None:
            raise InputError(f"no line starting with {prefix!r} in train.py's output: has it changed?")
        phases[phase], previous = at - previous, at
    phases["exit after the last line"] = total - previous
    phases["whole run"] = total
    return phases


def main(args: Args) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        print("preparing the data and the tiny BERT ...", flush=True)
        dataset, model = prepare_data(args, work_dir)
        common = ["--model_name", str(model), "--dataset_dir", str(dataset), "--epochs", str(args.epochs),
                  "--max_seq_len", str(args.max_seq_len), "--batch_size", str(args.batch_size), "--device", "cpu"]  # fmt: skip
        ours = [*common, "--output_root", str(work_dir / "outputs"), "--tokenized_cache", "off"]
        env = {key: value for key, value in os.environ.items() if key != "TRANSFORMERS_VERBOSITY"}  # as a user runs it
        env |= {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        contenders = {"ours": ([sys.executable, str(bench_env.REPO / "src" / "train.py"), *ours], bench_env.REPO, env)}
        if args.baseline_rev:
            baseline = extract_revision(args.baseline_rev, work_dir / "baseline")
            contenders[f"ours at {args.baseline_rev}"] = ([sys.executable, str(baseline / "src" / "train.py"), *ours], bench_env.REPO, env)
        if args.reference:
            reference = extract_reference(args.reference, work_dir / "reference")
            contenders["reference"] = ([sys.executable, "src/train.py", *common], reference, env | {"PYTHONPATH": str(reference)})

        results: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
        loads = [os.getloadavg()[0]]
        for repeat in range(args.repeats):
            order = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
            for name in order:
                command, cwd, run_env = contenders[name]
                print(f"repeat {repeat + 1}/{args.repeats}: {name} ...", flush=True)
                total, lines = timed_run(command, cwd, run_env)
                results[name].append(breakdown(total, lines) if name.startswith("ours") else {"whole run": total})
                loads.append(os.getloadavg()[0])

        print(f"\n{args.train_examples}/{args.eval_examples}/{args.eval_examples} examples, {args.epochs} epochs at {args.max_seq_len} tokens, "
              f"batch {args.batch_size}, tiny BERT, CPU; {args.repeats} repeat(s), medians (s); "
              f"load average (1 min) {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")  # fmt: skip
        names = list(contenders)
        print(f"{'phase':<28}" + "".join(f"{name:>18}" for name in names))
        for phase in [phase for phase, _ in PHASES] + ["exit after the last line", "whole run"]:
            cells = [statistics.median(r[phase] for r in results[name]) if phase in results[name][0] else None for name in names]
            print(f"{phase:<28}" + "".join(f"{'' if c is None else f'{c:.2f}':>18}" for c in cells))
        whole = {name: statistics.median(r["whole run"] for r in results[name]) for name in names}
        for name in names:
            if name != "reference" and "reference" in whole:
                runs = ", ".join(f"{a['whole run'] / b['whole run']:.2f}" for a, b in zip(results[name], results["reference"]))
                print(f"{name} / reference, whole run: {whole[name] / whole['reference']:.2f} (each repeat: {runs})")
        if args.baseline_rev:
            print(f"ours / ours at {args.baseline_rev}, whole run: {whole['ours'] / whole[f'ours at {args.baseline_rev}']:.2f}")
        print("note: wall-clock times on a shared machine; compare ratios measured in the same run, not across runs")


if __name__ == "__main__":
    utils.run_cli(main, Args().parse_args())
