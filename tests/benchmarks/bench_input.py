"""Can the input pipeline keep a GPU fed? Documents/s that each pipeline hands to the model, with no model.

    poetry run python tests/benchmarks/bench_input.py                       # livedoor-length fake articles, tiny BERT's tokenizer
    poetry run python tests/benchmarks/bench_input.py --model_name cl-tohoku/bert-base-japanese-v3 --dataset_dir datasets/livedoor

A benchmark, not a test (pytest only runs it once at tiny settings, in test_benchmarks.py). For each
--max_seq_lens value, in one process, side by side, over the same --documents (title + body pairs,
the body alone truncated), batched by --batch_size and shuffled, for --epochs epochs:

- reference: the reference's collate_fn. Every batch of every epoch is tokenised by the tokenizer's own
  transformers code (BertJapaneseTokenizer: MeCab words through fugashi, WordPiece in Python), padded
  to the batch's longest and turned into tensors, in the DataLoader (its train.py runs 4 workers;
  --reference_workers sets them here, 0: in this process, one core);
- ours, cold, fast path: a run start with an empty cache, as train.py does it: tokenise once with the
  MeCab + Rust WordPiece path (--tokenizer_workers processes) and write the cache entry; then every
  epoch only pads the stored ids (data.collate, train.py's DataLoader);
- ours, cold, the tokenizer's own code: the same with --slow_tokenizer (the path of tokenizers without
  a fast path: SentencePiece, char models), tokenised once per run all the same;
- ours, cached: a run start that reads the entry that the cold run wrote, then pads.

Epoch 1 includes the run start's tokenisation (ours) and later epochs do not, so the table gives both.
The model's side, for comparison: bert-base at 512 tokens in bf16 on one H200, measured by the team
(tests/gpu/run.sh measures it again): 425k tokens/s at batch 32 (830 documents/s), 505k at batch 128 (986).
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import bench_env  # noqa: F401 (first: src/ and tests/ on the path, the environment set)

import torch  # noqa: E402
import transformers  # noqa: E402
from tap import Tap  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

import data  # noqa: E402
import prepare  # noqa: E402
import tokenization  # noqa: E402
import utils  # noqa: E402
from fake_corpus import write_corpus  # noqa: E402
from tiny_bert import build_tiny_bert, read_texts  # noqa: E402
from utils import InputError  # noqa: E402

TEXT_FIELDS = ["title", "body"]
# bert-base (the config of cl-tohoku/bert-base-japanese-v3) at 512 tokens, bf16, one H200, model-only steps with random
# ids and fused AdamW; measured by the team on 2026-11-30 (issue 19): tokens/s by batch size.
GPU_TOKENS_PER_S = {32: 425_000, 128: 505_000}
GPU_SEQ_LEN = 512


class Args(Tap):
    model_name: str | None = None  # a local model folder (or a cached hub name) whose tokenizer is used; default: a tiny BERT's BertJapaneseTokenizer (MeCab + WordPiece, the class of cl-tohoku/bert-base-japanese-v3) built from the corpus
    dataset_dir: Path | None = None  # a prepared dataset (its train.jsonl); default: a fake livedoor-format corpus with livedoor-length bodies
    documents: int = 400  # documents fed through each pipeline (the first ones of train.jsonl)
    body_chars: tuple[int, int] = (1500, 2700)  # range of body lengths (characters) of the fake corpus: livedoor's average is about 2,100
    max_seq_lens: list[int] = [512, 128]  # tokens per document, [CLS] and [SEP]s included; one table row group each
    batch_size: int = 16  # documents per batch (train.py's and the reference's default)
    epochs: int = 2  # epochs per pipeline: the first includes our run start's tokenisation, later ones only padding (the reference tokenises in every one)
    reference_workers: int = 0  # DataLoader worker processes of the reference's collate (its train.py: 4); 0: in this process, one core
    tokenizer_workers: int = 1  # processes that tokenise our run start (train.py's --num_workers; 1: one core, comparable with --reference_workers 0)
    seed: int = 0  # seed of the fake corpus, the body lengths and the shuffling

    def process_args(self) -> None:
        for name in ("documents", "batch_size", "epochs", "tokenizer_workers"):
            if getattr(self, name) < 1:
                self.error(f"--{name} must be at least 1")
        if self.reference_workers < 0:
            self.error("--reference_workers cannot be negative")
        if not self.max_seq_lens or min(self.max_seq_lens) < 8:
            self.error("--max_seq_lens: at least one value, each at least 8")
        if not 1 <= self.body_chars[0] <= self.body_chars[1]:
            self.error("--body_chars: MIN MAX with 1 <= MIN <= MAX")


# --- the pipelines ----------------------------------------------------------------------------


def reference_collate(rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> dict[str, torch.Tensor]:
    """The reference's collate_fn: tokenise the batch's (title, body) pairs, pad, make tensors.

    transformers 4, which the reference ran, returned the segment ids of pairs by default; 5 does when asked.
    """
    inputs = tokenizer(
        [row["title"] for row in rows], [row["body"] for row in rows], padding=True, truncation="only_second",
        return_tensors="pt", max_length=max_seq_len, return_token_type_ids=True,
    )  # fmt: skip
    return {**inputs, "labels": torch.tensor([row["label"] for row in rows])}


def epoch_seconds(loader: DataLoader, epoch: int) -> tuple[float, int]:
    """Wall seconds to draw every batch of one epoch, and the documents drawn."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    start, documents = time.perf_counter(), 0
    for batch in loader:
        documents += len(batch["labels"])
    return time.perf_counter() - start, documents


def measure(start_seconds: float, loader: DataLoader, epochs: int) -> dict[str, float]:
    """Documents/s of epoch 1 (the run start's `start_seconds` included) and of the later epochs together."""
    times = [epoch_seconds(loader, epoch) for epoch in range(1, epochs + 1)]
    documents = times[0][1]
    later = sum(seconds for seconds, _ in times[1:])
    return {
        "first": documents / (start_seconds + times[0][0]),
        "later": documents * (epochs - 1) / later if epochs > 1 else math.nan,
    }


def our_run_start(rows: list[dict], path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, slow: bool, cache_dir: Path | None, args: Args) -> tuple[float, list[dict]]:
    """train.py's tokenisation step for these rows (tokenization.tokenize_splits): seconds and examples."""
    token_type_ids = tokenization.wants_token_type_ids(AutoConfig.from_pretrained(tokenizer.name_or_path), TEXT_FIELDS)
    start = time.perf_counter()
    examples, _ = tokenization.tokenize_splits(
        {"train": rows}, {"train": path}, tokenizer, layout=tokenization.InputLayout(tuple(TEXT_FIELDS), max_seq_len), token_type_ids=token_type_ids,
        slow=slow, num_workers=args.tokenizer_workers, cache_dir=cache_dir, log=lambda _: None,
    )
    examples = examples["train"]
    return time.perf_counter() - start, examples


def our_loader(examples: list[dict], tokenizer: PreTrainedTokenizerBase, args: Args) -> DataLoader:
    """train.py's training DataLoader (data.collate): a seeded shuffling sampler, padding to the batch's longest (no GPU: no pinned memory)."""
    sampler = DistributedSampler(examples, num_replicas=1, rank=0, shuffle=True, seed=args.seed)
    return DataLoader(examples, batch_size=args.batch_size, sampler=sampler, collate_fn=partial(data.collate, pad_token_id=tokenizer.pad_token_id))


def pipelines(rows: list[dict], path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, work_dir: Path, args: Args) -> dict[str, dict[str, float]]:
    """Each pipeline over the same rows at one max_seq_len."""
    results = {}
    generator = torch.Generator().manual_seed(args.seed)
    collate = partial(reference_collate, tokenizer=tokenizer, max_seq_len=max_seq_len)
    reference = DataLoader(rows, batch_size=args.batch_size, shuffle=True, generator=generator, collate_fn=collate, num_workers=args.reference_workers)
    print(f"  reference collate ({args.epochs} epochs) ...", flush=True)
    results["reference"] = measure(0.0, reference, args.epochs)

    cache_dir = Path(tempfile.mkdtemp(prefix=f"cache-{max_seq_len}-", dir=work_dir))
    print("  ours, cold cache, fast path ...", flush=True)
    seconds, examples = our_run_start(rows, path, tokenizer, max_seq_len, slow=False, cache_dir=cache_dir, args=args)
    results["cold_fast"] = measure(seconds, our_loader(examples, tokenizer, args), args.epochs)
    print("  ours, cached ...", flush=True)
    seconds, cached = our_run_start(rows, path, tokenizer, max_seq_len, slow=False, cache_dir=cache_dir, args=args)
    if [e["input_ids"] for e in cached] != [e["input_ids"] for e in examples]:
        raise RuntimeError("the cache returned other ids than the run that wrote it")
    results["cached"] = measure(seconds, our_loader(cached, tokenizer, args), args.epochs)
    print("  ours, cold, the tokenizer's own code ...", flush=True)
    seconds, slow = our_run_start(rows, path, tokenizer, max_seq_len, slow=True, cache_dir=None, args=args)
    results["cold_slow"] = measure(seconds, our_loader(slow, tokenizer, args), args.epochs)
    results["same_ids"] = {"value": float([e["input_ids"] for e in slow] == [e["input_ids"] for e in examples])}
    results["tokens"] = {"mean": sum(len(e["input_ids"]) for e in examples) / len(examples)}
    return results


# --- data -------------------------------------------------------------------------------------


def lengthen(rows: list[dict], body_chars: tuple[int, int], seed: int) -> list[dict]:
    """Bodies of a length drawn from BODY_CHARS, made of the corpus's own body lines."""
    rng = random.Random(seed)
    lines = [line for row in rows for line in row["body"].split("\n") if line]
    out = []
    for row in rows:
        target, parts = rng.randint(*body_chars), [row["body"]]
        while sum(map(len, parts)) + len(parts) - 1 < target:
            parts.append(rng.choice(lines))
        out.append({**row, "body": "\n".join(parts)[:target]})
    return out


def source(args: Args, work_dir: Path) -> tuple[list[dict], Path, str]:
    """The rows measured (written to their own train.jsonl, which the cache key reads) and the tokenizer's model."""
    if args.dataset_dir is not None:
        rows = utils.load_jsonl(args.dataset_dir / "train.jsonl")[: args.documents]
        utils.check_rows(rows, TEXT_FIELDS, str(args.dataset_dir / "train.jsonl"), other_fields=("label",))
        dataset_dir = args.dataset_dir
    else:
        per_category = math.ceil(args.documents / 9 / 0.8) + 1  # 80% of the articles go to train
        corpus = write_corpus(work_dir / "text", per_category, seed=args.seed)
        dataset_dir = work_dir / "dataset"
        with contextlib.redirect_stdout(io.StringIO()):
            prepare.main(prepare.Args().parse_args(["--input_dir", str(corpus), "--output_dir", str(dataset_dir), "--seed", str(args.seed)]))
        rows = lengthen(utils.load_jsonl(dataset_dir / "train.jsonl"), args.body_chars, args.seed)[: args.documents]
    if len(rows) < args.documents:
        raise InputError(f"--documents {args.documents}: {dataset_dir / 'train.jsonl'} has only {len(rows)} rows")
    path = work_dir / "measured" / "train.jsonl"
    utils.save_jsonl(rows, path)
    model_name = args.model_name or str(build_tiny_bert(read_texts(dataset_dir), work_dir / "tiny-bert"))
    return rows, path, model_name


# --- report -----------------------------------------------------------------------------------


NAMES = {
    "reference": "reference: tokenise every batch in collate, every epoch",
    "cold_fast": "ours, cold cache: fast path once, then pad",
    "cold_slow": "ours, cold, tokenizer's own code once, then pad",
    "cached": "ours, cache hit: read the entry, then pad",
}


def gpu_documents_per_s(max_seq_len: int) -> Iterable[tuple[int, float]]:
    """Documents/s bert-base consumes at batch sizes with a measured rate (512 tokens only: no figure at other lengths)."""
    if max_seq_len == GPU_SEQ_LEN:
        yield from ((batch, tokens / GPU_SEQ_LEN) for batch, tokens in GPU_TOKENS_PER_S.items())


def report(args: Args, tokenizer: PreTrainedTokenizerBase, rows: list[dict], results: dict[int, dict]) -> str:
    command = "poetry run python tests/benchmarks/bench_input.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    mean_chars = sum(len(row["body"]) for row in rows) / len(rows)
    workers = "in this process (one core)" if args.reference_workers == 0 else f"{args.reference_workers} DataLoader workers"
    lines = [
        "",
        "== bench_input ==",
        f"command:   {command}",
        f"tokenizer: {tokenizer.name_or_path} ({type(tokenizer).__name__}); transformers {transformers.__version__}, torch {torch.__version__}",
        f"data:      {args.dataset_dir or 'fake corpus'}: {len(rows)} documents, body {mean_chars:,.0f} characters on average; "
        f"batch {args.batch_size}, {args.epochs} epochs",
        f"processes: reference collate {workers}; our tokenisation {args.tokenizer_workers} process(es); {utils.available_cpus()} usable CPU cores",
        "",
        "| max_seq_len | pipeline | epoch 1 (documents/s) | later epochs (documents/s) |",
        "| ---: | :--- | ---: | ---: |",
    ]
    for max_seq_len, result in results.items():
        for key, name in NAMES.items():
            row = result[key]
            later = "" if math.isnan(row["later"]) else f"{row['later']:,.0f}"
            lines.append(f"| {max_seq_len} | {name} | {row['first']:,.0f} | {later} |")
    lines.append("")
    for max_seq_len, result in results.items():
        same = "yes" if result["same_ids"]["value"] else "NO"
        lines.append(f"max_seq_len {max_seq_len}: {result['tokens']['mean']:.0f} tokens/document; fast path and tokenizer's own code gave identical ids: {same}")
        for batch, needed in gpu_documents_per_s(max_seq_len):
            starving = [NAMES[key].split(":")[0] for key in ("reference", "cold_fast", "cold_slow", "cached") if result[key]["later" if args.epochs > 1 else "first"] < needed]
            lines.append(
                f"  bert-base bf16 on one H200 (team's measurement, batch {batch}) consumes {needed:,.0f} documents/s; "
                f"below that in steady state: {', '.join(starving) or 'none'}"
            )
    lines.append("note:      wall-clock figures; on a shared machine compare the rows of one invocation")
    return "\n".join(lines)


def main(args: Args) -> dict[int, dict[str, dict[str, float]]]:
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
        work_dir = Path(tmp)
        print("preparing the documents and the tokenizer ...", flush=True)
        rows, path, model_name = source(args, work_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        results = {}
        for max_seq_len in args.max_seq_lens:
            print(f"max_seq_len {max_seq_len}:", flush=True)
            results[max_seq_len] = pipelines(rows, path, tokenizer, max_seq_len, work_dir, args)
        print(report(args, tokenizer, rows, results))
    return results


if __name__ == "__main__":
    utils.run_cli(main, Args().parse_args())
