"""Every stage's flags: each has help, and parsing has no side effects."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

STAGES = ["prepare", "train", "aggregate", "sweep", "predict", "plot"]
REQUIRED = {"predict": ["--model_dir", "some/model"], "plot": ["--run_dirs", "some/run"]}  # the flags a stage needs to parse


@pytest.mark.parametrize("stage", STAGES)
def test_every_flag_has_help(stage: str) -> None:
    args_class = importlib.import_module(stage).Args
    args = args_class()
    for name in args.class_variables:
        assert len(args.class_variables[name].get("comment", "")) > 10, f"{stage}.py --{name} has no help"
    help_text = args_class().format_help()
    for name in args.class_variables:
        assert f"--{name}" in help_text


@pytest.mark.parametrize("stage", STAGES)
def test_parsing_has_no_side_effects(stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    importlib.import_module(stage).Args().parse_args(REQUIRED.get(stage, []))
    assert os.listdir(tmp_path) == []


SRC = Path(__file__).resolve().parents[1] / "src"


def imported_modules(path: Path) -> set[str]:
    """The top-level names a source file imports, at its top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_scripts_import_one_another_only_where_readme_says() -> None:
    """train.py is the experiment, imported by no script (sweep.py reads train_options.py); the stage-to-stage imports
    are the ones README names: sweep.py runs aggregate.py's main, aggregate.py and train.py draw with plot.py."""
    imports = {(path.stem, name) for path in SRC.glob("*.py") for name in imported_modules(path) if name in STAGES and name != path.stem}
    assert imports == {("sweep", "aggregate"), ("aggregate", "plot"), ("train", "plot")}


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_parts() -> dict[str, str]:
    """README's Japanese part and its English section."""
    japanese, english = README.read_text(encoding="utf-8").split("\n## English\n", 1)
    return {"the Japanese part": japanese, "the English section": english}


@pytest.mark.parametrize("stage", STAGES)
def test_every_flag_is_named_in_readme(stage: str) -> None:
    """Each flag of --help (each field of the stage's Args) is named in README, in Japanese and in English."""
    names = list(importlib.import_module(stage).Args().class_variables)
    for part, text in readme_parts().items():
        missing = [f"--{name}" for name in names if not re.search(rf"--{name}(?!\w)", text)]
        assert not missing, f"{stage}.py: {', '.join(missing)} not named in {part} of README.md"


def test_a_stage_exits_at_once_after_its_atexit_handlers(tmp_path: Path) -> None:
    """utils.run_cli ends the process with exit_now: atexit handlers run and output is flushed, the interpreter's
    teardown (which took seconds after train.py's last line) is skipped: a module global's __del__ never runs."""
    script = tmp_path / "stage.py"
    script.write_text(
        "import atexit, sys\n"
        "import utils\n"
        "class Teardown:\n"
        "    def __del__(self):\n"
        "        open('teardown', 'w').close()\n"
        "held = Teardown()\n"
        "atexit.register(lambda: open('atexit', 'w').close())\n"
        "def main(args):\n"
        "    sys.stdout.write('wrote results')  # no newline: still buffered when main returns\n"
        "utils.run_cli(main, None)\n",
        encoding="utf-8",
    )
    src = Path(__file__).resolve().parents[1] / "src"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(src)})
    assert (result.returncode, result.stdout, result.stderr) == (0, "wrote results", "")
    assert (tmp_path / "atexit").exists()
    assert not (tmp_path / "teardown").exists()
