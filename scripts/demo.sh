#!/usr/bin/env bash
# Installs cascadec and runs the embedded default: Fashion-MNIST, offline, CPU, minutes.
# (README: "Set up on a fresh machine"). Fashion-MNIST comes from Debian's dataset-fashion-mnist package
# when it is missing and we may install packages; otherwise pass --data or go online.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || echo "could not install dataset-fashion-mnist; cascadec will look in ~/.cache/cascadec/fashion_mnist"
fi
python -m pip install --quiet --disable-pip-version-check -e .
cascadec compress cifar_resnet8 --recipe fmnist_quick --out "${1:-runs/cifar_resnet8-fmnist_quick}" --resume
