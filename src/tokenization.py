"""Text to token ids, for train.py and predict.py: once per corpus and tokenizer.

- Two ways to encode, with identical ids: the tokenizer's own transformers code, or, for MeCab +
  WordPiece tokenizers (the cl-tohoku word models), a fast path: the same MeCab, then WordPiece in
  Rust (the `tokenizers` library), each distinct word encoded once, and only as much of a long body
  as truncation keeps.
- Pairs are truncated in their last text (the body) only, as the reference does; a first text (the
  title) that alone leaves no room is truncated too, and the body left out (counted and reported).
- Worker processes: one per CPU core this process may use (its affinity), shared among torchrun's
  local processes.
- An on-disk cache of tokenised splits, keyed by the contents of the tokenizer's and the dataset's
  files and by the input layout, shared by the runs of a sweep and by torchrun ranks: a file lock
  lets one process tokenise while the others wait and read; entries are written atomically.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
import unicodedata
import zipfile
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate, chain
from multiprocessing import get_context
from pathlib import Path
from typing import Protocol

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

CACHE_FORMAT = 1  # bump when the entry layout or the encoding rules change: old entries become misses
PREFIX_MARGIN = 200  # characters of a body prefix whose words are not trusted (MeCab may cut them otherwise in the whole text)
MAX_WORKERS = 8


# --- encoded examples -------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids of a list of examples, end to end in flat arrays (cheap to pickle and to cache)."""

    input_ids: np.ndarray  # int32, every example's ids one after the other
    offsets: np.ndarray  # int64, len(examples) + 1: example i is input_ids[offsets[i]:offsets[i + 1]]
    token_type_ids: np.ndarray | None  # int8 beside input_ids, or None when the model takes none
    cut_titles: int  # examples whose first text alone left no room: truncated, the last text left out

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None, cut_titles: int) -> Encoded:
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(row) for row in ids], out=offsets[1:])
        flat_types = None if types is None else np.fromiter(chain.from_iterable(types), dtype=np.int8, count=int(offsets[-1]))
        return cls(np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1])), offsets, flat_types, cut_titles)

    @classmethod
    def concat(cls, parts: Sequence[Encoded]) -> Encoded:
        lengths = np.concatenate([np.diff(part.offsets) for part in parts])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        types = None if parts[0].token_type_ids is None else np.concatenate([part.token_type_ids for part in parts])
        return cls(np.concatenate([part.input_ids for part in parts]), offsets, types, sum(part.cut_titles for part in parts))

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


def wants_token_type_ids(config: transformers.PretrainedConfig, text_fields: Sequence[str]) -> bool:
    """Segment ids matter for pairs on models trained with them (BERT: 2 types; RoBERTa-like: 1)."""
    return len(text_fields) == 2 and getattr(config, "type_vocab_size", 1) > 1


def texts_of(rows: Sequence[dict], text_fields: Sequence[str]) -> list[list[str]]:
    return [[row[field] for field in text_fields] for row in rows]


# --- the tokenizer's own path -----------------------------------------------------------------


def room_for_text(tokenizer: PreTrainedTokenizerBase, max_seq_len: int, pair: bool) -> int:
    """Tokens left for the text(s) once the special tokens are in; none left is an error."""
    room = max_seq_len - tokenizer.num_special_tokens_to_add(pair=pair)
    if room < 1:
        raise InputError(f"--max_seq_len {max_seq_len} leaves no room for text: the special tokens alone take {max_seq_len - room}")
    return room


def encode_slow(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[Sequence[str]], max_seq_len: int, token_type_ids: bool
) -> Encoded:
    """Token ids by the tokenizer itself: one text, or a pair whose second text alone is truncated (as the reference).

    A first text that alone leaves no room for the second (a title longer than max_seq_len) is
    truncated as well and the second left out, instead of stopping the run. Transformers 5 returns
    no token_type_ids unless asked, so pairs would lose their segment ids: ask whenever the model
    has more than one token type.
    """
    if not texts:
        return Encoded.from_lists([], [] if token_type_ids else None, 0)
    columns = [list(column) for column in zip(*texts)]
    room = room_for_text(tokenizer, max_seq_len, pair=len(columns) == 2)
    options = {"max_length": max_seq_len, "return_token_type_ids": token_type_ids, "return_attention_mask": False}
    if len(columns) == 1:
        encoded = tokenizer(columns[0], truncation=True, **options)
        return Encoded.from_lists(encoded["input_ids"], encoded.get("token_type_ids") if token_type_ids else None, 0)

    first_lengths = [len(ids) for ids in tokenizer(columns[0], add_special_tokens=False)["input_ids"]]
    cut = [i for i, length in enumerate(first_lengths) if length >= room]
    for i in cut:  # the first text alone fills max_seq_len: keep what fits of it, and none of the second
        columns[1][i] = ""
    ids: list[list[int]] = [[] for _ in texts]
    types: list[list[int]] = [[] for _ in texts]
    for rows, truncation in ((sorted(set(range(len(texts))) - set(cut)), "only_second"), (cut, "only_first")):
        if rows:
            encoded = tokenizer([columns[0][i] for i in rows], [columns[1][i] for i in rows], truncation=truncation, **options)
            for j, i in enumerate(rows):
                ids[i] = encoded["input_ids"][j]
                types[i] = encoded["token_type_ids"][j] if token_type_ids else []
    return Encoded.from_lists(ids, types if token_type_ids else None, len(cut))


class Encoder(Protocol):
    description: str

    def __call__(self, texts: Sequence[Sequence[str]], max_seq_len: int, token_type_ids: bool) -> Encoded: ...


class SlowEncoder:
    """The tokenizer as transformers runs it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, reason: str) -> None:
        self.tokenizer = tokenizer
        self.description = f"{type(tokenizer).__name__}'s own {'fast (Rust)' if tokenizer.is_fast else 'Python'} code ({reason})"

    def __call__(self, texts: Sequence[Sequence[str]], max_seq_len: int, token_type_ids: bool) -> Encoded:
        return encode_slow(self.tokenizer, texts, max_seq_len, token_type_ids)


# --- the fast path for MeCab + WordPiece ------------------------------------------------------


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


class MecabWordPieceEncoder:
    """BertJapaneseTokenizer's ids, faster: its MeCab, then WordPiece in Rust, then its special tokens.

    - Words come from a MeCab tagger built by the tokenizer's own MecabTokenizer class with its own
      options (dictionary, mecabrc, normalisation), asked for plain space-separated words instead of
      one Python object per word.
    - Each distinct word is encoded once (by `tokenizers`' WordPiece with the same vocabulary, unknown
      token and max_input_chars_per_word) and remembered.
    - A long body is given to MeCab as a prefix long enough for what truncation keeps, grown if not:
      the words of its last PREFIX_MARGIN characters, which the rest of the text could segment
      differently, are not used.
    - A row that contains a special token's text ([SEP], ...) is left to the tokenizer itself.
    """

    def __init__(self, tokenizer: BertJapaneseTokenizer) -> None:
        self.tokenizer = tokenizer
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
        return {"tokenizer": self.tokenizer}

    def __setstate__(self, state: dict) -> None:
        self.tokenizer = state["tokenizer"]
        self.description = ""
        self._build()

    def words(self, text: str) -> list[str]:
        """The word tokenizer's words (the text already normalised), split on white space as WordPiece splits them."""
        words = self.tagger.parse(text).split()
        if self.lower_case:
            words = [word if word in self.never_split else word.lower() for word in words]
        return words

    def word_ids(self, words: list[str]) -> list[int]:
        memo = self.memo
        new = [word for word in dict.fromkeys(words) if word not in memo]
        if new:
            for word, encoding in zip(new, self.wordpiece.encode_batch([[word] for word in new], is_pretokenized=True, add_special_tokens=False)):
                memo[word] = encoding.ids
        return [i for word in words for i in memo[word]]

    def text_ids(self, text: str, budget: int | None) -> list[int]:
        """Ids of the text, or of its first `budget` tokens, from as short a prefix as gives them for sure."""
        if self.normalize:
            text = unicodedata.normalize("NFKC", text)
        if budget is not None and budget <= 0:
            return []
        # Every token covers at least one character; Japanese averages 1-2 characters per token.
        limit = len(text) if budget is None else 2 * budget + 2 * PREFIX_MARGIN
        while True:
            whole = limit >= len(text)
            words = self.words(text if whole else text[:limit])
            if not whole and words:
                ends = list(accumulate(map(len, words)))
                words = words[: bisect_right(ends, ends[-1] - PREFIX_MARGIN)]
            ids = self.word_ids(words)
            if whole or len(ids) >= budget:
                return ids if budget is None else ids[:budget]
            limit *= 2

    def __call__(self, texts: Sequence[Sequence[str]], max_seq_len: int, token_type_ids: bool) -> Encoded:
        if not texts:
            return Encoded.from_lists([], [] if token_type_ids else None, 0)
        tokenizer = self.tokenizer
        pair = len(texts[0]) == 2
        room = room_for_text(tokenizer, max_seq_len, pair)
        ids, types, cut_titles = [], [], 0
        for row in texts:
            if any(special in text for text in row for special in self.special_texts):
                encoded = encode_slow(tokenizer, [row], max_seq_len, token_type_ids)  # the tokenizer splits these out itself
                ids.append(encoded.input_ids.tolist())
                types.append(encoded.token_type_ids.tolist() if token_type_ids else [])
                cut_titles += encoded.cut_titles
                continue
            if pair:
                first = self.text_ids(row[0], None)
                if len(first) >= room:  # the title alone fills max_seq_len: keep what fits, no body
                    first, second = first[:room], []
                    cut_titles += 1
                else:
                    second = self.text_ids(row[1], room - len(first))
                ids.append(tokenizer.build_inputs_with_special_tokens(first, second))
                types.append(tokenizer.create_token_type_ids_from_sequences(first, second) if token_type_ids else [])
            else:
                first = self.text_ids(row[0], room)
                ids.append(tokenizer.build_inputs_with_special_tokens(first))
                types.append(tokenizer.create_token_type_ids_from_sequences(first) if token_type_ids else [])
        return Encoded.from_lists(ids, types if token_type_ids else None, cut_titles)


def choose_encoder(tokenizer: PreTrainedTokenizerBase, slow: bool) -> Encoder:
    """The fast MeCab + WordPiece path where it gives the tokenizer's own ids, else the tokenizer itself."""
    if slow:
        return SlowEncoder(tokenizer, "--slow_tokenizer")
    problem = fast_path_problem(tokenizer)
    if problem is not None:
        return SlowEncoder(tokenizer, f"no fast MeCab + WordPiece path: {problem}")
    return MecabWordPieceEncoder(tokenizer)


# --- worker processes -------------------------------------------------------------------------


def tokenizer_workers(num_workers: int) -> int:
    """--num_workers, or by default the usable CPU cores shared among this machine's torchrun processes (at most 8)."""
    return num_workers or max(1, min(utils.available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), MAX_WORKERS))


def _encode_chunk(job: tuple[Encoder, list[list[str]], int, bool]) -> Encoded:
    encoder, texts, max_seq_len, token_type_ids = job
    return encoder(texts, max_seq_len, token_type_ids)


def encode_parallel(encoder: Encoder, texts: list[list[str]], max_seq_len: int, token_type_ids: bool, num_workers: int) -> Encoded:
    """encoder(texts) spread over processes (the Japanese tokenizer has no fast version: ~120 docs/s per core)."""
    workers = tokenizer_workers(num_workers)
    if workers == 1 or len(texts) < 64:  # a pool costs more than it saves here
        return encoder(texts, max_seq_len, token_type_ids)
    chunk_size = math.ceil(len(texts) / (workers * 4))  # 4 chunks per worker even out their speeds
    jobs = [(encoder, chunk, max_seq_len, token_type_ids) for chunk in chunked(texts, chunk_size)]
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


def cache_key(
    tokenizer: PreTrainedTokenizerBase, encoder: Encoder, files: Mapping[str, Path], text_fields: Sequence[str],
    max_seq_len: int, token_type_ids: bool,
) -> dict:
    """Everything the cached ids depend on; an entry is used only when all of it matches."""
    tagger = getattr(getattr(tokenizer, "word_tokenizer", None), "mecab", None)  # a MeCab dictionary is outside the tokenizer's files
    return {
        "format": CACHE_FORMAT,
        "tokenizer": tokenizer_digest(tokenizer),
        "word_dictionary": [{k: d[k] for k in ("charset", "size", "version")} for d in tagger.dictionary_info] if tagger else None,
        "encoder": type(encoder).__name__,
        "libraries": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "files": {split: file_digest(path) for split, path in files.items()},
        "text_fields": list(text_fields),
        "max_seq_len": max_seq_len,
        "token_type_ids": token_type_ids,
    }


def entry_path(cache_dir: Path, key: dict) -> Path:
    return cache_dir / f"{hashlib.sha256(utils.to_json(key).encode()).hexdigest()[:40]}.npz"


def read_entry(path: Path, key: dict, sizes: Mapping[str, int]) -> tuple[dict[str, Encoded] | None, str | None]:
    """The cached splits, or (None, why not): absent, unreadable, truncated or not this key's."""
    if not path.is_file():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as entry:  # zip members carry CRCs: corrupted bytes raise here
            if bytes(entry["key"]).decode() != utils.to_json(key):
                return None, "written for another key"
            encoded = {}
            for split, size in sizes.items():
                ids, offsets = entry[f"{split}.input_ids"], entry[f"{split}.offsets"]
                types = entry[f"{split}.token_type_ids"] if key["token_type_ids"] else None
                valid = len(offsets) == size + 1 and offsets[0] == 0 and offsets[-1] == len(ids) and bool(np.all(np.diff(offsets) > 0))
                if not valid or (types is not None and len(types) != len(ids)):
                    return None, f"{split} does not match the dataset"
                encoded[split] = Encoded(ids, offsets, types, int(entry[f"{split}.cut_titles"]))
            return encoded, None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"


def write_entry(path: Path, key: dict, encoded: Mapping[str, Encoded]) -> None:
    """One .npz of flat integer arrays (no pickles), renamed into place only when complete."""
    arrays = {"key": np.frombuffer(utils.to_json(key).encode(), dtype=np.uint8)}
    for split, part in encoded.items():
        arrays[f"{split}.input_ids"], arrays[f"{split}.offsets"] = part.input_ids, part.offsets
        arrays[f"{split}.cut_titles"] = np.array(part.cut_titles)
        if part.token_type_ids is not None:
            arrays[f"{split}.token_type_ids"] = part.token_type_ids
    with utils.atomic_path(path) as tmp, tmp.open("wb") as f:  # atomic_path fsyncs it before the rename
        np.savez(f, **arrays)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[str | None]:
    """Hold an exclusive lock on the file PATH (made if absent); yield None, or why there is no lock.

    flock works across the nodes of NFS and most cluster file systems; where it does not (Lustre
    mounted without -o flock, Windows), the run goes on unlocked: writes stay atomic, and two runs may
    both tokenise.
    """
    if fcntl is None:
        yield "no file locks on this platform"
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            yield f"cannot lock {path} ({e.strerror})"
            return
        try:
            yield None
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cut_titles_note(where: str, count: int, text_fields: Sequence[str], limit: str) -> str:
    """The report of rows whose first text alone filled the length limit (train.py per split, predict.py per input)."""
    return f"{where}: {count} row(s) whose {text_fields[0]} alone fills {limit}: {text_fields[0]} truncated to fit, {text_fields[-1]} left out"


def tokenize_splits(
    rows: Mapping[str, list[dict]], files: Mapping[str, Path], tokenizer: PreTrainedTokenizerBase, *, text_fields: Sequence[str],
    max_seq_len: int, token_type_ids: bool, slow: bool, num_workers: int, cache_dir: Path | None, log: Callable[[str], None],
) -> dict[str, list[dict]]:
    """Examples of each split (rows read from FILES) ready for batching, from the cache or tokenised now (then cached).

    slow: the tokenizer's own code even where the fast path applies; cache_dir None: no cache.
    """
    start = time.perf_counter()
    sizes = {split: len(split_rows) for split, split_rows in rows.items()}
    encoder = choose_encoder(tokenizer, slow)
    log(f"tokenizer: {encoder.description}")

    def encode_all() -> dict[str, Encoded]:
        log(f"tokenising in {tokenizer_workers(num_workers)} process(es) ...")
        return {split: encode_parallel(encoder, texts_of(rows[split], text_fields), max_seq_len, token_type_ids, num_workers) for split in rows}

    if cache_dir is None:
        encoded, status = encode_all(), "tokenised (cache off)"
    else:
        key = cache_key(tokenizer, encoder, files, text_fields, max_seq_len, token_type_ids)
        path = entry_path(cache_dir, key)
        encoded, problem = read_entry(path, key, sizes)
        status = f"cache hit: read {path}"
        if encoded is None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with exclusive_lock(path.with_suffix(".lock")) as no_lock:
                if no_lock:
                    log(f"tokenised-split cache: {no_lock}; going on without a lock")
                encoded, problem = read_entry(path, key, sizes)  # another run may have written it while this one waited
                status = f"cache hit: read {path} (written by another process while this one waited)"
                if encoded is None:
                    if problem:
                        log(f"tokenised-split cache: ignoring {path}: {problem}")
                    encoded = encode_all()
                    write_entry(path, key, encoded)
                    status = f"cache miss: tokenised and wrote {path}"
    for split, part in encoded.items():
        if part.cut_titles:
            log(cut_titles_note(split, part.cut_titles, text_fields, f"--max_seq_len {max_seq_len}"))
    log(f"{status}; {sum(sizes.values()):,} examples in {time.perf_counter() - start:.1f} s")
    return {split: part.examples([row["label"] for row in rows[split]]) for split, part in encoded.items()}
