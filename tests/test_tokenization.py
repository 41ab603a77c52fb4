"""src/tokenization.py: the input layout and its truncation modes (slow and fast path alike, and as the
tokenizer itself truncates), the fast MeCab + WordPiece path gives the tokenizer's own ids (the fixture corpus
and adversarial texts), over-long titles, truncation reports, worker counts under CPU affinity, and the on-disk
cache of tokenised splits (hits, misses, races, damage, soft failures, what its key covers)."""

from __future__ import annotations

import errno
import importlib.metadata
import fcntl
import multiprocessing
import os
import random
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, BertJapaneseTokenizer, BertTokenizer, PretrainedConfig

import tokenization
import train
import utils
from conftest import wait_for
from tiny_models import FAMILIES
from tokenization import Encoded, InputLayout, MecabWordPieceEncoder, SlowEncoder
from utils import InputError

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> BertJapaneseTokenizer:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def corpus(dataset_dir: Path) -> list[list[str]]:
    return [[row["title"], row["body"]] for row in utils.load_jsonl(dataset_dir / "all.jsonl")]


def layout(max_seq_len: int, truncation: str = "head", head_tokens: int | None = None, fields: tuple[str, ...] = ("title", "body")) -> InputLayout:
    return InputLayout(fields, max_seq_len, truncation, head_tokens)


def as_lists(encoded: Encoded) -> tuple[list[list[int]], list[list[int]] | None, list[int], int]:
    examples = [encoded.example(i) for i in range(len(encoded))]
    types = [e["token_type_ids"] for e in examples] if encoded.token_type_ids is not None else None
    return [e["input_ids"] for e in examples], types, encoded.dropped.tolist(), encoded.cut_titles


def assert_same_ids(
    tokenizer: BertJapaneseTokenizer, texts: list[list[str]], max_seq_len: int, token_type_ids: bool = True, truncation: str = "head"
) -> Encoded:
    input_layout = layout(max_seq_len, truncation, fields=("title", "body")[-len(texts[0]) :])
    slow = SlowEncoder(tokenizer, "test")(texts, input_layout, token_type_ids)
    fast = MecabWordPieceEncoder(tokenizer)(texts, input_layout, token_type_ids)
    assert as_lists(fast) == as_lists(slow)
    return fast


def own_truncation(tokenizer, texts: list[list[str]], max_seq_len: int, side: str) -> list[list[int]]:
    """The tokenizer's own truncation of the last text (right: its head, left: its tail), as the reference calls it."""
    tokenizer.truncation_side = side
    try:
        columns = list(zip(*texts))
        truncation = "only_second" if len(columns) == 2 else True
        return tokenizer(*map(list, columns), truncation=truncation, max_length=max_seq_len)["input_ids"]
    finally:
        tokenizer.truncation_side = "right"


# --- the input layout -------------------------------------------------------------------------


def test_input_layout_defaults_and_refusals() -> None:
    assert layout(512, "head_tail").head_tokens == 128 and layout(64, "head_tail").head_tokens == 16  # Sun et al.'s 128 of 512, scaled
    assert layout(512, "head_tail", 100).head_tokens == 100 and layout(512, "head_tail", 0).head_tokens == 0
    assert layout(512).head_tokens is None and layout(512, "tail").head_tokens is None
    assert layout(512, "head_tail").to_dict() == {"text_fields": ["title", "body"], "max_seq_len": 512, "truncation": "head_tail", "head_tokens": 128}
    for arguments, message in [
        ((("title", "body"), 512, "middle"), "truncation must be one of head, tail, head_tail, got 'middle'"),
        ((("title", "body"), 512, "head", 100), "head_tokens applies to truncation head_tail only (truncation is head)"),
        ((("title", "body"), 64, "head_tail", 64), "head_tokens must be at least 0 and below max_seq_len 64, got 64"),
        ((("title", "body"), 64, "head_tail", -1), "head_tokens must be at least 0 and below max_seq_len 64, got -1"),
        ((("a", "b", "c"), 64), "text_fields must be one field name or two, got ['a', 'b', 'c']"),
    ]:
        with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
            InputLayout(*arguments)


def test_input_layout_of_a_saved_config() -> None:
    assert InputLayout.of(PretrainedConfig()) == InputLayout(("title", "body"), 512, "head")  # models saved before any layout was recorded
    assert InputLayout.of(PretrainedConfig(text_fields=["text"], max_seq_len=128)) == InputLayout(("text",), 128, "head")  # before truncation modes
    saved = PretrainedConfig(**layout(256, "head_tail", 50).to_dict())
    assert InputLayout.of(saved) == layout(256, "head_tail", 50)


# --- every truncation mode, as the tokenizer itself truncates ---------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_head_and_tail_are_the_tokenizers_own_truncation(family: str, tiny_family_model, corpus: list[list[str]]) -> None:
    """head: today's ids (transformers' only_second truncation, as the reference); tail: the same from the left.

    Every tokenizer class of the model families: the special tokens are read off the tokenizer's own
    output (tokenization.learn_special_tokens), so this pins that they land where the tokenizer puts them.
    """
    tokenizer = AutoTokenizer.from_pretrained(tiny_family_model(family))
    texts = corpus[:40]
    for rows, fields in ((texts, ("title", "body")), ([[body] for _, body in texts], ("body",))):
        for truncation, side in (("head", "right"), ("tail", "left")):
            encoded = SlowEncoder(tokenizer, "test")(rows, layout(24, truncation, fields=fields), token_type_ids=False)
            ids, _, dropped, _ = as_lists(encoded)
            assert ids == own_truncation(tokenizer, rows, 24, side), (family, fields, truncation)
            assert sum(dropped) > 0  # truncation happened
    pair = tokenizer("映画", "俳優", return_token_type_ids=True)
    encoded = SlowEncoder(tokenizer, "test")([["映画", "俳優"]], layout(64), token_type_ids=True)
    assert encoded.example(0) == {"input_ids": pair["input_ids"], "token_type_ids": pair["token_type_ids"]}


def test_head_tail_keeps_both_ends_of_the_body(tokenizer: BertJapaneseTokenizer) -> None:
    title, body = "映画の監督", "。".join(["俳優について主演の公開が話題になっている"] * 12)
    title_ids, body_ids = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in (title, body))
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    room = 64 - 3 - len(title_ids)
    assert len(body_ids) > 2 * room
    for head_tokens, head in ((None, 16), (40, 40), (0, 0), (63, room)):  # None: 64 / 4; more than the room: the head alone
        expected = [cls, *title_ids, sep, *body_ids[:head], *body_ids[len(body_ids) - (room - head) :], sep]
        for encoder in (SlowEncoder(tokenizer, "test"), MecabWordPieceEncoder(tokenizer)):
            encoded = encoder([[title, body]], layout(64, "head_tail", head_tokens), token_type_ids=True)
            assert encoded.example(0) == {"input_ids": expected, "token_type_ids": [0] * (len(title_ids) + 2) + [1] * (room + 1)}
            assert encoded.dropped.tolist() == [len(body_ids) - room]
    single = SlowEncoder(tokenizer, "test")([[body]], layout(32, "head_tail", fields=("body",)), token_type_ids=False)
    assert single.example(0)["input_ids"] == [cls, *body_ids[:8], *body_ids[len(body_ids) - 22 :], sep]  # a single text: 8 + 22 of 30


def test_truncation_report_counts_what_was_dropped(tokenizer: BertJapaneseTokenizer) -> None:
    body_ids = tokenizer("映画の監督と俳優", add_special_tokens=False)["input_ids"]
    texts = [["映画", "映画の監督と俳優" * 4], ["映画", "映画"], ["映画の監督と俳優" * 3, "俳優"]]  # body cut; fits; title alone too long
    title_ids = tokenizer("映画", add_special_tokens=False)["input_ids"]
    for truncation in ("head", "tail", "head_tail"):
        encoded = assert_same_ids(tokenizer, texts, 16, truncation=truncation)
        long_title = 3 * len(body_ids) + len(tokenizer("俳優", add_special_tokens=False)["input_ids"])
        assert encoded.dropped.tolist() == [4 * len(body_ids) - (13 - len(title_ids)), 0, long_title - 13]
        assert encoded.cut_titles == 1
        report = encoded.truncation_report()
        mean = (encoded.dropped[0] + encoded.dropped[2]) / 2
        assert report == {"examples": 3, "truncated": 2, "truncated_share": 0.6667, "mean_tokens_dropped_per_truncated_example": round(float(mean), 1)}
    note = tokenization.truncation_note("train", report, layout(16, "head_tail"))
    assert note == f"train: 2 of 3 examples truncated (66.7%) at 16 tokens, head_tail truncation; {mean:.1f} tokens dropped per truncated example (mean)"


# --- the fast path gives the tokenizer's own ids ----------------------------------------------


def test_the_fast_path_is_chosen_by_structure(tokenizer: BertJapaneseTokenizer, tiny_model_dir: Path) -> None:
    assert isinstance(tokenization.choose_encoder(tokenizer, slow=False), MecabWordPieceEncoder)
    assert tokenization.choose_encoder(tokenizer, slow=True).description.endswith("(--slow_tokenizer)")
    char = BertJapaneseTokenizer(str(tiny_model_dir / "vocab.txt"), word_tokenizer_type="mecab", subword_tokenizer_type="character")
    assert "its subwords are not WordPiece (subword_tokenizer_type character)" in tokenization.choose_encoder(char, slow=False).description
    basic = BertJapaneseTokenizer(str(tiny_model_dir / "vocab.txt"), word_tokenizer_type="basic")
    assert "its words are not split by MeCab (word_tokenizer_type basic)" in tokenization.choose_encoder(basic, slow=False).description


@pytest.mark.parametrize(("max_seq_len", "truncation"), [(8, "head"), (32, "head"), (32, "tail"), (32, "head_tail"), (512, "head")])
def test_fast_ids_equal_slow_ids_on_the_whole_corpus(
    tokenizer: BertJapaneseTokenizer, corpus: list[list[str]], max_seq_len: int, truncation: str
) -> None:
    fast = assert_same_ids(tokenizer, corpus, max_seq_len, truncation=truncation)
    assert int(fast.offsets[-1]) >= len(corpus) * min(max_seq_len, 20)  # real text, not empty examples
    assert (fast.cut_titles > 0) == (max_seq_len == 8)  # 8 tokens leave no room for the body beside most titles
    assert (fast.dropped > 0).any() == (max_seq_len < 512)


# Runs on which MeCab's best path over the whole run changes how its start splits (issue 14): a prefix
# of such a text is split differently from the text itself far before the prefix ends.
ADVERSARIAL_RUNS = ["の", "う", "え", "かな", "どん", "ゴ", "ゴゴゴ", "うう"]


def adversarial_texts() -> list[list[str]]:
    rng = random.Random(0)
    normal = "映画の監督と俳優について主演の公開が話題になっている。"
    texts = []
    for run in ADVERSARIAL_RUNS:
        for length in (300, 1001, 1501, 2400):
            body = run * (length // len(run))
            texts.append(["題", body])
            texts.append(["題", normal * 3 + body + normal])  # a run inside normal text
            texts.append([run * 40, normal + body[: rng.randint(50, length)]])  # in the title too
    return texts


def test_adversarial_runs_split_differently_in_a_prefix(tokenizer: BertJapaneseTokenizer) -> None:
    """The texts below are adversarial: with MeCab seeing only a prefix, the words differ more than 200 characters before its end."""
    encoder = MecabWordPieceEncoder(tokenizer)
    far_differences = 0
    for run in ADVERSARIAL_RUNS:
        text = run * (1501 // len(run))
        prefix, whole = encoder.words(text[:1224]), encoder.words(text)
        agree = next((i for i, (a, b) in enumerate(zip(prefix, whole)) if a != b), len(prefix))
        far_differences += sum(map(len, prefix[:agree])) < 1224 - 200
    assert far_differences >= 4


@pytest.mark.parametrize("max_seq_len", [64, 512])
def test_fast_ids_equal_slow_ids_on_adversarial_runs(tokenizer: BertJapaneseTokenizer, max_seq_len: int) -> None:
    """Before: on "の" * 1501 at 512 tokens, 338 of 512 ids differed (MeCab saw only a prefix of the body)."""
    texts = adversarial_texts()
    for truncation in ("head", "tail", "head_tail"):
        fast = assert_same_ids(tokenizer, texts, max_seq_len, truncation=truncation)
        assert (fast.dropped > 0).sum() > len(texts) // 4
    assert_same_ids(tokenizer, [[body] for _, body in texts], max_seq_len, token_type_ids=False)  # a single text
    ids, _, _, _ = as_lists(SlowEncoder(tokenizer, "test")([["題", "の" * 1501]], layout(512), True))
    assert ids == own_truncation(tokenizer, [["題", "の" * 1501]], 512, "right")  # the tokenizer's own, not only the slow path's


@pytest.mark.parametrize("max_seq_len", [64, 200])
def test_fast_ids_equal_slow_ids_on_long_bodies(tokenizer: BertJapaneseTokenizer, corpus: list[list[str]], max_seq_len: int) -> None:
    """Bodies of livedoor's length (~1,000-3,000 characters), and words outside the vocabulary."""
    rng = random.Random(0)
    bodies = [body for _, body in corpus]
    texts = [[title, "\n".join(rng.sample(bodies, 20))] for title, _ in corpus[:40]]
    texts.append(["英語", " ".join(["abcdefghijklmnop"] * 300)])  # one [UNK] per 16 characters
    for truncation in ("head", "tail", "head_tail"):
        assert_same_ids(tokenizer, texts, max_seq_len, truncation=truncation)
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
    ids, _, _, _ = as_lists(fast)
    assert unk in ids[2] and unk in ids[3]  # the edge cases are exercised, not tokenised around
    assert ids[5].count(tokenizer.sep_token_id) == 3  # [SEP] in a title is split out as a token, then the pair's own two
    for truncation in ("head", "tail", "head_tail"):
        assert_same_ids(tokenizer, texts, 12, truncation=truncation)


def test_fast_ids_equal_slow_ids_with_lower_case(tiny_model_dir: Path, tmp_path: Path) -> None:
    vocab = (tiny_model_dir / "vocab.txt").read_text(encoding="utf-8") + "news\nhello\n"
    (tmp_path / "vocab.txt").write_text(vocab, encoding="utf-8")
    lower = BertJapaneseTokenizer(
        str(tmp_path / "vocab.txt"), do_lower_case=True, word_tokenizer_type="mecab", mecab_kwargs={"mecab_dic": "unidic_lite"}
    )
    texts = [["ＮＥＷＳ Hello", "HELLO と News の映画"], ["[SEP] NEWS", "Hello"]]
    ids, _, _, _ = as_lists(assert_same_ids(lower, texts, 32))
    assert lower.vocab["news"] in ids[0] and lower.vocab["hello"] in ids[0]  # lower-cased, as the slow tokenizer does


def test_parallel_tokenisation_equals_serial(tokenizer: BertJapaneseTokenizer, corpus: list[list[str]]) -> None:
    for encoder in (SlowEncoder(tokenizer, "test"), MecabWordPieceEncoder(tokenizer)):
        parallel = tokenization.encode_parallel(encoder, corpus, layout(32, "head_tail"), True, num_workers=2)
        assert as_lists(parallel) == as_lists(encoder(corpus, layout(32, "head_tail"), True))


# --- a title longer than max_seq_len (issue 9) ------------------------------------------------


def test_an_over_long_title_is_truncated_and_the_body_left_out(tokenizer: BertJapaneseTokenizer, tiny_model_dir: Path) -> None:
    title, body = "映画の監督と俳優" * 10, "俳優について主演の公開が話題になっている。"
    rust = BertTokenizer.from_pretrained(tiny_model_dir)  # a fast (Rust) tokenizer of another class: the same rule
    for tokenizer, encoder in ((tokenizer, SlowEncoder(tokenizer, "test")), (tokenizer, MecabWordPieceEncoder(tokenizer)), (rust, SlowEncoder(rust, "test"))):
        title_ids = tokenizer(title, add_special_tokens=False)["input_ids"]
        assert len(title_ids) > 16
        for truncation in ("head", "tail", "head_tail"):  # the title keeps its head whatever the body's truncation
            encoded = encoder([[title, body], ["映画", body]], layout(16, truncation), True)
            cut, kept = encoded.example(0), encoded.example(1)
            assert cut["input_ids"] == [tokenizer.cls_token_id, *title_ids[:13], tokenizer.sep_token_id, tokenizer.sep_token_id]
            assert cut["token_type_ids"] == [0] * 15 + [1]
            short_title = tokenizer("映画", add_special_tokens=False)["input_ids"]
            assert len(kept["input_ids"]) == 16 and kept["input_ids"][1 + len(short_title)] == tokenizer.sep_token_id  # the usual body truncation
            assert encoded.cut_titles == 1


def test_a_max_seq_len_without_room_for_text_is_refused(tokenizer: BertJapaneseTokenizer) -> None:
    for encoder in (SlowEncoder(tokenizer, "test"), MecabWordPieceEncoder(tokenizer)):
        with pytest.raises(InputError, match=r"^--max_seq_len 3 leaves no room for text: the special tokens alone take 3$"):
            encoder([["映画", "俳優"]], layout(3), True)
        assert len(encoder([["映画", "俳優"]], layout(4), True).example(0)["input_ids"]) == 4


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
    assert "val: 1 row(s) whose title alone fills" in out and "test: 0 row(s)" not in out
    assert (run_dir / "test-metrics.json").exists()
    # Each split's truncation report: printed, and recorded in config.json beside the settings.
    config = utils.load_json(run_dir / "config.json")
    assert (config["truncation"], config["head_tokens"]) == ("head", None)
    report = config["truncation_report"]
    assert set(report) == set(SPLITS) and report["train"]["examples"] == 216 and report["train"]["truncated"] >= 3
    for split in SPLITS:
        line = tokenization.truncation_note(split, report[split], layout(32))
        assert line in out and line.startswith(f"{split}: {report[split]['truncated']} of {report[split]['examples']} examples truncated")


def test_truncation_flags(make_train_args, tmp_path: Path) -> None:
    """The head_tail default scales with --max_seq_len and is recorded as the number used (refusals: test_train_options.py)."""
    assert make_train_args(tmp_path, "--truncation", "head_tail").head_tokens == 16  # 64 / 4, recorded as the number used
    assert make_train_args(tmp_path, "--truncation", "head_tail", "--max_seq_len", "512").head_tokens == 128
    assert make_train_args(tmp_path, "--truncation", "head_tail", "--head_tokens", "5").head_tokens == 5
    assert make_train_args(tmp_path, "--truncation", "tail").head_tokens is None


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


def tokenize(
    tokenizer, dataset: Path, cache_dir: Path | None, lines: list[str] | None = None, slow: bool = False, truncation: str = "head"
) -> dict[str, list[dict]]:
    rows = {split: utils.load_jsonl(dataset / f"{split}.jsonl") for split in SPLITS}
    examples, _ = tokenization.tokenize_splits(
        rows, {split: dataset / f"{split}.jsonl" for split in SPLITS}, tokenizer, layout=layout(64, truncation), token_type_ids=True,
        slow=slow, num_workers=1, cache_dir=cache_dir, log=(lines if lines is not None else []).append,
    )
    return examples


def status(lines: list[str]) -> str:
    (line,) = [line for line in lines if re.search(r"^(cache (hit|miss)|tokenised \(cache (off|unusable|entry not written)\))", line)]
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


def test_the_key_covers_truncation_libraries_and_the_dictionary(
    tokenizer, dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenize(tokenizer, dataset_dir, tmp_path)
    tokenize(tokenizer, dataset_dir, tmp_path, lines := [], truncation="tail")
    assert status(lines).startswith("cache miss")
    key = tokenization.cache_key(tokenizer, MecabWordPieceEncoder(tokenizer), {}, layout(64), True, memo_dir=tmp_path)
    versions = key["libraries"]
    for name in ("transformers", "tokenizers", "fugashi", "sentencepiece"):
        assert versions[name] == importlib.metadata.version(name)
    assert re.fullmatch(r"\d+\.\d+\S*", versions["mecab"])  # the MeCab library's own version (fugashi's bundled one here)
    assert re.fullmatch("[0-9a-f]{64}", key["word_dictionary"]["sha256"])
    assert key["layout"] == {"text_fields": ["title", "body"], "max_seq_len": 64, "truncation": "head", "head_tokens": None}

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == "sentencepiece" else real_version(name))
    tokenize(tokenizer, dataset_dir, tmp_path, lines := [])
    assert status(lines).startswith("cache miss")
    monkeypatch.setattr(tokenization, "dictionary_digest", lambda tagger, memo_dir: "0" * 64)  # another dictionary content
    tokenize(tokenizer, dataset_dir, tmp_path, lines := [])
    assert status(lines).startswith("cache miss") and len(list(tmp_path.glob("*.npz"))) == 4


class FakeTagger:
    """What dictionary_digest reads of a fugashi tagger: the dictionaries it loaded."""

    def __init__(self, files: list[Path]) -> None:
        self.dictionary_info = [{"filename": str(path), "charset": "utf8", "size": 1, "version": 102} for path in files]


def test_the_dictionary_digest_follows_its_contents_and_is_hashed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "dicdir"
    folder.mkdir()
    for name in ("sys.dic", "unk.dic", "matrix.bin", "char.bin", "dicrc", "README"):
        (folder / name).write_bytes(f"{name} contents".encode())
    user = tmp_path / "user.dic"
    user.write_bytes(b"user words")
    tagger = FakeTagger([folder / "sys.dic", user])
    read_by_mecab = [folder / name for name in ("sys.dic", "unk.dic", "matrix.bin", "char.bin", "dicrc")] + [user]
    assert tokenization.dictionary_files(tagger) == sorted(read_by_mecab)
    hashed: list[str] = []
    real_digest = tokenization.file_digest
    monkeypatch.setattr(tokenization, "file_digest", lambda path: hashed.append(path.name) or real_digest(path))

    memo = tmp_path / "cache"
    first = tokenization.dictionary_digest(tagger, memo)
    assert len(hashed) == 6 and (memo / tokenization.DIGEST_MEMO).is_file()
    assert tokenization.dictionary_digest(tagger, memo) == first and len(hashed) == 6  # remembered beside the cache: not hashed again
    (folder / "matrix.bin").write_bytes(b"MATRIX.BIN CONTENTS")  # the same size, other costs
    second = tokenization.dictionary_digest(tagger, memo)
    assert second != first and hashed[6:] == ["matrix.bin"]
    (folder / "README").write_bytes(b"not read by MeCab")
    assert tokenization.dictionary_digest(tagger, None) == second  # no memo: hashed again, the same digest


def test_an_unusable_cache_folder_is_a_warning(tokenizer, dataset_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    expected = tokenize(tokenizer, dataset_dir, None)
    for cache_dir in (blocker, blocker / "cache"):  # a file where the folder should be; a folder under a file
        lines: list[str] = []
        assert tokenize(tokenizer, dataset_dir, cache_dir, lines) == expected
        (warning,) = [line for line in lines if line.startswith("warning:")]
        assert re.fullmatch(rf"warning: tokenised-split cache: cannot use {re.escape(str(cache_dir))} \(.+\); going on without the cache", warning)
        assert status(lines).startswith("tokenised (cache unusable)")
    assert blocker.read_text(encoding="utf-8") == "not a folder"


def test_a_run_with_an_unusable_cache_folder_finishes(make_train_args, tmp_path: Path, capsys) -> None:
    """Before: a FileExistsError traceback, and a run folder with only its config.json."""
    blocker = tmp_path / "cache"
    blocker.write_text("", encoding="utf-8")
    run_dir = train.main(make_train_args(tmp_path / "out", "--tokenized_cache", "on", "--tokenized_cache_dir", str(blocker), "--epochs", "1"))
    assert f"warning: tokenised-split cache: cannot use {blocker} (File exists: {blocker}); going on without the cache" in capsys.readouterr().out
    assert (run_dir / "test-metrics.json").is_file() and list((tmp_path / "out").glob("*/*/*")) == [run_dir]


def test_a_failed_entry_write_is_a_warning(tokenizer, dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = tokenize(tokenizer, dataset_dir, None)

    def full_disk(file, **arrays) -> None:
        file.write(b"the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full_disk)
    lines: list[str] = []
    assert tokenize(tokenizer, dataset_dir, tmp_path, lines) == expected
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert re.fullmatch(
        rf"warning: tokenised-split cache: cannot write {re.escape(str(tmp_path))}/[0-9a-f]{{40}}\.npz \(No space left on device\); "
        "going on without storing the splits",
        warning,
    )
    assert status(lines).startswith("tokenised (cache entry not written)")
    assert not list(tmp_path.glob("*.npz")) and not list(tmp_path.glob(".*.tmp"))  # no entry, no half-written file


def test_a_run_waiting_for_the_lock_says_so(tokenizer, dataset_dir: Path, tmp_path: Path) -> None:
    files = {split: dataset_dir / f"{split}.jsonl" for split in SPLITS}
    key = tokenization.cache_key(tokenizer, MecabWordPieceEncoder(tokenizer), files, layout(64), True, memo_dir=tmp_path)
    lock = tokenization.entry_path(tmp_path, key).with_suffix(".lock")
    lines: list[str] = []
    waiting = f"tokenised-split cache: waiting for another process that is tokenising the same splits (lock {lock}) ..."
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run is tokenising
        worker = threading.Thread(target=tokenize, args=(tokenizer, dataset_dir, tmp_path, lines))
        worker.start()
        wait_for(lambda: waiting in lines, 120, "the waiting line", interval=0.05)
        time.sleep(0.2)
        assert worker.is_alive() and not any(line.startswith("cache") for line in lines)  # it waits
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(timeout=120)
    assert status(lines).startswith("cache miss")
