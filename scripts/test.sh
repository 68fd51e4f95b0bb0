#!/usr/bin/env bash
# Quickstart command 2: set up .venv and run the whole test suite (what CI runs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh" dev
cd "$ROOT"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
"$ROOT/.venv/bin/ruff" check .
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
