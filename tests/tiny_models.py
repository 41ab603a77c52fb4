"""Tiny random-weight models of every family the project supports, each with its own real tokenizer class.

Each builder writes the files a hub checkpoint of that family has (vocab.txt, sentencepiece.bpe.model,
spm.model, entity_vocab.json or tokenizer.json, plus tokenizer_config.json), loads them back through
AutoTokenizer, and saves the tokenizer and a randomly initialised base model with save_pretrained:
train.py then loads the folder through the same Auto* code path as the hub model it stands for.
Vocabularies are trained on the dataset's own text (WordPiece lists, `sentencepiece`, `tokenizers`).

    poetry run python tests/tiny_models.py --family xlm-roberta --output_dir models/tiny-xlm-roberta
    poetry run python src/train.py --model_name models/tiny-xlm-roberta --max_seq_len 128 --epochs 3
"""

from __future__ import annotations

import io
import json
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tap import Tap

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tiny_bert import SPECIAL_TOKENS, build_tiny_bert, build_vocab, read_texts  # noqa: E402
from utils import atomic_dir  # noqa: E402

VOCAB_SIZE = 1000  # subword pieces of the SentencePiece / tokenizers vocabularies (fewer if the text has fewer; more if it has more characters)
PIECE_MARGIN = 200  # pieces beyond the single characters: special and meta pieces, and room for some longer pieces
LONG_CONTEXT = 8192  # ModernBERT's positions (sbintuitions/modernbert-ja-*: max_position_embeddings 8192)


def save_base_model(model_class: Any, config: Any, output_dir: Path, seed: int) -> Path:
    """Random weights of the encoder without a head, as a pretrained checkpoint is published."""
    import torch

    torch.manual_seed(seed)
    model_class(config).save_pretrained(output_dir)
    return output_dir


def load_and_save_tokenizer(output_dir: Path, tokenizer_config: dict) -> Any:
    """Load the hub-style files through AutoTokenizer (the path users take), then save them as transformers does."""
    from transformers import AutoTokenizer

    (output_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def vocab_size(texts: list[str]) -> int:
    """VOCAB_SIZE, or more where the text has more distinct characters than that (a real corpus: livedoor has 3,361).

    Both trainers keep every character as a piece of its own (character_coverage 1.0 / the unigram
    trainer's alphabet) and fail when the vocabulary cannot hold them all. Characters are counted as
    written and NFKC-normalised, as SentencePiece normalises them before training.
    """
    chars = {char for text in texts for char in text} | {char for text in texts for char in unicodedata.normalize("NFKC", text)}
    return max(VOCAB_SIZE, len(chars) + PIECE_MARGIN)


def train_sentencepiece(texts: list[str], path: Path, **options: Any) -> None:
    """A unigram SentencePiece model of the text (every character kept), written to `path`."""
    import sentencepiece as spm

    model = io.BytesIO()
    # No text skipped: SentencePiece leaves out sentences over 4,192 bytes (1,400 Japanese characters), and their characters with them.
    longest = max((len(text.encode()) for text in texts), default=0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size(texts), hard_vocab_limit=False,
        model_type="unigram", character_coverage=1.0, max_sentence_length=max(4192, longest), minloglevel=2, **options,
    )  # fmt: skip
    path.write_bytes(model.getvalue())


def small_sizes(hidden_size: int, num_layers: int) -> dict[str, int]:
    """The shape arguments every BERT-like config takes under these names."""
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 2,
        "intermediate_size": hidden_size * 4,
    }


# --- one builder per family -------------------------------------------------------------------


def build_bert_word(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """cl-tohoku/bert-base-japanese-v3: BertJapaneseTokenizer, MeCab words then WordPiece."""
    return build_tiny_bert(texts, output_dir, hidden_size, num_layers, seed=seed)


def build_bert_char(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """cl-tohoku/bert-base-japanese-char-v3: BertJapaneseTokenizer, MeCab words then single characters."""
    from transformers import BertConfig, BertModel

    chars = sorted({char for text in texts for char in text if not char.isspace()})
    (output_dir / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + chars) + "\n", encoding="utf-8")
    tokenizer = load_and_save_tokenizer(output_dir, {
        "tokenizer_class": "BertJapaneseTokenizer", "word_tokenizer_type": "mecab", "subword_tokenizer_type": "character",
        "mecab_kwargs": {"mecab_dic": "unidic_lite"}, "do_lower_case": False, "model_max_length": 512,
    })  # fmt: skip
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, type_vocab_size=2, **small_sizes(hidden_size, num_layers))
    return save_base_model(BertModel, config, output_dir, seed)


def build_mbert(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """bert-base-multilingual-cased: BertTokenizer (cased WordPiece; CJK characters split one by one)."""
    from transformers import BertConfig, BertModel

    # The multilingual vocabulary holds CJK characters alone (its basic tokenizer splits them) and cased words.
    vocab = build_vocab(texts, max_words=0)
    (output_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = load_and_save_tokenizer(output_dir, {"tokenizer_class": "BertTokenizer", "do_lower_case": False, "model_max_length": 512})
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, type_vocab_size=2, **small_sizes(hidden_size, num_layers))
    return save_base_model(BertModel, config, output_dir, seed)


def build_xlm_roberta(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """xlm-roberta-base: XLMRobertaTokenizer over SentencePiece; 514 positions (2 below the padding offset), one token type."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    train_sentencepiece(texts, output_dir / "sentencepiece.bpe.model")
    tokenizer = load_and_save_tokenizer(output_dir, {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512})
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=514, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **small_sizes(hidden_size, num_layers),
    )  # fmt: skip
    return save_base_model(XLMRobertaModel, config, output_dir, seed)


def build_luke_like(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int, sentencepiece_options: dict) -> Path:
    """studio-ousia/*-lite: MLukeTokenizer (SentencePiece + an entity vocabulary of the 4 special entities only)."""
    from transformers import LukeConfig, LukeModel

    # <pad> at id 1, as in the real checkpoints (pad_token_id 1): position ids start after it.
    layout = {"unk_id": 0, "pad_id": 1, "bos_id": 2, "eos_id": 3}
    train_sentencepiece(texts, output_dir / "sentencepiece.bpe.model", **layout, **sentencepiece_options)
    entities = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, "[MASK2]": 3}
    (output_dir / "entity_vocab.json").write_text(json.dumps(entities), encoding="utf-8")
    tokenizer = load_and_save_tokenizer(output_dir, {"tokenizer_class": "MLukeTokenizer", "model_max_length": 512})
    config = LukeConfig(
        vocab_size=len(tokenizer), entity_vocab_size=len(entities), entity_emb_size=16, max_position_embeddings=514,
        type_vocab_size=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **small_sizes(hidden_size, num_layers),
    )  # fmt: skip
    return save_base_model(LukeModel, config, output_dir, seed)


def build_luke(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """studio-ousia/luke-japanese-base-lite: its own Japanese SentencePiece vocabulary."""
    return build_luke_like(texts, output_dir, hidden_size, num_layers, seed, {"split_by_whitespace": False})


def build_mluke(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """studio-ousia/mluke-base-lite: XLM-R's vocabulary (whitespace-split SentencePiece) plus entities."""
    return build_luke_like(texts, output_dir, hidden_size, num_layers, seed, {})


def build_modernbert(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """sbintuitions/modernbert-ja-*: a fast tokenizer.json (no token_type_ids), rotary positions, 8192-token context."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import ModernBertConfig, ModernBertModel, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<sep>", "<mask>", "<cls>"]
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size(texts), special_tokens=specials, unk_token="<unk>"))
    cls_id, sep_id = backend.token_to_id("<cls>"), backend.token_to_id("<sep>")
    backend.post_processor = processors.TemplateProcessing(
        single="<cls> $A <sep>", pair="<cls> $A <sep> $B <sep>", special_tokens=[("<cls>", cls_id), ("<sep>", sep_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>", sep_token="<sep>",
        mask_token="<mask>", cls_token="<cls>", model_max_length=LONG_CONTEXT, model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip
    tokenizer.save_pretrained(output_dir)
    config = ModernBertConfig(
        vocab_size=len(tokenizer), max_position_embeddings=LONG_CONTEXT, pad_token_id=tokenizer.pad_token_id,
        cls_token_id=cls_id, sep_token_id=sep_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        global_attn_every_n_layers=2, local_attention=16, **small_sizes(hidden_size, num_layers),
    )  # fmt: skip
    return save_base_model(ModernBertModel, config, output_dir, seed)


def build_deberta_v2(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """ku-nlp/deberta-v3-*-japanese: DebertaV2Tokenizer over SentencePiece; relative positions only, no token types."""
    from transformers import DebertaV2Config, DebertaV2Model

    train_sentencepiece(
        texts, output_dir / "spm.model", pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[CLS]", eos_piece="[SEP]", user_defined_symbols=["[MASK]"],
    )  # fmt: skip
    tokenizer = load_and_save_tokenizer(output_dir, {"tokenizer_class": "DebertaV2Tokenizer", "model_max_length": 512})
    config = DebertaV2Config(
        vocab_size=len(tokenizer), max_position_embeddings=512, type_vocab_size=0, position_biased_input=False,
        relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=64, norm_rel_ebd="layer_norm",
        share_att_key=True, pad_token_id=tokenizer.pad_token_id, **small_sizes(hidden_size, num_layers),
    )  # fmt: skip
    return save_base_model(DebertaV2Model, config, output_dir, seed)


# --- decoder LLMs (sequence classification by the last real token) ----------------------------


def bpe_tokenizer(texts: list[str], output_dir: Path, bos: str | None, eos: str, tokenizer_class: str, pad: str | None = None) -> Any:
    """A byte-level BPE tokenizer.json trained on the texts, with the special tokens of the hub's tokenizer.

    With `bos`, every text starts with it (Llama, Mistral, Gemma); without, nothing is added (Qwen).
    `pad` where the hub's tokenizer names one (Qwen's <|endoftext|>, Gemma 3's <pad>): it comes first in
    the vocabulary (id 0), as Gemma's does. None: no pad token (Llama's, Mistral's); train.py pads with eos.
    tokenizer_config.json names the hub's tokenizer class; transformers 5 loads every one of them from tokenizer.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    specials = list(dict.fromkeys(token for token in (pad, bos, eos) if token))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    if bos:
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.save(str(output_dir / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": tokenizer_class, "eos_token": eos, "model_max_length": LONG_CONTEXT, "add_bos_token": bool(bos)}
    for name, token in (("bos_token", bos), ("pad_token", pad)):
        if token:
            tokenizer_config[name] = token
    (output_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert tokenizer.sep_token is None and tokenizer.pad_token == pad, (tokenizer.sep_token, tokenizer.pad_token)
    tokenizer.save_pretrained(output_dir)
    return tokenizer


# Gemma 3's image tokens (google/gemma-3-4b-it's tokenizer names them boi_token, eoi_token and image_token).
GEMMA3_IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def gemma_tokenizer(texts: list[str], output_dir: Path, image_tokens: bool = False) -> Any:
    """Gemma's tokenizer: GemmaTokenizer over a SentencePiece-style BPE (spaces as ▁, unknown characters as
    <0xXX> bytes), <pad> <eos> <bos> <unk> <mask> at ids 0-4 as in google/gemma-3-1b-it, and <bos> before every text.
    With `image_tokens`, the multimodal models' begin-of-image, end-of-image and image placeholder tokens too (special
    tokens at the end of the vocabulary, named in tokenizer_config.json as the hub's are).

    transformers 5 rebuilds GemmaTokenizer from the vocabulary and merges of tokenizer.json with its own
    normalizer and pre-tokenizer, so the vocabulary is trained on the same ▁-joined pieces.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # training only: pieces do not cross words
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials))
    backend.add_tokens([f"<0x{byte:02X}>" for byte in range(256)])  # the byte pieces SentencePiece's byte fallback uses
    if image_tokens:
        backend.add_special_tokens(list(GEMMA3_IMAGE_TOKENS.values()))
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    tokenizer_json = json.loads(backend.to_str())
    for token in tokenizer_json["added_tokens"]:
        if not token["special"]:
            tokenizer_json["model"]["vocab"][token["content"]] = token["id"]  # plain vocabulary entries, not added tokens
    tokenizer_json["added_tokens"] = [token for token in tokenizer_json["added_tokens"] if token["special"]]
    (output_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False, "model_max_length": LONG_CONTEXT,
    }  # fmt: skip
    if image_tokens:
        tokenizer_config["extra_special_tokens"] = GEMMA3_IMAGE_TOKENS
    (output_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id] == [0, 1, 2] and tokenizer.sep_token is None
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def decoder_sizes(hidden_size: int, num_layers: int) -> dict[str, int]:
    """Shape arguments of the decoder configs: grouped-query attention (2 heads sharing 1 key/value head) as in the real models."""
    return {
        "hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": hidden_size * 2, "max_position_embeddings": LONG_CONTEXT,
    }  # fmt: skip


def save_decoder(config_class: Any, model_class: Any, tokenizer: Any, output_dir: Path, seed: int, **config: Any) -> Path:
    """A causal LM with random weights, as the hub publishes decoders: the *ForCausalLM checkpoint, with no
    pad_token_id unless passed (the hub's Gemma 3 config has one; train.py sets it from the tokenizer for the others)."""
    config = config_class(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config)
    return save_base_model(model_class, config, output_dir, seed)


def build_llama(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """meta-llama/Llama-3.x and its Japanese descendants (llm-jp-3, Swallow, sarashina2): <|begin_of_text|> first, no pad token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bpe_tokenizer(texts, output_dir, "<|begin_of_text|>", "<|end_of_text|>", "PreTrainedTokenizerFast")
    return save_decoder(LlamaConfig, LlamaForCausalLM, tokenizer, output_dir, seed, tie_word_embeddings=False, **decoder_sizes(hidden_size, num_layers))


def build_qwen2(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """Qwen/Qwen2.5-*: no begin-of-text token, <|endoftext|> ends a text; tied embeddings (the small Qwen models)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = bpe_tokenizer(texts, output_dir, None, "<|endoftext|>", "Qwen2Tokenizer", pad="<|endoftext|>")
    return save_decoder(Qwen2Config, Qwen2ForCausalLM, tokenizer, output_dir, seed, tie_word_embeddings=True, **decoder_sizes(hidden_size, num_layers))


def build_mistral(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """mistralai/Mistral-7B-*: <s> first, no pad token; sliding-window attention in the config."""
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = bpe_tokenizer(texts, output_dir, "<s>", "</s>", "PreTrainedTokenizerFast")
    return save_decoder(MistralConfig, MistralForCausalLM, tokenizer, output_dir, seed, sliding_window=64, **decoder_sizes(hidden_size, num_layers))


def build_gemma2(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """google/gemma-2-*: Gemma's tokenizer (gemma_tokenizer: <bos> first, a <pad> of its own, id 0, as transformers'
    GemmaTokenizer and Gemma2Config default to), soft-capped logits, local and global attention layers."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = gemma_tokenizer(texts, output_dir)
    return save_decoder(
        Gemma2Config, Gemma2ForCausalLM, tokenizer, output_dir, seed, pad_token_id=tokenizer.pad_token_id, head_dim=16, sliding_window=64,
        **decoder_sizes(hidden_size, num_layers),
    )  # fmt: skip


def build_qwen3(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """Qwen/Qwen3-*: as Qwen2.5 (no begin-of-text token, pad <|endoftext|>), but the post-trained models end a text
    with <|im_end|>, so pad and eos differ; RMS norms on queries and keys, head_dim set apart from hidden_size / heads."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = bpe_tokenizer(texts, output_dir, None, "<|im_end|>", "Qwen2Tokenizer", pad="<|endoftext|>")
    return save_decoder(
        Qwen3Config, Qwen3ForCausalLM, tokenizer, output_dir, seed, head_dim=8, tie_word_embeddings=True, **decoder_sizes(hidden_size, num_layers)
    )


def gemma3_text_settings(tokenizer: Any, hidden_size: int, num_layers: int) -> dict[str, Any]:
    """Gemma 3's language model at a tiny size, as text-only and multimodal checkpoints both have it: the tokenizer's
    own <pad>, local (sliding-window) and global attention layers alternating, here one of each."""
    layer_types = ["sliding_attention", "full_attention"] * (num_layers // 2) + ["sliding_attention"] * (num_layers % 2)
    return {
        "pad_token_id": tokenizer.pad_token_id, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
        "layer_types": layer_types, **decoder_sizes(hidden_size, num_layers),
    }  # fmt: skip


def build_gemma3(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """google/gemma-3-1b-it (model_type gemma3_text): GemmaTokenizer with <bos> first and a <pad> of its own (id 0,
    not eos), which the config names; local (sliding-window) and global attention layers, here one of each."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = gemma_tokenizer(texts, output_dir)
    return save_decoder(Gemma3TextConfig, Gemma3ForCausalLM, tokenizer, output_dir, seed, **gemma3_text_settings(tokenizer, hidden_size, num_layers))


def build_gemma3_vision(texts: list[str], output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """google/gemma-3-4b-it, 12b-it, 27b-it (model_type gemma3): a SigLIP vision tower, a projector and the Gemma 3
    language model, saved as Gemma3ForConditionalGeneration as the hub publishes them; the tokenizer of gemma3 plus
    the image tokens the config names. pad_token_id lives in text_config, which is what the classifier reads."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    tokenizer = gemma_tokenizer(texts, output_dir, image_tokens=True)
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **gemma3_text_settings(tokenizer, hidden_size, num_layers),
    )  # fmt: skip
    # 16x16 images in 4x4 patches, pooled to 2x2 = 4 tokens an image (the hub's: 896 / 14 = 64 patches a side, 256 tokens).
    vision_config = SiglipVisionConfig(
        hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers, num_attention_heads=2,
        image_size=16, patch_size=4, vision_use_head=False,
    )  # fmt: skip
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA3_IMAGE_TOKENS.items()}
    config = Gemma3Config(
        text_config=text_config, vision_config=vision_config, mm_tokens_per_image=4,
        boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"],
    )  # fmt: skip
    return save_base_model(Gemma3ForConditionalGeneration, config, output_dir, seed)


Builder = Callable[[list[str], Path, int, int, int], Path]

# Family name -> (builder, tokenizer class the folder loads with, the hub models it stands for).
FAMILIES: dict[str, tuple[Builder, str, str]] = {
    "bert-word": (build_bert_word, "BertJapaneseTokenizer", "cl-tohoku/bert-base-japanese-v3"),
    "bert-char": (build_bert_char, "BertJapaneseTokenizer", "cl-tohoku/bert-base-japanese-char-v3"),
    "mbert": (build_mbert, "BertTokenizer", "bert-base-multilingual-cased"),
    "xlm-roberta": (build_xlm_roberta, "XLMRobertaTokenizer", "xlm-roberta-base"),
    "luke": (build_luke, "MLukeTokenizer", "studio-ousia/luke-japanese-base-lite"),
    "mluke": (build_mluke, "MLukeTokenizer", "studio-ousia/mluke-base-lite"),
    "modernbert": (build_modernbert, "PreTrainedTokenizerFast", "sbintuitions/modernbert-ja-130m"),
    "deberta-v2": (build_deberta_v2, "DebertaV2Tokenizer", "ku-nlp/deberta-v3-base-japanese"),
}

# Decoder LLMs, trained with LoRA (tests/test_lora.py): the same shape of entry.
DECODER_FAMILIES: dict[str, tuple[Builder, str, str]] = {
    "llama": (
        build_llama, "PreTrainedTokenizerFast",
        "llm-jp/llm-jp-3-1.8b, llm-jp/llm-jp-3-3.7b, tokyotech-llm/Llama-3.1-Swallow-8B-v0.5, sbintuitions/sarashina2.2-1b, sbintuitions/sarashina2.2-3b",
    ),  # fmt: skip
    "qwen2": (build_qwen2, "Qwen2Tokenizer", "Qwen/Qwen2.5-0.5B-Instruct"),
    "mistral": (build_mistral, "PreTrainedTokenizerFast", "mistralai/Mistral-7B-v0.3"),
    "gemma2": (build_gemma2, "GemmaTokenizer", "google/gemma-2-2b-jpn-it"),
    "qwen3": (build_qwen3, "Qwen2Tokenizer", "Qwen/Qwen3-1.7B, Qwen/Qwen3-4B, Qwen/Qwen3-8B"),
    "gemma3": (build_gemma3, "GemmaTokenizer", "google/gemma-3-1b-it"),
    "gemma3-vision": (build_gemma3_vision, "GemmaTokenizer", "google/gemma-3-4b-it, google/gemma-3-12b-it, google/gemma-3-27b-it"),
}
ALL_FAMILIES = {**FAMILIES, **DECODER_FAMILIES}


def build_tiny_model(family: str, texts: list[str], output_dir: Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny model of FAMILY (random weights, a tokenizer trained on TEXTS) to output_dir, replacing it whole.

    Built in a fresh folder: AutoTokenizer would prefer a stale tokenizer.json to the new vocabulary files.
    """
    from transformers.utils import logging

    logging.disable_progress_bar()
    builder, _, _ = ALL_FAMILIES[family]
    with atomic_dir(output_dir) as tmp:
        builder(texts, tmp, hidden_size, num_layers, seed)
    return output_dir


class Args(Tap):
    family: str  # an encoder family of FAMILIES or a decoder LLM family of DECODER_FAMILIES (--help lists the choices)
    dataset_dir: Path = Path("datasets/livedoor")  # a prepared dataset; its train.jsonl gives the vocabulary
    output_dir: Path  # where the model and tokenizer are saved
    hidden_size: int = 32  # width of the model (base models: 768)
    num_layers: int = 2  # transformer layers (base models: 12)
    seed: int = 0  # seed of the random weights

    def configure(self) -> None:
        self.add_argument("--family", choices=list(ALL_FAMILIES))


if __name__ == "__main__":
    args = Args().parse_args()
    build_tiny_model(args.family, read_texts(args.dataset_dir), args.output_dir, args.hidden_size, args.num_layers, args.seed)
    print(f"saved a tiny {args.family} ({ALL_FAMILIES[args.family][1]}) to {args.output_dir}")
