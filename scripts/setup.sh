#!/usr/bin/env bash
# Set up napari-segthenseg in ./.venv: system libraries for Qt/Xvfb (Debian/Ubuntu), a venv, the
# project with its Qt binding and test tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxkbcommon-x11-0 libxcb-image0 libxcb-render-util0
  libxcb-xinerama0 libxcb-cursor0 libxcb-shape0 libxcb-randr0 libxcb-xfixes0 libgl1 libegl1 libfontconfig1 libdbus-1-3"
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "== installing system libraries (apt)"
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $APT_PACKAGES >/dev/null
  else
    echo "!! not root and no sudo: make sure these are installed: $APT_PACKAGES"
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || { echo "== creating .venv"; "$PY" -m venv .venv; }
pip_install() {  # pip, minus this machine's harmless "Location ... is ignored" index warnings
  .venv/bin/python -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
# torch first, on its own: the project only asks for torch>=2.3, so the build installed here is kept by
# the next step (which would otherwise resolve a bare "torch": the newest release, from PyPI a ~5 GB CUDA
# build on Linux). The default pin is the version the project is tested with; where pip has a local
# wheel of it (a find-links folder, as on the development machine: a CPU build) it takes that one.
# Choose another build or version with TORCH_REQUIREMENT, e.g. the CPU build from PyTorch's index:
#   TORCH_REQUIREMENT="torch --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
TORCH_REQUIREMENT=${TORCH_REQUIREMENT:-torch==2.13.0}
echo "== installing $TORCH_REQUIREMENT"
# shellcheck disable=SC2086
pip_install $TORCH_REQUIREMENT
echo "== installing napari-segthenseg[qt,dev]"
pip_install -e ".[qt,dev]"
echo "== ready: .venv/bin/segthenseg-demo (napari) or .venv/bin/python -m pytest (tests)"
