"""Where does training time go? Tokenisation, the model's own step, and the real training loop.

    poetry run python tests/benchmarks/bench_train.py                      # tiny BERT, fake corpus
    poetry run python tests/benchmarks/bench_train.py --model base         # bert-base-sized, random weights
    poetry run python tests/benchmarks/bench_train.py --model_name path/to/model --dataset_dir datasets/livedoor --repeat_body 1

A benchmark, not a test (pytest does not collect it). For one model on the current device it measures:

1. tokenisation of the train split with tokenization.tokenize_splits as train.main calls it, without its cache
   (worker processes of tokenization.encode_parallel; tests/benchmarks/bench_tokenize.py compares the paths and the cache);
2. the model-only step: batches collated (data.collate) and moved to the device before timing, then
   train.accumulate_gradients + gradient clipping + AdamW step + zero_grad + scheduler step, with the
   autocast/GradScaler settings of train.main; warm-up steps untimed; the device synchronised around the clock;
3. the full training loop: train.main on the same examples, batch size and max_seq_len, reading the
   training throughput of its last epoch from log.csv (data loading, collation and host-to-device copies
   included, evaluation excluded).

The model-only steps run the very batches of the full loop's last epoch (same sampler, seed and epoch),
so the ratio of the two step times is the cost of the data pipeline and of the loop's bookkeeping.
Each measurement runs in a fresh process, so that its peak memory is its own.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import multiprocessing
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any, Literal

import bench_env  # noqa: F401 (first: src/ and tests/ on the path, the environment set)

import torch  # noqa: E402
import transformers  # noqa: E402
from tap import Tap  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

import data  # noqa: E402
import modeling  # noqa: E402
import prepare  # noqa: E402
import tokenization  # noqa: E402
import train  # noqa: E402
import train_options  # noqa: E402
import utils  # noqa: E402
from fake_corpus import write_corpus  # noqa: E402
from tiny_bert import build_tiny_bert, read_texts  # noqa: E402
from utils import InputError  # noqa: E402

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, matched in this order against
# torch.cuda.get_device_name(): the more specific names first ("A100" before "A10", "L40S" before "L4").
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("V100", 125.0),  # fp16 only (no bf16)
]


class Args(Tap):
    model: Literal["tiny", "base"] = "tiny"  # tiny: 2 layers x 32 wide; base: bert-base-sized (12 x 768), random weights; both with a Japanese tokenizer built from the train texts
    model_name: str | None = None  # an existing local model folder (or a cached hub name) to use instead of --model
    dataset_dir: Path | None = None  # a prepared dataset ({train,val,test}.jsonl + label2id.json); default: a fake livedoor-format corpus, generated and prepared in the work folder
    articles_per_category: int = 45  # articles per category of the generated fake corpus (9 categories; 80%% go to train)
    repeat_body: int | None = None  # repeat each body this many times to reach livedoor's lengths (most articles fill 512 tokens); default 8 for the fake corpus, 1 for --dataset_dir
    num_examples: int = 160  # train examples used by the model-only and full-loop measurements (the first ones of the train split)
    eval_examples: int = 16  # val and test examples given to the full loop (its evaluation is not timed; keep it small)
    batch_size: int = 16  # examples per optimizer step, in both measurements
    max_seq_len: int = 512  # tokens per example, [CLS] and [SEP]s included
    epochs: int = 2  # epochs of the full loop; the last one is reported (the first absorbs warm-up and compilation)
    steps: int = 20  # timed model-only steps; they cycle through the batches of the full loop's last epoch (20 = two epochs at the defaults)
    warmup_steps: int = 3  # untimed model-only steps before the clock starts
    device: str = "auto"  # auto (cuda, else mps, else cpu), or a torch device such as cpu, cuda:1
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast precision, as train.py resolves it
    compile: bool = False  # torch.compile the model (dynamic shapes), in both measurements
    num_workers: int = 0  # tokeniser processes (0: train.py's default, one per CPU core, at most 8)
    seed: int = 42  # seed of the model's head, the shuffling and dropout (the same in both measurements)
    work_dir: Path | None = None  # keep the corpus, dataset, model and run folder here (default: a temporary folder, deleted at the end)

    def process_args(self) -> None:
        for name in ("articles_per_category", "num_examples", "eval_examples", "batch_size", "max_seq_len", "epochs", "steps"):
            if getattr(self, name) < 1:
                self.error(f"--{name} must be at least 1")
        if self.warmup_steps < 0:
            self.error("--warmup_steps cannot be negative")
        if self.repeat_body is not None and self.repeat_body < 1:
            self.error("--repeat_body must be at least 1")


# --- running a measurement in a fresh process -------------------------------------------------


def _child(sender: Any, fn: Any, args: tuple) -> None:
    try:
        sender.send(("ok", fn(*args)))
    except InputError as e:
        sender.send(("input", str(e)))
    except BaseException:  # noqa: BLE001 - reported in the parent
        sender.send(("error", traceback.format_exc()))


def in_fresh_process(fn: Any, *args: Any) -> Any:
    """fn(*args) in a spawned process: its peak memory (RSS or CUDA) is that of this measurement alone."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, fn, args))
    process.start()
    sender.close()
    try:
        status, value = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"{fn.__name__} died in its process (exit code {process.exitcode})") from None
    process.join()
    if status == "input":
        raise InputError(value)
    if status == "error":
        raise RuntimeError(f"{fn.__name__} failed in its process:\n{value}")
    return value


def peak_rss() -> tuple[int, str]:
    """This process's peak resident set size in bytes, and where it was read.

    Linux: VmHWM of /proc/self/status, the peak of this process image alone. resource.getrusage's
    ru_maxrss would be wrong here: Linux carries it over fork and exec, so a spawned process starts
    with its parent's resident size. Elsewhere: ru_maxrss (bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "VmHWM"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024), "resource.getrusage ru_maxrss"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_info(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "torch_threads": torch.get_num_threads()}


def peak_memory(device: torch.device, rss_at_start: int) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory": torch.cuda.max_memory_allocated(device), "memory_kind": "torch.cuda.max_memory_allocated (tensors only)"}
    peak, source = peak_rss()
    return {"peak_memory": peak, "memory_kind": f"peak RSS of the measuring process ({source}; {rss_at_start / 2**20:,.0f} MiB of it after imports)"}


# --- the measurements -------------------------------------------------------------------------


def tokenizer_processes(num_workers: int) -> str:
    workers = tokenization.tokenizer_workers(num_workers)
    return "1 process" if workers == 1 else f"up to {workers} processes (tokenization.encode_parallel)"


def measure_tokenisation(train_argv: list[str], rows: list[dict], path: Path, label2id: dict[str, int]) -> tuple[list[dict], dict[str, Any]]:
    """Tokenise the train split as train.main does; return the examples and the timing."""
    args = train_options.Args().parse_args(train_argv)
    tokenizer, model = modeling.load_model(args.model_name, label2id)  # its clear error for a model that does not load
    token_type_ids = tokenization.wants_token_type_ids(model.config, args.text_fields)
    del model
    start = time.perf_counter()
    examples = tokenization.tokenize_splits(
        {"train": rows}, {"train": path}, tokenizer, layout=tokenization.InputLayout.of(args),
        token_type_ids=token_type_ids, slow=args.slow_tokenizer, num_workers=args.num_workers, cache_dir=None, log=print,
    )[0]["train"]
    seconds = time.perf_counter() - start
    tokens = sum(len(e["input_ids"]) for e in examples)
    return examples, {
        "examples": len(examples),
        "seconds": seconds,
        "examples_per_s": len(examples) / seconds,
        "tokens_per_s": tokens / seconds,
        "processes": tokenizer_processes(args.num_workers),
    }


def measure_model_only(train_argv: list[str], examples: list[dict], label2id: dict[str, int], steps: int, warmup_steps: int) -> dict[str, Any]:
    """Steps of the model alone on batches already collated and on the device."""
    rss_at_start, _ = peak_rss()
    args = train_options.Args().parse_args(train_argv)
    transformers.utils.logging.disable_progress_bar()
    device = modeling.resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = modeling.resolve_dtype(args.dtype, device)
    utils.set_seed(args.seed)
    tokenizer, model = modeling.load_model(args.model_name, label2id)

    # The batches of the full loop's last epoch: same sampler, seed and epoch, same collation.
    sampler = DistributedSampler(examples, num_replicas=1, rank=0, shuffle=True, seed=args.seed)
    sampler.set_epoch(args.epochs)
    loader = DataLoader(examples, batch_size=args.batch_size, sampler=sampler, collate_fn=partial(data.collate, pad_token_id=tokenizer.pad_token_id))
    cpu_batches = list(loader)
    counts = [train.window_counts([batch]) for batch in cpu_batches]  # (examples, real tokens) per batch
    padded_tokens = sum(batch["input_ids"].numel() for batch in cpu_batches)

    model.to(device)
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in cpu_batches]
    compiled = torch.compile(model, dynamic=True) if args.compile else model
    groups, _ = modeling.param_groups(model, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    scheduler = train.linear_schedule(optimizer, 0, warmup_steps + steps + 1)
    autocast = partial(torch.autocast, device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    compiled.train()

    def step(i: int) -> None:
        # The body of train.main's loop, less the data loading and the per-step loss readout.
        train.accumulate_gradients(compiled, [batches[i]], counts[i][0], device, autocast, scaler, world_size=1)
        train.optimizer_step(model, optimizer, scheduler, scaler, args.max_grad_norm)

    for i in range(warmup_steps):
        step(i % len(batches))
    synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step(i % len(batches))
    synchronize(device)
    seconds = time.perf_counter() - start

    timed = [counts[i % len(batches)] for i in range(steps)]
    embedding_params = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters(recurse=False))
    num_params = sum(p.numel() for p in model.parameters())
    return {
        **device_info(device),
        **peak_memory(device, rss_at_start),
        "dtype": str(dtype).removeprefix("torch."),
        "num_params": num_params,
        "non_embedding_params": num_params - embedding_params,
        "batches_per_epoch": len(batches),
        "padding_fraction": 1 - sum(t for _, t in counts) / padded_tokens,
        "seconds": seconds,
        "step_seconds": seconds / steps,
        "examples_per_s": sum(n for n, _ in timed) / seconds,
        "tokens_per_s": sum(t for _, t in timed) / seconds,
    }


def measure_full_loop(train_argv: list[str]) -> dict[str, Any]:
    """train.main as users run it; the throughput of its last epoch, from its log.csv."""
    rss_at_start, _ = peak_rss()
    args = train_options.Args().parse_args(train_argv)
    device = modeling.resolve_device(args.device)
    # Its log lines (stdout) stay on the console; its progress bars (stderr) go to a file.
    with (args.output_root.parent / "full-loop-stderr.log").open("w", encoding="utf-8") as f, contextlib.redirect_stderr(f):
        run_dir = train.main(args)
    with (run_dir / "log.csv").open(encoding="utf-8") as f:
        last = list(csv.DictReader(f))[-1]
    num_train = len(utils.load_jsonl(args.dataset_dir / "train.jsonl"))
    examples_per_s, tokens_per_s = float(last["examples_per_s"]), float(last["tokens_per_s"])
    seconds = num_train / examples_per_s  # the timed, training-only part of the epoch
    return {
        **device_info(device),
        **peak_memory(device, rss_at_start),
        "run_dir": str(run_dir),
        "epoch": int(last["epoch"]),
        "seconds": seconds,
        "step_seconds": seconds / math.ceil(num_train / args.batch_size),
        "examples_per_s": examples_per_s,
        "tokens_per_s": tokens_per_s,
    }


# --- data and model ---------------------------------------------------------------------------


def source_dataset(args: Args, work_dir: Path) -> Path:
    if args.dataset_dir is not None:
        return args.dataset_dir
    corpus = write_corpus(work_dir / "text", args.articles_per_category)
    dataset_dir = work_dir / "livedoor"
    with contextlib.redirect_stdout(io.StringIO()):  # its split table is not part of this report
        prepare.main(prepare.Args().parse_args(["--input_dir", str(corpus), "--output_dir", str(dataset_dir)]))
    return dataset_dir


def with_repeated_body(rows: list[dict], times: int) -> list[dict]:
    return [{**row, "body": "\n".join([row["body"]] * times)} if times > 1 else row for row in rows]


def model_folder(args: Args, dataset_dir: Path, work_dir: Path) -> str:
    if args.model_name is not None:
        return args.model_name
    texts = read_texts(dataset_dir)
    if args.model == "base":
        return str(build_tiny_bert(texts, work_dir / "base-sized-bert", hidden_size=768, num_layers=12, max_words=32000))
    return str(build_tiny_bert(texts, work_dir / "tiny-bert"))


# --- report -----------------------------------------------------------------------------------


def peak_tflops(device_name: str) -> float | None:
    return next((peak for name, peak in PEAK_TFLOPS if name.lower() in device_name.lower()), None)


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def report(args: Args, info: dict[str, Any], tokenised: dict[str, Any], model_only: dict[str, Any], full: dict[str, Any]) -> str:
    flops_per_token = 6 * model_only["non_embedding_params"]  # forward + backward, matrix products only
    peak = peak_tflops(model_only["device_name"]) if model_only["device"].startswith("cuda") else None
    half = model_only["dtype"] in ("bfloat16", "float16")

    def tflops(tokens_per_s: float) -> str:
        achieved = flops_per_token * tokens_per_s / 1e12
        share = f" ({achieved / peak:.1%} of {peak:g})" if peak and half else ""
        return f"{achieved:.3g}{share}"

    def measured_row(name: str, measured: dict[str, Any]) -> list[str]:
        return [
            name,
            f"{measured['examples_per_s']:,.1f}",
            f"{measured['tokens_per_s']:,.0f}",
            f"{measured['step_seconds'] * 1e3:,.1f}",
            format_bytes(measured["peak_memory"]),
            tflops(measured["tokens_per_s"]),
        ]

    header = ["", "examples/s", "tokens/s", "step (ms)", "peak memory", "TFLOP/s"]
    table = [
        header,
        [f"tokenise train split ({tokenised['examples']})", f"{tokenised['examples_per_s']:,.1f}", f"{tokenised['tokens_per_s']:,.0f}", "", "", ""],
        measured_row(f"model-only step ({args.steps} steps)", model_only),
        measured_row(f"full loop (train.main, epoch {full['epoch']})", full),
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, "-" * len(lines[0]))

    # Per token, the two cover the same batches (exactly so when --steps is a multiple of the batches per epoch).
    ratio = model_only["tokens_per_s"] / full["tokens_per_s"]
    exact = args.steps % model_only["batches_per_epoch"] == 0
    command = "poetry run python tests/benchmarks/bench_train.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    out = [
        "",
        "== bench_train ==",
        f"command:  {command}",
        f"model:    {info['model']}: {model_only['num_params']:,} parameters, {model_only['non_embedding_params']:,} outside the embeddings",
        f"device:   {model_only['device']} ({model_only['device_name']}), {model_only['dtype']}, compile {args.compile}, "
        f"{model_only['torch_threads']} torch threads, {os.cpu_count()} CPUs; torch {torch.__version__}, transformers {transformers.__version__}",
        f"data:     {info['dataset']}; body x{info['repeat_body']}; {info['num_examples']} train examples, batch {args.batch_size}, "
        f"max_seq_len {args.max_seq_len}: {info['mean_tokens']:.0f} tokens/example on average, {info['truncated']:.0%} truncated, "
        f"{model_only['padding_fraction']:.1%} of the batches' positions are padding",
        f"tokenise: {tokenised['examples']} examples in {tokenised['seconds']:.2f} s by tokenization.tokenize_splits, {tokenised['processes']}",
        "",
        *lines,
        "",
        f"full loop / model-only step time: {ratio:.3f}  (data pipeline and loop overhead; goal <= 1.05)"
        + ("" if exact else f"  [per token: --steps {args.steps} is not a multiple of the {model_only['batches_per_epoch']} batches per epoch]"),
        f"memory:   {model_only['memory_kind']}",
        "TFLOP/s:  6 x non-embedding parameters x real (non-padding) tokens / s; attention scores and padding not counted"
        + ("" if peak and half else ("; no peak known for this device" if model_only["device"].startswith("cuda") else "")),
        f"run:      {full['run_dir']}" if args.work_dir else None,
        "note:     timings are wall-clock on a shared machine; rerun and compare before drawing conclusions",
    ]
    return "\n".join(line for line in out if line is not None)


# --- main -------------------------------------------------------------------------------------


def main(args: Args) -> None:
    with contextlib.ExitStack() as stack:
        if args.work_dir is not None:
            work_dir = args.work_dir
            work_dir.mkdir(parents=True, exist_ok=True)
        else:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-train-")))

        source = source_dataset(args, work_dir)
        repeat = args.repeat_body or (1 if args.dataset_dir is not None else 8)
        label2id = data.load_label2id(source)
        text_fields = train_options.Args().text_fields
        rows = {split: with_repeated_body(data.load_split(source, split, text_fields, len(label2id)), repeat) for split in data.SPLITS}
        if len(rows["train"]) < args.num_examples:
            raise InputError(f"--num_examples {args.num_examples}: the train split has only {len(rows['train'])} (raise --articles_per_category)")

        # The subset both measurements train on; tiny val/test, as the full loop evaluates every epoch.
        subset = work_dir / "bench-dataset"
        utils.save_jsonl(rows["train"][: args.num_examples], subset / "train.jsonl")
        for split in ("val", "test"):
            utils.save_jsonl(rows[split][: args.eval_examples], subset / f"{split}.jsonl")
        utils.save_json(label2id, subset / "label2id.json")

        model_name = model_folder(args, source, work_dir)
        train_argv = [
            "--model_name", model_name, "--dataset_dir", str(subset), "--output_root", str(work_dir / "outputs"),
            "--batch_size", str(args.batch_size), "--max_seq_len", str(args.max_seq_len), "--epochs", str(args.epochs),
            "--num_warmup_epochs", "1", "--device", args.device, "--dtype", args.dtype, "--num_workers", str(args.num_workers),
            "--seed", str(args.seed), "--tokenized_cache", "off", *(["--compile"] if args.compile else []),
        ]  # fmt: skip

        print(f"tokenising {len(rows['train'])} train examples ...", flush=True)
        examples, tokenised = measure_tokenisation(train_argv, rows["train"], source / "train.jsonl", label2id)
        examples = examples[: args.num_examples]  # the same ids as tokenising the subset alone (index = position)
        lengths = [len(e["input_ids"]) for e in examples]

        print(f"model-only: {args.warmup_steps} warm-up + {args.steps} timed steps ...", flush=True)
        model_only = in_fresh_process(measure_model_only, train_argv, examples, label2id, args.steps, args.warmup_steps)
        print(f"full loop: train.main for {args.epochs} epoch(s) ...", flush=True)
        full = in_fresh_process(measure_full_loop, train_argv)

        info = {
            "model": args.model_name or f"{args.model}, random weights (tests/tiny_bert.py)",
            "dataset": str(args.dataset_dir) if args.dataset_dir else f"fake corpus ({args.articles_per_category} articles/category)",
            "repeat_body": repeat,
            "num_examples": len(examples),
            "mean_tokens": sum(lengths) / len(lengths),
            "truncated": sum(n >= args.max_seq_len for n in lengths) / len(lengths),
        }
        print(report(args, info, tokenised, model_only, full))


if __name__ == "__main__":
    utils.run_cli(main, Args().parse_args())
