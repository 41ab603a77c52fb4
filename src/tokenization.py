"""Text to token ids, for train.py and predict.py: once per corpus and tokenizer.

- One input layout (InputLayout: the text fields, max_seq_len, how the last text is truncated) for
  train.py, predict.py, the saved model's config and the cache key.
- Every text is tokenised whole and alone; then the last text (the body) is truncated as the layout
  says (its head, its tail, or both ends), and the tokenizer's own special tokens go around the texts.
  Each split reports how many examples truncation cut and how many tokens it dropped.
- Two ways to get a text's tokens, with identical ids: the tokenizer's own transformers code, or, for
  MeCab + WordPiece tokenizers (the cl-tohoku word models), a fast path: the same MeCab over the same
  whole text, then WordPiece in Rust (the `tokenizers` library), each distinct word encoded once.
- A first text (the title) that alone leaves no room is truncated too, and the body left out
  (counted and reported).
- Worker processes: one per CPU core this process may use (its affinity), shared among torchrun's
  local processes.
- An on-disk cache of tokenised splits, keyed by the contents of the tokenizer's, the dataset's and
  the MeCab dictionary's files, the libraries' versions and the input layout, shared by the runs of a
  sweep and by torchrun ranks: a file lock lets one process tokenise while the others wait and read;
  entries are written atomically. The cache is optional: when it cannot be used, the run says so and
  goes on without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import math
import os
import tempfile
import time
import unicodedata
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, product
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import transformers
from more_itertools import chunked
from transformers import PreTrainedTokenizerBase
from transformers.models.bert_japanese.tokenization_bert_japanese import BertJapaneseTokenizer, MecabTokenizer, WordpieceTokenizer

import utils
from utils import InputError

try:  # POSIX; elsewhere the cache works without a lock (two runs may both tokenise)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CACHE_FORMAT = 2  # bump when the entry layout or the encoding rules change: old entries become misses
MAX_WORKERS = 8
TRUNCATION_MODES = ("head", "tail", "head_tail")


# --- the input layout -------------------------------------------------------------------------


@dataclass(frozen=True)
class InputLayout:
    """What the model reads of a row: train.py's flags, a saved model's config, part of the cache key.

    truncation: what of the last text (the body) is kept when the example is too long: its head (the
    reference), its tail, or head_tail (Sun et al. 2019, "How to Fine-Tune BERT for Text
    Classification?": the first 128 and the last 382 tokens at 512): head_tokens from its start and
    the rest of the room from its end. head_tokens defaults to 128 at 512, scaled to max_seq_len.
    """

    text_fields: tuple[str, ...] = ("title", "body")
    max_seq_len: int = 512
    truncation: str = "head"
    head_tokens: int | None = None  # head_tail only; None: max_seq_len / 4 (128 at 512)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_fields", tuple(self.text_fields))
        if not 1 <= len(self.text_fields) <= 2 or not all(isinstance(name, str) for name in self.text_fields):
            raise InputError(f"text_fields must be one field name or two, got {list(self.text_fields)!r}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 1:
            raise InputError(f"max_seq_len must be a positive integer, got {self.max_seq_len!r}")
        if self.truncation not in TRUNCATION_MODES:
            raise InputError(f"truncation must be one of {', '.join(TRUNCATION_MODES)}, got {self.truncation!r}")
        if self.truncation != "head_tail":
            if self.head_tokens is not None:
                raise InputError(f"head_tokens applies to truncation head_tail only (truncation is {self.truncation})")
            return
        if self.head_tokens is None:
            object.__setattr__(self, "head_tokens", round(self.max_seq_len / 4))  # Sun et al.: 128 of 512
        if not isinstance(self.head_tokens, int) or not 0 <= self.head_tokens < self.max_seq_len:
            raise InputError(f"head_tokens must be at least 0 and below max_seq_len {self.max_seq_len}, got {self.head_tokens!r}")

    @classmethod
    def of(cls, source: Any) -> InputLayout:
        """The layout in train.py's Args or in a saved model's config; models saved before truncation modes kept the head."""
        default = cls()
        return cls(
            tuple(getattr(source, "text_fields", None) or default.text_fields),
            getattr(source, "max_seq_len", None) or default.max_seq_len,
            getattr(source, "truncation", None) or default.truncation,
            getattr(source, "head_tokens", None),
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (a saved model's config.json, the cache key)."""
        return {"text_fields": list(self.text_fields), "max_seq_len": self.max_seq_len, "truncation": self.truncation, "head_tokens": self.head_tokens}

    def describe(self) -> str:
        kept = {"head": "its start", "tail": "its end", "head_tail": f"its first {self.head_tokens} tokens and the rest from its end"}
        return (
            f"{' + '.join(self.text_fields)}, at most {self.max_seq_len} tokens; truncation {self.truncation}: "
            f"a {self.text_fields[-1]} that does not fit keeps {kept[self.truncation]}"
        )


# --- encoded examples -------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids of a list of examples, end to end in flat arrays (cheap to pickle and to cache)."""

    input_ids: np.ndarray  # int32, every example's ids one after the other
    offsets: np.ndarray  # int64, len(examples) + 1: example i is input_ids[offsets[i]:offsets[i + 1]]
    token_type_ids: np.ndarray | None  # int8 beside input_ids, or None when the model takes none
    dropped: np.ndarray  # int32 per example: text tokens that truncation left out (0: the example fits)
    cut_titles: int  # examples whose first text alone left no room: truncated, the last text left out

    @classmethod
    def from_lists(
        cls, ids: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None, dropped: Sequence[int], cut_titles: int
    ) -> Encoded:
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(row) for row in ids], out=offsets[1:])
        flat_types = None if types is None else np.fromiter(chain.from_iterable(types), dtype=np.int8, count=int(offsets[-1]))
        flat_ids = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat_ids, offsets, flat_types, np.asarray(dropped, dtype=np.int32).reshape(-1), cut_titles)

    @classmethod
    def concat(cls, parts: Sequence[Encoded]) -> Encoded:
        lengths = np.concatenate([np.diff(part.offsets) for part in parts])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        types = None if parts[0].token_type_ids is None else np.concatenate([part.token_type_ids for part in parts])
        dropped = np.concatenate([part.dropped for part in parts])
        return cls(np.concatenate([part.input_ids for part in parts]), offsets, types, dropped, sum(part.cut_titles for part in parts))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> dict[str, list[int]]:
        span = slice(self.offsets[i], self.offsets[i + 1])
        example = {"input_ids": self.input_ids[span].tolist()}
        if self.token_type_ids is not None:
            example["token_type_ids"] = self.token_type_ids[span].tolist()
        return example

    def examples(self, labels: Sequence[int]) -> list[dict]:
        """Examples ready for batching (data.collate): token ids, label and position in the split."""
        return [{**self.example(i), "label": label, "index": i} for i, label in enumerate(labels)]

    def truncation_report(self) -> dict[str, int | float]:
        """How much truncation removed: examples cut, their share, and the mean tokens dropped per cut example."""
        cut = self.dropped > 0
        return {
            "examples": len(self),
            "truncated": int(cut.sum()),
            "truncated_share": round(float(cut.mean()), 4) if len(self) else 0.0,
            "mean_tokens_dropped_per_truncated_example": round(float(self.dropped[cut].mean()), 1) if cut.any() else 0.0,
        }


def wants_token_type_ids(config: transformers.PretrainedConfig, text_fields: Sequence[str]) -> bool:
    """Segment ids matter for pairs on models trained with them (BERT: 2 types; RoBERTa-like: 1)."""
    return len(text_fields) == 2 and getattr(config, "type_vocab_size", 1) > 1


def text_separator(tokenizer: PreTrainedTokenizerBase, text_fields: Sequence[str]) -> str | None:
    """How a pair reaches a tokenizer without a separator token (the decoder LLMs: Llama, Qwen, Gemma, Mistral).

    Their own pair encoding runs the texts together with nothing between (Qwen) or repeats the
    begin-of-text token (Llama 3). They read one text instead, the fields joined by a newline, as in
    hppRC/llm-lora-classification's best template f"{title}\n{body}" (the Encoder joins them: the
    title and the body are still truncated apart, so every truncation mode keeps the title). None: a
    pair goes to the tokenizer as a pair ([CLS] title [SEP] body [SEP] and the like).
    """
    return "\n" if len(text_fields) == 2 and tokenizer.sep_token is None else None


def texts_of(rows: Sequence[dict], text_fields: Sequence[str]) -> list[list[str]]:
    """The texts of each row: its text fields, in order."""
    return [[row[name] for name in text_fields] for row in rows]


def truncation_note(where: str, report: Mapping[str, int | float], layout: InputLayout) -> str:
    """One line of a split's (or predict.py input's) truncation report."""
    return (
        f"{where}: {report['truncated']:,} of {report['examples']:,} examples truncated ({report['truncated_share']:.1%}) at "
        f"{layout.max_seq_len} tokens, {layout.truncation} truncation; {report['mean_tokens_dropped_per_truncated_example']:,.1f} "
        f"tokens dropped per truncated example (mean)"
    )


def cut_titles_note(where: str, count: int, text_fields: Sequence[str], limit: str) -> str:
    """The report of rows whose first text alone filled the length limit (train.py per split, predict.py per input)."""
    return f"{where}: {count} row(s) whose {text_fields[0]} alone fills {limit}: {text_fields[0]} truncated to fit, {text_fields[-1]} left out"


def report_truncation(where: str, encoded: Encoded, layout: InputLayout, limit: str, log: Callable[[str], None]) -> dict[str, int | float]:
    """Log what truncation did to a split (train.py) or an input (predict.py), LIMIT naming the length limit; return the report."""
    report = encoded.truncation_report()
    log(truncation_note(where, report, layout))
    if encoded.cut_titles:
        log(cut_titles_note(where, encoded.cut_titles, layout.text_fields, limit))
    return report


# --- truncation and special tokens ------------------------------------------------------------


def keep(ids: list[int], budget: int, layout: InputLayout) -> list[int]:
    """What truncation keeps of a text's ids in `budget` tokens: its head, its tail, or head_tokens of its head and the rest from its tail."""
    if len(ids) <= budget:
        return ids
    if layout.truncation == "head":
        return ids[:budget]
    head = 0 if layout.truncation == "tail" else min(layout.head_tokens, budget)
    return ids[:head] + ids[len(ids) - (budget - head) :]


def fit(texts: Sequence[list[int]], room: int, layout: InputLayout) -> tuple[list[list[int]], bool]:
    """The ids of one example's texts that fit in ROOM tokens, and whether its first text alone filled the room.

    The last text is truncated as the layout says (the reference truncates the body only). A first
    text (the title) that alone leaves no room is cut to the room (its head) and the last left out.
    """
    *first, last = texts
    if first and len(first[0]) >= room:
        return [first[0][:room], []], True
    return [*first, keep(last, room - sum(map(len, first)), layout)], False


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens a tokenizer puts around one text or a pair, with the segment ids, read off its own output."""

    parts: tuple[tuple[int, ...], ...]  # ids before, (between,) and after the text(s)
    part_types: tuple[tuple[int, ...], ...]  # their segment ids
    text_types: tuple[int, ...]  # the segment id of each text's tokens

    @property
    def count(self) -> int:
        return sum(map(len, self.parts))

    def wrap(self, texts: Sequence[list[int]]) -> tuple[list[int], list[int]]:
        """(input_ids, token_type_ids) of the texts with the special tokens around them."""
        ids, types = list(self.parts[0]), list(self.part_types[0])
        for text, text_type, part, part_types in zip(texts, self.text_types, self.parts[1:], self.part_types[1:]):
            ids += text
            ids += part
            types += [text_type] * len(text)
            types += part_types
        return ids, types


# Probes of different lengths: only the true template fits both.
SPECIAL_TOKEN_PROBES = (("1", "2 3"), ("4 5 6", "7"))


def learn_special_tokens(tokenizer: PreTrainedTokenizerBase, num_texts: int) -> SpecialTokens:
    """Where the tokenizer puts its special tokens (BERT: [CLS] a [SEP] b [SEP]; RoBERTa: <s> a </s></s> b </s>).

    Read off the tokenizer's own output for probe texts, not from a table of tokenizer classes: each
    probe is encoded with the special tokens and each of its texts alone without them, and the
    template is what surrounds the texts in the former. It holds for the whole corpus because
    templates do not depend on the text (tests/test_tokenization.py compares, for every model family,
    the head truncation built with it against the tokenizer's own truncation).
    """
    fitting: set[SpecialTokens] | None = None
    for probe in SPECIAL_TOKEN_PROBES:
        texts = probe[:num_texts]
        own = tokenizer(*texts, return_token_type_ids=True, return_attention_mask=False)
        ids, types = own["input_ids"], own.get("token_type_ids") or [0] * len(own["input_ids"])
        alone = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        found = set(templates_around(ids, types, alone))
        fitting = found if fitting is None else fitting & found
    if not fitting or len(fitting) > 1:
        raise InputError(f"cannot tell where {type(tokenizer).__name__} puts its special tokens (probe texts {SPECIAL_TOKEN_PROBES}); use another tokenizer")
    return fitting.pop()


def templates_around(ids: list[int], types: list[int], texts: list[list[int]]) -> Iterator[SpecialTokens]:
    """Every way of reading IDS as special tokens around TEXTS, in order, each text's tokens of one segment id."""
    count = len(ids) - sum(map(len, texts))
    for sizes in product(range(count + 1), repeat=len(texts)):  # tokens before each text
        if sum(sizes) > count:
            continue
        parts, part_types, text_types, at = [], [], [], 0
        for size, text in zip(sizes, texts):
            if ids[at + size : at + size + len(text)] != text or len(set(types[at + size : at + size + len(text)])) > 1:
                break
            parts.append(tuple(ids[at : at + size]))
            part_types.append(tuple(types[at : at + size]))
            text_types.append(types[at + size] if text else 0)
            at += size + len(text)
        else:
            yield SpecialTokens((*parts, tuple(ids[at:])), (*part_types, tuple(types[at:])), tuple(text_types))


def room_for_text(special: SpecialTokens, max_seq_len: int) -> int:
    """Tokens left for the text(s) once the special tokens are in; none left is an error."""
    room = max_seq_len - special.count
    if room < 1:
        raise InputError(f"--max_seq_len {max_seq_len} leaves no room for text: the special tokens alone take {special.count}")
    return room


# --- encoders: the tokenizer's own path and the fast path -------------------------------------


class Encoder:
    """Rows of texts to Encoded: each text's ids (text_ids, by the subclass), then fit, then the special tokens.

    With a separator (text_separator), the texts become one: each but the last is encoded with the
    separator after it, fit truncates them as it truncates a pair (the last text only, the title kept),
    and the special tokens are those of one text.
    """

    description: str

    def __init__(self, tokenizer: PreTrainedTokenizerBase, separator: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.separator = separator
        self.special: dict[int, SpecialTokens] = {}

    def text_ids(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, whole and alone, without special tokens."""
        raise NotImplementedError

    def special_tokens(self, num_texts: int) -> SpecialTokens:
        """The special tokens around num_texts texts (around one, with a separator)."""
        wrapped = 1 if self.separator is not None else num_texts
        if wrapped not in self.special:
            self.special[wrapped] = learn_special_tokens(self.tokenizer, wrapped)
        return self.special[wrapped]

    def __call__(self, texts: Sequence[Sequence[str]], layout: InputLayout, token_type_ids: bool) -> Encoded:
        if not texts:
            return Encoded.from_lists([], [] if token_type_ids else None, [], 0)
        num_texts = len(texts[0])
        special = self.special_tokens(num_texts)
        room = room_for_text(special, layout.max_seq_len)
        after = [self.separator or ""] * (num_texts - 1) + [""]  # the separator ends every text but the last
        columns = [self.text_ids([row[i] + after[i] for row in texts]) for i in range(num_texts)]
        ids, types, dropped, cut_titles = [], [], [], 0
        for whole in zip(*columns):
            kept, cut_title = fit(whole, room, layout)
            example_ids, example_types = special.wrap(kept if self.separator is None else [list(chain.from_iterable(kept))])
            ids.append(example_ids)
            types.append(example_types)
            dropped.append(sum(map(len, whole)) - sum(map(len, kept)))
            cut_titles += cut_title
        return Encoded.from_lists(ids, types if token_type_ids else None, dropped, cut_titles)


class SlowEncoder(Encoder):
    """The tokenizer as transformers runs it: each text through its own code (any tokenizer class)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, reason: str, separator: str | None = None) -> None:
        super().__init__(tokenizer, separator)
        self.description = f"{type(tokenizer).__name__}'s own {'fast (Rust)' if tokenizer.is_fast else 'Python'} code ({reason})"

    def text_ids(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: a whole body longer than the model is expected here (truncation comes next), not worth a warning.
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []


def fast_path_problem(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why the MeCab + Rust WordPiece path would not give the tokenizer's own ids, or None if it does.

    A structural check of the parts the tokenizer is made of (not a list of model names): a
    BertJapaneseTokenizer whose word splitting is transformers' MecabTokenizer, whose subwords are
    its WordpieceTokenizer, with no method of its own overridden and no added token outside the vocabulary.
    """
    if not isinstance(tokenizer, BertJapaneseTokenizer):
        return f"{type(tokenizer).__name__} is not a BertJapaneseTokenizer"
    for method in ("tokenize", "_tokenize", "prepare_for_tokenization", "_convert_token_to_id", "build_inputs_with_special_tokens"):
        if getattr(type(tokenizer), method) is not getattr(BertJapaneseTokenizer, method):
            return f"{type(tokenizer).__name__} overrides {method}"
    if not (tokenizer.do_word_tokenize and type(getattr(tokenizer, "word_tokenizer", None)) is MecabTokenizer):
        return f"its words are not split by MeCab (word_tokenizer_type {tokenizer.word_tokenizer_type})"
    if not (tokenizer.do_subword_tokenize and type(getattr(tokenizer, "subword_tokenizer", None)) is WordpieceTokenizer):
        return f"its subwords are not WordPiece (subword_tokenizer_type {tokenizer.subword_tokenizer_type})"
    if tokenizer.split_special_tokens:
        return "it splits special tokens"
    if tokenizer.subword_tokenizer.unk_token not in tokenizer.vocab:
        return f"its unknown token {tokenizer.subword_tokenizer.unk_token} is not in the vocabulary"
    outside = [token for token, i in tokenizer.added_tokens_encoder.items() if tokenizer.vocab.get(token) != i]
    if outside:
        return f"added tokens outside the vocabulary ({', '.join(outside[:3])})"
    return None


class MecabWordPieceEncoder(Encoder):
    """BertJapaneseTokenizer's ids, faster: its MeCab over the whole text, then WordPiece in Rust.

    - Words come from a MeCab tagger built by the tokenizer's own MecabTokenizer class with its own
      options (dictionary, mecabrc, normalisation), asked for plain space-separated words instead of
      one Python object per word. MeCab reads the whole text, as the tokenizer does: its best path
      over a long ambiguous run (の の の ...) can change how the text splits far before the end, so
      no prefix of the text is a safe stand-in for it.
    - Each distinct word is encoded once (by `tokenizers`' WordPiece with the same vocabulary, unknown
      token and max_input_chars_per_word) and remembered.
    - A text that contains a special token's text ([SEP], ...) is left to the tokenizer itself.
    """

    def __init__(self, tokenizer: BertJapaneseTokenizer, separator: str | None = None) -> None:
        super().__init__(tokenizer, separator)
        self.description = "fast path: MeCab words (fugashi, the tokenizer's own options) + WordPiece in Rust (tokenizers)"
        self._build()

    def _build(self) -> None:
        words = self.tokenizer.word_tokenizer
        options = dict(self.tokenizer.mecab_kwargs or {})
        options["mecab_option"] = f"{options.get('mecab_option') or ''} -Owakati"  # the same analysis, printed as words
        self.tagger = type(words)(do_lower_case=False, never_split=words.never_split, **options).mecab
        self.normalize = words.normalize_text
        self.lower_case = words.do_lower_case
        self.never_split = set(words.never_split) | set(self.tokenizer.all_special_tokens)
        subwords = self.tokenizer.subword_tokenizer
        self.wordpiece = tokenizers.Tokenizer(
            tokenizers.models.WordPiece(
                vocab=dict(self.tokenizer.vocab), unk_token=subwords.unk_token, max_input_chars_per_word=subwords.max_input_chars_per_word
            )
        )
        self.special_texts = list(self.tokenizer.added_tokens_encoder)
        self.memo: dict[str, list[int]] = {}

    def __getstate__(self) -> dict:  # the tagger is not picklable: worker processes build their own
        return {"tokenizer": self.tokenizer, "separator": self.separator, "special": self.special}

    def __setstate__(self, state: dict) -> None:
        self.tokenizer, self.separator, self.special = state["tokenizer"], state["separator"], state["special"]
        self.description = ""
        self._build()

    def words(self, text: str) -> list[str]:
        """The word tokenizer's words of the whole text, split on white space as WordPiece splits them."""
        if self.normalize:
            text = unicodedata.normalize("NFKC", text)
        words = self.tagger.parse(text).split()
        if self.lower_case:
            words = [word if word in self.never_split else word.lower() for word in words]
        return words

    def word_ids(self, words: list[str]) -> list[int]:
        memo = self.memo
        new = [word for word in set(words) if word not in memo]
        if new:
            for word, encoding in zip(new, self.wordpiece.encode_batch([[word] for word in new], is_pretokenized=True, add_special_tokens=False)):
                memo[word] = encoding.ids
        return list(chain.from_iterable(map(memo.__getitem__, words)))

    def text_ids(self, texts: list[str]) -> list[list[int]]:
        return [
            self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the tokenizer splits special tokens' texts out itself
            if any(special in text for special in self.special_texts)
            else self.word_ids(self.words(text))
            for text in texts
        ]


def choose_encoder(tokenizer: PreTrainedTokenizerBase, slow: bool, text_fields: Sequence[str] = ()) -> Encoder:
    """The fast MeCab + WordPiece path where it gives the tokenizer's own ids, else the tokenizer itself; rows of
    TEXT_FIELDS, read as one text where the tokenizer has no separator token (text_separator)."""
    separator = text_separator(tokenizer, text_fields)
    if slow:
        return SlowEncoder(tokenizer, "--slow_tokenizer", separator)
    problem = fast_path_problem(tokenizer)
    if problem is not None:
        return SlowEncoder(tokenizer, f"no fast MeCab + WordPiece path: {problem}", separator)
    return MecabWordPieceEncoder(tokenizer, separator)


# --- worker processes -------------------------------------------------------------------------


def tokenizer_workers(num_workers: int) -> int:
    """--num_workers, or by default the usable CPU cores shared among this machine's torchrun processes (at most 8)."""
    return num_workers or max(1, min(utils.available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), MAX_WORKERS))


def _encode_chunk(job: tuple[Encoder, list[list[str]], InputLayout, bool]) -> Encoded:
    encoder, texts, layout, token_type_ids = job
    return encoder(texts, layout, token_type_ids)


def encode_parallel(encoder: Encoder, texts: list[list[str]], layout: InputLayout, token_type_ids: bool, num_workers: int) -> Encoded:
    """encoder(texts) spread over processes (the Japanese tokenizer has no fast version: ~120 docs/s per core)."""
    workers = tokenizer_workers(num_workers)
    if workers == 1 or len(texts) < 64:  # a pool costs more than it saves here
        return encoder(texts, layout, token_type_ids)
    encoder.special_tokens(len(texts[0]))  # learned once, here, and carried to the workers
    chunk_size = math.ceil(len(texts) / (workers * 4))  # 4 chunks per worker even out their speeds
    jobs = [(encoder, chunk, layout, token_type_ids) for chunk in chunked(texts, chunk_size)]
    with get_context().Pool(workers) as pool:  # fork on Linux, spawn elsewhere: nothing global is read
        return Encoded.concat(pool.map(_encode_chunk, jobs))


# --- the cache of tokenised splits ------------------------------------------------------------


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what save_pretrained writes (vocabulary, settings, added tokens), wherever the tokenizer came from."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(tmp).as_posix()}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


# The files of a MeCab dictionary folder that MeCab reads (besides the .dic files dictionary_info names).
MECAB_DICTIONARY_FILES = ("sys.dic", "unk.dic", "matrix.bin", "char.bin", "dicrc", "mecabrc")
DIGEST_MEMO = "mecab-dictionary-digests.json"  # in the cache folder: path -> (file status, sha256)


def dictionary_files(tagger: Any) -> list[Path]:
    """The files of the MeCab dictionaries the tagger loaded: each .dic it names and its folder's binaries and settings."""
    files: dict[Path, None] = {}
    for info in tagger.dictionary_info:
        path = Path(info["filename"])
        files[path] = None
        for name in MECAB_DICTIONARY_FILES:
            if (path.parent / name).is_file():
                files[path.parent / name] = None
    return sorted(files)


def file_status(path: Path) -> list[int]:
    """What changes whenever a file's content may have: size, modification and status-change times, inode."""
    status = path.stat()
    return [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino]


def dictionary_digest(tagger: Any, memo_dir: Path | None) -> str:
    """A hash of the MeCab dictionary's contents, not only its entry count: an edited or rebuilt dictionary is another key.

    The dictionary is large (unidic-lite: 250 MB, ~1 s to hash), so each file's hash is remembered
    in MEMO_DIR beside the cache entries, with the file's status: runs of a sweep hash it once.
    """
    memo_path = memo_dir / DIGEST_MEMO if memo_dir is not None else None
    memo: dict[str, Any] = {}
    if memo_path is not None:
        with contextlib.suppress(OSError, ValueError, InputError):
            memo = utils.load_json(memo_path)
    memo = memo if isinstance(memo, dict) else {}
    digest, changed = hashlib.sha256(), False
    for path in dictionary_files(tagger):
        status, known = file_status(path), memo.get(str(path))
        if not (isinstance(known, dict) and known.get("status") == status and isinstance(known.get("sha256"), str)):
            known, changed = {"status": status, "sha256": file_digest(path)}, True
            memo[str(path)] = known
        digest.update(f"{path.name}\0{known['sha256']}\n".encode())
    if changed and memo_path is not None:
        with contextlib.suppress(OSError):  # only a memo: the next run hashes again
            utils.save_json(memo, memo_path)
    return digest.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that turn text into ids (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in ("transformers", "tokenizers", "fugashi", "sentencepiece"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["mecab"] = mecab_version()
    return versions


def mecab_version() -> str | None:
    """The MeCab library's own version: fugashi's wheels bundle one, fugashi built from source links the system's."""
    try:
        import ctypes
        import ctypes.util

        import fugashi
    except ImportError:
        return None
    bundled = sorted(Path(fugashi.__file__).parent.parent.glob("fugashi.libs/libmecab*"))
    library = str(bundled[0]) if bundled else ctypes.util.find_library("mecab")
    if library is None:
        return None
    try:
        mecab = ctypes.CDLL(library)
    except OSError:
        return None
    mecab.mecab_version.restype = ctypes.c_char_p
    return mecab.mecab_version().decode()


def cache_key(
    tokenizer: PreTrainedTokenizerBase, encoder: Encoder, files: Mapping[str, Path], layout: InputLayout, token_type_ids: bool,
    memo_dir: Path | None = None,
) -> dict:
    """Everything the cached ids depend on; an entry is used only when all of it matches."""
    tagger = getattr(getattr(tokenizer, "word_tokenizer", None), "mecab", None)  # a MeCab dictionary is outside the tokenizer's files
    return {
        "format": CACHE_FORMAT,
        "tokenizer": tokenizer_digest(tokenizer),
        "word_dictionary": {
            "info": [{k: d[k] for k in ("charset", "size", "version")} for d in tagger.dictionary_info],
            "sha256": dictionary_digest(tagger, memo_dir),
        } if tagger else None,
        "encoder": type(encoder).__name__,
        "libraries": library_versions(),
        "files": {split: file_digest(path) for split, path in files.items()},
        "layout": layout.to_dict(),
        "token_type_ids": token_type_ids,
        # Only where texts are joined (decoders): the keys of pairs stay as they were. (Named anew since the
        # title is truncated apart from the body.)
        **({"text_separator": encoder.separator} if encoder.separator is not None else {}),
    }  # fmt: skip


def entry_path(cache_dir: Path, key: dict) -> Path:
    return cache_dir / f"{hashlib.sha256(utils.to_json(key).encode()).hexdigest()[:40]}.npz"


def read_entry(path: Path, key: dict, sizes: Mapping[str, int]) -> tuple[dict[str, Encoded] | None, str | None]:
    """The cached splits, or (None, why not): absent (no reason), unreadable, truncated or not this key's."""
    try:
        with np.load(path, allow_pickle=False) as entry:  # zip members carry CRCs: corrupted bytes raise here
            if bytes(entry["key"]).decode() != utils.to_json(key):
                return None, "written for another key"
            encoded = {}
            for split, size in sizes.items():
                ids, offsets, dropped = entry[f"{split}.input_ids"], entry[f"{split}.offsets"], entry[f"{split}.dropped"]
                types = entry[f"{split}.token_type_ids"] if key["token_type_ids"] else None
                valid = len(offsets) == size + 1 and offsets[0] == 0 and offsets[-1] == len(ids) and bool(np.all(np.diff(offsets) > 0))
                if not valid or len(dropped) != size or (types is not None and len(types) != len(ids)):
                    return None, f"{split} does not match the dataset"
                encoded[split] = Encoded(ids, offsets, types, dropped, int(entry[f"{split}.cut_titles"]))
            return encoded, None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"


def write_entry(path: Path, key: dict, encoded: Mapping[str, Encoded]) -> None:
    """One .npz of flat integer arrays (no pickles), renamed into place only when complete."""
    arrays = {"key": np.frombuffer(utils.to_json(key).encode(), dtype=np.uint8)}
    for split, part in encoded.items():
        arrays[f"{split}.input_ids"], arrays[f"{split}.offsets"], arrays[f"{split}.dropped"] = part.input_ids, part.offsets, part.dropped
        arrays[f"{split}.cut_titles"] = np.array(part.cut_titles)
        if part.token_type_ids is not None:
            arrays[f"{split}.token_type_ids"] = part.token_type_ids
    with utils.atomic_path(path) as tmp, tmp.open("wb") as f:  # atomic_path fsyncs it before the rename
        np.savez(f, **arrays)


@contextlib.contextmanager
def exclusive_lock(path: Path, waiting: Callable[[], None]) -> Iterator[str | None]:
    """Hold an exclusive lock on the file PATH (made if absent); yield None, or why there is no lock.

    Calls `waiting` first when another process holds it. flock works across the nodes of NFS and
    most cluster file systems; where it does not (Lustre mounted without -o flock, Windows), the
    run goes on unlocked: writes stay atomic, and two runs may both tokenise. Opening the file may
    raise OSError (the folder is not writable).
    """
    if fcntl is None:
        yield "no file locks on this platform"
        return
    with open(path, "a") as f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waiting()
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            yield f"cannot lock {path} ({e.strerror})"
            return
        try:
            yield None
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def os_error(e: OSError) -> str:
    return f"{e.strerror or type(e).__name__}{f': {e.filename}' if e.filename else ''}"


def through_cache(
    cache_dir: Path, key: dict, sizes: Mapping[str, int], encode_all: Callable[[], dict[str, Encoded]], log: Callable[[str], None],
) -> tuple[dict[str, Encoded], str]:
    """The splits from the cache entry, or tokenised now and stored there; (splits, what happened).

    The cache is optional: a folder that cannot be made, read or locked, or an entry that cannot
    be written (a full disk), is one warning, and the run goes on with the splits it tokenised.
    """
    path = entry_path(cache_dir, key)
    encoded, _ = read_entry(path, key, sizes)
    if encoded is not None:
        return encoded, f"cache hit: read {path}"
    with contextlib.ExitStack() as stack:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            lock = path.with_suffix(".lock")
            no_lock = stack.enter_context(exclusive_lock(lock, lambda: log(f"tokenised-split cache: waiting for another process that is tokenising the same splits (lock {lock}) ...")))
        except OSError as e:
            log(f"warning: tokenised-split cache: cannot use {cache_dir} ({os_error(e)}); going on without the cache")
            return encode_all(), "tokenised (cache unusable)"
        if no_lock:
            log(f"tokenised-split cache: {no_lock}; going on without a lock")
        encoded, problem = read_entry(path, key, sizes)  # another run may have written it while this one waited
        if encoded is not None:
            return encoded, f"cache hit: read {path} (written by another process while this one waited)"
        if problem:
            log(f"tokenised-split cache: ignoring {path}: {problem}")
        encoded = encode_all()
        try:
            write_entry(path, key, encoded)
        except OSError as e:
            log(f"warning: tokenised-split cache: cannot write {path} ({os_error(e)}); going on without storing the splits")
            return encoded, "tokenised (cache entry not written)"
        return encoded, f"cache miss: tokenised and wrote {path}"


def tokenize_splits(
    rows: Mapping[str, list[dict]], files: Mapping[str, Path], tokenizer: PreTrainedTokenizerBase, *, layout: InputLayout,
    token_type_ids: bool, slow: bool, num_workers: int, cache_dir: Path | None, log: Callable[[str], None],
) -> tuple[dict[str, list[dict]], dict[str, dict[str, int | float]]]:
    """Examples of each split (rows read from FILES) ready for batching, from the cache or tokenised now (then cached),
    and each split's truncation report (printed).

    slow: the tokenizer's own code even where the fast path applies; cache_dir None: no cache.
    """
    start = time.perf_counter()
    sizes = {split: len(split_rows) for split, split_rows in rows.items()}
    encoder = choose_encoder(tokenizer, slow, layout.text_fields)
    separator = encoder.separator
    log(f"tokenizer: {encoder.description}")
    log(f"input: {layout.describe()}")
    if separator is not None:
        log(
            f"input: {' + '.join(layout.text_fields)} as one text joined by {separator!r} (the tokenizer has no separator token); "
            f"truncation cuts the {layout.text_fields[-1]} only"
        )

    def encode_all() -> dict[str, Encoded]:
        log(f"tokenising in {tokenizer_workers(num_workers)} process(es) ...")
        return {split: encode_parallel(encoder, texts_of(rows[split], layout.text_fields), layout, token_type_ids, num_workers) for split in rows}

    if cache_dir is None:
        encoded, status = encode_all(), "tokenised (cache off)"
    else:
        key = cache_key(tokenizer, encoder, files, layout, token_type_ids, memo_dir=cache_dir)
        encoded, status = through_cache(cache_dir, key, sizes, encode_all, log)
    reports = {split: report_truncation(split, part, layout, f"--max_seq_len {layout.max_seq_len}", log) for split, part in encoded.items()}
    log(f"{status}; {sum(sizes.values()):,} examples in {time.perf_counter() - start:.1f} s")
    return {split: part.examples([row["label"] for row in rows[split]]) for split, part in encoded.items()}, reports
