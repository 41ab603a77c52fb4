"""How big is train.py's per-epoch checkpoint (RUN_DIR/checkpoint.pt), and how long does writing it take?

    poetry run python tests/benchmarks/bench_checkpoint.py                 # bert-base-japanese-v3 and luke-japanese-large-lite
    poetry run python tests/benchmarks/bench_checkpoint.py --models bert-base

A benchmark, not a test (pytest does not collect it). Each model is built from its published config
(written out below: no download, random weights, a 9-label head), its unreachable parameters frozen as
train.py freezes them (LUKE's entity-aware queries), AdamW given its two moments by one step, and the
checkpoint of a 20-epoch run assembled by runs.checkpoint_state (the best weights by train.clone_state) and
written by runs.save_checkpoint, exactly as train.py writes it at the end of an epoch. It prints the parameter counts, the file size and the write
time (with the fsync, on the disk of --output_dir), then deletes the file. Needs about 4.5x the model's fp32
size in memory (luke-large: ~7.5 GB).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Literal

import bench_env  # noqa: F401 (first: src/ and tests/ on the path, the environment set)

import torch  # noqa: E402
from tap import Tap  # noqa: E402
from transformers import AutoModelForSequenceClassification, BertConfig, LukeConfig, PretrainedConfig  # noqa: E402

import modeling  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402 (its clone_state and linear_schedule: the best weights and the schedule as a run keeps them)

# The configs of the hub models (as their config.json files have them), for the sizes alone.
CONFIGS: dict[str, tuple[str, PretrainedConfig]] = {
    "bert-base": (
        "cl-tohoku/bert-base-japanese-v3",
        BertConfig(
            vocab_size=32768, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=512, type_vocab_size=2,
        ),
    ),
    "luke-large": (
        "studio-ousia/luke-japanese-large-lite",
        LukeConfig(
            vocab_size=32772, entity_vocab_size=4, entity_emb_size=256, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1, use_entity_aware_attention=True, layer_norm_eps=1e-5,
            pad_token_id=1, bos_token_id=0, eos_token_id=2,
        ),
    ),
}  # fmt: skip
# The same architectures at toy sizes, for the benchmark's smoke test.
CONFIGS["tiny-bert"] = ("tiny BERT", BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
CONFIGS["tiny-luke"] = (
    "tiny LUKE",
    LukeConfig(
        vocab_size=500, entity_vocab_size=4, entity_emb_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=66, type_vocab_size=1, use_entity_aware_attention=True, pad_token_id=1,
    ),
)  # fmt: skip


class Args(Tap):
    models: list[Literal["bert-base", "luke-large", "tiny-bert", "tiny-luke"]] = ["bert-base", "luke-large"]  # the models measured
    output_dir: Path | None = None  # where the checkpoint is written (and deleted); default: a temporary folder
    epochs: int = 20  # log rows in the checkpoint (the default run's 20 epochs + epoch 0)


def measure(config: PretrainedConfig, output_dir: Path, epochs: int) -> dict[str, float]:
    config.num_labels = 9
    model = AutoModelForSequenceClassification.from_config(config)
    batch = {"input_ids": torch.randint(5, min(1000, config.vocab_size), (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    if config.type_vocab_size > 1:
        batch["token_type_ids"] = torch.zeros(2, 16, dtype=torch.long)
    modeling.freeze_unreachable(model, batch, torch.device("cpu"))
    groups, _ = modeling.param_groups(model, 0.01)
    optimizer = torch.optim.AdamW(groups, lr=3e-5)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's exp_avg and exp_avg_sq for every trainable parameter
    optimizer.zero_grad(set_to_none=True)
    scheduler = train.linear_schedule(optimizer, 2, epochs)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    best = train.clone_state(model)
    rows = [{"epoch": e, "train_loss": 0.5, "loss": 0.5, "accuracy": 0.9, "precision": 0.9, "recall": 0.9, "f1": 0.9, "lr": 3e-5,
             "seconds": 60.0, "examples_per_s": 100.0, "tokens_per_s": 50000.0} for e in range(epochs + 1)]  # fmt: skip
    state = runs.checkpoint_state(epochs, model, optimizer, scheduler, scaler, 3, 0.9, best, rows, [runs.rng_state(torch.device("cpu"))])
    start = time.perf_counter()
    runs.save_checkpoint(output_dir, state)
    seconds = time.perf_counter() - start
    path = output_dir / runs.CHECKPOINT
    size = path.stat().st_size
    path.unlink()
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "encoder": modeling.count_encoder_params(model),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "bytes": size,
        "seconds": seconds,
    }


def main(args: Args) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        output_dir = args.output_dir or Path(tmp)
        output_dir.mkdir(parents=True, exist_ok=True)
        print(f"== bench_checkpoint == torch {torch.__version__}, written to {output_dir}")
        print(f"{'model':<40} {'params':>13} {'trainable':>13} {'checkpoint.pt bytes':>19} {'GB':>6} {'bytes/param':>11} {'write s':>8}")
        results = {}
        for name in args.models:
            hub_name, config = CONFIGS[name]
            m = results[name] = measure(config, output_dir, args.epochs)
            print(
                f"{hub_name:<40} {m['params']:>13,} {m['trainable']:>13,} {m['bytes']:>19,} {m['bytes'] / 1e9:>6.2f} "
                f"{m['bytes'] / m['params']:>11.1f} {m['seconds']:>8.1f}",
                flush=True,
            )
    return results


if __name__ == "__main__":
    main(Args().parse_args())
