#!/usr/bin/env bash
# CI step 2: the test suite (without `multiproc` tests) at the lowest dependency versions pyproject.toml declares.
# Creates .venv-floor (ignored by git) with exactly the pins `scripts/floor_pins.py` derives from pyproject.toml,
# installs hf-weightprune into it with --no-deps, and runs `pytest -m "not multiproc"`.
# torch is not taken down to its floor: it reuses an importable torch, else pins the CPU wheel this kind of
# machine has on disk (as scripts/setup_env.sh does; an unpinned `torch` could pull a multi-GB CUDA build).
# The venv is rebuilt from scratch whenever the pins change, so nothing newer is left over from an earlier run.
# Usage: bash scripts/test_floor.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="${FLOOR_VENV:-$ROOT/.venv-floor}"
cd "$ROOT"
start=$(date +%s)
# tomllib needs Python >= 3.11; the base interpreter or the main .venv can read the pins.
PINS="$("$PY" scripts/floor_pins.py 2>/dev/null || "$ROOT/.venv/bin/python" scripts/floor_pins.py)"
WANT="$(printf '%s\ntorch==%s\n' "$PINS" "${TORCH_VERSION:-2.13.0}")"
if [ -f "$VENV/floor-pins.txt" ] && [ "$(cat "$VENV/floor-pins.txt")" != "$WANT" ]; then
  echo "[floor] pins changed: rebuilding $VENV"
  rm -rf "$VENV"
fi
bash "$ROOT/scripts/venv_with_torch.sh" "$VENV" floor
VPY="$VENV/bin/python"
echo "[floor] installing the floor pins:" $PINS
# shellcheck disable=SC2086
"$VPY" -m pip install -q $PINS
"$VPY" -m pip install -q --no-deps -e "$ROOT"
# Fail if anything moved a pin (pip resolves each install on its own).
"$VPY" - "$PINS" <<'EOF'
import sys
from importlib.metadata import version

from packaging.version import Version

wrong = [f"{line} (installed {version(name)})" for line in sys.argv[1].split()
         for name, want in [line.split("==")] if Version(version(name)) != Version(want)]
if wrong:
    sys.exit("[floor] not at the floor: " + ", ".join(wrong))
EOF
printf '%s\n' "$WANT" > "$VENV/floor-pins.txt"
"$VPY" -c "import torch, transformers, accelerate, peft, datasets, huggingface_hub, safetensors, hf_weightprune; print('[floor] torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__, '| huggingface_hub', huggingface_hub.__version__, '| safetensors', safetensors.__version__)"
installed=$(date +%s)
echo "[floor] environment ready in $((installed - start)) s"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
status=0
"$VPY" -m pytest -q -m "not multiproc" "$@" || status=$?
echo "[floor] tests took $(($(date +%s) - installed)) s (exit $status)"
exit $status
