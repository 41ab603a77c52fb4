"""The model: where it runs, loading it with its classification head, checking it against the input, saving it.

Everything here works for any architecture the Auto* classes load (BERT, LUKE, XLM-R, ModernBERT,
DeBERTa, ...): rules are structural (tensor shapes, gradients), not lists of parameter names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import utils
from utils import InputError, log


# --- device and precision ---------------------------------------------------------------------


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


# --- loading and checking ---------------------------------------------------------------------


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


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, text_fields: Sequence[str], max_seq_len: int) -> None:
    """Plain transformers format (safetensors), loadable with no project code; swapped in whole.

    config.json also records the input layout (text_fields, max_seq_len), so that predict.py
    tokenises new text exactly as training did.
    """
    model.config.text_fields = list(text_fields)
    model.config.max_seq_len = max_seq_len
    with utils.atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
