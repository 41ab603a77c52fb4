"""Stage 2: turn a corpus into JSONL splits: the raw livedoor corpus (data/text), or your own CSV/TSV/JSONL file.

    poetry run python src/prepare.py [--input_dir data/text] [--output_dir datasets/livedoor] [--seed 42] [--num_folds K]
    poetry run python src/prepare.py --input FILE [FILE ...] --text_fields A [B] --label_field L --output_dir datasets/NAME

Writes OUTPUT_DIR/{all,train,val,test}.jsonl, label2id.json and dataset.json (what the dataset is: the
fingerprint of its rows and of its split, fold, label names; aggregate.py reads it to tell tasks apart),
and with --num_folds K also folds/<k>/ (the same files) for k = 0..K-1. Fold 0 is the default split.

livedoor: the reference's preprocessing and split (seeded shuffle, 10 contiguous parts, 8:1:1).
--input: every row gets an id (--id_field, else its row number), a label (the id of its label name in
label2id.json, names sorted; a list of ids if the dataset is multi-label) and category (the name, or
names); the other columns are kept as they are. The split is stratified by label (8:1:1, seeded), or
the one --split_field gives.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from more_itertools import divide
from tap import Tap

import utils
from utils import InputError

NUM_PARTS = 10  # 8:1:1 = parts for train : val : test
SPLITS = ("train", "val", "test")
URL_PATTERN = re.compile(r"^https?://\S+$")
DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}")

DELIMITERS = {".csv": ",", ".tsv": "\t"}
JSON_LINES = (".jsonl", ".json", ".ndjson")  # .json: JSON lines, or one JSON array of objects
WRITTEN_FIELDS = ("id", "label", "category")  # the fields prepare.py writes into every row
ENCODING_GUESSES = ("utf-8", "cp932", "euc_jp")  # what Japanese files come in (cp932: Shift_JIS as Windows and Excel write it)


class Args(Tap):
    input_dir: Path = Path("data/text")  # the extracted livedoor corpus: one folder per category (bash src/download.sh); not read with --input
    output_dir: Path = Path("datasets/livedoor")  # where the JSONL splits go; replaced as a whole on a rerun
    seed: int = 42  # seed of the shuffle before the split
    num_folds: int | None = None  # also write K rotations of the 8:1:1 split (1-10) under OUTPUT_DIR/folds/<k>/ (fold 0 = the default split); none without it

    # Your own data instead of the livedoor corpus.
    input: list[Path] = []  # your data files, read in this order as one dataset: .csv / .tsv (a header row; quoted cells) or .jsonl / .json (JSON lines)
    text_fields: list[str] = []  # with --input: the column with the text, or two columns of a sentence pair (give train.py the same --text_fields)
    label_field: str | None = None  # with --input: the column with the label name; a JSON list of names (["a", "b"]) makes the dataset multi-label
    label_sep: str | None = None  # with --input: split each label at this separator into several names (e.g. ","): a multi-label dataset
    id_field: str | None = None  # with --input: the column with unique row ids; without it, the row number (0, 1, ... over all files)
    split_field: str | None = None  # with --input: keep the split the data has: this column says train, val or test in each row (no --num_folds then)
    encoding: str = "utf-8"  # with --input: the files' text encoding (a UTF-8 BOM is skipped); e.g. cp932 for Shift_JIS files
    drop_invalid: bool = False  # with --input: skip the rows with an empty text, a missing label (or id, or split), printing how many, instead of stopping

    def process_args(self) -> None:
        if self.num_folds is not None and not 1 <= self.num_folds <= NUM_PARTS:
            self.error(f"--num_folds must be between 1 and {NUM_PARTS}, got {self.num_folds}")
        if not self.input:
            own = {"--text_fields": self.text_fields, "--label_field": self.label_field, "--label_sep": self.label_sep,
                   "--id_field": self.id_field, "--split_field": self.split_field, "--drop_invalid": self.drop_invalid,
                   "--encoding": self.encoding != "utf-8"}  # fmt: skip
            if given := [flag for flag, value in own.items() if value]:
                self.error(f"{', '.join(given)} only apply with --input (your own data file)")
            return
        if not 1 <= len(self.text_fields) <= 2:
            self.error("--input needs --text_fields: one column (a single text) or two (a sentence pair)")
        if not self.label_field:
            self.error("--input needs --label_field: the column with the label names")
        if reserved := [f for f in self.text_fields if f in WRITTEN_FIELDS]:
            self.error(f"--text_fields cannot be {', '.join(reserved)}: prepare.py writes {', '.join(WRITTEN_FIELDS)} into every row")
        roles = [self.label_field, *self.text_fields, self.id_field, self.split_field]
        if len([r for r in roles if r]) != len({r for r in roles if r}):
            self.error("--text_fields, --label_field, --id_field and --split_field must name different columns")
        if self.split_field and self.num_folds is not None:
            self.error("--num_folds rotates a stratified split; with --split_field the data's own split is kept")
        if self.label_sep == "":
            self.error("--label_sep cannot be empty")


# --- livedoor ---------------------------------------------------------------------------------


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


def read_livedoor(args: Args) -> tuple[list[dict], dict[str, int], list[list[dict]]]:
    """The reference's rows (shuffled with the seed, ids in that order), label2id and 10 contiguous parts."""
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
    return rows, label2id, split_parts(rows)


# --- your own data: reading ----------------------------------------------------------------------


class Record(NamedTuple):
    """One data row of an input file as read: where it is (for messages) and its fields."""

    path: Path
    line: int
    fields: dict[str, Any]
    problem: str | None = None  # what is wrong with the row as read (CSV/TSV: a cell count unlike the header's)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def is_utf8(encoding: str) -> bool:
    return encoding.lower().replace("_", "-") in ("utf-8", "utf8", "utf-8-sig")


def decode(path: Path, encoding: str) -> str:
    """The file's text; a file that does not decode gets one line naming the encoding it likely has."""
    data = path.read_bytes()
    codec = "utf-8-sig" if is_utf8(encoding) else encoding  # utf-8-sig: skips the BOM that Excel writes
    try:
        return data.decode(codec)
    except LookupError:
        raise InputError(f"--encoding {encoding}: no such encoding (e.g. utf-8, cp932, euc_jp)") from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        guess = next((g for g in guess_encodings(data) if g != encoding), None)
        fix = f"it reads as {guess}: pass --encoding {guess}" if guess else "pass --encoding with the encoding it was saved in"
        raise InputError(f"{path}:{line}: not valid {encoding} (byte {e.start}); {fix}") from None


def guess_encodings(data: bytes) -> list[str]:
    """Encodings in which `data` decodes without error, most likely first (UTF-16 only with its BOM)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return ["utf-16"]
    found = []
    for encoding in ENCODING_GUESSES:
        try:
            data.decode(encoding)
        except UnicodeDecodeError:
            continue
        found.append(encoding)
    return found


def read_delimited(path: Path, text: str, delimiter: str) -> tuple[list[str], list[Record]]:
    """Header and rows of a CSV/TSV text; cells in quotes may hold the delimiter, quotes and line breaks."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if not header:
            raise InputError(f"{path}: no header row (the first line names the columns)")
        if duplicates := sorted({name for name in header if header.count(name) > 1}):
            raise InputError(f"{path}:1: column {', '.join(map(repr, duplicates))} appears twice in the header")
        records, line = [], reader.line_num + 1
        for cells in reader:
            if cells:  # blank lines hold no row
                problem = None if len(cells) == len(header) else f"{len(cells)} cells, but the header has {len(header)}"
                records.append(Record(path, line, dict(zip(header, cells)), problem))
            line = reader.line_num + 1  # where the next row starts (a quoted cell may span lines)
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({e}); check the quotes on that line") from None
    return header, records


def read_json_lines(path: Path, text: str) -> tuple[list[str], list[Record]]:
    """Rows of a JSON-lines text (or of one JSON array of objects, as some .json files are); their keys in order."""
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        numbered = [(i, row) for i, row in enumerate(rows, start=1)]
        where = "item"
    else:
        numbered = []
        for line_no, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may stand inside a JSON string
            if not line.strip():
                continue
            try:
                numbered.append((line_no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        where = "line"
    records = []
    for number, row in numbered:
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number}: expected a JSON object per {where}, got {type(row).__name__}")
        records.append(Record(path, number, row))
    return list(dict.fromkeys(key for record in records for key in record.fields)), records


def read_input(path: Path, encoding: str, required: list[str]) -> tuple[list[str], list[Record]]:
    """Columns and rows of one input file, chosen by its extension; each required column must be there."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in DELIMITERS and suffix not in JSON_LINES:
        raise InputError(f"{path}: unknown file type {suffix or '(none)'}: --input reads .csv, .tsv, .jsonl and .json (JSON lines)")
    text = decode(path, encoding)
    if not is_utf8(encoding) and not text.isascii() and guess_encodings(path.read_bytes())[:1] == ["utf-8"]:
        print(f"warning: {path} is valid UTF-8 but was read as {encoding} (--encoding): is that right?")
    columns, records = read_delimited(path, text, DELIMITERS[suffix]) if suffix in DELIMITERS else read_json_lines(path, text)
    if not records:
        raise InputError(f"{path}: no data rows")
    if missing := [field for field in dict.fromkeys(required) if field not in columns]:
        raise InputError(f"{path}: no column {', '.join(map(repr, missing))} (its columns: {', '.join(map(repr, columns))})")
    return columns, records


# --- your own data: labels and rows -------------------------------------------------------------


def is_json_list(value: Any) -> bool:
    """A label that is a list: a JSON list in a JSON file, or a cell holding one (["a", "b"])."""
    if isinstance(value, list):
        return True
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return isinstance(json.loads(value), list)
        except json.JSONDecodeError:
            return False
    return False


def name_of(value: Any) -> str:
    """A label name: a text as it is (stripped); a JSON number or true/false as its JSON text ("0", "1.5", "true")."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (bool, int, float)):
        return utils.to_json(value)
    raise ValueError(f"a label name must be a text or a number, got {utils.to_json(value)}")


def label_names(value: Any, multi_label: bool, sep: str | None) -> str | list[str]:
    """The label name (single-label) or the sorted, distinct names (multi-label) of a label cell; ValueError says why not."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("no label")
    if not multi_label:
        if isinstance(value, (list, dict)):
            raise ValueError(f"the label is {utils.to_json(value)}, not a name")
        return name_of(value)
    if is_json_list(value):
        items = value if isinstance(value, list) else json.loads(value)
    elif sep is not None and isinstance(value, str):
        items = [piece for piece in value.split(sep) if piece.strip()]
    else:
        raise ValueError(f"the label {utils.to_json(value)} is not a JSON list, as other rows' labels are (write [{utils.to_json(value)}])")
    names = [name_of(item) for item in items]
    if "" in names:
        raise ValueError(f"an empty label name in {utils.to_json(value)}")
    return sorted(set(names))


def label_order(names: Iterable[str]) -> list[str]:
    """Label names in id order: sorted, by number when every name is an integer ("2" before "10"), else as text."""
    names = sorted(set(names))
    if all(re.fullmatch(r"[+-]?\d+", name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return names


def check_record(record: Record, args: Args, multi_label: bool) -> tuple[str | list[str] | None, str | None]:
    """(label name or names, None) of a valid row, or (None, why it is invalid)."""
    fields = record.fields
    if record.problem:
        return None, record.problem
    for field in args.text_fields:
        value = fields.get(field)
        if not isinstance(value, str) and value is not None:
            return None, f"{field} is {utils.to_json(value)}, not a text"
        if not value or not value.strip():
            return None, f"empty {field}"
    if args.id_field:
        value = fields.get(args.id_field)
        if value is None or value == "":
            return None, f"no id in {args.id_field}"
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None, f"the id {utils.to_json(value)} is not a text or an integer"
    if args.split_field and fields.get(args.split_field) not in SPLITS:
        return None, f"{args.split_field} is {utils.to_json(fields.get(args.split_field))}, not train, val or test"
    try:
        return label_names(fields.get(args.label_field), multi_label, args.label_sep), None
    except ValueError as e:
        return None, str(e)


def read_own_rows(args: Args) -> tuple[list[dict], dict[str, int], bool, list[str]]:
    """(rows, label2id, multi-label?, the splits of --split_field per row) of the --input files.

    Invalid rows stop here with file:line and their count, or are skipped and counted with --drop_invalid.
    """
    required = [*args.text_fields, args.label_field, *filter(None, [args.id_field, args.split_field])]
    records, not_copied = [], {}
    for path in args.input:
        columns, file_records = read_input(path, args.encoding, required)
        records += file_records
        for column in columns:
            if column in WRITTEN_FIELDS and column not in (args.label_field, args.id_field):
                not_copied.setdefault(column, []).append(str(path))

    multi_label = args.label_sep is not None or any(is_json_list(r.fields.get(args.label_field)) for r in records)
    checked = [(record, *check_record(record, args, multi_label)) for record in records]
    invalid = [(record, reason) for record, _, reason in checked if reason]
    if invalid:
        shown = "; ".join(f"{record.where} {reason}" for record, reason in invalid[:3]) + ("; ..." if len(invalid) > 3 else "")
        if not args.drop_invalid:
            first, reason = invalid[0]
            raise InputError(f"{first.where}: {reason} ({len(invalid)} invalid rows in all: {shown}); fix them, or pass --drop_invalid to skip them")
        print(f"skipped {len(invalid)} invalid rows of {len(records)} (--drop_invalid): {shown}")
    for column, paths in not_copied.items():
        print(f"column {column!r} of {', '.join(dict.fromkeys(paths))} not copied: prepare.py writes its own {column} into every row")

    valid = [(number, record, names) for number, (record, names, reason) in enumerate(checked) if not reason]
    if not valid:
        raise InputError(f"no valid rows in {', '.join(map(str, args.input))}")
    every_name = [name for _, _, names in valid for name in (names if multi_label else [names])]
    label2id = {name: i for i, name in enumerate(label_order(every_name))}
    if not multi_label and len(label2id) < 2:
        raise InputError(f"{args.label_field} holds only one label ({', '.join(label2id)}): a classifier needs two or more")

    rows, given_splits, first_seen = [], [], {}
    for number, record, names in valid:
        row_id = record.fields[args.id_field] if args.id_field else number
        key = utils.to_json(row_id)
        if key in first_seen:
            raise InputError(f"{record.where}: id {key} again (first at {first_seen[key]}): ids must be unique; leave out --id_field to number the rows")
        first_seen[key] = record.where
        if multi_label:  # ids sorted, names in the same order
            names = sorted(names, key=label2id.__getitem__)
            label: int | list[int] = [label2id[name] for name in names]
        else:
            label = label2id[names]
        kept = {k: v for k, v in record.fields.items() if k not in WRITTEN_FIELDS and k not in (args.label_field, args.id_field)}
        rows.append({"id": row_id, "label": label, "category": names, **kept})
        if args.split_field:
            given_splits.append(record.fields[args.split_field])
    return rows, label2id, multi_label, given_splits


# --- your own data: the split ------------------------------------------------------------------


def stratified_parts(rows: list[dict], multi_label: bool, seed: int, num_parts: int = NUM_PARTS) -> list[list[dict]]:
    """Rows dealt into `num_parts` parts so that each label is spread as evenly as the parts' sizes are.

    The rows of each label (multi-label: of its rarest label; no label: a group of its own), shuffled
    with the seed, are dealt in turn, labels in id order, one part after the other (as scikit-learn's
    StratifiedKFold allocates them): parts differ by at most one row, and so does each label's count
    in them. Each part keeps the input order. Only sorted keys and a seeded generator: the same parts
    on every machine and Python.
    """
    counts = Counter(label for row in rows for label in (row["label"] if multi_label else [row["label"]]))

    def key(row: dict) -> int:
        if not multi_label:
            return row["label"]
        return min(row["label"], key=lambda label: (counts[label], label), default=-1)

    groups: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(key(row), []).append(index)
    generator, part_of, position = random.Random(seed), [0] * len(rows), 0
    for group in sorted(groups):
        members = groups[group]
        generator.shuffle(members)
        for index in members:
            part_of[index] = position % num_parts
            position += 1
    return [[row for row, part in zip(rows, part_of) if part == p] for p in range(num_parts)]


def rows_by_split(rows: list[dict], splits: list[str]) -> dict[str, list[dict]]:
    """The split that --split_field gives; every split must have rows."""
    by_split = {name: [row for row, split in zip(rows, splits) if split == name] for name in SPLITS}
    if empty := [name for name, members in by_split.items() if not members]:
        raise InputError(f"--split_field: no rows for {', '.join(empty)} (each of train, val and test needs rows)")
    return by_split


# --- writing ------------------------------------------------------------------------------------


def fingerprint(rows: Iterable[dict]) -> str:
    """sha256 of the rows' contents without their ids, in sorted order: the same rows give the same value
    whatever their order or ids (livedoor's ids follow the shuffle, so every seed gives other ids)."""
    lines = sorted(utils.to_json({k: v for k, v in row.items() if k != "id"}) for row in rows)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def describe(name: str, source: str, splits: dict[str, list[dict]], label2id: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
    """dataset.json: what the dataset is, for train.py to record and aggregate.py to group runs by.

    source is the same for every split and fold of one corpus (runs on them are repetitions of one task);
    split tells two splits apart (the default split and fold 0 are the same split).
    """
    split = hashlib.sha256(" ".join(f"{s}:{fingerprint(splits[s])}" for s in SPLITS).encode("ascii")).hexdigest()
    return {"name": name, "source": f"sha256:{source}", "split": f"sha256:{split}", **extra, "labels": list(label2id)}


def write_split(folder: Path, splits: dict[str, list[dict]], label2id: dict[str, int], description: dict[str, Any]) -> None:
    for name, rows in splits.items():
        utils.save_jsonl(rows, folder / f"{name}.jsonl")
    utils.save_json(label2id, folder / "label2id.json")
    utils.save_json(description, folder / "dataset.json")


def label_counts(rows: list[dict]) -> Counter:
    """Rows per label name (a multi-label row counts for each of its names)."""
    return Counter(name for row in rows for name in ([row["category"]] if isinstance(row["category"], str) else row["category"]))


def summary_table(splits: dict[str, list[dict]], categories: list[str]) -> str:
    counts = {name: label_counts(rows) for name, rows in splits.items()}
    width = max(16, *(len(c) + 2 for c in categories))
    header = f"{'category':<{width}}" + "".join(f"{name:>8}" for name in splits)
    lines = [header, "-" * len(header)]
    for category in categories:
        lines.append(f"{category:<{width}}" + "".join(f"{counts[name][category]:>8}" for name in splits))
    lines.append(f"{'total':<{width}}" + "".join(f"{len(rows):>8}" for rows in splits.values()))
    return "\n".join(lines)


def rare_label_warnings(rows: list[dict], splits_by_name: dict[str, dict[str, list[dict]]], label2id: dict[str, int]) -> list[str]:
    """A warning per label that some split of the written ones (named by `splits_by_name`'s keys) lacks."""
    missing: dict[str, list[str]] = {}
    for split_name, splits in splits_by_name.items():
        counts = {name: label_counts(rows) for name, rows in splits.items()}
        for label in label2id:
            if absent := [name for name in SPLITS if not counts[name][label]]:
                missing.setdefault(label, []).append(f"{'/'.join(absent)} of {split_name}")
    total = label_counts(rows)
    return [
        f"warning: label {label!r} has {total[label]} rows, too few for every split: none in {'; '.join(places)}. "
        "A label missing from train is never learnt, and macro-F1 counts one missing from val or test as 0: add rows, or merge or remove the label"
        for label, places in missing.items()
    ]


def main(args: Args) -> None:
    if args.input:
        rows, label2id, multi_label, given_splits = read_own_rows(args)
        text_fields = list(args.text_fields)
        if args.split_field:
            parts, default = None, rows_by_split(rows, given_splits)
            method = f"the split of column {args.split_field}"
        else:
            parts = stratified_parts(rows, multi_label, args.seed)
            default = fold_splits(parts, fold=0)
            method = "stratified 8:1:1 (seeded)"
    else:
        rows, label2id, parts = read_livedoor(args)
        multi_label, text_fields, default = False, ["title", "body"], fold_splits(parts, fold=0)
        method = "the reference's: seeded shuffle, 10 contiguous parts, 8:1:1"

    folds = {fold: fold_splits(parts, fold) for fold in range(args.num_folds or 0)}
    source, info = fingerprint(rows), {"method": method, "seed": args.seed, "multi_label": multi_label, "text_fields": text_fields}

    def description(splits: dict[str, list[dict]], fold: int | None) -> dict[str, Any]:
        return describe(args.output_dir.name, source, splits, label2id, {"fold": fold, **info})

    # Everything goes to a temporary folder first: a crash never leaves half a dataset.
    with utils.atomic_dir(args.output_dir) as tmp:
        utils.save_jsonl(rows, tmp / "all.jsonl")
        write_split(tmp, default, label2id, description(default, None if parts is None else 0))  # the default split is fold 0
        for fold, splits in folds.items():
            write_split(tmp / "folds" / str(fold), splits, label2id, description(splits, fold))

    print(summary_table({"all": rows, **default}, list(label2id)))
    if args.input:
        for line in rare_label_warnings(rows, {"the default split": default, **{f"fold {k}": s for k, s in folds.items()}}, label2id):
            print(line)
    written = f"folds 0-{args.num_folds - 1} under {args.output_dir / 'folds'}, fold 0 = the default split" if args.num_folds else "no folds (--num_folds K writes them)"
    kind = "multi-label, " if multi_label else ""
    print(f"wrote {args.output_dir} ({kind}{len(label2id)} labels; seed {args.seed}; {written})")


if __name__ == "__main__":
    utils.run_cli(main, Args().parse_args())
