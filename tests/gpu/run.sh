#!/usr/bin/env bash
# Every GPU path of the project in one go, on tiny models built on the spot, then bert-base's throughput; one table.
#
#   bash tests/gpu/run.sh
#
# On a bare GPU machine it needs only the repository and a python3 with torch, transformers, tokenizers,
# scikit-learn, pandas, matplotlib and tqdm (the GPU image's). Pure-Python packages that such an image lacks
# (typed-argument-parser, docstring-parser, more-itertools, submitit, matplotlib-fontja) are installed from .whl/ into /tmp/site
# when they cannot be imported: fetch them first, where pip reaches a registry, with tests/gpu/fetch-wheels.sh.
# Without CUDA every check is reported skipped, with the reason, and the exit code is 0 (as in CI).
# Exit code 1 if any check failed. tests/gpu/checks.py says what each check asserts and which variables it reads
# (OUT: where the log and the table go; GPU_CHECKS_BUDGET_S: the time budget, default 450 s).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error

imports="import tap, more_itertools, submitit, matplotlib_fontja"
if ! "$PYTHON" -c "$imports" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing the wheels of .whl/ into /tmp/site: $(cd .whl && echo *.whl)"
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "warning: the wheels did not install; the checks that need them will fail" >&2
  fi
fi
"$PYTHON" -c "$imports" 2>/dev/null || echo "warning: $PYTHON cannot import typed-argument-parser, more-itertools, submitit or matplotlib-fontja (run tests/gpu/fetch-wheels.sh where a registry is reachable, and bring .whl/)" >&2

exec "$PYTHON" tests/gpu/checks.py
