"""Stage 3: fine-tune a pretrained encoder on a prepared dataset and write one run folder.

    poetry run python src/train.py [--model_name cl-tohoku/bert-base-japanese-v3] [--lr 3e-5] ...
    torchrun --nproc_per_node 2 src/train.py ...      # several GPUs (or CPU processes) with DDP

The run folder OUTPUT_ROOT/<model>/<YYYY-MM-DD>/<HH-MM-SS.ffffff>/ receives, in this order:
config.json (at the start), log.csv (a row per evaluation), val-metrics.json, test-predictions.jsonl,
test-per-class.csv, test-confusion-matrix.csv, the figures curves.png and test-confusion-matrix.png,
model/ (with --save_model), and test-metrics.json last: its presence means the run finished.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from datetime import datetime
from functools import partial, wraps
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from more_itertools import chunked
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from tap import Tap
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm, trange
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.optimization import get_linear_schedule_with_warmup

import plot
import tokenization
import utils
from utils import InputError

SPLITS = ("train", "val", "test")


class Args(Tap):
    model_name: str = "cl-tohoku/bert-base-japanese-v3"  # hub name or local folder that AutoModelForSequenceClassification can load
    dataset_dir: Path = Path("datasets/livedoor")  # {train,val,test}.jsonl + label2id.json, as prepare.py writes them
    output_root: Path = Path("outputs")  # runs go to OUTPUT_ROOT/<model>/<YYYY-MM-DD>/<HH-MM-SS.ffffff>/
    text_fields: list[str] = ["title", "body"]  # JSONL fields fed to the model: one text, or a pair whose last field alone is truncated

    batch_size: int = 16  # examples per optimizer step on each device, before accumulation
    eval_batch_size: int = 32  # examples per forward pass in evaluation
    epochs: int = 20  # passes over the training set
    lr: float = 3e-5  # peak learning rate of AdamW
    num_warmup_epochs: int = 2  # epochs of linear warm-up; the learning rate then decays linearly to 0 (longer than --epochs: the peak --lr is never reached)
    max_seq_len: int = 512  # tokens per example, [CLS] and [SEP]s included
    weight_decay: float = 0.01  # AdamW weight decay for matrices (biases and norm weights get none)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (effective batch = batch_size x this x devices)
    max_grad_norm: float = 0.0  # clip the gradient norm to this; 0 (the default, as in the reference): no clipping
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30%% slower

    device: str = "auto"  # auto (cuda, else mps, else cpu), or a torch device such as cpu, cuda:1, mps
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast precision; auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU/MPS
    compile: bool = False  # torch.compile the model (dynamic shapes); off by default: no gain measured on CPU
    num_workers: int = 0  # processes that tokenise the dataset (0: one per CPU core this process may use, shared among torchrun processes, at most 8)
    slow_tokenizer: bool = False  # tokenise with the tokenizer's own transformers code even where the fast MeCab + WordPiece path applies (same ids)
    tokenized_cache: Literal["on", "off"] = "on"  # on: read the tokenised splits from --tokenized_cache_dir, or tokenise and store them there; off: tokenise every run
    tokenized_cache_dir: Path = Path("cache/tokenized")  # tokenised splits shared by runs and torchrun ranks, keyed by tokenizer, dataset and input layout (safe to delete)
    seed: int = 42  # seed of the model's new head, the shuffling and dropout
    save_model: bool = False  # also save the best model and its tokenizer to RUN_DIR/model (safetensors)
    reinit_head: bool = False  # a checkpoint with a classification head of another size (e.g. a fine-tuned 2-class model): replace that head with a new, random one (printed) instead of refusing

    def process_args(self) -> None:
        for name in ("batch_size", "eval_batch_size", "epochs", "max_seq_len", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                self.error(f"--{name} must be at least 1")
        if not 1 <= len(self.text_fields) <= 2:
            self.error("--text_fields takes one field (a single text) or two (a pair)")
        if self.num_warmup_epochs < 0:
            self.error("--num_warmup_epochs cannot be negative")
        if self.max_grad_norm < 0:
            self.error("--max_grad_norm cannot be negative (0 disables clipping)")


# --- data -------------------------------------------------------------------------------------


def load_split(dataset_dir: Path, split: str, text_fields: Sequence[str], num_labels: int) -> list[dict]:
    """Rows of SPLIT.jsonl, checked: every row has an id, the text fields as strings and a known label."""
    path = dataset_dir / f"{split}.jsonl"
    if not path.is_file():
        raise InputError(f"{path} not found: run `poetry run python src/prepare.py` first (or see README for other datasets)")
    rows = utils.load_jsonl(path)
    if not rows:
        raise InputError(f"{path} is empty")
    utils.check_rows(rows, text_fields, str(path), other_fields=("id", "label"))
    for line_no, row in enumerate(rows, start=1):
        # bool is an int in Python, but true is not label 1.
        if isinstance(row["label"], bool) or not isinstance(row["label"], int) or not 0 <= row["label"] < num_labels:
            raise InputError(f"{path}: line {line_no}: label {utils.to_json(row['label'])} is not an id of label2id.json (0-{num_labels - 1})")
    return rows


def load_label2id(dataset_dir: Path) -> dict[str, int]:
    path = dataset_dir / "label2id.json"
    if not path.is_file():
        raise InputError(f"{path} not found: run `poetry run python src/prepare.py` first (or see README for other datasets)")
    label2id = utils.load_json(path)
    if sorted(label2id.values()) != list(range(len(label2id))):
        raise InputError(f"{path}: ids must be 0..{len(label2id) - 1}, got {sorted(label2id.values())}")
    return label2id


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this batch only."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {}
    for key, pad in (("input_ids", pad_token_id), ("token_type_ids", 0)):
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] + [pad] * (length - len(e[key])) for e in examples])
    batch["attention_mask"] = torch.tensor([[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"])) for e in examples])
    batch["labels"] = torch.tensor([e["label"] for e in examples])
    batch["index"] = torch.tensor([e["index"] for e in examples])
    return batch


# --- model and optimiser ----------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine; use --device auto or cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise InputError(f"--device {name}: Apple MPS is not available on this machine; use --device auto or cpu")
        if device.type == "cuda" and device.index is None:  # under torchrun, one GPU per process
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA GPUs that support it, fp16 on older ones, fp32 elsewhere (bf16 is slower on CPUs)."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("--dtype bf16: this GPU has no bfloat16 support; use --dtype fp16 (or auto)")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# What building a tokenizer or model raises besides OSError (files): an unknown model type, a
# tokenizer that cannot be constructed, a missing optional package, weights that do not fit.
LOAD_ERRORS = (ValueError, ImportError, KeyError, RuntimeError)


def load_model(model_name: str, label2id: dict[str, int], reinit_head: bool = False) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and the model with a classification head of len(label2id) outputs.

    Any failure to build either (a missing folder, an unknown model type, a tokenizer that cannot be
    constructed, a missing optional package) is an InputError in one line. A checkpoint whose head
    has another number of labels is refused unless `reinit_head`, which replaces that head.
    """
    id2label = {i: label for label, i in label2id.items()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        # Mismatched sizes are reported, not raised, so that they can be judged below by what they are.
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            model_name, num_labels=len(label2id), id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=True, output_loading_info=True,
        )  # fmt: skip
    except OSError as e:
        raise InputError(
            f"cannot load model {model_name!r} ({utils.first_line(e)}). Without network access, only models already "
            f"in the Hugging Face cache load; or pass a local folder saved with save_pretrained: --model_name path/to/model"
        ) from None
    except LOAD_ERRORS as e:
        raise InputError(f"cannot load the tokenizer or model of {model_name!r}: {type(e).__name__}: {utils.first_line(e)}") from None
    check_head(model, sorted(loading["mismatched_keys"]), model_name, reinit_head)
    return tokenizer, model


def count_encoder_params(model: PreTrainedModel) -> int:
    """Parameters of the encoder alone, as AutoModel loads it: the reference's Params column.

    No classification head, but the pooler that some heads leave out of model.base_model
    (XLM-R's: 559 M with it, 558 M without). Built from the config on the meta device, so no
    memory is used and no weights are read; an architecture AutoModel does not know falls back
    to model.base_model.
    """
    try:
        with torch.device("meta"):
            encoder = AutoModel.from_config(model.config)
    except (ValueError, KeyError):
        encoder = model.base_model
    return sum(p.numel() for p in encoder.parameters())


def check_head(model: PreTrainedModel, mismatched: list[tuple[str, torch.Size, torch.Size]], model_name: str, reinit_head: bool) -> None:
    """A checkpoint's weights that do not fit the new model: only a head (outside the encoder) may be replaced, and only on request."""
    shapes = ", ".join(f"{key} {list(old)} -> {list(new)}" for key, old, new in mismatched)
    encoder = [key for key, _, _ in mismatched if key.startswith(f"{model.base_model_prefix}.")]
    if encoder:
        raise InputError(f"{model_name}: encoder weights do not fit its own config ({shapes}): the checkpoint is inconsistent")
    if mismatched and not reinit_head:
        raise InputError(
            f"{model_name} already has a classification head of another size ({shapes} for {model.config.num_labels} labels): "
            f"pass --reinit_head to replace it with a new, randomly initialised head, or start from its base model"
        )
    if mismatched:
        log(f"--reinit_head: re-initialised the classification head of {model_name}: {shapes}")
    elif reinit_head:
        log(f"--reinit_head: the head of {model_name} already fits {model.config.num_labels} labels (or is new): nothing replaced")


def position_limit(model: torch.nn.Module) -> int | None:
    """Tokens the model's absolute position tables can index; None for rotary or relative positions (no table).

    RoBERTa-like tables (XLM-R, LUKE) number positions from padding_idx + 1, so 514 rows hold 512 tokens.
    """
    limits = [
        module.num_embeddings - (module.padding_idx + 1 if module.padding_idx is not None else 0)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Embedding) and name.endswith("position_embeddings")
    ]
    return min(limits, default=None)


def check_max_seq_len(max_seq_len: int, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_name: str) -> str:
    """Refuse a --max_seq_len beyond the position table; for other models, say how far they were trained."""
    limit = position_limit(model)
    if limit is not None:
        if max_seq_len > limit:
            raise InputError(
                f"--max_seq_len {max_seq_len} is longer than {model_name} takes: its position embeddings hold {limit} tokens; "
                f"use --max_seq_len {limit} or less"
            )
        return f"positions: absolute, at most {limit} tokens"
    trained = min(getattr(model.config, "max_position_embeddings", None) or math.inf, tokenizer.model_max_length)
    if max_seq_len > trained:
        return f"positions: rotary or relative (no table); --max_seq_len {max_seq_len} is beyond the {trained} tokens it was trained with"
    return "positions: rotary or relative (no table)" + (f", trained up to {trained} tokens" if math.isfinite(trained) else "")


def freeze_unreachable(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> list[str]:
    """Freeze the parameters that inputs of this layout never reach; return their names.

    A probe forward and backward on one batch: a parameter left without a gradient (LUKE's entity
    embeddings, with text-only input) can never get one in training either. DDP waits for a
    gradient of every trainable parameter, so it would stop at the second step; frozen, they are
    out of DDP and of the optimizer, and no per-step search for unused parameters is needed.
    Run in eval mode (no dropout), so the random number streams of training stay as they were.
    """
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    inputs = {key: value.to(device) for key, value in batch.items() if key not in ("labels", "index")}
    model(**inputs).logits.float().sum().backward()
    unreachable = [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    for _, p in unreachable:
        p.requires_grad_(False)
    model.train(was_training)
    return [name for name, _ in unreachable]


def param_groups(model: torch.nn.Module, weight_decay: float) -> tuple[list[dict], str]:
    """Decay matrices only: biases and LayerNorm weights (every tensor with fewer than 2 dims) get none.

    A structural rule, so it holds for any architecture and for compiled or wrapped models,
    where the reference's name list never matched.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    summary = (
        f"weight decay {weight_decay} on {len(decay)} tensors ({sum(p.numel() for p in decay):,} parameters); "
        f"none on {len(no_decay)} tensors ({sum(p.numel() for p in no_decay):,} parameters: biases and norms)"
    )
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], summary


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights, so the best epoch costs no accelerator memory."""
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


def window_counts(window: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """Examples and real (non-padding) tokens in the micro-batches of one optimizer step."""
    return sum(len(b["labels"]) for b in window), sum(int(b["attention_mask"].sum()) for b in window)


def accumulate_gradients(
    train_model: torch.nn.Module, window: list[dict[str, torch.Tensor]], window_size: int, device: torch.device,
    autocast: Any, scaler: torch.amp.GradScaler, world_size: int,
) -> torch.Tensor:
    """Forward and backward over the micro-batches of one optimizer step; return their summed loss.

    Each loss is divided by the example count of the whole window (`window_size`, over all its
    micro-batches), so every example weighs the same whatever the micro-batch sizes: the gradient
    equals that of one batch of the window.
    """
    total = torch.zeros((), device=device)
    for i, batch in enumerate(window):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}  # all at once, before the forward
        labels = batch.pop("labels")
        del batch["index"]
        # Under DDP, gradients are all-reduced once per step: on the last micro-batch only.
        sync = world_size == 1 or i == len(window) - 1
        with nullcontext() if sync else train_model.no_sync():
            with autocast():  # the forward pass only; the loss is computed in fp32
                logits = train_model(**batch).logits
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            scaler.scale(loss / window_size).backward()
        total += loss.detach()
    return total


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler, max_grad_norm: float,
) -> None:
    """Clip the (unscaled) gradients, step (skipped by the fp16 scaler on inf/NaN), clear, advance the schedule."""
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


# --- evaluation -------------------------------------------------------------------------------


def compute_metrics(labels: Sequence[int], preds: Sequence[int], losses: Sequence[float], num_labels: int) -> dict[str, float]:
    """Accuracy, macro precision/recall/F1 over all labels, and the mean loss over examples."""
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, preds, labels=list(range(num_labels)), average="macro", zero_division=0
    )
    return {
        "loss": float(np.mean(losses)),
        "accuracy": float(accuracy_score(labels, preds)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def shard_by_length(examples: list[dict], rank: int, world_size: int) -> list[dict]:
    """This process's share of an evaluation set, longest first: every example exactly once over all ranks."""
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)
    return ordered[rank::world_size]


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device, autocast: Any) -> list[dict]:
    """Per-example index, label, logits (fp32) and loss for this process's shard."""
    model.eval()
    out = []
    for batch in tqdm(loader, desc="eval", leave=False, disable=not is_main_process()):
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "index")}
        with autocast():
            logits = model(**inputs).logits.float()
        labels = batch["labels"].to(device)
        losses = F.cross_entropy(logits, labels, reduction="none")
        for index, label, row_logits, loss in zip(batch["index"].tolist(), batch["labels"].tolist(), logits.cpu(), losses.tolist()):
            out.append({"index": index, "label": label, "logits": row_logits, "loss": loss})
    return out


def gather(items: list[dict], world_size: int) -> list[dict]:
    """All processes' predictions, in dataset order, on every process."""
    if world_size > 1:
        parts: list[list[dict]] = [[] for _ in range(world_size)]
        dist.all_gather_object(parts, items)
        items = [item for part in parts for item in part]
    return sorted(items, key=lambda item: item["index"])


def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device, autocast: Any, world_size: int, num_labels: int) -> tuple[dict[str, float], list[dict]]:
    predictions = gather(predict(model, loader, device, autocast), world_size)
    for p in predictions:
        p["pred"] = int(p["logits"].argmax())
    metrics = compute_metrics([p["label"] for p in predictions], [p["pred"] for p in predictions], [p["loss"] for p in predictions], num_labels)
    return metrics, predictions


# --- run folder -------------------------------------------------------------------------------


def run_dir_name(model_name: str, now: datetime) -> Path:
    """<model>/<YYYY-MM-DD>/<HH-MM-SS.ffffff>: hub names with / as __, local folders by their name."""
    model = Path(model_name).name if Path(model_name).is_dir() else model_name.replace("/", "__")
    return Path(model, now.strftime("%Y-%m-%d"), now.strftime("%H-%M-%S.%f"))


def make_run_dir(output_root: Path, model_name: str) -> Path:
    """A new folder, never an existing one (exist_ok=False; retried on the rare same-microsecond clash)."""
    while True:
        run_dir = output_root / run_dir_name(model_name, datetime.now())
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            if run_dir.is_dir():  # another run started in the same microsecond: take the next one
                continue
            raise InputError(f"cannot create the run folder {run_dir} (a file is in the way): pass another --output_root") from None
        except OSError as e:  # not a folder, no permission, disk full
            raise InputError(f"cannot create the run folder {run_dir} ({e.strerror}): pass a writable --output_root") from None


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def args_to_json(args: Args) -> dict[str, Any]:
    """The arguments as config.json stores them: paths as strings, everything else with its JSON type."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in args.as_dict().items()}


def slurm_ids(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The Slurm job (and array task) that ran this process, or None outside Slurm."""
    if "SLURM_JOB_ID" not in environ:
        return None
    names = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID"}
    return {key: environ[name] for key, name in names.items() if name in environ}


def run_config(args: Args, num_params: int, num_encoder_params: int, num_labels: int, run_dir: Path, device: torch.device, dtype: torch.dtype, world_size: int) -> dict:
    """Every argument with its JSON type, plus what is needed to read the run later.

    The process count is a setting, not an environment detail: it multiplies the effective batch
    and divides the optimizer steps, so runs with different counts are different experiments.
    """
    config = args_to_json(args)
    environment = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(dtype).removeprefix("torch."),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "world_size": world_size,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
        "started_at": datetime.now().isoformat(timespec="seconds"),
        "slurm": slurm_ids(os.environ),
    }
    return {
        **config, "world_size": world_size, "num_params": num_params, "num_encoder_params": num_encoder_params,
        "num_labels": num_labels, "run_dir": str(run_dir), "environment": environment,
    }  # fmt: skip


def append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def write_test_outputs(run_dir: Path, predictions: list[dict], rows: list[dict], id2label: dict[int, str]) -> None:
    """Per-example predictions, the per-class report and the confusion matrix (with category names)."""
    names = [id2label[i] for i in range(len(id2label))]
    utils.save_jsonl(
        (
            {"id": row["id"], "label": p["label"], "pred": p["pred"], "probs": torch.softmax(p["logits"], -1).tolist()}
            for row, p in zip(rows, predictions)
        ),
        run_dir / "test-predictions.jsonl",
    )
    labels, preds = [p["label"] for p in predictions], [p["pred"] for p in predictions]
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=list(range(len(names))), zero_division=0)
    utils.save_csv(
        ["category", "precision", "recall", "f1", "support"],
        zip(names, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist()),
        run_dir / "test-per-class.csv",
    )
    matrix = confusion_matrix(labels, preds, labels=list(range(len(names))))
    utils.save_csv(
        ["true \\ predicted", *names],
        ([name, *counts] for name, counts in zip(names, matrix.tolist())),
        run_dir / "test-confusion-matrix.csv",
    )


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, args: Args) -> None:
    """Plain transformers format (safetensors), loadable with no project code; swapped in whole.

    config.json also records the input layout (text_fields, max_seq_len), so that predict.py
    tokenises new text exactly as training did.
    """
    model.config.text_fields = list(args.text_fields)
    model.config.max_seq_len = args.max_seq_len
    with utils.atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


# --- processes --------------------------------------------------------------------------------


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); under torchrun, join the process group (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world_size) if world_size > 1 else (0, 1)


def on_rank_0(work: Callable[[], Any], rank: int, world_size: int) -> Any:
    """work() on rank 0 only (writing the run folder); its result, or its failure, on every rank.

    Without this, a rank 0 that fails here alone would leave the other ranks waiting in their next
    collective. Rank 0 raises its own error; the others raise an InputError with its message, so
    that every process ends in one line.
    """
    result, error = None, None
    if rank == 0:
        try:
            result = work()
        except Exception as e:
            if world_size == 1:
                raise
            error = e
    if world_size == 1:
        return result
    message = None if error is None else str(error) if isinstance(error, InputError) else f"rank 0 failed: {type(error).__name__}: {error}"
    box = [result, message]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise InputError(box[1])
    return box[0]


def leaves_process_group(main: Callable[..., Any]) -> Callable[..., Any]:
    """Destroy the process group when `main` ends, whether it returns or raises, so no rank leaves it dangling."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    return wrapper


def log(message: str) -> None:
    if is_main_process():
        tqdm.write(message)


class TrainingError(InputError):
    """Training cannot go on (the loss diverged): reported in one line, like bad input."""


# --- the experiment ---------------------------------------------------------------------------


@leaves_process_group
def main(args: Args) -> Path:
    """Fine-tune, evaluate, write the run folder; return its path."""
    transformers.utils.logging.disable_progress_bar()
    # As the reference's utils.init: fp32 matrix products may use TF32 on GPUs that have it (Ampere and later).
    torch.set_float32_matmul_precision("high")
    device = resolve_device(args.device)
    rank, world_size = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_dtype(args.dtype, device)
    utils.set_seed(args.seed)

    # Data first: a wrong path or a bad row fails before any model is downloaded.
    label2id = load_label2id(args.dataset_dir)
    id2label = {i: label for label, i in label2id.items()}
    rows = {split: load_split(args.dataset_dir, split, args.text_fields, len(label2id)) for split in SPLITS}

    tokenizer, model = load_model(args.model_name, label2id, args.reinit_head)
    positions = check_max_seq_len(args.max_seq_len, model, tokenizer, args.model_name)
    num_params = sum(p.numel() for p in model.parameters())
    num_encoder_params = count_encoder_params(model)  # without the head, as the reference's table counts

    # The settings are on disk before any training: a crashed run still says what it was.
    def start_run_folder() -> Path:
        run_dir = make_run_dir(args.output_root, args.model_name)
        utils.save_json(run_config(args, num_params, num_encoder_params, len(label2id), run_dir, device, dtype, world_size), run_dir / "config.json")
        return run_dir

    run_dir = on_rank_0(start_run_folder, rank, world_size)
    log(f"run folder: {run_dir}")
    log(f"model: {args.model_name} ({num_params:,} parameters) on {device} ({world_size} process(es)), {str(dtype).removeprefix('torch.')}")
    log(positions)

    # Tokenise each split once, or read it from the cache that runs and ranks share; batches are then only padded.
    examples = tokenization.tokenize_splits(
        rows, {split: args.dataset_dir / f"{split}.jsonl" for split in SPLITS}, tokenizer, text_fields=args.text_fields,
        max_seq_len=args.max_seq_len, token_type_ids=tokenization.wants_token_type_ids(model.config, args.text_fields),
        slow=args.slow_tokenizer, num_workers=args.num_workers, log=log,
        cache_dir=args.tokenized_cache_dir if args.tokenized_cache == "on" else None,
    )

    pad = partial(collate, pad_token_id=tokenizer.pad_token_id)
    sampler = DistributedSampler(examples["train"], num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    pin = device.type == "cuda"  # pinned host memory lets the copy to the GPU overlap with compute
    train_loader = DataLoader(examples["train"], batch_size=args.batch_size, sampler=sampler, collate_fn=pad, pin_memory=pin)
    eval_loaders = {
        split: DataLoader(shard_by_length(examples[split], rank, world_size), batch_size=args.eval_batch_size, collate_fn=pad)
        for split in ("val", "test")
    }

    model.to(device)
    if args.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    unreachable = freeze_unreachable(model, pad(examples["train"][:2]), device)
    if unreachable:
        log(f"frozen {len(unreachable)} parameter tensors that this input never reaches (no gradient in a probe step): {', '.join(unreachable)}")
    # `model` keeps clean state-dict keys (no _orig_mod. or module. prefixes) for the best weights.
    compiled: torch.nn.Module = torch.compile(model, dynamic=True) if args.compile else model
    train_model = compiled
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None)

    groups, decay_summary = param_groups(model, args.weight_decay)
    log(decay_summary)
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, steps_per_epoch * args.num_warmup_epochs, steps_per_epoch * args.epochs)
    autocast = partial(torch.autocast, device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # loss scaling only for fp16
    log(
        f"effective batch {args.batch_size} x {args.gradient_accumulation_steps} accumulation x {world_size} process(es) = "
        f"{args.batch_size * args.gradient_accumulation_steps * world_size}; {steps_per_epoch} optimizer steps per epoch"
    )
    if args.num_warmup_epochs > args.epochs:
        log(
            f"note: the warm-up ({args.num_warmup_epochs} epochs) is longer than the training ({args.epochs}): "
            f"the learning rate rises all along and never reaches its peak --lr {args.lr}"
        )

    def evaluate_split(split: str) -> tuple[dict[str, float], list[dict]]:
        return evaluate(compiled, eval_loaders[split], device, autocast, world_size, len(label2id))

    def log_evaluation(epoch: int, train_loss: float, metrics: dict[str, float], seconds: float, throughput: dict[str, float]) -> None:
        row = {"epoch": epoch, "train_loss": train_loss, **metrics, "lr": scheduler.get_last_lr()[0], "seconds": seconds, **throughput}
        on_rank_0(lambda: append_log(run_dir / "log.csv", row), rank, world_size)
        log(
            f"epoch {epoch:>3}  train_loss {train_loss:.4f}  val: loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.4f}  "
            f"f1 {metrics['f1']:.4f}"
            + (f"  ({throughput['examples_per_s']:.1f} examples/s, {throughput['tokens_per_s']:,.0f} tokens/s)" if throughput["examples_per_s"] else "")
        )

    # Epoch 0 is the model before training: a fine-tuned epoch must beat it to be kept.
    start = time.perf_counter()
    val_metrics, _ = evaluate_split("val")
    log_evaluation(0, float("nan"), val_metrics, time.perf_counter() - start, {"examples_per_s": 0.0, "tokens_per_s": 0.0})
    best_epoch, best_f1 = 0, val_metrics["f1"]
    best_state = clone_state(model)

    # Progress bars as context managers: closed on an error too, so that the error line starts clean.
    with trange(1, args.epochs + 1, desc="epochs", disable=rank != 0) as epoch_bar:
        for epoch in epoch_bar:
            train_model.train()
            sampler.set_epoch(epoch)
            start = time.perf_counter()
            loss_sum, seen, tokens = 0.0, 0, 0
            with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", leave=False, disable=rank != 0) as progress:
                for window in chunked(train_loader, args.gradient_accumulation_steps):
                    step_examples, step_tokens = window_counts(window)  # counted on the CPU: no device sync
                    window_loss = accumulate_gradients(train_model, window, step_examples, device, autocast, scaler, world_size)
                    if world_size > 1:  # the loss, examples and tokens of this step over all processes
                        stats = torch.cat([window_loss.view(1), torch.tensor([step_examples, step_tokens], dtype=torch.float32, device=device)])
                        dist.all_reduce(stats)
                        step_loss, step_examples, step_tokens = stats.tolist()
                    else:
                        step_loss = window_loss.item()  # the one device sync of a step
                    if not math.isfinite(step_loss):
                        raise TrainingError(f"the loss became {step_loss} in epoch {epoch}: lower --lr, or use --dtype fp32 / bf16")
                    loss_sum, seen, tokens = loss_sum + step_loss, seen + int(step_examples), tokens + int(step_tokens)
                    optimizer_step(model, optimizer, scheduler, scaler, args.max_grad_norm)
                    progress.update()
                    progress.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            train_seconds = time.perf_counter() - start
            throughput = {"examples_per_s": seen / train_seconds, "tokens_per_s": tokens / train_seconds}

            val_metrics, _ = evaluate_split("val")
            log_evaluation(epoch, loss_sum / seen, val_metrics, time.perf_counter() - start, throughput)
            if val_metrics["f1"] > best_f1:
                best_epoch, best_f1 = epoch, val_metrics["f1"]
                best_state = clone_state(model)

    # The weights of the best epoch (kept on the CPU) give the reported val and test scores.
    model.load_state_dict(best_state)
    val_metrics, _ = evaluate_split("val")
    test_metrics, test_predictions = evaluate_split("test")

    def write_results() -> None:
        utils.save_json({"best-epoch": best_epoch, **val_metrics}, run_dir / "val-metrics.json")
        write_test_outputs(run_dir, test_predictions, rows["test"], id2label)
        try:  # figures are drawn from the files just written; a failure must not lose the run's metrics
            plot.draw_run(run_dir)
        except Exception as e:  # noqa: BLE001 (any plotting error, e.g. a broken font cache)
            log(f"warning: figures not drawn ({type(e).__name__}: {utils.first_line(e)}); redraw them with python src/plot.py --run_dirs {run_dir}")
        if args.save_model:
            save_model(model, tokenizer, run_dir / "model", args)
        utils.save_json(test_metrics, run_dir / "test-metrics.json")  # last: the run is finished

    on_rank_0(write_results, rank, world_size)
    log(f"best epoch {best_epoch}: val f1 {val_metrics['f1']:.4f}, test f1 {test_metrics['f1']:.4f}, test accuracy {test_metrics['accuracy']:.4f}")
    log(f"wrote {run_dir}")
    return run_dir  # @leaves_process_group leaves the process group


if __name__ == "__main__":
    utils.run_cli(main, Args().parse_args())
