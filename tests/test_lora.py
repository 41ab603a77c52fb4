"""LoRA (src/lora.py) on encoders and decoder LLMs, and decoders as sequence classifiers.

Tiny random decoders of seven families (tests/tiny_models.DECODER_FAMILIES: Llama, Qwen2, Mistral,
Gemma 2, Qwen3, Gemma 3 text-only and Gemma 3 with its vision tower), each with a BPE tokenizer with the hub's special tokens (no pad token where
the hub's has none), and a LoRA BERT. Per family: 2 processes under torchrun saving the adapter (one launch for all), predict.py on
that adapter, and one process with gradient checkpointing saving a merged model, predict.py on it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

import data
import lora
import modeling
import tokenization
import train
import train_options
import utils
from conftest import ONE_EPOCH, assert_same_predictions, predict_test_split, train_argv, train_under_torchrun
from tiny_models import ALL_FAMILIES, DECODER_FAMILIES
from utils import InputError

LORA = ["--lora_r", "8", "--lora_alpha", "16"]
LABEL2ID = {f"c{i}": i for i in range(9)}


def run_args(model_dir: Path, dataset_dir: Path, output_root: Path, *extra: str) -> train_options.Args:
    return train_options.Args().parse_args(train_argv(model_dir, dataset_dir, output_root, "--epochs", "1", *extra))


def assert_padded_row_is_read_at_its_last_real_token(tokenizer, model) -> None:
    """A short text padded (on the right, as data.collate pads) beside a long one gets the logits it gets alone."""
    model.eval()
    short, long = tokenizer("映画の話題")["input_ids"], tokenizer("監督と俳優が主演した映画の話題です。")["input_ids"]
    batch = data.collate([{"input_ids": ids, "label": 0, "index": i} for i, ids in enumerate((short, long))], tokenizer.pad_token_id)
    assert len(short) < len(long) and batch["input_ids"][0, -1] == tokenizer.pad_token_id  # right padding
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = model(input_ids=torch.tensor([short])).logits
    torch.testing.assert_close(padded[0], alone[0])


# --- which layers, which parameters ----------------------------------------------------------


def test_adapters_go_on_the_linear_layers_of_the_blocks_and_the_head_is_trained_in_full(tiny_family_model) -> None:
    llama = AutoModelForSequenceClassification.from_pretrained(tiny_family_model("llama"), num_labels=9)
    targets = lora.target_layers(llama)
    assert lora.leaf_names(targets) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert len(targets) == 2 * 7 and all(name.startswith("model.layers.") for name in targets)  # 2 layers, never `score`

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_family_model("bert-word"), num_labels=9)
    targets = lora.target_layers(bert)
    assert all(name.startswith("bert.encoder.layer.") for name in targets) and len(targets) == 2 * 6  # not the pooler, not the classifier
    model, summary = lora.apply_lora(bert, lora.LoraSettings(r=4))
    assert summary == (
        "LoRA r=4 alpha=16 dropout=0.1 on 12 layers (the Linear layers of its transformer blocks: query, key, value, dense); "
        "trained in full: classifier"
    )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or ".classifier.modules_to_save." in name for name in trainable), trainable
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    count, total, line = lora.trainable_share(model)
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad) and line.startswith(f"trainable parameters: {count:,} of {total:,} (")


def linear_layers_of_the_stacks(model) -> list[str]:
    """The rule as it was before multimodal models: every Linear inside a ModuleList of the base model."""
    stacks = [name for name, module in model.base_model.named_modules() if isinstance(module, torch.nn.ModuleList)]
    return [
        f"{model.base_model_prefix}.{name}" for name, module in model.base_model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.startswith(f"{stack}.") for stack in stacks)
    ]  # fmt: skip


@pytest.mark.parametrize("family", list(ALL_FAMILIES))
def test_adapters_go_on_the_blocks_the_text_reaches_in_every_family(family: str, tiny_family_model) -> None:
    """Text-only models: every Linear of their stacks of blocks. Multimodal Gemma 3: its language model's only,
    not its vision tower's, which text never reaches (the probe step would freeze those adapters)."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_family_model(family), num_labels=9)
    targets, stacks = lora.target_layers(model), linear_layers_of_the_stacks(model)
    if family != "gemma3-vision":
        assert targets == stacks and lora.text_model(model, targets) == model.base_model_prefix
        return
    assert lora.text_model(model, targets) == "model.language_model"
    assert targets == [name for name in stacks if name.startswith("model.language_model.layers.")] and len(targets) == 2 * 7
    assert any(name.startswith("model.vision_tower.") for name in stacks)  # what the rule leaves out
    peft_model, summary = lora.apply_lora(model, lora.LoraSettings(r=4))
    assert "on 14 layers (the Linear layers of its transformer blocks in model.language_model, its text model: q_proj," in summary
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and not any("vision_tower" in name or "multi_modal_projector" in name for name in trainable)
    # Every adapter gets a gradient from text alone: nothing for the probe step (modeling.freeze_unreachable) to freeze.
    tokenizer = AutoTokenizer.from_pretrained(tiny_family_model(family))
    batch = data.collate([{"input_ids": tokenizer("映画の話題")["input_ids"], "label": 0, "index": 0}] * 2, tokenizer.pad_token_id)
    assert modeling.freeze_unreachable(peft_model, batch, torch.device("cpu")) == []


def test_target_modules_override_and_a_name_that_matches_nothing(tiny_family_model) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_family_model("llama"), num_labels=9)
    assert lora.target_layers(model, ["q_proj", "v_proj"]) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    with pytest.raises(InputError) as e:
        lora.target_layers(model, ["query"])
    assert str(e.value).startswith("--lora_target_modules query: no Linear or Embedding layer of LlamaForSequenceClassification is named so; its layers: ")
    assert "q_proj" in str(e.value) and "score" not in str(e.value)


# --- decoders: padding, pooling, joined title and body ----------------------------------------


def test_decoder_without_pad_token_pads_with_eos_and_pools_the_last_real_token(tiny_family_model, capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer, model = modeling.load_model(str(tiny_family_model("llama")), LABEL2ID)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|end_of_text|>" and model.config.pad_token_id == tokenizer.eos_token_id
    assert "padding: the tokenizer has no pad token; its end-of-text token '<|end_of_text|>'" in capsys.readouterr().out
    assert_padded_row_is_read_at_its_last_real_token(tokenizer, model)

    # Qwen's tokenizer has a pad token already; its config has no pad_token_id until the model is loaded here.
    tokenizer, model = modeling.load_model(str(tiny_family_model("qwen2")), LABEL2ID)
    assert tokenizer.pad_token == "<|endoftext|>" and model.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize(("family", "pad", "config_pad"), [("qwen3", "<|endoftext|>", None), ("gemma2", "<pad>", 0), ("gemma3", "<pad>", 0)])
def test_decoder_with_a_pad_token_of_its_own_keeps_it_and_pools_the_last_real_token(
    family: str, pad: str, config_pad: int | None, tiny_family_model, capsys: pytest.CaptureFixture[str]
) -> None:
    """Qwen3's <|endoftext|> and Gemma's <pad> are not their end-of-text token (<|im_end|>, <eos>): they pad as they are,
    and the model's config gets their id (Qwen's checkpoint has none, Gemma's has it already)."""
    model_dir = tiny_family_model(family)
    assert AutoConfig.from_pretrained(model_dir).pad_token_id == config_pad
    tokenizer, model = modeling.load_model(str(model_dir), LABEL2ID)
    assert tokenizer.pad_token == pad and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id and "padding:" not in capsys.readouterr().out
    assert_padded_row_is_read_at_its_last_real_token(tokenizer, model)


def test_multimodal_gemma3_gets_the_pad_id_in_its_text_config_and_pools_the_last_real_token(tiny_family_model, tmp_path: Path) -> None:
    """Gemma3ForSequenceClassification reads text_config.pad_token_id (its top-level config has none): a checkpoint whose
    text config names no pad token gets the tokenizer's <pad> there, so a right-padded row is read at its last real token."""
    source = tiny_family_model("gemma3-vision")
    model_dir = tmp_path / "gemma3-vision-no-pad"
    model_dir.mkdir()
    for path in source.iterdir():
        if path.name != "config.json":
            (model_dir / path.name).symlink_to(path)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["text_config"]["pad_token_id"] = None
    (model_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert AutoConfig.from_pretrained(model_dir).text_config.pad_token_id is None
    tokenizer, model = modeling.load_model(str(model_dir), LABEL2ID)
    text_config = model.config.get_text_config()
    assert text_config is not model.config and tokenizer.pad_token == "<pad>" and text_config.pad_token_id == tokenizer.pad_token_id == 0
    assert_padded_row_is_read_at_its_last_real_token(tokenizer, model)


@pytest.mark.parametrize("family", list(DECODER_FAMILIES))
def test_decoders_read_title_and_body_as_one_text_joined_by_a_newline_and_every_truncation_keeps_the_title(family: str, tiny_family_model) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_family_model(family))
    assert tokenization.text_separator(tokenizer, ["title", "body"]) == "\n"
    assert tokenization.text_separator(tokenizer, ["body"]) is None
    assert tokenization.text_separator(AutoTokenizer.from_pretrained(tiny_family_model("bert-word")), ["title", "body"]) is None
    encoder = tokenization.SlowEncoder(tokenizer, "test", separator="\n")
    title, body = "映画の話題", "監督と俳優が主演した。" * 20

    def encode(body: str, **layout) -> list[int]:
        return encoder([[title, body]], tokenization.InputLayout(("title", "body"), **layout), False).example(0)["input_ids"]

    # What fits is the tokenizer's own encoding of the joined text, special tokens included (bos for Llama, none for Qwen).
    assert encode("監督と俳優", max_seq_len=64) == tokenizer(f"{title}\n監督と俳優")["input_ids"]
    whole = tokenizer(f"{title}\n{body}")["input_ids"]
    assert encode(body, max_seq_len=16) == whole[:16]  # head: the start of the joined text
    # tail and head_tail cut the body alone: the title and its newline stay, whatever the mode.
    start = tokenizer(f"{title}\n")["input_ids"]
    body_ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    room = 16 - len(start)
    assert encode(body, max_seq_len=16, truncation="tail") == start + body_ids[-room:]
    assert encode(body, max_seq_len=16, truncation="head_tail", head_tokens=2) == start + body_ids[:2] + body_ids[-(room - 2) :]


# --- refusals ---------------------------------------------------------------------------------


def test_load_in_4bit_needs_cuda(tiny_family_model, dataset_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        train.main(run_args(tiny_family_model("llama"), dataset_dir, tmp_path, *LORA, "--load_in_4bit"))
    assert str(e.value) == "--load_in_4bit (QLoRA through bitsandbytes) needs a CUDA GPU; this run is on cpu: drop the flag"
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    assert lora.LoraSettings().r == 0 and train_options.Args().parse_args([]).lora_r == 0  # full fine-tuning by default


# --- a LoRA encoder ---------------------------------------------------------------------------


def test_lora_bert_trains_saves_its_adapter_and_predict_reproduces_the_run(
    tiny_family_model, dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = train.main(run_args(tiny_family_model("bert-word"), dataset_dir, tmp_path / "out", *LORA, "--save_model"))
    config = utils.load_json(run_dir / "config.json")
    assert config["lora_r"] == 8 and "lora_r" not in config["runtime_options"] and "merge_lora" in config["runtime_options"]
    assert 0 < config["num_trainable_params"] < config["num_params"] / 3
    out = capsys.readouterr().out
    assert f"trainable parameters: {config['num_trainable_params']:,} of " in out and "LoRA r=8 alpha=16 dropout=0.1 on 12 layers" in out
    saved = {p.name for p in (run_dir / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "vocab.txt"} <= saved and "model.safetensors" not in saved
    assert lora.base_model_name(run_dir / "model") == str(tiny_family_model("bert-word"))
    assert_same_predictions(predict_test_split(run_dir / "model", dataset_dir, tmp_path / "p.jsonl"), run_dir)


def test_an_adapter_folder_without_a_readable_base_model_name_is_refused_with_the_file(tmp_path: Path) -> None:
    config = tmp_path / "adapter_config.json"
    config.write_text('{"r": 8,\n "base_model_name_or_path": ', encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{re.escape(str(config))}: line 2: not valid JSON"):
        lora.base_model_name(tmp_path)
    for content in ('{"r": 8}', '["models/base"]'):
        config.write_text(content, encoding="utf-8")
        with pytest.raises(InputError, match=rf"^{re.escape(str(config))} names no base model \(base_model_name_or_path\): pass --base_model$"):
            lora.base_model_name(tmp_path)


def test_lora_in_bf16_meets_its_fp32_head_through_autocast(tiny_family_model, dataset_dir: Path, tmp_path: Path) -> None:
    """The base loads in bf16, the head stays fp32: the probe step too runs under training's autocast
    (without it: "mat1 and mat2 must have the same dtype", first seen on an H200)."""
    run_dir = train.main(run_args(tiny_family_model("bert-word"), dataset_dir, tmp_path / "out", *LORA, "--dtype", "bf16"))
    assert utils.load_json(run_dir / "config.json")["environment"]["dtype"] == "bfloat16"
    assert (run_dir / "test-metrics.json").is_file()


# --- every decoder family: torchrun, save, predict --------------------------------------------


@pytest.fixture(scope="module")
def torchrun_lora_runs(tiny_family_model, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Every decoder family trained with LoRA by 2 processes (gloo), saving the adapter, in one torchrun launch."""
    models = {family: tiny_family_model(family) for family in DECODER_FAMILIES}
    train_args = ["--dataset_dir", str(dataset_dir), *ONE_EPOCH, "--batch_size", "4", *LORA, "--save_model"]
    return train_under_torchrun(models, tmp_path_factory.mktemp("torchrun-lora"), train_args)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(DECODER_FAMILIES))
def test_decoder_family_with_lora_under_torchrun_alone_saved_and_merged(
    family: str, torchrun_lora_runs, tiny_family_model, dataset_dir: Path, tmp_path: Path
) -> None:
    model_dir = tiny_family_model(family)
    assert type(AutoTokenizer.from_pretrained(model_dir)).__name__ in {DECODER_FAMILIES[family][1], "TokenizersBackend"}

    # 2 processes: DDP over the adapters and the head only (the frozen base is no unused parameter).
    run_dir, log = torchrun_lora_runs[family]
    config = utils.load_json(run_dir / "config.json")
    assert config["environment"]["world_size"] == 2 and config["num_trainable_params"] < config["num_params"]
    assert "LoRA r=8" in log and "input: title + body as one text joined by '\\n'" in log and "frozen" not in log
    # The adapter folder: adapters and head, the base model's name; predict.py puts them back on the base.
    assert "model.safetensors" not in {p.name for p in (run_dir / "model").iterdir()}
    assert lora.base_model_name(run_dir / "model") == str(model_dir)
    assert_same_predictions(predict_test_split(run_dir / "model", dataset_dir, tmp_path / "adapter.jsonl"), run_dir)

    # 1 process, gradient checkpointing, the adapters merged into a plain full model.
    single = train.main(run_args(model_dir, dataset_dir, tmp_path / "single", *LORA, "--gradient_checkpointing", "--save_model", "--merge_lora"))
    assert utils.load_json(single / "config.json")["environment"]["world_size"] == 1
    saved = {p.name for p in (single / "model").iterdir()}
    assert "model.safetensors" in saved and "adapter_config.json" not in saved
    assert_same_predictions(predict_test_split(single / "model", dataset_dir, tmp_path / "merged.jsonl"), single)


# --- sweep and aggregate ----------------------------------------------------------------------


def test_sweep_preset_llm_brings_its_models_lrs_and_lora_options_which_the_user_overrides() -> None:
    import sweep

    args = sweep.Args().parse_args(["--preset", "llm", "--batch_size", "16"])
    assert args.models == sweep.LLM_MODELS and "Qwen/Qwen2.5-0.5B-Instruct" in args.models and len(args.models) >= 5
    # Every model of the preset is of a family that the tests train, save and predict with (tiny_models.DECODER_FAMILIES).
    stood_for = {name for _, _, names in DECODER_FAMILIES.values() for name in names.split(", ")}
    assert set(args.models) <= stood_for, sorted(set(args.models) - stood_for)
    assert args.lrs == [1e-4, 3e-4, 5e-4, 1e-3]
    forwarded = train_options.Args().parse_args(args.extra_args)
    assert (forwarded.lora_r, forwarded.batch_size, forwarded.epochs, forwarded.gradient_checkpointing) == (32, 16, 10, True)
    assert sweep.Args().parse_args(["--preset", "llm", "--lrs", "2e-4"]).lrs == [2e-4]
    plain = sweep.Args().parse_args([])
    assert plain.lrs == [1e-5, 3e-5, 5e-5] and plain.extra_args == []


def test_lora_flags_are_settings_and_the_trainable_count_is_a_fact() -> None:
    import aggregate

    config = {"model_name": "m", "lr": 1e-4, "lora_r": 8, "lora_alpha": 16.0, "merge_lora": True, "num_trainable_params": 10,
              "runtime_options": list(train_options.RUNTIME_OPTIONS)}  # fmt: skip
    setting = aggregate.setting_of(config)
    assert setting["lora_r"] == 8 and setting["lora_alpha"] == 16.0
    assert "merge_lora" not in setting and "num_trainable_params" not in setting
