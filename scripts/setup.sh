#!/usr/bin/env bash
# Set up this machine for the node and its tests:
#   - Debian packages of the real DICOM tools the tests talk to (DCMTK, dicom3tools);
#   - a virtual environment in .venv with PyTorch 2.13.0 (CPU build, for training and export only)
#     installed first, then this project with its train and dev extras, editable.
# Idempotent: a second run only checks. Set LUMBAR_NODE_NO_TORCH=1 for a serving-only install.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dcmtk dicom3tools libpixelmed-java default-jre-headless orthanc)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "${LUMBAR_NODE_NO_TORCH:-0}" = "1" ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  # The CPU build of this exact version; any other version or an open range pulls CUDA packages.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[train,dev]"
fi
echo "setup: ready ($(.venv/bin/lumbar-node --version))"
