"""The prepared dataset as training and prediction read it: splits, labels, batches.

A dataset folder holds {train,val,test}.jsonl, label2id.json and dataset.json, as prepare.py writes them.
Examples (token ids, label, position) come from tokenization.py; here they are padded into batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import utils
from evaluation import MULTI_LABEL, SINGLE_LABEL
from utils import InputError

SPLITS = ("train", "val", "test")


def is_label_id(value: object, num_labels: int) -> bool:
    # bool is an int in Python, but true is not label 1.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < num_labels


def label_problem(label: object, num_labels: int, multi_label: bool) -> str | None:
    """Why a row's label is not valid for this dataset's task type, or None if it is."""
    known = f"an id of label2id.json (0-{num_labels - 1})"
    if not multi_label:
        return None if is_label_id(label, num_labels) else f"label {utils.to_json(label)} is not {known}"
    if not isinstance(label, list) or not all(is_label_id(i, num_labels) for i in label):
        return f"label {utils.to_json(label)} is not a list of ids of label2id.json (0-{num_labels - 1})"
    if len(set(label)) != len(label):
        return f"label {utils.to_json(label)} repeats an id"
    return None


def load_split(dataset_dir: Path, split: str, text_fields: Sequence[str], num_labels: int) -> list[dict]:
    """Rows of SPLIT.jsonl, checked: every row has an id, the text fields as strings and a known label.

    A label is an id (single-label) or a list of ids (multi-label, possibly empty); the first row
    decides which, and a file that mixes the two is refused at the first row that differs.
    """
    path = dataset_dir / f"{split}.jsonl"
    if not path.is_file():
        raise InputError(f"{path} not found: run `poetry run python src/prepare.py` first (or see README for other datasets)")
    rows = utils.load_jsonl(path)
    if not rows:
        raise InputError(f"{path} is empty")
    utils.check_rows(rows, text_fields, str(path), other_fields=("id", "label"))
    multi_label = isinstance(rows[0]["label"], list)
    for line_no, row in enumerate(rows, start=1):
        if isinstance(row["label"], list) != multi_label:
            first = "lists of ids (multi-label)" if multi_label else "single ids"
            raise InputError(
                f"{path}: line {line_no}: label {utils.to_json(row['label'])} mixes task types: line 1 and the rows before this one have {first}; "
                f"a dataset is either single-label (an id per row) or multi-label (a list of ids per row)"
            )
        problem = label_problem(row["label"], num_labels, multi_label)
        if problem:
            raise InputError(f"{path}: line {line_no}: {problem}")
    return rows


def problem_type(dataset_dir: Path, rows: Mapping[str, list[dict]]) -> str:
    """The task type of a dataset, decided once from its labels: lists of ids make it multi-label.

    Every split must agree (load_split has checked each one on its own).
    """
    kinds = {split: MULTI_LABEL if isinstance(split_rows[0]["label"], list) else SINGLE_LABEL for split, split_rows in rows.items()}
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"{dataset_dir / f'{split}.jsonl'}: {'lists of ids' if kind == MULTI_LABEL else 'single ids'}" for split, kind in kinds.items())
        raise InputError(f"the splits of {dataset_dir} mix task types ({described}): prepare the dataset again")
    return next(iter(kinds.values()))


def load_label2id(dataset_dir: Path) -> dict[str, int]:
    path = dataset_dir / "label2id.json"
    if not path.is_file():
        raise InputError(f"{path} not found: run `poetry run python src/prepare.py` first (or see README for other datasets)")
    label2id = utils.load_json(path)
    if sorted(label2id.values()) != list(range(len(label2id))):
        raise InputError(f"{path}: ids must be 0..{len(label2id) - 1}, got {sorted(label2id.values())}")
    return label2id


def load_description(dataset_dir: Path, label2id: dict[str, int]) -> dict[str, Any]:
    """What the dataset is (dataset.json: its corpus and split fingerprints, fold, label names), for config.json.

    aggregate.py averages runs over the folds of one corpus and never across corpora. A dataset
    prepared before prepare.py wrote dataset.json is described by its label names alone.
    """
    path = dataset_dir / "dataset.json"
    if not path.is_file():
        return {"labels": sorted(label2id, key=label2id.__getitem__)}
    description = utils.load_json(path)
    if not isinstance(description, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(description).__name__}; run src/prepare.py again")
    return description


def pad_rows(rows: list[list[int]], length: int, pad: int) -> torch.Tensor:
    """Rows of ids padded to `length`, as one int64 tensor: filled in numpy, ~10x faster at 512 tokens
    than building nested Python lists for torch.tensor (measured by tests/benchmarks/bench_input.py)."""
    out = np.full((len(rows), length), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def collate(examples: list[dict], pad_token_id: int, num_labels: int = 0) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this batch only; multi-label labels (lists of ids) become 0/1 rows of num_labels."""
    lengths = np.array([len(e["input_ids"]) for e in examples])
    length = int(lengths.max())
    batch = {}
    for key, pad in (("input_ids", pad_token_id), ("token_type_ids", 0)):
        if key in examples[0]:
            batch[key] = pad_rows([e[key] for e in examples], length, pad)
    batch["attention_mask"] = torch.from_numpy((np.arange(length) < lengths[:, None]).astype(np.int64))
    labels = [e["label"] for e in examples]
    if isinstance(labels[0], list):
        if num_labels < 1:
            raise ValueError("collate: multi-label examples need num_labels")
        batch["labels"] = torch.zeros(len(labels), num_labels)
        for row, ids in enumerate(labels):
            batch["labels"][row, ids] = 1.0
    else:
        batch["labels"] = torch.tensor(labels)
    batch["index"] = torch.tensor([e["index"] for e in examples])
    return batch


def shard_by_length(examples: list[dict], rank: int, world_size: int) -> list[dict]:
    """This process's share of an evaluation set, longest first: every example exactly once over all ranks."""
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)
    return ordered[rank::world_size]
