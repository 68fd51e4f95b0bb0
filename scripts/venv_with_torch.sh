#!/usr/bin/env bash
# Create the venv VENV (once) with an importable torch, for setup_env.sh and test_floor.sh alike: reuse a torch the
# system already has (system site-packages), else pin the CPU wheel this kind of machine has on disk (an unpinned
# `torch` could pull a multi-GB CUDA build). pip's exit status is kept: a failed install stops the script.
# Usage: bash scripts/venv_with_torch.sh VENV [LOG_TAG]
set -euo pipefail
VENV="$1"
TAG="${2:-setup}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "[$TAG] reusing the importable torch $("$PY" -c 'import torch; print(torch.__version__)')"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[$TAG] installing torch==${TORCH_VERSION:-2.13.0}"
  "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
