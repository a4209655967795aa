#!/usr/bin/env bash
# Creates ./.venv (or reuses it) and installs megaloop with its test and HF extras.
#
# CPU machines (the default here): torch is pinned to the local CPU wheel torch==2.13.0, installed
# before megaloop so nothing pulls a multi-GB CUDA build.
# GPU clusters: create the environment with the torch build that matches your CUDA first, then run
# this script with MEGALOOP_TORCH=keep (it leaves torch alone), or simply `pip install -e .[test,hf,eval,data,track]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip() hides one harmless warning this machine's pip configuration prints for every package.
pip() { .venv/bin/pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if [ "${MEGALOOP_TORCH:-cpu}" = "cpu" ]; then
  .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
    || pip install -q "torch==2.13.0"
fi
.venv/bin/python -c "import megaloop, deepspeed, transformers, pytest, pytest_timeout, sentencepiece, matplotlib, \
tokenizers, xxhash, pyarrow, zstandard, datasets, tiktoken, wandb, mlflow, lm_eval, accelerate" \
  2>/dev/null || pip install -q -e ".[test,hf,eval,data,track]"
.venv/bin/python -c "import torch, deepspeed; print(f'environment ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 | grep -v WARNING
