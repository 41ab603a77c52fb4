"""Under torchrun: train.main for several models in one launch, for tests/test_families.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun_families.py \\
        OUTPUT_ROOT NAME=MODEL_DIR [NAME=MODEL_DIR ...] -- [train.py options]

Each model's run goes to OUTPUT_ROOT/NAME/. One launch instead of one per model: starting the
processes (importing torch and transformers in each) costs far more than training a tiny model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch.distributed as dist  # noqa: E402

import train  # noqa: E402
import train_options  # noqa: E402


def main(argv: list[str]) -> None:
    split = argv.index("--")
    output_root, *models = argv[:split]
    end_group = dist.destroy_process_group
    # train.main ends the process group it joined; the runs of this launch share one group instead.
    dist.destroy_process_group = lambda *args, **kwargs: None
    for name, model_dir in (model.split("=", 1) for model in models):
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"=== {name}", flush=True)
        train.main(train_options.Args().parse_args(["--model_name", model_dir, "--output_root", str(Path(output_root, name)), *argv[split + 1 :]]))
    end_group()


if __name__ == "__main__":
    main(sys.argv[1:])
