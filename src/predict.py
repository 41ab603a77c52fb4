"""Classify new texts with a model saved by `train.py --save_model`.

    poetry run python src/predict.py --model_dir outputs/<model>/<date>/<time>/model \\
        --input_file news.jsonl --output_file predictions.jsonl
    printf '%s\\t%s\\n' "タイトル" "本文" | poetry run python src/predict.py --model_dir outputs/<model>/<date>/<time>/model

Input, read as UTF-8:
  --input_file  JSONL, one object per line with the model's text fields (title and body unless the
                model was trained with other --text_fields). Every field is carried to the output.
  stdin         (without --input_file) one text per line. For a pair model (title, body), a TAB
                separates the title from the body; a line without a TAB is a body with an empty
                title. For a single-text model, the whole line is the text.
Output: JSONL (--output_file, written atomically, or stdout), a row per input row, in input order:
the input row's fields, then `pred` (category name), `pred_id` and `probs` ({category: probability}).
A multi-label model (trained on a dataset whose labels are lists; config.json's problem_type) gives
every category whose sigmoid probability reaches its threshold (recorded in config.json, or
--threshold): `pred` and `pred_id` are then lists (possibly empty), sorted by id.

Text is tokenised by the code train.py uses (src/tokenization.py) with the layout the model was trained with (text_fields,
max_seq_len, truncation and head_tokens, recorded in the model's config.json; models saved before truncation modes kept
the head): the body alone is truncated, as in training (a title that alone fills max_seq_len is truncated too, the body
left out, and the rows counted on stderr), and stderr says how many rows truncation cut.
Progress and information go to stderr, so stdout holds only the predictions.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Literal, TextIO

import torch
import transformers
from tap import Tap
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig

import data
import evaluation
import lora
import modeling
import tokenization
import utils
from utils import InputError

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
    "adapter_model.safetensors",  # a LoRA run's adapters and head (train.py --save_model --lora_r)
)  # fmt: skip
OUTPUT_FIELDS = ("pred", "pred_id", "probs")  # appended to each row; input fields of these names are replaced
NO_LABEL = -100  # data.collate needs a label; evaluation.predict computes no loss here (no objective)
SAVE_HINT = "train one with `python src/train.py --save_model` and pass its RUN_DIR/model, e.g. outputs/<model>/<date>/<time>/model"


class Args(Tap):
    model_dir: Path  # the folder train.py --save_model wrote: RUN_DIR/model (config.json, model.safetensors or a LoRA adapter, tokenizer)
    base_model: str | None = None  # for a LoRA adapter folder: its base model, a hub name (from the Hugging Face cache offline) or a local folder; default: the one its adapter_config.json names
    input_file: Path | None = None  # JSONL with the model's text fields (e.g. title, body); without it, stdin: a text per line (pairs: title TAB body; no TAB: body only)
    output_file: Path | None = None  # JSONL of the input rows with pred, pred_id and probs (written atomically); without it, stdout
    batch_size: int = 32  # examples per forward pass (batches are sorted by length, the output is in input order)
    device: str = "auto"  # auto (cuda, else mps, else cpu), or a torch device such as cpu, cuda:1, mps
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"  # autocast precision of the forward pass; auto: bf16/fp16 on GPUs (faster, probabilities differ slightly)
    num_workers: int = 0  # processes that tokenise the input (0: one per CPU core this process may use, at most 8)
    slow_tokenizer: bool = False  # tokenise with the tokenizer's own transformers code even where the fast MeCab + WordPiece path applies (same ids)
    threshold: float | None = None  # multi-label models: predict each category whose probability reaches this (default: the threshold the model was trained with, in its config.json)

    def process_args(self) -> None:
        if self.batch_size < 1:
            self.error("--batch_size must be at least 1")
        if self.threshold is not None and not 0 < self.threshold < 1:
            self.error("--threshold must lie between 0 and 1 (a sigmoid probability)")


# --- model ------------------------------------------------------------------------------------


def load_config(model_dir: Path) -> PretrainedConfig:
    """The saved model's config; a folder that is not a fine-tuned classification model is an InputError."""
    problem = None
    if not model_dir.is_dir():
        problem = "no such folder"
    elif not (model_dir / "config.json").is_file():
        problem = "no config.json"
    elif not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        problem = "no model weights (model.safetensors)"
    elif "id2label" not in utils.load_json(model_dir / "config.json"):  # a base model: AutoConfig would invent LABEL_0, LABEL_1
        problem = "config.json has no id2label: not fine-tuned for classification"
    if problem:
        raise InputError(f"{model_dir} is not a saved classification model ({problem}): {SAVE_HINT}")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load {model_dir / 'config.json'} ({utils.first_line(e)})") from None


def input_layout(config: PretrainedConfig) -> tokenization.InputLayout:
    """The input layout the model was trained with, as train.py records it in config.json (older models: title + body, 512, head)."""
    try:
        return tokenization.InputLayout.of(config)
    except InputError as e:
        raise InputError(f"config.json: {e}") from None


def load_model(
    model_dir: Path, config: PretrainedConfig, base_model: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[transformers.PreTrainedTokenizerBase, transformers.PreTrainedModel]:
    """The saved tokenizer and model, through the same Auto* classes as any transformers user.

    A LoRA adapter folder: the base model (BASE_MODEL, or the one adapter_config.json names) with
    the saved config (labels, pad token), then the adapters and head put on it and merged.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if lora.is_adapter_dir(model_dir):
            base = base_model or lora.base_model_name(model_dir)
            info(f"LoRA adapter on base model {base}")
            model = AutoModelForSequenceClassification.from_pretrained(base, config=config, dtype=dtype)
            model = lora.load_adapter_model(model, model_dir)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, config=config, dtype=dtype)
    except (OSError, *modeling.LOAD_ERRORS) as e:
        raise InputError(f"cannot load the model saved in {model_dir} ({type(e).__name__}: {utils.first_line(e)}): {SAVE_HINT}") from None
    return tokenizer, model


# --- input ------------------------------------------------------------------------------------


def read_jsonl(path: Path, text_fields: Sequence[str]) -> list[dict]:
    if not path.is_file():
        raise InputError(f"{path} not found")
    return utils.check_rows(utils.load_jsonl(path), text_fields, str(path), hint=f" (the model reads {', '.join(text_fields)})")


def parse_line(line: str, text_fields: Sequence[str]) -> dict[str, str]:
    """One stdin line as a row: the text, or for a pair `first TAB last` (no TAB: the last field alone)."""
    if len(text_fields) == 1:
        return {text_fields[0]: line}
    first, tab, last = line.partition("\t")
    return {text_fields[0]: first, text_fields[1]: last} if tab else {text_fields[0]: "", text_fields[1]: line}


def stdin_lines(stream: TextIO) -> Iterator[str]:
    """Lines of stdin decoded as UTF-8, whatever the platform's locale (Windows pipes default to cp1252/cp932)."""
    for line_no, raw in enumerate(stream.buffer, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"<stdin>: line {line_no}: not valid UTF-8 ({e.reason})") from None


def read_lines(lines: Iterable[str], text_fields: Sequence[str]) -> list[dict]:
    """Rows from plain text lines; an empty line is an error (it would be a prediction for no text)."""
    rows = []
    for line_no, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            raise InputError(f"<stdin>: line {line_no}: empty line (give one text per line)")
        rows.append(parse_line(line, text_fields))
    return rows


# --- prediction -------------------------------------------------------------------------------


def tokenize(
    rows: list[dict], tokenizer: transformers.PreTrainedTokenizerBase, layout: tokenization.InputLayout,
    token_type_ids: bool, slow: bool, num_workers: int, source: str,
) -> list[dict]:
    """Examples as train.py makes them (the same tokenization module, fast or slow path), numbered in input order."""
    if not rows:
        return []
    encoder = tokenization.choose_encoder(tokenizer, slow, layout.text_fields)
    info(f"tokenizer: {encoder.description}")
    encoded = tokenization.encode_parallel(encoder, tokenization.texts_of(rows, layout.text_fields), layout, token_type_ids, num_workers)
    tokenization.report_truncation(source, encoded, layout, f"the model's max_seq_len {layout.max_seq_len}", info)
    return encoded.examples([NO_LABEL] * len(rows))


def classify(
    model: torch.nn.Module, examples: list[dict], pad_token_id: int, batch_size: int, device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Logits (fp32, on the CPU) per example in input order, by train.py's evaluation code: batches longest first."""
    ordered = data.shard_by_length(examples, rank=0, world_size=1)
    loader = DataLoader(ordered, batch_size=batch_size, collate_fn=partial(data.collate, pad_token_id=pad_token_id))
    autocast = partial(torch.autocast, device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    return [p["logits"] for p in evaluation.gather(evaluation.predict(model, loader, device, autocast, objective=None), world_size=1)]


def with_prediction(row: dict, logits: torch.Tensor, labels: Sequence[str], objective: evaluation.Objective) -> dict:
    """The input row, then pred (category name; multi-label: the list of names), pred_id and probs ({category: probability})."""
    pred_id = objective.decide(logits)
    pred = [labels[i] for i in pred_id] if isinstance(pred_id, list) else labels[pred_id]
    probs = objective.probabilities(logits).tolist()
    carried = {key: value for key, value in row.items() if key not in OUTPUT_FIELDS}
    return {**carried, "pred": pred, "pred_id": pred_id, "probs": dict(zip(labels, probs))}


def write_predictions(rows: Iterable[dict], output_file: Path | None) -> None:
    """To the file, atomically (never half written), or to stdout in UTF-8 whatever the platform's locale."""
    if output_file is not None:
        utils.save_jsonl(rows, output_file)
        return
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(encoding="utf-8")
    for row in rows:
        sys.stdout.write(utils.to_json(row) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    print(message, file=sys.stderr)


# --- main -------------------------------------------------------------------------------------


def main(args: Args) -> list[dict]:
    """Read the input, classify every row, write the predictions; return them."""
    transformers.utils.logging.disable_progress_bar()
    torch.set_float32_matmul_precision("high")  # as in training (train.py): TF32 on GPUs that have it

    # The device, the model folder and the input are checked before any weights are loaded.
    device = modeling.resolve_device(args.device)
    dtype = modeling.resolve_dtype(args.dtype, device)
    config = load_config(args.model_dir)
    layout = input_layout(config)
    text_fields = layout.text_fields
    labels = [config.id2label[i] for i in range(config.num_labels)]
    objective = evaluation.Objective.from_config(config)
    if args.threshold is not None:
        objective = dataclasses.replace(objective, threshold=args.threshold)
    if args.input_file is not None:
        source = str(args.input_file)
        rows = read_jsonl(args.input_file, text_fields)
    else:
        source = "<stdin>"
        if sys.stdin.isatty():
            info(f"reading from stdin, one text per line ({' TAB '.join(text_fields)}); end with Ctrl-D")
        rows = read_lines(stdin_lines(sys.stdin), text_fields)

    # Weights in the forward pass's dtype: a LoRA model's base in bf16 takes half the memory.
    tokenizer, model = load_model(args.model_dir, config, args.base_model, dtype)
    model.to(device)
    kind = f"multi-label, threshold {objective.threshold}" if objective.multi_label else "single-label"
    info(
        f"model: {args.model_dir} ({len(labels)} categories, {kind}; input {layout.describe()}) on {device}, {str(dtype).removeprefix('torch.')}"
    )

    start = time.perf_counter()
    token_type_ids = tokenization.wants_token_type_ids(model.config, text_fields)
    examples = tokenize(rows, tokenizer, layout, token_type_ids, args.slow_tokenizer, args.num_workers, source)
    logits = classify(model, examples, tokenizer.pad_token_id, args.batch_size, device, dtype)
    predictions = [with_prediction(row, row_logits, labels, objective) for row, row_logits in zip(rows, logits)]
    seconds = time.perf_counter() - start
    info(f"classified {len(rows):,} rows from {source} in {seconds:.1f} s ({len(rows) / max(seconds, 1e-9):.1f} rows/s)")

    write_predictions(predictions, args.output_file)
    if args.output_file is not None:
        info(f"wrote {args.output_file}")
    return predictions


if __name__ == "__main__":
    utils.run_cli(main, Args().parse_args())
