"""What does LUKE's fix under DDP cost? Freezing unreachable parameters vs DDP's find_unused_parameters.

    poetry run python tests/benchmarks/bench_unused.py                     # hidden 128, 2 layers, on CPU
    poetry run python tests/benchmarks/bench_unused.py --hidden_size 768 --num_layers 12 --steps 5

A benchmark, not a test (pytest does not collect it). In one process (a 1-process gloo group, so that
DDP's own bookkeeping is all that differs), for a BERT and a LUKE of the same size built by
tests/tiny_models.py, it times training steps (forward, backward with DDP's all-reduce, AdamW step)
on the same batches with:

- plain: DDP as before the fix (no probe): BERT only, since LUKE stops at its second step this way,
  even in a 1-process group ("Expected to have finished reduction in the prior iteration");
- frozen: modeling.freeze_unreachable's probe step once, then DDP as before (what train.py does);
- find_unused: DDP(find_unused_parameters=True), which searches the autograd graph every step.

The strategies take turns step by step (the machine is noisy), and the table shows median step times
and their ratio to the fix (frozen), plus the one-off cost of the probe.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import bench_env  # noqa: F401 (first: src/ and tests/ on the path, the environment set)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tap import Tap  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import data  # noqa: E402
import modeling  # noqa: E402
import prepare  # noqa: E402
import utils  # noqa: E402
from fake_corpus import write_corpus  # noqa: E402
from tiny_models import build_tiny_model, read_texts  # noqa: E402


class Args(Tap):
    hidden_size: int = 128  # width of both models
    num_layers: int = 2  # transformer layers of both models
    batch_size: int = 8  # examples per step
    max_seq_len: int = 128  # tokens per example
    steps: int = 10  # timed steps per strategy (after 2 untimed warm-up steps)
    threads: int = 1  # torch CPU threads (1: steadier figures on a shared machine)


def batches(model_dir: Path, dataset_dir: Path, args: Args) -> list[dict[str, torch.Tensor]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = utils.load_jsonl(dataset_dir / "train.jsonl")[: args.batch_size * (args.steps + 2)]
    encoded = tokenizer([r["title"] for r in rows], [r["body"] for r in rows], truncation="only_second", max_length=args.max_seq_len)
    examples = [{"input_ids": ids, "label": r["label"], "index": i} for i, (ids, r) in enumerate(zip(encoded["input_ids"], rows))]
    return [data.collate(examples[i : i + args.batch_size], tokenizer.pad_token_id) for i in range(0, len(examples), args.batch_size)]


def make_ddp(model_dir: Path, strategy: str, probe_batch: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, torch.optim.Optimizer, float]:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=9).train()
    start = time.perf_counter()
    if strategy == "frozen":
        modeling.freeze_unreachable(model, probe_batch, torch.device("cpu"))
    probe_seconds = time.perf_counter() - start
    ddp = DistributedDataParallel(model, find_unused_parameters=strategy == "find_unused")
    groups, _ = modeling.param_groups(model, 0.01)
    return ddp, torch.optim.AdamW(groups, lr=1e-4), probe_seconds


def step(ddp: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
    loss = torch.nn.functional.cross_entropy(ddp(**inputs).logits, batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_corpus(root / "text", 10)
        prepare.main(prepare.Args().parse_args(["--input_dir", str(corpus), "--output_dir", str(root / "data")]))
        texts = read_texts(root / "data")
        print(f"\n{args.hidden_size} hidden, {args.num_layers} layers, batch {args.batch_size} x {args.max_seq_len} tokens, "
              f"{args.steps} timed steps, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
        print(f"{'model':<9} {'strategy':<12} {'step ms':>9} {'vs frozen':>9} {'probe ms':>9}")
        for family in ("bert-word", "luke"):
            model_dir = build_tiny_model(family, texts, root / family, args.hidden_size, args.num_layers)
            step_batches = batches(model_dir, root / "data", args)
            names = ("plain", "frozen", "find_unused") if family == "bert-word" else ("frozen", "find_unused")
            strategies = {name: make_ddp(model_dir, name, step_batches[0]) for name in names}
            times: dict[str, list[float]] = {name: [] for name in strategies}
            for i, batch in enumerate(step_batches):
                for name, (ddp, optimizer, _) in strategies.items():
                    seconds = step(ddp, optimizer, batch)
                    if i >= 2:
                        times[name].append(seconds)
            frozen = statistics.median(times["frozen"])
            for name, (_, _, probe_seconds) in strategies.items():
                median = statistics.median(times[name])
                probe = f"{probe_seconds * 1000:9.1f}" if name == "frozen" else f"{'':>9}"
                print(f"{family:<9} {name:<12} {median * 1000:9.1f} {median / frozen:9.3f} {probe}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Args().parse_args())
