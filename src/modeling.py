"""The model: where it runs, loading it with its classification head, checking it against the input, saving it.

Everything here works for any architecture the Auto* classes load (BERT, LUKE, XLM-R, ModernBERT,
DeBERTa, ...): rules are structural (tensor shapes, gradients), not lists of parameter names.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import tokenization
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


def load_model(
    model_name: str, label2id: dict[str, int], reinit_head: bool = False, dtype: torch.dtype = torch.float32,
    load_in_4bit: bool = False,
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and the model with a classification head of len(label2id) outputs.

    Any failure to build either (a missing folder, an unknown model type, a tokenizer that cannot be
    constructed, a missing optional package) is an InputError in one line. A checkpoint whose head
    has another number of labels is refused unless `reinit_head`, which replaces that head.
    The weights are loaded in `dtype` (transformers 5 would otherwise keep a checkpoint's bf16):
    fp32 for full fine-tuning (autocast computes in bf16/fp16, the optimizer updates fp32 weights);
    a LoRA run's frozen base may be stored in its compute dtype. A tokenizer without a pad token
    (most decoder LLMs) gets one (ensure_pad_token).
    """
    check_model_folder(model_name)
    source = os.path.expanduser(model_name)  # ~/models/x, as a shell would expand it unquoted
    id2label = {i: label for label, i in label2id.items()}
    quantization = {}
    if load_in_4bit:  # QLoRA; needs CUDA and bitsandbytes (train.py refuses it elsewhere)
        from transformers import BitsAndBytesConfig

        quantization = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        ), "device_map": {"": torch.cuda.current_device()}}  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # Mismatched sizes are reported, not raised, so that they can be judged below by what they are.
        with quiet_load_report():
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=len(label2id), id2label=id2label, label2id=label2id,
                ignore_mismatched_sizes=True, output_loading_info=True, dtype=dtype, **quantization,
            )  # fmt: skip
    except OSError as e:
        raise InputError(
            f"cannot load model {model_name!r} ({utils.first_line(e)}). Without network access, only models already "
            f"in the Hugging Face cache load; or pass a local folder saved with save_pretrained: --model_name path/to/model"
        ) from None
    except LOAD_ERRORS as e:
        raise InputError(f"cannot load the tokenizer or model of {model_name!r}: {type(e).__name__}: {utils.first_line(e)}") from None
    check_head(model, sorted(loading["mismatched_keys"]), model_name, reinit_head)
    report_new_weights(model, sorted(loading["missing_keys"]), model_name)
    note = ensure_pad_token(tokenizer, model)
    if note:
        log(note)
    return tokenizer, model


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> str | None:
    """Give a tokenizer without a pad token (Llama, Qwen, most decoder LLMs) its end-of-text token as one, and the model that id.

    Batches are padded on the right (data.collate) with the attention mask; the decoders'
    sequence-classification heads pool the last token that is not pad_token_id, so the config must
    know it (and the text config, where a multimodal model has one of its own). The tokenizers here add
    no end-of-text token to an input, so the pad id never stands inside a text. A tokenizer with neither is refused: a new token would need a new, untrained embedding.
    Returns the line that says what was done, or None when nothing was needed.
    """
    note = None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"{type(tokenizer).__name__} has neither a pad token nor an end-of-text token to pad with: add one to its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
        note = f"padding: the tokenizer has no pad token; its end-of-text token {tokenizer.eos_token!r} (id {tokenizer.pad_token_id}) pads"
    # Older heads read the model's config, GenericForSequenceClassification its text config: a multimodal model's
    # (Gemma 3's text_config) is another object, and its top-level config may have no pad_token_id at all.
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "pad_token_id", None) != tokenizer.pad_token_id:
            config.pad_token_id = tokenizer.pad_token_id
    return note


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass. With a frozen base (LoRA), the embeddings' output
    is made to require a gradient, so that checkpointed blocks have one to pass back to the adapters."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    if not model.get_input_embeddings().weight.requires_grad:
        model.enable_input_require_grads()


def looks_like_path(name: str) -> bool:
    """A --model_name meant as a local folder: it starts with ., / or ~, or its parent folder exists (models/tiny-luke)."""
    path = Path(name).expanduser()
    return name.startswith((".", "/", "~")) or (path.parent != Path(".") and path.parent.is_dir())


def check_model_folder(model_name: str) -> None:
    """A path-like name that does not exist is a missing folder, not a hub name (whose error would be a network or repo-id one)."""
    if looks_like_path(model_name) and not Path(model_name).expanduser().exists():
        raise InputError(
            f"model folder {model_name} not found: --model_name takes a hub name (e.g. cl-tohoku/bert-base-japanese-v3) "
            f"or an existing folder saved with save_pretrained"
        )


class DropLoadReport(logging.Filter):
    """Drops transformers' LOAD REPORT table; report_new_weights says in one line what it would have said."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """Without TRANSFORMERS_VERBOSITY=error, every load of a new head prints a table of its "newly initialized"
    weights: expected here, so that table alone is dropped; every other transformers warning still shows."""
    logger = logging.getLogger("transformers.modeling_utils")
    report_filter = DropLoadReport()
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)


def report_new_weights(model: PreTrainedModel, missing: list[str], model_name: str) -> None:
    """One line for the new head's random weights (expected); a warning for encoder weights the checkpoint lacks (not expected)."""
    encoder = [key for key in missing if key.startswith(f"{model.base_model_prefix}.")]
    head = [key for key in missing if key not in encoder]
    if head:
        log(f"new classification head (randomly initialised): {', '.join(head)}")
    if encoder:
        log(
            f"warning: {len(encoder)} encoder weight(s) are not in the checkpoint of {model_name} and were randomly initialised: "
            f"{', '.join(encoder[:5])}{' ...' if len(encoder) > 5 else ''}: is it the model you meant?"
        )


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


def freeze_unreachable(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, autocast: Any = nullcontext) -> list[str]:
    """Freeze the parameters that inputs of this layout never reach; return their names.

    A probe forward and backward on one batch: a parameter left without a gradient (LUKE's entity
    embeddings, with text-only input) can never get one in training either. DDP waits for a
    gradient of every trainable parameter, so it would stop at the second step; frozen, they are
    out of DDP and of the optimizer, and no per-step search for unused parameters is needed.
    Run in eval mode (no dropout), so the random number streams of training stay as they were, and
    under training's autocast (a LoRA base loaded in bf16 meets its fp32 head only through autocast).
    """
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    inputs = {key: value.to(device) for key, value in batch.items() if key not in ("labels", "index")}
    with autocast():
        logits = model(**inputs).logits
    logits.float().sum().backward()
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


def save_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path, layout: tokenization.InputLayout, merge_lora: bool = False
) -> None:
    """Plain transformers format (safetensors), loadable with no project code; swapped in whole.

    config.json also records the input layout (text_fields, max_seq_len, truncation, head_tokens),
    so that predict.py tokenises new text exactly as training did. A LoRA model is saved as its
    adapter and head (adapter_config.json names the base model) beside that config.json and the
    tokenizer, or with `merge_lora` merged into the base weights as a plain full model (LoRA is then
    gone from `model`).
    """
    lora = hasattr(model, "peft_config")
    if lora and merge_lora:
        model = model.merge_and_unload()
    config = model.get_base_model().config if lora and not merge_lora else model.config
    for name, value in layout.to_dict().items():
        setattr(config, name, value)
    with utils.atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if lora and not merge_lora:
            config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
