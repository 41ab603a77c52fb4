"""train.py's command line (train_options.py): its refusals, and its split into settings and runtime options."""

from __future__ import annotations

import pytest

import train_options


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--threshold", "1"], "--threshold must lie between 0 and 1"),
        (["--early_stopping_patience", "-1"], "cannot be negative"),
        (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
        (["--merge_lora"], "--merge_lora only apply with --lora_r (LoRA)"),
        (["--lora_target_modules", "q_proj"], "--lora_target_modules only apply with --lora_r (LoRA)"),
        (["--text_fields", "a", "b", "c"], "--text_fields takes one field (a single text) or two (a pair)"),
        (["--head_tokens", "5"], "--head_tokens applies to truncation head_tail only (truncation is head)"),
        (["--truncation", "head_tail", "--max_seq_len", "64", "--head_tokens", "64"], "--head_tokens must be at least 0 and below max_seq_len 64, got 64"),
    ],
)
def test_bad_options_are_refused_with_the_reason(flags: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        train_options.Args().parse_args(flags)
    assert message in capsys.readouterr().err


def test_runtime_options_say_how_a_run_executes_not_what_it_learns() -> None:
    """The split that config.json records, aggregate.py groups by and sweep.py forwards on resume."""
    assert {"device", "output_root", "resume", "num_workers"} <= set(train_options.RUNTIME_OPTIONS)
    assert not {"lr", "seed", "batch_size", "model_name"} & set(train_options.RUNTIME_OPTIONS)
