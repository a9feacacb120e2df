#!/usr/bin/env bash
# Create the project virtualenv (default .venv) and install fedsim with its test extras.
# Where pip's local wheel folders hold a CPU build of torch for this Python, install that
# first: the project only asks for "torch>=2.1", which the local wheel then satisfies, so no
# multi-GB CUDA build is downloaded here and nobody elsewhere is pinned to one version.
set -euo pipefail
venv="${1:-.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating $venv"
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
if ! "$vpy" -c 'import torch' 2>/dev/null; then
  tag=$("$vpy" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  links=$("$vpy" -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | tr ' ' '\n' | sort -u)
  wheel=""
  for dir in $links; do
    dir="${dir#file://}"
    cand=$(ls "$dir"/torch-*+cpu-"$tag"-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$cand" ] && wheel="$cand"
  done
  if [ -n "$wheel" ]; then
    echo "bootstrap: using local CPU torch wheel $(basename "$wheel")"
    "$vpy" -m pip install -q "$wheel"
  fi
fi
"$vpy" -m pip install -q -e '.[test]'
touch "$venv/.fedsim-installed"
