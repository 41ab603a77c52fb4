"""How fast is tokenisation? The tokenizer's own code vs the fast MeCab + WordPiece path, and the cache.

    poetry run python tests/benchmarks/bench_tokenize.py                    # real-size fake corpus, tiny BERT's tokenizer
    poetry run python tests/benchmarks/bench_tokenize.py --model_name cl-tohoku/bert-base-japanese-v3 --dataset_dir datasets/livedoor

A benchmark, not a test (pytest does not collect it). In one process, side by side:

1. documents/s of train.py's tokenisation of every split (title + body pairs, --max_seq_len 512) by the
   tokenizer's own transformers code (--slow_tokenizer) and by the fast path, in the same worker
   processes; and whether the two gave identical ids;
2. the tokenisation step of a run start (tokenization.tokenize_splits, as train.main calls it) with an
   empty cache (cold: tokenise and write the entry) and again (warm: read it).

The default corpus has the real corpus's size (tests/fake_corpus.py REAL_COUNTS, 7,367 articles) and
bodies of livedoor's length (1,000-3,000 characters, made of the fake corpus's sentences).
"""

from __future__ import annotations

import contextlib
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import bench_env  # noqa: F401 (first: src/ and tests/ on the path, the environment set)

import numpy as np  # noqa: E402
import transformers  # noqa: E402
from tap import Tap  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402

import prepare  # noqa: E402
import data  # noqa: E402
import tokenization  # noqa: E402
import utils  # noqa: E402
from fake_corpus import REAL_COUNTS, write_corpus  # noqa: E402
from tiny_bert import build_tiny_bert, read_texts  # noqa: E402
from utils import InputError  # noqa: E402


class Args(Tap):
    model_name: str | None = None  # a local model folder (or a cached hub name) whose tokenizer is measured; default: the tiny BERT's (MeCab + WordPiece, built from the corpus)
    dataset_dir: Path | None = None  # a prepared dataset; default: a fake corpus of the real one's size, with bodies of livedoor's length
    body_chars: tuple[int, int] = (1000, 3000)  # range of body lengths (characters) of the fake corpus
    max_seq_len: int = 512  # tokens per example, as train.py's --max_seq_len
    truncation: Literal["head", "tail", "head_tail"] = "head"  # what of a long body is kept, as train.py's --truncation
    num_workers: int = 1  # tokeniser processes for both paths (1: the speed of one core; 0: train.py's default)
    work_dir: Path | None = None  # keep the corpus, dataset and tokenizer here (default: a temporary folder, deleted at the end)


def lengthen_bodies(dataset_dir: Path, body_chars: tuple[int, int], seed: int = 0) -> None:
    """Give every body a length drawn from BODY_CHARS, made of the corpus's own body lines."""
    rng = random.Random(seed)
    splits = {split: utils.load_jsonl(dataset_dir / f"{split}.jsonl") for split in (*data.SPLITS, "all")}
    lines = [line for row in splits["all"] for line in row["body"].split("\n")]
    bodies: dict[str, str] = {}
    for row in splits["all"]:
        target, parts = rng.randint(*body_chars), [row["body"]]
        while sum(map(len, parts)) < target:
            parts.append(rng.choice(lines))
        bodies[row["id"]] = "\n".join(parts)
    for split, rows in splits.items():
        utils.save_jsonl(({**row, "body": bodies[row["id"]]} for row in rows), dataset_dir / f"{split}.jsonl")


def source(args: Args, work_dir: Path) -> tuple[Path, str]:
    """The dataset and the model folder (or name) whose tokenizer is measured."""
    dataset_dir = args.dataset_dir
    if dataset_dir is None:
        dataset_dir = work_dir / "dataset"
        if not (dataset_dir / "all.jsonl").is_file():
            corpus = write_corpus(work_dir / "text", REAL_COUNTS)
            prepare.main(prepare.Args().parse_args(["--input_dir", str(corpus), "--output_dir", str(dataset_dir)]))
            lengthen_bodies(dataset_dir, args.body_chars)
    model_name = args.model_name
    if model_name is None:
        model_name = str(work_dir / "tiny-bert")
        if not (work_dir / "tiny-bert" / "vocab.txt").is_file():
            build_tiny_bert(read_texts(dataset_dir), work_dir / "tiny-bert")
    return dataset_dir, model_name


def main(args: Args) -> None:
    transformers.utils.logging.disable_progress_bar()
    with contextlib.ExitStack() as stack:
        work_dir = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tokenize-")))
        work_dir.mkdir(parents=True, exist_ok=True)
        print("preparing the corpus and the tokenizer ...", flush=True)
        dataset_dir, model_name = source(args, work_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        layout = tokenization.InputLayout(("title", "body"), args.max_seq_len, args.truncation)
        token_type_ids = tokenization.wants_token_type_ids(AutoConfig.from_pretrained(model_name), layout.text_fields)
        rows = {split: data.load_split(dataset_dir, split, layout.text_fields, 10**9) for split in data.SPLITS}
        texts = [text for split in data.SPLITS for text in tokenization.texts_of(rows[split], layout.text_fields)]
        mean_chars = sum(len(body) for _, body in texts) / len(texts)

        # 1. Both paths over the same documents, one after the other.
        encoders = {"slow": tokenization.choose_encoder(tokenizer, slow=True), "fast": tokenization.choose_encoder(tokenizer, slow=False)}
        if not isinstance(encoders["fast"], tokenization.MecabWordPieceEncoder):
            raise InputError(f"{model_name}: {encoders['fast'].description}; this benchmark compares the two paths of MeCab + WordPiece tokenizers")
        speeds, outputs = {}, {}
        for name, encoder in encoders.items():
            print(f"tokenising {len(texts):,} documents by the {name} path ...", flush=True)
            start = time.perf_counter()
            outputs[name] = tokenization.encode_parallel(encoder, texts, layout, token_type_ids, args.num_workers)
            speeds[name] = len(texts) / (time.perf_counter() - start)
        slow, fast = outputs["slow"], outputs["fast"]
        same = np.array_equal(slow.offsets, fast.offsets) and np.array_equal(slow.input_ids, fast.input_ids) and (
            slow.token_type_ids is None or np.array_equal(slow.token_type_ids, fast.token_type_ids)
        ) and np.array_equal(slow.dropped, fast.dropped)
        report = fast.truncation_report()
        mean_tokens = outputs["fast"].offsets[-1] / len(texts)

        # 2. A run start's tokenisation step with an empty cache, then with the entry written.
        cache_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-cache-", dir=work_dir)))
        files = {split: dataset_dir / f"{split}.jsonl" for split in data.SPLITS}
        steps, lines = {}, []
        for name in ("cold", "warm"):
            print(f"run start, {name} cache ...", flush=True)
            start = time.perf_counter()
            tokenization.tokenize_splits(
                rows, files, tokenizer, layout=layout, token_type_ids=token_type_ids,
                slow=False, num_workers=args.num_workers, cache_dir=cache_dir, log=lines.append,
            )
            steps[name] = time.perf_counter() - start
        (entry,) = cache_dir.glob("*.npz")
        entry_mib = entry.stat().st_size / 2**20

    workers = tokenization.tokenizer_workers(args.num_workers)
    command = "poetry run python tests/benchmarks/bench_tokenize.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    print(
        "\n".join([
            "",
            "== bench_tokenize ==",
            f"command:   {command}",
            f"tokenizer: {model_name} ({type(tokenizer).__name__}); transformers {transformers.__version__}",
            f"data:      {args.dataset_dir or 'fake corpus of the real size'}: {len(texts):,} documents (all splits), body {mean_chars:,.0f} characters "
            f"on average; max_seq_len {args.max_seq_len}, {args.truncation} truncation: {mean_tokens:.0f} tokens/document; "
            f"{report['truncated_share']:.1%} truncated, {report['mean_tokens_dropped_per_truncated_example']:,.0f} tokens dropped per truncated one",
            f"machine:   {utils.available_cpus()} usable CPU cores; {workers} tokeniser process(es) for each path",
            "",
            f"slow (the tokenizer's own code): {speeds['slow']:8,.1f} documents/s",
            f"fast (MeCab + Rust WordPiece):   {speeds['fast']:8,.1f} documents/s",
            f"fast / slow: {speeds['fast'] / speeds['slow']:.2f}x   identical ids, lengths and truncation counts: {'yes' if same else 'NO'}",
            "",
            f"run start, tokenisation step: cold cache {steps['cold']:.2f} s (fast path + writing the entry), warm cache {steps['warm']:.2f} s "
            f"(reading {entry_mib:,.1f} MiB)",
            f"cold / warm: {steps['cold'] / steps['warm']:.1f}x",
            "note:      timings are wall-clock on a shared machine; compare the ratios of one run",
        ])
    )


if __name__ == "__main__":
    utils.run_cli(main, Args().parse_args())
