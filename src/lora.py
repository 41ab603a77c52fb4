"""LoRA (low-rank adapters, through peft) for every model this project loads: encoders and decoder LLMs.

- Which layers get adapters is a structural rule, printed by train.py: every nn.Linear inside the
  repeated blocks of the base model (the ModuleLists of transformer layers: attention and MLP
  projections) that the text reaches, never the embeddings, BERT's pooler or the classification head.
  A multimodal model (Gemma 3 4B-27B: a SigLIP vision tower beside its language model) has its text
  model's blocks adapted, not its vision tower's, which text input never reaches (text_model).
  --lora_target_modules overrides it with name suffixes (q_proj v_proj, or query value), matched anywhere in the base model.
- The classification head (every module of the model outside its base model: score, classifier,
  ModernBERT's head, ...) is trained in full and saved with the adapter (peft's modules_to_save).
- Trainable parameters (adapters and head) are kept in fp32 whatever the base model's dtype: the
  optimizer updates them in full precision while autocast runs the frozen base in bf16/fp16.
- A saved adapter folder (train.py --save_model with --lora_r) holds adapter_config.json (with the
  base model's name), adapter_model.safetensors (adapters + head: megabytes), the classification
  config and the tokenizer; predict.py puts it back on the base model (load_adapter_model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

import utils
from utils import InputError

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSettings:
    """train.py's --lora_* flags: r 0 means no LoRA (full fine-tuning)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ()  # empty: the structural rule (Linear layers of the blocks)


def block_prefixes(model: PreTrainedModel) -> list[str]:
    """Names of the ModuleLists of the base model (its stacks of transformer layers), as full module names."""
    prefix = model.base_model_prefix
    return [
        f"{prefix}.{name}" if name else prefix
        for name, module in model.base_model.named_modules()
        if isinstance(module, torch.nn.ModuleList)
    ]


def head_modules(model: PreTrainedModel) -> list[str]:
    """Top-level modules outside the base model that have parameters: the classification head, trained in full."""
    return [
        name for name, module in model.named_children()
        if name != model.base_model_prefix and any(True for _ in module.parameters())
    ]  # fmt: skip


def text_model(model: PreTrainedModel, block_layers: Sequence[str]) -> str:
    """Full name of the part of the model that reads the text: the smallest module around the token embeddings
    (get_input_embeddings) that holds some of BLOCK_LAYERS (the Linear layers of the blocks).

    The base model itself for a text-only model (BERT's embeddings and encoder are siblings in it; Llama's
    embed_tokens and layers too); a multimodal model's language model (Gemma 3's model.language_model), whose
    siblings (the vision tower) text input never reaches. The base model where the embeddings cannot be found.
    """
    prefix = model.base_model_prefix
    try:
        embeddings = model.get_input_embeddings()
    except NotImplementedError:
        return prefix
    name = next((name for name, module in model.named_modules() if module is embeddings), "")
    parts = name.split(".")[:-1]
    while name.startswith(f"{prefix}.") and len(parts) > 1:  # up from the embeddings' parent, never above the base model
        candidate = ".".join(parts)
        if any(layer.startswith(f"{candidate}.") for layer in block_layers):
            return candidate
        parts.pop()
    return prefix


def target_layers(model: PreTrainedModel, names: Sequence[str] = ()) -> list[str]:
    """Full names of the layers that get adapters.

    Default: every nn.Linear inside a ModuleList of the base model (attention and MLP of each block),
    within its text model (text_model: all of the base model but a multimodal model's other encoders).
    NAMES: layers of the base model (Linear or Embedding, what LoRA can adapt) whose name is one of
    these or ends with `.name`; a name that matches nothing is an InputError listing what exists.
    """
    base = f"{model.base_model_prefix}."
    layers = {
        name: module for name, module in model.named_modules()
        if name.startswith(base) and isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
    }  # fmt: skip
    if not names:
        blocks = tuple(f"{prefix}." for prefix in block_prefixes(model))
        chosen = [name for name, module in layers.items() if isinstance(module, torch.nn.Linear) and name.startswith(blocks)]
        reader = text_model(model, chosen)
        chosen = [name for name in chosen if name.startswith(f"{reader}.")]
        if not chosen:
            raise InputError(
                f"{type(model).__name__}: no Linear layer inside a stack of transformer blocks: pass --lora_target_modules "
                f"(its layers: {', '.join(leaf_names(layers)) or 'none'})"
            )
        return chosen
    for target in names:
        if not any(is_named(name, target) for name in layers):
            raise InputError(
                f"--lora_target_modules {target}: no Linear or Embedding layer of {type(model).__name__} is named so; "
                f"its layers: {', '.join(leaf_names(layers))}"
            )
    return [name for name in layers if any(is_named(name, target) for target in names)]


def is_named(name: str, target: str) -> bool:
    """Whether a module's full name is TARGET, or ends with it after a dot (as peft matches target_modules)."""
    return name == target or name.endswith(f".{target}")


def leaf_names(names: Sequence[str] | dict) -> list[str]:
    """The distinct last parts of module names (q_proj, k_proj, ...), in first-seen order."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> tuple[torch.nn.Module, str]:
    """The model with LoRA adapters on its target layers, base frozen, head trainable; and a line that says what was chosen."""
    from peft import LoraConfig, get_peft_model  # imported here: full fine-tuning never needs peft

    targets = target_layers(model, settings.target_modules)
    reader = text_model(model, targets)
    heads = head_modules(model)
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=targets,  # full names: each matches itself only (peft compares whole names, or suffixes after a dot)
        modules_to_save=heads,
    )  # fmt: skip
    name_or_path = model.config.name_or_path
    peft_model = get_peft_model(model, config)
    # peft matches modules_to_save as plain name suffixes: what it wrapped must be the head and nothing else.
    wrapped = [name for name, module in peft_model.named_modules() if type(module).__name__ == "ModulesToSaveWrapper"]
    stray = [name for name in wrapped if name.split(".")[-1] not in heads or name.count(".") != 2]
    if stray:
        raise InputError(f"LoRA: head names {heads} also match {stray} inside the model: pass --lora_target_modules and report this model")
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # trainable weights in full precision (the optimizer's master copy)
    peft_model.peft_config["default"].base_model_name_or_path = name_or_path
    rule = ", ".join(settings.target_modules) if settings.target_modules else "the Linear layers of its transformer blocks"
    if not settings.target_modules and reader != model.base_model_prefix:
        rule += f" in {reader}, its text model"  # said where other parts (a vision tower) get none
    summary = (
        f"LoRA r={settings.r} alpha={settings.alpha:g} dropout={settings.dropout:g} on {len(targets)} layers ({rule}: "
        f"{', '.join(leaf_names(targets))}); trained in full: {', '.join(heads)}"
    )
    return peft_model, summary


def base_dtype(settings: LoraSettings, load_in_4bit: bool, device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype the model's weights are loaded in: fp32 for full fine-tuning (the optimizer's weights;
    autocast computes in bf16/fp16), the compute dtype for LoRA's frozen base (half the memory on GPUs).
    --load_in_4bit is refused without CUDA or without LoRA, in one line."""
    if load_in_4bit and device.type != "cuda":
        raise InputError(f"--load_in_4bit (QLoRA through bitsandbytes) needs a CUDA GPU; this run is on {device}: drop the flag")
    if load_in_4bit and not settings.r:
        raise InputError("--load_in_4bit trains adapters on a 4-bit base: pass --lora_r (e.g. 32)")
    return compute_dtype if settings.r else torch.float32


def trainable_share(model: torch.nn.Module) -> tuple[int, int, str]:
    """(trainable parameters, all parameters, a line saying so)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total, f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def base_model_name(path: Path) -> str:
    """The base model an adapter folder was trained on (adapter_config.json's base_model_name_or_path)."""
    config = utils.load_json(path / ADAPTER_CONFIG)  # bad JSON: an InputError naming the file and line
    name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not name:
        raise InputError(f"{path / ADAPTER_CONFIG} names no base model (base_model_name_or_path): pass --base_model")
    return name


def load_adapter_model(model: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """The base model (with a new head) plus the saved adapters and head, merged into plain weights for speed."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
