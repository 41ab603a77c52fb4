"""Stage 2: turn the raw livedoor corpus (data/text) into JSONL splits (datasets/livedoor).

    poetry run python src/prepare.py [--input_dir data/text] [--output_dir datasets/livedoor]
                                     [--seed 42] [--num_folds 1]

Writes OUTPUT_DIR/{all,train,val,test}.jsonl, label2id.json, and folds/<k>/{train,val,test}.jsonl
+ label2id.json for k = 0..num_folds-1. Fold 0 is the default split.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections import Counter
from pathlib import Path

from more_itertools import divide
from tap import Tap

import utils
from utils import InputError

NUM_PARTS = 10  # 8:1:1 = parts for train : val : test
URL_PATTERN = re.compile(r"^https?://\S+$")
DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}")


class Args(Tap):
    input_dir: Path = Path("data/text")  # the extracted corpus: one folder per category (bash src/download.sh)
    output_dir: Path = Path("datasets/livedoor")  # where the JSONL splits go; replaced as a whole on a rerun
    seed: int = 42  # seed of the shuffle before the split
    num_folds: int = 1  # also write this many rotations of the 8:1:1 split (1-10) under OUTPUT_DIR/folds/<k>/

    def process_args(self) -> None:
        if not 1 <= self.num_folds <= NUM_PARTS:
            self.error(f"--num_folds must be between 1 and {NUM_PARTS}, got {self.num_folds}")


def normalize_line(line: str) -> str:
    """NFKC, then strip spaces at both ends (str.strip also strips the ideographic space U+3000)."""
    return unicodedata.normalize("NFKC", line).strip()


def parse_article(path: Path, category: str) -> dict:
    """Read one article (line 1 URL, 2 date, 3 title, 4.. body); raise InputError if it has another shape."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 (byte {e.start}); re-extract the corpus with bash src/download.sh") from None

    lines = text.splitlines()
    url, date, raw_title = (line.strip() for line in (lines + ["", "", ""])[:3])
    title = normalize_line(raw_title)
    body_lines = [normalize_line(line) for line in lines[3:]]
    body = "\n".join(line for line in body_lines if line)

    problems = []
    if not URL_PATTERN.match(url):
        problems.append(f"line 1 should be the article URL, got {url[:60]!r}")
    if not DATE_PATTERN.match(date):
        problems.append(f"line 2 should be the date (YYYY-MM-DD...), got {date[:60]!r}")
    if not title:
        problems.append("line 3 should be the title, but it is empty or missing")
    if not body:
        problems.append("no body text from line 4 on")
    if problems:
        raise InputError(f"{path}: not a livedoor article: {'; '.join(problems)}")

    return {"category": category, "category-id": path.stem, "url": url, "date": date, "title": title, "body": body}


def is_hidden(path: Path) -> bool:
    """Names starting with "." (.ipynb_checkpoints, .DS_Store, editor backups) are never corpus entries."""
    return path.name.startswith(".")


def list_articles(input_dir: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Return (article files, other files, hidden entries) in sorted order, so the split is the same on every OS.

    Articles are <category>/*.txt; each category's LICENSE.txt and anything else is not an article.
    Hidden folders are not categories and hidden files are not articles (Jupyter, Finder and editors
    leave them behind).
    """
    if not input_dir.is_dir():
        raise InputError(f"{input_dir} does not exist: run `bash src/download.sh` first")
    entries = sorted(input_dir.iterdir())
    hidden = [entry for entry in entries if is_hidden(entry)]
    category_dirs = [d for d in entries if d.is_dir() and not is_hidden(d)]
    if not category_dirs:
        raise InputError(f"{input_dir} holds no category folders: run `bash src/download.sh` first")

    articles, others = [], []
    for category_dir in category_dirs:
        files = sorted(category_dir.iterdir())
        hidden += [f for f in files if is_hidden(f)]
        files = [f for f in files if not is_hidden(f)]
        found = [f for f in files if f.suffix == ".txt" and f.name != "LICENSE.txt" and f.is_file()]
        if not found:
            raise InputError(f"{category_dir}: no article files (*.txt); is the corpus complete? Run `bash src/download.sh`")
        articles += found
        others += sorted(set(files) - set(found))
    return articles, others, hidden


def split_parts(rows: list[dict], num_parts: int = NUM_PARTS) -> list[list[dict]]:
    """Cut into near-equal contiguous parts, exactly as more_itertools.divide does in the reference."""
    return [list(part) for part in divide(num_parts, rows)]


def fold_splits(parts: list[list[dict]], fold: int) -> dict[str, list[dict]]:
    """Rotation `fold` of the 8:1:1 split: test = part (fold+9) % 10, val = part (fold+8) % 10.

    Fold 0 is the reference's split (train = parts 0-7, val = 8, test = 9); the test parts of
    different folds are disjoint, so 10 folds test every article exactly once.
    """
    n = len(parts)
    order = [parts[(fold + i) % n] for i in range(n)]
    return {"train": [row for part in order[:-2] for row in part], "val": order[-2], "test": order[-1]}


def write_split(folder: Path, splits: dict[str, list[dict]], label2id: dict[str, int]) -> None:
    for name, rows in splits.items():
        utils.save_jsonl(rows, folder / f"{name}.jsonl")
    utils.save_json(label2id, folder / "label2id.json")


def summary_table(splits: dict[str, list[dict]], categories: list[str]) -> str:
    counts = {name: Counter(row["category"] for row in rows) for name, rows in splits.items()}
    header = f"{'category':<16}" + "".join(f"{name:>8}" for name in splits)
    lines = [header, "-" * len(header)]
    for category in categories:
        lines.append(f"{category:<16}" + "".join(f"{counts[name][category]:>8}" for name in splits))
    lines.append(f"{'total':<16}" + "".join(f"{len(rows):>8}" for rows in splits.values()))
    return "\n".join(lines)


def main(args: Args) -> None:
    paths, others, hidden = list_articles(args.input_dir)
    if others:
        print(f"not articles, skipped: {len(others)} files ({', '.join(sorted({p.name for p in others})[:5])}, ...)")
    if hidden:
        names = [str(p.relative_to(args.input_dir)) + ("/" if p.is_dir() else "") for p in hidden]
        print(f"hidden, skipped: {len(hidden)} entries ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    articles = [parse_article(path, category=path.parent.name) for path in paths]

    # Sorted category names give the reference's ids (dokujo-tsushin 0 ... topic-news 8).
    categories = sorted({a["category"] for a in articles})
    label2id = {category: i for i, category in enumerate(categories)}

    random.Random(args.seed).shuffle(articles)
    rows = [{"id": i, "label": label2id[a["category"]], **a} for i, a in enumerate(articles)]
    parts = split_parts(rows)

    # Everything goes to a temporary folder first: a crash never leaves half a dataset.
    with utils.atomic_dir(args.output_dir) as tmp:
        utils.save_jsonl(rows, tmp / "all.jsonl")
        write_split(tmp, fold_splits(parts, fold=0), label2id)
        for fold in range(args.num_folds):
            write_split(tmp / "folds" / str(fold), fold_splits(parts, fold), label2id)

    print(summary_table({"all": rows, **fold_splits(parts, fold=0)}, categories))
    folds = "fold 0" if args.num_folds == 1 else f"folds 0-{args.num_folds - 1}"
    print(f"wrote {args.output_dir} (seed {args.seed}; {folds} under {args.output_dir / 'folds'}, fold 0 = the default split)")


if __name__ == "__main__":
    utils.run_cli(main, Args().parse_args())
