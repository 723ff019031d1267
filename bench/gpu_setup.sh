#!/usr/bin/env bash
# The pure-Python wheels bgwatch and diffusers need on the GPU machine, which has torch, transformers,
# accelerate, numpy, Pillow, OpenCV, PyYAML, httpx, tqdm and onnxruntime but no network
# (/work/shared/OFFLINE.md). The wheels travel with the working tree in bench/.wheels (git-ignored: name it
# in the device tool's `carry`), and are installed there without an index into bench/.site.
#
#   bench/gpu_setup.sh download      # here, with network: ~7 MB into bench/.wheels
#   bench/gpu_setup.sh install       # there: pip install --no-index --no-deps --target bench/.site
#   PYTHONPATH=$PWD/bench/.site:$PWD python3 bench/gpu_sdxl.py ...
#
# rpds-py is the one compiled wheel: download fetches it for CPython 3.10 to 3.13 and install picks the
# one that fits (--find-links, not a list of files).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
PIP="${PIP:-$PYTHON -m pip}"
PURE=(diffusers==0.42.1 rembg==2.0.86 watchdog==7.1.0 sqlite-utils==4.2.1 sqlite-fts4==1.0.3
      click-default-group==1.2.4 click==8.5.1 tabulate==0.10.0 python-dateutil==4.0.0 pluggy==1.7.0
      loguru==0.7.3 pymatting==1.1.16 pooch==1.9.0 platformdirs==4.14.8 jsonschema==4.26.0
      jsonschema-specifications==2025.9.1 referencing==0.37.0 importlib-metadata==10.2.0 zipp==4.1.2
      prometheus-client)
NAMES=(diffusers rembg watchdog sqlite-utils sqlite-fts4 click-default-group click tabulate python-dateutil
       pluggy loguru pymatting pooch platformdirs jsonschema jsonschema-specifications referencing
       importlib-metadata zipp prometheus-client rpds-py)
case "${1:-}" in
  download)
    mkdir -p .wheels
    $PIP download --quiet --no-deps --only-binary=:all: -d .wheels "${PURE[@]}"
    for py in 3.10 3.11 3.12 3.13; do
      $PIP download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
        --python-version "$py" -d .wheels "rpds-py>=0.25"
    done
    du -sh .wheels ;;
  install)
    # Only what the machine lacks: a package it has is left alone (its own build may be newer).
    missing=()
    for name in "${NAMES[@]}"; do
      module="${name//-/_}"
      case "$name" in
        python-dateutil) module=dateutil ;; sqlite-fts4) module=sqlite_fts4 ;; pymatting) module=pymatting ;;
        prometheus-client) module=prometheus_client ;; click-default-group) module=click_default_group ;;
        jsonschema-specifications) module=jsonschema_specifications ;; rpds-py) module=rpds ;;
      esac
      $PYTHON -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is not None)" \
        && missing+=("$name")
    done
    if ((${#missing[@]})); then
      $PIP install --quiet --no-index --no-deps --find-links .wheels --target .site "${missing[@]}"
    fi
    echo "installed into bench/.site: ${missing[*]:-nothing}" ;;
  *) echo "usage: $0 download|install" >&2; exit 2 ;;
esac
