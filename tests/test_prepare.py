"""prepare.py: the reference's preprocessing and split, made deterministic and strict."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import unicodedata
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
    assert not (output / "folds").exists()  # no stale folds


def test_folds_only_when_asked(corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """folds/0 used to be written every time: a copy of the default split (26 MB on the real corpus)."""
    run_prepare(corpus_dir, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["all.jsonl", "dataset.json", "label2id.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    assert "no folds (--num_folds K writes them)" in capsys.readouterr().out


def reference_rows(input_dir: Path, seed: int) -> list[dict]:
    """The reference's prepare.py, as its README and code describe it, on sorted paths (the fix of its listing order)."""
    data = []
    for path in sorted(input_dir.glob("*/*.txt")):
        if path.name == "LICENSE.txt":
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        clean = [unicodedata.normalize("NFKC", line).strip("\u3000").strip() for line in lines[3:]]
        title = unicodedata.normalize("NFKC", lines[2].strip()).strip("\u3000").strip()
        data.append({"category": path.parent.name, "category-id": path.stem, "url": lines[0].strip(), "date": lines[1].strip(),
                     "title": title, "body": "\n".join(line for line in clean if line)})  # fmt: skip
    random.seed(seed)
    random.shuffle(data)
    label2id = {label: i for i, label in enumerate(sorted({d["category"] for d in data}))}
    return [{"id": i, "label": label2id[d["category"]], **d} for i, d in enumerate(data)]


def test_livedoor_rows_are_the_references(corpus_dir: Path, dataset_dir: Path) -> None:
    expected = reference_rows(corpus_dir, 42)
    assert read_lines(dataset_dir / "all.jsonl") == expected
    parts = [expected[i * 27 : (i + 1) * 27] for i in range(10)]
    assert read_lines(dataset_dir / "train.jsonl") == [row for part in parts[:8] for row in part]
    assert read_lines(dataset_dir / "val.jsonl") == parts[8] and read_lines(dataset_dir / "test.jsonl") == parts[9]


def test_dataset_json_tells_corpus_and_split(corpus_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    default = utils.load_json(dataset_dir / "dataset.json")
    assert set(default) == {"name", "source", "split", "fold", "method", "seed", "multi_label", "text_fields", "labels"}
    assert (default["name"], default["fold"], default["seed"], default["multi_label"]) == ("livedoor", 0, 42, False)
    assert default["labels"] == CATEGORIES and default["text_fields"] == ["title", "body"]
    folds = [utils.load_json(dataset_dir / "folds" / str(k) / "dataset.json") for k in range(10)]
    assert folds[0] == default  # the default split is fold 0
    assert {f["source"] for f in folds} == {default["source"]}  # one corpus: repetitions of one task
    assert len({f["split"] for f in folds}) == 10 and [f["fold"] for f in folds] == list(range(10))
    run_prepare(corpus_dir, tmp_path / "seed1", "--seed", "1")
    other_seed = utils.load_json(tmp_path / "seed1" / "dataset.json")
    assert other_seed["source"] == default["source"] and other_seed["split"] != default["split"]
    corpus = write_corpus(tmp_path / "text", articles_per_category=2)
    run_prepare(corpus, tmp_path / "livedoor")
    other_corpus = utils.load_json(tmp_path / "livedoor" / "dataset.json")
    assert other_corpus["labels"] == default["labels"] and other_corpus["source"] != default["source"]


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


# --- your own data: prepare.py --input -----------------------------------------------------------

JA_HEADER = ["タイトル", "本文", "カテゴリ", "メモ"]
JA_LABELS = ["スポーツ", "政治", "経済"]


def ja_rows(per_label: int = 20) -> list[list[str]]:
    """Rows of a CSV with Japanese columns; cells with commas, quotes and line breaks, as Excel quotes them."""
    return [
        [f"見出し{label}{i}", f"本文です、{label}の話。\n二行目 \"引用\" {i}", label, f"memo {i}"]
        for i in range(per_label) for label in JA_LABELS
    ]  # fmt: skip


def write_table(path: Path, header: list[str], rows: list[list[str]], encoding: str = "utf-8-sig") -> Path:
    """A CSV or TSV file (by extension); utf-8-sig: with the BOM that Excel writes."""
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def run_own(output_dir: Path, *argv: str) -> None:
    prepare.main(prepare.Args().parse_args(["--output_dir", str(output_dir), *argv]))


def split_ids(folder: Path) -> dict[str, list]:
    return {name: [row["id"] for row in read_lines(folder / f"{name}.jsonl")] for name in ("train", "val", "test")}


def test_a_csv_with_japanese_columns_becomes_a_stratified_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_table(tmp_path / "news.csv", JA_HEADER, ja_rows())
    run_own(tmp_path / "news", "--input", str(data), "--text_fields", "タイトル", "本文", "--label_field", "カテゴリ")
    out = tmp_path / "news"
    assert sorted(p.name for p in out.iterdir()) == ["all.jsonl", "dataset.json", "label2id.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    label2id = utils.load_json(out / "label2id.json")
    assert label2id == {"スポーツ": 0, "政治": 1, "経済": 2}  # names from the data, sorted
    rows = read_lines(out / "all.jsonl")
    # The row number is the id; the quoted cells come back whole; the other columns are kept.
    assert rows[0] == {"id": 0, "label": 0, "category": "スポーツ", "タイトル": "見出しスポーツ0",
                       "本文": "本文です、スポーツの話。\n二行目 \"引用\" 0", "メモ": "memo 0"}  # fmt: skip
    assert [r["id"] for r in rows] == list(range(60)) and all(r["label"] == label2id[r["category"]] for r in rows)
    assert "\ufeff" not in (out / "all.jsonl").read_text(encoding="utf-8")  # the BOM is not part of the first column's name
    # Stratified 8:1:1: each label 16 / 2 / 2; the splits cover the rows once.
    splits = {name: read_lines(out / f"{name}.jsonl") for name in ("train", "val", "test")}
    assert {name: len(split) for name, split in splits.items()} == {"train": 48, "val": 6, "test": 6}
    for name, size in (("train", 16), ("val", 2), ("test", 2)):
        assert prepare.label_counts(splits[name]) == {label: size for label in JA_LABELS}, name
    assert sorted(r["id"] for split in splits.values() for r in split) == list(range(60))
    description = utils.load_json(out / "dataset.json")
    assert description["labels"] == JA_LABELS and description["text_fields"] == ["タイトル", "本文"]
    assert (description["name"], description["fold"], description["multi_label"]) == ("news", 0, False)
    printed = capsys.readouterr().out
    assert "warning" not in printed and "wrote " in printed and "3 labels" in printed


def test_a_sentence_pair_task_as_it_comes_jsonl_and_tsv_with_an_id_field(tmp_path: Path) -> None:
    """Two files of a sentence-pair dataset, as published: JSON lines (.json) and a TSV, an id field of another name."""
    labels = ["entailment", "contradiction", "neutral"]
    train = [{"sentence_pair_id": str(i), "yjcaptions_id": f"{i}-1", "sentence1": f"男性が{i}人いる。", "sentence2": f"人が{i}人いる。", "label": labels[i % 3]} for i in range(30)]
    json_file = write_jsonl(tmp_path / "train-v1.1.json", train)
    tsv_file = write_table(tmp_path / "valid.tsv", ["sentence_pair_id", "yjcaptions_id", "sentence1", "sentence2", "label"],
                           [[str(100 + i), "x", f"犬が{i}匹。", f"動物が{i}匹。", labels[i % 3]] for i in range(30)], encoding="utf-8")  # fmt: skip
    run_own(tmp_path / "jnli", "--input", str(json_file), str(tsv_file), "--text_fields", "sentence1", "sentence2",
            "--label_field", "label", "--id_field", "sentence_pair_id", "--num_folds", "10")  # fmt: skip
    out = tmp_path / "jnli"
    assert utils.load_json(out / "label2id.json") == {"contradiction": 0, "entailment": 1, "neutral": 2}
    rows = read_lines(out / "all.jsonl")
    assert rows[0] == {"id": "0", "label": 1, "category": "entailment", "yjcaptions_id": "0-1", "sentence1": "男性が0人いる。", "sentence2": "人が0人いる。"}
    assert rows[30]["id"] == "100" and len(rows) == 60
    # 10 stratified rotations: each test part holds 2 of each label; every row is tested once.
    tested = []
    for fold in range(10):
        split = split_ids(out / "folds" / str(fold))
        assert len(split["test"]) == 6 and len(split["val"]) == 6
        assert prepare.label_counts(read_lines(out / "folds" / str(fold) / "test.jsonl")) == {label: 2 for label in labels}
        tested += split["test"]
    assert sorted(tested) == sorted(r["id"] for r in rows)
    assert split_ids(out / "folds" / "0") == split_ids(out)  # fold 0 is the default split


def test_the_split_is_the_same_on_every_machine(tmp_path: Path) -> None:
    """No set order or string hashing decides anything: two Python processes with other hash seeds write the same bytes."""
    data = write_table(tmp_path / "news.csv", JA_HEADER, ja_rows(7))
    outputs = []
    for hash_seed in ("0", "12345"):
        output = tmp_path / f"hash-seed-{hash_seed}" / "news"
        command = [sys.executable, str(REPO / "src" / "prepare.py"), "--input", str(data), "--text_fields", "本文", "--label_field", "カテゴリ",
                   "--output_dir", str(output), "--num_folds", "3"]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        outputs.append({str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6 + 3 * 5
    run_own(tmp_path / "seed-1", "--input", str(data), "--text_fields", "本文", "--label_field", "カテゴリ", "--seed", "1")
    assert split_ids(tmp_path / "seed-1") != split_ids(tmp_path / "hash-seed-0" / "news")
    assert (tmp_path / "seed-1" / "all.jsonl").read_bytes() == outputs[0]["all.jsonl"]


@pytest.mark.parametrize(
    ("labels", "order"),
    [
        (["0", "1.0", "True", "NA", "null", "nan", "None"], ["0", "1.0", "NA", "None", "True", "nan", "null"]),  # names, as text
        (["10", "2", "1", "-1"], ["-1", "1", "2", "10"]),  # integers only: by number
    ],
)
def test_label_names_are_names(tmp_path: Path, labels: list[str], order: list[str]) -> None:
    data = write_table(tmp_path / "data.csv", ["text", "label"], [[f"文{i}", label] for i in range(3) for label in labels])
    run_own(tmp_path / "out", "--input", str(data), "--text_fields", "text", "--label_field", "label")
    assert list(utils.load_json(tmp_path / "out" / "label2id.json")) == order
    assert {r["category"] for r in read_lines(tmp_path / "out" / "all.jsonl")} == set(labels)


def test_json_numbers_and_booleans_as_labels_are_their_json_text(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": f"文{i}", "label": [0, 1, 1.5, True][i % 4]} for i in range(8)])
    run_own(tmp_path / "out", "--input", str(data), "--text_fields", "text", "--label_field", "label")
    assert utils.load_json(tmp_path / "out" / "label2id.json") == {"0": 0, "1": 1, "1.5": 2, "true": 3}


@pytest.mark.parametrize("form", ["json-list-cells", "label-sep", "jsonl-lists"])
def test_multi_label(tmp_path: Path, form: str) -> None:
    names = [["政治", "経済"], ["スポーツ"], ["経済"], []] * 10
    if form == "jsonl-lists":
        data = write_jsonl(tmp_path / "data.jsonl", [{"text": f"記事{i}", "tags": n} for i, n in enumerate(names)])
        extra: list[str] = []
    else:
        cells = [json.dumps(n, ensure_ascii=False) if form == "json-list-cells" else "|".join(n) or "[]" for n in names]
        data = write_table(tmp_path / "data.csv", ["text", "tags"], [[f"記事{i}", c] for i, c in enumerate(cells)])
        extra = ["--label_sep", "|"] if form == "label-sep" else []
    run_own(tmp_path / "out", "--input", str(data), "--text_fields", "text", "--label_field", "tags", *extra)
    label2id = utils.load_json(tmp_path / "out" / "label2id.json")
    assert label2id == {"スポーツ": 0, "政治": 1, "経済": 2}
    rows = read_lines(tmp_path / "out" / "all.jsonl")
    assert [(r["label"], r["category"]) for r in rows[:4]] == [([1, 2], ["政治", "経済"]), ([0], ["スポーツ"]), ([2], ["経済"]), ([], [])]
    assert utils.load_json(tmp_path / "out" / "dataset.json")["multi_label"] is True
    test = read_lines(tmp_path / "out" / "test.jsonl")
    assert len(test) == 4 and sorted(len(r["label"]) for r in test) == [0, 1, 1, 2]  # stratified: one row of each kind


def test_split_field_keeps_the_datas_split(tmp_path: Path) -> None:
    given = (["train"] * 6 + ["val", "test"]) * 2
    rows = [[f"文{i}", ["pos", "neg"][i % 3 % 2], split] for i, split in enumerate(given)]
    data = write_table(tmp_path / "data.csv", ["text", "label", "split"], rows)
    run_own(tmp_path / "out", "--input", str(data), "--text_fields", "text", "--label_field", "label", "--split_field", "split")
    assert split_ids(tmp_path / "out") == {"train": [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13], "val": [6, 14], "test": [7, 15]}
    assert utils.load_json(tmp_path / "out" / "dataset.json")["fold"] is None
    with pytest.raises(SystemExit):
        prepare.Args().parse_args(["--input", str(data), "--text_fields", "text", "--label_field", "label", "--split_field", "split", "--num_folds", "2"])


# --- your own data: bad files ----------------------------------------------------------------------


def own_error(tmp_path: Path, data: Path, *extra: str, text_fields: tuple[str, ...] = ("本文",), label: str = "カテゴリ") -> str:
    with pytest.raises(InputError) as e:
        run_own(tmp_path / "out", "--input", str(data), "--text_fields", *text_fields, "--label_field", label, *extra)
    assert not (tmp_path / "out").exists()
    return str(e.value)


def test_a_shift_jis_file_names_its_encoding(tmp_path: Path) -> None:
    data = write_table(tmp_path / "excel.csv", JA_HEADER, ja_rows(3), encoding="cp932")
    message = own_error(tmp_path, data)
    assert message.startswith(f"{data}:1: not valid utf-8 (byte ") and message.endswith("; it reads as cp932: pass --encoding cp932")
    run_own(tmp_path / "out", "--input", str(data), "--text_fields", "本文", "--label_field", "カテゴリ", "--encoding", "cp932")
    assert read_lines(tmp_path / "out" / "all.jsonl")[0]["本文"].startswith("本文です、スポーツの話。")


def test_a_missing_column_is_named_with_the_columns_there_are(tmp_path: Path) -> None:
    data = write_table(tmp_path / "news.csv", JA_HEADER, ja_rows(3))
    assert own_error(tmp_path, data, label="ラベル") == f"{data}: no column 'ラベル' (its columns: 'タイトル', '本文', 'カテゴリ', 'メモ')"


def test_empty_labels_and_texts_are_refused_with_file_line_and_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = ja_rows(10)
    rows[4][2] = ""  # line 6: no label (the header is line 1, and row 3 spans two lines)
    rows[7][1] = "  \n "  # empty text (spaces only)
    rows[9][2] = " "
    data = write_table(tmp_path / "news.csv", JA_HEADER, rows)
    line = lambda i: 2 + 2 * i  # each row spans two lines (a line break in 本文)  # noqa: E731
    message = own_error(tmp_path, data)
    assert message == (
        f"{data}:{line(4)}: no label (3 invalid rows in all: {data}:{line(4)} no label; {data}:{line(7)} empty 本文; "
        f"{data}:{line(9)} no label); fix them, or pass --drop_invalid to skip them"
    )
    run_own(tmp_path / "out", "--input", str(data), "--text_fields", "本文", "--label_field", "カテゴリ", "--drop_invalid")
    assert f"skipped 3 invalid rows of 30 (--drop_invalid): {data}:{line(4)} no label;" in capsys.readouterr().out
    assert [r["id"] for r in read_lines(tmp_path / "out" / "all.jsonl")] == [i for i in range(30) if i not in (4, 7, 9)]  # ids: the rows' numbers


def test_a_label_of_one_row_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_table(tmp_path / "news.csv", JA_HEADER, [*ja_rows(10), ["見出し", "一件だけの本文", "芸能", "x"]])
    run_own(tmp_path / "out", "--input", str(data), "--text_fields", "本文", "--label_field", "カテゴリ", "--num_folds", "2")
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: label '芸能' has 1 rows, too few for every split: none in ")
    assert "macro-F1 counts one missing from val or test as 0" in warnings[0]
    assert utils.load_json(tmp_path / "out" / "label2id.json")["芸能"] == 3  # still a label: the dataset is written


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.jsonl", '{"本文": "a", "カテゴリ": "x"}\n{"本文": \n', "d.jsonl:2: not valid JSON"),
        ("d.jsonl", '{"本文": "a", "カテゴリ": "x"}\n["b"]\n', "d.jsonl:2: expected a JSON object per line, got list"),
        ("d.txt", "本文,カテゴリ\na,x\n", "d.txt: unknown file type .txt: --input reads .csv, .tsv, .jsonl and .json (JSON lines)"),
        ("d.csv", "本文,カテゴリ\n", "d.csv: no data rows"),
        ("d.csv", "本文,カテゴリ,本文\na,x,b\n", "d.csv:1: column '本文' appears twice in the header"),
        ("d.csv", "本文,カテゴリ\na,x\nb,x\n", "カテゴリ holds only one label (x): a classifier needs two or more"),
        ("d.csv", '本文,カテゴリ\n"a"b,x\n', "d.csv:2: malformed CSV"),
        ("d.csv", "本文,カテゴリ\na,x,extra\nb,y\n", "d.csv:2: 3 cells, but the header has 2 (1 invalid rows in all"),
        ("d.jsonl", '{"本文": "a", "カテゴリ": ["x"]}\n{"本文": "b", "カテゴリ": "y"}\n', 'd.jsonl:2: the label "y" is not a JSON list, as other rows'),
        ("d.jsonl", '{"本文": 1, "カテゴリ": "x"}\n{"本文": "b", "カテゴリ": null}\n', "d.jsonl:1: 本文 is 1, not a text (2 invalid rows"),
    ],
)
def test_bad_files_stop_with_one_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    assert message in own_error(tmp_path, data)


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    data = write_table(tmp_path / "d.csv", ["id", "本文", "カテゴリ"], [["a", "文", "x"], ["b", "文", "y"], ["a", "文", "y"]])
    assert own_error(tmp_path, data, "--id_field", "id") == f"{data}:4: id \"a\" again (first at {data}:2): ids must be unique; leave out --id_field to number the rows"


def test_columns_named_like_the_written_fields_are_not_copied_and_that_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A dataset with a numeric label column beside the names: the names are the label; id and label are prepare.py's."""
    data = write_table(tmp_path / "d.csv", ["id", "text", "label", "label_text"], [[f"x{i}", f"文{i}", str(i % 2), ["neg", "pos"][i % 2]] for i in range(20)])
    run_own(tmp_path / "out", "--input", str(data), "--text_fields", "text", "--label_field", "label_text")
    assert read_lines(tmp_path / "out" / "all.jsonl")[1] == {"id": 1, "label": 1, "category": "pos", "text": "文1"}
    out = capsys.readouterr().out
    assert f"column 'id' of {data} not copied: prepare.py writes its own id into every row" in out
    assert f"column 'label' of {data} not copied: prepare.py writes its own label into every row" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--text_fields", "text"], "--text_fields only apply with --input"),
        (["--input", "d.csv", "--label_field", "l"], "--input needs --text_fields"),
        (["--input", "d.csv", "--text_fields", "t"], "--input needs --label_field"),
        (["--input", "d.csv", "--text_fields", "label", "--label_field", "l"], "--text_fields cannot be label"),
        (["--input", "d.csv", "--text_fields", "t", "--label_field", "t"], "must name different columns"),
    ],
)
def test_flags_of_own_data_are_checked(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        prepare.Args().parse_args(argv)
    assert message in capsys.readouterr().err


def test_own_data_error_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    data = write_table(tmp_path / "excel.csv", JA_HEADER, ja_rows(2), encoding="cp932")
    command = [sys.executable, str(REPO / "src" / "prepare.py"), "--input", str(data), "--text_fields", "本文", "--label_field", "カテゴリ", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {data}:1: not valid utf-8") and result.stderr.count("\n") == 1


def test_multi_label_ids_are_sorted_as_label2id_orders_the_names(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"文{i}", "tags": [["10", "2"], ["1"], ["2"]][i % 3]} for i in range(12)])
    run_own(tmp_path / "out", "--input", str(data), "--text_fields", "text", "--label_field", "tags")
    assert utils.load_json(tmp_path / "out" / "label2id.json") == {"1": 0, "2": 1, "10": 2}
    assert read_lines(tmp_path / "out" / "all.jsonl")[0] == {"id": 0, "label": [1, 2], "category": ["2", "10"], "text": "文0"}


def test_a_json_array_file_is_read_too(tmp_path: Path) -> None:
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"text": f"文{i}", "label": "ab"[i % 2]} for i in range(10)], ensure_ascii=False, indent=1), encoding="utf-8")
    run_own(tmp_path / "out", "--input", str(data), "--text_fields", "text", "--label_field", "label")
    assert len(read_lines(tmp_path / "out" / "all.jsonl")) == 10


def test_a_utf8_file_read_with_another_encoding_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_table(tmp_path / "d.csv", ["本文", "カテゴリ"], [["文です", "政治"], ["文", "経済"]], encoding="utf-8")
    assert own_error(tmp_path, data, "--encoding", "cp932").endswith("; it reads as utf-8: pass --encoding utf-8")
    # Some UTF-8 text decodes as cp932 too, into other characters: a warning says so.
    latin = write_table(tmp_path / "l.csv", ["text", "label"], [["café", "a"], ["thé", "b"]], encoding="utf-8")
    run_own(tmp_path / "out", "--input", str(latin), "--text_fields", "text", "--label_field", "label", "--encoding", "cp932")
    assert f"warning: {latin} is valid UTF-8 but was read as cp932 (--encoding): is that right?" in capsys.readouterr().out
