#!/usr/bin/env bash
# Create .venv (once) and install hf-weightprune into it with the given extras.
# torch: reuse one that is already importable (system site-packages), else pin the CPU wheel that
# this kind of machine has on disk (an unpinned `torch` could pull a multi-GB CUDA build).
# Usage: source scripts/setup_env.sh [extras]   (e.g. "dev" or "peft,plot")
set -euo pipefail
EXTRAS="${1:-dev}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
bash "$ROOT/scripts/venv_with_torch.sh" "$VENV" setup
VPY="$VENV/bin/python"
echo "[setup] installing hf-weightprune[$EXTRAS]"
"$VPY" -m pip install -q -e "$ROOT[$EXTRAS]"
"$VPY" -c "import torch, transformers, hf_weightprune; print('[setup] torch', torch.__version__, '| transformers', transformers.__version__, '| hf_weightprune', hf_weightprune.__version__)"
