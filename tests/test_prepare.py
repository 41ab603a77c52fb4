"""prepare.py: the reference's preprocessing and split, made deterministic and strict."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import prepare
import utils
from fake_corpus import CATEGORY_WORDS, REAL_COUNTS, write_corpus
from utils import InputError

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = sorted(CATEGORY_WORDS)


def run_prepare(input_dir: Path, output_dir: Path, *extra: str) -> None:
    prepare.main(prepare.Args().parse_args(["--input_dir", str(input_dir), "--output_dir", str(output_dir), *extra]))


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_article(folder: Path, name: str, text: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


# --- the split -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "sizes"),
    [
        (7367, (5895, 736, 736)),  # the full corpus, as the reference's README reports
        (270, (216, 27, 27)),
        (10, (8, 1, 1)),
        (19, (16, 2, 1)),  # the 9 extra rows go to the first 9 parts: val gets one, test not
        (25, (21, 2, 2)),
    ],
)
def test_divide_gives_8_1_1_sizes(n: int, sizes: tuple[int, int, int]) -> None:
    rows = [{"id": i} for i in range(n)]
    parts = prepare.split_parts(rows)
    assert [len(p) for p in parts] == [n // 10 + (i < n % 10) for i in range(10)]
    split = prepare.fold_splits(parts, fold=0)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == sizes
    # Contiguous parts: fold 0 is the reference's train = parts 0-7, val = 8, test = 9.
    assert [r["id"] for r in split["train"] + split["val"] + split["test"]] == list(range(n))


def test_outputs_and_counts(dataset_dir: Path) -> None:
    counts = {name: len(read_lines(dataset_dir / f"{name}.jsonl")) for name in ("all", "train", "val", "test")}
    assert counts == {"all": 270, "train": 216, "val": 27, "test": 27}
    label2id = json.loads((dataset_dir / "label2id.json").read_text(encoding="utf-8"))
    assert label2id == {category: i for i, category in enumerate(CATEGORIES)}
    assert label2id["dokujo-tsushin"] == 0 and label2id["topic-news"] == 8

    rows = read_lines(dataset_dir / "all.jsonl")
    assert [r["id"] for r in rows] == list(range(270))
    assert list(rows[0]) == ["id", "label", "category", "category-id", "url", "date", "title", "body"]
    for row in rows:
        assert row["label"] == label2id[row["category"]]
        assert row["category-id"].startswith(row["category"] + "-")
    # Shuffled: the categories are mixed, not in folder order.
    assert len({r["category"] for r in rows[:27]}) > 3
    # Ensure_ascii=False: the files hold Japanese text, not \u escapes.
    assert "\\u" not in (dataset_dir / "all.jsonl").read_text(encoding="utf-8")


def test_a_corpus_of_the_real_size_gives_the_reference_counts(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "text", REAL_COUNTS)
    run_prepare(corpus, tmp_path / "a")
    counts = {name: len(read_lines(tmp_path / "a" / f"{name}.jsonl")) for name in ("all", "train", "val", "test")}
    assert counts == {"all": 7367, "train": 5895, "val": 736, "test": 736}
    categories = [r["category"] for r in read_lines(tmp_path / "a" / "all.jsonl")]
    assert {c: categories.count(c) for c in CATEGORIES} == REAL_COUNTS
    run_prepare(corpus, tmp_path / "b")  # a rerun gives the same bytes
    for name in ("all.jsonl", "train.jsonl", "val.jsonl", "test.jsonl", "label2id.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_license_readme_and_changes_are_not_articles(dataset_dir: Path, corpus_dir: Path) -> None:
    assert (corpus_dir / "README.txt").exists() and (corpus_dir / "sports-watch" / "LICENSE.txt").exists()
    stems = {r["category-id"] for r in read_lines(dataset_dir / "all.jsonl")}
    assert len(stems) == 270
    assert not {"LICENSE", "README", "CHANGES"} & stems
    assert all(not r["url"].startswith("http://creativecommons") for r in read_lines(dataset_dir / "all.jsonl"))


def test_same_bytes_whatever_the_listing_order(corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_prepare(corpus_dir, tmp_path / "first")

    # Another file system may list files in any order: prepare.py must sort before shuffling.
    original_iterdir = Path.iterdir

    def shuffled_iterdir(self: Path):
        entries = list(original_iterdir(self))
        random.Random(str(self)).shuffle(entries)
        return iter(entries)

    monkeypatch.setattr(Path, "iterdir", shuffled_iterdir)
    run_prepare(corpus_dir, tmp_path / "second")
    for name in ("all.jsonl", "train.jsonl", "val.jsonl", "test.jsonl", "label2id.json"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name


def test_seed_changes_the_split(corpus_dir: Path, tmp_path: Path) -> None:
    run_prepare(corpus_dir, tmp_path / "a", "--seed", "1")
    run_prepare(corpus_dir, tmp_path / "b", "--seed", "2")
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "b" / "test.jsonl").read_bytes()


def test_folds_are_disjoint_and_cover_the_corpus(dataset_dir: Path) -> None:
    all_ids = {r["id"] for r in read_lines(dataset_dir / "all.jsonl")}
    tested: list[int] = []
    for fold in range(10):
        folder = dataset_dir / "folds" / str(fold)
        split = {name: [r["id"] for r in read_lines(folder / f"{name}.jsonl")] for name in ("train", "val", "test")}
        assert (len(split["train"]), len(split["val"]), len(split["test"])) == (216, 27, 27)
        assert set(split["train"]) | set(split["val"]) | set(split["test"]) == all_ids
        assert not set(split["train"]) & set(split["val"]) and not set(split["train"]) & set(split["test"])
        assert not set(split["val"]) & set(split["test"])
        assert (folder / "label2id.json").read_bytes() == (dataset_dir / "label2id.json").read_bytes()
        tested += split["test"]
    assert sorted(tested) == sorted(all_ids)  # every article tested exactly once
    for name in ("train", "val", "test"):  # fold 0 is the default split
        assert (dataset_dir / "folds" / "0" / f"{name}.jsonl").read_bytes() == (dataset_dir / f"{name}.jsonl").read_bytes()


def test_num_folds_writes_that_many(corpus_dir: Path, tmp_path: Path) -> None:
    run_prepare(corpus_dir, tmp_path / "out", "--num_folds", "3")
    assert sorted(p.name for p in (tmp_path / "out" / "folds").iterdir()) == ["0", "1", "2"]


@pytest.mark.parametrize("value", ["0", "11"])
def test_num_folds_out_of_range_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        prepare.Args().parse_args(["--num_folds", value])
    assert "--num_folds must be between 1 and 10" in capsys.readouterr().err


# --- preprocessing ---------------------------------------------------------------------------


def test_nfkc_and_whitespace(tmp_path: Path) -> None:
    text = (
        "  http://news.livedoor.com/article/detail/1/  \n"
        "2012-01-01T00:00:00+0900\n"
        "\u3000ＡＢＣ１２３ ｶﾀｶﾅの（題名）　\n"
        "\u3000一行目　です。\u3000 \n"
        "\n"
        "   \n"
        "\u3000\u3000\n"
        "２行目　①\t\n"
    )
    path = write_article(tmp_path / "peachy", "peachy-1.txt", text)
    article = prepare.parse_article(path, "peachy")
    assert article == {
        "category": "peachy",
        "category-id": "peachy-1",
        "url": "http://news.livedoor.com/article/detail/1/",
        "date": "2012-01-01T00:00:00+0900",
        "title": "ABC123 カタカナの(題名)",
        "body": "一行目 です。\n2行目 1",
    }


def test_crlf_and_bom_are_read_as_utf8(tmp_path: Path) -> None:
    text = "\ufeffhttp://example.com/a\r\n2012-01-01\r\nタイトル\r\n本文\r\n"
    path = write_article(tmp_path / "smax", "smax-2.txt", text)
    article = prepare.parse_article(path, "smax")
    assert (article["url"], article["title"], article["body"]) == ("http://example.com/a", "タイトル", "本文")


# --- bad input -------------------------------------------------------------------------------

GOOD_HEAD = "http://news.livedoor.com/article/detail/1/\n2012-01-01T00:00:00+0900\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("http://x.jp/\n2012-01-01\nタイトルだけ\n", "no body text from line 4 on"),
        (GOOD_HEAD + "タイトル\n\n\u3000\n", "no body text from line 4 on"),
        ("本文のような行\n2012-01-01\nタイトル\n本文\n", "line 1 should be the article URL, got '本文のような行'"),
        ("http://x.jp/\n昨日\nタイトル\n本文\n", "line 2 should be the date (YYYY-MM-DD...), got '昨日'"),
        (GOOD_HEAD + "\u3000\n本文\n", "line 3 should be the title, but it is empty or missing"),
        ("", "line 1 should be the article URL"),
        ("スポーツ記事".encode("cp932"), "not valid UTF-8"),
    ],
)
def test_bad_article_stops_with_file_and_reason(tmp_path: Path, content: str | bytes, message: str) -> None:
    corpus = write_corpus(tmp_path / "text", articles_per_category=2)
    bad = write_article(corpus / "sports-watch", "sports-watch-999.txt", content)
    with pytest.raises(InputError) as e:
        run_prepare(corpus, tmp_path / "out")
    assert str(bad) in str(e.value)
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_missing_input_dir_says_to_download(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"does not exist: run `bash src/download.sh` first"):
        run_prepare(tmp_path / "nowhere", tmp_path / "out")


def test_empty_input_dir_says_to_download(tmp_path: Path) -> None:
    (tmp_path / "text").mkdir()
    with pytest.raises(InputError, match=r"holds no category folders: run `bash src/download.sh` first"):
        run_prepare(tmp_path / "text", tmp_path / "out")


def test_category_without_articles_is_an_error(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "text", articles_per_category=2)
    for path in (corpus / "smax").glob("smax-*.txt"):
        path.unlink()
    with pytest.raises(InputError, match=r"smax: no article files"):
        run_prepare(corpus, tmp_path / "out")


def test_hidden_entries_are_neither_categories_nor_articles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Jupyter's .ipynb_checkpoints once became a tenth category; hidden files were read as articles."""
    corpus = write_corpus(tmp_path / "text", articles_per_category=2)
    article = sorted(corpus.glob("smax/smax-*.txt"))[0].read_bytes()
    write_article(corpus / ".ipynb_checkpoints", "smax-1-checkpoint.txt", article)  # a hidden folder at the top
    (corpus / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    write_article(corpus / "smax" / ".ipynb_checkpoints", "smax-1-checkpoint.txt", article)  # inside a category
    write_article(corpus / "smax", ".smax-copy.txt", article)  # a hidden file that looks like an article
    run_prepare(corpus, tmp_path / "out")

    assert utils.load_json(tmp_path / "out" / "label2id.json") == {c: i for i, c in enumerate(CATEGORIES)}
    rows = read_lines(tmp_path / "out" / "all.jsonl")
    assert len(rows) == 18 and not [r for r in rows if r["category-id"].startswith(".")]
    assert (
        "hidden, skipped: 4 entries (.DS_Store, .ipynb_checkpoints/, smax/.ipynb_checkpoints/, smax/.smax-copy.txt)"
        in capsys.readouterr().out
    )


def test_a_crash_while_writing_keeps_the_previous_dataset(corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "livedoor"
    run_prepare(corpus_dir, output, "--seed", "1")
    before = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}

    calls = 0

    def failing_write_split(*args, **kwargs) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("disk full")
        original(*args, **kwargs)

    original = prepare.write_split
    monkeypatch.setattr(prepare, "write_split", failing_write_split)
    with pytest.raises(RuntimeError, match="disk full"):
        run_prepare(corpus_dir, output, "--seed", "2", "--num_folds", "2")

    after = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["livedoor"]  # no temporary folder left behind


def test_rerun_replaces_the_dataset_as_a_whole(corpus_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "livedoor"
    run_prepare(corpus_dir, output, "--num_folds", "3")
    run_prepare(corpus_dir, output)
    assert sorted(p.name for p in (output / "folds").iterdir()) == ["0"]  # no stale folds 1 and 2


def test_summary_is_printed(corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_prepare(corpus_dir, tmp_path / "out")
    out = capsys.readouterr().out
    assert "not articles, skipped: 9 files (LICENSE.txt" in out
    assert "total                270     216      27      27" in out
    for category in CATEGORIES:
        assert category in out


def test_command_line_error_is_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "src" / "prepare.py"), "--input_dir", str(tmp_path / "missing")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr == f"error: {tmp_path / 'missing'} does not exist: run `bash src/download.sh` first\n"


# --- utils -----------------------------------------------------------------------------------


def test_jsonl_round_trip_keeps_japanese(tmp_path: Path) -> None:
    rows = [{"title": "日本語", "n": 1}, {"title": "ＡＢＣ", "n": 2}]
    utils.save_jsonl(rows, tmp_path / "x.jsonl")
    assert utils.load_jsonl(tmp_path / "x.jsonl") == rows
    assert "日本語" in (tmp_path / "x.jsonl").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"a": 1}\n{"a": \n', "line 2: not valid JSON"),
        (b'{"a": 1}\n\n{"a": 2}\n', "line 2: empty line"),
        (b'{"a": 1}\n[1, 2]\n', "line 2: expected a JSON object, got list"),
        (b'{"a": 1}\n{"a": 2}\n{"a": "\x82\xa0"}\n', "line 3: not valid UTF-8"),
    ],
)
def test_load_jsonl_names_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        utils.load_jsonl(path)
    assert str(e.value).startswith(f"{path}: {message}")


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with pytest.raises(ValueError):
        with utils.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
