"""train.py's command line, stopped by a signal that it sends itself just before it writes the checkpoint of an epoch.

    python tests/interrupt_train.py SIGNAL EPOCH [train.py options]      # e.g. SIGKILL 3 --epochs 10 ...
    python -m torch.distributed.run --nproc_per_node 2 tests/interrupt_train.py SIGKILL 3 ...

The checkpoint of epoch EPOCH - 1 is then on disk, and log.csv already has the row of epoch EPOCH (which a
resumed run must drop). A signal sent at a chosen point, not after a guessed delay: the tests do not depend
on the machine's speed. Under torchrun only rank 0 writes checkpoints, so only rank 0 signals itself.
SIGKILL stands for the out-of-memory killer or a lost node, SIGINT for Ctrl-C, SIGTERM for Slurm preemption.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import runs  # noqa: E402
import train  # noqa: E402
import train_options  # noqa: E402
import utils  # noqa: E402


def main(argv: list[str]) -> None:
    signum, epoch = signal.Signals[argv[0]], int(argv[1])
    save_checkpoint = runs.save_checkpoint

    def signal_before_epoch(run_dir: Path, checkpoint: dict[str, Any]) -> None:
        if checkpoint["epoch"] == epoch:
            os.kill(os.getpid(), signum)  # SIGINT/SIGTERM: the handler raises at the next line, before the write
        save_checkpoint(run_dir, checkpoint)

    runs.save_checkpoint = signal_before_epoch
    utils.run_cli(train.main, train_options.Args().parse_args(argv[2:]), catch_sigterm=True)  # as train.py's __main__


if __name__ == "__main__":
    main(sys.argv[1:])
