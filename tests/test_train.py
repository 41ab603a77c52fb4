"""train.py end to end on the tiny model, and each of the reference's bugs pinned."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import aggregate
import data
import evaluation
import modeling
import runs
import tokenization
import train
import utils
from conftest import read_csv
from utils import InputError

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = {
    "config.json", "log.csv", "val-metrics.json", "test-metrics.json",
    "test-predictions.jsonl", "test-per-class.csv", "test-confusion-matrix.csv", "model",
    "curves.png", "test-confusion-matrix.png",
}  # fmt: skip


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --- one finished run ------------------------------------------------------------------------


def test_run_folder_has_every_file(finished_run: Path, tiny_model_dir: Path) -> None:
    assert {p.name for p in finished_run.iterdir()} == RUN_FILES
    # OUTPUT_ROOT/<model>/<YYYY-MM-DD>/<HH-MM-SS.ffffff>, a local model named by its folder.
    model, date, clock = finished_run.parts[-3:]
    assert model == tiny_model_dir.name
    assert len(date) == 10 and date[4] == date[7] == "-"
    assert len(clock) == 15 and clock[8] == "."


def test_log_has_a_row_per_evaluation(finished_run: Path) -> None:
    rows = read_csv(finished_run / "log.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(11))  # before training, then 10 epochs
    assert list(rows[0]) == [
        "epoch", "train_loss", "loss", "accuracy", "precision", "recall", "f1", "lr", "seconds", "examples_per_s", "tokens_per_s",
    ]  # fmt: skip
    assert math.isnan(float(rows[0]["train_loss"]))
    assert all(float(r["train_loss"]) > 0 and float(r["examples_per_s"]) > 0 for r in rows[1:])
    assert float(rows[-1]["lr"]) == 0.0  # linear decay ends at zero


def test_best_epoch_weights_are_the_ones_evaluated(finished_run: Path) -> None:
    rows = read_csv(finished_run / "log.csv")
    f1s = [float(r["f1"]) for r in rows]
    best_epoch = f1s.index(max(f1s))  # the first epoch that reached the best F1
    val = read_json(finished_run / "val-metrics.json")
    assert val["best-epoch"] == best_epoch
    # Re-evaluated with the restored weights, val gives exactly what that epoch logged.
    for key in ("loss", "accuracy", "f1"):
        assert val[key] == pytest.approx(float(rows[best_epoch][key]), abs=1e-6)


def test_the_tiny_model_learns(finished_run: Path) -> None:
    test = read_json(finished_run / "test-metrics.json")
    assert set(test) == {"loss", "accuracy", "precision", "recall", "f1"}
    assert test["accuracy"] >= 0.6  # chance is 1/9; the tiny model reaches 0.85-1.0 here
    assert test["f1"] >= 0.5


def test_metrics_agree_with_the_predictions(finished_run: Path, dataset_dir: Path) -> None:
    predictions = utils.load_jsonl(finished_run / "test-predictions.jsonl")
    test_rows = utils.load_jsonl(dataset_dir / "test.jsonl")
    assert [p["id"] for p in predictions] == [r["id"] for r in test_rows]  # every test example, once, in order
    assert [p["label"] for p in predictions] == [r["label"] for r in test_rows]
    for p in predictions:
        assert len(p["probs"]) == 9 and sum(p["probs"]) == pytest.approx(1.0, abs=1e-5)
        assert p["pred"] == max(range(9), key=lambda i: p["probs"][i])

    labels, preds = [p["label"] for p in predictions], [p["pred"] for p in predictions]
    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, labels=list(range(9)), average="macro", zero_division=0)
    loss = sum(-math.log(p["probs"][p["label"]]) for p in predictions) / len(predictions)
    assert read_json(finished_run / "test-metrics.json") == pytest.approx(
        {"loss": loss, "accuracy": accuracy_score(labels, preds), "precision": precision, "recall": recall, "f1": f1}, rel=1e-5
    )


def test_per_class_report_and_confusion_matrix(finished_run: Path) -> None:
    predictions = utils.load_jsonl(finished_run / "test-predictions.jsonl")
    report = read_csv(finished_run / "test-per-class.csv")
    assert [r["category"] for r in report][:2] == ["dokujo-tsushin", "it-life-hack"] and len(report) == 9
    assert sum(int(r["support"]) for r in report) == len(predictions)
    matrix = read_csv(finished_run / "test-confusion-matrix.csv")
    assert list(matrix[0])[1:] == [r["category"] for r in report]
    diagonal = sum(int(row[row["true \\ predicted"]]) for row in matrix)
    assert diagonal == sum(p["label"] == p["pred"] for p in predictions)


def test_config_is_written_with_json_types_and_rebuilds_the_args(finished_run: Path) -> None:
    config = read_json(finished_run / "config.json")
    assert isinstance(config["lr"], float) and config["lr"] == 5e-3
    assert isinstance(config["batch_size"], int) and config["batch_size"] == 8
    assert config["gradient_checkpointing"] is False and config["save_model"] is True
    assert config["text_fields"] == ["title", "body"]
    assert isinstance(config["dataset_dir"], str)
    assert config["num_labels"] == 9 and config["num_params"] > 10_000
    assert config["environment"]["device"] == "cpu" and config["environment"]["world_size"] == 1
    assert config["environment"]["torch"] == torch.__version__
    assert config["run_dir"] == str(finished_run)
    # The runtime options, as train.py declares them; the same split as aggregate.py's list for older runs.
    assert config["runtime_options"] == list(train.RUNTIME_OPTIONS) == list(train.Runtime.__annotations__)
    assert set(config["runtime_options"]) == {*aggregate.OLD_RUNTIME_OPTIONS, "checkpoint", "resume"}
    # Enough to re-run: the arguments parse back to the same values.
    fields = train.Args().parse_args([]).as_dict().keys()
    rebuilt = train.Args().parse_args([]).from_dict({k: config[k] for k in fields})
    assert {k: str(v) if isinstance(v, Path) else v for k, v in rebuilt.as_dict().items()} == {k: config[k] for k in fields}


def test_config_records_what_the_dataset_is(finished_run: Path, dataset_dir: Path, tmp_path: Path) -> None:
    """aggregate.py tells tasks apart by it, also for runs copied to a machine without the dataset."""
    assert read_json(finished_run / "config.json")["dataset"] == read_json(dataset_dir / "dataset.json")
    older = tmp_path / "older"  # prepared before prepare.py wrote dataset.json: the label names alone
    older.mkdir()
    assert data.load_description(older, {"b": 1, "a": 0, "c": 2}) == {"labels": ["a", "b", "c"]}


def test_config_is_written_before_training(make_train_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("crashed while tokenising")

    monkeypatch.setattr(tokenization, "tokenize_splits", crash)
    with pytest.raises(RuntimeError):
        train.main(make_train_args(tmp_path))
    (run_dir,) = (tmp_path).glob("*/*/*")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]  # says what it was, and is not finished
    assert read_json(run_dir / "config.json")["lr"] == 5e-3


# --- determinism and devices -----------------------------------------------------------------


def test_same_seed_same_metrics_without_touching_cuda(make_train_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CUDA function was called on a CPU run")

    # A machine without CUDA: --device auto must pick the CPU and call nothing else of CUDA's.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("is_bf16_supported", "get_device_name", "set_device", "synchronize", "max_memory_allocated", "init"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    runs = [train.main(make_train_args(tmp_path / str(i), "--epochs", "2", "--device", "auto")) for i in range(2)]
    assert read_json(runs[0] / "config.json")["environment"]["device"] == "cpu"
    assert read_json(runs[0] / "test-metrics.json") == read_json(runs[1] / "test-metrics.json")
    assert (runs[0] / "test-predictions.jsonl").read_bytes() == (runs[1] / "test-predictions.jsonl").read_bytes()
    metric_columns = ("epoch", "train_loss", "loss", "accuracy", "precision", "recall", "f1", "lr")
    logs = [[[row[c] for c in metric_columns] for row in read_csv(run / "log.csv")] for run in runs]
    assert logs[0] == logs[1]
    other = train.main(make_train_args(tmp_path / "other", "--epochs", "2", "--seed", "7"))
    assert (other / "test-predictions.jsonl").read_bytes() != (runs[0] / "test-predictions.jsonl").read_bytes()


def test_auto_dtype_is_fp32_off_cuda() -> None:
    assert modeling.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert modeling.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_run_dir_names() -> None:
    from datetime import datetime

    now = datetime(2026, 1, 2, 3, 4, 5, 678)
    assert runs.run_dir_name("cl-tohoku/bert-base-japanese-v3", now) == Path(
        "cl-tohoku__bert-base-japanese-v3", "2026-01-02", "03-04-05.000678"
    )


def test_a_run_folder_is_never_reused(tmp_path: Path) -> None:
    folders = {runs.make_run_dir(tmp_path, "some/model") for _ in range(20)}
    assert len(folders) == 20


# --- the reference's bugs --------------------------------------------------------------------


def test_biases_and_layernorm_weights_get_no_weight_decay() -> None:
    """The reference compared whole names with {"bias", "LayerNorm.weight"}: nothing matched."""
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=9)
    model = BertForSequenceClassification(config)
    groups, summary = modeling.param_groups(model, weight_decay=0.01)
    by_id = {id(p): name for name, p in model.named_parameters()}
    decayed = {by_id[id(p)] for p in groups[0]["params"]}
    not_decayed = {by_id[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert not_decayed == {n for n in by_id.values() if n.endswith(".bias") or n.endswith("LayerNorm.weight")}
    assert {"bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"} <= decayed
    assert len(decayed) + len(not_decayed) == len(by_id)
    assert summary.startswith(f"weight decay 0.01 on {len(decayed)} tensors")
    # The rule is structural: a compiled model's parameters split the same way.
    compiled_groups, _ = modeling.param_groups(torch.compile(model), weight_decay=0.01)
    assert [len(g["params"]) for g in compiled_groups] == [len(g["params"]) for g in groups]


def test_evaluation_loss_is_the_mean_over_examples(tiny_model_dir: Path, dataset_dir: Path) -> None:
    """The reference divided the LAST batch's loss by the set size."""
    label2id = data.load_label2id(dataset_dir)
    tokenizer, model = modeling.load_model(str(tiny_model_dir), label2id)
    rows = data.load_split(dataset_dir, "val", ["title", "body"], 9)
    examples = tokenization.encode_slow(tokenizer, tokenization.texts_of(rows, ["title", "body"]), 64, True).examples([r["label"] for r in rows])
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    pad = lambda batch: data.collate(batch, tokenizer.pad_token_id)  # noqa: E731

    results = []
    for batch_size, ordered in ((4, data.shard_by_length(examples, 0, 1)), (5, examples), (27, examples)):
        loader = DataLoader(ordered, batch_size=batch_size, collate_fn=pad)
        results.append(evaluation.evaluate(model, loader, torch.device("cpu"), no_autocast, 1, 9)[0])
    # 27 examples in batches of 4 or 5 (length-sorted or not): the same mean as in one batch.
    for metrics in results[:2]:
        assert metrics == pytest.approx(results[2], abs=1e-6)
    with torch.no_grad():
        batch = pad(examples)
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "index")}).logits
        assert results[2]["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, batch["labels"]).item(), abs=1e-6)


def test_pairs_keep_their_segment_ids(tiny_model_dir: Path) -> None:
    """transformers 5 drops token_type_ids unless asked; BERT pairs need them."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = tokenization.encode_slow(tokenizer, [["映画の監督", "俳優について主演の公開が話題になっている。"]], 64, token_type_ids=True).example(0)
    types = example["token_type_ids"]
    first_sep = example["input_ids"].index(tokenizer.sep_token_id)
    assert types == [0] * (first_sep + 1) + [1] * (len(types) - first_sep - 1)
    assert tokenization.wants_token_type_ids(BertConfig(type_vocab_size=2), ["title", "body"])
    assert not tokenization.wants_token_type_ids(BertConfig(type_vocab_size=1), ["title", "body"])  # RoBERTa-like
    assert not tokenization.wants_token_type_ids(BertConfig(type_vocab_size=2), ["text"])


def test_only_the_body_is_truncated(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    title, body = "映画の監督", "俳優について主演の公開が話題になっている。" * 40
    example = tokenization.encode_slow(tokenizer, [[title, body]], 32, token_type_ids=True).example(0)
    assert len(example["input_ids"]) == 32
    title_ids = tokenizer(title, add_special_tokens=False)["input_ids"]
    assert example["input_ids"][1 : 1 + len(title_ids)] == title_ids


def test_collate_pads_to_the_longest_of_the_batch() -> None:
    batch = data.collate(
        [{"input_ids": [2, 5, 3], "token_type_ids": [0, 0, 0], "label": 1, "index": 0},
         {"input_ids": [2, 3], "token_type_ids": [0, 0], "label": 4, "index": 1}],
        pad_token_id=0,
    )  # fmt: skip
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 4]


def test_single_text_field(make_train_args, tmp_path: Path) -> None:
    run_dir = train.main(make_train_args(tmp_path, "--text_fields", "body", "--epochs", "1"))
    assert read_json(run_dir / "config.json")["text_fields"] == ["body"]
    assert (run_dir / "test-metrics.json").exists()


# --- bad input -------------------------------------------------------------------------------


def copy_dataset(dataset_dir: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "label2id.json"):
        (target / name).write_bytes((dataset_dir / name).read_bytes())
    return target


def test_missing_dataset_says_to_run_prepare(make_train_args, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"label2id.json not found: run `poetry run python src/prepare.py` first"):
        train.main(make_train_args(tmp_path, "--dataset_dir", str(tmp_path / "missing")))


def test_missing_split_says_to_run_prepare(make_train_args, dataset_dir: Path, tmp_path: Path) -> None:
    dataset = copy_dataset(dataset_dir, tmp_path / "data")
    (dataset / "val.jsonl").unlink()
    with pytest.raises(InputError, match=r"val.jsonl not found: run `poetry run python src/prepare.py` first"):
        train.main(make_train_args(tmp_path, "--dataset_dir", str(dataset)))


def test_malformed_jsonl_names_file_and_line(make_train_args, dataset_dir: Path, tmp_path: Path) -> None:
    dataset = copy_dataset(dataset_dir, tmp_path / "data")
    lines = (dataset / "train.jsonl").read_text(encoding="utf-8").splitlines()
    lines[4] = lines[4][:-1]
    (dataset / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"{dataset / 'train.jsonl'}: line 5: not valid JSON"):
        train.main(make_train_args(tmp_path / "out", "--dataset_dir", str(dataset)))
    assert not (tmp_path / "out").exists()


def test_unknown_label_names_file_and_line(make_train_args, dataset_dir: Path, tmp_path: Path) -> None:
    dataset = copy_dataset(dataset_dir, tmp_path / "data")
    rows = utils.load_jsonl(dataset / "test.jsonl")
    rows[2]["label"] = 9
    utils.save_jsonl(rows, dataset / "test.jsonl")
    with pytest.raises(InputError, match=rf"{dataset / 'test.jsonl'}: line 3: label 9 is not an id of label2id.json \(0-8\)"):
        train.main(make_train_args(tmp_path / "out", "--dataset_dir", str(dataset)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda row: row.update(label=True), r"line 3: label true is not an id of label2id.json \(0-8\)"),
        (lambda row: row.update(title=None), r"line 3: title must be a string, got null"),
        (lambda row: row.update(body=12), r"line 3: body must be a string, got 12"),
        (lambda row: row.pop("id"), r"line 3: missing field\(s\) id$"),
    ],
    ids=["true as a label", "null title", "number as body", "no id"],
)
def test_values_of_the_wrong_type_name_file_and_line(change, message: str, dataset_dir: Path, tmp_path: Path) -> None:
    """true is an int in Python and str(None) is "None": neither may pass as a label or a text."""
    dataset = copy_dataset(dataset_dir, tmp_path / "data")
    rows = utils.load_jsonl(dataset / "val.jsonl")
    change(rows[2])
    utils.save_jsonl(rows, dataset / "val.jsonl")
    with pytest.raises(InputError, match=rf"^{re.escape(str(dataset / 'val.jsonl'))}: {message}"):
        data.load_split(dataset, "val", ["title", "body"], 9)


def test_model_that_cannot_be_loaded_offline(make_train_args, tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        train.main(make_train_args(tmp_path, "--model_name", "cl-tohoku/no-such-model-here"))
    assert "cannot load model 'cl-tohoku/no-such-model-here'" in str(e.value)
    assert "--model_name path/to/model" in str(e.value)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_diverging_loss_stops_the_run(make_train_args, tmp_path: Path) -> None:
    with pytest.raises(train.TrainingError, match=r"the loss became (nan|inf) in epoch 1: lower --lr"):
        train.main(make_train_args(tmp_path, "--lr", "1e20", "--num_warmup_epochs", "0", "--max_grad_norm", "0"))
    (run_dir,) = tmp_path.glob("*/*/*")
    assert not (run_dir / "test-metrics.json").exists()


def test_command_line_errors_are_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "src" / "train.py"), "--dataset_dir", str(tmp_path / "none")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none' / 'label2id.json'} not found: run `poetry run python src/prepare.py` first (or see README for other datasets)"
    ]
    assert not (tmp_path / "outputs").exists()
