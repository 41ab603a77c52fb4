"""The reference's defaults (no gradient clipping, TF32 matmuls), a warm-up longer than training, the Params column."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel, XLMRobertaConfig

import aggregate
import modeling
import train
import train_options
import utils
from conftest import read_csv
from test_aggregate import make_run


# The reference's Args defaults, as its current src/train.py (July 2023) declares them; its device
# default (cuda:0) is one of the bugs fixed here (--device auto), so it is not compared.
REFERENCE_DEFAULTS = {
    "model_name": "cl-tohoku/bert-base-japanese-v3", "dataset_dir": Path("datasets/livedoor"), "batch_size": 16, "epochs": 20,
    "lr": 3e-5, "num_warmup_epochs": 2, "max_seq_len": 512, "weight_decay": 0.01, "gradient_checkpointing": False, "seed": 42,
}  # fmt: skip


def test_defaults_are_the_references() -> None:
    args = train_options.Args().parse_args([])
    assert {name: getattr(args, name) for name in REFERENCE_DEFAULTS} == REFERENCE_DEFAULTS
    assert args.max_grad_norm == 0  # the reference has no gradient clipping
    assert args.early_stopping_patience == 0 and args.class_weights == "none"  # the reference trains every epoch, unweighted


def test_one_epoch_with_the_default_warm_up_never_reaches_the_peak(
    make_train_args, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The reference accepts --epochs 1 with its 2 warm-up epochs; the learning rate only rises.
    args = make_train_args(tmp_path, "--epochs", "1", "--num_warmup_epochs", "2")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        run_dir = train.main(args)
        precision = torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision(previous)
    out = capsys.readouterr().out
    assert "note: the warm-up (2 epochs) is longer than the training (1): the learning rate rises all along and never reaches its peak --lr 0.005" in out
    rows = read_csv(run_dir / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    # 216 examples / batch 8 = 27 steps of the 54 warm-up steps: half the peak.
    assert float(rows[1]["lr"]) == pytest.approx(5e-3 * 27 / 54)
    assert (run_dir / "test-metrics.json").exists()
    # TF32 matmuls, as the reference's utils.init sets them, and recorded.
    assert precision == "high"
    config = utils.load_json(run_dir / "config.json")
    assert config["environment"]["float32_matmul_precision"] == "high"
    assert config["max_grad_norm"] == 0


@pytest.mark.parametrize("flag", ["--num_warmup_epochs", "--max_grad_norm"])
def test_negative_warm_up_or_clipping_is_refused(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_options.Args().parse_args([flag, "-1"])
    assert f"{flag} cannot be negative" in capsys.readouterr().err


# --- the Params column -----------------------------------------------------------------------

MBERT = BertConfig(  # bert-base-multilingual-cased
    vocab_size=119547, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=512, type_vocab_size=2,
)  # fmt: skip
XLMR_LARGE = XLMRobertaConfig(  # xlm-roberta-large
    vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    max_position_embeddings=514, type_vocab_size=1,
)  # fmt: skip


@pytest.mark.parametrize(
    ("config", "encoder", "params"),
    [(MBERT, 177_853_440, "177 M"), (XLMR_LARGE, 559_890_432, "559 M")],
    ids=["mbert", "xlm-roberta-large"],
)
def test_params_are_the_encoders_as_the_reference_counts(config, encoder: int, params: str) -> None:
    """The reference printed AutoModel's parameters // 1_000_000: mBERT 177 M, xlm-roberta-large 559 M."""
    with torch.device("meta"):  # real sizes, no memory
        model = AutoModelForSequenceClassification.from_config(config.__class__(**config.to_dict(), num_labels=9))
    assert modeling.count_encoder_params(model) == encoder
    assert aggregate.format_params(modeling.count_encoder_params(model)) == params
    assert sum(p.numel() for p in model.parameters()) > encoder  # the head is not counted


def test_best_md_shows_the_encoders_params(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    make_run(outputs, "bert-base-multilingual-cased", 3e-5, 1, num_params=177_860_361, num_encoder_params=177_853_440)
    make_run(outputs, "xlm-roberta-large", 3e-5, 1, num_params=559_899_657)  # an older run: only the total
    aggregate.main(aggregate.Args().parse_args(["--input_dir", str(outputs), "--output_dir", str(tmp_path / "results")]))
    table = (tmp_path / "results" / "best.md").read_text(encoding="utf-8")
    assert "| [bert-base-multilingual-cased](https://huggingface.co/bert-base-multilingual-cased) | 177 M |" in table
    assert "| [xlm-roberta-large](https://huggingface.co/xlm-roberta-large) | 559 M |" in table
    best = pd.read_csv(tmp_path / "results" / "best.csv").set_index("model_name")
    assert best.loc["xlm-roberta-large", "num_encoder_params"] == 559_899_657  # falls back to num_params
    assert best.loc["bert-base-multilingual-cased", "num_encoder_params"] == 177_853_440


def test_a_run_records_its_encoders_params(finished_run: Path, tiny_model_dir: Path) -> None:
    config = utils.load_json(finished_run / "config.json")
    encoder = sum(p.numel() for p in BertModel.from_pretrained(tiny_model_dir).parameters())
    assert config["num_encoder_params"] == encoder < config["num_params"]
