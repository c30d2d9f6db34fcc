#!/usr/bin/env bash
# Idempotent set-up of .venv for RobustReID.
#
# Why not `pip install fastreid`: fastreid 1.4.0 (the only release on PyPI) pins torch==1.13.1 and
# torchvision==0.14.1, which do not exist for Python 3.11, so pip's resolver fails. We install torch
# first, then fastreid with --no-deps, then the runtime packages fastreid really imports.
# robustreid.compat adapts fastreid/advertorch to today's Python/torch/numpy at import time.
#
# Usage: scripts/setup.sh [--gpu]      (--gpu installs faiss-gpu instead of faiss-cpu)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
FAISS=faiss-cpu
[ "${1:-}" = "--gpu" ] && FAISS=faiss-gpu

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check --no-cache-dir"
stamp="$VENV/.robustreid-setup-$FAISS-$(cat setup.py requirements.txt scripts/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  echo "[setup] $VENV is up to date ($stamp)"
  exit 0
fi
# torch 2.14.1 from PyPI is a CUDA build: with its nvidia-* and triton wheels the venv takes ~6.2 GB.
# A full disk otherwise surfaces as pip's "[Errno 28] No space left on device" halfway through.
NEED_MB=${ROBUSTREID_SETUP_NEED_MB:-6500}
free_mb=$(df -Pk "$VENV" | awk 'NR==2 {printf "%d", $4 / 1024}')
echo "[setup] $free_mb MB free on the file system of $VENV (torch needs about $NEED_MB MB)"
if [ "$free_mb" -lt "$NEED_MB" ] && ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "error: only $free_mb MB free under $(cd "$VENV" && pwd); installing torch 2.14.1 needs" \
       "about $NEED_MB MB (ROBUSTREID_SETUP_NEED_MB overrides the check)" >&2
  exit 28
fi
echo "[setup] installing torch/torchvision (large, from the local wheel cache when present)"
$PIP install -q torch==2.14.1 torchvision==0.29.1
echo "[setup] installing fastreid 1.4.0 without its impossible pins"
$PIP install -q --no-deps fastreid==1.4.0
echo "[setup] installing runtime requirements and $FAISS"
# faiss-cpu and faiss-gpu install the same `faiss` module: never keep both.
OTHER_FAISS=faiss-gpu; [ "$FAISS" = faiss-gpu ] && OTHER_FAISS=faiss-cpu
$PIP uninstall -q -y "$OTHER_FAISS" >/dev/null 2>&1 || true
$PIP install -q -r requirements.txt "$FAISS"
# imagecorruptions requires opencv-python (a second cv2 beside the headless one): --no-deps.
$PIP install -q --no-deps imagecorruptions==1.1.2
echo "[setup] installing robustreid (editable)"
$PIP install -q --no-deps -e .
rm -f "$VENV"/.robustreid-setup-*
touch "$stamp"
echo "[setup] done: $($VENV/bin/python -c 'import torch, fastreid, faiss; print("torch", torch.__version__, "faiss", faiss.__version__)')"
