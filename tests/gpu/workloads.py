"""What tests/gpu/checks.py needs torch for, run in its own processes: the data and models, and bert-base's model-only rate.

    python tests/gpu/workloads.py setup WORK_DIR           # dataset, tiny models and a bert-base-sized model under WORK_DIR
    python tests/gpu/workloads.py model_only WORK_DIR      # bert-base steps on random ids (bf16, fused AdamW): one JSON line

No MeCab here: the GPU image has no fugashi/unidic-lite (too big to carry), so the models use tokenizers
built on the spot from the fixture corpus: a character BertTokenizer (WordPiece over single characters,
transformers' Rust-backed class) for the BERTs, and tests/tiny_models.py's tiny Llama (a byte-level BPE without a
pad token, as Llama's has none) for the LoRA check.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests"), str(REPO / "tests" / "benchmarks")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# cl-tohoku/bert-base-japanese-v3's config (its config.json on the hub): the shape measured, with random weights.
BERT_BASE = {"vocab_size": 32768, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "max_position_embeddings": 512, "type_vocab_size": 2}  # fmt: skip
BASE_SEQ_LEN = 512
BASE_BATCH = 32  # the batch size of the model-only and full-loop measurements (the rates compared)
BASE_TRAIN_DOCUMENTS = 2016  # 63 steps of 32 per epoch
BASE_EVAL_DOCUMENTS = 64
BODY_CHARS = (1800, 2600)  # livedoor-length bodies: every document fills 512 character tokens


# --- data -------------------------------------------------------------------------------------


def prepare_dataset(work_dir: Path) -> Path:
    """The fixture corpus (tests/fake_corpus.py) prepared by src/prepare.py, as the tests do."""
    import contextlib
    import io

    import prepare
    from fake_corpus import write_corpus

    corpus = write_corpus(work_dir / "text", 30)
    dataset_dir = work_dir / "dataset"
    with contextlib.redirect_stdout(io.StringIO()):
        prepare.main(prepare.Args().parse_args(["--input_dir", str(corpus), "--output_dir", str(dataset_dir)]))
    return dataset_dir


def long_dataset(dataset_dir: Path, output_dir: Path) -> Path:
    """BASE_TRAIN_DOCUMENTS train rows (and small val/test) with livedoor-length bodies, made of the corpus's own lines."""
    import utils

    rng = random.Random(0)
    rows = {split: utils.load_jsonl(dataset_dir / f"{split}.jsonl") for split in ("train", "val", "test")}
    lines = [line for row in rows["train"] for line in row["body"].split("\n") if line]

    def lengthen(row: dict, i: int) -> dict:
        target, parts = rng.randint(*BODY_CHARS), [row["body"]]
        while sum(map(len, parts)) < target:
            parts.append(rng.choice(lines))
        return {**row, "id": f"{row['id']}-{i}", "body": "\n".join(parts)}

    sizes = {"train": BASE_TRAIN_DOCUMENTS, "val": BASE_EVAL_DOCUMENTS, "test": BASE_EVAL_DOCUMENTS}
    for split, size in sizes.items():
        source = rows[split]
        utils.save_jsonl((lengthen(source[i % len(source)], i) for i in range(size)), output_dir / f"{split}.jsonl")
    (output_dir / "label2id.json").write_bytes((dataset_dir / "label2id.json").read_bytes())
    return output_dir


# --- models -----------------------------------------------------------------------------------


def char_vocab(texts: list[str], size: int | None = None) -> list[str]:
    """Special tokens, every character alone and as ##continuation; padded with [unused] entries to `size`."""
    chars = sorted({char for text in texts for char in text if not char.isspace()})
    vocab = SPECIAL_TOKENS + chars + [f"##{char}" for char in chars]
    if size is not None:
        if len(vocab) > size:
            raise ValueError(f"{len(vocab)} character entries do not fit a vocabulary of {size}")
        vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    return vocab


def check_no_unknown(tokenizer, texts: list[str]) -> None:
    """The tokenizer knows every character of the corpus: a model that sees only unknown tokens would check nothing."""
    ids = tokenizer(texts[:50], add_special_tokens=False)["input_ids"]
    unknown = sum(row.count(tokenizer.unk_token_id) for row in ids)
    if unknown or len(tokenizer) < 10:
        raise RuntimeError(f"{type(tokenizer).__name__} ({len(tokenizer)} tokens) maps {unknown} tokens of the corpus to {tokenizer.unk_token}")


def build_char_bert(texts: list[str], output_dir: Path, sizes: dict, seed: int = 0) -> Path:
    """A BertModel with random weights and a character BertTokenizer, saved like a hub checkpoint."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    output_dir.mkdir(parents=True, exist_ok=True)
    # Loaded from hub-style files, as tests/tiny_models.py does (BertTokenizer's constructor arguments differ between transformers versions).
    (output_dir / "vocab.txt").write_text("\n".join(char_vocab(texts, sizes.get("vocab_size"))) + "\n", encoding="utf-8")
    tokenizer_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": False, "model_max_length": 512}
    (output_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    check_no_unknown(tokenizer, texts)
    tokenizer.save_pretrained(output_dir)
    config = BertConfig(**{"max_position_embeddings": 512, "type_vocab_size": 2, **sizes, "vocab_size": sizes.get("vocab_size", len(tokenizer))})
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(output_dir)
    return output_dir


def setup(work_dir: Path) -> dict:
    """Everything the checks read, under work_dir; returns their paths (also written to work_dir/setup.json)."""
    from tiny_bert import read_texts  # titles and bodies of train.jsonl (no MeCab needed)
    from tiny_models import build_tiny_model  # its decoders need no MeCab either
    from transformers.utils import logging

    logging.disable_progress_bar()
    start = time.perf_counter()
    dataset_dir = prepare_dataset(work_dir)
    texts = read_texts(dataset_dir)
    long_dir = long_dataset(dataset_dir, work_dir / "dataset-long")
    paths = {
        "dataset": str(dataset_dir),
        "tiny_bert": str(build_char_bert(texts, work_dir / "models" / "tiny-char-bert", {"hidden_size": 32, "num_hidden_layers": 2,
                                                                                          "num_attention_heads": 2, "intermediate_size": 128})),
        "tiny_decoder": str(build_tiny_model("llama", texts, work_dir / "models" / "tiny-llama")),  # BPE, no pad token
        "long_dataset": str(long_dir),
        "bert_base": str(build_char_bert(read_texts(long_dir), work_dir / "models" / "bert-base-sized", BERT_BASE)),
    }  # fmt: skip
    (work_dir / "setup.json").write_text(json.dumps(paths, indent=1), encoding="utf-8")
    print(f"setup: {json.dumps(paths)} in {time.perf_counter() - start:.1f} s")
    return paths


# --- bert-base throughput ---------------------------------------------------------------------


def flops_per_token(model, seq_len: int) -> float:
    """Matrix-product FLOPs of one token's forward and backward: 6 x non-embedding parameters + attention (12 x layers x seq_len x hidden)."""
    import torch

    embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters(recurse=False))
    params = sum(p.numel() for p in model.parameters()) - embedding
    config = model.config
    return 6 * params + 12 * config.num_hidden_layers * seq_len * config.hidden_size


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 tensor-core peak of the device (bench_train.PEAK_TFLOPS), FLOP/s."""
    from bench_train import peak_tflops

    peak = peak_tflops(device_name)
    return None if peak is None else peak * 1e12


# Steps compared by model_only: (optimizer, train.py's own step functions, when the step's loss is read).
STEP_KINDS = {
    "fused": ("fused", False, None),  # the model alone: forward, backward, fused AdamW
    "foreach": ("foreach", False, None),  # the same with AdamW's foreach kernels (train.py before fused)
    "train_step_read_at_once": ("fused", True, "at once"),  # train.py's step (collate, pinned copy, clipping, schedule), loss read at once
    "train_step": ("fused", True, "a step later"),  # train.py's step as its loop runs it: the loss read once the next step is queued
}


def model_only(work_dir: Path, steps: int = 30, warmup: int = 5, device_name: str = "cuda", batch: int = BASE_BATCH, seq_len: int = BASE_SEQ_LEN) -> dict:
    """bert-base training steps on random ids (bf16 autocast, fp32 loss), in the ways of STEP_KINDS: where the loop's time goes.

    The model-only rates ("fused", "foreach") are what train.py's loop is measured against; the two
    train_step rates add its data path and step functions (train.accumulate_gradients, optimizer_step,
    step_stats, read_step) on the same random ids, so that the gap splits into the step itself and the
    device sync of reading each loss at once. The device, batch and length are parameters only so that
    the function can be tried on a CPU at a tiny size.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification

    import data
    import train

    paths = json.loads((work_dir / "setup.json").read_text(encoding="utf-8"))
    device = torch.device(device_name, 0) if device_name == "cuda" else torch.device(device_name)
    torch.set_float32_matmul_precision("high")  # as train.py
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda _: None
    results: dict = {"device_name": name, "batch": batch, "seq_len": seq_len, "steps": steps}
    for kind, (optimizer_kind, train_steps, read) in STEP_KINDS.items():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(paths["bert_base"], num_labels=9).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, **{optimizer_kind: True})
        generator = torch.Generator().manual_seed(0)
        examples = [
            {"input_ids": torch.randint(5, model.config.vocab_size, (seq_len,), generator=generator).tolist(), "token_type_ids": [0] * seq_len,
             "label": i % 9, "index": i}
            for i in range(4 * batch)
        ]  # fmt: skip
        pad = partial(data.collate, pad_token_id=0, num_labels=9)
        if train_steps:  # from lists through train.py's collate and a pinned copy, as its DataLoader hands them over
            loader = DataLoader(examples, batch_size=batch, collate_fn=pad, pin_memory=device.type == "cuda")
            batches = lambda: iter(loader)  # noqa: E731
        else:  # on the device already
            resident = [{k: v.to(device) for k, v in pad(examples[i : i + batch]).items() if k != "index"} for i in range(0, len(examples), batch)]
            batches = lambda: iter(resident)  # noqa: E731
        autocast = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
        scheduler = train.linear_schedule(optimizer, 10, 10 * (steps + warmup))
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        pending = None

        def step(window: dict) -> None:
            nonlocal pending
            if train_steps:
                examples_in, tokens_in = train.window_counts([window])
                loss = train.accumulate_gradients(model, [window], examples_in, device, autocast, scaler, 1)
                stats = train.step_stats(loss, examples_in, tokens_in, 1)
                if read == "at once":
                    train.read_step(stats, (0.0, 0, 0), 1, torch.bfloat16)
                train.optimizer_step(model, optimizer, scheduler, scaler, 1.0)
                if read == "a step later" and pending is not None:
                    train.read_step(pending, (0.0, 0, 0), 1, torch.bfloat16)
                pending = stats
                return
            inputs = {k: v for k, v in window.items() if k != "labels"}
            with autocast():
                logits = model(**inputs).logits
            F.cross_entropy(logits.float(), window["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def run(count: int) -> None:
            done = 0
            while done < count:
                for window in batches():
                    if done == count:
                        break
                    step(window)
                    done += 1

        run(warmup)
        synchronize(device)
        start = time.perf_counter()
        run(steps)
        synchronize(device)
        seconds = time.perf_counter() - start
        results[kind] = {"tokens_per_s": steps * batch * seq_len / seconds, "step_ms": seconds / steps * 1e3}
        results["flops_per_token"] = flops_per_token(model, seq_len)
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak = peak_flops(name)
    results["peak_flops"] = peak
    for kind in STEP_KINDS:
        results[kind]["mfu"] = results["flops_per_token"] * results[kind]["tokens_per_s"] / peak if peak else math.nan
    return results


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "setup":
        setup(folder)
    elif command == "model_only":
        print("RESULT " + json.dumps(model_only(folder)))
    else:
        sys.exit(f"unknown command {command!r}: setup or model_only")
