"""Session-wide fixtures: a small livedoor-format corpus, its prepared dataset and a tiny BERT.

They are built once per test session (a few seconds) and reused by every test that needs them.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Quiet, offline and reproducible, as .envrc sets for users; set before transformers is imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["HF_HUB_OFFLINE"] = "1"

from fake_corpus import write_corpus  # noqa: E402
from tiny_bert import build_tiny_bert, read_texts  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTICLES_PER_CATEGORY = 30  # 270 articles: train 216 / val 27 / test 27


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/text as download.sh leaves it: 9 category folders, LICENSE.txt files, README/CHANGES."""
    return write_corpus(tmp_path_factory.mktemp("data") / "text", ARTICLES_PER_CATEGORY)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    """datasets/livedoor as prepare.py writes it, with all 10 folds."""
    import prepare

    output_dir = tmp_path_factory.mktemp("datasets") / "livedoor"
    prepare.main(prepare.Args().parse_args(["--input_dir", str(corpus_dir), "--output_dir", str(output_dir), "--num_folds", "10"]))
    return output_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> Path:
    """A tiny random-weight BERT with a real BertJapaneseTokenizer, loadable by the Auto* classes."""
    return build_tiny_bert(read_texts(dataset_dir), tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_family_model(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path, tiny_model_dir: Path):
    """Return the folder of a tiny model of a family (tests/tiny_models.FAMILIES), built on first use only."""
    built = {"bert-word": tiny_model_dir}  # the session's tiny BERT is the word-level family

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, read_texts(dataset_dir), tmp_path_factory.mktemp("models") / f"tiny-{family}")
        return built[family]

    return get


# The tiny model learns the fixture task reliably with these (about 3 s a run on 2 cores).
TINY_TRAINING = [
    "--epochs", "10", "--lr", "5e-3", "--num_warmup_epochs", "1", "--batch_size", "8",
    "--max_seq_len", "64", "--num_workers", "1", "--device", "cpu",
    "--tokenized_cache", "off",  # no cache in the working folder; tests of the cache give their own folder
]  # fmt: skip
ONE_EPOCH = [*TINY_TRAINING, "--epochs", "1"]


def train_argv(model_dir: Path, dataset_dir: Path, output_root: Path, *extra: str) -> list[str]:
    """train.py's arguments for a tiny model on a fixture dataset with TINY_TRAINING; later flags override earlier ones."""
    return ["--model_name", str(model_dir), "--dataset_dir", str(dataset_dir), "--output_root", str(output_root), *TINY_TRAINING, *extra]


def train_under_torchrun(models: dict[str, Path], output_root: Path, train_args: list[str]) -> dict[str, tuple[Path, str]]:
    """Each family's model trained by 2 processes (gloo), all in one torchrun launch (tests/torchrun_families.py):
    {family: (its run folder under OUTPUT_ROOT/<family>, its log)}."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "tests" / "torchrun_families.py"), str(output_root), *(f"{family}={path}" for family, path in models.items()),
        "--", *train_args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    logs = dict(part.split("\n", 1) for part in result.stdout.split("=== ")[1:])
    return {family: (next((output_root / family).glob("*/*/*")), logs[family]) for family in models}


def predict_test_split(model_dir: Path, dataset_dir: Path, output: Path) -> list[dict]:
    """predict.py on the dataset's test.jsonl, on the CPU."""
    import predict

    return predict.main(predict.Args().parse_args([
        "--model_dir", str(model_dir), "--input_file", str(dataset_dir / "test.jsonl"), "--output_file", str(output),
        "--device", "cpu", "--num_workers", "1",
    ]))  # fmt: skip


def assert_same_predictions(predictions: list[dict], run_dir: Path) -> None:
    """predict.py's output is the run's own test predictions (classes and probabilities)."""
    import utils

    run_predictions = utils.load_jsonl(run_dir / "test-predictions.jsonl")
    assert [p["pred_id"] for p in predictions] == [p["pred"] for p in run_predictions]
    for ours, theirs in zip(predictions, run_predictions):
        assert list(ours["probs"].values()) == pytest.approx(theirs["probs"], abs=1e-4)


@pytest.fixture(scope="session")
def make_train_args(tiny_model_dir: Path, dataset_dir: Path):
    """Build train.py's Args for the tiny model on the fixture dataset; later flags override earlier ones."""
    import train_options

    def make(output_root: Path, *extra: str) -> "train_options.Args":
        return train_options.Args().parse_args(train_argv(tiny_model_dir, dataset_dir, output_root, *extra))

    return make


@pytest.fixture(scope="session")
def finished_run(make_train_args, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete training run of the tiny model, with --save_model, shared by the tests that read it."""
    import train

    return train.main(make_train_args(tmp_path_factory.mktemp("outputs"), "--save_model"))


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5, alive: Callable[[], bool] = lambda: True) -> Any:
    """Poll CONDITION every INTERVAL seconds until it returns something true, and return that. The test fails after
    TIMEOUT seconds, or as soon as ALIVE says that what was to bring it about (a thread, a process) has ended."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if not alive():
            pytest.fail(f"ended before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return value


def need_cluster(problem: str | None, variable: str) -> None:
    """A cluster's tests skip, with the reason, where none takes jobs here; with VARIABLE=required (.ci/run starts the
    clusters first) a missing cluster is a failure instead."""
    if problem is None:
        return
    if os.environ.get(variable) == "required":
        pytest.fail(f"{variable}=required, but {problem}")
    pytest.skip(problem)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path, min_size: tuple[int, int] = (600, 300), max_size: tuple[int, int] = (4000, 4000)) -> None:
    """A complete PNG image whose width and height lie within the bounds."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        size = image.size
        image.load()  # decodes every byte: a truncated file fails here
    assert min_size[0] <= size[0] <= max_size[0] and min_size[1] <= size[1] <= max_size[1], (path, size)


# --- a multi-label task -----------------------------------------------------------------------

GROUP_A = ("dokujo-tsushin", "livedoor-homme", "peachy")  # a second label for these categories' articles


def write_multi_label_dataset(dataset_dir: Path, output_dir: Path) -> Path:
    """The fixture dataset as a multi-label task (labels are lists of ids, as prepare.py --input writes them):
    every article has its category, and those of GROUP_A also the label "group-a" (id 9)."""
    import utils

    label2id = {**utils.load_json(dataset_dir / "label2id.json"), "group-a": 9}
    output_dir.mkdir(parents=True)
    utils.save_json(label2id, output_dir / "label2id.json")
    for split in ("train", "val", "test"):
        rows = utils.load_jsonl(dataset_dir / f"{split}.jsonl")
        for row in rows:
            names = [row["category"], *(["group-a"] if row["category"] in GROUP_A else [])]
            row["label"], row["category"] = sorted(label2id[name] for name in names), sorted(names, key=label2id.__getitem__)
        utils.save_jsonl(rows, output_dir / f"{split}.jsonl")
    return output_dir


@pytest.fixture(scope="session")
def multi_label_dataset(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_multi_label_dataset(dataset_dir, tmp_path_factory.mktemp("datasets") / "multi")


@pytest.fixture(scope="session")
def multi_label_run(make_train_args, multi_label_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete multi-label run of the tiny model, with balanced class weights (pos_weight) and --save_model."""
    import train

    output_root = tmp_path_factory.mktemp("outputs")
    return train.main(make_train_args(output_root, "--dataset_dir", str(multi_label_dataset), "--class_weights", "balanced", "--save_model"))
