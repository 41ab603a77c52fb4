"""evaluation.py: the numpy metrics equal scikit-learn's, and the objective's loss, decision and weights are what they say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.utils.class_weight import compute_class_weight

import evaluation
from evaluation import MULTI_LABEL, SINGLE_LABEL, Objective

SRC = Path(__file__).resolve().parents[1] / "src"


def random_single(rng: np.random.Generator, n: int, k: int) -> tuple[list[int], list[int]]:
    # Labels drawn from fewer than k values, so that some labels are never true or never predicted (zero_division).
    return rng.integers(0, k - 1, n).tolist(), rng.integers(1, k, n).tolist()


def random_multi(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    truth = rng.random((n, k)) < 0.3
    predicted = rng.random((n, k)) < 0.3
    truth[:, -1] = False  # a label never true
    predicted[:, 0] = False  # a label never predicted
    truth[0], predicted[0] = False, False  # an example with no label, predicted with none
    return truth, predicted


def ids(matrix: np.ndarray) -> list[list[int]]:
    return [np.flatnonzero(row).tolist() for row in matrix]


@pytest.mark.parametrize("seed", range(5))
def test_single_label_metrics_equal_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 6
    labels, preds = random_single(rng, 50, k)
    losses = rng.random(50).tolist()
    ours = evaluation.compute_metrics(labels, preds, losses, k)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, labels=list(range(k)), average="macro", zero_division=0)
    expected = {"loss": float(np.mean(losses)), "accuracy": accuracy_score(labels, preds), "precision": precision, "recall": recall, "f1": f1}
    assert ours == pytest.approx(expected, abs=1e-12)
    assert set(ours) == set(expected)  # no micro scores for single-label (they would equal accuracy)

    report = evaluation.per_label_report(labels, preds, k)
    per_label = precision_recall_fscore_support(labels, preds, labels=list(range(k)), zero_division=0)
    for ours_column, theirs in zip(("precision", "recall", "f1", "support"), per_label):
        np.testing.assert_allclose(report[ours_column], theirs, atol=1e-12)
    np.testing.assert_array_equal(evaluation.confusion_matrix(labels, preds, k), confusion_matrix(labels, preds, labels=list(range(k))))


@pytest.mark.parametrize("seed", range(5))
def test_multi_label_metrics_equal_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 5
    truth, predicted = random_multi(rng, 40, k)
    ours = evaluation.compute_metrics(ids(truth), ids(predicted), [0.5] * 40, k, multi_label=True)
    expected = {"loss": 0.5, "accuracy": accuracy_score(truth, predicted)}  # subset accuracy on indicator matrices
    for prefix, average in (("", "macro"), ("micro_", "micro")):
        p, r, f, _ = precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
        expected.update({f"{prefix}precision": p, f"{prefix}recall": r, f"{prefix}f1": f})
    assert ours == pytest.approx(expected, abs=1e-12)

    report = evaluation.per_label_report(ids(truth), ids(predicted), k)
    for ours_column, theirs in zip(("precision", "recall", "f1", "support"), precision_recall_fscore_support(truth, predicted, zero_division=0)):
        np.testing.assert_allclose(report[ours_column], theirs, atol=1e-12)
    # tp, fp, fn, tn add up to the examples, per label.
    np.testing.assert_array_equal(report["tp"] + report["fp"] + report["fn"] + report["tn"], [40] * k)
    np.testing.assert_array_equal(report["tp"], (truth & predicted).sum(0))


def test_multi_label_with_no_label_anywhere_scores_zero_not_nan() -> None:
    metrics = evaluation.compute_metrics([[], []], [[], []], [0.1, 0.3], 3, multi_label=True)
    assert metrics["accuracy"] == 1.0  # both empty sets are right
    assert metrics["f1"] == metrics["micro_f1"] == f1_score(np.zeros((2, 3)), np.zeros((2, 3)), average="micro", zero_division=0) == 0.0


def test_single_label_objective_is_cross_entropy_softmax_argmax() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.1, 3.0]])
    labels = torch.tensor([1, 2])
    objective = Objective(SINGLE_LABEL, 3)
    assert objective.loss(logits, labels).tolist() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels, reduction="none").tolist())
    assert objective.decide(logits[0]) == 0 and objective.decide(logits[1]) == 2
    assert objective.probabilities(logits).sum(-1).tolist() == pytest.approx([1.0, 1.0])


def test_multi_label_objective_is_bce_sigmoid_threshold() -> None:
    logits = torch.tensor([[2.0, -0.5, 0.0], [-3.0, -1.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    objective = Objective(MULTI_LABEL, 3)
    # Mean over labels per example, by hand.
    p = torch.sigmoid(logits)
    by_hand = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean(-1)
    assert objective.loss(logits, targets).tolist() == pytest.approx(by_hand.tolist(), abs=1e-6)
    assert objective.decide(logits[0]) == [0, 2]  # sigmoid(0) = 0.5 reaches the default threshold
    assert objective.decide(logits[1]) == []  # nothing over the threshold: an empty prediction
    assert Objective(MULTI_LABEL, 3, threshold=0.6).decide(logits[0]) == [0]
    assert torch.allclose(objective.probabilities(logits), p)


def test_balanced_weights_single_label_are_sklearns() -> None:
    labels = [0, 0, 0, 1, 2, 2]
    weights = evaluation.balanced_weights(labels, 3, multi_label=False)
    np.testing.assert_allclose(weights.numpy(), compute_class_weight("balanced", classes=np.arange(3), y=labels), rtol=1e-6)
    # Each example's loss is weighted by its label's weight.
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 1])
    weighted = Objective(SINGLE_LABEL, 3, weights=weights).loss(logits, target)
    plain = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert weighted.tolist() == pytest.approx((plain * torch.tensor([6 / 9, 6 / 3])).tolist())


def test_balanced_weights_multi_label_are_pos_weight() -> None:
    labels = [[0], [0, 1], [], [0]]  # label 0 in 3 of 4 rows, label 1 in 1, label 2 in none (counted as 1)
    weights = evaluation.balanced_weights(labels, 3, multi_label=True)
    assert weights.tolist() == pytest.approx([1 / 3, 3 / 1, 3 / 1])
    logits, targets = torch.tensor([[0.3, -0.2, 1.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    loss = Objective(MULTI_LABEL, 3, weights=weights).loss(logits, targets)
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=weights)(logits, targets)  # mean over the labels of one example
    assert loss.item() == pytest.approx(expected.item())


def test_objective_from_a_saved_config() -> None:
    class Config:
        num_labels = 4

    assert Objective.from_config(Config()) == Objective(SINGLE_LABEL, 4)  # a model saved before problem_type: single-label
    config = Config()
    Objective(MULTI_LABEL, 4, threshold=0.3).record_in(config)
    assert config.problem_type == MULTI_LABEL and config.threshold == 0.3
    assert Objective.from_config(config) == Objective(MULTI_LABEL, 4, threshold=0.3)


@pytest.mark.parametrize(("epoch", "best_epoch", "patience", "stop"), [(3, 1, 2, True), (3, 2, 2, False), (9, 0, 0, False), (1, 0, 1, True)])
def test_early_stop(epoch: int, best_epoch: int, patience: int, stop: bool) -> None:
    assert evaluation.early_stop(epoch, best_epoch, patience) is stop


def test_the_metrics_module_does_not_import_sklearn() -> None:
    """scikit-learn costs about 1 s at start-up: the metrics are numpy, and this test proves them equal to sklearn's."""
    code = "import sys, data, evaluation, runs; print('sklearn' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "False"
