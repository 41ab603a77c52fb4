#!/usr/bin/env bash
# Download the pure-Python packages that the GPU image lacks into .whl/ (git-ignored), for tests/gpu/run.sh.
#
#   bash tests/gpu/fetch-wheels.sh        # where pip reaches a package registry
#
# One version of each (two would stop the install there), for CPython 3.12 on x86-64 Linux (the GPU image's),
# with --no-deps: every dependency the image does not have is named here too. The image has torch, transformers,
# tokenizers, sentencepiece, protobuf, numpy, pandas, scikit-learn, matplotlib, tqdm, cloudpickle, typing-extensions,
# packaging and peft; not fugashi/unidic-lite (250 MB installed: the checks use tokenizers without MeCab).
# The versions are those of poetry.lock.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
packages=(
  typed-argument-parser==1.12.0  # Tap: every script's arguments
  docstring-parser==0.18.0       # needed by typed-argument-parser
  more-itertools==11.2.1         # prepare.py's split, train.py's accumulation windows
  submitit==1.5.4                # imported by sweep.py (Slurm); its needs, cloudpickle and typing-extensions, are in the image
  matplotlib-fontja==1.1.0       # the Japanese font of the figures (plot.py); its need, matplotlib, is in the image
)
rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${packages[@]}"
ls -l .whl
echo "total: $(du -ch .whl/*.whl | tail -1 | cut -f1) in $(ls .whl/*.whl | wc -l) wheels"
