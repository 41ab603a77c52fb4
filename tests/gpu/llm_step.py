"""One real-size LoRA training step of a decoder LLM from random weights: memory and tokens/s (issue: LLM + LoRA).

    python tests/gpu/llm_step.py                       # a Qwen2.5-1.5B-shaped model on cuda, bf16 base, LoRA r 32
    python tests/gpu/llm_step.py --size tiny --device cpu   # the same code at a toy size, to try it without a GPU

The model is built from a config (no download), wrapped by src/lora.py exactly as train.py does (adapters on the
Linear layers of the blocks, head in full, trainable weights in fp32), with gradient checkpointing as
`sweep.py --preset llm` uses it, and trained with AdamW under bf16 autocast on random ids. Prints one RESULT line (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
import lora  # noqa: E402

# Qwen2.5-1.5B's shape (its config.json); "tiny" keeps the structure at a size a CPU runs in seconds.
SIZES = {
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960, vocab_size=151936),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=1000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1.5b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    device = torch.device(args.device)
    config = Qwen2Config(**SIZES[args.size], num_labels=9, pad_token_id=0, tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()  # a frozen base: checkpointed blocks need an input that requires grad
    model, summary = lora.apply_lora(model, lora.LoraSettings(r=32, alpha=16, dropout=0.1))
    trainable, total, share = lora.trainable_share(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    model.train()
    ids = torch.randint(5, config.vocab_size, (args.batch, args.seq_len), device=device)
    labels = torch.randint(0, 9, (args.batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: kernels chosen, optimizer state allocated
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    result = {
        "size": args.size, "params": total, "trainable": trainable, "batch": args.batch, "seq_len": args.seq_len,
        "step_s": seconds, "tokens_per_s": args.batch * args.seq_len / seconds, "adamw_state_mib": state / 2**20,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "lora": summary.split(" (")[0], "share": share,
    }  # fmt: skip
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
