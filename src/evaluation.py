"""The task objective, in one place: the loss, the decision, the scores, over one or all processes.

Single-label classification: cross-entropy over the logits, the arg-max as the prediction, and
accuracy with macro precision, recall and F1 over all labels (a label never predicted counts as 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from torch.utils.data import DataLoader
from tqdm import tqdm

import utils


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


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device, autocast: Any) -> list[dict]:
    """Per-example index, label, logits (fp32) and loss for this process's shard."""
    model.eval()
    out = []
    for batch in tqdm(loader, desc="eval", leave=False, disable=not utils.is_main_process()):
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
