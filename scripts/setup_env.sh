#!/usr/bin/env bash
# Create .venv (once) and install hf-weightprune into it with the given extras.
# torch: reuse one that is already importable (system site-packages), else pin the CPU wheel that
# this kind of machine has on disk (an unpinned `torch` could pull a multi-GB CUDA build).
# Usage: source scripts/setup_env.sh [extras]   (e.g. "dev" or "peft,plot")
set -euo pipefail
EXTRAS="${1:-dev}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] reusing the importable torch $("$PY" -c 'import torch; print(torch.__version__)')"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
# pip's exit status is kept (no filtering pipe): a failed install stops the script.
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==${TORCH_VERSION:-2.13.0}"
  "$VPY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
echo "[setup] installing hf-weightprune[$EXTRAS]"
"$VPY" -m pip install -q -e "$ROOT[$EXTRAS]"
"$VPY" -c "import torch, transformers, hf_weightprune; print('[setup] torch', torch.__version__, '| transformers', transformers.__version__, '| hf_weightprune', hf_weightprune.__version__)"
