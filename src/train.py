"""Stage 3: fine-tune a pretrained encoder on a prepared dataset and write one run folder.

    poetry run python src/train.py [--model_name cl-tohoku/bert-base-japanese-v3] [--lr 3e-5] ...
    torchrun --nproc_per_node 2 src/train.py ...      # several GPUs (or CPU processes) with DDP

The run folder OUTPUT_ROOT/<model>/<YYYY-MM-DD>/<HH-MM-SS.ffffff>/ receives, in this order:
config.json (at the start), log.csv (a row per evaluation), val-metrics.json, test-predictions.jsonl,
test-per-class.csv, test-confusion-matrix.csv, the figures curves.png and test-confusion-matrix.png,
model/ (with --save_model), and test-metrics.json last: its presence means the run finished. A dataset
whose labels are lists of ids trains as multi-label (evaluation.py); its run has test-label-counts.csv
and test-label-counts.png (TP/FP/FN/TN per label) in place of the confusion matrix.

This file is the experiment: main(), which reads top to bottom, and its training step. Its options
(Args, each with its help) are in train_options.py, which sweep.py reads too; the parts it shares
with predict.py and sweep.py live in data.py, modeling.py, evaluation.py, runs.py and distributed.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from more_itertools import chunked
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm, trange

import runs
import tokenization
import utils
from data import SPLITS, collate, load_description, load_label2id, load_split, problem_type, shard_by_length
from distributed import gather_on_every_rank, init_distributed, leaves_process_group, on_rank_0
from evaluation import Objective, early_stop, evaluate, make_objective
from lora import LoraSettings, apply_lora, base_dtype, trainable_share
from modeling import (
    check_max_seq_len, count_encoder_params, enable_gradient_checkpointing, freeze_unreachable, load_model, param_groups, resolve_device,
    resolve_dtype, save_model,
)
from runs import make_run_dir, record_in_config, run_config, save_log, write_test_outputs
from train_options import RUNTIME_OPTIONS, Args, resumed_args
from utils import InputError, log


def train_py_command(processes: int) -> str:
    """How a user starts train.py with this many processes (the hint of the resume messages)."""
    return "python src/train.py" if processes == 1 else f"torchrun --nproc_per_node {processes} src/train.py"


@contextmanager
def says_how_to_resume(run_dir: Path, world_size: int) -> Iterator[None]:
    """A stop signal (utils.Interrupted: Ctrl-C, SIGTERM) ends in one line that says how to continue the run."""
    try:
        yield
    except utils.Interrupted as stop:
        if (run_dir / runs.CHECKPOINT).is_file():
            stop.note = f"{run_dir} resumes from its last complete epoch with: {train_py_command(world_size)} --resume {run_dir}"
        else:
            stop.note = f"{run_dir} has no checkpoint (interrupted in its first epoch, or --checkpoint off): start it again"
        raise


# --- a training step --------------------------------------------------------------------------


def window_counts(window: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """Examples and real (non-padding) tokens in the micro-batches of one optimizer step."""
    return sum(len(b["labels"]) for b in window), sum(int(b["attention_mask"].sum()) for b in window)


def accumulate_gradients(
    train_model: torch.nn.Module, window: list[dict[str, torch.Tensor]], window_size: int, device: torch.device,
    autocast: Any, scaler: torch.amp.GradScaler, world_size: int, objective: Objective = Objective(),
) -> torch.Tensor:
    """Forward and backward over the micro-batches of one optimizer step; return their summed loss.

    Each loss is divided by the example count of the whole window (`window_size`, over all its
    micro-batches), so every example weighs the same whatever the micro-batch sizes: the gradient
    equals that of one batch of the window. The per-example loss is the objective's (default:
    single-label cross-entropy).
    """
    total = torch.zeros((), device=device)
    for i, batch in enumerate(window):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}  # all at once, before the forward
        labels = batch.pop("labels")
        del batch["index"]
        # Under DDP, gradients are all-reduced once per step: on the last micro-batch only.
        sync = world_size == 1 or i == len(window) - 1
        with nullcontext() if sync else train_model.no_sync():
            with autocast():  # the forward pass only; the loss is computed in fp32
                logits = train_model(**batch).logits
            loss = objective.loss(logits.float(), labels).sum()
            scaler.scale(loss / window_size).backward()
        total += loss.detach()
    return total


def step_stats(window_loss: torch.Tensor, examples: int, tokens: int, world_size: int) -> torch.Tensor:
    """[loss, examples, tokens] of one step, summed over the processes, left on the device (read_step reads it later)."""
    counts = torch.tensor([examples, tokens], dtype=torch.float32).to(window_loss.device, non_blocking=True)  # staged: no sync
    stats = torch.cat([window_loss.view(1), counts])
    if world_size > 1:
        dist.all_reduce(stats)
    return stats


def read_step(stats: torch.Tensor, totals: tuple[float, int, int], epoch: int, dtype: torch.dtype) -> tuple[float, int, int]:
    """The epoch's running loss, examples and tokens with one more step; a non-finite loss ends the run (on every rank alike)."""
    step_loss, step_examples, step_tokens = stats.tolist()  # waits for that step's backward only: the next step is queued already
    if not math.isfinite(step_loss):
        raise TrainingError(f"the loss became {step_loss} in epoch {epoch}: {divergence_hint(dtype)}")
    loss_sum, seen, tokens = totals
    return loss_sum + step_loss, seen + int(step_examples), tokens + int(step_tokens)


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler, max_grad_norm: float,
) -> None:
    """Clip the (unscaled) gradients, step (skipped by the fp16 scaler on inf/NaN), clear, advance the schedule."""
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the peak lr, then linear decay to 0 at total_steps: transformers'
    get_linear_schedule_with_warmup, step for step, without importing transformers.optimization (which
    imports trainer_utils and peft: seconds of start-up for one formula)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of what training changes (runs.trained_state), so the best epoch costs no accelerator memory."""
    return {key: value.detach().to("cpu", copy=True) for key, value in runs.trained_state(model).items()}


class TrainingError(InputError):
    """Training cannot go on (the loss diverged): reported in one line, like bad input."""


def divergence_hint(dtype: torch.dtype) -> str:
    """What to try when the loss diverges: a lower lr always; another precision only where one applies."""
    other = {torch.float16: " or use --dtype bf16 (or fp32: fp16 overflows easily)", torch.bfloat16: " or use --dtype fp32"}
    return f"lower --lr (or clip with --max_grad_norm 1.0){other.get(dtype, '')}"


# --- the experiment ---------------------------------------------------------------------------


@leaves_process_group
def main(args: Args) -> Path:
    """Fine-tune, evaluate, write the run folder; return its path. With --resume, continue that run's folder."""
    if args.resume is not None:
        args = resumed_args(args, runs.resumable_config(args.resume))
    transformers.utils.logging.disable_progress_bar()
    # As the reference's utils.init: fp32 matrix products may use TF32 on GPUs that have it (Ampere and later).
    torch.set_float32_matmul_precision("high")
    device = resolve_device(args.device)
    rank, world_size = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_dtype(args.dtype, device)
    utils.set_seed(args.seed)
    # The state at the end of the run's last complete epoch, read before any model is loaded (a bad file fails first).
    checkpoint = runs.load_checkpoint(args.resume) if args.resume is not None else None
    if checkpoint is not None and len(checkpoint["rng"]) != world_size:  # a generator state per process of the run
        processes = len(checkpoint["rng"])
        raise InputError(
            f"--resume {args.resume}: the run had {processes} process(es), this is {world_size}; resume it with {train_py_command(processes)}"
        )

    # Data first: a wrong path or a bad row fails before any model is downloaded.
    label2id = load_label2id(args.dataset_dir)
    id2label = {i: label for label, i in label2id.items()}
    rows = {split: load_split(args.dataset_dir, split, args.text_fields, len(label2id)) for split in SPLITS}
    dataset = load_description(args.dataset_dir, label2id)
    # The task type, decided once from the labels: it fixes the loss, the decision and the metrics (evaluation.Objective).
    objective = make_objective(problem_type(args.dataset_dir, rows), len(label2id), args.threshold, args.class_weights, [r["label"] for r in rows["train"]])

    lora_settings = LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout, tuple(args.lora_target_modules))
    weights_dtype = base_dtype(lora_settings, args.load_in_4bit, device, dtype)
    tokenizer, model = load_model(args.model_name, label2id, args.reinit_head, weights_dtype, args.load_in_4bit)
    objective.record_in(model.config)  # a saved model, and predict.py, know the task type and threshold
    positions = check_max_seq_len(args.max_seq_len, model, tokenizer, args.model_name)
    num_params = sum(p.numel() for p in model.parameters())
    num_encoder_params = count_encoder_params(model)  # without the head, as the reference's table counts
    if lora_settings.r:
        model, lora_summary = apply_lora(model, lora_settings)
        log(lora_summary)
    num_trainable_params, _, trainable_line = trainable_share(model)

    # The settings are on disk before any training: a crashed run still says what it was.
    def start_run_folder() -> Path:
        run_dir = make_run_dir(args.output_root, args.model_name)
        config = run_config(
            args, RUNTIME_OPTIONS, num_params, num_encoder_params, len(label2id), run_dir, device, dtype, world_size, dataset,
            objective.problem_type, num_trainable_params
        )
        utils.save_json(config, run_dir / "config.json")
        return run_dir

    run_dir = args.resume if checkpoint is not None else on_rank_0(start_run_folder, rank, world_size)
    log(f"{utils.RUN_FOLDER_LINE}{run_dir}")
    log(f"model: {args.model_name} ({num_params:,} parameters) on {device} ({world_size} process(es)), {str(dtype).removeprefix('torch.')}")
    log(trainable_line)
    log(positions)
    log(objective.describe())
    # From here on, Ctrl-C or SIGTERM ends the run in one line that says whether and how to resume it.
    with says_how_to_resume(run_dir, world_size):
        # Tokenise each split once, or read it from the cache that runs and ranks share; batches are then only padded.
        layout = tokenization.InputLayout.of(args)
        examples, truncation_report = tokenization.tokenize_splits(
            rows, {split: args.dataset_dir / f"{split}.jsonl" for split in SPLITS}, tokenizer, layout=layout,
            token_type_ids=tokenization.wants_token_type_ids(model.config, args.text_fields),
            slow=args.slow_tokenizer, num_workers=args.num_workers, log=log,
            cache_dir=args.tokenized_cache_dir if args.tokenized_cache == "on" else None,
        )
        on_rank_0(lambda: record_in_config(run_dir, truncation_report=truncation_report), rank, world_size)

        pad = partial(collate, pad_token_id=tokenizer.pad_token_id, num_labels=len(label2id))
        # The training order depends on the seed and the epoch alone (set_epoch), so a resumed run sees the same batches.
        sampler = DistributedSampler(examples["train"], num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
        pin = device.type == "cuda"  # pinned host memory lets the copy to the GPU overlap with compute
        train_loader = DataLoader(examples["train"], batch_size=args.batch_size, sampler=sampler, collate_fn=pad, pin_memory=pin)
        eval_loaders = {
            split: DataLoader(shard_by_length(examples[split], rank, world_size), batch_size=args.eval_batch_size, collate_fn=pad)
            for split in ("val", "test")
        }

        model.to(device)
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        autocast = partial(torch.autocast, device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
        unreachable = freeze_unreachable(model, pad(examples["train"][:2]), device, autocast)
        if unreachable:
            log(f"frozen {len(unreachable)} parameter tensors that this input never reaches (no gradient in a probe step): {', '.join(unreachable)}")
        # `model` keeps clean state-dict keys (no _orig_mod. or module. prefixes) for the best weights and the checkpoint.
        compiled: torch.nn.Module = torch.compile(model, dynamic=True) if args.compile else model
        train_model = compiled
        if world_size > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None)

        groups, decay_summary = param_groups(model, args.weight_decay)
        log(decay_summary)
        optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")  # fused: one kernel per step on a GPU
        steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
        scheduler = linear_schedule(optimizer, steps_per_epoch * args.num_warmup_epochs, steps_per_epoch * args.epochs)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # loss scaling only for fp16
        log(
            f"effective batch {args.batch_size} x {args.gradient_accumulation_steps} accumulation x {world_size} process(es) = "
            f"{args.batch_size * args.gradient_accumulation_steps * world_size}; {steps_per_epoch} optimizer steps per epoch"
        )
        if args.num_warmup_epochs > args.epochs:
            log(
                f"note: the warm-up ({args.num_warmup_epochs} epochs) is longer than the training ({args.epochs}): "
                f"the learning rate rises all along and never reaches its peak --lr {args.lr}"
            )

        def evaluate_split(split: str) -> tuple[dict[str, float], list[dict]]:
            return evaluate(compiled, eval_loaders[split], device, autocast, world_size, objective)

        log_rows: list[dict[str, Any]] = []

        def log_evaluation(epoch: int, train_loss: float, metrics: dict[str, float], seconds: float, throughput: dict[str, float]) -> None:
            log_rows.append({"epoch": epoch, "train_loss": train_loss, **metrics, "lr": scheduler.get_last_lr()[0], "seconds": seconds, **throughput})
            on_rank_0(lambda: save_log(run_dir, log_rows), rank, world_size)
            log(
                f"epoch {epoch:>3}  train_loss {train_loss:.4f}  val: loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.4f}  "
                f"f1 {metrics['f1']:.4f}"
                + (f"  ({throughput['examples_per_s']:.1f} examples/s, {throughput['tokens_per_s']:,.0f} tokens/s)" if throughput["examples_per_s"] else "")
            )

        def save_checkpoint(epoch: int) -> None:
            """Everything the next epoch depends on, so that a resumed run continues exactly as this one would."""
            rng = gather_on_every_rank(runs.rng_state(device), world_size)  # each process's own generators
            state = runs.checkpoint_state(epoch, model, optimizer, scheduler, scaler, best_epoch, best_f1, best_state, log_rows, rng)
            on_rank_0(lambda: runs.save_checkpoint(run_dir, state), rank, world_size)

        if checkpoint is None:
            # Epoch 0 is the model before training: a fine-tuned epoch must beat it to be kept.
            start = time.perf_counter()
            val_metrics, _ = evaluate_split("val")
            log_evaluation(0, float("nan"), val_metrics, time.perf_counter() - start, {"examples_per_s": 0.0, "tokens_per_s": 0.0})
            best_epoch, best_f1 = 0, val_metrics["f1"]
            best_state = clone_state(model)
            first_epoch = 1
        else:
            runs.load_trained_state(model, checkpoint["model"], run_dir)
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            scaler.load_state_dict(checkpoint["scaler"])
            best_epoch, best_f1 = checkpoint["best_epoch"], checkpoint["best_f1"]
            best_state = {key: value.clone() for key, value in checkpoint["best_model"].items()}  # in memory, not in the mapped file
            log_rows.extend(checkpoint["log"])
            on_rank_0(lambda: save_log(run_dir, log_rows), rank, world_size)  # rows after the checkpoint are dropped
            runs.restore_rng_state(checkpoint["rng"][rank], device)  # last: nothing above may draw from them
            first_epoch = checkpoint["epoch"] + 1
            log(f"resumed {run_dir} from epoch {checkpoint['epoch']} of {args.epochs} (best so far: epoch {best_epoch}, val f1 {best_f1:.4f})")
            del checkpoint

        # Progress bars as context managers: closed on an error too, so that the error line starts clean.
        with trange(first_epoch, args.epochs + 1, desc="epochs", disable=not utils.show_progress()) as epoch_bar:
            for epoch in epoch_bar:
                train_model.train()
                sampler.set_epoch(epoch)
                start = time.perf_counter()
                loss_sum, seen, tokens = 0.0, 0, 0
                # Each step's loss is read once the next step is queued: reading it at once would stall the GPU every step.
                pending: torch.Tensor | None = None
                with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", leave=False, disable=not utils.show_progress()) as progress:
                    for window in chunked(train_loader, args.gradient_accumulation_steps):
                        step_examples, step_tokens = window_counts(window)  # counted on the CPU: no device sync
                        window_loss = accumulate_gradients(train_model, window, step_examples, device, autocast, scaler, world_size, objective=objective)
                        stats = step_stats(window_loss, step_examples, step_tokens, world_size)
                        optimizer_step(model, optimizer, scheduler, scaler, args.max_grad_norm)
                        if pending is not None:
                            loss_sum, seen, tokens = read_step(pending, (loss_sum, seen, tokens), epoch, dtype)
                            progress.update()
                            progress.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                        pending = stats
                    if pending is not None:
                        loss_sum, seen, tokens = read_step(pending, (loss_sum, seen, tokens), epoch, dtype)
                        progress.update()
                train_seconds = time.perf_counter() - start
                throughput = {"examples_per_s": seen / train_seconds, "tokens_per_s": tokens / train_seconds}

                val_metrics, _ = evaluate_split("val")
                log_evaluation(epoch, loss_sum / seen, val_metrics, time.perf_counter() - start, throughput)
                if val_metrics["f1"] > best_f1:
                    best_epoch, best_f1 = epoch, val_metrics["f1"]
                    best_state = clone_state(model)
                if early_stop(epoch, best_epoch, args.early_stopping_patience):  # the same on every rank: all see the same metrics
                    log(
                        f"early stopping after epoch {epoch} of {args.epochs}: val macro-F1 has not improved for "
                        f"{args.early_stopping_patience} evaluation(s) since epoch {best_epoch} (log.csv ends at epoch {epoch})"
                    )
                    break  # before its checkpoint: a run resumed after this point trains this epoch again and stops here again
                if args.checkpoint != "off":
                    save_checkpoint(epoch)

        # The weights of the best epoch (kept on the CPU) give the reported val and test scores.
        model.load_state_dict(best_state, strict=False)
        val_metrics, _ = evaluate_split("val")
        test_metrics, test_predictions = evaluate_split("test")

        def write_results() -> None:
            utils.save_json({"best-epoch": best_epoch, **val_metrics}, run_dir / "val-metrics.json")
            write_test_outputs(run_dir, test_predictions, rows["test"], id2label, objective)
            try:  # figures are drawn from the files just written; a failure must not lose the run's metrics
                import plot  # here, not at the top: matplotlib costs about a second of start-up, and only this step draws

                plot.draw_run(run_dir)
            except Exception as e:  # noqa: BLE001 (any plotting error, e.g. a broken font cache)
                log(f"warning: figures not drawn ({type(e).__name__}: {utils.first_line(e)}); redraw them with python src/plot.py --run_dirs {run_dir}")
            if args.save_model:
                save_model(model, tokenizer, run_dir / "model", layout, args.merge_lora)
            utils.save_json(test_metrics, run_dir / "test-metrics.json")  # last: the run is finished
            if args.checkpoint != "keep":
                runs.remove_checkpoint(run_dir)

        log(f"best epoch {best_epoch}: val f1 {val_metrics['f1']:.4f}, test f1 {test_metrics['f1']:.4f}, test accuracy {test_metrics['accuracy']:.4f}")
        on_rank_0(write_results, rank, world_size)
    log(f"wrote {run_dir}")
    return run_dir  # @leaves_process_group leaves the process group


if __name__ == "__main__":
    utils.run_cli(main, Args().parse_args(), catch_sigterm=True)
