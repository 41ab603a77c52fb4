"""train.py end to end on the tiny model, and each of the reference's bugs pinned."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
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
import train_options
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
    assert config["runtime_options"] == list(train_options.RUNTIME_OPTIONS) == list(train_options.Runtime.__annotations__)
    assert set(config["runtime_options"]) == {*aggregate.OLD_RUNTIME_OPTIONS, "checkpoint", "resume"}
    # A stable order, whatever the hash seed: the settings as Args declares them, then the runtime options, then derived fields.
    declared = [*train_options.Args.__annotations__, *train_options.Runtime.__annotations__]
    assert list(config)[: len(declared)] == declared
    assert list(config)[len(declared) :][:2] == ["runtime_options", "world_size"]
    # Enough to re-run: the arguments parse back to the same values.
    fields = train_options.Args().parse_args([]).as_dict().keys()
    rebuilt = train_options.Args().parse_args([]).from_dict({k: config[k] for k in fields})
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
    layout = tokenization.InputLayout(("title", "body"), 64)
    examples = tokenization.SlowEncoder(tokenizer, "test")(tokenization.texts_of(rows, layout.text_fields), layout, True).examples([r["label"] for r in rows])
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    pad = lambda batch: data.collate(batch, tokenizer.pad_token_id)  # noqa: E731

    results = []
    for batch_size, ordered in ((4, data.shard_by_length(examples, 0, 1)), (5, examples), (27, examples)):
        loader = DataLoader(ordered, batch_size=batch_size, collate_fn=pad)
        results.append(evaluation.evaluate(model, loader, torch.device("cpu"), no_autocast, 1, evaluation.Objective(num_labels=9))[0])
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
    texts = [["映画の監督", "俳優について主演の公開が話題になっている。"]]
    example = tokenization.SlowEncoder(tokenizer, "test")(texts, tokenization.InputLayout(("title", "body"), 64), token_type_ids=True).example(0)
    types = example["token_type_ids"]
    first_sep = example["input_ids"].index(tokenizer.sep_token_id)
    assert types == [0] * (first_sep + 1) + [1] * (len(types) - first_sep - 1)
    assert tokenization.wants_token_type_ids(BertConfig(type_vocab_size=2), ["title", "body"])
    assert not tokenization.wants_token_type_ids(BertConfig(type_vocab_size=1), ["title", "body"])  # RoBERTa-like
    assert not tokenization.wants_token_type_ids(BertConfig(type_vocab_size=2), ["text"])


def test_only_the_body_is_truncated(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    title, body = "映画の監督", "俳優について主演の公開が話題になっている。" * 40
    example = tokenization.SlowEncoder(tokenizer, "test")([[title, body]], tokenization.InputLayout(("title", "body"), 32), token_type_ids=True).example(0)
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


@pytest.mark.parametrize("name", ["models/tiny-luke", "./tiny-luke", "/tmp/no-such-model-here", "~/no-such-model-here"])
def test_a_missing_model_folder_is_named(name: str, make_train_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # models/ exists, models/tiny-luke does not: a mistyped local folder, not a hub name
    with pytest.raises(InputError) as e:
        train.main(make_train_args(tmp_path / "outputs", "--model_name", name))
    assert str(e.value).startswith(f"model folder {name} not found: ")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "outputs").exists()


def test_hub_names_are_not_taken_for_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert not modeling.looks_like_path("cl-tohoku/bert-base-japanese-v3")  # no cl-tohoku/ folder here
    assert not modeling.looks_like_path("bert-base-uncased")
    (tmp_path / "cl-tohoku").mkdir()
    assert modeling.looks_like_path("cl-tohoku/bert-base-japanese-v3")


class RecordWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """transformers' warnings as a user without .envrc sees them (tests otherwise run with TRANSFORMERS_VERBOSITY=error)."""
    root = transformers.utils.logging.get_logger()
    handler = RecordWarnings()
    level = root.level
    # setLevel, not the attribute: it clears the levels that loggers cached (a run earlier in the session cached ERROR).
    root.setLevel(logging.WARNING)
    root.addHandler(handler)
    yield handler.messages
    root.removeHandler(handler)
    root.setLevel(level)


def test_no_load_report_for_the_new_head(tiny_model_dir: Path, dataset_dir: Path, transformers_warnings: list[str], capsys) -> None:
    label2id = data.load_label2id(dataset_dir)
    transformers.utils.logging.get_logger("transformers.modeling_utils").warning("a real warning")  # still shows
    modeling.load_model(str(tiny_model_dir), label2id)
    assert transformers_warnings == ["a real warning"]  # no LOAD REPORT table
    assert "new classification head (randomly initialised): classifier.bias, classifier.weight" in capsys.readouterr().out


def test_encoder_weights_missing_from_the_checkpoint_are_a_warning(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    dropped = next(key for key in weights if "encoder.layer.0.attention.self.query.weight" in key)
    del weights[dropped]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    modeling.load_model(str(broken), data.load_label2id(dataset_dir))
    out = capsys.readouterr().out
    assert "warning: 1 encoder weight(s) are not in the checkpoint" in out
    assert "bert.encoder.layer.0.attention.self.query.weight" in out


def test_no_progress_bar_frames_when_the_output_is_not_a_terminal(make_train_args, tmp_path: Path, capfd) -> None:
    train.main(make_train_args(tmp_path, "--epochs", "2"))
    out, err = capfd.readouterr()
    assert "\r" not in out + err and "\x1b[A" not in out + err  # no bar frames in a log file
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == ["0", "1", "2"]  # a line per evaluation


def test_progress_bars_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert utils.show_progress()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not utils.show_progress()


@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (3, 10), (10, 10), (12, 10)])
def test_linear_schedule_is_transformers_one(warmup: int, total: int) -> None:
    from transformers.optimization import get_linear_schedule_with_warmup

    def lrs(make) -> list[float]:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-5)
        scheduler = make(optimizer, warmup, total)
        values = []
        for _ in range(total + 2):
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return values

    assert lrs(train.linear_schedule) == pytest.approx(lrs(get_linear_schedule_with_warmup), abs=0, rel=1e-12)


def test_diverging_loss_stops_the_run(make_train_args, tmp_path: Path) -> None:
    with pytest.raises(train.TrainingError, match=r"the loss became (nan|inf) in epoch 1: lower --lr") as e:
        train.main(make_train_args(tmp_path, "--lr", "1e20", "--num_warmup_epochs", "0", "--max_grad_norm", "0"))
    assert "--dtype" not in str(e.value)  # the run is already fp32 (CPU): no other precision to suggest
    (run_dir,) = tmp_path.glob("*/*/*")
    assert not (run_dir / "test-metrics.json").exists()


def test_each_step_loss_is_read_once_the_next_step_is_queued(make_train_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a loss waits for the device: read before the next step is queued, it would leave a GPU idle at every step."""
    events: list[str] = []
    optimizer_step, read_step = train.optimizer_step, train.read_step
    monkeypatch.setattr(train, "optimizer_step", lambda *args: (events.append("step"), optimizer_step(*args))[1])
    monkeypatch.setattr(train, "read_step", lambda *args: (events.append("read"), read_step(*args))[1])
    run_dir = train.main(make_train_args(tmp_path, "--epochs", "1"))
    steps = events.count("step")
    assert steps >= 3 and events == ["step"] + ["step", "read"] * (steps - 1) + ["read"]  # every step read, the last at the epoch's end
    (row,) = [row for row in read_csv(run_dir / "log.csv") if row["epoch"] == "1"]
    assert math.isfinite(float(row["train_loss"]))


def test_divergence_hint_suggests_only_what_applies() -> None:
    assert train.divergence_hint(torch.float32) == "lower --lr (or clip with --max_grad_norm 1.0)"
    assert train.divergence_hint(torch.bfloat16).endswith("or use --dtype fp32")
    assert "--dtype bf16" in train.divergence_hint(torch.float16)


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


# --- multi-label, class weights, early stopping (issue 15) -------------------------------------


def test_multi_label_run_files_and_config(multi_label_run: Path) -> None:
    names = {p.name for p in multi_label_run.iterdir()}
    # Per-label counts (TP/FP/FN/TN) in place of the single-label confusion matrix.
    assert names == RUN_FILES - {"test-confusion-matrix.csv", "test-confusion-matrix.png"} | {"test-label-counts.csv", "test-label-counts.png"}
    config = read_json(multi_label_run / "config.json")
    assert config["problem_type"] == "multi_label_classification" and config["num_labels"] == 10
    assert config["threshold"] == 0.5 and config["class_weights"] == "balanced" and config["early_stopping_patience"] == 0
    saved = read_json(multi_label_run / "model" / "config.json")  # predict.py and plain transformers know the task
    assert saved["problem_type"] == "multi_label_classification" and saved["threshold"] == 0.5


def test_multi_label_metrics_agree_with_the_predictions(multi_label_run: Path, multi_label_dataset: Path) -> None:
    predictions = utils.load_jsonl(multi_label_run / "test-predictions.jsonl")
    test_rows = utils.load_jsonl(multi_label_dataset / "test.jsonl")
    assert [p["label"] for p in predictions] == [r["label"] for r in test_rows]  # lists of ids, as in the dataset
    for p in predictions:
        assert len(p["probs"]) == 10 and all(0 < q < 1 for q in p["probs"])  # sigmoid, not softmax
        assert p["pred"] == [i for i, q in enumerate(p["probs"]) if q >= 0.5]
    truth = [[int(i in p["label"]) for i in range(10)] for p in predictions]
    predicted = [[int(i in p["pred"]) for i in range(10)] for p in predictions]
    expected = {"accuracy": accuracy_score(truth, predicted)}  # subset accuracy
    for prefix, average in (("", "macro"), ("micro_", "micro")):
        p_, r_, f_, _ = precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
        expected.update({f"{prefix}precision": p_, f"{prefix}recall": r_, f"{prefix}f1": f_})
    # The loss by hand: BCE with pos_weight = n_negative / n_positive per label over train, mean over labels, then over examples.
    train_rows = utils.load_jsonl(multi_label_dataset / "train.jsonl")
    positives = [max(sum(i in r["label"] for r in train_rows), 1) for i in range(10)]
    pos_weight = [(len(train_rows) - n) / n for n in positives]
    expected["loss"] = sum(
        -sum(pos_weight[i] * y[i] * math.log(p["probs"][i]) + (1 - y[i]) * math.log(1 - p["probs"][i]) for i in range(10)) / 10
        for p, y in zip(predictions, truth)
    ) / len(predictions)
    metrics = read_json(multi_label_run / "test-metrics.json")
    assert metrics == pytest.approx(expected, rel=1e-4)
    assert metrics["micro_f1"] >= 0.6  # the tiny model learns the task (category + group label)


def test_multi_label_log_and_per_label_tables(multi_label_run: Path) -> None:
    rows = read_csv(multi_label_run / "log.csv")
    assert {"micro_precision", "micro_recall", "micro_f1"} <= set(rows[0])
    f1s = [float(r["f1"]) for r in rows]
    assert read_json(multi_label_run / "val-metrics.json")["best-epoch"] == f1s.index(max(f1s))  # still by macro-F1
    predictions = utils.load_jsonl(multi_label_run / "test-predictions.jsonl")
    counts = read_csv(multi_label_run / "test-label-counts.csv")
    assert [r["category"] for r in counts][-1] == "group-a" and list(counts[0]) == ["category", "tp", "fp", "fn", "tn"]
    for i, row in enumerate(counts):
        assert int(row["tp"]) == sum(i in p["label"] and i in p["pred"] for p in predictions)
        assert int(row["fn"]) == sum(i in p["label"] and i not in p["pred"] for p in predictions)
        assert sum(int(row[c]) for c in ("tp", "fp", "fn", "tn")) == len(predictions)
    report = read_csv(multi_label_run / "test-per-class.csv")
    assert [int(r["support"]) for r in report] == [int(r["tp"]) + int(r["fn"]) for r in counts]


@pytest.fixture(scope="session")
def stopped_run(make_train_args, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that cannot improve (lr 0) on an imbalanced copy of the dataset, with balanced class
    weights and a patience of 2: it stops after epoch 2 of 6."""
    dataset = copy_dataset(dataset_dir, tmp_path_factory.mktemp("data") / "imbalanced")
    rows = utils.load_jsonl(dataset / "train.jsonl")
    kept = [r for r in rows if r["label"] != 0] + [r for r in rows if r["label"] == 0][:5]
    utils.save_jsonl(kept, dataset / "train.jsonl")
    args = ["--dataset_dir", str(dataset), "--lr", "0", "--epochs", "6", "--early_stopping_patience", "2", "--class_weights", "balanced"]
    return train.main(make_train_args(tmp_path_factory.mktemp("outputs"), *args))


def test_early_stopping_ends_the_log_where_the_run_stopped(stopped_run: Path, capsys: pytest.CaptureFixture) -> None:
    rows = read_csv(stopped_run / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # F1 never beats epoch 0's: two evaluations without improvement
    assert read_json(stopped_run / "val-metrics.json")["best-epoch"] == 0
    config = read_json(stopped_run / "config.json")
    assert config["early_stopping_patience"] == 2 and "early_stopping_patience" not in config["runtime_options"]
    assert (stopped_run / "test-metrics.json").is_file()  # a stopped run is a finished run


def test_early_stopping_is_printed(make_train_args, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train.main(make_train_args(tmp_path, "--lr", "0", "--epochs", "3", "--early_stopping_patience", "1"))
    assert "early stopping after epoch 1 of 3: val macro-F1 has not improved for 1 evaluation(s) since epoch 0" in capsys.readouterr().out
    (run_dir,) = tmp_path.glob("*/*/*")
    assert [int(r["epoch"]) for r in read_csv(run_dir / "log.csv")] == [0, 1]


def test_balanced_class_weights_weigh_the_loss(stopped_run: Path) -> None:
    """The test loss is the mean of -w[label] log p[label], w = n / (K x n_label) over train, computed here by hand."""
    config = read_json(stopped_run / "config.json")
    assert config["class_weights"] == "balanced" and "class_weights" not in config["runtime_options"]
    train_labels = [r["label"] for r in utils.load_jsonl(Path(config["dataset_dir"]) / "train.jsonl")]
    weights = [len(train_labels) / (9 * train_labels.count(c)) for c in range(9)]
    assert weights[0] > 4 * weights[1]  # the rare class weighs more
    predictions = utils.load_jsonl(stopped_run / "test-predictions.jsonl")
    weighted = sum(-weights[p["label"]] * math.log(p["probs"][p["label"]]) for p in predictions) / len(predictions)
    plain = sum(-math.log(p["probs"][p["label"]]) for p in predictions) / len(predictions)
    loss = read_json(stopped_run / "test-metrics.json")["loss"]
    assert loss == pytest.approx(weighted, rel=1e-5) and loss != pytest.approx(plain, rel=1e-3)


def test_mixed_or_invalid_multi_labels_name_file_and_line(multi_label_dataset: Path, tmp_path: Path) -> None:
    dataset = copy_dataset(multi_label_dataset, tmp_path / "data")
    rows = utils.load_jsonl(dataset / "val.jsonl")
    for change, message in [
        (4, r"line 4: label 4 mixes task types: line 1 and the rows before this one have lists of ids \(multi-label\)"),
        ([1, 10], r"line 4: label \[1, 10\] is not a list of ids of label2id.json \(0-9\)"),
        ([2, 2], r"line 4: label \[2, 2\] repeats an id"),
        ([True], r"line 4: label \[true\] is not a list of ids"),
    ]:
        utils.save_jsonl([*rows[:3], {**rows[3], "label": change}, *rows[4:]], dataset / "val.jsonl")
        with pytest.raises(InputError, match=rf"^{re.escape(str(dataset / 'val.jsonl'))}: {message}"):
            data.load_split(dataset, "val", ["title", "body"], 10)
    # An empty list is a valid multi-label row (none of the labels).
    utils.save_jsonl([{**rows[0], "label": []}, *rows[1:]], dataset / "val.jsonl")
    assert data.load_split(dataset, "val", ["title", "body"], 10)[0]["label"] == []


def test_splits_of_different_task_types_are_refused(make_train_args, dataset_dir: Path, multi_label_dataset: Path, tmp_path: Path) -> None:
    dataset = copy_dataset(multi_label_dataset, tmp_path / "data")
    single = utils.load_jsonl(dataset_dir / "test.jsonl")
    utils.save_jsonl(single, dataset / "test.jsonl")
    with pytest.raises(InputError, match=r"mix task types \(.*train.jsonl: lists of ids, .*test.jsonl: single ids\): prepare the dataset again"):
        train.main(make_train_args(tmp_path / "out", "--dataset_dir", str(dataset)))
    assert not (tmp_path / "out").exists()


def test_a_multi_label_csv_from_prepare_trains(make_train_args, dataset_dir: Path, tmp_path: Path) -> None:
    """prepare.py --input with --label_sep, then train.py: the user's path, Japanese column names included."""
    import prepare

    rows = utils.load_jsonl(dataset_dir / "all.jsonl")
    tags = lambda row: row["category"] + ("|グループ" if row["label"] < 3 else "")  # noqa: E731
    utils.save_csv(["タイトル", "本文", "タグ"], ([r["title"], r["body"], tags(r)] for r in rows), tmp_path / "tags.csv")
    prepare.main(prepare.Args().parse_args([
        "--input", str(tmp_path / "tags.csv"), "--text_fields", "タイトル", "本文", "--label_field", "タグ", "--label_sep", "|",
        "--output_dir", str(tmp_path / "tags"),
    ]))  # fmt: skip
    run_dir = train.main(make_train_args(tmp_path / "out", "--dataset_dir", str(tmp_path / "tags"), "--text_fields", "タイトル", "本文", "--epochs", "2"))
    assert read_json(run_dir / "config.json")["problem_type"] == "multi_label_classification"
    label2id = read_json(tmp_path / "tags" / "label2id.json")
    predictions = utils.load_jsonl(run_dir / "test-predictions.jsonl")
    assert all(isinstance(p["label"], list) and isinstance(p["pred"], list) for p in predictions)
    assert any(label2id["グループ"] in p["label"] for p in predictions)
    assert {"micro_f1", "f1", "accuracy"} <= set(read_json(run_dir / "test-metrics.json"))
