"""Every model family of tests/tiny_models.py in every launch mode, and the defects found with them.

Per family: a 2-process torchrun (gloo) run that also saves the model, predict.py on that model
(in-process; it must reproduce the run's test predictions) and a single-process run (in-process).
All families share one torchrun launch (tests/torchrun_families.py): starting 2 processes that import
torch and transformers costs more than training a tiny model; train.py's own command line under
torchrun is tested in test_scale.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import data
import modeling
import train
import train_options
import utils
from conftest import ONE_EPOCH, assert_same_predictions, predict_test_split, train_argv, train_under_torchrun
from tiny_models import FAMILIES
from utils import InputError

# Text-only input never reaches LUKE's entity embeddings nor its entity-aware attention queries.
ENTITY_ONLY = ("entity", "w2e_query", "e2w_query", "e2e_query")


@pytest.fixture(scope="module")
def torchrun_runs(tiny_family_model, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Every family trained by 2 processes (gloo) with --save_model, in one torchrun launch: {family: (run folder, its log)}."""
    models = {family: tiny_family_model(family) for family in FAMILIES}
    train_args = ["--dataset_dir", str(dataset_dir), *ONE_EPOCH, "--batch_size", "4", "--save_model"]
    return train_under_torchrun(models, tmp_path_factory.mktemp("torchrun"), train_args)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_under_torchrun_saves_predicts_and_trains_alone(
    family: str, torchrun_runs, tiny_family_model, dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tiny_family_model(family)
    tokenizer_class = FAMILIES[family][1]
    fast = {"PreTrainedTokenizerFast", "TokenizersBackend"}  # transformers 5 loads a bare tokenizer.json as TokenizersBackend
    assert type(AutoTokenizer.from_pretrained(model_dir)).__name__ in (fast if tokenizer_class in fast else {tokenizer_class})

    # 2 processes (gloo), with --save_model.
    run_dir, log = torchrun_runs[family]
    assert utils.load_json(run_dir / "config.json")["environment"]["world_size"] == 2
    assert "effective batch 4 x 1 accumulation x 2 process(es) = 8" in log
    run_predictions = utils.load_jsonl(run_dir / "test-predictions.jsonl")
    test_rows = utils.load_jsonl(dataset_dir / "test.jsonl")
    assert [p["id"] for p in run_predictions] == [r["id"] for r in test_rows]
    frozen = "frozen" in log
    assert frozen == (family in ("luke", "mluke")), log  # only LUKE has parameters that text never reaches

    # predict.py on the saved model gives the run's own test predictions.
    assert_same_predictions(predict_test_split(run_dir / "model", dataset_dir, tmp_path / "predictions.jsonl"), run_dir)

    # One process, in-process.
    capsys.readouterr()
    single = train.main(train_options.Args().parse_args(train_argv(model_dir, dataset_dir, tmp_path / "single", "--epochs", "1")))
    assert utils.load_json(single / "config.json")["environment"]["world_size"] == 1
    assert [int(row["epoch"]) for row in read_log(single)] == [0, 1]
    assert set(utils.load_json(single / "test-metrics.json")) == {"loss", "accuracy", "precision", "recall", "f1"}
    assert ("frozen" in capsys.readouterr().out) == frozen


def read_log(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with (run_dir / "log.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --- tiny models from any corpus ---------------------------------------------------------------


def test_every_family_builds_from_a_corpus_with_many_distinct_characters(tmp_path: Path) -> None:
    """The real corpus has 3,361 distinct characters: more than the 1,000 pieces the tiny vocabularies had."""
    import random

    from tiny_models import VOCAB_SIZE, build_tiny_model, read_texts

    rng = random.Random(0)
    kanji = [chr(code) for code in range(0x4E00, 0x4E00 + 3000)]  # CJK unified ideographs
    rows = [{"title": "".join(rng.sample(kanji, 8)), "body": "".join(rng.sample(kanji, 60)) + "。"} for _ in range(60)]
    rows.append({"title": "残り", "body": "".join(kanji)})  # every character at least once
    utils.save_jsonl(rows, tmp_path / "data" / "train.jsonl")
    texts = read_texts(tmp_path / "data")  # as `tests/tiny_models.py --dataset_dir` reads it
    assert len({char for text in texts for char in text}) > VOCAB_SIZE * 3
    rare = "".join(rng.sample(kanji, 40))
    for family in FAMILIES:
        tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(family, texts, tmp_path / family))
        ids = tokenizer(rare, add_special_tokens=False)["input_ids"]
        assert ids and tokenizer.unk_token_id not in ids, (family, tokenizer.convert_ids_to_tokens(ids))


# --- LUKE under DDP: parameters that text-only input never reaches -----------------------------


def probe_batch(model_dir: Path) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = [{"input_ids": tokenizer("映画の話題", "監督と俳優が主演した。")["input_ids"], "label": 0, "index": 0}] * 2
    return data.collate(encoded, tokenizer.pad_token_id)


@pytest.mark.parametrize("family", ["bert-word", "luke"])
def test_only_parameters_without_gradient_are_frozen(family: str, tiny_family_model) -> None:
    model_dir = tiny_family_model(family)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=9).train()
    batch = probe_batch(model_dir)
    frozen = modeling.freeze_unreachable(model, batch, torch.device("cpu"))
    if family == "bert-word":
        assert frozen == []
    else:
        assert frozen and all(any(part in name for part in ENTITY_ONLY) for name in frozen), frozen
        assert "luke.embeddings.word_embeddings.weight" not in frozen and "classifier.weight" not in frozen
    assert model.training and all(p.grad is None for p in model.parameters())  # the probe leaves no trace
    # What DDP requires: after a training step, every trainable parameter has a gradient.
    model(**{k: v for k, v in batch.items() if k not in ("labels", "index")}).logits.sum().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == set(frozen)
    groups, _ = modeling.param_groups(model, 0.01)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


# --- --max_seq_len against the model's positions ---------------------------------------------


@pytest.mark.parametrize(
    ("family", "limit"),
    [("bert-word", 512), ("xlm-roberta", 512), ("luke", 512), ("modernbert", None), ("deberta-v2", None)],
)
def test_position_limit_of_each_family(family: str, limit: int | None, tiny_family_model) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_family_model(family), num_labels=9)
    assert modeling.position_limit(model) == limit  # RoBERTa-like: 514 rows, 2 below the padding offset


def test_max_seq_len_beyond_the_position_embeddings_is_one_clear_error(tiny_family_model, dataset_dir: Path, tmp_path: Path) -> None:
    for family, length in (("bert-word", 1024), ("xlm-roberta", 513)):
        model_dir = tiny_family_model(family)
        with pytest.raises(InputError) as e:
            train.main(train_options.Args().parse_args(train_argv(model_dir, dataset_dir, tmp_path, "--epochs", "1", "--max_seq_len", str(length))))
        assert str(e.value) == (
            f"--max_seq_len {length} is longer than {model_dir} takes: its position embeddings hold 512 tokens; use --max_seq_len 512 or less"
        )
        assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before any run folder


def long_dataset(dataset_dir: Path, output_dir: Path, repeat: int) -> Path:
    """A few rows of each split with bodies repeated until they exceed a 512-token model."""
    output_dir.mkdir()
    shutil.copy(dataset_dir / "label2id.json", output_dir)
    for split, count in (("train", 8), ("val", 3), ("test", 3)):
        rows = utils.load_jsonl(dataset_dir / f"{split}.jsonl")[:count]
        utils.save_jsonl([{**row, "body": "\n".join([row["body"]] * repeat)} for row in rows], output_dir / f"{split}.jsonl")
    return output_dir


def test_long_context_model_takes_long_inputs(tiny_family_model, dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tiny_family_model("modernbert")
    long_data = long_dataset(dataset_dir, tmp_path / "long", repeat=100)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    row = utils.load_jsonl(long_data / "train.jsonl")[0]
    assert len(tokenizer(row["title"], row["body"])["input_ids"]) > 1024  # truncated at 1024, not 512

    run_dir = train.main(train_options.Args().parse_args(train_argv(model_dir, long_data, tmp_path / "out", "--epochs", "1", "--max_seq_len", "1024", "--batch_size", "4")))
    assert (run_dir / "test-metrics.json").exists()
    assert "positions: rotary or relative (no table), trained up to 8192 tokens" in capsys.readouterr().out


# --- checkpoints with a head of another size ---------------------------------------------------


@pytest.fixture(scope="module")
def two_class_checkpoint(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tuned 2-class classifier (a sentiment model, say) saved like a hub checkpoint."""
    path = tmp_path_factory.mktemp("models") / "two-class"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_head_of_another_size_is_refused_clearly(two_class_checkpoint: Path, dataset_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        train.main(train_options.Args().parse_args(train_argv(two_class_checkpoint, dataset_dir, tmp_path, "--epochs", "1")))
    assert str(e.value) == (
        f"{two_class_checkpoint} already has a classification head of another size (classifier.bias [2] -> [9], "
        "classifier.weight [2, 32] -> [9, 32] for 9 labels): pass --reinit_head to replace it with a new, randomly "
        "initialised head, or start from its base model"
    )
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_reinit_head_replaces_the_head_and_says_so(two_class_checkpoint: Path, dataset_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = AutoModelForSequenceClassification.from_pretrained(two_class_checkpoint)
    _, model = modeling.load_model(str(two_class_checkpoint), data.load_label2id(dataset_dir), reinit_head=True)
    assert capsys.readouterr().out.strip() == (
        f"--reinit_head: re-initialised the classification head of {two_class_checkpoint}: "
        "classifier.bias [2] -> [9], classifier.weight [2, 32] -> [9, 32]"
    )
    assert model.classifier.weight.shape == (9, 32) and model.config.num_labels == 9
    # The encoder keeps the checkpoint's weights.
    torch.testing.assert_close(model.bert.encoder.layer[0].attention.self.query.weight, original.bert.encoder.layer[0].attention.self.query.weight)
    assert "--reinit_head" in train_options.Args().format_help()


# --- any failure to build the tokenizer or model ---------------------------------------------


def test_tokenizer_that_cannot_be_built_is_one_line(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["subword_tokenizer_type"] = "no-such-subword-tokenizer"
    (broken / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(InputError) as e:
        train.main(train_options.Args().parse_args(train_argv(broken, dataset_dir, tmp_path / "out", "--epochs", "1")))
    assert str(e.value).startswith(f"cannot load the tokenizer or model of {str(broken)!r}: ValueError: ")
    assert "no-such-subword-tokenizer" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# --- sweep presets -----------------------------------------------------------------------------


def test_sweep_preset_chooses_the_model_list_and_models_overrides_it() -> None:
    import sweep

    assert sweep.Args().parse_args([]).models == sweep.REFERENCE_MODELS
    modern = sweep.Args().parse_args(["--preset", "modern"]).models
    assert modern == sweep.MODERN_MODELS and "sbintuitions/modernbert-ja-130m" in modern and not set(modern) & set(sweep.REFERENCE_MODELS)
    assert sweep.Args().parse_args(["--preset", "modern", "--models", "a/b"]).models == ["a/b"]
    assert "--preset" in sweep.Args().format_help()
