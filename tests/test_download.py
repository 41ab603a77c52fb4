"""Tests for src/download.sh, run as a subprocess against small archives built here.

Nothing here touches the network: every run gets LIVEDOOR_URL on the reserved `.invalid`
domain and fake `curl`/`wget` first on PATH. The fakes fail like an offline machine unless
FAKE_SOURCE names a file to "download" (then they honour resume flags, like the real tools).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "src" / "download.sh"
CATEGORIES = [
    "dokujo-tsushin",
    "it-life-hack",
    "kaden-channel",
    "livedoor-homme",
    "movie-enter",
    "peachy",
    "smax",
    "sports-watch",
    "topic-news",
]
ARCHIVE_NAME = "ldcc-20140209.tar.gz"

# One fake serves as both curl and wget; it logs its arguments and writes FAKE_SOURCE's bytes
# from the current size of the output file on when asked to resume (curl -C -, wget -c).
# FAKE_STOP_AT cuts the transfer short, like a dropped connection.
FAKE_DOWNLOADER = f"""#!{sys.executable}
import os, sys
args = sys.argv[1:]
name = os.path.basename(sys.argv[0])
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(name + " " + " ".join(args) + "\\n")
source = os.environ.get("FAKE_SOURCE")
if not source:
    print(name + ": (6) Could not resolve host: example.invalid", file=sys.stderr)
    sys.exit(6 if name == "curl" else 4)
out = args[args.index("-o" if name == "curl" else "-O") + 1]
resume = "-C" in args or "-c" in args
start = os.path.getsize(out) if resume and os.path.exists(out) else 0
data = open(source, "rb").read()
stop = int(os.environ.get("FAKE_STOP_AT", len(data)))
with open(out, "ab" if start else "wb") as f:
    f.write(data[start:stop])
if stop < len(data):
    print(name + ": (18) transfer closed with outstanding read data remaining", file=sys.stderr)
    sys.exit(18)
"""


def article(category: str, article_id: int) -> str:
    return (
        f"http://news.livedoor.com/article/detail/{article_id}/\n"
        "2011-09-07T19:35:00+0900\n"
        f"{category}の記事タイトル {article_id}\n"
        "本文の一行目です。\n"
        "\n"
        "本文の二行目です。\n"
    )


def corpus_files(categories: list[str] = CATEGORIES) -> dict[str, str]:
    """Relative path under text/ -> content, in the livedoor layout."""
    files = {"README.txt": "livedoor news corpus (test)\n", "CHANGES.txt": "2014-02-09\n"}
    for i, category in enumerate(categories):
        files[f"{category}/LICENSE.txt"] = "CC BY-ND 2.1 JP\n"
        for article_id in (6000000 + 10 * i, 6000001 + 10 * i):
            files[f"{category}/{category}-{article_id}.txt"] = article(category, article_id)
    return files


def build_archive(path: Path, files: dict[str, str]) -> str:
    """Write a .tar.gz whose top-level folder is text/ with `files`; return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        folders = sorted({str(Path("text", rel).parent) for rel in files})
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for rel, content in files.items():
            data = content.encode("utf-8")
            info = tarfile.TarInfo(f"text/{rel}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return sha256(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_bin(directory: Path, fakes: tuple[str, ...] = ("curl", "wget"), hide_real: bool = False) -> str:
    """Create `directory` with fake downloaders; return the PATH to run under.

    hide_real: build a PATH without the real curl/wget (links to every other tool instead).
    """
    directory.mkdir(exist_ok=True)
    for name in fakes:
        fake = directory / name
        fake.write_text(FAKE_DOWNLOADER)
        fake.chmod(0o755)
    if not hide_real:
        return f"{directory}{os.pathsep}{os.environ['PATH']}"
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            link = directory / entry.name
            if entry.name in ("curl", "wget") or link.exists() or link.is_symlink():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    return str(directory)


def run(cwd: Path, *args: str, path: str | None = None, sha: str | None = None,
        **fake_env: str) -> subprocess.CompletedProcess[str]:
    """Run download.sh in `cwd`, offline (fakes first on PATH, unresolvable URL)."""
    env = dict(os.environ)
    env.pop("LIVEDOOR_SHA256", None)
    env.update(
        PATH=path if path is not None else make_bin(cwd.parent / "bin"),
        LIVEDOOR_URL="https://example.invalid/ldcc-20140209.tar.gz",
        FAKE_LOG=str(cwd.parent / "fake.log"),
        **fake_env,
    )
    if sha is not None:
        env["LIVEDOOR_SHA256"] = sha
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_calls(cwd: Path) -> list[str]:
    log = cwd.parent / "fake.log"
    return log.read_text().splitlines() if log.exists() else []


def assert_no_corpus(cwd: Path) -> None:
    assert not (cwd / "data" / "text").exists()
    assert not list((cwd / "data").glob(".extract.*")), "temporary folder left behind"


def assert_corpus(cwd: Path) -> None:
    text = cwd / "data" / "text"
    expected = corpus_files()
    assert snapshot(text) == {rel: content.encode("utf-8") for rel, content in expected.items()}
    assert sorted(p.name for p in text.iterdir() if p.is_dir()) == CATEGORIES
    assert not list((cwd / "data").glob(".extract.*")), "temporary folder left behind"


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, str]:
    """A good archive outside the working folder, and its sha256."""
    path = tmp_path / "archives" / ARCHIVE_NAME
    return path, build_archive(path, corpus_files())


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    work = tmp_path / "repo"
    work.mkdir()
    return work


def test_local_archive_is_verified_and_extracted(cwd: Path, archive: tuple[Path, str]) -> None:
    path, sha = archive
    result = run(cwd, str(path), sha=sha)
    assert result.returncode == 0, result.stderr
    assert "using local archive" in result.stdout
    assert "corpus ready at data/text" in result.stdout
    assert_corpus(cwd)
    text = (cwd / "data" / "text" / "smax" / "smax-6000060.txt").read_text(encoding="utf-8")
    assert text.splitlines()[:3] == [
        "http://news.livedoor.com/article/detail/6000060/",
        "2011-09-07T19:35:00+0900",
        "smaxの記事タイトル 6000060",
    ]
    assert path.exists(), "the user's archive is left where it was"
    assert sorted(p.name for p in (cwd / "data").iterdir()) == ["text"]
    assert fake_calls(cwd) == [], "nothing downloaded when a local archive is given"


def test_rerun_with_corpus_in_place_does_nothing(cwd: Path, archive: tuple[Path, str]) -> None:
    path, sha = archive
    assert run(cwd, str(path), sha=sha).returncode == 0
    before = snapshot(cwd / "data")
    mtimes = {p: p.stat().st_mtime_ns for p in (cwd / "data").rglob("*")}

    # No archive and no network: it must not need either.
    result = run(cwd)
    assert result.returncode == 0, result.stderr
    assert "already in place" in result.stdout
    assert snapshot(cwd / "data") == before
    assert {p: p.stat().st_mtime_ns for p in (cwd / "data").rglob("*")} == mtimes
    assert fake_calls(cwd) == []


def test_checksum_mismatch_keeps_local_archive(cwd: Path, archive: tuple[Path, str]) -> None:
    path, sha = archive
    wrong = "0" * 64
    result = run(cwd, str(path), sha=wrong)
    assert result.returncode != 0
    assert result.stderr.startswith("download.sh: error: checksum mismatch")
    assert f"expected {wrong}" in result.stderr
    assert f"got {sha}" in result.stderr
    assert "LIVEDOOR_SHA256" in result.stderr
    assert_no_corpus(cwd)
    assert path.exists() and sha256(path) == sha, "a user-supplied archive is never deleted"


def test_an_upper_case_checksum_is_accepted(cwd: Path, archive: tuple[Path, str]) -> None:
    path, sha = archive
    result = run(cwd, str(path), sha=sha.upper())
    assert result.returncode == 0, result.stderr
    assert_corpus(cwd)


# Syntax that macOS's bash 3.2 (/bin/bash) does not have: bash 4 and later only.
BASH4_ONLY = {
    "case modification ${x,,} ${x^^}": r"\$\{[^}]*(,|\^)\}",
    "transformation ${x@Q}": r"\$\{[^}]*@[QEPAaKkULu]\}",
    "associative array or nameref (declare -A, local -n)": r"\b(declare|local|typeset|readonly)\s+-\w*[An]",
    "mapfile, readarray, coproc": r"\b(mapfile|readarray|coproc)\b",
    "&>> redirection": r"&>>",
    "|& pipe": r"\|&",
    "case fall-through ;& ;;&": r";;?&",
    "negative array index": r"\[\s*-\d+\s*\]\}",
    "[[ -v name ]]": r"\[\[\s+-v\s",
    "wait -n": r"\bwait\s+-n\b",
    "brace sequence with a step {1..9..2}": r"\{[^{}\s]+\.\.[^{}\s]+\.\.[^{}\s]+\}",
    "shopt globstar/lastpipe": r"shopt\s+-s\s+(globstar|lastpipe|autocd|direxpand|checkjobs)",
    "$BASHPID, $EPOCHSECONDS, $EPOCHREALTIME": r"\$\{?(BASHPID|EPOCHSECONDS|EPOCHREALTIME)\b",
    "printf %(...)T": r"%\([^)]*\)T",
}


def bash4_constructs(script: str) -> list[str]:
    """Lines of `script` (comments aside) that use syntax bash 3.2 lacks, with what they use."""
    found = []
    for line_no, line in enumerate(script.splitlines(), start=1):
        code = re.sub(r"(^|\s)#.*", "", line)  # a comment starts a word
        found += [f"line {line_no}: {name}: {line.strip()}" for name, pattern in BASH4_ONLY.items() if re.search(pattern, code)]
    return found


def test_download_sh_uses_no_bash4_only_syntax() -> None:
    """macOS's /bin/bash is 3.2: ${VAR,,} once broke the checksum test there."""
    assert bash4_constructs(SCRIPT.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    "line",
    [
        '[[ $a == "${SHA256,,}" ]]', "x=${y^^}", 'echo "${x@Q}"', "declare -A seen", "local -n ref=$1", "mapfile -t lines <f",
        "cmd &>> log", "cmd |& tee log", "a) echo ;;&", "echo ${arr[-1]}", "[[ -v name ]]", "wait -n", "echo {1..9..2}",
        "shopt -s globstar", 'echo "$EPOCHSECONDS"', "printf '%(%F)T' -1",
    ],
)  # fmt: skip
def test_the_bash4_check_finds_each_construct(line: str) -> None:
    assert bash4_constructs(f"#!/usr/bin/env bash\n{line}  # a comment\n") != []
    assert bash4_constructs(f"# {line}\n") == []  # in a comment it is harmless


def test_published_checksum_is_the_default(cwd: Path, archive: tuple[Path, str]) -> None:
    path, _ = archive
    result = run(cwd, str(path))  # no LIVEDOOR_SHA256
    assert result.returncode != 0
    assert "expected b17606ed8c670013a3809100a9e6104701baab62cc019abc262111bd2acf1063" in result.stderr
    assert_no_corpus(cwd)


def test_corrupt_archive(cwd: Path, tmp_path: Path) -> None:
    path = tmp_path / ARCHIVE_NAME
    path.write_bytes(os.urandom(4096))
    result = run(cwd, str(path), sha=sha256(path))
    assert result.returncode != 0
    assert result.stderr.splitlines()[-1].startswith("download.sh: error: could not extract")
    assert "corrupt" in result.stderr
    assert_no_corpus(cwd)
    assert path.exists()


@pytest.mark.parametrize(
    "files",
    [
        pytest.param(corpus_files(CATEGORIES[:8]), id="eight-categories"),
        pytest.param({**corpus_files(), "extra/extra-1.txt": "x\n"}, id="extra-folder"),
        pytest.param(
            {k: v for k, v in corpus_files().items() if not k.startswith("peachy/peachy-")},
            id="category-without-articles",
        ),
    ],
)
def test_wrong_layout(cwd: Path, tmp_path: Path, files: dict[str, str]) -> None:
    path = tmp_path / ARCHIVE_NAME
    sha = build_archive(path, files)
    result = run(cwd, str(path), sha=sha)
    assert result.returncode != 0
    assert result.stderr.startswith("download.sh: error: unexpected layout")
    assert "9 category folders" in result.stderr
    assert_no_corpus(cwd)


def test_no_network(cwd: Path, archive: tuple[Path, str]) -> None:
    _, sha = archive
    result = run(cwd, sha=sha)
    assert result.returncode != 0
    assert "download.sh: error: download of https://example.invalid/" in result.stderr
    assert "no network" in result.stderr
    assert "local archive" in result.stderr
    assert_no_corpus(cwd)
    assert not (cwd / "data" / ARCHIVE_NAME).exists()
    assert len(fake_calls(cwd)) == 1 and fake_calls(cwd)[0].startswith("curl ")


def test_interrupted_download_resumes(cwd: Path, archive: tuple[Path, str]) -> None:
    path, sha = archive
    half = path.stat().st_size // 2
    part = cwd / "data" / f"{ARCHIVE_NAME}.part"

    result = run(cwd, sha=sha, FAKE_SOURCE=str(path), FAKE_STOP_AT=str(half))
    assert result.returncode != 0
    assert "download.sh: error: download of" in result.stderr
    assert part.stat().st_size == half, "the partial download is kept for resuming"
    assert not (cwd / "data" / ARCHIVE_NAME).exists()
    assert_no_corpus(cwd)

    result = run(cwd, sha=sha, FAKE_SOURCE=str(path))
    assert result.returncode == 0, result.stderr
    assert_corpus(cwd)
    assert not part.exists()
    assert sha256(cwd / "data" / ARCHIVE_NAME) == sha, "the finished archive is kept"
    calls = fake_calls(cwd)
    assert len(calls) == 2 and all(c.startswith("curl ") and " -C - " in c for c in calls)
    assert calls[-1].endswith(" https://example.invalid/ldcc-20140209.tar.gz")


def test_wget_is_used_without_curl(cwd: Path, tmp_path: Path, archive: tuple[Path, str]) -> None:
    path, sha = archive
    bin_path = make_bin(tmp_path / "bin-wget", fakes=("wget",), hide_real=True)
    result = run(cwd, path=bin_path, sha=sha, FAKE_SOURCE=str(path))
    assert result.returncode == 0, result.stderr
    assert_corpus(cwd)
    [call] = fake_calls(cwd)
    assert call.startswith("wget -c -O data/ldcc-20140209.tar.gz.part ")


def test_neither_curl_nor_wget(cwd: Path, tmp_path: Path, archive: tuple[Path, str]) -> None:
    _, sha = archive
    bin_path = make_bin(tmp_path / "bin-none", fakes=(), hide_real=True)
    result = run(cwd, path=bin_path, sha=sha)
    assert result.returncode != 0
    assert result.stderr.startswith("download.sh: error: neither curl nor wget found")
    assert_no_corpus(cwd)


def test_bad_download_is_deleted_and_fetched_again(cwd: Path, tmp_path: Path,
                                                   archive: tuple[Path, str]) -> None:
    path, sha = archive
    garbage = tmp_path / "garbage.html"
    garbage.write_text("<html>mirror error page</html>\n")

    result = run(cwd, sha=sha, FAKE_SOURCE=str(garbage))
    assert result.returncode != 0
    assert "download.sh: error: checksum mismatch" in result.stderr
    assert "Deleted it" in result.stderr
    assert not (cwd / "data" / ARCHIVE_NAME).exists()
    assert not (cwd / "data" / f"{ARCHIVE_NAME}.part").exists()
    assert_no_corpus(cwd)

    result = run(cwd, sha=sha, FAKE_SOURCE=str(path))
    assert result.returncode == 0, result.stderr
    assert_corpus(cwd)


def test_complete_archive_in_data_is_reused(cwd: Path, archive: tuple[Path, str]) -> None:
    path, sha = archive
    (cwd / "data").mkdir()
    (cwd / "data" / ARCHIVE_NAME).write_bytes(path.read_bytes())
    result = run(cwd, sha=sha)  # the fakes would fail if called
    assert result.returncode == 0, result.stderr
    assert "reusing data/ldcc-20140209.tar.gz" in result.stdout
    assert_corpus(cwd)
    assert fake_calls(cwd) == []


def test_foreign_data_text_is_left_alone(cwd: Path, archive: tuple[Path, str]) -> None:
    path, sha = archive
    notes = cwd / "data" / "text" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine\n")
    result = run(cwd, str(path), sha=sha)
    assert result.returncode != 0
    assert result.stderr.startswith("download.sh: error: data/text exists but is not a complete corpus")
    assert snapshot(cwd / "data") == {"text/notes.txt": b"mine\n"}
