"""The saved model (train.py --save_model) and predict.py: plain transformers loads it, predict.py
reproduces the run's own test predictions from a file or stdin, and bad input fails clearly."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig

import data
import predict
import train
import utils
from tokenization import InputLayout
from utils import InputError

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = [
    "dokujo-tsushin", "it-life-hack", "kaden-channel", "livedoor-homme", "movie-enter",
    "peachy", "smax", "sports-watch", "topic-news",
]  # fmt: skip
MAX_SEQ_LEN = 64  # the fixture run's --max_seq_len (conftest.TINY_TRAINING)


def run_predict(model_dir: Path, *flags: str) -> list[dict]:
    return predict.main(predict.Args().parse_args(["--model_dir", str(model_dir), "--num_workers", "1", *flags]))


def plain_probs(model_dir: Path, rows: list[dict], text_fields: list[str]) -> list[list[float]]:
    """What a user gets with transformers alone (no project code), one example at a time."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    max_length = model.config.max_seq_len
    probs = []
    with torch.no_grad():
        for row in rows:
            if len(text_fields) == 2:
                inputs = tokenizer(row[text_fields[0]], row[text_fields[1]], truncation="only_second", max_length=max_length,
                                   return_token_type_ids=True, return_tensors="pt")  # fmt: skip
            else:
                inputs = tokenizer(row[text_fields[0]], truncation=True, max_length=max_length, return_tensors="pt")
            probs.append(torch.softmax(model(**inputs).logits[0], -1).tolist())
    return probs


def as_lists(predictions: list[dict]) -> list[list[float]]:
    """probs objects ({category: probability}) as lists in label-id order."""
    return [[p["probs"][name] for name in CATEGORIES] for p in predictions]


@pytest.fixture(scope="session")
def model_dir(finished_run: Path) -> Path:
    return finished_run / "model"


@pytest.fixture(scope="session")
def training_predictions(finished_run: Path) -> list[dict]:
    return utils.load_jsonl(finished_run / "test-predictions.jsonl")


@pytest.fixture(scope="session")
def test_rows(dataset_dir: Path) -> list[dict]:
    return utils.load_jsonl(dataset_dir / "test.jsonl")


# --- the saved model, with plain transformers ---------------------------------------------------


def test_saved_model_is_plain_transformers(model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(model_dir)
    assert config.id2label == dict(enumerate(CATEGORIES))
    assert config.label2id == {name: i for i, name in enumerate(CATEGORIES)}
    assert config.text_fields == ["title", "body"] and config.max_seq_len == MAX_SEQ_LEN
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if k.startswith(("_orig_mod.", "module.")) or "._orig_mod." in k]
    assert all(k.startswith(("bert.", "classifier.")) for k in keys)
    _, loading = AutoModelForSequenceClassification.from_pretrained(model_dir, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]


def test_plain_transformers_reproduces_the_run_predictions(model_dir: Path, test_rows: list[dict], training_predictions: list[dict]) -> None:
    probs = plain_probs(model_dir, test_rows, ["title", "body"])
    assert [max(range(9), key=row.__getitem__) for row in probs] == [p["pred"] for p in training_predictions]
    for ours, theirs in zip(probs, training_predictions):
        assert ours == pytest.approx(theirs["probs"], abs=1e-5)


# --- predict.py on a JSONL file -----------------------------------------------------------------


@pytest.fixture(scope="session")
def file_predictions(model_dir: Path, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    output = tmp_path_factory.mktemp("predict") / "out" / "predictions.jsonl"
    returned = run_predict(model_dir, "--input_file", str(dataset_dir / "test.jsonl"), "--output_file", str(output), "--batch_size", "4")
    written = utils.load_jsonl(output)
    assert written == json.loads(json.dumps(returned))
    return written


def test_file_predictions_equal_the_run_predictions(file_predictions: list[dict], training_predictions: list[dict]) -> None:
    assert [p["pred_id"] for p in file_predictions] == [p["pred"] for p in training_predictions]
    assert [p["pred"] for p in file_predictions] == [CATEGORIES[p["pred"]] for p in training_predictions]
    for ours, theirs in zip(file_predictions, training_predictions):
        assert list(ours["probs"]) == CATEGORIES
        assert as_lists([ours])[0] == pytest.approx(theirs["probs"], abs=1e-5)


def test_file_rows_are_carried_through_in_input_order(file_predictions: list[dict], test_rows: list[dict]) -> None:
    assert len(file_predictions) == len(test_rows)
    for ours, row in zip(file_predictions, test_rows):
        assert list(ours) == [*row, "pred", "pred_id", "probs"]  # every input field (id first), then the prediction
        assert {key: ours[key] for key in row} == row


def test_batches_are_sorted_by_length(model_dir: Path, dataset_dir: Path, test_rows: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[list[int]] = []
    lengths: dict[int, int] = {}
    real_collate = data.collate

    def spy(examples: list[dict], pad_token_id: int) -> dict:
        batches.append([e["index"] for e in examples])
        lengths.update({e["index"]: len(e["input_ids"]) for e in examples})
        return real_collate(examples, pad_token_id)

    monkeypatch.setattr(data, "collate", spy)
    out = run_predict(model_dir, "--input_file", str(dataset_dir / "test.jsonl"), "--output_file", str(tmp_path / "p.jsonl"), "--batch_size", "4")
    assert [len(b) for b in batches] == [4] * 6 + [3]
    order = [i for b in batches for i in b]
    assert sorted(order) == list(range(len(test_rows)))
    assert [lengths[i] for i in order] == sorted(lengths.values(), reverse=True)  # longest first
    assert order != list(range(len(test_rows)))  # so the sorting is real, and undoing it matters:
    assert [p["id"] for p in out] == [r["id"] for r in test_rows]


# --- predict.py on stdin ------------------------------------------------------------------------


def piped(data: str | bytes) -> io.TextIOWrapper:
    """A stand-in for a piped stdin: text over bytes, as the real one is."""
    return io.TextIOWrapper(io.BytesIO(data.encode("utf-8") if isinstance(data, str) else data))


def test_stdin_lines_give_the_same_predictions_as_jsonl(
    model_dir: Path, test_rows: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # A line holds no newline: bodies are joined; the last line has no TAB, so it is a body alone.
    rows = [{"title": r["title"], "body": r["body"].replace("\n", "")} for r in test_rows[:6]]
    rows[-1]["title"] = ""
    lines = [f"{r['title']}\t{r['body']}" for r in rows[:-1]] + [rows[-1]["body"]]
    utils.save_jsonl(rows, tmp_path / "in.jsonl")
    from_file = run_predict(model_dir, "--input_file", str(tmp_path / "in.jsonl"), "--output_file", str(tmp_path / "out.jsonl"))
    capsys.readouterr()

    monkeypatch.setattr(sys, "stdin", piped("".join(line + "\n" for line in lines)))
    run_predict(model_dir, "--batch_size", "4")
    captured = capsys.readouterr()
    from_stdin = [json.loads(line) for line in captured.out.splitlines()]  # stdout holds the predictions only
    assert [{"title": p["title"], "body": p["body"]} for p in from_stdin] == rows
    assert [p["pred"] for p in from_stdin] == [p["pred"] for p in from_file]
    for ours, theirs in zip(as_lists(from_stdin), as_lists(from_file)):
        assert ours == pytest.approx(theirs, abs=1e-6)
    assert "classified 6 rows from <stdin>" in captured.err


def test_a_single_text_model_reads_whole_lines(model_dir: Path, test_rows: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    single = shutil.copytree(model_dir, tmp_path / "model")
    config = utils.load_json(single / "config.json")
    utils.save_json({**config, "text_fields": ["text"]}, single / "config.json")
    rows = [{"text": f"{r['title']}\t{r['body'].replace(chr(10), '')}"} for r in test_rows[:4]]
    monkeypatch.setattr(sys, "stdin", piped("".join(r["text"] + "\n" for r in rows)))
    run_predict(single)
    from_stdin = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [{"text": p["text"]} for p in from_stdin] == rows  # the TAB is part of the one text
    for ours, theirs in zip(as_lists(from_stdin), plain_probs(single, rows, ["text"])):
        assert ours == pytest.approx(theirs, abs=1e-5)


def test_input_layout_comes_from_the_config() -> None:
    """InputLayout.of reads it (older configs: test_tokenization.py); predict.py names config.json in its errors."""
    assert predict.input_layout(PretrainedConfig(truncation="head_tail", head_tokens=20)) == InputLayout(("title", "body"), 512, "head_tail", 20)
    with pytest.raises(InputError, match="^config.json: text_fields must be one field name or two"):
        predict.input_layout(PretrainedConfig(text_fields=["a", "b", "c"]))
    with pytest.raises(InputError, match="^config.json: truncation must be one of head, tail, head_tail, got 'middle'$"):
        predict.input_layout(PretrainedConfig(truncation="middle"))


def test_predict_truncates_as_the_run_did(
    make_train_args, test_rows: list[dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A head_tail run's saved model records its layout; predict.py keeps the same ends of a long body as training."""
    run_dir = train.main(make_train_args(tmp_path / "out", "--truncation", "head_tail", "--max_seq_len", "32", "--epochs", "1", "--save_model"))
    saved = AutoConfig.from_pretrained(run_dir / "model")
    assert (saved.truncation, saved.head_tokens, saved.max_seq_len) == ("head_tail", 8, 32)  # 32 / 4
    capsys.readouterr()
    rows = [{**row, "body": row["body"] * 3} for row in test_rows[:5]]
    utils.save_jsonl(rows, tmp_path / "in.jsonl")
    predictions = run_predict(run_dir / "model", "--input_file", str(tmp_path / "in.jsonl"))
    err = capsys.readouterr().err
    assert "truncation head_tail: a body that does not fit keeps its first 8 tokens and the rest from its end" in err
    assert re.search(rf"{re.escape(str(tmp_path / 'in.jsonl'))}: 5 of 5 examples truncated \(100\.0%\) at 32 tokens, head_tail truncation", err)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    title_ids, body_ids = (tokenizer(rows[0][field], add_special_tokens=False)["input_ids"] for field in ("title", "body"))
    tail = 32 - 3 - len(title_ids) - 8
    example = predict.tokenize(rows, tokenizer, predict.input_layout(saved), True, False, 1, "x")[0]
    assert example["input_ids"] == [tokenizer.cls_token_id, *title_ids, tokenizer.sep_token_id, *body_ids[:8], *body_ids[-tail:], tokenizer.sep_token_id]
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([example["input_ids"]]), token_type_ids=torch.tensor([example["token_type_ids"]])).logits[0]
    assert [predictions[0]["probs"][name] for name in CATEGORIES] == pytest.approx(torch.softmax(logits, -1).tolist(), abs=1e-5)
    assert predictions[0]["pred"] == CATEGORIES[int(logits.argmax())]


def test_dtype_applies_autocast(model_dir: Path, test_rows: list[dict], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    text = "".join(f"{r['title']}\t{r['body'].replace(chr(10), '')}\n" for r in test_rows[:4])
    results = {}
    for dtype in ("fp32", "bf16"):
        monkeypatch.setattr(sys, "stdin", piped(text))
        results[dtype] = as_lists(run_predict(model_dir, "--device", "cpu", "--dtype", dtype))
    capsys.readouterr()
    flat = {dtype: [p for row in rows for p in row] for dtype, rows in results.items()}
    assert flat["fp32"] != pytest.approx(flat["bf16"], abs=1e-6)  # bf16 really ran
    for row in results["bf16"]:
        assert sum(row) == pytest.approx(1.0, abs=1e-5)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["missing", "empty", "dataset_dir", "tiny_model_dir", "config_only"])
def test_a_folder_that_is_not_a_saved_model(folder: str, request: pytest.FixtureRequest, model_dir: Path, tmp_path: Path) -> None:
    if folder == "missing":
        path = tmp_path / "no-such-model"
    elif folder == "empty":
        path = tmp_path
    elif folder == "config_only":
        path = tmp_path / "model"
        path.mkdir()
        shutil.copy(model_dir / "config.json", path)
    else:
        path = request.getfixturevalue(folder)  # a dataset; a base model that was never fine-tuned
    with pytest.raises(InputError) as e:
        run_predict(path, "--input_file", str(tmp_path / "unused.jsonl"))
    message = str(e.value)
    assert message.startswith(f"{path} is not a saved classification model (")
    assert "--save_model" in message and "outputs/<model>/<date>/<time>/model" in message


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_malformed_jsonl_names_file_and_line_and_leaves_the_output(model_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    lines = (dataset_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2][:-1]
    bad = write_lines(tmp_path / "bad.jsonl", lines)
    output = write_lines(tmp_path / "out.jsonl", ["old"])
    with pytest.raises(InputError, match=rf"^{re.escape(str(bad))}: line 3: not valid JSON"):
        run_predict(model_dir, "--input_file", str(bad), "--output_file", str(output))
    assert output.read_text(encoding="utf-8") == "old\n"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda row: row.pop("body"), r"line 2: missing field\(s\) body \(the model reads title, body\)"),
        (lambda row: row.update(title=None), r"line 2: title must be a string, got null"),
    ],
    ids=["missing field", "not a string"],
)
def test_bad_rows_name_file_and_line(change, message: str, model_dir: Path, test_rows: list[dict], tmp_path: Path) -> None:
    rows = [dict(row) for row in test_rows[:3]]
    change(rows[1])
    utils.save_jsonl(rows, tmp_path / "in.jsonl")
    with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path / 'in.jsonl'))}: {message}"):
        run_predict(model_dir, "--input_file", str(tmp_path / "in.jsonl"), "--output_file", str(tmp_path / "out.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()


def test_a_title_longer_than_max_seq_len_is_truncated_and_reported(
    model_dir: Path, test_rows: list[dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It stopped the whole prediction before (issue 9): now the title is cut to fit and the body left out."""
    rows = [dict(row) for row in test_rows[:3]]
    rows[1]["title"] = "映画の監督と俳優" * 40
    utils.save_jsonl(rows, tmp_path / "in.jsonl")
    predictions = run_predict(model_dir, "--input_file", str(tmp_path / "in.jsonl"))
    assert [p["id"] for p in predictions] == [row["id"] for row in rows]
    err = capsys.readouterr().err
    assert f"{tmp_path / 'in.jsonl'}: 1 row(s) whose title alone fills the model's max_seq_len 64: title truncated to fit, body left out" in err
    assert "tokenizer: fast path: MeCab words" in err
    # --slow_tokenizer: transformers' own code, the same predictions.
    assert run_predict(model_dir, "--input_file", str(tmp_path / "in.jsonl"), "--slow_tokenizer") == predictions
    assert "tokenizer: BertJapaneseTokenizer's own Python code (--slow_tokenizer)" in capsys.readouterr().err
    # The same as what training's tokenisation makes of that row: the first 61 title tokens, then [SEP] [SEP].
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    title_ids = tokenizer(rows[1]["title"], add_special_tokens=False)["input_ids"]
    example = predict.tokenize(rows, tokenizer, InputLayout(("title", "body"), MAX_SEQ_LEN), True, True, 1, "x")[1]
    assert example["input_ids"] == [tokenizer.cls_token_id, *title_ids[: MAX_SEQ_LEN - 3], tokenizer.sep_token_id, tokenizer.sep_token_id]


def test_missing_input_file(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path / 'none.jsonl'))} not found"):
        run_predict(model_dir, "--input_file", str(tmp_path / "none.jsonl"))


def test_empty_stdin_line_is_an_error(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", piped("タイトル\t本文\n\nタイトル\t本文\n"))
    with pytest.raises(InputError, match=r"^<stdin>: line 2: empty line"):
        run_predict(model_dir)


def test_stdin_that_is_not_utf8_is_an_error(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", piped("タイトル\t本文\n".encode("utf-8") + "本文\n".encode("cp932")))
    with pytest.raises(InputError, match=r"^<stdin>: line 2: not valid UTF-8"):
        run_predict(model_dir)


def test_command_line_errors_are_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "src" / "predict.py"), "--model_dir", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not a saved classification model (no config.json): {predict.SAVE_HINT}"
    ]


def test_any_failure_to_load_the_saved_model_is_one_line(model_dir: Path, test_rows: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only OSError/ValueError: e.g. weights that do not fit the config raise RuntimeError in transformers."""

    def mismatch(*args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict:\n\tsize mismatch for classifier.weight")

    monkeypatch.setattr(predict.AutoModelForSequenceClassification, "from_pretrained", mismatch)
    input_file = tmp_path / "in.jsonl"
    utils.save_jsonl(test_rows[:2], input_file)
    with pytest.raises(InputError) as e:
        run_predict(model_dir, "--input_file", str(input_file))
    assert str(e.value).startswith(f"cannot load the model saved in {model_dir} (RuntimeError: Error(s) in loading state_dict:): train one with")
    assert "\n" not in str(e.value)


# --- a multi-label model ------------------------------------------------------------------------


def test_multi_label_predictions_equal_the_run_predictions(multi_label_run: Path, multi_label_dataset: Path, tmp_path: Path) -> None:
    """Every category over the threshold the model was trained with (its config.json), as lists of names and ids."""
    run_predictions = utils.load_jsonl(multi_label_run / "test-predictions.jsonl")
    names = [*CATEGORIES, "group-a"]
    ours = run_predict(multi_label_run / "model", "--input_file", str(multi_label_dataset / "test.jsonl"))
    assert [p["pred_id"] for p in ours] == [p["pred"] for p in run_predictions]
    assert [p["pred"] for p in ours] == [[names[i] for i in p["pred"]] for p in run_predictions]
    assert any(len(p["pred"]) == 2 for p in ours)  # the group label, beside the category
    for p, theirs in zip(ours, run_predictions):
        assert list(p["probs"]) == names
        assert list(p["probs"].values()) == pytest.approx(theirs["probs"], abs=1e-5)  # sigmoid probabilities, not summing to 1

    # --threshold overrides the saved one: at 0.99 fewer labels, and the same rule.
    strict = run_predict(multi_label_run / "model", "--input_file", str(multi_label_dataset / "test.jsonl"), "--threshold", "0.99")
    for p in strict:
        assert p["pred"] == [name for name, q in p["probs"].items() if q >= 0.99]
    assert sum(map(len, (p["pred"] for p in strict))) < sum(map(len, (p["pred"] for p in ours)))


def test_multi_label_stdin(multi_label_run: Path, multi_label_dataset: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    rows = utils.load_jsonl(multi_label_dataset / "test.jsonl")[:3]
    monkeypatch.setattr(sys, "stdin", piped("".join(f"{r['title']}\t{r['body'].replace(chr(10), '')}\n" for r in rows)))
    run_predict(multi_label_run / "model")
    out = capsys.readouterr()
    printed = [json.loads(line) for line in out.out.splitlines()]
    assert len(printed) == 3
    for p in printed:
        assert p["pred"] == [name for name, q in p["probs"].items() if q >= 0.5]
        assert p["pred_id"] == [[*CATEGORIES, "group-a"].index(name) for name in p["pred"]]
    assert "10 categories, multi-label, threshold 0.5" in out.err
