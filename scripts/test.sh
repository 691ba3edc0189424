#!/usr/bin/env bash
# Installs cascadec with its test dependencies and runs the test suite (README: "Set up on a fresh machine").
set -euo pipefail
cd "$(dirname "$0")/.."
# The Fashion-MNIST tests read Debian's dataset-fashion-mnist files; install them where we can.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || echo "note: could not install dataset-fashion-mnist"
fi
python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# Two workers, one per core of the 2-core CI machine, one math thread each (two processes that
# each spin two OpenMP threads on two cores slow both down); a file's tests stay on one worker,
# so module-scoped fixtures (a trained run, a two-rank job) are built once.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -n "${CASCADEC_TEST_WORKERS:-2}" --dist loadfile "$@"
