"""src/tokenization.py: the fast MeCab + WordPiece path gives the tokenizer's own ids, over-long titles,
worker counts under CPU affinity, and the on-disk cache of tokenised splits (hits, misses, races, damage)."""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, BertJapaneseTokenizer, BertTokenizer

import tokenization
import train
import utils
from tokenization import Encoded, MecabWordPieceEncoder, SlowEncoder
from utils import InputError

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> BertJapaneseTokenizer:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def corpus(dataset_dir: Path) -> list[list[str]]:
    return [[row["title"], row["body"]] for row in utils.load_jsonl(dataset_dir / "all.jsonl")]


def as_lists(encoded: Encoded) -> tuple[list[list[int]], list[list[int]] | None, int]:
    examples = [encoded.example(i) for i in range(len(encoded))]
    types = [e["token_type_ids"] for e in examples] if encoded.token_type_ids is not None else None
    return [e["input_ids"] for e in examples], types, encoded.cut_titles


def assert_same_ids(tokenizer: BertJapaneseTokenizer, texts: list[list[str]], max_seq_len: int, token_type_ids: bool = True) -> Encoded:
    slow = SlowEncoder(tokenizer, "test")(texts, max_seq_len, token_type_ids)
    fast = MecabWordPieceEncoder(tokenizer)(texts, max_seq_len, token_type_ids)
    assert as_lists(fast) == as_lists(slow)
    return fast


# --- the fast path gives the tokenizer's own ids ----------------------------------------------


def test_the_fast_path_is_chosen_by_structure(tokenizer: BertJapaneseTokenizer, tiny_model_dir: Path) -> None:
    assert isinstance(tokenization.choose_encoder(tokenizer, slow=False), MecabWordPieceEncoder)
    assert tokenization.choose_encoder(tokenizer, slow=True).description.endswith("(--slow_tokenizer)")
    char = BertJapaneseTokenizer(str(tiny_model_dir / "vocab.txt"), word_tokenizer_type="mecab", subword_tokenizer_type="character")
    assert "its subwords are not WordPiece (subword_tokenizer_type character)" in tokenization.choose_encoder(char, slow=False).description
    basic = BertJapaneseTokenizer(str(tiny_model_dir / "vocab.txt"), word_tokenizer_type="basic")
    assert "its words are not split by MeCab (word_tokenizer_type basic)" in tokenization.choose_encoder(basic, slow=False).description


@pytest.mark.parametrize("max_seq_len", [8, 32, 512])
def test_fast_ids_equal_slow_ids_on_the_whole_corpus(tokenizer: BertJapaneseTokenizer, corpus: list[list[str]], max_seq_len: int) -> None:
    fast = assert_same_ids(tokenizer, corpus, max_seq_len)
    assert int(fast.offsets[-1]) >= len(corpus) * min(max_seq_len, 20)  # real text, not empty examples
    assert (fast.cut_titles > 0) == (max_seq_len == 8)  # 8 tokens leave no room for the body beside most titles


@pytest.mark.parametrize("max_seq_len", [64, 200])
def test_fast_ids_equal_slow_ids_on_long_bodies_cut_from_a_prefix(tokenizer: BertJapaneseTokenizer, corpus: list[list[str]], max_seq_len: int) -> None:
    """Bodies of livedoor's length (~1,000-3,000 characters): MeCab sees only a prefix of each."""
    rng = random.Random(0)
    bodies = [body for _, body in corpus]
    texts = [[title, "\n".join(rng.sample(bodies, 20))] for title, _ in corpus[:40]]
    assert min(len(body) for _, body in texts) > 2 * max_seq_len + 2 * tokenization.PREFIX_MARGIN  # cut, not whole
    # Words outside the vocabulary: one [UNK] per 16 characters, so the first prefix is too short and grows.
    texts.append(["英語", " ".join(["abcdefghijklmnop"] * 300)])
    assert_same_ids(tokenizer, texts, max_seq_len)
    assert_same_ids(tokenizer, [[body] for _, body in texts], max_seq_len, token_type_ids=False)  # a single text


def test_fast_ids_equal_slow_ids_on_edge_cases(tokenizer: BertJapaneseTokenizer) -> None:
    unk = tokenizer.unk_token_id
    texts = [
        ["", "映画の監督と俳優"],  # empty title
        ["映画", ""],  # empty body
        ["龘𠀋🍣", "見慣れない字龘と絵文字🍣は語彙にない"],  # characters missing from the vocabulary
        ["長い語", "x" * 150 + " の後に映画"],  # a word longer than max_input_chars_per_word (100)
        ["ＮＥＷＳ　１２３", "ｶﾀｶﾅと①㍻と\u3000全角　空白、ﾃﾞｰﾀ"],  # NFKC changes these
        ["区切り[SEP]入り", "本文に[CLS]や[UNK]の文字列"],  # special tokens' texts: the tokenizer's own path
        ["改行\n\nと\tタブ", " 前後の空白 \n"],
    ]
    fast = assert_same_ids(tokenizer, texts, 64)
    ids, _, _ = as_lists(fast)
    assert unk in ids[2] and unk in ids[3]  # the edge cases are exercised, not tokenised around
    assert ids[5].count(tokenizer.sep_token_id) == 3  # [SEP] in a title is split out as a token, then the pair's own two
    assert_same_ids(tokenizer, texts, 12)


def test_fast_ids_equal_slow_ids_with_lower_case(tiny_model_dir: Path, tmp_path: Path) -> None:
    vocab = (tiny_model_dir / "vocab.txt").read_text(encoding="utf-8") + "news\nhello\n"
    (tmp_path / "vocab.txt").write_text(vocab, encoding="utf-8")
    lower = BertJapaneseTokenizer(
        str(tmp_path / "vocab.txt"), do_lower_case=True, word_tokenizer_type="mecab", mecab_kwargs={"mecab_dic": "unidic_lite"}
    )
    texts = [["ＮＥＷＳ Hello", "HELLO と News の映画"], ["[SEP] NEWS", "Hello"]]
    ids, _, _ = as_lists(assert_same_ids(lower, texts, 32))
    assert lower.vocab["news"] in ids[0] and lower.vocab["hello"] in ids[0]  # lower-cased, as the slow tokenizer does


def test_parallel_tokenisation_equals_serial(tokenizer: BertJapaneseTokenizer, corpus: list[list[str]]) -> None:
    for encoder in (SlowEncoder(tokenizer, "test"), MecabWordPieceEncoder(tokenizer)):
        parallel = tokenization.encode_parallel(encoder, corpus, 64, True, num_workers=2)
        assert as_lists(parallel) == as_lists(encoder(corpus, 64, True))


# --- a title longer than max_seq_len (issue 9) ------------------------------------------------


def test_an_over_long_title_is_truncated_and_the_body_left_out(tokenizer: BertJapaneseTokenizer, tiny_model_dir: Path) -> None:
    title, body = "映画の監督と俳優" * 10, "俳優について主演の公開が話題になっている。"
    rust = BertTokenizer.from_pretrained(tiny_model_dir)  # a fast (Rust) tokenizer of another class: the same rule
    for tokenizer, encoder in ((tokenizer, SlowEncoder(tokenizer, "test")), (tokenizer, MecabWordPieceEncoder(tokenizer)), (rust, SlowEncoder(rust, "test"))):
        title_ids = tokenizer(title, add_special_tokens=False)["input_ids"]
        assert len(title_ids) > 16
        encoded = encoder([[title, body], ["映画", body]], 16, True)
        cut, kept = encoded.example(0), encoded.example(1)
        assert cut["input_ids"] == [tokenizer.cls_token_id, *title_ids[:13], tokenizer.sep_token_id, tokenizer.sep_token_id]
        assert cut["token_type_ids"] == [0] * 15 + [1]
        short_title = tokenizer("映画", add_special_tokens=False)["input_ids"]
        assert len(kept["input_ids"]) == 16 and kept["input_ids"][1 + len(short_title)] == tokenizer.sep_token_id  # the usual body truncation
        assert encoded.cut_titles == 1


def test_a_max_seq_len_without_room_for_text_is_refused(tokenizer: BertJapaneseTokenizer) -> None:
    for encoder in (SlowEncoder(tokenizer, "test"), MecabWordPieceEncoder(tokenizer)):
        with pytest.raises(InputError, match=r"^--max_seq_len 3 leaves no room for text: the special tokens alone take 3$"):
            encoder([["映画", "俳優"]], 3, True)
        assert len(encoder([["映画", "俳優"]], 4, True).example(0)["input_ids"]) == 4


def test_a_dataset_with_long_titles_trains_and_reports_them(make_train_args, dataset_dir: Path, tmp_path: Path, capsys) -> None:
    """Before: 'title alone is longer than max_seq_len' stopped the run."""
    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data, ignore=shutil.ignore_patterns("folds"))
    for split, count in (("train", 3), ("val", 1), ("test", 0)):
        rows = utils.load_jsonl(data / f"{split}.jsonl")
        for row in rows[:count]:
            row["title"] = row["title"] * 12
        utils.save_jsonl(rows, data / f"{split}.jsonl")
    run_dir = train.main(make_train_args(
        tmp_path / "out", "--dataset_dir", str(data), "--max_seq_len", "32", "--epochs", "1", "--tokenized_cache_dir", str(tmp_path / "cache"),
        "--slow_tokenizer",
    ))  # fmt: skip
    out = capsys.readouterr().out
    assert "tokenizer: BertJapaneseTokenizer's own Python code (--slow_tokenizer)" in out
    assert "tokenised (cache off)" in out and not (tmp_path / "cache").exists()  # --tokenized_cache off (conftest): nothing written
    assert "train: 3 row(s) whose title alone fills --max_seq_len 32: title truncated to fit, body left out" in out
    assert "val: 1 row(s) whose title alone fills" in out and "test: " not in out
    assert (run_dir / "test-metrics.json").exists()


# --- worker processes and CPU affinity (issue 9) ----------------------------------------------


def test_default_workers_follow_cpu_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)  # Slurm gave this job 3 cores
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert tokenization.tokenizer_workers(0) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes on this node share them
    assert tokenization.tokenizer_workers(0) == 1
    assert tokenization.tokenizer_workers(5) == 5  # --num_workers as given
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: all the machine's cores, at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert tokenization.tokenizer_workers(0) == 8


# --- the cache of tokenised splits ------------------------------------------------------------


def tokenize(tokenizer, dataset: Path, cache_dir: Path | None, lines: list[str] | None = None, slow: bool = False) -> dict[str, list[dict]]:
    rows = {split: utils.load_jsonl(dataset / f"{split}.jsonl") for split in SPLITS}
    return tokenization.tokenize_splits(
        rows, {split: dataset / f"{split}.jsonl" for split in SPLITS}, tokenizer, text_fields=["title", "body"], max_seq_len=64,
        token_type_ids=True, slow=slow, num_workers=1, cache_dir=cache_dir, log=(lines if lines is not None else []).append,
    )


def status(lines: list[str]) -> str:
    (line,) = [line for line in lines if re.search(r"^(cache (hit|miss)|tokenised \(cache off\))", line)]
    return line


def copy_dataset(dataset_dir: Path, target: Path) -> Path:
    shutil.copytree(dataset_dir, target, ignore=shutil.ignore_patterns("folds"))
    return target


def test_cache_miss_then_hit_in_train_main(make_train_args, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    first = train.main(make_train_args(tmp_path / "a", "--tokenized_cache", "on", "--tokenized_cache_dir", str(cache), "--epochs", "1"))
    out = capsys.readouterr().out
    (entry,) = cache.glob("*.npz")
    assert re.search(rf"cache miss: tokenised and wrote {re.escape(str(entry))}; 270 examples in [\d.]+ s", out)
    assert "tokenizer: fast path: MeCab words" in out
    second = train.main(make_train_args(tmp_path / "b", "--tokenized_cache", "on", "--tokenized_cache_dir", str(cache), "--epochs", "1"))
    assert re.search(rf"cache hit: read {re.escape(str(entry))}; 270 examples in [\d.]+ s", capsys.readouterr().out)
    assert utils.load_json(first / "test-metrics.json") == utils.load_json(second / "test-metrics.json")  # same examples, same run


def test_cache_hit_equals_tokenising_and_the_slow_path(tokenizer, dataset_dir: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    fresh = tokenize(tokenizer, dataset_dir, None, lines)
    assert status(lines).startswith("tokenised (cache off)") and not list(tmp_path.iterdir())
    assert tokenize(tokenizer, dataset_dir, tmp_path, lines := []) == fresh and status(lines).startswith("cache miss")
    assert tokenize(tokenizer, dataset_dir, tmp_path, lines := []) == fresh and status(lines).startswith("cache hit")
    assert tokenize(tokenizer, dataset_dir, tmp_path, lines := [], slow=True) == fresh  # --slow_tokenizer: its own entry
    assert status(lines).startswith("cache miss") and len(list(tmp_path.glob("*.npz"))) == 2


def test_a_changed_tokenizer_or_dataset_is_a_miss(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = copy_dataset(dataset_dir, tmp_path / "data")
    cache = tmp_path / "cache"
    tokenize(AutoTokenizer.from_pretrained(model), data, cache)
    tokenize(AutoTokenizer.from_pretrained(model), data, cache, lines := [])
    assert status(lines).startswith("cache hit")

    with (model / "vocab.txt").open("a", encoding="utf-8") as f:
        f.write("新語\n")  # one more word in the vocabulary
    tokenize(AutoTokenizer.from_pretrained(model), data, cache, lines := [])
    assert status(lines).startswith("cache miss")

    rows = utils.load_jsonl(data / "val.jsonl")
    rows[0]["body"] += "。"
    utils.save_jsonl(rows, data / "val.jsonl")
    tokenize(AutoTokenizer.from_pretrained(model), data, cache, lines := [])
    assert status(lines).startswith("cache miss") and len(list(cache.glob("*.npz"))) == 3


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "another key"])
def test_a_damaged_entry_is_not_used(damage: str, tokenizer, dataset_dir: Path, tmp_path: Path) -> None:
    expected = tokenize(tokenizer, dataset_dir, tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    data = bytearray(entry.read_bytes())
    if damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF
        entry.write_bytes(bytes(data))
    else:  # a valid entry of another setting under this name
        tokenize(tokenizer, dataset_dir, tmp_path / "other", slow=True)
        shutil.copy(next((tmp_path / "other").glob("*.npz")), entry)
    lines: list[str] = []
    assert tokenize(tokenizer, dataset_dir, tmp_path, lines) == expected
    assert any(line.startswith(f"tokenised-split cache: ignoring {entry}: ") for line in lines)
    assert status(lines).startswith("cache miss")
    assert tokenize(tokenizer, dataset_dir, tmp_path, lines := []) == expected and status(lines).startswith("cache hit")


def _tokenize_in_child(model_dir: Path, dataset_dir: Path, cache: Path, barrier, queue) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines: list[str] = []
    barrier.wait()  # both start at the same moment, as two runs of a sweep on two GPUs
    examples = tokenize(tokenizer, dataset_dir, cache, lines)
    queue.put((status(lines), examples))


def test_two_processes_at_once_tokenise_once(tiny_model_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")  # torch is already imported: a fork starts at once
    barrier, queue = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_tokenize_in_child, args=(tiny_model_dir, dataset_dir, tmp_path, barrier, queue)) for _ in range(2)]
    for process in processes:
        process.start()
    results = [queue.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    statuses = sorted(status for status, _ in results)
    assert statuses[0].startswith("cache hit") and statuses[1].startswith("cache miss")  # one paid, the other waited and read
    assert results[0][1] == results[1][1]
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not list(tmp_path.glob(".*.tmp"))  # one entry, no leftovers
