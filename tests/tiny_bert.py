"""Build a tiny BERT (random weights) with a real Japanese tokenizer, for tests and quick trials.

The tokenizer is the one cl-tohoku/bert-base-japanese-v3 uses (BertJapaneseTokenizer: MeCab words
through fugashi + unidic-lite, then WordPiece), over a vocabulary built from the dataset's own
text. The folder is written with save_pretrained, so train.py loads it through the same
Auto* code path as a hub model:

    poetry run python tests/tiny_bert.py --dataset_dir datasets/livedoor --output_dir models/tiny-bert
    poetry run python src/train.py --model_name models/tiny-bert --max_seq_len 128 --epochs 3
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tap import Tap

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_vocab(texts: list[str], max_words: int) -> list[str]:
    """Special tokens, the most frequent MeCab words, then every character alone and as ##piece.

    Single characters keep WordPiece from falling back to [UNK] for words outside the list.
    """
    from transformers.models.bert_japanese.tokenization_bert_japanese import MecabTokenizer

    mecab = MecabTokenizer(do_lower_case=False, mecab_dic="unidic_lite")
    words = Counter(word for text in texts for word in mecab.tokenize(text))
    chars = sorted({char for word in words for char in word})
    vocab = SPECIAL_TOKENS + [w for w, _ in words.most_common(max_words) if len(w) > 1]
    return vocab + chars + [f"##{char}" for char in chars]


def build_tiny_bert(
    texts: list[str],
    output_dir: Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    max_words: int = 8000,
    seed: int = 0,
) -> Path:
    """Save a BertJapaneseTokenizer and a randomly initialised small BertModel to output_dir."""
    import torch
    from transformers import BertConfig, BertJapaneseTokenizer, BertModel
    from transformers.utils import logging

    logging.disable_progress_bar()

    output_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = output_dir / "vocab.txt"
    vocab_file.write_text("\n".join(build_vocab(texts, max_words)) + "\n", encoding="utf-8")
    tokenizer = BertJapaneseTokenizer(
        vocab_file=str(vocab_file),
        word_tokenizer_type="mecab",
        subword_tokenizer_type="wordpiece",
        mecab_kwargs={"mecab_dic": "unidic_lite"},
        model_max_length=512,
    )
    tokenizer.save_pretrained(output_dir)

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(2, hidden_size // 64),  # bert-base: 768 / 64 = 12
        intermediate_size=hidden_size * 4,
        max_position_embeddings=512,
        type_vocab_size=2,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(output_dir)
    return output_dir


def read_texts(dataset_dir: Path) -> list[str]:
    """Titles and bodies of the training split (the vocabulary never sees val or test)."""
    import json

    with (dataset_dir / "train.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [text for row in rows for text in (row["title"], row["body"])]


class Args(Tap):
    dataset_dir: Path = Path("datasets/livedoor")  # a prepared dataset; its train.jsonl gives the vocabulary
    output_dir: Path = Path("models/tiny-bert")  # where the model and tokenizer are saved
    hidden_size: int = 32  # width of the model (bert-base: 768)
    num_layers: int = 2  # transformer layers (bert-base: 12)
    max_words: int = 8000  # most frequent MeCab words kept in the vocabulary, besides single characters
    seed: int = 0  # seed of the random weights


if __name__ == "__main__":
    args = Args().parse_args()
    build_tiny_bert(read_texts(args.dataset_dir), args.output_dir, args.hidden_size, args.num_layers, args.max_words, args.seed)
    print(f"saved a tiny BERT to {args.output_dir}")
