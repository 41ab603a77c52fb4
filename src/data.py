"""The prepared dataset as training and prediction read it: splits, labels, batches.

A dataset folder holds {train,val,test}.jsonl, label2id.json and dataset.json, as prepare.py writes them.
Examples (token ids, label, position) come from tokenization.py; here they are padded into batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import utils
from utils import InputError

SPLITS = ("train", "val", "test")


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


def shard_by_length(examples: list[dict], rank: int, world_size: int) -> list[dict]:
    """This process's share of an evaluation set, longest first: every example exactly once over all ranks."""
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)
    return ordered[rank::world_size]
