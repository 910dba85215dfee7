#!/usr/bin/env bash
# Create .venv and install asyncvid into it (add --test for the test extras).
# Torch comes first so that a machine without an NVIDIA GPU gets the CPU build of torch instead of several GB of
# CUDA packages: set TORCH_INDEX_URL (e.g. PyTorch's CPU wheel index) where plain `torch==2.13.0` resolves to CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch with CUDA"
    "${pip[@]}" "torch==2.13.0"
  else
    echo "setup: no NVIDIA GPU, installing the CPU build of torch"
    "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
  fi
fi

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
"${pip[@]}" -e ".${extras}"
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
