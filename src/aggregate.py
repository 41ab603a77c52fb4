"""Collect finished runs of train.py into results tables and a plot.

    poetry run python src/aggregate.py --input_dir outputs --output_dir results

Writes results/all.csv (one row per run), results/best.csv (per model, the setting with the best
mean val F1, with mean and std over its seeds/folds), results/best.md (the Markdown table of
best.csv), results/per-class.csv (test F1 per category of each best setting) and the figures
best.png, curves.png and per-class.png (drawn by plot.py). Nothing is downloaded: parameter counts
come from each run's config.json, figures from each run's log.csv and test-per-class.csv.

Runs are repetitions of one setting when they differ only in seed and split (folds of one corpus);
runs on different tasks (corpora, told apart by the dataset.json of prepare.py) are never averaged,
and copies of one run (same setting, seed and split) count once: the newest finished one.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from tap import Tap

import plot
import utils


class Args(Tap):
    input_dir: Path = Path("outputs")  # folder searched recursively for run folders (those holding config.json)
    output_dir: Path = Path("results")  # where all.csv, best.csv, best.md, per-class.csv and the figures (best.png, curves.png, per-class.png) are written


METRICS = ("loss", "accuracy", "precision", "recall", "f1")
SCORES = ("accuracy", "precision", "recall", "f1")  # the metrics reported with a std, in percent
MICRO_SCORES = ("micro_precision", "micro_recall", "micro_f1")  # multi-label runs only: columns where some run has them

# Runs that differ only in these are repetitions of one setting: their scores are averaged.
# (dataset_dir: the folds of one corpus; the corpus itself is the setting field "task".)
REPETITION_FIELDS = ("seed", "dataset_dir")
# Fields of config.json that are not train.py options: what a run found or where it was, not what it learned.
# (dataset: the description of the dataset; its corpus becomes the setting field "task". problem_type follows from the dataset.)
RUN_FACTS = (
    "runtime_options", "run_dir", "dataset", "num_params", "num_encoder_params", "num_trainable_params", "num_labels", "problem_type", "environment", "truncation_report",
)  # fmt: skip
# Settings added to train.py after runs were made, with the value those older runs had: --truncation
# head is what train.py always did (and no class weights, no early stopping, the 0.5 threshold that
# single-label runs never use, full fine-tuning: LoRA's r 0 and its other flags at their defaults),
# so an older run and a new default one are the same setting. Every setting added from now on needs
# its entry (tests/test_aggregate.py compares this table with train.py's settings).
OLDER_SETTINGS = {
    "truncation": "head", "head_tokens": None, "threshold": 0.5, "class_weights": "none", "early_stopping_patience": 0,
    "lora_r": 0, "lora_alpha": 16.0, "lora_dropout": 0.1, "lora_target_modules": [], "load_in_4bit": False,
}  # fmt: skip
# train.py's runtime options (how and where a run executes), for runs made before config.json listed
# them itself under "runtime_options" (train_options.py declares them in its Runtime class).
OLD_RUNTIME_OPTIONS = (
    "output_root", "device", "num_workers", "eval_batch_size", "save_model", "compile",
    "slow_tokenizer",  # the same ids either way
    "tokenized_cache", "tokenized_cache_dir",
    "merge_lora",  # newer than the runtime_options list: no old run has it, listed so that the two lists stay one set
)  # fmt: skip


def not_setting_fields(config: dict[str, Any], repetitions: bool = True) -> frozenset[str]:
    """Fields of a run's config.json outside its setting: its runtime options, its facts and (with
    `repetitions`) seed and dataset_dir.

    Every other scalar field is part of the setting, so an unknown new argument splits settings
    instead of silently averaging different experiments together.
    """
    runtime = config.get("runtime_options")
    if not isinstance(runtime, list) or not all(isinstance(name, str) for name in runtime):
        runtime = OLD_RUNTIME_OPTIONS
    return frozenset([*runtime, *RUN_FACTS, *(REPETITION_FIELDS if repetitions else ())])


NUMBER = (int, float)  # a JSON number
# Required fields of each run file with the JSON types they must have.
CONFIG_FIELDS: dict[str, tuple[type, ...]] = {
    "model_name": (str,),
    "lr": NUMBER,
    "seed": (int,),
    "dataset_dir": (str,),
    "num_params": (int,),
}
# Optional fields (absent from runs of older train.py versions) with the JSON types they must have.
OPTIONAL_CONFIG_FIELDS: dict[str, tuple[type, ...]] = {"num_encoder_params": (int,)}
VAL_FIELDS: dict[str, tuple[type, ...]] = {"best-epoch": (int,), **{m: NUMBER for m in METRICS}}
TEST_FIELDS: dict[str, tuple[type, ...]] = {m: NUMBER for m in METRICS}

# A Hugging Face Hub id: "name" or "owner/name" of letters, digits, "-", "_", ".".
HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*", re.ASCII)


def find_run_dirs(root: Path) -> list[Path]:
    """Folders under `root` holding config.json, sorted.

    The search does not descend into a run folder: a model saved inside a run (save_pretrained
    writes its own config.json) is part of that run, not another one. Hidden folders are searched
    too: a local model "./x" gets the folder ".__x".
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "config.json" in filenames:
            found.append(Path(dirpath))
            dirnames.clear()  # do not descend into a run
    return sorted(found)


def read_json_object(
    run_dir: Path, name: str, fields: dict[str, tuple[type, ...]], optional: dict[str, tuple[type, ...]] | None = None
) -> dict[str, Any]:
    """One JSON object of a run folder, checked for the fields it must have (and the types of `optional` ones it may have)."""
    path = run_dir / name
    if not path.is_file():
        raise utils.InputError(f"{name} is missing")
    try:
        data = utils.load_json(path)
    except utils.InputError as e:
        # load_json names the whole path; the run folder is already named in the report.
        raise utils.InputError(str(e).replace(str(path), name, 1)) from None
    if not isinstance(data, dict):
        raise utils.InputError(f"{name}: expected a JSON object, got {type(data).__name__}")
    missing = [key for key in fields if key not in data]
    if missing:
        raise utils.InputError(f"{name}: missing {', '.join(missing)}")
    for key, types in {**fields, **{k: t for k, t in (optional or {}).items() if k in data}}.items():
        # bool is an int in Python, but true/false is never a valid score or count.
        if isinstance(data[key], bool) or not isinstance(data[key], types):
            expected = " or ".join(t.__name__ for t in types)
            raise utils.InputError(f"{name}: {key} is {data[key]!r}, expected {expected}")
    return data


def load_run(
    run_dir: Path,
    config_fields: dict[str, tuple[type, ...]] = CONFIG_FIELDS,
    optional_config_fields: dict[str, tuple[type, ...]] = OPTIONAL_CONFIG_FIELDS,
    val_fields: dict[str, tuple[type, ...]] = VAL_FIELDS,
    test_fields: dict[str, tuple[type, ...]] = TEST_FIELDS,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """config, val metrics and test metrics of a finished run; InputError says what is wrong."""
    config = read_json_object(run_dir, "config.json", config_fields, optional_config_fields)
    val = read_json_object(run_dir, "val-metrics.json", val_fields)
    test = read_json_object(run_dir, "test-metrics.json", test_fields, {m: NUMBER for m in MICRO_SCORES})
    return config, val, test


def run_row(
    run_dir: Path,
    config: dict[str, Any],
    val: dict[str, Any],
    test: dict[str, Any],
    metrics: tuple[str, ...] = METRICS,
) -> dict[str, Any]:
    """The all.csv row of one run (without the extra hyperparameter columns)."""
    return {
        "model_name": config["model_name"],
        "lr": config["lr"],
        "seed": config["seed"],
        "dataset": config["dataset_dir"],
        "best-val-epoch": val["best-epoch"],
        "best-val-f1": val["f1"],
        **{metric: test[metric] for metric in metrics},
        **{metric: test[metric] for metric in MICRO_SCORES if metric in test},
        "num_params": config["num_params"],
        # The encoder without the head, as the reference's table counts; older runs recorded only the total.
        "num_encoder_params": config.get("num_encoder_params", config["num_params"]),
        "run_dir": str(run_dir),
    }


def world_size_of(config: dict[str, Any]) -> Any:
    """The run's process count: config.json's world_size; runs of an older train.py kept it only
    under environment (and a config with neither ran alone)."""
    if "world_size" in config:
        return config["world_size"]
    environment = config.get("environment")
    return environment.get("world_size", 1) if isinstance(environment, dict) else 1


def dataset_of(config: dict[str, Any]) -> dict[str, Any]:
    """What the run's dataset is: the dataset.json that train.py recorded in config.json ("dataset").

    Runs of an older train.py: the dataset folder's dataset.json, else its label2id.json (the label
    names), as they are now; nothing if the folder is not here (a run copied from elsewhere).
    """
    recorded = config.get("dataset")
    if isinstance(recorded, dict):
        return recorded
    folder = Path(config["dataset_dir"])
    try:
        if (folder / "dataset.json").is_file():
            description = utils.load_json(folder / "dataset.json")
            return description if isinstance(description, dict) else {}
        if (folder / "label2id.json").is_file():
            label2id = utils.load_json(folder / "label2id.json")
            return {"labels": sorted(label2id, key=label2id.__getitem__)} if isinstance(label2id, dict) else {}
    except (utils.InputError, OSError, TypeError):
        pass
    return {}


def task_of(description: dict[str, Any], num_labels: Any) -> str:
    """The task a run solved, as a name: its corpus (dataset.json's source: every fold and seed of one
    corpus), else its label names (older datasets), else its number of labels (older runs elsewhere)."""
    labels = description.get("labels")
    if isinstance(description.get("source"), str) and isinstance(labels, list):
        return f"{description.get('name', '?')} ({len(labels)} labels, {description['source'].removeprefix('sha256:')[:8]})"
    if isinstance(labels, list):
        return f"labels: {', '.join(map(str, labels))}"
    return f"{num_labels} labels"


def split_of(description: dict[str, Any], config: dict[str, Any]) -> str:
    """Which split a run was trained and tested on: dataset.json's split (the default split and fold 0
    are one split), else the dataset folder."""
    split = description.get("split")
    return split if isinstance(split, str) else os.path.normpath(config["dataset_dir"])


def setting_of(config: dict[str, Any], repetitions: bool = True) -> dict[str, Any]:
    """The hyperparameters that define what a run learned: every field outside not_setting_fields
    (which leaves seed and dataset_dir in when `repetitions` is False).

    The process count (world_size) is one: it multiplies the effective batch. A list (e.g.
    text_fields) becomes its JSON text, so that it can be compared and grouped.
    """
    ignored = not_setting_fields(config, repetitions)
    return {
        key: utils.to_json(value) if isinstance(value, (list, dict)) else value
        for key, value in {**OLDER_SETTINGS, **config, "world_size": world_size_of(config)}.items()
        if key not in ignored
    }


def set_aside_copies(runs: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Runs without copies, and (copy, kept run) pairs: of the runs with one setting, seed and split, the newest finished is kept.

    Copies come from a rerun or a run copied back from a cluster; counting each would inflate n and
    shrink the std. "Finished" is when test-metrics.json was written (train.py writes it last).
    """
    finished_at = runs["run_dir"].map(lambda run_dir: (Path(run_dir) / "test-metrics.json").stat().st_mtime_ns)
    ordered = runs.assign(_finished=finished_at).sort_values(["_finished", "run_dir"], ascending=False, kind="stable")
    kept, pairs = [], []
    # dropna=False: a field that some runs lack (older train.py) is a value of its own, as in the settings.
    for _, group in ordered.groupby([*keys, "seed", "_split"], dropna=False, sort=False):
        kept.append(group.index[0])
        pairs += [(copy, group["run_dir"].iloc[0]) for copy in group["run_dir"].iloc[1:]]
    return runs.loc[sorted(kept)], sorted(pairs)


def varying_fields(settings: pd.DataFrame) -> list[str]:
    """Setting fields (beyond model_name) whose values differ between runs, lr first.

    A field that some runs lack counts as differing: the missing value is a value of its own.
    """
    varying = [c for c in settings.columns if c != "model_name" and settings[c].nunique(dropna=False) > 1]
    return sorted(varying, key=lambda field: field != "lr")  # stable: the others keep the config's order


def describe_grouping(varying: list[str], repetition_fields: tuple[str, ...] = REPETITION_FIELDS) -> str:
    """One line telling the user how runs were grouped into settings."""
    return (
        f"settings differ in: {', '.join(varying) or 'nothing'} (beyond model_name); "
        f"runs differing only in {' or '.join(repetition_fields)} (folds of one task) are averaged"
    )


def summarize_settings(runs: pd.DataFrame, keys: list[str], scores: tuple[str, ...] = SCORES) -> pd.DataFrame:
    """One row per setting (`keys`): number of runs, mean val F1, mean (and std, ddof=1) test metrics.

    The std of a single run is NaN (an empty cell in the CSV): one run says nothing about the spread.
    """
    aggregations: dict[str, tuple[str, str]] = {
        "num_params": ("num_params", "first"),
        "num_encoder_params": ("num_encoder_params", "first"),
        "n_runs": ("f1", "size"),
        "best-val-f1": ("best-val-f1", "mean"),
        "loss": ("loss", "mean"),
    }
    for score in scores:
        aggregations[score] = (score, "mean")
        aggregations[f"{score}_std"] = (score, "std")
    # dropna=False: a run lacking a field (older train.py) forms its own setting instead of vanishing.
    return runs.groupby(keys, dropna=False, sort=False).agg(**aggregations).reset_index()


def best_settings(settings: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per model (and task, where runs solved several), the setting with the best mean val F1 (ties: lower lr,
    then the other keys); sorted by task, then test F1."""
    per = ["task", "model_name"] if "task" in keys else ["model_name"]
    tie_breakers = [k for k in keys if k not in per]
    ranked = settings.sort_values(
        [*per, "best-val-f1", *tie_breakers],
        ascending=[*[True] * len(per), False, *[True] * len(tie_breakers)],
        kind="stable",
    )
    best = ranked.drop_duplicates(per, keep="first")
    order = [*per[:-1], "f1", "model_name"]
    return best.sort_values(order, ascending=[*[True] * (len(per) - 1), False, True], kind="stable").reset_index(drop=True)


def is_hub_id(model_name: str, pattern: re.Pattern[str] = HUB_ID) -> bool:
    """Whether `model_name` looks like a Hub id (so it can be linked), not a local folder like ./x or /x.

    A relative folder written without ./ (models/x) looks like a Hub id by its name: it is told
    apart by existing here (aggregate.py runs from the same root as train.py).
    """
    return pattern.fullmatch(model_name) is not None and ".." not in model_name and not Path(model_name).exists()


def format_params(num_params: int) -> str:
    """Parameters in millions, rounded down: whole millions as the reference prints them (559,890,432 is 559 M);
    below 10 M two significant digits (812,345 is 0.81 M), so that small test models do not show as 0 M."""
    if num_params >= 10_000_000 or num_params <= 0:
        return f"{num_params // 1_000_000} M"
    unit = 10 ** (len(str(num_params)) - 2)  # keeps the first two digits
    return f"{num_params // unit * unit / 1e6:g} M"


def format_score(mean: float, std: float, n_runs: int, bold: bool = False) -> str:
    """A score in percent, with ± std when there is more than one run."""
    text = f"{mean * 100:.2f}"
    if bold:
        text = f"**{text}**"
    if n_runs > 1:
        text += f" ± {std * 100:.2f}"
    return text


def markdown_table(best: pd.DataFrame, scores: tuple[str, ...] = SCORES) -> str:
    """The reference's results table (Markdown), one row per model, with its chosen lr as the reference printed it
    (3e-05) and the number of runs; best F1 in bold (per task, with a Task column where runs solved several);
    Micro-F1 after F1 where a run is multi-label (accuracy is then subset accuracy; "-" for single-label models)."""
    tasks = "task" in best.columns
    micro = bool("micro_f1" in best.columns and best["micro_f1"].notna().any())
    if micro:
        scores = (*scores, "micro_f1")
    header = ["Task"] * tasks + ["Model", "Params", "LR", "Accuracy", "Precision", "Recall", "F1", *["Micro-F1"] * micro, "n"]
    align = ["----"] * tasks + ["-----", "-----:", "-:", ":------:", ":-------:", ":----:", ":-:", *[":------:"] * micro, "-:"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    best_f1 = best.groupby("task")["f1"].transform("max") if tasks else pd.Series(best["f1"].max(), index=best.index)
    for (_, row), top in zip(best.iterrows(), best_f1):
        name = row["model_name"]
        model = f"[{name}](https://huggingface.co/{name})" if is_hub_id(name) else name
        cells = [
            "-" if pd.isna(row[s]) else format_score(row[s], row[f"{s}_std"], row["n_runs"], bold=(s == "f1" and row["f1"] == top))
            for s in scores
        ]
        task = f"| {row['task']} " if tasks else ""
        lines.append(f"{task}| {model} | {format_params(row['num_encoder_params'])} | {row['lr']} | {' | '.join(cells)} | {row['n_runs']} |")
    return "\n".join(lines) + "\n"


def best_setting_runs(runs: pd.DataFrame, best: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """model_name and run_dir of every run of each model's best setting, models in best.csv's order.

    Where runs solved several tasks, the model's name carries its task: "model [task]".
    """
    # An inner merge keeps the left side's order; NaN keys (a field some runs lack) match each other.
    members = best[keys].merge(runs[[*keys, "run_dir"]], on=keys, how="inner")
    if "task" in keys:
        members["model_name"] = members["model_name"] + " [" + members["task"] + "]"
    return members[["model_name", "run_dir"]]


def read_run_tables(members: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Val F1 by epoch (log.csv) and test F1 by category (test-per-class.csv) of each run, with its model and run.

    A run whose file is missing or unreadable (e.g. made before the per-class report existed) is
    reported and left out of that figure only.
    """
    logs, reports = [], []
    for model_name, run_dir in members.itertuples(index=False):
        try:
            logs.append(plot.read_log(Path(run_dir), ("epoch", "f1")).assign(model_name=model_name, run_dir=run_dir))
        except utils.InputError as e:
            print(f"left out of curves.png: {e}", file=sys.stderr)
        try:
            report = plot.read_table(Path(run_dir) / "test-per-class.csv", ("f1",), index_col=0)
            reports.append(pd.DataFrame({"category": report.index, "f1": report["f1"].to_numpy(), "model_name": model_name, "run_dir": run_dir}))
        except utils.InputError as e:
            print(f"left out of per-class.csv: {e}", file=sys.stderr)
    empty = pd.DataFrame(columns=["model_name", "run_dir"])
    return (pd.concat(logs, ignore_index=True) if logs else empty), (pd.concat(reports, ignore_index=True) if reports else empty)


def mean_curves(logs: pd.DataFrame) -> pd.DataFrame:
    """Per model and epoch: mean val F1, its std (ddof=1; NaN for one run) and the number of runs."""
    if logs.empty:
        return pd.DataFrame(columns=["model_name", "epoch", "f1", "f1_std", "n_runs"])
    grouped = logs.groupby(["model_name", "epoch"], sort=False)["f1"]
    return grouped.agg(f1="mean", f1_std="std", n_runs="size").reset_index()


def per_class_table(reports: pd.DataFrame) -> pd.DataFrame:
    """A row per model: model_name, n_runs, then the mean test F1 of each category (in the runs' order)."""
    if reports.empty:
        return pd.DataFrame(columns=["model_name", "n_runs"])
    models = list(dict.fromkeys(reports["model_name"]))
    categories = list(dict.fromkeys(reports["category"]))
    means = reports.groupby(["model_name", "category"], sort=False)["f1"].mean().unstack("category")
    table = means.reindex(index=models, columns=categories)
    table.insert(0, "n_runs", reports.groupby("model_name")["run_dir"].nunique().reindex(models))
    return table.rename_axis(index="model_name", columns=None).reset_index()


def write_text(text: str, path: Path) -> None:
    with utils.atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def main(args: Args) -> None:
    if not args.input_dir.is_dir():
        raise utils.InputError(f"{args.input_dir} is not a folder; run src/train.py first (it writes runs there)")

    # Read every finished run; report broken ones and go on.
    rows, settings, splits, unfinished, broken = [], [], [], 0, 0
    for run_dir in find_run_dirs(args.input_dir):
        if not utils.is_finished(run_dir):
            unfinished += 1
            continue
        try:
            config, val, test = load_run(run_dir)
        except utils.InputError as e:
            print(f"skipped {run_dir}: {e}", file=sys.stderr)
            broken += 1
            continue
        description = dataset_of(config)
        rows.append(run_row(run_dir, config, val, test))
        settings.append({**setting_of(config), "task": task_of(description, config.get("num_labels"))})
        splits.append(split_of(description, config))
    print(
        f"read {len(rows)} finished runs under {args.input_dir}; "
        f"skipped {unfinished} unfinished, {broken} unreadable"
    )
    if not rows:
        raise utils.InputError(f"no finished run under {args.input_dir}; run src/train.py first")

    # Group runs into settings: repetitions (seed, dataset_dir) of the same hyperparameters.
    # object dtype keeps each value as written (16 stays 16 even where another run lacks the field).
    setting_table = pd.DataFrame(settings, dtype=object)
    varying = varying_fields(setting_table)
    extra = [f for f in varying if f != "lr"]
    print(describe_grouping(varying))
    runs = pd.DataFrame(rows)
    for position, field in enumerate(extra, start=runs.columns.get_loc("lr") + 1):
        runs.insert(position, field, setting_table[field])
    keys = ["model_name", "lr", *extra]

    # Copies of one run (a rerun, a folder copied back from a cluster) count once.
    runs, copies = set_aside_copies(runs.assign(_split=splits), keys)
    for copy, kept in copies:
        print(f"set aside {copy}: a copy of {kept} (same setting, seed and split; that one finished later)")
    runs = runs.drop(columns="_split").sort_values([*keys, "dataset", "seed", "run_dir"], kind="stable").reset_index(drop=True)

    scores = SCORES + tuple(m for m in MICRO_SCORES if m in runs.columns)
    best = best_settings(summarize_settings(runs, keys, scores), keys)
    table = markdown_table(best)

    # Figures of results/, from the files of the best settings' runs.
    logs, reports = read_run_tables(best_setting_runs(runs, best, keys))
    curves, per_class = mean_curves(logs), per_class_table(reports)
    named = best.assign(model_name=best["model_name"] + " [" + best["task"] + "]") if "task" in keys else best
    figures = {"best.png": plot.best_figure(named)}
    if not curves.empty:
        figures["curves.png"] = plot.model_curves_figure(curves)
    if not per_class.empty:
        figures["per-class.png"] = plot.per_class_figure(per_class)

    # Everything is computed: now write, each file atomically.
    write_text(runs.to_csv(index=False), args.output_dir / "all.csv")
    write_text(best.to_csv(index=False), args.output_dir / "best.csv")
    write_text(table, args.output_dir / "best.md")
    written = ["all.csv", "best.csv", "best.md"]
    if not per_class.empty:
        write_text(per_class.to_csv(index=False), args.output_dir / "per-class.csv")
        written.append("per-class.csv")
    for name, figure in figures.items():
        plot.save_png(figure, args.output_dir / name)
    written.extend(figures)
    print()
    print(table)
    if "curves.png" not in figures:
        print("no readable log.csv in the best settings' runs: curves.png not written")
    if "per-class.png" not in figures:
        print("no readable test-per-class.csv in the best settings' runs: per-class.csv and per-class.png not written")
    print(f"wrote {', '.join(written)} in {args.output_dir}")


if __name__ == "__main__":
    utils.run_cli(main, Args().parse_args())
