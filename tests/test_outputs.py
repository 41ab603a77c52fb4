"""Outputs follow the user's umask, are on the disk before they appear, and a failed swap keeps the old folder."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import prepare
import train
import utils

UMASKS = [0o022, 0o077]


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes_under(root: Path) -> dict[str, int]:
    """Mode of root and of every folder and file under it."""
    return {str(p.relative_to(root)): mode(p) for p in [root, *root.rglob("*")]}


def expected_modes(root: Path, mask: int) -> dict[str, int]:
    """What plain mkdir() and open() give: 0777 and 0666 less the umask."""
    return {str(p.relative_to(root)): (0o777 if p.is_dir() else 0o666) & ~mask for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_the_umask_is_read_without_changing_it(mask: int) -> None:
    with umask(mask):
        assert utils.current_umask() == mask
        assert utils.current_umask() == mask


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_atomic_path_gives_the_mode_of_a_plain_open(mask: int, tmp_path: Path) -> None:
    with umask(mask):
        utils.save_json({"a": 1}, tmp_path / "new.json")
        (tmp_path / "plain.txt").write_text("x")
    assert mode(tmp_path / "new.json") == mode(tmp_path / "plain.txt") == 0o666 & ~mask


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "replaced"])
def test_atomic_dir_gives_the_mode_of_a_plain_mkdir(mask: int, existing: bool, tmp_path: Path) -> None:
    target = tmp_path / "out"
    if existing:
        (target / "stale").mkdir(parents=True)
    with umask(mask):
        with utils.atomic_dir(target) as tmp:
            (tmp / "plain.txt").write_text("x")
            (tmp / "sub").mkdir()
            utils.save_jsonl([{"a": 1}], tmp / "sub" / "rows.jsonl")
    assert sorted(modes_under(target)) == [".", "plain.txt", "sub", "sub/rows.jsonl"]
    assert modes_under(target) == expected_modes(target, mask)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_a_dataset_and_a_run_folder_follow_the_umask(mask: int, corpus_dir: Path, make_train_args, tmp_path: Path) -> None:
    """Colleagues on a shared server can read what the pipeline writes, as the user's umask allows."""
    dataset = tmp_path / "datasets" / "livedoor"
    with umask(mask):
        prepare.main(prepare.Args().parse_args(["--input_dir", str(corpus_dir), "--output_dir", str(dataset)]))
        run_dir = train.main(make_train_args(tmp_path / "outputs", "--dataset_dir", str(dataset), "--epochs", "1", "--save_model"))
    assert modes_under(dataset) == expected_modes(dataset, mask)
    written = modes_under(run_dir)
    assert {"config.json", "log.csv", "test-metrics.json", "model", "model/model.safetensors", "model/config.json"} <= set(written)
    assert written == expected_modes(run_dir, mask)


def test_files_are_synced_before_they_are_renamed_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync_file, real_replace = utils.fsync_file, os.replace
    monkeypatch.setattr(utils, "fsync_file", lambda path: (events.append(f"fsync {Path(path).name}"), real_fsync_file(path))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(f"replace {Path(src).name[:5]} -> {Path(dst).name}"), real_replace(src, dst))[1])

    utils.save_json({"a": 1}, tmp_path / "one.json")
    assert len(events) == 2 and events[0].startswith("fsync .one.json.") and events[1] == "replace .one. -> one.json"
    events.clear()
    with utils.atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert sorted(events[:2]) == ["fsync a.txt", "fsync b.txt"] and events[2:] == ["replace .fold -> folder"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "livedoor"
    (target / "folds" / "0").mkdir(parents=True)
    (target / "train.jsonl").write_text("old\n")
    (target / "folds" / "0" / "test.jsonl").write_text("old test\n")
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    calls = 0
    real_replace = os.replace

    def replace(src, dst) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the old folder is moved aside; moving the new one in fails
            raise OSError("disk error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk error"):
        with utils.atomic_dir(target) as tmp:
            (tmp / "train.jsonl").write_text("new\n")
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["livedoor"]  # no .old or .tmp folder left
