"""Small helpers shared by the stages: JSON/JSONL I/O, atomic writes, seeding."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


class InputError(Exception):
    """Bad input the user can fix; the scripts print its message and exit without a traceback."""


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash therefore never leaves a half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; swap it into place only if the block succeeds.

    An existing folder at `path` is replaced as a whole, so readers see either the old
    contents or the new ones, never a mixture.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_json(data: Any) -> str:
    """One JSON document in UTF-8 text (no \\u escapes), as every file of the project has it."""
    return json.dumps(data, ensure_ascii=False)


def save_json(data: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def load_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def save_jsonl(rows: Iterable[dict], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(to_json(row) + "\n")


def load_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file; a malformed line raises InputError naming the file and line number."""
    path = Path(path)
    rows = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}: line {line_no}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                raise InputError(f"{path}: line {line_no}: empty line (JSONL needs one object per line)")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def check_rows(rows: list[dict], text_fields: Sequence[str], source: str, other_fields: Sequence[str] = (), hint: str = "") -> list[dict]:
    """Every row has `other_fields` and each text field, and every text field is a string.

    JSON null, numbers and true/false are refused rather than turned into the text "None" or "1".
    `hint` follows the list of missing fields (what the reader needs them for).
    """
    for line_no, row in enumerate(rows, start=1):
        missing = [field for field in (*other_fields, *text_fields) if field not in row]
        if missing:
            raise InputError(f"{source}: line {line_no}: missing field(s) {', '.join(missing)}{hint}")
        for field in text_fields:
            if not isinstance(row[field], str):
                raise InputError(f"{source}: line {line_no}: {field} must be a string, got {to_json(row[field])}")
    return rows


def save_csv(header: list[str], rows: Iterable[Iterable[Any]], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    import torch  # imported here so that torch-free stages (prepare.py) start fast

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds the CUDA and MPS generators


def run_cli(main: Callable[[Any], object], args: Any) -> None:
    """Run a stage's main(args); user errors end in one clear line on stderr and exit code 1."""
    try:
        main(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
