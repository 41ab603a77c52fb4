"""What does LoRA save? Step time and optimizer state of LoRA against full fine-tuning, same model.

    poetry run python tests/benchmarks/bench_lora.py                                  # Llama, hidden 256, 4 layers, on CPU
    poetry run python tests/benchmarks/bench_lora.py --hidden_size 512 --num_layers 8 --lora_r 32

A benchmark, not a test (pytest does not collect it). One random Llama-architecture decoder
(tests/tiny_models.py, its BPE tokenizer trained on a generated livedoor-format corpus) is
trained on the same batches by AdamW in two ways that take turns step by step (the machine is
noisy): every weight (full), and LoRA adapters on the Linear layers of its blocks plus the head
(lora.apply_lora, as train.py --lora_r). The table shows the trainable parameters, AdamW's state
(exp_avg and exp_avg_sq, measured from the optimizer's tensors after the first step), and the median
time of a training step (forward, backward, optimizer step) with its ratio.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import bench_env  # noqa: F401 (first: src/ and tests/ on the path, the environment set)

import torch  # noqa: E402
from tap import Tap  # noqa: E402

import data  # noqa: E402
import lora  # noqa: E402
import modeling  # noqa: E402
from fake_corpus import write_corpus  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402


class Args(Tap):
    hidden_size: int = 256  # width of the random Llama
    num_layers: int = 4  # its blocks
    lora_r: int = 16  # LoRA rank
    batch_size: int = 8  # examples per step
    seq_len: int = 128  # tokens per example (the corpus' texts, cut)
    steps: int = 10  # timed steps per way, after one warm-up step each
    threads: int = 0  # torch threads (0: torch's default)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        corpus = write_corpus(Path(tmp) / "text", 20)
        texts = [path.read_text(encoding="utf-8") for path in sorted(corpus.glob("*/*-*.txt"))]
        model_dir = build_tiny_model("llama", texts, Path(tmp) / "llama", args.hidden_size, args.num_layers)
        tokenizer, full = modeling.load_model(str(model_dir), {f"c{i}": i for i in range(9)})
    ids = [tokenizer(text)["input_ids"][: args.seq_len] for text in texts]
    batches = [
        data.collate([{"input_ids": row, "label": i % 9, "index": i} for i, row in enumerate(ids[start : start + args.batch_size])], tokenizer.pad_token_id)
        for start in range(0, args.batch_size * (args.steps + 1), args.batch_size)
    ]
    adapted, summary = lora.apply_lora(copy.deepcopy(full), lora.LoraSettings(r=args.lora_r))
    ways = {"full": full.train(), "lora": adapted.train()}
    optimizers = {name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4) for name, model in ways.items()}

    def step(name: str, batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
        loss = torch.nn.functional.cross_entropy(ways[name](**inputs).logits, batch["labels"])
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in ways}
    for name in ways:
        step(name, batches[0])  # warm-up; creates AdamW's state
    for batch in batches[1:]:
        for name in ways:
            times[name].append(step(name, batch))

    print(f"Llama hidden {args.hidden_size}, {args.num_layers} layers, vocabulary {len(tokenizer)}; batch {args.batch_size} x {args.seq_len} tokens; "
          f"{torch.get_num_threads()} threads, {args.steps} steps each, taking turns")  # fmt: skip
    print(summary)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{'':6} {'trainable params':>17} {'AdamW state':>12} {'step (median)':>14} {'vs full':>8}")
    for name, model in ways.items():
        trainable, total, _ = lora.trainable_share(model)
        state = optimizer_state_bytes(optimizers[name])
        print(
            f"{name:6} {trainable:>17,} {state / 2**20:>9.2f} MiB {medians[name] * 1000:>11.1f} ms {medians[name] / medians['full']:>7.2f}x"
        )
    print(f"AdamW state, full / lora: {optimizer_state_bytes(optimizers['full']) / optimizer_state_bytes(optimizers['lora']):.1f}x")


if __name__ == "__main__":
    main(Args().parse_args())
