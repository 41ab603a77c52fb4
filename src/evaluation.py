"""The task objective, in one place: the loss, the decision, the probabilities and the scores, over one or all processes.

The task type is decided once, from the dataset (data.problem_type), and named as transformers
names it (`config.problem_type`):
- single_label_classification: a label id per example; cross-entropy over the logits, softmax
  probabilities, the arg-max as the prediction; `accuracy` is the share of exact predictions.
- multi_label_classification: a list of label ids per example (possibly empty); binary
  cross-entropy with logits per label (averaged over the labels, as torch's BCEWithLogitsLoss),
  sigmoid probabilities, every label whose probability reaches --threshold as the prediction;
  `accuracy` is subset accuracy (every label of the example right), and micro precision, recall
  and F1 (over all example-label decisions) are added.
For both, precision, recall and F1 are macro averages over all labels, a label never predicted (or
never true) counting as 0, as scikit-learn's zero_division=0. The scores are computed with numpy
(tests/test_evaluation.py proves them equal to scikit-learn's), so no process pays for importing it.

Class weights (--class_weights balanced) weigh each example's loss: single-label, by the weight of
its label, n / (K x n_label) over the train split (scikit-learn's "balanced"); multi-label, the
positive term of each label by n_negative / n_positive (BCEWithLogitsLoss's pos_weight). The loss
of a set is then the mean of these weighted per-example losses, in training and evaluation alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import utils

SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
PROBLEM_TYPES = (SINGLE_LABEL, MULTI_LABEL)
MULTI_LABEL_METRICS = ("micro_precision", "micro_recall", "micro_f1")


# --- scores (numpy) ---------------------------------------------------------------------------


def divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    return np.divide(numerator, denominator, out=np.zeros(np.broadcast(numerator, denominator).shape), where=denominator != 0)


def label_counts(truth: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """Per label: tp, fp, fn, tn from two (examples x labels) 0/1 matrices."""
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    tp = (truth & predicted).sum(0)
    fp = (~truth & predicted).sum(0)
    fn = (truth & ~predicted).sum(0)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": len(truth) - tp - fp - fn}


def scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 (= 2tp / (2tp + fp + fn)) for counts per label, or for summed counts (micro)."""
    return divide(tp, tp + fp), divide(tp, tp + fn), divide(2 * tp, 2 * tp + fp + fn)


def one_hot(ids: Sequence[int] | Sequence[Sequence[int]], num_labels: int) -> np.ndarray:
    """(examples x labels) 0/1 matrix: a row per example, from a label id or a list of label ids each."""
    matrix = np.zeros((len(ids), num_labels), dtype=bool)
    for row, labels in enumerate(ids):
        matrix[row, labels] = True  # an int or a list of ints
    return matrix


def per_label_report(labels: Sequence, preds: Sequence, num_labels: int) -> dict[str, np.ndarray]:
    """Per label: precision, recall, f1, support (true examples) and tp, fp, fn, tn."""
    counts = label_counts(one_hot(labels, num_labels), one_hot(preds, num_labels))
    precision, recall, f1 = scores(counts["tp"], counts["fp"], counts["fn"])
    return {"precision": precision, "recall": recall, "f1": f1, "support": counts["tp"] + counts["fn"], **counts}


def confusion_matrix(labels: Sequence[int], preds: Sequence[int], num_labels: int) -> np.ndarray:
    """Counts of single-label predictions: rows the true label, columns the predicted one."""
    return np.bincount(np.asarray(labels) * num_labels + np.asarray(preds), minlength=num_labels**2).reshape(num_labels, num_labels)


def compute_metrics(labels: Sequence, preds: Sequence, losses: Sequence[float], num_labels: int, multi_label: bool = False) -> dict[str, float]:
    """Accuracy (subset accuracy for multi-label), macro precision/recall/F1 over all labels, the mean
    loss over examples, and for multi-label micro precision/recall/F1.

    labels and preds are label ids (single-label) or lists of label ids (multi-label).
    """
    truth, predicted = one_hot(labels, num_labels), one_hot(preds, num_labels)
    counts = label_counts(truth, predicted)
    precision, recall, f1 = scores(counts["tp"], counts["fp"], counts["fn"])
    metrics = {
        "loss": float(np.mean(losses)),
        "accuracy": float(np.mean((truth == predicted).all(axis=1))),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
    }
    if multi_label:
        micro = scores(counts["tp"].sum(), counts["fp"].sum(), counts["fn"].sum())
        metrics.update({name: float(value) for name, value in zip(MULTI_LABEL_METRICS, micro)})
    return metrics


# --- the objective ----------------------------------------------------------------------------


def balanced_weights(labels: Sequence, num_labels: int, multi_label: bool) -> torch.Tensor:
    """Per-label loss weights from the train labels; a label absent from train counts as seen once.

    single-label: n / (K x n_label), the inverse class frequency scaled so that weights average 1 over examples.
    multi-label: n_negative / n_positive per label, the pos_weight of BCEWithLogitsLoss.
    """
    positives = np.maximum(one_hot(labels, num_labels).sum(0), 1).astype(float)
    n = len(labels)
    weights = np.maximum(n - positives, 0) / positives if multi_label else n / (num_labels * positives)
    return torch.tensor(weights, dtype=torch.float32)


@dataclass(frozen=True)
class Objective:
    """What the model is trained for and judged by: single- or multi-label, with its threshold and loss weights."""

    problem_type: str = SINGLE_LABEL
    num_labels: int = 2
    threshold: float = 0.5  # multi-label: a label is predicted when its sigmoid probability reaches this
    weights: torch.Tensor | None = None  # per label: class weights (single-label) or pos_weight (multi-label); None: unweighted

    def __post_init__(self) -> None:
        if self.problem_type not in PROBLEM_TYPES:
            raise utils.InputError(f"problem_type {self.problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")

    @property
    def multi_label(self) -> bool:
        return self.problem_type == MULTI_LABEL

    @classmethod
    def from_config(cls, config: Any) -> Objective:
        """The objective a saved model was trained with (config.problem_type, config.threshold); single-label if unset."""
        return cls(getattr(config, "problem_type", None) or SINGLE_LABEL, config.num_labels, float(getattr(config, "threshold", None) or 0.5))

    def record_in(self, config: Any) -> None:
        """Write the task type (and the multi-label threshold) into a model config, so that a saved model and predict.py know it."""
        config.problem_type = self.problem_type
        if self.multi_label:
            config.threshold = self.threshold

    def describe(self) -> str:
        kind = f"multi-label (sigmoid, threshold {self.threshold})" if self.multi_label else "single-label (softmax, arg-max)"
        weights = "unweighted" if self.weights is None else f"weights {', '.join(f'{w:.3g}' for w in self.weights.tolist())}"
        return f"task: {kind}, {self.num_labels} labels; loss: {'binary cross-entropy' if self.multi_label else 'cross-entropy'}, {weights}"

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-example loss (fp32 logits): labels are ids (single-label) or 0/1 rows (multi-label)."""
        weights = None if self.weights is None else self.weights.to(logits.device)
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weights, reduction="none").mean(-1)
        losses = F.cross_entropy(logits, labels, reduction="none")
        return losses if weights is None else losses * weights[labels]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, -1)

    def decide(self, logits: torch.Tensor) -> int | list[int]:
        """The prediction for one example's logits: a label id, or the sorted ids over the threshold."""
        if self.multi_label:
            return torch.nonzero(torch.sigmoid(logits) >= self.threshold).flatten().tolist()
        return int(logits.argmax())

    def metrics(self, labels: Sequence, preds: Sequence, losses: Sequence[float]) -> dict[str, float]:
        return compute_metrics(labels, preds, losses, self.num_labels, self.multi_label)


def make_objective(problem_type: str, num_labels: int, threshold: float, class_weights: str, train_labels: Sequence) -> Objective:
    """The objective of a run: its task type (from the dataset), threshold and, for --class_weights balanced, weights from the train labels."""
    weights = balanced_weights(train_labels, num_labels, problem_type == MULTI_LABEL) if class_weights == "balanced" else None
    return Objective(problem_type, num_labels, threshold, weights)


def early_stop(epoch: int, best_epoch: int, patience: int) -> bool:
    """True when val macro-F1 has not improved for `patience` evaluations (one per epoch); patience 0: never.

    Computed from the epochs alone, so a resumed run stops where an uninterrupted one would.
    """
    return patience > 0 and epoch - best_epoch >= patience


# --- evaluation -------------------------------------------------------------------------------


def label_ids(row: torch.Tensor) -> int | list[int]:
    """A batch's label back as the dataset wrote it: an id, or the ids of a 0/1 row."""
    return torch.nonzero(row).flatten().tolist() if row.dim() else int(row)


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device, autocast: Any, objective: Objective | None) -> list[dict]:
    """Per-example index, label, logits (fp32) and loss for this process's shard; objective None (unlabelled
    text, predict.py): no loss (0)."""
    model.eval()
    out = []
    for batch in tqdm(loader, desc="eval", leave=False, disable=not utils.show_progress()):
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "index")}
        with autocast():
            logits = model(**inputs).logits.float()
        losses = objective.loss(logits, batch["labels"].to(device)) if objective else torch.zeros(len(logits))
        for index, label, row_logits, loss in zip(batch["index"].tolist(), batch["labels"], logits.cpu(), losses.tolist()):
            out.append({"index": index, "label": label_ids(label), "logits": row_logits, "loss": loss})
    return out


def gather(items: list[dict], world_size: int) -> list[dict]:
    """All processes' predictions, in dataset order, on every process."""
    if world_size > 1:
        parts: list[list[dict]] = [[] for _ in range(world_size)]
        dist.all_gather_object(parts, items)
        items = [item for part in parts for item in part]
    return sorted(items, key=lambda item: item["index"])


def evaluate(
    model: torch.nn.Module, loader: DataLoader, device: torch.device, autocast: Any, world_size: int, objective: Objective
) -> tuple[dict[str, float], list[dict]]:
    """Metrics over the whole set (all processes) and its predictions (with `pred`), in dataset order."""
    predictions = gather(predict(model, loader, device, autocast, objective), world_size)
    for p in predictions:
        p["pred"] = objective.decide(p["logits"])
    metrics = objective.metrics([p["label"] for p in predictions], [p["pred"] for p in predictions], [p["loss"] for p in predictions])
    return metrics, predictions
