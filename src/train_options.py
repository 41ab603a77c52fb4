"""train.py's command line: its options (Args), declared as settings or runtime options (Runtime).

A module of its own, not part of train.py, so that sweep.py can check, forward and compare train.py's
options without importing the experiment itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from tap import Tap

import tokenization
import utils
from utils import InputError


class Runtime(Tap):
    """Runtime options: how and where a run executes, not what it learns. Runs that differ only in
    these are the same setting (aggregate.py averages them, sweep.py skips them as done); config.json
    lists their names under "runtime_options"."""

    output_root: Path = Path("outputs")  # runs go to OUTPUT_ROOT/<model>/<YYYY-MM-DD>/<HH-MM-SS.ffffff>/
    eval_batch_size: int = 32  # examples per forward pass in evaluation
    device: str = "auto"  # auto (cuda, else mps, else cpu), or a torch device such as cpu, cuda:1, mps
    compile: bool = False  # torch.compile the model (dynamic shapes); off by default: no gain measured on CPU
    num_workers: int = 0  # processes that tokenise the dataset (0: one per CPU core this process may use, shared among torchrun processes, at most 8)
    slow_tokenizer: bool = False  # tokenise with the tokenizer's own transformers code even where the fast MeCab + WordPiece path applies (same ids)
    tokenized_cache: Literal["on", "off"] = "on"  # on: read the tokenised splits from --tokenized_cache_dir, or tokenise and store them there; off: tokenise every run
    tokenized_cache_dir: Path = Path("cache/tokenized")  # tokenised splits shared by runs and torchrun ranks, keyed by tokenizer, dataset and input layout (safe to delete)
    save_model: bool = False  # also save the best model and its tokenizer to RUN_DIR/model (safetensors); with --lora_r: the adapters and the head (megabytes), with the base model's name
    merge_lora: bool = False  # with --save_model and --lora_r: save the adapters merged into the base weights, a plain full model, instead
    checkpoint: Literal["last", "keep", "off"] = "last"  # RUN_DIR/checkpoint.pt at the end of each epoch, for --resume: last: removed when the run finishes; keep: left in place; off: none (see README for its size)
    resume: Path | None = None  # continue the unfinished run in this RUN_DIR from its checkpoint.pt, with the settings of its config.json (runtime options as given here, else as the run had them)

    def parse_args(self, args: Sequence[str] | None = None, known_only: bool = False) -> Runtime:  # type: ignore[override]
        """Parse, and note which options the command line gives (given_options): --resume takes the others from the run."""
        argv = sys.argv[1:] if args is None else list(args)
        unset = object()
        # argparse sets an option's default only where the namespace lacks it: what is still `unset` was not given.
        given = argparse.Namespace(**{name: unset for name in self.class_variables})
        argparse.ArgumentParser.parse_known_args(self, argv, given)
        self._given = frozenset(name for name, value in vars(given).items() if value is not unset)
        return super().parse_args(argv, known_only)


class Args(Runtime):
    """Fine-tune a pretrained encoder on a prepared dataset and write one run folder. Every option
    below that is not a runtime option is a setting: it may change what the run learns."""

    model_name: str = "cl-tohoku/bert-base-japanese-v3"  # hub name or local folder that AutoModelForSequenceClassification can load
    dataset_dir: Path = Path("datasets/livedoor")  # {train,val,test}.jsonl + label2id.json, as prepare.py writes them
    text_fields: list[str] = ["title", "body"]  # JSONL fields fed to the model: one text, or a pair whose last field alone is truncated

    batch_size: int = 16  # examples per optimizer step on each device, before accumulation
    epochs: int = 20  # passes over the training set
    lr: float = 3e-5  # peak learning rate of AdamW
    num_warmup_epochs: int = 2  # epochs of linear warm-up; the learning rate then decays linearly to 0 (longer than --epochs: the peak --lr is never reached)
    max_seq_len: int = 512  # tokens per example, [CLS] and [SEP]s included
    truncation: Literal["head", "tail", "head_tail"] = "head"  # what of a last text (the body) too long for --max_seq_len is kept: head (its start, as the reference), tail (its end), head_tail (its first --head_tokens tokens and the rest from its end; Sun et al. 2019)
    head_tokens: int | None = None  # head_tail: tokens kept from the start of the body (default: --max_seq_len / 4, i.e. 128 at 512, the other 382 from its end); recorded as the number used
    weight_decay: float = 0.01  # AdamW weight decay for matrices (biases and norm weights get none)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (effective batch = batch_size x this x devices)
    max_grad_norm: float = 0.0  # clip the gradient norm to this; 0 (the default, as in the reference): no clipping
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30%% slower

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast precision; auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU/MPS
    seed: int = 42  # seed of the model's new head, the shuffling and dropout
    lora_r: int = 0  # LoRA rank: 0 (the default) fine-tunes every weight; R > 0 freezes the model and trains rank-R adapters (peft) and the classification head
    lora_alpha: float = 16.0  # LoRA scale numerator: the adapters' update is multiplied by alpha / r (16 as in hppRC/llm-lora-classification)
    lora_dropout: float = 0.1  # dropout on the adapters' input
    lora_target_modules: list[str] = []  # layers that get adapters, by name or name suffix (e.g. q_proj v_proj); empty: every Linear layer of the transformer blocks (printed)
    load_in_4bit: bool = False  # QLoRA: the frozen base in 4-bit NF4 through bitsandbytes (CUDA only, with --lora_r; untested here)
    threshold: float = 0.5  # multi-label datasets (labels are lists of ids): a label is predicted when its sigmoid probability reaches this; unused for single-label
    class_weights: Literal["none", "balanced"] = "none"  # balanced: weigh the loss by inverse label frequency in train (single-label: n / (K x n_label) per class; multi-label: pos_weight n_negative / n_positive per label)
    early_stopping_patience: int = 0  # stop when val macro-F1 has not improved for this many evaluations (epochs); 0 (the default, as in the reference): train all --epochs
    reinit_head: bool = False  # a checkpoint with a classification head of another size (e.g. a fine-tuned 2-class model): replace that head with a new, random one (printed) instead of refusing

    def process_args(self) -> None:
        for name in ("batch_size", "eval_batch_size", "epochs", "max_seq_len", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                self.error(f"--{name} must be at least 1")
        if not 1 <= len(self.text_fields) <= 2:
            self.error("--text_fields takes one field (a single text) or two (a pair)")
        try:  # head_tail's default head, scaled to --max_seq_len, is recorded as the number it is
            self.head_tokens = tokenization.InputLayout.of(self).head_tokens
        except InputError as e:
            self.error(f"--{e}")
        if self.num_warmup_epochs < 0:
            self.error("--num_warmup_epochs cannot be negative")
        if self.max_grad_norm < 0:
            self.error("--max_grad_norm cannot be negative (0 disables clipping)")
        if self.lora_r < 0:
            self.error("--lora_r cannot be negative (0: full fine-tuning)")
        if not 0 <= self.lora_dropout < 1:
            self.error("--lora_dropout must be in [0, 1)")
        lora_only = [f"--{name}" for name in ("lora_target_modules", "merge_lora") if getattr(self, name)]
        if lora_only and not self.lora_r:
            self.error(f"{', '.join(lora_only)} only apply with --lora_r (LoRA)")
        if not 0 < self.threshold < 1:
            self.error("--threshold must lie between 0 and 1 (a sigmoid probability)")
        if self.early_stopping_patience < 0:
            self.error("--early_stopping_patience cannot be negative (0 disables early stopping)")


RUNTIME_OPTIONS = tuple(Runtime.__annotations__)  # the fields declared in Runtime, in their order


def given_options(args: Runtime) -> frozenset[str]:
    """The options set on the command line (abbreviations resolved), as opposed to left at their defaults.

    A function, not a method: Tap would take a method of Args for an option.
    """
    return getattr(args, "_given", frozenset())


def resumed_args(args: Args, config: dict[str, Any]) -> Args:
    """The options of the run that --resume continues: the settings of its config.json, and its runtime
    options except those given anew on this command line. A setting given here must be the run's own."""
    given = given_options(args)
    values = args.as_dict()
    for name, value in args.as_dict().items():
        if name == "resume" or name not in config:  # a setting newer than the run: the default, as its train.py had it
            continue
        if name in given and name not in RUNTIME_OPTIONS and (str(value) if isinstance(value, Path) else value) != config[name]:
            raise InputError(
                f"--resume {args.resume}: --{name} {value} differs from the run's own setting ({name} {utils.to_json(config[name])} in its "
                f"config.json): a resumed run keeps its settings; drop --{name}, or start a new run"
            )
        if name not in given:
            values[name] = Path(config[name]) if isinstance(value, Path) else config[name]
    resumed = Args().from_dict(values)
    resumed._given = given
    return resumed
