#!/usr/bin/env bash
# Create .venv and install asyncvid into it (add --test for the test extras; --diffusers lower installs the oldest
# diffusers pyproject.toml allows, which CI also tests; VENV=DIR puts the venv elsewhere).
# Torch comes first. With an NVIDIA GPU it is the CUDA build. Without one it should be the CPU build, but plain
# `torch==2.13.0` from PyPI on Linux x86-64 is the CUDA build (several GB of CUDA packages), so PyTorch's CPU wheel
# index is offered beside the configured ones; where that index is out of reach (an offline mirror), the configured
# index decides. TORCH_INDEX_URL overrides both. Afterwards the script says which build it got.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
CPU_INDEX=https://download.pytorch.org/whl/cpu

gpu=false
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=true; fi

if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "setup: installing torch from $TORCH_INDEX_URL"
    "${pip[@]}" --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
  elif $gpu; then
    echo "setup: NVIDIA GPU found, installing torch with CUDA"
    "${pip[@]}" "torch==2.13.0"
  elif "$venv/bin/python" -c "import urllib.request as u; u.urlopen('$CPU_INDEX/', timeout=5)" >/dev/null 2>&1; then
    echo "setup: no NVIDIA GPU, installing torch's CPU build (PyTorch's CPU wheel index beside the configured ones)"
    # The CPU wheel is 2.13.0+cpu, which pip ranks above PyPI's 2.13.0 for the same pin.
    "${pip[@]}" --extra-index-url "$CPU_INDEX" "torch==2.13.0"
  else
    echo "setup: no NVIDIA GPU and PyTorch's CPU wheel index is out of reach; installing torch from the configured index"
    "${pip[@]}" "torch==2.13.0"
  fi
fi

extras=""
diffusers=()
while [ $# -gt 0 ]; do
  case "$1" in
    --test) extras="[test]" ;;
    --diffusers)
      [ "${2:-}" = lower ] || { echo "setup: --diffusers takes 'lower' (the bound in pyproject.toml)" >&2; exit 2; }
      lower=$(sed -n 's/.*"diffusers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
      diffusers=("diffusers==$lower"); shift ;;
    *) echo "setup: unknown option '$1'; use --test and/or --diffusers lower" >&2; exit 2 ;;
  esac
  shift
done
"${pip[@]}" -e ".${extras}" "${diffusers[@]}"

build=$("$venv/bin/python" -c 'import torch; print(torch.__version__, "(CUDA " + torch.version.cuda + " build)" if torch.version.cuda else "(CPU build)")')
echo "setup: ready in $venv (torch $build, diffusers $("$venv/bin/python" -c 'import diffusers; print(diffusers.__version__)'))"
if ! $gpu && "$venv/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
  echo "setup: warning: this is torch's CUDA build but no NVIDIA GPU was found; for the much smaller CPU build:" \
       "rm -rf .venv && TORCH_INDEX_URL=$CPU_INDEX bash scripts/setup.sh" >&2
fi
