#!/usr/bin/env bash
# Set up this machine for the node and its tests:
#   - Debian packages of the real DICOM tools the tests talk to (DCMTK, dicom3tools) and openssl
#     (the TLS tests make their certificates with it);
#   - a virtual environment in .venv with PyTorch 2.13.0 (CPU build, for training and export only)
#     installed first, then this project with its train and dev extras, editable;
#   - the viewer test's parts (tests/integration/test_viewer.py): Orthanc's DICOMweb plugin,
#     Chromium and poppler from Debian, OHIF's built app (npm @ohif/app, its dist/, the tarball's
#     integrity pinned here) and playwright-core (npm ci of tests/support/viewer), both into
#     gitignored folders there. Nothing downloads a browser. Needs Node.js 20 or later.
# Idempotent: a second run only checks. Set LUMBAR_NODE_NO_TORCH=1 for a serving-only install.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dcmtk dicom3tools libpixelmed-java default-jre-headless orthanc openssl
              orthanc-dicomweb chromium poppler-utils)
command -v npm >/dev/null || APT_PACKAGES+=(nodejs npm)  # keep a Node.js installed otherwise (e.g. NodeSource)

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
# The viewer test's npm parts (idempotent: fetched again only when missing or of another version).
VIEWER=tests/support/viewer
OHIF_VERSION=3.13.2
OHIF_INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
if [ "$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)" -lt 20 ]; then
  echo "setup: Node.js 20 or later is needed for the viewer test (tests/support/viewer); install it and run again" >&2
else
  want=$(node -p "require('./$VIEWER/package-lock.json').packages['node_modules/playwright-core'].version")
  have=$(node -p "require('./$VIEWER/node_modules/playwright-core/package.json').version" 2>/dev/null || true)
  [ "$have" = "$want" ] || npm ci --prefix "$VIEWER" --ignore-scripts --no-audit --no-fund --silent
  if [ "$(cat "$VIEWER/ohif/VERSION" 2>/dev/null)" != "$OHIF_VERSION" ]; then
    echo "setup: fetching OHIF $OHIF_VERSION (npm @ohif/app, its built dist/)"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
    got=$(python3 -c 'import base64,hashlib,sys; print("sha512-"+base64.b64encode(hashlib.sha512(open(sys.argv[1],"rb").read()).digest()).decode())' "$tmp/ohif-app-$OHIF_VERSION.tgz")
    [ "$got" = "$OHIF_INTEGRITY" ] || { echo "setup: @ohif/app $OHIF_VERSION: integrity $got is not the pinned one" >&2; exit 1; }
    rm -rf "$VIEWER/ohif" && mkdir -p "$VIEWER/ohif"
    tar -xzf "$tmp/ohif-app-$OHIF_VERSION.tgz" -C "$VIEWER/ohif" --strip-components=1 package/dist
    echo "$OHIF_VERSION" > "$VIEWER/ohif/VERSION"
    rm -rf "$tmp"
  fi
fi
echo "setup: ready ($(.venv/bin/lumbar-node --version))"
