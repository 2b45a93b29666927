#!/usr/bin/env bash
# Installs the Debian data packages unitok reads (Fashion-MNIST, ViSP real video), if they are missing.
set -euo pipefail
PACKAGES="dataset-fashion-mnist visp-images-data"
FMNIST=/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
VISP=/usr/share/visp-images-data/ViSP-images/mire-2

if [ -f "$FMNIST" ] && [ -d "$VISP" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: unitok needs the Debian packages '$PACKAGES' (Fashion-MNIST and ViSP video) but apt-get is" >&2
  echo "not available here. Install them on a Debian/Ubuntu machine, or point UNITOK_FASHION_MNIST_DIR and" >&2
  echo "UNITOK_VISP_DIR at copies of /usr/share/datasets/fashion-mnist and /usr/share/visp-images-data/ViSP-images." >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "error: installing '$PACKAGES' needs root: run 'apt-get install -y $PACKAGES' as root" >&2
    exit 1
  fi
fi
echo "installing Debian data packages: $PACKAGES"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q $PACKAGES || { $SUDO apt-get update -q && $SUDO apt-get install -y -q $PACKAGES; }
