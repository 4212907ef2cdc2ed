#!/usr/bin/env bash
# Build .venv at the repository root with the whole pinned stack. Idempotent: a finished
# set-up is recorded in .venv/.agvm-setup-<hash of this file> and re-running is a no-op.
# Pitfalls handled here (see README "Set-up notes"):
#   - every pip command that can resolve torch pins torch, or pip pulls CUDA torch (GBs);
#   - mmcv 2.1.0 is source-only: built without build isolation, with setuptools < 80, after torch;
#   - mmseg imports ftfy and regex without declaring them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP="$VENV/.agvm-setup-$(sha1sum scripts/setup.sh requirements.txt | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then echo "[setup] .venv is up to date ($STAMP)"; exit 0; fi

TORCH="torch==2.13.0"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --disable-pip-version-check"
echo "[setup] 1/4 torch + build tools"
$PIP "$TORCH" "setuptools>=77.0.3,<80" wheel ninja psutil numpy
echo "[setup] 2/4 mmcv 2.1.0 with ops (built from source; ~7 min the first time, then from pip's cache)"
if ! $VENV/bin/python -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} $PIP --no-build-isolation "$TORCH" mmcv==2.1.0
fi
echo "[setup] 3/4 the rest of the pinned stack"
$PIP "$TORCH" -r requirements.txt
echo "[setup] 4/4 this project (editable)"
$PIP "$TORCH" --no-build-isolation --no-deps -e .
$VENV/bin/python -c "import agvm._compat as c; c.apply(); import torchvision, timm, mmdet, mmseg, mmcv.ops; print('[setup] stack imports OK: torch', __import__('torch').__version__, 'mmcv', mmcv.__version__, 'mmdet', mmdet.__version__)"
rm -f "$VENV"/.agvm-setup-*
touch "$STAMP"
echo "[setup] done"
